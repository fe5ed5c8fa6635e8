"""Benchmark suites that train their students from teacher caches (``teacher_cache: true``).

``kdzoo bench run`` builds one cache per teacher run (and per data setting its students use),
under ``<out>/caches/``, the first time a student of that teacher needs it, and trains every
student of that teacher from it. Each cache holds every output the teacher can give (a timm
classifier: every output a method can read, so the KD, ND and TGeo-KD students of one teacher
share it; a cross-modal teacher: its logits).
"""

from __future__ import annotations

from itertools import count
from pathlib import Path

from kdzoo.cache.build import build_cache, teacher_adapter
from kdzoo.cache.store import CacheOccupiedError

__all__ = ["cached_teacher_args"]


def cached_teacher_args(
    fit_args: list[str], caches: Path, teacher_run: str, *, dtype: str = "float16"
) -> list[str]:
    """The options that train the run ``fit_args`` (``["fit", ...]``, with the teacher's weights
    and ``augment_seed``) from a cache of its teacher (values in ``dtype``), built under
    ``caches/<teacher_run>`` (or ``<teacher_run>-2``, ... when a student with other data needs
    another one) unless there."""
    from kdzoo.cache.cli import trainer_options
    from kdzoo.lightning_cli import KDCLI

    cli = KDCLI(args=fit_args[1:], run=False)
    for n in count(1):
        directory = caches / (teacher_run if n == 1 else f"{teacher_run}-{n}")
        try:
            build_cache(
                cli.model,
                cli.datamodule,
                directory,
                epochs=cli.trainer.max_epochs,
                trainer_options=trainer_options(cli),
                outputs=teacher_adapter(cli.model).outputs,
                dtype=dtype,
            )
        except CacheOccupiedError:
            continue
        return [f"--model.init_args.teacher.cache={directory}"]
    raise AssertionError("unreachable")
