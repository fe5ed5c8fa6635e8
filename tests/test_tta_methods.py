"""Tent, MeanTeacher and CoTTA against the numerical oracles of kdzoo spec ``tta.md`` section 9.

EMA (m = 1 no-op, m = 0 copy, k steps with a frozen student), Tent's trainable set and its loss
on uniform predictions (ln C), predict-then-adapt ordering for every adapting method, CoTTA with
``rst = 0, ap = 0`` equal to the mean teacher (spec 9.7), CoTTA's stochastic restore, the CoTTA
augmentation (one parameter set per batch, [0,1] range) and an end-to-end ``kdzoo test`` run.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdzoo.losses.functional import soft_cross_entropy, softmax_entropy
from kdzoo.methods.tta import CoTTA, MeanTeacher, Tent, TTAModule
from kdzoo.methods.tta.augment import cotta_augment, from_unit, to_unit
from kdzoo.methods.tta.base import ema_update
from kdzoo.methods.tta.tent import norm_affine_parameters
from kdzoo.models import TeacherSpec

NUM_CLASSES = 10
MEAN, STD = (0.5,), (0.25,)
COMMON: dict[str, Any] = {
    "source": TeacherSpec("test_resnet", weights="random"),
    "num_classes": NUM_CLASSES,
    "in_chans": 1,
    "mean": MEAN,
    "std": STD,
}


def build(cls: type[TTAModule], seed: int = 0, **kwargs: Any) -> TTAModule:
    """A method over a random-init tiny source (the same source for the same ``seed``), started
    as Lightning's test loop would start it (eval mode, ``on_test_start``)."""
    torch.manual_seed(seed)
    module = cls(**{**COMMON, **kwargs}).eval()
    with torch.no_grad():
        module.on_test_start()
    return module


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised images whose [0,1] versions fill the pixel range."""
    gen = torch.Generator().manual_seed(seed)
    return from_unit(torch.rand(n, 1, 32, 32, generator=gen), MEAN, STD)


def adapt(module: TTAModule, images: torch.Tensor) -> torch.Tensor:
    """One ``adapt`` as ``test_step`` runs it: gradients on inside a no-grad evaluation loop."""
    with torch.no_grad(), torch.enable_grad():
        return module.adapt(images)


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def max_change(before: dict[str, torch.Tensor], module: nn.Module) -> float:
    return max((p.detach() - before[n]).abs().max().item() for n, p in module.named_parameters())


# ---- EMA (spec 9.3) --------------------------------------------------------------------------


def linear_pair(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    student = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(3.0)
    return teacher, student


@pytest.mark.parametrize("momentum", [1.0, 1.5])
def test_ema_momentum_one_or_more_is_a_no_op(momentum: float) -> None:
    teacher, student = linear_pair(0)
    before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, momentum)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_ema_momentum_zero_copies_the_student_parameters_not_buffers() -> None:
    teacher, student = linear_pair(1)
    ema_update(teacher, student, 0.0)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s, rtol=0, atol=0, msg=name)
    assert teacher[1].running_mean.abs().max() == 0  # buffers are not averaged


def test_ema_k_steps_with_a_frozen_student() -> None:
    teacher, student = linear_pair(2)
    t0 = parameters(teacher)
    m, k = 0.9, 7
    for _ in range(k):
        ema_update(teacher, student, m)
    for name, s in student.named_parameters():
        want = m**k * t0[name] + (1 - m**k) * s.detach()
        torch.testing.assert_close(dict(teacher.named_parameters())[name], want, rtol=1e-12, atol=0)


def test_ema_pairs_parameters_by_name() -> None:
    teacher, student = linear_pair(3)
    ema_update(teacher, student, 0.5)
    torch.testing.assert_close(
        teacher[0].bias, 0.5 * linear_pair(3)[0][0].bias + 0.5 * student[0].bias
    )


# ---- Tent ------------------------------------------------------------------------------------


def test_entropy_of_uniform_predictions_is_log_c() -> None:
    for classes, spec_value in ((10, 2.302585), (100, 4.605170), (1000, 6.907755)):
        assert math.isclose(math.log(classes), spec_value, abs_tol=1e-6)
        for logits in (torch.zeros(4, classes), torch.full((3, classes), 7.0)):
            assert math.isclose(softmax_entropy(logits).item(), spec_value, rel_tol=1e-6)
    assert softmax_entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() < 1e-30


def test_entropy_matches_the_formula_per_row_mean() -> None:
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = z.softmax(1).numpy()
    assert math.isclose(softmax_entropy(z).item(), (-(p * np.log(p)).sum(1)).mean(), rel_tol=1e-12)


def test_soft_cross_entropy_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    want = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(s, t), want)
    torch.testing.assert_close(soft_cross_entropy(t, t), softmax_entropy(t))


def test_tent_loss_on_uniform_predictions_is_log_c() -> None:
    """A model whose logits are constant: Tent's loss is ln C (the step still runs)."""
    tent = build(Tent)
    with torch.no_grad():
        tent.model.model.fc.weight.zero_()
        tent.model.model.fc.bias.fill_(0.3)
    losses: list[float] = []
    original = tent.step_optimizer

    def record(loss: torch.Tensor) -> None:
        losses.append(loss.item())
        original(loss)

    tent.step_optimizer = record
    logits = adapt(tent, batch())
    assert torch.allclose(logits, torch.full_like(logits, 0.3))
    assert math.isclose(losses[0], math.log(NUM_CLASSES), rel_tol=1e-6)


