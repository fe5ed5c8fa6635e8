"""Teacher-output caches (:mod:`kdzoo.cache`): the logits encoding, training from a cache as from
the live teacher, stale / corrupt / incomplete caches refused, resumed builds, the class-mean
tables. In process, on a 200-image Fashion-MNIST subset and random ``test_resnet`` teachers."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from trainer_helpers import quiet_trainer

import kdzoo.cache.build as cache_build
from kdzoo import methods
from kdzoo.cache import CachedTeacher, CacheError
from kdzoo.cache.build import build_cache, plan_manifest
from kdzoo.cache.report import verify
from kdzoo.cache.store import (
    encode_logits,
    restore_logits,
    shard_name,
    write_json,
    write_shard,
)
from kdzoo.datamodules import FashionMNIST
from kdzoo.errors import ConfigError
from kdzoo.methods import KD, ND, DualHeadDistillation, KnowledgeConcentration, TGeoKD
from kdzoo.models import TeacherSpec

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:Be aware that when using `ckpt_path`",
)

NUM_CLASSES = 10
AUGMENT_SEED = 7
EPOCHS = 2
CHUNK = 64  # 200 samples: 4 chunks (64, 64, 64, 8) per epoch, 8 shards
DATA = {"train_subset": 200, "eval_subset": 50, "batch_size": 32, "augment_seed": AUGMENT_SEED}
CPU = {"accelerator": "cpu", "devices": 1}
# fp16 keeps 11 significant bits.
FP16 = 2.0**-11


def datamodule(**overrides) -> FashionMNIST:
    dm = FashionMNIST(**{**DATA, **overrides})
    dm.setup("fit")
    return dm


def make(cls=KD, *, weights: Path, cache: Path | None = None, num_classes=NUM_CLASSES, **kw):
    """A ``test_resnet`` student of ``cls`` whose teacher is ``weights``, live or from ``cache``;
    always the same student initialisation."""
    spec = TeacherSpec("test_resnet", weights=str(weights), cache=cache and str(cache))
    torch.manual_seed(0)
    return cls(
        teacher=spec,
        student="test_resnet",
        num_classes=num_classes,
        in_chans=1,
        mean=FashionMNIST.native_mean,
        std=FashionMNIST.native_std,
        **kw,
    )


def write_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=NUM_CLASSES, in_chans=1)
    with torch.no_grad():  # spread the logits (a random head gives nearly uniform ones)
        model.fc.weight.mul_(60.0)
    save_file(model.state_dict(), path)
    return path


@dataclass
class Env:
    root: Path
    weights: Path
    other_weights: Path
    kd_cache: Path  # KD's outputs: the logits
    nd_cache: Path  # ND's: the logits, embedding norms, embedding class means


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("teacher_cache")
    weights = write_teacher(root / "teacher.safetensors", seed=1)
    other = write_teacher(root / "other.safetensors", seed=2)
    kd_cache, nd_cache = root / "kd", root / "nd"
    for cls, out in ((KD, kd_cache), (ND, nd_cache)):
        build_cache(
            make(cls, weights=weights), datamodule(), out,
            epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK,
        )  # fmt: skip
    return Env(root, weights, other, kd_cache, nd_cache)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def named_fields(err: CacheError) -> set[str]:
    """The fields a stale-cache error names: ``"... another run: F (cache X, run Y); ...."``."""
    message = str(err)
    assert "\n" not in message, "one line"
    listed = message.split("was built for another run: ", 1)[1].rsplit(". Rebuild", 1)[0]
    return {part.split(" (", 1)[0] for part in listed.split("; ")}


# ---- 1. the logits encoding -------------------------------------------------------------------
def test_topk_encoding_matches_the_formula() -> None:
    n, c, k = 8, 150, 10
    # Unit-scale logits: fp16 rounds a logit z by up to |z| 2^-11, which moves a probability
    # p by up to p (1 - p) 2 |z| 2^-11 (1e-3 at |z| ~ 4).
    logits = torch.randn(n, c, generator=torch.Generator().manual_seed(0))
    stored = encode_logits(logits, k)
    assert stored["topk_values"].dtype == torch.float16
    assert stored["rest_logit"].dtype == torch.float16
    assert stored["topk_indices"].dtype == torch.int16
    restored = restore_logits(stored, c)
    assert restored.shape == (n, c) and restored.dtype == torch.float32

    for row in range(n):
        z = logits[row].double()
        order = sorted(range(c), key=lambda j: -float(z[j]))
        top, others = order[:k], order[k:]
        # The top-k positions keep their logits (to fp16).
        for j in top:
            assert restored[row, j].item() == pytest.approx(z[j].item(), rel=FP16, abs=1e-6)
        # The others all hold one value r, with (C - k) exp(r) = sum of exp(their logits).
        rest = restored[row, others]
        assert torch.all(rest == rest[0])
        r = rest[0].item()
        mass = sum(math.exp(z[j].item()) for j in others)
        assert (c - k) * math.exp(r) == pytest.approx(mass, rel=2e-3)
        # Softmax keeps the top-k probabilities and the remaining mass.
        p_true = torch.softmax(z, dim=0)
        p_restored = torch.softmax(restored[row].double(), dim=0)
        for j in top:
            assert p_restored[j].item() == pytest.approx(p_true[j].item(), abs=1e-3)
        assert p_restored[others].sum().item() == pytest.approx(
            p_true[others].sum().item(), abs=1e-3
        )
        assert p_restored[others].sum().item() == pytest.approx(
            (c - k) * p_restored[others[0]].item(), rel=1e-9
        )

    full = encode_logits(logits, None)
    assert set(full) == {"logits"} and full["logits"].dtype == torch.float16
    assert torch.allclose(restore_logits(full, c), logits, rtol=FP16, atol=1e-6)
    assert torch.equal(restore_logits(full, c), logits.half().float())

    wide = torch.randn(2, 40000, generator=torch.Generator().manual_seed(1))
    wide_stored = encode_logits(wide, 5)
    assert wide_stored["topk_indices"].dtype == torch.int32
    assert torch.equal(
        wide_stored["topk_indices"].long().sort(dim=1).values,
        wide.topk(5, dim=1).indices.sort(dim=1).values,
    )


def test_float32_storage_is_exact() -> None:
    logits = torch.randn(6, 150, generator=torch.Generator().manual_seed(2)) * 8
    full = encode_logits(logits, None, torch.float32)
    assert full["logits"].dtype == torch.float32
    assert torch.equal(restore_logits(full, 150), logits)
    top = encode_logits(logits, 10, torch.float32)
    assert top["topk_values"].dtype == top["rest_logit"].dtype == torch.float32
    assert torch.equal(top["topk_values"], logits.topk(10, dim=1).values)


def test_unknown_dtype_refused(env: Env) -> None:
    with pytest.raises(CacheError, match="--dtype must be one of float16, float32, got 'int8'"):
        plan_manifest(make(KD, weights=env.weights), datamodule(), epochs=1, dtype="int8")


def test_topk_cache_end_to_end(env: Env, tmp_path: Path) -> None:
    """``k`` below the class count: the cached teacher gives the live top-k logits at their
    positions and one rest logit elsewhere; verify accepts it."""
    dm, live = datamodule(), make(weights=env.weights)
    manifest = build_cache(
        live, dm, tmp_path / "top3", epochs=1, trainer_options=CPU, k=3, chunk_size=CHUNK
    )
    assert manifest["logits"] == {
        "stored": "topk", "k": 3, "dtype": "float16", "index_dtype": "int16"
    }  # fmt: skip
    cached = make(weights=env.weights, cache=tmp_path / "top3")
    views = [dm.train.view(i, 0) for i in range(0, 200, 7)]
    images = torch.stack([v[0] for v in views])
    cached.teacher.select(torch.tensor([v[2] for v in views]), 0)
    got = cached.teacher_forward(images).logits
    expected = live.teacher_forward(images).logits
    values, positions = expected.topk(3, dim=1)
    torch.testing.assert_close(got.gather(1, positions), values, rtol=FP16, atol=1e-5)
    mask = torch.ones_like(got, dtype=torch.bool).scatter(1, positions, False)
    rest = got[mask].view(len(got), -1)
    assert torch.all(rest == rest[:, :1])
    assert "OK" in verify(tmp_path / "top3", live, dm, samples=8)


# ---- 2. a training step from the cache equals the live one -------------------------------------
# DIST correlates the teacher's softened probabilities across the batch and the classes, which
# amplifies the fp16 rounding of the logits: its gradients move by up to ~1.2e-3 of their largest
# value here (KD's by 3.5e-4).
GRAD_ATOL = {"DIST": 3e-3}


@pytest.mark.parametrize("method", ["KD", "DKD", "DIST", "PLD"])
def test_training_step_from_cache_equals_live_step(env: Env, method: str) -> None:
    cls = getattr(methods, method)
    dm = datamodule()
    live = make(cls, weights=env.weights)
    cached = make(cls, weights=env.weights, cache=env.kd_cache)
    assert isinstance(cached.teacher, CachedTeacher)
    assert not list(cached.teacher.parameters()), "the network is never built"
    assert cached.hparams.teacher["name"] == "test_resnet"
    for (name, p), (_, q) in zip(
        live.student.named_parameters(), cached.student.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    live.train(), cached.train()

    L.seed_everything(0, verbose=False)
    loader_batch = next(iter(dm.train_dataloader()))
    assert len(loader_batch) == 3
    # An epoch-1 batch, from the replayed views.
    views = [dm.train.view(i, 1) for i in range(40, 72)]
    epoch1_batch = (
        torch.stack([v[0] for v in views]),
        torch.tensor([v[1] for v in views]),
        torch.tensor([v[2] for v in views]),
    )
    for epoch, batch in ((0, loader_batch), (1, epoch1_batch)):
        if epoch == 0:  # as Lightning calls it (current_epoch is 0 without a trainer)
            cached.on_train_batch_start(batch, 0)
        else:
            cached.teacher.select(batch[2], epoch)
        torch.testing.assert_close(
            cached.teacher_forward(batch[0]).logits,
            live.teacher_forward(batch[0]).logits,
            rtol=FP16,
            atol=1e-5,
        )
        grads = []
        for module in (live, cached):
            module.zero_grad()
            terms = module.loss_terms(batch)
            sum(module.loss_weights[k] * v for k, v in terms.items()).backward()
            grads.append((terms, {n: p.grad.clone() for n, p in module.student.named_parameters()}))
        (live_terms, live_grads), (cached_terms, cached_grads) = grads
        assert live_terms.keys() == cached_terms.keys()
        for name in live_terms:
            torch.testing.assert_close(cached_terms[name], live_terms[name], rtol=1e-3, atol=0)
        for name, grad in live_grads.items():
            atol = GRAD_ATOL.get(method, 1e-3) * max(1.0, grad.abs().max().item())
            torch.testing.assert_close(cached_grads[name], grad, rtol=1e-3, atol=atol)


def checked_against(module: KD, live: KD, log: list[tuple[int, int, float]]) -> None:
    """Make every teacher call of ``module`` (cached) compare its logits with ``live``'s teacher
    on the same images, recording ``(epoch, batch size, largest relative difference)``."""
    read = module.teacher_forward

    def teacher_forward(x, indices=None):
        out = read(x, indices)
        expected = live.teacher_forward(x).logits
        error = (out.logits - expected).abs() / expected.abs().clamp(min=2.0**-14)
        log.append((module.current_epoch, len(x), float(error.max())))
        return out

    module.teacher_forward = teacher_forward


def test_every_training_batch_reads_its_own_views(env: Env, tmp_path: Path) -> None:
    """Through Lightning, in each epoch, and after resuming at an epoch boundary: the cached
    logits of every training batch are the live teacher's on that batch's images."""
    live = make(weights=env.weights)
    log: list[tuple[int, int, float]] = []
    cached = make(weights=env.weights, cache=env.kd_cache)
    checked_against(cached, live, log)
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path / "a", max_epochs=EPOCHS, limit_val_batches=0)
    trainer.fit(cached, datamodule())
    batches = math.ceil(200 / 32)
    assert [e for e, _, _ in log] == [0] * batches + [1] * batches
    assert sum(n for _, n, _ in log) == EPOCHS * 200
    assert max(err for *_, err in log) <= FP16, log

    # One epoch, then resumed for the second from its checkpoint.
    L.seed_everything(0, verbose=False)
    first = quiet_trainer(tmp_path / "b", max_epochs=1, limit_val_batches=0)
    first.fit(make(weights=env.weights, cache=env.kd_cache), datamodule())
    checkpoint = next((tmp_path / "b").rglob("*.ckpt"))
    log.clear()
    resumed = make(weights=env.weights, cache=env.kd_cache)
    checked_against(resumed, live, log)
    L.seed_everything(0, verbose=False)
    second = quiet_trainer(
        tmp_path / "c", max_epochs=EPOCHS, limit_val_batches=0, enable_checkpointing=False
    )
    second.fit(resumed, datamodule(), ckpt_path=checkpoint)
    assert [e for e, _, _ in log] == [1] * batches
    assert max(err for *_, err in log) <= FP16, log


# ---- 3. stale caches are refused ---------------------------------------------------------------
def test_matching_run_is_accepted(env: Env) -> None:
    cached = make(weights=env.weights, cache=env.kd_cache)
    # Settings that do not change the training views: eval_subset, batch size, workers.
    cached.teacher.check_run(datamodule(eval_subset=20, batch_size=16, num_workers=1), EPOCHS)
    cached.teacher.check_run(datamodule(), 1)  # fewer epochs than cached


def test_other_teacher_weights_refused(env: Env) -> None:
    with pytest.raises(CacheError) as err:
        make(weights=env.other_weights, cache=env.kd_cache)
    assert named_fields(err.value) == {"teacher.weights_sha256"}


def test_other_class_count_refused(env: Env) -> None:
    with pytest.raises(CacheError) as err:
        make(weights=env.weights, cache=env.kd_cache, num_classes=3)
    assert named_fields(err.value) == {"teacher.num_classes"}
    assert "cache 10, run 3" in str(err.value)


def test_other_architecture_refused(env: Env) -> None:
    spec = TeacherSpec("test_efficientnet", weights=str(env.weights), cache=str(env.kd_cache))
    with pytest.raises(CacheError) as err:
        KD(teacher=spec, student="test_resnet", num_classes=NUM_CLASSES, in_chans=1)
    assert named_fields(err.value) == {"teacher.architecture"}


STALE_DATA = {
    "train_subset": (
        {"train_subset": 150},
        {"data.settings.train_subset", "data.samples", "data.samples_sha256"},
    ),
    "split_seed": ({"split_seed": 1}, {"data.settings.split_seed", "data.samples_sha256"}),
    "classes": (
        {"classes": [0, 1, 2]},
        {"data.settings.classes", "data.samples_sha256"},  # still 200 samples
    ),
    "image_size": ({"image_size": 32}, {"data.settings.image_size", "data.transforms_sha256"}),
    "grey_to_rgb": ({"grey_to_rgb": True}, {"data.settings.grey_to_rgb", "data.transforms_sha256"}),
    "augment": ({"augment": False}, {"data.settings.augment", "data.transforms_sha256"}),
    "augment_seed": ({"augment_seed": AUGMENT_SEED + 1}, {"data.augment_seed"}),
}


@pytest.mark.parametrize("case", sorted(STALE_DATA))
def test_other_data_refused(env: Env, case: str) -> None:
    overrides, fields = STALE_DATA[case]
    cached = make(weights=env.weights, cache=env.kd_cache)
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(datamodule(**overrides), EPOCHS)
    assert named_fields(err.value) == fields


def test_same_settings_other_transforms_or_pixels_refused(env: Env) -> None:
    cached = make(weights=env.weights, cache=env.kd_cache)
    dm = datamodule()
    dm.train.transform = dm.build_transform(train=False)
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(dm, EPOCHS)
    assert named_fields(err.value) == {"data.transforms_sha256"}
    dm = datamodule()
    dm.train.images = dm.train.images.copy()
    dm.train.images[dm.train.sample_ids[5], 3, 4] ^= 1
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(dm, EPOCHS)
    assert named_fields(err.value) == {"data.samples_sha256"}


def test_more_epochs_than_cached_refused(env: Env) -> None:
    cached = make(weights=env.weights, cache=env.kd_cache)
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(datamodule(), EPOCHS + 1)
    assert named_fields(err.value) == {"epochs"}
    with pytest.raises(CacheError, match="epoch 2 is not in the teacher cache"):
        cached.teacher.select(torch.tensor([0]), EPOCHS)


def test_every_difference_is_named_at_once(env: Env) -> None:
    cached = make(weights=env.weights, cache=env.kd_cache)
    with pytest.raises(CacheError) as err:
        cached.teacher.check_run(datamodule(augment_seed=1, image_size=32), EPOCHS + 3)
    assert named_fields(err.value) == {
        "data.augment_seed", "data.settings.image_size", "data.transforms_sha256", "epochs"
    }  # fmt: skip


def test_fit_checks_the_run(env: Env, tmp_path: Path) -> None:
    """Lightning's setup hook runs the check: a stale run stops before any step."""
    cached = make(weights=env.weights, cache=env.kd_cache)
    trainer = quiet_trainer(tmp_path, max_epochs=EPOCHS + 1, limit_val_batches=0)
    with pytest.raises(CacheError) as err:
        trainer.fit(cached, datamodule())
    assert named_fields(err.value) == {"epochs"}
    assert trainer.global_step == 0


