"""Readers of the standard file formats: IDX (MNIST, Fashion-MNIST), CIFAR python pickles,
SVHN .mat files.

A reader gets the result of looking for its data set's files (`_Found`, from the registry
in rankbias/data/__init__.py) and returns the arrays as stored (`_Raw`); scaling, padding,
normalization and subsets are the loading pipeline's. Every check of a file's contents
raises one error that names the file and how to get it again.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankbias.utils import RankbiasError


@dataclass
class _Raw:
    """What a reader returns: numpy arrays as stored, before scaling and normalization."""

    x_train: np.ndarray  # (N, *shape)
    y_train: np.ndarray  # (N,) integers
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    scale: float = 1.0  # brings stored values to [0, 1] (1/255 for bytes)
    classes: list[str] | None = None
    tokens: bool = False  # integer token ids (int64 inputs, never scaled or normalized)


@dataclass
class _Found:
    """Result of looking for a data set's files in its candidate folders."""

    name: str  # the data set
    root: Path  # the data root (named in the hint of how to get the files)
    folder: Path | None  # the first folder holding every required file
    paths: dict[str, Path]  # required file -> where it is (when folder is set)
    missing: list[Path]  # files absent from the best partial folder, or from the first one
    searched: list[Path]
    partial: bool = False  # some folder holds some of the files (so `missing` is precise)

    def require(self) -> _Found:
        """Itself when every file is there; else the error a user sees."""
        if self.folder is None:
            how = _how_to_get(self.name, self.root)
            if self.partial:
                raise RankbiasError(f"{self.name}: {self.missing[0].parent} holds only some of "
                                    f"the files; missing {_short_list(self.missing)}. Get them "
                                    f"with: {how}")
            looked = ", ".join(str(f) for f in self.searched)
            raise RankbiasError(f"{self.name} not found: no {self.missing[0].name} in {looked}. "
                                f"Get it with: {how}")
        return self


def _how_to_get(name: str, root: Path) -> str:
    cmd = f"rankbias data download {name} --root {root}"
    if name == "fashion-mnist":
        return f"apt-get install dataset-fashion-mnist (Debian/Ubuntu), or {cmd}"
    return cmd


def _short_list(paths: list) -> str:
    names = [str(p) for p in paths]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} (+{len(names) - 3})"


def _corrupt(path: Path, why: str, found: _Found) -> RankbiasError:
    return RankbiasError(f"{path}: {why}: the file is corrupt or truncated. Delete it and get "
                         f"it again: {_how_to_get(found.name, found.root)}")


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_bytes(path: Path, found: _Found) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its magic number, not its name)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise _corrupt(path, f"bad gzip data ({err})", found) from None
    return data


def _read_idx(path: Path, ndim: int, found: _Found) -> np.ndarray:
    """An IDX array of unsigned bytes: magic 0x0000 08 <ndim>, ndim big-endian sizes, data."""
    data = _read_bytes(path, found)
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise _corrupt(path, f"not an IDX file of {ndim}-D unsigned bytes (bad magic number)",
                       found)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise _corrupt(path, f"{len(data)} bytes where its header promises {expected}", found)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_set(found: _Found) -> _Raw:
    """MNIST or Fashion-MNIST: the four IDX files (raw or .gz) of 28x28 images, labels 0..9."""
    found.require()
    arrays = {}
    for stem in _IDX_FILES:
        path = found.paths[stem]
        arr = _read_idx(path, 3 if "images" in stem else 1, found)
        if "images" in stem and arr.shape[1:] != (28, 28):
            raise _corrupt(path, f"images of {arr.shape[1]}x{arr.shape[2]}, expected 28x28",
                           found)
        if "labels" in stem and arr.size and arr.max() > 9:
            raise _corrupt(path, f"label {arr.max()} outside 0..9", found)
        arrays[stem] = arr
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        n_x, n_y = len(arrays[images]), len(arrays[labels])
        if n_x != n_y:
            raise _corrupt(found.paths[labels], f"{n_y} labels for {n_x} images", found)
    return _Raw(arrays["train-images-idx3-ubyte"][:, None], arrays["train-labels-idx1-ubyte"],
                arrays["t10k-images-idx3-ubyte"][:, None], arrays["t10k-labels-idx1-ubyte"],
                num_classes=10, source=str(found.folder), scale=1 / 255)


