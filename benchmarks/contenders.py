"""Contenders of the comparison benchmark and the float64 oracle they are checked against.

A contender computes importances of a :class:`~benchmarks.workloads.Workload`'s model over its data
and returns ``{method: {param_name: tensor}}`` in the per-sample-mean convention of ewc_fast:

* ``"fisher"``: empirical Fisher ``(1/N) sum_n g_n**2`` (or, for a peer that only computes another
  Fisher variant, that variant -- :meth:`Contender.quantity` names the oracle it is compared with);
* ``"mas"``: ``(1/N) sum_n |d ||f(x_n)||**2 / d theta|`` (``f`` = logits).

``Contender.prepare(workload, model, batches, device, methods)`` does the untimed set-up (wrapping
the model, building loaders) and returns the timed callable; it raises :class:`Unsupported` with the
reason when the contender cannot handle the workload (missing library, unsupported layer, ...).
Memory-hungry contenders that materialise per-sample gradients (Opacus, torch.func, BackPACK's
BatchGrad) split batches into micro-batches so that ``micro * P * 4`` bytes stay under a budget
(``EWC_FAST_BENCH_MEM_BUDGET`` bytes, default a quarter of physical memory); the split is reported.

Contenders labelled *approximate* compute a different quantity on purpose (batch-mean squared
gradients, per-token flattening); their error column shows how far they are from the exact answer.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .workloads import Workload

FISHER, MAS, FISHER_EXACT = "fisher", "mas", "fisher_exact"
ORACLE_QUANTITIES = (FISHER, MAS, FISHER_EXACT)

Result = dict[str, dict[str, Tensor]]  # method -> param name -> tensor


class Unsupported(Exception):
    """The contender cannot compute this workload / method (the message says why)."""


# ------------------------------------------------------------------------------------- utilities
def mem_budget_bytes(device="cpu") -> int:
    """Bytes a contender may spend on materialised per-sample gradients (see module doc): a quarter
    of the device's memory (host RAM on CPU) unless ``EWC_FAST_BENCH_MEM_BUDGET`` says otherwise."""
    env = os.environ.get("EWC_FAST_BENCH_MEM_BUDGET")
    if env:
        return int(float(env))
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory // 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return total // 4


