"""Which dimension of every tensor of a forward holds the samples, decided by provenance.

The batch contract makes the roots: every tensor of a batch holds one row per sample along dim 0
(:mod:`.batches` checks that they agree). A ``TorchFunctionMode`` (:class:`Tracker`) then follows
every torch function the forward calls and records, for each tensor it produces, a :class:`BDim`:

* ``BDim(dim, outer, inner)``: ``size[dim] == outer * N * inner`` and sample n owns the indices
  ``o * N * inner + n * inner + i`` of that dimension (``outer = inner = 1``: a plain batch
  dimension; ``inner > 1``: the samples were flattened with the positions after them, e.g. the
  ``(N * T, E)`` view GPT-2's ``Conv1D`` multiplies; ``outer > 1``: with positions before them);
* no entry: the tensor does not derive from the batch (shared by all samples: parameters, buffers,
  ``arange``, a ``(1, T)`` position-id tensor, shapes read as Python ints);
* :class:`Unknown`: it derives from the batch but no rule could say how (an op that mixes the
  samples, e.g. a reduction over the batch dimension, or a function without a propagation rule).

A dimension is never taken for the batch because of its size: each rule maps the batch dimension
of the arguments to the output from the function's semantics (broadcasting from the right for
pointwise functions, stride arithmetic for views, the contraction structure of ``matmul``, ...),
and an advanced index on the batch dimension keeps it only when its values are verified to be
the identity ``arange(N)``. So sequence-first tensors (``(T, N, E)``), N == T and flattened
``(N * T, E)`` views are all told apart exactly.

The tracker also serves discovery (which functions each trainable parameter enters, inside which
module: :mod:`.plan`), the capture of function-level calls (:mod:`.rules.functional`), and
*meetings*: when a tensor derived from a planned call's shared output (e.g. GPT-2's position
embeddings of ``(1, T)`` ids) is combined with per-sample data, the shared operand is replaced by
an explicit broadcast whose gradient is per sample (:mod:`.shared`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BDim", "Unknown", "Tracker", "batch_first", "lookup"]


class BDim(NamedTuple):
    """The samples of a tensor: dimension ``dim`` of size ``outer * N * inner`` (module doc)."""

    dim: int
    outer: int = 1
    inner: int = 1


class Unknown(NamedTuple):
    """A tensor derived from the batch whose sample dimension could not be followed, and why."""

    reason: str


def batch_first(t: Tensor, bd, n: int, what: str = "tensor") -> Tensor:
    """``t`` with its samples as a leading dimension of size ``n`` (``bd`` from :class:`Tracker`).

    A plain batch dimension is moved to the front; a flattened one is unflattened first (the
    outer/inner factors stay as dimensions). A shared tensor is broadcast to every sample (an
    ``expand``, no copy). :class:`Unknown` raises ValueError with its reason."""
    if isinstance(bd, Unknown):
        raise ValueError(f"cannot tell which dimension of the {what} {tuple(t.shape)} holds the samples: {bd.reason}")
    if bd is None:
        return t.unsqueeze(0).expand((n,) + tuple(t.shape))
    d = bd.dim
    if bd.outer == 1 and bd.inner == 1:
        return t.movedim(d, 0) if d else t
    return t.unflatten(d, (bd.outer, n, bd.inner)).movedim(d + 1, 0)


def lookup(prov: WeakIdKeyDictionary, t) -> BDim | Unknown | None:
    return prov.get(t) if isinstance(t, Tensor) else None


# ----------------------------------------------------------------------------- propagation helpers
def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def view_map(in_shape, bd: BDim, out_shape, n: int):
    """The batch dimension of a row-major view of ``in_shape`` as ``out_shape`` (stride arithmetic)."""
    below = bd.inner * _prod(in_shape[bd.dim + 1 :])  # elements per step of the sample index
    # for N > 1 at most one dimension qualifies; for N == 1 every split is right: take the outermost
    for e in range(len(out_shape)):
        size, p = int(out_shape[e]), _prod(out_shape[e + 1 :])
        if p > 0 and below % p == 0:
            inner = below // p
            if size % (inner * n) == 0 and size >= inner * n:
                return BDim(e, size // (inner * n), inner)
    return Unknown(f"a view {tuple(in_shape)} -> {tuple(out_shape)} splits the sample dimension")


def _broadcast_out(bds, shapes, out_ndim: int):
    """Pointwise functions: every tracked argument's batch dimension aligned from the right; all agree."""
    res = None
    for bd, shape in zip(bds, shapes):
        if bd is None:
            continue
        if isinstance(bd, Unknown):
            return bd
        cand = BDim(out_ndim - len(shape) + bd.dim, bd.outer, bd.inner)
        if res is not None and res != cand:
            return Unknown("two arguments hold their samples along different dimensions")
        res = cand
    return res


