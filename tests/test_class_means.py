"""The one class-means routine (:func:`kdzoo.methods.statistics.class_means`) against a direct
per-class mean, the spec's one-hot oracle, and the sharded (DDP-style) computation equal to the
single-process one; the in-batch stand-in (:meth:`ClassMeans.of_batch`) against the formula the
methods used before it, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.methods.statistics import ClassMeans, class_means, rank_shard


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_one_hot_teacher_gives_unit_vectors():
    # Spec oracle (classification.md 1.8.4): an embedding that is the one-hot label gives c_c = e_c.
    y = torch.tensor([2, 0, 1, 2, 2, 0, 1, 3])
    x = y.clone()
    means = class_means(lambda v: F.one_hot(v, 4).float(), batches_of(x, y, 3), 4)
    torch.testing.assert_close(means, torch.eye(4))


def test_equals_direct_mean_of_each_class():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    y = torch.arange(50) % 5
    means = class_means(lambda v: v * 2.0, batches_of(x, y, 7), 5)
    for c in range(5):
        torch.testing.assert_close(means[c], (x[y == c] * 2.0).mean(0))


def test_sharded_ranks_with_summed_statistics_equal_one_process():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 4, generator=gen), torch.randint(0, 3, (23,), generator=gen)
    y[:3] = torch.tensor([0, 1, 2])
    single = class_means(torch.tanh, batches_of(x, y, 5), 3)
    # Two "ranks": each computes its shard's sums; the all-reduce adds the other rank's part.
    shards = [list(rank_shard(23, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(23))
    partial = []

    def capture(t):
        partial.append(t)
        return t

    for idx in shards:
        class_means(torch.tanh, batches_of(x[idx], y[idx], 4), 3, all_reduce_sum=capture)
    sums = partial[0] + partial[2]
    counts = partial[1] + partial[3]
    torch.testing.assert_close((sums / counts[:, None]).float(), single)


def test_missing_class_is_a_clear_error():
    y = torch.tensor([0, 0, 2])
    with pytest.raises(ConfigError, match=r"classes \[1\] have no samples"):
        class_means(lambda v: v[:, None].float(), batches_of(y, y, 2), 3)


def test_missing_class_allowed_gives_a_zero_row_and_a_warning():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([0, 2])
    with pytest.warns(UserWarning, match=r"classes \[1\] have no samples"):
        means = class_means(lambda t: t, [(x, y)], 3, allow_missing=True)
    torch.testing.assert_close(means, torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]))


def test_stop_after_reads_batches_until_more_than_that_many_samples():
    x, y = torch.arange(10.0)[:, None], torch.arange(10) % 2
    seen = []

    def measure(v):
        seen.append(len(v))
        return v

    means = class_means(measure, batches_of(x, y, 3), 2, stop_after=4)
    assert seen == [3, 3]  # 6 > 4 after the second batch
    torch.testing.assert_close(means, torch.tensor([[2.0], [3.0]]))  # samples 0..5 only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_batch_table_equals_the_methods_former_formula_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(300, 7, generator=gen).to(dtype)
    target = torch.randint(0, 6, (300,), generator=gen)
    target[target == 4] = 5  # class 4 absent: a zero row
    table = ClassMeans.of_batch(values, target, 6)
    # ND's and TGeo-KD's in-batch stand-in as it was written before ClassMeans
    sums = values.new_zeros(6, 7).index_add_(0, target, values)
    counts = torch.bincount(target, minlength=6).clamp(min=1)
    assert torch.equal(table.means(), sums / counts[:, None].to(sums.dtype))
    assert table.means().dtype == dtype
    assert table.missing() == [4]