def test_tent_trains_only_the_norm_affine_parameters() -> None:
    tent = build(Tent)
    model = tent.model.model
    expected = {
        f"{module_name}.{leaf}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for leaf in ("weight", "bias")
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    names = {n for n, _ in norm_affine_parameters(model)}
    assert names == expected
    assert {id(p) for p in tent.trainable_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in expected
    }

    before = parameters(model)
    for i in range(2):
        adapt(tent, batch(seed=i))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= expected, changed - expected
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)


def test_norm_affine_parameters_cover_layer_and_group_norm() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    names = [n for n, _ in norm_affine_parameters(model)]
    assert names == ["1.weight", "1.bias", "3.weight", "3.bias"]


def test_tent_reduces_the_entropy_of_a_repeated_batch() -> None:
    tent = build(Tent, optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    x = batch()
    first = softmax_entropy(adapt(tent, x)).item()
    for _ in range(5):
        last = softmax_entropy(adapt(tent, x)).item()
    assert last < first


# ---- predict-then-adapt ordering (every adapting method) --------------------------------------

ADAPTING: list[tuple[str, type[TTAModule], dict[str, Any]]] = [
    ("Tent", Tent, {}),
    ("MeanTeacher", MeanTeacher, {"momentum": 0.9}),
    ("MeanTeacher-sce", MeanTeacher, {"momentum": 0.9, "loss": "sce"}),
    ("CoTTA-augmented", CoTTA, {"momentum": 0.9, "ap": 1.0, "num_aug": 4, "rst": 0.1}),
    ("CoTTA-plain", CoTTA, {"momentum": 0.9, "ap": 0.0, "rst": 0.1}),
]


def prediction_without_adapting(module: TTAModule, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(module, MeanTeacher | CoTTA):
            return module.teacher_logits(images)
        return module(images)


@pytest.mark.parametrize(("cls", "kwargs"), [a[1:] for a in ADAPTING], ids=[a[0] for a in ADAPTING])
def test_prediction_comes_from_the_state_before_the_update(cls, kwargs) -> None:
    module = build(cls, **kwargs)
    for i in range(2):  # a state where student and teacher differ
        adapt(module, batch(seed=10 + i))
    x = batch(seed=1)
    before, twin = copy.deepcopy(module), copy.deepcopy(module)  # generator state included
    params_before = parameters(module)
    generator = getattr(module, "generator", None)
    generator_state = generator.get_state() if generator is not None else None

    returned = adapt(module, x)
    assert returned.shape == (len(x), NUM_CLASSES) and not returned.requires_grad
    want = prediction_without_adapting(before, x)
    torch.testing.assert_close(returned, want, rtol=0, atol=1e-6)
    assert max_change(params_before, module) > 1e-4, "the parameters did not change"
    # The comparison can fail: the copy is deterministic, the updated state predicts otherwise.
    torch.testing.assert_close(prediction_without_adapting(twin, x), want, rtol=0, atol=0)
    if generator is not None:  # the same augmentations, drawn from the updated state
        generator.set_state(generator_state)
    after_update = prediction_without_adapting(module, x)
    assert (after_update - want).abs().max() > 1e-5


def test_mean_teacher_predicts_with_the_teacher() -> None:
    module = build(MeanTeacher, momentum=0.9)
    adapt(module, batch(seed=3))
    x = batch(seed=4)
    with torch.no_grad():
        student, teacher = module(x), module.teacher(x).logits
    assert (student - teacher).abs().max() > 1e-4
    torch.testing.assert_close(adapt(module, x), teacher, rtol=0, atol=1e-6)


def test_mean_teacher_step_is_one_student_step_then_ema() -> None:
    """After a batch: the student took one CE step towards the old teacher, and the teacher is
    the EMA of its old value and the stepped student (written out by hand)."""
    module = build(MeanTeacher, momentum=0.8, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    adapt(module, batch(seed=5))  # student and teacher now differ
    old_teacher = copy.deepcopy(module.teacher)
    student = copy.deepcopy(module.model).requires_grad_(True)
    x = batch(seed=6)
    adapt(module, x)

    with torch.no_grad():
        target = old_teacher(x).logits
    loss = -(target.softmax(1) * student(x).logits.log_softmax(1)).sum(1).mean()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    stepped = dict(student.named_parameters())
    old = dict(old_teacher.named_parameters())
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p, stepped[name], msg=name)
    for name, p in module.teacher.named_parameters():
        torch.testing.assert_close(p, 0.8 * old[name] + 0.2 * stepped[name], msg=name)


# ---- CoTTA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "sce"])
def test_cotta_without_restore_and_augmentation_is_the_mean_teacher(loss: str) -> None:
    """Spec 9.7: CoTTA with RST = 0 and AP = 0 is the plain mean teacher."""
    kwargs = {"momentum": 0.9, "loss": loss}
    cotta = build(CoTTA, seed=5, rst=0.0, ap=0.0, **kwargs)
    teacher = build(MeanTeacher, seed=5, **kwargs)
    for i in range(4):
        x = batch(seed=20 + i)
        torch.testing.assert_close(adapt(cotta, x), adapt(teacher, x), rtol=0, atol=0)
    mt_params = parameters(teacher)
    for name, p in cotta.named_parameters():
        if not name.startswith("anchor."):
            torch.testing.assert_close(p.detach(), mt_params[name], rtol=0, atol=0, msg=name)
    assert max_change(parameters(build(MeanTeacher, seed=5)), teacher) > 1e-4


def test_cotta_restore_with_rst_one_resets_everything_to_the_source() -> None:
    cotta = build(CoTTA, rst=1.0, ap=0.0, momentum=0.5)
    source = parameters(cotta.model)
    for i in range(2):
        adapt(cotta, batch(seed=i))
    for name, p in cotta.model.named_parameters():
        torch.testing.assert_close(p.detach(), source[name], rtol=0, atol=0, msg=name)
    assert max_change(source, cotta.teacher) > 1e-4, (
        "the teacher still averages the stepped student"
    )
    for name, p in cotta.anchor.named_parameters():
        torch.testing.assert_close(p.detach(), source[name], rtol=0, atol=0, msg=name)


def test_cotta_restore_draws_one_bernoulli_per_element() -> None:
    cotta = build(CoTTA, rst=0.3)
    source = parameters(cotta.model)
    with torch.no_grad():
        for p in cotta.model.parameters():
            p.add_(1.0)
    cotta.stochastic_restore()
    restored = total = 0
    for name, p in cotta.model.named_parameters():
        is_source = p.detach() == source[name]
        assert torch.equal(
            is_source | (p.detach() == source[name] + 1.0), torch.ones_like(is_source)
        )
        restored += is_source.sum().item()
        total += p.numel()
    assert total > 10_000 and abs(restored / total - 0.3) < 0.01, restored / total
    # Independent draws: the masks of the next restore differ.
    first = parameters(cotta.model)
    with torch.no_grad():
        for p in cotta.model.parameters():
            p.add_(1.0)
    cotta.stochastic_restore()
    again = sum((p.detach() == source[n]).sum().item() for n, p in cotta.model.named_parameters())
    overlap = sum(
        ((p.detach() == source[n]) & (first[n] == source[n])).sum().item()
        for n, p in cotta.model.named_parameters()
    )
    assert abs(again / total - 0.3) < 0.01 and abs(overlap / total - 0.09) < 0.01


def test_cotta_is_reproducible_from_its_seed() -> None:
    def run(seed: int) -> torch.Tensor:
        cotta = build(CoTTA, ap=1.0, num_aug=3, rst=0.2, seed=seed)
        outputs = [adapt(cotta, batch(seed=i)).flatten() for i in range(2)]
        return torch.cat(outputs + [p.detach().flatten() for p in cotta.model.parameters()])

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))


