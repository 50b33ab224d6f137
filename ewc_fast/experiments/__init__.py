"""The seeds' experiments as functions (the CLI ``ewc-fast`` wraps them).

* :mod:`.models` — the seeds' networks; :mod:`.continual` — sequential training, accuracy matrix;
* :mod:`.correlate` — importance correlations (seed 000); :mod:`.prune` — importance-ordered
  pruning (seeds 001, 004); :mod:`.overlap` — Fisher overlap (seed 003);
* :mod:`.demo` — the two-minute demo; :mod:`.plots` — matplotlib figures (optional dependency).

Submodules are imported on demand so that ``import ewc_fast.experiments`` stays cheap.
"""

__all__ = ["models", "continual", "correlate", "prune", "overlap", "plots", "demo"]
