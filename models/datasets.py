"""Classification data sets for the federated workloads, read into memory as numpy arrays.

  Fashion-MNIST  the four standard IDX files (train-images-idx3-ubyte.gz, ...) in one directory; Debian's
                 package `dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist
  .npz           any data a user brings: arrays x_train, y_train, x_test, y_test; features of any shape,
                 integer labels

Features are float32 standardized with the training set's mean and standard deviation; labels int64.
A missing or malformed file is a `DataError` naming the path and how to get it.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A data file that is missing or not what it should be."""


@dataclass
class ClassificationData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def fashion_mnist_paths(directory: str | Path = "") -> dict[str, Path]:
    """The four IDX files, checked to exist (a DataError names the first missing one and the package)."""
    root = Path(directory or FASHION_MNIST_DIR).expanduser()
    paths = {k: root / name for k, name in FASHION_MNIST_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(
                f"Fashion-MNIST file not found: {path}. Install it with `apt-get install dataset-fashion-mnist` "
                f"(Debian/Ubuntu; files land in {FASHION_MNIST_DIR}), or download the four IDX .gz files from "
                f"https://github.com/zalandoresearch/fashion-mnist into a directory and set data.path to it"
            )
    return paths


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format: magic 0x0000 08 <ndim>, big-endian int32 dims, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(dims):
        raise DataError(f"{path} is truncated: {data.size} values for dimensions {tuple(dims)}")
    return data.reshape(tuple(int(d) for d in dims))


def load_fashion_mnist(directory: str | Path = "") -> ClassificationData:
    arrays = {k: _read_idx(p) for k, p in fashion_mnist_paths(directory).items()}
    return _standardized(arrays, source=str(directory or FASHION_MNIST_DIR))


def load_npz(path: str | Path) -> ClassificationData:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path} (data.name=npz reads one .npz with arrays {', '.join(NPZ_KEYS)})")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks array {missing[0]} (a .npz needs {', '.join(NPZ_KEYS)})")
            arrays = {k: f[k] for k in NPZ_KEYS}
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz of plain arrays: {e}") from None
    return _standardized(arrays, source=str(path))


def _standardized(a: dict[str, np.ndarray], source: str) -> ClassificationData:
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y_{split} must be a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{source}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if y.min() < 0:
            raise DataError(f"{source}: y_{split} holds negative labels")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{source}: x_train features {a['x_train'].shape[1:]} differ from x_test's {a['x_test'].shape[1:]}")
    x_train = a["x_train"].astype(np.float32)
    mean, std = np.nanmean(x_train), np.nanstd(x_train) or 1.0  # a missing (NaN) value spoils only its sample
    return ClassificationData(
        x_train=(x_train - mean) / std, y_train=a["y_train"].astype(np.int64),
        x_test=(a["x_test"].astype(np.float32) - mean) / std, y_test=a["y_test"].astype(np.int64),
    )


LOADERS = {"fmnist": load_fashion_mnist, "npz": load_npz}
