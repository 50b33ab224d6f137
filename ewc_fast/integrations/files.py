"""Importance and consolidation-state files: safetensors with what the numbers mean.

Two kinds of file, both `safetensors <https://huggingface.co/docs/safetensors>`_ (raw tensor bytes,
no pickle: loading runs no code; readable by any safetensors reader) with string metadata:

* **Importance file** (:func:`save_importance` / :func:`load_importance`). Tensors: one per parameter
  name, exactly the :class:`~ewc_fast.Importance` tensors (bit for bit, in their dtype). Metadata:
  ``format`` = ``ewc_fast.importance``, ``format_version``, ``method``, ``estimator``, ``n_samples``,
  ``normalisation`` (what the tensors are a mean or sum of), ``dtype``, ``meta`` (the importance's
  ``meta`` as JSON), ``ewc_fast_version``, ``torch_version``, ``fingerprint`` (SHA-256 of the sorted
  parameter names and shapes) and, when a ``model`` is given, ``model_fingerprint`` /
  ``model_parameters`` (every parameter of the model, trainable or not).
* **State file** (:func:`save_state` / :func:`load_state`): the ``state_dict()`` of an
  :class:`~ewc_fast.EWC`, :class:`~ewc_fast.SynapticIntelligence` or :class:`~ewc_fast.WVA`.
  Tensors under ``<group>/<parameter name>`` (e.g. ``omega/fc.weight``, ``mu/fc.weight``); every
  other value (settings, counters, names) as JSON in the ``state`` metadata, with each tensor
  replaced by a reference to its key. Floats go through JSON's shortest round-trip repr, so a
  restored object is bit-identical. Metadata also holds ``class``, ``fingerprint``, the versions and
  the state dtype.

Refusals (``ValueError`` naming the file and what differs): a file of the other kind or an unknown
format version; an importance whose names/shapes do not fit ``model`` (missing or extra names, a
different shape) or, when the file recorded ``model_fingerprint``, a model whose parameter list differs
(``strict=False`` checks only the importance's own entries); a state whose names or shapes differ
from the object's model (the object's own ``load_state_dict`` check, which changes nothing on failure).
``meta`` must be JSON (plain numbers, strings, lists, dicts): a tensor in ``meta`` is refused
(``TypeError``).

Writes are atomic: the file is written to a temporary name in the target folder, flushed to disk
(``fsync``) and renamed over the target, so a crash mid-save leaves the old file (or none), never a
half file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..consolidation import EWC, WVA, SynapticIntelligence
from ..importance import Importance

__all__ = [
    "save_importance",
    "load_importance",
    "save_state",
    "load_state",
    "read_metadata",
    "fingerprint",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_IMPORTANCE = "ewc_fast.importance"
_STATE = "ewc_fast.state"
_STATE_CLASSES = {"EWC": EWC, "SynapticIntelligence": SynapticIntelligence, "WVA": WVA}
_TENSOR_REF = "__tensor__"

#: What the tensors of each ``estimate_importance`` / ``SynapticIntelligence`` method are normalised by.
NORMALISATION = {
    "fisher": "per-sample mean: sum over n_samples samples / n_samples",
    "fisher_exact": "per-sample mean: sum over n_samples samples / n_samples",
    "mas": "per-sample mean: sum over n_samples samples / n_samples",
    "sig": "per-sample mean: sum over n_samples samples / n_samples",
    "fisher_mc": "mean over n_samples samples x meta['mc_samples'] label draws",
    "fisher_batched": "APPROXIMATE: mean over meta['n_batches'] batches of the squared batch-mean gradient",
    "si": "path integral over n_samples optimizer steps / ((theta_end - theta_start)^2 + xi)",
    "magnitude": "none (|theta|, no data)",
    "random": "none (U(0, 1), no data)",
}


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - the dev/files extras install it
        raise ImportError(
            "ewc_fast.integrations.files needs the safetensors package: pip install 'ewc_fast[files]'"
        ) from exc
    return st, safe_open


# ------------------------------------------------------------------------------------- fingerprints
def _shapes(named: Mapping[str, Any]) -> list[list]:
    return sorted([str(name), [int(s) for s in t.shape]] for name, t in named.items())


def fingerprint(named: Mapping[str, Any] | nn.Module) -> str:
    """SHA-256 (hex) of the sorted ``[name, shape]`` pairs of ``named`` (a mapping name -> tensor, or a
    module: all its ``named_parameters()``). Values and dtypes do not enter: two models with the same
    parameter names and shapes have the same fingerprint."""
    if isinstance(named, nn.Module):
        named = dict(named.named_parameters())
    blob = json.dumps(_shapes(named), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _diff(owner: str, path: Path, what: str, saved: list[list], current: list[list]) -> str:
    """A message saying how two ``[name, shape]`` lists differ."""
    a, b = {n: s for n, s in saved}, {n: s for n, s in current}
    only_file = sorted(set(a) - set(b))
    only_model = sorted(set(b) - set(a))
    shapes = [f"{n}: file {a[n]} vs model {b[n]}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    parts = []
    if only_file:
        parts.append(f"in the file but not the model: {only_file[:5]}" + (" ..." if len(only_file) > 5 else ""))
    if only_model:
        parts.append(f"in the model but not the file: {only_model[:5]}" + (" ..." if len(only_model) > 5 else ""))
    if shapes:
        parts.append("different shapes: " + "; ".join(shapes[:5]))
    return f"{owner}: {path} was saved for a different {what} ({'; '.join(parts) or 'parameter lists differ'})"


# ------------------------------------------------------------------------------------------ writing
def _atomic_save(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """``safetensors`` file at ``path``, written to a temporary file in the same folder, fsynced and
    renamed over ``path`` (a crash leaves the previous file or none, never a half file)."""
    st, _ = _safetensors()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; not possible on every platform)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _host_copy(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors refuses shared storage): a
    tensor that is a view into a larger buffer, or that appears twice, is copied; others are not."""
    out, seen = {}, set()
    for name, t in tensors.items():
        c = t.detach().to("cpu").contiguous()
        storage = c.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != c.numel() * c.element_size():
            c = c.clone()
            storage = c.untyped_storage()
        if c.numel():
            seen.add(storage.data_ptr())
        out[name] = c
    return out


