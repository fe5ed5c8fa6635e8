"""Checkpoints hold the last state, are never left truncated, and resume a run exactly.

Every run is the real ``kdzoo fit`` (``Supervised`` ``test_resnet`` on 400 Digits images: 8 steps
an epoch). "Exactly" means the resumed run ends with every tensor of the model's state dict
``torch.equal`` to the uninterrupted run's; a failure reports the largest absolute difference.

The checkpoint callback monitors ``epoch`` in ``min`` mode: only the first epoch is ever "best",
so a ``last.ckpt`` of a later epoch exists only because the last state is always saved, never as
a side effect of a new best checkpoint (the plateau every long run reaches).
"""

from __future__ import annotations

import builtins
import csv
import errno
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import DATA, KDZOO, QUIET, kdzoo, last_metrics

pytestmark = pytest.mark.slow

PLATEAU = ["--checkpoint.monitor=epoch", "--checkpoint.mode=min"]
FIT = ["fit", "--model=Supervised", "--model.student=test_resnet", *DATA, *QUIET, *PLATEAU]
STEPS_PER_EPOCH = 8  # 400 images, batches of 50
# One thread per process: identical arithmetic in every run, and two DDP ranks fit two cores.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
# Metrics on disk after every step, so a test can see that a run is inside an epoch.
STEP_LOGS = [
    "--trainer.log_every_n_steps=1",
    "--trainer.logger.init_args.flush_logs_every_n_steps=1",
]


def fit(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return kdzoo(*FIT, *args, cwd=cwd, env={**ENV, **(env or {})})


def start_fit(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = (cwd / "fit.log").open("w")
    return subprocess.Popen(
        [KDZOO, *FIT, *args], cwd=cwd, env={**os.environ, **ENV, **(env or {})},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def newest(cwd: Path, pattern: str = "runs/*/version_*/checkpoints/last.ckpt") -> Path:
    found = sorted(cwd.glob(pattern), key=lambda p: p.stat().st_mtime_ns)
    assert found, f"no {pattern} under {cwd}"
    return found[-1]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(resumed: Path, reference: Path) -> None:
    """Same epoch, step and bit-identical model state."""
    a, b = load(resumed), load(reference)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    largest = max(
        ((sa[k].double() - sb[k].double()).abs().max().item() for k in differ), default=0.0
    )
    assert not differ, (
        f"{len(differ)} of {len(sa)} tensors differ from the uninterrupted run, max abs "
        f"difference {largest:.3g} (e.g. {differ[:3]})"
    )


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def inside_epoch(cwd: Path, epoch: int) -> bool:
    """A training step of ``epoch`` has been logged (needs ``STEP_LOGS``)."""
    for metrics in cwd.glob("runs/*/version_*/metrics.csv"):
        try:
            rows = list(csv.DictReader(metrics.open()))
        except (OSError, csv.Error):
            continue
        if any(r.get("epoch") == str(epoch) and r.get("train/loss") for r in rows):
            return True
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """``last.ckpt`` of an uninterrupted 2-epoch run."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    fit(cwd, "--trainer.max_epochs=2")
    return newest(cwd)


def test_last_ckpt_is_the_final_state_when_the_metric_plateaus(reference):
    run = reference.parent.parent
    last = load(reference)
    assert (last["epoch"], last["global_step"]) == (1, 2 * STEPS_PER_EPOCH)
    # The best-by-monitor checkpoint is still the (only) best epoch.
    assert [p.name for p in reference.parent.glob("best-*.ckpt")] == ["best-epoch0.ckpt"]
    # last.ckpt holds the final weights: evaluated again, they give the last epoch's metrics.
    logged, cwd = last_metrics(run), run.parent.parent.parent
    kdzoo(
        "validate", "-c", str(run / "config.yaml"), f"--ckpt_path={reference}",
        "--trainer.logger.init_args.name=check", cwd=cwd, env=ENV,
    )  # fmt: skip
    again = last_metrics(newest(cwd, "runs/check/version_*/metrics.csv").parent)
    assert again["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-6, abs=0)
    assert again["val/top1"] == logged["val/top1"]


def test_last_ckpt_is_written_when_training_stops_inside_an_epoch(tmp_path):
    fit(tmp_path, "--trainer.max_epochs=2", "--trainer.max_steps=12")
    assert load(newest(tmp_path))["global_step"] == 12


def test_resume_at_an_epoch_boundary_is_exact(reference, tmp_path):
    fit(tmp_path, "--trainer.max_epochs=1")
    first = newest(tmp_path)
    assert load(first)["epoch"] == 0
    fit(tmp_path, f"--ckpt_path={first}", "--trainer.max_epochs=2")
    assert_same_state(newest(tmp_path), reference)


def test_resume_after_sigkill_mid_epoch_is_exact(reference, tmp_path):
    proc = start_fit(tmp_path, "--trainer.max_epochs=2", *STEP_LOGS)
    try:
        wait_for(lambda: inside_epoch(tmp_path, 1), proc, "a step of the second epoch")
    finally:
        proc.kill()
        proc.wait()
    last = newest(tmp_path)
    assert load(last)["epoch"] == 0, "killed inside the second epoch"
    # Resumed with worker processes: the data of an epoch does not depend on them.
    fit(tmp_path, f"--ckpt_path={last}", "--trainer.max_epochs=2", "--data.num_workers=2")
    assert_same_state(newest(tmp_path), reference)


def test_ddp_resume_is_exact(tmp_path):
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    fit(whole, *ddp, "--trainer.max_epochs=2")
    fit(parts, *ddp, "--trainer.max_epochs=1")
    fit(parts, *ddp, f"--ckpt_path={newest(parts)}", "--trainer.max_epochs=2")
    assert_same_state(newest(parts), newest(whole))


def test_slurm_requeue_signal_saves_and_resumes_exactly(reference, tmp_path):
    """SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) saves ``hpc_ckpt_1.ckpt`` and requeues the job;
    the requeued job, the same command, resumes from it by itself."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(calls),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "kdzoo-fit", "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    }  # fmt: skip
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    proc = start_fit(tmp_path, "--trainer.max_epochs=2", *STEP_LOGS, env=slurm)
    try:
        wait_for(lambda: inside_epoch(tmp_path, 1), proc, "a step of the second epoch")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: calls.is_file() and hpc.is_file(), proc, "the requeue")
    finally:
        proc.kill()  # what SLURM does when the job's time is up
        proc.wait()
    assert calls.read_text().split() == ["requeue", "4242"]
    # Saved at the end of the batch the signal arrived in (of the second epoch).
    assert STEPS_PER_EPOCH < load(hpc)["global_step"] <= 2 * STEPS_PER_EPOCH
    # The requeued job runs the same command; Lightning finds the hpc checkpoint itself.
    requeued = fit(tmp_path, "--trainer.max_epochs=2", *STEP_LOGS, env=slurm)
    assert f"Restored all states from the checkpoint at {hpc}" in requeued.stderr
    assert_same_state(newest(tmp_path), reference)


