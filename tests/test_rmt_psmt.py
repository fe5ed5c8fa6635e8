"""RMT and PSMT: the spec's numerical oracles (tta.md section 9), reductions, one-time set-ups
checked against hand computations, caching, and predict-then-adapt.

Tiny random ``test_resnet`` sources (1 channel, 32x32, 10 classes) and scikit-learn digits as the
source data keep everything offline and fast.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import kdzoo.methods.tta.rmt as rmt_module
from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.losses.functional import rmt_contrastive_loss, supcon_loss
from kdzoo.methods.statistics import endless, source_loader
from kdzoo.methods.tta import PSMT, RMT
from kdzoo.methods.tta.psmt import global_quantile
from kdzoo.models.teacher import TeacherSpec

MEAN, STD = (0.3053,), (0.3759,)
SOURCE_BS = 16


def digits(train_subset: int = 64) -> Digits:
    """The labelled source data: a fresh datamodule per module (a method sets it up)."""
    return Digits(train_subset=train_subset, split_seed=0)


def set_up(datamodule: Digits) -> Digits:
    datamodule.setup("fit")
    return datamodule


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(
        source=TeacherSpec("test_resnet", weights="random"),
        num_classes=10,
        in_chans=1,
        mean=MEAN,
        std=STD,
        **kwargs,
    )


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def sce_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    p_s, p_t = student.softmax(1), teacher.detach().softmax(1)
    forward = -(p_t * student.log_softmax(1)).sum(1)
    backward = -(p_s * teacher.detach().log_softmax(1)).sum(1)
    return (0.5 * forward + 0.5 * backward).mean()


# ---- contrastive loss ---------------------------------------------------------------------------
def supcon_reference(u: torch.Tensor, temperature: float) -> float:
    """The spec's formula with loops: u is (B, V, D), normalised."""
    batch_size, views = u.shape[:2]
    flat = [(i, v) for v in range(views) for i in range(batch_size)]
    total = 0.0
    for i, v in flat:
        a = u[i, v].double()
        denominator = sum(
            math.exp(float(a @ u[j, w].double()) / temperature) for j, w in flat if (j, w) != (i, v)
        )
        positives = [(i, w) for w in range(views) if w != v]
        total -= sum(
            math.log(math.exp(float(a @ u[j, w].double()) / temperature) / denominator)
            for j, w in positives
        ) / len(positives)
    return total / len(flat)


@pytest.mark.parametrize(("batch_size", "expected"), [(4, math.log(11)), (200, 6.39526)])
def test_contrastive_identical_vectors_give_log_3b_minus_1(batch_size, expected):
    u = F.normalize(torch.ones(batch_size, 3, 5), dim=2)
    loss = supcon_loss(u, temperature=0.1)
    assert float(loss) == pytest.approx(math.log(3 * batch_size - 1), abs=1e-5)
    assert float(loss) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_contrastive_at_least_log_2_and_equals_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(5, 3, 7, generator=gen), dim=2)
    for temperature in (0.05, 0.1, 1.0):
        loss = float(supcon_loss(u, temperature=temperature))
        assert loss >= math.log(2) - 1e-6
        assert loss == pytest.approx(supcon_reference(u, temperature), rel=1e-5)


def test_rmt_contrastive_uses_nearest_prototype_and_projects_every_view():
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 6, generator=gen)
    features = torch.randn(5, 6, generator=gen, requires_grad=True)
    aug = torch.randn(5, 6, generator=gen, requires_grad=True)
    projector = nn.Linear(6, 3)
    loss = rmt_contrastive_loss(prototypes, features, aug, projector, temperature=0.1)
    cosine = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    nearest = prototypes[cosine.argmax(1)]
    views = torch.stack([nearest, features, aug], dim=1)
    expected = supcon_reference(F.normalize(projector(views), dim=2).detach(), 0.1)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert features.grad is not None and aug.grad is not None
    assert projector.weight.grad is not None


# ---- global quantile ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("q", [0.0, 0.03, 0.25, 0.5, 0.97, 1.0])
def test_global_quantile_equals_numpy_linear(n, q):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) ** 3
    ours = float(global_quantile(values.view(-1, 1) if n % 2 else values, q))
    assert ours == pytest.approx(float(np.quantile(values.double().numpy(), q)), rel=1e-6)


