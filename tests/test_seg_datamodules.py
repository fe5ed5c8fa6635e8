"""Tests for the segmentation DataModules on tiny fake datasets written in the real layouts.

Every reference below (label tables, reduce_zero_label, the expected crops) is written here from
the dataset documentation (kdzoo spec ``segmentation.md`` §5), never by calling the code under
test.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image

from kdzoo.datamodules import (
    ADE20K,
    GTA5,
    Cityscapes,
    DataError,
    DatasetNotFoundError,
    FashionMNISTMosaics,
    PascalVOC,
)
from kdzoo.errors import KDZooError

# Cityscapes labelId -> trainId, from cityscapesscripts' labels.py (spec §5.1).
CS_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
H, W = 32, 48


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path):
    # Neither the user's $KDZOO_DATA nor their ~/.cache/kdzoo may leak into a test.
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# -- fake datasets ---------------------------------------------------------------------------------


def save(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is None:
        image = Image.fromarray(array)
    else:  # a palette PNG: indices plus a colour table
        image = Image.new("P", (array.shape[1], array.shape[0]))
        image.putdata(array.ravel().tolist())
        image.putpalette(palette)
    image.save(path)


def rgb(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_cityscapes(root: Path, train_ids: bool = False, n_train: int = 3, n_val: int = 2) -> dict:
    """Returns {split: [raw masks]} in file order (sorted names)."""
    rng = np.random.default_rng(0)
    ids = np.array([0, 1, 7, 8, 11, 21, 26, 33, 4, 255], dtype=np.uint8)  # some ignored ids
    masks = {}
    for split, n in (("train", n_train), ("val", n_val)):
        masks[split] = []
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bochum"
            stem = f"{city}_{i:06d}_000019"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(rng))
            raw = rng.choice(ids, (H, W))
            labels = root / "gtFine" / split / city
            save(labels / f"{stem}_gtFine_labelIds.png", raw)
            if train_ids:
                mapped = np.vectorize(lambda v: CS_TRAIN_ID.get(int(v), 255))(raw)
                save(labels / f"{stem}_gtFine_labelTrainIds.png", mapped.astype(np.uint8))
            masks[split].append((stem, raw))
    # File order of the datamodule: sorted paths (city folder, then name).
    return {s: [m for _, m in sorted(v, key=lambda t: (t[0].split("_")[0], t[0]))]
            for s, v in masks.items()}  # fmt: skip


def cs_reference(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.int64)
    for label_id, train_id in CS_TRAIN_ID.items():
        out[raw == label_id] = train_id
    return out


def write_ade(root: Path, n: int = 2, values=(0, 1, 2, 150, 255)) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    base = root / "ADEChallengeData2016"
    masks = []
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(n):
            name = f"ADE_{prefix}_{i:08d}"
            save(base / "images" / split / f"{name}.jpg", rgb(rng))
            raw = rng.choice(np.array(values, dtype=np.uint8), (H, W))
            save(base / "annotations" / split / f"{name}.png", raw)
            if split == "validation":
                masks.append(raw)
    return masks


# VOC's palette: index k gets a colour whose luminance is NOT k, so convert("L") would break it.
VOC_PALETTE = [v for k in range(256) for v in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)]


def write_voc(root: Path, aug_name: str | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    voc = root / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033", "2007_000042"]}
    masks = {}
    for keys in ids.values():
        for key in keys:
            save(voc / "JPEGImages" / f"{key}.jpg", rgb(rng))
            raw = rng.choice(np.array([0, 1, 15, 20, 255], dtype=np.uint8), (H, W))
            save(voc / "SegmentationClass" / f"{key}.png", raw, palette=VOC_PALETTE)
            masks[key] = raw
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, keys in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(keys) + "\n")
    if aug_name:
        # Two SBD-only ids with grey SegmentationClassAug masks, plus the VOC train ids.
        for key in ("2008_000002", "2008_000003"):
            save(voc / "JPEGImages" / f"{key}.jpg", rgb(rng))
            raw = rng.choice(np.array([0, 7, 12], dtype=np.uint8), (H, W))
            save(voc / "SegmentationClassAug" / f"{key}.png", raw)
            masks[key] = raw
        aug_ids = ["2007_000032", "2007_000039", "2008_000002", "2008_000003"]
        (sets / aug_name).write_text("\n".join(aug_ids) + "\n")
    return masks


def write_gta(root: Path, n: int = 4, train_ids: set[int] = frozenset()) -> dict[str, np.ndarray]:
    """Frames ``00001..``; the frames in ``train_ids`` also get a *_labelTrainIds.png."""
    rng = np.random.default_rng(3)
    masks = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        save(root / "images" / f"{name}.png", rgb(rng))
        raw = rng.choice(np.array([0, 7, 26, 33, 3], dtype=np.uint8), (H, W))
        save(root / "labels" / f"{name}.png", raw)
        if i in train_ids:
            # A trainIds file deliberately unlike the mapping, to see which one is read.
            save(root / "labels" / f"{name}_labelTrainIds.png", np.full((H, W), 5, np.uint8))
        masks[name] = raw
    return masks


def unnormalise(x: torch.Tensor, dm) -> np.ndarray:
    """Back to 0..255 N x H x W x C."""
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def eval_masks(dm) -> list[np.ndarray]:
    return [y[0].numpy() for _, y in dm.val_dataloader()]


# -- contract ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "num_classes", "first", "last"),
    [
        (Cityscapes, 19, "road", "bicycle"),
        (ADE20K, 150, "wall", "flag"),
        (PascalVOC, 21, "background", "tvmonitor"),
        (GTA5, 19, "road", "bicycle"),
        (FashionMNISTMosaics, 11, "background", "Ankle boot"),
    ],
)
def test_properties_before_setup(cls, num_classes, first, last):
    # No data at this root: the CLI links these properties before setup() runs.
    dm = cls(root="/nonexistent/kdzoo")
    names = dm.class_names
    assert dm.num_classes == num_classes == len(names) == len(set(names))
    assert (names[0], names[-1]) == (first, last)
    assert dm.in_chans == 3 and dm.ignore_index == 255
    assert len(dm.mean) == len(dm.std) == 3 and min(dm.std) > 0 and max(dm.mean) < 1
    assert dm.train is None


def test_cityscapes_defaults_to_the_mmseg_crop():
    assert Cityscapes().crop_size == (512, 1024)
    assert ADE20K(crop_size=[256, 320]).crop_size == (256, 320)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1"),
        ({"crop_size": 0}, r"crop_size must be an integer >= 1 or \[height, width\]"),
        ({"crop_size": [10, 20, 30]}, "crop_size must be"),
        ({"eval_size": [0, 4]}, "eval_size must be"),
        ({"scale_range": (2.0, 1.0)}, "scale_range must be"),
        ({"future_batches": -1}, "future_batches must be an integer >= 0"),
        ({"unlabelled": True}, "unlabelled=True needs labelled_list"),
        ({"future_batches": 2}, "future_batches=2 needs unlabelled data"),
        ({"labelled_list": "/nonexistent/list.txt"}, "labelled_list /nonexistent/list.txt"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        GTA5(**kwargs)


def test_missing_data_says_where_kdzoo_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDZOO_DATA", str(tmp_path / "data"))
    dm = Cityscapes()
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert isinstance(info.value, KDZooError)
    assert str(tmp_path / "data" / "cityscapes") in message
    assert str(tmp_path / "home" / ".cache" / "kdzoo" / "data" / "cityscapes") in message
    assert "leftImg8bit" in message and "gtFine" in message
    assert "cityscapes-dataset.com" in message and "never downloads" in message
    with pytest.raises(DatasetNotFoundError, match="ADEChallengeData2016"):
        ADE20K(root=str(tmp_path)).prepare_data()


# -- readers and label conventions -------------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    raw = write_cityscapes(tmp_path)
    dm = Cityscapes(root=str(tmp_path), crop_size=16, batch_size=2)
    dm.setup("fit")
    assert (len(dm.train), len(dm.val), len(dm.test)) == (3, 2, 2)  # test is the val split
    assert dm.val.items[0].relpath.startswith("leftImg8bit/val/aachen/")
    for got, expected in zip(eval_masks(dm), raw["val"], strict=True):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, cs_reference(expected))


def test_cityscapes_prefers_train_id_files(tmp_path):
    raw = write_cityscapes(tmp_path, train_ids=True)
    dm = Cityscapes(root=str(tmp_path), crop_size=16, batch_size=2)
    dm.setup("fit")
    assert all(item.mask.name.endswith("_gtFine_labelTrainIds.png") for item in dm.val.items)
    for got, expected in zip(eval_masks(dm), raw["val"], strict=True):
        np.testing.assert_array_equal(got, cs_reference(expected))


def test_ade20k_reduce_zero_label(tmp_path):
    raw = write_ade(tmp_path)
    dm = ADE20K(root=str(tmp_path), crop_size=16, batch_size=2)  # found via the layout
    dm.setup("fit")
    for got, expected in zip(eval_masks(dm), raw, strict=True):
        reference = expected.astype(np.int64) - 1
        reference[(expected == 0) | (expected == 255)] = 255
        np.testing.assert_array_equal(got, reference)
        assert set(np.unique(got)) <= {0, 1, 149, 255}


def test_voc_reads_palette_indices_and_keeps_255(tmp_path):
    raw = write_voc(tmp_path)
    # The palette PNG really is a palette PNG whose luminance differs from its indices.
    png = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    with Image.open(png) as image:
        assert image.mode == "P"
        assert not np.array_equal(np.asarray(image.convert("L")), raw["2007_000033"])
    dm = PascalVOC(root=str(tmp_path), crop_size=16, batch_size=2)
    dm.setup("fit")
    assert [item.key for item in dm.train.items] == ["2007_000032", "2007_000039"]
    for got, key in zip(eval_masks(dm), ["2007_000033", "2007_000042"], strict=True):
        np.testing.assert_array_equal(got, raw[key])
        assert 255 in got


@pytest.mark.parametrize("aug_name", ["trainaug.txt", "train_aug.txt"])
def test_voc_trainaug_uses_segmentation_class_aug(tmp_path, aug_name):
    raw = write_voc(tmp_path, aug_name=aug_name)
    dm = PascalVOC(root=str(tmp_path / "VOCdevkit"), aug=True, crop_size=16, batch_size=2)
    dm.setup("fit")
    items = dm.train.items
    assert [item.key for item in items] == [
        "2007_000032", "2007_000039", "2008_000002", "2008_000003"
    ]  # fmt: skip
    # SBD ids read SegmentationClassAug; VOC train ids fall back to SegmentationClass.
    assert [item.mask.parent.name for item in items] == ["SegmentationClass"] * 2 + [
        "SegmentationClassAug"
    ] * 2
    dm.train.transform = dm.val.transform  # read the training masks without augmentation
    for i, item in enumerate(items):
        np.testing.assert_array_equal(dm.train[i][1].numpy(), raw[item.key])


def test_voc_aug_without_list_is_a_clear_error(tmp_path):
    write_voc(tmp_path)
    with pytest.raises(DataError, match=r"aug=True needs trainaug.txt or train_aug.txt.*voc_aug"):
        PascalVOC(root=str(tmp_path / "VOCdevkit/VOC2012"), aug=True).setup("fit")


def test_gta5_both_label_variants_and_seeded_split(tmp_path):
    raw = write_gta(tmp_path, n=6, train_ids={2})
    dm = GTA5(root=str(tmp_path), val_fraction=0.5, crop_size=16, batch_size=2)
    dm.setup("fit")
    train = [item.key for item in dm.train.items]
    val = [item.key for item in dm.val.items]
    assert len(val) == 3 and sorted(train + val) == sorted(raw)
    assert [item.key for item in dm.test.items] == val
    # The same split every time, another with another seed.
    again = GTA5(root=str(tmp_path), val_fraction=0.5)
    assert [item.key for item in again.load_split("val")] == val
    other = {tuple(i.key for i in GTA5(root=str(tmp_path), val_fraction=0.5, split_seed=s)
                   .load_split("val")) for s in range(6)}  # fmt: skip
    assert len(other) > 1
    # Every frame: the trainIds file when present, else labelIds mapped to trainIds.
    full = GTA5(root=str(tmp_path), val_fraction=0.5, eval_batch_size=1)
    frames = {item.key: item for item in full.load_split("train") + full.load_split("val")}
    full.setup("fit")
    for dataset in (full.train, full.val):
        dataset.transform = full.val.transform
        for i, item in enumerate(dataset.items):
            mask = dataset[i][1].numpy()
            expected = np.full((H, W), 5) if item.key == "00002" else cs_reference(raw[item.key])
            np.testing.assert_array_equal(mask, expected)
            assert frames[item.key].mask == item.mask


# -- batches and augmentation ------------------------------------------------------------------


def test_batch_shapes_and_dtypes(tmp_path):
    write_cityscapes(tmp_path)
    dm = Cityscapes(root=str(tmp_path), crop_size=[24, 40], batch_size=2, eval_batch_size=2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 24, 40) and x.dtype == torch.float32
    assert y.shape == (2, 24, 40) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= {*range(19), 255}
    assert len(dm.train_dataloader()) == 1  # 3 items, batch 2: the incomplete batch is dropped
    x, y = next(iter(dm.val_dataloader()))  # no crop: the stored size
    assert x.shape == (2, 3, H, W) and y.shape == (2, H, W) and y.dtype == torch.int64
    xp, _ = next(iter(dm.predict_dataloader()))
    torch.testing.assert_close(xp, x)


def test_eval_images_are_the_normalised_pixels(tmp_path):
    write_cityscapes(tmp_path)
    dm = Cityscapes(root=str(tmp_path))
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    with Image.open(dm.val.items[0].image) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(unnormalise(x, dm)[0], pixels, atol=1e-3)


def test_eval_size_resizes_masks_with_nearest(tmp_path):
    raw = write_cityscapes(tmp_path)
    dm = Cityscapes(root=str(tmp_path), eval_size=[16, 24], eval_batch_size=2)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 24) and y.shape == (2, 16, 24)
    # Nearest neighbour on an exact 2x downscale picks stored values, never blends them.
    for got, expected in zip(y.numpy(), raw["val"], strict=True):
        assert set(np.unique(got)) <= set(np.unique(cs_reference(expected)))


def test_images_of_different_sizes_in_one_eval_batch_are_a_clear_error(tmp_path):
    write_cityscapes(tmp_path)
    big = tmp_path / "leftImg8bit/val/bochum/bochum_000001_000019_leftImg8bit.png"
    save(big, rgb(np.random.default_rng(0), 40, 48))
    label = tmp_path / "gtFine/val/bochum/bochum_000001_000019_gtFine_labelIds.png"
    save(label, np.zeros((40, 48), np.uint8))
    dm = Cityscapes(root=str(tmp_path), eval_batch_size=2)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"different sizes.*eval_batch_size=1"):
        next(iter(dm.val_dataloader()))


def test_crop_pads_images_with_zero_and_masks_with_ignore(tmp_path):
    write_gta(tmp_path, n=3)
    dm = GTA5(root=str(tmp_path), val_fraction=0.34, crop_size=[40, 56], batch_size=2,
              augment=False)  # fmt: skip
    dm.setup("fit")
    x, y = dm.train[0]
    item = dm.train.items[0]
    with Image.open(item.image) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    with Image.open(item.mask) as mask:
        expected = cs_reference(np.array(mask))
    # The image sits at the top left; the padding is black (0) and ignored (255).
    np.testing.assert_array_equal(y[:H, :W].numpy(), expected)
    assert (y[H:, :] == 255).all() and (y[:, W:] == 255).all()
    back = unnormalise(x[None], dm)[0]
    np.testing.assert_allclose(back[:H, :W], pixels, atol=1e-3)
    np.testing.assert_allclose(back[H:], 0, atol=1e-3)
    np.testing.assert_allclose(back[:, W:], 0, atol=1e-3)


def test_flip_applies_to_image_and_mask_together(tmp_path):
    # An asymmetric example whose red channel encodes the class of every pixel.
    root = tmp_path / "gta"
    classes = np.tile(np.arange(W) // 8, (H, 1)).astype(np.uint8)  # trainIds 0..5, left to right
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = 40 * classes
    for name in ("00001", "00002", "00003"):
        save(root / "images" / f"{name}.png", image)
        save(root / "labels" / f"{name}_labelTrainIds.png", classes)
    dm = GTA5(root=str(root), val_fraction=0.34, crop_size=[H, W], scale_range=(1.0, 1.0))
    dm.setup("fit")
    flipped = []
    for _ in range(12):
        x, y = dm.train[0]
        red = np.rint(unnormalise(x[None], dm)[0, ..., 0])
        np.testing.assert_array_equal(red, 40 * y.numpy())  # image and mask agree everywhere
        flipped.append(bool(y[0, 0] == 5))
        assert bool(y[0, 0] == 0) != flipped[-1]
    assert any(flipped) and not all(flipped)
    no_flip = GTA5(root=str(root), val_fraction=0.34, crop_size=[H, W], scale_range=(1.0, 1.0),
                   flip=False)  # fmt: skip
    no_flip.setup("fit")
    assert all(int(no_flip.train[0][1][0, 0]) == 0 for _ in range(6))


def test_random_scale_stays_within_range(tmp_path):
    # The crop is larger than any scaled image, so the unpadded width is the scaled width.
    root = tmp_path / "gta"
    classes = np.zeros((H, W), np.uint8)
    for name in ("00001", "00002", "00003"):
        save(root / "images" / f"{name}.png", np.zeros((H, W, 3), np.uint8))
        save(root / "labels" / f"{name}_labelTrainIds.png", classes)
    dm = GTA5(root=str(root), val_fraction=0.34, crop_size=[4 * H, 4 * W],
              scale_range=(0.5, 2.0), flip=False)  # fmt: skip
    dm.setup("fit")
    sizes = []
    for _ in range(20):
        _, y = dm.train[0]
        sizes.append(int((y != 255).sum(dim=0).gt(0).sum()))  # scaled width of the image
    assert min(sizes) >= round(0.5 * W) and max(sizes) <= round(2.0 * W)
    assert max(sizes) - min(sizes) > W // 2  # it really varies


# -- mask checks surface at the first batch ------------------------------------------------------


def test_mask_size_mismatch_names_the_file_and_both_sizes(tmp_path):
    write_cityscapes(tmp_path)
    bad = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    save(bad, np.zeros((H, W - 2), np.uint8))
    dm = Cityscapes(root=str(tmp_path), crop_size=16, batch_size=3, flip=False)
    dm.setup("fit")
    with pytest.raises(DataError) as info:
        next(iter(dm.train_dataloader()))
    message = str(info.value)
    assert str(bad) in message and f"{H}x{W - 2}" in message and f"{H}x{W}" in message


def test_bad_class_ids_name_the_ids_the_file_and_the_fix(tmp_path):
    write_cityscapes(tmp_path, train_ids=True)
    bad = tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    save(bad, np.full((H, W), 26, np.uint8))  # a labelId saved as if it were a trainId
    dm = Cityscapes(root=str(tmp_path))
    dm.setup("fit")
    with pytest.raises(DataError) as info:
        next(iter(dm.val_dataloader()))
    message = str(info.value)
    assert str(bad) in message and "[26]" in message and "0..18" in message
    assert "convert labelIds to trainIds" in message


def test_ade_ids_above_150_mention_reduce_zero_label(tmp_path):
    write_ade(tmp_path, values=(0, 3, 200))
    dm = ADE20K(root=str(tmp_path / "ADEChallengeData2016"))
    dm.setup("fit")
    with pytest.raises(DataError, match=r"ids \[200\] \(class ids \[199\] after mapping\)"):
        next(iter(dm.val_dataloader()))
    with pytest.raises(DataError, match="reduce_zero_label"):
        next(iter(dm.val_dataloader()))


def test_colour_masks_are_rejected(tmp_path):
    write_voc(tmp_path)
    bad = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    save(bad, np.zeros((H, W, 3), np.uint8))
    dm = PascalVOC(root=str(tmp_path))
    dm.setup("fit")
    with pytest.raises(DataError, match="single-channel"):
        next(iter(dm.val_dataloader()))


def test_train_set_smaller_than_batch_is_a_clear_error(tmp_path):
    write_cityscapes(tmp_path)
    dm = Cityscapes(root=str(tmp_path), batch_size=4)
    dm.setup("fit")
    with pytest.raises(DataError, match="3 training items, fewer than batch_size=4"):
        dm.train_dataloader()


# -- semi-supervised splits, dict batches, future batches ----------------------------------------


def write_labelled_list(path: Path, entries: list[str]) -> str:
    path.write_text("# U2PL-style split\n" + "\n".join(entries) + "\n\n")
    return str(path)


@pytest.fixture
def voc_semi(tmp_path):
    """VOC with 6 trainaug items, 2 of them labelled (one by id, one by relative path)."""
    write_voc(tmp_path, aug_name="trainaug.txt")
    voc = tmp_path / "VOCdevkit/VOC2012"
    rng = np.random.default_rng(5)
    sets = voc / "ImageSets/Segmentation"
    extra = ["2009_000001", "2009_000002"]
    for key in extra:
        save(voc / "JPEGImages" / f"{key}.jpg", rgb(rng))
        save(voc / "SegmentationClassAug" / f"{key}.png", np.zeros((H, W), np.uint8))
    aug = (sets / "trainaug.txt").read_text().split() + extra
    (sets / "trainaug.txt").write_text("\n".join(aug) + "\n")
    entries = ["2007_000039", "JPEGImages/2009_000002.jpg"]
    listing = write_labelled_list(tmp_path / "labeled.txt", entries)
    return voc, listing


def test_labelled_list_splits_train_into_disjoint_labelled_and_unlabelled(voc_semi):
    voc, listing = voc_semi
    dm = PascalVOC(root=str(voc), aug=True, labelled_list=listing, unlabelled=True,
                   crop_size=16, batch_size=2)  # fmt: skip
    dm.setup("fit")
    labelled = {dm.train.items[i].key for i in dm.train.indices}
    unlabelled = {dm.train_unlabelled.items[i].key for i in dm.train_unlabelled.indices}
    assert labelled == {"2007_000039", "2009_000002"}
    assert unlabelled == {"2007_000032", "2008_000002", "2008_000003", "2009_000001"}
    image_u = dm.train_unlabelled[0]
    assert isinstance(image_u, torch.Tensor) and image_u.shape == (3, 16, 16)  # no mask
    # Without unlabelled=True the list only restricts the labelled set.
    only = PascalVOC(root=str(voc), aug=True, labelled_list=listing, crop_size=16, batch_size=2)
    only.setup("fit")
    assert len(only.train) == 2 and only.train_unlabelled is None
    x, y = next(iter(only.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)


def test_labelled_list_with_unknown_entries_is_a_clear_error(voc_semi, tmp_path):
    voc, _ = voc_semi
    listing = write_labelled_list(tmp_path / "other.txt", ["2007_000039", "aachen_000000_000019"])
    dm = PascalVOC(root=str(voc), aug=True, labelled_list=listing)
    with pytest.raises(DataError, match=r"1 of 2 entries match no training item.*aachen"):
        dm.setup("fit")


def test_dict_batches_cycle_the_labelled_set(voc_semi):
    voc, listing = voc_semi
    dm = PascalVOC(root=str(voc), aug=True, labelled_list=listing, unlabelled=True,
                   crop_size=16, batch_size=2)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batches = list(loader)
    assert len(batches) == 2  # max(2 labelled // 2, 4 unlabelled // 2): labelled is cycled
    for batch, _, _ in batches:
        assert set(batch) == {"labelled", "unlabelled"}
        x, y = batch["labelled"]
        assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16) and y.dtype == torch.int64
        assert batch["unlabelled"].shape == (2, 3, 16, 16)
        assert batch["unlabelled"].dtype == torch.float32


def test_future_batches_are_further_independent_pairs(voc_semi):
    voc, listing = voc_semi
    dm = PascalVOC(root=str(voc), aug=True, labelled_list=listing, unlabelled=True,
                   crop_size=16, batch_size=2, future_batches=3)  # fmt: skip
    dm.setup("fit")
    L.seed_everything(0)
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"labelled", "unlabelled", "future"} and len(batch["future"]) == 3
    # Each future loader has its own view of the items, with its own augmentation RNG.
    datasets = [loader.iterables["labelled"].dataset]
    datasets += [pair["labelled"].dataset for pair in loader.iterables["future"]]
    assert len({id(d.transform) for d in datasets}) == 4
    assert all(np.array_equal(d.indices, dm.train.indices) for d in datasets)
    views = [batch["unlabelled"]]
    for future in batch["future"]:
        assert set(future) == {"labelled", "unlabelled"}
        x, y = future["labelled"]
        assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)
        views.append(future["unlabelled"])
    # Own shuffles and augmentation streams: no two of the K + 1 unlabelled batches coincide.
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1 :])


def flatten(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch
    return [t for v in values for t in flatten(v)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_batches_are_reproducible_under_seed_everything(voc_semi, num_workers):
    voc, listing = voc_semi

    def run() -> list[torch.Tensor]:
        L.seed_everything(0)
        dm = PascalVOC(
            root=str(voc), aug=True, labelled_list=listing, unlabelled=True, crop_size=16,
            batch_size=2, future_batches=1, num_workers=num_workers,
        )  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [t for _ in range(2) for batch, _, _ in loader for t in flatten(batch)]

    first, second = run(), run()
    assert len(first) == len(second) == 2 * 2 * 6
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and the two epochs differ (new shuffles and augmentations).
    assert not all(torch.equal(a, b) for a, b in zip(first[:12], first[12:], strict=True))


def test_subsets_are_seeded(tmp_path):
    write_gta(tmp_path, n=8)
    dm = GTA5(root=str(tmp_path), val_fraction=0.5, train_subset=2, eval_subset=1)
    dm.setup("fit")
    assert (len(dm.train), len(dm.val), len(dm.test)) == (2, 1, 1)
    again = GTA5(root=str(tmp_path), val_fraction=0.5, train_subset=2, eval_subset=1)
    again.setup("fit")
    np.testing.assert_array_equal(again.train.indices, dm.train.indices)
