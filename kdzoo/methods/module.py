"""The one root every kdzoo method derives from.

:class:`KDZooModule` owns what every method family shares: the injected optimiser and scheduler
(one :meth:`~KDZooModule.parameter_groups` hook decides what they update), the weighted sum and
logging of the named loss terms a method returns, accuracy metrics, the input normalisation the
data pipeline applied, the frozen teachers' absence from checkpoints, and the class-level
declarations that kdzoo's drivers read instead of guessing: the checkpoint metric and its mode,
the paper, a short description, the network ``kdzoo hub export`` writes and the names a result
row shows. The families (classification, segmentation, paired-modality, test-time adaptation,
dual-head) add their batches and evaluation on top; a method adds its loss terms.
"""

from __future__ import annotations

import warnings
from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kdzoo.errors import ConfigError
from kdzoo.models.teacher import Teacher

__all__ = ["METHOD_KEY", "Deployable", "KDZooModule", "batch_size_of"]

#: The checkpoint entry naming the method class that wrote it (``module.Class``).
METHOD_KEY = "kdzoo_method"

# A frozen teacher is in eval mode on purpose; Lightning warns about any module in eval mode.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")


@dataclass(frozen=True)
class Deployable:
    """What ``kdzoo hub export`` writes for a checkpoint of a method.

    A plain timm network (``architecture`` set) is published so that ``timm.create_model`` reads
    it back. Any other network is published with ``config.json`` naming the method class whose
    ``deployable(hparams)`` rebuilds it, so ``kdzoo.hub.load`` gives it back.

    Attributes:
        network: a freshly built network of the checkpoint's architecture (random weights); its
            state dict is what the export writes.
        prefix: the prefix of its keys in the checkpoint's ``state_dict`` (e.g. ``"student."``).
        architecture: the ``timm.create_model`` name of a plain timm network, else ``""``.
        model_args: JSON data: the other ``timm.create_model`` arguments of a timm network
            (``in_chans``, ...); for another network taking images, ``in_chans``.
        reason: what the network is, and what it returns, when it is not a plain timm model
            (the model card says it).
        backbone: the timm architecture a network that is not a plain timm model is built on
            (the ``arch`` of its hub name ``arch.tag``).
        predictor: ``network`` wrapped so that ``forward`` returns the deployed prediction,
            when ``network``'s own forward returns more (a segmentation net's outputs); it
            shares ``network``'s parameters.
        inputs: per-sample shapes of the network's inputs when they are not one image of the
            data's size (paired-modality networks); ``None`` for images.
        any_size: the network takes images of any height and width (fully convolutional), so
            an ONNX export has dynamic spatial axes besides the batch axis.
    """

    network: nn.Module
    prefix: str
    architecture: str = ""
    model_args: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    backbone: str = ""
    predictor: nn.Module | None = None
    inputs: tuple[tuple[int, ...], ...] | None = None
    any_size: bool = False

    @property
    def timm_model(self) -> bool:
        return bool(self.architecture)

    @property
    def name_stem(self) -> str:
        """The ``arch`` of the hub name: the timm architecture, or the network's backbone."""
        return self.architecture or self.backbone

    @property
    def deployed(self) -> nn.Module:
        """The module whose ``forward`` gives the deployed prediction."""
        return self.predictor if self.predictor is not None else self.network


