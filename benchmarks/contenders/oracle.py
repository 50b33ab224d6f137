"""The float64 oracle the contenders are checked against, and the relative error of a result.

* :func:`func_persample`: per-sample gradients with ``torch.func.vmap(grad)`` in chunks, reduced to
  the empirical Fisher ``(1/N) sum_n g_n**2``, MAS ``(1/N) sum_n |d ||f(x_n)||**2 / d theta|`` and
  the exact Fisher ``(1/N) sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta)**2``. It is both the
  benchmark's own oracle (float64) and the ``torch.func`` contender (float32).
* :func:`oracle_importance`: the oracle on a float64 copy of a workload's model and data, by default
  ewc_fast's independent oracle :func:`ewc_fast.testing.importance.reference_importance`.
* :func:`relative_error`: ``||result - oracle|| / ||oracle||`` over all parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..workloads import Workload
from .base import FISHER, FISHER_EXACT, MAS, Result, named_params, scale_
from .budget import mem_budget_bytes, micro_batch, split_batches


def func_persample(
    model: nn.Module, batches, quantities: Iterable[str], loss_per_sample: Callable, chunk: int, acc_dtype: torch.dtype
) -> Result:
    """Per-sample gradients with ``torch.func.vmap(grad)`` over chunks of ``chunk`` samples.

    Returns ``{q: {name: (1/N) sum_n stat_n}}`` for q in ``fisher`` (g**2 of the per-sample loss),
    ``mas`` (|grad of ||f||**2|) and ``fisher_exact`` (sum_y p(y|x) (grad -log p(y|x))**2, one
    vmap pass per class). Accumulated in ``acc_dtype``. Shared by the oracle (float64 model) and the
    torch.func contender (float32).
    """
    from torch.func import functional_call, grad, vmap

    quantities = tuple(quantities)
    params = {n: p.detach() for n, p in named_params(model)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    state = {**frozen, **buffers}

    def logits_one(p, x):
        return functional_call(model, (p, state), (x.unsqueeze(0),)).squeeze(0)

    def loss_one(p, x, y):
        return loss_per_sample(logits_one(p, x).unsqueeze(0), y.unsqueeze(0)).squeeze(0)

    def mas_one(p, x):
        return logits_one(p, x).pow(2).sum()

    def nll_class_one(p, x, c):
        return -torch.log_softmax(logits_one(p, x), dim=-1)[c]

    g_loss = vmap(grad(loss_one), in_dims=(None, 0, 0))
    g_mas = vmap(grad(mas_one), in_dims=(None, 0))
    g_nll = vmap(grad(nll_class_one), in_dims=(None, 0, None))
    out = {q: {n: torch.zeros_like(p, dtype=acc_dtype) for n, p in params.items()} for q in quantities}
    n_total = 0
    for x, y in split_batches(batches, chunk):
        n_total += int(y.shape[0])
        if FISHER in quantities:
            for n, g in g_loss(params, x, y).items():
                out[FISHER][n] += g.to(acc_dtype).pow(2).sum(0)
        if MAS in quantities:
            for n, g in g_mas(params, x).items():
                out[MAS][n] += g.to(acc_dtype).abs().sum(0)
        if FISHER_EXACT in quantities:
            with torch.no_grad():
                probs = torch.softmax(functional_call(model, (params, state), (x,)), dim=-1)
            for c in range(probs.shape[-1]):
                pc = probs[:, c].to(acc_dtype)
                for n, g in g_nll(params, x, torch.tensor(c, device=x.device)).items():
                    w = pc.reshape((-1,) + (1,) * (g.dim() - 1))
                    out[FISHER_EXACT][n] += (w * g.to(acc_dtype).pow(2)).sum(0)
    return {q: scale_(d, 1.0 / max(1, n_total)) for q, d in out.items()}


def oracle_importance(
    workload: Workload,
    quantities: Iterable[str] = (FISHER, MAS),
    *,
    device="cpu",
    chunk: int | None = None,
    source: str = "auto",
) -> Result:
    """Float64 oracle on the workload's float32 model and data cast to float64, in chunks.

    ``source="auto"`` uses ewc_fast's own oracle :func:`ewc_fast.testing.importance.reference_importance`
    when it is importable (torch.func on a float64 copy; its results are independent of how the data
    are chunked for fisher / mas / fisher_exact), else this module's :func:`func_persample`
    (``source="benchmarks"``). The chunk size keeps the per-sample gradients (and, for the exact
    Fisher, per-sample Jacobians: C x P per sample) under min(budget, 2 GiB).
    """
    quantities = tuple(quantities)
    if getattr(workload, "oracle", "func") == "loop" and source == "auto":
        return loop_oracle(workload, quantities)
    ref = None
    if source in ("auto", "ewc_fast"):
        try:
            from ewc_fast.testing.importance import reference_importance as ref
        except ImportError:
            if source == "ewc_fast":
                raise
    if ref is not None:
        device = "cpu"  # ewc_fast's oracle computes on CPU
    model = workload.make_model(device=device).double()
    batches = [(x.double() if x.is_floating_point() else x, y) for x, y in workload.make_batches(device=device)]
    n_params = sum(p.numel() for p in model.parameters())
    if chunk is None:
        copies = (workload.n_classes + 1) if FISHER_EXACT in quantities else 2
        chunk = micro_batch(
            workload.batch_size, n_params, copies=copies, bytes_per=8, budget=min(mem_budget_bytes(), 2 << 30)
        )
    if ref is not None:
        res = ref(model, list(split_batches(batches, chunk)), quantities, loss_fn=workload.loss_per_sample)
        return {q: {k: v.to(torch.float64) for k, v in res[q].items()} for q in quantities}
    return func_persample(model, batches, quantities, workload.loss_per_sample, chunk, torch.float64)


def loop_oracle(workload: Workload, quantities: Iterable[str]) -> Result:
    """Float64 oracle by a per-sample loop of plain autograd (:mod:`ewc_fast.testing.per_sample`), for
    workloads whose model cannot run under ``vmap`` (``workload.oracle == "loop"``)."""
    from ewc_fast.testing.per_sample import loop_reference

    model = workload.make_model()
    batches = workload.make_batches()
    res = loop_reference(model, batches, tuple(quantities), loss_fn=workload.loss_per_sample)
    return {q: {k: v.to(torch.float64) for k, v in res[q].items()} for q in quantities}


def oracle_source() -> str:
    """Which oracle :func:`oracle_importance` uses here (recorded in the report)."""
    try:
        import ewc_fast.testing.importance  # noqa: F401

        return (
            "ewc_fast.testing.importance (float64 torch.func vmap(grad) / jacrev); Hugging Face workloads: "
            "ewc_fast.testing.per_sample (float64 per-sample loop)"
        )
    except ImportError:
        return "benchmarks.contenders.oracle.func_persample (float64 torch.func vmap(grad))"


def relative_error(result: dict[str, Tensor], oracle: dict[str, Tensor]) -> tuple[float, list[str]]:
    """``||result - oracle|| / ||oracle||`` over all parameters (float64), and the names missing
    from ``result`` (counted as zeros). A result of the wrong size (a peer that ignores a layer's
    ``groups``, say) makes the error infinite and is listed with its shape."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    missing = []
    for name, ref in oracle.items():
        ref = ref.detach().to("cpu", torch.float64)
        got = result.get(name)
        if got is None:
            missing.append(name)
            got = torch.zeros_like(ref)
        elif got.numel() != ref.numel():
            missing.append(f"{name} (wrong shape {tuple(got.shape)}, expected {tuple(ref.shape)})")
            num += float("inf")
            continue
        else:
            got = got.detach().to("cpu", torch.float64).reshape(ref.shape)
        num += (got - ref).pow(2).sum()
        den += ref.pow(2).sum()
    if den == 0:
        return (0.0 if num == 0 else float("inf")), missing
    return float((num / den).sqrt()), missing
