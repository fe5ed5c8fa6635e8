"""Reference tests for :func:`~kdzoo.losses.functional.dkd_loss` and
:func:`~kdzoo.losses.functional.dist_loss`, and for the :class:`~kdzoo.methods.DKD` and
:class:`~kdzoo.methods.DIST` methods built on them.

DKD (Zhao et al., "Decoupled Knowledge Distillation", arXiv:2203.08679), per sample with target y,
p = softmax(z / T), b = [p_y, 1 - p_y] and p^_j = p_j / (1 - p_y) for j != y:

    TCKD = T^2 * mean_i KL(b_t || b_s),  NCKD = T^2 * mean_i KL(p^_t || p^_s),
    DKD = alpha * TCKD + beta * NCKD,    and KD = TCKD + (1 - p_t,y) * NCKD (paper, Eq. 2).

DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", arXiv:2205.10536), with
Y = softmax(z / T) of shape (N, C) and rho the Pearson correlation (eps = 1e-8 added to the
product of the norms, as the official code):

    inter = T^2 * (1 - mean_i rho(Y_s[i, :], Y_t[i, :])),
    intra = T^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c])),  DIST = beta * inter + gamma * intra.

The references below are written from these formulas in float64 with explicit loops and sums:
the non-target distribution is built by dropping the target column (not by kdzoo's / mdistiller's
"- 1000" mask), and the binary distribution by summing the other classes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import dist_loss, dkd_loss, kd_loss
from kdzoo.methods import DIST, DKD
from kdzoo.models import TeacherSpec

# ---- float64 references, from the formulas ---------------------------------------------------


def softmax_ref(z: torch.Tensor) -> torch.Tensor:
    """Softmax of a 1-D float64 vector from its definition, shifted by the max for stability."""
    e = torch.exp(z - z.max())
    return e / e.sum()


def kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_j p_j log(p_j / q_j), with 0 log 0 = 0."""
    total = torch.zeros((), dtype=torch.float64)
    for pj, qj in zip(p, q, strict=True):
        if pj > 0:
            total = total + pj * (torch.log(pj) - torch.log(qj))
    return total


def dkd_terms_ref(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD_i, NCKD_i), without T^2: float64, one sample and one class at a time."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    tckd, nckd = [], []
    for i in range(s.shape[0]):
        y = int(target[i])
        others = [j for j in range(s.shape[1]) if j != y]
        p_s, p_t = softmax_ref(s[i]), softmax_ref(t[i])
        b_s = torch.stack([p_s[y], p_s[others].sum()])
        b_t = torch.stack([p_t[y], p_t[others].sum()])
        tckd.append(kl_ref(b_t, b_s))
        nckd.append(kl_ref(softmax_ref(t[i, others]), softmax_ref(s[i, others])))
    return torch.stack(tckd), torch.stack(nckd)


def dkd_ref(student, teacher, target, alpha: float, beta: float, temperature: float):
    tckd, nckd = dkd_terms_ref(student, teacher, target, temperature)
    n = student.shape[0]
    return temperature**2 * (alpha * tckd.sum() + beta * nckd.sum()) / n


