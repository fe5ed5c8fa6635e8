"""The frozen-teacher primitive, and teachers built from a name and weights.

:class:`Teacher` is what every kdzoo method distils from, whatever the network: a timm classifier
(:func:`build_teacher`), a segmentation network, a cross-modal fusion or unimodal network, KC's
specialists, a CLIP classifier. It is frozen, in eval mode for ever, run without autograd,
re-normalises the student's input batch when the two networks expect different mean/std (so one
data pipeline feeds both), and is left out of checkpoints by the module root
(:class:`~kdzoo.methods.module.KDZooModule` drops the keys of every ``Teacher`` it holds; a
teacher is rebuilt from the config on load). Its weights are loaded strictly, with one
explanation of what does not fit (:func:`~kdzoo.models.weights.load_strictly`).

:class:`TeacherSpec` is the config block of a timm classifier teacher (and of a test-time
adaptation source model, which is loaded the same way by :func:`build_teacher_backbone` but
adapted, not frozen); :func:`build_teacher` turns it into a :class:`Teacher`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdzoo.errors import ConfigError, KDZooError
from kdzoo.models.backbone import Backbone
from kdzoo.models.weights import (
    WeightsError,
    checkpoint_hyperparameters,
    load_backbone_state,
    load_strictly,
)

__all__ = [
    "RANDOM_INIT",
    "Teacher",
    "TeacherSpec",
    "build_teacher",
    "build_teacher_backbone",
    "load_weights",
    "missing_weights_error",
    "resolve_weights",
]

TIMM_PRETRAINED = "timm"
#: The explicit ``weights`` value that keeps a frozen network's random initialisation (tests).
RANDOM_INIT = "random"
HUB_PREFIX = "hub:"
#: The methods whose teacher can be a teacher-output cache (``TeacherSpec.cache``, and
#: ``PairedTeacherSpec.cache`` for CrossModalKD's cross-modal teacher).
CACHE_READERS = ("KD", "DKD", "DIST", "PLD", "ND", "TGeoKD", "CrossModalKD")
WEIGHT_SOURCES = (
    "a kdzoo checkpoint (.ckpt), an exported folder, a .safetensors/.pth file, hub:NAME or timm"
)


@dataclass
class TeacherSpec:
    """Where a teacher comes from.

    Attributes:
        name: timm architecture, e.g. ``"resnet34"``. ``None``: the architecture recorded with
            the weights (a kdzoo ``.ckpt``'s student, an exported folder's ``config.json``);
            when both are given they must agree.
        weights: a kdzoo Lightning checkpoint (``.ckpt``, its student is the teacher), a
            ``.safetensors`` file, a ``torch.save``-d state dict, a folder made by
            ``kdzoo hub export``, ``"hub:NAME"`` for a published kdzoo checkpoint (downloaded
            and verified into ``$KDZOO_HOME/hub``), or ``"timm"`` for timm's pretrained weights
            of ``name`` (e.g. ``name: resnet34.tv_in1k``; needs a network or a filled Hugging
            Face cache). Required: ``None`` is an error, so a forgotten flag never distils from
            a random network; ``"random"`` keeps the random initialisation (only for tests).
        mean: input mean the teacher's weights expect. ``None``: read it from the checkpoint's
            hyper-parameters, or timm's pretrained config for ``"timm"``, or else assume the
            student's.
        std: input std, as ``mean``.
        num_classes: teacher outputs; ``None`` means the dataset's number of classes (or, for
            a method whose teacher may predict other classes, the number the weights record).
        model_kwargs: extra ``timm.create_model`` arguments; ``None``: those recorded with the
            weights (the run's ``student_kwargs``, the folder's ``model_args``), if any.
        cache: a teacher-output cache made by ``kdzoo cache build`` from this teacher
            (:mod:`kdzoo.cache`): the method reads the teacher's stored outputs for each batch
            instead of running it, and the network is never built. The run must use the data,
            transforms and ``augment_seed`` the cache was built with, and at most its epochs.
    """

    name: str | None = None
    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] | None = None
    cache: str | None = None


class Teacher(nn.Module):
    """A frozen network that stays in eval mode for ever and runs without autograd.

    Args:
        backbone: the network: a :class:`~kdzoo.models.backbone.Backbone` (classifier
            teachers), a :class:`~kdzoo.models.segmentation.SegmentationModel`, a cross-modal
            :class:`~kdzoo.models.multimodal.FusionNet` or
            :class:`~kdzoo.models.multimodal.UnimodalNet`, ... Its parameters stop requiring
            gradients.
        student_mean: the normalisation of the batches the teacher receives; with the three
            others given and different from the teacher's, ``forward`` re-normalises.
        student_std: the matching std.
        teacher_mean: the normalisation the teacher's weights expect.
        teacher_std: the matching std.

    ``forward(*inputs, indices=None)`` calls ``backbone(*inputs)`` (``indices`` is passed on
    when given: a :class:`~kdzoo.models.backbone.Backbone`'s intermediate maps). A network with
    several inputs (cross-modal) is never re-normalised; a single image batch normalised for the
    student is mapped to the teacher's normalisation with one affine op:
    ``x_t = x * (std_s / std_t) + (mean_s - mean_t) / std_t``.

    Subclasses with their own input mapping (the CLIP teachers) override ``forward``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.renormalise = None not in (student_mean, student_std, teacher_mean, teacher_std) and (
            tuple(student_mean) != tuple(teacher_mean) or tuple(student_std) != tuple(teacher_std)
        )
        if self.renormalise:
            s_mean, s_std, t_mean, t_std = (
                torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                for v in (student_mean, student_std, teacher_mean, teacher_std)
            )
            # Not persistent: they follow from the config, and teachers are never checkpointed.
            self.register_buffer("scale", s_std / t_std, persistent=False)
            self.register_buffer("shift", (s_mean - t_mean) / t_std, persistent=False)
        self.train(False)

    @property
    def name(self) -> str | None:
        """The network's architecture (a timm name for classifier teachers)."""
        return getattr(self.backbone, "name", None)

    @property
    def embedding_dim(self) -> int:
        """Width of the teacher's pooled embedding."""
        return self.backbone.embedding_dim

    def train(self, mode: bool = True) -> Teacher:
        # Lightning calls model.train() at every epoch start; a teacher never leaves eval mode
        # (BatchNorm statistics and dropout must stay those it was trained with).
        return super().train(False)

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor, indices: int | Sequence[int] | None = None) -> Any:
        if self.renormalise:
            (x,) = inputs  # re-normalisation is set up for one image batch only
            # Only the image channels; extra input channels (LAD's label channel) follow them.
            k = self.scale.shape[1]
            image = x[:, :k] * self.scale.to(x.dtype) + self.shift.to(x.dtype)
            inputs = (torch.cat([image, x[:, k:]], dim=1) if x.shape[1] > k else image,)
        if indices is None:  # also the call of networks without intermediate maps (segmentation)
            return self.backbone(*inputs)
        return self.backbone(*inputs, indices=indices)


