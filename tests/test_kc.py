"""Knowledge Concentration: losses, the SC head and the method (specs/classification.md, section 5).

Gao, Guo, Li, Nevatia, "Knowledge Concentration: Learning 100K Object Classifiers in a Single CNN",
arXiv:1711.07607, 2017 (no official code). The references below are written from the spec's
formulas, per element and per sample in float64, sharing nothing with kdzoo:

    L = -(1/N) sum_i sum_j [z_ij log s_ij + (1 - z_ij) log(1 - s_ij)],   s = 1 / (1 + exp(-x))
    z*_ij = p_ij if j is in the label's vertical and among its teacher's top K there, else 0

The oracles are those of spec section 5.7: target masking, the scale layer's norm, and the
parameter counts of section 5.3.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml
from cli_helpers import DATA, QUIET, assert_clear_error, kdzoo, last_metrics
from safetensors.torch import save_file
from trainer_helpers import quiet_trainer

from kdzoo.cli import main as kdzoo_main
from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.losses.functional import concentration_loss, concentration_targets
from kdzoo.methods import KnowledgeConcentration, Supervised
from kdzoo.models import TeacherSpec, WeightsError
from kdzoo.models.sc_head import SCHead
from kdzoo.models.teacher import Teacher

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
# Half of cli_helpers.DATA: four `kdzoo` runs must stay well under a minute on 2 busy cores.
SMALL_DATA = [*DATA, "--data.train_subset=200", "--data.eval_subset=100"]
VERTICALS = [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]]
COMMON = {
    "student": "test_resnet",
    "num_classes": 10,
    "in_chans": 1,
    "mean": (0.5,),
    "std": (0.25,),
}

# ---- independent references -----------------------------------------------------------------


def reference_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_i sum_j [z log s + (1 - z) log(1 - s)], element by element in float64."""
    x, z = logits.double().tolist(), targets.double().tolist()
    total = 0.0
    for row_x, row_z in zip(x, z, strict=True):
        for xij, zij in zip(row_x, row_z, strict=True):
            s = 1.0 / (1.0 + math.exp(-xij))
            # 1 - s written as 1 / (1 + e^x): float64 `1.0 - s` loses digits once s ~ 1.
            one_minus_s = 1.0 / (1.0 + math.exp(xij))
            total -= zij * math.log(s) + (1.0 - zij) * math.log(one_minus_s)
    return torch.tensor(total / len(x), dtype=torch.float64)


def reference_targets(probs: torch.Tensor, verticals: list[list[int]], top_k) -> torch.Tensor:
    """Per sample: the teacher's probabilities on its top K vertical classes (ties: lower class
    first), 0 elsewhere."""
    out = torch.zeros_like(probs)
    for i, vertical in enumerate(verticals):
        ranked = sorted(vertical, key=lambda c: (-probs[i, c].item(), c))
        for c in ranked[: len(ranked) if top_k is None else top_k]:
            out[i, c] = probs[i, c]
    return out


def random_case(n: int, c: int, scale: float, seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.rand(n, c, generator=gen, dtype=torch.float64).to(dtype)
    targets[:, ::3] = 0.0  # exact zeros, as outside a vertical
    return logits, targets


def per_sample_verticals(target: torch.Tensor, verticals: list[list[int]]) -> list[list[int]]:
    return [next(v for v in verticals if int(t) in v) for t in target]


def mask_of(sample_verticals: list[list[int]], c: int) -> torch.Tensor:
    mask = torch.zeros(len(sample_verticals), c, dtype=torch.bool)
    for i, vertical in enumerate(sample_verticals):
        mask[i, vertical] = True
    return mask


# ---- the loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "c", "scale"), [(1, 1, 1.0), (4, 10, 3.0), (8, 37, 1.0), (3, 5, 8.0)]
)
def test_loss_matches_reference(n, c, scale, dtype) -> None:
    logits, targets = random_case(n, c, scale, seed=n * 100 + c, dtype=dtype)
    got = concentration_loss(logits, targets)
    assert got.ndim == 0 and got.dtype == dtype
    want = reference_bce(logits, targets)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # Reduction: sum over classes, mean over samples (not a mean over classes, not a batch sum).
    assert not math.isclose(got.item(), want.item() / c, rel_tol=1e-3) or c == 1
    assert not math.isclose(got.item(), want.item() * n, rel_tol=1e-3) or n == 1


