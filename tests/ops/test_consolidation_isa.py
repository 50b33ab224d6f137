"""consolidate_, si_accumulate_, si_consolidate_ and wva_attenuate_ (C++ backend): the generic, AVX2 and
AVX-512 builds of their loops (csrc/consolidation.cpp, chosen once per process from the CPU, capped by
EWC_FAST_CPP_ISA) give bit-identical results.

Each level runs in a child process (the choice is made once per process) on the same seeded inputs:
ragged and non-contiguous tensors, tensors longer than one chunk, zero importances (consolidate's
``omega' == 0`` branch), a NaN and an inf in the parameters; every dtype pair the ops take. Bit-identity
is what the variants promise (the same operations, no FMA contraction, the lane order of every sum
explicit), so results are compared bit for bit (signed zeros included), except that a NaN only has to
be a NaN in the same place: which NaN bit pattern an operation on a NaN returns depends on the
instruction's operand order on x86, and no op promises a NaN payload.
"""

from __future__ import annotations

import torch

from tests.helpers import isa_variant_results

_CHILD = """
import sys, torch
from ewc_fast import ops
from ewc_fast.ops._cpp_ext import ext
from tests.ops.test_consolidation_ops import Maker
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
mk = Maker(12)
specs = [((8200,), "c"), ((1,), "c"), ((33, 65), "t"), ((40,), "s")]
out = {}
for pd, sd in [(F32, F32), (BF16, F64), (F16, F32), (F64, F64), (F32, F64)]:
    params = [mk(s, pd) for s in specs]
    params[0][5], params[0][6] = float("nan"), float("inf")
    for online in (False, True):
        o = [mk(s, sd, "pos", zero_frac=0.3) for s in specs]
        mu = [mk(s, sd) for s in specs]
        val = ops.consolidate_(o, mu, [mk(s, pd, "pos", zero_frac=0.3) for s in specs], params, 0.8,
                               online=online, backend="cpp")
        out[("consolidate", str(pd), str(sd), online)] = (val, o, mu)
    w = [mk(s, sd) for s in specs]
    prev = [mk(s, pd) for s in specs]
    ops.si_accumulate_(w, [mk(s, pd) for s in specs], params, prev, backend="cpp")
    out[("si_accumulate", str(pd), str(sd))] = (None, w, prev)
    for clip in (True, False):
        w = [mk(s, sd) for s in specs]
        start = [mk(s, pd) for s in specs]
        o = [mk(s, sd) for s in specs]
        ops.si_consolidate_(w, params, start, o, 0.1, clip=clip, backend="cpp")
        out[("si_consolidate", str(pd), str(sd), clip)] = (None, w + o, start)
    p = [x.clone() for x in params]
    ops.wva_attenuate_(p, [mk(s, pd) for s in specs], [mk(s, sd, "pos") for s in specs], 0.5, backend="cpp")
    out[("wva", str(pd), str(sd))] = (None, p, [])
torch.save((ext().persample_isa(), out), sys.argv[1])
"""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal where not NaN, NaN at the same places."""
    a, b = a.contiguous().view(-1), b.contiguous().view(-1)
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.uint8), b[~nan].view(torch.uint8))


def test_cpp_consolidation_instruction_set_variants(tmp_path):
    results = isa_variant_results(_CHILD, tmp_path)
    base = results[0]
    assert len(base) == 5 * 6
    for chosen, out in results.items():
        assert out.keys() == base.keys()
        for key, (val, first, second) in out.items():
            ref_val, ref_first, ref_second = base[key]
            if val is not None:
                assert _same(val.reshape(1), ref_val.reshape(1)), (chosen, key)
            for a, b in zip(first + second, ref_first + ref_second, strict=True):
                assert _same(a, b), (chosen, key)
