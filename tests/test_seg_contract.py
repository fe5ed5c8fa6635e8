"""Contract tests over every segmentation method exported by :mod:`kdzoo.methods.segmentation`.

Methods are discovered, not listed (``test_contract.py`` runs the contract every method shares):
every concrete :class:`SegmentationModule` in ``kdzoo.methods.segmentation.__all__`` is built by
one recipe (tiny timm backbone, FCN head, 3x32x32 inputs, 4 classes); a method that needs more
gets a :class:`Special` in :data:`SPECIAL` (SegKD a saved SegSupervised teacher, FST fewer
virtual steps and semi-supervised batches). The contract: a training step through a real
``lightning.Trainer`` changes the student and gives finite logged losses; a frozen teacher gets
no gradient, stays in eval mode and never reaches a state dict, a learned (EMA) teacher moves and
is checkpointed; checkpoints load with ``weights_only=True`` and restore the network that is
evaluated; evaluation logs mIoU and pixel accuracy in [0, 1].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

import kdzoo.methods.segmentation
from kdzoo.methods.segmentation import SegmentationModule, SegSupervised
from kdzoo.models.teacher import Teacher

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

METHODS = [
    obj
    for obj in (getattr(kdzoo.methods.segmentation, n) for n in kdzoo.methods.segmentation.__all__)
    if inspect.isclass(obj) and issubclass(obj, SegmentationModule) and not inspect.isabstract(obj)
]
COMMON = {"student": "test_resnet", "num_classes": 4, "head": "fcn", "mean": (0.5,) * 3,
          "std": (0.25,) * 3}  # fmt: skip


def _saved_teacher(tmp_path: Path) -> dict[str, Any]:
    """A SegSupervised run's checkpoint as the teacher (its architecture read from the file)."""
    teacher = SegSupervised(**COMMON)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)},
               path)  # fmt: skip
    return {"teacher": {"weights": str(path)}}


@dataclass(frozen=True)
class Special:
    """What one method needs beyond the recipe: constructor arguments (given a folder for
    files), and whether it trains on ``{"labelled", "unlabelled"}`` batches."""

    kwargs: Callable[[Path], dict[str, Any]] = lambda tmp_path: {}
    semi_supervised: bool = False


SPECIAL: dict[str, Special] = {
    "SegKD": Special(_saved_teacher),
    "FST": Special(lambda _: {"k_steps": 1}, semi_supervised=True),
}


def test_discovery_finds_the_methods() -> None:
    names = {cls.__name__ for cls in METHODS}
    assert names, "no segmentation method discovered"
    assert "SegmentationModule" not in names
    assert set(SPECIAL) <= names, f"SPECIAL names unknown methods: {set(SPECIAL) - names}"


def _special(cls: type) -> Special:
    return SPECIAL.get(cls.__name__, Special())


def _build(cls: type, tmp_path: Path) -> SegmentationModule:
    return cls(**COMMON, **_special(cls).kwargs(tmp_path))


def _loader(cls: type, n: int = 4) -> Any:
    g = torch.Generator().manual_seed(0)
    images, masks = (
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randint(0, 4, (n, 32, 32), generator=g),
    )
    labelled = DataLoader(TensorDataset(images, masks), batch_size=n)
    if not _special(cls).semi_supervised:
        return labelled
    unlabelled = DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g)), batch_size=n)
    return CombinedLoader({"labelled": labelled, "unlabelled": unlabelled}, "max_size_cycle")


def _fit(model: SegmentationModule, cls: type, tmp_path: Path) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_steps=1, logger=False, num_sanity_val_steps=0)
    val = DataLoader(TensorDataset(*next(iter(_loader(SegSupervised)))), batch_size=4)
    trainer.fit(model, train_dataloaders=_loader(cls), val_dataloaders=val)
    return trainer


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_training_step_moves_the_student_only(cls: type, tmp_path: Path) -> None:
    model = _build(cls, tmp_path)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    teacher = getattr(model, "teacher", None)
    teacher_before = None if teacher is None else [p.clone() for p in teacher.parameters()]
    trainer = _fit(model, cls, tmp_path)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    for name, weight in model.loss_weights.items():
        if weight:
            assert f"train/loss_{name}" in logged, name
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, before[k])]
    assert any("backbone" in k for k in changed) and any("head" in k for k in changed)
    assert 0.0 <= logged["val/miou"] <= 1.0 and 0.0 <= logged["val/pixel_acc"] <= 1.0
    if isinstance(teacher, Teacher):  # a frozen distillation teacher: unchanged, eval, no grad
        assert all(
            torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before, strict=True)
        )
        model.train()
        assert all(not m.training for m in teacher.modules())
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert not any(k.startswith("teacher.") for k in model.state_dict())
    elif teacher is not None:  # a learned (EMA) teacher: it moves and is checkpointed
        assert any(
            not torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before, strict=True)
        )
        assert all(not p.requires_grad for p in teacher.parameters())
        assert any(k.startswith("teacher.") for k in model.state_dict())


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_checkpoint_restores_the_evaluated_network(cls: type, tmp_path: Path) -> None:
    model = _build(cls, tmp_path)
    trainer = _fit(model, cls, tmp_path)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain tensors and containers only
    if isinstance(getattr(model, "teacher", None), Teacher):  # a frozen teacher is never saved
        assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    restored = cls.load_from_checkpoint(path)
    assert restored.hparams.keys() == checkpoint["hyper_parameters"].keys()
    x = torch.randn(2, 3, 40, 36)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4, 40, 36)
        assert torch.equal(model(x), restored(x))
