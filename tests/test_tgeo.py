"""TGeo-KD: relation features and fused loss against the formulas, the bilevel look-ahead (the
fusion network gets the right, non-zero gradient, the student none from held-out data), the
class-average table from training data, and the CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import DATA, QUIET, kdzoo, last_metrics
from trainer_helpers import quiet_trainer

from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.losses.functional import kd_loss, tgeo_loss, tgeo_relations
from kdzoo.methods import TGeoKD
from kdzoo.models import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:TGeoKD has no",
)

C = 5


def probs(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=gen, dtype=dtype).mul(2).softmax(dim=1)


def reference_relations(s, t, y, table, variant):
    """Built entry by entry from the code's feature lists (spec 3.1)."""
    rows = []
    for i in range(len(y)):
        g = [1.0 if c == y[i] else 0.0 for c in range(C)]
        m = table[y[i]].tolist()
        si, ti = s[i].tolist(), t[i].tolist()
        if variant == "released":
            row = si + ti + g + m
            for a, b in ((m, si), (g, si), (ti, si), (ti, g), (m, g)):
                row += [(a[c] - b[c]) ** 2 for c in range(C)]
        else:
            row = si + ti + m + g
            for a, b in ((si, g), (si, ti), (si, m)):
                row += [abs(a[c] - b[c]) for c in range(C)]
            row += [(g[c] - m[c]) * (g[c] - si[c]) for c in range(C)]
            row += [(g[c] - ti[c]) * (g[c] - si[c]) for c in range(C)]
        rows.append(row)
    return torch.tensor(rows, dtype=s.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["released", "cifar"])
