"""Every method that can read a teacher cache declares what it reads, and the error message that
lists the readers is right."""

from __future__ import annotations

import inspect

import kdzoo.methods as methods
from kdzoo.cache.build import OUTPUTS
from kdzoo.methods.base import DistillationModule
from kdzoo.models.teacher import CACHE_READERS


def distillation_methods() -> list[type]:
    return [
        cls
        for name in methods.__all__
        if inspect.isclass(cls := getattr(methods, name))
        and issubclass(cls, DistillationModule)
        and not inspect.isabstract(cls)
    ]


def test_readers_are_the_distillation_modules():
    assert sorted(cls.__name__ for cls in distillation_methods()) == sorted(CACHE_READERS)


def test_declared_teacher_outputs_can_be_cached():
    for cls in distillation_methods():
        assert "logits" in cls.teacher_outputs, cls.__name__
        assert set(cls.teacher_outputs) <= set(OUTPUTS), cls.__name__
