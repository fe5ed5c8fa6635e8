"""``kdzoo bench run`` with ``teacher_cache: true`` and ``teacher_cache_dtype: float32`` (the quick
suite's setting): the students trained from the suite's cache are bit-identical to the same suite
run with ``--teacher_cache false`` (live teacher, same views), so the table does not depend on the
cache. In process, as ``kdzoo bench run`` does it: the cache is built by the same process that then
trains from it. A teacher and one KD student on 256 Fashion-MNIST images, 2 epochs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdzoo.bench import run_suite

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*",
        "ignore:.*The number of training batches.*",
        r"ignore:Found \d+ module\(s\) in eval mode",
    ),
]

BASE = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 2, "log_every_n_steps": 1, "enable_progress_bar": False},
    "data": {
        "class_path": "kdzoo.datamodules.FashionMNIST",
        "init_args": {"train_subset": 256, "eval_subset": 64, "batch_size": 32, "num_workers": 0},
    },
}
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
TEACHER = {
    "model": {
        "class_path": "kdzoo.methods.Supervised",
        "init_args": {"student": "test_resnet", "optimizer": SGD},
    }
}
STUDENT = {
    "model": {
        "class_path": "kdzoo.methods.KD",
        "init_args": {
            "student": "test_resnet",
            "teacher": {"name": "test_resnet", "weights": None},
            "temperature": 4.0,
            "optimizer": SGD,
        },
    }
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite_configs")
    for name, content in (("base", BASE), ("teacher", TEACHER), ("kd", STUDENT)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(content))
    (root / "bench").mkdir()
    suite = {
        "reference": "kd",
        "teacher_cache": True,
        "teacher_cache_dtype": "float32",
        "base": ["base.yaml"],
        "runs": [
            {"name": "teacher", "configs": ["teacher.yaml"]},
            {"name": "kd", "configs": ["kd.yaml"], "teacher": "teacher"},
        ],
    }
    (root / "bench/mini.yaml").write_text(yaml.safe_dump(suite))
    return root


def run(configs: Path, out: Path, cached: bool) -> dict[str, float]:
    rows = run_suite("mini", out=out, configs_dir=configs, teacher_cache=cached)
    return {r["run"]: r["value"] for r in rows if r["metric"] == "top1"}


def run_dir(out: Path) -> Path:
    return out / "runs/mini/kd/version_0"


def test_cached_suite_student_is_bit_identical_to_the_live_one(
    configs: Path, tmp_path: Path
) -> None:
    cached = run(configs, tmp_path / "cached", cached=True)
    live = run(configs, tmp_path / "live", cached=False)

    caches = list((tmp_path / "cached/caches/mini/seed0").iterdir())
    assert [c.name for c in caches] == ["teacher"], "one cache, for the teacher run"
    manifest = yaml.safe_load((caches[0] / "manifest.json").read_text())
    assert manifest["logits"]["dtype"] == "float32"
    assert not (tmp_path / "live/caches").exists()
    config = yaml.safe_load((run_dir(tmp_path / "cached") / "config.yaml").read_text())
    assert config["model"]["init_args"]["teacher"]["cache"] == str(caches[0])

    assert cached == live
    from_cache, from_teacher = (
        list(csv.DictReader((run_dir(tmp_path / side) / "metrics.csv").open()))
        for side in ("cached", "live")
    )
    assert sum(1 for r in from_cache if r.get("train/loss")) == 16
    assert from_cache == from_teacher  # every logged loss and metric, as written
    weights = [
        torch.load(next((run_dir(out) / "checkpoints").glob("best-*.ckpt")), weights_only=True)
        for out in (tmp_path / "cached", tmp_path / "live")
    ]
    for name, value in weights[1]["state_dict"].items():
        assert torch.equal(weights[0]["state_dict"][name], value), name
    assert "logits" in load_file(str(next(caches[0].glob("epoch0001-*.safetensors"))))