def pearson_ref(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sum (u - mean u)(v - mean v) / (sqrt(sum (u - mean u)^2) sqrt(sum (v - mean v)^2) + eps)."""
    du = u - u.sum() / len(u)
    dv = v - v.sum() / len(v)
    return (du * dv).sum() / (torch.sqrt((du**2).sum()) * torch.sqrt((dv**2).sum()) + eps)


def dist_terms_ref(student, teacher, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra), each with its T^2, float64."""
    y_s = torch.stack([softmax_ref(row) for row in student.double() / temperature])
    y_t = torch.stack([softmax_ref(row) for row in teacher.double() / temperature])
    n, c = y_s.shape
    inter = sum(pearson_ref(y_s[i], y_t[i]) for i in range(n)) / n
    intra = sum(pearson_ref(y_s[:, j], y_t[:, j]) for j in range(c)) / c
    return temperature**2 * (1 - inter), temperature**2 * (1 - intra)


def dist_ref(student, teacher, beta: float, gamma: float, temperature: float) -> torch.Tensor:
    inter, intra = dist_terms_ref(student, teacher, temperature)
    return beta * inter + gamma * intra


def random_logits(n: int, c: int, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=gen) * scale
    teacher = torch.randn(n, c, generator=gen) * scale
    target = torch.randint(0, c, (n,), generator=gen)
    return student, teacher, target


CASES = [
    # (N, C, T, logit scale)
    (1, 2, 1.0, 1.0),
    (4, 10, 1.0, 3.0),
    (8, 10, 4.0, 1.0),
    (3, 100, 4.0, 5.0),
    (16, 7, 2.5, 50.0),  # large logits: near one-hot distributions
    (6, 10, 1.0, 50.0),  # ...at T = 1, where a naive log of summed probabilities overflows
    (5, 20, 0.5, 2.0),  # T < 1 sharpens
]

# ---- DKD loss --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "temperature", "scale"), CASES)
def test_dkd_matches_reference(n: int, c: int, temperature: float, scale: float) -> None:
    student, teacher, target = random_logits(n, c, scale, seed=n * 1000 + c)
    alpha, beta = 0.7, 3.0
    got = dkd_loss(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature)
    want = dkd_ref(student, teacher, target, alpha, beta, temperature)
    assert got.ndim == 0
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dkd_reference_rejects_wrong_variants() -> None:
    student, teacher, target = random_logits(8, 10, 2.0, seed=1)
    temperature, alpha, beta = 4.0, 1.0, 8.0
    got = dkd_loss(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature)
    tckd, nckd = dkd_terms_ref(student, teacher, target, temperature)
    tckd_r, nckd_r = dkd_terms_ref(teacher, student, target, temperature)  # KL(s || t)
    wrong = {
        "no T^2": (alpha * tckd + beta * nckd).mean(),
        "batch sum": temperature**2 * (alpha * tckd + beta * nckd).sum(),
        "swapped KL": temperature**2 * (alpha * tckd_r + beta * nckd_r).mean(),
        "alpha and beta swapped": temperature**2 * (beta * tckd + alpha * nckd).mean(),
        "NCKD over all classes (KD)": alpha * temperature**2 * tckd.mean()
        + beta * kd_loss(student, teacher, temperature=temperature).double(),
    }
    for name, value in wrong.items():
        assert not torch.allclose(got.double(), value, rtol=1e-3, atol=0), name


def test_dkd_zero_weights_and_equal_logits() -> None:
    student, teacher, target = random_logits(6, 20, 10.0, seed=2)
    zero = dkd_loss(student, teacher, target, alpha=0.0, beta=0.0, temperature=4.0)
    assert zero.item() == 0.0
    for temperature in (0.5, 1.0, 4.0):
        same = dkd_loss(student, student.clone(), target, alpha=1, beta=8, temperature=temperature)
        assert same.abs().item() < 1e-5
    # ...and clearly non-zero otherwise, so both checks can fail.
    assert dkd_loss(student, teacher, target, alpha=1, beta=8, temperature=4.0).item() > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_tckd_is_t_squared_binary_kl(temperature: float) -> None:
    """alpha = 1, beta = 0: T^2 * mean_i KL([p_t, 1 - p_t] || [p_s, 1 - p_s]), by hand."""
    student, teacher, target = random_logits(5, 8, 3.0, seed=3)
    rows = range(5)
    p_s = torch.softmax(student.double() / temperature, dim=1)[rows, target]
    p_t = torch.softmax(teacher.double() / temperature, dim=1)[rows, target]
    binary_kl = p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))
    want = temperature**2 * binary_kl.mean()
    got = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0, temperature=temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    if temperature != 1.0:
        assert not torch.allclose(got.double(), binary_kl.mean(), rtol=1e-2)


def test_dkd_nckd_ignores_student_target_logit() -> None:
    """NCKD sees only the non-target distribution: moving the student's target logit leaves it
    unchanged, while TCKD and a change of a non-target logit do change the loss."""
    n, c = 6, 10
    student, teacher, target = random_logits(n, c, 3.0, seed=4)
    rows = torch.arange(n)
    moved = student.clone()
    moved[rows, target] += torch.linspace(-20.0, 20.0, n)

    def nckd(s):
        return dkd_loss(s, teacher, target, alpha=0.0, beta=1.0, temperature=4.0)

    def tckd(s):
        return dkd_loss(s, teacher, target, alpha=1.0, beta=0.0, temperature=4.0)

    torch.testing.assert_close(nckd(moved), nckd(student), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tckd(moved), tckd(student), rtol=1e-2)
    other = (target + 1) % c
    moved_other = student.clone()
    moved_other[rows, other] += 5.0
    assert not torch.allclose(nckd(moved_other), nckd(student), rtol=1e-2)