def test_global_quantile_above_torch_quantile_limit():
    n = 2**24 + 5  # torch.quantile refuses more than 2**24 entries
    values = torch.rand(n, generator=torch.Generator().manual_seed(0))
    ours = float(global_quantile(values, 0.03))
    assert ours == pytest.approx(float(np.quantile(values.numpy(), 0.03)), rel=1e-6)


# ---- PSMT masked update oracles (spec 9.4) ------------------------------------------------------
def psmt_with_moved_student(**kwargs) -> tuple[PSMT, dict, dict, dict]:
    module = make(PSMT, fisher_weight=0.0, **kwargs)
    module.on_test_start()
    source = params(module.model)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
        for p in module.teacher.parameters():
            p.add_(torch.randn_like(p))
    return module, source, params(module.model), params(module.teacher)


def split(module: PSMT, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, p in module.model.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def test_psmt_code_mask_restores_source_and_double_ema_elsewhere():
    m = 0.9
    module, source, student, teacher = psmt_with_moved_student(momentum=m, rst=0.01)
    mask = torch.rand(module.source_params.numel(), generator=torch.Generator().manual_seed(0))
    mask = mask < 0.3
    module.update_teacher_and_restore(mask)
    masks = split(module, mask)
    new_student, new_teacher = params(module.model), params(module.teacher)
    for name, entries in masks.items():
        single_with_m2 = m**2 * teacher[name] + (1 - m**2) * student[name]
        torch.testing.assert_close(new_student[name][entries], source[name][entries])
        torch.testing.assert_close(new_teacher[name][entries], source[name][entries])
        torch.testing.assert_close(new_student[name][~entries], student[name][~entries])
        torch.testing.assert_close(new_teacher[name][~entries], single_with_m2[~entries])


def test_psmt_paper_mask_freezes_teacher_and_single_ema_elsewhere():
    m = 0.9
    module, _, student, teacher = psmt_with_moved_student(momentum=m, rst=0.0, mask_mode="paper")
    n = module.source_params.numel()
    module.update_teacher_and_restore(torch.ones(n, dtype=torch.bool))
    for name, value in params(module.teacher).items():  # all-ones: the teacher never moves
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0)
    module.update_teacher_and_restore(torch.zeros(n, dtype=torch.bool))
    for name, value in params(module.teacher).items():  # all-zeros: a standard EMA
        torch.testing.assert_close(value, m * teacher[name] + (1 - m) * student[name])


def test_psmt_zero_quantile_gives_empty_mask_and_double_ema(monkeypatch):
    m = 0.9
    module = make(PSMT, fisher_weight=0.0, quantile=0.0, momentum=m)
    module.on_test_start()
    masks = []
    update = module.update_teacher_and_restore
    monkeypatch.setattr(
        module, "update_teacher_and_restore", lambda mask: [masks.append(mask), update(mask)]
    )
    teacher = params(module.model)
    module.adapt(batch(1))
    assert len(masks) == 1 and not masks[0].any()  # strict `<` the minimum: nothing selected
    student = params(module.model)
    for name, value in params(module.teacher).items():
        torch.testing.assert_close(value, m**2 * teacher[name] + (1 - m**2) * student[name])
    values = torch.tensor([0.0, 0.0, 1.0, 2.0])
    assert not (values < global_quantile(values, 0.0)).any()


def test_psmt_all_preserved_mask_never_changes_preserved_entries(monkeypatch):
    monkeypatch.setattr(
        "kdzoo.methods.tta.psmt.global_quantile", lambda values, q: values.max() + 1.0
    )
    module = make(PSMT, fisher_weight=0.0)  # code mode: preserved = restored to the source
    module.on_test_start()
    source = params(module.model)
    for seed in range(3):
        module.adapt(batch(seed))
    for model in (module.model, module.teacher):
        for name, value in params(model).items():
            torch.testing.assert_close(value, source[name], rtol=0, atol=0)
    paper = make(PSMT, fisher_weight=0.0, mask_mode="paper", rst=0.0)
    paper.on_test_start()
    teacher = params(paper.teacher)
    for seed in range(3):
        paper.adapt(batch(seed))
    for name, value in params(paper.teacher).items():
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0)
    assert any((v != source[k]).any() for k, v in params(paper.model).items())


