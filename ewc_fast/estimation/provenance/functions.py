"""The propagation rule of every torch function: the sample dimension of a function's output from
its arguments' (:func:`rule`), from the function's semantics and never from sizes (see
:mod:`.provenance`). Indexing is in :mod:`.indexing`. Each rule takes the :class:`~.tracker.Tracker`
``tr`` (its ``prov`` map and the sample count ``n``)."""

from __future__ import annotations

from torch import Tensor

from .dims import BDim, Unknown, broadcast_out, norm_dim, view_map
from .indexing import getitem, setitem

POINTWISE = set(
    """abs absolute acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_not
    bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip copysign cos cosh deg2rad detach div divide
    dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d elu eq erf erfc erfinv exp exp2
    expm1 float_power floor floor_divide fmax fmin fmod frac ge gelu glu_ greater greater_equal gt hardshrink
    hardsigmoid hardswish hardtanh heaviside hypot isfinite isinf isnan isneginf isposinf le leaky_relu lerp
    less less_equal lgamma log log10 log1p log2 logaddexp logical_and logical_not logical_or logical_xor
    logit lt masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative not_equal pow rsub
    rad2deg reciprocal relu relu6 remainder round rrelu rsqrt selu sigmoid sign silu sin sinc sinh softplus
    softshrink sqrt square sub subtract tan tanh threshold true_divide trunc where xlogy clone contiguous
    to type type_as float double half bfloat16 int long bool short byte char cpu cuda requires_grad
    requires_grad_ logsigmoid tanhshrink softsign celu prelu
    and or xor invert iand ior ixor lshift rshift""".split()
)
IGNORE = set(
    """__get__ size dim ndimension numel item tolist __bool__ __len__ __index__ __int__ __float__ __format__
    __repr__ __hash__ stride storage_offset data_ptr is_contiguous is_floating_point is_complex element_size
    nelement __contains__ untyped_storage _version __reduce_ex__ __deepcopy__ is_nonzero equal allclose
    has_names get_device register_hook numpy __array__ backward""".split()
)
PERMUTE = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "T", "mT", "adjoint"}
VIEW = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel"}
REDUCE = set(
    """sum mean amax amin max min var std norm logsumexp prod all any argmax argmin nansum nanmean
    count_nonzero var_mean std_mean median nanmedian mode""".split()
)
ALONG = {"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "_softmax"}
CAT = {"cat", "concat", "concatenate"}
SPLIT = {"split", "chunk", "split_with_sizes", "tensor_split", "unbind", "unsafe_split", "hsplit"}
CREATE = set(
    """new_zeros new_ones new_full new_empty new_tensor zeros_like ones_like full_like empty_like rand_like
    randn_like randint_like arange zeros ones full empty tensor rand randn randint linspace eye tril_indices
    triu_indices as_tensor""".split()
)


def func_name(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return name
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        for pre in ("r", "i"):  # __radd__, __iadd__ -> add
            if core.startswith(pre) and core[1:] in POINTWISE | {"matmul"}:
                return core[1:] + ("_" if pre == "i" else "")
        return {"matmul": "matmul", "getitem": "__getitem__", "setitem": "__setitem__"}.get(core, core)
    return name


def tensor_args(args, kwargs):
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, Tensor))
    return out


def dims_arg(args, kwargs, pos=1):
    d = kwargs.get("dim", kwargs.get("axis", args[pos] if len(args) > pos else None))
    if isinstance(d, Tensor):
        return None
    return d


#: functions that also get the meeting treatment (besides the pointwise ones)
#: recurrent layers (their functions take the batch along dim 1, or dim 0 with batch_first)
RNN = {"lstm", "gru", "rnn_tanh", "rnn_relu"}
MEET_EXTRA = CAT | {"scaled_dot_product_attention"}
#: functions whose input holds the samples along dim 0 by definition (convolutions, pooling, ...)
BATCH0 = set(
    """conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d
    max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d interpolate upsample unfold fold group_norm
    instance_norm batch_norm max_pool1d_with_indices max_pool2d_with_indices pixel_shuffle pixel_unshuffle
    local_response_norm lp_pool1d lp_pool2d""".split()
)


