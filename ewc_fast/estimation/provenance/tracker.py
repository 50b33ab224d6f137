"""The ``TorchFunctionMode`` that follows the samples through a forward (see :mod:`.provenance`):
provenance bookkeeping, the users' callbacks (``on_call``: discovery and function capture;
``on_meet``: per-sample broadcasts of tainted shared operands) and the meetings themselves."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .dims import BDim, IdMap, Unknown, broadcast_out, norm_dim
from .functions import CAT, IGNORE, MEET_EXTRA, POINTWISE, dims_arg, func_name, rule, tensor_args

__all__ = ["Tracker"]


class Tracker(TorchFunctionMode):
    """Follows the batch dimension through a forward (module doc).

    ``prov`` maps tensors to :class:`BDim` / :class:`Unknown`; ``on_call(func, name, args, kwargs,
    out)`` (set by the users: discovery, function capture) is called after every function that
    involves a tensor and may return a replacement for ``out``; ``on_meet`` builds the per-sample
    broadcast of a tainted shared operand."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.prov = IdMap()
        self.taint = IdMap()  # shared tensor -> tuple of origins (planned shared outputs)
        self.on_call = None
        self.on_meet = None
        self.stack: list = []  # innermost module last (maintained by the users' module hooks)

    # ------------------------------------------------------------------------------ bookkeeping
    def mark_inputs(self, leaves) -> None:
        for t in leaves:
            if isinstance(t, Tensor) and t.dim() > 0:
                self.prov[t] = BDim(0)

    def get(self, t):
        return self.prov.get(t) if isinstance(t, Tensor) else None

    def set(self, out, bd) -> None:
        if isinstance(out, Tensor):
            if bd is None:
                self.prov.pop(out, None)
            else:
                self.prov[out] = bd
        elif isinstance(out, (tuple, list)):
            for o in out:
                self.set(o, bd)

    # -------------------------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func_name(func)
        if name in IGNORE:
            return func(*args, **kwargs)
        tensors = tensor_args(args, kwargs)
        tracked = any(t in self.prov for t in tensors)
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        if tracked and self.taint and self.on_meet is not None and base in POINTWISE | MEET_EXTRA:
            args, kwargs = self._meet(func, name, args, kwargs, tensors)
        out = func(*args, **kwargs)
        if tracked:
            try:
                bd = rule(self, name, args, kwargs, out)
            except Exception as e:  # a rule that cannot parse this call: be safe
                bd = Unknown(f"{name}: {type(e).__name__}: {e}")
            self._set_out(name, args, out, bd)
        elif self.taint and any(t in self.taint for t in tensors):
            origins = tuple({id(o): o for t in tensors if t in self.taint for o in self.taint[t]}.values())
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, Tensor) and o.requires_grad:
                    self.taint[o] = origins
        if self.on_call is not None and tensors:
            res = self.on_call(func, name, args, kwargs, out)
            if res is not None:  # the capture hands on aliases / clones of a recorded output
                out = res
        return out

    def _set_out(self, name, args, out, bd) -> None:
        if name in ("__setitem__",) or (name.endswith("_") and not name.startswith("_") and args):
            tgt = args[0]
            if isinstance(tgt, Tensor):
                self.set(tgt, bd)
            return
        if isinstance(bd, list):  # per output (split)
            for o, b in zip(out, bd):
                self.set(o, b)
            return
        self.set(out, bd)

    # ----------------------------------------------------------------------------- meetings
    def _meet(self, func, name, args, kwargs, tensors):
        """A tainted shared operand meets per-sample data: swap it for its explicit broadcast."""
        shapes = [tuple(t.shape) for t in tensors]
        if name == "scaled_dot_product_attention":  # an additive mask meets the (N, ..., L, S) scores
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            bq = self.prov.get(q)
            if not (isinstance(bq, BDim) and isinstance(mask, Tensor) and mask in self.taint and mask not in self.prov):
                return args, kwargs
            scores = tuple(q.shape[:-1]) + (k.shape[-2],)
            s_b = self.on_meet(mask, self.taint[mask], bq, scores, self)
            if len(args) > 3:
                return tuple(args[:3]) + (s_b,) + tuple(args[4:]), kwargs
            return args, {**kwargs, "attn_mask": s_b}
        if name == "matmul":
            return args, kwargs
        if name in CAT:
            out_ndim = tensors[0].dim()
            bd = None
            for t in tensors:
                b = self.prov.get(t)
                if isinstance(b, BDim):
                    bd = b
            if bd is None:
                return args, kwargs
            cat_dim = norm_dim(dims_arg(args, kwargs, 1) or 0, out_ndim)
            if cat_dim == bd.dim:
                return args, kwargs

            def sub(x):
                if isinstance(x, Tensor) and x in self.taint and x not in self.prov:
                    return self.on_meet(x, self.taint[x], bd, tuple(x.shape), self)
                return x

            seq = args[0] if args else kwargs["tensors"]
            new = type(seq)(sub(x) for x in seq)
            return ((new,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "tensors": new})
        inplace = name.endswith("_") and args and isinstance(args[0], Tensor)
        try:
            out_shape = tuple(args[0].shape) if inplace else tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            return args, kwargs
        bd = broadcast_out([self.prov.get(t) for t in tensors], shapes, len(out_shape))
        if not isinstance(bd, BDim):
            return args, kwargs

        def sub(x):
            if isinstance(x, Tensor) and x in self.taint and x not in self.prov:
                return self.on_meet(x, self.taint[x], bd, out_shape, self)
            return x

        return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}
