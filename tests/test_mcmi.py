"""Reference tests for the conditional mutual information
(:func:`kdzoo.losses.functional.conditional_mutual_information`) and the
:class:`kdzoo.methods.MCMITeacher` method.

Ye, Hamidi, Tan, Yang, "Bayes Conditional Distribution Estimation for Knowledge Distillation",
ICLR 2024, arXiv:2401.08732; official code github.com/iclr2024mcmi/ICLRMCMI at ``d12f354``. With
P_i the softmax of sample i, y_i its label and Q_y the class centroid:

    I = (1/N) sum_i sum_c P_ic log(P_ic / Q_{y_i c})

The reference below loops over samples and classes in Python floats (``math.log``), skipping
``P = 0`` terms: nothing shared with kdzoo. The oracles are those of the kdzoo spec
(specs/classification.md, section 4.5) and its pitfalls (section 4.4). The method tests compute
centroids and losses by hand from plain timm models, run real ``lightning.Trainer`` fits on tiny
tensors, and the last test chains teacher -> MCMI -> KD through the real ``kdzoo`` command.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from kdzoo.errors import ConfigError
from kdzoo.losses.functional import conditional_mutual_information
from kdzoo.methods import MCMITeacher, Supervised
from kdzoo.models import TeacherSpec, WeightsError, build_teacher

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:MCMITeacher.init_weights is None",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

# ---- an independent reference, written from the formula -------------------------------------


def cmi_reference(probs: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor) -> float:
    """(1/N) sum_i sum_{c: P_ic > 0} P_ic log(P_ic / Q_{y_i c}), one term at a time."""
    p, q, y = probs.double().tolist(), centroids.double().tolist(), target.tolist()
    total = 0.0
    for row, label in zip(p, y, strict=True):
        for c, value in enumerate(row):
            if value > 0:
                total += value * math.log(value / q[label][c])
    return total / len(p)


def in_batch_means(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Q_y = mean of the P_i with y_i = y (uniform for absent classes), by Python loops."""
    p, y = probs.double().tolist(), target.tolist()
    c = len(p[0])
    rows = []
    for label in range(c):
        members = [row for row, lab in zip(p, y, strict=True) if lab == label]
        if members:
            rows.append([sum(col) / len(members) for col in zip(*members, strict=True)])
        else:
            rows.append([1.0 / c] * c)
    return torch.tensor(rows, dtype=torch.float64)


def entropy(distribution: list[float]) -> float:
    return -sum(v * math.log(v) for v in distribution if v > 0)