def test_loss_is_stable_for_extreme_logits() -> None:
    logits = torch.tensor([[120.0, -120.0, 0.0], [-300.0, 300.0, 30.0]])
    targets = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    got = concentration_loss(logits, targets)
    assert torch.isfinite(got)
    # Confidently right everywhere except the 0.5 target (log 2) and the 30 logit (~e^-30).
    torch.testing.assert_close(got, torch.tensor(math.log(2) / 2), rtol=1e-6, atol=1e-6)
    wrong = concentration_loss(logits, 1 - targets)
    torch.testing.assert_close(wrong, torch.tensor((120 + 120 + math.log(2) + 600 + 30) / 2))


def test_loss_under_bf16_is_computed_in_float32() -> None:
    logits, targets = random_case(4, 10, 2.0, seed=1, dtype=torch.float32)
    got = concentration_loss(logits.bfloat16(), targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), reference_bce(logits.bfloat16(), targets), rtol=1e-5, atol=1e-5
    )


# ---- the targets and the spec's masking oracle -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [None, 1, 2, 3, 4, 100])
def test_targets_match_reference(top_k, dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    probs = torch.rand(12, 10, generator=gen, dtype=torch.float64).to(dtype)
    label = torch.randint(0, 10, (12,), generator=gen)
    sample_verticals = per_sample_verticals(label, VERTICALS)
    got = concentration_targets(probs, mask_of(sample_verticals, 10), top_k=top_k)
    assert got.dtype == dtype
    want = reference_targets(probs, sample_verticals, top_k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Oracle 5.7.1: exactly 0 outside the vertical and below the top K; exactly p inside.
    kept = want != 0
    assert (got[~kept] == 0).all() and (got[kept] == probs[kept]).all()
    expected_kept = [min(len(v), top_k or len(v)) for v in sample_verticals]
    assert kept.sum(dim=1).tolist() == expected_kept


def test_targets_ties_keep_the_lower_class() -> None:
    probs = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    mask = torch.tensor([[True, True, True, True, False]])
    got = concentration_targets(probs, mask, top_k=2)
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.9, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [None, 10, 11, 1000])
def test_single_vertical_with_all_classes_is_bce_on_teacher_probs(top_k, dtype) -> None:
    """Oracle 5.7.1: one vertical holding every class and K >= N gives sigmoid BCE against the
    teacher's sigmoid probabilities."""
    gen = torch.Generator().manual_seed(3)
    student = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2).to(dtype)
    teacher = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2).to(dtype)
    probs = teacher.sigmoid()
    targets = concentration_targets(probs, torch.ones(6, 10, dtype=torch.bool), top_k=top_k)
    got = concentration_loss(student, targets)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), reference_bce(student, probs), rtol=tol, atol=tol)
    # ...and K < N does cut it, so the check above can fail.
    cut = concentration_targets(probs, torch.ones(6, 10, dtype=torch.bool), top_k=9)
    assert not torch.allclose(concentration_loss(student, cut), got)


