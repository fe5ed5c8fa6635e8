"""MST-Distill's networks, MaskNets, router and Lightning modules on tiny paired tensors (spec
``crossmodal_active.md`` sections 1.5-1.9 and oracles 1.13): masks in (0, 1) and constant over
positions, the identity mask, the one-expert reduction to KD, gradient routing, stage 2 training
only its MaskNets, the three stages chained through checkpoints, and the baselines
(:class:`PairedSupervised`, :class:`CrossModalKD`).

"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015 (code github.com/Gray-OREO/MST-Distill).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.errors import ConfigError
from kdzoo.methods import CrossModalKD, MSTDistill, PairedSupervised
from kdzoo.methods.crossmodal import GateNet, MaskNet1d, MaskNet2d, masked_layer
from kdzoo.methods.crossmodal.masknet import build_masknet, mask_hidden_dim
from kdzoo.models.multimodal import FusionNet, UnimodalNet, hook_point_names
from kdzoo.models.teacher import Teacher

K = 4
SHAPES = [(10,), (2, 12)]  # m1: a vector, m2: a (C, L) sequence
ARCH = {
    "encoders": [{"kind": "mlp", "hidden": [16]}, {"kind": "conv1d", "channels": [8]}],
    "num_classes": K,
    "modality_shapes": SHAPES,
    "head_hidden": [12, 6],
}


def paired_data(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_m1 = torch.randn(n, *SHAPES[0], generator=g)
    x_m2 = torch.randn(n, *SHAPES[1], generator=g)
    return x_m1, x_m2, torch.randint(0, K, (n,), generator=g)


def loader(n: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*paired_data(n)), batch_size=8)


def save(module: torch.nn.Module, path) -> str:
    """A checkpoint as Lightning writes it (state dict + hyper-parameters), without a fit."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def chain(tmp_path, stage: int, **kwargs) -> MSTDistill:
    """An MSTDistill module of ``stage`` built through the checkpoints of the stages before."""
    module = MSTDistill(stage=1, **ARCH, **kwargs)
    for s in range(2, stage + 1):
        module = MSTDistill(
            stage=s, init_from=save(module, tmp_path / f"s{s - 1}.pt"), **ARCH, **kwargs
        )
    return module


def capture(store: dict, key: str, what: str = "output"):
    """A forward hook that keeps the layer's output (or first input) under ``store[key]``."""

    def hook(module, args, output):
        store.setdefault(key, output if what == "output" else args[0])

    return hook


def saturate(masknet: torch.nn.Module) -> None:
    """Make the mask exactly 1 (sigmoid of a large bias)."""
    with torch.no_grad():
        masknet.fc.weight.zero_()
        masknet.fc.bias.fill_(100.0)


# ---- networks ---------------------------------------------------------------------------------
def test_networks_shapes_and_hook_points():
    x_m1, x_m2, _ = paired_data(3)
    image = torch.randn(3, 1, 16, 16)
    timm_net = UnimodalNet({"kind": "timm", "name": "test_resnet"}, (1, 16, 16), K, [5])
    assert timm_net(image).shape == (3, K)
    fusion = FusionNet(ARCH["encoders"], SHAPES, K, [12, 6])
    assert fusion(x_m1, x_m2).shape == (3, K)
    assert fusion.fc1.in_features == 16 + 8  # the concatenated pooled features
    names = hook_point_names(fusion)
    for name in (
        "concat_identity",
        "fc1",
        "fc2",
        "classifier",
        "encoders.0.fc1",
        "encoders.1.conv1",
    ):
        assert name in names
    assert "encoder.model.layer1" in hook_point_names(timm_net)


def test_head_hooks_see_pre_activations():
    net = UnimodalNet(ARCH["encoders"][0], SHAPES[0], K, [12, 6])
    seen = {}
    net.fc1.register_forward_hook(capture(seen, "fc1"))
    net.fc2.register_forward_hook(capture(seen, "fc2_in", what="input"))
    net(paired_data(8)[0])
    assert (seen["fc1"] < 0).any()  # before the ReLU
    torch.testing.assert_close(seen["fc2_in"], seen["fc1"].relu())


