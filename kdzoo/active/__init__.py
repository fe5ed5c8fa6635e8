"""Active learning with knowledge distillation: ActiveKD and its PCoreSet selection rule.

"PCoreSet: Effective Active Learning through Knowledge Distillation from Vision-Language Models"
(arXiv:2506.00910; code github.com/erjui/PCoreSet). A student (typically
:class:`~kdzoo.methods.DualHeadDistillation`) is trained from scratch every round on a growing
labelled set plus the unlabelled pool, distilling a frozen teacher; after each round a selection
rule (:mod:`kdzoo.active.strategies`) picks the pool images whose labels are revealed next.
``kdzoo active run -c CONFIG --out DIR`` runs the loop (:func:`run_active`).
"""

from kdzoo.active.data import ActiveDataModule, IndexedDataset, initial_labelled
from kdzoo.active.pool import PoolOutputs, merge_shards, predict_pool
from kdzoo.active.strategies import STRATEGIES, kcenter_greedy, select

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


def __getattr__(name: str):
    # The loop imports the whole CLI (every method and datamodule); load it only when asked.
    if name == "run_active":
        from kdzoo.active.loop import run_active

        return run_active
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
