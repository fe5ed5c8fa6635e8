"""Tests for :mod:`kdzoo.models.segmentation`: head shapes, the parameter split, batch size 1,
odd input sizes, and LAD's first-conv widening (spec oracle L1: a 4-channel network fed
``[x; 0]`` is bit-identical to the 3-channel one, and the extra slice gets exactly zero gradient).

Qiu et al., "Make a Strong Teacher with Label Assistance", ECCV 2024, arXiv:2407.13254.
"""

from __future__ import annotations

import math

import pytest
import torch
from timm.models import adapt_input_conv
from torch import nn

from kdzoo.errors import ConfigError
from kdzoo.models.segmentation import (
    HEADS,
    SegmentationModel,
    SegmentationOutput,
    widen_first_conv,
)

BACKBONE = "test_resnet"  # stages: channels [32, 32, 48, 192, 96], strides [2, 4, 8, 16, 32]
NUM_CLASSES = 5


def build(head: str = "deeplabv3", **kwargs) -> SegmentationModel:
    return SegmentationModel(BACKBONE, NUM_CLASSES, head, **kwargs)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", HEADS)
def test_output_shapes(head: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build(head, output_stride=output_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegmentationOutput)
    logits_stride = 4 if head == "fpn" else output_stride
    side = 64 // logits_stride
    assert out.logits.shape == (2, NUM_CLASSES, side, side)
    assert model.logits_stride == logits_stride
    assert model.output_stride == output_stride
    # The aux head reads the second-to-last stage: stride 8 at OS 8, 16 at OS 16.
    aux_side = 64 // output_stride
    assert out.aux is not None and out.aux.shape == (2, NUM_CLASSES, aux_side, aux_side)
    last = 64 // output_stride
    assert out.features.shape == (2, 96, last, last)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux).all()