def rule(tr, name, args, kwargs, out):
    P = tr.prov
    n = tr.n
    x = args[0] if args and isinstance(args[0], Tensor) else None
    bx = P.get(x) if x is not None else None
    if name in CREATE:
        return None
    if isinstance(bx, Unknown) and name not in ("__setitem__", "where", "masked_fill"):
        return bx
    if name in POINTWISE or (name.endswith("_") and name[:-1] in POINTWISE):
        tensors = tensor_args(args, kwargs)
        if name.endswith("_") and x is not None:  # in place: output shaped like self
            return broadcast_out([P.get(t) for t in tensors], [tuple(t.shape) for t in tensors], x.dim())
        if not isinstance(out, Tensor):
            return Unknown(f"{name} returned {type(out).__name__}")
        return broadcast_out([P.get(t) for t in tensors], [tuple(t.shape) for t in tensors], out.dim())
    if name in ("expand", "expand_as", "broadcast_to"):
        return BDim(out.dim() - x.dim() + bx.dim, bx.outer, bx.inner) if bx is not None else None
    if name in VIEW or name == "unflatten":
        if bx is None:
            return None
        return view_map(tuple(x.shape), bx, tuple(out.shape), n)
    if name in PERMUTE:
        return _permute(tr, name, args, kwargs, x, bx)
    if name == "unsqueeze":
        d = norm_dim(dims_arg(args, kwargs), x.dim() + 1)
        return bx._replace(dim=bx.dim + (1 if d <= bx.dim else 0))
    if name == "squeeze":
        return view_map(tuple(x.shape), bx, tuple(out.shape), n)
    if name in REDUCE:
        return _reduce(tr, name, args, kwargs, x, bx, out)
    if name in ALONG:
        d = dims_arg(args, kwargs)
        if d is None or norm_dim(d, x.dim()) == bx.dim:
            return Unknown(f"{name} along the sample dimension mixes the samples")
        return bx
    if name in CAT:
        return _cat(tr, args, kwargs)
    if name == "stack":
        return _stack(tr, args, kwargs)
    if name in SPLIT:
        return _split(tr, name, args, kwargs, x, bx, out)
    if name == "__getitem__":
        return getitem(tr, x, bx, args[1], out)
    if name == "__setitem__":
        return setitem(tr, x, bx, args[1], args[2])
    if name in ("linear", "embedding", "layer_norm", "rms_norm", "fused_rms_norm"):
        return _leading(tr, name, args, kwargs, out)
    if name in ("matmul", "mm", "bmm"):
        return _matmul(tr, args[0], args[1], out)
    if name in ("addmm", "baddbmm", "addbmm"):
        inner_out = _matmul(tr, args[1], args[2], out)
        b0 = P.get(args[0]) if isinstance(args[0], Tensor) else None
        if b0 is None:
            return inner_out
        return broadcast_out([b0, inner_out], [tuple(args[0].shape), tuple(out.shape)], out.dim())
    if name in BATCH0:
        return _batch0(tr, name, args, kwargs, x, bx, out)
    if name == "scaled_dot_product_attention":
        return _sdpa(tr, args, kwargs, out)
    if name in RNN:
        return _rnn(tr, name, args, out)
    if name == "multi_head_attention_forward":
        return _mha(tr, args, kwargs, out)
    if name == "einsum":
        return _einsum(tr, args, out)
    if name == "pad":
        if bx is None:
            return None
        return bx if out.shape[bx.dim] == x.shape[bx.dim] else Unknown("pad along the sample dimension")
    if name in ("gather", "index_select", "take_along_dim"):
        return _gather(tr, name, args, kwargs, x, bx, out)
    if name in ("tril", "triu", "diagonal") and bx is not None:
        return bx if bx.dim < x.dim() - 2 else Unknown(f"{name} over the sample dimension")
    if name in ("narrow", "roll", "flip", "repeat_interleave"):
        d = dims_arg(args, kwargs, 1 if name != "roll" else 2)
        if isinstance(d, (list, tuple)):
            ds = [norm_dim(int(v), x.dim()) for v in d]
        else:
            ds = [] if d is None else [norm_dim(int(d), x.dim())]
        if bx is not None and ds and bx.dim not in ds and out.shape[bx.dim] == x.shape[bx.dim]:
            return bx
        return Unknown(f"{name} along (or over) the sample dimension")
    return Unknown(f"no sample-dimension rule for torch function {name!r}")


