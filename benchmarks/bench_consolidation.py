"""Benchmark of the consolidation ops: EWC penalty + gradient and the Synaptic Intelligence step.

Penalty rows: the fused multi-tensor ``penalty_apply_`` (C++ backend on CPU, Triton on CUDA) vs the
same op's torch backend vs an Avalanche-style per-task autograd loop
(``sum_K (lam/2) sum F_K (theta - theta*_K)^2`` then ``backward()``), next to a plain memory copy
measured in the same run. Effective bandwidth counts the bytes the fused op must move per parameter:
read grad, theta, Omega (fp32) and mu (fp64) and write grad = 24 B.

SI rows (Zenke et al. 2017): one optimizer step (Adam) with and without ``SynapticIntelligence``
attached, and a whole training step (forward + backward + step) with and without it;
:func:`bench_si_avalanche` measures Avalanche's per-step SI bookkeeping, reproduced, on the same model;
:func:`bench_si_avalanche_lib` the real Avalanche plugin's (in the Avalanche environment).

Run: ``python -m benchmarks.bench_consolidation [--sizes 10e6 100e6] [--tasks 1 10] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import platform

import torch

import ewc_fast
from ewc_fast import ops
from ewc_fast.experiments.records import write_json

from ._timing import measure, measure_interleaved, summarize

PENALTY_BYTES_PER_PARAM = 4 + 4 + 4 + 8 + 4  # grad, theta, Omega (fp32), mu (fp64) read; grad written
COPY_BYTES_PER_PARAM = 4 + 4  # fp32 read + write


def ragged_sizes(total: int, n: int = 24, seed: int = 0) -> list[int]:
    """Split ``total`` into ``n`` ragged tensor sizes (like a model's layers)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    sizes = (w / w.sum() * total).long().clamp_min(1)
    sizes[-1] += total - int(sizes.sum())
    return [int(s) for s in sizes]


def bench_penalty(total: int, n_tasks: int, repeats: int, device: str, lam: float = 1.0) -> dict:
    sizes = ragged_sizes(total)
    params = [torch.randn(s, device=device) for s in sizes]
    grads = [torch.zeros_like(p) for p in params]
    omega = [torch.zeros_like(p) for p in params]
    mu = [torch.zeros(s, dtype=torch.float64, device=device) for s in sizes]
    tasks = []
    c = 0.0
    for _ in range(n_tasks):
        fisher = [torch.rand_like(p) for p in params]
        anchor = [p + 0.01 * torch.randn_like(p) for p in params]
        c += float(ops.consolidate_(omega, mu, fisher, anchor, 1.0))
        tasks.append((fisher, anchor))

    src = torch.empty(total, device=device)
    dst = torch.empty_like(src)
    leaf = [p.clone().requires_grad_(True) for p in params]

    def per_task_loop():
        penalty = 0.0
        for fisher, anchor in tasks:
            for p, f, a in zip(leaf, fisher, anchor):
                penalty = penalty + (f * (p - a).pow(2)).sum()
        (0.5 * lam * penalty).backward()

    def reset(name):
        if name == "per-task autograd loop":
            for p in leaf:
                p.grad = None

    backends = [b for b in ("triton", "cpp", "torch") if b in ewc_fast.available_backends(device)]
    if torch.device(device).type == "cpu":  # Triton on CPU is the interpreter: not a benchmark
        backends = [b for b in backends if b != "triton"]
    fns = {"copy": lambda: dst.copy_(src)}
    for b in backends:
        fns[f"fused[{b}]"] = lambda b=b: ops.penalty_apply_(grads, params, omega, mu, lam, c=c, backend=b)
    fns["per-task autograd loop"] = per_task_loop
    times = measure_interleaved(fns, repeats=repeats, device=device, setup=reset)
    rows = {"copy": {"time": times["copy"], "gbs": COPY_BYTES_PER_PARAM * total / times["copy"].median_s / 1e9}}
    for b in backends:
        t = times[f"fused[{b}]"]
        rows[f"fused[{b}]"] = {"time": t, "gbs": PENALTY_BYTES_PER_PARAM * total / t.median_s / 1e9}
    rows["per-task autograd loop"] = {"time": times["per-task autograd loop"], "gbs": None}
    return {"params": total, "tasks": n_tasks, "rows": rows}


def si_workload(width: int, depth: int, batch: int, device: str):
    """The SI benchmark's seeded MLP 784-(width x depth)-10, one batch, Adam and the loss.

    Returns ``(model, x, y, optimizer, loss_fn)``; shared by every SI contender so they measure the
    same model and optimizer.
    """
    torch.manual_seed(0)
    layers, d = [], 784
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    model = torch.nn.Sequential(*layers, torch.nn.Linear(d, 10)).to(device)
    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, x, y, opt, torch.nn.CrossEntropyLoss()


def bench_si(width: int, depth: int, batch: int, repeats: int, device: str) -> dict:
    model, x, y, opt, loss_fn = si_workload(width, depth, batch, device)
    n_params = sum(p.numel() for p in model.parameters())

    def fwd_bwd():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()

    def train_step():
        fwd_bwd()
        opt.step()

    fwd_bwd()
    out = {"params": n_params, "batch": batch}
    si = ewc_fast.SynapticIntelligence(model)
    # Round-robin: each round times the plain step and the step with SI attached, so both see the
    # same machine load. Attaching/detaching is outside the timed region.
    plain = {"step": opt.step, "train_step": train_step}
    for name, fn in plain.items():
        ts_plain, ts_si = [], []
        for r in range(repeats + 1):
            for mode in ("plain", "si"):
                if mode == "si":
                    si.attach(opt)
                t = measure(fn, repeats=1, warmup=0, device=device)
                if mode == "si":
                    si.detach()
                if r > 0:
                    (ts_si if mode == "si" else ts_plain).append(t.median_s)
        out[name] = summarize(ts_plain)
        out[name + "+si"] = summarize(ts_si)
    return out


def bench_si_avalanche(width: int, depth: int, batch: int, repeats: int, device: str) -> dict:
    """Avalanche's SynapticIntelligencePlugin per-step bookkeeping, reproduced as a baseline.

    Same model / optimizer as :func:`bench_si` (:func:`si_workload`). Per training iteration, as the plugin
    does: before it, copy every parameter (flattened) into a CPU buffer (old theta); after it, copy
    parameters (new theta) and gradients into CPU buffers and add ``g * (new - old)`` to the
    trajectory, one parameter at a time. (The plugin's per-step penalty term is not included.)
    """
    model, x, y, opt, loss_fn = si_workload(width, depth, batch, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buf = {
        k: {n: torch.zeros(p.numel(), dtype=p.dtype) for n, p in named} for k in ("old", "new", "grad", "trajectory")
    }

    def train_step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.step()

    @torch.no_grad()
    def copy_into(target, grads=False):
        for n, p in named:
            src = p.grad if grads else p
            target[n][...] = src.detach().cpu().flatten()

    def train_step_si():
        copy_into(buf["old"])
        train_step()
        with torch.no_grad():
            copy_into(buf["new"])
            copy_into(buf["grad"], grads=True)
            for n, _ in named:
                buf["trajectory"][n] += buf["grad"][n] * (buf["new"][n] - buf["old"][n])

    train_step()
    return {
        "params": sum(p.numel() for _, p in named),
        "batch": batch,
        "train_step": measure(train_step, repeats=repeats, device=device),
        "train_step+si": measure(train_step_si, repeats=repeats, device=device),
    }


def bench_si_avalanche_lib(width: int, depth: int, batch: int, repeats: int, device: str) -> dict:
    """The real Avalanche 0.6 ``SynapticIntelligencePlugin`` bookkeeping around each training step.

    Its own static methods, as its ``before_training_iteration`` / ``after_training_iteration`` hooks
    call them: ``pre_update`` (snapshot the weights) before the step, ``post_update`` (snapshot weights
    and gradients, add ``g * (new - old)`` to the trajectory) after it; set up with ``create_syn_data``
    / ``init_batch`` as at ``before_training_exp``. The snapshots are ``param.detach().cpu().flatten()``:
    on a CUDA model a copy to the host, on a CPU model a *view* of the parameter (no copy -- and the path
    integral stays 0, because "old" and "new" are then the same tensor). Needs ``avalanche-lib``
    (the Avalanche environment, ``scripts/avalanche_env.sh``)."""
    from avalanche.training.plugins import SynapticIntelligencePlugin as AvalancheSI

    model, x, y, opt, loss_fn = si_workload(width, depth, batch, device)
    plugin = AvalancheSI(si_lambda=0.0)
    AvalancheSI.create_syn_data(model, plugin.ewc_data, plugin.syn_data, plugin.excluded_parameters)
    AvalancheSI.init_batch(model, plugin.ewc_data, plugin.syn_data, plugin.excluded_parameters)

    def train_step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.step()

    def train_step_si():
        AvalancheSI.pre_update(model, plugin.syn_data, plugin.excluded_parameters)
        train_step()
        AvalancheSI.post_update(model, plugin.syn_data, plugin.excluded_parameters)

    train_step()
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "train_step": measure(train_step, repeats=repeats, device=device),
        "train_step+si": measure(train_step_si, repeats=repeats, device=device),
        "torch": torch.__version__,
    }


def format_penalty(res: dict) -> list[str]:
    rows = res["rows"]
    copy = rows["copy"]
    loop = rows["per-task autograd loop"]["time"].median_s
    lines = [
        f"| {res['params'] / 1e6:.0f}M | {res['tasks']} | memory copy | {copy['time']} | {copy['gbs']:.1f} | 100% | - |"
    ]
    for name, r in rows.items():
        if name == "copy":
            continue
        gbs = f"{r['gbs']:.1f}" if r["gbs"] else "-"
        frac = f"{100 * r['gbs'] / copy['gbs']:.0f}%" if r["gbs"] else "-"
        speedup = f"{loop / r['time'].median_s:.1f}x"
        lines.append(
            f"| {res['params'] / 1e6:.0f}M | {res['tasks']} | {name} | {r['time']} | {gbs} | {frac} | {speedup} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[10e6, 100e6])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--si-width", type=int, default=2048)
    ap.add_argument("--si-depth", type=int, default=3)
    ap.add_argument("--si-batch", type=int, default=128)
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args(argv)

    print(
        f"# consolidation benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print("| params | tasks | contender | median [min-max] | GB/s | of copy BW | vs per-task loop |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for size in args.sizes:
        for n_tasks in args.tasks:
            res = bench_penalty(int(size), n_tasks, args.repeats, args.device)
            results.append(res)
            print("\n".join(format_penalty(res)), flush=True)
    si = bench_si(args.si_width, args.si_depth, args.si_batch, args.repeats, args.device)
    print(
        f"\n# SI overhead, MLP 784-{args.si_width}x{args.si_depth}-10 ({si['params'] / 1e6:.1f}M params), "
        f"Adam, batch {si['batch']}"
    )
    print("| measured | plain | with SI | overhead |")
    print("|---|---|---|---|")
    for a, b in (("step", "step+si"), ("train_step", "train_step+si")):
        ov = si[b].median_s / si[a].median_s - 1
        print(f"| {a.replace('_', ' ')} | {si[a]} | {si[b]} | {100 * ov:+.1f}% |")
    if args.json:
        write_json(args.json, {"penalty": results, "si": si})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
