"""Importance and consolidation-state files (ewc_fast.integrations.files): exact round trips, the
metadata, refusals (other model, other kind, damaged file), atomic writes."""

import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")

import ewc_fast  # noqa: E402
from ewc_fast.integrations import files  # noqa: E402
from tests.helpers import data_of, mlp  # noqa: E402


def _trained_states():
    """EWC (2 tasks, separate), SI (zenke, after steps and a consolidation) and WVA of one model."""
    model = mlp()
    batches = data_of(n=8)
    imps = ewc_fast.estimate_importance(model, batches, methods=("fisher", "mas"), progress=False)
    ewc = ewc_fast.EWC(model, lam=3.0, gamma=0.9, stabilize_lr=0.01)
    ewc.consolidate(imps["fisher"])
    si = ewc_fast.SynapticIntelligence(model, xi=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        ewc.apply_()
        opt.step()
    si.consolidate()
    ewc.consolidate(imps["mas"])
    wva = ewc_fast.WVA(model, lam=2.0, state_dtype=torch.float64)
    wva.consolidate(imps["fisher"])
    return model, imps, ewc, si, wva


def _equal_state(a, b):
    """Two state dicts equal bit for bit (tensors: same dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_importance_round_trip_is_exact_with_metadata(tmp_path, dtype):
    model, imps, *_ = _trained_states()
    imp = imps["fisher"].to(dtype=dtype)
    path = files.save_importance(imp, tmp_path / "f.safetensors", model=model)
    back = files.load_importance(path, model=model)
    assert back.method == "fisher" and back.n_samples == imp.n_samples == 8
    assert set(back) == set(imp)
    for k in imp:
        assert back[k].dtype == dtype and torch.equal(back[k], imp[k])
    meta = files.read_metadata(path)
    assert meta["method"] == "fisher" and meta["n_samples"] == "8"
    assert meta["estimator"] == "ewc_fast.estimate_importance"
    assert meta["normalisation"].startswith("per-sample mean")
    assert meta["dtype"] == str(dtype).replace("torch.", "")
    assert meta["ewc_fast_version"] == ewc_fast.__version__
    assert meta["fingerprint"] == files.fingerprint(imp) == files.fingerprint(model)
    assert meta["model_fingerprint"] == files.fingerprint(model)
    # the importance's own meta survives, the file's metadata is added under "file"
    assert back.meta["n_batches"] == imp.meta["n_batches"] and back.meta["file"]["method"] == "fisher"
    # any safetensors reader sees plain name -> tensor entries
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(imp)


def test_si_importance_records_its_normalisation(tmp_path):
    _, _, _, si, _ = _trained_states()
    imp = si.cumulative
    path = files.save_importance(imp, tmp_path / "si.safetensors")
    meta = files.read_metadata(path)
    assert meta["estimator"] == "ewc_fast.SynapticIntelligence" and "xi" in meta["normalisation"]
    back = files.load_importance(path)
    assert back.meta["xi"] == 0.1 and all(torch.equal(back[k], imp[k]) for k in imp)


def test_loading_onto_another_model_is_a_clear_error(tmp_path):
    model, imps, *_ = _trained_states()
    path = files.save_importance(imps["fisher"], tmp_path / "f.safetensors", model=model)
    wider = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3))
    with pytest.raises(ValueError, match=r"different model.*different shapes: 0\.bias"):
        files.load_importance(path, model=wider)
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # same shapes, names 2.* instead of 3.*
    with pytest.raises(ValueError, match=r"in the file but not the model: \['3\.bias', '3\.weight'\]"):
        files.load_importance(path, model=other)
    # a model with one extra (frozen) parameter: refused by the model fingerprint unless strict=False
    bigger = mlp()
    bigger.register_parameter("extra", nn.Parameter(torch.zeros(2), requires_grad=False))
    with pytest.raises(ValueError, match=r"in the model but not the file: \['extra'\].*strict=False"):
        files.load_importance(path, model=bigger)
    back = files.load_importance(path, model=bigger, strict=False)
    assert set(back) == set(imps["fisher"])


@pytest.mark.parametrize("which", ["ewc", "si", "wva"])
def test_state_round_trip_is_bit_exact(tmp_path, which):
    model, _, ewc, si, wva = _trained_states()
    obj = {"ewc": ewc, "si": si, "wva": wva}[which]
    path = files.save_state(obj, tmp_path / f"{which}.safetensors", model=model)
    fresh = {
        "ewc": lambda: ewc_fast.EWC(model, lam=1.0),
        "si": lambda: ewc_fast.SynapticIntelligence(model),
        "wva": lambda: ewc_fast.WVA(model, lam=1.0, state_dtype=torch.float64),
    }[which]()
    files.load_state(fresh, path, model=model)
    assert _equal_state(fresh.state_dict(), obj.state_dict())
    meta = files.read_metadata(path)
    assert meta["class"] == {"ewc": "EWC", "si": "SynapticIntelligence", "wva": "WVA"}[which]
    state = json.loads(meta["state"])
    assert state["format"].startswith("ewc_fast.")


def test_restored_ewc_gives_the_same_penalty_and_gradient(tmp_path):
    model, _, ewc, _, _ = _trained_states()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = files.save_state(ewc, tmp_path / "ewc.safetensors")
    fresh = ewc_fast.EWC(model, lam=1.0)
    files.load_state(fresh, path)
    model.zero_grad()
    a = ewc.apply_()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    b = fresh.apply_()
    assert float(a) == float(b) and all(torch.equal(x, p.grad) for x, p in zip(ga, model.parameters()))


def test_state_refusals_leave_the_object_untouched(tmp_path):
    model, imps, ewc, si, _ = _trained_states()
    ewc_path = files.save_state(ewc, tmp_path / "ewc.safetensors")
    imp_path = files.save_importance(imps["fisher"], tmp_path / "f.safetensors")
    target = ewc_fast.EWC(model, lam=5.0)
    target.consolidate(imps["mas"])
    before = target.state_dict()
    with pytest.raises(ValueError, match="holds the state of a 'EWC', not of a 'SynapticIntelligence'"):
        files.load_state(ewc_fast.SynapticIntelligence(model), ewc_path)
    with pytest.raises(ValueError, match="use load_state"):
        files.load_importance(ewc_path)
    with pytest.raises(ValueError, match="use load_importance"):
        files.load_state(target, imp_path)
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="does not fit this EWC"):
        files.load_state(ewc_fast.EWC(other, lam=1.0), ewc_path)
    assert _equal_state(target.state_dict(), before)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an ewc_fast importance or state file"):
        files.load_importance(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        files.read_metadata(junk)
    _, imps, *_ = _trained_states()
    path = files.save_importance(imps["fisher"], tmp_path / "f.safetensors")
    meta = files.read_metadata(path)
    tensors = dict(files.load_importance(path))
    tensors["0.bias"] = torch.zeros(7)  # shapes no longer match the recorded fingerprint
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="damaged"):
        files.load_importance(path)
    meta["format_version"] = "99"
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="format version '99'"):
        files.read_metadata(path)


def test_meta_must_be_plain_json(tmp_path):
    imp = ewc_fast.Importance({"w": torch.ones(2)}, method="custom", n_samples=1, meta={"t": torch.ones(1)})
    with pytest.raises(TypeError, match=r"meta\['t'\] is a tensor"):
        files.save_importance(imp, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left
    ok = ewc_fast.Importance({"w": torch.ones(2)}, method="custom", n_samples=1, meta={"a": [1, 2.5, "x", None]})
    back = files.load_importance(files.save_importance(ok, tmp_path / "x.safetensors"))
    assert (
        back.meta["a"] == [1, 2.5, "x", None]
        and files.read_metadata(tmp_path / "x.safetensors")["normalisation"] == "unknown"
    )


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A crash while writing (here: safetensors raising halfway) leaves the old file intact and no
    temporary file behind; the rename is the only step that makes the new file visible."""
    _, imps, *_ = _trained_states()
    path = files.save_importance(imps["fisher"], tmp_path / "f.safetensors")
    old = path.read_bytes()
    import safetensors.torch as st

    real = st.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file ...
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")  # ... and the writer dies

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        files.save_importance(imps["mas"], path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_views_and_shared_tensors_are_saved(tmp_path):
    buf = torch.arange(10.0)
    imp = ewc_fast.Importance({"a": buf[:4], "b": buf[4:], "c": buf[:4].view(2, 2).t()}, method="x", n_samples=0)
    back = files.load_importance(files.save_importance(imp, tmp_path / "v.safetensors"))
    assert all(torch.equal(back[k], imp[k]) for k in imp)


def test_importing_ewc_fast_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, ewc_fast, ewc_fast.integrations;"
        "bad=[m for m in ('transformers','lightning','pytorch_lightning','avalanche','safetensors')"
        " if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
