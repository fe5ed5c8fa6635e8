"""Reference tests for :func:`kdzoo.losses.functional.symmetric_cross_entropy` (RMT/PSMT's SCE).

An independent float64 numpy implementation written from the formula of kdzoo spec ``tta.md``
section 4.3 (``SCE(a, b) = 0.5 CE(softmax b -> a) + 0.5 CE(softmax a -> b)``, batch mean), and the
numerical oracles 1-2 of spec section 9: ``SCE(z, z) = H(softmax z)``, symmetry,
``SCE(a, b) >= (H(a) + H(b)) / 2`` with equality iff the distributions agree, and the non-zero
gradient ``0.5 p (-log p - H)`` at identical logits, where plain CE has a zero gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdzoo.losses.functional import soft_cross_entropy, softmax_entropy, symmetric_cross_entropy


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_cross_entropy(target_probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row ``-sum_c q_c log softmax(z)_c``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(target_probs * log_p).sum(axis=1)


def reference_sce_rows(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    return 0.5 * np_cross_entropy(np_softmax(t), s) + 0.5 * np_cross_entropy(np_softmax(s), t)


def np_entropy(z: np.ndarray) -> np.ndarray:
    return np_cross_entropy(np_softmax(z.astype(np.float64)), z.astype(np.float64))


def logits(n: int, c: int, seed: int, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "c", "scale"), [(7, 10, 3.0), (5, 100, 1.0), (3, 4, 20.0)])
def test_matches_reference(dtype: torch.dtype, n: int, c: int, scale: float) -> None:
    s, t = logits(n, c, 0, scale, dtype), logits(n, c, 1, scale, dtype)
    got = symmetric_cross_entropy(s, t)
    assert got.dtype == dtype and got.ndim == 0
    want = reference_sce_rows(s.double().numpy(), t.double().numpy()).mean()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert math.isclose(got.item(), want, rel_tol=tol, abs_tol=tol)


def test_half_precision_is_computed_in_float32() -> None:
    s, t = logits(4, 10, 0, dtype=torch.float16), logits(4, 10, 1, dtype=torch.float16)
    got = symmetric_cross_entropy(s, t)
    assert got.dtype == torch.float32
    want = reference_sce_rows(s.double().numpy(), t.double().numpy()).mean()
    assert math.isclose(got.item(), want, rel_tol=1e-5)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        symmetric_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- spec 9, oracle 1 ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_of_identical_logits_is_the_entropy(dtype: torch.dtype) -> None:
    z = logits(6, 10, 2, dtype=dtype)
    entropy = np_entropy(z.double().numpy()).mean()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert math.isclose(symmetric_cross_entropy(z, z).item(), entropy, rel_tol=tol)
    assert math.isclose(softmax_entropy(z).item(), entropy, rel_tol=tol)
    # The unweighted two-sided sum CE(p -> q) + CE(q -> p) is 2H at p = q.
    two_sided = np_cross_entropy(np_softmax(z.double().numpy()), z.double().numpy()) * 2
    assert math.isclose(two_sided.mean(), 2 * entropy, rel_tol=1e-12)
    # Shifting logits leaves the distribution, hence SCE, unchanged.
    assert math.isclose(symmetric_cross_entropy(z, z + 5.0).item(), entropy, rel_tol=tol)


def test_symmetric() -> None:
    a, b = logits(8, 10, 3, dtype=torch.float64), logits(8, 10, 4, dtype=torch.float64)
    torch.testing.assert_close(
        symmetric_cross_entropy(a, b), symmetric_cross_entropy(b, a), rtol=1e-14, atol=0
    )


def test_bounded_below_by_mean_entropy_with_equality_iff_equal() -> None:
    a, b = logits(50, 10, 5, dtype=torch.float64), logits(50, 10, 6, dtype=torch.float64)
    for i in range(len(a)):
        sce = symmetric_cross_entropy(a[i : i + 1], b[i : i + 1]).item()
        bound = 0.5 * (np_entropy(a[i : i + 1].numpy()) + np_entropy(b[i : i + 1].numpy()))[0]
        # SCE - bound = (KL(p_a||p_b) + KL(p_b||p_a)) / 2 > 0 for distinct distributions.
        assert sce > bound + 1e-9
    equal = symmetric_cross_entropy(a, a - 2.0).item()
    bound = 0.5 * (np_entropy(a.numpy()) + np_entropy((a - 2.0).numpy())).mean()
    assert math.isclose(equal, bound, rel_tol=1e-12)


# ---- spec 9, oracle 2 ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_at_identical_logits(dtype: torch.dtype) -> None:
    n = 5
    z = logits(n, 10, 7, dtype=dtype)
    student = z.clone().requires_grad_(True)
    teacher = z.clone().requires_grad_(True)
    symmetric_cross_entropy(student, teacher).backward()
    assert teacher.grad is None, "the teacher received a gradient"

    p = np_softmax(z.double().numpy())
    entropy = -(p * np.log(p)).sum(axis=1, keepdims=True)
    want = 0.5 * p * (-np.log(p) - entropy) / n  # batch mean: 1/n per row
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(student.grad.double().numpy(), want, rtol=tol * 10, atol=tol)
    assert np.abs(want).max() > 1e-3, "the oracle itself must be non-zero"
    np.testing.assert_allclose(student.grad.double().sum(dim=1).numpy(), 0.0, atol=tol)

    # Plain CE(softmax(t) -> s) has a zero gradient at s == t: the reverse term makes SCE's.
    plain = z.clone().requires_grad_(True)
    soft_cross_entropy(plain, z).backward()
    np.testing.assert_allclose(plain.grad.double().numpy(), 0.0, atol=tol)


def test_teacher_is_detached_but_student_gets_both_directions() -> None:
    s = logits(4, 10, 8, dtype=torch.float64).requires_grad_(True)
    t = logits(4, 10, 9, dtype=torch.float64).requires_grad_(True)
    symmetric_cross_entropy(s, t).backward()
    assert t.grad is None
    # Finite differences of the full formula (both CE directions depend on s).
    eps = 1e-6
    numeric = np.zeros((4, 10))
    base_s, base_t = s.detach().numpy(), t.detach().numpy()
    for i in range(4):
        for c in range(10):
            plus, minus = base_s.copy(), base_s.copy()
            plus[i, c] += eps
            minus[i, c] -= eps
            numeric[i, c] = (
                reference_sce_rows(plus, base_t).mean() - reference_sce_rows(minus, base_t).mean()
            ) / (2 * eps)
    np.testing.assert_allclose(s.grad.numpy(), numeric, rtol=1e-6, atol=1e-9)
