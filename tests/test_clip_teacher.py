"""Reference tests for the CLIP teachers of :mod:`kdzoo.models.clip`.

Offline and with random weights (spec Part 3): ``open_clip.create_model("RN50", pretrained=None)``
builds the architecture from open_clip's bundled config and the tokenizer's BPE vocabulary ships
with the package. Oracles (spec §2.3, §2.9 oracle 5):

* text weights ``w_c = normalize(mean_t text(template_t(c)))`` over un-normalised embeddings;
* logits ``100 cos(v(x), w_c)`` at the *fixed* scale 100 (a random model's own scale is
  ``1/0.07 = 14.2857``), teacher probabilities ``softmax(100 cos / 2) = softmax(50 cos)``;
* CLAP (Silva-Rodríguez et al., CVPR 2024, arXiv:2312.12730): ``CE + mean_c lambda_c |P_c -
  W0_c|^2`` decreases under the fit, and the un-fitted probe equals the zero-shot classifier.

The CLIP input here is 64 pixels (``force_image_size``) to keep RN50 fast on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import lightning as L

# A plain import, not importorskip: open_clip is in the dev extra, so CI must run these tests.
import open_clip
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.errors import ConfigError
from kdzoo.methods import DualHeadDistillation
from kdzoo.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPTeacherSpec,
    CLIPZeroShotTeacher,
    LinearProbeTeacher,
    build_clip_teacher,
    fit_linear_probe,
)
from kdzoo.models.teacher import Teacher

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    r"ignore:Found \d+ module\(s\) in eval mode",
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
)

SIZE = 64
CLASSES = ["cat", "golden_retriever", "airplane"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]
MEAN, STD = (0.3,), (0.4,)


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.create_model("RN50", pretrained=None, force_image_size=SIZE).eval()


@pytest.fixture(scope="module")
def teacher(clip_model) -> CLIPZeroShotTeacher:
    return CLIPZeroShotTeacher(
        clip_model,
        open_clip.get_tokenizer("RN50"),
        CLASSES,
        templates=TEMPLATES,
        student_mean=MEAN,
        student_std=STD,
    )


def grey_batch(n: int, seed: int, size: int = 28) -> torch.Tensor:
    """Grey images in [0, 1], normalised as a student with MEAN/STD sees them."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=gen) - MEAN[0]) / STD[0]


def reference_text_weights(clip_model) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, normalised): per class the mean over templates of un-normalised embeddings."""
    tokenizer = open_clip.get_tokenizer("RN50")
    raw = []
    with torch.no_grad():
        for name in CLASSES:
            prompts = [t.format(name.replace("_", " ")) for t in TEMPLATES]
            raw.append(clip_model.encode_text(tokenizer(prompts)).double().mean(dim=0))
    raw = torch.stack(raw)
    return raw, raw / raw.norm(dim=1, keepdim=True)


def reference_cosines(clip_model, pixels_rgb: torch.Tensor) -> torch.Tensor:
    """cos(v(x), w_c) for RGB pixels in [0, 1] already at CLIP's input size."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        v = clip_model.encode_image((pixels_rgb - mean) / std).double()
    v = v / v.norm(dim=1, keepdim=True)
    return v @ reference_text_weights(clip_model)[1].t()