def resolve_weights(weights: str) -> tuple[str, dict[str, Any]]:
    """The weight file behind ``weights`` and the input mean/std it records (if any).

    ``"hub:NAME"`` is downloaded (or found in the cache) and verified; an exported hub folder
    gives its ``model.safetensors`` and ``config.json``; any other value is a file path.
    """
    if weights.startswith(HUB_PREFIX):
        from kdzoo.hub.fetch import download

        return _exported_folder(download(weights[len(HUB_PREFIX) :]))
    if Path(weights).is_dir():
        return _exported_folder(Path(weights))
    return weights, checkpoint_hyperparameters(weights)


def _exported_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    """The folder's weight file and what its config.json records: ``architecture``,
    ``num_classes``, ``in_chans``, ``model_kwargs``, ``mean``, ``std``; for a network that is
    not a plain timm model, the run's hyper-parameters, ``mean``, ``std`` and ``not_timm`` (what
    the network is)."""
    from kdzoo.hub.folder import read_config  # here: it imports kdzoo.models (package)

    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise WeightsError(
            f"{folder} is not a kdzoo hub folder: it needs model.safetensors and config.json "
            "(made by `kdzoo hub export`)"
        )
    recorded = read_config(config)
    cfg = recorded.get("pretrained_cfg") or {}
    info = recorded.get("kdzoo") if isinstance(recorded.get("kdzoo"), dict) else {}
    network = info.get("network") if isinstance(info.get("network"), dict) else {}
    if not recorded.get("architecture") and network.get("plain_timm") is False:
        # Not a plain timm model (a segmentation net, KC's student, ...): what the run's
        # hyper-parameters record, as for a .ckpt, and what it is, so a classifier teacher
        # refuses it by name (a segmentation teacher reads its architecture from them).
        return str(weights), {
            **dict(info.get("method_hparams") or {}),
            "not_timm": network.get("description") or "not a plain timm model",
            "mean": cfg.get("mean"),
            "std": cfg.get("std"),
        }
    model_args = dict(recorded.get("model_args") or {})
    return str(weights), {
        "architecture": recorded.get("architecture"),
        "num_classes": recorded.get("num_classes", cfg.get("num_classes")),
        "in_chans": model_args.pop("in_chans", None),
        "model_kwargs": model_args or None,
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
    }


