"""Exact-replay augmentation (``augment_seed``): the training view of sample ``i`` in epoch ``e``
is a function of ``(augment_seed, e, i)`` only, and training batches carry the sample ids."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cli_helpers import QUIET, kdzoo

from kdzoo.datamodules import DataError, Digits, FashionMNIST
from kdzoo.methods.statistics import class_means, training_loader, training_view

SUBSET = 64
DATAMODULES = {"fmnist": FashionMNIST, "digits": Digits}


def build(cls=FashionMNIST, **kwargs):
    dm = cls(train_subset=SUBSET, eval_subset=16, **{"batch_size": 8, **kwargs})
    dm.setup("fit")
    return dm


def read_epochs(dm, *, shuffle: bool, n_epochs: int = 2) -> tuple[dict, list[list[int]]]:
    """``(epoch, sample id) -> image`` over ``n_epochs`` passes of a training loader, and the
    order of the ids in each pass."""
    loader = dm.train_dataloader() if shuffle else dm.loader(dm.train, train=False)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    orders = []
    for epoch in range(n_epochs):
        order = []
        for images, _, ids in loader:
            for image, i in zip(images, ids.tolist(), strict=True):
                assert (epoch, i) not in seen
                seen[epoch, i] = image.clone()
                order.append(i)
        orders.append(order)
    # Free the persistent workers now, before the next loader forks (see test_datamodules).
    del loader
    gc.collect()
    return seen, orders


def replayed(dm, epochs=(0, 1)) -> dict[tuple[int, int], torch.Tensor]:
    """``(epoch, sample id) -> image`` from :meth:`TransformedDataset.view`."""
    out = {}
    for epoch in epochs:
        for i in range(len(dm.train)):
            image, target, j = dm.train.view(i, epoch)
            assert j == dm.train.sample_ids[i] and target == dm.train.targets[i]
            out[epoch, j] = image
    return out


def assert_same_views(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, image in expected.items():
        assert torch.equal(got[key], image), key


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_views_depend_only_on_seed_epoch_and_sample(name):
    cls = DATAMODULES[name]
    expected = replayed(build(cls, augment_seed=3))
    assert len(expected) == 2 * SUBSET
    orders = []
    # Loader seeds (seed_everything), workers, batch sizes and orders all differ.
    for seed, workers, batch_size, shuffle in [
        (0, 0, 8, True),
        (1, 2, 5, True),
        (2, 0, SUBSET, False),
    ]:
        L.seed_everything(seed, verbose=False)
        dm = build(cls, augment_seed=3, num_workers=workers, batch_size=batch_size)
        got, order = read_epochs(dm, shuffle=shuffle)
        orders.append(order)
        assert_same_views(got, expected)
    assert orders[0][0] != orders[1][0] and orders[0][0] != orders[0][1]  # really reshuffled

    def stacked(views, epoch):
        return torch.stack([views[epoch, i] for i in build(cls).train.sample_ids])

    epoch_0, epoch_1 = stacked(expected, 0), stacked(expected, 1)
    assert not torch.equal(epoch_0, epoch_1)
    # The views within an epoch are not all alike, and another augment_seed changes them.
    assert len(torch.unique(epoch_0, dim=0)) > SUBSET // 2
    other = replayed(build(cls, augment_seed=4), epochs=(0,))
    assert not torch.equal(stacked(other, 0), epoch_0)


def test_training_batches_carry_sample_ids():
    dm = build(augment_seed=0, batch_size=10)
    batches = list(dm.train_dataloader())
    assert all(len(batch) == 3 for batch in batches)
    ids = torch.cat([batch[2] for batch in batches])
    targets = torch.cat([batch[1] for batch in batches])
    assert ids.dtype == torch.int64 and sorted(ids.tolist()) == sorted(dm.train.sample_ids)
    by_id = dict(zip(dm.train.sample_ids.tolist(), dm.train.targets.tolist(), strict=True))
    assert targets.tolist() == [by_id[i] for i in ids.tolist()]
    assert dm.train.sample_ids is dm.train.indices
    # The ids are positions in the official training set: the same images with any subset.
    full = FashionMNIST(augment_seed=0)
    full.setup("fit")
    position = np.searchsorted(full.train.sample_ids, dm.train.sample_ids[:5])
    for i, k in enumerate(position):
        assert torch.equal(full.train.view(int(k), 2)[0], dm.train.view(i, 2)[0])
    # Only the training split is replayed.
    assert len(next(iter(dm.val_dataloader()))) == 2
    assert dm.val.augment_seed is None and dm.test.augment_seed is None


def test_without_augment_seed_batches_are_pairs():
    dm = build()
    assert dm.train.augment_seed is None and dm.hparams.augment_seed is None
    assert all(len(batch) == 2 for batch in dm.train_dataloader())
    with pytest.raises(DataError, match="augment_seed"):
        dm.train.view(0, 0)


def test_direct_indexing_and_statistics_read_epoch_0():
    dm = build(augment_seed=7)
    for i in range(4):
        image, _, j = dm.train[i]
        assert torch.equal(image, dm.train.view(i, 0)[0]) and j == dm.train.sample_ids[i]
    # view() leaves the loader's stream (its epoch) alone.
    loader = dm.train_dataloader()
    for _ in range(2):
        for _ in loader:
            pass
    assert dm.train.stream.tolist()[1] == 1
    dm.train.view(0, 5)
    assert dm.train.stream.tolist()[1] == 1
    # The class-means passes read (images, targets, ids) batches.
    for augment in (True, False):
        view = training_view(dm.train, dm, augment=augment)
        means = class_means(
            lambda x: x.flatten(1), training_loader(view, 8), dm.num_classes, allow_missing=True
        )
        assert means.shape == (dm.num_classes, 28 * 28)


@pytest.mark.parametrize("value", [-1, "x", 1.5])
def test_invalid_augment_seed(value):
    with pytest.raises(DataError, match="augment_seed"):
        FashionMNIST(augment_seed=value)


FMNIST_CONFIGS = Path(__file__).resolve().parents[1] / "configs/fashion_mnist"


def test_cli_accepts_augment_seed(tmp_path):
    configs = ["-c", str(FMNIST_CONFIGS / "defaults.yaml")]
    configs += ["-c", str(FMNIST_CONFIGS / "supervised/test_resnet.yaml")]
    kdzoo(
        "fit", *configs, "--data.init_args.augment_seed=3", "--trainer.fast_dev_run=true",
        *QUIET, cwd=tmp_path,
    )  # fmt: skip


DDP_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from kdzoo.datamodules import FashionMNIST


class Recorder(L.LightningModule):
    def __init__(self, out):
        super().__init__()
        self.net = torch.nn.Linear(28 * 28, 10)
        self.out, self.seen = out, {}

    def training_step(self, batch, batch_idx):
        images, targets, ids = batch
        for image, i in zip(images, ids.tolist()):
            key = f"{self.current_epoch}:{i}"
            assert key not in self.seen, key
            self.seen[key] = hashlib.sha256(image.numpy().tobytes()).hexdigest()
        return F.cross_entropy(self.net(images.flatten(1)), targets)

    def on_train_end(self):
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out, devices, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    L.seed_everything(seed, verbose=False)
    dm = FashionMNIST(train_subset=64, eval_subset=16, batch_size=8, augment_seed=11)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(Recorder(out), datamodule=dm)
"""


def run_recorder(tmp_path: Path, devices: int, seed: int) -> dict[str, str]:
    script = tmp_path / "record.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / f"devices{devices}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(devices), str(seed)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(out.glob("rank*.json"))
    assert len(files) == devices
    seen: dict[str, str] = {}
    for file in files:
        part = json.loads(file.read_text())
        assert not seen.keys() & part.keys()  # every sample on exactly one rank
        seen.update(part)
    return seen


def test_one_and_two_ddp_processes_see_the_same_views(tmp_path):
    one = run_recorder(tmp_path, devices=1, seed=1)
    two = run_recorder(tmp_path, devices=2, seed=2)
    assert len(one) == 2 * SUBSET
    differ = sorted(k for k in one.keys() | two.keys() if one.get(k) != two.get(k))
    assert not differ, f"{len(differ)} views differ, e.g. {differ[:8]}"
    ids = {key.split(":")[1] for key in one}
    assert sum(one[f"0:{i}"] != one[f"1:{i}"] for i in ids) > SUBSET // 2
