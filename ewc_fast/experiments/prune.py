"""Prune by importance and watch accuracy fall (Kutalev & Lapina 2021, arXiv 2109.10021).

Train a network on one task (unpermuted MNIST), compute importances (FIS, MAS, SI, SIG, |w|,
random — SI from a tracker attached during training, the others by
:func:`ewc_fast.estimate_importance` on the last ``n_importance`` training samples), then for
fractions ``f`` from 0 to 1 remove the least important fraction ``f`` of the *pruning groups* and
measure test accuracy and loss (no fine-tuning).

Pruning groups (``aggregation``), with a group's score = ``reduce`` (mean / min / max) of its
members' importances:

* ``weight`` — every parameter entry on its own (biases included);
* ``unit``   — one output unit of a Linear / Conv layer: its weight row (Linear) or whole filter
  ``W[o]`` (Conv) together with its bias ``b[o]``;
* ``filter`` — one 2-D kernel ``W[o, i]`` of a Conv layer (conv-filter aggregation);
  Linear weights and all biases stay per entry.

Scope: ``global`` ranks all groups of the network together (Kutalev & Lapina's setting: global
over all parameters); ``layer`` prunes the fraction ``f`` inside each layer (module = weight + bias)
separately. ``round(f · n_groups)`` groups are removed (in each layer for ``layer``), so ``f = 0``
leaves the model unchanged and ``f = 1`` removes everything. Removed entries are set to zero
(``replace="zero"``) or to ``N(0, (std/10)²)`` with ``std`` the standard deviation of that tensor
before pruning (``replace="noise"``, a "small random weight"). Ties are broken by a
stable sort (index order).

Importances: FIS / MAS / SIG (and the other estimators of :func:`ewc_fast.estimate_importance`),
SI from a tracker during training, ``magnitude`` |w|, ``random``, ``inverse_magnitude`` 1/|w| and
the training-trajectory measures of :mod:`.trackers` (sign flips of w, sign changes of Δw, total
absolute change Σ|Δw|). ``weights_only`` prunes weight tensors only (biases kept), as Kutalev's
pruning script does. Every run's curve is kept: the result carries the mean and the min–max band
over runs.

The ordering table ranks the importances by the area under the accuracy-vs-fraction curve
(trapezoid rule; larger = the importance identifies what matters better).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from ..consolidation import SynapticIntelligence
from .continual import RunConfig, run_sequence
from .data import MNIST
from .tasks import Task
from .trackers import TRACKER_MEASURES, TrajectoryTracker, inverse_magnitude
from .training import estimate, evaluate

__all__ = [
    "PruneGroups",
    "build_groups",
    "apply_pruning",
    "prune_curve",
    "auc",
    "value_at",
    "run_prune",
    "ordering_table",
    "IMPORTANCE_CHOICES",
    "AGGREGATIONS",
    "REDUCES",
    "SCOPES",
]

AGGREGATIONS = ("weight", "unit", "filter")
REDUCES = ("mean", "min", "max")
SCOPES = ("global", "layer")
IMPORTANCE_CHOICES = (
    "fisher",
    "fisher_mc",
    "fisher_exact",
    "fisher_batched",
    "mas",
    "si",
    "sig",
    "magnitude",
    "random",
    "inverse_magnitude",
    *TRACKER_MEASURES,
)
LABELS = {
    "fisher": "FIS",
    "mas": "MAS",
    "si": "SI",
    "sig": "SIG",
    "magnitude": "|w|",
    "random": "random",
    "inverse_magnitude": "1/|w|",
    "sign_flips": "w sign flips",
    "dw_sign_changes": "Δw sign changes",
    "abs_change": "Σ|Δw|",
}


@dataclass
class PruneGroups:
    """Group structure of a model for one aggregation.

    ``gid[name]``: LongTensor shaped like the parameter, entry → global group index;
    ``layer_of_group``: LongTensor (G,) group → layer index; ``layers``: layer names.
    """

    gid: dict
    layer_of_group: torch.Tensor
    layers: list

    @property
    def n_groups(self) -> int:
        return int(self.layer_of_group.numel())


def _owner_modules(model: nn.Module) -> dict:
    """parameter name → (module name, local parameter name, module)."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owners[full] = (mname, pname, mod)
    return owners


