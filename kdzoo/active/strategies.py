"""Active-learning selection rules: which unlabelled images to label next.

Pure functions on tensors, the same on every DDP rank. Each returns positions into the pool (the
rows of ``probs`` / ``features``), in the order the rule picks them; ties go to the lowest
position, and the pool is ordered by dataset index (see :mod:`kdzoo.active.pool`), so ties go to
the lowest dataset index.

The rules follow ``strategies.py`` of the official code of "PCoreSet: Effective Active Learning
through Knowledge Distillation from Vision-Language Models" (arXiv:2506.00910,
github.com/erjui/PCoreSet). Every rule reads the student's combined dual-head probability
``p~ = 0.5 softmax(h_ce) + 0.5 softmax(h_kd)`` (the code fixes alpha = 0.5, beta = 1 for
selection, since active learning has no validation set to tune them):

- ``random``: a uniformly random subset (the loop seeds the generator with (seed, round)).
- ``entropy`` (the code's ``uncertainty``): the ``budget`` largest entropies of ``p~``.
- ``coreset``: greedy k-center on L2-normalised penultimate features with the cosine distance
  ``1 - cos``, seeded with the labelled set's features (Sener & Savarese, "Active Learning for
  Convolutional Neural Networks: A Core-Set Approach", ICLR 2018, arXiv:1708.00489).
- ``badge``: gradient embeddings ``(onehot(argmax p~) - p~) (x) feature``, then the code's
  *deterministic* greedy farthest-point selection with the cosine distance, starting from the
  embedding of largest norm and *not* seeded with the labelled set. This is not the k-means++
  *sampling* of BADGE (Ash et al., "Deep Batch Active Learning by Diverse, Uncertain Gradient Lower
  Bounds", ICLR 2020, arXiv:1906.03671). The code L2-normalises the embeddings before taking the
  largest norm, which makes every norm 1 up to float32 rounding (1 +- 1.2e-7), so its first pick
  is decided by rounding: 10 runs of the official code picked 47, 58, 17, 0, 33, 126, 46, 82, 130
  and 106. Every later pick follows from the first, so kdzoo's selection shares only 1 to 6 of 12
  picks with any one official run. kdzoo's documented alternative is deterministic: the first
  centre is the embedding of largest *unnormalised* norm (BADGE's own first centre), which is
  well defined. The cosine distances are computed from the factors of the outer product
  (``<a (x) f, b (x) g> = <a, b> <f, g>``), never materialising the ``C x D`` embeddings.
- ``pcoreset`` (PCoreSet, "probabilistic coreset"): greedy k-center with the Euclidean distance
  between probability vectors ``p~``, whose centres start as the labelled set's *predicted* ``p~``
  (not their one-hot labels); distances exact (``cdist`` without the matrix-product shortcut, in
  float64), in blocks of 1000 pool images x 1000 centres.

With ``budget >= len(pool)`` every rule returns the whole pool (the loop refuses such budgets
before training, see :mod:`kdzoo.active.loop`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError

__all__ = [
    "STRATEGIES",
    "badge_selection",
    "coreset_selection",
    "entropy_selection",
    "kcenter_greedy",
    "pcoreset_selection",
    "random_selection",
    "select",
]

STRATEGIES = ("random", "entropy", "coreset", "badge", "pcoreset")
# Pool rows and centres per distance block, as the code's batches of 1000.
CHUNK = 1000
Metric = Literal["euclidean", "cosine"]


def select(
    strategy: str,
    *,
    budget: int,
    probs: torch.Tensor,
    features: torch.Tensor | None = None,
    labelled_probs: torch.Tensor | None = None,
    labelled_features: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pool positions picked by ``strategy``, in pick order.

    Args:
        strategy: one of :data:`STRATEGIES`.
        budget: how many to pick (>= 1); the whole pool when it is not smaller.
        probs: ``(N, C)`` the student's combined probabilities ``p~`` on the pool.
        features: ``(N, D)`` pooled penultimate features on the pool (``coreset``, ``badge``).
        labelled_probs: ``(L, C)`` ``p~`` on the labelled set (``pcoreset``'s initial centres).
        labelled_features: ``(L, D)`` features of the labelled set (``coreset``'s centres).
        generator: randomness of ``random``.

    Returns:
        ``LongTensor`` of ``min(budget, N)`` distinct positions in ``0..N-1``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}; choose from {STRATEGIES}")
    _check_budget(budget)
    if strategy == "random":
        return random_selection(len(probs), budget, generator)
    if strategy == "entropy":
        return entropy_selection(probs, budget)
    if strategy == "pcoreset":
        centres = _required(labelled_probs, "labelled_probs", strategy)
        return pcoreset_selection(probs, centres, budget)
    features = _required(features, "features", strategy)
    if strategy == "coreset":
        centres = _required(labelled_features, "labelled_features", strategy)
        return coreset_selection(features, centres, budget)
    return badge_selection(probs, features, budget)


def random_selection(n: int, budget: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``min(budget, n)`` distinct positions drawn uniformly from ``0..n-1``."""
    _check_budget(budget)
    return torch.randperm(n, generator=generator)[:budget]


