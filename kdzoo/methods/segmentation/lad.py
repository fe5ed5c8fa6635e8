"""Label-assisted distillation (LAD): the label-assisted teacher and its label encoding.

Qiu et al. "Make a Strong Teacher with Label Assistance: A Novel Knowledge Distillation Approach
for Semantic Segmentation". ECCV 2024, arXiv:2407.13254. Official code:
github.com/skyshoumeng/Label_Assisted_Distillation (built on CIRKD, not mmsegmentation).

Only the paper's abstract could be read; everything below follows the released code (spec
``segmentation.md`` section 1):

- **Label encoding** ("label noising module"): one extra input channel
  ``L = s * (v[slot] + sigma * eps)``, ``slot`` the pixel's class id with the ignore label
  remapped to its own slot ``C``. Teacher training draws the slot values ``v ~ N(0, 1)`` anew per
  image and slot (``sigma = 0.03``), so the channel tells the teacher the *partition* of the image
  (region shapes and boundaries), not the classes. Distillation feeds the teacher the fixed values
  ``v_k = (k - c0) / 10`` with ``c0 = (C + 1) // 2`` (the code's VOC constant 11, generalised) and
  ``sigma = 0.02``.
- **Scale** ``s``: the code uses 100 on BGR mean-subtracted inputs of about +-130 (std about 60), a
  label-to-image std ratio of about 1.7; kdzoo's inputs are mean/std normalised (std about 1), so
  the default ``label_scale`` is 1.7 (the spec's suggestion), a config value.
- **The label enters only as the 4th input channel** of the first convolution, widened with the
  RGB filters kept and only the new slice drawn from N(0, 0.1^2), as the code does (timm's own
  ``in_chans=4`` would repeat and rescale the RGB filters).
- **Dual-path consistency**: two independent encodings, one network, two passes; loss
  ``sum_i [CE(o_i) + 0.4 CE(a_i)] + 5 [CWD(o_1 <- o_2) + CWD(o_2 <- o_1)]`` with stop-gradient on
  each target, CWD at ``T = 4`` on the head logits at feature resolution.

The teacher cannot be used without labels. Its validation mIoU is measured with the encoded
ground truth as input (privileged, oracle-like: ``val/miou``) and with a zero label channel
(``val/miou_no_label``), so both are logged; checkpoints are chosen on the first.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import channel_wise_distillation_loss
from kdzoo.methods.segmentation.base import (
    IGNORE_INDEX,
    SegmentationModule,
    segmentation_loss,
    upsample,
)
from kdzoo.methods.segmentation.supervised import labelled_batch
from kdzoo.metrics import MeanIoU
from kdzoo.validation import check_non_negative, check_positive

__all__ = ["LADTeacher", "encode_labels", "label_input"]

ValueMode = Literal["random", "fixed"]


def encode_labels(
    masks: torch.Tensor,
    num_classes: int,
    *,
    mode: ValueMode,
    sigma: float,
    scale: float,
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LAD's noised label channel ``(N, 1, H, W)`` for ``(N, H, W)`` masks (vectorised: one
    ``(N, C + 1)`` table of slot values gathered with the masks, instead of the code's loops).

    Args:
        masks: class ids ``0..C-1`` and ``ignore_index``.
        num_classes: ``C``; the ignore label is slot ``C``.
        mode: ``"random"`` (per image and slot ``v ~ N(0, 1)``) or ``"fixed"``
            (``v_k = (k - (C + 1) // 2) / 10``).
        sigma: std of the i.i.d. pixel noise added to the slot values.
        scale: factor ``s`` applied last.
        ignore_index: mask value of unlabelled pixels.
        generator: RNG of the value draws and the noise.
    """
    slots = masks.long().clone()
    slots[masks == ignore_index] = num_classes
    if int(slots.min()) < 0 or int(slots.max()) > num_classes:
        bad = torch.unique(masks[(slots < 0) | (slots > num_classes)]).tolist()
        raise ValueError(
            f"masks hold ids {bad} outside 0..{num_classes - 1} and the ignore index "
            f"{ignore_index}: the masks do not match the configured {num_classes} classes"
        )
    n, device = masks.shape[0], masks.device
    if mode == "random":
        values = torch.randn(n, num_classes + 1, generator=generator, device=device)
    elif mode == "fixed":
        offset = (num_classes + 1) // 2
        values = (torch.arange(num_classes + 1, device=device) - offset).float() / 10.0
        values = values.expand(n, -1)
    else:
        raise ValueError(f"mode must be 'random' or 'fixed', got {mode!r}")
    channel = torch.gather(values, 1, slots.flatten(1)).view_as(slots).float()
    if sigma > 0:
        noise = torch.randn(channel.shape, generator=generator, device=device)
        channel = channel + sigma * noise
    return (scale * channel).unsqueeze(1)


def label_input(
    images: torch.Tensor, masks: torch.Tensor | None, num_classes: int, **encoding: Any
) -> torch.Tensor:
    """``[images; L]``: the teacher's input; ``masks=None`` gives a zero label channel."""
    if masks is None:
        channel = images.new_zeros(images.shape[0], 1, *images.shape[-2:])
    else:
        channel = encode_labels(masks, num_classes, **encoding).to(images.dtype)
    return torch.cat([images, channel], dim=1)