@pytest.mark.parametrize(("temperature", "scale"), [(1.0, 2.0), (4.0, 3.0), (2.0, 10.0)])
def test_dkd_decomposes_kd(temperature: float, scale: float) -> None:
    """Paper Eq. 2, per sample: KD = TCKD + (1 - p^t_target) NCKD, with T^2 on every term."""
    n, c = 6, 12
    student, teacher, target = random_logits(n, c, scale, seed=5)
    p_t = torch.softmax(teacher.double() / temperature, dim=1)[range(n), target]
    p_s = torch.softmax(student.double() / temperature, dim=1)[range(n), target]
    per_sample_kd, decomposed, student_weighted = [], [], []
    for i in range(n):
        s, t, y = student[i : i + 1], teacher[i : i + 1], target[i : i + 1]
        tckd = dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=temperature).double()
        nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=temperature).double()
        per_sample_kd.append(kd_loss(s, t, temperature=temperature).double())
        decomposed.append(tckd + (1 - p_t[i]) * nckd)
        student_weighted.append(tckd + (1 - p_s[i]) * nckd)
    torch.testing.assert_close(
        torch.stack(decomposed), torch.stack(per_sample_kd), rtol=1e-4, atol=1e-6
    )
    # Weighting by the student's confidence instead of the teacher's breaks the identity...
    assert not torch.allclose(torch.stack(student_weighted), torch.stack(per_sample_kd), rtol=1e-2)
    # ...and so does a single batch-level weight: the (1 - p) factor is per sample.
    batch_tckd = dkd_loss(student, teacher, target, alpha=1, beta=0, temperature=temperature)
    batch_nckd = dkd_loss(student, teacher, target, alpha=0, beta=1, temperature=temperature)
    batch_kd = kd_loss(student, teacher, temperature=temperature).double()
    torch.testing.assert_close(torch.stack(decomposed).mean(), batch_kd, rtol=1e-4, atol=1e-6)
    mean_weight = batch_tckd.double() + (1 - p_t.mean()) * batch_nckd.double()
    assert not torch.allclose(mean_weight, batch_kd, rtol=1e-3)


def test_dkd_translation_invariance_and_batch_mean() -> None:
    student, teacher, target = random_logits(5, 12, 3.0, seed=6)
    gen = torch.Generator().manual_seed(7)
    shift_s, shift_t = torch.randn(5, 1, generator=gen) * 20, torch.randn(5, 1, generator=gen) * 20

    def loss(s, t, y):
        return dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)

    base = loss(student, teacher, target)
    torch.testing.assert_close(
        loss(student + shift_s, teacher + shift_t, target), base, rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(loss(student + torch.arange(12.0), teacher, target), base, rtol=1e-2)
    doubled = loss(torch.cat([student, student]), torch.cat([teacher, teacher]), target.repeat(2))
    torch.testing.assert_close(doubled, base, rtol=1e-6, atol=1e-6)


def test_dkd_stays_finite_where_summed_probabilities_underflow() -> None:
    """Student target gap of 200 / T: float32 exp(-200) is 0, so log(sum of non-target softmax
    probabilities), as mdistiller computes TCKD, is -inf and the loss inf. kdzoo stays exact."""
    student = torch.tensor([[100.0, -100.0, -100.0, -100.0], [-100.0, 100.0, -100.0, -100.0]])
    teacher = torch.tensor([[1.0, 0.5, 0.0, -0.5], [0.0, 0.3, 0.2, 0.1]])
    target = torch.tensor([0, 1])
    not_target = torch.ones_like(student, dtype=torch.bool).scatter_(1, target[:, None], False)
    naive_other = (torch.softmax(student, dim=1) * not_target).sum(dim=1)
    assert (torch.log(naive_other) == float("-inf")).all()  # the failure being guarded against
    got = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=1.0)
    assert torch.isfinite(got)
    want = dkd_ref(student, teacher, target, 1.0, 8.0, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_dkd_gradcheck_and_float64() -> None:
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 3, 5, 3])
    assert dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=2.0).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda s: dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0), (s,)
    )


