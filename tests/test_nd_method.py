"""The ND method (KD++ / DKD++ / DIST++): loss assembly, warm-up, projector, teacher class means
(computed in ``fit``, cached by teacher weights, equal under DDP) and the CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import DATA, QUIET, kdzoo, last_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

import kdzoo.methods.statistics as statistics
from kdzoo.datamodules import Digits
from kdzoo.errors import ConfigError
from kdzoo.losses.functional import dist_loss, dkd_loss, kd_loss
from kdzoo.methods import ND
from kdzoo.models import TeacherSpec
from kdzoo.paths import kdzoo_home

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

NUM_CLASSES = 10
COMMON = {"num_classes": NUM_CLASSES, "in_chans": 1, "mean": (0.5,), "std": (0.25,)}


def build(student: str = "test_resnet", teacher: str = "test_efficientnet", **kwargs) -> ND:
    torch.manual_seed(0)
    return ND(teacher=TeacherSpec(teacher, weights="random"), student=student, **COMMON, **kwargs)


def batch(n: int = 8, seed: int = 0, size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=gen), torch.arange(n) % NUM_CLASSES


def reference_nd(f_s, f_t, means, target):
    """Written from the formula, one sample at a time as the official loop does."""
    losses = []
    for i in range(len(target)):
        center = means[target[i]] / torch.sqrt((means[target[i]] ** 2).sum())
        norm_s, norm_t = torch.sqrt((f_s[i] ** 2).sum()), torch.sqrt((f_t[i] ** 2).sum())
        losses.append(1 - (f_s[i] * center).sum() / max(norm_s, norm_t))
    return torch.stack(losses).mean()


# ---- construction ---------------------------------------------------------------------------


def test_projector_only_when_widths_differ() -> None:
    module = build()  # test_resnet (96) -> test_efficientnet (256)
    norm, dropout, linear = module.projector
    assert isinstance(norm, nn.BatchNorm1d) and norm.num_features == 96
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5
    assert (linear.in_features, linear.out_features) == (96, 256)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.all(linear.bias == 0)
    normal = build(projector_init="normal").projector[2]
    assert normal.bias.abs().max() > 0
    assert normal.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert isinstance(build(teacher="test_resnet").projector, nn.Identity)
    assert isinstance(build(teacher="test_resnet", projector="always").projector, nn.Sequential)


def test_projector_is_trained_and_saved() -> None:
    module = build(teacher="test_efficientnet")
    keys = module.state_dict().keys()
    assert any(k.startswith("projector.") for k in keys)
    assert not any(k.startswith("teacher.") or k == "class_means" for k in keys)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"nd_weight": -1.0}, "nd_weight must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build(**kwargs)


def test_warmup_from_epoch_zero() -> None:
    module = build(warmup_epochs=20, kd_weight=3.0, nd_weight=2.0)
    assert module.epoch_weights(0) == {"ce": 1.0, "kd": 0.0, "nd": 2.0}
    assert module.epoch_weights(10)["kd"] == pytest.approx(1.5)
    assert module.epoch_weights(20)["kd"] == module.epoch_weights(200)["kd"] == 3.0
    warm_nd = build(warmup_epochs=4, nd_weight=2.0, warmup_nd=True)
    assert warm_nd.epoch_weights(0)["nd"] == 0.0 and warm_nd.epoch_weights(1)["nd"] == 0.5
    assert build(warmup_epochs=0).epoch_weights(0)["kd"] == 1.0


# ---- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["kd", "dkd", "dist"])
def test_loss_terms_match_the_formulas(base: str) -> None:
    module = build(base=base, temperature=2.0, dkd_beta=4.0, dist_gamma=2.0).eval()
    x, y = batch()
    module.class_means = torch.rand(NUM_CLASSES, 256) + 0.1
    with torch.no_grad():
        terms = module.loss_terms((x, y))
        s = module.student(x)
        t = module.teacher_forward(x)
        f_s = module.projector(s.embedding)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(s.logits, y))
    want_base = {
        "kd": lambda: kd_loss(s.logits, t.logits, temperature=2.0),
        "dkd": lambda: dkd_loss(s.logits, t.logits, y, alpha=1.0, beta=4.0, temperature=2.0),
        "dist": lambda: dist_loss(s.logits, t.logits, beta=1.0, gamma=2.0, temperature=2.0),
    }[base]()
    torch.testing.assert_close(terms["kd"], want_base)
    want_nd = reference_nd(f_s.double(), t.embedding.double(), module.class_means.double(), y)
    torch.testing.assert_close(terms["nd"].double(), want_nd, rtol=1e-5, atol=1e-6)


def test_without_table_uses_in_batch_class_means() -> None:
    module = build(teacher="test_resnet").eval()
    x, y = batch()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.no_grad(), pytest.warns(UserWarning, match="in-batch teacher class means"):
        nd = module.loss_terms((x, y))["nd"]
        s, t = module.student(x), module.teacher_forward(x)
    means = torch.zeros(NUM_CLASSES, t.embedding.shape[1])
    for c in range(4):
        means[c] = t.embedding[y == c].mean(0)
    torch.testing.assert_close(nd, reference_nd(s.embedding, t.embedding, means, y))


# ---- class means computed when fit starts ------------------------------------------------------


def fit(module: ND, tmp_path: Path, data, steps: int = 1) -> L.Trainer:
    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    return trainer


def test_class_means_are_the_teacher_means_over_the_training_data(tmp_path: Path) -> None:
    x, y = batch(n=30, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    module = build(teacher="test_resnet")
    fit(module, tmp_path, loader)
    with torch.no_grad():
        embedding = module.teacher_forward(x).embedding
    want = torch.stack([embedding[y == c].mean(0) for c in range(NUM_CLASSES)])
    torch.testing.assert_close(module.class_means, want, rtol=1e-5, atol=1e-6)


def digits(**kwargs) -> Digits:
    return Digits(train_subset=200, eval_subset=50, batch_size=50, augment=False, **kwargs)


def test_class_means_are_cached_by_teacher_weights(tmp_path, monkeypatch) -> None:
    first = build(teacher="test_resnet")
    fit(first, tmp_path, digits())
    files = list((kdzoo_home() / "class_stats").glob("*.pt"))
    assert len(files) == 1
    torch.testing.assert_close(torch.load(files[0], weights_only=True), first.class_means)

    def no_pass(*args, **kwargs):
        raise AssertionError("the class means were recomputed despite a cache entry")

    monkeypatch.setattr(statistics, "class_means", no_pass)
    second = build(teacher="test_resnet")
    fit(second, tmp_path, digits())
    torch.testing.assert_close(second.class_means, first.class_means, rtol=0, atol=0)

    # Other teacher weights, other data or un-cached runs do not hit the entry.
    other = build(teacher="test_resnet")
    with torch.no_grad():
        next(other.teacher.parameters()).add_(1.0)
    for module, data in [(other, digits()), (build(teacher="test_resnet"), digits(split_seed=1))]:
        with pytest.raises(AssertionError, match="recomputed"):
            fit(module, tmp_path, data)
    with pytest.raises(AssertionError, match="recomputed"):
        fit(build(teacher="test_resnet", class_means_cache=False), tmp_path, digits())


def test_class_means_use_the_training_augmentation(tmp_path) -> None:
    plain = build(teacher="test_resnet", class_means_cache=False, class_means_augment=False)
    fit(plain, tmp_path, digits())
    augmented = build(teacher="test_resnet", class_means_cache=False)
    fit(augmented, tmp_path, Digits(train_subset=200, eval_subset=50, batch_size=50))
    assert not torch.allclose(plain.class_means, augmented.class_means)


# ---- through the CLI, and under DDP ------------------------------------------------------------


@pytest.mark.slow
def test_nd_cli_ddp_class_means_equal_single_process(tmp_path, teacher_ckpt) -> None:
    teacher = teacher_ckpt
    args = [
        "fit", "--model=ND", "--model.student=test_efficientnet",
        "--model.teacher.name=test_resnet", f"--model.teacher.weights={teacher}",
        "--model.warmup_epochs=1", *DATA, *QUIET,
        "--data.augment=false", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
    ]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    kdzoo(*args, cwd=tmp_path, env={"KDZOO_HOME": str(single)})
    kdzoo(
        *args, "--trainer.devices=2", "--trainer.strategy=ddp", cwd=tmp_path,
        env={"KDZOO_HOME": str(ddp)},
    )  # fmt: skip
    [single_file] = (single / "class_stats").glob("*.pt")
    [ddp_file] = (ddp / "class_stats").glob("*.pt")
    assert single_file.name == ddp_file.name, "same teacher and data: same cache key"
    single_means = torch.load(single_file, weights_only=True)
    assert single_means.shape == (10, 96)  # test_resnet teacher: 96-wide embeddings
    torch.testing.assert_close(torch.load(ddp_file, weights_only=True), single_means)
    metrics = last_metrics(tmp_path / "runs/nd-test_efficientnet-test_resnet/version_1")
    assert 0.0 <= metrics["val/top1"] <= 1.0
    assert metrics["train/loss_nd"] >= 0.0