def build_groups(model: nn.Module, aggregation: str = "weight", *, weights_only: bool = False) -> PruneGroups:
    """Pruning groups of ``model`` (see module doc); ``weights_only``: only parameters named
    ``weight`` are pruned (biases and the rest are kept, Kutalev's ``section4/weight-sparse.py``)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
    owners = _owner_modules(model)
    params = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and (not weights_only or owners[n][1] == "weight")
    ]
    layers = list(dict.fromkeys(owners[n][0] for n, _ in params))
    layer_idx = {m: i for i, m in enumerate(layers)}
    gid, layer_of_group, offset = {}, [], 0
    unit_offset: dict = {}
    for name, p in params:
        mname, local, mod = owners[name]
        is_lc = isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        is_conv = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        dev = p.device
        if aggregation == "unit" and is_lc and local in ("weight", "bias"):
            out = p.shape[0]
            if mname not in unit_offset:
                unit_offset[mname] = offset
                layer_of_group.extend([layer_idx[mname]] * out)
                offset += out
            base = unit_offset[mname]
            ids = torch.arange(base, base + out, device=dev)
            gid[name] = ids.view(-1, *([1] * (p.dim() - 1))).expand(p.shape).contiguous()
        elif aggregation == "filter" and is_conv and local == "weight":
            n_f = p.shape[0] * p.shape[1]
            ids = torch.arange(offset, offset + n_f, device=dev).view(p.shape[0], p.shape[1], *([1] * (p.dim() - 2)))
            gid[name] = ids.expand(p.shape).contiguous()
            layer_of_group.extend([layer_idx[mname]] * n_f)
            offset += n_f
        else:
            n = p.numel()
            gid[name] = torch.arange(offset, offset + n, device=dev).view(p.shape)
            layer_of_group.extend([layer_idx[mname]] * n)
            offset += n
    return PruneGroups(gid, torch.tensor(layer_of_group, dtype=torch.long), layers)


def group_scores(groups: PruneGroups, importance: Mapping[str, torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """Score of every group: ``reduce`` of its members' importances (float64, CPU)."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}")
    ids = torch.cat([groups.gid[n].reshape(-1).cpu() for n in groups.gid])
    vals = torch.cat([importance[n].detach().reshape(-1).to("cpu", torch.float64) for n in groups.gid])
    out = torch.zeros(groups.n_groups, dtype=torch.float64)
    op = {"mean": "mean", "min": "amin", "max": "amax"}[reduce]
    return out.scatter_reduce(0, ids, vals, reduce=op, include_self=False)


