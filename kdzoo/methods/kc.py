"""Knowledge Concentration (KC): specialist teachers distilled into one generalist student.

Gao, Guo, Li, Nevatia. "Knowledge Concentration: Learning 100K Object Classifiers in a Single
CNN". arXiv:1711.07607, 2017. No official code exists and the full text was not available: this
follows the kdzoo spec (``specs/classification.md``, section 5), reconstructed from the abstract
and a third-party summary.

The classes are split into verticals (label subsets); one specialist per vertical is trained on
that vertical alone with sigmoid cross-entropy (``kdzoo fit --model Supervised
--model.loss sigmoid --data.classes [...]``). The generalist student predicts all classes through
a structurally connected head (:class:`~kdzoo.models.sc_head.SCHead`, the paper's FC-SC variant
with the learnable per-vertical logit scale, "self-paced learning") and learns from the
specialist of each image's label vertical (:func:`~kdzoo.losses.functional.kc.concentration_targets`
and :func:`~kdzoo.losses.functional.kc.concentration_loss`).

Choices where the sources are silent: no hard-label term by default (``label_weight=0``); no
temperature; labels are single-class here, so each image has exactly one vertical (the paper's
multi-label case, images spanning several verticals, does not arise).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.kc import concentration_loss, concentration_targets
from kdzoo.methods.base import ClassificationModule
from kdzoo.methods.module import Deployable
from kdzoo.models.sc_head import SCHead
from kdzoo.models.teacher import TeacherSpec, build_teacher, missing_weights_error
from kdzoo.models.weights import WeightsError, safe_torch_load
from kdzoo.validation import check_at_least, check_non_negative

__all__ = ["KnowledgeConcentration"]


class KnowledgeConcentration(ClassificationModule):
    """A generalist student distilled from one frozen specialist teacher per vertical.

    For each training image, the specialist of its label's vertical gives sigmoid probabilities
    over that vertical; they are placed at the global class positions, cut to the top ``top_k``
    and zero elsewhere, and the student fits them with per-class sigmoid cross-entropy (loss
    term ``"kc"``, weight 1). With ``label_weight > 0`` a sigmoid cross-entropy against the
    one-hot label is added (term ``"label"``).

    The student's timm classifier is replaced by an :class:`~kdzoo.models.sc_head.SCHead`, so
    ``self.student(x).logits``, ``forward`` and exported students all go through it, and the
    embedding stays timm's pooled feature. The specialists are ``self.teacher``, an
    ``nn.ModuleList`` of frozen teachers (:class:`~kdzoo.models.teacher.Teacher`), each in eval
    mode for ever, kept out of checkpoints and rebuilt from ``specialists`` on load.

    Args:
        specialists: one teacher per vertical, in the order of ``verticals``. Their
            ``num_classes`` is the vertical's size (leave it unset). A specialist checkpoint
            trained with ``--data.classes`` must have used exactly its vertical, in order.
        verticals: the global class indices of each specialist's vertical, in the order of that
            specialist's outputs; together they must contain every class exactly once.
        top_k: keep each specialist's ``K`` most probable classes (paper: 100 of 100K);
            ``None`` keeps the whole vertical.
        label_weight: weight of the optional hard-label sigmoid cross-entropy (the sources do not
            say whether the paper mixes one in; 0 = distillation only).
        head: ``"sc"``: FC(s1)-SC(s2) (the paper's best); ``"fc"``: FC(s1)-FC(s2) baseline.
        hidden: ``[s1, s2]``, the widths of the head's two hidden layers.
        scale: the logit scale layer, see :class:`~kdzoo.models.sc_head.SCHead`; ``"vertical"``
            (learnable per vertical, initialised at ``sqrt(N_m)``) is the paper's best.
        **kwargs: see :class:`~kdzoo.methods.base.ClassificationModule`.
    """

    citation = (
        'Gao, Guo, Li, Nevatia. "Knowledge Concentration: Learning 100K Object Classifiers in a '
        'Single CNN". arXiv:1711.07607, 2017'
    )
    description = "many specialist teachers into one student"

    def __init__(
        self,
        specialists: list[TeacherSpec],
        verticals: list[list[int]],
        top_k: int | None = None,
        label_weight: float = 0.0,
        head: Literal["sc", "fc"] = "sc",
        hidden: tuple[int, int] = (256, 64),
        scale: Literal["vertical", "class", "fixed", "none"] = "vertical",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        hp = self.hparams
        num_classes = hp.num_classes
        specs = [TeacherSpec(**s) if isinstance(s, Mapping) else s for s in specialists]
        verticals = [[int(c) for c in vertical] for vertical in verticals]
        _check_partition(verticals, num_classes)
        if len(specs) != len(verticals):
            raise ConfigError(
                f"KnowledgeConcentration needs one specialist per vertical: got "
                f"{len(specs)} specialists and {len(verticals)} verticals"
            )
        check_at_least(1, top_k=top_k)
        check_non_negative(label_weight=label_weight)
        # Plain data in the checkpoint, so `torch.load(weights_only=True)` can read it back.
        hp.specialists = [asdict(spec) for spec in specs]
        hp.verticals = verticals
        hp.hidden = [int(h) for h in hidden]

        teachers = []
        for m, (spec, vertical) in enumerate(zip(specs, verticals, strict=True)):
            _check_specialist(m, spec, vertical)
            try:
                teacher = build_teacher(
                    spec,
                    num_classes=len(vertical),
                    in_chans=hp.in_chans,
                    student_mean=self.mean,
                    student_std=self.std,
                    field=f"specialists[{m}]",
                    requirement=f"specialists[{m}] must predict the classes of verticals[{m}]",
                    label_space=f"verticals[{m}]",
                )
            except WeightsError as err:  # say which specialist, and what it must predict
                raise WeightsError(
                    f"specialists[{m}] for verticals[{m}]={vertical}: {err}"
                ) from err
            # With the architecture read from the weights when the name was left out.
            hp.specialists[m]["name"] = teacher.backbone.name
            teachers.append(teacher)
        # Each element is a Teacher (eval for ever, never checkpointed); the list holds no more.
        self.teacher = nn.ModuleList(teachers)
        _install_sc_head(self.student.model, hp)

        self.top_k = top_k
        self.loss_weights = {"kc": 1.0, "label": label_weight}
        vertical_of_class = torch.empty(num_classes, dtype=torch.long)
        for m, vertical in enumerate(verticals):
            vertical_of_class[vertical] = m
        # Derived from the config, so not persistent (and not in checkpoints).
        self.register_buffer("vertical_of_class", vertical_of_class, persistent=False)
        self.register_buffer(
            "class_order", torch.tensor([c for v in verticals for c in v]), persistent=False
        )
        self.vertical_sizes = [len(v) for v in verticals]

    @classmethod
    def deployable(cls, hparams: Mapping[str, Any]) -> Deployable:
        timm_student = super().deployable(hparams)
        network = timm_student.network
        _install_sc_head(network, hparams)
        reason = (
            f"a timm {timm_student.architecture} whose classifier is KC's FC-SC head "
            "(kdzoo.models.SCHead), returning class logits"
        )
        return Deployable(
            network,
            prefix="student.model.",
            model_args=timm_student.model_args,
            reason=reason,
            backbone=timm_student.architecture.split(".")[0],
        )

    def result_names(self) -> dict[str, str]:
        specialists = " + ".join(spec["name"] for spec in self.hparams.specialists)
        return {"student": self.hparams.student, "teacher": specialists}

    def soft_targets(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` soft targets: each image's label specialist, top-K, zero elsewhere."""
        n, num_classes = len(target), self.hparams.num_classes
        vertical = self.vertical_of_class[target]
        probs = torch.zeros(n, num_classes, device=images.device)
        columns = self.class_order.split(self.vertical_sizes)
        for m, teacher in enumerate(self.teacher):
            rows = (vertical == m).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            teacher_probs = teacher(images[rows]).logits.float().sigmoid()
            probs[rows[:, None], columns[m][None, :]] = teacher_probs
        vertical_mask = self.vertical_of_class[None, :] == vertical[:, None]
        return concentration_targets(probs, vertical_mask, top_k=self.top_k)

    def loss_terms(self, batch: Any) -> dict[str, torch.Tensor]:
        images, target = batch[0], batch[1]
        logits = self.student(images).logits
        terms = {"kc": concentration_loss(logits, self.soft_targets(images, target))}
        if self.loss_weights["label"]:
            one_hot = F.one_hot(target, logits.shape[1])
            terms["label"] = concentration_loss(logits, one_hot)
        return terms


def _check_partition(verticals: Sequence[Sequence[int]], num_classes: int) -> None:
    """Every class in ``0..num_classes-1`` in exactly one non-empty vertical, else ConfigError."""
    flat = [c for vertical in verticals for c in vertical]
    out_of_range = sorted({c for c in flat if not 0 <= c < num_classes})
    duplicated = sorted(c for c, count in Counter(flat).items() if count > 1)
    missing = sorted(set(range(num_classes)) - set(flat))
    empty = [m for m, vertical in enumerate(verticals) if not vertical]
    problems = []
    if out_of_range:
        problems.append(f"classes out of range {out_of_range}")
    if duplicated:
        problems.append(f"classes in more than one vertical {duplicated}")
    if missing:
        problems.append(f"classes in no vertical {missing}")
    if empty:
        problems.append(f"empty verticals at positions {empty}")
    if not verticals or problems:
        raise ConfigError(
            f"KnowledgeConcentration verticals must partition the {num_classes} classes "
            f"0..{num_classes - 1} (each class in exactly one vertical), got {list(verticals)}: "
            f"{'; '.join(problems) or 'no vertical given'}. Fix verticals (and the specialists "
            "trained on them) so that each class appears once"
        )


def _check_specialist(m: int, spec: TeacherSpec, vertical: list[int]) -> None:
    """The specialist's class count, and the classes its checkpoint was trained on, fit."""
    if spec.num_classes is not None and spec.num_classes != len(vertical):
        raise ConfigError(
            f"specialists[{m}].num_classes={spec.num_classes} but verticals[{m}] has "
            f"{len(vertical)} classes {vertical}: remove specialists[{m}].num_classes"
        )
    if spec.weights is None:
        raise missing_weights_error(f"specialists[{m}]", spec.name)
    if not str(spec.weights).endswith(".ckpt"):
        return
    # A kdzoo run saves its datamodule's arguments: a specialist trained with --data.classes
    # has outputs in that order, which must be the vertical's order.
    checkpoint = safe_torch_load(spec.weights)
    data = (
        checkpoint.get("datamodule_hyper_parameters") if isinstance(checkpoint, Mapping) else None
    )
    trained_on = data.get("classes") if isinstance(data, Mapping) else None
    if trained_on is not None and [int(c) for c in trained_on] != vertical:
        raise ConfigError(
            f"specialists[{m}] ({spec.weights}) was trained on classes {list(trained_on)} "
            f"(--data.classes), but verticals[{m}] is {vertical}: list the vertical's classes "
            "in the order the specialist was trained with"
        )


def _install_sc_head(model: nn.Module, hp: Mapping[str, Any]) -> None:
    """Replace the timm model's classifier by the SC head the hyper-parameters describe."""
    width = getattr(model, "head_hidden_size", None) or model.num_features
    in_features = getattr(model.get_classifier(), "in_features", width)
    verticals, hidden = hp["verticals"], hp["hidden"]
    head = SCHead(in_features, verticals, hidden, structure=hp["head"], scale=hp["scale"])
    _install_classifier(model, head)


def _install_classifier(model: nn.Module, head: nn.Module) -> None:
    """Make ``head`` the timm model's classifier, so every forward pass goes through it."""
    # timm names the classifier module in its pretrained config ("fc", "head.fc", "classifier").
    path = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(path, str):
        model.set_submodule(path, head)
    if not isinstance(path, str) or model.get_classifier() is not head:
        raise ConfigError(
            f"cannot replace the classifier of timm model {type(model).__name__} by the SC head "
            f"(pretrained_cfg['classifier'] = {path!r}): pick a student with a single classifier "
            "module, e.g. a ResNet or EfficientNet"
        )
