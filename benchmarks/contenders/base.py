"""The contender interface: method names, the result type, :class:`Contender`, and what every
contender implementation shares (parameter dicts, the unsupported-layer refusal).

A contender computes importances of a :class:`~benchmarks.workloads.Workload`'s model over its data
and returns ``{method: {param_name: tensor}}`` in the per-sample-mean convention of ewc_fast:

* ``"fisher"``: empirical Fisher ``(1/N) sum_n g_n**2`` with ``g_n`` the gradient of sample n's loss
  (or, for a peer that only computes another Fisher variant, that variant -- :meth:`Contender.quantity`
  names the oracle it is compared with);
* ``"mas"``: ``(1/N) sum_n |d ||f(x_n)||**2 / d theta|`` (``f`` = logits; Aljundi et al. 2018);
* ``"fisher_exact"``: ``(1/N) sum_n sum_y p(y|x_n) (d log p(y|x_n) / d theta)**2`` (the true Fisher).

``Contender.prepare(workload, model, batches, device, methods)`` does the untimed set-up (wrapping the
model, building loaders) and returns the timed callable; it raises :class:`Unsupported` with the
reason when the contender cannot handle the workload (missing library, unsupported layer, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..workloads import Workload

FISHER, MAS, FISHER_EXACT = "fisher", "mas", "fisher_exact"
ORACLE_QUANTITIES = (FISHER, MAS, FISHER_EXACT)

Result = dict[str, dict[str, Tensor]]  # method -> param name -> tensor
RunFn = Callable[[], Result]


class Unsupported(Exception):
    """The contender cannot compute this workload / method (the message says why)."""


@dataclass
class Quantity:
    """What a contender's result for one method is compared with."""

    oracle: str  # key of the oracle result it is compared with
    exact: bool  # False: approximate by design (labelled as such in the report)
    note: str = ""  # what it computes, when not obvious


class Contender:
    """Base class. Subclasses set ``name``, ``label``, ``methods`` and implement :meth:`prepare`."""

    name = "?"
    label = "?"
    kind = "peer"  # "ewc_fast" | "reference" | "peer" | "baseline"
    methods: tuple[str, ...] = (FISHER,)
    module: str | None = None  # library it needs (import name)
    tolerance = 1e-4  # relative error allowed for an exact contender (float32 result)

    def why_unavailable(self, device) -> str | None:
        """Why the contender cannot run on ``device`` (e.g. its library does not import), or None."""
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except Exception as exc:
            return f"{self.module} not importable ({type(exc).__name__}: {exc})"
        return None

    def quantity(self, workload: Workload, method: str) -> Quantity:
        """The oracle quantity ``method``'s result is compared with, and whether it is exact."""
        return Quantity(method, True)

    def tolerance_for(self, device) -> float:
        """Relative error allowed when the contender claims the exact answer. CUDA: cuDNN convolutions
        use TF32 by default (PyTorch docs, "CUDA semantics: TensorFloat-32") and Triton's ``tl.dot`` on
        fp32 inputs uses TF32 unless ``input_precision`` says otherwise (Triton docs, ``triton.language.dot``)."""
        return 5e-3 if torch.device(device).type == "cuda" else self.tolerance

    def version(self) -> str:
        """Installed version of the library the contender needs ("" if none, "?" if unknown)."""
        if self.module is None:
            return ""
        try:
            from importlib.metadata import version

            dist = {"asdl": "asdfghjkl", "backpack": "backpack-for-pytorch"}.get(self.module, self.module)
            return version(dist)
        except Exception:
            return "?"

    def prepare(self, workload: Workload, model: nn.Module, batches, device, methods: tuple[str, ...]) -> RunFn:
        """Untimed set-up; returns the timed callable that computes ``methods`` over ``batches``."""
        raise NotImplementedError

    def row_extras(self) -> dict:
        """Fields the last run adds to its row (e.g. ewc_fast's ``fallback``); none by default."""
        return {}

    def notes(self) -> list[str]:
        """Notes :meth:`prepare` left for the report (e.g. the micro-batching it used)."""
        return getattr(self, "_notes", [])

    def _note(self, text: str) -> None:
        if not hasattr(self, "_notes"):
            self._notes = []
        self._notes.append(text)


# ------------------------------------------------------------------- shared by the implementations
def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def zeros_like_params(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A zero accumulator per trainable parameter."""
    return {n: torch.zeros_like(p, dtype=dtype) for n, p in named_params(model)}


def scale_(d: dict[str, Tensor], s: float) -> dict[str, Tensor]:
    """Multiply every tensor of ``d`` by ``s`` in place; returns ``d``'s tensors in a new dict."""
    return {k: v.mul_(s) for k, v in d.items()}


def refuse_modules(
    model: nn.Module, unsupported: Callable[[nn.Module], bool], reason: Callable[[str, nn.Module], str]
) -> None:
    """Raise :class:`Unsupported` with ``reason(name, module)`` for the first submodule (in
    ``named_modules`` order) that ``unsupported(module)`` flags; return quietly when none is."""
    for name, mod in model.named_modules():
        if unsupported(mod):
            raise Unsupported(reason(name, mod))
