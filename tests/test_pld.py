"""Reference tests for Plackett-Luce distillation (:func:`kdzoo.losses.functional.pld.pld_loss`)
and the :class:`kdzoo.methods.pld.PLD` method.

Bassam, Zhu, Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", NeurIPS 2025,
arXiv:2506.12542. With pi* = (label, then the other classes by descending teacher logit) and
q = softmax(t / T) over all classes:

    L = (1/N) sum_i sum_k q_{pi*_k} * [log sum_{l >= k} exp(s_{pi*_l}) - s_{pi*_k}]

The reference below builds pi* with Python's ``sorted`` (ties by ascending class index, the order
kdzoo documents) and computes every suffix log-sum-exp directly, one position at a time, in
float64: no cumulative sums, nothing shared with kdzoo. The oracles are those of the kdzoo spec
(specs/classification.md, section 2.6) and its pitfalls (section 2.5).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdzoo.errors import ConfigError
from kdzoo.losses.functional.pld import pld_loss
from kdzoo.methods.pld import PLD
from kdzoo.models import TeacherSpec

# ---- an independent reference, written from the formula -------------------------------------


def teacher_optimal_order(teacher_row: list[float], label: int, ties: str = "ascending") -> list:
    """The label, then the other classes by descending teacher logit; ties by class index."""
    sign = 1 if ties == "ascending" else -1
    others = [c for c in range(len(teacher_row)) if c != label]
    return [label, *sorted(others, key=lambda c: (-teacher_row[c], sign * c))]


def log_sum_exp(values: torch.Tensor) -> torch.Tensor:
    m = values.max()
    return m + torch.log(torch.exp(values - m).sum())


def ranked_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    ties: str = "ascending",
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Per sample i and position k of pi*_i, in float64: the weight q_{pi*_k} (full teacher
    softmax at ``temperature``), the term log sum_{l >= k} exp(s_{pi*_l}) - s_{pi*_k}, and pi*."""
    s, t = student.double(), teacher.double()
    n, c = s.shape
    alphas = torch.zeros(n, c, dtype=torch.float64)
    terms = torch.zeros(n, c, dtype=torch.float64)
    orders = []
    for i in range(n):
        order = teacher_optimal_order(t[i].tolist(), int(target[i]), ties)
        orders.append(order)
        z = t[i] / temperature
        q = torch.exp(z - z.max())
        q = q / q.sum()
        ranked = s[i, order]
        for k in range(c):
            alphas[i, k] = q[order[k]]
            terms[i, k] = log_sum_exp(ranked[k:]) - ranked[k]
    return alphas, terms, orders


def pld_reference(student, teacher, target, temperature, ties: str = "ascending") -> torch.Tensor:
    alphas, terms, _ = ranked_terms(student, teacher, target, temperature, ties)
    return (alphas * terms).sum(dim=1).mean()


def list_mle_reference(student, teacher, target) -> torch.Tensor:
    """Batch-mean ListMLE of pi*: -log PL(pi* | s) = sum_k [log sum_{l >= k} e^{s_l} - s_k]."""
    _, terms, _ = ranked_terms(student, teacher, target, 1.0)
    return terms.sum(dim=1).mean()


def closed_form_gradient(student, teacher, target, temperature) -> torch.Tensor:
    """Appendix A: dL_i/ds_j = sum_{k: j in pi*_{k..C}} alpha_k softmax(s_{pi*_{k..C}})_j
    - alpha_{pos(j)}, divided by N for the batch mean."""
    alphas, _, orders = ranked_terms(student, teacher, target, temperature)
    s = student.double()
    n, c = s.shape
    grad = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        for k in range(c):
            suffix = orders[i][k:]
            p = torch.exp(s[i, suffix] - log_sum_exp(s[i, suffix]))
            grad[i, suffix] += alphas[i, k] * p
            grad[i, orders[i][k]] -= alphas[i, k]
    return grad / n


