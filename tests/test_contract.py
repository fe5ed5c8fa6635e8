"""Contract tests over every method class in :data:`kdzoo.methods.__all__` (STYLE.md section 8).

Methods are discovered, not listed: a new method is covered as soon as it is exported. Each is
built by one generic recipe (tiny timm student and teacher, 1x32x32 inputs, 10 classes); a method
that needs more arguments adds them to :data:`METHOD_KWARGS`. The contract: one training step gives
a finite loss and gradients on every student/connector parameter and none on the teacher, the
teacher stays frozen and in eval mode, teacher weights never reach a state dict or checkpoint,
checkpoints load with ``weights_only=True`` and restore the student, and the named loss terms are
weighted and logged. KD is then checked against its formula and, through a real
``lightning.Trainer``, against a hand-written PyTorch loop (parity).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

import kdzoo.methods
from kdzoo.losses.functional import kd_loss
from kdzoo.methods import KD
from kdzoo.methods.base import ClassificationModule, DistillationModule
from kdzoo.models import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*self.trainer. reference is not registered.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    # kdzoo.methods.base silences this at import time, but pytest resets the warning filters
    # after collection (the teacher is in eval mode on purpose).
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

ABSTRACT_BASES = (ClassificationModule, DistillationModule)
METHODS: list[type[ClassificationModule]] = [
    obj
    for obj in (getattr(kdzoo.methods, name) for name in kdzoo.methods.__all__)
    if isinstance(obj, type) and issubclass(obj, ClassificationModule) and obj not in ABSTRACT_BASES
]
METHOD_IDS = [cls.__name__ for cls in METHODS]

NUM_CLASSES = 10
MEAN, STD = (0.5,), (0.25,)
COMMON_KWARGS: dict[str, Any] = {
    "student": "test_efficientnet",
    "num_classes": NUM_CLASSES,
    "in_chans": 1,
    "mean": MEAN,
    "std": STD,
}
# Extra constructor arguments a method needs beyond the generic recipe, keyed by class name.
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "KnowledgeConcentration": {
        "specialists": [TeacherSpec("test_resnet", weights="random") for _ in range(3)],
        "verticals": [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]],
    },
}


def build(cls: type[ClassificationModule], seed: int = 0, **overrides: Any) -> ClassificationModule:
    """The generic recipe: common kwargs, a random-init tiny teacher, method extras, overrides."""
    kwargs = dict(COMMON_KWARGS)
    if issubclass(cls, DistillationModule):
        kwargs["teacher"] = TeacherSpec("test_resnet", weights="random")
    kwargs.update(METHOD_KWARGS.get(cls.__name__, {}))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    try:
        return cls(**kwargs)
    except Exception as err:  # a discovered method the recipe does not cover
        pytest.fail(
            f"cannot construct {cls.__name__} from the generic contract-test recipe "
            f"{cls.__name__}(**{kwargs!r}): {type(err).__name__}: {err}. Add the arguments it "
            f"needs to METHOD_KWARGS[{cls.__name__!r}] in {Path(__file__).name}.",
            pytrace=False,
        )


def make_batch(n: int = 4, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def split_parameters(module: ClassificationModule):
    """(trainable non-teacher parameters, teacher parameters), by name."""
    teacher = {n: p for n, p in module.named_parameters() if n.startswith("teacher.")}
    trainable = {
        n: p
        for n, p in module.named_parameters()
        if not n.startswith("teacher.") and p.requires_grad
    }
    return trainable, teacher


class LogRecorder:
    """Stands in for ``LightningModule.log`` outside a Trainer."""

    def __init__(self) -> None:
        self.logged: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.logged[name] = value


class TinyData(L.LightningDataModule):
    """A few random 1x32x32 images with labels, served without shuffling."""

    def __init__(self, n: int = 8, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.x, self.y = make_batch(n, seed)
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def test_discovery_finds_the_methods() -> None:
    names = set(METHOD_IDS)
    assert {"KD", "Supervised"} <= names, names
    assert not names & {"ClassificationModule", "DistillationModule"}
    assert set(METHOD_KWARGS) <= names, (
        f"METHOD_KWARGS names unknown methods: {set(METHOD_KWARGS) - names}"
    )


# ---- one training step ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_training_step_gradients_and_frozen_teacher(cls, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(cls)
    module.train()
    monkeypatch.setattr(module, "log", LogRecorder())
    trainable, teacher = split_parameters(module)
    assert trainable, "a method must train something"
    student_names = {f"student.{n}" for n, _ in module.student.named_parameters()}
    assert student_names <= set(trainable), "every student parameter must be trainable"
    if isinstance(module, DistillationModule):
        assert teacher, "a distillation method must have a teacher"

    loss = module.training_step(make_batch(), 0)
    assert torch.is_tensor(loss) and loss.ndim == 0
    assert torch.isfinite(loss), loss
    assert loss.requires_grad
    loss.backward()

    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"{cls.__name__}: no gradient on {no_grad[:5]} ({len(no_grad)} params)"
    not_finite = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"{cls.__name__}: non-finite gradient on {not_finite[:5]}"
    assert all(p.grad is None for p in teacher.values()), "the teacher received gradients"
    assert all(not p.requires_grad for p in teacher.values()), "the teacher is not frozen"

    if isinstance(module, DistillationModule):
        module.train()
        assert module.student.training
        assert all(not m.training for m in module.teacher.modules()), "teacher left eval mode"


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_training_step_logs_weighted_terms(cls, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build(cls).eval()  # eval: deterministic, so loss_terms can be recomputed
    recorder = LogRecorder()
    monkeypatch.setattr(module, "log", recorder)
    batch = make_batch()
    with torch.no_grad():
        terms = module.loss_terms(batch)
        loss = module.training_step(batch, 0)
    assert terms, f"{cls.__name__}.loss_terms returned no terms"
    assert set(terms) <= set(module.loss_weights), (
        f"terms without a weight: {set(terms) - set(module.loss_weights)}"
    )
    expected_names = {"train/loss"} | {f"train/loss_{name}" for name in terms}
    assert expected_names <= set(recorder.logged), set(recorder.logged)
    for name, value in terms.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        torch.testing.assert_close(recorder.logged[f"train/loss_{name}"], value)
    weighted = sum(module.loss_weights[name] * value for name, value in terms.items())
    torch.testing.assert_close(loss, weighted)
    torch.testing.assert_close(recorder.logged["train/loss"], loss)


# ---- state dicts and checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_state_dict_round_trip(cls) -> None:
    module = build(cls, seed=0).eval()
    state = module.state_dict()
    assert not [k for k in state if k.startswith("teacher.")], "teacher weights in state_dict"
    assert any(k.startswith("student.") for k in state)

    fresh = build(cls, seed=1).eval()
    x, _ = make_batch()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), module(x)), "seeds 0 and 1 give the same student"
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)

    # strict loading still catches a missing student tensor (the teacher exemption is narrow).
    broken = dict(state)
    del broken[next(k for k in state if k.startswith("student."))]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(broken, strict=True)


@pytest.mark.parametrize("cls", METHODS, ids=METHOD_IDS)
def test_trainer_checkpoint(cls, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    module = build(cls)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=TinyData())
    assert trainer.global_step == 2
    paths = sorted(tmp_path.rglob("*.ckpt"))
    assert len(paths) == 1, paths
    path = paths[0]

    checkpoint = torch.load(path, weights_only=True)  # no pickled objects in a kdzoo checkpoint
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")], "teacher weights in checkpoint"
    for key, value in module.student.state_dict().items():
        torch.testing.assert_close(state[f"student.{key}"], value, rtol=0, atol=0)

    restored = cls.load_from_checkpoint(path)
    assert type(restored) is cls
    restored_student = restored.student.state_dict()
    for key, value in module.student.state_dict().items():
        torch.testing.assert_close(restored_student[key], value, rtol=0, atol=0)
    x, _ = make_batch(seed=3)
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module(x), rtol=0, atol=0)
    if isinstance(restored, DistillationModule):
        assert all(not p.requires_grad for p in restored.teacher.parameters())
        assert all(not m.training for m in restored.teacher.modules())


# ---- KD against its formula -----------------------------------------------------------------


def reference_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * (1/N) * sum_i sum_c p_t (log p_t - log p_s), written out (Hinton et al. 2015)."""
    log_p_s = student / temperature - torch.logsumexp(student / temperature, dim=1, keepdim=True)
    log_p_t = teacher / temperature - torch.logsumexp(teacher / temperature, dim=1, keepdim=True)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return temperature**2 * kl.sum() / student.shape[0]