@pytest.mark.parametrize(
    ("spec", "shape", "match"),
    [
        ({"kind": "mlp", "hidden": [4]}, (1, 8, 8), r"needs \(D,\) inputs"),
        ({"kind": "transformer"}, (8,), "kind in"),
        ({"kind": "mlp", "widths": [4]}, (8,), "unknown keys"),
        ({"kind": "timm", "name": "no_such_net"}, (1, 8, 8), "unknown timm model"),
    ],
)
def test_encoder_spec_errors(spec, shape, match):
    with pytest.raises(ConfigError, match=match):
        UnimodalNet(spec, shape, K)


# ---- MaskNets ---------------------------------------------------------------------------------
def test_mask_hidden_width_follows_the_repo():
    assert [mask_hidden_dim(c) for c in (320, 160, 596, 1024)] == [159, 78, 297, 510]


@pytest.mark.parametrize(
    ("shape", "kind"), [((12,), MaskNet1d), ((6, 5, 7), MaskNet2d), ((6, 9), MaskNet2d)]
)
def test_mask_range_and_shape(shape, kind):
    torch.manual_seed(0)
    masknet = build_masknet(shape)
    assert type(masknet) is kind
    mask = masknet(torch.randn(4, *shape) * 5)
    assert mask.shape == (4, shape[0])
    assert ((mask > 0) & (mask < 1)).all()


def test_masked_map_is_scaled_per_channel_and_never_grows():
    torch.manual_seed(0)
    net = UnimodalNet({"kind": "timm", "name": "test_resnet"}, (1, 16, 16), K, [5]).eval()
    layer = "encoder.model.layer1"
    maps = {}
    net.get_submodule(layer).register_forward_hook(capture(maps, "plain"))
    image = torch.randn(2, 1, 16, 16)
    plain_logits = net(image)
    masknet = build_masknet(tuple(maps["plain"].shape[1:])).eval()
    with masked_layer(net, layer, masknet):
        handle = net.get_submodule(layer).register_forward_hook(capture(maps, "masked"))
        masked_logits = net(image)
        handle.remove()
    plain, masked = maps["plain"], maps["masked"]
    assert (masked.abs() <= plain.abs()).all()
    # One factor per (sample, channel), the same at every position, in (0, 1).
    big = plain.abs() > 1e-4
    ratio = masked / plain.where(big, 1.0)
    low = ratio.where(big, math.inf).flatten(2).amin(dim=2)
    high = ratio.where(big, -math.inf).flatten(2).amax(dim=2)
    assert big.flatten(2).any(dim=2).all()
    torch.testing.assert_close(low, high, rtol=1e-4, atol=1e-6)
    assert ((low > 0) & (high < 1)).all()
    assert not torch.allclose(masked_logits, plain_logits)


def test_identity_mask_leaves_logits_unchanged_and_the_hook_is_removed():
    net = FusionNet(ARCH["encoders"], SHAPES, K, [12, 6]).eval()
    x_m1, x_m2, _ = paired_data(4)
    plain = net(x_m1, x_m2)
    for layer, shape in (("fc1", (12,)), ("encoders.1.conv1", (8, 12))):
        masknet = build_masknet(shape).eval()
        saturate(masknet)
        with masked_layer(net, layer, masknet):
            torch.testing.assert_close(net(x_m1, x_m2), plain, rtol=0, atol=0)
        assert not net.get_submodule(layer)._forward_hooks
    with pytest.raises(RuntimeError), masked_layer(net, "fc1", build_masknet((12,))):
        raise RuntimeError("the hook must be removed on errors too")
    assert not net.fc1._forward_hooks


def test_map_with_unit_spatial_size_is_masked_as_a_vector():
    masknet = build_masknet((6, 1, 1))
    assert type(masknet) is MaskNet1d
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1))
    with masked_layer(net, "0", masknet):
        out = net(torch.randn(2, 3, 1, 1))
    assert out.shape == (2, 6, 1, 1)


def test_unknown_hook_layer_lists_the_available_names():
    net = FusionNet(ARCH["encoders"], SHAPES, K, [12, 6])
    hook = masked_layer(net, "fc9", build_masknet((12,)))
    with pytest.raises(ConfigError, match=r"no layer named 'fc9'.*concat_identity.*fc1"), hook:
        pass
    with pytest.raises(ConfigError, match=r"no layer named 'fc9'.*available layers"):
        MSTDistill(mm_layers=["fc9"], **ARCH)


