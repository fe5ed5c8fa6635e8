"""Running the real ``kdzoo`` command in a subprocess, for the end-to-end tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

KDZOO = str(Path(sys.executable).with_name("kdzoo"))
# Small and fast: 400 training images, 200 for val and test (even, so two DDP ranks split
# them without padding and synced metrics must equal single-process ones).
DATA = [
    "--data=Digits",
    "--data.train_subset=400",
    "--data.eval_subset=200",
    "--data.batch_size=50",
    "--data.num_workers=0",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def kdzoo(
    *args: str, cwd: Path, expect_fail: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``kdzoo ARGS`` offline in ``cwd``; assert it succeeded (or failed, ``expect_fail``)."""
    # One intra-op thread per process: the suite runs two test workers on two cores (README's
    # `pytest -n 2`), and OpenMP threads spinning against another busy process cost 3-9x.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = {
        **os.environ,
        **threads,
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    proc = subprocess.run(
        [KDZOO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if expect_fail:
        assert proc.returncode != 0, f"kdzoo {args} should have failed:\n{proc.stdout}"
    else:
        assert proc.returncode == 0, f"kdzoo {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def last_metrics(log_dir: Path) -> dict[str, float]:
    """Last non-empty value of every column of a CSVLogger's metrics.csv."""
    values: dict[str, float] = {}
    with (log_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def train_teacher(cwd: Path, *extra: str) -> Path:
    """A small ``test_resnet`` teacher trained with ``kdzoo fit --model Supervised``: its best
    checkpoint."""
    kdzoo(
        "fit", "--model=Supervised", "--model.student=test_resnet", *DATA, *QUIET,
        "--trainer.max_epochs=2", "--trainer.logger.init_args.name=teacher", *extra, cwd=cwd,
    )  # fmt: skip
    ckpts = sorted((cwd / "runs/teacher/version_0/checkpoints").glob("best-*.ckpt"))
    assert len(ckpts) == 1
    return ckpts[0]


def assert_clear_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """The failed command printed every fragment and no traceback."""
    message = proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message, message
