"""Contract tests over every segmentation method in :data:`kdzoo.methods.__all__`.

Methods are discovered, not listed. Each is built by one recipe (tiny timm backbone, FCN head,
3x32x32 inputs, 4 classes; SegKD gets a saved SegSupervised teacher, FST dict batches). The
contract: a training step through a real ``lightning.Trainer`` changes the student and gives
finite logged losses; a frozen teacher gets no gradient, stays in eval mode and never reaches a
state dict; checkpoints load with ``weights_only=True`` and restore the network that is
evaluated; evaluation logs mIoU and pixel accuracy in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

import kdzoo.methods
from kdzoo.methods.segmentation import FST, SegKD, SegmentationModule, SegSupervised

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

METHODS = [
    obj
    for obj in (getattr(kdzoo.methods, name) for name in kdzoo.methods.__all__)
    if isinstance(obj, type) and issubclass(obj, SegmentationModule)
]
COMMON = {"student": "test_resnet", "num_classes": 4, "head": "fcn", "mean": (0.5,) * 3,
          "std": (0.25,) * 3}  # fmt: skip


def test_discovery_finds_the_methods() -> None:
    names = {cls.__name__ for cls in METHODS}
    assert {"SegSupervised", "LADTeacher", "SegKD", "FST"} <= names


def _build(cls: type, tmp_path: Path) -> SegmentationModule:
    kwargs: dict[str, Any] = dict(COMMON)
    if cls is SegKD:
        teacher = SegSupervised(**COMMON)
        path = tmp_path / "teacher.ckpt"
        torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)},
                   path)  # fmt: skip
        kwargs["teacher"] = {"weights": str(path)}
    if cls is FST:
        kwargs["k_steps"] = 1
    return cls(**kwargs)


def _loader(cls: type, n: int = 4) -> Any:
    g = torch.Generator().manual_seed(0)
    images, masks = (
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randint(0, 4, (n, 32, 32), generator=g),
    )
    labelled = DataLoader(TensorDataset(images, masks), batch_size=n)
    if cls is not FST:
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
    if cls is SegKD:  # a frozen distillation teacher: unchanged, eval mode, no gradient
        assert all(
            torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before, strict=True)
        )
        model.train()
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())
        assert not any(k.startswith("teacher.") for k in model.state_dict())
    if cls is FST:  # the EMA teacher is learned state: it moves and is checkpointed
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
    restored = cls.load_from_checkpoint(path)
    assert restored.hparams.keys() == checkpoint["hyper_parameters"].keys()
    x = torch.randn(2, 3, 40, 36)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 4, 40, 36)
        assert torch.equal(model(x), restored(x))
