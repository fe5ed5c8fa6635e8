"""Exporting a trained student as a hub folder, and loading it back with and without kdzoo.

Checkpoints come from real, tiny ``lightning.Trainer`` fits: KD, ND and DKD runs built by
:class:`~kdzoo.cli.KDCLI` in-process (so they hold what a ``kdzoo fit`` checkpoint holds: the
method's and the datamodule's class paths and the ModelCheckpoint state) on scikit-learn's
digits, 1x32x32 for the test_* nets and 3x32x32 for the CIFAR ``resnet8``. The round trip is
exact: the exported model's logits equal the trained student's, through
``kdzoo.hub.load_folder`` and through every plain-timm recipe of the generated model card.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import threading
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import kdzoo.hub
from kdzoo.cli import KDCLI
from kdzoo.errors import KDZooError
from kdzoo.hub.export import EXPORT_FILES, ExportError, export_checkpoint, validate_name
from kdzoo.hub.loading import load_folder
from kdzoo.models.weights import WeightsError

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:LightningCLI's args parameter",
    # jsonargparse deprecations triggered inside lightning.pytorch.cli, not by kdzoo
    "ignore::DeprecationWarning:lightning.pytorch.cli",
    # 16 training digits do not cover every class; ND's class means say so
    r"ignore:classes \[[0-9, ]+\] have no samples",
)

DIGITS = [
    "--data=Digits",
    "--data.train_subset=16",
    "--data.eval_subset=8",
    "--data.batch_size=8",
    "--data.num_workers=0",
]
# name -> (published name, method/model arguments, extra data arguments)
RUNS: dict[str, tuple[str, list[str], list[str]]] = {
    "KD": (
        "test_efficientnet.kd_test_resnet_digits",
        [
            "--model=KD",
            "--model.student=test_efficientnet",
            "--model.teacher.name=test_resnet",
            "--model.teacher.weights=random",
        ],
        [],
    ),
    "ND": (
        "test_resnet.nd_test_efficientnet_digits",
        [
            "--model=ND",
            "--model.student=test_resnet",
            "--model.teacher.name=test_efficientnet",
            "--model.teacher.weights=random",
            "--model.warmup_epochs=0",
        ],
        [],
    ),
    "DKD": (
        "resnet8.dkd_test_resnet_digits-rgb",
        [
            "--model=DKD",
            "--model.student=resnet8",
            "--model.teacher.name=test_resnet",
            "--model.teacher.weights=random",
        ],
        ["--data.grey_to_rgb=true"],
    ),
}


class Run:
    """A finished tiny training run: its checkpoints and its trained module."""

    def __init__(self, name: str, ckpt_dir: Path, module: L.LightningModule) -> None:
        self.name = name
        self.best = next(ckpt_dir.glob("best-*.ckpt"))
        self.last = ckpt_dir / "last.ckpt"
        self.module = module.eval()
        self.in_chans = module.hparams.in_chans

    def images(self, n: int = 3) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        return torch.randn(n, self.in_chans, 32, 32, generator=gen)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The KD, ND and DKD runs, trained once for the module (2 steps each, then validation)."""
    result = {}
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped, so set up before conftest's function-scoped environment fixture: ND's
        # class-mean cache must not land in the user's home.
        mp.setenv("KDZOO_HOME", str(tmp_path_factory.mktemp("kdzoo_home")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for method, (name, model_args, data_args) in RUNS.items():
            root = tmp_path_factory.mktemp(method)
            cli = KDCLI(
                args=[
                    *model_args,
                    *DIGITS,
                    *data_args,
                    "--trainer.max_epochs=1",
                    "--trainer.limit_val_batches=1",
                    "--trainer.logger=false",
                    f"--trainer.default_root_dir={root}",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false",
                    "--trainer.accelerator=cpu",
                ],
                run=False,
            )
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            result[method] = Run(name, root / "checkpoints", cli.model)
    return result


@pytest.fixture(scope="module")
def exported(runs: dict[str, Run], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each run's best checkpoint exported once (the tests below only read the folders)."""
    base = tmp_path_factory.mktemp("exported")
    return {m: export_checkpoint(r.best, r.name, base / r.name) for m, r in runs.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def exec_recipe(code: str) -> torch.nn.Module:
    """Run one model-card snippet in a fresh namespace and return the ``model`` it builds."""
    namespace: dict[str, Any] = {}
    exec(compile(code, "<model card>", "exec"), namespace)
    return namespace["model"]


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(RUNS))
def test_load_folder_gives_the_trained_students_logits(method, runs, exported) -> None:
    run, out = runs[method], exported[method]
    assert {p.name for p in out.iterdir()} == set(EXPORT_FILES)
    model = load_folder(out)
    assert not model.training
    x = run.images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.logits(x), rtol=0, atol=0)
    # The same through the weight file's path and through kdzoo.hub.load.
    with torch.no_grad():
        torch.testing.assert_close(load_folder(out / "model.safetensors")(x), model(x))
        torch.testing.assert_close(kdzoo.hub.load(str(out))(x), model(x))
    data = timm.data.resolve_data_config(model=model)
    mean, std = run.module.hparams.mean, run.module.hparams.std
    assert data["input_size"] == (run.in_chans, 32, 32)
    assert tuple(data["mean"]) == tuple(mean) and tuple(data["std"]) == tuple(std)
    assert data["crop_pct"] == 1.0  # kdzoo's Digits pipeline resizes the whole image


@pytest.mark.parametrize("method", list(RUNS))
def test_model_card_recipes_give_the_trained_students_logits(method, runs, exported) -> None:
    run, out = runs[method], exported[method]
    card = (out / "README.md").read_text()
    blocks = code_blocks(card)
    assert len(blocks) == 4, card  # kdzoo, timm local-dir:, timm overlay, timm load_state_dict
    assert f'kdzoo.hub.load("{out}")' in blocks[0]
    assert f'"local-dir:{out}"' in blocks[1]
    assert "pretrained_cfg_overlay=dict(" in blocks[2] and "num_classes=10," in blocks[2]
    assert "load_state_dict(load_file(" in blocks[3]
    x = run.images()
    for code in blocks:
        model = exec_recipe(code)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), run.logits(x), rtol=0, atol=0, msg=code)
    for code in blocks[1:3]:  # timm's own loaders also pick up the exported preprocessing
        data = timm.data.resolve_data_config(model=exec_recipe(code))
        assert data["input_size"] == (run.in_chans, 32, 32)
        assert tuple(data["mean"]) == tuple(run.module.hparams.mean)


