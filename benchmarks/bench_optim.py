"""Benchmark of the fused optimizers (:mod:`ewc_fast.optim`): one step with EWC and SI inside vs
torch's own optimizer step alone and vs today's three-pass path.

Per size (ragged tensors, like a model's layers), measured round-robin in the same run:

* ``torch``: ``torch.optim.AdamW(fused=True)`` (resp. ``SGD(momentum, fused=True)``) step alone;
* ``today``: ``EWC.apply_()`` + the same torch step with ``SynapticIntelligence`` attached through its
  hooks (Zenke: ``apply_`` hands SI a snapshot of the task gradient; the post-step hook runs
  ``si_accumulate_``);
* ``ours``: ``ewc_fast.optim.AdamW`` (resp. ``SGD``) with ``ewc=`` and ``si=``: one pass;
* ``copy``: ``dst.copy_(src)`` of the same number of fp32 values (the machine's copy bandwidth, 8 B/param).

Bytes per parameter (fp32 params/grads/state, fp32 Omega, fp64 mu, fp32 SI omega) -- the model next to
every number: torch AdamW 28 (read theta, g, m, v; write theta, m, v); today 28 + 24 (penalty: read g,
theta, Omega, mu; write g) + 8 (SI's snapshot of g) + 24 (si_accumulate: read omega, g, theta, prev;
write omega, prev) = 84; ours 48 (read theta, g, m, v, Omega, mu, omega; write theta, m, v, omega).
SGD momentum: torch 20, today 76, ours 40. "Share of copy bandwidth" = (bytes/param * N / time) divided
by the copy's (8 * N / time_copy).

Also a whole training step (forward + backward + step of an MLP, several batch sizes) with ours (EWC)
with and without SI, paired per round, for SI's share of a training step (see :func:`bench_train_step`).

Run: ``python -m benchmarks.bench_optim [--sizes 10e6 100e6] [--threads 1 2] [--repeats 7]
[--train-batch 64 256 1024] [--out benchmarks/results/optim.json]``. Pin threads on a shared machine;
results: benchmarks/RESULTS_OPTIM.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import ewc_fast
from ewc_fast import optim
from ewc_fast.experiments.records import write_json

from ._timing import summarize
from .bench_consolidation import ragged_sizes, si_workload
from .workloads import WORKLOADS  # noqa: F401  (registers the CNN workloads; workloads_cnn imports it)
from .workloads_cnn import ResNet18

BYTES = {
    "adamw": {"torch": 28, "today": 84, "ours": 48},
    "sgd": {"torch": 20, "today": 76, "ours": 40},
}


class Flat(nn.Module):
    """A 'model' that is just ragged parameters (the optimizer step does not care about layers)."""

    def __init__(self, sizes):
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s) * 0.1) for s in sizes])


def _consolidated(model: nn.Module) -> ewc_fast.EWC:
    ewc = ewc_fast.EWC(model, lam=1.0)
    with torch.no_grad():
        ewc.consolidate({n: torch.rand_like(p) for n, p in model.named_parameters()})
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return ewc


def _interleaved(fns: dict, repeats: int, setup=None, warmup: int = 2) -> dict:
    """Raw times (s) of the contenders run round-robin, one call of each per round (``setup(name)``
    untimed before each call), after ``warmup`` rounds. The order rotates by one each round, so every
    contender follows every other equally often (whatever cache state a predecessor leaves is shared
    out evenly)."""
    times: dict = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if setup is not None:
                setup(name)
            t0 = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def bench_step(total: int, algo: str, repeats: int) -> dict:
    model = Flat(ragged_sizes(total))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ewc = _consolidated(model)
    si = ewc_fast.SynapticIntelligence(model)
    params = list(model.parameters())
    if algo == "adamw":
        t_opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
        ours = optim.AdamW(params, lr=1e-6, weight_decay=0.0, ewc=ewc, si=si)
    else:
        t_opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, fused=True)
        ours = optim.SGD(params, lr=1e-6, momentum=0.9, ewc=ewc, si=si)
    src = torch.randn(total)
    dst = torch.empty_like(src)
    grads0 = [p.grad.clone() for p in params]

    def reset(name):
        # today's apply_ adds the penalty to .grad: restore the task gradient (untimed); hooks only for "today"
        if name == "today":
            if not si.attached:
                si.attach(t_opt)
        elif si.attached:
            si.detach()
        with torch.no_grad():
            torch._foreach_copy_([p.grad for p in params], grads0)

    def today():
        ewc.apply_()
        t_opt.step()

    fns = {"copy": lambda: dst.copy_(src), "torch": t_opt.step, "today": today, "ours": ours.step}
    raw = _interleaved(fns, repeats, setup=reset)
    res = {k: summarize(v) for k, v in raw.items()}
    if si.attached:
        si.detach()
    copy_bw = 8 * total / res["copy"].median_s
    out = {"params": total, "algo": algo, "copy_GBps": copy_bw / 1e9}
    for name in ("torch", "today", "ours"):
        t = res[name].median_s
        b = BYTES[algo][name]
        out[name] = {
            "median_ms": t * 1e3,
            "min_ms": res[name].min_s * 1e3,
            "max_ms": res[name].max_s * 1e3,
            "bytes_per_param": b,
            "GBps": b * total / t / 1e9,
            "share_of_copy": (b * total / t) / copy_bw,
        }
    out["ours_over_torch"] = out["ours"]["median_ms"] / out["torch"]["median_ms"]
    out["today_over_ours"] = out["today"]["median_ms"] / out["ours"]["median_ms"]
    # per-round ratios (the contenders of a round see the same machine state), median over rounds
    out["ours_over_torch_paired"] = statistics.median(a / b for a, b in zip(raw["ours"], raw["torch"]))
    out["today_over_ours_paired"] = statistics.median(a / b for a, b in zip(raw["today"], raw["ours"]))
    return out


def train_workload(model_name: str, width: int, batch: int):
    """``(model, x, y, loss_fn)`` of a training-step row: ``"mlp"`` is the SI benchmark's seeded MLP
    784-(width x 2)-10 (the cheapest forward + backward per parameter: one multiply-add per parameter
    and sample each way, so the worst case for SI's share); ``"resnet18-32"`` is the CIFAR ResNet-18
    (11.2M parameters, BatchNorm in train mode) on seeded 3x32x32 images, the network continual-learning
    papers train on CIFAR (about 50 multiply-adds per parameter and image)."""
    if model_name == "mlp":
        model, x, y, _, loss_fn = si_workload(width, 2, batch, "cpu")
        return model, x, y, loss_fn
    if model_name == "resnet18-32":
        torch.manual_seed(0)
        model = ResNet18(64).train()
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        return model, x, y, nn.CrossEntropyLoss()
    raise ValueError(f"unknown training-step model {model_name!r} (choices: {TRAIN_MODELS})")


TRAIN_MODELS = ("mlp", "resnet18-32")


def bench_train_step(width: int, depth: int, batch: int, repeats: int, model_name: str = "mlp") -> dict:
    """SI's own share of a whole training step: forward + backward + fused AdamW step with EWC, with SI
    vs without SI (the same optimizer class, the same model and batch; ``model_name`` from
    :data:`TRAIN_MODELS`, see :func:`train_workload`; ``depth`` is the MLP's and must be 2).

    Paired and interleaved: each round runs both contenders once, in alternating order, plus the two
    optimizer steps alone (gradients in place); the overhead is the median over rounds of the per-round
    ratio (with SI / without SI) - 1, next to the ratio of the medians. Bytes model: SI adds 8 B/param
    (read + write fp32 omega) to the 40 B/param of the EWC step, so it should cost
    (8/40) * t(step alone) of a whole step of t(whole), i.e. predicted overhead = 0.2 * t_step / t_whole.
    """
    if depth != 2:
        raise ValueError(f"bench_train_step: the training-step MLP has depth 2, got {depth}")
    model, x, y, loss_fn = train_workload(model_name, width, batch)
    ewc = _consolidated(model)
    si = ewc_fast.SynapticIntelligence(model)
    with_si = optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, ewc=ewc, si=si)
    without = optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, ewc=ewc)

    def whole(opt):
        def run():
            opt.zero_grad(set_to_none=False)
            loss_fn(model(x), y).backward()
            opt.step()

        return run

    fns = {"ewc": whole(without), "ewc+si": whole(with_si), "step ewc": without.step, "step ewc+si": with_si.step}
    times: dict = {k: [] for k in fns}
    order = list(fns)
    for r in range(2 + repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(b / a for a, b in zip(times["ewc"], times["ewc+si"]))
    n = sum(p.numel() for p in model.parameters())
    return {
        "model": model_name,
        "params": n,
        "width": width,
        "batch": batch,
        "repeats": repeats,
        "ewc_ms": med["ewc"] * 1e3,
        "ewc_si_ms": med["ewc+si"] * 1e3,
        "step_ewc_ms": med["step ewc"] * 1e3,
        "step_ewc_si_ms": med["step ewc+si"] * 1e3,
        "si_overhead": paired - 1.0,
        "si_overhead_of_medians": med["ewc+si"] / med["ewc"] - 1.0,
        "si_overhead_predicted": 0.2 * med["step ewc"] / med["ewc"],
        "spread_ms": {k: [min(v) * 1e3, max(v) * 1e3] for k, v in times.items()},
    }


def _train_row(args, nt: int, model_name: str, batch: int, results: dict) -> None:
    tr = bench_train_step(args.train_width, 2, batch, args.train_repeats, model_name)
    tr["threads"] = nt
    results["train"].append(tr)
    print(
        f"[{nt}t] train step ({model_name}, {tr['params']:,} params, batch {batch}): EWC {tr['ewc_ms']:.1f} ms, "
        f"EWC+SI {tr['ewc_si_ms']:.1f} ms (steps alone {tr['step_ewc_ms']:.1f} / "
        f"{tr['step_ewc_si_ms']:.1f} ms), SI overhead {100 * tr['si_overhead']:+.1f}% "
        f"(of medians {100 * tr['si_overhead_of_medians']:+.1f}%, "
        f"bytes model {100 * tr['si_overhead_predicted']:+.1f}%)",
        flush=True,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[10e6, 100e6], help="optimizer-step sizes (none: skip)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--algos", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    ap.add_argument("--train-width", type=int, default=2048, help="MLP width of the training-step rows (0: skip)")
    ap.add_argument("--train-batch", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes of those rows")
    ap.add_argument("--train-repeats", type=int, default=21, help="paired rounds of the training-step rows")
    ap.add_argument(
        "--train-models",
        nargs="+",
        default=["mlp"],
        choices=TRAIN_MODELS,
        help="models of the training-step rows (mlp: the worst case for SI's share; resnet18-32: CIFAR ResNet-18)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "loadavg_start": os.getloadavg()}
    results = {"machine": machine, "rows": [], "train": []}
    for nt in args.threads:
        torch.set_num_threads(nt)
        for size in args.sizes:
            for algo in args.algos:
                row = bench_step(int(size), algo, args.repeats)
                row["threads"] = nt
                results["rows"].append(row)
                print(
                    f"[{nt}t] {algo:5s} N={int(size):>11,d} copy {row['copy_GBps']:.1f} GB/s | "
                    + " | ".join(
                        f"{k} {row[k]['median_ms']:.1f} ms ({row[k]['bytes_per_param']} B, "
                        f"{100 * row[k]['share_of_copy']:.0f}% copy bw)"
                        for k in ("torch", "today", "ours")
                    )
                    + f" | ours/torch {row['ours_over_torch']:.2f}x (paired {row['ours_over_torch_paired']:.2f}x),"
                    + f" today/ours {row['today_over_ours']:.2f}x (paired {row['today_over_ours_paired']:.2f}x)",
                    flush=True,
                )
        if args.train_width:
            for model_name in args.train_models:
                for batch in args.train_batch:
                    _train_row(args, nt, model_name, batch, results)
    machine["loadavg_end"] = os.getloadavg()
    print(f"load average (1/5/15 min): start {machine['loadavg_start']}, end {machine['loadavg_end']}", flush=True)
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
