"""Teacher-output caches for CrossModalKD (:mod:`kdzoo.cache`, :class:`PairedTeacher`): paired
batches carry their sample ids only with ``augment_seed``, the other cross-modal methods take
such batches, a cache of a fusion teacher is built, a training step (and a fit) from a float32
cache equals the live one exactly, from an fp16 one within fp16 rounding, stale caches are refused
in one line naming the field, and end to end through the real ``kdzoo`` command (``-m slow``).
In process on a 160-pair FashionMNISTPairs subset, test_resnet encoders."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from cli_helpers import assert_clear_error, kdzoo
from safetensors.torch import load_file
from trainer_helpers import quiet_trainer

from kdzoo.cache import CachedTeacher, CacheError
from kdzoo.cache.build import build_cache
from kdzoo.cache.report import verify
from kdzoo.datamodules import DataError, FashionMNISTPairs
from kdzoo.errors import ConfigError
from kdzoo.methods import CrossModalKD, MSTDistill, PairedSupervised
from kdzoo.models.teacher import Teacher

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

AUGMENT_SEED = 5
EPOCHS = 2
CHUNK = 64  # 160 samples: 3 chunks (64, 64, 32) per epoch
DATA = {"train_subset": 160, "eval_subset": 32, "batch_size": 32, "augment_seed": AUGMENT_SEED}
CPU = {"accelerator": "cpu", "devices": 1}
FP16 = 2.0**-11
ENCODERS = [{"kind": "timm", "name": "test_resnet"}, {"kind": "timm", "name": "test_resnet"}]
ARCH = {
    "encoders": ENCODERS,
    "num_classes": 10,
    "modality_shapes": [(1, 28, 28), (1, 14, 14)],
    "head_hidden": [32, 16],
}


def datamodule(**overrides) -> FashionMNISTPairs:
    dm = FashionMNISTPairs(**{**DATA, **overrides})
    dm.setup("fit")
    return dm


def make(weights: Path, cache: Path | None = None, **kwargs) -> CrossModalKD:
    """A camera (m1) student of ``weights``'s teacher, live or from ``cache``; always the same
    student initialisation."""
    torch.manual_seed(0)
    teacher = {"weights": str(weights), "cache": cache and str(cache)}
    return CrossModalKD(teacher=teacher, **{"target_modality": 0, **ARCH, **kwargs})


def save_untrained(path: Path, network: str, seed: int) -> Path:
    """A PairedSupervised checkpoint as Lightning writes it, without a fit."""
    torch.manual_seed(seed)
    module = PairedSupervised(network=network, **ARCH)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@dataclass
class Env:
    root: Path
    dm: FashionMNISTPairs  # set up with DATA, shared read-only (never given to a Trainer)
    weights: Path  # a fusion teacher trained for one epoch
    other_weights: Path  # another (untrained) fusion teacher
    cache32: Path
    cache16: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("crossmodal_cache")
    torch.manual_seed(0)
    teacher = PairedSupervised(network="fusion", **ARCH)
    trainer = quiet_trainer(root, max_epochs=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(teacher, datamodule(augment_seed=None))
    weights = root / "fusion.ckpt"
    trainer.save_checkpoint(weights)
    other = save_untrained(root / "other.ckpt", "fusion", seed=1)
    dm, caches = datamodule(), {}
    for dtype in ("float32", "float16"):
        caches[dtype] = root / dtype
        build_cache(
            make(weights), dm, caches[dtype], epochs=EPOCHS, trainer_options=CPU,
            chunk_size=CHUNK, dtype=dtype,
        )  # fmt: skip
    return Env(root, dm, weights, other, caches["float32"], caches["float16"])


def named_fields(err: Exception) -> set[str]:
    """The fields a stale-cache error names: ``"... another run: F (cache X, run Y); ...."``."""
    message = str(err)
    assert "\n" not in message, "one line"
    listed = message.split("was built for another run: ", 1)[1].rsplit(". Rebuild", 1)[0]
    return {part.split(" (", 1)[0] for part in listed.split("; ")}


# ---- 1. the data: ids only with augment_seed ----------------------------------------------------
def test_batches_carry_ids_only_with_augment_seed(env: Env) -> None:
    plain, replay = datamodule(augment_seed=None), env.dm
    assert plain.train.augment_seed is None and replay.train.augment_seed == AUGMENT_SEED
    batches = []
    for dm in (plain, replay):
        L.seed_everything(0, verbose=False)
        batches.append(next(iter(dm.train_dataloader())))
    without, with_ids = batches
    assert len(without) == 3 and len(with_ids) == 4
    for a, b in zip(without, with_ids[:3], strict=True):  # the same items, bit for bit
        assert torch.equal(a, b)
    ids = with_ids[3]
    assert ids.dtype == torch.int64
    assert set(ids.tolist()) <= set(replay.train.sample_ids.tolist())
    # An id is the position in the underlying arrays: the item is that row, prepared.
    for k in (0, 7):
        j = int(ids[k])
        assert torch.equal(with_ids[0][k], torch.from_numpy(np.asarray(replay.train.m1[j])))
        assert with_ids[2][k].item() == int(replay.train.labels[j])
    # view(i, e): the same item in every epoch (nothing is augmented), with its id.
    for i in (0, 5, 159):
        first, second = replay.train.view(i, 0), replay.train.view(i, 1)
        assert first[3] == replay.train.sample_ids[i]
        for a, b in zip(first, second, strict=True):
            assert a == b if isinstance(a, int) else torch.equal(a, b)
    with pytest.raises(DataError, match="augment_seed"):
        plain.train.view(0, 0)
    # Only training batches carry ids; the eval split is unchanged.
    assert len(next(iter(replay.val_dataloader()))) == 3
    assert replay.val.augment_seed is None


def test_other_crossmodal_methods_train_on_batches_with_ids(tmp_path: Path) -> None:
    """PairedSupervised and MST-Distill's three stages (chained through checkpoints) take the
    4-item training batches of ``augment_seed`` (the ids are ignored)."""
    dm = datamodule()

    def fit(module):
        trainer = quiet_trainer(
            tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
            enable_checkpointing=False,
        )  # fmt: skip
        trainer.fit(module, dm)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        return trainer

    fit(PairedSupervised(network="m1", **ARCH))
    module = MSTDistill(stage=1, **ARCH)
    for stage in (2, 3):
        trainer = fit(module)
        trainer.save_checkpoint(tmp_path / f"stage{stage - 1}.ckpt")
        module = MSTDistill(stage=stage, init_from=str(tmp_path / f"stage{stage - 1}.ckpt"), **ARCH)
    fit(module)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        assert module.predict_step(batch, 0)["prediction"].shape == (len(batch[0]),)


# ---- 2. the build ------------------------------------------------------------------------------
def test_build_records_the_paired_teacher_and_data(env: Env) -> None:
    manifest = json.loads((env.cache32 / "manifest.json").read_text())
    teacher = manifest["teacher"]
    assert teacher["architecture"] == "fusion(test_resnet+test_resnet)"
    assert teacher["role"] == "fusion" and teacher["num_classes"] == 10
    assert teacher["weights"] == str(env.weights)
    assert teacher["weights_sha256"] == hashlib.sha256(env.weights.read_bytes()).hexdigest()
    live = make(env.weights)
    assert teacher["parameters"] == sum(p.numel() for p in live.teacher.parameters()) > 0
    assert "embedding_dim" not in teacher
    assert manifest["outputs"] == ["logits"]
    assert manifest["logits"]["dtype"] == "float32" and manifest["epochs"] == EPOCHS
    data = manifest["data"]
    assert data["class"] == "kdzoo.datamodules.paired.fashion_pairs.FashionMNISTPairs"
    assert data["samples"] == 160 and data["augment_seed"] == AUGMENT_SEED
    assert data["settings"]["train_subset"] == 160 and data["settings"]["pair_seed"] == 0
    assert "eval_subset" not in data["settings"] and "batch_size" not in data["settings"]
    assert len(manifest["shards"]) == EPOCHS * 3

    # The stored logits are the live teacher's on the training items (float32: exactly).
    dm = env.dm
    shard = load_file(str(env.cache32 / manifest["shards"][3]["file"]))  # epoch 1, chunk 0
    assert set(shard) == {"ids", "logits"}  # (epoch 0's shards add the class counts)
    positions = {int(j): i for i, j in enumerate(dm.train.sample_ids)}
    views = [dm.train.view(positions[int(j)], 1) for j in shard["ids"]]
    with torch.no_grad():
        expected = live.teacher(*(torch.stack([v[k] for v in views]) for k in (0, 1)))
    assert torch.equal(shard["logits"], expected)
    assert "OK" in verify(env.cache32, live, dm, samples=8)
    assert "OK" in verify(env.cache16, live, dm, samples=8)


def test_build_refuses_outputs_a_paired_teacher_lacks(env: Env, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="gives only logits, not embedding_norm"):
        build_cache(make(env.weights), env.dm, tmp_path / "c", epochs=1, outputs=["embedding_norm"])
    with pytest.raises(CacheError, match="augment_seed"):
        build_cache(make(env.weights), datamodule(augment_seed=None), tmp_path / "c", epochs=1)
    with pytest.raises(CacheError, match=r"remove --model\.init_args\.teacher\.cache"):
        build_cache(make(env.weights, env.cache32), env.dm, tmp_path / "c", epochs=1)
    assert not (tmp_path / "c").exists()


# ---- 3. training from the cache ----------------------------------------------------------------
def step(module: CrossModalKD, batch, epoch: int):
    """Loss terms and student gradients of one training step on ``batch`` in ``epoch``."""
    if module.teacher_cached:
        module.teacher.select_batch(batch, epoch, items=4)
    module.zero_grad()
    terms = module.loss_terms(batch)
    sum(module.loss_weights[k] * v for k, v in terms.items()).backward()
    return terms, {n: p.grad.clone() for n, p in module.student.named_parameters()}


def batches(dm: FashionMNISTPairs):
    """A loader batch (epoch 0) and an epoch-1 batch of replayed items."""
    L.seed_everything(0, verbose=False)
    loader_batch = next(iter(dm.train_dataloader()))
    views = [dm.train.view(i, 1) for i in range(40, 72)]
    columns = list(zip(*views, strict=True))
    epoch1 = (torch.stack(columns[0]), torch.stack(columns[1]), *map(torch.tensor, columns[2:]))
    return ((0, loader_batch), (1, epoch1))


def test_training_step_from_float32_cache_equals_live_step(env: Env) -> None:
    live, cached = make(env.weights), make(env.weights, env.cache32)
    assert isinstance(live.teacher, Teacher) and isinstance(cached.teacher, CachedTeacher)
    assert not list(cached.teacher.parameters()), "the network is never built"
    assert cached.teacher_role == live.teacher_role == "fusion"
    assert cached.hparams.teacher == {"weights": str(env.weights), "cache": str(env.cache32)}
    assert cached.result_names() == live.result_names()
    live.train(), cached.train()
    for epoch, batch in batches(env.dm):
        live_terms, live_grads = step(live, batch, epoch)
        cached_terms, cached_grads = step(cached, batch, epoch)
        for name, value in live_terms.items():
            assert torch.equal(cached_terms[name], value), (epoch, name)
        for name, grad in live_grads.items():
            assert torch.equal(cached_grads[name], grad), (epoch, name)


def test_training_step_from_fp16_cache_within_fp16_rounding(env: Env) -> None:
    live, cached = make(env.weights), make(env.weights, env.cache16)
    live.train(), cached.train()
    for epoch, batch in batches(env.dm):
        x = live.inputs("fusion", batch[0], batch[1])
        cached.teacher.select_batch(batch, epoch, items=4)
        with torch.no_grad():
            torch.testing.assert_close(cached.teacher(*x), live.teacher(*x), rtol=FP16, atol=1e-5)
        live_terms, live_grads = step(live, batch, epoch)
        cached_terms, cached_grads = step(cached, batch, epoch)
        for name, value in live_terms.items():
            torch.testing.assert_close(cached_terms[name], value, rtol=1e-3, atol=0)
        for name, grad in live_grads.items():
            atol = 1e-3 * max(1.0, grad.abs().max().item())
            torch.testing.assert_close(cached_grads[name], grad, rtol=1e-3, atol=atol)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_fit_from_float32_cache_equals_live_fit(env: Env, tmp_path: Path) -> None:
    """Through Lightning, both epochs: the same losses and the same student, bit for bit."""
    results = []
    for name, cache in (("live", None), ("cached", env.cache32)):
        module, losses = make(env.weights, cache), Losses()
        L.seed_everything(0, verbose=False)
        trainer = quiet_trainer(
            tmp_path / name, max_epochs=EPOCHS, limit_val_batches=0, enable_checkpointing=False,
            callbacks=[losses],
        )  # fmt: skip
        trainer.fit(module, datamodule())
        state = {k: v.clone() for k, v in module.student.state_dict().items()}
        results.append((losses.values, state))
    (live_losses, live_state), (cached_losses, cached_state) = results
    assert len(live_losses) == EPOCHS * 5 and cached_losses == live_losses
    for key, value in live_state.items():
        assert torch.equal(cached_state[key], value), key


# ---- 4. stale caches are refused ---------------------------------------------------------------
def test_other_teacher_weights_refused(env: Env) -> None:
    with pytest.raises(CacheError) as err:
        make(env.other_weights, env.cache32)
    assert named_fields(err.value) == {"teacher.weights_sha256"}
    with pytest.raises(ConfigError, match="CrossModalKD has no teacher"):
        CrossModalKD(teacher={"cache": str(env.cache32)}, **ARCH)


def test_other_class_count_refused(env: Env) -> None:
    with pytest.raises(CacheError) as err:
        make(env.weights, env.cache32, num_classes=3)
    assert named_fields(err.value) == {"teacher.num_classes"}


STALE_DATA = {
    "pair_seed": ({"pair_seed": 1}, {"data.settings.pair_seed", "data.samples_sha256"}),
    "train_subset": (
        {"train_subset": 100},
        {"data.settings.train_subset", "data.samples", "data.samples_sha256"},
    ),
    "split_seed": ({"split_seed": 1}, {"data.settings.split_seed", "data.samples_sha256"}),
    "augment_seed": ({"augment_seed": AUGMENT_SEED + 1}, {"data.augment_seed"}),
    "no augment_seed": ({"augment_seed": None}, {"data.augment_seed"}),
}


def test_matching_run_is_accepted(env: Env) -> None:
    cached = make(env.weights, env.cache32)
    # Settings that do not change the training items: eval_subset, batch size, workers.
    cached.teacher.check_run(datamodule(eval_subset=16, batch_size=8, num_workers=1), EPOCHS)
    cached.teacher.check_run(env.dm, 1)  # fewer epochs than cached


@pytest.mark.parametrize("case", sorted(STALE_DATA))
def test_other_data_refused(env: Env, case: str) -> None:
    overrides, fields = STALE_DATA[case]
    cached = make(env.weights, env.cache32)
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(datamodule(**overrides), EPOCHS)
    assert named_fields(err.value) == fields


def test_other_stored_rows_refused(env: Env) -> None:
    cached, dm = make(env.weights, env.cache32), datamodule()
    dm.train.m2 = dm.train.m2.copy()
    dm.train.m2[dm.train.sample_ids[3], 0, 5, 5] += 0.5
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(dm, EPOCHS)
    assert named_fields(err.value) == {"data.samples_sha256"}


def test_more_epochs_than_cached_refused_before_any_step(env: Env, tmp_path: Path) -> None:
    cached = make(env.weights, env.cache32)
    trainer = quiet_trainer(tmp_path, max_epochs=EPOCHS + 1, limit_val_batches=0)
    with pytest.raises(CacheError) as err:
        trainer.fit(cached, datamodule())
    assert named_fields(err.value) == {"epochs"}
    assert trainer.global_step == 0
    with pytest.raises(CacheError, match="epoch 2 is not in the teacher cache"):
        cached.teacher.select(torch.tensor([0]), EPOCHS)


def test_batches_without_ids_refused(env: Env) -> None:
    cached = make(env.weights, env.cache32)
    batch = next(iter(datamodule(augment_seed=None).train_dataloader()))
    with pytest.raises(CacheError, match=r"set --data\.init_args\.augment_seed") as err:
        cached.on_train_batch_start(batch, 0)
    assert "\n" not in str(err.value)
    with pytest.raises(CacheError, match="only in training steps"):
        cached.loss_terms(batch)


def test_cached_role_is_checked_like_the_live_one(env: Env, tmp_path: Path) -> None:
    """A cache of a sensor (m2) teacher serves a camera student, never a sensor one."""
    weights = save_untrained(tmp_path / "m2.ckpt", "m2", seed=0)
    build_cache(make(weights), env.dm, tmp_path / "m2", epochs=1, trainer_options=CPU)
    manifest = json.loads((tmp_path / "m2" / "manifest.json").read_text())
    assert manifest["teacher"]["architecture"] == "test_resnet (m2)"
    assert make(weights, tmp_path / "m2").teacher_role == "m2"
    with pytest.raises(ConfigError, match="the student's own modality"):
        make(weights, tmp_path / "m2", target_modality=1)


# ---- 5. end to end through the kdzoo command -----------------------------------------------------
def run_config(teacher: Path) -> dict:
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "kdzoo.methods.CrossModalKD",
            "init_args": {
                "teacher": {"weights": str(teacher)},
                "target_modality": 0,
                "encoders": ENCODERS,
                "head_hidden": [32, 16],
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}},
            },
        },
        "data": {
            "class_path": "kdzoo.datamodules.FashionMNISTPairs",
            "init_args": {**DATA, "augment_seed": 3, "num_workers": 0},
        },
        "trainer": {
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }


def train_losses(save_dir: Path) -> list[tuple[int, float]]:
    (metrics,) = save_dir.glob("*/version_0/metrics.csv")
    with metrics.open() as f:
        return [
            (int(row["step"]), float(row["train/loss"]))
            for row in csv.DictReader(f)
            if row.get("train/loss")
        ]


def student_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    (last,) = save_dir.glob("*/version_0/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.mark.slow
def test_cli_build_fit_verify(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(env.weights)))
    cache = tmp_path / "cache"
    build = kdzoo(
        "cache", "build", "-c", str(config), "--epochs", "2", "--out", str(cache),
        "--dtype", "float32", "--chunk_size", "64", cwd=tmp_path,
    )  # fmt: skip
    # The build prints what `kdzoo cache info` prints.
    assert "fusion(test_resnet+test_resnet)" in build.stdout
    assert "160 training samples, augment_seed 3" in build.stdout
    assert "every logit, float32" in build.stdout

    live_dir, cached_dir = tmp_path / "live", tmp_path / "cached"
    kdzoo("fit", "-c", str(config), f"--trainer.logger.init_args.save_dir={live_dir}", cwd=tmp_path)
    proc = kdzoo(
        "fit", "-c", str(config), f"--model.init_args.teacher.cache={cache}",
        f"--trainer.logger.init_args.save_dir={cached_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert "Teacher outputs come from the cache" in proc.stdout + proc.stderr
    live, cached = train_losses(live_dir), train_losses(cached_dir)
    assert [s for s, _ in live] == list(range(10)) and cached == live
    live_state, cached_state = student_weights(live_dir), student_weights(cached_dir)
    assert live_state.keys() == cached_state.keys() and live_state
    for name, value in live_state.items():
        assert torch.equal(cached_state[name], value), name

    proc = kdzoo("cache", "verify", str(cache), "-c", str(config), "--samples", "16", cwd=tmp_path)
    assert "OK" in proc.stdout and "6 shards match their size and sha256" in proc.stdout

    # Through the command line once; every stale field is refused in process above.
    proc = kdzoo(
        "fit", "-c", str(config), f"--model.init_args.teacher.cache={cache}",
        "--data.init_args.augment_seed=null", cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_clear_error(proc, "data.augment_seed (cache 3, run None)")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("kdzoo fit: error:"), proc.stderr
