"""Loss weights renamed to ``<term>_weight``: an old name from Python (or from an old config or
checkpoint) raises a ConfigError that names the new one, and every declared rename points from a
name the class no longer takes to one it does."""

from __future__ import annotations

import inspect

import pytest
import torch

import kdzoo.methods
from kdzoo.errors import ConfigError
from kdzoo.methods import PSMT, RMT, MSTDistill
from kdzoo.methods.module import KDZooModule
from kdzoo.models.teacher import TeacherSpec

SOURCE = {"source": TeacherSpec("test_resnet", weights="random"), "num_classes": 10, "in_chans": 1}
# Without source data: no prototypes, warm-up, replay or source Fisher.
RMT_ARGS = {**SOURCE, "cont_weight": 0.0, "src_weight": 0.0, "warmup_samples": 0}
PSMT_ARGS = {**SOURCE, "fisher_weight": 0.0}
PAIRED = {
    "encoders": [{"kind": "mlp", "hidden": [16]}, {"kind": "conv1d", "channels": [8]}],
    "num_classes": 3,
    "modality_shapes": [(10,), (2, 20)],
    "head_hidden": [12, 6],
}

RENAMES = [
    (RMT, RMT_ARGS, "lambda_st", "st_weight"),
    (RMT, RMT_ARGS, "lambda_cont", "cont_weight"),
    (RMT, RMT_ARGS, "lambda_src", "src_weight"),
    (PSMT, PSMT_ARGS, "lambda_fisher", "fisher_weight"),
    (MSTDistill, PAIRED, "w_task", "task_weight"),
    (MSTDistill, PAIRED, "w_kl", "kl_weight"),
    (MSTDistill, PAIRED, "w_lb", "lb_weight"),
]


@pytest.mark.parametrize(("cls", "required", "old", "new"), RENAMES)
def test_an_old_weight_name_raises_naming_the_new_one(cls, required, old, new) -> None:
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: {old} is now {new}"):
        cls(**required, **{old: 0.0})


@pytest.mark.parametrize(("cls", "required", "old", "new"), RENAMES)
def test_the_new_weight_name_is_used(cls, required, old, new) -> None:
    torch.manual_seed(0)
    module = cls(**{**required, new: 0.0})
    assert module.hparams[new] == 0.0
    assert old not in module.hparams


def _method_classes() -> list[type]:
    classes = (getattr(kdzoo.methods, name) for name in kdzoo.methods.__all__)
    return [c for c in classes if isinstance(c, type) and issubclass(c, KDZooModule)]


@pytest.mark.parametrize("cls", [c for c in _method_classes() if c.renamed_arguments])
def test_declared_renames_point_from_a_gone_name_to_a_taken_one(cls) -> None:
    taken = {
        name
        for klass in cls.__mro__
        if klass.__dict__.get("__init__") is not None
        for name in inspect.signature(klass.__init__).parameters
    }
    for old, new in cls.renamed_arguments.items():
        assert old not in taken, f"{cls.__name__} still takes {old}"
        assert new in taken, f"{cls.__name__} renames {old} to {new}, which it does not take"
