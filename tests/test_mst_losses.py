"""Reference tests for the MST-Distill losses (spec ``crossmodal_active.md`` section 1.13).

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015 (code github.com/Gray-OREO/MST-Distill). The references below are written
from the formulas of spec sections 1.6-1.8 with explicit loops and sums in float64 (no
``F.kl_div``, no ``topk``), so a wrong reduction, KL direction, ``T^2`` factor or ``1/E`` factor
shows up as a mismatch; the exact numbers are the spec's oracles.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdzoo.losses.functional import (
    mst_cotraining_losses,
    mst_load_balancing_loss,
    mst_mask_loss,
    mst_routed_kd_loss,
)

T = 4.0


# ---- references, from the formulas ----------------------------------------------------------
def log_softmax_ref(z: torch.Tensor) -> torch.Tensor:
    z = z.double() - z.double().max(dim=-1, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))


def kl_ref(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(p/T) || softmax(q/T)) in float64."""
    log_p = log_softmax_ref(p_logits / temperature)
    log_q = log_softmax_ref(q_logits / temperature)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def kd_ref(student: torch.Tensor, teacher: torch.Tensor, temperature: float = T) -> torch.Tensor:
    """T^2 * batch mean of KL(p_teacher || p_student)."""
    return temperature**2 * kl_ref(teacher, student, temperature).mean()