def test_tokenizer_is_bundled_and_deterministic() -> None:
    tokens = open_clip.get_tokenizer("RN50")(["a photo of a cat."])
    assert tokens.shape == (1, 77)
    want = [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert tokens[0, :8].tolist() == want
    assert not tokens[0, 8:].any()


def test_text_weights_average_unnormalised_embeddings(clip_model, teacher) -> None:
    raw, normalised = reference_text_weights(clip_model)
    torch.testing.assert_close(teacher.raw_text_weights.double(), raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher.text_weights.double(), normalised, rtol=1e-5, atol=1e-6)
    assert teacher.class_names == CLASSES


def test_zero_shot_logits_and_probs(clip_model, teacher) -> None:
    x = grey_batch(4, seed=1)  # 28x28 grey, student-normalised
    pixels = (x * STD[0] + MEAN[0]).expand(-1, 3, -1, -1)
    pixels = F.interpolate(pixels, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    cosines = reference_cosines(clip_model, pixels.clamp(0, 1))

    logits = teacher(x)
    assert logits.shape == (4, len(CLASSES)) and not logits.requires_grad
    torch.testing.assert_close(logits.double(), 100 * cosines, rtol=1e-4, atol=1e-3)
    # The fixed scale 100 is used, not the random model's own logit scale.
    assert clip_model.logit_scale.exp().item() == pytest.approx(14.2857, abs=1e-4)
    # Teacher probabilities for KD at T = 2: softmax(100 cos / 2) = softmax(50 cos).
    probs = (logits.double() / 2).softmax(dim=1)
    want = torch.exp(50 * cosines) / torch.exp(50 * cosines).sum(dim=1, keepdim=True)
    torch.testing.assert_close(probs, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_non_square_rgb_input_is_resized_and_centre_cropped(clip_model, teacher) -> None:
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 32, 48, generator=gen)
    x = (pixels - MEAN[0]) / STD[0]
    resized = F.interpolate(pixels, size=(64, 96), mode="bicubic", align_corners=False)
    cosines = reference_cosines(clip_model, resized[..., 16:80].clamp(0, 1))
    torch.testing.assert_close(teacher(x).double(), 100 * cosines, rtol=1e-4, atol=1e-3)


def test_teacher_stays_frozen(teacher) -> None:
    teacher.train()
    assert all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert isinstance(teacher, Teacher) and teacher.visual is teacher.backbone
    assert teacher.state_dict().keys() == {f"backbone.{k}" for k in teacher.visual.state_dict()}


def test_build_from_spec_offline_with_random_weights() -> None:
    spec = CLIPTeacherSpec(pretrained="random", image_size=SIZE, class_names=None)
    built = build_clip_teacher(spec, ["a", "b"], student_mean=MEAN, student_std=STD)
    assert isinstance(built, CLIPZeroShotTeacher)
    assert built.num_classes == 2 and built.image_size == (SIZE, SIZE)
    assert built.logit_scale == 100.0
    cosines = built(grey_batch(3, seed=3)) / 100
    assert cosines.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (CLIPTeacherSpec(pretrained="openai"), "offline|download"),
        (CLIPTeacherSpec(pretrained="/no/such/weights.pt"), "neither an open_clip tag"),
        (CLIPTeacherSpec(model="RN51", pretrained="random"), "unknown open_clip model"),
        (CLIPTeacherSpec(pretrained="random", templates=["no slot"]), "exactly one"),
        (CLIPTeacherSpec(pretrained="random", logit_scale=0.0), "logit_scale"),
        (CLIPTeacherSpec(pretrained="random", image_size=8), "image_size"),
    ],
)
def test_clear_errors(spec: CLIPTeacherSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_clip_teacher(spec, ["a", "b"])


def test_no_class_names_is_an_error() -> None:
    with pytest.raises(ConfigError, match="class names"):
        build_clip_teacher(CLIPTeacherSpec(pretrained="random"), None)


def test_missing_open_clip_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ConfigError, match=r"pip install 'kdzoo\[clip\]'"):
        build_clip_teacher(CLIPTeacherSpec(pretrained="random"), ["a", "b"])


# ---- CLAP -------------------------------------------------------------------------------------


def clap_objective(teacher, prototypes, features, labels) -> float:
    """CE(100 <v, P_c/|P_c|>, y) + mean_c lambda_c |P_c - W0_c|^2 on the whole labelled set."""
    w0 = teacher.raw_text_weights.double()
    zs_probs = (100 * features @ (w0 / w0.norm(dim=1, keepdim=True)).t()).softmax(dim=1)
    lambdas = torch.zeros(len(w0), dtype=torch.float64)
    for c in range(len(w0)):
        if (labels == c).any():
            lambdas[c] = zs_probs[labels == c, c].mean()
    p = prototypes.double()
    logits = 100 * features @ (p / p.norm(dim=1, keepdim=True)).t()
    ce = F.cross_entropy(logits, labels)
    return (ce + (lambdas * (p - w0).pow(2).sum(dim=1)).mean()).item()


def test_unfitted_probe_is_the_zero_shot_classifier(teacher) -> None:
    x = grey_batch(3, seed=4)
    torch.testing.assert_close(LinearProbeTeacher(teacher)(x), teacher(x), rtol=1e-5, atol=1e-4)