def test_gate_is_one_affine_map():
    gate = GateNet(K, 3)
    x, y = torch.randn(5, K), torch.randn(5, K)
    zero = torch.zeros(1, K)
    torch.testing.assert_close(gate(x + y) - gate(y), gate(x) - gate(zero), atol=1e-5, rtol=1e-5)


# ---- MST stage 3: reduction to KD and gradient routing -----------------------------------------
def test_one_expert_with_identity_mask_reduces_stage3_to_kd(tmp_path):
    alpha = 0.5
    module = chain(
        tmp_path,
        3,
        mm_layers=["fc1"],
        cm_layers=[],
        task_weight=1 - alpha,
        kl_weight=alpha,
        lb_weight=7.0,
    )
    saturate(module.masknets[0])
    batch = paired_data(6)
    terms = module.loss_terms(batch)
    assert terms["lb"].item() == 0.0
    x_m1, x_m2, y = batch
    with torch.no_grad():
        student = module.student(x_m1).double()
        teacher = module.mm_teacher(x_m1, x_m2).double()
    log_s = (student / 4).log_softmax(-1)
    log_t = (teacher / 4).log_softmax(-1)
    kd = 16 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    ce = -student.log_softmax(-1)[torch.arange(6), y].mean()
    # float32 KL of close distributions vs float64: agreement to ~1e-5 relative.
    assert terms["route"].item() == pytest.approx(kd.item(), rel=1e-4)
    total = sum(module.loss_weights[n] * v for n, v in terms.items())
    assert total.item() == pytest.approx(((1 - alpha) * ce + alpha * kd).item(), rel=1e-5)


def _grads(loss, params):
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True)
    return sum(0 if g is None else int(torch.count_nonzero(g)) for g in grads)


def test_code_routing_trains_the_gate_only_through_load_balancing(tmp_path):
    module = chain(tmp_path, 3)  # E = 4, k = 1
    terms = module.loss_terms(paired_data(8))
    assert _grads(terms["route"], module.gate.parameters()) == 0
    assert _grads(terms["lb"], module.gate.parameters()) > 0
    assert _grads(terms["lb"], module.student.parameters()) > 0  # through z_S, not detached
    assert all(not p.requires_grad for p in module.masknets.parameters())


def test_gate_weighted_routing_trains_the_gate_from_kd(tmp_path):
    module = chain(tmp_path, 3, top_k=2, routing="gate_weighted")
    terms = module.loss_terms(paired_data(8))
    assert _grads(terms["route"], module.gate.parameters()) > 0


def test_stage3_weight_schedule_matches_the_repo_loop(tmp_path):
    module = chain(tmp_path, 3)
    kl_weight, lb_weight = 1.0, 1.0
    for epoch in range(101):  # the repo: decay after each epoch e, both firing after epoch 0
        weights = module.stage3_weights(epoch)
        assert weights["route"] == pytest.approx(kl_weight)
        assert weights["lb"] == pytest.approx(lb_weight)
        lb_weight *= 0.9 if epoch % 10 == 0 else 1
        kl_weight *= 0.5 if epoch % 30 == 0 else 1
    assert module.stage3_weights(100)["route"] == pytest.approx(1 / 16)


# ---- MST stage 2 ----------------------------------------------------------------------------
def test_stage2_loss_reaches_only_the_active_masknet(tmp_path):
    module = chain(tmp_path, 2, cm_layers=["fc1", "encoder.conv1"])
    assert isinstance(module.masknets[3], MaskNet2d)  # the conv1d map (8, 12)
    x_m1, x_m2, _ = paired_data(8)
    student = module.student(x_m1)
    for j in range(4):
        loss = module.mask_loss(j, x_m1, x_m2, student)
        assert _grads(loss, module.masknets[j].parameters()) > 0
        others = [p for i, m in enumerate(module.masknets) if i != j for p in m.parameters()]
        assert _grads(loss, others) == 0
    frozen = [*module.mm_teacher.parameters(), *module.cm_teacher.parameters()]
    assert all(not p.requires_grad for p in frozen + list(module.student.parameters()))


# ---- the three stages through Lightning and checkpoints ----------------------------------------
def _fit(module, root, epochs=1):
    trainer = quiet_trainer(root, max_epochs=epochs, enable_checkpointing=False)
    trainer.fit(module, loader(), loader())
    return trainer


