"""Unit tests for :mod:`kdzoo.models`: the timm backbone wrapper, teachers and weight loading.

Everything is offline: random initialisation (``pretrained=False``), tiny timm test models and
32x32 random inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdzoo.methods import Supervised
from kdzoo.models import (
    Backbone,
    BackboneOutput,
    Teacher,
    TeacherSpec,
    WeightsError,
    build_teacher,
    load_backbone_state,
    safe_torch_load,
)
from kdzoo.models.weights import load_strictly

# (timm name, in_chans, model_kwargs): test_vit needs its image size set for 32x32 inputs.
MODELS = [
    ("test_resnet", 1, None),
    ("test_efficientnet", 1, None),
    ("test_vit", 1, {"img_size": 32}),
    ("test_convnext", 1, None),
    ("resnet18", 3, None),
]
MODEL_IDS = [m[0] for m in MODELS]

STUDENT_MEAN, STUDENT_STD = (0.5,), (0.25,)


def make_input(in_chans: int = 1, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, in_chans, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_backbone(name: str, in_chans: int, kwargs: dict | None, num_classes: int = 10) -> Backbone:
    torch.manual_seed(0)
    return Backbone(name, num_classes=num_classes, in_chans=in_chans, model_kwargs=kwargs).eval()


# ---- Backbone -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "in_chans", "kwargs"), MODELS, ids=MODEL_IDS)
def test_backbone_logits_equal_timm_forward(name: str, in_chans: int, kwargs: dict | None) -> None:
    backbone = make_backbone(name, in_chans, kwargs)
    x = make_input(in_chans)
    with torch.no_grad():
        out = backbone(x)
        want = backbone.model(x)
    assert isinstance(out, BackboneOutput)
    assert out.logits.shape == (2, 10)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert out.embedding.shape == (2, backbone.embedding_dim)
    assert out.features == []
    assert backbone.num_classes == 10


@pytest.mark.parametrize(("name", "in_chans", "kwargs"), MODELS, ids=MODEL_IDS)
def test_backbone_features_one_pass(name: str, in_chans: int, kwargs: dict | None) -> None:
    backbone = make_backbone(name, in_chans, kwargs)
    x = make_input(in_chans)
    with torch.no_grad():
        plain = backbone(x)
        out = backbone(x, indices=[0, -1])
    # Asking for maps does not change the logits or embedding (same pass, same result).
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.embedding, plain.embedding, rtol=1e-5, atol=1e-5)
    assert len(out.features) == 2
    channels = backbone.feature_channels([0, -1])
    for feature, expected in zip(out.features, channels, strict=True):
        assert feature.ndim == 4 and feature.shape[0] == 2  # NCHW
        assert feature.shape[1] == expected


# CNNs whose last stage feeds the pooling head directly (EfficientNet adds a 1x1 conv head).
NO_CONV_HEAD = [m for m in MODELS if m[0] in ("test_resnet", "test_convnext", "resnet18")]


@pytest.mark.parametrize(
    ("name", "in_chans", "kwargs"), NO_CONV_HEAD, ids=[m[0] for m in NO_CONV_HEAD]
)
def test_backbone_last_feature_map_is_the_final_map(
    name: str, in_chans: int, kwargs: dict | None
) -> None:
    backbone = make_backbone(name, in_chans, kwargs)
    x = make_input(in_chans)
    with torch.no_grad():
        out = backbone(x, indices=[-1])
        final = backbone.model.forward_features(x)
    torch.testing.assert_close(out.features[-1], final, rtol=1e-5, atol=1e-5)


def test_backbone_features_in_requested_order() -> None:
    backbone = make_backbone("test_resnet", 1, None)
    x = make_input(1)
    with torch.no_grad():
        out = backbone(x, indices=[-1, 0])
        last = backbone(x, indices=[-1]).features[0]
        first = backbone(x, indices=[0]).features[0]
    assert [f.shape[1] for f in out.features] == backbone.feature_channels([-1, 0])
    torch.testing.assert_close(out.features[0], last)
    torch.testing.assert_close(out.features[1], first)
    # An int asks for the last n maps, shallow to deep, as in timm.
    assert backbone.feature_channels(2) == backbone.feature_channels([-2, -1])


def test_backbone_with_two_classifier_heads_matches_timm() -> None:
    # DeiT's distillation token gives timm models a pair of heads; eval logits average them.
    backbone = Backbone(
        "deit_tiny_distilled_patch16_224", num_classes=4, in_chans=1,
        model_kwargs={"img_size": 32, "depth": 1},
    ).eval()  # fmt: skip
    x = make_input(1)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).logits, backbone.model(x))


def test_backbone_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="not_a_real_timm_model"):
        Backbone("not_a_real_timm_model", num_classes=10)


def test_backbone_rejects_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        Backbone("test_resnet", num_classes=0)


# ---- Teacher --------------------------------------------------------------------------------


def make_teacher(**kwargs) -> Teacher:
    torch.manual_seed(0)
    return build_teacher(
        TeacherSpec("test_resnet", **{"weights": "random", **kwargs}),
        num_classes=10,
        in_chans=1,
        student_mean=STUDENT_MEAN,
        student_std=STUDENT_STD,
    )


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    teacher = make_teacher()
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad for p in params)
    teacher.train()
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    teacher.train(True)
    assert all(not m.training for m in teacher.modules())
    # As a submodule: the parent's train() must not flip it either.
    parent = torch.nn.ModuleDict({"teacher": teacher, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert all(not m.training for m in teacher.modules())


def test_teacher_of_a_network_with_several_inputs() -> None:
    """A cross-modal teacher: ``forward(*inputs)``, frozen, no re-normalisation."""

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
            self.bn = torch.nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x) + self.b(y))

    network = TwoInputs()
    teacher = Teacher(network)
    torch.nn.ModuleDict({"teacher": teacher}).train()
    assert not teacher.renormalise and not network.training and not network.bn.training
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    out = teacher(x, y)
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, network(x, y), rtol=0, atol=0)


def test_load_strictly_names_the_keys_and_loads_nothing_that_does_not_fit() -> None:
    network = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 4))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in before.items()}
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        load_strictly(network, state, what="weights w.pt", into="the net", hint="Wrong net?")
    message = str(info.value)
    assert "\n" not in message
    for fragment in (
        "weights w.pt do not fit the net",
        "missing keys (1): 1.bias",
        "unexpected keys (1): 2.weight",
        "0.weight: file (5, 3) vs model (2, 3)",
        "Wrong net?",
    ):
        assert fragment in message, message
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in before.items())
    fitting = {k: torch.ones_like(v) for k, v in before.items()}
    load_strictly(network, fitting, what="weights", hint=lambda keys: f"never called {keys}")
    assert all(torch.equal(v, fitting[k]) for k, v in network.state_dict().items())


def test_teacher_output_has_no_autograd_graph() -> None:
    teacher = make_teacher()
    x = make_input(1).requires_grad_(True)
    out = teacher(x, indices=[-1])
    for tensor in (out.logits, out.embedding, *out.features):
        assert tensor.grad_fn is None and not tensor.requires_grad


def test_teacher_renormalises_input() -> None:
    teacher_mean, teacher_std = (0.2,), (0.5,)
    teacher = make_teacher(mean=teacher_mean, std=teacher_std)
    assert teacher.renormalise
    x = make_input(1)
    # Undo the student's normalisation, then apply the teacher's.
    raw = x * STUDENT_STD[0] + STUDENT_MEAN[0]
    x_teacher = (raw - teacher_mean[0]) / teacher_std[0]
    with torch.no_grad():
        want = teacher.backbone.model(x_teacher)
        wrong = teacher.backbone.model(x)
    got = teacher(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, wrong, atol=1e-3)


@pytest.mark.parametrize(
    ("mean", "std"), [(STUDENT_MEAN, STUDENT_STD), (None, None)], ids=["equal", "unknown"]
)
def test_teacher_no_renormalisation(mean, std) -> None:
    teacher = make_teacher(mean=mean, std=std)
    assert not teacher.renormalise
    x = make_input(1)
    with torch.no_grad():
        want = teacher.backbone.model(x)
    torch.testing.assert_close(teacher(x).logits, want, rtol=0, atol=0)


def test_teacher_without_student_normalisation_does_not_renormalise() -> None:
    torch.manual_seed(0)
    teacher = build_teacher(
        TeacherSpec("test_resnet", weights="random", mean=(0.2,), std=(0.5,)),
        num_classes=10,
        in_chans=1,
    )
    assert not teacher.renormalise


# ---- weights --------------------------------------------------------------------------------


def make_supervised(num_classes: int = 10, mean=STUDENT_MEAN, std=STUDENT_STD, name="test_resnet"):
    torch.manual_seed(1)
    return Supervised(student=name, num_classes=num_classes, in_chans=1, mean=mean, std=std).eval()


def save_lightning_ckpt(module: Supervised, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture
def source(tmp_path: Path) -> tuple[Supervised, dict[str, Path]]:
    """A trained-looking Supervised module saved in the three supported formats."""
    module = make_supervised()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    paths = {
        "ckpt": save_lightning_ckpt(module, tmp_path / "teacher.ckpt"),
        "safetensors": tmp_path / "teacher.safetensors",
        "pth": tmp_path / "teacher.pth",
    }
    save_file(module.student.model.state_dict(), str(paths["safetensors"]))
    torch.save(module.student.model.state_dict(), paths["pth"])
    return module, paths


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "pth"])
def test_build_teacher_from_weights(source, fmt: str) -> None:
    module, paths = source
    torch.manual_seed(123)  # a different random init, which the loaded weights must overwrite
    teacher = build_teacher(
        TeacherSpec("test_resnet", weights=str(paths[fmt])),
        num_classes=10,
        in_chans=1,
        student_mean=STUDENT_MEAN,
        student_std=STUDENT_STD,
    )
    x = make_input(1, n=4)
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(teacher(x).logits, want, rtol=0, atol=0)
    assert not teacher.renormalise


def test_load_backbone_state_strips_lightning_prefix(source) -> None:
    module, paths = source
    state = load_backbone_state(paths["ckpt"])
    assert set(state) == set(module.student.model.state_dict())


def test_teacher_mean_std_from_checkpoint_hyperparameters(tmp_path: Path) -> None:
    module = make_supervised(mean=(0.2,), std=(0.5,))
    path = save_lightning_ckpt(module, tmp_path / "t.ckpt")
    teacher = build_teacher(
        TeacherSpec("test_resnet", weights=str(path)),  # no mean/std in the spec
        num_classes=10,
        in_chans=1,
        student_mean=STUDENT_MEAN,
        student_std=STUDENT_STD,
    )
    assert teacher.renormalise
    x = make_input(1)
    with torch.no_grad():
        want = module((x * STUDENT_STD[0] + STUDENT_MEAN[0] - 0.2) / 0.5)
    torch.testing.assert_close(teacher(x).logits, want, rtol=1e-5, atol=1e-5)

    # An explicit spec mean/std wins over the checkpoint's.
    teacher = build_teacher(
        TeacherSpec("test_resnet", weights=str(path), mean=STUDENT_MEAN, std=STUDENT_STD),
        num_classes=10,
        in_chans=1,
        student_mean=STUDENT_MEAN,
        student_std=STUDENT_STD,
    )
    assert not teacher.renormalise


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"does_not_exist{suffix}"
    with pytest.raises(WeightsError, match="not found") as info:
        build_teacher(TeacherSpec("test_resnet", weights=str(path)), num_classes=10, in_chans=1)
    assert str(path) in str(info.value)


def test_wrong_number_of_classes(source) -> None:
    _, paths = source
    with pytest.raises(WeightsError) as info:
        build_teacher(
            TeacherSpec("test_resnet", weights=str(paths["ckpt"])), num_classes=5, in_chans=1
        )
    message = str(info.value)
    assert "must predict the same classes" in message
    assert "trained on 10 classes and the data has 5" in message


@pytest.mark.parametrize("other", ["test_convnext", "test_efficientnet"])
def test_wrong_architecture(source, other: str) -> None:
    _, paths = source
    with pytest.raises(WeightsError) as info:
        build_teacher(TeacherSpec(other, weights=str(paths["pth"])), num_classes=10, in_chans=1)
    message = str(info.value)
    assert other in message
    assert "missing keys" in message or "Mismatched tensors" in message


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="state dict"):
        load_backbone_state(path)


class _Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "in-state-dict"])
def test_malicious_pickle_is_refused(tmp_path: Path, wrap: bool) -> None:
    marker = tmp_path / "pwned"
    payload = _Exploit(f"touch {marker}")
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": payload}} if wrap else payload, path)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refusing to load"):
        build_teacher(TeacherSpec("test_resnet", weights=str(path)), num_classes=10, in_chans=1)
    with pytest.raises(WeightsError, match="refusing to load"):
        safe_torch_load(path)
    assert not marker.exists()