# -- a disk that fills up during a save -----------------------------------------------------------


class FullDisk:
    """The disk holding ``root`` fills up while temporary files go to another disk.

    Writes to files under ``root`` fail with ENOSPC once ``free`` bytes have been written, after
    writing what still fits (as a real disk does); ``tempfile`` puts files under ``other``, and a
    rename from there into ``root`` fails with EXDEV, as between two disks (``shutil.move`` then
    copies the file).
    """

    def __init__(self, root: Path, other: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.other = root.resolve(), other.resolve()
        self.free: int | None = None  # no limit yet
        real_open, real_sendfile, real_rename = builtins.open, os.sendfile, os.rename
        real_replace = os.replace

        def on_disk(path) -> bool:
            return isinstance(path, str | os.PathLike) and self.root in Path(path).resolve().parents

        def spend(n: int, path) -> int:
            """How many of ``n`` bytes still fit; ENOSPC when none does."""
            if self.free is None:
                return n
            if self.free == 0 and n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            fits = min(n, self.free)
            self.free -= fits
            return fits

        class FillingFile:
            def __init__(self, f, path) -> None:
                self._f, self._path = f, path

            def write(self, data) -> int:
                data = memoryview(data).cast("B")
                n = spend(len(data), self._path)
                self._f.write(data[:n])
                if n < len(data):
                    self._f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._path))
                return n

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self._f.close()

            def __getattr__(self, name):
                return getattr(self._f, name)

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and on_disk(file):
                return FillingFile(f, file)
            return f

        def fake_sendfile(out_fd, in_fd, offset, count):
            target = os.readlink(f"/proc/self/fd/{out_fd}")
            if on_disk(target):  # ``count`` is a block size: spend what is actually copied
                count = spend(min(count, os.fstat(in_fd).st_size - offset), target)
            return real_sendfile(out_fd, in_fd, offset, count)

        def across(src, dst) -> bool:
            return (self.other in Path(src).resolve().parents) != (
                self.other in Path(dst).resolve().parents
            )

        def fake_rename(src, dst, *args, **kwargs):
            if across(src, dst):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
            return real_rename(src, dst, *args, **kwargs)

        def fake_replace(src, dst, *args, **kwargs):
            if across(src, dst):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "sendfile", fake_sendfile)
        monkeypatch.setattr(os, "rename", fake_rename)
        monkeypatch.setattr(os, "replace", fake_replace)
        monkeypatch.setattr(tempfile, "tempdir", str(self.other))


def test_a_full_disk_never_leaves_a_truncated_checkpoint(tmp_path, monkeypatch, capsys):
    from kdzoo.cli import main

    monkeypatch.chdir(tmp_path)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    # Every epoch is a new best, so each save writes best-epochN.ckpt, then last.ckpt.
    args = [*FIT, "--checkpoint.mode=max"]
    main([*args, "--trainer.max_epochs=1"])
    last = newest(tmp_path)
    before = last.read_bytes()
    other = tmp_path / "other-disk"
    other.mkdir()
    disk = FullDisk(last.parent, other, monkeypatch)
    # Room for one more checkpoint and a half: the new best fits, last.ckpt does not.
    disk.free = len(before) * 3 // 2
    with pytest.raises((SystemExit, OSError)) as failure:
        main([*args, "--ckpt_path=last", "--trainer.max_epochs=2"])
    message = f"{failure.value}\n{capsys.readouterr().err}"
    assert str(last) in message or "last.ckpt" in message, message
    assert last.read_bytes() == before, "the previous last.ckpt is intact"
    for path in last.parent.iterdir():  # nothing partial is left behind
        assert path.suffix == ".ckpt", f"left behind: {path.name}"
        load(path)
