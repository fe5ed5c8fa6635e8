"""One line per epoch, for runs whose output goes to a file (nohup, SLURM) instead of a terminal."""

from __future__ import annotations

import math
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["EpochLines"]


class EpochLines(Callback):
    """Prints ``epoch E/N  train/loss=...  val/top1=...  (12.3 s)`` after every training epoch
    and the test/validation metrics after an evaluation, when the progress bar is off.

    A progress bar redraws one line in place, which a log file shows only when the run ends (or
    as thousands of carriage returns); these lines are flushed as they are written.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or trainer.sanity_checking:
            return
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        seconds = time.perf_counter() - self._start
        head = f"epoch {trainer.current_epoch + 1}/{total}"
        _print(
            f"{head}  {_format(trainer.callback_metrics, ('train/', 'val/'))}  ({seconds:.1f} s)"
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer) and trainer.state.fn == "validate":
            _print(f"validate  {_format(trainer.callback_metrics, ('val/',))}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            _print(f"test  {_format(trainer.callback_metrics, ('test/',))}")


def _format(metrics: dict, prefixes: tuple[str, ...]) -> str:
    items = []
    for key in sorted(metrics):
        if not key.startswith(prefixes) or key.endswith("_step"):
            continue
        value = float(metrics[key])
        items.append(f"{key.removesuffix('_epoch')}={value:.4g}" if math.isfinite(value) else key)
    return "  ".join(items)


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
