"""Every shipped config parses through the real CLI parser (class paths, argument names and types),
with its dataset's defaults.yaml first, as the README tells users to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

import kdzoo.models  # noqa: F401  (registers the CIFAR nets into timm)
from kdzoo.cli import KDCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parent.parent / "configs"
# Method configs; fragments without a model (defaults.yaml, the quick suite's data budget) are
# parsed with them by the bench test.
CONFIGS = sorted(
    p
    for p in ROOT.glob("*/**/*.yaml")
    # not bench suites, nor active-learning configs (parsed by `kdzoo active`: test_active_loop)
    if p.parent.name not in ("bench", "active") and "model" in (yaml.safe_load(p.read_text()) or {})
)


def test_configs_are_found() -> None:
    datasets = {p.relative_to(ROOT).parts[0] for p in CONFIGS}
    assert {"fashion_mnist", "cifar100", "imagenet"} <= datasets, datasets


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset_defaults = ROOT / path.relative_to(ROOT).parts[0] / "defaults.yaml"
    # Test-time adaptation configs (corruption streams, `<dataset>_c/`) run with `kdzoo test`.
    command = "test" if path.relative_to(ROOT).parts[0].endswith("_c") else "fit"
    args = [command, "-c", str(dataset_defaults), "-c", str(path), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        KDCLI(args=args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    assert model["class_path"].startswith("kdzoo.methods.")
    # Architectures exist in timm's registry (the CIFAR nets are registered by kdzoo.models).
    init = model["init_args"]
    # A classification or segmentation student, a TTA source model, or paired-modality encoders.
    names = [init.get("student") or (init.get("source") or {}).get("name")]
    names += [e.get("name") for e in init.get("encoders") or [] if e.get("kind") == "timm"]
    teachers = init.get("teacher") or init.get("specialists") or init.get("source") or []
    for teacher in teachers if isinstance(teachers, list) else [teachers]:
        # A segmentation teacher names its architecture only when it is not read from its
        # checkpoint.
        names.append(teacher.get("name") or (teacher.get("architecture") or {}).get("backbone"))
    names = [name for name in names if name]
    for name in names:
        assert timm.is_model(name.split(".")[0]), f"{path.name}: no timm model {name!r}"
    if path.relative_to(ROOT).parts[0] in ("cifar100", "imagenet"):
        # Paper configs name the published number (or say in a comment why there is none).
        assert "paper_top1:" in path.read_text()
        paper = printed["paper_top1"]
        assert paper is None or 0.0 < paper < 100.0
