"""What the estimation forward costs beyond a plain one, in parts (``benchmarks/ANALYSIS_CPU.md``, issue 10).

For each Hugging Face workload, on its first batch, interleaved ``--repeats`` times: a plain forward,
one under a ``TorchFunctionMode`` that does nothing (the dispatch to Python alone), one under the
provenance tracker (:class:`ewc_fast.estimation.provenance.Tracker`, with the module-stack hooks),
and the planned capture forward the engine runs per batch (:meth:`Capture.record`). Times are CPU
thread time (a loaded machine preempts both sides alike), reported as min and median and as ratios
to the plain forward::

    python -m benchmarks.bench_forward --workloads hf-llama hf-gpt2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ewc_fast.estimation.batches import forward
from ewc_fast.estimation.capture import Capture
from ewc_fast.estimation.plan import ModuleStack, build_plan, discover
from ewc_fast.estimation.provenance import Tracker

from .workloads_hf import HF_FACTORIES, HF_WORKLOADS

PARTS = ("plain", "empty mode", "tracker", "capture")


class _Empty(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def measure(name: str, size: str = "full", repeats: int = 15) -> dict[str, list[float]]:
    """Thread times (s) of each part of :data:`PARTS` on workload ``name``'s first batch."""
    wl = HF_FACTORIES[name](size)
    model, batches = wl.make_model(), wl.make_batches()
    x = batches[0][0]
    n = x.shape[0]
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    ids = {id(p) for _, p in trainable}
    cap = Capture(model, build_plan(model, trainable, discover(model, x, ids, n)), ids)

    def empty():
        with _Empty():
            return forward(model, x)

    def tracker():
        tr = Tracker(n)
        tr.mark_inputs(tree_leaves(x))
        stack = ModuleStack(model, tr)
        try:
            with tr:
                return forward(model, x)
        finally:
            stack.remove()

    def capture():
        out = cap.record(model, x, n)
        cap.clear()
        return out

    fns = dict(zip(PARTS, (lambda: forward(model, x), empty, tracker, capture)))
    times: dict[str, list[float]] = {k: [] for k in PARTS}
    try:
        for f in fns.values():  # warm-up
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.thread_time()
                out = f()
                times[k].append(time.thread_time() - t0)
                del out
    finally:
        cap.remove()
    return times


def report(name: str, times: dict[str, list[float]]) -> str:
    lines = [f"{name}: CPU thread time per forward (x plain)"]
    for stat in (min, statistics.median):
        v = {k: stat(t) for k, t in times.items()}
        row = ", ".join(f"{k} {t * 1e3:.1f} ms ({t / v['plain']:.3f})" for k, t in v.items())
        lines.append(f"  {stat.__name__:6s} {row}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["hf-llama", "hf-gpt2"], choices=HF_WORKLOADS)
    ap.add_argument("--size", default="full", choices=("tiny", "small", "full"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.workloads:
        print(report(name, measure(name, args.size, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
