"""Segmentation methods: LAD's label encoding and teacher loss, SegKD's teacher, and FST's
numerical properties (spec ``segmentation.md`` section 3, oracles L2, L4, F1-F4)."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset
from trainer_helpers import quiet_trainer

from kdzoo.errors import ConfigError
from kdzoo.methods.segmentation import FST, LADTeacher, SegKD, SegSupervised, encode_labels
from kdzoo.methods.segmentation import lad as lad_module
from kdzoo.models.weights import WeightsError

C = 4
ARCH = {"student": "test_resnet", "num_classes": C, "head": "fcn", "output_stride": 8}


def _images_and_masks(n: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = torch.randint(0, C, (n, size, size), generator=g)
    masks[:, :3] = 255  # an ignored band
    return images, masks


# ---- LAD label encoding (oracle L2) -------------------------------------------------------------
def test_random_encoding_is_piecewise_constant_one_value_per_slot():
    _, masks = _images_and_masks()
    channel = encode_labels(masks, C, mode="random", sigma=0.0, scale=1.0)
    assert channel.shape == (4, 1, 32, 32)
    for n in range(4):
        slots = torch.unique(masks[n])
        values = torch.unique(channel[n, 0])
        assert len(values) == len(slots)  # ignore (255) is its own region
        for slot in slots:
            assert torch.unique(channel[n, 0][masks[n] == slot]).numel() == 1


def test_random_values_differ_between_images_and_draws():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    first = encode_labels(masks, C, mode="random", sigma=0.0, scale=1.0)
    second = encode_labels(masks, C, mode="random", sigma=0.0, scale=1.0)
    assert first[0, 0, 0, 0] != first[1, 0, 0, 0]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("num_classes,offset", [(21, 11), (19, 10), (4, 2)])
def test_fixed_encoding_decodes_exactly(num_classes, offset):
    # VOC: 22 slots, c0 = 11 (the code's constant); Cityscapes: 20 slots, c0 = 10.
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, num_classes, (2, 16, 16), generator=g)
    masks[0, 0] = 255
    scale = 100.0
    channel = encode_labels(masks, num_classes, mode="fixed", sigma=0.0, scale=scale)[:, 0]
    slots = torch.where(masks == 255, num_classes, masks)
    decoded = torch.round(channel / (scale / 10.0)).long() + offset
    assert torch.equal(decoded, slots)


def test_noisy_encoding_statistics():
    masks = torch.zeros(1, 200, 200, dtype=torch.long)
    masks[0, 100:] = 1
    g = torch.Generator().manual_seed(0)
    channel = encode_labels(masks, 2, mode="fixed", sigma=0.03, scale=2.0, generator=g)[0, 0] / 2.0
    for slot, value in ((0, (0 - 1) / 10), (1, (1 - 1) / 10)):
        region = channel[masks[0] == slot]
        assert region.mean().item() == pytest.approx(value, abs=1e-3)
        assert region.std().item() == pytest.approx(0.03, rel=0.05)


def test_encoding_rejects_ids_outside_the_classes():
    masks = torch.full((1, 4, 4), 7)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        encode_labels(masks, C, mode="fixed", sigma=0.0, scale=1.0)


# ---- LAD teacher (oracle L4) --------------------------------------------------------------------
def test_lad_teacher_has_a_label_channel_and_deploys_on_images():
    model = LADTeacher(**ARCH)
    assert model.student.in_chans == 4
    images, _ = _images_and_masks()
    assert model(images).shape == (4, C, 32, 32)  # 3 channels: a zero label channel is added


def test_identical_paths_give_zero_consistency_and_twice_the_single_path_loss(monkeypatch):
    model = LADTeacher(**ARCH, train_sigma=0.0).eval()
    images, masks = _images_and_masks()
    # Both paths get the same (fixed, noiseless) encoding.
    fixed = partial(encode_labels, mode="fixed", sigma=0.0, scale=1.7)
    monkeypatch.setattr(
        lad_module, "encode_labels", lambda m, c, **kw: fixed(m, c, ignore_index=255)
    )
    terms = model.loss_terms((images, masks))
    assert terms["consistency"].abs().item() < 1e-6
    channel = fixed(masks, C, ignore_index=255)
    output = model.student(torch.cat([images, channel], dim=1))
    ce = F.cross_entropy(
        F.interpolate(output.logits, size=(32, 32), mode="bilinear"), masks, ignore_index=255
    )
    aux = F.cross_entropy(
        F.interpolate(output.aux, size=(32, 32), mode="bilinear"), masks, ignore_index=255
    )
    assert terms["ce"].item() == pytest.approx(2 * ce.item(), rel=1e-5)
    assert terms["aux"].item() == pytest.approx(2 * aux.item(), rel=1e-5)
    weights = model.loss_weights
    assert (weights["ce"], weights["aux"], weights["consistency"]) == (1.0, 0.4, 5.0)


def test_consistency_gives_gradients_to_both_paths():
    model = LADTeacher(**ARCH)
    images, masks = _images_and_masks()
    terms = model.loss_terms((images, masks))
    assert terms["consistency"].item() > 0
    terms["consistency"].backward()
    first_conv = next(m for m in model.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad[:, 3].abs().sum() > 0  # the label channel is used


# ---- SegKD from a plain and from a label-assisted teacher ----------------------------------------
def _save_checkpoint(model, path):
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return str(path)


def test_segkd_feeds_a_lad_teacher_the_fixed_encoding(tmp_path):
    lad = LADTeacher(**ARCH, label_scale=3.0)
    weights = _save_checkpoint(lad, tmp_path / "lad.ckpt")
    student = SegKD(teacher={"weights": weights}, **ARCH)
    assert student.teacher_label_channels == 1
    assert student.teacher_label_scale == 3.0
    images, masks = _images_and_masks()
    expected_input = torch.cat(
        [images, encode_labels(masks, C, mode="fixed", sigma=0.0, scale=3.0)], dim=1
    )
    student.hparams.teacher_label_sigma = 0.0
    lad.eval()
    expected = lad.student(expected_input).logits
    assert torch.allclose(student.teacher_logits(images, masks), expected, atol=1e-5)
    terms = student.loss_terms((images, masks))
    assert set(terms) == {"ce", "aux", "kd"} and all(torch.isfinite(v) for v in terms.values())
    # The teacher is rebuilt from the config: never in the student's checkpoint.
    assert not any(k.startswith("teacher.") for k in student.state_dict())


def test_segkd_from_a_plain_teacher_and_pixel_kd(tmp_path):
    teacher = SegSupervised(**{**ARCH, "head": "deeplabv3", "output_stride": 16})
    weights = _save_checkpoint(teacher, tmp_path / "plain.ckpt")
    student = SegKD(teacher={"weights": weights}, kd_loss="pixel_kd", **ARCH)
    assert student.teacher_label_channels == 0
    images, masks = _images_and_masks()
    terms = student.loss_terms((images, masks))  # teacher logits at 1/16 resized to the student's
    assert torch.isfinite(terms["kd"])
    terms["kd"].backward()
    assert all(p.grad is None for p in student.teacher.parameters())


def test_segkd_refuses_a_teacher_for_other_classes(tmp_path):
    teacher = SegSupervised(**{**ARCH, "num_classes": 7})
    weights = _save_checkpoint(teacher, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="7 classes but the data has 4"):
        SegKD(teacher={"weights": weights}, **ARCH)


def test_segkd_teacher_weights_that_do_not_fit_name_the_keys(tmp_path):
    teacher = SegSupervised(**{**ARCH, "head": "fcn"})
    weights = _save_checkpoint(teacher, tmp_path / "fcn.ckpt")
    architecture = {"backbone": "test_resnet", "head": "psp", "output_stride": 8}
    with pytest.raises(WeightsError) as info:
        SegKD(teacher={"weights": weights, "architecture": architecture}, **ARCH)
    message = str(info.value)
    for fragment in (f"teacher weights {weights} do not fit", "test_resnet + psp", "missing keys"):
        assert fragment in message, message
    assert "Was it trained with this architecture?" in message


def test_supervised_refuses_unlabelled_batches():
    model = SegSupervised(**ARCH)
    images, masks = _images_and_masks()
    with pytest.raises(ConfigError, match="unlabelled"):
        model.loss_terms({"labelled": (images, masks), "unlabelled": images})


# ---- FST ----------------------------------------------------------------------------------------
def _semi_loader(steps: int = 1, future: int = 0, batch: int = 4):
    images, masks = _images_and_masks(n=batch * steps)
    unlabelled, _ = _images_and_masks(n=batch * steps, seed=1)

    def loader(*tensors):
        return DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=False)

    iterables = {"labelled": loader(images, masks), "unlabelled": loader(unlabelled)}
    if future:
        iterables["future"] = [
            {"labelled": loader(images.flip(0), masks.flip(0)), "unlabelled": loader(unlabelled)}
            for _ in range(future)
        ]
    return CombinedLoader(iterables, mode="max_size_cycle")


def _fst(**kwargs):
    args = {
        **ARCH,
        "dropout": 0.0,
        "optimizer": partial(torch.optim.SGD, lr=kwargs.pop("lr", 0.05), momentum=0.9),
        **kwargs,
    }
    return FST(**args)


def _fit(model, loader, steps: int = 1):
    L.seed_everything(0)
    # Nothing is written: no logger, no checkpoints.
    trainer = quiet_trainer(".", max_steps=steps, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("mode,k,updates", [("deep", 3, 4), ("deep", 0, 1), ("wide", 3, 2)])
def test_zero_lr_teacher_moves_by_a_power_k(mode, k, updates):
    """F2: with lr = 0 every virtual student equals theta_t, so after one iteration the teacher
    is a^u phi_0 + (1 - a^u) theta with u = K + 1 (deep), 2 (wide)."""
    a = 0.9
    model = _fst(mode=mode, k_steps=k, ema_momentum=a, ema_warmup=False, lr=0.0)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5)
    phi0, theta = _params(model.teacher), _params(model.student)
    _fit(model, _semi_loader(future=3 if mode == "wide" else 0))
    assert model.global_step == 1  # virtual steps are not counted as iterations
    for p, p0, t in zip(model.teacher.parameters(), phi0, theta, strict=True):
        expected = a**updates * p0 + (1 - a**updates) * t
        assert torch.allclose(p, expected, atol=1e-6)
    assert torch.equal(_params(model.student)[0], theta[0])  # lr 0: the student never moved


@pytest.mark.parametrize("mode", ["deep", "wide"])
@pytest.mark.parametrize("restore_optimizer", [False, True])
def test_restore_is_exact(monkeypatch, mode, restore_optimizer):
    """F3: right after the restore the student's parameters equal the snapshot bit for bit (and
    the optimiser state its pre-loop value with restore_optimizer_state)."""
    model = _fst(mode=mode, k_steps=2, restore_optimizer_state=restore_optimizer)
    seen = []
    original_snapshot, original_restore = model._snapshot, model._restore

    def snapshot():
        state = original_snapshot()
        seen.append(
            {
                "params": _params(model.student),
                "optimizer": copy.deepcopy(model.optimizers().optimizer.state_dict()),
            }
        )
        return state

    def restore(state):
        original_restore(state)
        for p, q in zip(model.student.parameters(), seen[-1]["params"], strict=True):
            assert torch.equal(p, q)
        optimizer_state = model.optimizers().optimizer.state_dict()["state"]
        before = seen[-1]["optimizer"]["state"]
        if restore_optimizer:
            assert optimizer_state.keys() == before.keys()
            for key, value in before.items():
                assert torch.equal(
                    optimizer_state[key]["momentum_buffer"], value["momentum_buffer"]
                )
        else:  # the official code keeps the advanced optimiser state
            assert optimizer_state.keys() != before.keys() or any(
                not torch.equal(optimizer_state[k]["momentum_buffer"], v["momentum_buffer"])
                for k, v in before.items()
            )
        seen[-1]["restored"] = True

    monkeypatch.setattr(model, "_snapshot", snapshot)
    monkeypatch.setattr(model, "_restore", restore)
    _fit(model, _semi_loader(steps=2, future=2 if mode == "wide" else 0), steps=2)
    assert len(seen) == 2 and all(s.get("restored") for s in seen)
    # The real step then moved the student away from the snapshot.
    assert not torch.equal(_params(model.student)[0], seen[-1]["params"][0])


def test_k_zero_is_the_mean_teacher():
    """F1: FST-D with K = 0 follows a reference mean-teacher loop written here: EMA with
    theta_t, then one SGD step on CE(labelled) + quality-weighted CE(teacher pseudo-labels)."""
    a, lr, steps = 0.9, 0.05, 3
    model = _fst(k_steps=0, ema_momentum=a, ema_warmup=False, threshold=0.3)
    student, teacher = copy.deepcopy(model.student), copy.deepcopy(model.teacher)
    _fit(model, _semi_loader(steps=steps), steps=steps)

    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    images, masks = _images_and_masks(n=4 * steps)
    unlabelled, _ = _images_and_masks(n=4 * steps, seed=1)
    student.train()
    for i in range(steps):
        x, y, u = (t[4 * i : 4 * (i + 1)] for t in (images, masks, unlabelled))
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
                pt.mul_(a).add_(ps, alpha=1 - a)
            teacher.train()
            probs = F.interpolate(teacher(u).logits, size=(32, 32), mode="bilinear").softmax(1)
            confidence, labels = probs.max(1)
        out = student(x)
        up = partial(F.interpolate, size=(32, 32), mode="bilinear")
        loss = F.cross_entropy(up(out.logits), y, ignore_index=255)
        loss = loss + 0.4 * F.cross_entropy(up(out.aux), y, ignore_index=255)
        quality = (confidence >= 0.3).float().mean()
        loss = loss + quality * F.cross_entropy(up(student(u).logits), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p, q in zip(model.student.parameters(), student.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)
    for p, q in zip(model.teacher.parameters(), teacher.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_frozen_teacher_with_exact_restore_equals_the_baseline():
    """F4: with alpha = 1 the teacher never moves; with the optimiser state and BN buffers
    restored, FST-D's student follows the K = 0 trajectory exactly."""
    common = {"ema_momentum": 1.0, "ema_warmup": False, "threshold": 0.3}
    fst = _fst(k_steps=3, restore_optimizer_state=True, restore_bn_buffers=True, **common)
    base = _fst(k_steps=0, **common)
    base.load_state_dict(fst.state_dict())
    _fit(fst, _semi_loader(steps=2), steps=2)
    _fit(base, _semi_loader(steps=2), steps=2)
    for p, q in zip(fst.student.parameters(), base.student.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    for p, q in zip(fst.teacher.parameters(), base.teacher.parameters(), strict=True):
        assert torch.equal(p, q)


def test_official_mode_differs_from_the_baseline():
    common = {"ema_momentum": 1.0, "ema_warmup": False, "threshold": 0.3}
    fst, base = _fst(k_steps=3, **common), _fst(k_steps=0, **common)
    base.load_state_dict(fst.state_dict())
    _fit(fst, _semi_loader(steps=2), steps=2)
    _fit(base, _semi_loader(steps=2), steps=2)
    assert not torch.allclose(
        fst.student.backbone_parameters()[0], base.student.backbone_parameters()[0]
    )


def test_fst_needs_unlabelled_data_and_future_batches():
    images, masks = _images_and_masks()
    with pytest.raises(ConfigError, match="unlabelled"):
        _fit(_fst(k_steps=1), DataLoader(TensorDataset(images, masks), batch_size=4))
    with pytest.raises(ConfigError, match="future_batches=3"):
        _fit(_fst(mode="wide", k_steps=3), _semi_loader())
    with pytest.raises(ConfigError, match="k_steps"):
        _fst(mode="wide", k_steps=0)


def test_ema_warmup_counts_updates():
    model = _fst(k_steps=3, ema_momentum=0.99)
    assert model.momentum() == 0.0  # a_0 = min(1 - 1/1, alpha): the first update copies
    _fit(model, _semi_loader())
    assert int(model.ema_updates) == 4
    assert model.momentum() == pytest.approx(1 - 1 / 5)
    assert "ema_updates" in model.state_dict()  # resumes continue the warm-up