# ---- 4. corrupt or truncated shards ------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_never_read(env: Env, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(env.kd_cache, copy)
    name = shard_name(1, 2)
    shard = copy / name
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        flipped = bytearray(data)
        flipped[len(data) - 50] ^= 0x01  # in the tensor data, not the header
        shard.write_bytes(bytes(flipped))
    else:
        shard.unlink()
    expected = {"truncate": "truncated", "flip": "corrupt", "delete": "missing"}[damage]

    cached = make(weights=env.weights, cache=copy)  # the manifest alone is read
    ids = torch.as_tensor(datamodule().train.sample_ids[:4])
    cached.teacher.select(ids, 0)  # epoch 0 is intact
    assert cached.teacher_forward(torch.zeros(4, 1, 28, 28)).logits.shape == (4, NUM_CLASSES)
    with pytest.raises(CacheError, match=f"{re.escape(name)}.*{expected}"):
        cached.teacher.select(ids, 1)
    with pytest.raises(CacheError, match=f"{re.escape(name)}.*{expected}"):
        verify(copy, make(weights=env.weights), datamodule(), samples=4)


def test_corrupt_statistics_are_never_read(env: Env, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(env.nd_cache, copy)
    table = copy / "statistics.safetensors"
    data = bytearray(table.read_bytes())
    data[-3] ^= 0x10
    table.write_bytes(bytes(data))
    cached = make(ND, weights=env.weights, cache=copy)
    with pytest.raises(CacheError, match=r"statistics\.safetensors.*corrupt"):
        cached.teacher.statistic("embedding_class_means")


def test_verify_recomputes_entries(env: Env, tmp_path: Path) -> None:
    """Shards rewritten with consistent sizes and sha256 but logits off by 1%: only the
    recomputation can tell, and it does; a run with other data is refused first."""
    live, dm = make(ND, weights=env.weights), datamodule()
    assert "OK" in verify(env.nd_cache, live, dm, samples=8)
    with pytest.raises(CacheError, match=r"data\.augment_seed"):
        verify(env.nd_cache, live, datamodule(augment_seed=AUGMENT_SEED + 1), samples=8)
    copy = tmp_path / "cache"
    shutil.copytree(env.nd_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for info in manifest["shards"]:
        tensors = load_file(str(copy / info["file"]))
        tensors["logits"] = (tensors["logits"].float() * 1.01).half()
        info.update(write_shard(copy / info["file"], tensors))
    write_json(copy / "manifest.json", manifest)
    with pytest.raises(CacheError, match="stored logits differ from the live teacher"):
        verify(copy, live, dm, samples=8)


# ---- 5. interrupted builds resume to the same shards --------------------------------------------
class Interrupted(Exception):
    pass


def test_interrupted_build_resumes_to_identical_shards(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "b"
    real_write = cache_build.write_shard
    written: list[str] = []

    def interrupted_after_3(path, tensors):
        if len(written) == 3:
            raise Interrupted
        written.append(path.name)
        return real_write(path, tensors)

    monkeypatch.setattr(cache_build, "write_shard", interrupted_after_3)
    with pytest.raises(Interrupted):
        build_cache(
            make(weights=env.weights), datamodule(), out,
            epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK,
        )  # fmt: skip
    assert (out / "build.json").is_file() and not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="did not finish"):
        make(weights=env.weights, cache=out)
    # A crash while writing a shard leaves a temporary file; a shard cut short keeps a sidecar
    # that no longer matches it.
    reference = env.kd_cache
    half = reference / shard_name(1, 0)
    (out / f".{half.name}.4242.tmp").write_bytes(half.read_bytes()[:500])
    cut = out / written[1]
    cut.write_bytes(cut.read_bytes()[:-10])

    rewritten: list[str] = []

    def counting(path, tensors):
        rewritten.append(path.name)
        return real_write(path, tensors)

    monkeypatch.setattr(cache_build, "write_shard", counting)
    manifest = build_cache(
        make(weights=env.weights), datamodule(), out,
        epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK,
    )  # fmt: skip
    all_shards = {shard_name(e, c) for e in range(EPOCHS) for c in range(4)}
    done = {written[0], written[2]}
    assert set(rewritten) == (all_shards - done), "complete shards are skipped"
    assert not (out / "build.json").exists()

    expected, got = files(reference), files(out)
    assert set(got) == set(expected)  # the leftover temporary file is removed at the end
    for name, data in expected.items():
        assert got[name] == data, f"{name} differs from the uninterrupted build's"
    assert manifest == json.loads((reference / "manifest.json").read_text())
    # And it reads.
    make(weights=env.weights, cache=out).teacher.check_run(datamodule(), EPOCHS)


# ---- 6. refusals --------------------------------------------------------------------------------
def test_build_never_overwrites_another_cache(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    shutil.copytree(env.kd_cache, out)
    before = files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CacheError, match=r"another run.*epochs.*nothing was overwritten"):
        build_cache(
            make(weights=env.weights), datamodule(), out,
            epochs=EPOCHS + 1, trainer_options=CPU, chunk_size=CHUNK,
        )  # fmt: skip
    with pytest.raises(CacheError, match=r"another run.*teacher\.weights_sha256"):
        build_cache(
            make(weights=env.other_weights), datamodule(), out,
            epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK,
        )  # fmt: skip
    with pytest.raises(CacheError, match=r"another run.*chunk_size"):
        build_cache(
            make(weights=env.weights), datamodule(), out,
            epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK * 2,
        )  # fmt: skip
    # The same build again: nothing to do, nothing rewritten.
    build_cache(
        make(weights=env.weights), datamodule(), out,
        epochs=EPOCHS, trainer_options=CPU, chunk_size=CHUNK,
    )  # fmt: skip
    assert files(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # An unfinished build of another run, and a directory of other files.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    write_json(
        unfinished / "build.json",
        plan_manifest(make(weights=env.other_weights), datamodule(), epochs=EPOCHS),
    )
    with pytest.raises(CacheError, match="unfinished build of another run"):
        build_cache(make(weights=env.weights), datamodule(), unfinished, epochs=EPOCHS)
    assert [p.name for p in unfinished.iterdir()] == ["build.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        build_cache(make(weights=env.weights), datamodule(), other, epochs=EPOCHS)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_build_needs_augment_seed(env: Env, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="augment_seed"):
        build_cache(
            make(weights=env.weights), datamodule(augment_seed=None), tmp_path / "c", epochs=1
        )
    assert not (tmp_path / "c").exists()


def test_build_needs_teacher_weights_in_a_file(tmp_path: Path) -> None:
    module = KD(
        teacher=TeacherSpec("test_resnet", weights="random"),
        student="test_resnet", num_classes=NUM_CLASSES, in_chans=1,
    )  # fmt: skip
    with pytest.raises(CacheError, match=r"teacher\.weights"):
        build_cache(module, datamodule(), tmp_path / "c", epochs=1)
    assert not (tmp_path / "c").exists()


def test_methods_needing_more_than_the_cache_holds(env: Env) -> None:
    with pytest.raises(CacheError) as err:
        make(ND, weights=env.weights, cache=env.kd_cache)
    message = str(err.value)
    assert "\n" not in message
    assert "ND needs embedding_norm, embedding_class_means" in message
    with pytest.raises(CacheError, match="TGeoKD needs softmax_class_means"):
        make(TGeoKD, weights=env.weights, cache=env.nd_cache)
    # The ND cache holds what KD needs, and more.
    make(KD, weights=env.weights, cache=env.nd_cache)
    nd = make(ND, weights=env.weights, cache=env.nd_cache, class_means_augment=False)
    with pytest.raises(CacheError, match="class_means_augment=false"):
        nd.on_fit_start()


def test_methods_running_the_teacher_live_refuse_a_cache(env: Env) -> None:
    spec = TeacherSpec("test_resnet", weights=str(env.weights), cache=str(env.kd_cache))
    common = {"student": "test_resnet", "in_chans": 1}
    with pytest.raises(ConfigError, match=r"teacher\.cache is set, but DHO .* repeated within"):
        DualHeadDistillation(teacher=spec, num_classes=NUM_CLASSES, **common)
    specialists = [
        TeacherSpec("test_resnet", weights="random", cache=str(env.kd_cache)) for _ in range(2)
    ]
    with pytest.raises(ConfigError, match=r"specialists\[0\]\.cache is set"):
        KnowledgeConcentration(
            specialists=specialists, verticals=[[0, 1], [2, 3]], num_classes=4, **common
        )


def test_cached_teacher_gives_logits_only_for_known_samples(env: Env) -> None:
    cached = make(weights=env.weights, cache=env.kd_cache)
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(CacheError, match="only in training steps"):
        cached.teacher_forward(x)
    with pytest.raises(CacheError, match="sample ids"):
        cached.on_train_batch_start((x, torch.zeros(2, dtype=torch.long)), 0)
    ids = torch.as_tensor(datamodule().train.sample_ids[:2])
    cached.teacher.select(ids, 0)
    with pytest.raises(CacheError, match="intermediate feature maps"):
        cached.teacher_forward(x, indices=[1])
    outside = ids.clone()
    outside[1] = 59_999  # a Fashion-MNIST training image outside the 200-image subset
    assert outside[1].item() not in set(datamodule().train.sample_ids.tolist())
    for unknown in (outside, torch.tensor([ids[0].item(), 10**9])):
        cached.teacher.select(unknown, 0)
        with pytest.raises(CacheError, match="not in the teacher cache"):
            cached.teacher_forward(x)
    cached.teacher.select(ids[:1], 0)
    with pytest.raises(CacheError, match="2 images but 1 sample ids"):
        cached.teacher_forward(x)


# ---- 7. the class-mean tables -------------------------------------------------------------------
def test_cached_class_means_equal_the_live_ones(env: Env, tmp_path: Path) -> None:
    dm = datamodule()
    live = make(ND, weights=env.weights, class_means_cache=False)
    cached = make(ND, weights=env.weights, cache=env.nd_cache)
    table = cached.teacher.statistic("embedding_class_means")
    assert table.dtype == torch.float64 and table.shape == (NUM_CLASSES, 96)

    # From the formula: the mean over each class of the teacher's embedding of its epoch-0 view.
    views = [dm.train.view(i, 0) for i in range(len(dm.train))]
    with torch.no_grad():
        embedding = live.teacher(torch.stack([v[0] for v in views])).embedding.double()
    targets = torch.tensor([v[1] for v in views])
    reference = torch.stack([embedding[targets == c].mean(dim=0) for c in range(NUM_CLASSES)])
    torch.testing.assert_close(table, reference, rtol=1e-6, atol=1e-7)

    # ND's own live and cached tables, as fit computes / reads them, and the first step's loss.
    losses, tables = [], []
    for module in (live, cached):
        trainer = fit_one_batch(module, tmp_path)
        tables.append(module.class_means.double())
        losses.append(trainer.callback_metrics["train/loss"])
    torch.testing.assert_close(tables[0], reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tables[1], table, rtol=0, atol=0)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)


def fit_one_batch(module: L.LightningModule, tmp_path: Path) -> L.Trainer:
    """Fit ``module`` for one training batch (seed 0), as a run starts: its ``on_fit_start``
    computes (live) or reads (cached) the class-mean table."""
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule())
    return trainer


def test_cached_softmax_class_means_equal_the_live_ones(env: Env, tmp_path: Path) -> None:
    """TGeoKD's table (class means of the teacher's probabilities), built on demand with
    ``outputs``, read by TGeoKD from the cache as fit would compute it live."""
    dm = datamodule()
    live = make(TGeoKD, weights=env.weights, class_means_cache=False)
    build_cache(
        make(KD, weights=env.weights), dm, tmp_path / "c", epochs=1, trainer_options=CPU,
        outputs=["softmax_class_means"], chunk_size=CHUNK,
    )  # fmt: skip
    cached = make(TGeoKD, weights=env.weights, cache=tmp_path / "c")
    views = [dm.train.view(i, 0) for i in range(len(dm.train))]
    with torch.no_grad():
        logits = live.teacher(torch.stack([v[0] for v in views])).logits.double()
    targets = torch.tensor([v[1] for v in views])
    probs = logits.softmax(dim=1)
    reference = torch.stack([probs[targets == c].mean(dim=0) for c in range(NUM_CLASSES)])
    table = cached.teacher.statistic("softmax_class_means")
    torch.testing.assert_close(table, reference, rtol=1e-6, atol=1e-7)

    tables = []
    for module in (live, cached):
        fit_one_batch(module, tmp_path)
        tables.append(module.class_mean_teacher_probs.double())
    torch.testing.assert_close(tables[0], reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tables[1], table, rtol=0, atol=0)
