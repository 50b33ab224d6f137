"""Kernel tables: ``persample_sq_`` against the cuBLAS weight-gradient GEMM it replaces, and the
consolidation ops against the copy bandwidth and torch's fused AdamW step.

persample_sq_ (kernels/persample.py, the Triton launcher; precision "ieee" is what the op runs, "tf32"
the launcher's opt-in): a Linear layer (O, I) over ``tokens`` = N x T positions. The dW GEMM of the
same layer, ``G.view(N*T, O)^T @ A.view(N*T, I)``, does 2 N T O I FLOPs; the fused kernel does the
same FLOPs (it contracts over T per sample) plus the squares, so the ratio of their times is the price
of per-sample statistics. Every row also checks its result against a float64 oracle (chunked
per-sample products) with the test suite's tolerances (1e-5; tf32 1e-2).

Consolidation ops (multi-tensor, one ragged list of ``cons_tensors`` tensors): bytes moved per
parameter from kernels/consolidation.py's table, with the state EWC really keeps (Omega fp32, mu fp64;
SI / WVA state fp32); effective GB/s = bytes / median time, and its share of the copy bandwidth of the
same run. torch's ``AdamW(fused=True)`` step on the same parameters (28 B/param: p, g, m, v read;
p, m, v written) is the reference a training step pays anyway.
"""

from __future__ import annotations

import torch

from ewc_fast import ops

from ..bench_consolidation import ragged_sizes
from .sizes import Sizes
from .timing import Rotor, rotation, time_sized

PS_TOL = {"fp32-ieee": 1e-5, "tf32": 1e-2, "bf16": 1e-5}
PS_TARGET = 1.5  # persample_sq_ (Fisher: sq only) <= 1.5 x the dW GEMM
PENALTY_TARGET = 0.85  # penalty >= 85 % of the copy bandwidth


