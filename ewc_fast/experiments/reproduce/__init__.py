"""``ewc-fast reproduce``: the Kutalev & Lapina reproduction on full MNIST, written to RESULTS.md.

Three parts (``--only`` picks some), each saved as JSON under ``OUT/results/`` and rendered together
into ``OUT/RESULTS.md`` (every number in that file comes from those JSON files):

``table``
    Kutalev & Lapina 2021 (arXiv 2109.10021): permuted MNIST, 10 tasks (task 0 unpermuted), FC 784-300-150-10
    leaky-ReLU, Adam lr 1e-3, 6 epochs per task, batch 100, importances on the last 5000 training
    samples of each task, mean test accuracy over all 10 tasks after the last one. Rows: no
    consolidation, EWC with Fisher / MAS(softmax) / SI, unstabilised and stabilised, at their tuned λ.
    The number of runs per row ``K`` is chosen from a measured calibration run so that the table fits
    the time budget (``--budget-min``), unless ``--runs`` fixes it.
``correlate``
    Kutalev's correlation study: one sequential run with the MAS penalty; per-layer Pearson / Spearman correlations of
    the accumulated FIS, MAS, SI (Kutalev's variant) and SIG importances
    (:func:`ewc_fast.experiments.correlate.run_correlate`).
``prune``
    Kutalev & Lapina's pruning experiment: one task, importances, global pruning without fine-tuning;
    accuracy at 90 % pruned. Two protocols on the same trained networks: ``ewc-fast prune``'s
    default (every parameter entry, biases included, raw scores) and Kutalev's script
    (``section4/weight-sparse.py``: weights only, ranked by |importance|). Also checks SIG against a
    hand-written transcription of Kutalev's ``_calc_signal`` and repeats the SIG / |w| pruning on
    the small embedded set, where an earlier quick run had given SIG 0.43.

How the rows follow the authors' code (``aakutalev/ewc-features``, ``section2`` / ``section3``):

* Fisher and MAS: importances are **summed** over tasks and the penalty is one quadratic at the
  **latest** optimum (``star_params`` is overwritten at every ``close_lesson``). Here that is
  :class:`ewc_fast.EWC` in ``mode="online"`` with ``gamma=1`` (``ewc-fast permuted-mnist`` uses
  ``mode="separate"``, one anchor per task, instead).
* SI: Kutalev's variant (total gradient including the penalty, ε = 0.1, no clip), running importance,
  penalty at the parameters where the current task started; this is the ``si`` method of
  :mod:`ewc_fast.experiments.strategies` with ``si_variant="kutalev"``. ewc_fast's EWC refuses
  negative importances, so negative entries of the running sum are clamped at 0 (their code keeps
  them; with Adam there were none in any run).
* λ: the unstabilised scripts penalise ``λ'·ΣΩ(θ−θ*)²`` (no ½): ``λ = 2λ'`` here. The stabilised
  scripts use ``Ω·λ·0.5/(Ω·λ·lr + 1)`` as the coefficient, i.e. ``(λ/2)·Ω/(1 + lr·λ·Ω)`` — already
  ewc_fast's convention, so their 85 / 8.5 / 0.64 are used as they are.
* Every run gets a fresh Adam. Their script keeps one optimizer across all runs of a λ
  (``model.reset()`` re-initialises layers and importances only); ``--investigate *_adam_carry``
  chains runs that way to measure the effect.

Re-running the table keeps the runs already in ``results/table.json`` (same protocol, same seeds),
so ``--runs K+1`` adds one seed per row. ``--investigate NAMES`` runs the variants of
:data:`~.table.INVESTIGATIONS` (or ``ROW+seeds``) into the same file; ``--render-only`` rewrites RESULTS.md
from the JSON files, adding the free-text discussion in ``results/notes.json`` if present.

Modules: :mod:`.protocol` (configuration, table rows, runs as in the authors' code, calibration),
:mod:`.table`, :mod:`.correlations`, :mod:`.pruning` (one part each), :mod:`.render` (RESULTS.md),
:mod:`.driver` (the command). The names below are re-exported here.
"""

from .correlations import CORR_CLAIMS_PAIRS, correlation_claims, final_weight_correlations, run_correlate_part
from .driver import run_investigation_command, run_reproduce
from .protocol import (
    PARTS,
    RESULTS_SUBDIR,
    TABLE_ROWS,
    ReproConfig,
    TableRow,
    base_run_config,
    calibrate,
    choose_runs,
    estimate_run_seconds,
    run_latest_anchor,
    run_metadata,
    run_variant,
    si_negative_hook,
)
from .pruning import (
    PRUNE_IMPORTANCES,
    PRUNE_LABELS,
    PRUNE_PROTOCOLS,
    PRUNE_REFERENCE,
    THEIR_TASK1_SCALE,
    max_relative_error,
    prune_both_protocols,
    run_prune_part,
    sig_by_hand,
)
from .render import format_minutes, render_results
from .table import INVESTIGATIONS, run_investigations, run_table

__all__ = [
    "ReproConfig",
    "TableRow",
    "TABLE_ROWS",
    "PARTS",
    "RESULTS_SUBDIR",
    "base_run_config",
    "run_metadata",
    "run_latest_anchor",
    "run_variant",
    "si_negative_hook",
    "calibrate",
    "estimate_run_seconds",
    "choose_runs",
    "run_table",
    "INVESTIGATIONS",
    "run_investigations",
    "run_correlate_part",
    "correlation_claims",
    "final_weight_correlations",
    "CORR_CLAIMS_PAIRS",
    "run_prune_part",
    "sig_by_hand",
    "max_relative_error",
    "prune_both_protocols",
    "PRUNE_REFERENCE",
    "PRUNE_IMPORTANCES",
    "PRUNE_LABELS",
    "PRUNE_PROTOCOLS",
    "THEIR_TASK1_SCALE",
    "render_results",
    "format_minutes",
    "run_reproduce",
    "run_investigation_command",
]