def group_ranks(groups: PruneGroups, scores: torch.Tensor, scope: str = "global") -> torch.Tensor:
    """Rank of each group in ascending importance: globally, or within its layer (scope)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    ranks = torch.empty(groups.n_groups, dtype=torch.long)
    if scope == "global":
        order = torch.sort(scores, stable=True).indices
        ranks[order] = torch.arange(groups.n_groups)
    else:
        for li in range(len(groups.layers)):
            members = torch.nonzero(groups.layer_of_group == li).flatten()
            order = torch.sort(scores[members], stable=True).indices
            ranks[members[order]] = torch.arange(members.numel())
    return ranks


def _thresholds(groups: PruneGroups, fraction: float, scope: str) -> torch.Tensor:
    """Per group: prune if rank < threshold (threshold per group's layer for scope=layer)."""
    if scope == "global":
        k = int(round(fraction * groups.n_groups))
        return torch.full((groups.n_groups,), k, dtype=torch.long)
    counts = torch.bincount(groups.layer_of_group, minlength=len(groups.layers))
    k_layer = torch.round(counts.double() * fraction).long()
    return k_layer[groups.layer_of_group]


@torch.no_grad()
def apply_pruning(
    model: nn.Module,
    groups: PruneGroups,
    ranks: torch.Tensor,
    fraction: float,
    *,
    scope: str = "global",
    replace: str = "zero",
    original: dict | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Prune ``model`` in place (from ``original`` state if given); returns entries removed."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if replace not in ("zero", "noise"):
        raise ValueError("replace must be 'zero' or 'noise'")
    pruned_group = ranks < _thresholds(groups, fraction, scope)
    removed = 0
    params = dict(model.named_parameters())
    for name, ids in groups.gid.items():
        p = params[name]
        if original is not None:
            p.copy_(original[name])
        mask = pruned_group.to(p.device)[ids]
        n = int(mask.sum())
        removed += n
        if n == 0:
            continue
        if replace == "zero":
            p.masked_fill_(mask, 0.0)
        else:
            ref = original[name] if original is not None else p
            std = float(ref.float().std()) if ref.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.copy_(torch.where(mask, (noise * (std / 10.0)).to(p.device, p.dtype), p))
    return removed


def auc(fractions: ArrayLike, values: ArrayLike) -> float:
    """Trapezoid area under ``values`` over ``fractions``."""
    f = np.asarray(fractions, dtype=float)
    v = np.asarray(values, dtype=float)
    return float(np.sum((f[1:] - f[:-1]) * (v[1:] + v[:-1]) / 2.0))


def prune_curve(
    model: nn.Module,
    importance: Mapping[str, torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    fractions: Sequence[float],
    *,
    aggregation: str = "weight",
    reduce: str = "mean",
    scope: str = "global",
    replace: str = "zero",
    task: Task | None = None,
    seed: int = 0,
    eval_batch: int = 2000,
    weights_only: bool = False,
) -> dict:
    """Accuracy and loss of ``model`` pruned by ``importance`` at each fraction (restored after)."""
    task = task or Task("identity")
    groups = build_groups(model, aggregation, weights_only=weights_only)
    ranks = group_ranks(groups, group_scores(groups, importance, reduce), scope)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    accs, losses, removed = [], [], []
    try:
        for f in fractions:
            removed.append(
                apply_pruning(
                    model, groups, ranks, float(f), scope=scope, replace=replace, original=original, generator=gen
                )
            )
            a, l = evaluate(model, x_test, y_test, task, eval_batch)
            accs.append(a)
            losses.append(l)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
    return {"acc": accs, "loss": losses, "removed": removed}


def value_at(fractions: ArrayLike, values: ArrayLike, at: float) -> float:
    """``values`` linearly interpolated at fraction ``at`` (NaN outside the fractions' range)."""
    f = np.asarray(fractions, dtype=float)
    if at < f.min() or at > f.max():
        return float("nan")
    return float(np.interp(at, f, np.asarray(values, dtype=float)))


def ordering_table(curves: dict, fractions: Sequence[float]) -> list[dict]:
    """Rows sorted by accuracy AUC (best first): label, acc_auc, loss_auc, acc at 50% / 90%."""
    rows = []
    for label, c in curves.items():
        rows.append(
            {
                "importance": label,
                "acc_auc": auc(fractions, c["acc"]),
                "loss_auc": auc(fractions, c["loss"]),
                "acc_at_0.5": value_at(fractions, c["acc"], 0.5),
                "acc_at_0.9": value_at(fractions, c["acc"], 0.9),
            }
        )
    rows.sort(key=lambda r: -r["acc_auc"])
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    return rows


def run_prune(
    data: MNIST,
    cfg: RunConfig,
    *,
    importances: Sequence[str] = ("fisher", "mas", "si", "sig", "magnitude", "random"),
    fractions: Sequence[float] | None = None,
    scopes: Sequence[str] = ("global",),
    aggregations: Sequence[str] = ("weight",),
    reduces: Sequence[str] = ("mean",),
    replace: str = "zero",
    runs: int = 1,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    weights_only: bool = False,
) -> dict:
    """Train one task per run, prune by every importance × scope × aggregation × reduce.

    Returns ``{"results": {"scope/aggregation/reduce": {"curves": {label: {"acc", "loss",
    "acc_min", "acc_max", "acc_runs", "removed"}}, "ordering"}}, …}`` (``acc``/``loss``: means over
    runs; ``acc_min``/``acc_max``: the band; ``acc_runs``: every run's curve)."""
    for m in importances:
        if m not in IMPORTANCE_CHOICES:
            raise ValueError(f"unknown importance {m!r}: {IMPORTANCE_CHOICES}")
    if fractions is None:
        fractions = np.linspace(0.0, 1.0, 21)
    fractions = [float(f) for f in fractions]
    task = Task("identity")
    x_te, y_te = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    settings = [(s, a, r) for s in scopes for a in aggregations for r in reduces]
    # curves[setting][label] = list over runs of {"acc", "loss"}
    per_run: dict = {f"{s}/{a}/{r}": {} for s, a, r in settings}
    base_acc = []
    for k in range(runs):
        holder: dict = {}

        def setup(model, optimizer, holder=holder):
            if "si" in importances:
                holder["si"] = SynapticIntelligence(model, xi=cfg.si_xi, variant=cfg.si_variant)
                holder["si"].attach(optimizer)
            if any(m in TRACKER_MEASURES for m in importances):
                holder["tracker"] = TrajectoryTracker(model).attach(optimizer)

        def on_task_end(stage, model, x_imp, y_imp, strategy, holder=holder, k=k):
            own = ("si", "inverse_magnitude", *TRACKER_MEASURES)
            est = [m for m in importances if m not in own]
            gen = torch.Generator().manual_seed(seed + k)
            imps = dict(estimate(model, x_imp, y_imp, est, cfg, generator=gen)) if est else {}
            if "si" in importances:
                imps["si"] = holder["si"].consolidate()
            if "inverse_magnitude" in importances:
                imps["inverse_magnitude"] = inverse_magnitude(model)
            if "tracker" in holder:
                tracked = holder["tracker"].importances()
                imps.update({m: tracked[m] for m in TRACKER_MEASURES if m in importances})
            holder["model"], holder["imps"] = model, imps

        res = run_sequence(data, [task], cfg, seed=seed + k, progress=progress, on_task_end=on_task_end, setup=setup)
        base_acc.append(res.R[0][0])
        model = holder["model"]
        dev = next(model.parameters()).device
        for s, a, r in settings:
            key = f"{s}/{a}/{r}"
            for m in importances:
                c = prune_curve(
                    model,
                    holder["imps"][m],
                    x_te.to(dev),
                    y_te.to(dev),
                    fractions,
                    aggregation=a,
                    reduce=r,
                    scope=s,
                    replace=replace,
                    task=task,
                    seed=seed + k,
                    eval_batch=cfg.eval_batch,
                    weights_only=weights_only,
                )
                per_run[key].setdefault(LABELS.get(m, m), []).append(c)
        if log is not None:
            log(f"  run {k + 1}/{runs}: trained accuracy {res.R[0][0]:.4f}")
    results = {}
    for key, by_label in per_run.items():
        curves = {
            label: {
                "acc": np.mean([c["acc"] for c in cs], axis=0).tolist(),
                "loss": np.mean([c["loss"] for c in cs], axis=0).tolist(),
                "acc_min": np.min([c["acc"] for c in cs], axis=0).tolist(),
                "acc_max": np.max([c["acc"] for c in cs], axis=0).tolist(),
                "acc_runs": [c["acc"] for c in cs],
                "removed": cs[0]["removed"],
            }
            for label, cs in by_label.items()
        }
        results[key] = {"curves": curves, "ordering": ordering_table(curves, fractions)}
    return {
        "fractions": fractions,
        "results": results,
        "trained_acc": base_acc,
        "config": cfg.to_dict(),
        "runs": runs,
        "seed": seed,
        "replace": replace,
        "weights_only": weights_only,
        "importances": list(importances),
    }