# ---- source data, prototypes, Fisher ------------------------------------------------------------
def test_source_loader_reads_unaugmented_shuffled_train_split():
    data = set_up(digits(40))
    loader = source_loader(data, 16, seed=3)
    first, again = loader.dataset[0][0], loader.dataset[0][0]
    torch.testing.assert_close(first, again)  # eval transform: no random augmentation
    sizes = [len(b[1]) for b in loader]
    assert sizes == [16, 16, 8]  # drop_last=False
    order_a = torch.cat([b[1] for b in source_loader(data, 16, seed=3)])
    order_b = torch.cat([b[1] for b in source_loader(data, 16, seed=3)])
    torch.testing.assert_close(order_a, order_b)
    assert len(list(zip(range(5), endless(loader), strict=False))) == 5  # restarts
    assert len(source_loader(data, 8, seed=0, num_examples=12).dataset) == 12


def test_missing_source_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="source_data"):
        make(RMT)
    with pytest.raises(ConfigError, match="source_data"):
        make(RMT, src_weight=0.0, warmup_samples=0)  # source-free still needs the prototypes
    with pytest.raises(ConfigError, match="source_data"):
        make(PSMT)
    make(RMT, cont_weight=0.0, src_weight=0.0, warmup_samples=0)
    make(PSMT, fisher_weight=0.0)


def test_prototypes_are_class_means_of_the_source_embeddings():
    module = make(
        RMT, src_weight=0.0, warmup_samples=0, source_data=digits(), source_batch_size=SOURCE_BS
    )
    source = copy.deepcopy(module.model)
    module.on_test_start()
    sums, counts = torch.zeros(10, source.embedding_dim), torch.zeros(10)
    with torch.no_grad():
        for images, labels in source_loader(set_up(digits()), SOURCE_BS, seed=0):
            embedding = source(images).embedding
            for e, y in zip(embedding, labels, strict=True):
                sums[y] += e
                counts[y] += 1
    torch.testing.assert_close(module.prototypes, sums / counts[:, None], rtol=1e-5, atol=1e-6)


def test_fisher_is_mean_of_squared_batch_gradients():
    module = make(PSMT, source_data=digits(), source_batch_size=SOURCE_BS, fisher_samples=40)
    source = copy.deepcopy(module.model)
    module.on_test_start()
    expected = [torch.zeros_like(p) for p in source.parameters()]
    loader = source_loader(set_up(digits()), SOURCE_BS, seed=0, num_examples=40)
    for images, _ in loader:
        source.zero_grad()
        logits = source(images).logits
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for total, p in zip(expected, source.parameters(), strict=True):
            total += p.grad**2
    expected = torch.cat([e.flatten() for e in expected]) / len(loader)
    assert len(loader) == 3
    torch.testing.assert_close(module.fisher, expected, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(
        module.source_params, torch.cat([p.detach().flatten() for p in source.parameters()])
    )


# ---- caching ------------------------------------------------------------------------------------
def test_rmt_second_prepare_reads_the_caches(monkeypatch):
    module = make(RMT, warmup_samples=32, source_data=digits(), source_batch_size=SOURCE_BS)
    twin = copy.deepcopy(module)
    module.on_test_start()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(RMT, "compute_prototypes", fail)
    monkeypatch.setattr(RMT, "warmup", fail)
    twin.on_test_start()
    torch.testing.assert_close(twin.prototypes, module.prototypes)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], value, rtol=0, atol=0)
    ours, theirs = module._optimizer.state_dict(), twin._optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, state in ours["state"].items():
        torch.testing.assert_close(theirs["state"][index]["exp_avg"], state["exp_avg"])


