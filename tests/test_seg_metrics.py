"""Tests for :class:`kdzoo.metrics.MeanIoU` and :class:`kdzoo.metrics.PixelAccuracy`.

mIoU as mmsegmentation's ``IoUMetric``: IoU_c = TP / (TP + FP + FN) over the whole split, ignore
pixels dropped, mean over classes that occur in the target or the prediction. The hand example
below writes its confusion matrix out; the random checks use a reference that counts
intersections and unions from the masks directly (no confusion matrix).
"""

from __future__ import annotations

import math

import pytest
import torch

from kdzoo.errors import ConfigError, KDZooError
from kdzoo.metrics import MeanIoU, PixelAccuracy

# 3 classes, a 2x3 image:     target      prediction
#                             0 0 1        0 1 1
#                             1 2 2        1 2 2
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
PREDS = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
# Rows: target class, columns: predicted class.
CONFMAT = torch.tensor(
    [
        [1, 1, 0],  # target 0: one predicted 0, one predicted 1
        [0, 2, 0],  # target 1: both predicted 1
        [0, 0, 2],  # target 2: both predicted 2
    ]
)
# IoU_c = TP / (row sum + column sum - TP): 1 / (2 + 1 - 1), 2 / (2 + 3 - 2), 2 / (2 + 2 - 2)
IOU = [1 / 2, 2 / 3, 1.0]
MIOU = (1 / 2 + 2 / 3 + 1) / 3  # = 13/18
PIXEL_ACC = 5 / 6


def iou_ref(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = 255):
    """Per-class IoU from the masks, NaN for classes in neither (no confusion matrix)."""
    valid = target != ignore
    ious = []
    for c in range(num_classes):
        inter = ((preds == c) & (target == c) & valid).sum().item()
        union = (((preds == c) | (target == c)) & valid).sum().item()
        ious.append(inter / union if union else math.nan)
    return torch.tensor(ious, dtype=torch.float64)


def test_hand_computed_example() -> None:
    metric = MeanIoU(num_classes=3)
    metric.update(PREDS, TARGET)
    assert torch.equal(metric.confmat, CONFMAT)
    assert metric.confmat.dtype == torch.int64
    torch.testing.assert_close(metric.per_class(), torch.tensor(IOU))
    torch.testing.assert_close(metric.compute(), torch.tensor(MIOU))
    accuracy = PixelAccuracy(num_classes=3)
    accuracy.update(PREDS, TARGET)
    torch.testing.assert_close(accuracy.compute(), torch.tensor(PIXEL_ACC))


def test_absent_class_is_left_out_of_the_mean() -> None:
    """Class 3 is in neither target nor prediction: NaN IoU, not a 0 (or 1) in the mean."""
    metric = MeanIoU(num_classes=4)
    metric.update(PREDS, TARGET)
    per_class = metric.per_class()
    assert math.isnan(per_class[3].item())
    torch.testing.assert_close(per_class[:3], torch.tensor(IOU))
    torch.testing.assert_close(metric.compute(), torch.tensor(MIOU))
    # A class that is only predicted (a false positive) does count, with IoU 0.
    preds = PREDS.clone()
    preds[0, 1, 2] = 3  # a target-2 pixel predicted as 3: IoU_2 = 1 / (2 + 1 - 1) = 1/2
    metric = MeanIoU(num_classes=4)
    metric.update(preds, TARGET)
    torch.testing.assert_close(metric.per_class(), torch.tensor([1 / 2, 2 / 3, 1 / 2, 0.0]))
    torch.testing.assert_close(metric.compute(), torch.tensor((1 / 2 + 2 / 3 + 1 / 2) / 4))


def test_ignored_pixels_are_not_counted() -> None:
    # Append a column of ignored pixels with wrong (even out-of-range) predictions.
    target = torch.cat([TARGET, torch.full((1, 2, 1), 255)], dim=2)
    preds = torch.cat([PREDS, torch.tensor([[[0], [255]]])], dim=2)
    metric, accuracy = MeanIoU(num_classes=3), PixelAccuracy(num_classes=3)
    metric.update(preds, target)
    accuracy.update(preds, target)
    assert torch.equal(metric.confmat, CONFMAT)
    torch.testing.assert_close(metric.compute(), torch.tensor(MIOU))
    torch.testing.assert_close(accuracy.compute(), torch.tensor(PIXEL_ACC))
    # Another ignore value works the same way.
    metric = MeanIoU(num_classes=3, ignore_index=-1)
    metric.update(preds, torch.where(target == 255, -1, target))
    assert torch.equal(metric.confmat, CONFMAT)


