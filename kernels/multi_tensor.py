"""Launch helpers shared by the Triton kernels: multi-tensor chunk plans with a device pointer table.

A multi-tensor kernel covers many tensors (all parameters of a model) in one launch. The host side
builds a *plan*: tensors are grouped by the tuple of their operand dtypes and by whether every
operand's address is 16-byte aligned (one launch, hence one compiled kernel variant, per group).
For each group one int64 *segment* is laid out as::

    [ chunk table: 2 entries per chunk ][ tensor records: (k + 1) entries per tensor ][ pad ]

* chunk ``c`` (= ``tl.program_id(0)``): ``seg[2c]`` = offset of its tensor's record inside the
  segment, ``seg[2c+1]`` = chunk number inside that tensor (the chunk covers elements
  ``[cno*BLOCK, (cno+1)*BLOCK)``; writing the start as ``cno * BLOCK`` lets the compiler see that it
  is a multiple of BLOCK, which keeps the loads vectorised);
* a tensor record: the ``k`` operand addresses (``data_ptr()`` as int64, cast in-kernel with
  ``.to(tl.pointer_type(dtype))``) followed by the element count.

All segments of one call live in one int64 tensor that is copied to the device once; each segment
starts at an even index, so its address is 16-byte aligned like any fresh tensor and the kernel is
never re-specialised on the table's alignment. Plans are cached by (addresses, sizes, dtypes,
BLOCK, device): a training loop calling an op every step with the same tensors pays no host-to-device
copy after the first step. A cached table depends only on its key, so reusing it after the memory has
been freed and handed to new tensors with the same key is still correct.

Device side (``@triton.jit`` helpers the kernels call): :func:`chunk_of` reads a program's chunk
entry and :func:`operand_ptr` an operand address from the segment; :func:`load_chunk` /
:func:`store_chunk` access the chunk's elements, masked only for a tensor's last, partial chunk.

Kernels never see tensor sizes as compile-time values: sizes come from the table at run time, so
one compiled variant serves every model (per dtype group, alignment flag and the op's
``tl.constexpr`` flags).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def triton_interpreter() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Alignment (bytes) every operand address of an "aligned" group satisfies; the kernels assert it to
# the compiler with tl.multiple_of so that loads/stores become 128-bit vector accesses.
ALIGN_BYTES = 16


@dataclass(frozen=True)
class Group:
    """One launch: tensors sharing operand dtypes and alignment."""

    dtypes: tuple  # torch dtypes, one per operand
    tl_dtypes: tuple  # the matching triton dtypes (passed as tl.constexpr)
    aligned: bool  # every operand address is a multiple of ALIGN_BYTES
    meta: torch.Tensor  # the group's int64 segment on the device
    n_chunks: int  # programs to launch
    chunk_base: int  # index of this group's first chunk in the call's partials buffer
    numel: int  # elements covered by the group


@dataclass(frozen=True)
class Plan:
    groups: tuple
    n_chunks: int  # total over groups (size of a per-chunk partials buffer)
    numel: int


_CACHE: OrderedDict[tuple, Plan] = OrderedDict()
_CACHE_SIZE = 64


def clear_plan_cache() -> None:
    _CACHE.clear()


def launch_options(num_warps: int) -> dict:
    """Compile options for a launch: ``num_warps`` and no FMA contraction on CUDA.

    ``enable_fp_fusion=False`` keeps every multiply and add separately rounded, exactly as the
    torch twin and the CPU interpreter compute them, so the bits verified under the interpreter are
    the bits produced on the GPU (these kernels are memory-bound: fusing would buy nothing).
    """
    if triton_interpreter():
        return {}
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def device_guard(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device/stream)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def build_plan(operands: list, block: int, device: torch.device, *, tag: str = "") -> Plan:
    """Plan for ``k`` operand lists of ``n`` same-shaped tensors each (``operands[j][t]``)."""
    k = len(operands)
    first = operands[0]
    n = len(first)
    ptrs = [t.data_ptr() for ts in operands for t in ts]
    numels = [t.numel() for t in first]
    dtypes = [t.dtype for ts in operands for t in ts]
    key = (tag, block, str(device), tuple(ptrs), tuple(numels), tuple(dtypes))
    plan = _CACHE.get(key)
    if plan is not None:
        _CACHE.move_to_end(key)
        return plan

    # group tensors by (operand dtypes, aligned), keeping their order
    groups: OrderedDict[tuple, list[int]] = OrderedDict()
    for t in range(n):
        if numels[t] == 0:
            continue
        dt = tuple(dtypes[j * n + t] for j in range(k))
        aligned = all(ptrs[j * n + t] % ALIGN_BYTES == 0 for j in range(k))
        groups.setdefault((dt, aligned), []).append(t)

    segments = []
    layout = []  # (dtypes, aligned, seg_start, seg_len, n_chunks, numel)
    pos = 0
    for (dt, aligned), idx in groups.items():
        sizes = torch.tensor([numels[t] for t in idx], dtype=torch.int64)
        nch = (sizes + (block - 1)) // block
        n_chunks = int(nch.sum())
        rec_len = k + 1
        rec_start = 2 * n_chunks
        # tensor records: k addresses then numel
        recs = torch.empty((len(idx), rec_len), dtype=torch.int64)
        recs[:, :k] = torch.tensor([[ptrs[j * n + t] for j in range(k)] for t in idx], dtype=torch.int64)
        recs[:, k] = sizes
        # chunk table: (record offset, chunk number)
        rec_off = rec_start + rec_len * torch.arange(len(idx), dtype=torch.int64)
        first_chunk = torch.cumsum(nch, 0) - nch
        table = torch.empty((n_chunks, 2), dtype=torch.int64)
        table[:, 0] = torch.repeat_interleave(rec_off, nch)
        table[:, 1] = torch.arange(n_chunks, dtype=torch.int64) - torch.repeat_interleave(first_chunk, nch)
        seg_len = rec_start + rec_len * len(idx)
        pad = seg_len % 2  # keep every segment 16-byte aligned
        parts = [table.reshape(-1), recs.reshape(-1)]
        if pad:
            parts.append(torch.zeros(1, dtype=torch.int64))
        segments.append(torch.cat(parts))
        layout.append((dt, aligned, pos, seg_len, n_chunks, int(sizes.sum())))
        pos += seg_len + pad

    if segments:
        host = torch.cat(segments)
        dev = host.to(device) if torch.device(device).type != "cpu" else host
    plan_groups = []
    chunk_base = 0
    for dt, aligned, start, seg_len, n_chunks, numel in layout:
        plan_groups.append(
            Group(
                dtypes=dt,
                tl_dtypes=tuple(TORCH_TO_TL[d] for d in dt),
                aligned=aligned,
                meta=dev[start : start + seg_len],
                n_chunks=n_chunks,
                chunk_base=chunk_base,
                numel=numel,
            )
        )
        chunk_base += n_chunks
    plan = Plan(groups=tuple(plan_groups), n_chunks=chunk_base, numel=sum(g.numel for g in plan_groups))
    _CACHE[key] = plan
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


# ------------------------------------------------------------------ device side: reading a segment
@triton.jit
def chunk_of(meta, K: tl.constexpr, BLOCK: tl.constexpr):
    """(record offset, first element, elements left in the tensor from there) of this program's chunk."""
    pid = tl.program_id(0)
    rec = tl.load(meta + 2 * pid)
    start = tl.load(meta + 2 * pid + 1) * BLOCK
    n = tl.load(meta + rec + K)
    return rec, start, n - start


@triton.jit
def operand_ptr(meta, rec, J: tl.constexpr, TY: tl.constexpr, ALIGNED: tl.constexpr, start):
    """Pointer (element type TY) to operand J of the chunk's tensor, advanced to the chunk start."""
    ptr = tl.load(meta + rec + J).to(tl.pointer_type(TY))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr + start


@triton.jit
def load_chunk(ptr, offs, rem, MASKED: tl.constexpr):
    """``ptr[offs]``; masked to ``offs < rem`` (0 elsewhere) for a tensor's last, partial chunk."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < rem, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def store_chunk(ptr, offs, rem, x, MASKED: tl.constexpr):
    """``ptr[offs] = x``; masked to ``offs < rem`` for a tensor's last, partial chunk."""
    if MASKED:
        tl.store(ptr + offs, x, mask=offs < rem)
    else:
        tl.store(ptr + offs, x)
