"""Part ``prune`` of ``ewc-fast reproduce``: Kutalev & Lapina 2021's pruning by importance.

One task (unpermuted MNIST), importances (FIS, MAS, SIG on the last 5000 training samples, SI from a
tracker during training, |w|, random), global pruning without fine-tuning; the score is the test
accuracy at 90 % pruned (:data:`PRUNE_REFERENCE`: their means of 10 runs). Two protocols on the same
trained networks (:data:`PRUNE_PROTOCOLS`): Kutalev's script (``section4/weight-sparse.py`` of
``aakutalev/ewc-features``: weights only, ranked by |importance|) and ``ewc-fast prune``'s default
(every parameter entry, biases included, raw scores). Also checks ewc_fast's SIG against
:func:`sig_by_hand`, a transcription of Kutalev's ``_calc_signal``, records the importance scale
after one task (against :data:`THEIR_TASK1_SCALE`) and repeats the pruning on the small embedded set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...consolidation import SynapticIntelligence
from .. import plots
from ..continual import run_sequence
from ..data import MNIST
from ..prune import build_groups, group_ranks, group_scores, prune_curve, value_at
from ..records import write_json
from ..tasks import Task
from ..training import estimate
from .protocol import RESULTS_SUBDIR, ReproConfig, base_run_config, run_metadata

__all__ = [
    "PRUNE_REFERENCE",
    "PRUNE_IMPORTANCES",
    "PRUNE_LABELS",
    "PRUNE_PROTOCOLS",
    "THEIR_TASK1_SCALE",
    "sig_by_hand",
    "max_relative_error",
    "prune_both_protocols",
    "run_prune_part",
]

#: accuracy at 90 % of the weights pruned, global, no fine-tuning, mean of 10 runs (Kutalev & Lapina 2021)
PRUNE_REFERENCE = {"SIG": 0.896, "|w|": 0.857, "MAS": 0.314, "FIS": 0.288, "SI": 0.222}
PRUNE_IMPORTANCES = ("fisher", "mas", "si", "sig", "magnitude", "random")
PRUNE_LABELS = {"fisher": "FIS", "mas": "MAS", "si": "SI", "sig": "SIG", "magnitude": "|w|", "random": "random"}
PRUNE_PROTOCOLS = {
    "kutalev": "weights only (biases kept), ranked by |importance| — Kutalev's section4/weight-sparse.py",
    "library": "every parameter entry incl. biases, raw scores (SI clipped at 0) — `ewc-fast prune` default",
}

#: "Max importance …, max mean importance …" logged by their section2 scripts after the first task
#: (first 7 runs of fully-connected-ewc-{fisher,mas,si}.log; the first task carries no penalty, so the
#: λ of those runs does not matter): min–max over the runs of the largest entry over all six tensors,
#: and of the largest per-tensor mean.
THEIR_TASK1_SCALE = {
    # run 1 starts with a fresh Adam; runs 2–7 with the optimizer state the previous run left
    "fisher": {
        "fresh": {"max": 0.01581, "max_mean": 0.00201},
        "carried": {"max": (0.01420, 0.04841), "max_mean": (0.00110, 0.00353)},
        "source": "section2/fully-connected-ewc-fisher.log, λ=4",
    },
    "mas": {
        "fresh": {"max": 0.01139, "max_mean": 0.00193},
        "carried": {"max": (0.00755, 0.01328), "max_mean": (0.00117, 0.00160)},
        "source": "section2/fully-connected-ewc-mas.log, λ=0.5",
    },
    "si": {
        "fresh": {"max": 0.07619, "max_mean": 0.02578},
        "carried": {"max": (0.11888, 0.14066), "max_mean": (0.02662, 0.03011)},
        "source": "section2/fully-connected-ewc-si.log, λ=0.07",
    },
}


@torch.no_grad()
def sig_by_hand(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """SIG of the FC net as Kutalev's ``_calc_signal`` computes it (section4/model_ewc_sig.py),
    transcribed independently of ewc_fast's estimator: weight ``|w_ij| · mean_n |a_nj|`` with ``a``
    the layer input (pixels for the first layer); bias ``mean_n |y_ni|``, ``y`` the layer output
    after leaky-ReLU (hidden layers) or softmax (output layer)."""
    linears = [(n, m) for n, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    a = x.to(torch.float64)
    out = {}
    for i, (name, lin) in enumerate(linears):
        w, b = lin.weight.to(torch.float64), lin.bias.to(torch.float64)
        out[f"{name}.weight"] = w.abs() * a.abs().mean(0)
        z = a @ w.T + b
        a = F.leaky_relu(z) if i < len(linears) - 1 else torch.softmax(z, dim=-1)
        out[f"{name}.bias"] = a.abs().mean(0)
    return out


def max_relative_error(a: dict, b: dict) -> float:
    """``max over tensors k of max|a_k − b_k| / max|b_k|`` in float64 (``b`` is the reference)."""
    err = 0.0
    for k in a:
        x, y = a[k].to(torch.float64), b[k].to(torch.float64)
        err = max(err, float((x - y).abs().max() / y.abs().max().clamp_min(1e-300)))
    return err


def _layer_fractions(model, imp, scope_weights_only: bool, fraction: float) -> dict:
    """Fraction of each weight tensor removed at ``fraction`` by ``imp`` (global ranking)."""
    params = dict(model.named_parameters())
    frozen = [p for n, p in params.items() if scope_weights_only and n.endswith("bias")]
    for p in frozen:
        p.requires_grad_(False)
    try:
        groups = build_groups(model, "weight")
        ranks = group_ranks(groups, group_scores(groups, imp, "mean"), "global")
        pruned = ranks < round(fraction * groups.n_groups)
        return {
            n: float(pruned[ids.reshape(-1).cpu()].double().mean())
            for n, ids in groups.gid.items()
            if n.endswith("weight")
        }
    finally:
        for p in frozen:
            p.requires_grad_(True)


def prune_both_protocols(
    model: torch.nn.Module,
    imps: dict,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    fractions: Sequence[float],
    seed: int,
) -> dict:
    """Curves for both protocols on one trained model (parameters restored afterwards)."""
    curves: dict = {"kutalev": {}, "library": {}}
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    for m in PRUNE_IMPORTANCES:
        raw = imps[m]
        lib = {k: (v.clamp_min(0) if m == "si" else v) for k, v in raw.items()}
        curves["library"][PRUNE_LABELS[m]] = prune_curve(model, lib, x_te, y_te, fractions, seed=seed)
        for p in biases:
            p.requires_grad_(False)  # build_groups ranks trainable parameters only: weights
        try:
            ab = {k: v.abs() for k, v in raw.items()}
            curves["kutalev"][PRUNE_LABELS[m]] = prune_curve(model, ab, x_te, y_te, fractions, seed=seed)
        finally:
            for p in biases:
                p.requires_grad_(True)
    return curves


def _train_and_prune(data: MNIST, cfg: ReproConfig, seed: int, fractions, *, check_sig: bool) -> dict:
    rc = base_run_config(cfg, method="none", lam=0.0)
    holder: dict = {}

    def setup(model, optimizer):
        holder["si"] = SynapticIntelligence(model, xi=rc.si_xi, variant="kutalev").attach(optimizer)

    def on_task_end(stage, model, x_imp, y_imp, strategy):
        gen = torch.Generator().manual_seed(seed)
        est = [m for m in PRUNE_IMPORTANCES if m != "si"]
        imps = dict(estimate(model, x_imp, y_imp, est, rc, generator=gen))
        imps["si"] = holder["si"].consolidate()  # raw ω/(Δ²+ξ), may be negative
        holder.update(model=model, imps=imps, x_imp=x_imp)

    res = run_sequence(data, [Task("identity")], rc, seed=seed, setup=setup, on_task_end=on_task_end)
    model, imps = holder["model"], holder["imps"]
    x_te, y_te = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    out = {
        "seed": seed,
        "trained_acc": res.R[0][0],
        "curves": prune_both_protocols(model, imps, x_te, y_te, fractions, seed),
    }
    out["scale_after_task1"] = {
        m: {
            "max": max(float(v.max()) for v in imps[m].values()),
            "max_mean": max(float(v.double().mean()) for v in imps[m].values()),
        }
        for m in ("fisher", "mas", "si")
    }
    out["si_negative_fraction"] = float(
        sum(int((v < 0).sum()) for v in imps["si"].values()) / sum(v.numel() for v in imps["si"].values())
    )
    out["layer_fraction_at_0.9"] = {
        proto: {
            lab: _layer_fractions(
                model, {k: (v.abs() if proto == "kutalev" else v) for k, v in imps[m].items()}, proto == "kutalev", 0.9
            )
            for m, lab in (("sig", "SIG"), ("magnitude", "|w|"), ("mas", "MAS"))
        }
        for proto in ("kutalev", "library")
    }
    if check_sig:
        hand = sig_by_hand(model, holder["x_imp"])
        out["sig_check"] = {
            "max_rel_err_vs_hand": max_relative_error(imps["sig"], hand),
            "n_samples": int(holder["x_imp"].shape[0]),
        }
    return out


def run_prune_part(
    data: MNIST,
    cfg: ReproConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
    embedded: MNIST | None = None,
) -> dict:
    """``cfg.prune_runs`` trained networks pruned under both protocols (and the same on ``embedded``
    when given) → ``OUT/results/prune.json`` and the mean-curve plots."""
    t_start = time.perf_counter()
    fractions = [float(f) for f in np.linspace(0.0, 1.0, max(cfg.prune_fractions, 2))]
    if not any(abs(f - 0.9) < 1e-9 for f in fractions):
        fractions = sorted(fractions + [0.9])
    log(f"== prune: {cfg.prune_runs} run(s), 1 task × {cfg.epochs} epochs, global, no fine-tuning")
    per_run = []
    for k in range(cfg.prune_runs):
        t0 = time.perf_counter()
        r = _train_and_prune(data, cfg, cfg.seed + k, fractions, check_sig=(k == 0))
        r["wall_s"] = time.perf_counter() - t0
        per_run.append(r)
        log(
            f"   run {k + 1}/{cfg.prune_runs}: trained acc {r['trained_acc']:.4f}; acc@90% "
            + "  ".join(f"{lab} {value_at(fractions, c['acc'], 0.9):.3f}" for lab, c in r["curves"]["kutalev"].items())
            + f"  ({r['wall_s']:.0f} s)"
        )
    summary = {}
    for proto in PRUNE_PROTOCOLS:
        summary[proto] = {}
        for lab in PRUNE_LABELS.values():
            a = np.array([value_at(fractions, r["curves"][proto][lab]["acc"], 0.9) for r in per_run])
            summary[proto][lab] = {
                "acc_at_0.9": float(a.mean()),
                "std": float(a.std(ddof=1)) if len(a) > 1 else None,
                "per_run": a.tolist(),
                "curve_mean": np.mean([r["curves"][proto][lab]["acc"] for r in per_run], axis=0).tolist(),
                "loss_curve_mean": np.mean([r["curves"][proto][lab]["loss"] for r in per_run], axis=0).tolist(),
            }
    out = {
        "fractions": fractions,
        "runs": cfg.prune_runs,
        "protocols": PRUNE_PROTOCOLS,
        "reference": PRUNE_REFERENCE,
        "summary": summary,
        "per_run": [{k: v for k, v in r.items() if k != "curves"} for r in per_run],
    }
    # the earlier quick run on the small embedded set (SIG 0.43): same protocol, same seeds
    if embedded is not None:
        log(f"   same protocol on the embedded set ({embedded.x_train.shape[0]} train samples)")
        emb = []
        for k in range(cfg.prune_runs):
            r = _train_and_prune(embedded, cfg, cfg.seed + k, fractions, check_sig=False)
            emb.append(
                {
                    "trained_acc": r["trained_acc"],
                    "acc_at_0.9": {
                        proto: {lab: value_at(fractions, c["acc"], 0.9) for lab, c in r["curves"][proto].items()}
                        for proto in PRUNE_PROTOCOLS
                    },
                    "layer_fraction_at_0.9": r["layer_fraction_at_0.9"],
                }
            )
        out["embedded"] = {
            "source": embedded.source,
            "n_train": int(embedded.x_train.shape[0]),
            "n_test": int(embedded.x_test.shape[0]),
            "runs": emb,
        }
    res_dir = out_dir / RESULTS_SUBDIR
    pngs = {}
    for proto in PRUNE_PROTOCOLS:
        curves = {lab: {"acc": s["curve_mean"], "loss": s["loss_curve_mean"]} for lab, s in summary[proto].items()}
        p = plots.prune_curves(
            curves,
            fractions,
            res_dir / f"prune_{proto}.png",
            title=f"pruning ({proto} protocol), mean of {cfg.prune_runs} run(s)",
        )
        pngs[proto] = Path(p).name if p else None
    out["png"] = pngs
    out["wall_s"] = time.perf_counter() - t_start
    out["meta"] = run_metadata(cfg, data, out["wall_s"], epochs=cfg.epochs)
    write_json(res_dir / "prune.json", out)
    log(f"== prune done in {out['wall_s'] / 60:.1f} min")
    return out
