"""Which gradient is the task gradient: how an ``EWC`` penalty is kept out of Zenke-style SI.

Synaptic Intelligence (Zenke, Poole & Ganguli 2017) integrates ``-g * dtheta`` with ``g`` the gradient
of the *task loss* only. When an :class:`ewc_fast.EWC` penalty shares the parameters, ``.grad`` at the
optimizer step holds ``g + lam * W * (theta - mu)``; this module is the protocol through which EWC
tells each Zenke tracker what it added, so that the tracker can recover ``g``
(docs/CONSOLIDATION.md).

The protocol has two parts, both package-internal:

* :class:`ExclusionEndpoint` -- owned by one SI tracker, one slot per tracked parameter
  (numbered ``0..n-1`` in the tracker's order). Its contract:

  - ``index(params) -> (idx, tidx)``: the tracked parameters among ``params``, by tensor identity:
    ``params[idx[k]] is tracked[tidx[k]]``.
  - ``snapshot(tidx, grads)``: ``grads[k]`` is ``.grad`` of parameter ``tidx[k]`` just before a
    penalty gradient is added to it in place (``EWC.apply_``); that is the task gradient, less any
    contribution recorded before. The first snapshot of a step wins; later reports are ignored.
  - ``record(tidx, contributions)``: ``contributions[k]`` is a penalty gradient that autograd is about
    to accumulate into ``.grad`` of parameter ``tidx[k]`` (the backward of ``EWC.penalty``);
    records add up.
  - ``task_grads(tidx, grads) -> list``: at the step, given the current ``.grad`` of parameters
    ``tidx``, the task gradients: the snapshot, or ``.grad - sum(records)``, or ``.grad`` itself
    when nothing was reported (exact for a snapshot; one rounding in the gradient's dtype for
    records, the rounding of autograd's own accumulation).
  - ``seal(tidx, grads)``: ``grads[k]`` (``.grad`` of slot ``tidx[k]``) now holds the penalty
    gradient whose snapshot was just taken (``EWC.apply_`` calls it after its write).
  - ``clear()``: forget every report (after each step, and when a step is skipped).

  **Skipped steps.** A step that never runs (a ``GradScaler`` skipping ``step()`` on inf, a user
  skipping it) leaves its reports behind, and the next iteration's reports must not be merged with
  them. A report is *stale* once the gradient it refers to was reset: for a snapshot, ``.grad`` is no
  longer the sealed tensor or was modified since the seal (``zero_grad`` with or without
  ``set_to_none``, a new backward); for records, a later backward pass (autograd graph task) finds
  ``.grad`` reset -- ``None`` again, or another tensor than the one the previous records saw. A stale
  slot is reset before the new report is taken. Not detectable: records of a skipped step followed by
  ``zero_grad(set_to_none=False)`` (an in-place zero looks like accumulation); call
  :meth:`SynapticIntelligence.clear_exclusions <ewc_fast.SynapticIntelligence.clear_exclusions>` after
  skipping a step in that setup.

* :class:`ExclusionRegistry` / :data:`ZENKE_REGISTRY` -- the attached Zenke trackers (held by weak
  reference) and their endpoints. ``links(params)`` gives ``(endpoint, idx, tidx)`` for every
  endpoint sharing parameters with ``params``; ``version`` changes whenever the set changes, so that
  callers may cache ``links`` under it; ``bool(registry)`` is False while nothing is attached, and
  EWC then does no extra work.

Reports must be in unscaled gradient units (``EWC.apply_(grad_scale=1)``). Buffers never join an
autograd graph: every method works under ``torch.no_grad()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._shard import local

__all__ = ["ExclusionEndpoint", "ExclusionRegistry", "ZENKE_REGISTRY"]

_NONE, _SNAP, _REC = 0, 1, 2  # per slot: nothing reported, snapshot held, contributions recorded


class ExclusionEndpoint:
    """The penalty-gradient reports for one SI tracker's parameters since its last step.

    ``params`` are the tracker's parameters (slot ``j`` is ``params[j]``). Per slot it holds nothing,
    a snapshot of the task gradient, or the sum of recorded penalty contributions, in one buffer of
    the gradient's shape and dtype that is reused across steps. See the module docstring for the
    contract of each method.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = list(params)
        self._index = {id(p): j for j, p in enumerate(self._params)}
        self._mode = [_NONE] * len(self._params)
        self._bufs: list[Tensor | None] = [None] * len(self._params)
        # per slot: (weakref to .grad or None, its version, autograd graph task) seen at the last report
        self._seen: list[tuple | None] = [None] * len(self._params)
        self._any = False

    def _grad_state(self, j: int) -> tuple:
        g = self._params[j].grad
        if g is None:
            return (None, -1, torch._C._current_graph_task_id())
        return (weakref.ref(g), g._version, torch._C._current_graph_task_id())

    def _stale(self, j: int) -> bool:
        """Whether slot ``j``'s report belongs to a gradient that was reset since (a skipped step)."""
        seen = self._seen[j]
        if self._mode[j] == _NONE or seen is None:
            return False
        ref, version, task = seen
        g = self._params[j].grad
        if self._mode[j] == _SNAP:  # sealed right after the penalty was added (the local shard of a DTensor)
            if g is None or ref is None:
                return True
            with torch.no_grad():  # no-grad to_local() is the shard itself, as sealed
                g = local(g)
            return ref() is not g or g._version != version
        # records: several in one backward pass add up; a later pass must find the same .grad
        if task == torch._C._current_graph_task_id():  # same pass (-1: outside any backward)
            return False
        if ref is None:
            return g is None
        return g is None or ref() is not g

    def _refresh(self, j: int) -> None:
        if self._stale(j):
            self._mode[j] = _NONE

    def index(self, params: Sequence[Tensor]) -> tuple[list[int], list[int]]:
        """``(idx, tidx)`` with ``params[idx[k]] is`` this endpoint's parameter ``tidx[k]`` (identity)."""
        idx, tidx = [], []
        for i, p in enumerate(params):
            j = self._index.get(id(p))
            if j is not None and self._params[j] is p:
                idx.append(i)
                tidx.append(j)
        return idx, tidx

    def _buffer(self, j: int, like: Tensor) -> Tensor:
        buf = self._bufs[j]
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            self._bufs[j] = buf
        return buf

    @torch.no_grad()
    def snapshot(self, tidx: Sequence[int], grads: Sequence[Tensor]) -> None:
        """``grads[k]`` is ``.grad`` of slot ``tidx[k]`` just before a penalty gradient is added in place:
        the task gradient is ``grads[k]`` minus what was recorded before. The first snapshot wins."""
        for j, g in zip(tidx, grads):
            self._refresh(j)
            mode = self._mode[j]
            if mode == _SNAP:
                continue
            buf = self._buffer(j, g)
            if mode == _REC:
                buf.neg_().add_(g)
            else:
                buf.copy_(g)
            self._mode[j] = _SNAP
            self._seen[j] = None
            self._any = True

    def seal(self, tidx: Sequence[int], grads: Sequence[Tensor]) -> None:
        """``grads[k]``, ``.grad`` of slot ``tidx[k]``, now holds the penalty just added after its
        snapshot: remember it (identity and version) to recognise a reset gradient later."""
        for j, g in zip(tidx, grads):
            if self._mode[j] == _SNAP and self._seen[j] is None:
                self._seen[j] = (weakref.ref(g), g._version, -1)

    @torch.no_grad()
    def record(self, tidx: Sequence[int], contributions: Sequence[Tensor]) -> None:
        """``contributions[k]`` is a penalty gradient about to be accumulated into ``.grad`` of slot
        ``tidx[k]``; recorded contributions add up (ignored after a snapshot)."""
        for j, g in zip(tidx, contributions):
            self._refresh(j)
            mode = self._mode[j]
            if mode == _SNAP:
                continue
            self._seen[j] = self._grad_state(j)
            if mode == _REC:
                self._bufs[j].add_(g)
            else:
                self._buffer(j, g).copy_(g)
                self._mode[j] = _REC
            self._any = True

    @torch.no_grad()
    def task_grads(self, tidx: Sequence[int], grads: list[Tensor]) -> list[Tensor]:
        """The task gradients of slots ``tidx`` whose current ``.grad`` is ``grads``: the snapshot,
        ``.grad - recorded`` (computed in the buffer), or ``grads[k]`` itself. Returns ``grads`` as
        is when nothing was reported. Call once per step, then :meth:`clear`."""
        if not self._any:
            return grads
        out = []
        for j, g in zip(tidx, grads):
            mode = self._mode[j]
            if mode == _SNAP:
                g = self._bufs[j]
            elif mode == _REC:
                g = self._bufs[j].neg_().add_(g)
            out.append(g)
        return out

    def clear(self) -> None:
        """Forget every report (the buffers are kept for the next step)."""
        if self._any:
            self._mode = [_NONE] * len(self._params)
            self._any = False


