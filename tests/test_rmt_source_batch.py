"""RMT's source batch size follows one rule from the CLI and from Python.

``source_batch_size=None`` means the test stream's batch size (the benchmark's source batch size
equals its test batch size): the datamodule's ``batch_size`` when the trainer has a datamodule
(``kdzoo test`` and ``trainer.test(module, datamodule=...)``), else the batch size of the test
dataloader (``trainer.test(module, dataloaders=...)``); 200 only when no trainer drives the
module. Observed through what RMT does with it: the batch size of its source loaders and the
number of warm-up steps, ``warmup_samples // source_batch_size``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.datamodules import Digits
from kdzoo.methods.statistics import default_source_batch_size
from kdzoo.methods.tta import RMT
from kdzoo.methods.tta import rmt as rmt_module
from kdzoo.models import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

MEAN, STD = (0.3053,), (0.3759,)  # Digits' normalisation: RMT checks its source data against it
STREAM_BATCH = 8
WARMUP = 4 * STREAM_BATCH


def _rmt(**kwargs) -> RMT:
    torch.manual_seed(0)
    return RMT(
        source=TeacherSpec("test_resnet", weights="random"),
        num_classes=10,
        in_chans=1,
        mean=MEAN,
        std=STD,
        cont_weight=0.0,
        src_weight=0.0,
        warmup_samples=WARMUP,
        source_data=Digits(train_subset=64, batch_size=5, augment=False),
        cache=False,
        **kwargs,
    )


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(STREAM_BATCH, 1, 32, 32, generator=g),
            torch.randint(0, 10, (STREAM_BATCH,), generator=g),
            torch.zeros(STREAM_BATCH, dtype=torch.long),
        )
        for _ in range(n)
    ]


class PreBatchedStream(L.LightningDataModule):
    """A stream datamodule like :class:`~kdzoo.datamodules.CorruptionStream`: its test loader
    yields whole batches (``batch_size=None``), its batch size is a hyper-parameter."""

    def __init__(self, batch_size: int = STREAM_BATCH) -> None:
        super().__init__()
        self.save_hyperparameters()

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_batches(), batch_size=None)


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loader_batch_sizes: list[int] = []
        self.warmup_steps: list[int] = []
        source_loader, warmup = rmt_module.source_loader, RMT.warmup

        def recording_loader(datamodule, batch_size, seed, *args, **kwargs):
            self.loader_batch_sizes.append(batch_size)
            return source_loader(datamodule, batch_size, seed, *args, **kwargs)

        def recording_warmup(module, optimizer, batches, steps):
            self.warmup_steps.append(steps)
            return warmup(module, optimizer, batches, steps)

        monkeypatch.setattr(rmt_module, "source_loader", recording_loader)
        monkeypatch.setattr(RMT, "warmup", recording_warmup)


def _test(module: RMT, tmp_path: Path, **data) -> None:
    trainer = quiet_trainer(tmp_path, inference_mode=False)
    trainer.test(module, verbose=False, **data)


def test_python_with_dataloaders_uses_the_stream_batch_size(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch)
    loader = DataLoader(
        TensorDataset(*(torch.cat(parts) for parts in zip(*_batches(), strict=True))),
        batch_size=STREAM_BATCH,
    )
    _test(_rmt(), tmp_path, dataloaders=loader)
    assert recorder.loader_batch_sizes == [STREAM_BATCH]
    assert recorder.warmup_steps == [WARMUP // STREAM_BATCH]


def test_python_with_a_datamodule_uses_its_batch_size(monkeypatch, tmp_path):
    """The CLI's path (``kdzoo test`` attaches the stream datamodule to the trainer)."""
    recorder = Recorder(monkeypatch)
    _test(_rmt(), tmp_path, datamodule=PreBatchedStream(batch_size=STREAM_BATCH))
    assert recorder.loader_batch_sizes == [STREAM_BATCH]
    assert recorder.warmup_steps == [WARMUP // STREAM_BATCH]


def test_a_given_source_batch_size_wins(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch)
    _test(_rmt(source_batch_size=16), tmp_path, datamodule=PreBatchedStream())
    assert recorder.loader_batch_sizes == [16]
    assert recorder.warmup_steps == [WARMUP // 16]


def test_without_a_trainer_the_fallback_is_the_benchmark_200():
    module = _rmt()
    assert default_source_batch_size(module, None) == 200
    assert default_source_batch_size(module, 7) == 7
