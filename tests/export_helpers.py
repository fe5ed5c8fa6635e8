"""Tiny checkpoints of one method of every family, for the export tests.

Each :class:`Family` trains its method for one or two steps in-process (``lightning.Trainer`` on
CPU, random or tiny real data) and returns the checkpoint Lightning wrote, the trained module (in
eval mode), the hub name to export it under and a batch of inputs for the round trips. No
subprocess, no download: Fashion-MNIST mosaics come from the local Fashion-MNIST files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_contract import COMMON_KWARGS, PAIRED_KWARGS, RANDOM_TEACHER, TinyData, build
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.datamodules import FashionMNISTMosaics
from kdzoo.methods import KD, DualHeadDistillation, KnowledgeConcentration, SegSupervised
from kdzoo.methods.crossmodal import PairedSupervised
from kdzoo.methods.module import KDZooModule
from kdzoo.methods.tta import Tent
from kdzoo.models import TeacherSpec

FILTERS = (
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
)
MOSAICS = {
    "canvas_size": 32,
    "num_train": 8,
    "num_val": 4,
    "num_test": 4,
    "batch_size": 4,
    "eval_batch_size": 4,
    "num_workers": 0,
}


@dataclass
class Run:
    """A finished tiny run: its checkpoint and module, the hub name, and test inputs."""

    ckpt: Path
    module: KDZooModule
    name: str
    inputs: tuple[torch.Tensor, ...]

    def outputs(self, inputs: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*(inputs if inputs is not None else self.inputs))


def _fit(module: L.LightningModule, root: Path, data: Any, steps: int = 2) -> Path:
    """Fit ``steps`` steps and return the checkpoint written at the end."""
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = quiet_trainer(
        root, max_steps=steps, limit_val_batches=0, callbacks=[checkpoint], num_sanity_val_steps=0
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    module.eval()
    return root / "checkpoints" / "last.ckpt"


def _images(channels: int = 1, n: int = 3, size: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def kd(root: Path) -> Run:
    """Classification: a timm student distilled from a (random) timm teacher."""
    torch.manual_seed(0)
    module = KD(**COMMON_KWARGS, teacher=RANDOM_TEACHER)
    return Run(_fit(module, root, TinyData()), module, "test_efficientnet.kd_tiny", (_images(),))


def kc(root: Path) -> Run:
    """Knowledge Concentration: the student classifies through the FC-SC head."""
    module = build(KnowledgeConcentration, root)
    return Run(_fit(module, root, TinyData()), module, "test_efficientnet.kc_tiny", (_images(),))


def seg(root: Path) -> Run:
    """Segmentation: test_resnet + FCN head on 32x32 Fashion-MNIST mosaics."""
    torch.manual_seed(0)
    module = SegSupervised(
        student="test_resnet", num_classes=11, head="fcn", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    data = FashionMNISTMosaics(**MOSAICS)
    return Run(_fit(module, root, data), module, "test_resnet.seg_mosaics", (_images(3),))


def paired(root: Path) -> Run:
    """Cross-modal: the unimodal student on the first modality (a vector)."""
    torch.manual_seed(0)
    module = PairedSupervised(network="m1", **PAIRED_KWARGS)
    gen = torch.Generator().manual_seed(0)
    m1, m2 = PAIRED_KWARGS["modality_shapes"]
    data = TensorDataset(
        torch.randn(8, *m1, generator=gen),
        torch.randn(8, *m2, generator=gen),
        torch.randint(0, PAIRED_KWARGS["num_classes"], (8,), generator=gen),
    )
    x = torch.randn(3, *m1, generator=torch.Generator().manual_seed(7))
    return Run(_fit(module, root, DataLoader(data, batch_size=4)), module, "mlp.paired_m1", (x,))


def dho(root: Path) -> Run:
    """DHO: a headless timm backbone with a CE head and a KD head, fused at prediction."""
    torch.manual_seed(0)
    module = DualHeadDistillation(**COMMON_KWARGS, teacher=RANDOM_TEACHER)
    return Run(_fit(module, root, TinyData()), module, "test_efficientnet.dho_tiny", (_images(),))


def tta(root: Path) -> Run:
    """Test-time adaptation: Tent adapted on a 2-batch stream, then checkpointed by hand (``kdzoo
    test`` writes no checkpoint); BatchNorm on batch statistics."""
    torch.manual_seed(0)
    module = Tent(
        source=TeacherSpec("test_resnet", weights="random"),
        num_classes=10,
        in_chans=1,
        mean=(0.5,),
        std=(0.25,),
    )
    gen = torch.Generator().manual_seed(0)
    stream = TensorDataset(
        torch.randn(8, 1, 32, 32, generator=gen),
        torch.randint(0, 10, (8,), generator=gen),
        torch.zeros(8, dtype=torch.long),
    )
    trainer = quiet_trainer(root, inference_mode=False)
    trainer.test(module, dataloaders=DataLoader(stream, batch_size=4), verbose=False)
    ckpt = root / "adapted.ckpt"
    trainer.save_checkpoint(ckpt)
    module.eval()
    return Run(ckpt, module, "test_resnet.tent_tiny", (_images(),))


#: family -> how to build its run in a folder.
FAMILIES: dict[str, Callable[[Path], Run]] = {
    "classification": kd,
    "kc": kc,
    "segmentation": seg,
    "cross-modal": paired,
    "dho": dho,
    "tta": tta,
}
#: Families whose deployable network is not a plain timm model.
NOT_TIMM = {"kc", "segmentation", "cross-modal", "dho", "tta"}


def build_runs(tmp_path_factory: Any) -> dict[str, Run]:
    return {family: make(tmp_path_factory.mktemp(family)) for family, make in FAMILIES.items()}
