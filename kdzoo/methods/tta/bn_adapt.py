"""``BNAdapt``: normalise with the test batch's BatchNorm statistics, no parameter update.

Schneider et al. "Improving robustness against common corruptions by covariate shift adaptation".
NeurIPS 2020, arXiv:2006.16971; Nado et al. "Evaluating Prediction-Time Batch Normalization for
Robustness under Covariate Shift", arXiv:2006.10963. The benchmark's ``norm_test`` method.
"""

from __future__ import annotations

from typing import Any, Literal

from kdzoo.methods.tta.source import Source

__all__ = ["BNAdapt"]


class BNAdapt(Source):
    """:class:`Source` with every BatchNorm using the statistics of the current test batch;
    nothing is trained.

    Args:
        batch_norm: ``"batch"`` (the method); ``"source"`` would be :class:`Source`.
        **kwargs: see :class:`~kdzoo.methods.tta.base.TTAModule`.
    """

    citation = (
        'Schneider et al. "Improving robustness against common corruptions by covariate shift '
        'adaptation". NeurIPS 2020, arXiv:2006.16971'
    )
    description = "test-batch BatchNorm statistics"

    def __init__(self, batch_norm: Literal["batch", "source"] = "batch", **kwargs: Any) -> None:
        super().__init__(batch_norm=batch_norm, **kwargs)