def _json(owner: str, what: str, value: Any) -> str:
    """``json.dumps(value)`` for plain JSON values; ``TypeError`` naming the first value that is not."""

    def check(v, where):
        if isinstance(v, Tensor):
            raise TypeError(f"{owner}: {where} is a tensor; {what} must hold plain JSON values (numbers, str, ...)")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{owner}: {where} is {v}, which JSON cannot hold")
        if isinstance(v, Mapping):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"{owner}: {where} has a non-str key {k!r}")
                check(x, f"{where}[{k!r}]")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check(x, f"{where}[{i}]")
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise TypeError(f"{owner}: {where} is a {type(v).__name__}; {what} must hold plain JSON values")

    check(value, what)
    return json.dumps(value, allow_nan=False)


def _common_metadata(kind: str, named: Mapping[str, Tensor], model: nn.Module | None) -> dict[str, str]:
    meta = {
        "format": kind,
        "format_version": str(FORMAT_VERSION),
        "ewc_fast_version": __version__,
        "torch_version": torch.__version__,
        "fingerprint": fingerprint(named),
        "dtype": ",".join(sorted({str(t.dtype).replace("torch.", "") for t in named.values()})),
    }
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        params = dict(model.named_parameters())
        meta["model_fingerprint"] = fingerprint(params)
        meta["model_parameters"] = json.dumps(_shapes(params), separators=(",", ":"))
    return meta