def random_batch(seed: int, n: int = 2, c: int = 5, h: int = 7, w: int = 9):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < 0.2] = 255
    logits = torch.randn(n, c, h, w, generator=gen)
    return logits, target


def test_matches_mask_reference_on_random_data() -> None:
    logits, target = random_batch(0, c=6)
    target[target == 4] = 255  # class 4 never in the target; it may still be predicted
    preds = logits.argmax(1)
    metric = MeanIoU(num_classes=6)
    metric.update(preds, target)
    want = iou_ref(preds, target, 6)
    torch.testing.assert_close(metric.per_class().double(), want, equal_nan=True)
    torch.testing.assert_close(metric.compute().double(), torch.nanmean(want))
    valid = target != 255
    accuracy = PixelAccuracy(num_classes=6)
    accuracy.update(preds, target)
    want_acc = ((preds == target) & valid).sum() / valid.sum()
    torch.testing.assert_close(accuracy.compute().double(), want_acc.double())


def test_logits_equal_argmax() -> None:
    logits, target = random_batch(1)
    from_logits, from_ids = MeanIoU(num_classes=5), MeanIoU(num_classes=5)
    from_logits.update(logits, target)
    from_ids.update(logits.argmax(1), target)
    assert torch.equal(from_logits.confmat, from_ids.confmat)
    assert from_logits.confmat.sum() == (target != 255).sum()


def test_two_updates_equal_one_on_the_concatenation() -> None:
    (l1, t1), (l2, t2) = random_batch(2), random_batch(3, n=3)
    twice, once = MeanIoU(num_classes=5), MeanIoU(num_classes=5)
    twice.update(l1, t1)
    twice.update(l2.argmax(1), t2)
    once.update(torch.cat([l1, l2]), torch.cat([t1, t2]))
    assert torch.equal(twice.confmat, once.confmat)
    assert torch.equal(twice.compute(), once.compute())
    # Not the mean of the per-batch mIoUs (the check above can fail).
    first, second = MeanIoU(num_classes=5), MeanIoU(num_classes=5)
    first.update(l1, t1)
    second.update(l2, t2)
    assert not torch.allclose((first.compute() + second.compute()) / 2, once.compute())
    # States merge by summation (dist_reduce_fx="sum", what DDP does across processes).
    first.merge_state(second)
    assert torch.equal(first.confmat, once.confmat)
    once.reset()
    assert once.confmat.sum() == 0


def test_forward_returns_batch_value_and_accumulates() -> None:
    (l1, t1), (l2, t2) = random_batch(4), random_batch(5)
    metric = MeanIoU(num_classes=5)
    assert metric.full_state_update is False
    batch_value = metric(l1, t1)
    alone = MeanIoU(num_classes=5)
    alone.update(l1, t1)
    torch.testing.assert_close(batch_value, alone.compute())
    metric(l2, t2)
    both = MeanIoU(num_classes=5)
    both.update(torch.cat([l1, l2]), torch.cat([t1, t2]))
    assert torch.equal(metric.confmat, both.confmat)


def test_bad_target_ids_raise() -> None:
    metric = MeanIoU(num_classes=3)
    target = TARGET.clone()
    target[0, 0, 0] = 7
    target[0, 1, 0] = -1
    with pytest.raises(ValueError, match=r"\[-1, 7\].*0\.\.2.*trainIds.*reduce_zero_label") as e:
        metric.update(PREDS, target)
    assert isinstance(e.value, KDZooError)  # printed as one line by the kdzoo command
    assert metric.confmat.sum() == 0  # nothing was counted


def test_bad_preds_raise() -> None:
    metric = MeanIoU(num_classes=3)
    preds = PREDS.clone()
    preds[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"preds hold class ids \[3\] outside 0\.\.2"):
        metric.update(preds, TARGET)
    with pytest.raises(ValueError, match=r"logits .* have 4 channels, expected num_classes = 3"):
        metric.update(torch.randn(1, 4, 2, 3), TARGET)
    with pytest.raises(ValueError, match="upsample the logits to the label size"):
        metric.update(torch.randn(1, 3, 4, 6), TARGET)
    with pytest.raises(ValueError, match=r"\(N, H, W\) integer class ids"):
        metric.update(PREDS.float(), TARGET)


def test_constructor_errors() -> None:
    with pytest.raises(ConfigError, match="ignore_index 0 is a class id"):
        MeanIoU(num_classes=3, ignore_index=0)
    with pytest.raises(ConfigError, match="num_classes must be >= 1"):
        PixelAccuracy(num_classes=0)
