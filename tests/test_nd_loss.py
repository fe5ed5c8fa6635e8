"""nd_loss against a per-sample reference written from the formula, and the spec's oracles
(``shared/specs/classification.md`` section 1.8)."""

from __future__ import annotations

import math

import pytest
import torch

from kdzoo.losses.functional.nd import nd_loss


def reference_nd(f_s, f_t, centers, target) -> float:
    """1/N sum_i (1 - <f_s_i, c_y / |c_y|> / max(|f_s_i|, |f_t_i|)), one sample at a time."""
    total = 0.0
    for i in range(f_s.shape[0]):
        s, t, c = f_s[i].tolist(), f_t[i].tolist(), centers[int(target[i])].tolist()
        c_norm = math.sqrt(sum(v * v for v in c))
        dot = sum(a * b / c_norm for a, b in zip(s, c, strict=True))
        s_norm = math.sqrt(sum(v * v for v in s))
        t_norm = math.sqrt(sum(v * v for v in t))
        total += 1.0 - dot / max(s_norm, t_norm)
    return total / f_s.shape[0]


def random_inputs(n=6, d=5, c=4, seed=0, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    f_s = scale * torch.randn(n, d, generator=gen, dtype=dtype)
    f_t = scale * torch.randn(n, d, generator=gen, dtype=dtype)
    centers = torch.rand(c, d, generator=gen, dtype=dtype) + 0.1
    target = torch.randint(0, c, (n,), generator=gen)
    return f_s, f_t, centers, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "d", "c", "scale"), [(6, 5, 4, 1.0), (3, 16, 10, 30.0), (1, 2, 2, 0.1)]
)
def test_matches_reference(dtype, n, d, c, scale):
    f_s, f_t, centers, target = random_inputs(n, d, c, seed=n + d, dtype=dtype, scale=scale)
    got = nd_loss(f_s, f_t, centers, target)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(reference_nd(f_s, f_t, centers, target), abs=tol)


def test_zero_along_class_mean_and_longer_than_teacher():
    _, f_t, centers, target = random_inputs()
    unit = centers[target] / centers[target].norm(dim=1, keepdim=True)
    f_s = unit * (f_t.norm(dim=1, keepdim=True) * 1.5)
    assert nd_loss(f_s, f_t, centers, target).item() == pytest.approx(0.0, abs=1e-12)
    half = unit * (f_t.norm(dim=1, keepdim=True) / 2)
    assert nd_loss(half, f_t, centers, target).item() == pytest.approx(0.5, abs=1e-12)


def test_range_and_invariances():
    f_s, f_t, centers, target = random_inputs(n=32, seed=3)
    loss = nd_loss(f_s, f_t, centers, target)
    assert 0.0 <= loss.item() <= 2.0
    # Opposite direction and longer than the teacher: the upper bound 2.
    unit = centers[target] / centers[target].norm(dim=1, keepdim=True)
    far = -unit * (f_t.norm(dim=1, keepdim=True) * 2)
    assert nd_loss(far, f_t, centers, target).item() == pytest.approx(2.0, abs=1e-12)
    rescaled = centers * torch.linspace(0.5, 3.0, centers.shape[0], dtype=centers.dtype)[:, None]
    assert nd_loss(f_s, f_t, rescaled, target).item() == pytest.approx(loss.item(), abs=1e-12)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = nd_loss(f_s[perm], f_t[perm], centers, target[perm])
    assert shuffled.item() == pytest.approx(loss.item(), abs=1e-12)
    # The student feature is not normalised: scaling it changes the loss (below the teacher norm).
    small = f_s * 1e-3
    assert nd_loss(small, f_t, centers, target).item() != pytest.approx(loss.item(), abs=1e-3)


def test_gradient_regimes():
    _, f_t, centers, target = random_inputs(n=1, d=6, seed=5)
    unit = (centers[target] / centers[target].norm(dim=1, keepdim=True))[0]
    gen = torch.Generator().manual_seed(9)
    direction = torch.randn(6, generator=gen, dtype=torch.float64)
    t_norm = f_t.norm().item()
    # Longer than the teacher: the gradient is orthogonal to f_s (direction only).
    f_s = (direction / direction.norm() * 2 * t_norm)[None].requires_grad_(True)
    nd_loss(f_s, f_t, centers, target).backward()
    assert torch.dot(f_s.grad[0], f_s.detach()[0]).item() == pytest.approx(0.0, abs=1e-12)
    # Shorter: <grad, c_hat> = -1 / ||f_t||.
    f_s = (direction / direction.norm() * 0.3 * t_norm)[None].requires_grad_(True)
    nd_loss(f_s, f_t, centers, target).backward()
    assert torch.dot(f_s.grad[0], unit).item() == pytest.approx(-1.0 / t_norm, rel=1e-10)
    f_s = (direction * 0.01)[None].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: nd_loss(s, f_t, centers, target), (f_s,))


def test_uses_the_per_sample_teacher_norm_not_the_class_mean_norm():
    f_s, f_t, centers, target = random_inputs(n=4, seed=11)
    f_s = f_s * 0.01  # below every teacher norm, so the teacher norm is the denominator
    wrong = (1 - (f_s * centers[target]).sum(1) / centers[target].norm(dim=1) ** 2).mean()
    assert nd_loss(f_s, f_t, centers, target).item() != pytest.approx(wrong.item(), abs=1e-6)


def test_shape_errors_are_clear():
    f_s, f_t, centers, target = random_inputs()
    with pytest.raises(ValueError, match="project the student"):
        nd_loss(f_s[:, :3], f_t, centers, target)
    with pytest.raises(ValueError, match="class_means must be"):
        nd_loss(f_s, f_t, centers[:, :2], target)


def test_teacher_norms_stand_for_the_teacher_embedding():
    """A teacher cache passes the teacher's (N,) norms, all the loss reads of its features."""
    f_s, f_t, centers, target = random_inputs(5, 6, 3, seed=11)
    norms = torch.tensor(
        [math.sqrt(sum(v * v for v in row)) for row in f_t.tolist()], dtype=f_s.dtype
    )
    got = nd_loss(f_s, norms.to(f_s.dtype), centers, target)
    assert got.item() == pytest.approx(reference_nd(f_s, f_t, centers, target), abs=1e-12)
    with pytest.raises(ValueError, match="differ"):
        nd_loss(f_s, norms[:4].to(f_s.dtype), centers, target)
