"""Benchmark: importance estimation and the EWC penalty on an FSDP2-sharded model vs one process.

Per rank: wall time of ``estimate_importance`` (Fisher) on the rank's share of the samples, of
``EWC.apply_`` (gradient on the local shards + one scalar all-reduce of the value) and of
``EWC.penalty().backward()``; storage bytes of the rank's importance and EWC state (the local
shards of the ``DTensor`` state; no allocator or RSS measurement, which the shared machine makes
noisy). 1 rank runs the plain model (the single-process baseline), N > 1 ranks FSDP2
(``fully_shard`` per block and at the root) over gloo on 127.0.0.1. Times are medians of repeats;
the ratio to the 1-rank baseline of the same run is reported beside each, together with the bytes
and communication model of ``docs/DISTRIBUTED.md``.

Run: ``python -m benchmarks.bench_fsdp [--ranks 1 2] [--width 256] [--blocks 4] [--samples 32]
[--batch 8] [--repeats 5] [--out benchmarks/results/fsdp.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.ln(x))))


class Net(nn.Module):
    """Pre-norm MLP blocks on (N, T, d) tokens, mean-pooled linear head (~8 d^2 parameters per block)."""

    def __init__(self, d: int, blocks: int, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(d) for _ in range(blocks)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def _local_bytes(tensors) -> int:
    out = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        out += t.untyped_storage().nbytes()
    return out


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, cfg: dict, path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d, T = cfg["width"], 8
        model = Net(d, cfg["blocks"])
        n_params = sum(p.numel() for p in model.parameters())
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for b in model.blocks:
                fully_shard(b, mesh=mesh)
            fully_shard(model, mesh=mesh)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(cfg["samples"], T, d, generator=g)
        y = torch.randint(0, 10, (cfg["samples"],), generator=g)
        x, y = x[rank::world], y[rank::world]
        batches = [(x[i : i + cfg["batch"]], y[i : i + cfg["batch"]]) for i in range(0, len(x), cfg["batch"])]
        box = {}

        def estimate():
            box["fisher"] = ewc_fast.estimate_importance(model, batches, ("fisher",), progress=False)["fisher"]

        def train_pass():  # the same batches through forward + backward: the layout's own cost
            for xb, yb in batches:
                F.cross_entropy(model(xb), yb).backward()
            model.zero_grad(set_to_none=True)

        t_train = _median(train_pass, cfg["repeats"])
        t_est = _median(estimate, cfg["repeats"])
        fisher = box["fisher"]
        ewc = ewc_fast.EWC(model, lam=1.0).consolidate(fisher)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.001)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        t_apply = _median(ewc.apply_, 5 * cfg["repeats"])

        def penalty_backward():
            for p in params:
                p.grad = None
            ewc.penalty().backward()

        t_pen = _median(penalty_backward, 5 * cfg["repeats"])
        out = {
            "rank": rank,
            "world": world,
            "params": n_params,
            "estimate_s": t_est,
            "train_pass_s": t_train,
            "apply_s": t_apply,
            "penalty_backward_s": t_pen,
            "importance_bytes": _local_bytes(fisher.values()),
            "ewc_state_bytes": _local_bytes([*ewc.omega.values(), *ewc.mu.values()]),
            "batches_per_rank": len(batches),
            "fsdp_meta": fisher.meta.get("fsdp"),
        }
        with open(f"{path}.{world}.{rank}", "w") as f:
            json.dump(out, f)
    finally:
        torch.distributed.destroy_process_group()


def run(ranks, cfg) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r")
        for world in ranks:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.spawn(_worker, args=(world, port, cfg, path), nprocs=world, join=True)
            for r in range(world):
                with open(f"{path}.{world}.{r}") as f:
                    rows.append(json.load(f))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/fsdp.json")
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("width", "blocks", "samples", "batch", "repeats")}
    rows = run(args.ranks, cfg)
    base = {k: max(r[k] for r in rows if r["world"] == args.ranks[0]) for k in ("estimate_s", "apply_s")}
    print(f"params {rows[0]['params']:,}; samples {cfg['samples']} (batch {cfg['batch']}); threads 1 per rank")
    print(
        "| ranks | rank | fwd+bwd pass (ms) | estimate (ms) | estimate / pass | estimate vs 1 rank | apply_ (ms) "
        "| apply_ vs 1 rank | penalty+backward (ms) | importance B/rank | EWC state B/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world']} | {r['rank']} | {r['train_pass_s'] * 1e3:.1f} | {r['estimate_s'] * 1e3:.1f} "
            f"| {r['estimate_s'] / r['train_pass_s']:.2f} | {r['estimate_s'] / base['estimate_s']:.2f} "
            f"| {r['apply_s'] * 1e3:.2f} | {r['apply_s'] / base['apply_s']:.2f} | {r['penalty_backward_s'] * 1e3:.2f} "
            f"| {r['importance_bytes']:,} | {r['ewc_state_bytes']:,} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"config": cfg, "torch": torch.__version__, "machine": platform.platform(), "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()
