"""Every method that can read a teacher cache declares what it reads, and the error message that
lists the readers is right."""

from __future__ import annotations

import inspect

import kdzoo.methods as methods
from kdzoo.cache.build import OUTPUTS
from kdzoo.models.teacher import CACHE_READERS


def cache_readers() -> list[type]:
    """The methods a cache can be built for (they give a ``cache_adapter``): the distillation
    modules and CrossModalKD."""
    return [
        cls
        for name in methods.__all__
        if inspect.isclass(cls := getattr(methods, name))
        and callable(getattr(cls, "cache_adapter", None))
        and not inspect.isabstract(cls)
    ]


def test_readers_are_the_methods_with_a_cache_adapter():
    assert sorted(cls.__name__ for cls in cache_readers()) == sorted(CACHE_READERS)


def test_declared_teacher_outputs_can_be_cached():
    for cls in cache_readers():
        assert "logits" in cls.teacher_outputs, cls.__name__
        assert set(cls.teacher_outputs) <= set(OUTPUTS), cls.__name__
