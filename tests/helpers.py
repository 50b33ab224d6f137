"""Helpers shared by the test packages (never import one test module from another).

* :func:`assert_close` -- relative-error check of an importance against its float64 oracle.
* :func:`ragged` -- split (x, y) into ragged batches.
* :func:`mlp` / :func:`data_of` / :func:`rel` -- a small classifier (with dropout), ragged random
  classification batches for it, and the relative error of a tensor against a reference.
* :func:`cached_reference` / :func:`run_case` -- the float64 oracle of a test case (cached per
  case builder and name) and the engine's result on it.
* :func:`load_example` -- a script of ``examples/`` as a module (the suite runs the examples).
* :func:`spawn_gloo` -- run a worker on N local processes that join a gloo process group.
"""

import importlib.util

import torch
from torch import nn

import ewc_fast
from ewc_fast.testing.importance import reference_importance

#: relative error allowed per parameter in fp32 against the float64 oracle (fp32 rounding of sums
#: over at most a few hundred terms stays orders of magnitude below it)
TOL = 1e-5
ALL = ("fisher", "fisher_mc", "fisher_exact", "mas", "sig", "magnitude", "random", "fisher_batched")
TOKEN = ("fisher", "fisher_mc", "mas", "sig", "fisher_batched")  # (N, T, C) outputs: no fisher_exact

#: Triton is importable and the kernels package is installed (tests run it in the CPU interpreter)
TRITON = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec("ewc_fast.kernels.persample") is not None
)


def assert_close(res, ref, tol=TOL, what=""):
    """``res`` (fp32 tensors) equals ``ref`` (float64) within relative error ``tol`` per entry; NaN fails."""
    assert set(res) == set(ref), (what, sorted(set(res) ^ set(ref)))
    for k, b in ref.items():
        a = res[k]
        assert a.shape == b.shape and a.dtype == torch.float32, (what, k)
        a = a.double()
        assert bool(torch.isfinite(a).all()), (what, k, "non-finite")
        denom = float(b.norm())
        err = float((a - b).norm()) / denom if denom > 0 else float(a.norm())
        assert err <= tol, f"{what} {k}: relative error {err:.3g} > {tol}"  # NaN fails too


def ragged(x, y, sizes=(3, 1, 4)):
    """Batches of ``sizes`` samples from ``x`` (and ``y`` unless None)."""
    out, s = [], 0
    for n in sizes:
        out.append((x[s : s + n], y[s : s + n]) if y is not None else x[s : s + n])
        s += n
    return out


def mlp(n_in=6, n_out=3, seed=0):
    """Linear-Tanh-Dropout-Linear classifier, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, n_out))


def data_of(n=8, n_in=6, n_cls=3, sizes=(3, 1, 4), seed=0):
    """``n`` random (x (n_in,), class) samples from generator ``seed``, as ragged batches of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, n_in, generator=g), torch.randint(0, n_cls, (n,), generator=g)
    return ragged(x, y, sizes)


def rel(a, b):
    """||a - b|| / ||b|| in float64."""
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


_REF: dict = {}


def cached_reference(make, name):
    """Float64 oracle of case ``name`` built by ``make(name) -> (model, data, methods)``, cached."""
    if (make, name) not in _REF:
        model, data, methods = make(name)
        _REF[make, name] = reference_importance(
            model, data, methods, generator=torch.Generator().manual_seed(3), mc_samples=2
        )
    return _REF[make, name]


def run_case(make, name, backend, **kw):
    """``estimate_importance`` on case ``name`` built by ``make`` with the oracle's seed; ``(result, methods)``."""
    model, data, methods = make(name)
    res = ewc_fast.estimate_importance(
        model,
        data,
        methods,
        backend=backend,
        progress=False,
        generator=torch.Generator().manual_seed(3),
        mc_samples=2,
        **kw,
    )
    return res, methods


def load_example(name: str):
    """``examples/<name>.py`` imported as a module (its ``main(argv)`` runs it)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spawn_gloo(worker, world: int, path: str) -> None:
    """``worker(rank, world, path)`` on ``world`` processes, each in a gloo process group on 127.0.0.1
    (one intra-op thread), destroyed when the worker returns or raises."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_entry, args=(worker, world, port, path), nprocs=world, join=True)


def _gloo_entry(rank, worker, world, port, path):
    import os

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, path)
    finally:
        torch.distributed.destroy_process_group()
