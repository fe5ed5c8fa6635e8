"""Every method family ships: checkpoint -> ``kdzoo hub export`` -> ``kdzoo.hub.load`` round trips.

One method per family (:mod:`export_helpers`: KD, Knowledge Concentration with its FC-SC head,
SegSupervised on Fashion-MNIST mosaics, PairedSupervised's unimodal m1 net, DHO, Tent after
adaptation) is trained for two steps in-process and exported from the checkpoint Lightning wrote;
the loaded network gives bit-identical outputs to the trained module's forward. Networks that are
not plain timm models have ``"architecture": null``, a card that says so, and a hand-rebuild
recipe that runs. Also: exports of a ``last.ckpt`` left by a crashed run, of checkpoints holding
teacher and connector keys (never exported), of FST's evaluated EMA teacher, and of a teacher run
whose folder is then a teacher without naming its architecture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cli_helpers
import pytest
import timm
import torch
from export_helpers import FILTERS, NOT_TIMM
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file
from test_contract import COMMON_KWARGS, RANDOM_TEACHER, TinyData
from trainer_helpers import quiet_trainer

import kdzoo.hub
from kdzoo.hub.export import ExportError, export_checkpoint
from kdzoo.methods import FST, KD, SegKD, Supervised
from kdzoo.methods.module import METHOD_KEY
from kdzoo.models import TeacherSpec
from kdzoo.models.teacher import build_teacher
from kdzoo.models.weights import WeightsError

pytestmark = pytest.mark.filterwarnings(*FILTERS)


@pytest.fixture(scope="module")
def runs(export_runs):
    return export_runs


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("exported")
    return {f: export_checkpoint(r.ckpt, r.name, base / f) for f, r in runs.items()}


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def exec_recipe(code: str) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    return namespace["model"]


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(NOT_TIMM | {"classification"}))
def test_load_gives_the_checkpoints_outputs_bit_for_bit(family, runs, exported) -> None:
    run, folder = runs[family], exported[family]
    model = kdzoo.hub.load(folder)
    assert not model.training
    with torch.no_grad():
        got = model(*run.inputs)
    torch.testing.assert_close(got, run.outputs(), rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["kdzoo"]["network"]["plain_timm"] is (family not in NOT_TIMM)
    assert config["kdzoo"]["global_step"] == (0 if family == "tta" else 2)


@pytest.mark.parametrize("family", sorted(NOT_TIMM))
def test_not_a_timm_model_says_so_and_its_recipe_runs(family, runs, exported) -> None:
    run, folder = runs[family], exported[family]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] is None
    network = config["kdzoo"]["network"]
    assert network["built_by"] == f"{type(run.module).__module__}.{type(run.module).__qualname__}"
    card = (folder / "README.md").read_text()
    assert "**Not a plain timm model**" in card and network["description"][1:] in card
    assert f"kdzoo.hub.load({json.dumps(str(folder))})" in card
    assert "timm.create_model(" not in card and "local-dir:" not in card
    load_recipe, rebuild_recipe = code_blocks(card)
    for recipe in (load_recipe, rebuild_recipe):
        with torch.no_grad():
            got = exec_recipe(recipe)(*run.inputs)
        torch.testing.assert_close(got, run.outputs(), rtol=0, atol=0)
    entry = (folder / "manifest_entry.yaml").read_text()
    assert f"architecture: {run.name.split('.')[0]}" in entry


def test_what_each_family_deploys(runs, exported) -> None:
    """The declared network and input of each family, as config.json records them."""
    config = {f: json.loads((p / "config.json").read_text()) for f, p in exported.items()}
    # KC: the timm student with the SC head in place of its classifier.
    assert "FC-SC head" in config["kc"]["kdzoo"]["network"]["description"]
    timm_keys = set(timm.create_model("test_efficientnet", num_classes=10, in_chans=1).state_dict())
    kc_keys = set(load_file(str(exported["kc"] / "model.safetensors")))
    assert {k for k in kc_keys - timm_keys if k.startswith("classifier.")}
    # Segmentation: logits at the input size, trained on 32x32 crops (the canvas), any size works.
    seg = config["segmentation"]
    assert seg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert seg["kdzoo"]["network"]["any_size"] is True
    model = kdzoo.hub.load(exported["segmentation"])
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert model(x).shape == (1, 11, 48, 40)
        torch.testing.assert_close(model(x), runs["segmentation"].outputs((x,)), rtol=0, atol=0)
    # Cross-modal: the unimodal student on m1 (a 10-vector), no image normalisation.
    paired = config["cross-modal"]
    assert paired["kdzoo"]["network"]["inputs"] == [[10]] and "mean" not in paired["pretrained_cfg"]
    # DHO: log of the fused probabilities; their softmax is the fused prediction.
    dho = runs["dho"].module
    with torch.no_grad():
        ce, kd_logits, _ = dho.heads(runs["dho"].inputs[0])
        fused = dho.combined_probs(ce, kd_logits, dho.alpha, dho.beta)
        got = kdzoo.hub.load(exported["dho"])(*runs["dho"].inputs).softmax(-1)
    torch.testing.assert_close(got, fused)
    # TTA: the adapted weights (Tent moved the BatchNorm affine parameters off their init).
    tta = load_file(str(exported["tta"] / "model.safetensors"))
    assert not torch.equal(tta["bn1.weight"], torch.ones_like(tta["bn1.weight"]))
    assert "bn1.running_mean" not in tta  # batch statistics, as the adapted model predicts


def test_tta_source_on_running_statistics_is_a_plain_timm_model(runs, tmp_path) -> None:
    """batch_norm="source": the (adapted or not) source is timm's own network."""
    hparams = {**runs["tta"].module.hparams, "batch_norm": "source"}
    module = type(runs["tta"].module)(**hparams).eval()
    ckpt = tmp_path / "source.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                METHOD_KEY: "kdzoo.methods.tta.Tent"}, ckpt)  # fmt: skip
    folder = export_checkpoint(ckpt, "test_resnet.source", tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "test_resnet"
    x = runs["tta"].inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(kdzoo.hub.load(folder)(x), module(x), rtol=0, atol=0)


def test_fst_deploys_the_network_it_evaluates(tmp_path) -> None:
    """FST with evaluate="teacher" is validated on its EMA teacher: that is what ships."""
    kwargs = {"student": "test_resnet", "num_classes": 4, "head": "fcn", "k_steps": 1}
    torch.manual_seed(0)
    module = FST(evaluate="teacher", **kwargs).eval()
    with torch.no_grad():
        for p in module.teacher.parameters():
            p.add_(0.1)
    ckpt = tmp_path / "fst.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                METHOD_KEY: "kdzoo.methods.segmentation.fst.FST"}, ckpt)  # fmt: skip
    folder = export_checkpoint(ckpt, "test_resnet.fst", tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kdzoo.hub.load(folder)(x), module(x), rtol=0, atol=0)
        assert not torch.equal(module.student(x).logits, module.teacher(x).logits)


def test_name_of_a_non_timm_network_starts_with_its_backbone(runs, tmp_path) -> None:
    with pytest.raises(ExportError, match=r"architecture 'resnet18' is not .* 'test_resnet'"):
        export_checkpoint(runs["segmentation"].ckpt, "resnet18.seg", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- which checkpoint: an interrupted run's last.ckpt ---------------------------------------


class _Crash(Callback):
    """Kills the run (an exception out of the training loop) after ``step`` steps, recording the
    student's weights at ``saved`` steps, where checkpointing every 2 steps last wrote."""

    def __init__(self, step: int, saved: int) -> None:
        self.step, self.saved = step, saved
        self.state: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, module, *args: Any) -> None:
        if trainer.global_step == self.saved:
            self.state = {k: v.clone() for k, v in module.student.model.state_dict().items()}
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_last_checkpoint_of_an_interrupted_run(tmp_path) -> None:
    torch.manual_seed(0)
    module = KD(**COMMON_KWARGS, teacher=RANDOM_TEACHER)
    every_2 = ModelCheckpoint(tmp_path / "ckpts", every_n_train_steps=2, save_last=True)
    crash = _Crash(step=3, saved=2)
    trainer = quiet_trainer(tmp_path, max_steps=10, limit_val_batches=0, callbacks=[every_2, crash])
    with pytest.raises(RuntimeError, match="killed"):
        trainer.fit(module, datamodule=TinyData(n=16, batch_size=2))
    last = tmp_path / "ckpts" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    folder = export_checkpoint(last, "test_efficientnet.interrupted", tmp_path / "out")
    state = load_file(str(folder / "model.safetensors"))
    assert state.keys() == crash.state.keys()
    assert all(torch.equal(state[k], crash.state[k]) for k in state)
    assert json.loads((folder / "config.json").read_text())["kdzoo"]["global_step"] == 2


# ---- teachers and connectors never ship ---------------------------------------------------------


@pytest.mark.parametrize("family", ["classification", "dho", "kc"])
def test_teacher_and_connector_keys_are_left_out(family, runs, tmp_path) -> None:
    """A checkpoint holding a teacher and a connector (an older kdzoo's, or a method's own
    modules) exports the deployable network's tensors only."""
    checkpoint = torch.load(runs[family].ckpt, weights_only=True)
    extra = {
        "teacher.backbone.model.fc.weight": torch.zeros(10, 8),
        "teacher.0.backbone.model.conv1.weight": torch.zeros(4),
        "connector.weight": torch.zeros(4, 4),
        "projector.2.bias": torch.zeros(4),
    }
    checkpoint["state_dict"].update(extra)
    ckpt = tmp_path / "with_teacher.ckpt"
    torch.save(checkpoint, ckpt)
    folder = export_checkpoint(ckpt, runs[family].name, tmp_path / "out")
    keys = set(load_file(str(folder / "model.safetensors")))
    assert not [k for k in keys if re.search(r"teacher|connector|projector", k)]
    clean = export_checkpoint(runs[family].ckpt, runs[family].name, tmp_path / "clean")
    assert keys == set(load_file(str(clean / "model.safetensors")))


def test_exported_folders_never_hold_teacher_weights(exported) -> None:
    for family, folder in exported.items():
        keys = list(load_file(str(folder / "model.safetensors")))
        assert keys and not [k for k in keys if "teacher" in k], family


# ---- teachers ship too (part 4) -----------------------------------------------------------------


def test_exported_teacher_run_is_a_teacher_without_its_name(tmp_path) -> None:
    """A teacher run's folder as ``teacher.weights``: the architecture comes from config.json."""
    torch.manual_seed(1)
    teacher_run = Supervised(student="test_resnet", num_classes=10, in_chans=1, mean=(0.5,),
                             std=(0.25,))  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(teacher_run, datamodule=TinyData())
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    folder = export_checkpoint(ckpt, "test_resnet.teacher", tmp_path / "teacher")
    module = KD(**COMMON_KWARGS, teacher={"weights": str(folder)})
    assert module.hparams.teacher["name"] == "test_resnet"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        teacher_run.eval()
        torch.testing.assert_close(module.teacher(x).logits, teacher_run(x), rtol=0, atol=0)


def test_a_non_timm_folder_is_refused_as_a_classifier_teacher(exported) -> None:
    spec = TeacherSpec(weights=str(exported["kc"]))
    with pytest.raises(WeightsError, match="not a plain timm classifier") as err:
        build_teacher(spec, num_classes=10, in_chans=1)
    assert "FC-SC head" in str(err.value)


def test_a_segmentation_folder_is_a_segmentation_teacher(runs, exported) -> None:
    student = SegKD(
        teacher={"weights": str(exported["segmentation"])},
        student="test_resnet",
        num_classes=11,
        head="fcn",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    x = runs["segmentation"].inputs[0]
    with torch.no_grad():
        got = student.teacher(x).logits
        want = runs["segmentation"].module.student(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- through the kdzoo command --------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_a_network_that_is_not_a_timm_model(runs, tmp_path) -> None:
    run = runs["segmentation"]
    out = tmp_path / "seg"
    args = [f"--ckpt_path={run.ckpt}", f"--name={run.name}", f"--out={out}"]
    proc = cli_helpers.kdzoo("hub", "export", *args, cwd=tmp_path)
    assert f"exported {run.name}" in proc.stdout
    assert "not a plain timm model: a segmentation network" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "manifest_entry.yaml", "model.safetensors"
    ]  # fmt: skip
    with torch.no_grad():
        got = kdzoo.hub.load(out)(*run.inputs)
    torch.testing.assert_close(got, run.outputs(), rtol=0, atol=0)