def test_model_card_recipes_run_from_an_odd_folder_name(runs, tmp_path) -> None:
    """Paths go into the snippets as escaped string literals, so quotes and spaces work."""
    run = runs["KD"]
    out = export_checkpoint(run.best, run.name, tmp_path / 'my "students" dir')
    x = run.images()
    for code in code_blocks((out / "README.md").read_text()):
        with torch.no_grad():
            torch.testing.assert_close(exec_recipe(code).eval()(x), run.logits(x), rtol=0, atol=0)


def test_overlay_without_num_classes_loses_the_classifier(runs, exported) -> None:
    """Why the card's overlay recipe repeats num_classes: timm drops the classifier otherwise."""
    run, out = runs["KD"], exported["KD"]
    model = timm.create_model(
        "test_efficientnet",
        pretrained=True,
        num_classes=10,
        in_chans=1,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
    ).eval()
    x = run.images()
    with torch.no_grad():
        assert not torch.allclose(model(x), run.logits(x))


def test_cifar_net_card_says_kdzoo_registers_it(exported) -> None:
    card = (exported["DKD"] / "README.md").read_text()
    assert "import kdzoo.models" in card and "registers" in card
    assert "not in timm's own registry" in card
    assert "import kdzoo.models" not in (exported["KD"] / "README.md").read_text()


@pytest.mark.parametrize("method", list(RUNS))
def test_weights_are_the_bare_timm_student(method, runs, exported) -> None:
    run, out = runs[method], exported[method]
    state = load_file(str(out / "model.safetensors"))
    assert not [k for k in state if re.search(r"teacher|projector|fusion|student\.", k)]
    assert set(state) == set(run.module.student.model.state_dict())
    if method == "ND":  # the checkpoint did hold a projector: export left it out
        ckpt = torch.load(run.best, weights_only=True)["state_dict"]
        assert any(k.startswith("projector.") for k in ckpt)


