"""Conditional mutual information (CMI) of a classifier's predictions given the label.

Ye, Hamidi, Tan, Yang. "Bayes Conditional Distribution Estimation for Knowledge Distillation"
(MCMI: maximum conditional mutual information). ICLR 2024, arXiv:2401.08732. Official code:
github.com/iclr2024mcmi/ICLRMCMI (read at ``d12f354``): ``CE_KL_loss`` / ``CE_KL_PWCE_loss`` in
``CIFAR100-FewShot/losses.py`` (the working copy; ``ZeroShot/losses.py``'s cannot be constructed,
``pair_wise_CE`` being undefined there), ``F.kl_div(Q_y.log(), log_softmax(z), log_target=True,
reduction="batchmean")``, which is the batch mean of ``KL(P || Q_y)`` (kdzoo spec, section 4).
"""

from __future__ import annotations

import torch

from kdzoo.losses.functional._checks import check_class_targets

__all__ = ["conditional_mutual_information"]


def conditional_mutual_information(
    probs: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    r"""Batch estimate of :math:`I(X; \hat Y \mid Y)`: the mean KL divergence to the class centroid.

    For predicted distributions :math:`P_i` (rows of ``probs``), labels :math:`y_i` and class
    centroids :math:`Q_y` (rows of ``centroids``, the class-conditional means of :math:`P`):

    .. math::
        \hat I = \frac{1}{N} \sum_{i=1}^{N} \mathrm{KL}\big(P_i \,\|\, Q_{y_i}\big)
               = \frac{1}{N} \sum_{i=1}^{N} \sum_{c=1}^{C} P_{i,c}
                 \big(\log P_{i,c} - \log Q_{y_i,c}\big)

    Conventions (paper section 3, official code, kdzoo spec section 4):

    - Direction :math:`\mathrm{KL}(P \| Q)`, the code's ``F.kl_div(log Q, log P,
      log_target=True)``; swapping the arguments gives :math:`\mathrm{KL}(Q \| P)` (pitfall 5).
    - ``probs`` are the softmax at :math:`T = 1`; no temperature and no :math:`T^2` factor.
    - Reduction: summed over classes, averaged over the batch (``batchmean``).
    - Entries with :math:`P_{i,c} = 0` contribute 0 (:math:`0 \log 0 = 0`), with a finite
      gradient; :math:`\log Q` is clamped at ``torch.finfo(dtype).tiny`` so a centroid entry that
      underflowed to 0 gives a large finite value instead of ``inf`` (pitfall 6). Neither
      changes the value for normal floating-point inputs.
    - ``centroids`` are used as given (the code treats them as a fixed target; detach them if they
      carry gradients you do not want); ``probs`` are not detached.
    - Computed in at least float32 (float64 inputs stay float64).

    When :math:`Q_y` is the mean of the :math:`P_i` of class :math:`y` over the batch,
    :math:`\hat I = \sum_y \frac{n_y}{N} [H(Q_y) - \frac{1}{n_y} \sum_{i: y_i = y} H(P_i)]`, which
    lies in :math:`[0, \log C]`. With :math:`Q` fixed, the gradient of one sample's term with
    respect to its logits :math:`z` is :math:`P \odot (\log P - \log Q_y - \mathrm{KL}\,\mathbf 1)`.

    Args:
        probs: ``(N, C)`` predicted class probabilities (rows sum to 1).
        target: ``(N,)`` integer labels in ``[0, C)``. Checking their range costs one
            device-to-host synchronisation.
        centroids: ``(C, C)`` class centroids; row ``y`` is :math:`Q_y`, a distribution over the
            ``C`` classes.

    Returns:
        A scalar: the batch mean of :math:`\mathrm{KL}(P_i \| Q_{y_i})`, in nats.
    """
    if probs.ndim != 2:
        raise ValueError(
            f"probs must be (N, C) class probabilities, got shape {tuple(probs.shape)}"
        )
    n, num_classes = probs.shape
    if centroids.shape != (num_classes, num_classes):
        raise ValueError(
            f"centroids must be ({num_classes}, {num_classes}): one distribution over the "
            f"{num_classes} classes of probs per class, got shape {tuple(centroids.shape)}"
        )
    check_class_targets(target, n, num_classes, "probabilities")

    # At least float32: under bf16/fp16 autocast log P and log Q lose most digits.
    dtype = torch.promote_types(torch.promote_types(probs.dtype, centroids.dtype), torch.float32)
    p = probs.to(dtype)
    q = centroids.to(dtype)[target.long()]
    tiny = torch.finfo(dtype).tiny
    # P * (log P - log Q): P = 0 gives exactly 0, and the clamps keep both logs (and so the
    # gradient) finite where P or Q is 0.
    per_sample = (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(dim=1)
    return per_sample.mean()