def random_inputs(
    n: int, c: int, scale: float, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    return student, teacher, target


# ---- the reference --------------------------------------------------------------------------

CASES = [
    # (N, C, T, logit scale)
    (1, 2, 1.0, 1.0),
    (4, 10, 1.0, 3.0),
    (8, 10, 4.0, 1.0),
    (3, 100, 4.0, 5.0),
    (16, 7, 2.5, 50.0),  # large logits: near one-hot teacher, huge suffix gaps
    (5, 100, 1.0, 50.0),
    (6, 10, 0.5, 2.0),
    (3, 1, 1.0, 1.0),  # one class: the loss is 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "c", "temperature", "scale"), CASES)
def test_matches_reference(n, c, temperature, scale, dtype) -> None:
    student, teacher, target = random_inputs(n, c, scale, seed=n * 1000 + c, dtype=dtype)
    got = pld_loss(student, teacher, target, temperature=temperature)
    want = pld_reference(student, teacher, target, temperature)
    assert got.ndim == 0
    assert got.dtype == dtype
    if dtype == torch.float64:
        # Spec oracle 6: the cumulative and brute-force forms agree to 1e-9.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_cumulative_form_matches_brute_force_float64() -> None:
    """Spec oracle 6 on more random shapes, including wide logit ranges."""
    for seed in range(8):
        gen = torch.Generator().manual_seed(100 + seed)
        n, c = (int(v) for v in torch.randint(1, 30, (2,), generator=gen))
        scale = [0.1, 1.0, 10.0, 50.0][seed % 4]
        temperature = [0.5, 1.0, 2.0, 4.0][seed // 2]
        student, teacher, target = random_inputs(n, c, scale, seed, dtype=torch.float64)
        got = pld_loss(student, teacher, target, temperature=temperature)
        want = pld_reference(student, teacher, target, temperature)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_reference_rejects_wrong_variants() -> None:
    """The comparison above can fail: plausible mistakes give clearly different numbers."""
    student, teacher, target = random_inputs(8, 10, 2.0, seed=1, dtype=torch.float64)
    temperature = 2.0
    got = pld_loss(student, teacher, target, temperature=temperature)
    alphas, terms, _ = ranked_terms(student, teacher, target, temperature)
    first_weight_one = alphas.clone()
    first_weight_one[:, 0] = 1.0
    # Weights renormalised over the classes still remaining at step k.
    suffix_mass = alphas.flip(1).cumsum(1).flip(1)
    # pi* without moving the label first: plain teacher order.
    plain = torch.stack([row.argsort(descending=True, stable=True) for row in teacher])
    label_not_first = pld_reference(student, teacher, plain[:, 0], temperature)
    wrong = {
        "first weight 1": (first_weight_one * terms).sum(1).mean(),
        "suffix-renormalised weights": (alphas / suffix_mass * terms).sum(1).mean(),
        "student / T": pld_reference(student / temperature, teacher, target, temperature),
        "T^2 factor": temperature**2 * pld_reference(student, teacher, target, temperature),
        "ascending teacher order": pld_reference(student, -teacher, target, temperature),
        "label not first": label_not_first,
        "sum over batch": (alphas * terms).sum(),
        "uniform weights": terms.sum(1).mean() / 10,
    }
    for name, value in wrong.items():
        assert not torch.allclose(got, value, rtol=1e-3, atol=0), name


# ---- the spec's oracles (section 2.6) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_one_hot_teacher_is_cross_entropy(dtype, temperature) -> None:
    """q = e_y (t_y = 1e4, others 0) leaves only the k = 1 term: -log softmax(s)_y."""
    student, _, target = random_inputs(6, 10, 3.0, seed=2, dtype=dtype)
    teacher = torch.zeros_like(student)
    teacher[torch.arange(6), target] = 1e4
    got = pld_loss(student, teacher, target, temperature=temperature)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, F.cross_entropy(student, target), rtol=tol, atol=tol)
    # ...and not cross-entropy for a soft teacher, so the check above can fail.
    soft = torch.randn_like(student)
    assert not torch.allclose(
        pld_loss(student, soft, target, temperature=temperature),
        F.cross_entropy(student, target),
        rtol=1e-2,
    )


def test_translation_invariance() -> None:
    """L(s + c 1, t) = L(s, t + c 1) = L(s, t) for per-sample constants c."""
    student, teacher, target = random_inputs(5, 12, 3.0, seed=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    shift_s = torch.randn(5, 1, generator=gen, dtype=torch.float64) * 20
    shift_t = torch.randn(5, 1, generator=gen, dtype=torch.float64) * 20
    for temperature in (1.0, 4.0):
        base = pld_loss(student, teacher, target, temperature=temperature)
        shifted_s = pld_loss(student + shift_s, teacher, target, temperature=temperature)
        shifted_t = pld_loss(student, teacher + shift_t, target, temperature=temperature)
        torch.testing.assert_close(shifted_s, base, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shifted_t, base, rtol=1e-12, atol=1e-12)
        # A per-class shift changes the ranking likelihood, hence the loss.
        col_shift = torch.arange(12.0, dtype=torch.float64)
        assert not torch.allclose(
            pld_loss(student + col_shift, teacher, target, temperature=temperature),
            base,
            rtol=1e-2,
        )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_two_classes_is_teacher_weighted_cross_entropy(temperature) -> None:
    """C = 2: the k = 2 term is 0, so L_i = q_y * CE_i (batch mean of the products)."""
    student, teacher, target = random_inputs(6, 2, 3.0, seed=5, dtype=torch.float64)
    q_y = torch.softmax(teacher / temperature, dim=1)[torch.arange(6), target]
    ce = F.cross_entropy(student, target, reduction="none")
    got = pld_loss(student, teacher, target, temperature=temperature)
    torch.testing.assert_close(got, (q_y * ce).mean(), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, ce.mean(), rtol=1e-2)
    assert not torch.allclose(got, q_y.mean() * ce.mean(), rtol=1e-3)


def test_infinite_temperature_is_list_mle_over_c() -> None:
    """T -> infinity: alpha_k -> 1/C, so L -> ListMLE(s; pi*) / C, with error O(1/T)."""
    n, c = 4, 8
    student, teacher, target = random_inputs(n, c, 2.0, seed=6, dtype=torch.float64)
    limit = list_mle_reference(student, teacher, target) / c
    errors = [
        abs(pld_loss(student, teacher, target, temperature=temperature).item() - limit.item())
        for temperature in (1.0, 1e2, 1e4, 1e6)
    ]
    assert errors[0] > 1e-2, errors  # far from the limit at T = 1: the check can fail
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[-1] < 1e-5 * limit.item(), errors


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_uniform_weighting_is_list_mle_over_c(temperature) -> None:
    """weighting="uniform" is the paper's PLD-ListMLE ablation: ListMLE / C at any T."""
    n, c = 5, 9
    student, teacher, target = random_inputs(n, c, 3.0, seed=7, dtype=torch.float64)
    got = pld_loss(student, teacher, target, temperature=temperature, weighting="uniform")
    want = list_mle_reference(student, teacher, target) / c
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, pld_loss(student, teacher, target, temperature=temperature))


@pytest.mark.parametrize(("n", "c", "temperature"), [(4, 6, 1.0), (3, 10, 4.0), (2, 2, 0.5)])
def test_gradient_matches_closed_form(n, c, temperature) -> None:
    """Spec oracle 5: the autograd gradient is Appendix A's closed form and sums to 0 per row."""
    student, teacher, target = random_inputs(n, c, 3.0, seed=8, dtype=torch.float64)
    student.requires_grad_(True)
    pld_loss(student, teacher, target, temperature=temperature).backward()
    want = closed_form_gradient(student.detach(), teacher, target, temperature)
    torch.testing.assert_close(student.grad, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(student.grad.sum(dim=1), torch.zeros(n, dtype=torch.float64))
    assert student.grad.abs().max() > 1e-3  # a gradient that is not trivially 0


def test_gradcheck_float64() -> None:
    """Finite differences agree with autograd, in the student and in the teacher weights."""
    student, teacher, target = random_inputs(3, 6, 2.0, seed=9, dtype=torch.float64)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, t: pld_loss(s, t, target, temperature=2.0), (student, teacher)
    )


# ---- pitfalls (section 2.5) -----------------------------------------------------------------


def test_first_position_weight_is_teacher_probability_of_label() -> None:
    """A confidently wrong teacher down-weights the label's CE term to q_y, not 1."""
    n, c = 4, 10
    student, teacher, target = random_inputs(n, c, 1.0, seed=10, dtype=torch.float64)
    wrong_class = (target + 3) % c
    teacher[torch.arange(n), wrong_class] = 8.0  # the teacher is sure of another class
    q_y = torch.softmax(teacher, dim=1)[torch.arange(n), target]
    assert q_y.max() < 1e-2
    ce = F.cross_entropy(student, target, reduction="none")
    alphas, terms, _ = ranked_terms(student, teacher, target, 1.0)
    rest = (alphas[:, 1:] * terms[:, 1:]).sum(dim=1)  # positions 2..C
    got = pld_loss(student, teacher, target, temperature=1.0)
    torch.testing.assert_close(got, (q_y * ce + rest).mean(), rtol=0, atol=1e-12)
    weight_one = (ce + rest).mean()
    assert (weight_one - got).item() > 0.5, (weight_one, got)


def test_temperature_only_scales_teacher_weights() -> None:
    """No s / T and no T^2: at T the loss equals the T = 1 loss of teacher logits t / T."""
    student, teacher, target = random_inputs(6, 10, 3.0, seed=11, dtype=torch.float64)
    temperature = 4.0
    got = pld_loss(student, teacher, target, temperature=temperature)
    torch.testing.assert_close(
        got, pld_loss(student, teacher / temperature, target, temperature=1.0), rtol=0, atol=1e-12
    )
    scaled_student = pld_reference(student / temperature, teacher, target, temperature)
    assert not torch.allclose(got, scaled_student, rtol=1e-2)
    assert not torch.allclose(got, temperature**2 * scaled_student, rtol=1e-2)
    # ...and the temperature does change the weights.
    assert not torch.allclose(got, pld_loss(student, teacher, target, temperature=1.0), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [10, 100])  # torch's unstable CPU sort reorders ties at C = 100
def test_tied_teacher_logits_are_deterministic(dtype, c) -> None:
    """Ties change the loss; the documented rule (ascending class index) fixes the value."""
    gen = torch.Generator().manual_seed(12)
    n = 8
    student = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype) * 3
    teacher = torch.randint(0, 3, (n, c), generator=gen).to(dtype)  # many ties
    target = torch.randint(0, c, (n,), generator=gen)
    first = pld_loss(student, teacher, target, temperature=1.0)
    second = pld_loss(student, teacher.clone(), target.clone(), temperature=1.0)
    assert torch.equal(first, second)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    want = pld_reference(student, teacher, target, 1.0, ties="ascending")
    torch.testing.assert_close(first.double(), want, rtol=tol, atol=tol)
    other_rule = pld_reference(student, teacher, target, 1.0, ties="descending")
    assert not torch.allclose(want, other_rule, rtol=1e-3)  # the tie rule matters


# ---- reduction, precision, errors -----------------------------------------------------------


def test_batch_mean_reduction() -> None:
    student, teacher, target = random_inputs(4, 10, 2.0, seed=13)
    single = pld_loss(student, teacher, target, temperature=1.0)
    double = pld_loss(
        torch.cat([student, student]),
        torch.cat([teacher, teacher]),
        torch.cat([target, target]),
        temperature=1.0,
    )
    torch.testing.assert_close(double, single, rtol=1e-6, atol=1e-7)
    per_sample = torch.stack(
        [
            pld_loss(student[i : i + 1], teacher[i : i + 1], target[i : i + 1], temperature=1.0)
            for i in range(4)
        ]
    )
    torch.testing.assert_close(single, per_sample.mean(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(single, per_sample.sum(), rtol=1e-2)


def test_bfloat16_autocast() -> None:
    """Under bf16 autocast the loss is computed in float32, exact on the bf16 values given."""
    torch.manual_seed(14)
    layer = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    teacher = torch.randn(8, 10) * 3
    target = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_bf16 = layer(x)
        assert student_bf16.dtype == torch.bfloat16  # autocast is really on
        got = pld_loss(student_bf16, teacher.bfloat16(), target, temperature=1.0)
    assert got.dtype == torch.float32
    want = pld_reference(student_bf16.float(), teacher.bfloat16().float(), target, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError) as info:
        pld_loss(torch.randn(4, 10), torch.randn(4, 100), torch.zeros(4, dtype=torch.long))
    message = str(info.value)
    assert "(4, 10)" in message and "(4, 100)" in message
    assert "PLD needs teacher and student to share the same class vocabulary" in message


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_target_out_of_range_raises(bad_label) -> None:
    student, teacher, target = random_inputs(4, 10, 1.0, seed=15)
    target[2] = bad_label
    with pytest.raises(ValueError, match=r"\[0, 10\).*" + str(bad_label)):
        pld_loss(student, teacher, target, temperature=1.0)


def test_bad_target_type_raises() -> None:
    student, teacher, target = random_inputs(4, 10, 1.0, seed=16)
    with pytest.raises(ValueError, match="integer class index"):
        pld_loss(student, teacher, target.float(), temperature=1.0)
    with pytest.raises(ValueError, match="integer class index"):
        pld_loss(student, teacher, target[:3], temperature=1.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises(temperature) -> None:
    student, teacher, target = random_inputs(2, 3, 1.0, seed=17)
    with pytest.raises(ValueError, match=r"temperature must be > 0.*" + str(temperature)):
        pld_loss(student, teacher, target, temperature=temperature)


def test_unknown_weighting_raises() -> None:
    student, teacher, target = random_inputs(2, 3, 1.0, seed=18)
    with pytest.raises(ValueError, match=r"weighting.*'softmax'"):
        pld_loss(student, teacher, target, temperature=1.0, weighting="softmax")


# ---- the method -----------------------------------------------------------------------------

COMMON_KWARGS: dict[str, Any] = {
    "student": "test_efficientnet",
    "num_classes": 10,
    "in_chans": 1,
    "mean": (0.5,),
    "std": (0.25,),
}


def build_pld(**overrides: Any) -> PLD:
    kwargs = {"teacher": TeacherSpec("test_resnet", weights="random"), **COMMON_KWARGS, **overrides}
    torch.manual_seed(0)
    return PLD(**kwargs)


def make_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 4.0, "pld_weight": 0.5}, {"weighting": "uniform"}],
    ids=["defaults", "T4-weight0.5", "uniform"],
)
def test_training_step_is_pld_loss(options, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build_pld(**options).eval()  # eval: deterministic BatchNorm, logits recomputable
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log", lambda name, value, *a, **k: logged.__setitem__(name, value))
    x, y = batch = make_batch()
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        student_logits = module.student.model(x)
        teacher_logits = module.teacher.backbone.model(x)  # same mean/std: no re-normalisation
    temperature = options.get("temperature", 1.0)
    weighting = options.get("weighting", "teacher")
    weight = options.get("pld_weight", 1.0)
    assert module.loss_weights == {"pld": weight}
    want = pld_loss(student_logits, teacher_logits, y, temperature=temperature, weighting=weighting)
    torch.testing.assert_close(loss, weight * want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logged["train/loss_pld"], want)
    # The teacher's logits really are used: with the student's own, the loss differs by far more
    # than the tolerance above (little at random init for "uniform", whose weights ignore them).
    self_ranked = pld_loss(
        student_logits, student_logits, y, temperature=temperature, weighting=weighting
    )
    assert not math.isclose(want.item(), self_ranked.item(), rel_tol=1e-4)


def test_training_step_gradients_reach_student_only(monkeypatch: pytest.MonkeyPatch) -> None:
    module = build_pld().train()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    loss = module.training_step(make_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    student_grads = [p.grad for p in module.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None for p in module.teacher.parameters())


def test_teacher_with_other_number_of_classes_raises() -> None:
    with pytest.raises(ConfigError) as info:
        build_pld(teacher=TeacherSpec("test_resnet", weights="random", num_classes=5))
    message = str(info.value)
    assert "PLD needs teacher and student to predict the same classes" in message
    assert "teacher.num_classes=5" in message and "has 10" in message
    # The same teacher over the student's 10 classes is fine.
    assert (
        build_pld(teacher=TeacherSpec("test_resnet", weights="random", num_classes=10)).teacher
        is not None
    )


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"pld_weight": 0.0}, "pld_weight must be > 0"),
    ],
)
def test_bad_config_raises(options, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_pld(**options)