def _state(module, *networks):
    """Copies of the state of these sub-networks (``mm_teacher``, ``masknets``, ...)."""
    return {k: v.clone() for k, v in module.state_dict().items() if k.split(".")[0] in networks}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed(before, after):
    """The sub-networks (and MaskNet indices) with a tensor that changed."""
    return {
        ".".join(k.split(".")[:2]) if k.startswith("masknets") else k.split(".")[0]
        for k in before
        if not torch.equal(before[k], after[k])
    }


BASE = ("mm_teacher", "cm_teacher", "student")


def test_three_stages_chain_through_checkpoints(tmp_path):
    torch.manual_seed(0)
    kwargs = {"target_modality": 1, "cm_layers": ["fc1", "encoder.fc1"]}
    stage1 = MSTDistill(stage=1, **ARCH, **kwargs)
    trainer = _fit(stage1, tmp_path)
    assert {"val/top1", "val/top1_mm", "val/top1_cm", "train/loss_student"} <= set(
        trainer.callback_metrics
    )
    trainer.save_checkpoint(tmp_path / "s1.ckpt")
    parts = {
        k.split(".")[0] for k in torch.load(tmp_path / "s1.ckpt", weights_only=True)["state_dict"]
    }
    assert parts == {"mm_teacher", "cm_teacher", "student"}

    stage2 = MSTDistill(stage=2, init_from=str(tmp_path / "s1.ckpt"), **ARCH, **kwargs)
    assert _same(_state(stage2, *BASE), _state(stage1, *BASE))  # loaded from stage 1
    before = _state(stage2, *BASE, "masknets")
    trainer = _fit(stage2, tmp_path)
    assert "val/mask_loss" in trainer.callback_metrics
    changed = _changed(before, _state(stage2, *BASE, "masknets"))
    assert changed == {f"masknets.{j}" for j in range(4)}  # every MaskNet trained, nothing else
    trainer.save_checkpoint(tmp_path / "s2.ckpt")

    stage3 = MSTDistill(stage=3, init_from=str(tmp_path / "s2.ckpt"), **ARCH, **kwargs)
    assert _same(_state(stage3, *BASE, "masknets"), _state(stage2, *BASE, "masknets"))
    before = _state(stage3, *BASE, "masknets", "gate")
    trainer = _fit(stage3, tmp_path, epochs=2)
    assert {"val/ce", "train/loss_route", "train/loss_lb", "train/route_share_0"} <= set(
        trainer.callback_metrics
    )
    assert stage3.loss_weights == {"ce": 1.0, "route": 0.5, "lb": pytest.approx(0.9)}
    assert _changed(before, _state(stage3, *BASE, "masknets", "gate")) == {"student", "gate"}
    assert stage3.mm_teacher.training is False and stage3.masknets.training is False

    # The deployed student is usable alone from its `student.` keys.
    trainer.save_checkpoint(tmp_path / "s3.ckpt")
    state = torch.load(tmp_path / "s3.ckpt", weights_only=True)["state_dict"]
    alone = UnimodalNet(ARCH["encoders"][1], SHAPES[1], K, ARCH["head_hidden"]).eval()
    alone.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
    x_m2 = paired_data(4)[1]
    torch.testing.assert_close(alone(x_m2), stage3.eval()(x_m2))


# ---- baselines ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Checkpoints of a fusion teacher and of a net on each modality (PairedSupervised)."""
    root = tmp_path_factory.mktemp("paired_teachers")
    paths = {}
    for network in ("fusion", "m1", "m2"):
        torch.manual_seed(0)
        module = PairedSupervised(network=network, **ARCH)
        trainer = quiet_trainer(root, max_epochs=1, enable_checkpointing=False)
        trainer.fit(module, loader(), loader())
        trainer.save_checkpoint(root / f"{network}.ckpt")
        paths[network] = str(root / f"{network}.ckpt")
    return paths


