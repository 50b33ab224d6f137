"""State-dict helpers shared by EWC, SynapticIntelligence and WVA (ewc_fast.consolidation._state)."""

import pytest
import torch
from torch import nn

from ewc_fast.consolidation import _state


def test_header_round_trip_and_errors():
    sd = {**_state.state_header("ewc_fast.X", 1), "a": 1}
    assert _state.check_header("X.load", sd, "ewc_fast.X", 1) is sd
    with pytest.raises(TypeError, match="X.load"):
        _state.check_header("X.load", [1], "ewc_fast.X", 1)
    with pytest.raises(ValueError):
        _state.check_header("X.load", [1], "ewc_fast.X", 1, non_mapping=ValueError)
    for bad in ({**sd, "version": 2}, {**sd, "format": "y"}, {}):
        with pytest.raises(ValueError, match="version 1"):
            _state.check_header("X.load", bad, "ewc_fast.X", 1)


def test_keys_counts_names_entries():
    _state.require_keys("o", {"a": 1, "b": 2}, ("a", "b"))
    with pytest.raises(ValueError, match=r"missing keys \['c'\]"):
        _state.require_keys("o", {"a": 1}, ("a", "c"))
    assert _state.check_count("o", "n", 3) == 3
    for bad in (-1, True, "2", 1.0):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            _state.check_count("o", "n", bad)
    assert _state.check_names("o", ("a", "b")) == ["a", "b"]
    for bad in (["a", "a"], ["a", 1]):
        with pytest.raises(ValueError, match="unique strings"):
            _state.check_names("o", bad)
    entries = {"a": 1, "b": 2}
    assert _state.check_entries("o", "w", entries, ["b", "a"]) is entries
    for bad in ({"a": 1}, {"a": 1, "b": 2, "c": 3}, [("a", 1), ("b", 2)]):
        with pytest.raises(ValueError, match="w entries do not match names"):
            _state.check_entries("o", "w", bad, ["a", "b"])


def test_params_by_name():
    model = nn.Linear(2, 3)
    assert _state.params_by_name("o", model, ["bias", "weight"]) == [model.bias, model.weight]
    with pytest.raises(ValueError, match="'zzz' is not a parameter"):
        _state.params_by_name("o", model, ["weight", "zzz"])


def test_check_state_tensor():
    t = torch.tensor([0.0, 1.0])
    assert _state.check_state_tensor("o", "A", t, (2,), dtype=torch.float32, nonnegative=True) is t
    with pytest.raises(ValueError, match="missing or not a tensor"):
        _state.check_state_tensor("o", "A", None, (2,))
    with pytest.raises(ValueError, match="shape"):
        _state.check_state_tensor("o", "A", t, (3,))
    with pytest.raises(TypeError, match="dtype"):
        _state.check_state_tensor("o", "A", t, (2,), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN/Inf or negative"):
        _state.check_state_tensor("o", "A", -t - 1, (2,), nonnegative=True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        _state.check_state_tensor("o", "A", t / 0, (2,), finite=True)
    assert _state.check_state_tensor("o", "A", -t, (2,), finite=True) is not None  # negative is finite


def test_clone_named_and_dtype_names():
    ts = [torch.ones(2, requires_grad=True), torch.zeros(1)]
    out = _state.clone_named(["a", "b"], ts)
    assert list(out) == ["a", "b"] and not out["a"].requires_grad
    assert out["a"].data_ptr() != ts[0].data_ptr() and torch.equal(out["a"], ts[0].detach())
    for dtype in (torch.float32, torch.float64):
        assert _state.dtype_from_name("o", _state.dtype_name(dtype)) is dtype
    assert _state.dtype_name(torch.float32) == "float32"
    for bad in ("float16", "nn", 3):
        with pytest.raises(TypeError, match="state_dtype"):
            _state.dtype_from_name("o", bad)