def test_native_stride_and_no_aux() -> None:
    model = build("fcn", output_stride=None, aux_head=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert model.output_stride == 32 and model.aux_head is None and out.aux is None
    assert out.logits.shape == (1, NUM_CLASSES, 2, 2)


@pytest.mark.parametrize(("output_stride", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_aspp_rates_scale_with_output_stride(output_stride: int, rates: tuple) -> None:
    model = build("deeplabv3", output_stride=output_stride)
    assert model.head.rates == rates
    dilations = [branch[0].dilation[0] for branch in model.head.branches[1:]]
    assert tuple(dilations) == rates


@pytest.mark.parametrize("head", HEADS)
def test_head_and_backbone_parameters_partition_all(head: str) -> None:
    model = build(head)
    head_ids = [id(p) for p in model.head_parameters()]
    backbone_ids = [id(p) for p in model.backbone_parameters()]
    all_ids = [id(p) for p in model.parameters()]
    assert len(set(head_ids)) == len(head_ids) and len(set(backbone_ids)) == len(backbone_ids)
    assert not set(head_ids) & set(backbone_ids)
    assert set(head_ids) | set(backbone_ids) == set(all_ids)
    aux_ids = {id(p) for p in model.aux_head.parameters()}
    assert aux_ids and aux_ids <= set(head_ids)


@pytest.mark.parametrize("head", HEADS)
def test_batch_size_one_trains(head: str) -> None:
    """BatchNorm on a pooled 1x1 map of one image fails in train mode; the heads avoid it."""
    torch.manual_seed(1)
    model = build(head).train()
    out = model(torch.randn(1, 3, 64, 64))
    (out.logits.square().mean() + out.aux.square().mean()).backward()
    grads = [p.grad for p in model.head_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", HEADS)
def test_input_size_not_divisible_by_stride(head: str, output_stride: int) -> None:
    model = build(head, output_stride=output_stride).eval()
    height, width = 65, 63
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    stride = 4 if head == "fpn" else output_stride
    # Every stride-2 conv/pool of a ResNet has "same" padding: each halving rounds up.
    assert out.logits.shape[2:] == (math.ceil(height / stride), math.ceil(width / stride))
    assert out.aux.shape[2:] == (
        math.ceil(height / output_stride),
        math.ceil(width / output_stride),
    )


def widened_copy(model3: SegmentationModel, head: str) -> SegmentationModel:
    """A model with one extra input channel holding exactly ``model3``'s weights (the first
    conv's ``[:, :3]`` slice is ``model3``'s stem; its new slice stays random)."""
    model4 = build(head, extra_in_chans=1)
    state = model3.state_dict()
    stem = "backbone.conv1.0.weight"  # test_resnet's deep stem: conv1 = Sequential(conv, ...)
    new_stem = model4.state_dict()[stem].clone()
    assert new_stem.shape[1] == 4 and state[stem].shape[1] == 3
    new_stem[:, :3] = state[stem]
    assert new_stem[:, 3].abs().sum() > 0  # the extra filter is not trivially zero
    state[stem] = new_stem
    model4.load_state_dict(state)
    return model4


@pytest.mark.parametrize("head", ["deeplabv3", "fpn"])
def test_zero_extra_channel_is_bit_identical(head: str) -> None:
    """Spec oracle L1: [x; 0] through the widened net == x through the 3-channel net, exactly."""
    torch.manual_seed(2)
    model3 = build(head)
    model4 = widened_copy(model3, head)
    assert model4.in_chans == 4 and model4.extra_in_chans == 1
    x = torch.randn(2, 3, 64, 64)
    x4 = torch.cat([x, torch.zeros(2, 1, 64, 64)], dim=1)
    for train in (False, True):
        model3.train(train)
        model4.train(train)
        torch.manual_seed(3)  # same dropout masks in train mode
        out3 = model3(x)
        torch.manual_seed(3)
        out4 = model4(x4)
        assert torch.equal(out3.logits, out4.logits)
        assert torch.equal(out3.aux, out4.aux)
        assert torch.equal(out3.features, out4.features)
    # The extra filter sees only zeros, so its gradient is exactly 0 (the RGB slice's is not).
    model4.eval()
    out = model4(x4)
    (out.logits.square().mean() + out.aux.square().mean()).backward()
    grad = model4.backbone.conv1[0].weight.grad
    assert torch.equal(grad[:, 3], torch.zeros_like(grad[:, 3]))
    assert grad[:, :3].abs().sum() > 0
    # ...and a non-zero extra channel does change the output (the check above can fail).
    x4[:, 3] = 1.0
    with torch.no_grad():
        assert not torch.equal(model4(x4).logits, out.logits)


def test_model_widening_keeps_the_image_filters() -> None:
    torch.manual_seed(4)
    model3 = build("fcn")
    torch.manual_seed(4)  # the backbone is built before the widening: same stem weights
    model4 = build("fcn", extra_in_chans=2, extra_init_std=0.0)
    stem3 = model3.backbone.conv1[0].weight
    stem4 = model4.backbone.conv1[0].weight
    assert stem4.shape == (stem3.shape[0], 5, *stem3.shape[2:])
    assert torch.equal(stem4[:, :3], stem3)
    assert torch.equal(stem4[:, 3:], torch.zeros_like(stem4[:, 3:]))
    assert model4(torch.randn(1, 5, 32, 32)).logits.shape[1] == NUM_CLASSES


def stem_net(in_channels: int = 3, out_channels: int = 256, bias: bool = True) -> nn.Sequential:
    """A stem conv inside a nested container, followed by a second conv that must stay as is."""
    stem = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, dilation=1, bias=bias)
    return nn.Sequential(
        nn.Sequential(stem, nn.ReLU()), nn.Conv2d(out_channels, 8, 3, padding=2, dilation=2)
    )


@pytest.mark.parametrize("std", [0.1, 0.5])
def test_widen_first_conv_init(std: float) -> None:
    torch.manual_seed(5)
    net = stem_net()
    old = net[0][0]
    old_weight, old_bias = old.weight.detach().clone(), old.bias.detach().clone()
    second = net[1]
    gen = torch.Generator().manual_seed(6)
    new = widen_first_conv(net, 1, std=std, generator=gen)
    assert net[0][0] is new and net[1] is second  # swapped in place; only the first conv
    assert isinstance(new, nn.Conv2d) and new.in_channels == 4
    assert new.weight.shape == (256, 4, 7, 7)
    assert (new.kernel_size, new.stride, new.padding, new.dilation, new.groups) == (
        (7, 7),
        (2, 2),
        (3, 3),
        (1, 1),
        1,
    )
    assert torch.equal(new.weight[:, :3], old_weight)
    assert torch.equal(new.bias, old_bias)
    fresh = new.weight[:, 3].detach()  # 256 * 49 = 12,544 draws
    assert abs(fresh.std().item() - std) < 0.03 * std
    assert abs(fresh.mean().item()) < 0.05 * std
    # Reproducible from the generator alone.
    again = widen_first_conv(stem_net(), 1, std=std, generator=torch.Generator().manual_seed(6))
    assert torch.equal(again.weight[:, 3], fresh)
    # The widened stem still runs, on 4 channels.
    assert net(torch.randn(1, 4, 16, 16)).shape == (1, 8, 8, 8)


def test_widen_first_conv_zero_std_and_no_bias() -> None:
    net = stem_net(out_channels=16, bias=False)
    new = widen_first_conv(net, 3, std=0.0)
    assert new.bias is None and new.in_channels == 6
    assert torch.equal(new.weight[:, 3:], torch.zeros(16, 3, 7, 7))


def test_timm_in_chans_adaptation_differs() -> None:
    """timm's pretrained ``in_chans=4`` path repeats and rescales the RGB filters (by 3/4);
    widen_first_conv keeps them exactly. (Contrast only; LAD wants the latter.)"""
    torch.manual_seed(7)
    weight = torch.randn(8, 3, 3, 3)
    timm_weight = adapt_input_conv(4, weight.clone())
    assert not torch.equal(timm_weight[:, :3], weight)
    torch.testing.assert_close(timm_weight[:, :3], weight * 3 / 4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    with torch.no_grad():
        net[0].weight.copy_(weight)
    assert torch.equal(widen_first_conv(net, 1).weight[:, :3], weight)


def test_widen_first_conv_errors() -> None:
    with pytest.raises(ConfigError, match="groups=3"):
        widen_first_conv(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), 1)
    with pytest.raises(ConfigError, match=r"no nn\.Conv2d"):
        widen_first_conv(nn.Sequential(nn.Linear(3, 3)), 1)
    with pytest.raises(ConfigError, match="not the conv itself"):
        widen_first_conv(nn.Conv2d(3, 6, 3), 1)
    with pytest.raises(ConfigError, match="extra input channels must be >= 1"):
        widen_first_conv(stem_net(), 0)
    with pytest.raises(ConfigError, match="std"):
        widen_first_conv(stem_net(), 1, std=-0.1)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown segmentation head 'unet'.*deeplabv3"):
        build("unet")
    with pytest.raises(ConfigError, match=r"unknown timm backbone 'resnet_nonexistent'"):
        SegmentationModel("resnet_nonexistent", NUM_CLASSES)
    with pytest.raises(ConfigError, match="output_stride must be None, 8, 16 or 32, got 4"):
        build(output_stride=4)
    with pytest.raises(ConfigError, match=r"vit_tiny_patch16_224.*output_stride=8"):
        SegmentationModel("vit_tiny_patch16_224", NUM_CLASSES, output_stride=8)
    with pytest.raises(ConfigError, match="num_classes"):
        SegmentationModel(BACKBONE, 0)
    with pytest.raises(ConfigError, match="dropout"):
        build(dropout=1.0)


def test_wrong_input_channels_raise() -> None:
    model = build("fcn", extra_in_chans=1).eval()
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) inputs \(1 of them extra\)"):
        model(torch.randn(1, 3, 32, 32))