def micro_batch(
    batch_size: int, n_params: int, copies: float = 1.0, bytes_per: int = 4, budget: int | None = None, device="cpu"
) -> int:
    """Largest micro-batch ``m <= batch_size`` with ``m * copies * n_params * bytes_per <= budget``."""
    budget = mem_budget_bytes(device) if budget is None else budget
    per_sample = max(1.0, copies * n_params * bytes_per)
    return int(max(1, min(batch_size, budget // per_sample)))


def split_batches(batches, m: int):
    for x, y in batches:
        for i in range(0, x.shape[0], m):
            yield x[i : i + m], y[i : i + m]


def n_samples_of(batches) -> int:
    return sum(int(y.shape[0]) for _, y in batches)


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def zeros_like_params(model: nn.Module, dtype=torch.float32) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p, dtype=dtype) for n, p in named_params(model)}


def _scale(d: dict[str, Tensor], s: float) -> dict[str, Tensor]:
    return {k: v.mul_(s) for k, v in d.items()}


def relative_error(result: dict[str, Tensor], oracle: dict[str, Tensor]) -> tuple[float, list[str]]:
    """``||result - oracle|| / ||oracle||`` over all parameters (float64), and the names missing
    from ``result`` (counted as zeros)."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    missing = []
    for name, ref in oracle.items():
        ref = ref.detach().to("cpu", torch.float64)
        got = result.get(name)
        if got is None:
            missing.append(name)
            got = torch.zeros_like(ref)
        else:
            got = got.detach().to("cpu", torch.float64).reshape(ref.shape)
        num += (got - ref).pow(2).sum()
        den += ref.pow(2).sum()
    if den == 0:
        return (0.0 if num == 0 else float("inf")), missing
    return float((num / den).sqrt()), missing


# ---------------------------------------------------------------------------- per-sample torch.func
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
    return {q: _scale(d, 1.0 / max(1, n_total)) for q, d in out.items()}


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


def oracle_source() -> str:
    try:
        import ewc_fast.testing.importance  # noqa: F401

        return "ewc_fast.testing.importance (float64 torch.func vmap(grad) / jacrev)"
    except ImportError:
        return "benchmarks.contenders.func_persample (float64 torch.func vmap(grad))"


# ----------------------------------------------------------------------------------- contenders
@dataclass
class Quantity:
    oracle: str  # key of the oracle result it is compared with
    exact: bool  # False: approximate by design (labelled as such in the report)
    note: str = ""  # what it computes, when not obvious


RunFn = Callable[[], Result]


class Contender:
    """Base class. Subclasses set ``name``, ``label``, ``methods`` and implement :meth:`prepare`."""

    name = "?"
    label = "?"
    kind = "peer"  # "ewc_fast" | "reference" | "peer" | "baseline"
    methods: tuple[str, ...] = (FISHER,)
    module: str | None = None  # library it needs (import name)
    tolerance = 1e-4  # relative error allowed for an exact contender (float32 result)

    def why_unavailable(self, device) -> str | None:
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except Exception as exc:
            return f"{self.module} not importable ({type(exc).__name__}: {exc})"
        return None

    def quantity(self, workload: Workload, method: str) -> Quantity:
        return Quantity(method, True)

    def tolerance_for(self, device) -> float:
        """Relative error allowed when the contender claims the exact answer. CUDA: cuDNN convolutions
        use TF32 by default and Triton's ``tl.dot`` on fp32 uses TF32 unless told otherwise (NOTES 2)."""
        return 5e-3 if torch.device(device).type == "cuda" else self.tolerance

    def version(self) -> str:
        if self.module is None:
            return ""
        try:
            from importlib.metadata import version

            dist = {"asdl": "asdfghjkl", "backpack": "backpack-for-pytorch"}.get(self.module, self.module)
            return version(dist)
        except Exception:
            return "?"

    def prepare(self, workload: Workload, model: nn.Module, batches, device, methods: tuple[str, ...]) -> RunFn:
        raise NotImplementedError

    def notes(self) -> list[str]:  # filled by prepare (e.g. micro-batching used)
        return getattr(self, "_notes", [])

    def _note(self, text: str) -> None:
        if not hasattr(self, "_notes"):
            self._notes = []
        self._notes.append(text)


class PlainFwdBwd(Contender):
    """One plain forward + backward of the summed per-sample loss over the same data (the unit)."""

    name = "plain"
    label = "plain forward+backward (reference unit)"
    kind = "reference"
    methods = ()

    def prepare(self, workload, model, batches, device, methods):
        return plain_fwd_bwd_fn(workload, model, batches)


def plain_fwd_bwd_fn(workload: Workload, model: nn.Module, batches) -> RunFn:
    params = [p for _, p in named_params(model)]

    def run():
        for x, y in batches:
            for p in params:
                p.grad = None
            workload.loss_per_sample(model(x), y).sum().backward()
        for p in params:
            p.grad = None
        return {}

    return run


class EwcFast(Contender):
    kind = "ewc_fast"
    methods = (FISHER, MAS, FISHER_EXACT)
    module = "ewc_fast"
    tolerance = 1e-4

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"ewc_fast[{backend}]"
        self.label = f"ewc_fast.estimate_importance(backend={backend!r}), default loss (= the workloads' cross-entropy)"

    def version(self):
        import ewc_fast

        return ewc_fast.__version__

    def why_unavailable(self, device):
        import ewc_fast

        if not hasattr(ewc_fast, "estimate_importance"):
            return "ewc_fast.estimate_importance is not available in this checkout yet"
        if self.backend not in ewc_fast.available_backends(device):
            return f"backend {self.backend} is not available on {device}"
        if self.backend == "triton" and torch.device(device).type != "cuda":
            return "triton on CPU is the interpreter: not benchmarked"
        return None

    def prepare(self, workload, model, batches, device, methods):
        import ewc_fast

        why = self.why_unavailable(device)
        if why:
            raise Unsupported(why)
        estimate = ewc_fast.estimate_importance

        def run():
            res = estimate(model, batches, methods=tuple(methods), backend=self.backend, progress=False)
            return {m: {k: v for k, v in res[m].items()} for m in methods}

        return run


class PerSampleLoop(Contender):
    """Batch-1 backward loop (what the seeds' authors' code does), float32."""

    name = "per-sample-loop"
    label = "per-sample loop (batch-1 forward/backward per sample)"
    kind = "reference"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        pnames = named_params(model)
        params = [p for _, p in pnames]
        n_total = n_samples_of(batches)
        model.eval()

        def run():
            acc = {m: zeros_like_params(model) for m in methods}
            for x, y in batches:
                for i in range(x.shape[0]):
                    out = model(x[i : i + 1])
                    if FISHER in methods:
                        gs = torch.autograd.grad(
                            workload.loss_per_sample(out, y[i : i + 1]).sum(), params, retain_graph=MAS in methods
                        )
                        for (n, _), g in zip(pnames, gs):
                            acc[FISHER][n].addcmul_(g, g)
                    if MAS in methods:
                        gs = torch.autograd.grad(out.pow(2).sum(), params)
                        for (n, _), g in zip(pnames, gs):
                            acc[MAS][n].add_(g.abs())
            return {m: _scale(d, 1.0 / n_total) for m, d in acc.items()}

        return run


class TorchFunc(Contender):
    name = "torch.func"
    label = "torch.func vmap(grad), chunked (float32); exact Fisher: one vmap(grad) pass per class"
    kind = "peer"
    methods = (FISHER, MAS, FISHER_EXACT)

    def version(self):
        return torch.__version__

    def prepare(self, workload, model, batches, device, methods):
        n_params = sum(p.numel() for p in model.parameters())
        chunk = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
        if workload.has_mha or workload.kind == "transformer":
            self._note(
                "no vmap batching rule for CPU SDPA: torch falls back to a per-sample loop there"
                if torch.device(device).type == "cpu"
                else ""
            )
            self._notes = [n for n in self._notes if n]
        if chunk < workload.batch_size:
            self._note(f"chunks of {chunk} samples (memory budget)")

        def run():
            return func_persample(model, batches, methods, workload.loss_per_sample, chunk, torch.float32)

        return run


class OpacusGSM(Contender):
    name = "opacus"
    label = "Opacus GradSampleModule (loss_reduction='sum'), grad_sample**2 summed"
    module = "opacus"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        from opacus import GradSampleModule

        mha = [n for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
        if mha:
            raise Unsupported(
                f"nn.MultiheadAttention ({mha[0]}): Opacus' functorch fallback calls it with the "
                "query only (TypeError: missing 'key' and 'value'); Opacus needs its own "
                "DPMultiheadAttention, a different module with different parameters"
            )
        model.train()  # Opacus only captures activations in training mode (no dropout/BN here)
        try:
            gsm = GradSampleModule(model, loss_reduction="sum", batch_first=True, strict=True)
        except Exception as exc:
            raise Unsupported(f"GradSampleModule: {type(exc).__name__}: {exc}") from exc
        pnames = named_params(model)
        n_params = sum(p.numel() for _, p in pnames)
        m = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
        if m < workload.batch_size:
            self._note(f"micro-batches of {m} samples (memory budget)")
        n_total = n_samples_of(batches)

        def collect(acc, fn):
            for n, p in pnames:
                gsamp = p.grad_sample
                if gsamp is None:
                    raise Unsupported(f"no grad_sample for {n}")
                acc[n] += fn(gsamp)

        def run():
            acc = {mm: zeros_like_params(model) for mm in methods}
            for x, y in split_batches(batches, m):
                if FISHER in methods:
                    gsm.zero_grad(set_to_none=True)
                    workload.loss_per_sample(gsm(x), y).sum().backward()
                    collect(acc[FISHER], lambda g: g.pow(2).sum(0))
                if MAS in methods:
                    gsm.zero_grad(set_to_none=True)
                    gsm(x).pow(2).sum().backward()
                    collect(acc[MAS], lambda g: g.abs().sum(0))
            gsm.zero_grad(set_to_none=True)
            return {mm: _scale(d, 1.0 / n_total) for mm, d in acc.items()}

        return run


class BackPACK(Contender):
    name = "backpack"
    label = "BackPACK SumGradSquared (reduction='sum'); MAS via BatchGrad |.| summed"
    module = "backpack"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, SumGradSquared

        exts = ([SumGradSquared()] if FISHER in methods else []) + ([BatchGrad()] if MAS in methods else [])
        for ext in exts:  # first-order extensions skip unknown layers with a warning: refuse instead
            known = ext.__dict__.get("_BackpropExtension__module_extensions")
            for mod_name, mod in model.named_modules():
                own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
                if own and known is not None and type(mod) not in known:
                    raise Unsupported(
                        f"no BackPACK {type(ext).__name__} extension for {type(mod).__name__} ({mod_name})"
                    )
        model = extend(model)
        lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
        pnames = named_params(model)
        n_params = sum(p.numel() for _, p in pnames)
        n_total = n_samples_of(batches)
        m = workload.batch_size
        if MAS in methods or workload.sequence:  # BatchGrad / per-sample einsum materialise N x P
            m = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
            if m < workload.batch_size:
                self._note(f"micro-batches of {m} samples (memory budget)")

        def run():
            acc = {mm: zeros_like_params(model) for mm in methods}
            for x, y in split_batches(batches, m):
                if FISHER in methods:
                    model.zero_grad(set_to_none=True)
                    loss = lossfn(model(x), y)
                    with backpack(SumGradSquared()):
                        loss.backward()
                    for n, p in pnames:
                        acc[FISHER][n] += p.sum_grad_squared
                        del p.sum_grad_squared
                if MAS in methods:
                    model.zero_grad(set_to_none=True)
                    out = model(x).pow(2).sum()
                    with backpack(BatchGrad()):
                        out.backward()
                    for n, p in pnames:
                        acc[MAS][n] += p.grad_batch.abs().sum(0)
                        del p.grad_batch
            model.zero_grad(set_to_none=True)
            return {mm: _scale(d, 1.0 / n_total) for mm, d in acc.items()}

        return run


class _PrebatchedLoader(torch.utils.data.DataLoader):
    """A DataLoader (nngeometry insists on one) that yields the workload's ready-made batches,
    so that per-sample collation does not count against the peer."""

    def __init__(self, batches):
        xs = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        super().__init__(torch.utils.data.TensorDataset(xs, ys), batch_size=len(batches[0][1]))
        self._batches = batches

    def __iter__(self):
        return iter([(x.clone(), y) for x, y in self._batches])


class NNGeometry(Contender):
    """nngeometry ``FIM(model, loader, PMatDiag)``.

    ``variant="classif_logits"`` computes the *exact* (true) Fisher, the expectation over
    y ~ p(y|x) in closed form -- not the empirical Fisher -- so it is compared with the exact-Fisher
    oracle. ``empirical=True`` uses nngeometry's ``regression`` variant on a 1-output function
    ``x -> loss(x, y)``, whose Gram diagonal is exactly sum_n g_n**2 (the empirical Fisher).
    """

    module = "nngeometry"

    def __init__(self, empirical: bool):
        self.empirical = empirical
        self.methods = (FISHER,) if empirical else (FISHER_EXACT,)
        self.name = "nngeometry-emp" if empirical else "nngeometry"
        self.label = (
            "nngeometry FIM(PMatDiag), variant='regression' on the per-sample loss (empirical Fisher)"
            if empirical
            else "nngeometry FIM(PMatDiag), variant='classif_logits' (exact Fisher)"
        )

    def quantity(self, workload, method):
        if self.empirical:
            return Quantity(FISHER, True, "empirical Fisher via a 1-output 'regression' function")
        return Quantity(FISHER_EXACT, True, "exact Fisher E_{y~p(y|x)} in closed form")

    def prepare(self, workload, model, batches, device, methods):
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag
        from nngeometry.object.vector import PVector

        if not batches[0][0].is_floating_point():
            raise Unsupported("integer (token) inputs: nngeometry sets requires_grad on the inputs")
        try:
            lc = LayerCollection.from_model(model)
        except Exception as exc:
            raise Unsupported(f"LayerCollection: {exc}") from exc
        covered = {
            f"{lid}.{w}"
            for lid, layer in lc.layers.items()
            for w in (("weight", "bias") if layer.bias is not None else ("weight",))
        }
        missing = [n for n, _ in named_params(model) if n not in covered]
        if missing:
            raise Unsupported(
                f"parameters outside nngeometry's layers: {', '.join(missing[:4])}"
                + (" ..." if len(missing) > 4 else "")
            )
        seen3d = []
        hooks = [
            mod.register_forward_hook(lambda mod, a, o, name=name: seen3d.append(name) if a[0].dim() > 2 else None)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)
        ]
        try:
            with torch.no_grad():
                model(batches[0][0][:1])
        finally:
            for h in hooks:
                h.remove()
        if seen3d:
            raise Unsupported(
                f"nn.Linear on (N, T, d) inputs ({seen3d[0]}): nngeometry's Linear rule assumes (N, d) "
                "(RuntimeError: size mismatch)"
            )
        loader = _PrebatchedLoader(batches)
        model.eval()
        kwargs = {}
        if self.empirical:
            kwargs = dict(
                variant="regression", function=lambda x, y: workload.loss_per_sample(model(x), y).unsqueeze(1)
            )
        else:
            kwargs = dict(variant="classif_logits")

        def run():
            fim = FIM(model=model, loader=loader, representation=PMatDiag, device=device, layer_collection=lc, **kwargs)
            d = PVector(lc, vector_repr=fim.get_diag()).to_dict()
            out = {}
            for lid, wb in d.items():
                out[f"{lid}.weight"] = wb[0]
                if len(wb) > 1 and wb[1] is not None:
                    out[f"{lid}.bias"] = wb[1]
            return {self.methods[0]: out}

        return run


class ASDL(Contender):
    name = "asdl"
    label = "ASDL (asdfghjkl) FisherEmp, SHAPE_DIAG"
    module = "asdl"
    methods = (FISHER,)

    def quantity(self, workload, method):
        if workload.sequence:
            return Quantity(FISHER, False, "flattens tokens/positions into samples (per-token approximation)")
        return Quantity(FISHER, True)

    def prepare(self, workload, model, batches, device, methods):
        import asdl
        import torch.nn.functional as F

        model.eval()
        n_total = n_samples_of(batches)
        cfg = asdl.FisherConfig(fisher_type=asdl.FISHER_EMP, fisher_shapes=[asdl.SHAPE_DIAG], data_size=n_total)
        fm = asdl.get_fisher_maker(model, cfg)
        pnames = named_params(model)
        owner = {}
        for mod_name, mod in model.named_modules():
            for pn, _ in mod.named_parameters(recurse=False):
                owner[f"{mod_name}.{pn}" if mod_name else pn] = (mod, pn)

        def run():
            fm.zero_fisher()
            for x, y in batches:
                dummy = fm.setup_model_call(model, x)
                fm.setup_loss_call(F.cross_entropy, dummy, y)
                fm.forward_and_backward(accumulate=True)
            out = {}
            for n, p in pnames:
                mod, pn = owner[n]
                f = getattr(mod, "fisher", None)
                diag = getattr(f, "diag", None) if f is not None else None
                t = getattr(diag, pn, None) if diag is not None else None
                if t is None:
                    raise Unsupported(f"ASDL computed no diagonal for {n} ({type(mod).__name__})")
                out[n] = t.reshape(p.shape)
            model.zero_grad(set_to_none=True)
            return {FISHER: out}

        return run


class AvalancheStyle(Contender):
    """Avalanche's algorithms (EWC ``compute_importances``, MAS ``_get_importance``) reproduced:
    per mini-batch, the *batch-mean* gradient is squared (Fisher) or its absolute value taken (MAS),
    then averaged over batches. Biased and batch-size dependent (van de Ven 2025): approximate."""

    name = "avalanche-style"
    label = "Avalanche-style batch-mean**2 Fisher / |batch-mean| MAS (reproduced)"
    kind = "baseline"
    methods = (FISHER, MAS)

    def quantity(self, workload, method):
        what = "square of batch-mean gradient" if method == FISHER else "abs of batch-mean gradient"
        return Quantity(method, False, what)

    def prepare(self, workload, model, batches, device, methods):
        pnames = named_params(model)
        model.eval()

        def run():
            acc = {m: zeros_like_params(model) for m in methods}
            for x, y in batches:
                if FISHER in methods:
                    model.zero_grad(set_to_none=True)
                    workload.loss_per_sample(model(x), y).mean().backward()
                    for n, p in pnames:
                        acc[FISHER][n] += p.grad.pow(2)
                if MAS in methods:
                    model.zero_grad(set_to_none=True)
                    torch.linalg.vector_norm(model(x), dim=1).pow(2).mean().backward()
                    for n, p in pnames:
                        acc[MAS][n] += p.grad.abs()
            model.zero_grad(set_to_none=True)
            return {m: _scale(d, 1.0 / len(batches)) for m, d in acc.items()}

        return run


def all_contenders(device="cpu") -> list[Contender]:
    """Every contender, in report order (ewc_fast backends for ``device`` first)."""
    backends = ("triton", "torch") if torch.device(device).type == "cuda" else ("cpp", "torch")
    out: list[Contender] = [EwcFast(b) for b in backends]
    out += [
        PerSampleLoop(),
        TorchFunc(),
        OpacusGSM(),
        BackPACK(),
        NNGeometry(False),
        NNGeometry(True),
        ASDL(),
        AvalancheStyle(),
    ]
    return out


def get_contender(name: str, device="cpu") -> Contender:
    if name == "plain":
        return PlainFwdBwd()
    for c in all_contenders(device):
        if c.name == name:
            return c
    if name.startswith("ewc_fast[") and name.endswith("]"):
        return EwcFast(name[len("ewc_fast[") : -1])
    raise ValueError(f"unknown contender {name!r}; valid: plain, " + ", ".join(c.name for c in all_contenders(device)))
