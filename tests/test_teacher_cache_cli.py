"""Teacher-output caches end to end through the real ``kdzoo`` command (subprocesses): ``kdzoo
cache build / info / verify``, ``kdzoo fit`` from a cache against the live teacher, a stale run
refused, and a DDP build equal to the one-process build. Small: 128 Fashion-MNIST images."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_clear_error, kdzoo

pytestmark = pytest.mark.slow

RUN = "kd-test_resnet-test_resnet"


@dataclass
class Built:
    cwd: Path
    config: Path
    cache: Path
    build_stdout: str


def run_config(teacher_ckpt: Path) -> dict:
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "kdzoo.methods.KD",
            "init_args": {
                "student": "test_resnet",
                "teacher": {"name": "test_resnet", "weights": str(teacher_ckpt)},
            },
        },
        "data": {
            "class_path": "kdzoo.datamodules.FashionMNIST",
            "init_args": {
                "train_subset": 128,
                "eval_subset": 64,
                "batch_size": 32,
                "num_workers": 0,
                "augment_seed": 3,
            },
        },
        "trainer": {
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path) -> Built:
    """The run config and its 2-epoch cache, built once by ``kdzoo cache build``."""
    cwd = tmp_path_factory.mktemp("cache_cli")
    config = cwd / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(teacher_ckpt)))
    cache = cwd / "cache"
    proc = kdzoo(
        "cache", "build", "-c", str(config), "--epochs", "2", "--out", str(cache),
        "--chunk_size", "48", cwd=cwd,
    )  # fmt: skip
    return Built(cwd, config, cache, proc.stdout)


def shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("epoch*"))}


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [
            (int(row["step"]), float(row["train/loss"]))
            for row in csv.DictReader(f)
            if row.get("train/loss")
        ]


def test_build_and_info(built: Built) -> None:
    # 128 samples in chunks of 48: 3 shards per epoch.
    assert sorted(shards(built.cache)) == sorted(
        f"epoch{e:04d}-chunk{c:05d}.{ext}" for e in (0, 1) for c in (0, 1, 2)
        for ext in ("json", "safetensors")
    )  # fmt: skip
    assert (built.cache / "manifest.json").is_file()
    assert not (built.cache / "build.json").exists()
    assert "bytes per sample-epoch" in built.build_stdout
    info = kdzoo("cache", "info", str(built.cache), cwd=built.cwd).stdout
    assert "bytes per sample-epoch" in info
    assert "128 training samples, augment_seed 3" in info
    assert "epochs:       2" in info and "every logit, float16" in info


def fit(built: Built, name: str, *options: str) -> Path:
    """``kdzoo fit`` of the run config (plus ``options``) into ``<cwd>/<name>``; its log dir."""
    kdzoo(
        "fit", "-c", str(built.config), *options,
        f"--trainer.logger.init_args.save_dir={built.cwd / name}", cwd=built.cwd,
    )  # fmt: skip
    return built.cwd / name / RUN / "version_0"


@pytest.fixture(scope="module")
def live_run(built: Built) -> Path:
    """The run trained from the live teacher."""
    return fit(built, "live")


def test_fit_from_cache_matches_live_fit(built: Built, live_run: Path) -> None:
    proc = kdzoo(
        "fit", "-c", str(built.config), f"--model.init_args.teacher.cache={built.cache}",
        f"--trainer.logger.init_args.save_dir={built.cwd / 'cached'}", cwd=built.cwd,
    )  # fmt: skip
    assert "Teacher outputs come from the cache" in proc.stdout + proc.stderr
    cached = train_losses(built.cwd / f"cached/{RUN}/version_0")
    live = train_losses(live_run)
    assert [step for step, _ in cached] == [step for step, _ in live] == list(range(8))
    for (step, from_cache), (_, from_teacher) in zip(cached, live, strict=True):
        assert from_cache == pytest.approx(from_teacher, rel=1e-3), step
    saved = yaml.safe_load((built.cwd / f"cached/{RUN}/version_0/config.yaml").read_text())
    assert saved["model"]["init_args"]["teacher"]["cache"] == str(built.cache)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


@pytest.fixture(scope="module")
def cache32(built: Built) -> Path:
    """A float32 cache of the run's teacher."""
    cache = built.cwd / "cache32"
    kdzoo(
        "cache", "build", "-c", str(built.config), "--epochs", "2", "--out", str(cache),
        "--dtype", "float32", cwd=built.cwd,
    )  # fmt: skip
    return cache


def test_float32_cache_trains_the_live_run_bit_for_bit(
    built: Built, live_run: Path, cache32: Path
) -> None:
    # fp16 storage moves the logits by up to 2^-11 (relative), which SGD amplifies; fp32 storage
    # holds what the live teacher computes, so nothing differs: every loss and every weight.
    info = kdzoo("cache", "info", str(cache32), cwd=built.cwd).stdout
    assert "every logit, float32" in info
    run = fit(built, "cached32", f"--model.init_args.teacher.cache={cache32}")
    assert train_losses(run) == train_losses(live_run)
    cached, live = student_weights(run), student_weights(live_run)
    assert cached.keys() == live.keys() and cached
    for name, value in live.items():
        assert torch.equal(cached[name], value), name


def test_interrupted_cached_run_resumes_to_the_live_result(
    built: Built, live_run: Path, cache32: Path
) -> None:
    # Stopped after epoch 0, resumed from last.ckpt: epoch 1 reads epoch 1's stored outputs.
    option = f"--model.init_args.teacher.cache={cache32}"
    run = fit(built, "resumed", option, "--trainer.max_epochs=1")
    fit(built, "resumed", option, "--ckpt_path=last")
    assert not run.with_name("version_1").exists(), "resumed into its run"
    resumed, live = student_weights(run), student_weights(live_run)
    for name, value in live.items():
        assert torch.equal(resumed[name], value), name


def test_verify(built: Built) -> None:
    proc = kdzoo(
        "cache", "verify", str(built.cache), "-c", str(built.config), "--samples", "16",
        cwd=built.cwd,
    )  # fmt: skip
    assert "OK" in proc.stdout
    assert "6 shards match their size and sha256" in proc.stdout
    assert "16 random entries recomputed" in proc.stdout


def test_stale_run_is_refused(built: Built) -> None:
    proc = kdzoo(
        "fit", "-c", str(built.config), f"--model.init_args.teacher.cache={built.cache}",
        "--data.init_args.augment_seed=4", cwd=built.cwd, expect_fail=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_clear_error(proc, "augment_seed")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("kdzoo fit: error:"), proc.stderr
    assert "data.augment_seed (cache 3, run 4)" in errors[0]


def test_ddp_build_equals_one_process_build(built: Built) -> None:
    ddp = built.cwd / "ddp_cache"
    kdzoo(
        "cache", "build", "-c", str(built.config), "--epochs", "2", "--out", str(ddp),
        "--chunk_size", "48", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", cwd=built.cwd,
    )  # fmt: skip
    expected, got = shards(built.cache), shards(ddp)
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        assert got[name] == data, f"{name} differs from the one-process build's"
    for name in ("statistics.safetensors", "manifest.json"):
        assert (ddp / name).exists() == (built.cache / name).exists()
    assert (ddp / "manifest.json").read_bytes() == (built.cache / "manifest.json").read_bytes()