def test_cotta_augmentation_averaging_only_below_ap() -> None:
    """Confident anchor (ap = 0): one clean teacher pass; unconfident (ap = 1): the mean of
    ``num_aug`` augmented teacher passes."""
    cotta = build(CoTTA, ap=0.0, num_aug=3)
    x = batch()
    state = cotta.generator.get_state()
    with torch.no_grad():
        torch.testing.assert_close(cotta.teacher_logits(x), cotta.teacher(x).logits)
    assert torch.equal(cotta.generator.get_state(), state), "no augmentation drawn"

    cotta.ap = 1.0
    generator = torch.Generator().manual_seed(123)
    cotta.generator.manual_seed(123)
    with torch.no_grad():
        want = (
            sum(
                cotta.teacher(
                    from_unit(cotta_augment(to_unit(x, MEAN, STD), generator), MEAN, STD)
                ).logits
                for _ in range(3)
            )
            / 3
        )
        torch.testing.assert_close(cotta.teacher_logits(x), want)


# ---- augmentation ----------------------------------------------------------------------------


def test_augmentation_shares_parameters_across_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=gen)
    pair = torch.stack([images[0], images[0]])
    out = cotta_augment(pair, torch.Generator().manual_seed(1))
    assert out.shape == pair.shape
    # Identical inputs differ only by the per-pixel noise (std 0.005, clipped).
    diff = (out[0] - out[1]).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01
    # ...while the augmentation itself changes the image far more than the noise.
    assert (out[0] - pair[0]).abs().mean() > 0.02
    # Separate calls draw separate parameters.
    other = cotta_augment(pair[:1], torch.Generator().manual_seed(2))
    assert (other[0] - out[0]).abs().mean() > 0.02


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_stays_in_unit_range(channels: int) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, channels, 16, 16, generator=gen) * 1.4 - 0.2  # some out of range
    images[0] = 0.0
    images[1] = 1.0
    for seed in range(10):
        out = cotta_augment(images, torch.Generator().manual_seed(seed))
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1