def test_psmt_second_prepare_reads_the_cache(monkeypatch):
    module = make(PSMT, source_data=digits(32), source_batch_size=SOURCE_BS, fisher_samples=32)
    twin = copy.deepcopy(module)
    module.on_test_start()
    monkeypatch.setattr(PSMT, "compute_fisher", lambda *a: pytest.fail("Fisher recomputed"))
    twin.on_test_start()
    torch.testing.assert_close(twin.fisher, module.fisher, rtol=0, atol=0)
    assert float(module.fisher.sum()) > 0


# ---- warm-up ------------------------------------------------------------------------------------
def test_warmup_ramps_lr_and_gives_projector_no_gradient():
    lr = 1e-3
    module = make(
        RMT,
        warmup_samples=3 * SOURCE_BS + 5,  # S = 3 steps
        src_weight=0.0,
        source_data=digits(),
        source_batch_size=SOURCE_BS,
        cache=False,
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
    )
    projector, teacher = params(module.projector), params(module.teacher)
    seen: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups])
    )
    try:
        module.on_test_start()
    finally:
        hook.remove()
    ramp = [[lr * (i + 1) / 3] * 2 for i in range(3)]
    np.testing.assert_allclose(seen, ramp, rtol=1e-12)
    assert [g["lr"] for g in module._optimizer.param_groups] == [lr, lr]
    assert len(module._optimizer.param_groups[1]["params"]) == 4  # the projector's group
    for name, p in module.projector.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p.detach(), projector[name], rtol=0, atol=0)
    projector_ids = {id(p) for p in module.projector.parameters()}
    assert not any(id(p) in projector_ids for p in module._optimizer.state)
    assert any((v != teacher[k]).any() for k, v in params(module.teacher).items())  # EMA ran
    # reset returns to the post-warm-up state
    warmed = params(module.model)
    module.adapt(batch(0))
    module.restore_initial_state()
    for name, value in params(module.model).items():
        torch.testing.assert_close(value, warmed[name], rtol=0, atol=0)


# ---- reductions and predict-then-adapt ----------------------------------------------------------
def test_rmt_reduces_to_mt_sce_with_ensemble_prediction(monkeypatch):
    monkeypatch.setattr(rmt_module, "cotta_augment", lambda images, generator=None: images)
    m = 0.99
    module = make(RMT, cont_weight=0.0, src_weight=0.0, warmup_samples=0, momentum=m)
    student, teacher = copy.deepcopy(module.model), copy.deepcopy(module.model)
    module.on_test_start()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for seed in range(3):
        x = batch(seed)
        z_s, z_t = student(x).logits, teacher(x).logits.detach()
        expected = z_s.detach() + z_t
        optimizer.zero_grad()
        sce_reference(z_s, z_t).backward()
        optimizer.step()
        with torch.no_grad():
            teacher_params = dict(teacher.named_parameters())
            for name, p in student.named_parameters():
                teacher_params[name].mul_(m).add_(p, alpha=1 - m)
        torch.testing.assert_close(module.adapt(x), expected, rtol=1e-4, atol=1e-5)
    for ours, theirs in ((module.model, student), (module.teacher, teacher)):
        for name, value in params(theirs).items():
            torch.testing.assert_close(params(ours)[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (RMT, {"warmup_samples": SOURCE_BS, "source_data": digits(32), "cache": False}),
        (PSMT, {"source_data": digits(32), "fisher_samples": 32, "cache": False}),
        (PSMT, {"fisher_weight": 0.0, "mask_mode": "paper", "student_view": "augmented"}),
        (PSMT, {"source_data": digits(32), "fisher_samples": 32, "ewc_anchor": "previous"}),
    ],
)
def test_predict_then_adapt(cls, kwargs):
    module = make(cls, source_batch_size=SOURCE_BS, **kwargs)
    module.on_test_start()
    for seed in range(2):
        x = batch(seed)
        before = copy.deepcopy(module)
        with torch.no_grad():
            expected = before.model(x).logits + before.teacher(x).logits
        torch.testing.assert_close(module.adapt(x), expected, rtol=1e-5, atol=1e-5)
        assert any((v != params(before.model)[k]).any() for k, v in params(module.model).items())
    if cls is RMT:  # the contrastive term trains the projector
        assert all(p.grad is not None for p in module.projector.parameters())
