"""Contenders of the comparison benchmark and the float64 oracle they are checked against.

A contender computes importances of a :class:`~benchmarks.workloads.Workload`'s model over its data
and returns ``{method: {param_name: tensor}}`` in the per-sample-mean convention of ewc_fast
(empirical Fisher ``(1/N) sum_n g_n**2``, MAS ``(1/N) sum_n |d ||f(x_n)||**2 / d theta|``, exact
Fisher; see :mod:`.base`). Contenders labelled *approximate* compute a different quantity on purpose
(batch-mean squared gradients, per-token flattening); their error column shows how far they are
from the exact answer. Memory-hungry contenders split batches to a budget (:mod:`.budget`).

Modules:

* :mod:`.base` -- method names, :class:`Contender`, :class:`Unsupported`, :class:`Quantity`, helpers
* :mod:`.budget` -- per-sample-gradient memory budget, micro-batching
* :mod:`.oracle` -- float64 oracle (``torch.func`` / ``ewc_fast.testing.importance``), relative error
* :mod:`.reference` -- plain forward+backward (the unit), batch-1 loop
* :mod:`.ours` -- ``ewc_fast.estimate_importance`` per backend
* :mod:`.torch_func`, :mod:`.opacus_gsm`, :mod:`.backpack_sgs`, :mod:`.nngeometry_fim`,
  :mod:`.asdl_fisher` -- one module per peer library
* :mod:`.avalanche_style` -- Avalanche's batch-mean importances, reproduced (approximate baseline)
* :mod:`.avalanche_lib` -- the real Avalanche plugins' importance passes (runs in the Avalanche environment)
* :mod:`.registry` -- :func:`all_contenders`, :func:`get_contender`
"""

from .asdl_fisher import ASDL
from .avalanche_lib import AvalancheLib
from .avalanche_style import AvalancheStyle
from .backpack_sgs import BackPACK
from .base import (
    FISHER,
    FISHER_EXACT,
    MAS,
    ORACLE_QUANTITIES,
    Contender,
    Quantity,
    Result,
    RunFn,
    Unsupported,
    named_params,
    refuse_modules,
    scale_,
    zeros_like_params,
)
from .budget import mem_budget_bytes, micro_batch, n_samples_of, physical_memory_bytes, split_batches
from .nngeometry_fim import NNGeometry
from .opacus_gsm import OpacusGSM
from .oracle import func_persample, oracle_importance, oracle_source, relative_error
from .ours import EwcFast
from .reference import PerSampleLoop, PlainFwdBwd, plain_fwd_bwd_fn
from .registry import all_contenders, get_contender
from .torch_func import TorchFunc

__all__ = [
    "ASDL",
    "AvalancheLib",
    "AvalancheStyle",
    "BackPACK",
    "Contender",
    "EwcFast",
    "FISHER",
    "FISHER_EXACT",
    "MAS",
    "NNGeometry",
    "ORACLE_QUANTITIES",
    "OpacusGSM",
    "PerSampleLoop",
    "PlainFwdBwd",
    "Quantity",
    "Result",
    "RunFn",
    "TorchFunc",
    "Unsupported",
    "all_contenders",
    "func_persample",
    "get_contender",
    "mem_budget_bytes",
    "micro_batch",
    "n_samples_of",
    "named_params",
    "oracle_importance",
    "oracle_source",
    "physical_memory_bytes",
    "plain_fwd_bwd_fn",
    "refuse_modules",
    "relative_error",
    "scale_",
    "split_batches",
    "zeros_like_params",
]