def ce_ref(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_p = log_softmax_ref(logits)
    return -log_p[torch.arange(len(target)), target].mean()


def routed_ref(student, experts, gates, k, weighted=False, temperature=T) -> float:
    """Loop over samples: the k experts with the largest gate values, KD to each, averaged."""
    n, e, _ = experts.shape
    total = 0.0
    for i in range(n):
        order = sorted(range(e), key=lambda j: -float(gates[i, j]))[:k]
        mass = sum(float(gates[i, j]) for j in order)
        for j in order:
            kl = float(kl_ref(experts[i, j][None], student[i][None], temperature)[0])
            weight = float(gates[i, j]) / mass if weighted else 1.0 / k
            total += weight * kl
    return temperature**2 * total / n


def lb_kl_ref(gates: torch.Tensor) -> float:
    n, e = gates.shape
    mean = [sum(float(gates[i, j]) for i in range(n)) / n for j in range(e)]
    return sum((1 / e) * math.log((1 / e) / mean[j]) for j in range(e)) / e


def lb_cv_ref(gates: torch.Tensor) -> float:
    importance = [float(gates[:, j].double().sum()) for j in range(gates.shape[1])]
    mean = sum(importance) / len(importance)
    var = sum((x - mean) ** 2 for x in importance) / (len(importance) - 1)
    return math.sqrt(var) / mean


def random_case(n=6, e=4, k_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, k_classes, generator=g) * 2
    experts = torch.randn(n, e, k_classes, generator=g) * 3
    gates = torch.randn(n, e, generator=g).softmax(dim=1)
    return student, experts, gates


# ---- spec oracle 1: one expert is plain KD --------------------------------------------------
def test_one_expert_is_plain_kd_with_the_spec_number():
    student = torch.zeros(1, 2)
    experts = torch.tensor([[[4 * math.log(2.0), 0.0]]])  # teacher probabilities (2/3, 1/3)
    gates = torch.ones(1, 1)
    loss = mst_routed_kd_loss(student, experts, gates, top_k=1, temperature=T)
    assert loss.item() == pytest.approx(0.906128, abs=1e-6)
    assert mst_load_balancing_loss(gates).item() == 0.0  # p = [1]: nothing to balance
    assert mst_load_balancing_loss(gates, mode="CV").item() == 0.0


# ---- spec oracle 2: load balancing ----------------------------------------------------------
def test_load_balancing_kl_spec_value():
    # Two rows whose mean is (0.7, 0.1, 0.1, 0.1).
    gates = torch.tensor([[0.9, 0.05, 0.0, 0.05], [0.5, 0.15, 0.2, 0.15]])
    got = mst_load_balancing_loss(gates, mode="KL")
    assert got.item() == pytest.approx(0.107453, abs=1e-6)
    assert got.item() == pytest.approx(lb_kl_ref(gates), rel=1e-6)
    assert got.item() * 4 == pytest.approx(0.429813, abs=1e-6)  # KL(u || p) before the 1/E


def test_load_balancing_is_zero_for_uniform_routing():
    uniform = torch.full((3, 4), 0.25)
    assert mst_load_balancing_loss(uniform, mode="KL").item() == 0.0
    assert mst_load_balancing_loss(uniform, mode="CV").item() == 0.0


def test_load_balancing_cv_spec_value():
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # importance (2,0,0,0)
    assert mst_load_balancing_loss(one_hot, mode="CV").item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_load_balancing_matches_references(seed):
    _, _, gates = random_case(n=7, e=5, seed=seed)
    kl = mst_load_balancing_loss(gates, mode="KL")
    cv = mst_load_balancing_loss(gates, mode="CV")
    assert kl.item() == pytest.approx(lb_kl_ref(gates), rel=1e-5)
    assert cv.item() == pytest.approx(lb_cv_ref(gates), rel=1e-5)


def test_load_balancing_is_finite_when_an_expert_gets_nothing():
    gates = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.isfinite(mst_load_balancing_loss(gates, mode="KL"))


# ---- spec oracle 3 and references: routed KD ------------------------------------------------
def test_all_experts_selected_is_the_mean_of_per_expert_kd():
    student, experts, gates = random_case(e=3)
    got = mst_routed_kd_loss(student, experts, gates, top_k=3).double()
    per_expert = torch.stack([kd_ref(student, experts[:, j]) for j in range(3)])
    torch.testing.assert_close(got, per_expert.mean(), rtol=1e-5, atol=1e-6)
    averaged_teacher = kd_ref(student, experts.mean(dim=1))  # the unused soft variant
    assert abs(got.item() - averaged_teacher.item()) > 1e-2


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_routed_kd_matches_reference(top_k, weighted):
    student, experts, gates = random_case(seed=top_k)
    got = mst_routed_kd_loss(student, experts, gates, top_k=top_k, gate_weighted=weighted)
    want = routed_ref(student, experts, gates, top_k, weighted)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_routed_kd_temperature_and_kl_direction():
    student, experts, gates = random_case(seed=5)
    got = mst_routed_kd_loss(student, experts, gates, top_k=2, temperature=2.0).item()
    assert got == pytest.approx(routed_ref(student, experts, gates, 2, temperature=2.0), rel=1e-5)
    reversed_kl = 0.0
    for i in range(len(student)):  # KL(p_S || p_e) instead: must differ
        for j in gates[i].topk(2).indices.tolist():
            reversed_kl += float(kl_ref(student[i][None], experts[i, j][None], 2.0)[0]) / 2
    assert abs(got - 4.0 * reversed_kl / len(student)) > 1e-3


def test_code_routing_gives_the_gate_no_gradient():
    student, experts, gates = random_case()
    student.requires_grad_(True)
    experts.requires_grad_(True)
    gates.requires_grad_(True)
    loss = mst_routed_kd_loss(student, experts, gates, top_k=2)
    d_student, d_experts, d_gates = torch.autograd.grad(
        loss, (student, experts, gates), allow_unused=True
    )
    assert d_gates is None or torch.count_nonzero(d_gates) == 0
    assert d_experts is None or torch.count_nonzero(d_experts) == 0  # teachers detached
    assert torch.count_nonzero(d_student) > 0


def test_gate_weighted_routing_trains_the_gate():
    student, experts, gates = random_case()
    gates.requires_grad_(True)
    loss = mst_routed_kd_loss(student, experts, gates, top_k=2, gate_weighted=True)
    (d_gates,) = torch.autograd.grad(loss, (gates,))
    assert torch.count_nonzero(d_gates) > 0


def test_routed_kd_rejects_bad_arguments():
    student, experts, gates = random_case(e=3)
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.3"):
        mst_routed_kd_loss(student, experts, gates, top_k=4)
    with pytest.raises(ValueError, match=r"\(N, E, K\)"):
        mst_routed_kd_loss(student[:, :3], experts, gates)
    with pytest.raises(ValueError, match="'KL' or 'CV'"):
        mst_load_balancing_loss(gates, mode="kl")


# ---- stage 2 and stage 1 losses ---------------------------------------------------------------
def test_mask_loss_pulls_the_masked_teacher_to_the_detached_student():
    student, experts, _ = random_case(seed=3)
    masked = experts[:, 0].clone().requires_grad_(True)
    student.requires_grad_(True)
    loss = mst_mask_loss(masked, student)
    want = T**2 * kl_ref(student, masked.detach(), T).mean()  # KL(p_S || p_mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    d_masked, d_student = torch.autograd.grad(loss, (masked, student), allow_unused=True)
    assert torch.count_nonzero(d_masked) > 0
    assert d_student is None


def test_cotraining_losses_match_reference_and_are_not_detached():
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(3)]
    target = torch.randint(0, 6, (5,), generator=g)
    got = mst_cotraining_losses(logits, target)
    for n in range(3):
        want = ce_ref(logits[n].detach(), target)
        for o in range(3):
            if o != n:
                want = want + kd_ref(logits[n].detach(), logits[o].detach())
        assert got[n].item() == pytest.approx(want.item(), rel=1e-5)
    # L_student (index 2) depends on the teachers' logits too: both sides of a pair train.
    d_teacher, d_cm = torch.autograd.grad(got[2], (logits[0], logits[1]))
    assert torch.count_nonzero(d_teacher) > 0 and torch.count_nonzero(d_cm) > 0
