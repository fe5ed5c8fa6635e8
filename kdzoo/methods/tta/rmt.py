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
  ``st_weight * (SCE(z_s, z_t) + SCE(z~_s, z_t)) / 2 + cont_weight * L_cont + src_weight * CE``
  on a labelled source batch; one step; teacher EMA (0.999); the prediction is the logit sum of
  student and teacher, both computed before the step.

Source-free variant (spec 4.4, the code's ``RMT.LAMBDA_CE_SRC 0.0 RMT.NUM_SAMPLES_WARM_UP 0``):
``src_weight=0, warmup_samples=0``. As in the code it still computes the prototypes from the
source data, so ``source_data`` is still needed unless ``cont_weight=0`` as well.

kdzoo specifics: prototypes and the warm-up state are cached on disk (``$KDZOO_HOME/tta/rmt``)
keyed by the source weights' hash, the source data and the settings, and cached and fresh runs
are identical because prototypes, warm-up and replay each read their own seeded source loader
(the code shares one iterator between warm-up and replay); the augmentation draws from a seeded
generator; the projector's initialisation is seeded by ``seed`` (PyTorch's default init).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.contrastive import rmt_contrastive_loss
from kdzoo.losses.functional.sce import symmetric_cross_entropy
from kdzoo.methods.statistics import (
    cache_file,
    class_means,
    compute_once,
    default_source_batch_size,
    endless,
    source_datamodule,
    source_loader,
    table_key,
)
from kdzoo.methods.tta.augment import cotta_augment, from_unit, to_unit
from kdzoo.methods.tta.base import TTAModule, ema_update
from kdzoo.validation import check_at_least, check_non_negative, check_positive

__all__ = ["RMT"]

#: The code stops collecting source features for the prototypes once it holds more than this.
PROTOTYPE_FEATURES = 100_000


