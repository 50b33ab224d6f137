"""Side-by-side benchmark: ewc_fast vs the reference implementations and the peer libraries.

For every workload (:mod:`benchmarks.workloads`) x contender (:mod:`benchmarks.contenders`) x task
(``fisher``, ``fisher+mas``, ``fisher_exact``) one row is measured in its OWN subprocess, so that
peak memory is clean:

* time: median of ``--repeats`` runs after one warm-up, with min-max spread (CUDA events on CUDA);
* the same for one plain forward+backward over the same data, measured in the same subprocess on a
  fresh copy of the model; the ratio is the headline number;
* peak extra memory over the baseline taken after model + data creation: peak RSS on CPU (the
  process's RSS high-water mark, reset at the baseline through ``/proc/self/clear_refs`` where the
  kernel allows it, else the ``getrusage`` ``ru_maxrss`` delta), ``torch.cuda.max_memory_allocated``
  on CUDA; also in units of one copy of the parameters;
* relative error ``||result - oracle|| / ||oracle||`` over all parameters against the float64 oracle
  (empirical Fisher, MAS, or -- for nngeometry's FIM -- the exact Fisher). Approximate methods are
  labelled; failures (unsupported layer, OOM, exception, time-out) are rows too.

Then the targets are checked (met / not met) and the consolidation benchmark
(:mod:`benchmarks.bench_consolidation`: penalty and SI rows) is appended. Writes Markdown to
``--out`` (default ``benchmarks/results/RESULTS.md``) and JSON to ``--json`` (default: ``--out``
with ``.json``).

Run: ``python -m benchmarks.compare [--size tiny|small|full] [--workloads ...] [--contenders ...]
[--tasks ...] [--repeats N] [--device cpu|cuda] [--out benchmarks/results/RESULTS.md]``;
re-render / combine runs: ``python -m benchmarks.compare --merge A.json [B.json ...] [--notes MD]``.
Programmatic: :func:`main` (argv list), :func:`run_suite`, :func:`merge_reports`, :func:`format_markdown`.

Modules: :mod:`.cli` (options, ``main``), :mod:`.suite` (the run and the error check),
:mod:`.measure` (one row in this process), :mod:`.isolation` (one row per subprocess),
:mod:`.targets`, :mod:`.consolidation` (penalty / SI section), :mod:`.merge` (``--merge``),
:mod:`.report` (Markdown).
"""

from .cli import DEFAULT_OUT, build_parser, main
from .consolidation import run_consolidation
from .isolation import REPO_ROOT, child_main, run_row_subprocess
from .measure import TASK_METHODS, TASKS, PeakMemory, measure_row
from .merge import merge_reports
from .report import format_markdown, row_summary
from .suite import check_errors, run_suite, select_contenders
from .targets import TARGETS_DOC, evaluate_targets

__all__ = [
    "DEFAULT_OUT",
    "PeakMemory",
    "REPO_ROOT",
    "TARGETS_DOC",
    "TASKS",
    "TASK_METHODS",
    "build_parser",
    "check_errors",
    "child_main",
    "evaluate_targets",
    "format_markdown",
    "main",
    "measure_row",
    "merge_reports",
    "row_summary",
    "run_consolidation",
    "run_row_subprocess",
    "run_suite",
    "select_contenders",
]
