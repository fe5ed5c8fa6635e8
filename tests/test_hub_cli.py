"""The hub through the real ``kdzoo`` command: export a trained run, use the export (as a folder and
as a published ``hub:NAME`` entry) as a teacher, list / download / verify, refuse unsafe files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import DATA, QUIET, assert_clear_error, kdzoo

ROOT = Path(__file__).resolve().parent.parent
NAME = "test_resnet.digits_supervised"
KD = ["--model=KD", "--model.student=test_efficientnet", "--model.teacher.name=test_resnet"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher_ckpt) -> Path:
    cwd = tmp_path_factory.mktemp("export")
    out = cwd / NAME
    proc = kdzoo(
        "hub", "export", f"--ckpt_path={teacher_ckpt}", f"--name={NAME}", f"--out={out}", cwd=cwd
    )
    assert f"exported {NAME}" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    return out


def published_manifest(tmp_path: Path, exported: Path) -> Path:
    """A manifest whose one entry is the export, served from a file:// mirror."""
    entry = yaml.safe_load((exported / "manifest_entry.yaml").read_text())
    entry["urls"] = [exported.as_uri()]
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"checkpoints": [entry]}))
    return path


def test_export_refuses_to_overwrite(tmp_path, teacher_ckpt, exported) -> None:
    before = (exported / "model.safetensors").read_bytes()
    proc = kdzoo(
        "hub", "export", f"--ckpt_path={teacher_ckpt}", f"--name={NAME}", f"--out={exported}",
        cwd=tmp_path, expect_fail=True,
    )  # fmt: skip
    assert_clear_error(proc, "kdzoo hub: error:", str(exported))
    assert (exported / "model.safetensors").read_bytes() == before


def test_exported_folder_and_hub_name_are_teachers(tmp_path, exported) -> None:
    kdzoo("fit", *KD, f"--model.teacher.weights={exported}", *DATA, *QUIET,
          "--trainer.max_steps=2", cwd=tmp_path)  # fmt: skip
    manifest = published_manifest(tmp_path, exported)
    env = {"KDZOO_MANIFEST": str(manifest), "KDZOO_HOME": str(tmp_path / "home")}
    out = kdzoo("hub", "list", cwd=tmp_path, env=env).stdout
    assert f"| {NAME} | test_resnet |" in out
    kdzoo("fit", *KD, f"--model.teacher.weights=hub:{NAME}", *DATA, *QUIET,
          "--trainer.max_steps=2", cwd=tmp_path, env=env)  # fmt: skip
    cached = tmp_path / "home/hub" / NAME / "model.safetensors"
    assert cached.read_bytes() == (exported / "model.safetensors").read_bytes()
    assert "0 not ok" in kdzoo("hub", "verify", cwd=tmp_path, env=env).stdout
    config = yaml.safe_load(
        (tmp_path / "runs/kd-test_efficientnet-test_resnet/version_1/config.yaml").read_text()
    )
    assert config["model"]["init_args"]["teacher"]["weights"] == f"hub:{NAME}"


def test_unknown_hub_teacher_is_a_clear_error(tmp_path) -> None:
    proc = kdzoo("fit", *KD, "--model.teacher.weights=hub:resnet8.nothing_here", *DATA,
                 cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert_clear_error(proc, "kdzoo fit: error:", "resnet8.nothing_here")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)  # a plausible .ckpt
    for args in (
        ["test", "--model=Supervised", "--model.student=test_resnet", *DATA, f"--ckpt_path={evil}"],
        ["fit", *KD, f"--model.teacher.weights={evil}", *DATA],
        ["hub", "export", f"--ckpt_path={evil}", f"--name={NAME}", f"--out={tmp_path / 'x'}"],
    ):
        proc = kdzoo(*args, cwd=tmp_path, expect_fail=True)
        assert_clear_error(proc, "refusing to load", str(evil))
        assert not marker.exists(), f"kdzoo {args[0]} ran code from a pickle"
    # The payload is live: an unrestricted load runs it (so the assertions above can fail).
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_model_zoo_table_is_up_to_date() -> None:
    subprocess.run([sys.executable, str(ROOT / "tools/render_model_zoo.py"), "--check"], check=True)


def test_committed_manifest_is_valid() -> None:
    from kdzoo.hub import default_manifest_path, read_manifest

    assert default_manifest_path() == ROOT / "checkpoints/manifest.yaml"
    read_manifest(default_manifest_path())  # raises on any invalid entry
