"""No silent random teachers, broken weight files as one-line errors that name the file, and
teachers whose architecture is read from their weights.

A frozen network (teacher, TTA source, specialist, segmentation / cross-modal / CLIP teacher)
without weights is a ``ConfigError``; ``"random"`` asks for the random initialisation. Every
unreadable, truncated or wrong-kind file is a one-line ``WeightsError`` naming the file and what
is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import DATA, QUIET, assert_clear_error, kdzoo
from safetensors.torch import save_file

from kdzoo.errors import ConfigError, KDZooError
from kdzoo.hub import export_checkpoint
from kdzoo.hub.loading import load_folder
from kdzoo.methods import KD, DualHeadDistillation, KnowledgeConcentration, Supervised
from kdzoo.methods.crossmodal import CrossModalKD
from kdzoo.methods.segmentation import SegKD
from kdzoo.methods.tta import Source
from kdzoo.models import TeacherSpec, WeightsError, build_teacher, safe_torch_load
from kdzoo.models.weights import load_backbone_state

ROOT = Path(__file__).resolve().parent.parent
COMMON = {"student": "test_efficientnet", "num_classes": 10, "in_chans": 1}


def make_supervised(num_classes: int = 10) -> Supervised:
    torch.manual_seed(1)
    return Supervised(student="test_resnet", num_classes=num_classes, in_chans=1).eval()


def save_ckpt(module: Supervised, path: Path) -> Path:
    """A checkpoint as `kdzoo fit` writes it (state dict + flat hyper-parameters, with the
    ``_class_path`` LightningCLI records)."""
    hparams = {**module.hparams, "_class_path": f"kdzoo.methods.{type(module).__name__}"}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Supervised, Path, Path]:
    """A test_resnet classifier, its .ckpt and its `kdzoo hub export` folder."""
    module = make_supervised()
    ckpt = save_ckpt(module, tmp_path / "teacher.ckpt")
    folder = export_checkpoint(ckpt, "test_resnet.digits", tmp_path / "exported")
    return module, ckpt, folder


def build(spec: TeacherSpec, num_classes: int = 10):
    return build_teacher(spec, num_classes=num_classes, in_chans=1)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---- no weights: an error; "random": asked for -----------------------------------------------


def test_teacher_without_weights_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        build(TeacherSpec("resnet18"))
    message = one_line(err)
    for fragment in ("teacher 'resnet18' has no weights", "--model.init_args.teacher.weights",
                     ".ckpt", "hub:NAME", "`random`"):  # fmt: skip
        assert fragment in message, message


def test_random_weights_must_be_asked_for() -> None:
    teacher = build(TeacherSpec("test_resnet", weights="random"))
    assert teacher.backbone.num_classes == 10
    with pytest.raises(ConfigError, match=r"teacher\.name"):
        build(TeacherSpec(weights="random"))  # random weights of which architecture?


def _tta_source(**spec):
    return Source(source=TeacherSpec("test_resnet", **spec), num_classes=10, in_chans=1)


def _specialists(**spec):
    return KnowledgeConcentration(
        **{**COMMON, "student": "test_resnet"},
        specialists=[TeacherSpec("test_resnet", **spec) for _ in range(2)],
        verticals=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        hidden=(16, 8),
    )


def _dho(**spec):
    return DualHeadDistillation(**COMMON, teacher=TeacherSpec("test_resnet", **spec))


def _kd(**spec):
    return KD(**COMMON, teacher=TeacherSpec("test_resnet", **spec))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_kd, "--model.init_args.teacher.weights"),
        (_tta_source, "--model.init_args.source.weights"),
        (_specialists, "specialists[0]"),
        (_dho, "--model.init_args.teacher.weights"),
    ],
    ids=["KD", "TTA-source", "KC-specialists", "DHO"],
)
def test_every_frozen_network_needs_weights(make, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        make()
    message = one_line(err)
    assert "has no weights" in message and fragment in message and "random" in message
    make(weights="random")  # asked for: built


def test_segmentation_teacher_needs_weights() -> None:
    arch = {"student": "test_resnet", "num_classes": 4, "head": "fcn", "output_stride": 8}
    teacher = {"architecture": {"backbone": "test_resnet", "head": "fcn", "output_stride": 8}}
    with pytest.raises(ConfigError, match="has no weights") as err:
        SegKD(teacher=teacher, **arch)
    assert "random" in one_line(err)
    SegKD(teacher={**teacher, "weights": "random"}, **arch)


def test_crossmodal_teacher_needs_weights() -> None:
    arch = {
        "encoders": [{"kind": "mlp", "hidden": [16]}, {"kind": "mlp", "hidden": [16]}],
        "num_classes": 4,
        "modality_shapes": [(10,), (6,)],
    }
    for teacher in ({"weights": None}, None):
        with pytest.raises(ConfigError, match=r"teacher\.weights") as err:
            CrossModalKD(teacher=teacher, **arch)
        assert "PairedSupervised" in one_line(err)
    # The former argument names the new one.
    with pytest.raises(ConfigError, match="teacher_weights is now teacher"):
        CrossModalKD(teacher_weights="run.ckpt", **arch)


def test_clip_teacher_random_weights_are_asked_for() -> None:
    # open_clip is in the dev extra: a plain import, so CI cannot skip this test.
    from kdzoo.models.clip import CLIPTeacherSpec, build_clip_teacher

    with pytest.raises(ConfigError, match="random") as err:
        build_clip_teacher(CLIPTeacherSpec(pretrained=None, image_size=32), ["a", "b"])
    assert "clip_teacher.pretrained" in one_line(err)


# ---- the architecture (and classes) read from the weights ---------------------------------------


@pytest.mark.parametrize("kind", ["folder", "ckpt"])
def test_name_read_from_the_weights(trained, kind: str) -> None:
    module, ckpt, folder = trained
    teacher = build(TeacherSpec(weights=str(folder if kind == "folder" else ckpt)))
    assert teacher.backbone.name == "test_resnet"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, module(x), rtol=0, atol=0)


def test_resolved_name_is_recorded_in_the_hyperparameters(trained) -> None:
    _, _, folder = trained
    module = KD(**COMMON, teacher={"weights": str(folder)})
    assert module.hparams.teacher["name"] == "test_resnet"


@pytest.mark.parametrize("kind", ["folder", "ckpt"])
def test_name_that_disagrees_with_the_weights(trained, kind: str) -> None:
    _, ckpt, folder = trained
    path = str(folder if kind == "folder" else ckpt)
    with pytest.raises(ConfigError) as err:
        build(TeacherSpec("test_efficientnet", weights=path))
    message = one_line(err)
    assert "test_efficientnet" in message and "'test_resnet'" in message and path in message
    # A timm tag only names pretrained weights: the architecture agrees.
    assert build(TeacherSpec("test_resnet.r160_in1k", weights=path)) is not None


def test_no_name_and_none_recorded(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(make_supervised().student.model.state_dict(), str(path))
    with pytest.raises(ConfigError) as err:
        build(TeacherSpec(weights=str(path)))
    message = one_line(err)
    assert str(path) in message and "teacher.name" in message


@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_class_mismatch_advice(tmp_path: Path, kind: str) -> None:
    """Same-label-space methods: name both counts and the file; never suggest teacher.num_classes
    (whose own check then says to remove it)."""
    module = make_supervised(num_classes=5)
    if kind == "ckpt":
        path = save_ckpt(module, tmp_path / "five.ckpt")
    else:
        path = tmp_path / "five.safetensors"
        save_file(module.student.model.state_dict(), str(path))
    with pytest.raises(KDZooError) as err:
        KD(**COMMON, teacher=TeacherSpec("test_resnet", weights=str(path)))
    message = one_line(err)
    for fragment in ("must predict the same classes", "trained on 5 classes", "the data has 10",
                     str(path), "train the teacher on this data"):  # fmt: skip
        assert fragment in message, message
    assert "set teacher.num_classes" not in message, message


# ---- broken files: one line naming the file and what is wrong --------------------------------


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _broken(kind: str, tmp_path: Path, trained) -> tuple[Path, str]:
    """A broken weight file (or folder) of ``kind`` and the fragment its error must contain."""
    _, ckpt, folder = trained
    if kind == "text":
        path = tmp_path / "notes.ckpt"
        path.write_text("model:\n  weights: somewhere else\n")
        return path, "text file"
    if kind == "csv":
        path = tmp_path / "table.pth"
        path.write_text("a,b,c\n1,2,3\n")
        return path, "text file"
    if kind == "empty":
        path = tmp_path / "empty.pt"
        path.touch()
        return path, "empty"
    if kind == "truncated-ckpt":
        return _truncated(ckpt), "truncated or corrupt zip archive"
    if kind == "truncated-safetensors":
        return _truncated(folder / "model.safetensors"), "not a valid safetensors file"
    if kind == "garbage-safetensors":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(bytes(range(256)) * 4)
        return path, "not a valid safetensors file"
    if kind == "bad-config":
        (folder / "config.json").write_text("{not json")
        return folder, "config.json is not valid JSON"
    if kind == "list-ckpt":
        path = tmp_path / "list.ckpt"
        torch.save([1, 2, 3], path)
        return path, "holds a list"
    if kind == "no-state-dict":
        path = tmp_path / "meta.ckpt"
        torch.save({"epoch": 3, "pytorch-lightning_version": "2.6.0"}, path)
        return path, "a Lightning checkpoint has no state_dict"
    raise AssertionError(kind)


BROKEN = [
    "text",
    "csv",
    "empty",
    "truncated-ckpt",
    "truncated-safetensors",
    "garbage-safetensors",
    "bad-config",
    "list-ckpt",
    "no-state-dict",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_teacher_weights(tmp_path: Path, trained, kind: str) -> None:
    path, fragment = _broken(kind, tmp_path, trained)
    with pytest.raises(WeightsError) as err:
        build(TeacherSpec("test_resnet", weights=str(path)))
    message = one_line(err)
    assert str(path) in message and fragment in message, message


@pytest.mark.parametrize("kind", ["text", "csv", "empty", "truncated-ckpt"])
def test_safe_torch_load_names_the_file(tmp_path: Path, trained, kind: str) -> None:
    path, fragment = _broken(kind, tmp_path, trained)
    with pytest.raises(WeightsError) as err:
        safe_torch_load(path)
    message = one_line(err)
    assert str(path) in message and fragment in message, message
    assert "refusing" not in message  # not mistaken for an unsafe pickle


def test_random_bytes_are_not_mistaken_for_an_unsafe_pickle(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes([0x80, 0x02]) + bytes(range(200, 256)) * 3)
    with pytest.raises(WeightsError) as err:
        load_backbone_state(path)
    message = one_line(err)
    assert str(path) in message and "refusing" not in message


def test_broken_hub_folder(tmp_path: Path, trained) -> None:
    path, fragment = _broken("truncated-safetensors", tmp_path, trained)
    with pytest.raises(WeightsError) as err:
        load_folder(path)
    message = one_line(err)
    assert str(path) in message and fragment in message, message


@pytest.mark.parametrize("kind", ["text", "empty", "truncated-ckpt"])
def test_broken_checkpoint_export(tmp_path: Path, trained, kind: str) -> None:
    path, fragment = _broken(kind, tmp_path, trained)
    with pytest.raises(WeightsError) as err:
        export_checkpoint(path, "test_resnet.x", tmp_path / "out")
    message = one_line(err)
    assert str(path) in message and fragment in message, message
    assert not (tmp_path / "out").exists()


# ---- through the kdzoo command -----------------------------------------------------------------

KD_CONFIG = [
    "-c", str(ROOT / "configs/fashion_mnist/defaults.yaml"),
    "-c", str(ROOT / "configs/fashion_mnist/kd/test_resnet-resnet18.yaml"),
]  # fmt: skip


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


@pytest.mark.slow
def test_cli_shipped_recipe_without_teacher_weights(tmp_path: Path) -> None:
    proc = kdzoo("fit", *KD_CONFIG, *DATA, cwd=tmp_path, expect_fail=True)
    assert_clear_error(proc, "kdzoo fit: error:", "teacher 'resnet18' has no weights",
                       "--model.init_args.teacher.weights", "random")  # fmt: skip
    assert len(_error_lines(proc)) == 1, proc.stderr


@pytest.mark.slow
def test_cli_truncated_teacher_checkpoint(tmp_path: Path, teacher_ckpt: Path) -> None:
    path = tmp_path / "teacher.ckpt"
    data = teacher_ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = kdzoo("fit", *KD_CONFIG, *DATA, f"--model.init_args.teacher.weights={path}",
                 cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert_clear_error(proc, "kdzoo fit: error:", str(path), "truncated")
    assert len(_error_lines(proc)) == 1, proc.stderr
    proc = kdzoo("test", "--model=Supervised", "--model.student=test_resnet", *DATA,
                 f"--ckpt_path={path}", cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert_clear_error(proc, "error:", str(path), "truncated")
    proc = kdzoo("hub", "export", f"--ckpt_path={path}", "--name=test_resnet.x", "--out=out",
                 cwd=tmp_path, expect_fail=True)  # fmt: skip
    assert_clear_error(proc, "kdzoo hub: error:", str(path), "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exported_folder_is_a_teacher_without_a_name(tmp_path: Path, teacher_ckpt) -> None:
    folder = export_checkpoint(teacher_ckpt, "test_resnet.digits", tmp_path / "exported")
    kdzoo("fit", "--model=KD", "--model.student=test_efficientnet",
          f"--model.teacher.weights={folder}", *DATA, *QUIET, "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", cwd=tmp_path)  # fmt: skip
    (run,) = [p.parent for p in (tmp_path / "runs").glob("*/version_0/config.yaml")]
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    teacher = torch.load(ckpt, weights_only=True)["hyper_parameters"]["teacher"]
    assert teacher["name"] == "test_resnet" and teacher["weights"] == str(folder)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["teacher"]["weights"] == str(folder)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "test_resnet"