def _oracle_sq(G, A) -> torch.Tensor:
    """sum_n (G_n^T A_n)^2 in float64, a few samples at a time (<= 512 MiB of products)."""
    N, T, O = G.shape
    I = A.shape[2]
    if T == 1:
        return (G[:, 0].double() ** 2).t() @ (A[:, 0].double() ** 2)
    acc = torch.zeros(O, I, dtype=torch.float64, device=G.device)
    k = max(1, (512 << 20) // (O * I * 8))
    for c in range(0, N, k):
        P = torch.bmm(G[c : c + k].transpose(1, 2).double(), A[c : c + k].double())
        acc += (P * P).sum(0)
    return acc


def _rel(x, ref) -> float:
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        return float("nan")
    return float((x - ref).norm() / ref.norm())


def persample_rows(device, sizes: Sizes, budget) -> tuple[list[dict], list[str]]:
    from ewc_fast.kernels import persample as K

    O, I = sizes.ps_out, sizes.ps_in
    rows, cut = [], []
    for T in sizes.ps_T:
        N = max(1, sizes.ps_tokens // T)
        for prec in ("bf16", "fp32-ieee", "tf32"):
            key = f"T={T} {prec}"
            if budget.expired():
                cut.append(key)
                continue
            dtype = torch.bfloat16 if prec == "bf16" else torch.float32
            launch_prec = "tf32" if prec == "tf32" else "ieee"
            g = torch.Generator(device=device).manual_seed(T)
            set_bytes = N * T * (O + I) * (2 if prec == "bf16" else 4)
            sets = [
                (
                    torch.randn(N, T, O, device=device, generator=g).to(dtype),
                    torch.randn(N, T, I, device=device, generator=g).to(dtype),
                )
                for _ in range(rotation(set_bytes, device))
            ]
            sq = torch.zeros(O, I, device=device)
            ab = torch.zeros(O, I, device=device)
            # correctness of this very configuration first (fresh output)
            K.launch(sq, None, *sets[0], precision=launch_prec)
            err = _rel(sq, _oracle_sq(*sets[0]))
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            try:
                t_gemm = time_sized(
                    Rotor(lambda s: torch.mm(s[0].view(-1, O).t(), s[1].view(-1, I)), sets), device, sizes
                )
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            t_sq = time_sized(
                Rotor(lambda s, sq=sq, p=launch_prec: K.launch(sq, None, s[0], s[1], precision=p), sets), device, sizes
            )
            t_both = time_sized(
                Rotor(lambda s, sq=sq, ab=ab, p=launch_prec: K.launch(sq, ab, s[0], s[1], precision=p), sets),
                device,
                sizes,
            )
            flops = 2 * N * T * O * I
            ratio = t_sq / t_gemm
            rows.append(
                {
                    "key": key,
                    "T": T,
                    "N": N,
                    "O": O,
                    "I": I,
                    "precision": prec,
                    "flops": flops,
                    "gemm_s": t_gemm,
                    "sq_s": t_sq,
                    "sq_abs_s": t_both,
                    "gemm_tflop_s": flops / t_gemm / 1e12,
                    "sq_tflop_s": flops / t_sq / 1e12,
                    "ratio_sq": ratio,
                    "ratio_sq_abs": t_both / t_gemm,
                    "rel_err": err,
                    "tol": PS_TOL[prec],
                    "check": "ok" if err <= PS_TOL[prec] else "FAIL",
                    "target": PS_TARGET,
                    "met": ratio <= PS_TARGET,
                }
            )
            del sets
    return rows, cut


# ------------------------------------------------------------------------------- consolidation
#: name -> (bytes per parameter, what is moved)
CONS_BYTES = {
    "penalty_apply_": (24, "read g, theta, Omega (fp32), mu (fp64); write g"),
    "penalty_apply_ (stabilised)": (24, "as penalty_apply_"),
    "consolidate_": (32, "read Omega (fp32), mu (fp64), F, anchor; write Omega, mu"),
    "si_accumulate_": (24, "read omega, g, theta, prev; write omega, prev (fp32)"),
    "si_consolidate_": (28, "read omega, out, theta, start; write out, omega, start (fp32)"),
    "wva_attenuate_": (16, "read theta, old, A; write theta (fp32)"),
    "torch AdamW(fused=True).step()": (28, "read p, g, m, v; write p, m, v (fp32)"),
}


def _cons_sets(device, sizes: Sizes, n_sets: int):
    shapes = ragged_sizes(sizes.cons_params, sizes.cons_tensors)
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(n_sets):

        def f32(scale=1.0, pos=False):
            return [
                (torch.rand(s, device=device, generator=g) if pos else torch.randn(s, device=device, generator=g))
                * scale
                for s in shapes
            ]

        out.append(
            {
                "g": f32(),
                "theta": f32(),
                "omega": f32(pos=True),
                "mu": [t.double() for t in f32()],
                "fisher": f32(pos=True),
                "anchor": f32(),
                "w": f32(),
                "prev": f32(),
                "out": f32(),
                "start": f32(),
                "old": f32(),
                "accum": f32(pos=True),
            }
        )
    return out


def consolidation_rows(device, sizes: Sizes, budget, copy_gb_s: float | None) -> tuple[list[dict], list[str]]:
    backend = "triton"
    per_set = sizes.cons_params * (4 * 11 + 8)
    sets = _cons_sets(device, sizes, rotation(per_set, device))
    fns = {
        "penalty_apply_": lambda s: ops.penalty_apply_(s["g"], s["theta"], s["omega"], s["mu"], 0.5, backend=backend),
        "penalty_apply_ (stabilised)": lambda s: ops.penalty_apply_(
            s["g"], s["theta"], s["omega"], s["mu"], 0.5, alpha=0.01, backend=backend
        ),
        "consolidate_": lambda s: ops.consolidate_(s["omega"], s["mu"], s["fisher"], s["anchor"], 1.0, backend=backend),
        "si_accumulate_": lambda s: ops.si_accumulate_(s["w"], s["g"], s["theta"], s["prev"], backend=backend),
        "si_consolidate_": lambda s: ops.si_consolidate_(
            s["w"], s["theta"], s["start"], s["out"], 0.1, backend=backend
        ),
        "wva_attenuate_": lambda s: ops.wva_attenuate_(s["theta"], s["old"], s["accum"], 0.5, backend=backend),
    }
    rows, cut = [], []
    times = {}
    # torch's fused AdamW on the same parameters (its own state: m, v)
    adam_key = "torch AdamW(fused=True).step()"
    if budget.expired():
        cut.append(adam_key)
    else:
        opts = []
        for s in sets:
            ps = [torch.nn.Parameter(t) for t in s["theta"]]
            for p, gr in zip(ps, s["g"]):
                p.grad = gr
            opts.append(torch.optim.AdamW(ps, lr=1e-4, fused=True))
        times[adam_key] = time_sized(Rotor(lambda o: o.step(), opts), device, sizes)
        del opts
    for name, fn in fns.items():
        if budget.expired():
            cut.append(name)
            continue
        times[name] = time_sized(Rotor(fn, sets), device, sizes)
    adam = times.get(adam_key)
    for name, t in times.items():
        bpp, what = CONS_BYTES[name]
        gbs = bpp * sizes.cons_params / t / 1e9
        row = {
            "key": name,
            "params": sizes.cons_params,
            "tensors": sizes.cons_tensors,
            "bytes_per_param": bpp,
            "bytes_model": what,
            "seconds": t,
            "gb_s": gbs,
            "copy_share": gbs / copy_gb_s if copy_gb_s else None,
            "vs_adamw": t / adam if adam else None,
        }
        if name == "penalty_apply_":
            row["target"] = PENALTY_TARGET
            row["met"] = None if row["copy_share"] is None else row["copy_share"] >= PENALTY_TARGET
        rows.append(row)
    return rows, cut
