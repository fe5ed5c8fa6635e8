"""Fashion-MNIST DataModule, read from the four IDX files (plain or gzipped).

Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms (Xiao, Rasul,
Vollgraf, 2017, arXiv:1708.07747); https://github.com/zalandoresearch/fashion-mnist.

The Debian package ``dataset-fashion-mnist`` installs the gzipped files in
``/usr/share/datasets/fashion-mnist/``, so the dataset works offline once installed; torchvision's
download layout ``<root>/FashionMNIST/raw/`` and files directly in ``<root>`` are accepted too.
"""

import gzip
import zlib
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from kdzoo.datamodules.base import ImageClassificationDataModule, Transforms
from kdzoo.datamodules.skeleton import DatasetNotFoundError
from kdzoo.errors import DataError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

# IDX type codes (third magic byte) -> big-endian numpy dtype; http://yann.lecun.com/exdb/mnist/
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXFormatError(DataError):
    """An IDX file is truncated, corrupt or not an IDX file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped if the name ends in ``.gz``) into a numpy array."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IDXFormatError(
            f"{path}: cannot decompress ({e}); the file is truncated or corrupt, fetch it again"
        ) from None

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: not an IDX file (bad magic number {data[:4].hex()!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {state}: header says shape {shape} ({expected} bytes), "
            f"file has {len(data)} bytes; fetch it again"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _pick(directory: Path, name: str) -> Path:
    # Prefer the uncompressed file (torchvision keeps both) since it is faster to read.
    plain = directory / name
    return plain if plain.exists() else directory / f"{name}.gz"


def load_idx_split(
    directory: Path, images: str, labels: str, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W, 1)`` uint8 and labels ``(N,)`` int64 of one split, checked."""
    x_path, y_path = _pick(directory, images), _pick(directory, labels)
    x, y = read_idx(x_path), read_idx(y_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise IDXFormatError(f"{x_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise IDXFormatError(f"{y_path}: expected {len(x)} labels, got shape {y.shape}")
    if len(y) and y.max() >= num_classes:
        raise IDXFormatError(f"{y_path}: label {int(y.max())} out of range 0..{num_classes - 1}")
    return x[..., None], y.astype(np.int64)


class FashionMNIST(ImageClassificationDataModule):
    """Fashion-MNIST: 60,000 train / 10,000 test 28x28 greyscale images of 10 clothing classes.

    Train augmentation: pad 2 (zeros), random 28x28 crop, horizontal flip.
    """

    name = "Fashion-MNIST"
    data_subdir = "fashion-mnist"
    layouts = ("", "FashionMNIST/raw")
    system_dirs = ("/usr/share/datasets/fashion-mnist",)
    expected_files = tuple(
        (f, f"{f}.gz") for f in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    )
    install_hint = "apt-get install dataset-fashion-mnist"
    can_download = True

    native_chans = 1
    native_size = 28
    native_mean = (0.2860,)
    native_std = (0.3530,)
    default_class_names = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )

    def download(self, directory: Path) -> None:
        from torchvision.datasets import FashionMNIST as TVFashionMNIST

        for train in (True, False):
            TVFashionMNIST(str(directory), train=train, download=True)

    def load_data(self):
        root = self.find_root()
        num_classes = len(self.default_class_names)  # of the files, whatever data.classes keeps
        train = load_idx_split(root, TRAIN_IMAGES, TRAIN_LABELS, num_classes)
        test = load_idx_split(root, TEST_IMAGES, TEST_LABELS, num_classes)
        return train, test

    def train_transforms(self) -> Transforms:
        return [
            A.Pad(padding=2, fill=0, border_mode=cv2.BORDER_CONSTANT),
            A.RandomCrop(28, 28),
            A.HorizontalFlip(p=0.5),
            *self.resize(),
        ]

    def eval_transforms(self) -> Transforms:
        return self.resize()


def find_fashion_mnist(root: str | None, user: str) -> Path:
    """The Fashion-MNIST directory of a dataset generated from it, searched as
    :class:`FashionMNIST` searches; the missing-data error says that ``user`` (a sentence, e.g.
    "X renders Fashion-MNIST items") needs it and how to fetch it."""
    fmnist = FashionMNIST(root=root)
    fmnist.can_download = False  # its hint would name --data.download, which the user lacks
    try:
        return fmnist.find_root()
    except DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"{e}\n{user}: `python -m kdzoo.datamodules FashionMNIST --download` also fetches it."
        ) from None
