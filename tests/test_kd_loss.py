"""Reference tests for :func:`kdzoo.losses.functional.kd_loss`.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531:

    L_KD = T^2 * (1/N) * sum_i KL(softmax(t_i / T) || softmax(s_i / T))

summed over classes, averaged over the batch. The reference below is written from that formula
with explicit sums in float64 (no ``F.kl_div``), so a wrong reduction, a missing ``T^2`` or a
swapped KL direction in kdzoo shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

from kdzoo.losses.functional import kd_loss


def log_softmax_ref(z: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax from its definition, shifted by the row max for stability."""
    z = z - z.max(dim=-1, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def kl_rows_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample KL(p_t || p_s) = sum_c p_t * (log p_t - log p_s), in float64, no T^2."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_p_s = log_softmax_ref(s)
    log_p_t = log_softmax_ref(t)
    p_t = torch.exp(log_p_t)
    return (p_t * (log_p_t - log_p_s)).sum(dim=-1)


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * batch-mean of the per-sample KL: the Hinton et al. KD loss."""
    n = student.shape[0]
    return temperature**2 * kl_rows_ref(student, teacher, temperature).sum() / n


def random_logits(n: int, c: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=gen) * scale
    teacher = torch.randn(n, c, generator=gen) * scale
    return student, teacher


CASES = [
    # (N, C, T, logit scale)
    (1, 2, 1.0, 1.0),
    (4, 10, 1.0, 3.0),
    (8, 10, 4.0, 1.0),
    (3, 100, 4.0, 5.0),
    (16, 7, 2.5, 50.0),  # large logits: near one-hot distributions
    (5, 1000, 8.0, 10.0),
    (6, 10, 0.5, 2.0),  # T < 1 sharpens
]


@pytest.mark.parametrize(("n", "c", "temperature", "scale"), CASES)
def test_matches_reference(n: int, c: int, temperature: float, scale: float) -> None:
    student, teacher = random_logits(n, c, scale, seed=n * 1000 + c)
    got = kd_loss(student, teacher, temperature=temperature)
    want = kd_ref(student, teacher, temperature)
    assert got.ndim == 0
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_reference_rejects_wrong_variants() -> None:
    """The comparison above can fail: common mistakes give clearly different numbers."""
    student, teacher = random_logits(8, 10, 2.0, seed=1)
    temperature = 4.0
    got = kd_loss(student, teacher, temperature=temperature).double()
    kl = kl_rows_ref(student, teacher, temperature)
    no_t2 = kl.mean()
    summed = temperature**2 * kl.sum()
    reversed_kl = kd_ref(teacher, student, temperature)  # KL(p_s || p_t)
    mean_over_classes = temperature**2 * kl.mean() / student.shape[1]
    for wrong in (no_t2, summed, reversed_kl, mean_over_classes):
        assert not torch.allclose(got, wrong, rtol=1e-3, atol=0), wrong


def test_zero_when_student_equals_teacher() -> None:
    logits, _ = random_logits(6, 20, 10.0, seed=2)
    for temperature in (0.5, 1.0, 4.0):
        assert kd_loss(logits, logits.clone(), temperature=temperature).abs().item() < 1e-6
    # ...and not zero for different logits, so the check above can fail.
    assert kd_loss(logits, logits.flip(0), temperature=4.0).item() > 1e-3


def test_non_negative() -> None:
    for seed in range(10):
        student, teacher = random_logits(4, 5, 0.01 * 10**seed, seed=seed)
        assert kd_loss(student, teacher, temperature=3.0).item() >= 0.0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_translation_invariance(temperature: float) -> None:
    """softmax is unchanged by adding a per-row constant to the logits, so the loss is too."""
    student, teacher = random_logits(5, 12, 3.0, seed=3)
    gen = torch.Generator().manual_seed(4)
    shift_s = torch.randn(5, 1, generator=gen) * 20
    shift_t = torch.randn(5, 1, generator=gen) * 20
    base = kd_loss(student, teacher, temperature=temperature)
    torch.testing.assert_close(
        kd_loss(student + shift_s, teacher, temperature=temperature), base, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        kd_loss(student, teacher + shift_t, temperature=temperature), base, rtol=1e-4, atol=1e-5
    )
    # A per-column shift changes the distribution, hence the loss.
    col_shift = torch.arange(12.0)
    assert not torch.allclose(
        kd_loss(student + col_shift, teacher, temperature=temperature), base, rtol=1e-2
    )


@pytest.mark.parametrize("temperature", [2.0, 4.0, 10.0])
def test_t_squared_factor(temperature: float) -> None:
    """kd_loss(T) / T^2 is the plain batch-mean KL at temperature T: a missing T^2 would fail."""
    student, teacher = random_logits(8, 10, 3.0, seed=5)
    got = kd_loss(student, teacher, temperature=temperature).double()
    kl = kl_rows_ref(student, teacher, temperature).mean()
    torch.testing.assert_close(got / temperature**2, kl, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(got, kl, rtol=1e-2)


def test_large_temperature_limit() -> None:
    """Hinton et al. section 2.1: for large T, T^2 KL -> ||(s - mean s) - (t - mean t)||^2 / (2C).

    With p = softmax(z / T) ~ (1 + (z_j - mean z) / T) / C, KL(p_t || p_s) ~ (1/2) sum_j
    (p_t - p_s)_j^2 / p_t,j = ||s~ - t~||^2 / (2 C T^2); averaged over the batch and times T^2:
    (1 / (2 N C)) sum_i ||s~_i - t~_i||^2 (whose gradient is Hinton's (s~ - t~) / (N C)). The
    relative error of the approximation is O(|z| / T); it must shrink as T grows.
    """
    n, c = 6, 10
    student, teacher = random_logits(n, c, 1.0, seed=6)
    s_c = student - student.mean(dim=1, keepdim=True)
    t_c = teacher - teacher.mean(dim=1, keepdim=True)
    limit = ((s_c - t_c) ** 2).sum() / (2 * n * c)
    errors = []
    for temperature in (2.0, 10.0, 100.0):
        got = kd_loss(student, teacher, temperature=temperature)
        errors.append(abs(got.item() - limit.item()) / limit.item())
    assert errors[-1] < 2e-2, errors
    assert errors[0] > errors[1] > errors[-1], errors


def test_batch_mean_reduction() -> None:
    """Duplicating the batch leaves a batch mean unchanged (a sum would double)."""
    student, teacher = random_logits(4, 10, 2.0, seed=7)
    single = kd_loss(student, teacher, temperature=4.0)
    double = kd_loss(torch.cat([student, student]), torch.cat([teacher, teacher]), temperature=4.0)
    torch.testing.assert_close(double, single, rtol=1e-6, atol=1e-7)
    # It is the mean of the per-sample losses, not their sum.
    per_sample = torch.stack(
        [kd_loss(student[i : i + 1], teacher[i : i + 1], temperature=4.0) for i in range(4)]
    )
    torch.testing.assert_close(single, per_sample.mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(single, per_sample.sum(), rtol=1e-2)


@pytest.mark.parametrize(("n", "temperature"), [(4, 1.0), (8, 4.0), (3, 0.7)])
def test_gradient_wrt_student(n: int, temperature: float) -> None:
    """d(T^2 KL)/ds = T * (softmax(s / T) - softmax(t / T)) / N."""
    student, teacher = random_logits(n, 10, 3.0, seed=8)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, temperature=temperature).backward()
    with torch.no_grad():
        s64, t64 = student.double(), teacher.double()
        want = temperature * (
            torch.softmax(s64 / temperature, -1) - torch.softmax(t64 / temperature, -1)
        )
        want = want / n
    torch.testing.assert_close(student.grad.double(), want, rtol=1e-4, atol=1e-7)
    # The gradient really has the T and 1/N factors: without them it would differ.
    if temperature != 1.0:
        assert not torch.allclose(student.grad.double(), want / temperature, rtol=1e-2)
    assert not torch.allclose(student.grad.double(), want * n, rtol=1e-2)


def test_bfloat16_autocast() -> None:
    """Under bf16 autocast the loss is computed in float32 and matches the fp32 result."""
    torch.manual_seed(9)
    layer = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    teacher = torch.randn(8, 10) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_bf16 = layer(x)
        assert student_bf16.dtype == torch.bfloat16  # autocast is really on
        got = kd_loss(student_bf16, teacher.bfloat16(), temperature=4.0)
    assert got.dtype == torch.float32
    # Exact on the bf16 values it was given (no half-precision maths inside)...
    want_same_inputs = kd_ref(student_bf16.float(), teacher.bfloat16().float(), 4.0)
    torch.testing.assert_close(got.double(), want_same_inputs, rtol=1e-5, atol=1e-6)
    # ...and close to the full fp32 computation.
    fp32 = kd_loss(layer(x), teacher, temperature=4.0)
    torch.testing.assert_close(got, fp32, rtol=2e-2, atol=1e-3)


def test_bfloat16_autocast_gradient_flows() -> None:
    layer = torch.nn.Linear(16, 10)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(layer(x), torch.randn(4, 10), temperature=2.0)
    loss.backward()
    assert layer.weight.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises(temperature: float) -> None:
    student, teacher = random_logits(2, 3, 1.0, seed=10)
    with pytest.raises(ValueError, match=r"temperature must be > 0.*" + str(temperature)):
        kd_loss(student, teacher, temperature=temperature)


def test_shape_mismatch_raises() -> None:
    student = torch.randn(4, 10)
    teacher = torch.randn(4, 100)
    with pytest.raises(ValueError) as info:
        kd_loss(student, teacher, temperature=4.0)
    message = str(info.value)
    assert "(4, 10)" in message and "(4, 100)" in message
    assert "same number of classes" in message


def test_kd_loss_keeps_float64_for_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    assert kd_loss(s, t, temperature=2.0).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, t, temperature=2.0), (s,))