_POINTWISE = set(
    """abs absolute acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_not
    bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip copysign cos cosh deg2rad detach div divide
    dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d elu eq erf erfc erfinv exp exp2
    expm1 float_power floor floor_divide fmax fmin fmod frac ge gelu glu_ greater greater_equal gt hardshrink
    hardsigmoid hardswish hardtanh heaviside hypot isfinite isinf isnan isneginf isposinf le leaky_relu lerp
    less less_equal lgamma log log10 log1p log2 logaddexp logical_and logical_not logical_or logical_xor
    logit lt masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative not_equal pow
    rad2deg reciprocal relu relu6 remainder round rrelu rsqrt selu sigmoid sign silu sin sinc sinh softplus
    softshrink sqrt square sub subtract tan tanh threshold true_divide trunc where xlogy clone contiguous
    to type type_as float double half bfloat16 int long bool short byte char cpu cuda requires_grad
    requires_grad_ logsigmoid tanhshrink softsign celu prelu
    and or xor invert iand ior ixor lshift rshift""".split()
)
_IGNORE = set(
    """__get__ size dim ndimension numel item tolist __bool__ __len__ __index__ __int__ __float__ __format__
    __repr__ __hash__ stride storage_offset data_ptr is_contiguous is_floating_point is_complex element_size
    nelement __contains__ untyped_storage _version __reduce_ex__ __deepcopy__ is_nonzero equal allclose
    has_names get_device register_hook numpy __array__ backward""".split()
)
_PERMUTE = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "T", "mT", "adjoint"}
_VIEW = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel"}
_REDUCE = set(
    """sum mean amax amin max min var std norm logsumexp prod all any argmax argmin nansum nanmean
    count_nonzero var_mean std_mean median nanmedian mode""".split()
)
_ALONG = {"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "_softmax"}
_CAT = {"cat", "concat", "concatenate"}
_SPLIT = {"split", "chunk", "split_with_sizes", "tensor_split", "unbind", "unsafe_split", "hsplit"}
_CREATE = set(
    """new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like full_like empty_like rand_like
    randn_like randint_like arange zeros ones full empty tensor rand randn randint linspace eye tril_indices
    triu_indices as_tensor""".split()
)


def _name(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return name
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        for pre in ("r", "i"):  # __radd__, __iadd__ -> add
            if core.startswith(pre) and core[1:] in _POINTWISE | {"matmul"}:
                return core[1:] + ("_" if pre == "i" else "")
        return {"matmul": "matmul", "getitem": "__getitem__", "setitem": "__setitem__"}.get(core, core)
    return name


def _tensor_args(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Tensor))
    return out


def _dims_arg(args, kwargs, pos=1):
    d = kwargs.get("dim", kwargs.get("axis", args[pos] if len(args) > pos else None))
    if isinstance(d, Tensor):
        return None
    return d


class Tracker(TorchFunctionMode):
    """Follows the batch dimension through a forward (module doc).

    ``prov`` maps tensors to :class:`BDim` / :class:`Unknown`; ``on_call(func, name, args, kwargs,
    out)`` (set by the users: discovery, function capture) is called after every function that
    involves a tensor and may return a replacement for ``out``; ``on_meet`` builds the per-sample
    broadcast of a tainted shared operand."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.prov = WeakIdKeyDictionary()
        self.taint = WeakIdKeyDictionary()  # shared tensor -> tuple of origins (planned shared outputs)
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
        name = _name(func)
        if name in _IGNORE:
            return func(*args, **kwargs)
        tensors = _tensor_args(args, kwargs)
        tracked = any(t in self.prov for t in tensors)
        base = name[:-1] if name.endswith("_") and not name.endswith("__") else name
        if tracked and self.taint and self.on_meet is not None and base in _POINTWISE | _MEET_EXTRA:
            args, kwargs = self._meet(func, name, args, kwargs, tensors)
        out = func(*args, **kwargs)
        if tracked:
            try:
                bd = self._rule(name, args, kwargs, out)
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
        if name in _CAT:
            out_ndim = tensors[0].dim()
            bd = None
            for t in tensors:
                b = self.prov.get(t)
                if isinstance(b, BDim):
                    bd = b
            if bd is None:
                return args, kwargs
            cat_dim = _norm(_dims_arg(args, kwargs, 1) or 0, out_ndim)
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
        bd = _broadcast_out([self.prov.get(t) for t in tensors], shapes, len(out_shape))
        if not isinstance(bd, BDim):
            return args, kwargs

        def sub(x):
            if isinstance(x, Tensor) and x in self.taint and x not in self.prov:
                return self.on_meet(x, self.taint[x], bd, out_shape, self)
            return x

        return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}

    # ------------------------------------------------------------------------------- the rules
    def _rule(self, name, args, kwargs, out):
        P = self.prov
        n = self.n
        x = args[0] if args and isinstance(args[0], Tensor) else None
        bx = P.get(x) if x is not None else None
        if name in _CREATE:
            return None
        if isinstance(bx, Unknown) and name not in ("__setitem__", "where", "masked_fill"):
            return bx
        if name in _POINTWISE or (name.endswith("_") and name[:-1] in _POINTWISE):
            tensors = _tensor_args(args, kwargs)
            if name.endswith("_") and x is not None:  # in place: output shaped like self
                return _broadcast_out([P.get(t) for t in tensors], [tuple(t.shape) for t in tensors], x.dim())
            if not isinstance(out, Tensor):
                return Unknown(f"{name} returned {type(out).__name__}")
            return _broadcast_out([P.get(t) for t in tensors], [tuple(t.shape) for t in tensors], out.dim())
        if name in ("expand", "expand_as", "broadcast_to"):
            return BDim(out.dim() - x.dim() + bx.dim, bx.outer, bx.inner) if bx is not None else None
        if name in _VIEW or name == "unflatten":
            if bx is None:
                return None
            return view_map(tuple(x.shape), bx, tuple(out.shape), n)
        if name in _PERMUTE:
            return self._permute(name, args, kwargs, x, bx)
        if name == "unsqueeze":
            d = _norm(_dims_arg(args, kwargs), x.dim() + 1)
            return bx._replace(dim=bx.dim + (1 if d <= bx.dim else 0))
        if name == "squeeze":
            return view_map(tuple(x.shape), bx, tuple(out.shape), n)
        if name in _REDUCE:
            return self._reduce(name, args, kwargs, x, bx, out)
        if name in _ALONG:
            d = _dims_arg(args, kwargs)
            if d is None or _norm(d, x.dim()) == bx.dim:
                return Unknown(f"{name} along the sample dimension mixes the samples")
            return bx
        if name in _CAT:
            return self._cat(args, kwargs)
        if name == "stack":
            return self._stack(args, kwargs)
        if name in _SPLIT:
            return self._split(name, args, kwargs, x, bx, out)
        if name == "__getitem__":
            return self._getitem(x, bx, args[1], out)
        if name == "__setitem__":
            return self._setitem(x, bx, args[1], args[2])
        if name in ("linear", "embedding", "layer_norm", "rms_norm", "fused_rms_norm"):
            return self._leading(name, args, kwargs, out)
        if name in ("matmul", "mm", "bmm"):
            return self._matmul(args[0], args[1], out)
        if name in ("addmm", "baddbmm", "addbmm"):
            inner_out = self._matmul(args[1], args[2], out)
            b0 = P.get(args[0]) if isinstance(args[0], Tensor) else None
            if b0 is None:
                return inner_out
            return _broadcast_out([b0, inner_out], [tuple(args[0].shape), tuple(out.shape)], out.dim())
        if name in _BATCH0:
            return self._batch0(name, args, kwargs, x, bx, out)
        if name == "scaled_dot_product_attention":
            return self._sdpa(args, kwargs, out)
        if name == "multi_head_attention_forward":
            return self._mha(args, kwargs, out)
        if name == "einsum":
            return self._einsum(args, out)
        if name == "pad":
            if bx is None:
                return None
            return bx if out.shape[bx.dim] == x.shape[bx.dim] else Unknown("pad along the sample dimension")
        if name in ("gather", "index_select", "take_along_dim"):
            return self._gather(name, args, kwargs, x, bx, out)
        if name in ("tril", "triu", "diagonal") and bx is not None:
            return bx if bx.dim < x.dim() - 2 else Unknown(f"{name} over the sample dimension")
        if name in ("narrow", "roll", "flip", "repeat_interleave"):
            d = _dims_arg(args, kwargs, 1 if name != "roll" else 2)
            if isinstance(d, (list, tuple)):
                ds = [_norm(int(v), x.dim()) for v in d]
            else:
                ds = [] if d is None else [_norm(int(d), x.dim())]
            if bx is not None and ds and bx.dim not in ds and out.shape[bx.dim] == x.shape[bx.dim]:
                return bx
            return Unknown(f"{name} along (or over) the sample dimension")
        return Unknown(f"no sample-dimension rule for torch function {name!r}")

    def _permute(self, name, args, kwargs, x, bx):
        if bx is None:
            return None
        nd = x.dim()
        if name in ("t", "T", "adjoint", "mT"):
            if nd < 2:
                return bx
            perm = list(range(nd))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            if name == "T":
                perm = list(reversed(range(nd)))
        elif name == "permute":
            dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else args[1]
            dims = kwargs.get("dims", dims)
            perm = [_norm(int(d), nd) for d in dims]
        elif name in ("movedim", "moveaxis"):
            src = args[1] if len(args) > 1 else kwargs["source"]
            dst = args[2] if len(args) > 2 else kwargs["destination"]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm(s, nd) for s in src]
            dst = [_norm(d, nd) for d in dst]
            perm = [None] * nd
            for s, d in zip(src, dst):
                perm[d] = s
            rest = iter(i for i in range(nd) if i not in src)
            perm = [p if p is not None else next(rest) for p in perm]
        else:  # transpose / swapaxes / swapdims
            d0 = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
            d1 = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
            d0, d1 = _norm(d0, nd), _norm(d1, nd)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        return bx._replace(dim=perm.index(bx.dim))

    def _reduce(self, name, args, kwargs, x, bx, out):
        d = _dims_arg(args, kwargs)
        if d is None:
            return Unknown(f"{name} over every dimension mixes the samples")
        dims = [_norm(int(v), x.dim()) for v in (d if isinstance(d, (list, tuple)) else [d])]
        if bx.dim in dims:
            return Unknown(f"{name} over the sample dimension mixes the samples")
        o = out[0] if isinstance(out, (tuple, list)) else out
        if o.dim() == x.dim():
            return bx
        return bx._replace(dim=bx.dim - sum(1 for v in dims if v < bx.dim))

    def _cat(self, args, kwargs):
        seq = args[0] if args else kwargs["tensors"]
        nd = max(t.dim() for t in seq)
        d = _norm(_dims_arg(args, kwargs, 1) or 0, nd)
        res = None
        for t in seq:
            b = self.prov.get(t)
            if b is None:
                continue
            if isinstance(b, Unknown):
                return b
            if b.dim == d:
                return Unknown("cat along the sample dimension")
            if res is not None and res != b:
                return Unknown("cat of tensors holding their samples differently")
            res = b
        return res

    def _stack(self, args, kwargs):
        seq = args[0] if args else kwargs["tensors"]
        d = _norm(_dims_arg(args, kwargs, 1) or 0, seq[0].dim() + 1)
        res = None
        for t in seq:
            b = self.prov.get(t)
            if b is None:
                continue
            if isinstance(b, Unknown):
                return b
            cand = b._replace(dim=b.dim + (1 if d <= b.dim else 0))
            if res is not None and res != cand:
                return Unknown("stack of tensors holding their samples differently")
            res = cand
        return res

    def _split(self, name, args, kwargs, x, bx, out):
        if bx is None:
            return None
        if name == "unbind":
            d = _norm(_dims_arg(args, kwargs) or 0, x.dim())
            if d == bx.dim:
                return Unknown("unbind along the sample dimension")
            return [bx._replace(dim=bx.dim - (1 if d < bx.dim else 0))] * len(out)
        d = _norm(_dims_arg(args, kwargs, 2) or 0, x.dim())
        if d == bx.dim:
            return Unknown(f"{name} along the sample dimension")
        return [bx] * len(out)

    def _leading(self, name, args, kwargs, out):
        """linear / embedding / layer_norm / rms_norm: the samples stay in the leading dims of the input."""
        x = args[0] if name != "embedding" else args[0]
        bx = self.prov.get(x)
        if name == "embedding":
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if self.prov.get(w) is not None:
                return Unknown("embedding with a per-sample weight")
            return bx
        if bx is None:
            others = [self.prov.get(t) for t in _tensor_args(args[1:], kwargs)]
            return Unknown(f"{name} with a per-sample weight") if any(b is not None for b in others) else None
        if name == "linear":
            if bx.dim == x.dim() - 1:
                return Unknown("linear contracts the sample dimension")
            return bx
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        k = 1 if isinstance(shape, int) else len(shape)
        return bx if bx.dim < x.dim() - k else Unknown(f"{name} normalises over the sample dimension")

    def _matmul(self, a, b, out):
        ba = self.prov.get(a) if isinstance(a, Tensor) else None
        bb = self.prov.get(b) if isinstance(b, Tensor) else None
        if ba is None and bb is None:
            return None
        if isinstance(ba, Unknown) or isinstance(bb, Unknown):
            return ba if isinstance(ba, Unknown) else bb
        if a.dim() < 2 or b.dim() < 2:
            return Unknown("matmul with a 1-D per-sample operand")
        nd = out.dim()
        cands = []
        if ba is not None:
            if ba.dim == a.dim() - 1:
                return Unknown("matmul contracts the sample dimension")
            cands.append(ba._replace(dim=nd - 2) if ba.dim == a.dim() - 2 else ba._replace(dim=nd - a.dim() + ba.dim))
        if bb is not None:
            if bb.dim == b.dim() - 2:
                return Unknown("matmul contracts the sample dimension")
            cands.append(bb._replace(dim=nd - 1) if bb.dim == b.dim() - 1 else bb._replace(dim=nd - b.dim() + bb.dim))
        if len(cands) == 2 and cands[0] != cands[1]:
            return Unknown("matmul of operands holding their samples differently")
        return cands[0]

    def _batch0(self, name, args, kwargs, x, bx, out):
        if bx is None:
            others = [self.prov.get(t) for t in _tensor_args(args[1:], kwargs)]
            return Unknown(f"{name} with per-sample weights") if any(b is not None for b in others) else None
        if bx.dim != 0 or bx.outer != 1:
            return Unknown(f"{name} needs its samples along dim 0 (got dim {bx.dim})")
        return BDim(0, 1, bx.inner)

    def _sdpa(self, args, kwargs, out):
        names = ("query", "key", "value", "attn_mask")
        ts = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(4)]
        bds, shapes = [], []
        for i, t in enumerate(ts):
            if not isinstance(t, Tensor):
                continue
            b = self.prov.get(t)
            if isinstance(b, Unknown):
                return b
            if b is not None and b.dim >= t.dim() - (2 if i < 3 else 2):
                return Unknown("attention over the sample dimension")
            lead = t.shape[:-2]
            bds.append(b)
            shapes.append(tuple(lead))
        return _broadcast_out(bds, shapes, out.dim() - 2)

    def _mha(self, args, kwargs, out):
        q = args[0]
        bq = self.prov.get(q)
        if bq is None:
            return None
        if isinstance(bq, Unknown):
            return bq
        if q.dim() != 3 or bq.dim != 1 or bq.outer != 1 or bq.inner != 1:
            return Unknown("multi_head_attention_forward attends over the sample dimension")
        return [BDim(1), BDim(0)] if isinstance(out, tuple) else BDim(1)

    def _einsum(self, args, out):
        eq = args[0].replace(" ", "")
        ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if "->" not in eq or "..." in eq:
            return Unknown("einsum without an explicit output (or with '...')")
        lhs, rhs = eq.split("->")
        res = None
        for sub, t in zip(lhs.split(","), ops):
            b = self.prov.get(t)
            if b is None:
                continue
            if isinstance(b, Unknown):
                return b
            if b.outer != 1 or b.inner != 1:
                return Unknown("einsum of flattened samples")
            letter = sub[b.dim]
            if letter not in rhs:
                return Unknown("einsum contracts the sample dimension")
            cand = BDim(rhs.index(letter))
            if res is not None and res != cand:
                return Unknown("einsum of operands holding their samples differently")
            res = cand
        return res

    def _gather(self, name, args, kwargs, x, bx, out):
        d = _norm(_dims_arg(args, kwargs), x.dim())
        idx = args[2] if len(args) > 2 else kwargs.get("index")
        bi = self.prov.get(idx) if isinstance(idx, Tensor) else None
        if isinstance(bi, Unknown):
            return bi
        if bx is not None and d == bx.dim:
            return Unknown(f"{name} along the sample dimension")
        if name == "index_select":
            return bx if bi is None else Unknown("index_select with per-sample indices")
        cands = [b for b in (bx, bi) if b is not None]
        if len(cands) == 2 and cands[0] != cands[1]:
            return Unknown(f"{name}: input and index hold their samples differently")
        return cands[0] if cands else None

    # ------------------------------------------------------------------------------- indexing
    def _index_items(self, idx, ndim):
        """Normalise an index to a list of (kind, item) over input dims: 'basic' items consume one
        input dim (int / slice), None inserts, tensors are advanced (a bool mask consumes its ndim)."""
        items = list(idx) if isinstance(idx, tuple) else [idx]
        consumed = 0
        for it in items:
            if it is None or it is Ellipsis:
                continue
            if isinstance(it, Tensor) and it.dtype == torch.bool:
                consumed += it.dim()
            else:
                consumed += 1
        out = []
        for it in items:
            if it is Ellipsis:
                out.extend([slice(None)] * (ndim - consumed))
            else:
                out.append(it)
        while (
            sum(1 for it in out if it is not None and not (isinstance(it, Tensor) and it.dtype == torch.bool))
            + sum(it.dim() for it in out if isinstance(it, Tensor) and it.dtype == torch.bool)
            < ndim
        ):
            out.append(slice(None))
        return out

    def _getitem(self, x, bx, idx, out):
        if isinstance(idx, list):
            idx = torch.tensor(idx) if all(isinstance(i, int) for i in idx) else tuple(idx)
        items = self._index_items(idx, x.dim())
        adv = [(k, it) for k, it in enumerate(items) if isinstance(it, (Tensor, list)) and not isinstance(it, bool)]
        if any(isinstance(it, Tensor) and it.dtype == torch.bool for _, it in adv):
            return Unknown("boolean-mask indexing of a per-sample tensor")
        in_dim = 0
        out_pos = 0
        basic_map = {}  # input dim -> output dim (basic items), advanced input dims -> None
        adv_in_dims = []
        first_adv_out = None
        for it in items:
            if it is None:
                out_pos += 1
                continue
            if isinstance(it, (Tensor, list)):
                adv_in_dims.append(in_dim)
                if first_adv_out is None:
                    first_adv_out = out_pos
                in_dim += 1
                continue
            if isinstance(it, int):
                basic_map[in_dim] = None
                in_dim += 1
                continue
            basic_map[in_dim] = out_pos
            in_dim += 1
            out_pos += 1
        if not adv:
            if bx is None:
                return None
            o = basic_map.get(bx.dim)
            if o is None:
                return Unknown("an integer index on the sample dimension")
            if out.shape[o] != x.shape[bx.dim]:
                return Unknown("a slice of the sample dimension")
            return bx._replace(dim=o)
        # advanced indexing: broadcast index shape B placed at first_adv_out if adjacent, else at 0
        idx_ts = [torch.as_tensor(it) for _, it in adv]
        B = tuple(torch.broadcast_shapes(*[tuple(t.shape) for t in idx_ts]))
        adjacent = adv_in_dims == list(range(adv_in_dims[0], adv_in_dims[0] + len(adv_in_dims)))
        start = first_adv_out if adjacent else 0
        shift = 0 if adjacent else len(B)

        def basic_out(d):
            o = basic_map.get(d)
            if o is None:
                return None
            return o + (len(B) if (adjacent and o >= start) else 0) if adjacent else o + shift

        res = None
        if bx is not None and bx.dim not in adv_in_dims:
            o = basic_out(bx.dim)
            if o is None or out.shape[o] != x.shape[bx.dim]:
                return Unknown("an index on the sample dimension")
            res = bx._replace(dim=o)
        for (_, it), t, d in zip(adv, idx_ts, adv_in_dims):
            bt = self.prov.get(it) if isinstance(it, Tensor) else None
            if isinstance(bt, Unknown):
                return bt
            if bt is not None:
                if bt.outer != 1 or bt.inner != 1:
                    return Unknown("advanced index with flattened samples")
                cand = BDim(start + len(B) - t.dim() + bt.dim)
                if res is not None and res != cand:
                    return Unknown("advanced indexing mixes the samples")
                res = cand
            if bx is not None and d == bx.dim:
                if bx.outer != 1 or bx.inner != 1:
                    return Unknown("advanced index on flattened samples")
                j = self._identity_dim(t, len(B))
                if j is None:
                    return Unknown("an advanced index on the sample dimension that is not the identity arange(N)")
                cand = BDim(start + j)
                if res is not None and res != cand:
                    return Unknown("advanced indexing mixes the samples")
                res = cand
        return res

    def _identity_dim(self, t: Tensor, nb: int):
        """j if ``t`` (broadcast to ``nb`` dims) is ``arange(N)`` along dim j and constant elsewhere."""
        if t.dtype == torch.bool or t.is_floating_point():
            return None
        shape = (1,) * (nb - t.dim()) + tuple(t.shape)
        big = [j for j, s in enumerate(shape) if s != 1]
        if len(big) != 1 or shape[big[0]] != self.n:
            return None
        vals = t.reshape(-1)
        if not torch.equal(vals.cpu(), torch.arange(self.n)):
            return None
        return big[0]

    def _setitem(self, x, bx, idx, v):
        bv = self.prov.get(v) if isinstance(v, Tensor) else None
        if isinstance(bv, Unknown):
            return bv
        if bv is None:
            return bx  # shared values written into some elements: the samples stay where they were
        view = x[idx] if not isinstance(idx, list) else x[tuple(idx)]
        tmp = Tracker(self.n)
        tmp.prov[x] = BDim(0) if bx is None else bx  # only the map of the dims matters here
        items_bd = tmp._getitem(x, None if bx is None else bx, idx, view) if bx is not None else None
        # where v's samples land inside the view (aligned from the right)
        vd = view.dim() - v.dim() + bv.dim
        if vd < 0 or view.shape[vd] != v.shape[bv.dim]:
            return Unknown("__setitem__ broadcasts per-sample values")
        # map the view dim back to x's dim: basic slices only
        items = self._index_items(idx if not isinstance(idx, list) else tuple(idx), x.dim())
        if any(isinstance(it, (Tensor, list)) for it in items):
            return Unknown("__setitem__ of per-sample values through an advanced index")
        in_dim = out_pos = 0
        for it in items:
            if it is None:
                out_pos += 1
                continue
            if isinstance(it, int):
                in_dim += 1
                continue
            if out_pos == vd:
                if x.shape[in_dim] != view.shape[vd]:
                    return Unknown("__setitem__ of per-sample values into a slice of the sample dimension")
                cand = bv._replace(dim=in_dim)
                if bx is not None and bx != cand:
                    return Unknown("__setitem__ mixes the samples")
                del items_bd
                return cand
            in_dim += 1
            out_pos += 1
        return Unknown("__setitem__ of per-sample values")


#: functions that also get the meeting treatment (besides the pointwise ones)
_MEET_EXTRA = _CAT | {"scaled_dot_product_attention"}
#: functions whose input holds the samples along dim 0 by definition (convolutions, pooling, ...)
_BATCH0 = set(
    """conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d
    max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d interpolate upsample unfold fold group_norm
    instance_norm batch_norm max_pool1d_with_indices max_pool2d_with_indices pixel_shuffle pixel_unshuffle
    local_response_norm lp_pool1d lp_pool2d""".split()
)
