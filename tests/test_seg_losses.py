"""Reference tests for the dense distillation losses in :mod:`kdzoo.losses.functional.segmentation`.

Channel-wise distillation (Shu et al., ICCV 2021, arXiv:2011.13256):

    L_CWD = T^2 / (N C) * sum_{n,c} KL(softmax_{hw}(t_{n,c} / T) || softmax_{hw}(s_{n,c} / T))

Pixel-wise KD (Hinton et al., arXiv:1503.02531, at every pixel, as CIRKD):

    L_pix = T^2 / |V| * sum_{(n,h,w) in V}
            KL(softmax_c(t_{n,:,h,w} / T) || softmax_c(s_{n,:,h,w} / T))

The references loop over (n, c) or over valid pixels in float64 with explicit sums (no
``F.kl_div``, no ``log_softmax``), so a wrong softmax axis, reduction, KL direction or ``T^2``
shows up as a mismatch. Spec oracle L3 (CWD(t, t) = 0, CWD >= 0, per-(n, c) shift invariance,
T^2 * KL scaling) is checked directly.
"""

from __future__ import annotations

import pytest
import torch

from kdzoo.losses.functional import channel_wise_distillation_loss, pixel_kd_loss


def kl_ref(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) of two 1-D vectors, in float64, from the
    definition."""
    p_logits, q_logits = p_logits.double(), q_logits.double()
    p = torch.exp(p_logits - p_logits.max())
    p = p / p.sum()
    log_p = torch.log(p)
    q_shift = q_logits - q_logits.max()
    log_q = q_shift - torch.log(torch.exp(q_shift).sum())
    return (p * (log_p - log_q)).sum()


def cwd_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    n, c = student.shape[:2]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(c):
            t = teacher[i, j].reshape(-1) / temperature
            s = student[i, j].reshape(-1) / temperature
            total = total + kl_ref(t, s)
    return temperature**2 * total / (n * c)


def pixel_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    n, _, h, w = student.shape
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if valid is not None and not valid[i, y, x]:
                    continue
                t = teacher[i, :, y, x] / temperature
                s = student[i, :, y, x] / temperature
                total = total + kl_ref(t, s)
                count += 1
    return temperature**2 * total / max(count, 1)


def random_maps(shape: tuple[int, ...], scale: float, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale, torch.randn(shape, generator=gen) * scale


CASES = [
    # (N, C, H, W, T, scale)
    (1, 1, 2, 2, 1.0, 1.0),
    (2, 3, 4, 5, 4.0, 3.0),
    (3, 19, 6, 7, 4.0, 10.0),
    (2, 4, 1, 9, 0.5, 2.0),
    (1, 21, 8, 8, 2.0, 30.0),  # large logits: peaked distributions
]


@pytest.mark.parametrize(("n", "c", "h", "w", "temperature", "scale"), CASES)
def test_cwd_matches_reference(n, c, h, w, temperature, scale) -> None:
    student, teacher = random_maps((n, c, h, w), scale, seed=n * 100 + c)
    got = channel_wise_distillation_loss(student, teacher, temperature=temperature)
    assert got.ndim == 0 and got.dtype == torch.float32
    want = cwd_ref(student, teacher, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "c", "h", "w", "temperature", "scale"), CASES)
def test_pixel_kd_matches_reference(n, c, h, w, temperature, scale) -> None:
    student, teacher = random_maps((n, c, h, w), scale, seed=n * 100 + c + 1)
    got = pixel_kd_loss(student, teacher, temperature=temperature)
    assert got.ndim == 0 and got.dtype == torch.float32
    want = pixel_ref(student, teacher, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_references_tell_the_variants_apart() -> None:
    """The comparisons above can fail: a wrong axis, direction, reduction or T^2 differs."""
    student, teacher = random_maps((2, 4, 3, 5), 2.0, seed=1)
    temperature = 4.0
    cwd = channel_wise_distillation_loss(student, teacher, temperature=temperature).double()
    pixel = pixel_kd_loss(student, teacher, temperature=temperature).double()
    wrong_cwd = [
        pixel_ref(student, teacher, temperature),  # softmax over classes instead of positions
        cwd_ref(teacher, student, temperature),  # KL(p_s || p_t)
        cwd_ref(student, teacher, temperature) / temperature**2,  # no T^2
        cwd_ref(student, teacher, temperature) * 2 * 4,  # sum over (n, c) instead of the mean
        cwd_ref(student, teacher, temperature) / 15,  # also averaged over the H*W positions
    ]
    for wrong in wrong_cwd:
        assert not torch.allclose(cwd, wrong, rtol=1e-3, atol=0), wrong
    wrong_pixel = [
        cwd_ref(student, teacher, temperature),
        pixel_ref(teacher, student, temperature),
        pixel_ref(student, teacher, temperature) / temperature**2,
        pixel_ref(student, teacher, temperature) * 30,  # sum over pixels
    ]
    for wrong in wrong_pixel:
        assert not torch.allclose(pixel, wrong, rtol=1e-3, atol=0), wrong


def test_cwd_zero_for_identical_maps_and_non_negative() -> None:
    """Spec oracle L3: CWD(t, t) = 0 (< 1e-5 in float32) and CWD >= 0."""
    teacher, other = random_maps((4, 19, 16, 16), 10.0, seed=2)
    for temperature in (1.0, 4.0):
        same = channel_wise_distillation_loss(teacher.clone(), teacher, temperature=temperature)
        assert same.abs().item() < 1e-5
    assert channel_wise_distillation_loss(other, teacher).item() > 1e-2
    for seed in range(6):
        s, t = random_maps((2, 3, 5, 5), 0.01 * 10**seed, seed=seed)
        assert channel_wise_distillation_loss(s, t).item() >= 0.0
        assert pixel_kd_loss(s, t).item() >= 0.0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cwd_invariant_to_per_channel_constants(temperature: float) -> None:
    """Spec oracle L3: the spatial softmax ignores a constant added to a whole (n, c) map."""
    student, teacher = random_maps((3, 5, 6, 6), 3.0, seed=3)
    gen = torch.Generator().manual_seed(4)
    shift_s = torch.randn(3, 5, 1, 1, generator=gen) * 20
    shift_t = torch.randn(3, 5, 1, 1, generator=gen) * 20
    base = channel_wise_distillation_loss(student, teacher, temperature=temperature)
    for s, t in ((student + shift_s, teacher), (student, teacher + shift_t)):
        got = channel_wise_distillation_loss(s, t, temperature=temperature)
        torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-5)
    # A per-pixel shift (the same for every channel) changes CWD but not pixel KD.
    pixel_shift = torch.randn(3, 1, 6, 6, generator=gen) * 5
    shifted = channel_wise_distillation_loss(
        student + pixel_shift, teacher, temperature=temperature
    )
    assert not torch.allclose(shifted, base, rtol=1e-2)
    torch.testing.assert_close(
        pixel_kd_loss(student + pixel_shift, teacher, temperature=temperature),
        pixel_kd_loss(student, teacher, temperature=temperature),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("temperature", [2.0, 4.0, 8.0])
def test_t_squared_scaling(temperature: float) -> None:
    """Spec oracle L3: CWD(T) / T^2 is the plain mean KL of the maps divided by T."""
    student, teacher = random_maps((2, 3, 4, 4), 5.0, seed=5)
    got = channel_wise_distillation_loss(student, teacher, temperature=temperature).double()
    mean_kl = cwd_ref(student / temperature, teacher / temperature, 1.0)
    torch.testing.assert_close(got / temperature**2, mean_kl, rtol=1e-5, atol=1e-9)
    pixel = pixel_kd_loss(student, teacher, temperature=temperature).double()
    pixel_mean_kl = pixel_ref(student / temperature, teacher / temperature, 1.0)
    torch.testing.assert_close(pixel / temperature**2, pixel_mean_kl, rtol=1e-5, atol=1e-9)


def test_gradients_float64_and_teacher_not_detached() -> None:
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.tensor([[[0, 1, 255, 2]] * 3, [[255, 1, 1, 0]] * 3])
    assert channel_wise_distillation_loss(s, t).dtype == torch.float64
    for loss in (
        lambda s, t: channel_wise_distillation_loss(s, t, temperature=2.0),
        lambda s, t: pixel_kd_loss(s, t, temperature=2.0, target=target),
    ):
        assert torch.autograd.gradcheck(loss, (s, t))
        s.grad = t.grad = None
        loss(s, t).backward()
        assert t.grad is not None and t.grad.abs().sum() > 0  # callers detach, not the loss


def test_pixel_kd_ignores_masked_pixels() -> None:
    student, teacher = random_maps((2, 4, 5, 6), 3.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    target = torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[torch.rand(2, 5, 6, generator=gen) < 0.4] = 255
    valid = target != 255
    assert 0 < valid.sum() < valid.numel()
    got = pixel_kd_loss(student, teacher, temperature=4.0, target=target)
    torch.testing.assert_close(
        got.double(), pixel_ref(student, teacher, 4.0, valid), rtol=1e-5, atol=1e-6
    )
    # Garbage at ignored pixels changes nothing; garbage at a valid pixel does.
    noisy = student.clone()
    noisy[~valid[:, None].expand_as(noisy)] = 1e4
    assert torch.equal(pixel_kd_loss(noisy, teacher, temperature=4.0, target=target), got)
    y, x = valid[0].nonzero()[0]
    noisy[0, 0, y, x] += 5.0  # one class only: a shift of all classes would not change softmax
    assert not torch.equal(pixel_kd_loss(noisy, teacher, temperature=4.0, target=target), got)
    # Another ignore value.
    other = torch.where(valid, target, torch.full_like(target, -1))
    assert torch.equal(
        pixel_kd_loss(student, teacher, temperature=4.0, target=other, ignore_index=-1), got
    )
    # No pixel ignored == no target.
    torch.testing.assert_close(
        pixel_kd_loss(student, teacher, target=torch.zeros_like(target)),
        pixel_kd_loss(student, teacher),
    )


def test_pixel_kd_all_ignored_is_zero_with_finite_grad() -> None:
    student, teacher = random_maps((2, 3, 4, 4), 3.0, seed=9)
    student.requires_grad_(True)
    target = torch.full((2, 4, 4), 255)
    loss = pixel_kd_loss(student, teacher, target=target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_pixel_kd_resizes_target_nearest() -> None:
    """A label map at twice the logits' size, built by repeating each label 2x2, is resized back
    to the small map exactly by nearest-neighbour."""
    student, teacher = random_maps((2, 3, 4, 5), 3.0, seed=10)
    gen = torch.Generator().manual_seed(11)
    small = torch.randint(0, 3, (2, 4, 5), generator=gen)
    small[:, 1:3, 2] = 255
    large = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    want = pixel_kd_loss(student, teacher, target=small)
    assert torch.equal(pixel_kd_loss(student, teacher, target=large), want)
    torch.testing.assert_close(
        want.double(), pixel_ref(student, teacher, 4.0, small != 255), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("loss", [channel_wise_distillation_loss, pixel_kd_loss])
def test_bfloat16_inputs_give_float32(loss) -> None:
    student, teacher = random_maps((2, 5, 8, 8), 3.0, seed=12)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    got = loss(s16, t16, temperature=4.0)
    assert got.dtype == torch.float32
    # Exact on the bf16 values it was given (no half-precision maths inside).
    want = loss(s16.float(), t16.float(), temperature=4.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torch.nn.Conv2d(5, 5, 1)
        out = conv(student)
        assert out.dtype == torch.bfloat16
        assert loss(out, teacher, temperature=4.0).dtype == torch.float32


def test_shape_errors() -> None:
    s = torch.randn(2, 3, 8, 8)
    for loss in (channel_wise_distillation_loss, pixel_kd_loss):
        with pytest.raises(ValueError, match=r"different spatial sizes.*F\.interpolate"):
            loss(s, torch.randn(2, 3, 4, 4))
        with pytest.raises(ValueError, match="same classes"):
            loss(s, torch.randn(2, 4, 8, 8))
        with pytest.raises(ValueError, match=r"expected \(N, C, H, W\) logits"):
            loss(s[0], torch.randn(3, 8, 8))
        with pytest.raises(ValueError, match="temperature must be > 0"):
            loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match=r"integer \(N, H, W\) label map"):
        pixel_kd_loss(s, s, target=torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer \(N, H, W\) label map"):
        pixel_kd_loss(s, s, target=torch.zeros(2, 8, 8))
