"""The contract of continual test-time adaptation (TTA) methods: predict, then adapt, per batch.

A :class:`TTAModule` wraps a trained source classifier and is run by ``kdzoo test`` over a stream
of test batches ``(images, labels, domain)`` (see :class:`~kdzoo.datamodules.CorruptionStream`).
Lightning's test loop gives the order (the stream's), and the module, with
``inference_mode=False`` on the Trainer, for each batch:

1. calls :meth:`TTAModule.adapt`, which returns the logits the method predicts for the batch,
   computed **before** the batch's own update, and then updates the model (gradients are enabled
   only inside ``adapt``; the labels are never passed to it);
2. counts errors per domain and along the stream; at the end logs ``test/error_<domain>`` and
   ``test/mean_error`` (in %) and writes ``tta_stream.csv`` (one row per batch) and
   ``tta_domains.csv`` (one row per domain) into the logger's directory.

Common machinery from the benchmark code (kdzoo spec ``tta.md`` section 1): the model stays in eval
mode (no dropout), every BatchNorm normalises with the statistics of the test batch itself (its
running statistics are removed) unless ``batch_norm="source"``; the optimiser (Adam 1e-3 by
default, the benchmark's CIFAR setting) is built when the test starts; ``reset="each_shift"``
restores the initial state whenever the domain changes, otherwise the model is reset only at
the start of the stream. Under DDP (``--trainer.use_distributed_sampler=false``, which is
required) every process adapts on the whole stream, identically; one-time set-ups are computed
on rank 0 and broadcast. :meth:`TTAModule.prepare` runs one-time set-ups (source statistics,
warm-up) before the initial state is recorded.
"""

from __future__ import annotations

import copy
import csv
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.utils.data import DistributedSampler

from kdzoo.errors import ConfigError
from kdzoo.methods.module import Deployable, KDZooModule
from kdzoo.models.backbone import Backbone, BackboneOutput
from kdzoo.models.teacher import RANDOM_INIT, TeacherSpec, build_teacher_backbone
from kdzoo.models.weights import WeightsError

