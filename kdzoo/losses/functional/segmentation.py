"""Logit distillation losses for dense prediction: channel-wise (CWD) and pixel-wise KD.

- CWD: Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction",
  ICCV 2021, arXiv:2011.13256. Checked against mmrazor's ``ChannelWiseDivergence``
  (github.com/open-mmlab/mmrazor, ``mmrazor/models/losses/cwd.py``) and CIRKD's ``CriterionCWD``
  (github.com/winycg/CIRKD, ``losses/cwd.py``): spatial softmax per channel, KL summed over
  positions, ``T^2 / (N * C)``. LAD (Qiu et al., ECCV 2024, arXiv:2407.13254) distils with it on
  the 1/8-resolution head logits, T = 4.
- Pixel-wise KD: Hinton et al.'s KD (arXiv:1503.02531) at every pixel, as CIRKD's ``CriterionKD``
  (``losses/kd.py``: ``kl_div(..., reduction="batchmean") * T^2`` over the N*H*W pixel rows), plus
  an optional ignore mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdzoo.validation import check_positive

__all__ = ["channel_wise_distillation_loss", "pixel_kd_loss"]


def channel_wise_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0
) -> torch.Tensor:
    r"""Channel-wise distillation: KL between per-channel spatial distributions.

    For each sample ``n`` and channel ``c`` the map ``z_{n,c}`` becomes a distribution over the
    ``H*W`` positions, :math:`\phi(z_{n,c}) = \mathrm{softmax}(z_{n,c} / T)`, and

    .. math::
        \mathcal{L}_{CWD} = \frac{T^2}{N C} \sum_{n,c}
            \mathrm{KL}\big(\phi(t_{n,c}) \,\|\, \phi(s_{n,c})\big).

    The loss is invariant to adding a per-(n, c) constant to either input (the spatial softmax is
    shift invariant) and is 0 iff the two maps differ by such constants.

    Args:
        student_logits: ``(N, C, H, W)`` student logits (or features).
        teacher_logits: ``(N, C, H, W)`` teacher logits, same shape. Not detached here (so LAD's
            symmetric dual-path term can be written with explicit ``detach()``): callers decide.
        temperature: softening temperature ``T > 0``.

    Raises:
        ValueError: non-positive temperature, inputs that are not 4-D, or shapes that differ.
            Different spatial sizes are rejected, not resized: resize the student (or teacher)
            logits with ``F.interpolate`` before the call if that is what you want.
    """
    _check_pair(student_logits, teacher_logits, temperature)
    n, c = student_logits.shape[:2]
    # At least float32: under bf16 autocast a softmax over thousands of positions loses the
    # small probabilities whose log-ratios make up the KL.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype).flatten(2) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype).flatten(2) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * temperature**2 / (n * c)


def pixel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    ignore_index: int = 255,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Pixel-wise KD: class-distribution KL at every pixel, averaged over valid pixels.

    .. math::
        \mathcal{L}_{pix} = \frac{T^2}{|V|} \sum_{(n,h,w) \in V}
            \mathrm{KL}\big(\mathrm{softmax}(t_{n,:,h,w} / T) \,\|\,
            \mathrm{softmax}(s_{n,:,h,w} / T)\big)

    ``V`` is every pixel, or the pixels where ``target != ignore_index`` when ``target`` is given.
    The ``T^2`` factor follows Hinton et al. and CIRKD's pixel-wise KD, so the gradient scale does
    not depend on ``T``; LAD's commented-out pixel-KL variant omits it (and adds 1e-5 inside the
    logs): divide by ``T^2`` (i.e. scale the loss weight) to reproduce that one.

    Args:
        student_logits: ``(N, C, H, W)`` student logits.
        teacher_logits: ``(N, C, H, W)`` teacher logits, same shape; not detached here (callers
            decide).
        temperature: softening temperature ``T > 0``.
        ignore_index: label value of pixels left out of the mean.
        target: optional ``(N, H', W')`` integer label map; resized to ``(H, W)`` with
            nearest-neighbour interpolation when its size differs from the logits'.

    Returns:
        A scalar in at least float32. 0 when every pixel is ignored (with a gradient, not NaN).
    """
    _check_pair(student_logits, teacher_logits, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (N, H, W)
    if target is None:
        return kl.mean() * temperature**2
    valid = _resize_target(target, student_logits) != ignore_index
    # where, not multiply: masked pixels contribute exactly 0 even if their KL is inf.
    total = torch.where(valid, kl, torch.zeros_like(kl)).sum()
    return total / valid.sum().clamp_min(1) * temperature**2


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    check_positive(temperature=temperature)
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(
            f"expected (N, C, H, W) logits, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ in batch size or number of classes: do student and teacher predict the same "
            "classes?"
        )
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "have different spatial sizes: resize one to the other's (H, W) with "
            "F.interpolate(..., mode='bilinear', align_corners=False) before the loss"
        )


def _resize_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``target`` as ``(N, H, W)`` at the logits' spatial size (nearest-neighbour)."""
    if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.is_floating_point():
        raise ValueError(
            f"target must be an integer (N, H, W) label map with N = {logits.shape[0]}, got "
            f"{target.dtype} of shape {tuple(target.shape)}"
        )
    size = logits.shape[2:]
    if target.shape[1:] == size:
        return target
    # Label ids (<= 2^24) are exact in float32; nearest keeps them ids (no blending).
    resized = F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].to(target.dtype)