def save_importance(
    importance: Importance,
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    estimator: str | None = None,
    normalisation: str | None = None,
) -> Path:
    """Write ``importance`` to the safetensors file ``path`` atomically; returns the path.

    ``model`` (optional, recommended): the model the importance belongs to; its parameter list is
    fingerprinted so that :func:`load_importance` refuses another model. ``estimator`` /
    ``normalisation`` override what is recorded (defaults: ``meta["estimator"]``, or
    ``ewc_fast.SynapticIntelligence`` for SI; the normalisation of the method from :data:`NORMALISATION`,
    ``"unknown"`` for other methods such as sums of different methods)."""
    owner = "save_importance"
    if not isinstance(importance, Importance):
        raise TypeError(f"{owner}: expected an ewc_fast.Importance, got {type(importance).__name__}")
    meta = importance.meta
    if estimator is None:
        estimator = meta.get("estimator") or (
            "ewc_fast.SynapticIntelligence" if importance.method == "si" else "unknown"
        )
    if normalisation is None:
        normalisation = NORMALISATION.get(importance.method, "unknown")
    for label, value in (("estimator", estimator), ("normalisation", normalisation)):
        if not isinstance(value, str):
            raise TypeError(f"{owner}: {label} must be a str, got {type(value).__name__}")
    header = _common_metadata(_IMPORTANCE, importance, model)
    header.update(
        method=importance.method,
        n_samples=str(importance.n_samples),
        estimator=str(estimator),
        normalisation=str(normalisation),
        meta=_json(owner, "meta", meta),
    )
    return _atomic_save(path, _host_copy(importance), header)


