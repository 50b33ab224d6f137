"""Watching inside ``nn.MultiheadAttention`` calls during the capture forward (for :mod:`.attention`).

``nn.MultiheadAttention.forward`` calls ``F.multi_head_attention_forward`` with its weights directly.
:class:`MHAWatch` is a torch-function mode, entered outside the provenance tracker (so the tracker
still sees, and follows the samples through, one ``multi_head_attention_forward`` call). When the
tracker runs that call for a watched module, the mode runs PyTorch's own implementation with
itself active (a copy of the function whose ``has_torch_function`` test is off, so the call does
not dispatch to the mode again) and records, per call, what the rule needs:

* each input projection ``linear(x, w, b)`` whose weight is a row block of ``in_proj_weight`` (or is
  ``q/k/v_proj_weight``): the rows it covers and its output tensor P (T, N, rows). Autograd computes
  G_P = dseed/dP anyway (to back-propagate to x), so the rule gets [G_q | G_k | G_v] without
  recomputing the attention: the per-sample weight gradient of those rows is G_P^T x per sample;
* the input of the output projection, the context C (L*N, E) (row l*N + n), for out_proj's G_Y^T C;
* ``bias_k.repeat(1, N, 1)`` / ``bias_v.repeat(1, N, 1)`` (``add_bias_kv``): the (1, N, E) tensor
  whose gradient at sample n is bias_k's per-sample gradient.

Everything else (masks, ``is_causal``, ``need_weights``, ``add_zero_attn``, dropout, which is off in
eval mode) is PyTorch's own code differentiated by autograd, so it is exact by construction. The
projection outputs and the repeats are handed to the capture as the call's *inner* tensors
(:class:`~.base.InnerCapture`), with their samples along dim 1 (PyTorch runs the attention
sequence-first).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..provenance import BDim, Unknown
from .base import InnerCapture

__all__ = ["MHAWatch", "Record", "watch_available"]

_MHA = F.multi_head_attention_forward
_SIG = inspect.signature(_MHA)


class _Globals(dict):
    """torch.nn.functional's namespace, read live (a name patched there is seen), but for
    ``has_torch_function``, which is off."""

    def __init__(self):
        super().__init__(has_torch_function=lambda *_a, **_k: False)

    def __missing__(self, key):
        return _MHA.__globals__[key]


def _body_without_dispatch():
    """``F.multi_head_attention_forward`` whose ``has_torch_function`` test is off (None if this
    torch's function does not have that shape): run under the mode, its own calls reach the mode."""
    code = _MHA.__code__
    if "has_torch_function" not in code.co_names:
        return None
    body = types.FunctionType(code, _Globals(), _MHA.__name__, _MHA.__defaults__, _MHA.__closure__)
    body.__kwdefaults__ = _MHA.__kwdefaults__
    return body


_BODY = _body_without_dispatch()


def watch_available() -> bool:
    """Whether calls can be watched (else the rule leaves nn.MultiheadAttention to the fallback)."""
    return _BODY is not None


@dataclass
class Record:
    """What one call of a watched module did. ``entries`` is aligned with ``tensors`` (the inner
    tensors): ``("proj", r0, rows, name)`` for an input projection P (T, N, rows) covering rows
    r0:r0+rows of the 3E stacked q/k/v rows (parameter ``name``), with a trailing ``"stacked"`` when
    the tensor is PyTorch's blockwise copy of P (rows / E, T, N, E) instead; ``("bias", name)`` for
    a bias_k/bias_v repeat.
    ``ctx`` is the context C (L*N, E) (row l*N + n) or None, ``N`` the batch size inside the call."""

    module: nn.Module
    entries: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    ctx: Tensor | None = None
    N: int = 0


def _rows_of(w: Tensor, p: Tensor) -> int | None:
    """First row of ``p`` that ``w`` is (a row block of ``p`` sharing its storage), else None."""
    if w is p:
        return 0
    if (
        w.dim() != 2
        or p.dim() != 2
        or w.dtype != p.dtype
        or w.device != p.device
        or w.stride() != p.stride()
        or w.shape[1] != p.shape[1]
        or w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    ):
        return None
    off = w.storage_offset() - p.storage_offset()
    if off < 0 or off % p.stride(0) or off // p.stride(0) + w.shape[0] > p.shape[0]:
        return None
    return off // p.stride(0)


class MHAWatch(TorchFunctionMode, InnerCapture):  # the mode first: its __enter__ pushes it
    """The torch-function mode of the module doc, serving every watched ``nn.MultiheadAttention``."""

    def __init__(self):
        TorchFunctionMode.__init__(self)
        self.modules: dict[int, nn.Module] = {}
        self.rec: Record | None = None  # the call being run
        self.last: Record | None = None  # the last finished call, until the capture takes it

    def add(self, module: nn.Module) -> None:
        self.modules[id(module)] = module

    def take(self, module: nn.Module, n: int):
        rec, self.last = self.last, None
        if rec is None or rec.module is not module:
            return (), [], None
        dims = []
        for t in rec.tensors:  # (T, N, rows), or (k, T, N, E) for a stacked projection (_stacked)
            d = t.dim() - 2
            dims.append(BDim(d) if d in (1, 2) and t.shape[d] == n else Unknown(_bad_batch(t, n)))
        tensors, rec.tensors = tuple(rec.tensors), []
        return tensors, dims, rec

    def _owner(self, b: dict) -> nn.Module | None:
        """The watched module whose weights a multi_head_attention_forward call uses."""
        for m in self.modules.values():
            if (
                b["out_proj_weight"] is m.out_proj.weight
                and b["in_proj_weight"] is m.in_proj_weight
                and b.get("q_proj_weight") is m.q_proj_weight
            ):
                return m
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _MHA and self.rec is None and _BODY is not None:
            b = _SIG.bind(*args, **kwargs).arguments
            m = self._owner(b)
            if m is not None:
                self.rec = Record(m)
                try:
                    with self:  # PyTorch's implementation, its own calls seen by this mode
                        out = _BODY(*args, **kwargs)
                    self.last = self.rec
                finally:
                    self.rec = None
                return out
        out = func(*args, **kwargs)
        if self.rec is not None:
            self._see(func, args, kwargs, out)
        return out

    def _see(self, func, args, kwargs, out) -> None:
        rec, m = self.rec, self.rec.module
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if w is m.out_proj.weight:
                rec.ctx = x.detach()
                return
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = m._parameters.get(name)
                r0 = _rows_of(w, p) if isinstance(p, Tensor) else None
                if r0 is not None:
                    if name != "in_proj_weight":  # separate weights: q/k/v rows of the virtual 3E rows
                        r0 += ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(name) * m.embed_dim
                    rec.entries.append(("proj", r0, w.shape[0], name))
                    rec.tensors.append(out)
                    rec.N = x.shape[1] if x.dim() == 3 else 1
                    return
        elif func is Tensor.contiguous and args and isinstance(out, Tensor) and out is not args[0]:
            self._stacked(args[0], out)
        elif func is Tensor.repeat and args:
            for name in ("bias_k", "bias_v"):
                if args[0] is getattr(m, name, None):
                    rec.entries.append(("bias", name))
                    rec.tensors.append(out)
                    return

    def _stacked(self, x: Tensor, out: Tensor) -> None:
        """PyTorch's packed projection copies its output P (T, N, k*E) into blocks (k, T, N, E) (then
        q, k, v are views of the copy, which autograd keeps for the attention's backward). Watch the
        copy instead of P, so that P is not kept alive: same gradient, blocks stacked in front."""
        rec = self.rec
        for i, (entry, p) in enumerate(zip(rec.entries, rec.tensors)):
            if entry[0] != "proj" or len(entry) > 4 or p.dim() != 3 or _root(x) is not _root(p):
                continue
            k = x.shape[0] if x.dim() == 4 else 0
            E = p.shape[2] // max(k, 1)
            if (
                k > 0
                and k * E == p.shape[2]
                and tuple(x.shape) == (k, p.shape[0], p.shape[1], E)
                and x.stride() == (E * p.stride(2), p.stride(0), p.stride(1), p.stride(2))
                and x.storage_offset() == p.storage_offset()
            ):  # x[j, t, n, e] = P[t, n, j*E + e]
                rec.entries[i] = entry + ("stacked",)
                rec.tensors[i] = out
            return


def _root(t: Tensor) -> Tensor:
    """The tensor whose storage a view chain started from (``t`` itself if not a view)."""
    return t if t._base is None else t._base


def _bad_batch(t: Tensor, n: int) -> str:
    return (
        f"nn.MultiheadAttention ran on a batch of {t.shape[t.dim() - 2] if t.dim() in (3, 4) else 'none'} (tensor "
        f"{tuple(t.shape)}, sequence-first inside), not the {n} samples: it would mix the samples "
        "(pass the samples along its batch dimension)"
    )


def context_batch_first(rec: Record, lo: int, hi: int) -> Tensor:
    """The context C of samples lo:hi, (c, L, E), from the recorded (L*N, E) (row l*N + n)."""
    ctx = rec.ctx
    return ctx.view(ctx.shape[0] // rec.N, rec.N, ctx.shape[-1])[:, lo:hi].transpose(0, 1)