class KDZooModule(L.LightningModule, ABC):
    """The root of every kdzoo method; see the module docstring.

    Subclasses return unweighted scalar terms from ``loss_terms(batch)`` and set
    :attr:`loss_weights` (one weight per term name); :meth:`training_step` sums and logs them.

    Args:
        mean: input normalisation mean of the data pipeline (linked from ``data.mean``).
        std: input normalisation std (linked from ``data.std``).
        optimizer: optimiser factory, called with :meth:`parameter_groups`.
        scheduler: optional learning-rate scheduler factory, called with the optimiser and
            stepped every :attr:`scheduler_interval`.
    """

    #: What the best checkpoint is chosen by (``kdzoo fit`` monitors it unless told otherwise).
    checkpoint_metric: ClassVar[str] = "val/top1"
    checkpoint_mode: ClassVar[Literal["max", "min"]] = "max"
    #: The paper the method implements (authors, title, venue, arXiv id), for model cards.
    citation: ClassVar[str] = ""
    #: A few words on what the method does, for listings.
    description: ClassVar[str] = ""
    #: Arguments renamed since an earlier kdzoo: old name -> new name (a clear error names it).
    renamed_arguments: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        **unexpected: Any,
    ) -> None:
        _refuse_unexpected(type(self), unexpected)
        super().__init__()
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.optimizer = optimizer
        self.scheduler = scheduler
        #: ``"epoch"`` or ``"step"``: how often the scheduler steps.
        self.scheduler_interval: str = "epoch"
        #: One optimiser per parameter group instead of one for all (MST-Distill's stage 2).
        self.optimizer_per_group = False
        self.loss_weights: dict[str, float] = {}
        # Frozen teachers are rebuilt from the config on every load: saving them would bloat
        # checkpoints and could leak a private teacher into a published student.
        self._register_state_dict_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_keys)

    # ---- training: the weighted sum of named terms, written once ------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.weighted_loss(self.loss_terms(batch), batch_size=self.batch_size(batch))

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms for one training batch, keyed by name."""
        raise NotImplementedError(f"{type(self).__name__} does not define loss_terms")

    def batch_size(self, batch: Any) -> int | None:
        """Images in a training batch (for logging)."""
        return batch_size_of(batch)

    def weighted_loss(
        self, terms: Mapping[str, torch.Tensor], batch_size: int | None
    ) -> torch.Tensor:
        """``sum(loss_weights[name] * term)``, each term logged as ``train/loss_<name>`` and the
        sum as ``train/loss``."""
        unknown = set(terms) - set(self.loss_weights)
        if unknown:
            raise KeyError(f"{type(self).__name__} returned loss terms without a weight: {unknown}")
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    # ---- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self) -> list[Any]:
        """What the optimiser updates: parameters, or parameter groups (dicts with ``params``
        and their own options). Default: every parameter that requires a gradient."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        if self.optimizer is None:
            raise ConfigError(f"{type(self).__name__} was built without an optimizer")
        groups = self.parameter_groups()
        if self.optimizer_per_group:
            return [self.optimizer(group["params"]) for group in groups]
        optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if self.scheduler_interval == "epoch":
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        interval = {"scheduler": scheduler, "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": interval}

    # ---- metrics --------------------------------------------------------------------------------
    @staticmethod
    def accuracy_metrics(num_classes: int, prefix: str = "", suffix: str = "") -> MetricCollection:
        """Top-1 and top-5 (top-``num_classes`` below 5 classes) accuracy, logged as
        ``<prefix>top1<suffix>``, ``<prefix>top5<suffix>``."""
        top_k = min(5, num_classes)
        metrics = {
            f"top1{suffix}": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            f"top{top_k}{suffix}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
        }
        return MetricCollection(metrics, prefix=prefix)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Which class wrote the checkpoint, also when it was trained without LightningCLI (whose
        # hyper-parameters record ``_class_path``): `kdzoo hub export` asks that class.
        checkpoint[METHOD_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ---- what drivers ask -----------------------------------------------------------------------
    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        """The network ``kdzoo hub export`` writes for a checkpoint with these hyper-parameters,
        built without the teacher (so exporting never needs the teacher's weights)."""
        raise NotImplementedError(f"{cls.__name__} declares no deployable network")

    def result_names(self) -> dict[str, str]:
        """``{"student": ..., "teacher": ...}`` as a result row shows them."""
        return {"student": str(self.hparams.get("student", "")), "teacher": ""}


def batch_size_of(batch: Any) -> int | None:
    """Images in a batch ``(x, ...)``, ``{"labelled": (x, ...), ...}`` or ``x``."""
    if isinstance(batch, Mapping):
        batch = batch.get("labelled", next(iter(batch.values())))
    first = batch[0] if isinstance(batch, Sequence) else batch
    return len(first) if torch.is_tensor(first) else None


def _refuse_unexpected(cls: type, unexpected: Mapping[str, Any]) -> None:
    if not unexpected:
        return
    renamed = {k: cls.renamed_arguments[k] for k in unexpected if k in cls.renamed_arguments}
    if renamed:
        hints = ", ".join(f"{old} is now {new}" for old, new in renamed.items())
        raise ConfigError(f"{cls.__name__}: {hints}; rename it in your config or call")
    raise TypeError(f"{cls.__name__} got unexpected arguments: {sorted(unexpected)}")


def _frozen_prefixes(module: nn.Module, prefix: str) -> list[str]:
    return [
        f"{prefix}{name}."
        for name, child in module.named_modules()
        if name and isinstance(child, Teacher)
    ]


def _drop_frozen_keys(module: nn.Module, state_dict: Mapping, prefix: str, _: Any) -> None:
    prefixes = tuple(_frozen_prefixes(module, prefix))
    if prefixes:
        for key in [k for k in state_dict if k.startswith(prefixes)]:
            del state_dict[key]


def _allow_missing_frozen_keys(module: nn.Module, incompatible_keys: Any) -> None:
    prefixes = tuple(_frozen_prefixes(module, ""))
    if prefixes:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(prefixes)]