def random_inputs(
    n: int, c: int, scale: float, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax rows ``P`` (N, C), labels and softmax centroids ``Q`` (C, C)."""
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).softmax(dim=1)
    centroids = (torch.randn(c, c, generator=gen, dtype=torch.float64) * scale).softmax(dim=1)
    target = torch.randint(0, c, (n,), generator=gen)
    return probs.to(dtype), target, centroids.to(dtype)


CASES = [
    # (N, C, logit scale)
    (1, 2, 1.0),
    (4, 10, 3.0),
    (16, 10, 1.0),
    (8, 100, 5.0),
    (32, 7, 20.0),  # near one-hot rows: many entries around e^-40
    (3, 1, 1.0),  # one class: P = Q = 1, I = 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "c", "scale"), CASES)
def test_matches_reference(n, c, scale, dtype) -> None:
    probs, target, centroids = random_inputs(n, c, scale, seed=n * 100 + c, dtype=dtype)
    got = conditional_mutual_information(probs, target, centroids)
    want = cmi_reference(probs, target, centroids)
    assert got.ndim == 0 and got.dtype == dtype
    if dtype == torch.float64:
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    else:
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_equals_the_official_code_expression() -> None:
    """The code: ``F.kl_div(Q_y.log(), log P, reduction="batchmean", log_target=True)``."""
    probs, target, centroids = random_inputs(12, 10, 3.0, seed=1)
    official = F.kl_div(
        centroids[target].log(), probs.log(), reduction="batchmean", log_target=True
    )
    got = conditional_mutual_information(probs, target, centroids)
    torch.testing.assert_close(got, official, rtol=1e-12, atol=1e-12)


def test_reference_rejects_wrong_variants() -> None:
    """The comparisons can fail: plausible mistakes give clearly different numbers."""
    probs, target, centroids = random_inputs(8, 10, 2.0, seed=2)
    got = conditional_mutual_information(probs, target, centroids)
    q = centroids[target]
    per_sample = (probs * (probs.log() - q.log())).sum(dim=1)
    wrong = {
        "KL(Q || P)": (q * (q.log() - probs.log())).sum(dim=1).mean(),
        "sum over the batch": per_sample.sum(),
        "mean over all entries": per_sample.sum() / probs.numel(),
        "centroid of class 0 for all": conditional_mutual_information(
            probs, torch.zeros_like(target), centroids
        ),
    }
    for name, value in wrong.items():
        assert not torch.allclose(got, value, rtol=1e-3), name


# ---- the spec's oracles (section 4.5) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_when_every_prediction_is_its_centroid(dtype) -> None:
    _, target, centroids = random_inputs(20, 10, 3.0, seed=3, dtype=dtype)
    probs = centroids[target].clone()
    got = conditional_mutual_information(probs, target, centroids)
    assert abs(got.item()) < (1e-14 if dtype == torch.float64 else 1e-6)
    # ...and not zero as soon as one row moves.
    probs[0] = probs[0].roll(1)
    assert conditional_mutual_information(probs, target, centroids) > 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_entropy_identity_with_in_batch_centroids(seed) -> None:
    """Q_y = in-batch class mean: I = sum_y n_y/n [H(Q_y) - mean_{x in y} H(P_x)]."""
    probs, target, _ = random_inputs(40, 6, [0.5, 1.0, 3.0, 10.0][seed], seed=10 + seed)
    centroids = in_batch_means(probs, target)
    got = conditional_mutual_information(probs, target, centroids)
    n = len(target)
    identity = 0.0
    for label in target.unique().tolist():
        members = [probs[i].tolist() for i in range(n) if target[i] == label]
        mean_entropy = sum(entropy(p) for p in members) / len(members)
        identity += len(members) / n * (entropy(centroids[label].tolist()) - mean_entropy)
    assert got.item() == pytest.approx(identity, rel=1e-12, abs=1e-15)
    assert got.item() > 1e-3  # not a trivial 0 = 0


def test_bounds_with_in_batch_centroids() -> None:
    """0 <= I <= log C for in-batch-mean centroids, at every logit scale."""
    for seed in range(12):
        n, c = 10 + 7 * seed, 2 + seed
        scale = [0.1, 1.0, 10.0, 100.0][seed % 4]
        probs, target, _ = random_inputs(n, c, scale, seed=30 + seed)
        value = conditional_mutual_information(probs, target, in_batch_means(probs, target))
        assert -1e-12 <= value.item() <= math.log(c) + 1e-12, (seed, value)


@pytest.mark.parametrize("c", [2, 5, 10])
def test_bounds_are_attained(c) -> None:
    """I = log C when every class holds all C one-hot predictions (0 log 0 = 0 entries), and
    I = 0 when the predictions within each class agree."""
    probs = torch.eye(c, dtype=torch.float64).repeat(c, 1)  # class y: e_0, ..., e_{C-1}
    target = torch.arange(c).repeat_interleave(c)
    value = conditional_mutual_information(probs, target, in_batch_means(probs, target))
    assert value.item() == pytest.approx(math.log(c), rel=1e-12)
    agreeing = torch.eye(c, dtype=torch.float64)[target]  # class y: c copies of e_y
    value = conditional_mutual_information(agreeing, target, in_batch_means(agreeing, target))
    assert value.item() == 0.0


@pytest.mark.parametrize(("n", "c"), [(4, 6), (7, 10), (2, 2)])
def test_gradient_matches_closed_form(n, c) -> None:
    """dKL(P || Q)/dz = P * (log P - log Q - KL), Q fixed; divided by N for the batch mean."""
    gen = torch.Generator().manual_seed(40 + c)
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    _, target, centroids = random_inputs(n, c, 2.0, seed=41 + c)
    conditional_mutual_information(logits.softmax(dim=1), target, centroids).backward()
    p = logits.detach().softmax(dim=1)
    log_ratio = p.log() - centroids[target].log()
    kl = (p * log_ratio).sum(dim=1, keepdim=True)
    want = p * (log_ratio - kl) / n
    torch.testing.assert_close(logits.grad, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(logits.grad.sum(dim=1), torch.zeros(n, dtype=torch.float64))
    assert logits.grad.abs().max() > 1e-3


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(42)
    logits = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    _, target, centroids = random_inputs(3, 5, 1.0, seed=43)
    assert torch.autograd.gradcheck(
        lambda z: conditional_mutual_information(z.softmax(dim=1), target, centroids), (logits,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_centroid_entry_gives_a_finite_value(dtype) -> None:
    """Pitfall 6: the code's ``centroids.log()`` gives inf where a centroid underflowed to 0;
    kdzoo clamps log Q at the smallest normal number of the dtype."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1])
    centroids = torch.tensor([[0.8, 0.2, 0.0], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]], dtype=dtype)
    got = conditional_mutual_information(probs, target, centroids)
    assert torch.isfinite(got)
    tiny = torch.finfo(dtype).tiny
    p = probs.detach().double().tolist()
    want = (
        0.7 * math.log(0.7 / 0.8) + 0.2 * math.log(0.2 / 0.2) + 0.1 * math.log(0.1 / tiny)
    ) / 2 + (0.1 * math.log(0.1 / 0.2) * 2 + 0.8 * math.log(0.8 / 0.6)) / 2
    assert p[0][2] == pytest.approx(0.1)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(probs.grad).all()
    official = F.kl_div(
        centroids[target].log(), probs.detach().log(), reduction="batchmean", log_target=True
    )
    assert torch.isinf(official)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_probabilities_contribute_nothing(dtype) -> None:
    """0 log 0 = 0, with a finite gradient, also where the softmax underflows to exactly 0."""
    logits = torch.tensor([[0.0, -2000.0, -1.0], [5.0, 0.0, -3000.0]], dtype=dtype)
    logits.requires_grad_(True)
    probs = logits.softmax(dim=1)
    assert (probs == 0).sum() == 2
    target = torch.tensor([0, 2])
    _, _, centroids = random_inputs(2, 3, 1.0, seed=44, dtype=dtype)
    got = conditional_mutual_information(probs, target, centroids)
    assert got.item() == pytest.approx(cmi_reference(probs.detach(), target, centroids), rel=1e-5)
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_direction_on_a_hand_case() -> None:
    """Pitfall 5: KL(P || Q) = 0.9 ln 1.8 + 0.1 ln 0.2, not KL(Q || P) = 0.5 ln(5/9) + 0.5 ln 5."""
    probs = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    centroids = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    got = conditional_mutual_information(probs, torch.tensor([1]), centroids).item()
    forward = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    backward = 0.5 * math.log(5 / 9) + 0.5 * math.log(5)
    assert got == pytest.approx(forward, rel=1e-14)
    assert forward == pytest.approx(0.3680642071684971, rel=1e-14)
    assert abs(got - backward) > 0.1


