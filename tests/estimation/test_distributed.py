"""Several ranks (torch.distributed, gloo) on disjoint shards equal one process on their union."""

import os
import socket
import tempfile

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.estimation import sig
from tests.helpers import data_of, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


METHODS_DDP = ("fisher", "fisher_exact", "mas", "sig", "random")


def _ddp_data():
    return data_of(n=10, sizes=(3, 2, 4, 1), seed=7)


class Gated(nn.Module):
    """``extra`` runs only on batches of 4 samples: in the 2-rank split of ``_ddp_data()`` (sizes
    3, 2, 4, 1) only rank 0's shard has one, so rank 1 never sees that module run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.extra, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if x.shape[0] == 4:
            h = h + torch.tanh(self.extra(h))
        return self.out(h)


def _ddp_worker(rank, world, port, path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = _ddp_data()[rank::world]
        res = ewc_fast.estimate_importance(
            mlp(), shard, METHODS_DDP, progress=False, generator=torch.Generator().manual_seed(100 + rank)
        )
        out = {m: (dict(r), r.n_samples) for m, r in res.items()}
        gated = ewc_fast.estimate_importance(Gated(), shard, ("sig",), progress=False)["sig"]
        out["gated_sig"] = (dict(gated), gated.meta["sig_magnitude_fallback"])
        torch.save(out, f"{path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_ranks_equal_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "res")
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=True)
        ranks = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    single = ewc_fast.estimate_importance(mlp(), _ddp_data(), METHODS_DDP, progress=False)
    for m in METHODS_DDP:
        for r in ranks:
            tensors, n = r[m]
            if m == "random":
                assert all(torch.equal(tensors[k], ranks[0][m][0][k]) for k in tensors)
                continue
            assert n == 10
            for k, t in single[m].items():
                torch.testing.assert_close(tensors[k], t, rtol=2e-6, atol=0)
    # SIG's factor-or-|w| choice is collective: rank 1, where Gated.extra never ran, still returns
    # the factor (its share of the sum is zero), not |w|
    single = ewc_fast.estimate_importance(Gated(), _ddp_data(), ("sig",), progress=False)["sig"]
    assert single.meta["sig_magnitude_fallback"] == []
    for r in ranks:
        tensors, fallback = r["gated_sig"]
        assert fallback == []
        for k, t in single.items():
            torch.testing.assert_close(tensors[k], t, rtol=2e-6, atol=0)


def test_sig_decision_is_collective():
    """The SIG rule per parameter comes from flags summed over ranks (sig.flags/sig.decide)."""
    names = ["a", "b", "c", "d"]
    rank0 = sig.flags(names, {"a": True, "b": False, "c": True})
    rank1 = sig.flags(names, {"a": True})  # b and c never ran here, d nowhere
    summed = [x + y for x, y in zip(rank0, rank1)]
    assert sig.decide(names, summed) == {"a": True, "b": False, "c": True, "d": None}
    assert sig.decide(names, rank1) == {"a": True, "b": None, "c": None, "d": None}
    bad = [x + y for x, y in zip(rank0, sig.flags(names, {"a": False}))]
    with pytest.raises(RuntimeError, match="disagree"):
        sig.decide(names, bad)


def _misuse_worker(rank, world, port, path):
    """Rank 1 asks for other methods (config check); then rank 1's data loader raises mid-pass and
    rank 1 catches it and carries on (failure flag in the closing collective)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60)
    )
    out = {}
    try:
        shard = _ddp_data()[rank::world]
        try:
            ewc_fast.estimate_importance(mlp(), shard, "fisher" if rank == 0 else "mas", progress=False)
        except ValueError as e:
            out["config"] = str(e)
        try:
            ewc_fast.estimate_importance(mlp(), shard, "fisher", mc_samples=0 if rank == 1 else 1, progress=False)
        except ValueError as e:
            out["invalid"] = str(e)

        def loader():
            yield shard[0]
            if rank == 1:
                raise RuntimeError("loader broke")
            yield shard[1]

        try:
            ewc_fast.estimate_importance(mlp(), loader(), "fisher", progress=False)
        except RuntimeError as e:
            out["failed"] = str(e)
        ok = ewc_fast.estimate_importance(mlp(), shard, "fisher", progress=False)["fisher"]  # still usable
        out["after"] = ok.n_samples
        torch.save(out, f"{path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_with_different_arguments_or_a_failing_loader_all_raise_promptly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "res")
        torch.multiprocessing.spawn(_misuse_worker, args=(2, port, path), nprocs=2, join=True)
        ranks = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    for r in ranks:
        assert "different configurations" in r["config"] and "methods" in r["config"]
        assert "mc_samples" in r["invalid"]
        assert r["after"] == 10
    assert "invalid arguments on rank(s) [1]" in ranks[0]["invalid"]
    assert ranks[1]["failed"] == "loader broke"
    assert "failed on rank(s) [1]" in ranks[0]["failed"] and "loader broke" in ranks[0]["failed"]