def test_targets_and_loss_reject_bad_inputs() -> None:
    probs, mask = torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="top_k"):
        concentration_targets(probs, mask, top_k=0)
    with pytest.raises(ValueError, match="bool"):
        concentration_targets(probs, mask.float())
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        concentration_targets(probs, mask[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        concentration_loss(torch.zeros(2, 4), torch.zeros(2, 5))


# ---- the SC head ----------------------------------------------------------------------------


def weights_only(module: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight"))


def all_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "verticals", [VERTICALS, [list(range(10))], [[3], [0, 1, 2], [4, 5, 6, 7, 8, 9]]]
)
def test_parameter_counts_match_the_spec(verticals) -> None:
    """Spec 5.3, weights only: (a) s_b s1 + s1 s2 + s2 N; (b) s_b s1 + s1 s2 M + s2 N. With
    biases: (a) adds s1 + s2 + N, (b) adds s1 + s2 M + N; the scale adds M or N gammas."""
    s_b, s1, s2 = 24, 16, 8
    n, m = sum(len(v) for v in verticals), len(verticals)
    fc = SCHead(s_b, verticals, (s1, s2), structure="fc", scale="none")
    sc = SCHead(s_b, verticals, (s1, s2), structure="sc", scale="none")
    assert weights_only(fc) == s_b * s1 + s1 * s2 + s2 * n
    assert weights_only(sc) == s_b * s1 + s1 * s2 * m + s2 * n
    assert all_parameters(fc) == s_b * s1 + s1 * s2 + s2 * n + s1 + s2 + n
    assert all_parameters(sc) == s_b * s1 + s1 * s2 * m + s2 * n + s1 + s2 * m + n
    for scale, extra in (("vertical", m), ("class", n), ("fixed", 0)):
        head = SCHead(s_b, verticals, (s1, s2), scale=scale)
        assert all_parameters(head) == all_parameters(sc) + extra, scale
    # Oracle 5.7.3: SC with one vertical has exactly the parameters of FC.
    if m == 1:
        assert all_parameters(sc) == all_parameters(fc)


def test_structural_connectivity() -> None:
    """Logits of vertical m depend on the shared layer and on vertical m's block only."""
    torch.manual_seed(0)
    head = SCHead(12, VERTICALS, (16, 8), scale="vertical")
    with torch.no_grad():
        head.gamma.copy_(torch.tensor([1.5, 2.0, 0.7]))
    x = torch.randn(5, 12)
    logits = head(x)
    for m, vertical in enumerate(VERTICALS):
        params = [*head.blocks.parameters(), head.gamma, *head.shared.parameters()]
        grads = torch.autograd.grad(
            logits[:, vertical].pow(2).sum(), params, retain_graph=True, allow_unused=True
        )
        by_param = dict(zip(map(id, params), grads, strict=True))
        for j, block in enumerate(head.blocks):
            for p in block.parameters():
                g = by_param[id(p)]
                if j == m:
                    assert g is not None and g.abs().sum() > 0
                else:
                    assert g is None or (g == 0).all(), f"vertical {m} depends on block {j}"
        gamma_grad = by_param[id(head.gamma)]
        assert (gamma_grad[torch.arange(3) != m] == 0).all() and gamma_grad[m] != 0
        assert all(by_param[id(p)].abs().sum() > 0 for p in head.shared.parameters())
    # The same by perturbation: changing block j moves exactly the logits of vertical j.
    with torch.no_grad():
        for j, block in enumerate(head.blocks):
            saved = block[0].weight.clone()
            block[0].weight.add_(1.0)
            moved = (head(x) != logits).any(dim=0)
            block[0].weight.copy_(saved)
            assert moved.nonzero().squeeze(1).tolist() == sorted(VERTICALS[j])


@pytest.mark.parametrize("structure", ["sc", "fc"])
def test_scale_layer_norms(structure) -> None:
    """Oracle 5.7.2: after the scale layer, vertical m's logit vector has L2 norm gamma_m."""
    torch.manual_seed(1)
    x = torch.randn(7, 12, dtype=torch.float64)
    sizes = torch.tensor([len(v) for v in VERTICALS], dtype=torch.float64)
    vertical = SCHead(12, VERTICALS, (16, 8), structure=structure).double()
    torch.testing.assert_close(vertical.gamma.detach(), sizes.sqrt())  # initialised at sqrt(N_m)
    with torch.no_grad():
        vertical.gamma.copy_(torch.tensor([0.3, 4.0, 11.0], dtype=torch.float64))
    fixed = SCHead(12, VERTICALS, (16, 8), structure=structure, scale="fixed").double()
    torch.testing.assert_close(fixed.gamma, sizes.sqrt(), rtol=1e-7, atol=0)  # in float32
    for head, gammas in ((vertical, [0.3, 4.0, 11.0]), (fixed, fixed.gamma.tolist())):
        logits = head(x)
        for v, gamma in zip(VERTICALS, gammas, strict=True):
            norms = logits[:, v].norm(dim=1)
            torch.testing.assert_close(norms, torch.full_like(norms, gamma), rtol=1e-12, atol=0)
    # Per class: y_j = gamma_j x_j / ||x||, so y / gamma has unit norm within each vertical.
    per_class = SCHead(12, VERTICALS, (16, 8), structure=structure, scale="class").double()
    start = [math.sqrt(len(v)) for v in VERTICALS for _ in v]
    torch.testing.assert_close(per_class.gamma.detach().tolist(), start)
    with torch.no_grad():
        per_class.gamma.uniform_(0.5, 3.0)
    by_vertical = per_class.vertical_logits(x)
    for z, g in zip(by_vertical, per_class.gamma.split(per_class.sizes), strict=True):
        torch.testing.assert_close((z / g).norm(dim=1), torch.ones(7, dtype=torch.float64))
    # Without a scale layer the norms are free.
    raw = SCHead(12, VERTICALS, (16, 8), structure=structure, scale="none").double()
    assert not torch.allclose(raw(x)[:, VERTICALS[0]].norm(dim=1), torch.tensor(2.0).double())


def test_head_outputs_in_global_class_order() -> None:
    torch.manual_seed(2)
    head = SCHead(12, VERTICALS, (16, 8))
    x = torch.randn(3, 12)
    logits, by_vertical = head(x), head.vertical_logits(x)
    for vertical, z in zip(VERTICALS, by_vertical, strict=True):
        torch.testing.assert_close(logits[:, vertical], z, rtol=0, atol=0)


def test_head_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="partitioning"):
        SCHead(8, [[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match="hidden"):
        SCHead(8, VERTICALS, (16,))
    with pytest.raises(ConfigError, match="scale"):
        SCHead(8, VERTICALS, scale="global")


# ---- Supervised with the sigmoid (specialist) loss ------------------------------------------


def test_supervised_sigmoid_loss_is_bce_against_one_hot() -> None:
    module = Supervised(loss="sigmoid", **COMMON).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 32, 32, generator=gen), torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        terms = module.loss_terms((x, y))
        logits = module(x)
    assert set(terms) == {"bce"} and module.loss_weights == {"bce": 1.0}
    one_hot = torch.zeros(4, 10)
    one_hot[torch.arange(4), y] = 1.0
    torch.testing.assert_close(
        terms["bce"].double(), reference_bce(logits, one_hot), rtol=1e-5, atol=1e-6
    )


def test_supervised_label_smoothing_is_softmax_only() -> None:
    with pytest.raises(
        ConfigError, match=r"label_smoothing=0\.1 is only implemented for loss='softmax'"
    ):
        Supervised(loss="sigmoid", label_smoothing=0.1, **COMMON)


# ---- the method -----------------------------------------------------------------------------


def build(**overrides) -> KnowledgeConcentration:
    kwargs = {
        **COMMON,
        "specialists": [TeacherSpec("test_resnet", weights="random") for _ in VERTICALS],
        "verticals": VERTICALS,
        "hidden": (16, 8),
        **overrides,
    }
    return KnowledgeConcentration(**kwargs)


def set_constant_outputs(module: KnowledgeConcentration, outputs: list[list[float]]) -> None:
    """Make specialist m output the logits ``outputs[m]`` for every image (zero fc weights)."""
    with torch.no_grad():
        for teacher, logits in zip(module.teacher, outputs, strict=True):
            fc = teacher.backbone.model.fc
            fc.weight.zero_()
            fc.bias.copy_(torch.tensor(logits))


HAND_SET = [[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.0], [4.0, -3.0, 1.5]]


@pytest.mark.parametrize("top_k", [None, 2])
def test_targets_come_from_the_label_specialist(top_k) -> None:
    module = build(top_k=top_k).eval()
    set_constant_outputs(module, HAND_SET)
    calls: dict[int, list[int]] = {m: [] for m in range(3)}
    for m, teacher in enumerate(module.teacher):
        teacher.register_forward_hook(lambda mod, args, out, m=m: calls[m].append(len(args[0])))
    y = torch.tensor([6, 1, 0, 8, 3, 2, 4])  # no footwear (5, 7, 9) in this batch
    x = torch.randn(len(y), 1, 32, 32)
    with torch.no_grad():
        targets = module.soft_targets(x, y)
        # Each specialist ran once, on the images of its vertical only.
        assert calls == {0: [4], 1: [], 2: [3]}
        student = module(x)
        terms = module.loss_terms((x, y))
    want = torch.zeros(len(y), 10)
    for i, label in enumerate(y.tolist()):
        m = next(k for k, v in enumerate(VERTICALS) if label in v)
        probs = torch.sigmoid(torch.tensor(HAND_SET[m]))
        keep = probs.argsort(descending=True, stable=True)[: top_k or len(probs)]
        for j in keep.tolist():
            want[i, VERTICALS[m][j]] = probs[j]
    torch.testing.assert_close(targets, want, rtol=0, atol=0)
    assert set(terms) == {"kc"}
    torch.testing.assert_close(
        terms["kc"].double(), reference_bce(student, want), rtol=1e-5, atol=1e-6
    )


def test_label_term_is_weighted_bce_against_one_hot() -> None:
    module = build(label_weight=0.5).eval()
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    y = torch.tensor([5, 1, 0, 9])
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        terms = module.loss_terms((x, y))
        loss = module.training_step((x, y), 0)
        logits = module(x)
    one_hot = torch.nn.functional.one_hot(y, 10).double()
    torch.testing.assert_close(
        terms["label"].double(), reference_bce(logits, one_hot), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(loss, terms["kc"] + 0.5 * terms["label"])


@pytest.mark.parametrize(
    "student", ["test_resnet", "test_efficientnet", "test_vit", "test_convnext"]
)
def test_student_classifier_is_the_sc_head(student) -> None:
    """Installed where timm keeps the classifier ("fc", "classifier", "head", "head.fc")."""
    module = build(student=student).eval()
    head = module.student.model.get_classifier()
    assert isinstance(head, SCHead) and head.num_classes == 10
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = module.student(x)
        torch.testing.assert_close(out.logits, head(out.embedding))
        torch.testing.assert_close(module(x), module.student.model(x))  # timm's own forward too
    assert out.embedding.shape == (2, module.student.embedding_dim)


def test_teachers_frozen_in_eval_mode_and_out_of_the_state_dict() -> None:
    module = build()
    module.train()
    assert module.student.training
    # A plain ModuleList of Teachers: each specialist stays in eval mode by itself.
    assert len(module.teacher) == 3 and all(isinstance(t, Teacher) for t in module.teacher)
    assert all(not m.training for t in module.teacher for m in t.modules())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    state = module.state_dict()
    assert state and not [k for k in state if k.startswith("teacher.")]
    assert "student.model.fc.gamma" in state and "student.model.fc.blocks.2.2.weight" in state
    assert not [k for k in state if "inverse_order" in k or "vertical_of_class" in k]


@pytest.mark.parametrize(
    ("verticals", "fragments"),
    [
        ([[0, 2, 4, 6], [5, 7, 9], [1, 8]], ["in no vertical [3]"]),
        ([[0, 2, 4, 6], [5, 7, 9, 2], [1, 3, 8]], ["in more than one vertical [2]"]),
        ([[0, 2, 4, 6], [5, 7, 9, 12], [1, 3, 8, -1]], ["out of range [-1, 12]"]),
        ([[0, 2, 4, 6], [], [1, 3, 8, 5, 7, 9]], ["empty verticals at positions [1]"]),
    ],
)
def test_verticals_must_partition_the_classes(verticals, fragments) -> None:
    with pytest.raises(ConfigError) as info:
        build(verticals=verticals)
    message = str(info.value)
    for fragment in [*fragments, "must partition the 10 classes 0..9", "Fix verticals"]:
        assert fragment in message, message


def test_specialists_must_fit_their_verticals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one specialist per vertical: got 2 specialists and 3"):
        build(specialists=[TeacherSpec("test_resnet", weights="random")] * 2)
    with pytest.raises(
        ConfigError, match=r"specialists\[1\].num_classes=4 but verticals\[1\] has 3"
    ):
        build(
            specialists=[
                TeacherSpec("test_resnet", weights="random"),
                TeacherSpec("test_resnet", weights="random", num_classes=4),
                TeacherSpec("test_resnet", weights="random"),
            ]
        )
    # A specialist checkpoint trained with --data.classes in another order.
    state = {
        f"student.model.{k}": v
        for k, v in timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict().items()
    }
    path = tmp_path / "footwear.ckpt"
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": {},
            "datamodule_hyper_parameters": {"classes": [7, 5, 9]},
        },
        path,
    )
    specialists = [
        TeacherSpec("test_resnet", weights="random"),
        TeacherSpec("test_resnet", weights=str(path)),
        TeacherSpec("test_resnet", weights="random"),
    ]
    with pytest.raises(
        ConfigError, match=r"trained on classes \[7, 5, 9\].*verticals\[1\] is \[5, 7, 9\]"
    ):
        build(specialists=specialists)
    module = build(specialists=specialists, verticals=[[0, 2, 4, 6], [7, 5, 9], [1, 3, 8]])
    for key, value in state.items():
        torch.testing.assert_close(
            module.teacher[1].backbone.model.state_dict()[key.removeprefix("student.model.")], value
        )
    # A teacher of all 10 classes is no specialist of a 3-class vertical.
    generalist = tmp_path / "generalist.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict(), generalist)
    specialists[1] = TeacherSpec("test_resnet", weights=str(generalist))
    with pytest.raises(
        WeightsError, match=r"specialists\[1\] for verticals\[1\]=\[5, 7, 9\]"
    ) as info:
        build(specialists=specialists)
    assert "trained on 10 classes and verticals[1] has 3" in str(info.value)


def test_fit_with_a_lightning_trainer(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    data = Digits(batch_size=32, train_subset=128, eval_subset=64, augment=False)
    module = KnowledgeConcentration(
        student="test_resnet",
        num_classes=data.num_classes,
        in_chans=data.in_chans,
        mean=data.mean,
        std=data.std,
        specialists=[
            TeacherSpec("test_resnet", weights="random"),
            TeacherSpec("test_resnet", weights="random"),
        ],
        verticals=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        top_k=3,
        label_weight=0.1,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
    )
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    head_before = module.student.model.fc.gamma.detach().clone()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_kc"]) and torch.isfinite(metrics["train/loss_label"])
    assert 0.0 <= metrics["val/top1"] <= 1.0
    assert not torch.equal(module.student.model.fc.gamma.detach(), head_before)  # gammas learn
    for key, value in module.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert not [
        k for k in torch.load(ckpt, weights_only=True)["state_dict"] if k.startswith("teacher.")
    ]
    restored = KnowledgeConcentration.load_from_checkpoint(ckpt)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), module.eval()(x), rtol=0, atol=0)
    assert restored.hparams.verticals == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