# --- CIFAR python pickles ---------------------------------------------------------------
# The globals a CIFAR pickle may name: numpy array reconstruction (numpy 1 and 2 module
# paths, every pickle protocol) and nothing else. Unpickling runs any callable a file
# names, so a data file must not be able to run code.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file never "
                                         "needs; refusing to load it")
        return super().find_class(module, name)


def _load_pickle(path: Path, found: _Found) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1 reads the Python 2 pickles of the official archives, as torchvision does
            obj = _DataUnpickler(f, encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - malformed pickles raise anything at all
        raise _corrupt(path, f"not a readable pickle ({type(err).__name__}: {err})",
                       found) from None
    if not isinstance(obj, dict):
        raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict", found)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int,
                 found: _Found) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path, found)
    data, labels = d.get("data"), d.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt(path, f"'data' should be uint8 (N, 3072), got {got}", found)
    labels = np.asarray(labels) if labels is not None else np.empty(0)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise _corrupt(path, f"'{label_key}' should be {len(data)} integers", found)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"'{label_key}' outside 0..{num_classes - 1}", found)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _class_names(path: Path, key: str, n: int, found: _Found) -> list[str] | None:
    """Class names from the optional meta file (absent: None)."""
    if not path.is_file():
        return None
    names = _load_pickle(path, found).get(key)
    if not isinstance(names, list) or len(names) != n:
        raise _corrupt(path, f"'{key}' should list {n} class names", found)
    return [s.decode() if isinstance(s, bytes) else str(s) for s in names]


def _read_cifar10(found: _Found) -> _Raw:
    found.require()
    train = [_cifar_batch(found.paths[f"data_batch_{i}"], "labels", 10, found)
             for i in range(1, 6)]
    x_test, y_test = _cifar_batch(found.paths["test_batch"], "labels", 10, found)
    classes = _class_names(found.folder / "batches.meta", "label_names", 10, found)
    return _Raw(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                x_test, y_test, num_classes=10, source=str(found.folder), scale=1 / 255,
                classes=classes)


def _read_cifar100(found: _Found, labels: str = "fine") -> _Raw:
    if labels not in ("fine", "coarse"):
        raise RankbiasError(f"cifar100: labels must be 'fine' (100 classes) or 'coarse' (20); "
                            f"got {labels!r}")
    found.require()
    k = 100 if labels == "fine" else 20
    key = f"{labels}_labels"
    x_train, y_train = _cifar_batch(found.paths["train"], key, k, found)
    x_test, y_test = _cifar_batch(found.paths["test"], key, k, found)
    classes = _class_names(found.folder / "meta", f"{labels}_label_names", k, found)
    return _Raw(x_train, y_train, x_test, y_test, num_classes=k, source=str(found.folder),
                scale=1 / 255, classes=classes)


# --- SVHN .mat files --------------------------------------------------------------------
def _read_svhn_mat(path: Path, found: _Found) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # noqa: BLE001 - scipy raises many types for a damaged file
        raise _corrupt(path, f"not a readable .mat file ({type(err).__name__}: {err})",
                       found) from None
    x, y = mat.get("X"), mat.get("y")
    if not (isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[:3] == (32, 32, 3)
            and x.dtype == np.uint8):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "no such key"
        raise _corrupt(path, f"'X' should be uint8 32x32x3xN, got {got}", found)
    if not (isinstance(y, np.ndarray) and y.size == x.shape[3] and y.ndim <= 2):
        got = y.shape if isinstance(y, np.ndarray) else "no such key"
        raise _corrupt(path, f"'y' should be {x.shape[3]}x1, got {got}", found)
    y = y.reshape(-1).astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise _corrupt(path, "'y' outside 1..10", found)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    # (H, W, C, N) -> (N, C, H, W)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _read_svhn(found: _Found) -> _Raw:
    found.require()
    x_train, y_train = _read_svhn_mat(found.paths["train_32x32.mat"], found)
    x_test, y_test = _read_svhn_mat(found.paths["test_32x32.mat"], found)
    return _Raw(x_train, y_train, x_test, y_test, num_classes=10, source=str(found.folder),
                scale=1 / 255)