def entropy_selection(probs: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget`` positions of largest entropy ``-sum_c p_c log p_c`` (``0 log 0 = 0``)."""
    _check_budget(budget)
    p = probs.double()
    entropy = -torch.special.xlogy(p, p).sum(dim=1)
    # Stable: equal entropies keep pool order, so ties go to the lowest position.
    return torch.sort(entropy, descending=True, stable=True).indices[:budget]


def pcoreset_selection(
    probs: torch.Tensor, labelled_probs: torch.Tensor, budget: int
) -> torch.Tensor:
    """PCoreSet: greedy k-center in probability space seeded with the labelled set's ``p~``."""
    return kcenter_greedy(probs, labelled_probs, budget, metric="euclidean")[0]


def coreset_selection(
    features: torch.Tensor, labelled_features: torch.Tensor, budget: int
) -> torch.Tensor:
    """Core-set: greedy k-center on L2-normalised features (cosine distance), labelled-seeded."""
    return kcenter_greedy(features, labelled_features, budget, metric="cosine")[0]


def badge_selection(probs: torch.Tensor, features: torch.Tensor, budget: int) -> torch.Tensor:
    """The code's BADGE: greedy farthest points among gradient embeddings (cosine distance).

    The embedding of pool image ``i`` is ``g_i = a_i (x) f_i`` with ``a_i = onehot(argmax p~_i) -
    p~_i`` (the last layer's cross-entropy gradient for the predicted label, up to sign) and
    ``f_i`` its feature. The first pick is the largest ``||g_i|| = ||a_i|| ||f_i||``.
    """
    _check_budget(budget)
    p = probs.double()
    residual = F.one_hot(p.argmax(dim=1), p.shape[1]).double() - p
    f = features.double()
    start = int(torch.argmax(residual.norm(dim=1) * f.norm(dim=1)))
    # cos(g_i, g_j) = cos(a_i, a_j) * cos(f_i, f_j): one cosine-metric point of the concatenated
    # unit factors would be wrong (that adds the cosines), so the distance gets its own product.
    factors = (F.normalize(residual, dim=1), F.normalize(f, dim=1))
    return _greedy(factors, None, budget, _product_cosine_distance, start=start)[0]


def kcenter_greedy(
    points: torch.Tensor,
    centres: torch.Tensor | None,
    budget: int,
    *,
    metric: Metric = "euclidean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center: repeatedly pick the point farthest from every centre, then make it one.

    Args:
        points: ``(N, D)`` candidates.
        centres: ``(M, D)`` initial centres (the labelled set); ``None`` or empty starts from
            position 0.
        budget: picks to make (all ``N`` at most).
        metric: ``"euclidean"`` (exact L2) or ``"cosine"`` (``1 - cos`` of L2-normalised rows).

    Returns:
        ``(picks, distances)``: positions in pick order, and each pick's distance to its nearest
        centre at the time it was picked (non-increasing by construction). A picked point is never
        picked again, even at distance 0 from every remaining one.
    """
    _check_budget(budget)
    points = points.double()
    centres = None if centres is None or len(centres) == 0 else centres.double()
    if metric == "cosine":
        points = F.normalize(points, dim=1)
        centres = None if centres is None else F.normalize(centres, dim=1)
        distance = _cosine_distance
    elif metric == "euclidean":
        distance = _euclidean_distance
    else:
        raise ConfigError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return _greedy((points,), centres, budget, distance, start=0)


def _greedy(points, centres, budget, distance, *, start):
    """Farthest-point selection over ``points`` (a tuple of per-point factor tensors)."""
    n = len(points[0])
    nearest = torch.full((n,), torch.inf, dtype=torch.float64, device=points[0].device)
    if centres is not None:  # blocks of CHUNK x CHUNK distances bound the memory
        for i in range(0, n, CHUNK):
            rows = tuple(factor[i : i + CHUNK] for factor in points)
            for j in range(0, len(centres), CHUNK):
                block = distance(rows, (centres[j : j + CHUNK],)).min(dim=1).values
                nearest[i : i + CHUNK] = torch.minimum(nearest[i : i + CHUNK], block)
    picked = torch.zeros(n, dtype=torch.bool, device=nearest.device)
    picks, distances = [], []
    for step in range(min(budget, n)):
        if step == 0 and centres is None:
            choice = start
        else:
            # argmax returns the first maximum: ties go to the lowest position.
            choice = int(torch.argmax(nearest.masked_fill(picked, -torch.inf)))
        picks.append(choice)
        distances.append(float(nearest[choice]))
        picked[choice] = True
        new_centre = tuple(factor[choice : choice + 1] for factor in points)
        nearest = torch.minimum(nearest, distance(points, new_centre)[:, 0])
    return torch.tensor(picks, dtype=torch.long), torch.tensor(distances, dtype=torch.float64)


def _euclidean_distance(points, centres) -> torch.Tensor:
    # The default cdist switches to ||x||^2 + ||y||^2 - 2xy for large inputs, which cancels
    # catastrophically for nearby probability vectors; the direct form is exact.
    return torch.cdist(points[0], centres[0], compute_mode="donot_use_mm_for_euclid_dist")


def _cosine_distance(points, centres) -> torch.Tensor:
    return 1.0 - points[0] @ centres[0].T


def _product_cosine_distance(points, centres) -> torch.Tensor:
    return 1.0 - (points[0] @ centres[0].T) * (points[1] @ centres[1].T)


def _check_budget(budget: int) -> None:
    if int(budget) != budget or budget < 1:
        raise ConfigError(f"the selection budget must be an integer >= 1, got {budget!r}")


def _required(value: torch.Tensor | None, name: str, strategy: str) -> torch.Tensor:
    if value is None:
        raise ConfigError(f"strategy {strategy!r} needs {name}")
    return value