# ---- precision and errors -------------------------------------------------------------------


def test_low_precision_inputs_are_computed_in_float32() -> None:
    probs, target, centroids = random_inputs(6, 10, 2.0, seed=45)
    got = conditional_mutual_information(probs.bfloat16(), target, centroids.bfloat16())
    assert got.dtype == torch.float32
    want = cmi_reference(probs.bfloat16().float(), target, centroids.bfloat16().float())
    assert got.item() == pytest.approx(want, rel=1e-5)
    mixed = conditional_mutual_information(probs.float(), target, centroids)
    assert mixed.dtype == torch.float64


def test_shape_errors() -> None:
    probs, target, centroids = random_inputs(4, 10, 1.0, seed=46)
    with pytest.raises(ValueError, match=r"probs must be \(N, C\).*\(40,\)"):
        conditional_mutual_information(probs.flatten(), target, centroids)
    with pytest.raises(ValueError, match=r"centroids must be \(10, 10\).*\(10, 9\)"):
        conditional_mutual_information(probs, target, centroids[:, :9])
    with pytest.raises(ValueError, match="integer class index"):
        conditional_mutual_information(probs, target[:3], centroids)
    with pytest.raises(ValueError, match="integer class index"):
        conditional_mutual_information(probs, target.double(), centroids)


