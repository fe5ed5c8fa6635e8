"""FST's ``pseudo_ignore_top`` / ``pseudo_ignore_bottom``: DAFormer's ``psweight_ignore_top`` /
``psweight_ignore_bottom`` (15 / 120 in the FST UDA code's GTA5 -> Cityscapes configs, spec
``segmentation.md`` section 2.5) give zero pseudo-label weight to the first / last rows of each
unlabelled crop. The pseudo-label term must equal the one computed by hand with those rows'
weights zeroed, ignore the student's predictions in those rows (and only there), and with the
default (0, 0) be bit-identical to the plain DACS formulas."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdzoo.errors import ConfigError
from kdzoo.methods.segmentation import FST
from kdzoo.methods.segmentation import fst as fst_module
from kdzoo.methods.segmentation.base import upsample

C, SIZE, TOP, BOTTOM = 4, 32, 3, 5
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "gta5_cityscapes" / "fst"


def _fst(**kwargs) -> FST:
    torch.manual_seed(0)
    return FST(
        student="test_resnet",
        num_classes=C,
        head="fcn",
        output_stride=8,
        dropout=0.0,
        optimizer=partial(torch.optim.SGD, lr=0.05),
        threshold=0.26,  # about half the pixels of these random nets are confident
        **kwargs,
    )


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    masks = torch.randint(0, C, (2, SIZE, SIZE), generator=g)
    unlabelled = torch.randn(2, 3, SIZE, SIZE, generator=g)
    return {"labelled": [images, masks], "unlabelled": [unlabelled]}


def _pseudo(model: FST, batch: dict) -> torch.Tensor:
    with warnings.catch_warnings():  # self.log without a trainer
        warnings.simplefilter("ignore")
        return model.loss_terms(batch)["pseudo"]


def _by_hand(model: FST, batch: dict, top: int, bottom: int) -> torch.Tensor:
    """DAFormer's weighted mean: a weight per pixel (the quality q, or the confident mask),
    zero on the border rows, CE times weight averaged over every pixel of the crop."""
    u = batch["unlabelled"][0]
    labels, confidence = model.pseudo_labels(u)
    confident = (confidence >= model.hparams.threshold).float()
    if model.hparams.pseudo_label == "quality":
        weight = confident.mean() * torch.ones_like(confident)
    else:
        weight = confident.clone()
    if top:
        weight[:, :top, :] = 0
    if bottom:
        weight[:, -bottom:, :] = 0
    logits = upsample(model.student(u).logits, u.shape[-2:])
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weight).mean()


@pytest.mark.parametrize("pseudo_label", ["quality", "threshold"])
def test_border_rows_have_zero_weight(pseudo_label):
    model = _fst(pseudo_label=pseudo_label, pseudo_ignore_top=TOP, pseudo_ignore_bottom=BOTTOM)
    batch = _batch()
    ours = _pseudo(model, batch)
    torch.testing.assert_close(ours, _by_hand(model, batch, TOP, BOTTOM), rtol=1e-6, atol=0)
    # The option changes the term (so the hand computation above is not vacuous).
    assert not torch.allclose(ours, _by_hand(model, batch, 0, 0))


def _perturbed_student(monkeypatch, rows: slice) -> None:
    """Adds large values to the student's upsampled logits in ``rows`` (the teacher's
    pseudo-labels, computed under ``no_grad``, are left alone)."""

    def perturbed(logits, size):
        out = upsample(logits, size)
        if torch.is_grad_enabled():
            g = torch.Generator().manual_seed(1)
            noise = torch.zeros_like(out)
            noise[:, :, rows] = 10 * torch.randn(noise[:, :, rows].shape, generator=g)
            out = out + noise
        return out

    monkeypatch.setattr(fst_module, "upsample", perturbed)


@pytest.mark.parametrize("pseudo_label", ["quality", "threshold"])
def test_predictions_in_the_border_rows_do_not_count(monkeypatch, pseudo_label):
    model = _fst(pseudo_label=pseudo_label, pseudo_ignore_top=TOP, pseudo_ignore_bottom=BOTTOM)
    batch = _batch()
    before = _pseudo(model, batch)
    with monkeypatch.context() as patch:
        _perturbed_student(patch, slice(0, TOP))
        assert torch.equal(_pseudo(model, batch), before)
    with monkeypatch.context() as patch:
        _perturbed_student(patch, slice(SIZE - BOTTOM, SIZE))
        assert torch.equal(_pseudo(model, batch), before)
    # The first and last rows that do count.
    for row in (TOP, SIZE - BOTTOM - 1):
        with monkeypatch.context() as patch:
            _perturbed_student(patch, slice(row, row + 1))
            assert not torch.equal(_pseudo(model, batch), before)


def test_border_rows_get_no_gradient_from_the_pseudo_term():
    model = _fst(pseudo_ignore_top=TOP, pseudo_ignore_bottom=BOTTOM)
    pixel_loss = torch.rand(2, SIZE, SIZE, requires_grad=True)
    model.ignore_border_rows(pixel_loss).mean().backward()
    grad = pixel_loss.grad
    assert torch.all(grad[:, :TOP] == 0) and torch.all(grad[:, SIZE - BOTTOM :] == 0)
    assert torch.all(grad[:, TOP : SIZE - BOTTOM] > 0)


@pytest.mark.parametrize("pseudo_label", ["quality", "threshold"])
def test_default_is_bit_identical_to_the_plain_dacs_term(pseudo_label):
    """``(0, 0)`` takes no extra operation: the term is exactly the formulas without the option
    (``q * mean(CE)`` / ``mean(confident * CE)``)."""
    model = _fst(pseudo_label=pseudo_label)
    assert model.hparams.pseudo_ignore_top == 0 and model.hparams.pseudo_ignore_bottom == 0
    batch = _batch()
    u = batch["unlabelled"][0]
    labels, confidence = model.pseudo_labels(u)
    logits = upsample(model.student(u).logits, u.shape[-2:])
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    confident = (confidence >= model.hparams.threshold).float()
    expected = (
        confident.mean() * ce.mean() if pseudo_label == "quality" else (confident * ce).mean()
    )
    assert torch.equal(_pseudo(model, batch), expected)
    assert model.ignore_border_rows(ce) is ce


def test_negative_rows_are_refused():
    with pytest.raises(ConfigError, match="pseudo_ignore_top"):
        _fst(pseudo_ignore_top=-1)


@pytest.mark.parametrize(
    "name", ["deep_deeplabv3_resnet101c.yaml", "wide_deeplabv3_resnet101c.yaml"]
)
def test_gta5_cityscapes_configs_use_the_code_rows(name):
    init_args = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]
    assert (init_args["pseudo_ignore_top"], init_args["pseudo_ignore_bottom"]) == (15, 120)
