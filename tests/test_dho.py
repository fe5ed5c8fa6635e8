"""Reference tests for :class:`kdzoo.methods.DualHeadDistillation` (DHO).

Kang et al., "Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language
Models via Dual-Head Optimization", arXiv:2505.07675, as the student of PCoreSet / ActiveKD
(arXiv:2506.00910, spec oracle 4):

    L = ce_weight CE(h_ce(x_l), y)
        + kd_weight [T^2 KL(p_T(x_l) || q(x_l)) + T^2 KL(p_T(x_u) || q(x_u))],
    p_T = softmax(z_T / T), q = softmax(h_kd / T),
    p~ = (1 - alpha) softmax(h_ce) + alpha softmax(h_kd / beta).

The references below are written from these formulas in float64 with explicit sums; the teacher
is a tiny random timm classifier, run by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.errors import ConfigError
from kdzoo.methods import DualHeadDistillation
from kdzoo.models.teacher import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
)

NUM_CLASSES = 5
MEAN, STD = (0.5,), (0.25,)
COMMON = {"student": "test_resnet", "num_classes": NUM_CLASSES, "in_chans": 1, "mean": MEAN}


def build(seed: int = 0, **overrides) -> DualHeadDistillation:
    kwargs = {
        **COMMON,
        "std": STD,
        "teacher": TeacherSpec("test_resnet", weights="random"),
        **overrides,
    }
    torch.manual_seed(seed)
    return DualHeadDistillation(**kwargs)


def images(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def log_softmax_ref(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    z = z - z.max(dim=-1, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * (1/N) sum_i sum_c p_T (log p_T - log q)."""
    log_q, log_p = log_softmax_ref(student / t), log_softmax_ref(teacher / t)
    return t**2 * (log_p.exp() * (log_p - log_q)).sum() / len(student)


def ce_ref(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -log_softmax_ref(logits)[torch.arange(len(target)), target].mean()


def combined_ref(ce: torch.Tensor, kd: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return (1 - alpha) * log_softmax_ref(ce).exp() + alpha * log_softmax_ref(kd / beta).exp()


def silence(module: DualHeadDistillation) -> DualHeadDistillation:
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    return module


# ---- the fused prediction ---------------------------------------------------------------------


def test_combined_probs_spec_example() -> None:
    module = build()
    probs = module.combined_probs(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(
        probs, torch.tensor([[0.499464, 0.341312, 0.159224]]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 1.0), (0.0, 1.0), (1.0, 0.5), (0.3, 2.0)])
def test_combined_probs_formula(alpha: float, beta: float) -> None:
    gen = torch.Generator().manual_seed(1)
    ce, kd = torch.randn(6, 7, generator=gen) * 3, torch.randn(6, 7, generator=gen) * 3
    probs = build().combined_probs(ce, kd, alpha, beta)
    torch.testing.assert_close(probs.double(), combined_ref(ce, kd, alpha, beta), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))


def test_forward_predict_and_heads() -> None:
    module = build(alpha=0.3, beta=0.5).eval()
    x, y = images(4, seed=2)
    with torch.no_grad():
        ce, kd, feature = module.heads(x)
        out = module.predict_step((x, y), 0)
        logits = module(x)
    assert ce.shape == kd.shape == (4, NUM_CLASSES)
    assert feature.shape == (4, module.ce_head.in_features)
    want = combined_ref(ce, kd, 0.3, 0.5)
    torch.testing.assert_close(out["probs"].double(), want, rtol=0, atol=1e-6)
    assert torch.equal(out["prediction"], want.argmax(dim=1))
    # forward gives logits whose softmax is the fused prediction.
    torch.testing.assert_close(logits.softmax(dim=1).double(), want, rtol=0, atol=1e-6)


# ---- the loss ---------------------------------------------------------------------------------


def test_loss_matches_formula_with_renormalised_teacher() -> None:
    teacher = TeacherSpec("test_resnet", weights="random", mean=(0.2,), std=(0.5,))
    module = silence(build(teacher=teacher, ce_weight=0.3, kd_weight=0.7, temperature=2.0)).eval()
    (x, y), (x_u, _) = images(4, seed=3), images(6, seed=4)
    with torch.no_grad():
        loss = module.training_step({"labelled": (x, y), "unlabelled": (x_u, y)}, 0)
        ce, kd, _ = module.heads(x)
        _, kd_u, _ = module.heads(x_u)
        net = module.teacher.backbone.model
        t_l = net((x * STD[0] + MEAN[0] - 0.2) / 0.5)
        t_u = net((x_u * STD[0] + MEAN[0] - 0.2) / 0.5)
    want = 0.3 * ce_ref(ce, y) + 0.7 * (kd_ref(kd, t_l, 2.0) + kd_ref(kd_u, t_u, 2.0))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # The teacher's probabilities are softmax(z_T / T).
    torch.testing.assert_close(
        module.teacher_probs(x).double(), log_softmax_ref(t_l / 2.0).exp(), rtol=0, atol=1e-6
    )


def test_plain_batch_distils_on_labelled_only() -> None:
    module = silence(build()).eval()
    x, y = images(4, seed=5)
    with torch.no_grad():
        terms = module.loss_terms((x, y))
        loss = module.training_step([x, y], 0)
        ce, kd, _ = module.heads(x)
        teacher = module.teacher.backbone.model(x)  # same mean/std: no re-normalisation
    assert set(terms) == {"ce", "kd_labelled"}
    want = 0.5 * ce_ref(ce, y) + 0.5 * kd_ref(kd, teacher, 2.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def copy_teacher_into_kd_head(module: DualHeadDistillation) -> None:
    """Same architecture: the student's backbone + KD head become the teacher network."""
    state = module.teacher.backbone.model.state_dict()
    missing, unexpected = module.student.load_state_dict(state, strict=False)
    assert not missing and set(unexpected) == {"fc.weight", "fc.bias"}
    module.kd_head.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kd_head_equal_to_teacher_leaves_half_ce(temperature: float) -> None:
    module = silence(build(temperature=temperature)).eval()
    copy_teacher_into_kd_head(module)
    (x, y), (x_u, _) = images(4, seed=6), images(5, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(module.heads(x)[1], module.teacher_logits(x))
        terms = module.loss_terms({"labelled": (x, y), "unlabelled": x_u})
        loss = module.training_step({"labelled": (x, y), "unlabelled": x_u}, 0)
        ce = module.heads(x)[0]
    assert abs(terms["kd_labelled"].item()) < 1e-6
    assert abs(terms["kd_unlabelled"].item()) < 1e-6
    torch.testing.assert_close(loss.double(), 0.5 * ce_ref(ce, y), rtol=1e-5, atol=1e-6)
    assert loss > 0.1  # the CE head is still random


def test_no_gradient_crosses_between_heads() -> None:
    module = build().train()
    (x, y), (x_u, _) = images(8, seed=8), images(8, seed=9)
    terms = module.loss_terms({"labelled": (x, y), "unlabelled": (x_u, y)})
    kd = terms["kd_labelled"] + terms["kd_unlabelled"]
    ce_params = list(module.ce_head.parameters())
    kd_params = list(module.kd_head.parameters())
    backbone = [p for p in module.student.parameters() if p.requires_grad]

    ce_on_kd = torch.autograd.grad(terms["ce"], kd_params, retain_graph=True, allow_unused=True)
    kd_on_ce = torch.autograd.grad(kd, ce_params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in ce_on_kd), "CE reached the KD head"
    assert all(g is None or not g.any() for g in kd_on_ce), "KD reached the CE head"
    # ...while each loss trains its own head and the shared backbone.
    for loss, own in ((terms["ce"], ce_params), (kd, kd_params)):
        grads = torch.autograd.grad(loss, own + backbone, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[: len(own)])
        assert sum(g.abs().sum() for g in grads[len(own) :] if g is not None) > 0
    assert all(not p.requires_grad for p in module.teacher.parameters())


# ---- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"teacher": None}, "exactly one teacher"),
        ({"clip_teacher": {"class_names": ["a"] * NUM_CLASSES}}, "exactly one teacher"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"kd_weight": -1.0}, "kd_weight"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"teacher": TeacherSpec("test_resnet", weights="random", num_classes=3)}, "3 classes"),
        ({"student": "no_such_net"}, "unknown timm model"),
    ],
)
def test_bad_configuration(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(**overrides)


def test_bad_batch_dict() -> None:
    module = build()
    x, y = images(2, seed=0)
    with pytest.raises(ValueError, match="labelled"):
        module.loss_terms({"labeled": (x, y)})


# ---- Lightning -----------------------------------------------------------------------------


def combined_loader(n_labelled: int = 4, n_unlabelled: int = 8) -> CombinedLoader:
    x, y = images(n_labelled, seed=10)
    x_u, _ = images(n_unlabelled, seed=11)
    hidden = torch.full((n_unlabelled,), -1)  # unlabelled items carry no usable label
    loaders = {
        "labelled": DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False),
        "unlabelled": DataLoader(TensorDataset(x_u, hidden), batch_size=4, shuffle=False),
    }
    return CombinedLoader(loaders, mode="max_size_cycle")