@pytest.mark.parametrize("method", list(RUNS))
def test_config_json(method, runs, exported) -> None:
    run, out = runs[method], exported[method]
    hp = run.module.hparams
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == hp.student
    assert config["num_classes"] == 10
    assert config["num_features"] == run.module.student.model.num_features
    assert config["model_args"] == {"in_chans": run.in_chans}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [run.in_chans, 32, 32]
    assert cfg["mean"] == list(hp.mean) and cfg["std"] == list(hp.std)
    assert cfg["num_classes"] == 10
    # in_chans lives in model_args and input_size[0]: timm's PretrainedCfg has no such field and
    # `timm.create_model("local-dir:...")` fails on unknown pretrained_cfg keys.
    assert "in_chans" not in cfg
    info = config["kdzoo"]
    assert info["name"] == run.name
    assert info["method"] == method and info["method_class"] == f"kdzoo.methods.{method}"
    assert info["teacher"]["name"] == hp.teacher["name"]
    assert info["dataset"] == "Digits"
    assert info["dataset_hparams"]["image_size"] == 32
    assert info["dataset_hparams"]["train_subset"] == 16
    ckpt = torch.load(run.best, weights_only=True)
    (callback,) = (v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert info["metrics"] == {"val/top1": pytest.approx(callback["best_model_score"].item())}
    assert info["source_checkpoint"] == {"file": run.best.name, "sha256": sha256(run.best)}
    assert info["global_step"] == ckpt["global_step"]


@pytest.mark.parametrize("method", list(RUNS))
def test_readme_and_manifest_entry(method, runs, exported) -> None:
    run, out = runs[method], exported[method]
    card = (out / "README.md").read_text()
    hp = run.module.hparams
    for fragment in (run.name, hp.student, method, hp.teacher["name"], "Digits", "val/top1"):
        assert fragment in card
    assert "arXiv:" in card  # the method's paper
    assert sha256(run.best) in card

    entry = yaml.safe_load((out / "manifest_entry.yaml").read_text())
    assert entry["name"] == run.name and entry["urls"] == []
    for file in ("model.safetensors", "config.json"):
        assert entry["files"][file] == {
            "sha256": sha256(out / file),
            "size": (out / file).stat().st_size,
        }
    assert entry["architecture"] == hp.student and entry["in_chans"] == run.in_chans
    assert entry["method"] == method and entry["teacher"] == hp.teacher["name"]
    top1 = json.loads((out / "config.json").read_text())["kdzoo"]["metrics"]["val/top1"]
    assert entry["metrics"] == {"top1": round(100 * top1, 2)}
    # Once a URL is filled in, the manifest accepts the entry as it is.
    entry["urls"] = [out.as_uri()]
    published = kdzoo.hub.ManifestEntry(**entry)
    assert published.files["model.safetensors"].sha256 == sha256(out / "model.safetensors")


def test_last_checkpoint_reports_no_score_of_its_own(runs, tmp_path) -> None:
    """last.ckpt is not among ModelCheckpoint's scored files: its own score is unknown."""
    run = runs["KD"]
    out = export_checkpoint(run.last, run.name, tmp_path / "last")
    info = json.loads((out / "config.json").read_text())["kdzoo"]
    assert info["metrics"] == {}
    assert info["best_in_run"]["val/top1"]["checkpoint"] == run.best.name
    assert "not recorded for this checkpoint" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "manifest_entry.yaml").read_text())["metrics"] == {}


def test_export_prints_nothing_and_returns_the_folder(runs, tmp_path, capsys) -> None:
    run = runs["KD"]
    out = export_checkpoint(str(run.best), run.name, str(tmp_path / "a" / "b"))
    assert out == tmp_path / "a" / "b" and out.is_dir()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    # Nothing but the folder: no temporary siblings left behind.
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]


# ---- names and output folders ---------------------------------------------------------------