class RMT(TTAModule):
    """Robust mean teacher: SCE self-training, prototype contrastive loss, source replay and
    warm-up; see the module docstring.

    Args:
        st_weight: weight of the symmetric cross-entropy self-training term.
        cont_weight: weight of the three-view contrastive term (0 skips prototypes and projector).
        src_weight: weight of the source replay cross-entropy (0: source-free at test time).
        temperature: contrastive temperature.
        projection_dim: projector width.
        momentum: teacher EMA momentum (>= 1 freezes the teacher, as the code).
        warmup_samples: source images of the warm-up (0: none); steps =
            ``warmup_samples // source_batch_size``.
        source_data: the source model's labelled training data, a datamodule whose train split
            is read without augmentation (:func:`~kdzoo.methods.statistics.source_loader`);
            needed when ``cont_weight``, ``src_weight`` or ``warmup_samples`` is non-zero.
        source_batch_size: source batch size; ``None``: the test stream's batch size, the same
            rule for ``kdzoo test`` and ``trainer.test(module, datamodule=... or
            dataloaders=...)`` from Python (the datamodule's ``batch_size``, else the test
            dataloader's; :func:`~kdzoo.methods.statistics.default_source_batch_size`); 200 only
            when no trainer drives the module.
        seed: seeds the source loaders, the augmentation and the projector's initialisation.
        cache: read/write the prototype and warm-up caches.
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    citation = (
        'Döbler, Marsden, Yang. "Robust Mean Teacher for Continual and Gradual Test-Time '
        'Adaptation". CVPR 2023, arXiv:2211.13081'
    )
    description = "robust mean teacher"
    renamed_arguments: ClassVar[Mapping[str, str]] = {
        "lambda_st": "st_weight",
        "lambda_cont": "cont_weight",
        "lambda_src": "src_weight",
    }

    def __init__(
        self,
        st_weight: float = 1.0,
        cont_weight: float = 1.0,
        src_weight: float = 1.0,
        temperature: float = 0.1,
        projection_dim: int = 128,
        momentum: float = 0.999,
        warmup_samples: int = 50000,
        source_data: L.LightningDataModule | None = None,
        source_batch_size: int | None = None,
        seed: int = 0,
        cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_non_negative(st_weight=st_weight, cont_weight=cont_weight, src_weight=src_weight)
        check_positive(temperature=temperature)
        check_at_least(1, projection_dim=projection_dim)
        check_non_negative(warmup_samples=warmup_samples, momentum=momentum)
        if source_data is None and (cont_weight > 0 or src_weight > 0 or warmup_samples > 0):
            raise ConfigError(
                "RMT needs the source training data (source_data: a datamodule such as "
                "{class_path: kdzoo.datamodules.FashionMNIST, init_args: {...}}) for its class "
                "prototypes (cont_weight > 0), the warm-up (warmup_samples > 0) and source replay "
                "(src_weight > 0). The source-free variant (src_weight=0, warmup_samples=0) still "
                "uses source prototypes, as the official code; set cont_weight=0 as well to run "
                "without any source data"
            )
        self.st_weight, self.cont_weight, self.src_weight = st_weight, cont_weight, src_weight
        self.temperature = temperature
        self.momentum = momentum
        self.warmup_samples = warmup_samples
        self.source_data = source_data
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
            stream = (self.model.num_classes, self.hparams.get("in_chans"), self.mean, self.std)
            datamodule = source_datamodule(self.source_data, *stream)
        key = None  # hashes the source weights once, before the prototype pass and the warm-up
        if self.cache and datamodule is not None:
            options = {"batch_size": batch_size, "seed": self.seed}
            key = table_key("rmt-source", self.model, datamodule, augment=False, **options)
        if self.cont_weight > 0:
            loader = source_loader(datamodule, batch_size, self.seed)
            compute = lambda: {"prototypes": self.compute_prototypes(loader)}  # noqa: E731
            path = cache_file(key, "tta/rmt", table="prototypes", n=PROTOTYPE_FEATURES)
            self.prototypes.copy_(compute_once(self._trainer, path, compute)["prototypes"])
        steps = self.warmup_samples // batch_size
        if steps > 0:
            loader = source_loader(datamodule, batch_size, self.seed + 1)
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

            path = cache_file(key, "tta/rmt", table="warmup", **settings)
            state = compute_once(self._trainer, path, warm_up)
            self.model.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            optimizer.load_state_dict(state["optimizer"])
        if self.src_weight > 0:
            self._replay = endless(source_loader(datamodule, batch_size, self.seed + 2))
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
        return class_means(
            lambda images: self.model(images).embedding,
            loader,
            self.prototypes.shape[0],
            device=self.device,
            stop_after=PROTOTYPE_FEATURES,
            name="RMT's prototypes (source_data needs images of every class)",
        ).cpu()

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
        if self.st_weight > 0 or self.cont_weight > 0:
            augmented = self.model(self.augment(images))
            if self.st_weight > 0:
                self_training = 0.5 * symmetric_cross_entropy(clean.logits, teacher_logits)
                self_training += 0.5 * symmetric_cross_entropy(augmented.logits, teacher_logits)
                loss = loss + self.st_weight * self_training
            if self.cont_weight > 0:
                contrastive = rmt_contrastive_loss(
                    self.prototypes,
                    clean.embedding,
                    augmented.embedding,
                    self.projector,
                    temperature=self.temperature,
                )
                loss = loss + self.cont_weight * contrastive
        if self.src_weight > 0:
            assert self._replay is not None, "prepare() builds the source replay"
            source_images, source_labels = next(self._replay)[:2]
            logits = self.model(source_images.to(self.device)).logits
            loss = loss + self.src_weight * F.cross_entropy(
                logits, source_labels.to(self.device).long()
            )
        if loss.requires_grad:
            self.step_optimizer(loss)
        ema_update(self.teacher, self.model, self.momentum)
        return prediction


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}
