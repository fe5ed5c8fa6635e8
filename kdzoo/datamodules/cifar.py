"""CIFAR-10 and CIFAR-100 DataModules over the "python version" pickles.

Learning Multiple Layers of Features from Tiny Images (Krizhevsky, 2009);
https://www.cs.toronto.edu/~kriz/cifar.html. torchvision downloads the same files, in
``<root>/cifar-10-batches-py/`` and ``<root>/cifar-100-python/``.

The files are pickles, and unpickling can run arbitrary code, so they are read with an unpickler
that resolves only the few globals a pickled dict of numpy arrays needs and refuses anything else.
"""

import codecs
import pickle
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from kdzoo.datamodules.base import DataError, ImageClassificationDataModule, Transforms

# numpy moved ``_reconstruct`` from numpy.core to numpy._core in 2.0; the original CIFAR files
# (written by Python 2) name the old module. Taking the function from ``__reduce__`` avoids
# importing either path (numpy.core warns on numpy 2).
_reconstruct = np.empty(0).__reduce__()[0]
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Protocol-2 pickles written by Python 3 encode ``bytes`` as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


# CIFAR-100 fine label names in label order, as in the meta file.
CIFAR100_FINE_LABELS = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
woman worm
"""


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A pickle references a global that a CIFAR file never needs."""


class _CIFARUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: CIFAR files only contain dicts of "
                "numpy arrays, lists and strings"
            ) from None


def load_cifar_pickle(path: str | Path) -> dict:
    """Load one CIFAR pickle safely (Python-2 era pickles, hence ``encoding="latin1"``)."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            obj = _CIFARUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a readable CIFAR pickle ({e}); fetch it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def load_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches into uint8 images ``(N, 32, 32, 3)`` and int64 labels."""
    images, labels = [], []
    for path in paths:
        batch = load_cifar_pickle(path)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072)")
        if data.shape[1] != 3 * 32 * 32 or batch_labels is None or len(batch_labels) != len(data):
            raise DataError(f"{path}: expected 'data' (N, 3072) and {len(data)} '{label_key}'")
        # Rows are channel-major (1024 R, 1024 G, 1024 B); albumentations wants H x W x C.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class _CIFAR(ImageClassificationDataModule):
    """Shared CIFAR logic; subclasses name the folder, files and label keys.

    Train augmentation: pad 4 (zeros), random 32x32 crop, horizontal flip. ``class_names`` are the
    standard names until ``setup()`` replaces them with those of the meta file.
    """

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str

    can_download = True
    native_chans = 3
    native_size = 32

    def load_data(self):
        root = self.find_root()
        train = load_cifar_batches([root / f for f in self.train_files], self.label_key)
        test = load_cifar_batches([root / self.test_file], self.label_key)
        names = load_cifar_pickle(root / self.meta_file).get(self.names_key)
        if not isinstance(names, list) or len(names) != len(self.default_class_names):
            raise DataError(
                f"{root / self.meta_file}: expected {len(self.default_class_names)} "
                f"'{self.names_key}'"
            )
        self._class_names = tuple(str(n) for n in names)
        labels = np.concatenate([train[1], test[1]])
        num_classes = len(self._class_names)  # of the files, whatever data.classes keeps
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{root}: labels out of range 0..{num_classes - 1}")
        return train, test

    def train_transforms(self) -> Transforms:
        return [
            A.Pad(padding=4, fill=0, border_mode=cv2.BORDER_CONSTANT),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            *self.resize(),
        ]

    def eval_transforms(self) -> Transforms:
        return self.resize()


class CIFAR10(_CIFAR):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 RGB images of 10 classes."""

    name = "CIFAR-10"
    data_subdir = "cifar10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    meta_file = "batches.meta"
    # torchvision's layout <root>/cifar-10-batches-py/, or the files directly in <root>.
    layouts = (folder, "")
    expected_files = (*train_files, test_file, meta_file)
    label_key = "labels"
    names_key = "label_names"
    native_mean = (0.4914, 0.4822, 0.4465)
    native_std = (0.2470, 0.2435, 0.2616)
    default_class_names = (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )

    def download(self, directory: Path) -> None:
        from torchvision.datasets import CIFAR10 as TVCIFAR10

        TVCIFAR10(str(directory), download=True)


class CIFAR100(_CIFAR):
    """CIFAR-100: 50,000 train / 10,000 test 32x32 RGB images of 100 (fine) classes."""

    name = "CIFAR-100"
    data_subdir = "cifar100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    meta_file = "meta"
    layouts = (folder, "")
    expected_files = (*train_files, test_file, meta_file)
    label_key = "fine_labels"
    names_key = "fine_label_names"
    native_mean = (0.5071, 0.4865, 0.4409)
    native_std = (0.2673, 0.2564, 0.2762)
    default_class_names = tuple(CIFAR100_FINE_LABELS.split())

    def download(self, directory: Path) -> None:
        from torchvision.datasets import CIFAR100 as TVCIFAR100

        TVCIFAR100(str(directory), download=True)