# ---- configs and the command line -------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        "specialist_tops.yaml",
        "specialist_footwear.yaml",
        "specialist_rest.yaml",
        "test_resnet-specialists.yaml",
    ],
)
def test_fashion_mnist_configs_parse(config, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["kdzoo"])  # LightningCLI warns when given args and argv
    with pytest.raises(SystemExit) as info:
        kdzoo_main(
            [
                "fit",
                "-c",
                str(CONFIGS / "defaults.yaml"),
                "-c",
                str(CONFIGS / "kc" / config),
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    init = printed["model"]["init_args"]
    if config.startswith("specialist"):
        assert (
            printed["model"]["class_path"] == "kdzoo.methods.Supervised"
            and init["loss"] == "sigmoid"
        )
        classes = printed["data"]["init_args"]["classes"]
        assert classes in VERTICALS
    else:
        assert printed["model"]["class_path"] == "kdzoo.methods.KnowledgeConcentration"
        assert init["verticals"] == VERTICALS
        assert [s["weights"] for s in init["specialists"]] == [None, None, None]


@pytest.mark.slow
def test_cli_specialists_then_kc_then_test(tmp_path: Path) -> None:
    """Two sigmoid specialists on digits 0-4 and 5-9, concentrated into one student, tested."""
    verticals = [[0, 1, 2, 3, 4], [9, 8, 7, 6, 5]]  # the second one in a non-sorted order
    ckpts = []
    for m, vertical in enumerate(verticals):
        kdzoo(
            "fit", "--model=Supervised", "--model.student=test_resnet", "--model.loss=sigmoid",
            *SMALL_DATA, f"--data.classes={vertical}", *QUIET, "--trainer.max_epochs=1",
            f"--trainer.logger.init_args.name=specialist{m}", cwd=tmp_path,
        )  # fmt: skip
        ckpts.append(
            next((tmp_path / f"runs/specialist{m}/version_0/checkpoints").glob("best-*.ckpt"))
        )
        hparams = torch.load(ckpts[-1], weights_only=True)
        assert hparams["hyper_parameters"]["num_classes"] == 5
        assert hparams["datamodule_hyper_parameters"]["classes"] == vertical
    config = {
        "model": {
            "class_path": "KnowledgeConcentration",
            "init_args": {
                "student": "test_resnet",
                "specialists": [{"name": "test_resnet", "weights": str(c)} for c in ckpts],
                "verticals": verticals,
                "hidden": [32, 16],
            },
        }
    }
    (tmp_path / "kc.yaml").write_text(yaml.safe_dump(config))
    kdzoo(
        "fit", "-c", "kc.yaml", *SMALL_DATA, *QUIET, "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=2", cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / "runs/knowledgeconcentration-test_resnet-specialists/version_0"
    fitted = last_metrics(run)
    assert math.isfinite(fitted["train/loss_kc"]) and 0.0 <= fitted["val/top1"] <= 1.0
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")] and "student.model.fc.gamma" in state
    out = kdzoo("test", "-c", str(run / "config.yaml"), f"--ckpt_path={best}", cwd=tmp_path)
    assert "test/top1" in out.stdout
    assert 0.0 <= last_metrics(run.parent / "version_1")["test/top1"] <= 1.0


@pytest.mark.slow
def test_cli_verticals_that_miss_a_class(tmp_path: Path) -> None:
    proc = kdzoo(
        "fit", "--model=KnowledgeConcentration", "--model.student=test_resnet",
        '--model.specialists=[{"name": "test_resnet"}, {"name": "test_resnet"}]',
        "--model.verticals=[[0, 1, 2, 3], [5, 6, 7, 8, 9]]", *DATA, cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_clear_error(proc, "kdzoo fit: error: ")
    (line,) = [line for line in proc.stderr.splitlines() if "kdzoo fit: error: " in line]
    for fragment in ("verticals must partition the 10 classes", "in no vertical [4]", "Fix"):
        assert fragment in line, line