def test_augmentation_is_reproducible_with_a_generator() -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = cotta_augment(images, torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, cotta_augment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, cotta_augment(images, torch.Generator().manual_seed(8)))


def test_grey_augmentation_matches_colour_on_grey_images() -> None:
    """One channel: brightness, contrast and gamma only, the same parameters as for colour;
    saturation and hue are the identity on a grey image, so both agree up to the noise."""
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        out1 = cotta_augment(grey, torch.Generator().manual_seed(seed))
        out3 = cotta_augment(grey.expand(-1, 3, -1, -1), torch.Generator().manual_seed(seed))
        assert (out3 - out1).abs().max() < 0.05
        assert (out3 - out1).abs().mean() < 0.01


def test_augmentation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="C = 1 or 3"):
        cotta_augment(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="float"):
        cotta_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_unit_conversions_round_trip() -> None:
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normalised = from_unit(x, mean, std)
    torch.testing.assert_close(normalised[:, 1], (x[:, 1] - 0.5) / 0.25)
    torch.testing.assert_close(to_unit(normalised, mean, std), x)
    assert to_unit(x, None, None) is x


# ---- end to end ------------------------------------------------------------------------------


def write_stream(root: Path, corruptions: list[str], per_severity: int = 40) -> None:
    """A tiny ``Tiny-C`` stream in the RobustBench layout: per corruption a uint8
    ``(5 * N, 32, 32, 1)`` array (severities 1..5 stacked, noise growing with severity) and
    ``labels.npy`` ``(5 * N,)``; the images are scikit-learn digits upsampled to 32x32."""
    from kdzoo.datamodules.digits import load_digits_uint8

    folder = root / "Tiny-C"
    folder.mkdir(parents=True)
    images, labels = load_digits_uint8()
    images = torch.from_numpy(images[-per_severity:]).permute(0, 3, 1, 2).float() / 255
    clean = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")
    gen = torch.Generator().manual_seed(0)
    for k, name in enumerate(corruptions):
        stacked = []
        for severity in range(1, 6):
            noisy = clean + 0.04 * severity * (k + 1) * torch.randn(clean.shape, generator=gen)
            stacked.append((noisy.clamp(0, 1) * 255).round().to(torch.uint8))
        np.save(folder / f"{name}.npy", torch.cat(stacked).permute(0, 2, 3, 1).numpy())
    np.save(folder / "labels.npy", np.tile(labels[-per_severity:], 5))


