"""The experiments as functions (the CLI ``ewc-fast`` wraps them, one command module each in
:mod:`ewc_fast.cli`).

Building blocks:

* :mod:`.data` — MNIST sources; :mod:`.tasks` — permuted / block / split / partial tasks;
  :mod:`.models` — the networks;
* :mod:`.training` — train one task, evaluate, estimate importances; :mod:`.strategies` — what each
  consolidation method (EWC, SI, WVA, …) does around training;
* :mod:`.continual` — sequential runs, accuracy matrix, λ conventions;
* :mod:`.records` — JSON/CSV result files and machine descriptions; :mod:`.plots` — matplotlib
  figures (optional dependency).

Experiments:

* :mod:`.demo` — the two-minute demo;
* :mod:`.correlate` — importance correlations per layer (Kutalev's correlation study);
* :mod:`.prune` — importance-ordered pruning (Kutalev & Lapina 2021, arXiv 2109.10021);
* :mod:`.overlap` — Fisher overlap vs task similarity (Kirkpatrick et al. 2017, Fig. 3C);
* :mod:`.reproduce` — the Kutalev & Lapina 2021 reproduction rendered into ``docs/RESULTS.md``.

Submodules are imported on demand so that ``import ewc_fast.experiments`` stays cheap.
"""

__all__ = [
    "data",
    "tasks",
    "models",
    "training",
    "strategies",
    "continual",
    "records",
    "plots",
    "demo",
    "correlate",
    "prune",
    "overlap",
    "reproduce",
]