def _permute(tr, name, args, kwargs, x, bx):
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
        perm = [norm_dim(int(d), nd) for d in dims]
    elif name in ("movedim", "moveaxis"):
        src = args[1] if len(args) > 1 else kwargs["source"]
        dst = args[2] if len(args) > 2 else kwargs["destination"]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(s, nd) for s in src]
        dst = [norm_dim(d, nd) for d in dst]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        rest = iter(i for i in range(nd) if i not in src)
        perm = [p if p is not None else next(rest) for p in perm]
    else:  # transpose / swapaxes / swapdims
        d0 = args[1] if len(args) > 1 else kwargs.get("dim0", kwargs.get("axis0"))
        d1 = args[2] if len(args) > 2 else kwargs.get("dim1", kwargs.get("axis1"))
        d0, d1 = norm_dim(d0, nd), norm_dim(d1, nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return bx._replace(dim=perm.index(bx.dim))


def _reduce(tr, name, args, kwargs, x, bx, out):
    d = dims_arg(args, kwargs)
    if d is None:
        return Unknown(f"{name} over every dimension mixes the samples")
    dims = [norm_dim(int(v), x.dim()) for v in (d if isinstance(d, (list, tuple)) else [d])]
    if bx.dim in dims:
        return Unknown(f"{name} over the sample dimension mixes the samples")
    o = out[0] if isinstance(out, (tuple, list)) else out
    if o.dim() == x.dim():
        return bx
    return bx._replace(dim=bx.dim - sum(1 for v in dims if v < bx.dim))


def _cat(tr, args, kwargs):
    seq = args[0] if args else kwargs["tensors"]
    nd = max(t.dim() for t in seq)
    d = norm_dim(dims_arg(args, kwargs, 1) or 0, nd)
    res = None
    for t in seq:
        b = tr.prov.get(t)
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


def _stack(tr, args, kwargs):
    seq = args[0] if args else kwargs["tensors"]
    d = norm_dim(dims_arg(args, kwargs, 1) or 0, seq[0].dim() + 1)
    res = None
    for t in seq:
        b = tr.prov.get(t)
        if b is None:
            continue
        if isinstance(b, Unknown):
            return b
        cand = b._replace(dim=b.dim + (1 if d <= b.dim else 0))
        if res is not None and res != cand:
            return Unknown("stack of tensors holding their samples differently")
        res = cand
    return res


def _split(tr, name, args, kwargs, x, bx, out):
    if bx is None:
        return None
    if name == "unbind":
        d = norm_dim(dims_arg(args, kwargs) or 0, x.dim())
        if d == bx.dim:
            return Unknown("unbind along the sample dimension")
        return [bx._replace(dim=bx.dim - (1 if d < bx.dim else 0))] * len(out)
    d = norm_dim(dims_arg(args, kwargs, 2) or 0, x.dim())
    if d == bx.dim:
        return Unknown(f"{name} along the sample dimension")
    return [bx] * len(out)


def _leading(tr, name, args, kwargs, out):
    """linear / embedding / layer_norm / rms_norm: the samples stay in the leading dims of the input."""
    x = args[0] if name != "embedding" else args[0]
    bx = tr.prov.get(x)
    if name == "embedding":
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if tr.prov.get(w) is not None:
            return Unknown("embedding with a per-sample weight")
        return bx
    if bx is None:
        others = [tr.prov.get(t) for t in tensor_args(args[1:], kwargs)]
        return Unknown(f"{name} with a per-sample weight") if any(b is not None for b in others) else None
    if name == "linear":
        if bx.dim == x.dim() - 1:
            return Unknown("linear contracts the sample dimension")
        return bx
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    k = 1 if isinstance(shape, int) else len(shape)
    return bx if bx.dim < x.dim() - k else Unknown(f"{name} normalises over the sample dimension")


def _matmul(tr, a, b, out):
    ba = tr.prov.get(a) if isinstance(a, Tensor) else None
    bb = tr.prov.get(b) if isinstance(b, Tensor) else None
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


def _batch0(tr, name, args, kwargs, x, bx, out):
    if bx is None:
        others = [tr.prov.get(t) for t in tensor_args(args[1:], kwargs)]
        return Unknown(f"{name} with per-sample weights") if any(b is not None for b in others) else None
    if bx.dim != 0 or bx.outer != 1:
        return Unknown(f"{name} needs its samples along dim 0 (got dim {bx.dim})")
    return BDim(0, 1, bx.inner)


def _sdpa(tr, args, kwargs, out):
    names = ("query", "key", "value", "attn_mask")
    ts = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(4)]
    bds, shapes = [], []
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            continue
        b = tr.prov.get(t)
        if isinstance(b, Unknown):
            return b
        if b is not None and b.dim >= t.dim() - (2 if i < 3 else 2):
            return Unknown("attention over the sample dimension")
        lead = t.shape[:-2]
        bds.append(b)
        shapes.append(tuple(lead))
    return broadcast_out(bds, shapes, out.dim() - 2)