def _flatten_state(owner: str, state: Mapping) -> tuple[dict, dict[str, Tensor]]:
    """(JSON-able state with tensor references, {key: tensor}) of a consolidation state dict."""
    tensors: dict[str, Tensor] = {}

    def walk(v, key):
        if isinstance(v, Tensor):
            tensors[key] = v
            return {_TENSOR_REF: key}
        if isinstance(v, Mapping):
            return {str(k): walk(x, f"{key}/{k}" if key else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{key}/{i}") for i, x in enumerate(v)]
        return v

    flat = walk(state, "")
    _json(owner, "the state dict", flat)  # plain values only beyond the tensors
    return flat, tensors


def _unflatten_state(flat, tensors: Mapping[str, Tensor], where: str):
    if isinstance(flat, dict):
        if set(flat) == {_TENSOR_REF}:
            key = flat[_TENSOR_REF]
            if key not in tensors:
                raise ValueError(f"{where}: the state refers to tensor {key!r}, which the file does not hold")
            return tensors[key]
        return {k: _unflatten_state(v, tensors, where) for k, v in flat.items()}
    if isinstance(flat, list):
        return [_unflatten_state(v, tensors, where) for v in flat]
    return flat


def _class_name(obj) -> str:
    for name, cls in _STATE_CLASSES.items():
        if isinstance(obj, cls):
            return name
    raise TypeError(
        f"expected an ewc_fast.EWC, ewc_fast.SynapticIntelligence or ewc_fast.WVA, got {type(obj).__name__}"
    )


def save_state(
    obj: EWC | SynapticIntelligence | WVA, path: str | os.PathLike, *, model: nn.Module | None = None
) -> Path:
    """Write ``obj.state_dict()`` (EWC, SI or WVA) to the safetensors file ``path`` atomically.

    ``model`` (optional) is fingerprinted like in :func:`save_importance`. Returns the path."""
    owner = "save_state"
    cls = _class_name(obj)
    state = obj.state_dict()
    flat, tensors = _flatten_state(owner, state)
    named = {k: t for k, t in tensors.items()}
    header = _common_metadata(_STATE, named, model)
    header.update({"class": cls, "state": json.dumps(flat, allow_nan=False)})
    if isinstance(state.get("state_dtype"), str):
        header["state_dtype"] = state["state_dtype"]
    return _atomic_save(path, _host_copy(tensors), header)


# ------------------------------------------------------------------------------------------ reading
def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an ewc_fast file (no tensor is read). ``ValueError`` if ``path`` is not
    an ewc_fast importance or state file of a known format version."""
    _, safe_open = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise ValueError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") not in (_IMPORTANCE, _STATE):
        raise ValueError(f"{path}: not an ewc_fast importance or state file (format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r}; "
            f"this ewc_fast ({__version__}) reads {FORMAT_VERSION}"
        )
    return meta


def _read(path: Path, kind: str, owner: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    st, _ = _safetensors()
    meta = read_metadata(path)
    if meta["format"] != kind:
        other = "load_state" if kind == _IMPORTANCE else "load_importance"
        raise ValueError(f"{owner}: {path} holds a {meta['format']!r}, not a {kind!r} (use {other})")
    return meta, st.load_file(str(path), device="cpu")


def _check_model(owner: str, path: Path, meta: dict[str, str], model: nn.Module, strict: bool) -> None:
    if strict and "model_fingerprint" in meta and meta["model_fingerprint"] != fingerprint(model):
        saved = json.loads(meta.get("model_parameters", "[]"))
        raise ValueError(
            _diff(owner, path, "model", saved, _shapes(dict(model.named_parameters())))
            + "; pass strict=False to check only the saved entries"
        )


def load_importance(
    path: str | os.PathLike, *, model: nn.Module | None = None, device=None, strict: bool = True
) -> Importance:
    """Read an importance file written by :func:`save_importance`.

    With ``model``: every entry must name a parameter of ``model`` with the same shape, and (if
    ``strict`` and the file recorded one) the model's parameter list must match the saved model's;
    tensors go to their parameter's device unless ``device`` is given. Without ``model`` they go to
    ``device`` (default CPU). Tensors, ``method``, ``n_samples`` and ``meta`` are restored exactly; the
    file's other metadata is added to ``meta`` under ``"file"``."""
    owner = "load_importance"
    path = Path(path)
    meta, tensors = _read(path, _IMPORTANCE, owner)
    if meta.get("fingerprint") != fingerprint(tensors):
        raise ValueError(f"{owner}: {path} is damaged: its tensors do not match the recorded fingerprint")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be a torch.nn.Module or None, got {type(model).__name__}")
        _check_model(owner, path, meta, model, strict)
        params = dict(model.named_parameters())
        mine = {n: params[n] for n in tensors if n in params}
        if len(mine) != len(tensors) or any(
            tuple(params[n].shape) != tuple(t.shape) for n, t in tensors.items() if n in params
        ):
            raise ValueError(_diff(owner, path, "model", _shapes(tensors), _shapes(mine)))
        tensors = {n: t.to(device if device is not None else params[n].device) for n, t in tensors.items()}
    elif device is not None:
        tensors = {n: t.to(device) for n, t in tensors.items()}
    user_meta = json.loads(meta.get("meta", "{}"))
    user_meta["file"] = {k: v for k, v in meta.items() if k not in ("meta", "model_parameters")}
    return Importance(tensors, method=meta["method"], n_samples=int(meta["n_samples"]), meta=user_meta)


def load_state(
    obj: EWC | SynapticIntelligence | WVA,
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    strict: bool = True,
) -> None:
    """Restore a state file written by :func:`save_state` into ``obj`` (of the same class).

    ``obj.load_state_dict`` validates names and shapes against ``obj``'s model and changes nothing on
    failure. ``model`` (optional) is also compared with the saved model's fingerprint when ``strict``."""
    owner = "load_state"
    path = Path(path)
    cls = _class_name(obj)
    meta, tensors = _read(path, _STATE, owner)
    if meta.get("class") != cls:
        raise ValueError(f"{owner}: {path} holds the state of a {meta.get('class')!r}, not of a {cls!r}")
    if meta.get("fingerprint") != fingerprint(tensors):
        raise ValueError(f"{owner}: {path} is damaged: its tensors do not match the recorded fingerprint")
    if model is not None:
        _check_model(owner, path, meta, model, strict)
    state = _unflatten_state(json.loads(meta["state"]), tensors, f"{owner}: {path}")
    try:
        obj.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{owner}: {path} does not fit this {cls}: {exc}") from exc