@pytest.mark.parametrize("bad_label", [-1, 10])
def test_target_out_of_range(bad_label) -> None:
    probs, target, centroids = random_inputs(4, 10, 1.0, seed=47)
    target[1] = bad_label
    with pytest.raises(ValueError, match=r"\[0, 10\).*" + str(bad_label)):
        conditional_mutual_information(probs, target, centroids)


# ---- the method ------------------------------------------------------------------------------

NUM_CLASSES = 10
COMMON: dict[str, Any] = {
    "student": "test_resnet",
    "num_classes": NUM_CLASSES,
    "in_chans": 1,
    "mean": (0.5,),
    "std": (0.25,),
}
BATCH = 5


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def build(seed: int = 0, **kwargs: Any) -> MCMITeacher:
    torch.manual_seed(seed)
    return MCMITeacher(**{**COMMON, "optimizer": sgd(0.1), **kwargs})


class AllClasses(L.LightningDataModule):
    """20 random 1x32x32 images, two of each class, served in order in batches of 5."""

    def __init__(self, seed: int = 0, present: int = NUM_CLASSES) -> None:
        super().__init__()
        self.save_hyperparameters()  # the settings key cached tables (none without them)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(2 * NUM_CLASSES, 1, 32, 32, generator=gen)
        self.y = torch.arange(2 * NUM_CLASSES) % present

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


class Snapshot(L.Callback):
    """What the module looked like when training started and at each epoch's first batch."""

    def __init__(self) -> None:
        self.train_start: dict[str, Any] = {}
        self.epoch_start_students: list[torch.nn.Module] = []
        self.first_batch_centroids: list[torch.Tensor] = []
        self.first_batch_modes: list[dict[str, bool]] = []

    def on_train_start(self, trainer, module) -> None:
        self.train_start = {
            "state": copy.deepcopy(module.student.model.state_dict()),
            "centroids": module.class_centroids.clone(),
            "modes": {n: m.training for n, m in module.student.model.named_modules()},
        }

    def on_train_epoch_start(self, trainer, module) -> None:
        # Callbacks run before the module's hook, so before an "epoch" centroid pass.
        self.epoch_start_students.append(copy.deepcopy(module.student.model))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first_batch_centroids.append(module.class_centroids.clone())
            modes = {n: m.training for n, m in module.student.model.named_modules()}
            self.first_batch_modes.append(modes)


def fit(module, tmp_path: Path, callbacks=(), data=None, **kwargs: Any) -> L.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    options = {
        "max_steps": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    trainer = L.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(module, datamodule=data or AllClasses(), ckpt_path=ckpt_path)
    return trainer


def hand_centroids(model: torch.nn.Module, data: AllClasses, train_mode: bool):
    """Per-class mean softmax of a copy of the plain timm ``model`` over the training batches, in
    order, rows normalised to 1; also returns the copy (its BatchNorm statistics moved in train
    mode)."""
    model = copy.deepcopy(model).train(train_mode)
    sums = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64)
    counts = [0] * NUM_CLASSES
    with torch.no_grad():
        for xb, yb in zip(data.x.split(BATCH), data.y.split(BATCH), strict=True):
            probs = model(xb).softmax(dim=1).double()
            for p, label in zip(probs, yb.tolist(), strict=True):
                sums[label] += p
                counts[label] += 1
    means = sums / torch.tensor(counts, dtype=torch.float64).clamp(min=1)[:, None]
    return (means / means.sum(dim=1, keepdim=True)).float(), model


def batchnorm_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "running_" in k or "num_batches" in k}