@pytest.mark.parametrize("teacher", ["fusion", "m2"])
def test_crossmodal_kd_from_a_frozen_teacher(teachers, teacher, tmp_path):
    module = CrossModalKD(teacher={"weights": teachers[teacher]}, target_modality=0, **ARCH)
    batch = paired_data(6)
    x_m1, x_m2, _ = batch
    inputs = (x_m1, x_m2) if teacher == "fusion" else (x_m2,)
    terms = module.loss_terms(batch)
    with torch.no_grad():
        student, t = module.student(x_m1).double(), module.teacher(*inputs).double()
    log_s, log_t = (student / 4).log_softmax(-1), (t / 4).log_softmax(-1)
    kd = 16 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-4)
    assert module.loss_weights == {"ce": 0.5, "kd": 0.5}
    teacher_state = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = _fit(module, tmp_path)
    assert not module.teacher.training
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher_state.items())
    trainer.save_checkpoint(tmp_path / "kd.ckpt")
    keys = torch.load(tmp_path / "kd.ckpt", weights_only=True)["state_dict"]
    assert keys and all(k.startswith("student.") for k in keys)
    # The teacher is rebuilt from the plain `teacher` hyper-parameters on load.
    restored = CrossModalKD.load_from_checkpoint(tmp_path / "kd.ckpt")
    assert isinstance(restored.teacher, Teacher)
    assert restored.hparams.teacher == {"weights": teachers[teacher], "cache": None}
    with torch.no_grad():
        torch.testing.assert_close(restored.teacher(*inputs), module.teacher(*inputs))


def test_crossmodal_teacher_is_a_frozen_teacher(teachers):
    module = CrossModalKD(teacher={"weights": teachers["fusion"]}, target_modality=0, **ARCH)
    module.train()
    assert isinstance(module.teacher, Teacher) and module.student.training
    assert all(not m.training for m in module.teacher.modules())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not [k for k in module.state_dict() if k.startswith("teacher.")]
    x_m1, x_m2, _ = paired_data(4)
    assert not module.teacher(x_m1, x_m2).requires_grad  # no autograd, even when enabled


def test_crossmodal_kd_old_teacher_weights_argument_names_the_new_one(teachers):
    with pytest.raises(ConfigError, match="teacher_weights is now teacher"):
        CrossModalKD(teacher_weights=teachers["fusion"], target_modality=0, **ARCH)


# ---- errors -----------------------------------------------------------------------------------
def test_crossmodal_kd_rejects_a_teacher_for_the_wrong_modality_or_shape(teachers):
    with pytest.raises(ConfigError, match="the student's own modality"):
        CrossModalKD(teacher={"weights": teachers["m1"]}, target_modality=0, **ARCH)
    other = {**ARCH, "modality_shapes": [(10,), (2, 20)]}
    with pytest.raises(ConfigError, match=r"shapes .* but the data has"):
        CrossModalKD(teacher={"weights": teachers["m2"]}, target_modality=0, **other)


def test_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="top_k=5 must be between 1 and the number of experts, 4"):
        MSTDistill(top_k=5, **ARCH)
    with pytest.raises(ConfigError, match="gate_weighted' needs top_k >= 2"):
        MSTDistill(routing="gate_weighted", **ARCH)
    with pytest.raises(ConfigError, match="set init_from"):
        MSTDistill(stage=2, **ARCH)
    stage1 = save(MSTDistill(**ARCH), tmp_path / "s1.pt")
    with pytest.raises(ConfigError, match="from scratch: remove init_from"):
        MSTDistill(stage=1, init_from=stage1, **ARCH)
    with pytest.raises(ConfigError, match="starts from the checkpoint of stage 2"):
        MSTDistill(stage=3, init_from=stage1, **ARCH)
    with pytest.raises(ConfigError, match="target_modality: 0 vs 1"):
        MSTDistill(stage=2, init_from=stage1, target_modality=1, **ARCH)
    with pytest.raises(ConfigError, match=r"head_hidden: \[12, 6\] vs \[12, 5\]"):
        MSTDistill(stage=2, init_from=stage1, **{**ARCH, "head_hidden": [12, 5]})
    with pytest.raises(ConfigError, match="network must be one of"):
        PairedSupervised(network="audio", **ARCH)


def test_unpaired_batch_says_the_data_must_be_paired():
    module = MSTDistill(**ARCH)
    x_m1, _, y = paired_data(4)
    with pytest.raises(ConfigError, match="must be a paired-modality datamodule"):
        module.loss_terms((x_m1, y))
    with pytest.raises(ConfigError, match="paired-modality"):
        PairedSupervised(network="m1", **ARCH).validation_step([x_m1, y], 0)
