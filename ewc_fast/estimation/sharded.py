"""Importance estimation on FSDP2 models (``torch.distributed.fsdp.fully_shard``): parameters stored
as ``DTensor`` shards, gathered unit by unit around each forward and backward.

**Identity.** The data pass finds which module or function serves each trainable parameter by
object identity (:mod:`.plan`, :mod:`.capture`). Under FSDP2 a module holds its sharded
``DTensor`` parameter between passes and an *unsharded* ``nn.Parameter`` (a full-size tensor whose
storage FSDP frees after use) while its unit runs. The pass therefore tracks the unsharded objects:
a warm-up no-grad forward on two samples makes FSDP create them (:func:`warm_up`),
:func:`unsharded_aliases` maps each sharded parameter to its unsharded twin, and
:func:`unsharded_identity` lets the plan see the twins on the modules while it is built (identity
only, no data).

**Sums.** Per-sample statistics need a layer's full weight shape: the rules write a batch's sums
into a transient full-size fp32 buffer per parameter, allocated when the module's gradient arrives
(:class:`ShardedSums`). As soon as the module's statistics are complete the stream calls
:meth:`ShardedSums.flush`, which reduce-scatters the buffer over the parameter's mesh (``Partial`` ->
the parameter's placements: each rank receives the sum over all ranks of its own shard) into a
float64 accumulator of the local shard, and frees the buffer. So a rank holds its shards of the sums
plus the full buffers of the layers of one module at a time -- never a full copy of every layer.
Communication: one reduce-scatter of 4 bytes per parameter element per batch and backward seed
(``fisher``: one seed; ``fisher_exact``: one per class; ``fisher_mc``: one per draw; ``mas``: one).

Parameters left out of FSDP (plain tensors) keep the ordinary full-size sums, all-reduced at the
end (:mod:`.distributed`). The collectives run inside the backward in the order the modules
complete, the same on every rank: like FSDP itself, every rank must run the same number of batches
through the same modules. ``sig`` and ``fisher_batched`` are not supported on sharded parameters.

Nothing here is public API.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..ops._sharding import is_sharded

__all__ = ["sharded_params", "check_managed", "warm_up", "unsharded_aliases", "unsharded_identity", "ShardedSums"]

#: methods that cannot run on sharded parameters, and why
UNSUPPORTED = {
    "sig": "its forward-only statistics are not reduce-scattered per module",
    "fisher_batched": "it needs every parameter's batch gradient at once (a full copy)",
}


def sharded_params(trainable: list[tuple[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    """``name -> parameter`` of the ``DTensor`` (sharded) trainable parameters."""
    return {k: p for k, p in trainable if is_sharded(p)}


def _fsdp_params(model: nn.Module):
    """FSDP2's per-parameter records (``FSDPParam``) of every ``fully_shard`` unit in ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    out = []
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = state._fsdp_param_group
            groups = [group] if group is not None else []
        for g in groups:
            out.extend(g.fsdp_params)
    return out


def check_managed(owner: str, model: nn.Module, sharded: dict[str, nn.Parameter]) -> None:
    """``ValueError`` for a ``DTensor`` parameter that no ``fully_shard`` unit of ``model`` manages
    (tensor parallelism, ``distribute_tensor`` by hand, or a unit outside ``model``)."""
    managed = {id(fp.sharded_param) for fp in _fsdp_params(model)}
    for k, p in sharded.items():
        if id(p) not in managed:
            raise ValueError(
                f"{owner}: parameter {k!r} is a DTensor {tuple(p.placements)} that no FSDP2 fully_shard unit of "
                "the model manages; importance estimation supports FSDP2 (fully_shard, HSDP) sharding and plain "
                "parameters, not tensor parallelism or DTensors outside FSDP2"
            )


def warm_up(model: nn.Module, forward, inputs) -> None:
    """One no-grad forward on ``inputs`` (FSDP2 gathers each unit once and creates its unsharded
    parameters, which :func:`unsharded_aliases` needs)."""
    with torch.no_grad():
        forward(model, inputs)