__all__ = ["TTAModule", "ema_update", "use_batch_statistics"]


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm normalise with the current batch's statistics, in train and eval mode
    (the benchmark's ``configure_model``: running statistics deleted)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` over parameters paired by name
    (buffers are not averaged). The benchmark skips the update entirely when ``momentum >= 1``."""
    if momentum >= 1.0:
        return
    student_params = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        param.mul_(momentum).add_(student_params[name].detach(), alpha=1.0 - momentum)


class TTAModule(KDZooModule):
    """A source classifier adapted online to a test stream; see the module docstring.

    Args:
        source: the trained source model (timm name + weights: a kdzoo checkpoint, an exported
            folder, ``hub:NAME`` or ``timm``).
        num_classes: classes of the stream (linked from the datamodule); must match the source.
        in_chans: input channels of the stream (linked); must match the source.
        mean: input normalisation of the stream (linked); must match the source's training.
        std: as ``mean``.
        optimizer: optimiser factory for :meth:`trainable_parameters` (benchmark CIFAR setting:
            Adam, lr 1e-3).
        reset: ``"never"`` (continual: reset only at the start) or ``"each_shift"``.
        batch_norm: ``"batch"`` (test-batch statistics, every adapting method in the benchmark)
            or ``"source"`` (keep the source's running statistics).
    """

    #: ``kdzoo test`` adapts the source model named in the config: no checkpoint is needed.
    evaluates_without_checkpoint = True
    checkpoint_metric = "test/mean_error"
    checkpoint_mode = "min"

    def __init__(
        self,
        source: TeacherSpec,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = lambda params: torch.optim.Adam(params, lr=1e-3),
        reset: Literal["never", "each_shift"] = "never",
        batch_norm: Literal["batch", "source"] = "batch",
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, **kwargs)
        if isinstance(source, Mapping):  # as stored in a checkpoint's hyper-parameters
            source = TeacherSpec(**source)
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams.source = asdict(source)
        self.model = self._build_source(source, num_classes, in_chans)
        if batch_norm == "batch":
            use_batch_statistics(self.model)
        self.optimizer_factory = optimizer
        self.reset_mode = reset
        self.automatic_optimization = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._initial_state: dict[str, Any] | None = None
        self._domain: int | None = None

    # ---- what a method provides -------------------------------------------------------------
    @abstractmethod
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Logits predicted for ``images`` (from the state before this batch's update), after
        which the method updates itself on the batch. Runs with gradients enabled."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates (default: every parameter of the model)."""
        return list(self.model.parameters())

    def prepare(self) -> None:
        """One-time set-up before the initial state is recorded (source statistics, warm-up)."""

    # ---- the source model ----------------------------------------------------------------------
    def _build_source(self, spec: TeacherSpec, num_classes: int, in_chans: int) -> Backbone:
        if spec.num_classes not in (None, num_classes):
            raise ConfigError(
                f"source.num_classes={spec.num_classes} but the stream has {num_classes} "
                "classes: adapt a source trained on the stream's classes (and remove "
                "source.num_classes)"
            )
        try:
            backbone, recorded = build_teacher_backbone(
                spec,
                num_classes=num_classes,
                in_chans=in_chans,
                field="source",
                requirement="the source model must predict the stream's classes",
                label_space="the stream",
            )
        except WeightsError as err:
            raise WeightsError(
                f"source.weights: {err} (the stream has in_chans={in_chans} and "
                f"{num_classes} classes; the source model must take the same)"
            ) from err
        if spec.weights not in (RANDOM_INIT, "timm"):
            self._check_normalisation(recorded)
        # With the architecture read from the weights when source.name was left out.
        self.hparams.source["name"] = backbone.name
        return backbone

    def _check_normalisation(self, recorded: Mapping[str, Any]) -> None:
        for key in ("mean", "std"):
            theirs, ours = recorded.get(key), getattr(self, key)
            if theirs is not None and ours is not None and tuple(theirs) != tuple(ours):
                raise ConfigError(
                    f"the source model was trained with input {key} {tuple(theirs)} but the "
                    f"stream is normalised with {tuple(ours)}: set data.{key} to the source's"
                )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).logits

    def features(self, images: torch.Tensor) -> BackboneOutput:
        """Logits and pooled embedding of the adapted model in one pass."""
        return self.model(images)

    # ---- the online protocol -----------------------------------------------------------------
    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "test-time adaptation needs gradients: run with --trainer.inference_mode=false"
            )
        trainer = self._trainer  # None when the protocol is driven by hand (tests)
        if (
            trainer is not None
            and trainer.world_size > 1
            and _stream_is_split(trainer.test_dataloaders)
        ):
            raise ConfigError(
                "a test-time adaptation stream must reach every process whole and in order: "
                "run several devices with --trainer.use_distributed_sampler=false (each process "
                "then adapts on the full stream, identically), or use one device"
            )
        self.model.eval()
        self.prepare()
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        self._optimizer = self.optimizer_factory(params) if params else None
        self._initial_state = self._snapshot()
        self._domain = None
        self._stream_rows: list[dict[str, Any]] = []
        self._errors: dict[int, list[int]] = {}

    def _snapshot(self) -> dict[str, Any]:
        optimizer = self._optimizer.state_dict() if self._optimizer is not None else None
        return {"module": copy.deepcopy(self.state_dict()), "optimizer": copy.deepcopy(optimizer)}

    def restore_initial_state(self) -> None:
        """Back to the state recorded when the test started (after :meth:`prepare`)."""
        assert self._initial_state is not None
        self.load_state_dict(self._initial_state["module"])
        if self._optimizer is not None:
            self._optimizer.load_state_dict(self._initial_state["optimizer"])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, target, domain = batch[0], batch[1], int(batch[2][0])
        if self._domain is not None and domain != self._domain and self.reset_mode == "each_shift":
            self.restore_initial_state()
        self._domain = domain
        self.eval()  # Lightning may have switched modes; dropout stays off everywhere
        with torch.enable_grad():
            logits = self.adapt(images)
        wrong = int((logits.argmax(dim=1) != target).sum())
        counts = self._errors.setdefault(domain, [0, 0])
        counts[0] += wrong
        counts[1] += len(target)
        self._stream_rows.append(
            {"batch": batch_idx, "domain": domain, "images": len(target), "errors": wrong}
        )

    def step_optimizer(self, loss: torch.Tensor) -> None:
        """One optimiser step of the trainable parameters on ``loss``."""
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()

    def on_test_epoch_end(self) -> None:
        names = self._domain_names()
        errors = {d: 100.0 * w / n for d, (w, n) in sorted(self._errors.items())}
        for domain, error in errors.items():
            # Under DDP every process adapts on the whole stream, so the values agree across
            # ranks; syncing only averages equal numbers.
            self.log(f"test/error_{names.get(domain, domain)}", error, sync_dist=True)
        if errors:
            mean_error = sum(errors.values()) / len(errors)
            self.log("test/mean_error", mean_error, prog_bar=True, sync_dist=True)
        # The gradual setting also reports the mean over its severity-5 blocks (domain names
        # are "<corruption>-<severity>[#k]").
        severities = {_severity(n) for n in names.values()}
        top = [e for d, e in errors.items() if _severity(names.get(d)) == "5"]
        if len(severities) > 1 and top:
            self.log("test/mean_error_severity5", sum(top) / len(top), sync_dist=True)
        self._write_csvs(errors, names)

    def _domain_names(self) -> dict[int, str]:
        data = self.trainer.datamodule if self._trainer is not None else None
        return dict(enumerate(getattr(data, "domains", []) or []))

    def _write_csvs(self, errors: Mapping[int, float], names: Mapping[int, str]) -> None:
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if log_dir is None or not self.trainer.is_global_zero:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with (Path(log_dir) / "tta_stream.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["batch", "domain", "name", "images", "errors"])
            writer.writeheader()
            for row in self._stream_rows:
                writer.writerow({**row, "name": names.get(row["domain"], row["domain"])})
        with (Path(log_dir) / "tta_domains.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["domain", "name", "error"])
            for domain, error in errors.items():
                writer.writerow([domain, names.get(domain, domain), f"{error:.4f}"])

    def configure_optimizers(self) -> None:
        # Built in on_test_start: TTA never runs `fit`.
        return None

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        """The model as the checkpoint holds it: the source, adapted if the checkpoint was saved
        after a test stream (``kdzoo test`` itself writes none).

        With ``batch_norm="source"`` it is a plain timm model. With ``batch_norm="batch"`` its
        BatchNorm layers have no running statistics and normalise every input batch with its
        own, as the method predicts: a timm network that ``timm.create_model`` cannot give back.
        """
        source = hparams["source"]
        model_args = {
            "in_chans": int(hparams.get("in_chans") or 3),
            **dict(source.get("model_kwargs") or {}),
        }
        num_classes = int(hparams["num_classes"])
        network = timm.create_model(source["name"], num_classes=num_classes, **model_args)
        if hparams.get("batch_norm", "batch") == "source":
            return Deployable(network, "model.model.", source["name"], model_args)
        reason = (
            f"a timm {source['name']} whose BatchNorm layers normalise each input batch with "
            "its own statistics (test-time adaptation, batch_norm='batch'), returning class "
            "logits that depend on the whole batch"
        )
        return Deployable(
            use_batch_statistics(network),
            "model.model.",
            model_args=model_args,
            reason=reason,
            backbone=source["name"].split(".")[0],
        )

    def result_names(self) -> dict[str, str]:
        return {"student": self.hparams.source["name"], "teacher": ""}


def _severity(name: Any) -> str | None:
    return str(name).split("#")[0].rsplit("-", 1)[-1] if name is not None else None


def _stream_is_split(loaders: Any) -> bool:
    """Whether Lightning put a ``DistributedSampler`` in front of the test stream."""
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    samplers = [getattr(loader, "sampler", None) for loader in loaders]
    return any(isinstance(sampler, DistributedSampler) for sampler in samplers)