class LADTeacher(SegmentationModule):
    """A segmentation network trained with a noised label channel as extra input.

    Args:
        label_scale: factor ``s`` of the label channel (code: 100 for unnormalised inputs; 1.7 for
            kdzoo's normalised inputs keeps the code's label-to-image std ratio).
        train_sigma: pixel noise of the two random encodings in training (code: 0.03).
        consistency_weight: weight of the symmetric CWD between the two paths (code: 5).
        temperature: CWD temperature (code: 4).
        eval_label: label input of validation and test: ``"fixed"`` (the encoding distillation
            feeds, ``eval_sigma`` noise), ``"random"`` (a seeded draw per batch) or ``"none"``
            (zero channel). ``val/miou_no_label`` is logged in every case.
        eval_sigma: pixel noise of the evaluation encoding (code, distillation: 0.02).
        extra_in_chans: label channels (1, as in LAD).
        **kwargs: see :class:`~kdzoo.methods.segmentation.base.SegmentationModule`
            (``aux_weight`` 0.4 as the code's teacher branch).
    """

    citation = (
        'Qiu et al. "Make a Strong Teacher with Label Assistance: A Novel Knowledge Distillation '
        'Approach for Semantic Segmentation". ECCV 2024, arXiv:2407.13254'
    )
    description = "label-assisted segmentation teacher"

    def __init__(
        self,
        label_scale: float = 1.7,
        train_sigma: float = 0.03,
        consistency_weight: float = 5.0,
        temperature: float = 4.0,
        eval_label: Literal["fixed", "random", "none"] = "fixed",
        eval_sigma: float = 0.02,
        extra_in_chans: int = 1,
        **kwargs: Any,
    ) -> None:
        if extra_in_chans != 1:
            raise ConfigError(
                f"LADTeacher takes one label channel, got extra_in_chans={extra_in_chans}"
            )
        check_non_negative(train_sigma=train_sigma, eval_sigma=eval_sigma)
        check_positive(temperature=temperature)
        super().__init__(extra_in_chans=extra_in_chans, **kwargs)
        self.loss_weights = {
            "ce": 1.0,
            "aux": self.hparams.aux_weight,
            "consistency": consistency_weight,
        }
        self._eval_calls = 0
        # The teacher's mIoU without its privileged input, next to ``{stage}/miou``.
        self.val_miou_no_label = MeanIoU(self.hparams.num_classes, ignore_index=self.ignore_index)
        self.test_miou_no_label = self.val_miou_no_label.clone()

    def encoding(self, mode: ValueMode, sigma: float) -> dict[str, Any]:
        return {
            "mode": mode,
            "sigma": sigma,
            "scale": self.hparams.label_scale,
            "ignore_index": self.ignore_index,
        }

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, masks = labelled_batch(batch, type(self).__name__)
        num_classes, sigma = self.hparams.num_classes, self.hparams.train_sigma
        outputs = [
            self.student(label_input(images, masks, num_classes, **self.encoding("random", sigma)))
            for _ in range(2)
        ]
        losses = [segmentation_loss(o, masks, self.ignore_index) for o in outputs]
        ce, aux = zip(*losses, strict=True)
        first, second = outputs[0].logits, outputs[1].logits
        temperature = self.hparams.temperature
        consistency = channel_wise_distillation_loss(
            first, second.detach(), temperature=temperature
        ) + channel_wise_distillation_loss(second, first.detach(), temperature=temperature)
        terms = {"ce": ce[0] + ce[1], "consistency": consistency}
        if aux[0] is not None:
            terms["aux"] = aux[0] + aux[1]
        return terms

    def eval_logits(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        mode = self.hparams.eval_label
        if mode == "none":
            return self.student(label_input(images, None, self.hparams.num_classes)).logits
        # A seeded generator per evaluation call: the "random" encoding is reproducible.
        generator = torch.Generator(device=images.device).manual_seed(self._eval_calls)
        self._eval_calls += 1
        encoding = self.encoding(mode, self.hparams.eval_sigma)
        x = label_input(images, masks, self.hparams.num_classes, generator=generator, **encoding)
        return self.student(x).logits

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._eval_calls = 0  # the same encodings at every evaluation

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._eval_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size; a 3-channel input gets a zero label channel."""
        if x.shape[1] == self.hparams.in_chans:
            x = label_input(x, None, self.hparams.num_classes)
        return super().forward(x)

    def _evaluate(self, batch: Any, metrics: Any, stage: str) -> None:
        super()._evaluate(batch, metrics, stage)
        images, masks = batch[0], batch[1]
        logits = self.student(label_input(images, None, self.hparams.num_classes)).logits
        no_label = self.val_miou_no_label if stage == "val" else self.test_miou_no_label
        no_label.update(upsample(logits, masks.shape[-2:]), masks)
        self.log(f"{stage}/miou_no_label", no_label)
