"""Callbacks the ``kdzoo`` command adds to every run."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Writes ``kdzoo predict`` outputs to ``predictions.csv`` next to the run's logs.

    One row per image of the predict split, in loader order: ``index`` (in the predict dataset),
    ``file`` (the image's path when the dataset has ``paths``, e.g. ImageFolder's; else empty),
    ``prediction`` (the class index), ``class_name`` (from the datamodule's ``class_names``
    when it has them; else empty) and the class probabilities ``p0..p{C-1}``. Under DDP every
    rank writes ``predictions.rank<R>.csv`` with the dataset indices it saw. An existing file is
    never overwritten: a numbered name is used. Segmentation methods (predictions without
    ``probs``) write one PNG of class ids per image, ``predictions/<index>.png`` (a new
    ``predictions.<n>/`` folder when it exists).

    Args:
        output_dir: where to write (default: the trainer's log directory).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        directory = Path(self.output_dir or trainer.log_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        stem = (
            "predictions" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}"
        )
        path, n = directory / f"{stem}.csv", 0
        while path.exists() or path.with_suffix("").exists():
            n += 1
            path = directory / f"{stem}.{n}.csv"
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        if predictions and "probs" not in predictions[0]:
            _write_masks(path.with_suffix(""), predictions, indices)
            return
        probs = torch.cat([p["probs"] for p in predictions]) if predictions else torch.empty(0, 0)
        if len(indices) != len(probs):  # loaders without a sampler that reports indices
            indices = list(range(len(probs)))
        files = _dataset_paths(trainer)
        names = getattr(trainer.datamodule, "class_names", None) or []
        if len(names) != probs.shape[1]:
            names = []
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            header = ["index", "file", "prediction", "class_name"]
            writer.writerow([*header, *[f"p{c}" for c in range(probs.shape[1])]])
            predicted = probs.argmax(dim=1).tolist() if len(probs) else []
            for index, label, row in zip(indices, predicted, probs.tolist(), strict=True):
                file = str(files[index]) if index < len(files) else ""
                name = names[label] if names else ""
                writer.writerow([index, file, label, name, *[f"{p:.6g}" for p in row]])
        print(f"kdzoo predict: wrote {len(probs)} predictions to {path}")


def _dataset_paths(trainer: L.Trainer) -> list[Any]:
    """The file of every item of the predict dataset (``dataset.paths``), or ``[]``."""
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, Sequence) and loaders:
        loaders = loaders[0]
    paths = getattr(getattr(loaders, "dataset", None), "paths", None)
    return list(paths) if paths is not None else []


def _write_masks(directory: Path, predictions: Sequence[Any], indices: list[int]) -> None:
    """One uint8 PNG of predicted class ids per image (the mmseg convention)."""
    import numpy as np
    from PIL import Image

    masks = [m for p in predictions for m in p["prediction"]]
    if len(indices) != len(masks):
        indices = list(range(len(masks)))
    directory.mkdir(parents=True)
    for index, mask in zip(indices, masks, strict=True):
        Image.fromarray(mask.to(torch.uint8).cpu().numpy().astype(np.uint8)).save(
            directory / f"{index}.png"
        )
    print(f"kdzoo predict: wrote {len(masks)} masks to {directory}/")
