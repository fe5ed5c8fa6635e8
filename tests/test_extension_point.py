"""The public extension point, end to end through the real ``kdzoo`` command.

A user's own method lives in their own module, outside the package: a
:class:`~kdzoo.methods.DistillationModule` subclass with ``loss_terms`` and ``loss_weights``
(:data:`MY_KD`, the module README.md's "Write your own method" shows). It is trained with
``kdzoo fit --model my_kd.MyKD`` from a ``Supervised`` teacher (the session's ``teacher_ckpt``,
trained by ``kdzoo fit --model Supervised`` on Digits) and exported with ``kdzoo hub export``;
the exported ``model.safetensors`` is a plain timm model that gives the trained student's logits
and holds no teacher weight.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import DATA, QUIET, kdzoo, last_metrics
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode"),
    # load_from_checkpoint re-instantiates through jsonargparse, which Lightning calls by an
    # API jsonargparse has deprecated.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli"),
]

# The README's "Write your own method" example, verbatim.
MY_KD = '''\
import torch.nn.functional as F

from kdzoo.methods import DistillationModule
from kdzoo.models import TeacherSpec


class MyKD(DistillationModule):
    """Cross-entropy plus T^2 KL(teacher || student) at temperature T."""

    def __init__(self, teacher: TeacherSpec, temperature: float = 4.0, **kwargs):
        super().__init__(teacher=teacher, **kwargs)
        self.temperature = temperature
        self.loss_weights = {"ce": 1.0, "kd": 1.0}

    def loss_terms(self, batch):
        images, labels = batch[0], batch[1]
        student = self.student(images).logits
        teacher = self.teacher_forward(images).logits
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return {"ce": F.cross_entropy(student, labels), "kd": t * t * kl}
'''
NAME = "test_efficientnet.my_kd_digits"


def test_readme_shows_this_module() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Write your own method" in readme
    assert f"```python\n{MY_KD}```" in readme, "README's my_kd.py drifted from the tested one"


@pytest.mark.slow
def test_own_method_trains_and_exports_through_the_cli(
    tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_kd.py").write_text(MY_KD)
    # The user's folder on the path, as `PYTHONPATH=. kdzoo fit ...` there.
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    }
    kdzoo(
        "fit", "--model=my_kd.MyKD", "--model.student=test_efficientnet",
        f"--model.init_args.teacher.weights={teacher_ckpt}", "--model.temperature=2.0",
        *DATA, *QUIET, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.logger.init_args.name=my_kd",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    run = tmp_path / "runs/my_kd/version_0"
    (ckpt,) = sorted((run / "checkpoints").glob("best-*.ckpt"))
    # What the root gives for free: each named term logged, the weighted sum, the metric.
    metrics = last_metrics(run)
    assert {"train/loss", "train/loss_ce", "train/loss_kd", "val/top1"} <= set(metrics), metrics
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["hyper_parameters"]["_class_path"] == "my_kd.MyKD"
    assert checkpoint["hyper_parameters"]["temperature"] == 2.0
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]

    out = tmp_path / "exported"
    proc = kdzoo(
        "hub", "export", f"--ckpt_path={ckpt}", f"--name={NAME}", f"--out={out}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert f"exported {NAME}" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet"
    assert config["kdzoo"]["method_class"] == "my_kd.MyKD"

    # A plain timm model, without kdzoo: the exported weights load strictly...
    state = load_file(str(out / "model.safetensors"))
    assert not [k for k in state if "teacher" in k], "teacher weights were exported"
    exported = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], **config["model_args"]
    )
    exported.load_state_dict(state, strict=True)
    # ...and predict what the checkpoint's student predicts (the class loaded back by Lightning).
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = importlib.import_module("my_kd").MyKD.load_from_checkpoint(ckpt)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(x)
        torch.testing.assert_close(exported.eval()(x), want, rtol=0, atol=0)
    assert not torch.allclose(want, timm.create_model("test_efficientnet", num_classes=10,
                                                      in_chans=1).eval()(x))  # fmt: skip
