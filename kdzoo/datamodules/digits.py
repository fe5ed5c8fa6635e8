"""scikit-learn's bundled handwritten digits (UCI ML optical recognition of handwritten digits).

1,797 8x8 greyscale images with values 0..16, shipped inside scikit-learn
(``sklearn.datasets.load_digits``), so this DataModule needs no files and no network: it is the
dataset kdzoo's tests and quick presets run on. There is no official test split; a fixed,
stratified 20 % is held out as the test set.
"""

from typing import Any

import albumentations as A
import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kdzoo.datamodules.base import DataError, ImageClassificationDataModule, Transforms

TEST_FRACTION = 0.2
# The test split is the same for every split_seed, so results obtained with different validation
# splits are still measured on the same test images.
TEST_SPLIT_SEED = 0


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 ``(N, 8, 8, 1)`` scaled from 0..16 to 0..255, and labels."""
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class Digits(ImageClassificationDataModule):
    """scikit-learn digits: 10 classes, 1 channel, upsampled to ``image_size`` (default 32).

    ``root`` and ``download`` are accepted for a uniform interface and ignored. Train augmentation:
    a small random affine (shift, scale, rotation) and no flip, since digits are not
    mirror-invariant. Splits: fixed stratified 20 % test, then ``val_fraction`` of the rest
    (stratified, ``split_seed``) for validation.
    """

    name = "scikit-learn digits"
    native_chans = 1
    native_size = 8
    # Pixel mean/std of all 1,797 images after the uint8 scaling above, divided by 255:
    # x = load_digits_uint8()[0] / 255; x.mean(), x.std() -> 0.30531, 0.37589.
    native_mean = (0.3053,)
    native_std = (0.3759,)
    default_class_names = tuple(str(d) for d in range(10))

    # image_size is restated for its default, which `--data.help` and `--print_config` show.
    def __init__(self, *, image_size: int | None = 32, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)

    def prepare_data(self) -> None:
        """Nothing to fetch: the data ships with scikit-learn."""

    def load_data(self):
        images, targets = load_digits_uint8()
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)),
            test_size=TEST_FRACTION,
            stratify=targets,
            random_state=TEST_SPLIT_SEED,
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        return (images[train_idx], targets[train_idx]), (images[test_idx], targets[test_idx])

    def split_train_val(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Stratified, unlike the base class: with ~140 validation images a random split could
        # leave classes noticeably under-represented.
        indices = np.arange(len(targets))
        if self.hparams.val_fraction == 0:
            return indices, indices[:0]
        try:
            train_idx, val_idx = train_test_split(
                indices,
                test_size=self.hparams.val_fraction,
                stratify=targets,
                random_state=self.hparams.split_seed,
            )
        except ValueError as e:  # e.g. fewer validation images than classes
            raise DataError(f"val_fraction={self.hparams.val_fraction}: {e}") from None
        return np.sort(train_idx), np.sort(val_idx)

    def train_transforms(self) -> Transforms:
        # Resize first so the affine works at the final resolution rather than on 8x8 pixels.
        return [
            *self.resize(),
            A.Affine(
                translate_percent=(-0.1, 0.1),
                scale=(0.9, 1.1),
                rotate=(-10, 10),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=1.0,
            ),
        ]

    def eval_transforms(self) -> Transforms:
        return self.resize()
