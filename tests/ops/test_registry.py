"""The registration helper of the op layer (:func:`ewc_fast.ops._registry.define_op`) and the eager
fast path around every registered op.

A small op defined here through ``define_op`` must be registered as ``torch.ops.ewc_fast.<name>``,
have a derived fake implementation that FakeTensorMode and meta tensors use (and that still refuses
unknown / unavailable backends), and run its body directly, without the dispatcher, in plain eager
mode. The package's own ops are checked with ``torch.library.opcheck`` and for not importing
``torch._dynamo`` on the eager path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import ewc_fast
from ewc_fast.ops._registry import DefinedOp, define_op, impl_module, op_device, resolve_backend

CALLS: list[tuple] = []  # arguments the body of the test op received, in call order


@define_op("_registry_selftest_axpy_", mutates=("out",), result="scalar", device_arg="xs")
def _axpy(out: list[Tensor], xs: list[Tensor], a: float, backend: str) -> Tensor:
    """out[i] += a * xs[i]; returns sum of all xs as a 0-dim float64 tensor."""
    CALLS.append((out, xs, a, backend))
    device = op_device(xs)
    resolve_backend(backend, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for o, x in zip(out, xs):
        o.add_(x, alpha=a)
        total += x.double().sum()
    return total


@define_op("_registry_selftest_fill_", mutates=("out",), device_arg="out")
def _fill(out: Tensor | None, value: float, backend: str) -> None:
    CALLS.append((out, value, backend))
    if out is not None:
        out.fill_(value)


def test_define_op_registers_under_namespace():
    assert isinstance(_axpy, DefinedOp)
    assert _axpy.name == "_registry_selftest_axpy_"
    assert _axpy.qualname == "ewc_fast::_registry_selftest_axpy_"
    assert hasattr(torch.ops.ewc_fast, "_registry_selftest_axpy_")
    out, xs = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.full((2,), 2.0)]
    v = torch.ops.ewc_fast._registry_selftest_axpy_(out, xs, 0.5, "torch")  # through the dispatcher
    assert v.dtype == torch.float64 and v.shape == () and float(v) == 7.0
    assert torch.equal(out[0], torch.full((3,), 0.5)) and torch.equal(out[1], torch.ones(2))
    schema = str(torch.ops.ewc_fast._registry_selftest_axpy_.default._schema)
    assert "Tensor(a0!)[] out" in schema  # declared as mutated


def test_eager_path_skips_dispatcher(monkeypatch):
    def refuse(*args):
        raise AssertionError("plain eager mode went through the registered op")

    monkeypatch.setattr(_axpy, "op", refuse)
    out, xs = [torch.zeros(4)], [torch.arange(4.0)]
    CALLS.clear()
    v = _axpy(out, xs, 2.0, "torch")
    assert float(v) == 6.0 and torch.equal(out[0], 2 * torch.arange(4.0))
    assert len(CALLS) == 1 and CALLS[0][0] is out and CALLS[0][1] is xs  # the body got our very lists


def test_fake_impl_under_fake_tensor_mode():
    CALLS.clear()
    with FakeTensorMode():
        out, xs = [torch.empty(5)], [torch.empty(5)]
        v = _axpy(out, xs, 1.0, "auto")  # a dispatch mode is active: goes through the registered op
        assert isinstance(v, FakeTensor)
        assert v.shape == () and v.dtype == torch.float64 and v.device == torch.device("cpu")
        assert _fill(out[0], 1.0, "torch") is None
        with pytest.raises(ValueError, match="unknown backend"):
            _axpy(out, xs, 1.0, "cuda-magic")
    assert CALLS == []  # the fake, never the body


def test_fake_impl_on_meta_tensors():
    out, xs = [torch.empty(3, device="meta")], [torch.empty(3, device="meta")]
    v = _axpy.op(out, xs, 1.0, "torch")
    assert v.device.type == "meta" and v.dtype == torch.float64 and v.shape == ()
    assert _fill.op(None, 1.0, "torch") is None  # optional tensor as device argument: CPU
    with pytest.raises(ewc_fast.BackendUnavailable, match="CPU"):
        _axpy.op(out, xs, 1.0, "cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        _fill.op(torch.empty(2, device="meta"), 1.0, "nope")


def test_opcheck_selftest_op():
    torch.library.opcheck(
        torch.ops.ewc_fast._registry_selftest_axpy_.default, ([torch.zeros(3)], [torch.ones(3)], 1.5, "torch")
    )
    torch.library.opcheck(torch.ops.ewc_fast._registry_selftest_fill_.default, (torch.zeros(2), 3.0, "torch"))


def test_define_op_rejects_bad_declarations():
    def body(out: list[Tensor], backend: str) -> None:
        pass

    def no_backend(out: list[Tensor]) -> None:
        pass

    with pytest.raises(ValueError, match="result"):
        define_op("_registry_selftest_bad_", mutates=("out",), result="vector", device_arg="out")
    with pytest.raises(TypeError, match="return annotation"):
        define_op("_registry_selftest_bad_", mutates=("out",), result="scalar", device_arg="out")(body)
    with pytest.raises(TypeError, match="'missing'"):
        define_op("_registry_selftest_bad_", mutates=("missing",), device_arg="out")(body)
    with pytest.raises(TypeError, match="'backend'"):
        define_op("_registry_selftest_bad_", mutates=("out",), device_arg="out")(no_backend)
    assert not hasattr(torch.ops.ewc_fast, "_registry_selftest_bad_")  # nothing was registered


def test_impl_module_needs_a_known_backend_and_family():
    assert impl_module("torch", "consolidation").__name__ == "ewc_fast.ops.consolidation._torch"
    assert impl_module("torch", "persample").__name__ == "ewc_fast.ops.persample._torch"
    with pytest.raises(ValueError, match="unknown backend"):
        impl_module("cuda-magic", "consolidation")
    with pytest.raises(TypeError):
        impl_module("torch")  # no default family


def _lists(n=2, numel=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(numel, generator=g) for _ in range(n)] for _ in range(4)]


def test_opcheck_consolidation_ops():
    """Schema (declared mutations), fake implementation and dispatch of every consolidation op."""
    a, b, c, d = _lists()
    for args in (
        (a, b, c, d, 0.5, 0.1, 1.0, 1.0, "torch"),
        ([t.clone() for t in a], b, c, d, 0.5, None, 0.0, 2.0, "torch"),
    ):
        torch.library.opcheck(torch.ops.ewc_fast.penalty_apply_.default, args)
    torch.library.opcheck(torch.ops.ewc_fast.consolidate_.default, (a, b, c, d, 0.9, False, "torch"))
    torch.library.opcheck(torch.ops.ewc_fast.consolidate_.default, (a, b, c, d, 1.0, True, "torch"))
    torch.library.opcheck(torch.ops.ewc_fast.si_accumulate_.default, (a, b, c, d, "torch"))
    torch.library.opcheck(torch.ops.ewc_fast.si_consolidate_.default, (a, b, c, d, 0.1, True, "torch"))
    torch.library.opcheck(torch.ops.ewc_fast.wva_attenuate_.default, (a, b, c, 0.5, "torch"))


def test_eager_calls_do_not_import_dynamo():
    """Plain eager calls of every op never reach the dispatcher, whose first use imports torch._dynamo."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from ewc_fast import ops

        assert "torch._dynamo" not in sys.modules, "imported before any op ran"
        for backend in ("torch", "auto"):
            t = lambda: [torch.rand(5), torch.rand(3)]
            ops.penalty_apply_(t(), t(), t(), t(), 1.0, alpha=0.1, backend=backend)
            ops.consolidate_(t(), t(), t(), t(), 0.5, backend=backend)
            ops.si_accumulate_(t(), t(), t(), t(), backend=backend)
            ops.si_consolidate_(t(), t(), t(), t(), 0.1, backend=backend)
            ops.wva_attenuate_(t(), t(), t(), 0.5, backend=backend)
            ops.persample_sq_(torch.zeros(4, 3), None, torch.rand(2, 5, 4), torch.rand(2, 5, 3), backend=backend)
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_public_op_is_registered():
    from ewc_fast import ops

    for name in ops.__all__:
        assert hasattr(torch.ops.ewc_fast, name), name