def test_fixed_eval_centroids_are_the_class_mean_softmax(tmp_path) -> None:
    module = build(centroid_pass="eval")
    initial = copy.deepcopy(module.student.model)
    snapshot = Snapshot()
    fit(module, tmp_path, [snapshot])
    want, _ = hand_centroids(initial, AllClasses(), train_mode=False)
    got = snapshot.train_start["centroids"]
    assert got.shape == (NUM_CLASSES, NUM_CLASSES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(NUM_CLASSES))
    # An eval-mode pass leaves the network as it was.
    for key, value in initial.state_dict().items():
        assert torch.equal(snapshot.train_start["state"][key], value), key
    # "fixed": the table did not move with the training step.
    torch.testing.assert_close(module.class_centroids, got, rtol=0, atol=0)


@pytest.mark.filterwarnings(r"ignore:classes \[9\] have no samples")
def test_class_without_training_images_gets_a_uniform_row(tmp_path) -> None:
    """Its row is never read (it is never a training label) but stays a distribution."""
    data = AllClasses(present=NUM_CLASSES - 1)
    module = build(centroid_pass="eval")
    want, _ = hand_centroids(module.student.model, data, train_mode=False)
    fit(module, tmp_path, data=data)
    torch.testing.assert_close(module.class_centroids[:-1], want[:-1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(module.class_centroids[-1], torch.full((NUM_CLASSES,), 0.1))


def test_train_mode_pass_uses_batch_statistics_and_moves_batchnorm(tmp_path) -> None:
    """Pitfall 2, the code's behaviour: the pass runs in train mode. Every submodule gets its own
    mode back afterwards (here the classifier was put in eval mode on purpose)."""
    module = build()  # centroid_pass="train" by default
    module.student.model.get_classifier().eval()
    modes_before = {n: m.training for n, m in module.student.model.named_modules()}
    initial = copy.deepcopy(module.student.model)
    snapshot = Snapshot()
    fit(module, tmp_path, [snapshot])

    want, moved = hand_centroids(initial, AllClasses(), train_mode=True)
    torch.testing.assert_close(snapshot.train_start["centroids"], want, rtol=1e-5, atol=1e-7)
    eval_mode, _ = hand_centroids(initial, AllClasses(), train_mode=False)
    assert not torch.allclose(want, eval_mode, rtol=1e-3), "train and eval passes must differ"

    got_stats = batchnorm_stats(snapshot.train_start["state"])
    assert got_stats, "test_resnet has BatchNorm layers"
    for key, value in batchnorm_stats(moved.state_dict()).items():
        torch.testing.assert_close(got_stats[key], value, rtol=1e-5, atol=1e-6, msg=key)
    initial_stats = batchnorm_stats(initial.state_dict())
    assert any(not torch.allclose(got_stats[k], v) for k, v in initial_stats.items())
    assert snapshot.train_start["modes"] == modes_before


def test_train_mode_pass_is_not_cached(tmp_path) -> None:
    """A cache hit would skip the BatchNorm update: two fits from the same weights move the
    statistics the same way, and no table is written under $KDZOO_HOME."""
    first, second = build(seed=1), build(seed=1)
    fit(first, tmp_path / "a")
    fit(second, tmp_path / "b")
    torch.testing.assert_close(first.class_centroids, second.class_centroids, rtol=0, atol=0)
    assert not list(Path(os.environ["KDZOO_HOME"]).rglob("*.pt"))
    third = build(seed=1, centroid_pass="eval")
    fit(third, tmp_path / "c")
    assert len(list(Path(os.environ["KDZOO_HOME"]).rglob("*.pt"))) == 1


@pytest.mark.parametrize("schedule", ["fixed", "epoch"])
def test_epoch_schedule_recomputes_the_centroids(tmp_path, schedule) -> None:
    module = build(centroids=schedule, centroid_pass="eval", optimizer=sgd(0.5))
    snapshot = Snapshot()
    fit(module, tmp_path, [snapshot], max_steps=-1, max_epochs=2)
    first, second = snapshot.first_batch_centroids
    if schedule == "fixed":
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    else:
        for got, model in zip(
            snapshot.first_batch_centroids, snapshot.epoch_start_students, strict=True
        ):
            want, _ = hand_centroids(model, AllClasses(), train_mode=False)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(
        hand_centroids(snapshot.epoch_start_students[1], AllClasses(), False)[0], first, rtol=1e-3
    ), "training moved the network, so a refreshed table differs"
    # Training batches see the network back in train mode after the eval-mode pass.
    assert all(all(modes.values()) for modes in snapshot.first_batch_modes)


def sharpen(module: MCMITeacher) -> None:
    """Scale the classifier up: a random-init network predicts nearly uniform probabilities,
    whose CMI (~1e-5) would be a weak check."""
    with torch.no_grad():
        module.student.model.get_classifier().weight.mul_(30)


def test_loss_is_ce_minus_lambda_cmi(monkeypatch) -> None:
    module = build(cmi_weight=0.3).eval()
    sharpen(module)
    gen = torch.Generator().manual_seed(50)
    _, _, centroids = random_inputs(1, NUM_CLASSES, 2.0, seed=51, dtype=torch.float32)
    module.class_centroids = centroids
    x = torch.randn(6, 1, 32, 32, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (6,), generator=gen)
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    with torch.no_grad():
        loss = module.training_step((x, y), 0)
        logits = module.student.model(x).double()
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    ce = -log_probs[torch.arange(6), y].mean().item()
    cmi = cmi_reference(log_probs.exp(), y, centroids)
    assert module.loss_weights == {"ce": 1.0, "cmi": -0.3}
    assert cmi > 1e-3
    assert loss.item() == pytest.approx(ce - 0.3 * cmi, rel=1e-5)
    assert logged["train/loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert logged["train/loss_cmi"].item() == pytest.approx(cmi, rel=1e-5)


def test_outside_a_fit_the_in_batch_class_means_stand_in() -> None:
    module = build().eval()
    sharpen(module)
    gen = torch.Generator().manual_seed(52)
    x = torch.randn(8, 1, 32, 32, generator=gen)
    y = torch.tensor([0, 0, 1, 3, 3, 3, 7, 9])  # classes 2, 4, 5, 6, 8 absent
    with pytest.warns(UserWarning, match="in-batch class means"), torch.no_grad():
        terms = module.loss_terms((x, y))
        probs = module.student.model(x).softmax(dim=1)
    want = cmi_reference(probs, y, in_batch_means(probs, y))
    assert terms["cmi"].item() == pytest.approx(want, rel=1e-5)
    assert want > 1e-3
    assert module.class_centroids.numel() == 0, "the stand-in is not stored"


def test_missing_centroids_inside_a_fit_is_an_error(tmp_path) -> None:
    class SkipsThePass(MCMITeacher):
        def on_fit_start(self) -> None:
            pass

    torch.manual_seed(0)
    module = SkipsThePass(**COMMON)
    with pytest.raises(RuntimeError, match=r"no class centroids.*compute_centroids"):
        fit(module, tmp_path)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_state_dict_is_the_plain_student_and_resume_keeps_the_centroids(tmp_path) -> None:
    """Checkpoints: ``student.*`` only in the state dict (a teacher for any method), the table
    under its own key, and ``fit(ckpt_path=...)`` resumes with it instead of recomputing it."""
    module = build(centroid_pass="eval", optimizer=sgd(0.5))
    fit(module, tmp_path, max_steps=4, enable_checkpointing=True)  # one epoch of 4 batches
    (path,) = sorted(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    torch.testing.assert_close(checkpoint["mcmi_centroids"], module.class_centroids)
    assert checkpoint["hyper_parameters"]["cmi_weight"] == 0.15

    teacher = build_teacher(
        TeacherSpec("test_resnet", weights=str(path)), num_classes=NUM_CLASSES, in_chans=1
    )
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, module.eval()(x), rtol=0, atol=0)

    resumed, snapshot = build(seed=1, centroid_pass="eval", optimizer=sgd(0.5)), Snapshot()
    fit(
        resumed,
        tmp_path,
        [snapshot],
        max_steps=6,
        enable_checkpointing=True,
        ckpt_path=str(path),
    )
    torch.testing.assert_close(snapshot.train_start["centroids"], module.class_centroids)
    recomputed, _ = hand_centroids(module.student.model, AllClasses(), train_mode=False)
    assert not torch.allclose(recomputed, module.class_centroids, rtol=1e-3)


def supervised_checkpoint(tmp_path: Path) -> tuple[Path, Supervised]:
    torch.manual_seed(3)
    trained = Supervised(**COMMON, optimizer=sgd(0.5))
    fit(trained, tmp_path / "supervised", max_steps=2, enable_checkpointing=True)
    (path,) = sorted((tmp_path / "supervised").rglob("*.ckpt"))
    return path, trained.eval()


def test_init_weights_load_a_trained_teacher(tmp_path) -> None:
    path, trained = supervised_checkpoint(tmp_path)
    save_file(trained.student.model.state_dict(), tmp_path / "teacher.safetensors")
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        want = trained(x)
        assert not torch.allclose(build(seed=0).eval()(x), want, rtol=1e-3)
        for weights in (path, tmp_path / "teacher.safetensors"):
            module = build(seed=0, init_weights=str(weights)).eval()
            torch.testing.assert_close(module(x), want, rtol=0, atol=0)


def test_init_weights_errors_and_warnings(tmp_path) -> None:
    path, _ = supervised_checkpoint(tmp_path)
    with pytest.raises(WeightsError, match=r"init_weights.*'test_efficientnet'.*model\.student"):
        build(init_weights=str(path), student="test_efficientnet")
    with pytest.raises(WeightsError, match="not found"):
        build(init_weights=str(tmp_path / "missing.ckpt"))
    with pytest.warns(UserWarning, match=r"trained with input mean \(0\.5,\)"):
        build(init_weights=str(path), mean=(0.1,))
    with pytest.warns(UserWarning, match="fine-tunes a trained teacher"):
        build()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="cmi_weight must be >= 0"):
        build(cmi_weight=-0.1)


# ---- end to end through the kdzoo command ------------------------------------------------------

KDZOO = str(Path(sys.executable).with_name("kdzoo"))
DATA = [
    "--data=Digits",
    "--data.train_subset=200",
    "--data.eval_subset=100",
    "--data.batch_size=50",
    "--data.num_workers=0",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def kdzoo(*args: str, cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [KDZOO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"kdzoo {args} failed:\n{proc.stdout}\n{proc.stderr}"


def best_checkpoint(cwd: Path, name: str) -> Path:
    (path,) = sorted((cwd / f"runs/{name}/version_0/checkpoints").glob("best-*.ckpt"))
    return path


def last_metrics(cwd: Path, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    with (cwd / f"runs/{name}/version_0/metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.slow
def test_cli_teacher_then_mcmi_then_kd(tmp_path) -> None:
    one_epoch = [*DATA, *QUIET, "--trainer.max_epochs=1"]
    kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *one_epoch,
        "--trainer.logger.init_args.name=teacher", cwd=tmp_path,
    )  # fmt: skip
    kdzoo(
        "fit", "--model=MCMITeacher", "--model.student=test_resnet",
        f"--model.init_weights={best_checkpoint(tmp_path, 'teacher')}", *one_epoch,
        "--trainer.logger.init_args.name=mcmi", "--trainer.log_every_n_steps=2", cwd=tmp_path,
    )  # fmt: skip
    mcmi = best_checkpoint(tmp_path, "mcmi")
    checkpoint = torch.load(mcmi, weights_only=True)
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    centroids = checkpoint["mcmi_centroids"]
    assert centroids.shape == (10, 10)
    torch.testing.assert_close(centroids.sum(dim=1), torch.ones(10))
    metrics = last_metrics(tmp_path, "mcmi")
    assert 0.0 <= metrics["train/loss_cmi"] <= math.log(10) * 10  # finite, KL >= 0
    assert 0.0 <= metrics["val/top1"] <= 1.0

    kdzoo(
        "fit", "--model=KD", "--model.student=test_efficientnet",
        "--model.teacher.name=test_resnet", f"--model.teacher.weights={mcmi}", *one_epoch,
        "--trainer.logger.init_args.name=kd", cwd=tmp_path,
    )  # fmt: skip
    assert 0.0 <= last_metrics(tmp_path, "kd")["val/top1"] <= 1.0