class ExclusionRegistry:
    """The attached Zenke SI trackers and their :class:`ExclusionEndpoint`, for EWC to report to.

    Trackers (the owners) are held by weak reference: a tracker that is garbage-collected leaves the
    registry. :attr:`version` changes whenever the set changes.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._endpoints: dict[weakref.ref, ExclusionEndpoint] = {}
        self.version = 0

    def __bool__(self) -> bool:
        return bool(self._refs)

    def _drop(self, ref: weakref.ref) -> None:
        if ref in self._refs:
            self._refs.remove(ref)
            del self._endpoints[ref]
            self.version += 1

    def add(self, owner: object, endpoint: ExclusionEndpoint) -> None:
        """Register ``endpoint`` for as long as ``owner`` lives (no-op if ``owner`` is registered)."""
        if any(r() is owner for r in self._refs):
            return
        ref = weakref.ref(owner, self._drop)
        self._refs.append(ref)
        self._endpoints[ref] = endpoint
        self.version += 1

    def remove(self, owner: object) -> None:
        """Unregister ``owner`` (no-op if it is not registered)."""
        for r in list(self._refs):
            if r() is owner:
                self._drop(r)

    def links(self, params: Iterable[Tensor]) -> list[tuple[ExclusionEndpoint, list[int], list[int]]]:
        """``(endpoint, idx, tidx)`` for each registered endpoint sharing parameters with ``params``,
        with ``params[idx[k]]`` being the endpoint's slot ``tidx[k]``."""
        params = list(params)
        out = []
        for r in self._refs:
            if r() is None:
                continue
            endpoint = self._endpoints[r]
            idx, tidx = endpoint.index(params)
            if idx:
                out.append((endpoint, idx, tidx))
        return out


ZENKE_REGISTRY = ExclusionRegistry()
"""The process-wide registry: Zenke-variant :class:`ewc_fast.SynapticIntelligence` trackers join it on
``attach`` and leave on ``detach``; every :class:`ewc_fast.EWC` reports to it."""
