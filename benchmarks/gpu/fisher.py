"""Fisher table: ``estimate_importance`` (Triton backend) on the transformer workloads
(benchmarks/workloads.py) against a plain forward+backward over the same data and the exact peers.

Rows per workload, each timed over the whole data set (every batch), CUDA events, median of
``repeats`` after one warm-up, a fresh model per contender:

* plain forward+backward (the unit: what one training epoch's gradient pass costs);
* ewc_fast Fisher, and Fisher+MAS in one call;
* exact peers: the batch-1 loop, torch.func ``vmap(grad)``, Opacus ``GradSampleModule`` (when
  importable; the lent machine has no Opacus unless carried as a wheel, see docs/GPU.md).

Targets: ewc_fast Fisher <= 1.3 x plain, and >= 3 x faster than the fastest exact peer. The Fisher of
ewc_fast is also compared with torch.func's (relative difference over all parameters; both fp32).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from ..contenders.base import FISHER
from ..contenders.opacus_gsm import OpacusGSM
from ..contenders.reference import PerSampleLoop, PlainFwdBwd
from ..contenders.torch_func import TorchFunc
from ..workloads import get_workload
from .sizes import Sizes
from .timing import time_call

PLAIN_TARGET = 1.3
PEER_TARGET = 3.0


def _ours(methods):
    def prepare(workload, model, batches, device):
        import ewc_fast

        def run():
            res = ewc_fast.estimate_importance(model, batches, methods, backend="triton", progress=False)
            return {m: dict(res[m].items()) for m in methods}

        return run

    return prepare


def _peer(contender, methods):
    def prepare(workload, model, batches, device):
        return contender.prepare(workload, model, batches, device, methods)

    return prepare


def contenders() -> list[tuple[str, str, object]]:
    """(key, kind, prepare) in table order; kind: unit | ours | exact-peer."""
    out = [
        ("plain fwd+bwd", "unit", _peer(PlainFwdBwd(), ())),
        ("ewc_fast Fisher", "ours", _ours(("fisher",))),
        ("ewc_fast Fisher+MAS", "ours", _ours(("fisher", "mas"))),
        ("batch-1 loop", "exact-peer", _peer(PerSampleLoop(), (FISHER,))),
        ("torch.func", "exact-peer", _peer(TorchFunc(), (FISHER,))),
    ]
    if importlib.util.find_spec("opacus") is not None:
        out.append(("Opacus", "exact-peer", _peer(OpacusGSM(), (FISHER,))))
    return out


def _flat(res: dict) -> torch.Tensor:
    return torch.cat([res[k].detach().double().flatten().cpu() for k in sorted(res)])


def workload_rows(name: str, device, sizes: Sizes, budget) -> tuple[list[dict], list[str], dict]:
    """Rows of one workload, the rows cut by ``budget``, and the workload's summary (ratios, targets)."""
    n, b = sizes.samples[name]
    w = dataclasses.replace(get_workload(name, sizes.workload_size), n_samples=n, batch_size=b)
    batches = w.make_batches(device)
    rows, cut, fishers = [], [], {}
    for key, kind, prepare in contenders():
        if budget.expired():
            cut.append(f"{name}: {key}")
            continue
        row = {"workload": name, "key": key, "kind": kind}
        try:
            model = w.make_model(device)
            fn = prepare(w, model, batches, device)
            result = {}

            def call(fn=fn, result=result):
                result["r"] = fn()

            med, times = time_call(call, device, repeats=sizes.repeats, warmup=1)
            row.update(seconds=med, repeats=times)
            r = result.get("r") or {}
            if FISHER in r:
                fishers[key] = _flat(r[FISHER])
        except Exception as exc:  # a peer that cannot run this workload is reported, not fatal
            row.update(error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        del model
    summary = {"workload": name, "title": w.describe(), "samples": n, "batch": b}
    t = {r["key"]: r["seconds"] for r in rows if "seconds" in r}
    if "plain fwd+bwd" in t:
        for r in rows:
            if "seconds" in r:
                r["vs_plain"] = r["seconds"] / t["plain fwd+bwd"]
    ours = t.get("ewc_fast Fisher")
    peers = {r["key"]: r["seconds"] for r in rows if r["kind"] == "exact-peer" and "seconds" in r}
    if ours is not None and "plain fwd+bwd" in t:
        summary["fisher_vs_plain"] = ours / t["plain fwd+bwd"]
        summary["met_plain"] = summary["fisher_vs_plain"] <= PLAIN_TARGET
    if ours is not None and peers:
        fastest = min(peers, key=peers.get)
        summary["fastest_exact_peer"] = fastest
        summary["speedup_vs_peer"] = peers[fastest] / ours
        summary["met_peer"] = summary["speedup_vs_peer"] >= PEER_TARGET
    if "ewc_fast Fisher" in fishers and "torch.func" in fishers:
        a, ref = fishers["ewc_fast Fisher"], fishers["torch.func"]
        summary["rel_diff_vs_torch_func"] = float((a - ref).norm() / ref.norm())
    return rows, cut, summary
