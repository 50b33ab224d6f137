"""ewc_fast.experiments.records: JSON-safe values, atomic writes, machine description."""

import json
import math

import numpy as np
import pytest
import torch

from ewc_fast.experiments import records


def test_jsonable_converts_every_kind():
    from dataclasses import dataclass

    @dataclass
    class D:
        a: float
        b: list

    obj = {
        1: float("nan"),
        "inf": [float("inf"), -float("inf"), 1.5],
        "np": (np.float32(2.5), np.int64(3), np.bool_(True), np.arange(3)),
        "t": (torch.tensor(4.0), torch.tensor([1.0, float("nan")])),
        "dc": D(math.nan, [np.float64(1.0)]),
    }
    out = records.jsonable(obj)
    assert out == {
        "1": None,
        "inf": [None, None, 1.5],
        "np": [2.5, 3, True, [0, 1, 2]],
        "t": [4.0, [1.0, None]],
        "dc": {"a": None, "b": [1.0]},
    }
    json.dumps(out, allow_nan=False)  # strictly valid JSON


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    records.write_json(path, {"x": 1})
    assert records.read_json(path) == {"x": 1}

    class Boom:
        pass

    with pytest.raises(TypeError):  # not serialisable: the old file stays whole, no temporary left
        records.write_json(path, {"x": Boom()})
    assert records.read_json(path) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    assert records.read_json(tmp_path / "missing.json") is None


def test_write_csv(tmp_path):
    path = records.write_csv(tmp_path / "r.csv", [{"a": 1, "b": float("nan")}, {"b": 2.0, "c": "x"}])
    assert path.read_text().splitlines() == ["a,b,c", "1,,", ",2.0,x"]


def test_machine_info_fields():
    info = records.machine_info("cpu", packages=["torch", "surely-not-a-distribution"])
    for key in ("date", "cpu", "cpu_count", "torch_threads", "torch", "ewc_fast", "git", "backends"):
        assert key in info
    assert "torch" in info["backends"]
    assert info["versions"]["surely-not-a-distribution"] == "not installed"
    json.dumps(records.jsonable(info), allow_nan=False)
