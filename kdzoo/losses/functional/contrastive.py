"""RMT's contrastive loss: SupCon over three views per test sample, without labels.

Döbler, Marsden, Yang. "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation".
CVPR 2023, arXiv:2211.13081; code: github.com/mariodoebler/test-time-adaptation
(``methods/rmt.py``, ``contrastive_loss``, integrated from HobbitLong/SupContrast), read through
kdzoo's spec ``tta.md`` section 4.3 step 5. The views of test sample ``i`` are its nearest source
prototype, its clean feature and its augmented feature; SupCon's "all" mode takes every one of
the ``3B`` vectors as an anchor, the two other views of the same sample as positives and every
other non-self vector (other samples' views and prototypes included) as negatives.

Follows the code: the temperature scale factor ``temperature / base_temperature`` is 1 (the code
sets ``base_temperature = temperature``), the loss is the mean over all ``3B`` anchors, and the
prototypes are the raw (un-projected) class means, which go through the projector like the
features. The code's subtraction of the row maximum is replaced by ``logsumexp`` (the same value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["nearest_prototypes", "rmt_contrastive_loss", "supcon_loss"]


def supcon_loss(views: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    r"""Self-supervised SupCon loss ("all" mode) of ``V`` views of ``B`` samples.

    With ``u_a`` the L2-normalised vectors (``N = V * B`` of them), ``P(a)`` the ``V - 1`` other
    views of anchor ``a``'s sample and ``\tau`` the temperature:

    .. math::
        \ell_a = -\frac{1}{|P(a)|} \sum_{p \in P(a)}
            \log \frac{\exp(u_a \cdot u_p / \tau)}{\sum_{b \neq a} \exp(u_a \cdot u_b / \tau)},
        \qquad L = \frac{1}{N} \sum_a \ell_a .

    If all vectors are equal, ``L = ln(N - 1)``; for any input with ``V = 3``, ``L >= ln 2``.

    Args:
        views: ``(B, V, D)`` vectors, already projected and L2-normalised (``V >= 2``).
        temperature: ``\tau``.

    Returns:
        The scalar mean over the ``V * B`` anchors (float32 or wider).
    """
    if views.ndim != 3 or views.shape[1] < 2:
        raise ValueError(f"views must be (B, V >= 2, D), got {tuple(views.shape)}")
    batch, count = views.shape[:2]
    dtype = torch.promote_types(views.dtype, torch.float32)
    # View-major order, as the code's ``torch.cat(torch.unbind(features, dim=1))``.
    u = views.to(dtype).transpose(0, 1).reshape(batch * count, -1)
    logits = u @ u.T / temperature
    n = batch * count
    self_mask = torch.eye(n, dtype=torch.bool, device=u.device)
    sample = torch.arange(n, device=u.device) % batch
    positives = (sample[:, None] == sample[None, :]) & ~self_mask
    log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
    mean_log_prob_pos = (log_prob * positives).sum(dim=1) / (count - 1)
    return -mean_log_prob_pos.mean()


@torch.no_grad()
def nearest_prototypes(prototypes: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Index of the source prototype with the largest cosine similarity to each feature.

    Args:
        prototypes: ``(C, D)`` class prototypes.
        features: ``(B, D)`` features.

    Returns:
        ``(B,)`` long indices into ``prototypes``.
    """
    similarity = F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T
    return similarity.argmax(dim=1)


def rmt_contrastive_loss(
    prototypes: torch.Tensor,
    features: torch.Tensor,
    aug_features: torch.Tensor,
    projector: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = 0.1,
) -> torch.Tensor:
    """RMT's contrastive term ``L_cont`` (spec 4.3 step 5).

    Sample ``i``'s views are ``{p_k(i), f_i, f~_i}`` with ``k(i)`` the nearest source prototype
    of the clean feature by cosine similarity (no gradient). All ``3B`` vectors go through
    ``projector`` and are L2-normalised, then :func:`supcon_loss` (mean over the ``3B`` anchors).
    Gradients reach ``features`` and ``aug_features`` and the projector through all three views;
    the prototypes are constants.

    Args:
        prototypes: ``(C, D)`` raw source class means.
        features: ``(B, D)`` student features of the clean batch.
        aug_features: ``(B, D)`` student features of the augmented batch.
        projector: maps ``(N, D)`` to ``(N, P)`` (RMT: Linear-ReLU-Linear).
        temperature: SupCon temperature (RMT: 0.1).
    """
    if features.shape != aug_features.shape:
        raise ValueError(
            f"clean features {tuple(features.shape)} and augmented features "
            f"{tuple(aug_features.shape)} must have the same shape"
        )
    nearest = prototypes.detach()[nearest_prototypes(prototypes, features)]
    views = torch.stack([nearest.to(features.dtype), features, aug_features], dim=1)
    batch = views.shape[0]
    projected = projector(views.reshape(batch * 3, -1)).reshape(batch, 3, -1)
    return supcon_loss(F.normalize(projected, p=2, dim=2), temperature=temperature)
