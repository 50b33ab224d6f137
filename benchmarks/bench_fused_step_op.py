"""Op-level benchmark of the C++ fused step, feature by feature, against torch's own fused step.

One process, ``N`` fp32 parameters in 8 equal tensors, 1 thread by default; per round (order rotating)
each contender runs once:

* ``copy``: ``dst.copy_(src)`` of N fp32 values (8 B/param, the machine's copy bandwidth);
* ``torch``: ``torch.optim.AdamW(fused=True)`` (resp. ``SGD(momentum=0.9, fused=True)``) step;
* ``bare``: :func:`ewc_fast.ops.fused_step_` (C++) with no EWC/SI (AdamW 28 B/param, SGD 20);
* ``ewc``: + EWC (fp32 Omega, fp64 mu: +12 B); ``si``: + SI (fp32 omega read and written: +8 B);
* ``ewc+si``: both (AdamW 48 B/param, SGD 40).

Reported per contender: median time, the bytes model, GB/s, share of the copy's bandwidth, and the
median over rounds of the per-round ratio to ``torch`` (the ratio the issue-12 target is stated in;
with everything bandwidth-bound it is bytes / torch's bytes). Compare builds (e.g. before and after a
kernel change) by running this script under each, alternating processes; compare instruction-set
levels with ``EWC_FAST_CPP_ISA=generic|avx2|avx512``.

Run: ``python -m benchmarks.bench_fused_step_op [--size 10e6] [--algo adamw] [--repeats 11]``.
Results and analysis: benchmarks/RESULTS_OPTIM.md, benchmarks/ANALYSIS_CPU.md (issue 12).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ewc_fast.ops import fused_step_

BYTES = {
    "adamw": {"copy": 8, "torch": 28, "bare": 28, "ewc": 40, "si": 36, "ewc+si": 48},
    "sgd": {"copy": 8, "torch": 20, "bare": 20, "ewc": 32, "si": 28, "ewc+si": 40},
}


def contenders(n: int, algo: str) -> dict:
    """The contenders' callables over freshly drawn tensors (seeded)."""
    sizes = [n // 8] * 7 + [n - 7 * (n // 8)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) * 0.1 for s in sizes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in sizes]
    state = [[torch.zeros(s) for s in sizes] for _ in range(2 if algo == "adamw" else 1)]
    omega = [torch.rand(s, generator=gen) for s in sizes]
    mu = [p.double() + 1e-3 * torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
    si_omega = [torch.zeros(s) for s in sizes]
    tparams = [torch.nn.Parameter(p.clone()) for p in params]
    for t, g in zip(tparams, grads):
        t.grad = g.clone()
    if algo == "adamw":
        topt = torch.optim.AdamW(tparams, lr=1e-6, weight_decay=0.0, fused=True)
        kw = {"algo": "adamw", "lr": 1e-6, "step": 5}
    else:
        topt = torch.optim.SGD(tparams, lr=1e-6, momentum=0.9, fused=True)
        kw = {"algo": "sgd", "lr": 1e-6, "momentum": 0.9}
    src, dst = torch.randn(n, generator=gen), torch.empty(n)

    def ours(ewc: bool, si: bool):
        extra = {"omega": omega, "mu": mu, "lam": 1.0} if ewc else {}
        if si:
            extra["si_omega"] = si_omega
        return lambda: fused_step_(params, grads, *state, backend="cpp", **kw, **extra)

    return {
        "copy": lambda: dst.copy_(src),
        "torch": topt.step,
        "bare": ours(False, False),
        "ewc": ours(True, False),
        "si": ours(False, True),
        "ewc+si": ours(True, True),
    }


def run(n: int, algo: str, repeats: int, warmup: int = 2) -> dict:
    fns = contenders(n, algo)
    names = list(fns)
    times: dict = {k: [] for k in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    copy_bw = 8 * n / statistics.median(times["copy"])
    out = {"params": n, "algo": algo, "repeats": repeats, "loadavg": os.getloadavg(), "rows": {}}
    for name in names:
        t = statistics.median(times[name])
        b = BYTES[algo][name]
        out["rows"][name] = {
            "median_ms": t * 1e3,
            "bytes_per_param": b,
            "GBps": b * n / t / 1e9,
            "share_of_copy": b * n / t / copy_bw,
            "over_torch_paired": statistics.median(a / c for a, c in zip(times[name], times["torch"])),
            "bytes_over_torch": b / BYTES[algo]["torch"],
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=10e6)
    ap.add_argument("--algo", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(int(args.size), args.algo, args.repeats)
    isa = os.environ.get("EWC_FAST_CPP_ISA", "best")
    print(f"{args.algo} N={res['params']:,} threads={args.threads} isa={isa} load={res['loadavg'][0]:.1f}")
    for name, r in res["rows"].items():
        print(
            f"  {name:7s} {r['median_ms']:9.2f} ms  {r['bytes_per_param']:2d} B/param  {r['GBps']:5.1f} GB/s "
            f"({100 * r['share_of_copy']:4.0f}% of copy)  / torch {r['over_torch_paired']:.3f} "
            f"(bytes {r['bytes_over_torch']:.2f})",
            flush=True,
        )
    return res


if __name__ == "__main__":
    main()