@pytest.mark.slow
def test_kdzoo_test_runs_tent_on_a_corruption_stream(tmp_path: Path, teacher_ckpt: Path) -> None:
    """``kdzoo test --model Tent`` on a generated 2-domain stream, from a source model trained by
    ``kdzoo fit --model Supervised`` on Digits (the stream uses the source's normalisation)."""
    from cli_helpers import QUIET, kdzoo, last_metrics

    from kdzoo.datamodules import Digits

    digits = Digits()
    write_stream(tmp_path / "data", ["gaussian_noise", "fog"])
    kdzoo(
        "test", "--model=Tent", "--model.source.name=test_resnet",
        f"--model.source.weights={teacher_ckpt}",
        "--data=CorruptionStream", f"--data.root={tmp_path / 'data'}", "--data.dataset=Tiny-C",
        "--data.corruptions=[gaussian_noise,fog]", "--data.severity=5", "--data.batch_size=20",
        f"--data.mean={list(digits.mean)}", f"--data.std={list(digits.std)}",
        "--trainer.inference_mode=false", "--trainer.logger.init_args.name=tta", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / "runs/tta/version_0"
    with (run / "tta_domains.csv").open() as f:
        domains = list(csv.DictReader(f))
    names = [d["name"] for d in domains]  # e.g. "gaussian_noise-5": corruption and severity
    assert len(names) == 2
    assert names[0].startswith("gaussian_noise") and names[1].startswith("fog"), names
    with (run / "tta_stream.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [names[0]] * 2 + [names[1]] * 2
    assert [int(r["images"]) for r in rows] == [20] * 4
    metrics = last_metrics(run)
    for domain in domains:
        errors = sum(int(r["errors"]) for r in rows if r["name"] == domain["name"])
        assert math.isclose(float(domain["error"]), 100 * errors / 40, abs_tol=1e-3)
        assert math.isclose(metrics[f"test/error_{domain['name']}"], 100 * errors / 40)
    mean_error = sum(float(d["error"]) for d in domains) / 2
    assert math.isclose(metrics["test/mean_error"], mean_error, abs_tol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mismatch", ["channels", "classes"])
def test_stream_that_does_not_fit_the_source_is_a_clear_error(
    mismatch: str, tmp_path: Path, teacher_ckpt: Path
) -> None:
    """The Digits source takes 1-channel images of 10 classes: a 3-channel stream, or one with 12
    classes, stops with a one-line error naming the mismatch, before any adaptation."""
    from cli_helpers import assert_clear_error, kdzoo

    from kdzoo.datamodules import Digits

    write_stream(tmp_path / "data", ["fog"])
    folder = tmp_path / "data/Tiny-C"
    mean, std = list(Digits().mean), list(Digits().std)
    if mismatch == "channels":
        np.save(folder / "fog.npy", np.repeat(np.load(folder / "fog.npy"), 3, axis=3))
        mean, std = mean * 3, std * 3
    else:
        labels = np.load(folder / "labels.npy")
        labels[:2] = 11
        np.save(folder / "labels.npy", labels)
    proc = kdzoo(
        "test", "--model=Tent", "--model.source.name=test_resnet",
        f"--model.source.weights={teacher_ckpt}", "--data=CorruptionStream",
        f"--data.root={tmp_path / 'data'}", "--data.dataset=Tiny-C", "--data.corruptions=[fog]",
        f"--data.mean={mean}", f"--data.std={std}", "--trainer.inference_mode=false",
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    expected = "in_chans=3" if mismatch == "channels" else "12 classes"
    assert_clear_error(proc, "kdzoo test: error:", expected)


@pytest.mark.slow
def test_ddp_two_processes_adapt_like_one(tmp_path: Path, teacher_ckpt: Path) -> None:
    """PSMT (source Fisher computed on rank 0 and broadcast) over 2 CPU processes: the same
    per-domain errors as one process; without use_distributed_sampler=false, a clear error."""
    from cli_helpers import assert_clear_error, kdzoo

    from kdzoo.datamodules import Digits

    write_stream(tmp_path / "data", ["gaussian_noise", "fog"])
    digits = Digits()
    args = [
        "test", "--model=PSMT", "--model.source.name=test_resnet",
        f"--model.source.weights={teacher_ckpt}",
        "--model.source_data={class_path: kdzoo.datamodules.Digits,"
        " init_args: {train_subset: 200}}",
        "--model.fisher_samples=100", "--data=CorruptionStream", f"--data.root={tmp_path / 'data'}",
        "--data.dataset=Tiny-C", "--data.corruptions=[gaussian_noise,fog]", "--data.batch_size=20",
        f"--data.mean={list(digits.mean)}", f"--data.std={list(digits.std)}",
        "--trainer.inference_mode=false", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = kdzoo(*args, *ddp, cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "kdzoo test: error:", "use_distributed_sampler=false")

    kdzoo(*args, "--trainer.logger.init_args.name=one", cwd=tmp_path,
          env={"KDZOO_HOME": str(tmp_path / "home1")})  # fmt: skip
    kdzoo(*args, *ddp, "--trainer.use_distributed_sampler=false",
          "--trainer.logger.init_args.name=two", cwd=tmp_path,
          env={"KDZOO_HOME": str(tmp_path / "home2")})  # fmt: skip
    one = (tmp_path / "runs/one/version_0/tta_domains.csv").read_text()
    two = (tmp_path / "runs/two/version_0/tta_domains.csv").read_text()
    assert one == two and one.count("\n") == 3
    assert list((tmp_path / "home2/tta").rglob("*")), "the DDP run computed and cached the Fisher"


def test_gradual_logs_the_severity5_mean_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdzoo.methods.tta import BNAdapt

    module = BNAdapt(
        source=TeacherSpec("test_resnet", weights="random"), num_classes=10, in_chans=1
    )
    names = ["fog-1", "fog-5", "fog-1#2", "snow-1", "snow-5", "snow-1#2"]
    monkeypatch.setattr(module, "_domain_names", lambda: dict(enumerate(names)))
    module._errors = {d: [e, 100] for d, e in enumerate([10, 40, 20, 30, 60, 10])}
    module._stream_rows = []
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    module.on_test_epoch_end()
    assert logged["test/mean_error"] == pytest.approx(170 / 6)
    assert logged["test/mean_error_severity5"] == pytest.approx(50.0)
    assert logged["test/error_fog-1#2"] == pytest.approx(20.0)