def test_dkd_bfloat16_autocast() -> None:
    torch.manual_seed(9)
    layer = torch.nn.Linear(16, 10)
    x, teacher = torch.randn(8, 16), torch.randn(8, 10) * 3
    target = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_bf16 = layer(x)
        assert student_bf16.dtype == torch.bfloat16
        got = dkd_loss(student_bf16, teacher.bfloat16(), target, alpha=1, beta=8, temperature=4)
    assert got.dtype == torch.float32
    want = dkd_ref(student_bf16.float(), teacher.bfloat16().float(), target, 1.0, 8.0, 4.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dkd_bad_inputs_raise() -> None:
    student, teacher, target = random_logits(4, 10, 1.0, seed=10)
    kwargs = {"alpha": 1.0, "beta": 8.0}
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0"):
        dkd_loss(student, teacher, target, temperature=0.0, **kwargs)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 12\).*same number of classes"):
        dkd_loss(student, torch.randn(4, 12), target, temperature=4.0, **kwargs)
    with pytest.raises(ValueError, match=r"target must hold one integer class index.*\(4,\)"):
        dkd_loss(student, teacher, target[:3], temperature=4.0, **kwargs)
    with pytest.raises(ValueError, match=r"target must hold one integer"):
        dkd_loss(student, teacher, target.float(), temperature=4.0, **kwargs)
    with pytest.raises(ValueError, match=r"C >= 2"):
        dkd_loss(student[:, :1], teacher[:, :1], torch.zeros(4, dtype=torch.long), **kwargs)


# ---- DIST loss -------------------------------------------------------------------------------


def test_pearson_reference_is_pearson() -> None:
    """The reference correlation agrees with torch.corrcoef (no eps) on well-spread vectors."""
    gen = torch.Generator().manual_seed(11)
    u, v = torch.randn(2, 30, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(pearson_ref(u, v), torch.corrcoef(torch.stack([u, v]))[0, 1])


@pytest.mark.parametrize(("n", "c", "temperature", "scale"), CASES[1:])
def test_dist_matches_reference(n: int, c: int, temperature: float, scale: float) -> None:
    student, teacher, _ = random_logits(n, c, scale, seed=n * 1000 + c)
    beta, gamma = 1.5, 0.5
    got = dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=temperature)
    want = dist_ref(student, teacher, beta, gamma, temperature)
    assert got.ndim == 0
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dist_reference_rejects_wrong_variants() -> None:
    student, teacher, _ = random_logits(8, 10, 2.0, seed=12)
    temperature = 4.0
    got = dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=temperature).double()
    inter, intra = dist_terms_ref(student, teacher, temperature)
    y_s = torch.softmax(student.double() / temperature, dim=1)
    y_t = torch.softmax(teacher.double() / temperature, dim=1)
    uncentred = 1 - F.cosine_similarity(y_s, y_t, dim=1).mean()  # cosine, not Pearson
    logits_inter, logits_intra = dist_terms_ref(student * temperature, teacher * temperature, 1.0)
    wrong = {
        "no T^2": (inter + intra) / temperature**2,
        "sum over samples": inter * student.shape[0] + intra,
        "sum over classes": inter + intra * student.shape[1],
        "inter only": inter,
        "intra only": intra,
        "uncentred cosine": temperature**2 * uncentred + intra,
        "Pearson of logits, not probabilities": temperature**2 * (logits_inter + logits_intra),
    }
    for name, value in wrong.items():
        assert not torch.allclose(got, value, rtol=1e-3, atol=0), name


def test_dist_zero_when_student_equals_teacher() -> None:
    student, teacher, _ = random_logits(8, 10, 2.0, seed=13)
    for temperature in (1.0, 4.0):
        # Not exactly 0: eps makes rho = |u|^2 / (|u|^2 + eps), ~1e-7 below 1 here.
        assert dist_loss(student, student.clone(), temperature=temperature).item() < 1e-4
    assert dist_loss(student, teacher, temperature=4.0).item() > 1e-1


def test_dist_bounds_and_separability() -> None:
    temperature = 4.0
    for seed in range(5):
        student, teacher, _ = random_logits(6, 9, 0.5 * 4**seed, seed=seed)
        inter = dist_loss(student, teacher, beta=1.0, gamma=0.0, temperature=temperature)
        intra = dist_loss(student, teacher, beta=0.0, gamma=1.0, temperature=temperature)
        for term in (inter, intra):
            assert 0.0 <= term.item() <= 2 * temperature**2
        both = dist_loss(student, teacher, beta=2.0, gamma=3.0, temperature=temperature)
        torch.testing.assert_close(both, 2.0 * inter + 3.0 * intra, rtol=1e-5, atol=1e-5)
    # The bound 2 T^2 (beta + gamma) is attained: every row and every column anti-correlated.
    student = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])
    worst = dist_loss(student, -student, beta=1.0, gamma=2.0, temperature=temperature)
    torch.testing.assert_close(worst.item(), 2 * temperature**2 * 3.0, rtol=1e-5, atol=0)


