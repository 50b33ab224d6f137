"""Float64 oracle for :func:`ewc_fast.estimate_importance` (slow, obviously correct; for tests).

A float64 copy of the model (eval mode) is differentiated per sample with ``torch.func``
(``functional_call`` of the *whole model* on a batch of one, ``vmap(grad(.))`` over the samples);
each method's formula is then applied literally:

* fisher: mean_n g_n^2 (g_n = ∇ per-sample loss at the true labels),
* fisher_mc: mean_n mean_k g_{n,y_k}^2 with y_k ~ softmax (same generator use as the engine:
  ``random`` first, then per batch ``mc_samples`` draws of ``torch.multinomial`` on fp32 probabilities),
* fisher_exact: mean_n sum_y p(y|x_n) (∇ log p(y|x_n))^2 via the full per-sample Jacobian,
* mas: mean_n |∇ ||f(x_n)||^2| (f = logits or softmax),
* fisher_batched: mean over batches of (mean_{n in batch} g_n)^2,
* sig: from forward hooks, by definition (Linear, Conv via explicit tap slices of the padded input,
  Embedding id counts, norm layers' x_hat), and, for a parameter that enters one of the functions
  ``linear``, ``addmm`` / ``mm`` / ``matmul`` (weight (in, out)), ``embedding``, ``layer_norm``,
  ``rms_norm``, a broadcast ``mul`` (scale) or ``add`` / ``sub`` (shift) outside a module of those
  types that holds it, from that call (:class:`_FunctionSig`); summed over every use of a parameter;
  |w| for parameters of other uses or of modules whose forward never ran,
* magnitude |w|, random U(0, 1).

Returns ``{method: {name: float64 tensor}}``. The oracle shares no code with the estimator it
checks (it imports nothing from :mod:`ewc_fast.estimation`); attention runs on SDPA's math backend.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

_SIG_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _nll(out, y):
    """Sum of token NLLs of one sample: out (C,) or (T, C); y () or (T,) (-100 ignored)."""
    logp = torch.log_softmax(out, -1).reshape(-1, out.shape[-1])
    y = y.reshape(-1)
    keep = y != -100
    picked = logp.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
    return -(picked * keep.to(picked.dtype)).sum()


def _conv_taps(m, x):
    """sum_n sum_positions |x_pad| at every tap: (C_in, *kernel), by explicit strided slices."""
    d = len(m.kernel_size)
    if isinstance(m.padding, str):
        pads = (
            [(0, 0)] * d
            if m.padding == "valid"
            else [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(m.kernel_size, m.dilation)]
        )
    else:
        pads = [(p, p) for p in m.padding]
    flat = [v for lr in reversed(pads) for v in lr]
    xp = F.pad(x, flat, mode="constant" if m.padding_mode == "zeros" else m.padding_mode) if any(flat) else x
    sizes = [(xp.shape[2 + i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1 for i in range(d)]
    out = torch.zeros((x.shape[1],) + tuple(m.kernel_size), dtype=torch.float64)
    for tap in itertools.product(*[range(k) for k in m.kernel_size]):
        sl = [slice(None), slice(None)]
        for i, k in enumerate(tap):
            start = k * m.dilation[i]
            sl.append(slice(start, start + (sizes[i] - 1) * m.stride[i] + 1, m.stride[i]))
        out[(slice(None),) + tap] = xp[tuple(sl)].abs().sum(dim=[0] + list(range(2, 2 + d)))
    return out


def _xhat(m, x):
    if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        dims = tuple(range(-len(m.normalized_shape), 0))
        if isinstance(m, nn.LayerNorm):
            return (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + m.eps)
        eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps
        return x / torch.sqrt(x.square().mean(dims, keepdim=True) + eps)
    if isinstance(m, nn.GroupNorm):
        xg = x.reshape(x.shape[0], m.num_groups, -1)
        xg = (xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, unbiased=False, keepdim=True) + m.eps)
        return xg.reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # BatchNorm, eval
    return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)


def _sig_factor(m, x, y, act, local):
    """Summed-over-batch SIG factor of parameter ``local`` of module ``m`` (float64, param-shaped),
    and whether it is multiplied by |w|."""
    if local == "bias":
        yy = act(y) if act is not None else y
        if (
            isinstance(m, nn.Linear)
            or isinstance(m, (nn.LayerNorm,))
            or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm))
        ):
            return yy.abs().reshape((-1,) + tuple(m.bias.shape)).sum(0), False
        return yy.abs().transpose(0, 1).reshape(m.bias.shape[0], -1).sum(1), False  # channel dim 1
    if isinstance(m, nn.Linear):
        s = x.abs().reshape(-1, m.in_features).sum(0)
        return s.expand(m.out_features, m.in_features), True
    if isinstance(m, nn.modules.conv._ConvNd):
        taps = _conv_taps(m, x)  # (C_in, *k)
        og, cg = m.out_channels // m.groups, m.in_channels // m.groups
        rows = [taps[(o // og) * cg : (o // og + 1) * cg] for o in range(m.out_channels)]
        return torch.stack(rows), True
    if isinstance(m, nn.Embedding):
        ids = x.reshape(-1)
        if m.padding_idx is not None:
            ids = ids[ids != m.padding_idx]
        cnt = torch.bincount(ids, minlength=m.num_embeddings).double()
        return cnt.unsqueeze(1).expand(m.num_embeddings, m.embedding_dim), True
    xh = _xhat(m, x).abs()
    if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
        return xh.transpose(0, 1).reshape(m.weight.shape[0], -1).sum(1), True
    return xh.reshape((-1,) + tuple(m.weight.shape)).sum(0), True


#: function -> {argument position: role} of the parameters whose SIG the oracle takes from the call
_SIG_FUNCS = {
    "linear": {1: "weight", 2: "bias", "weight": "weight", "bias": "bias"},
    "addmm": {0: "bias", 2: "weight_t"},
    "mm": {1: "weight_t"},
    "matmul": {1: "weight_t"},
    "embedding": {1: "weight", "weight": "weight"},
    "layer_norm": {2: "weight", 3: "bias", "weight": "weight", "bias": "bias"},
    "rms_norm": {2: "weight", "weight": "weight"},
    "mul": {0: "scale", 1: "scale"},
    "add": {0: "shift", 1: "shift"},
    "sub": {0: "shift"},
}
_OPERATORS = {"__mul__": "mul", "__rmul__": "mul", "__add__": "add", "__radd__": "add", "__sub__": "sub"}


class _FunctionSig(TorchFunctionMode):
    """Records (parameter, role, call) for the functions of :data:`_SIG_FUNCS` taking a parameter of
    ``pids`` at a role's position, unless the innermost running module (``stack``) is a SIG module
    type that holds that parameter (its forward hook counts it)."""

    def __init__(self, pids: set, stack: list):
        super().__init__()
        self.pids, self.stack, self.calls = pids, stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        name = _OPERATORS.get(name, name)
        roles = _SIG_FUNCS.get(name, {})
        inner = self.stack[-1] if self.stack else None
        for pos, role in roles.items():
            p = (args[pos] if len(args) > pos else None) if isinstance(pos, int) else kwargs.get(pos)
            if not (isinstance(p, nn.Parameter) and id(p) in self.pids):
                continue
            if isinstance(inner, _SIG_TYPES) and any(q is p for q in inner._parameters.values()):
                continue
            self.calls.append((p, name, role, pos, args, kwargs, out))
        return out


def _function_sig_factor(name, role, pos, p, args, kwargs, y):
    """SIG factor (float64, shaped like ``p``) of one function call (module doc), and whether |w| multiplies it."""
    if role == "bias" or role == "shift":
        return y.abs().sum_to_size(p.shape), False
    if role == "scale":
        other = args[1 - pos]
        h = other.abs().expand(y.shape) if isinstance(other, torch.Tensor) else torch.full(y.shape, abs(float(other)))
        return h.to(torch.float64).sum_to_size(p.shape), True
    x = args[1] if name == "addmm" else (args[0] if args else kwargs["input"])
    if role == "weight_t":  # (in, out)
        return x.abs().reshape(-1, p.shape[0]).sum(0).unsqueeze(1).expand(p.shape), True
    if name == "linear":
        return x.abs().reshape(-1, p.shape[1]).sum(0).expand(p.shape), True
    if name == "embedding":
        pad = args[2] if len(args) > 2 else kwargs.get("padding_idx")  # F.embedding(input, weight, padding_idx)
        ids = x.reshape(-1)
        if pad is not None:
            ids = ids[ids != (pad if pad >= 0 else pad + p.shape[0])]
        return torch.bincount(ids, minlength=p.shape[0]).double().unsqueeze(1).expand(p.shape), True
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    dims = tuple(range(-len(shape), 0))
    if name == "layer_norm":
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        xh = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:  # rms_norm
        eps = args[3] if len(args) > 3 else kwargs.get("eps")
        eps = eps if eps is not None else torch.finfo(torch.float32).eps
        xh = x / torch.sqrt(x.square().mean(dims, keepdim=True) + eps)
    return xh.abs().reshape((-1,) + tuple(p.shape)).sum(0), True


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().double() if obj.is_floating_point() else obj.detach().cpu()
    return obj


def reference_importance(
    model: nn.Module,
    data,
    methods=("fisher",),
    *,
    loss_fn=None,
    n_samples=None,
    mc_samples: int = 1,
    mas_output: str = "logits",
    generator=None,
    sig_activation=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Float64 importances by per-sample ``torch.func`` gradients of the whole model (see module doc)."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    sig_activation = sig_activation or {}
    m64 = copy.deepcopy(model).cpu().double().eval()
    orig = dict(model.named_parameters())
    names = [k for k, p in orig.items() if p.requires_grad]
    params = {k: p.detach() for k, p in m64.named_parameters() if k in names}
    res = {m: {k: torch.zeros_like(p) for k, p in params.items()} for m in methods}
    if "random" in methods:
        for k in names:
            p = orig[k]
            res["random"][k] = (
                torch.rand(
                    p.shape,
                    generator=generator,
                    dtype=torch.float32,
                    device=generator.device if generator is not None else p.device,
                )
                .double()
                .cpu()
            )
    if "magnitude" in methods:
        for k in names:
            res["magnitude"][k] = params[k].abs()

    def out1(p, x):
        return functional_call(m64, p, (x.unsqueeze(0),)).squeeze(0)

    def loss1(p, x, y):
        out = out1(p, x)
        if loss_fn is None:
            return _nll(out, y)
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0))[0]

    def mas1(p, x):
        out = out1(p, x)
        f = torch.softmax(out, -1) if mas_output == "softmax" else out
        return f.square().sum()

    def logp1(p, x):
        return torch.log_softmax(out1(p, x), -1)

    # SIG capture: module -> list of (input, output); owners per parameter
    owners = {}
    for mname, mod in m64.named_modules():
        for local, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, mod, local))
    seen_calls: dict[int, list] = {}
    hooks = []
    if "sig" in methods:
        for mod in m64.modules():
            if isinstance(mod, _SIG_TYPES):
                hooks.append(
                    mod.register_forward_hook(
                        lambda mm, a, o: seen_calls.setdefault(id(mm), []).append((a[0].detach(), o.detach()))
                    )
                )
    sig_sum = {k: torch.zeros_like(p) for k, p in params.items()}
    sig_w = {}
    sig_any = set()
    total = batches = 0
    # SDPA's math backend has vmap batching rules (the fused kernels would loop over the samples)
    attention = sdpa_kernel(SDPBackend.MATH)
    attention.__enter__()
    try:
        for batch in data:
            if n_samples is not None and total >= n_samples:
                break
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, y = batch
            elif isinstance(batch, (tuple, list)):
                x, y = batch[0], None
            else:
                x, y = batch, None
            nb = x.shape[0]
            if n_samples is not None and total + nb > n_samples:
                nb = n_samples - total
                x = x[:nb]
                y = y[:nb] if y is not None else None
            if nb == 0:
                continue
            x, y = _to64(x), _to64(y)
            total += nb
            batches += 1
            if "fisher" in methods or "fisher_batched" in methods:
                g = vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)
                for k in names:
                    if "fisher" in methods:
                        res["fisher"][k] += g[k].square().sum(0)
                    if "fisher_batched" in methods:
                        res["fisher_batched"][k] += g[k].mean(0).square()
            if "fisher_mc" in methods:
                with torch.no_grad():
                    logits = m64(x)
                c = logits.shape[-1]
                mask = None
                if logits.dim() > 2 and y is not None and y.shape == logits.shape[:-1]:
                    mask = y != -100
                for _ in range(mc_samples):
                    probs = torch.softmax(logits.float(), -1).reshape(-1, c)
                    if generator is not None:
                        probs = probs.to(generator.device)
                    ys = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).cpu()
                    if mask is not None:
                        ys = torch.where(mask, ys, torch.full_like(ys, -100))
                    g = vmap(grad(lambda p, xx, yy: _nll(out1(p, xx), yy)), in_dims=(None, 0, 0))(params, x, ys)
                    for k in names:
                        res["fisher_mc"][k] += g[k].square().sum(0) / mc_samples
            if "fisher_exact" in methods:
                J = vmap(jacrev(logp1), in_dims=(None, 0))(params, x)  # name -> (n, C, *shape)
                with torch.no_grad():
                    pr = torch.softmax(m64(x), -1)
                for k in names:
                    w = pr.reshape(pr.shape + (1,) * (J[k].dim() - 2))
                    res["fisher_exact"][k] += (w * J[k].square()).sum((0, 1))
            if "mas" in methods:
                g = vmap(grad(mas1), in_dims=(None, 0))(params, x)
                for k in names:
                    res["mas"][k] += g[k].abs().sum(0)
            if "sig" in methods:
                seen_calls.clear()
                real = dict(m64.named_parameters())
                stack: list = []

                def push(mm, a, st=stack):
                    st.append(mm)

                def pop(mm, a, o, st=stack):  # returns None: the output stays as is
                    st.pop()

                marks = [m.register_forward_pre_hook(push) for m in m64.modules()]
                marks += [m.register_forward_hook(pop) for m in m64.modules()]
                fsig = _FunctionSig({id(p) for k, p in real.items() if k in params}, stack)
                try:
                    with torch.no_grad(), fsig:
                        m64(x)
                finally:
                    for h in marks:
                        h.remove()
                name_of = {id(p): k for k, p in real.items()}
                for p, fname, role, pos, a, kw, yout in fsig.calls:
                    k = name_of[id(p)]
                    fac, tw = _function_sig_factor(fname, role, pos, p, a, kw, yout)
                    sig_sum[k] += fac
                    sig_w[k] = tw
                    sig_any.add(k)
                for k in params:
                    for mname, mod, local in owners[id(real[k])]:
                        for xin, yout in seen_calls.get(id(mod), []):
                            fac, tw = _sig_factor(mod, xin, yout, sig_activation.get(mname), local)
                            sig_sum[k] += fac
                            sig_w[k] = tw
                            sig_any.add(k)
    finally:
        attention.__exit__(None, None, None)
        for h in hooks:
            h.remove()
    for m in methods:
        if m in ("magnitude", "random"):
            continue
        for k in names:
            if m == "fisher_batched":
                res[m][k] = res[m][k] / batches
            elif m == "sig":
                if k not in sig_any:
                    res[m][k] = params[k].abs()
                else:
                    res[m][k] = sig_sum[k] / total * (params[k].abs() if sig_w[k] else 1.0)
            else:
                res[m][k] = res[m][k] / total
    return res