def test_linear_probe_fit_lowers_its_objective(teacher, tmp_path: Path) -> None:
    x = grey_batch(12, seed=5)
    labels = torch.arange(12) % 2  # class 2 has no labelled image: lambda_2 = 0
    probe = fit_linear_probe(
        teacher, x, labels, steps=40, batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(probe, LinearProbeTeacher) and isinstance(probe, Teacher)
    assert probe.zero_shot is teacher and not probe.training
    features = teacher.image_features(x).double()
    before = clap_objective(teacher, teacher.raw_text_weights, features, labels)
    after = clap_objective(teacher, probe.prototypes, features, labels)
    assert after < before - 1e-3, (before, after)
    assert not torch.equal(probe.prototypes, teacher.raw_text_weights)
    assert all(not p.requires_grad for p in probe.parameters())
    assert not probe.prototypes.requires_grad

    # The fitted prototypes travel through a file into CLIPTeacherSpec.prototypes.
    path = tmp_path / "clap.pt"
    probe.save_prototypes(path)
    stored = torch.load(path, weights_only=True)["prototypes"]
    torch.testing.assert_close(stored, probe.prototypes, rtol=0, atol=0)


def test_spec_with_prototypes_builds_the_probe(tmp_path: Path) -> None:
    spec = CLIPTeacherSpec(pretrained="random", image_size=SIZE)
    torch.save({"prototypes": torch.randn(3, 1024)}, tmp_path / "bad.pt")
    spec.prototypes = str(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="shape"):
        build_clip_teacher(spec, ["a", "b"])  # fitted for 3 classes, used with 2
    prototypes = torch.randn(2, 1024)
    torch.save({"prototypes": prototypes}, tmp_path / "clap.pt")
    spec.prototypes = str(tmp_path / "clap.pt")
    probe = build_clip_teacher(spec, ["a", "b"])
    assert isinstance(probe, LinearProbeTeacher)
    torch.testing.assert_close(probe.prototypes, prototypes, rtol=0, atol=0)
    x = torch.rand(2, 3, SIZE, SIZE)
    features = probe.zero_shot.image_features(x)
    want = 100 * features @ F.normalize(prototypes, dim=1).t()
    torch.testing.assert_close(probe(x), want, rtol=1e-5, atol=1e-4)


# ---- DHO with a CLIP teacher --------------------------------------------------------------------


class NamedData(L.LightningDataModule):
    """Tiny labelled + unlabelled grey images with class names, as kdzoo datamodules have."""

    class_names: ClassVar[list[str]] = ["t-shirt", "trouser", "pullover"]

    def train_dataloader(self) -> CombinedLoader:
        x, x_u = grey_batch(4, seed=6, size=16), grey_batch(4, seed=7, size=16)
        y = torch.tensor([0, 1, 2, 0])
        return CombinedLoader(
            {
                "labelled": DataLoader(TensorDataset(x, y), batch_size=2),
                "unlabelled": DataLoader(TensorDataset(x_u, torch.full((4,), -1)), batch_size=2),
            },
            mode="max_size_cycle",
        )


def test_dho_takes_class_names_from_the_datamodule(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    clip = {"pretrained": "random", "image_size": SIZE}
    module = DualHeadDistillation(
        "test_resnet", 3, clip_teacher=clip, in_chans=1, mean=MEAN, std=STD
    )
    assert module.teacher is None  # built when fit starts, from the datamodule's class names
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=NamedData())
    assert trainer.global_step == 2
    assert isinstance(module.teacher, CLIPZeroShotTeacher)
    assert module.teacher.class_names == NamedData.class_names
    assert module.hparams.clip_teacher["class_names"] == NamedData.class_names
    assert all(not m.training for m in module.teacher.modules())

    (path,) = sorted(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("teacher.")]
    assert checkpoint["hyper_parameters"]["clip_teacher"]["class_names"] == NamedData.class_names
    restored = DualHeadDistillation.load_from_checkpoint(path)
    assert isinstance(restored.teacher, CLIPZeroShotTeacher)  # rebuilt from the stored names
    x = grey_batch(2, seed=8, size=16)
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), module(x), rtol=0, atol=0)
        probs = module.teacher_probs(x)
    torch.testing.assert_close(probs, (module.teacher(x) / 2).softmax(dim=1))


def test_dho_clip_teacher_is_a_frozen_teacher() -> None:
    clip = {"pretrained": "random", "image_size": SIZE}
    module = DualHeadDistillation("test_resnet", 2, clip_teacher=clip, class_names=("a", "b"))
    module.train()
    assert isinstance(module.teacher, Teacher) and module.student.training
    assert all(not m.training for m in module.teacher.modules())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not [k for k in module.state_dict() if k.startswith("teacher.")]


def test_dho_rejects_class_name_count_mismatch() -> None:
    clip = {"pretrained": "random", "class_names": ["a", "b"], "image_size": SIZE}
    with pytest.raises(ConfigError, match="2 class names"):
        DualHeadDistillation("test_resnet", 3, clip_teacher=clip, in_chans=1)


def test_dho_class_names_argument_builds_the_teacher_at_once() -> None:
    """The CLI links ``data.class_names`` to ``class_names``; spec names would take precedence."""
    clip = {"pretrained": "random", "image_size": SIZE}
    module = DualHeadDistillation("test_resnet", 2, clip_teacher=clip, class_names=("a", "b"))
    assert isinstance(module.teacher, CLIPZeroShotTeacher)
    assert module.teacher.class_names == ["a", "b"]
    assert module.hparams.clip_teacher["class_names"] == ["a", "b"]
    assert module.teacher_logits(torch.rand(1, 3, 16, 16)).shape == (1, 2)