def test_relations_match_the_code_feature_lists(variant, dtype) -> None:
    s, t, table = probs(6, 0, dtype), probs(6, 1, dtype), probs(C, 2, dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    got = tgeo_relations(s, t, y, table, variant=variant)
    assert got.shape == (6, 9 * C) and got.dtype == dtype
    torch.testing.assert_close(got, reference_relations(s, t, y, table, variant))


@pytest.mark.parametrize("variant", ["released", "cifar"])
def test_relations_are_zero_when_all_vertices_coincide(variant) -> None:
    y = torch.tensor([2, 0, 4])
    g = F.one_hot(y, C).double()
    table = torch.eye(C, dtype=torch.float64)  # each class's mean teacher vector is its one-hot
    features = tgeo_relations(g, g, y, table, variant=variant)
    assert torch.count_nonzero(features[:, 4 * C :]) == 0


def test_relations_bad_shapes() -> None:
    with pytest.raises(ValueError, match="class_mean_teacher_probs"):
        tgeo_relations(probs(2, 0), probs(2, 1), torch.tensor([0, 1]), probs(3, 2))
    with pytest.raises(ValueError, match="variant"):
        tgeo_relations(probs(2, 0), probs(2, 1), torch.tensor([0, 1]), probs(C, 2), variant="x")


def reference_fused(s, t, y, alpha, temperature):
    total = 0.0
    for i in range(len(y)):
        p_t = [math.exp(v / temperature) for v in t[i].tolist()]
        p_s = [math.exp(v / temperature) for v in s[i].tolist()]
        z_t, z_s = sum(p_t), sum(p_s)
        kl = sum(a / z_t * math.log((a / z_t) / (b / z_s)) for a, b in zip(p_t, p_s, strict=True))
        logits = s[i].tolist()
        ce = -logits[y[i]] + math.log(sum(math.exp(v) for v in logits))
        total += alpha[i] * temperature**2 * kl + (1 - alpha[i]) * ce
    return total / len(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_loss_against_the_formula_and_its_endpoints(dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = (
        torch.randn(7, C, generator=gen, dtype=dtype),
        torch.randn(7, C, generator=gen, dtype=dtype),
    )
    y = torch.randint(0, C, (7,), generator=gen)
    alpha = torch.rand(7, generator=gen, dtype=dtype)
    got = tgeo_loss(s, t, y, alpha, temperature=2.0)
    assert got.item() == pytest.approx(reference_fused(s, t, y, alpha.tolist(), 2.0), rel=1e-5)
    zeros, ones = torch.zeros(7, dtype=dtype), torch.ones(7, dtype=dtype)
    torch.testing.assert_close(tgeo_loss(s, t, y, zeros, temperature=2.0), F.cross_entropy(s, y))
    torch.testing.assert_close(
        tgeo_loss(s, t, y, ones, temperature=2.0), kd_loss(s, t, temperature=2.0)
    )
    ce_i, kd_i = F.cross_entropy(s, y, reduction="none"), torch.zeros(7, dtype=dtype)
    for i in range(7):
        kd_i[i] = kd_loss(s[i : i + 1], t[i : i + 1], temperature=2.0)
        mixed = tgeo_loss(
            s[i : i + 1], t[i : i + 1], y[i : i + 1], alpha[i : i + 1], temperature=2.0
        )
        assert min(ce_i[i], kd_i[i]) - 1e-6 <= mixed <= max(ce_i[i], kd_i[i]) + 1e-6


# ---- the method -------------------------------------------------------------------------------

COMMON = {"num_classes": 10, "in_chans": 1, "mean": (0.5,), "std": (0.25,)}


def build(**kwargs) -> TGeoKD:
    torch.manual_seed(0)
    return TGeoKD(
        teacher=TeacherSpec("test_resnet", weights="random"),
        student="test_resnet",
        **COMMON,
        **kwargs,
    )


def batch(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=gen), torch.arange(n) % 10


def test_fusion_network_shapes() -> None:
    released, cifar = build().fusion, build(variant="cifar").fusion
    assert released[0].in_features == cifar[0].in_features == 90
    assert [m.out_features for m in released if isinstance(m, torch.nn.Linear)] == [32, 16, 1]
    assert [m.out_features for m in cifar if isinstance(m, torch.nn.Linear)] == [128, 1]


def test_outer_gradient_reaches_only_the_fusion_network_and_is_the_lookahead_derivative() -> None:
    module = build(lookahead_lr=0.5).double().train()
    x, y = batch()
    x = x.double()
    module.class_mean_teacher_probs = probs(10, 5).new_full((10, 10), 0.1)
    with torch.no_grad():
        teacher_logits = module.teacher_forward(x).logits
    outer = module.outer_loss(x, y, teacher_logits)
    outer.backward()
    assert all(p.grad is None for p in module.student.parameters()), "held-out data trained it"
    grads = [p.grad for p in module.fusion.parameters()]
    assert all(g is not None for g in grads)
    assert max(g.abs().max().item() for g in grads) > 0, "the fusion network got no gradient"

    # Finite differences of the look-ahead objective in the fusion network's output bias.
    bias = module.fusion[4].bias
    analytic = bias.grad.item()
    step = 1e-5
    values = []
    for sign in (1, -1):
        shifted = copy.deepcopy(module)
        with torch.no_grad():
            shifted.fusion[4].bias.add_(sign * step)
        values.append(shifted.outer_loss(x, y, teacher_logits).item())
    numeric = (values[0] - values[1]) / (2 * step)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)


def test_lookahead_leaves_student_and_batchnorm_statistics_alone() -> None:
    module = build(lookahead_lr=0.5).train()
    before = copy.deepcopy(module.student.state_dict())
    x, y = batch()
    with torch.no_grad():
        teacher_logits = module.teacher_forward(x).logits
    module.outer_loss(x, y, teacher_logits)
    for key, value in module.student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_ratios_are_detached_in_the_students_loss(monkeypatch) -> None:
    module = build(outer_weight=0.0).train()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    loss = module.training_step(batch(), 0)
    loss.backward()
    fusion_grads = [p.grad for p in module.fusion.parameters()]
    # outer_weight 0: the only path to the fusion network would be the fused training loss.
    assert all(g is None or torch.count_nonzero(g) == 0 for g in fusion_grads)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"outer_every": 0}, "outer_every"),
        ({"fusion_lr": 0}, "fusion_lr"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build(**kwargs)


def test_fit_uses_training_table_and_held_out_split_never_the_test_split(tmp_path) -> None:
    class NoTestDigits(Digits):
        def test_dataloader(self):
            raise AssertionError("TGeoKD read the test split")

    data = NoTestDigits(train_subset=100, eval_subset=40, batch_size=20, augment=False)
    module = build(fusion_lr=0.05)
    fusion_before = copy.deepcopy(module.fusion.state_dict())
    trainer = quiet_trainer(
        tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    table = module.class_mean_teacher_probs
    torch.testing.assert_close(table.sum(dim=1), torch.ones(10))
    # The table is the mean teacher softmax over the training split, per class.
    data.setup("fit")
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor(data.train.targets)
    with torch.no_grad():
        p = module.teacher_forward(images).logits.softmax(dim=1)
    want = torch.stack([p[labels == c].mean(0) for c in range(10)])
    torch.testing.assert_close(table, want, rtol=1e-5, atol=1e-6)
    moved = [
        (module.fusion.state_dict()[k] - v).abs().max().item() for k, v in fusion_before.items()
    ]
    assert max(moved) > 0, "the fusion network was not trained"


@pytest.mark.slow
def test_tgeo_cli_fit_and_test(tmp_path, teacher_ckpt) -> None:
    teacher = teacher_ckpt
    kdzoo(
        "fit", "--model=TGeoKD", "--model.student=test_efficientnet",
        "--model.teacher.name=test_resnet", f"--model.teacher.weights={teacher}",
        "--model.outer_every=2", *DATA, *QUIET, "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=1", cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / "runs/tgeokd-test_efficientnet-test_resnet/version_0"
    metrics = last_metrics(run)
    assert 0.0 < metrics["train/alpha"] < 1.0
    assert 0.0 <= metrics["val/top1"] <= 1.0
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    kdzoo("test", "-c", str(run / "config.yaml"), f"--ckpt_path={best}", cwd=tmp_path)
    assert 0.0 <= last_metrics(run.parent / "version_1")["test/top1"] <= 1.0