def missing_weights_error(field: str, name: str | None = None) -> ConfigError:
    """The error for a frozen network (``field``: ``teacher``, ``source``, ...) without weights:
    a forgotten flag must never train against a random network."""
    who = f"{field} {name!r}" if name else field
    return ConfigError(
        f"{who} has no weights: set {_option(field, 'weights')} to {WEIGHT_SOURCES}; "
        f"`{RANDOM_INIT}` keeps the random initialisation (for tests only)"
    )


def _option(field: str, attribute: str) -> str:
    """How the user sets ``field.attribute`` on the command line."""
    if "[" in field:  # an element of a list argument, e.g. specialists[0]
        return f"{field}.{attribute} (in --model.init_args.{field.split('[')[0]})"
    return f"--model.init_args.{field}.{attribute}"


def build_teacher(
    spec: TeacherSpec,
    *,
    num_classes: int,
    in_chans: int,
    student_mean: Sequence[float] | None = None,
    student_std: Sequence[float] | None = None,
    field: str = "teacher",
    same_label_space: bool = True,
    requirement: str | None = None,
    label_space: str = "the data",
) -> Teacher:
    """Build the frozen teacher ``spec`` describes, its weights loaded and checked.

    See :func:`build_teacher_backbone` for the arguments after ``in_chans``.
    """
    backbone, recorded = build_teacher_backbone(
        spec,
        num_classes=num_classes,
        in_chans=in_chans,
        field=field,
        same_label_space=same_label_space,
        requirement=requirement,
        label_space=label_space,
    )
    return Teacher(
        backbone,
        student_mean=student_mean,
        student_std=student_std,
        teacher_mean=spec.mean or recorded.get("mean") or student_mean,
        teacher_std=spec.std or recorded.get("std") or student_std,
    )


def build_teacher_backbone(
    spec: TeacherSpec,
    *,
    num_classes: int,
    in_chans: int,
    field: str = "teacher",
    same_label_space: bool = True,
    requirement: str | None = None,
    label_space: str = "the data",
) -> tuple[Backbone, dict[str, Any]]:
    """The (not yet frozen) network ``spec`` describes, its weights loaded and checked, and what
    its weights record (``mean``/``std`` among others).

    Args:
        spec: architecture and weights; ``weights=None`` is a :class:`ConfigError`, ``"random"``
            keeps the random initialisation.
        num_classes: the classes of the data.
        in_chans: input channels of the data.
        field: the config field ``spec`` came from (``teacher``, ``source``,
            ``specialists[0]``), for the messages.
        same_label_space: the network must predict the data's classes (else, without
            ``spec.num_classes``, it keeps the number its weights record).
        requirement: what the method needs, said when the classes differ (default:
            ``"<field> and student must predict the same classes"``).
        label_space: what ``num_classes`` counts, for the messages.

    Raises:
        ConfigError: no weights; no architecture (``spec.name`` unset and none recorded);
            ``spec.name`` disagrees with the recorded architecture.
        WeightsError: the file is missing, unreadable or unsafe, or does not fit (other
            classes, input channels or architecture).
    """
    if spec.cache is not None:
        raise ConfigError(
            f"{field}.cache is set, but this method runs its {field} live (the methods that read "
            f"a teacher cache: {', '.join(CACHE_READERS)}): remove {_option(field, 'cache')}"
        )
    weights = spec.weights
    if weights is None:
        raise missing_weights_error(field, spec.name)
    path, recorded = None, {}
    if weights not in (RANDOM_INIT, TIMM_PRETRAINED):
        path, recorded = resolve_weights(weights)
    if recorded.get("not_timm"):
        raise WeightsError(
            f"{field}.weights={weights} holds {recorded['not_timm']}: not a plain timm classifier, "
            f"so it cannot be the {field}; export the checkpoint of a classification run "
            "(Supervised, KD, ...) instead"
        )
    name = _architecture(spec, recorded, field)

    def class_mismatch(file_classes: int) -> KDZooError:
        if spec.num_classes is not None:
            return WeightsError(
                f"{field}.num_classes={spec.num_classes} but {weights} was trained on "
                f"{file_classes} classes: set {_option(field, 'num_classes')} to {file_classes} "
                "or remove it"
            )
        need = requirement or f"{field} and student must predict the same classes"
        return WeightsError(
            f"{need}, but {weights} was trained on {file_classes} classes and {label_space} has "
            f"{num_classes}: train the {field} on this data, or use data with the "
            f"{file_classes} classes it was trained on"
        )

    file_classes = recorded.get("num_classes")
    file_classes = file_classes if isinstance(file_classes, int) else None
    classes = spec.num_classes or (None if same_label_space else file_classes) or num_classes
    if file_classes is not None and file_classes != classes:
        raise class_mismatch(file_classes)
    file_chans = recorded.get("in_chans")
    if isinstance(file_chans, int) and file_chans != in_chans:
        raise WeightsError(
            f"the {field} in {weights} takes {file_chans} input channels but the data has "
            f"{in_chans}: use data with the channels it was trained on (or a {field} trained on "
            "this data)"
        )
    model_kwargs = spec.model_kwargs
    if model_kwargs is None:
        model_kwargs = recorded.get("model_kwargs", recorded.get("student_kwargs"))
    backbone = Backbone(
        name,
        num_classes=classes,
        in_chans=in_chans,
        pretrained=weights == TIMM_PRETRAINED,
        model_kwargs=dict(model_kwargs) if model_kwargs else None,
    )
    if weights == TIMM_PRETRAINED:
        cfg = backbone.pretrained_cfg
        recorded = {"mean": cfg.get("mean"), "std": cfg.get("std")}
    elif path is not None:
        load_weights(backbone, path, field=field, on_class_mismatch=class_mismatch)
    return backbone, recorded