def _mha(tr, args, kwargs, out):
    q = args[0]
    bq = tr.prov.get(q)
    if bq is None:
        return None
    if isinstance(bq, Unknown):
        return bq
    if q.dim() != 3 or bq.dim != 1 or bq.outer != 1 or bq.inner != 1:
        return Unknown("multi_head_attention_forward attends over the sample dimension")
    return [BDim(1), BDim(0)] if isinstance(out, tuple) else BDim(1)


def _rnn(tr, name, args, out):
    """``torch.lstm`` / ``gru`` / ``rnn_*`` (padded signature ``(input, hx, params, has_biases,
    num_layers, dropout, train, bidirectional, batch_first)``): the samples must sit where the layer
    expects its batch (dim 1, or dim 0 with ``batch_first``) and stay there in the output; the
    hidden states hold them along dim 1."""
    x, hx = args[0], args[1]
    if len(args) != 9 or not isinstance(args[8], bool):
        return Unknown(f"{name} on a packed sequence")
    expected = 0 if args[8] else 1
    bx = tr.prov.get(x)
    for h in [hx] if isinstance(hx, Tensor) else list(hx):
        bh = tr.prov.get(h)
        if bh is not None and bh != BDim(1):
            return bh if isinstance(bh, Unknown) else Unknown(f"{name}: a hidden state holds the samples off dim 1")
    if bx is None:
        return (
            None
            if all(tr.prov.get(h) is None for h in ([hx] if isinstance(hx, Tensor) else hx))
            else (Unknown(f"{name}: per-sample hidden states on a shared input"))
        )
    if x.dim() != 3 or bx != BDim(expected):
        return Unknown(f"{name} runs over the sample dimension (it expects the batch along dim {expected})")
    return [BDim(expected)] + [BDim(1)] * (len(out) - 1)


def _einsum(tr, args, out):
    eq = args[0].replace(" ", "")
    ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if "->" not in eq or "..." in eq:
        return Unknown("einsum without an explicit output (or with '...')")
    lhs, rhs = eq.split("->")
    res = None
    for sub, t in zip(lhs.split(","), ops):
        b = tr.prov.get(t)
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


def _gather(tr, name, args, kwargs, x, bx, out):
    d = norm_dim(dims_arg(args, kwargs), x.dim())
    idx = args[2] if len(args) > 2 else kwargs.get("index")
    bi = tr.prov.get(idx) if isinstance(idx, Tensor) else None
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
