"""``RMT``: the robust mean teacher for continual and gradual test-time adaptation.

Döbler, Marsden, Yang. "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation".
CVPR 2023, arXiv:2211.13081; code: github.com/mariodoebler/test-time-adaptation
(``classification/methods/rmt.py``), read through kdzoo's spec ``tta.md`` section 4. Everything
here follows the code (only the paper's abstract was available):

* one-time set-up (:meth:`RMT.prepare`): class prototypes = class means of the **source**
  encoder's raw pooled embeddings over the source training data (BatchNorm with batch statistics,
  no augmentation, shuffled, until more than 100,000 features or the end of one epoch); a
  projector Linear(D, 128)-ReLU-Linear(128, 128) as a second optimiser parameter group with the
  same learning rate; the warm-up: ``warmup_samples // source_batch_size`` steps of
  ``SCE(student, teacher)`` on unlabelled source batches with a linear learning-rate ramp over
  every group, a teacher EMA after each step, the learning rate restored at the end. The
  post-warm-up student, teacher and optimiser state is the initial state ``reset`` returns to.
* per test batch (:meth:`RMT.adapt`): student on the clean and on the CoTTA-augmented batch
  (one augmentation draw per batch), teacher on the clean batch; loss
  ``lambda_st * (SCE(z_s, z_t) + SCE(z~_s, z_t)) / 2 + lambda_cont * L_cont + lambda_src * CE``
  on a labelled source batch; one step; teacher EMA (0.999); the prediction is the logit sum of
  student and teacher, both computed before the step.

Source-free variant (spec 4.4, the code's ``RMT.LAMBDA_CE_SRC 0.0 RMT.NUM_SAMPLES_WARM_UP 0``):
``lambda_src=0, warmup_samples=0``. As in the code it still computes the prototypes from the
source data, so ``source_data`` is still needed unless ``lambda_cont=0`` as well.

kdzoo specifics: prototypes and the warm-up state are cached on disk (``$KDZOO_HOME/tta/rmt``)
keyed by the source weights' hash, the source data and the settings, and cached and fresh runs
are identical because prototypes, warm-up and replay each read their own seeded source loader
(the code shares one iterator between warm-up and replay); the augmentation draws from a seeded
generator; the projector's initialisation is seeded by ``seed`` (PyTorch's default init).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.contrastive import rmt_contrastive_loss
from kdzoo.losses.functional.sce import symmetric_cross_entropy
from kdzoo.methods.training_pass import weights_hash
from kdzoo.methods.tta.augment import cotta_augment, from_unit, to_unit
from kdzoo.methods.tta.base import TTAModule, ema_update
from kdzoo.methods.tta.source_data import (
    build_source_datamodule,
    build_source_loader,
    cached,
    check_source_data,
    default_source_batch_size,
    endless,
    source_data_key,
)

__all__ = ["RMT"]

#: The code stops collecting source features for the prototypes once it holds more than this.
PROTOTYPE_FEATURES = 100_000


class RMT(TTAModule):
    """Robust mean teacher: SCE self-training, prototype contrastive loss, source replay and
    warm-up; see the module docstring.

    Args:
        lambda_st: weight of the symmetric cross-entropy self-training term.
        lambda_cont: weight of the three-view contrastive term (0 skips prototypes and projector).
        lambda_src: weight of the source replay cross-entropy (0: source-free at test time).
        temperature: contrastive temperature.
        projection_dim: projector width.
        momentum: teacher EMA momentum (>= 1 freezes the teacher, as the code).
        warmup_samples: source images of the warm-up (0: none); steps =
            ``warmup_samples // source_batch_size``.
        source_data: the source training data as a datamodule spec (see
            :mod:`kdzoo.methods.tta.source_data`); needed when ``lambda_cont``, ``lambda_src`` or
            ``warmup_samples`` is non-zero.
        source_batch_size: source batch size; ``None``: the stream's batch size, else 200.
        seed: seeds the source loaders, the augmentation and the projector's initialisation.
        cache: read/write the prototype and warm-up caches.
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    def __init__(
        self,
        lambda_st: float = 1.0,
        lambda_cont: float = 1.0,
        lambda_src: float = 1.0,
        temperature: float = 0.1,
        projection_dim: int = 128,
        momentum: float = 0.999,
        warmup_samples: int = 50000,
        source_data: dict[str, Any] | None = None,
        source_batch_size: int | None = None,
        seed: int = 0,
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if min(lambda_st, lambda_cont, lambda_src) < 0:
            raise ConfigError("RMT's loss weights lambda_st, lambda_cont, lambda_src must be >= 0")
        if temperature <= 0 or projection_dim < 1 or warmup_samples < 0 or momentum < 0:
            raise ConfigError(
                "RMT needs temperature > 0, projection_dim >= 1, warmup_samples >= 0 and "
                f"momentum >= 0, got {temperature}, {projection_dim}, {warmup_samples}, {momentum}"
            )
        if source_data is None and (lambda_cont > 0 or lambda_src > 0 or warmup_samples > 0):
            raise ConfigError(
                "RMT needs the source training data (source_data: a datamodule spec such as "
                "{class_path: kdzoo.datamodules.FashionMNIST, init_args: {...}}) for its class "
                "prototypes (lambda_cont > 0), the warm-up (warmup_samples > 0) and source replay "
                "(lambda_src > 0). The source-free variant (lambda_src=0, warmup_samples=0) still "
                "uses source prototypes, as the official code; set lambda_cont=0 as well to run "
                "without any source data"
            )
        self.lambda_st, self.lambda_cont, self.lambda_src = lambda_st, lambda_cont, lambda_src
        self.temperature = temperature
        self.momentum = momentum
        self.warmup_samples = warmup_samples
        self.source_data = dict(source_data) if source_data is not None else None
        self.source_batch_size = source_batch_size
        self.seed = seed
        self.cache = cache

        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        dim = self.model.embedding_dim
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            self.projector = nn.Sequential(
                nn.Linear(dim, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim)
            )
        self.register_buffer("prototypes", torch.zeros(self.model.num_classes, dim))
        self._generator = torch.Generator().manual_seed(seed)
        self._replay: Iterator[Any] | None = None
        self._prepared_optimizer: torch.optim.Optimizer | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.projector.parameters()]

    # ---- one-time set-up ---------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser factory on the model's parameters, plus the projector as a second
        parameter group with the first group's learning rate (the code's ``add_param_group``)."""
        optimizer = self.optimizer_factory(list(self.model.parameters()))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.add_param_group({"params": list(self.projector.parameters()), "lr": lr})
        return optimizer

    def prepare(self) -> None:
        """Prototypes, projector group and warm-up (spec 4.2), in the code's order."""
        optimizer = self.build_optimizer()
        batch_size = default_source_batch_size(self, self.source_batch_size)
        datamodule = None
        if self.source_data is not None:
            datamodule = build_source_datamodule(self.source_data)
            check_source_data(
                datamodule,
                self.model.num_classes,
                self.hparams.get("in_chans"),
                self.mean,
                self.std,
            )
        key = None
        if self.cache and self.source_data is not None:
            key = {
                "weights": weights_hash(self.model),
                "data": source_data_key(self.source_data),
                "batch_size": batch_size,
                "seed": self.seed,
            }
        if self.lambda_cont > 0:
            loader = build_source_loader(datamodule, batch_size, self.seed)
            compute = lambda: {"prototypes": self.compute_prototypes(loader)}  # noqa: E731
            found = cached(self, "rmt", "prototypes", _extend(key, n=PROTOTYPE_FEATURES), compute)
            self.prototypes.copy_(found["prototypes"])
        steps = self.warmup_samples // batch_size
        if steps > 0:
            loader = build_source_loader(datamodule, batch_size, self.seed + 1)
            settings = {
                "steps": steps,
                "momentum": self.momentum,
                "optimizer": type(optimizer).__qualname__,
                "defaults": optimizer.defaults,
            }

            def warm_up() -> dict[str, Any]:
                self.warmup(optimizer, endless(loader), steps)
                return {
                    "student": _cpu(self.model.state_dict()),
                    "teacher": _cpu(self.teacher.state_dict()),
                    "optimizer": optimizer.state_dict(),
                }

            state = cached(self, "rmt", "warmup", _extend(key, **settings), warm_up)
            self.model.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            optimizer.load_state_dict(state["optimizer"])
        if self.lambda_src > 0:
            self._replay = endless(build_source_loader(datamodule, batch_size, self.seed + 2))
        self._prepared_optimizer = optimizer

    def on_test_start(self) -> None:
        super().on_test_start()  # runs prepare(), then builds a flat optimiser and snapshots
        # The warmed-up optimiser (two groups, its state) is the one to keep; record it as part
        # of the initial state.
        self._optimizer = self._prepared_optimizer
        self._initial_state = self._snapshot()

    @torch.no_grad()
    def compute_prototypes(self, loader: Any) -> torch.Tensor:
        """``(C, D)`` class means of the current (source) model's pooled embeddings over
        ``loader``, stopping once more than :data:`PROTOTYPE_FEATURES` were seen."""
        num_classes, dim = self.prototypes.shape
        sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=self.device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        seen = 0
        for batch in loader:
            images, labels = batch[0].to(self.device), batch[1].to(self.device).long()
            embedding = self.model(images).embedding
            sums.index_add_(0, labels, embedding.double())
            counts += torch.bincount(labels, minlength=num_classes).double()
            seen += len(labels)
            if seen > PROTOTYPE_FEATURES:
                break
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ConfigError(
                f"RMT's prototypes need source images of every class; classes {missing} have "
                "none in source_data (use more of the training split)"
            )
        return (sums / counts[:, None]).float().cpu()

    @torch.enable_grad()
    def warmup(self, optimizer: torch.optim.Optimizer, batches: Iterator[Any], steps: int) -> None:
        """``steps`` warm-up steps on unlabelled source batches (spec 4.2 step 3)."""
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        for i in range(steps):
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * (i + 1) / steps
            images = next(batches)[0].to(self.device)
            with torch.no_grad():
                teacher_logits = self.teacher(images).logits
            loss = symmetric_cross_entropy(self.model(images).logits, teacher_logits)
            optimizer.zero_grad(set_to_none=True)  # the projector keeps no gradient: Adam skips it
            loss.backward()
            optimizer.step()
            ema_update(self.teacher, self.model, self.momentum)
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr

    # ---- per test batch ----------------------------------------------------------------------
    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """One CoTTA augmentation draw for the batch, in the stream's normalisation."""
        unit = to_unit(images, self.mean, self.std)
        return from_unit(cotta_augment(unit, generator=self._generator), self.mean, self.std)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        clean = self.model(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images).logits
        prediction = (clean.logits + teacher_logits).detach()
        loss = clean.logits.new_zeros(())
        if self.lambda_st > 0 or self.lambda_cont > 0:
            augmented = self.model(self.augment(images))
            if self.lambda_st > 0:
                self_training = 0.5 * symmetric_cross_entropy(clean.logits, teacher_logits)
                self_training += 0.5 * symmetric_cross_entropy(augmented.logits, teacher_logits)
                loss = loss + self.lambda_st * self_training
            if self.lambda_cont > 0:
                contrastive = rmt_contrastive_loss(
                    self.prototypes,
                    clean.embedding,
                    augmented.embedding,
                    self.projector,
                    temperature=self.temperature,
                )
                loss = loss + self.lambda_cont * contrastive
        if self.lambda_src > 0:
            assert self._replay is not None, "prepare() builds the source replay"
            source_images, source_labels = next(self._replay)[:2]
            logits = self.model(source_images.to(self.device)).logits
            loss = loss + self.lambda_src * F.cross_entropy(
                logits, source_labels.to(self.device).long()
            )
        if loss.requires_grad:
            self.step_optimizer(loss)
        ema_update(self.teacher, self.model, self.momentum)
        return prediction


def _extend(key: Mapping[str, Any] | None, **more: Any) -> dict[str, Any] | None:
    return None if key is None else {**key, **more}


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}
