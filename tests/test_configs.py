"""Every shipped config parses through the real CLI parser (class paths, argument names and types),
after its dataset's defaults.yaml and, where the dataset has one, its shared schedule.yaml, as the
README tells users to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

import kdzoo.models  # noqa: F401  (registers the CIFAR nets into timm)
from kdzoo.cli import KDCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parent.parent / "configs"
# A dataset's training schedule shared by its method configs, which override only what differs.
SCHEDULE = "schedule.yaml"
# Method configs; fragments without a model (defaults.yaml, the quick suite's data budget) are
# parsed with them by the bench test, the shared schedules with every config of their dataset.
CONFIGS = sorted(
    p
    for p in ROOT.glob("*/**/*.yaml")
    # not bench suites, nor active-learning configs (parsed by `kdzoo active`: test_active_loop)
    if p.parent.name not in ("bench", "active")
    and p.name != SCHEDULE
    and "model" in (yaml.safe_load(p.read_text()) or {})
)
SCHEDULED = [p for p in CONFIGS if (ROOT / p.relative_to(ROOT).parts[0] / SCHEDULE).exists()]


def _shared_files(path: Path) -> list[Path]:
    """The files a config is given after, in order: its dataset's defaults.yaml, then the
    dataset's schedule.yaml if it has one."""
    dataset = ROOT / path.relative_to(ROOT).parts[0]
    return [p for p in (dataset / "defaults.yaml", dataset / SCHEDULE) if p.exists()]


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """``{("model", "init_args", "optimizer", "class_path"): "torch.optim.SGD", ...}``."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, (*prefix, key)))
        else:
            leaves[(*prefix, key)] = value
    return leaves


def test_configs_are_found() -> None:
    datasets = {p.relative_to(ROOT).parts[0] for p in CONFIGS}
    assert {"fashion_mnist", "cifar100", "imagenet"} <= datasets, datasets
    # The paper recipes share their dataset's schedule.
    assert {p.relative_to(ROOT).parts[0] for p in SCHEDULED} == {"cifar100", "imagenet"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    # Test-time adaptation configs (corruption streams, `<dataset>_c/`) run with `kdzoo test`.
    command = "test" if path.relative_to(ROOT).parts[0].endswith("_c") else "fit"
    args = [command]
    for config in (*_shared_files(path), path):
        args += ["-c", str(config)]
    args.append("--print_config")
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
        # Paper configs name the published number (or set `paper: {}` and say in a comment why
        # there is none).
        own_paper = yaml.safe_load(path.read_text()).get("paper")
        assert isinstance(own_paper, dict) and set(own_paper) <= {"top1"}, path.name
        assert printed["paper"] == own_paper
        assert all(0.0 < value < 100.0 for value in own_paper.values()), own_paper
        # The command in the header gives the files in the order parsed here.
        use = next(line for line in path.read_text().splitlines() if line.startswith("# Use: "))
        words = use.split()
        named = [words[i + 1] for i, word in enumerate(words) if word == "-c"]
        assert named == [str(p.relative_to(ROOT.parent)) for p in (*_shared_files(path), path)], use


@pytest.mark.parametrize("path", SCHEDULED, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keeps_only_what_differs_from_schedule(path: Path) -> None:
    """A config under a shared schedule.yaml sets no schedule value to what the schedule already
    says, so changing the shared file changes every config that does not override it."""
    schedule = _leaves(yaml.safe_load(_shared_files(path)[-1].read_text()))
    # Every config names its method in place of the schedule's stand-in model class.
    del schedule[("model", "class_path")]
    own = _leaves(yaml.safe_load(path.read_text()))
    restated = []
    for key, value in own.items():
        if schedule.get(key, object()) != value:
            continue
        # Below another class (PLD's AdamW in place of SGD) an equal value is not a repeat.
        class_paths = [(*key[:n], "class_path") for n in range(1, len(key))]
        if all(own.get(c, schedule[c]) == schedule[c] for c in class_paths if c in schedule):
            restated.append(".".join(key))
    assert not restated, f"{path.name} repeats {SCHEDULE}: {restated}"
