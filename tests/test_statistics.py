"""kdzoo.methods.statistics: one cache keyed by what was measured (and a cached table equal to a
fresh one bit for bit), the rank-0 and sharded paths of ``compute_once``, the training-split views
and loaders, the endless loader and the source-data checks.

The DDP paths also run for real, through the CLI on two CPU processes, in the slow tests
``test_nd_method.py::test_nd_cli_ddp_class_means_equal_single_process`` (sharded class means) and
``test_tta_methods.py::test_ddp_two_processes_adapt_like_one`` (PSMT's Fisher on rank 0).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.methods.statistics import (
    cache_file,
    class_means,
    compute_once,
    endless,
    source_datamodule,
    source_loader,
    table_key,
    training_loader,
    training_view,
)


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def file_of(what: str = "m", seed: int = 0, augment: bool = False, data=None, **options: Any):
    data = data if data is not None else Digits(train_subset=50)
    return cache_file(table_key(what, net(seed), data, augment=augment, **options))


# ---- the cache key -------------------------------------------------------------------------------
def test_each_thing_measured_gives_its_own_cache_entry():
    base = file_of(n=1)
    assert base is not None and base.suffix == ".pt" and base.parent.name == "class_stats"
    others = [
        file_of("other", n=1),  # another statistic
        file_of(seed=1, n=1),  # other weights
        file_of(data=Digits(train_subset=60), n=1),  # other images
        file_of(data=Digits(train_subset=50, split_seed=1), n=1),
        file_of(n=2),  # another option
        file_of(),
        file_of(augment=True, n=1),  # the augmented view
    ]
    assert len({base, *others}) == len(others) + 1


def test_settings_that_do_not_change_the_images_share_the_entry():
    base = file_of(n=1)
    loader_only = Digits(train_subset=50, num_workers=2, batch_size=7, download=True)
    assert file_of(data=loader_only, n=1) == base
    # The datamodule's augment setting only matters for a view with the training augmentation.
    assert file_of(data=Digits(train_subset=50, augment=False), n=1) == base
    plain = Digits(train_subset=50, augment=False)
    assert file_of(data=plain, augment=True, n=1) != file_of(augment=True, n=1)


def test_a_key_extended_by_more_options_and_other_folders():
    key = table_key("m", net(0), Digits(), augment=False)
    first, second = cache_file(key, "tta/x", table="a"), cache_file(key, "tta/x", table="b")
    assert first != second and first.parent == second.parent
    assert first.parent.relative_to(first.parents[2]).as_posix() == "tta/x"
    assert cache_file(None) is None


def test_data_without_recorded_settings_is_not_cached():
    assert table_key("m", net(0), L.LightningDataModule(), augment=True) is None
    assert table_key("m", net(0), None, augment=True) is None


# ---- compute once ------------------------------------------------------------------------------
def table(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=gen), torch.arange(40) % 4
    return class_means(torch.tanh, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)], 4)


def fail() -> Any:
    raise AssertionError("recomputed instead of read from the cache")


def test_a_cached_table_equals_the_fresh_one_bit_for_bit():
    path = file_of(n=3)
    fresh = compute_once(None, path, lambda: table(0))
    assert path.is_file()
    cached = compute_once(None, path, fail)
    assert cached.dtype == fresh.dtype and torch.equal(cached, fresh)
    # Structured values (RMT's warm-up state: state dicts, an optimiser's state) round-trip too.
    model = net(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"student": model.state_dict(), "optimizer": optimizer.state_dict()}
    other = file_of(n=4)
    compute_once(None, other, lambda: state)
    read = compute_once(None, other, fail)
    for name, value in state["student"].items():
        assert torch.equal(read["student"][name], value)
    assert read["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(
        read["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )


def test_without_a_file_every_call_computes():
    calls = []
    for _ in range(2):
        compute_once(None, None, lambda: calls.append(1) or 0)
    assert calls == [1, 1]


class FakeRanks:
    """The parts of a Trainer ``compute_once`` reads, as seen from ``rank`` of two processes;
    the broadcast returns ``from_zero`` on the other rank (what rank 0 sent)."""

    def __init__(self, rank: int, from_zero: Any = None) -> None:
        self.world_size, self.is_global_zero = 2, rank == 0
        self.sent: list[Any] = []
        self.from_zero = from_zero
        self.strategy = self

    def broadcast(self, value: Any, src: int = 0) -> Any:
        assert src == 0
        self.sent.append(value)
        return value if self.is_global_zero else self.from_zero


def test_rank_zero_computes_writes_and_broadcasts():
    path = file_of(n=5)
    zero = FakeRanks(0)
    value = compute_once(zero, path, lambda: table(1))
    assert path.is_file() and len(zero.sent) == 1 and zero.sent[0] is value
    one = FakeRanks(1, from_zero=value)
    assert compute_once(one, file_of(n=6), fail) is value  # never computes nor reads
    assert not file_of(n=6).exists()


def test_sharded_ranks_all_compute_on_a_miss_and_none_on_a_hit():
    path = file_of(n=7)
    calls = []
    one = FakeRanks(1, from_zero=None)  # rank 0 found no file
    compute_once(one, path, lambda: calls.append(1) or table(2), sharded=True)
    assert calls == [1] and not path.exists(), "every rank computes; only rank 0 writes"
    zero = FakeRanks(0)
    written = compute_once(zero, path, lambda: table(2), sharded=True)
    assert path.is_file() and zero.sent == [None]
    hit = FakeRanks(0)
    assert torch.equal(compute_once(hit, path, fail, sharded=True), written)
    assert torch.equal(hit.sent[0], written)  # what it found goes to every rank
    other = FakeRanks(1, from_zero=written)
    assert torch.equal(compute_once(other, path, fail, sharded=True), written)


# ---- the data ------------------------------------------------------------------------------------
def test_in_order_shards_partition_the_data():
    data = TensorDataset(torch.arange(11.0), torch.arange(11))
    shards = [
        torch.cat([b[1] for b in training_loader(data, 3, rank=r, world_size=2)]) for r in (0, 1)
    ]
    assert shards[0].tolist() == list(range(0, 11, 2)) and shards[1].tolist() == [1, 3, 5, 7, 9]
    single = torch.cat([b[1] for b in training_loader(data, 4)])
    assert single.tolist() == list(range(11))


def test_seeded_shuffle_and_sample_choice():
    data = TensorDataset(torch.arange(30.0), torch.arange(30))

    def order(seed: int, n: int | None = None) -> list[int]:
        return torch.cat(
            [b[1] for b in training_loader(data, 7, seed=seed, num_examples=n)]
        ).tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == list(range(30))
    assert len(order(0, 12)) == 12 and order(0, 12) == order(0, 12)
    with pytest.raises(ValueError, match="seed"):
        training_loader(data, 7, num_examples=12)


def test_training_view_reads_the_eval_transform_without_touching_the_split():
    data = Digits(train_subset=20)  # augment=True: the train split is augmented
    data.setup("fit")
    assert training_view(data.train, data, augment=True) is data.train
    view = training_view(data.train, data, augment=False)
    assert view is not data.train and data.train.transform is not view.transform
    assert torch.equal(view[0][0], view[0][0])
    with pytest.raises(ConfigError, match="build_transform"):
        training_view(TensorDataset(torch.zeros(2)), None, augment=False)


def test_endless_restarts_and_copies():
    batches = endless([1, 2])
    assert [next(batches) for _ in range(5)] == [1, 2, 1, 2, 1]
    assert next(copy.deepcopy(batches)) == 1  # a copy starts a new epoch
    with pytest.raises(ConfigError, match="empty"):
        next(endless([]))


# ---- source data ---------------------------------------------------------------------------------
def test_source_data_is_a_datamodule_set_up_and_checked():
    with pytest.raises(ConfigError, match="LightningDataModule"):
        source_datamodule({"class_path": "kdzoo.datamodules.Digits"}, 10, 1, None, None)
    data = source_datamodule(Digits(train_subset=40), 10, 1, None, None)
    assert data.train is not None
    loader = source_loader(data, 16, seed=0)
    assert [len(b[1]) for b in loader] == [16, 16, 8]
    with pytest.raises(ConfigError, match="num_classes=10 but the stream has 12"):
        source_datamodule(data, 12, 1, None, None)
    with pytest.raises(ConfigError, match="in_chans=1 but the stream has 3"):
        source_datamodule(data, 10, 3, None, None)
    with pytest.warns(UserWarning, match="normalised with mean"):
        source_datamodule(data, 10, 1, (0.5,), None)
    with pytest.raises(ConfigError, match="source_batch_size"):
        source_loader(data, 0, seed=0)


def test_the_cli_builds_source_data_with_its_own_settings(monkeypatch):
    """``source_data`` is resolved from ``class_path``/``init_args`` like ``--data``, and the
    nested datamodule records its own arguments, not the top-level data's (which Lightning's
    instantiator for ``data`` would give every datamodule), even for the same class."""
    from kdzoo.lightning_cli import KDCLI

    monkeypatch.setattr("sys.argv", ["kdzoo"])  # LightningCLI warns when given args and argv
    source_data = "--model.source_data={class_path: Digits, init_args: {train_subset: 50}}"
    args = ["--model=PSMT", "--model.source.name=test_resnet", "--model.source.weights=random"]
    cli = KDCLI(args=[*args, source_data, "--data=Digits", "--data.train_subset=30"], run=False)
    source = cli.model.source_data
    assert isinstance(source, Digits) and source is not cli.datamodule
    assert source.hparams.train_subset == 50 and "_instantiator" not in source.hparams
    assert cli.datamodule.hparams.train_subset == 30
    assert cli.datamodule.hparams["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    assert cli.model.hparams.source_data["init_args"]["train_subset"] == 50