def test_dist_translation_invariance() -> None:
    student, teacher, _ = random_logits(5, 12, 3.0, seed=14)
    gen = torch.Generator().manual_seed(15)
    shift_s, shift_t = torch.randn(5, 1, generator=gen) * 20, torch.randn(5, 1, generator=gen) * 20
    base = dist_loss(student, teacher, temperature=4.0)
    shifted = dist_loss(student + shift_s, teacher + shift_t, temperature=4.0)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)
    # A per-column shift changes the distributions, hence the loss.
    col_shift = torch.arange(12.0)
    assert not torch.allclose(dist_loss(student + col_shift, teacher), base, rtol=1e-2)


def test_dist_permutation_invariances() -> None:
    """inter: a mean over samples of correlations across classes, so unchanged when the classes
    are permuted in student and teacher alike; intra likewise for the batch order."""
    n, c = 7, 9
    student, teacher, _ = random_logits(n, c, 3.0, seed=16)
    gen = torch.Generator().manual_seed(17)
    classes, rows = torch.randperm(c, generator=gen), torch.randperm(n, generator=gen)

    def inter(s, t):
        return dist_loss(s, t, beta=1.0, gamma=0.0, temperature=2.0)

    def intra(s, t):
        return dist_loss(s, t, beta=0.0, gamma=1.0, temperature=2.0)

    torch.testing.assert_close(
        inter(student[:, classes], teacher[:, classes]), inter(student, teacher)
    )
    torch.testing.assert_close(intra(student[rows], teacher[rows]), intra(student, teacher))
    # Permuting one side only breaks the correspondence, and the loss changes.
    assert not torch.allclose(inter(student[:, classes], teacher), inter(student, teacher), 1e-2)
    assert not torch.allclose(intra(student[rows], teacher), intra(student, teacher), 1e-2)


def test_dist_single_sample_intra_is_constant() -> None:
    """With N = 1 the per-class columns have no spread: rho = 0 and intra = T^2, no gradient."""
    student = torch.randn(1, 10, requires_grad=True)
    intra = dist_loss(student, torch.randn(1, 10), beta=0.0, gamma=1.0, temperature=3.0)
    assert intra.item() == pytest.approx(9.0)
    intra.backward()
    assert student.grad.abs().max().item() == 0.0


def test_dist_gradcheck_and_bfloat16() -> None:
    gen = torch.Generator().manual_seed(18)
    s = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    assert dist_loss(s, t, temperature=2.0).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda s: dist_loss(s, t, beta=1.0, gamma=2.0, temperature=2.0), (s,)
    )
    layer = torch.nn.Linear(16, 10)
    x, teacher = torch.randn(8, 16, generator=gen), torch.randn(8, 10, generator=gen) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_bf16 = layer(x)
        assert student_bf16.dtype == torch.bfloat16
        got = dist_loss(student_bf16, teacher.bfloat16(), temperature=4.0)
    assert got.dtype == torch.float32
    want = dist_ref(student_bf16.float(), teacher.bfloat16().float(), 1.0, 1.0, 4.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dist_bad_inputs_raise() -> None:
    student, teacher, _ = random_logits(4, 10, 1.0, seed=19)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1"):
        dist_loss(student, teacher, temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 100\).*same number of classes"):
        dist_loss(student, torch.randn(4, 100))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        dist_loss(student.flatten(), teacher.flatten())


# ---- the DKD and DIST methods ----------------------------------------------------------------

NUM_CLASSES = 10
COMMON_KWARGS: dict[str, Any] = {
    "student": "test_efficientnet",
    "num_classes": NUM_CLASSES,
    "in_chans": 1,
    "mean": (0.5,),
    "std": (0.25,),
}


def build(cls, **kwargs: Any):
    torch.manual_seed(0)
    return cls(teacher=TeacherSpec("test_resnet", weights="random"), **COMMON_KWARGS, **kwargs)


def make_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (n,))


def step_loss(module, batch) -> torch.Tensor:
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    with torch.no_grad():
        return module.training_step(batch, 0)