def test_validate_name_accepts_timm_arch_tag() -> None:
    validate_name("resnet8x4.kd_resnet32x4_cifar100", "resnet8x4")
    validate_name("test_resnet.a-1_b", "test_resnet")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("test_efficientnet", "no '.<tag>'"),
        ("test_efficientnet.", "tag ''"),
        ("test_resnet.kd_digits", "not the checkpoint's student"),
        ("test_efficientnet.KD", "tag 'KD'"),
        ("test_efficientnet.kd/x", "path separator"),
        ("../test_efficientnet.kd", "path separator"),
        (".test_efficientnet.kd", "starts with a dot"),
        ("test_efficientnet.a..b", "'..'"),
        ("test_efficientnet.a.b", "tag 'a.b'"),
        ("test_efficientnet.-kd", "tag '-kd'"),
        ("test_efficientnet.kd digits", "tag 'kd digits'"),
        ("test_efficientnet." + "k" * 200, "not a valid checkpoint name"),
    ],
)
def test_bad_names_are_refused_before_writing(name, reason, runs, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=re.escape(reason)) as info:
        export_checkpoint(runs["KD"].best, name, out)
    assert isinstance(info.value, ValueError) and isinstance(info.value, KDZooError)
    assert "'<architecture>.<tag>'" in str(info.value)  # the message states the rule
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_folder_is_never_replaced_without_overwrite(runs, tmp_path) -> None:
    run = runs["KD"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for overwrite in (False, True):  # foreign files: refused even with overwrite
        with pytest.raises(ExportError, match=r"notes\.txt"):
            export_checkpoint(run.best, run.name, out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_earlier_export_is_replaced_only_with_overwrite(runs, tmp_path) -> None:
    run = runs["KD"]
    out = export_checkpoint(run.best, run.name, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="overwrite"):
        export_checkpoint(run.last, run.name, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    export_checkpoint(run.last, run.name, out, overwrite=True)
    config = json.loads((out / "config.json").read_text())
    assert config["kdzoo"]["source_checkpoint"]["file"] == "last.ckpt"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy was cleaned up


def test_empty_existing_folder_is_filled(runs, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    out = export_checkpoint(runs["KD"].best, runs["KD"].name, tmp_path / "out")
    assert {p.name for p in out.iterdir()} == set(EXPORT_FILES)


def test_failed_export_leaves_the_earlier_one_intact(runs, tmp_path, monkeypatch) -> None:
    run = runs["KD"]
    out = export_checkpoint(run.best, run.name, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("kdzoo.hub.export.model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run.last, run.name, out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run.last, run.name, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


# ---- checkpoints that cannot be exported ----------------------------------------------------


def test_student_weights_that_do_not_fit_name_the_keys_and_the_likely_cause(tmp_path) -> None:
    """The strict-load explanation: the keys, and whether only the classifier differs."""
    from kdzoo.hub.export import _check_fits

    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    state = dict(model.state_dict())
    state["fc.blocks.0.weight"] = state.pop("fc.weight")  # a method's own classifier
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(ExportError) as info:
        _check_fits(model, state, "test_resnet", "MyMethod", ckpt)
    message = str(info.value)
    for fragment in (
        f"cannot export {ckpt}",
        "missing keys (1): fc.weight",
        "unexpected keys (1): fc.blocks.0.weight",
        "classifier (fc) is not timm's: MyMethod replaced it",
        "plain timm model",
    ):
        assert fragment in message, message
    del state["conv1.0.weight"]  # beyond the classifier: not a timm model at all
    with pytest.raises(ExportError, match="The student is not a plain timm model"):
        _check_fits(model, state, "test_resnet", None, ckpt)


def test_not_a_kdzoo_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ExportError, match="does not record which kdzoo method wrote it"):
        export_checkpoint(path, "test_resnet.x", tmp_path / "out")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "torch.nn.Linear"}}, path)
    with pytest.raises(ExportError, match=r"torch\.nn\.Linear, which is not a kdzoo method"):
        export_checkpoint(path, "test_resnet.x", tmp_path / "out")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "no_such_module.M"}}, path)
    with pytest.raises(ExportError, match="cannot be imported"):
        export_checkpoint(path, "test_resnet.x", tmp_path / "out")
    torch.save(torch.zeros(2), path)
    with pytest.raises(ExportError, match="not a Lightning checkpoint"):
        export_checkpoint(path, "test_resnet.x", tmp_path / "out")
    with pytest.raises(WeightsError, match="not found"):
        export_checkpoint(tmp_path / "missing.ckpt", "test_resnet.x", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _CreatesMarker:
    """Unpickling an instance calls ``open(marker, "w")``: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_without_running_it(runs, tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    checkpoint = torch.load(runs["KD"].best, weights_only=True)
    checkpoint["payload"] = _CreatesMarker(marker)
    torch.save(checkpoint, path)
    assert not marker.exists()

    with pytest.raises(WeightsError, match="refusing to load"):
        export_checkpoint(path, runs["KD"].name, tmp_path / "out")
    assert not marker.exists(), "export unpickled the payload"
    assert not (tmp_path / "out").exists()

    # The payload is live: full unpickling does run it (so the test above can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---- load_folder errors ---------------------------------------------------------------------


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_folder_errors(exported, tmp_path) -> None:
    with pytest.raises(WeightsError, match="hub folder not found"):
        load_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"config\.json not found"):
        load_folder(empty)

    folder = copy_export(exported["KD"], tmp_path / "no_arch")
    config = json.loads((folder / "config.json").read_text())
    del config["architecture"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="names no 'architecture'"):
        load_folder(folder)

    folder = copy_export(exported["KD"], tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"has no model\.safetensors"):
        load_folder(folder)


def test_load_folder_names_the_keys_that_do_not_fit(exported, tmp_path) -> None:
    folder = copy_export(exported["KD"], tmp_path / "bad")
    state = load_file(str(folder / "model.safetensors"))
    removed = sorted(state)[0]
    del state[removed]
    state["projector.2.weight"] = torch.zeros(2, 2)
    state["classifier.weight"] = torch.zeros(3, state["classifier.weight"].shape[1])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError) as info:
        load_folder(folder)
    message = str(info.value)
    for fragment in (removed, "projector.2.weight", "classifier.weight: file (3,"):
        assert fragment in message, message


def test_load_folder_reads_no_pickles(exported, tmp_path) -> None:
    """A .safetensors path that is really a pickle is an error, never unpickled."""
    folder = copy_export(exported["KD"], tmp_path / "pickled")
    marker = tmp_path / "pwned"
    torch.save({"x": _CreatesMarker(marker)}, folder / "model.safetensors")
    with pytest.raises(WeightsError, match="cannot read"):
        load_folder(folder)
    assert not marker.exists()


# ---- published over HTTP (loopback) ---------------------------------------------------------


@pytest.mark.parametrize("method", ["KD", "DKD"])
def test_http_download_and_load_round_trip(method, runs, exported, tmp_path, monkeypatch) -> None:
    """An export served by a local HTTP server, listed in a manifest, downloaded and loaded by
    name: identical logits to the trained student."""
    run, out = runs[method], exported[method]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        entry = yaml.safe_load((out / "manifest_entry.yaml").read_text())
        entry["urls"] = [f"http://127.0.0.1:{server.server_address[1]}/{out.name}"]
        manifest = tmp_path / "manifest.yaml"
        manifest.write_text(yaml.safe_dump({"checkpoints": [entry]}))
        monkeypatch.setenv("KDZOO_HOME", str(tmp_path / "home"))
        model = kdzoo.hub.load(run.name, manifest_path=manifest)
    finally:
        server.shutdown()
        thread.join()
    cached = tmp_path / "home/hub" / run.name / "model.safetensors"
    assert cached.read_bytes() == (out / "model.safetensors").read_bytes()
    x = run.images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.logits(x), rtol=0, atol=0)
    # Served from the cache now, with the server gone and the network off.
    monkeypatch.setenv("KDZOO_OFFLINE", "1")
    with torch.no_grad():
        torch.testing.assert_close(kdzoo.hub.load(run.name, manifest_path=manifest)(x), model(x))