def val_loader() -> DataLoader:
    return DataLoader(TensorDataset(*images(4, seed=12)), batch_size=4)


def test_fit_with_combined_loader(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    module = build(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2), warmup_fraction=0.5)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    trainer = quiet_trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=combined_loader(4, 12), val_dataloaders=val_loader())

    assert trainer.global_step == 3  # the unlabelled loader (3 batches) sets the epoch length
    logged = trainer.logged_metrics
    for name in ("val/top1", "val/top1_ce", "val/top1_kd", "val/loss", "train/loss_kd_unlabelled"):
        assert name in logged, sorted(logged)
    assert all(not m.training for m in module.teacher.modules())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    moved = [
        k for k, v in module.student.state_dict().items() if not torch.equal(v, student_before[k])
    ]
    assert moved, "the student did not train"
    # Per-step linear warm-up then decay: 0 after the last of the 3 steps.
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)

    result = trainer.test(module, dataloaders=val_loader(), verbose=False)[0]
    assert {"test/top1", "test/top1_ce", "test/top1_kd"} <= set(result)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    weights = tmp_path / "teacher.pt"
    torch.save(
        timm.create_model("test_resnet", num_classes=NUM_CLASSES, in_chans=1).state_dict(), weights
    )
    L.seed_everything(0, verbose=False)
    teacher = TeacherSpec("test_resnet", weights=str(weights), mean=(0.2,), std=(0.5,))
    module = build(teacher=teacher, alpha=0.25)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=combined_loader(), val_dataloaders=val_loader())
    (path,) = sorted(tmp_path.rglob("*.ckpt"))  # one epoch of 2 steps, then validation

    checkpoint = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("ce_head.") for k in checkpoint["state_dict"])

    restored = DualHeadDistillation.load_from_checkpoint(path)
    assert restored.alpha == 0.25
    assert restored.teacher.renormalise  # rebuilt from the stored TeacherSpec
    assert all(not p.requires_grad for p in restored.teacher.parameters())
    module.eval()
    restored.eval()
    x, _ = images(3, seed=13)
    with torch.no_grad():
        for mine, theirs in zip(module.heads(x), restored.heads(x), strict=True):
            torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
        # The teacher is rebuilt from its weight file, not from the checkpoint.
        torch.testing.assert_close(restored.teacher_logits(x), module.teacher_logits(x))