def logits(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        # Same mean/std for both: the teacher sees the student's batch unchanged.
        return module.student.model(x), module.teacher.backbone.model(x)


def start_epoch(module, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the epoch-start hook as the Trainer would in ``epoch`` (0-based), without a Trainer."""
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(current_epoch=epoch))
    assert module.current_epoch == epoch
    module.on_train_epoch_start()


@pytest.mark.parametrize(
    ("warmup_epochs", "expected"),
    [
        # mdistiller: min(epoch / warmup, 1) with epochs counted from 1.
        (20, {0: 1 / 20, 1: 2 / 20, 9: 10 / 20, 18: 19 / 20, 19: 1.0, 100: 1.0}),
        (4, {0: 0.25, 2: 0.75, 3: 1.0}),
        (1, {0: 1.0, 5: 1.0}),
        (0, {0: 1.0, 5: 1.0}),
    ],
)
def test_dkd_warmup_weight(warmup_epochs: int, expected: dict, monkeypatch) -> None:
    module = build(DKD, warmup_epochs=warmup_epochs)
    assert module.loss_weights["dkd"] == pytest.approx(expected[0])  # before any Trainer
    for epoch, weight in expected.items():
        start_epoch(module, epoch, monkeypatch)
        assert module.loss_weights["dkd"] == pytest.approx(weight), epoch
        assert module.loss_weights["ce"] == 1.0


def test_dkd_method_loss_is_dkd_loss_after_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    hp = {"alpha": 0.5, "beta": 4.0, "temperature": 2.0}
    module = build(DKD, ce_weight=0.0, warmup_epochs=3, **hp).eval()
    start_epoch(module, 5, monkeypatch)
    x, y = batch = make_batch()
    student_logits, teacher_logits = logits(module, x)
    want = dkd_loss(student_logits, teacher_logits, y, **hp)
    torch.testing.assert_close(step_loss(module, batch), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        want.double(), dkd_ref(student_logits, teacher_logits, y, **hp), rtol=1e-4, atol=1e-6
    )
    assert want > 0
    # In the first epoch the same term counts with weight 1 / 3, next to the cross-entropy.
    module.loss_weights["ce"] = 0.3
    start_epoch(module, 0, monkeypatch)
    ce = F.cross_entropy(student_logits, y)
    torch.testing.assert_close(step_loss(module, batch), 0.3 * ce + want / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",  # the frozen teacher, on purpose
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
)
def test_dkd_warmup_through_trainer(tmp_path) -> None:
    """A real Trainer calls the hook: the weight seen by each epoch's steps follows the ramp."""
    module = build(DKD, warmup_epochs=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    seen: dict[int, float] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen[trainer.current_epoch] = pl_module.loss_weights["dkd"]

    x, y = make_batch(n=4)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=4))
    assert seen == {0: 0.5, 1: 1.0, 2: 1.0}


def test_dist_method_loss_is_weighted_dist_loss() -> None:
    hp = {"beta": 2.0, "gamma": 0.5, "temperature": 3.0}
    x, y = batch = make_batch(n=6)
    module = build(DIST, ce_weight=0.0, kd_weight=1.0, **hp).eval()
    student_logits, teacher_logits = logits(module, x)
    want = dist_loss(student_logits, teacher_logits, **hp)
    torch.testing.assert_close(step_loss(module, batch), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        want.double(), dist_ref(student_logits, teacher_logits, **hp), rtol=1e-4, atol=1e-6
    )
    assert want > 0
    module = build(DIST, ce_weight=0.4, kd_weight=2.0, **hp).eval()
    ce = F.cross_entropy(student_logits, y)
    torch.testing.assert_close(
        step_loss(module, batch), 0.4 * ce + 2.0 * want, rtol=1e-5, atol=1e-6
    )
    assert not math.isclose(step_loss(module, batch).item(), (0.4 * ce + want).item(), rel_tol=1e-3)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (DKD, {"temperature": 0.0}, "temperature must be > 0"),
        (DKD, {"alpha": -1.0}, "alpha must be >= 0"),
        (DKD, {"beta": -0.5}, "beta must be >= 0"),
        (DKD, {"ce_weight": -1.0}, "ce_weight must be >= 0"),
        (DKD, {"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
        (DIST, {"temperature": -2.0}, "temperature must be > 0"),
        (DIST, {"beta": -1.0}, "beta must be >= 0"),
        (DIST, {"gamma": -1.0}, "gamma must be >= 0"),
        (DIST, {"ce_weight": -1.0}, "ce_weight must be >= 0"),
        (DIST, {"kd_weight": -1.0}, "kd_weight must be >= 0"),
    ],
)
def test_methods_reject_bad_hyper_parameters(cls, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(cls, **kwargs)
