"""Active learning with knowledge distillation: ActiveKD and its PCoreSet selection rule.

"PCoreSet: Effective Active Learning through Knowledge Distillation from Vision-Language Models"
(arXiv:2506.00910; code github.com/erjui/PCoreSet). A student (typically
:class:`~kdzoo.methods.DualHeadDistillation`) is trained from scratch every round on a growing
labelled set plus the unlabelled pool, distilling a frozen teacher; after each round a selection
rule (:mod:`kdzoo.active.strategies`) picks the pool images whose labels are revealed next.
``kdzoo active run -c CONFIG --out DIR`` runs the loop (:func:`run_active`).
"""

from importlib import import_module
from typing import Any

# Where each name lives. Loaded when first asked for, so that reading results (``report``, the
# results converter) does not import Lightning, and ``run_active`` (the loop imports the whole
# CLI: every method and datamodule) not before it is used.
_WHERE = {
    "ActiveDataModule": "data",
    "IndexedDataset": "data",
    "initial_labelled": "data",
    "PoolOutputs": "pool",
    "merge_shards": "pool",
    "predict_pool": "pool",
    "STRATEGIES": "strategies",
    "kcenter_greedy": "strategies",
    "select": "strategies",
    "run_active": "loop",
}

__all__ = [
    "STRATEGIES",
    "ActiveDataModule",
    "IndexedDataset",
    "PoolOutputs",
    "initial_labelled",
    "kcenter_greedy",
    "merge_shards",
    "predict_pool",
    "run_active",
    "select",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"kdzoo.active.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
