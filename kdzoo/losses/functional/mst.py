r"""The losses of MST-Distill (cross-modal KD from a mixture of specialised teachers).

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015. Written from the official code, github.com/Gray-OREO/MST-Distill
(``main-MST-Distill.py`` and ``KD_methods/MST.py``: ``distillation_loss``,
``distillation_loss_detached``, ``k_ways_MTGdistillation_detached``, ``load_balancing_loss``);
the paper's text could not be checked. Every KL uses ``T = 4``, the ``batchmean`` reduction and
a ``T^2`` factor, as :func:`~kdzoo.losses.functional.kd_loss`:
``KD(s, t) = T^2 / N * sum_i KL(softmax(t_i / T) || softmax(s_i / T))``.

- Stage 1, co-training (:func:`mst_cotraining_losses`): for each network ``n``,
  ``L_n = CE(z_n, y) + sum_{o != n} KD(z_n, z_o)``, nothing detached (deep mutual learning).
- Stage 2, MaskNets (:func:`mst_mask_loss`): ``KD(z_mask, z_S)``, i.e.
  ``T^2 KL(p_S || p_mask)`` with the student detached: the masked teacher moves to the student.
- Stage 3, routed KD (:func:`mst_routed_kd_loss`) and load balancing
  (:func:`mst_load_balancing_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdzoo.losses.functional.kd import kd_loss

__all__ = [
    "mst_cotraining_losses",
    "mst_load_balancing_loss",
    "mst_mask_loss",
    "mst_routed_kd_loss",
]


def mst_cotraining_losses(
    logits: Sequence[torch.Tensor], target: torch.Tensor, *, temperature: float = 4.0
) -> list[torch.Tensor]:
    r"""Stage-1 losses, one per network: ``L_n = CE(z_n, y) + sum_{o != n} KD(z_n, z_o)``.

    .. math::
        L_n = \mathrm{CE}(z_n, y) + \sum_{o \ne n} \frac{T^2}{N} \sum_i
            \mathrm{KL}\big(\mathrm{softmax}(z_{o,i}/T) \,\|\, \mathrm{softmax}(z_{n,i}/T)\big)

    No term is detached, so every pair sends gradient to both networks (the repo optimises
    ``L_T + L_A + L_S`` with one Adam).

    Args:
        logits: ``(N, K)`` logits of each network (MST: fusion teacher, cross-modal teacher,
            student).
        target: ``(N,)`` class indices.
        temperature: ``T`` of the KL terms.
    """
    losses = []
    for n, own in enumerate(logits):
        loss = F.cross_entropy(own.float(), target)
        for o, other in enumerate(logits):
            if o != n:
                loss = loss + kd_loss(own, other, temperature=temperature)
        losses.append(loss)
    return losses


def mst_mask_loss(
    masked_teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, temperature: float = 4.0
) -> torch.Tensor:
    r"""Stage-2 loss of one MaskNet: ``T^2 KL(softmax(z_S/T) || softmax(z_mask/T))``, batch mean.

    The student's logits are detached: only the masked teacher (through its MaskNet) moves. The
    repo calls its KD loss with the masked teacher as the "student" argument and the student as
    the "target".
    """
    return kd_loss(masked_teacher_logits, student_logits.detach(), temperature=temperature)


def mst_routed_kd_loss(
    student_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    gate_probs: torch.Tensor,
    *,
    top_k: int = 1,
    temperature: float = 4.0,
    gate_weighted: bool = False,
) -> torch.Tensor:
    r"""Stage-3 KD from the ``top_k`` experts the router picks for each sample.

    With ``S_i`` the indices of the ``k`` largest ``g_i`` and
    ``KL_{ie} = KL(softmax(z_{e,i}/T) || softmax(z_{S,i}/T))`` (experts detached):

    - ``gate_weighted=False`` (the repo): :math:`\frac{T^2}{N k} \sum_i \sum_{e \in S_i} KL_{ie}`,
      the unweighted mean over the selected experts of the batch-mean KD. Top-k selection is not
      differentiable and ``g`` does not multiply the terms, so **no gradient reaches the gate**
      from this loss (only from the load-balancing loss).
    - ``gate_weighted=True`` (a variant, not in the repo): each term is weighted by the
      renormalised gate value ``w_{ie} = g_{ie} / sum_{e' in S_i} g_{ie'}``:
      :math:`\frac{T^2}{N} \sum_i \sum_{e \in S_i} w_{ie} KL_{ie}`, so the router learns which of
      its selected experts the student imitates best. With ``k = 1`` the weight is identically 1
      and the gate gets no gradient either.

    Args:
        student_logits: ``(N, K)``.
        expert_logits: ``(N, E, K)`` logits of the ``E`` specialised teachers (detached here).
        gate_probs: ``(N, E)`` routing probabilities ``softmax(GateNet(z_S))``.
        top_k: ``k``, ``1 <= k <= E`` (repo default 1).
        temperature: ``T``.
        gate_weighted: weight the KD terms by the renormalised top-k gate values.
    """
    n, e, k_classes = expert_logits.shape
    if student_logits.shape != (n, k_classes) or gate_probs.shape != (n, e):
        raise ValueError(
            f"expected student logits (N, K), expert logits (N, E, K) and gate probabilities "
            f"(N, E); got {tuple(student_logits.shape)}, {tuple(expert_logits.shape)} and "
            f"{tuple(gate_probs.shape)}"
        )
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in 1..{e} (the number of experts), got {top_k}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    top_probs, top_index = gate_probs.topk(top_k, dim=1)
    chosen = expert_logits.detach().gather(1, top_index[..., None].expand(-1, -1, k_classes))
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)[:, None]
    log_p_expert = F.log_softmax(chosen.to(dtype) / temperature, dim=-1)
    kl = (log_p_expert.exp() * (log_p_expert - log_p_student)).sum(dim=-1)  # (N, k)
    if gate_weighted:
        weights = top_probs.to(dtype) / top_probs.to(dtype).sum(dim=1, keepdim=True)
    else:
        weights = torch.full_like(kl, 1.0 / top_k)
    return temperature**2 * (weights * kl).sum(dim=1).mean()


def mst_load_balancing_loss(gate_probs: torch.Tensor, *, mode: str = "KL") -> torch.Tensor:
    r"""Load-balancing regulariser on the batch's routing probabilities ``(N, E)``.

    - ``"KL"`` (repo default): with ``p = mean_i g_i`` and ``u = 1/E``,
      :math:`\frac{1}{E} \mathrm{KL}(u \| p) = \frac{1}{E} \sum_e u_e \log(u_e / p_e)`. The
      ``1/E`` is the repo's: ``KLDivLoss(reduction="batchmean")`` on a length-``E`` vector
      divides by ``E``. ``p`` is clamped at the smallest normal float so that an expert no
      sample routes to gives a large finite loss instead of ``inf``.
    - ``"CV"``: coefficient of variation of the importances ``I_e = sum_i g_ie``,
      ``std(I) / mean(I)`` with the unbiased (``N - 1``) std; 0 for a single expert.

    Zero when the routing is balanced (``p`` uniform, or equal importances).
    """
    if mode not in ("KL", "CV"):
        raise ValueError(f"load-balancing mode must be 'KL' or 'CV', got {mode!r}")
    probs = gate_probs.to(torch.promote_types(gate_probs.dtype, torch.float32))
    num_experts = probs.shape[1]
    if mode == "KL":
        mean = probs.mean(dim=0).clamp_min(torch.finfo(probs.dtype).tiny)
        uniform = 1.0 / num_experts
        return (uniform * (math.log(uniform) - mean.log())).sum() / num_experts
    if num_experts == 1:  # one expert is always balanced (and its std is undefined)
        return probs.sum() * 0.0
    importance = probs.sum(dim=0)
    return importance.std() / importance.mean()