def kd_step_loss(module: KD, batch) -> torch.Tensor:
    module.log = LogRecorder()  # outside a Trainer
    return module.training_step(batch, 0)


def test_kd_without_kd_term_is_cross_entropy() -> None:
    module = build(KD, kd_weight=0.0).eval()
    x, y = batch = make_batch()
    with torch.no_grad():
        loss = kd_step_loss(module, batch)
        want = F.cross_entropy(module.student.model(x), y)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_kd_without_ce_term_is_kd_loss() -> None:
    module = build(KD, ce_weight=0.0, kd_weight=1.0, temperature=4.0).eval()
    x, _ = batch = make_batch()
    with torch.no_grad():
        loss = kd_step_loss(module, batch)
        student_logits = module.student.model(x)
        teacher_logits = module.teacher.backbone.model(x)  # same mean/std: no re-normalisation
    torch.testing.assert_close(
        loss, kd_loss(student_logits, teacher_logits, temperature=4.0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        loss, reference_kd(student_logits, teacher_logits, 4.0), rtol=1e-4, atol=1e-6
    )
    assert loss > 0


def test_kd_weighted_sum_with_renormalised_teacher() -> None:
    """ce_weight * CE + kd_weight * T^2 KL, the teacher seeing its own normalisation."""
    teacher = TeacherSpec("test_resnet", weights="random", mean=(0.2,), std=(0.5,))
    module = build(KD, teacher=teacher, ce_weight=0.1, kd_weight=0.9, temperature=2.0).eval()
    x, y = batch = make_batch()
    with torch.no_grad():
        loss = kd_step_loss(module, batch)
        student_logits = module.student.model(x)
        teacher_logits = module.teacher.backbone.model((x * STD[0] + MEAN[0] - 0.2) / 0.5)
        unnormalised = module.teacher.backbone.model(x)
    want = 0.1 * F.cross_entropy(student_logits, y) + 0.9 * reference_kd(
        student_logits, teacher_logits, 2.0
    )
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    wrong = 0.1 * F.cross_entropy(student_logits, y) + 0.9 * reference_kd(
        student_logits, unnormalised, 2.0
    )
    assert not math.isclose(loss.item(), wrong.item(), rel_tol=1e-3)


def test_kd_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        KD(teacher=TeacherSpec("test_resnet", weights="random"), temperature=0.0, **COMMON_KWARGS)


# ---- parity: kdzoo KD through Lightning == a plain PyTorch loop ------------------------------


def test_kd_parity_with_plain_pytorch_loop(tmp_path: Path) -> None:
    # Batches of 8 at 64x64: with 4 images at 32x32, the BatchNorm layers of the tiny student
    # normalise over 4 values of 1x1 maps, which amplifies float32 rounding differences (~1e-7
    # after one step) to ~1e-4 within 3 steps of lr 0.1, for any two correct implementations.
    steps, batch_size, lr, temperature, ce_weight, kd_weight = 3, 8, 0.1, 4.0, 0.5, 0.5
    L.seed_everything(0, verbose=False)
    module = KD(
        teacher=TeacherSpec("test_resnet", weights="random"),
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        **COMMON_KWARGS,
    )
    initial_student = copy.deepcopy(module.student.model.state_dict())
    teacher = copy.deepcopy(module.teacher.backbone.model).eval()
    x, y = make_batch(n=batch_size * steps, seed=5, size=64)
    batches = list(zip(x.split(batch_size), y.split(batch_size), strict=True))

    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps

    # The same steps written by hand: student forward/backward, frozen eval-mode teacher.
    L.seed_everything(0, verbose=False)
    student = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES, in_chans=1)
    student.load_state_dict(initial_student)
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    for xb, yb in batches:
        logits = student(xb)
        with torch.no_grad():
            teacher_logits = teacher(xb)
        loss = ce_weight * F.cross_entropy(logits, yb) + kd_weight * reference_kd(
            logits, teacher_logits, temperature
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trained = module.student.model.state_dict()
    reference = student.state_dict()
    assert trained.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # The comparison can fail: training moved the weights well beyond the tolerance.
    moved = max(
        (reference[k].float() - initial_student[k].float()).abs().max().item()
        for k in reference
        if reference[k].is_floating_point()
    )
    assert moved > 1e-3
    # ...and the teacher did not move.
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(module.teacher.backbone.model.state_dict()[key], value)