def unsharded_aliases(owner: str, model: nn.Module, sharded: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """``name -> unsharded twin`` of every sharded trainable parameter (after :func:`warm_up`).

    ``ValueError`` for a parameter FSDP2 did not gather into a plain tensor (tensor parallelism
    inside FSDP2)."""
    by_id = {}
    for fp in _fsdp_params(model):
        twin = getattr(fp, "_unsharded_param", None)
        if twin is not None:
            by_id[id(fp.sharded_param)] = twin
    out = {}
    for k, p in sharded.items():
        twin = by_id.get(id(p))
        if twin is None or is_sharded(twin):
            raise ValueError(
                f"{owner}: parameter {k!r} is a DTensor {tuple(p.placements)} that FSDP2 does not gather into a "
                "plain tensor (tensor parallelism?); importance estimation supports FSDP2 (fully_shard, HSDP) "
                "sharding and plain parameters"
            )
        out[k] = twin
    return out


@contextlib.contextmanager
def unsharded_identity(model: nn.Module, aliases: dict[str, nn.Parameter]):
    """Within the block, the modules hold the unsharded twins (identity only: their storage may be
    freed) in place of the sharded parameters of ``aliases``; restored on exit."""
    twins = {id(t) for t in aliases.values()}
    swapped = []
    for fp in _fsdp_params(model):
        twin = getattr(fp, "_unsharded_param", None)
        if twin is None or id(twin) not in twins:
            continue
        info = fp._module_info
        for mod, name in [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]:
            swapped.append((mod, name, mod._parameters[name]))
            mod._parameters[name] = twin
    try:
        yield
    finally:
        for mod, name, p in reversed(swapped):
            mod._parameters[name] = p


class ShardedSums:
    """The sums of one method: transient full-size buffers for sharded parameters, reduce-scattered
    into float64 local-shard accumulators by :meth:`flush`; ordinary full-size buffers for plain ones."""

    def __init__(self, trainable: list[tuple[str, nn.Parameter]], sharded: dict[str, nn.Parameter]):
        self.sharded = sharded
        self.plain = {
            k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in trainable if k not in sharded
        }
        self.shards = {
            k: torch.zeros(p.to_local().shape, dtype=torch.float64, device=p.device) for k, p in sharded.items()
        }
        self.live: dict[str, Tensor] = {}
        self.peak = 0  # most bytes of transient buffers alive at once
        self.rs_bytes = 0  # bytes reduce-scattered (input side)

    def __getitem__(self, k: str) -> Tensor:
        if k in self.plain:
            return self.plain[k]
        buf = self.live.get(k)
        if buf is None:
            p = self.sharded[k]
            buf = self.live[k] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self.peak = max(self.peak, sum(b.numel() * b.element_size() for b in self.live.values()))
        return buf

    def __contains__(self, k) -> bool:
        return k in self.plain or k in self.sharded

    def flush(self, names) -> None:
        """Reduce-scatter the buffers of the sharded ``names`` (zeros where none was written: every
        rank calls the same collectives) into the local accumulators; free them."""
        from torch.distributed.tensor import DTensor, Partial

        for k in names:
            p = self.sharded.get(k)
            if p is None:
                continue
            buf = self.live.pop(k, None)
            if buf is None:
                buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self.rs_bytes += buf.numel() * buf.element_size()
            mesh = p.device_mesh
            part = DTensor.from_local(
                buf, mesh, [Partial()] * mesh.ndim, run_check=False, shape=buf.shape, stride=buf.stride()
            )
            self.shards[k] += part.redistribute(mesh, p.placements).to_local()

    def flush_all(self) -> None:
        """:meth:`flush` every live buffer (in name order, the same on every rank)."""
        self.flush(sorted(self.live))

    def local_tensors(self) -> dict[str, Tensor]:
        """``name -> local tensor`` (plain sums and local shard accumulators), for finiteness checks."""
        return {**self.plain, **self.shards}

    def result(self, k: str, div: float) -> Tensor:
        """The local shard sum divided by ``div`` as a float32 ``DTensor`` laid out like the parameter."""
        from torch.distributed.tensor import DTensor

        p = self.sharded[k]
        loc = (self.shards[k] / div).float()
        return DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