def _architecture(spec: TeacherSpec, recorded: dict[str, Any], field: str) -> str:
    """``spec.name``, or the architecture the weights record; they must agree."""
    # An exported folder's config.json says "architecture"; a kdzoo run's hparams "student".
    source = "config.json" if "architecture" in recorded else "hyper-parameters"
    stored = recorded.get("architecture") or recorded.get("student")
    stored = stored if isinstance(stored, str) and stored else None
    if spec.name is None:
        if stored is not None:
            return stored
        if spec.weights in (RANDOM_INIT, TIMM_PRETRAINED):
            raise ConfigError(
                f"{field}.weights={spec.weights} needs an architecture: set "
                f"{_option(field, 'name')} to a timm model"
            )
        raise ConfigError(
            f"{field}.name is not set and {spec.weights} does not record its architecture: set "
            f"{_option(field, 'name')} to the timm model the weights were trained with"
        )
    if stored is not None and _untagged(spec.name) != _untagged(stored):
        raise ConfigError(
            f"{field}.name={spec.name!r} but {spec.weights} holds a {stored!r} (its {source} "
            f"say so): remove {field}.name, or set it to {stored!r}"
        )
    return spec.name


def _untagged(name: str) -> str:
    """timm's ``architecture.tag`` -> ``architecture`` (the tag only names pretrained weights)."""
    return name.split(".", 1)[0]


def load_weights(
    backbone: Backbone,
    weights: str,
    *,
    field: str = "teacher",
    on_class_mismatch: Callable[[int], KDZooError] | None = None,
) -> None:
    """Load a weight file (see :func:`~kdzoo.models.weights.load_backbone_state`) into
    ``backbone`` strictly, raising a :class:`WeightsError` that names the mismatch if it does
    not fit (:func:`~kdzoo.models.weights.load_strictly`).

    Args:
        backbone: the network to load into.
        weights: the file.
        field: what the weights are for (``teacher``, ``source``, ...), for the messages.
        on_class_mismatch: the error to raise, given the number of classes the file's
            classifier predicts, when it differs from ``backbone``'s; by default the
            :class:`WeightsError` of the keys that do not fit says both numbers.
    """
    state = load_backbone_state(weights)
    hint = f"Is {field}.name the architecture the file was trained with?"
    file_classes = _classifier_outputs(state, backbone)
    if file_classes is not None and file_classes != backbone.num_classes:
        if on_class_mismatch is not None:
            raise on_class_mismatch(file_classes)
        hint = (
            f"It was trained on {file_classes} classes but the model was built for "
            f"{backbone.num_classes}."
        )
    load_strictly(
        backbone.model,
        state,
        what=f"{field} weights {weights}",
        into=f"timm model {backbone.name!r}",
        hint=hint,
    )


def _classifier_outputs(state: dict[str, torch.Tensor], backbone: Backbone) -> int | None:
    """Number of classes the classifier in ``state`` predicts, if it can be found."""
    head = backbone.model.get_classifier()
    weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    for name, param in backbone.model.named_parameters():
        if param is weight and name in state:
            return state[name].shape[0]
    return None
