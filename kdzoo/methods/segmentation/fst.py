"""Learning-from-future self-training (FST) for semi-supervised and domain-adaptive segmentation.

Du et al. "Learning from Future: A Novel Self-Training Framework for Semantic Segmentation".
NeurIPS 2022, arXiv:2209.06993. Official code: github.com/usr922/FST (DAFormer-based UDA part,
U2PL-based semi-supervised part). Only the abstract could be read; the algorithm follows the code
(spec ``segmentation.md`` section 2):

- **Mean teacher** (``k_steps: 0``): an EMA teacher ``phi <- a phi + (1 - a) theta`` over the
  parameters (buffers are not averaged), momentum ``a_i = min(1 - 1/(i+1), alpha)`` with ``i``
  counting EMA updates (the code's counter, which also advances within a step); it pseudo-labels
  the unlabelled batch and the student trains on ``CE(labelled) + weight * CE(pseudo-labels)``.
  Update order of DACS/DAFormer: EMA with ``theta_t``, then the student step.
- **FST-D** (``mode: deep``, K = ``k_steps``): snapshot ``theta_t``; K times { EMA with the
  current virtual student; a real optimiser step on the same batch with pseudo-labels of the
  current teacher }; EMA with ``theta^K``; restore ``theta_t``; the real step with pseudo-labels of
  the teacher that has absorbed the future students. ``K = 0`` is exactly the mean teacher (same
  code path).
- **FST-W** (``mode: wide``): the K virtual students start from ``theta_t`` and each takes one step
  on a *different* batch (the datamodule's ``future_batches``); the teacher is not updated between
  them; EMA with their average ("soup"); restore; real step; a second EMA with ``theta_{t+1}``.
- **Official-code state behaviour (default)**: virtual steps are steps of the live optimiser, so
  its state (momentum buffers, Adam moments and step count) advances K + 1 times per real
  iteration and is *not* restored; BN running statistics of the student are not restored either;
  the teacher keeps its virtual updates. ``restore_optimizer_state`` / ``restore_bn_buffers``
  give the cleaner variant (exact restore). The learning-rate schedule advances once per real
  iteration (the code's scheduler hook) and ``trainer.global_step`` counts real iterations.
- **Pseudo-labels**: the teacher runs on the unlabelled images with BN on batch statistics and
  dropout off (DAFormer; this also keeps its running statistics current for evaluation); arg-max
  labels; ``pseudo_label: quality`` weights every pixel by the share of pixels whose confidence
  reaches ``threshold`` (DACS/DAFormer, tau = 0.968), ``threshold`` keeps only those pixels
  (averaged over all pixels). ``pseudo_ignore_top`` / ``pseudo_ignore_bottom`` give zero
  pseudo-label weight to the first / last rows of each unlabelled crop (DAFormer's
  ``psweight_ignore_top`` / ``psweight_ignore_bottom``, 15 / 120 in the code's GTA5 -> Cityscapes
  configs: the ego-vehicle bonnet and the rectification border), after the quality weight was
  measured over the whole crop; the loss is still the mean over all pixels. No ClassMix, colour
  jitter or rare-class sampling (the UDA code's DAFormer pipeline) and no entropy-percentile
  filtering (the SSL code): kdzoo's FST is the self-training core, the same for every setting.
- **First iteration**: the teacher starts as a copy of the student at construction; the code's
  extra first-iteration EMA update is not reproduced (with warm-up, ``a_0 = 0`` copies the student
  at the first update anyway).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.methods.module import Deployable
from kdzoo.methods.segmentation.base import SegmentationModule, upsample
from kdzoo.models.segmentation import SegmentationModel
from kdzoo.validation import check_fraction, check_non_negative

__all__ = ["FST"]


class FST(SegmentationModule):
    """Mean-teacher self-training with virtual future students (FST-D / FST-W).

    Args:
        mode: ``"deep"`` (FST-D: K steps ahead on the same batch) or ``"wide"`` (FST-W: K
            students one step ahead on K different batches; needs ``future_batches: K`` in the
            datamodule).
        k_steps: K, the number of virtual steps (code: 3); 0 is the plain mean teacher (deep).
        ema_momentum: alpha, the teacher's EMA momentum (UDA code 0.999, SSL code 0.99).
        ema_warmup: use ``min(1 - 1/(i+1), alpha)``; ``False`` keeps ``alpha`` from the start.
        threshold: confidence tau of the pseudo-labels (DACS/DAFormer: 0.968).
        pseudo_label: ``"quality"`` (one weight per batch, the share of confident pixels) or
            ``"threshold"`` (per-pixel mask).
        pseudo_weight: weight of the pseudo-label loss.
        pseudo_ignore_top: rows at the top of each unlabelled crop whose pseudo-label weight is 0
            (DAFormer's ``psweight_ignore_top``; the UDA code's GTA5 -> Cityscapes configs: 15).
        pseudo_ignore_bottom: rows at the bottom likewise (``psweight_ignore_bottom``; 120).
        restore_optimizer_state: restore the optimiser state after the virtual steps (default
            ``False``, the official code's behaviour).
        restore_bn_buffers: restore the student's BN running statistics too (default ``False``).
        evaluate: the network validated, tested and deployed: ``"student"`` (UDA code) or
            ``"teacher"`` (SSL code).
        **kwargs: see :class:`~kdzoo.methods.segmentation.base.SegmentationModule`.
    """

    citation = (
        'Du et al. "Learning from Future: A Novel Self-Training Framework for Semantic '
        'Segmentation". NeurIPS 2022, arXiv:2209.06993'
    )
    description = "learning-from-future self-training"

    def __init__(
        self,
        mode: Literal["deep", "wide"] = "deep",
        k_steps: int = 3,
        ema_momentum: float = 0.999,
        ema_warmup: bool = True,
        threshold: float = 0.968,
        pseudo_label: Literal["quality", "threshold"] = "quality",
        pseudo_weight: float = 1.0,
        pseudo_ignore_top: int = 0,
        pseudo_ignore_bottom: int = 0,
        restore_optimizer_state: bool = False,
        restore_bn_buffers: bool = False,
        evaluate: Literal["student", "teacher"] = "student",
        **kwargs: Any,
    ) -> None:
        _check_arguments(mode, k_steps, ema_momentum, threshold)
        check_non_negative(
            pseudo_ignore_top=pseudo_ignore_top, pseudo_ignore_bottom=pseudo_ignore_bottom
        )
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        # Checkpointed, so a resumed run continues the momentum warm-up where it stopped.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.loss_weights = {"ce": 1.0, "aux": self.hparams.aux_weight, "pseudo": pseudo_weight}

    # ---- the teacher ------------------------------------------------------------------------
    def eval_model(self) -> SegmentationModel:
        return self.teacher if self.hparams.evaluate == "teacher" else self.student

    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        """The evaluated network: the student, or with ``evaluate="teacher"`` the EMA teacher
        (checkpointed under ``teacher.``, same architecture)."""
        deployable = super().deployable(hparams)
        if hparams.get("evaluate", "student") != "teacher":
            return deployable
        return dataclasses.replace(deployable, prefix="teacher.")

    def momentum(self) -> float:
        alpha = self.hparams.ema_momentum
        if not self.hparams.ema_warmup:
            return alpha
        i = int(self.ema_updates)
        return min(1.0 - 1.0 / (i + 1), alpha)

    @torch.no_grad()
    def ema_update(self, targets: list[torch.Tensor]) -> None:
        """``phi <- a phi + (1 - a) target`` over the parameters (in the student's order)."""
        a = self.momentum()
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, a)
        torch._foreach_add_(teacher, [t.detach() for t in targets], alpha=1.0 - a)
        self.ema_updates += 1

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arg-max labels and confidences of the teacher at the images' size (BN on batch
        statistics, dropout off)."""
        self.teacher.train()
        for module in self.teacher.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        logits = upsample(self.teacher(images).logits, images.shape[-2:])
        confidence, labels = logits.float().softmax(dim=1).max(dim=1)
        return labels, confidence

    # ---- one loss evaluation ----------------------------------------------------------------
    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, masks = batch["labelled"][0], batch["labelled"][1]
        unlabelled = batch["unlabelled"]
        unlabelled = unlabelled[0] if isinstance(unlabelled, (list, tuple)) else unlabelled
        terms = self.supervised_terms(images, masks)["terms"]
        labels, confidence = self.pseudo_labels(unlabelled)
        logits = upsample(self.student(unlabelled).logits, unlabelled.shape[-2:])
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        confident = (confidence >= self.hparams.threshold).float()
        ce = self.ignore_border_rows(ce)
        if self.hparams.pseudo_label == "quality":
            terms["pseudo"] = confident.mean() * ce.mean()
        else:
            terms["pseudo"] = (confident * ce).mean()
        self.log("train/pseudo_confident", confident.mean(), batch_size=len(unlabelled))
        return terms

    def ignore_border_rows(self, pixel_loss: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` per-pixel pseudo-label loss with the ``pseudo_ignore_top`` first and
        ``pseudo_ignore_bottom`` last rows zeroed (DAFormer's ``psweight_ignore_*``); returned
        unchanged (the same tensor) when both are 0."""
        top, bottom = self.hparams.pseudo_ignore_top, self.hparams.pseudo_ignore_bottom
        if not top and not bottom:
            return pixel_loss
        rows = torch.arange(pixel_loss.shape[-2], device=pixel_loss.device)
        keep = (rows >= top) & (rows < pixel_loss.shape[-2] - bottom)
        # A multiplication by the 0/1 row weight, as the code's weight map, not a selection:
        # the loss stays the mean over every pixel of the crop.
        return pixel_loss * keep.to(pixel_loss.dtype)[:, None]

    def _loss(self, batch: Any) -> torch.Tensor:
        terms = self.loss_terms(batch)
        return sum(self.loss_weights[name] * value for name, value in terms.items())

    def _virtual_step(self, batch: Any) -> None:
        """A real step of the live optimiser that Lightning does not count as an iteration."""
        optimizer = self.optimizers().optimizer
        optimizer.zero_grad()
        self.manual_backward(self._loss(batch))
        # Through the strategy, so precision plugins (gradient scaling) still apply.
        self.trainer.strategy.optimizer_step(optimizer, closure=lambda: None)

    # ---- one real iteration -----------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = _semi_supervised_batch(batch, self.hparams.mode, self.hparams.k_steps)
        params = list(self.student.parameters())
        k = self.hparams.k_steps
        if k:
            snapshot = self._snapshot()
            if self.hparams.mode == "deep":
                for _ in range(k):
                    self.ema_update(params)
                    self._virtual_step(batch)
                self.ema_update(params)
            else:
                soup = [torch.zeros_like(p) for p in params]
                for i, future in enumerate(batch["future"][:k]):
                    if i:
                        self._restore(snapshot)
                    self._virtual_step(future)
                    torch._foreach_add_(soup, [p.detach() for p in params])
                torch._foreach_div_(soup, float(k))
                self.ema_update(soup)
            self._restore(snapshot)
        else:
            self.ema_update(params)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.weighted_loss(self.loss_terms(batch), batch_size=len(batch["labelled"][0]))
        self.manual_backward(loss)
        optimizer.step()
        if self.hparams.mode == "wide":
            self.ema_update(params)
        self._step_scheduler("step")
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        self._step_scheduler("epoch")

    def _step_scheduler(self, interval: str) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.scheduler_interval == interval:
            scheduler.step()

    # ---- snapshot and restore ---------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {
            "params": [p.detach().clone() for p in self.student.parameters()]
        }
        if self.hparams.restore_bn_buffers:
            snapshot["buffers"] = [b.clone() for b in self.student.buffers()]
        if self.hparams.restore_optimizer_state:
            snapshot["optimizer"] = copy.deepcopy(self.optimizers().optimizer.state_dict())
        return snapshot

    @torch.no_grad()
    def _restore(self, snapshot: dict[str, Any]) -> None:
        torch._foreach_copy_(list(self.student.parameters()), snapshot["params"])
        if "buffers" in snapshot:
            torch._foreach_copy_(list(self.student.buffers()), snapshot["buffers"])
        if "optimizer" in snapshot:
            # load_state_dict copies, so the snapshot stays valid for FST-W's next restore.
            self.optimizers().optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))


def _check_arguments(mode: str, k_steps: int, momentum: float, threshold: float) -> None:
    if k_steps < 0 or (mode == "wide" and k_steps < 1):
        raise ConfigError(
            f"k_steps must be >= 0 (>= 1 for mode 'wide'), got {k_steps}; "
            "k_steps: 0 with mode 'deep' is the plain mean teacher"
        )
    check_fraction(ema_momentum=momentum, threshold=threshold)


def _semi_supervised_batch(batch: Any, mode: str, k_steps: int) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or "unlabelled" not in batch:
        raise ConfigError(
            "FST needs labelled and unlabelled data: configure the datamodule's unlabelled data "
            "(e.g. --data.init_args.unlabelled rest for semi-supervised, target for domain "
            "adaptation, or a labelled_list split)"
        )
    if mode == "wide" and len(batch.get("future", [])) < k_steps:
        raise ConfigError(
            f"FST-W with k_steps={k_steps} needs {k_steps} future batches per step: set "
            f"--data.init_args.future_batches={k_steps}"
        )
    return batch
