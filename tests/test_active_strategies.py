"""Reference tests for the active-learning selection rules of :mod:`kdzoo.active.strategies`.

PCoreSet (Kang et al., "PCoreSet: Effective Active Learning through Knowledge Distillation from
Vision-Language Models", arXiv:2506.00910; code github.com/erjui/PCoreSet, ``strategies.py``).
The spec's oracles (§2.9, 1-3) are checked exactly; the rules are compared with brute-force
references written from their definitions in float64 numpy (every distance recomputed from
scratch at every step, no incremental minimum, no factorisation), never by calling kdzoo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdzoo.active.strategies import STRATEGIES, kcenter_greedy, select
from kdzoo.errors import ConfigError

SQRT2 = math.sqrt(2.0)


def random_probs(n: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=gen) * 2.0).softmax(dim=1)


def random_features(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- references -----------------------------------------------------------------------------


def greedy_reference(dist: np.ndarray, centre_dist: np.ndarray | None, budget: int, start=None):
    """Max-min greedy from a full pool x pool distance matrix ``dist`` and pool x labelled
    ``centre_dist``: at every step, recompute each unpicked point's distance to its nearest
    centre (labelled or picked) and take the first maximum."""
    n = len(dist)
    picks: list[int] = []
    distances: list[float] = []
    for _ in range(min(budget, n)):
        best, best_value = None, -np.inf
        for i in range(n):
            if i in picks:
                continue
            candidates = [dist[i, j] for j in picks]
            if centre_dist is not None:
                candidates += list(centre_dist[i])
            value = min(candidates) if candidates else np.inf
            if value > best_value:  # strict: ties keep the lowest index
                best, best_value = i, value
        if not picks and centre_dist is None and start is not None:
            best, best_value = start, np.inf
        picks.append(best)
        distances.append(best_value)
    return picks, distances


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - a @ b.T


# ---- oracle 1: the toy picks ------------------------------------------------------------------

# float64, so that 0.9 and 0.1 are the decimals the expected distances are computed from.
LABELLED = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
POOL = torch.tensor(
    [[0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.1, 0.9]], dtype=torch.float64
)


def test_oracle_toy_picks_and_distances() -> None:
    picks, distances = kcenter_greedy(POOL, LABELLED, 3)
    assert picks.tolist() == [1, 3, 2]
    expected = [SQRT2, math.sqrt(0.81 + 0.81), math.sqrt(0.16 + 0.16)]
    assert distances.tolist() == pytest.approx(expected, abs=1e-12)
    assert distances.tolist() == pytest.approx([1.414214, 1.272792, 0.565685], abs=1e-6)
    chosen = select("pcoreset", budget=3, probs=POOL, labelled_probs=LABELLED)
    assert chosen.dtype == torch.long and chosen.tolist() == [1, 3, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcoreset_matches_brute_force_and_distances_never_increase(seed: int) -> None:
    pool, labelled = random_probs(60, 5, seed), random_probs(7, 5, seed + 100)
    picks, distances = kcenter_greedy(pool, labelled, 25)
    p, q = pool.double().numpy(), labelled.double().numpy()
    ref_picks, ref_distances = greedy_reference(euclidean(p, p), euclidean(p, q), 25)
    assert picks.tolist() == ref_picks
    np.testing.assert_allclose(distances.numpy(), ref_distances, atol=1e-12)
    assert len(set(picks.tolist())) == len(picks)
    assert all(a >= b for a, b in zip(distances.tolist(), distances.tolist()[1:], strict=False))
    assert max(distances.tolist()) <= SQRT2 + 1e-12  # ||p - q||_2 <= sqrt(2) on the simplex


def test_pcoreset_never_picks_twice_even_at_distance_zero() -> None:
    # Three copies of the labelled prediction and two copies of one other point: after the
    # first pick every remaining distance is 0, and the picks must still be distinct.
    pool = torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 2)
    picks, distances = kcenter_greedy(pool, LABELLED, 5)
    assert picks.tolist() == [3, 0, 1, 2, 4]  # then ties in index order
    assert distances.tolist() == pytest.approx([SQRT2, 0, 0, 0, 0])


def test_pcoreset_in_chunks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdzoo.active.strategies as strategies

    pool, labelled = random_probs(50, 4, 7), random_probs(23, 4, 8)
    whole = kcenter_greedy(pool, labelled, 10)
    monkeypatch.setattr(strategies, "CHUNK", 6)
    chunked = kcenter_greedy(pool, labelled, 10)
    assert whole[0].tolist() == chunked[0].tolist()
    torch.testing.assert_close(whole[1], chunked[1], rtol=0, atol=0)


# ---- oracle 2: one-hot pools cover the uncovered classes first -------------------------------


@pytest.mark.parametrize("covered", [[0], [1, 3], [0, 2, 4, 5]])
def test_one_hot_pool_covers_uncovered_classes_first(covered: list[int]) -> None:
    c = 6
    classes = torch.tensor([3, 0, 1, 3, 5, 2, 4, 1, 0, 5, 2, 4, 4])  # every class, repeated
    pool = torch.eye(c)[classes]
    labelled = torch.eye(c)[covered]
    uncovered = sorted(set(range(c)) - set(covered))
    picks, distances = kcenter_greedy(pool, labelled, len(classes))
    first = picks[: len(uncovered)]
    assert sorted(classes[first].tolist()) == uncovered  # one image of each uncovered class
    assert distances[: len(uncovered)].tolist() == pytest.approx([SQRT2] * len(uncovered))
    assert distances[len(uncovered) :].tolist() == pytest.approx(
        [0.0] * (len(classes) - len(uncovered))
    )


# ---- oracle 3: whole pool for large budgets; class order does not matter ---------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", [9, 10, 50])
def test_budget_at_least_the_pool_returns_all_of_it(strategy: str, budget: int) -> None:
    n = 9
    chosen = select(
        strategy,
        budget=budget,
        probs=random_probs(n, 4, 1),
        features=random_features(n, 6, 2),
        labelled_probs=random_probs(3, 4, 3),
        labelled_features=random_features(3, 6, 4),
        generator=torch.Generator().manual_seed(0),
    )
    assert sorted(chosen.tolist()) == list(range(n))


@pytest.mark.parametrize("strategy", ["pcoreset", "entropy", "badge"])
def test_permuting_the_class_order_changes_nothing(strategy: str) -> None:
    probs, labelled = random_probs(40, 6, 11), random_probs(5, 6, 12)
    features = random_features(40, 8, 13)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    picks = [
        select(strategy, budget=12, probs=p, features=features, labelled_probs=q).tolist()
        for p, q in ((probs, labelled), (probs[:, perm], labelled[:, perm]))
    ]
    assert picks[0] == picks[1]


# ---- the baselines --------------------------------------------------------------------------


def test_entropy_takes_the_largest_entropies_ties_lowest_index_first() -> None:
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5], [0.8, 0.1, 0.1]]
    )
    # entropies: ln 2, 0, ln 3, ln 2, -(0.8 ln 0.8 + 0.2 ln 0.1) = 0.639
    assert select("entropy", budget=4, probs=probs).tolist() == [2, 0, 3, 4]


def test_entropy_matches_reference() -> None:
    probs = random_probs(200, 10, 5)
    p = probs.double().numpy()
    entropy = -(p * np.log(p)).sum(axis=1)
    expected = np.argsort(-entropy, kind="stable")[:17]
    assert select("entropy", budget=17, probs=probs).tolist() == expected.tolist()


@pytest.mark.parametrize("seed", [0, 3])
def test_coreset_matches_cosine_brute_force(seed: int) -> None:
    features, labelled = random_features(50, 8, seed), random_features(6, 8, seed + 1)
    # Scaling a feature must not matter: the distance is the cosine one.
    scaled = features * torch.linspace(0.1, 10.0, 50)[:, None]
    picks = select("coreset", budget=15, probs=random_probs(50, 3, 0), features=scaled,
                   labelled_features=labelled)  # fmt: skip
    f, q = features.double().numpy(), labelled.double().numpy()
    ref_picks, _ = greedy_reference(cosine_distance(f, f), cosine_distance(f, q), 15)
    assert picks.tolist() == ref_picks


def test_coreset_first_pick_is_least_similar_to_the_labelled_set() -> None:
    labelled = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.1], [-1.0, -1.0], [0.2, 1.0], [-1.0, 0.05]])
    picks = select("coreset", budget=1, probs=random_probs(4, 2, 0), features=features,
                   labelled_features=labelled)  # fmt: skip
    assert picks.tolist() == [1]  # the opposite direction: cosine distance 1 + 1/sqrt(2)


def badge_reference(probs: torch.Tensor, features: torch.Tensor, budget: int) -> list[int]:
    """Materialised gradient embeddings, L2-normalised, greedy max-min cosine distance from the
    embedding of largest (unnormalised) norm."""
    p, f = probs.double().numpy(), features.double().numpy()
    onehot = np.eye(p.shape[1])[p.argmax(axis=1)]
    g = ((onehot - p)[:, :, None] * f[:, None, :]).reshape(len(p), -1)
    start = int(np.argmax(np.linalg.norm(g, axis=1)))
    return greedy_reference(cosine_distance(g, g), None, budget, start=start)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_badge_matches_materialised_embeddings(seed: int) -> None:
    probs, features = random_probs(45, 5, seed), random_features(45, 7, seed + 10)
    picks = select("badge", budget=12, probs=probs, features=features)
    assert picks.tolist() == badge_reference(probs, features, 12)


def test_badge_is_not_seeded_with_the_labelled_set() -> None:
    probs, features = random_probs(30, 4, 2), random_features(30, 5, 3)
    alone = select("badge", budget=6, probs=probs, features=features)
    seeded = select("badge", budget=6, probs=probs, features=features,
                    labelled_probs=probs[:3], labelled_features=features[:3])  # fmt: skip
    assert alone.tolist() == seeded.tolist()


def test_random_is_a_seeded_subset() -> None:
    probs = random_probs(100, 3, 0)
    draw = lambda s: select("random", budget=20, probs=probs,  # noqa: E731
                            generator=torch.Generator().manual_seed(s)).tolist()  # fmt: skip
    first = draw(0)
    assert first == draw(0) and first != draw(1)
    assert len(set(first)) == 20 and all(0 <= i < 100 for i in first)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -3, 2.5])
def test_bad_budget_is_a_config_error(budget) -> None:
    with pytest.raises(ConfigError, match="budget"):
        select("entropy", budget=budget, probs=random_probs(5, 2, 0))


def test_unknown_strategy_and_missing_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown selection strategy 'kmeans'"):
        select("kmeans", budget=1, probs=random_probs(5, 2, 0))
    with pytest.raises(ConfigError, match="labelled_probs"):
        select("pcoreset", budget=1, probs=random_probs(5, 2, 0))
    with pytest.raises(ConfigError, match="features"):
        select("coreset", budget=1, probs=random_probs(5, 2, 0))
