"""Importance: construction checks, arithmetic, conversion, persistence."""

import io

import pytest
import torch
from torch import nn

from ewc_fast import Importance


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    m[2].bias.requires_grad_(False)
    return m


def _imp(seed=0, method="fisher", n=10, meta=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = {"a": torch.rand(3, 4, generator=g, dtype=dtype), "b": torch.rand(2, generator=g, dtype=dtype)}
    return Importance(t, method=method, n_samples=n, meta=meta)


def test_mapping_and_attributes():
    imp = _imp(meta={"k": 1})
    assert set(imp) == {"a", "b"} and len(imp) == 2 and "a" in imp
    assert imp["a"].shape == (3, 4)
    assert imp.method == "fisher" and imp.n_samples == 10 and imp.meta == {"k": 1}
    assert imp.numel() == 14
    with pytest.raises(TypeError):
        imp["a"] = torch.zeros(3, 4)
    imp.meta["k"] = 2  # a copy
    assert imp.meta == {"k": 1}
    r = repr(imp)
    assert "fisher" in r and "n_samples=10" in r and "float32" in r and "a: (3, 4)" in r


def test_construction_validation():
    ok = {"a": torch.zeros(2)}
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        Importance({"a": [1.0]}, method="m", n_samples=1)
    with pytest.raises(TypeError, match="non-floating"):
        Importance({"a": torch.zeros(2, dtype=torch.int64)}, method="m", n_samples=1)
    with pytest.raises(TypeError, match="names must be str"):
        Importance({1: torch.zeros(2)}, method="m", n_samples=1)
    with pytest.raises(TypeError, match="method"):
        Importance(ok, method="", n_samples=1)
    with pytest.raises(TypeError, match="n_samples"):
        Importance(ok, method="m", n_samples=1.5)
    with pytest.raises(ValueError, match="n_samples"):
        Importance(ok, method="m", n_samples=-1)
    with pytest.raises(TypeError, match="meta"):
        Importance(ok, method="m", n_samples=1, meta=[1])
    with pytest.raises(TypeError, match="mapping"):
        Importance([("a", torch.zeros(2))], method="m", n_samples=1)
    x = torch.zeros(2, requires_grad=True)
    assert not Importance({"a": x}, method="m", n_samples=0)["a"].requires_grad


def test_add_and_sum():
    a, b = _imp(0, "fisher", 10, {"k": 1, "x": 2}), _imp(1, "fisher", 5, {"k": 1, "x": 3})
    s = a + b
    assert s.method == "fisher" and s.n_samples == 15 and s.meta == {"k": 1}
    for k in a:
        assert torch.equal(s[k], a[k] + b[k])
    c = _imp(2, "mas", 1)
    assert (a + c).method == "fisher+mas"
    t = Importance.sum([a, b, c])
    assert t.method == "fisher+mas" and t.n_samples == 16
    for k in a:
        torch.testing.assert_close(t[k], a[k] + b[k] + c[k], rtol=0, atol=1e-6)
    assert sum([a, b]).n_samples == 15  # builtin sum starts from 0
    assert Importance.sum([a]) is not a and torch.equal(Importance.sum([a])["a"], a["a"])
    # operands unchanged, promotion
    d = _imp(3, dtype=torch.float64)
    assert (a + d)["a"].dtype == torch.float64
    with pytest.raises(ValueError):
        Importance.sum([])
    with pytest.raises(ValueError, match="different parameter names"):
        a + Importance({"a": a["a"]}, method="fisher", n_samples=1)
    with pytest.raises(ValueError, match="shape"):
        a + Importance({"a": torch.zeros(4, 3), "b": a["b"]}, method="fisher", n_samples=1)
    with pytest.raises(TypeError):
        a + 1.0


def test_scale():
    a = _imp()
    for s in (a.scale(2.5), a * 2.5, 2.5 * a):
        assert torch.equal(s["a"], a["a"] * 2.5) and s.method == a.method and s.n_samples == a.n_samples
    assert torch.equal((a / 2)["b"], a["b"] / 2)
    with pytest.raises(ValueError):
        a.scale(float("nan"))
    with pytest.raises(TypeError):
        a.scale("2")
    with pytest.raises(ZeroDivisionError):
        a / 0


def test_to():
    a = _imp()
    b = a.to(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in b.values()) and b.method == a.method
    assert torch.equal(b["a"].float(), a["a"])
    assert a.to(device="cpu")["a"].data_ptr() == a["a"].data_ptr()  # shared, not copied
    with pytest.raises(TypeError):
        a.to(dtype=torch.int32)


def test_state_dict_round_trip():
    a = _imp(meta={"k": 1, "name": "x", "t": torch.arange(3)}, dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = Importance.from_state_dict(torch.load(buf, weights_only=True))
    assert b.method == a.method and b.n_samples == a.n_samples and set(b) == set(a)
    assert b.meta["k"] == 1 and torch.equal(b.meta["t"], torch.arange(3))
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(b[k], a[k])
    with pytest.raises(ValueError):
        Importance.from_state_dict({"format": "other"})


def test_zeros_like():
    m = _model()
    z = Importance.zeros_like(m)
    assert set(z) == {"0.weight", "0.bias", "2.weight"} and z.n_samples == 0
    assert all(torch.count_nonzero(t) == 0 and t.shape == m.get_parameter(n).shape for n, t in z.items())
    z2 = Importance.zeros_like(m, dtype=torch.float64, trainable_only=False)
    assert "2.bias" in z2 and z2["2.bias"].dtype == torch.float64
