"""The op layer: every kernel of ewc_fast behind one dispatch (triton / cpp / torch).

Ops are registered with ``torch.library`` under the ``ewc_fast`` namespace (``torch.ops.ewc_fast.<op>``),
take lists of tensors (one entry per parameter, so one call serves a whole model) or whole
activations, work in place and trace under ``torch.compile`` (each has a fake implementation).

Op families (``ewc_fast/ops/<family>/``; ``__init__.py`` holds the public functions):

* ``consolidation``: ``penalty_apply_`` (EWC penalty value and gradient), ``consolidate_`` (merge a
  task's importance into the anchor), ``si_accumulate_`` / ``si_consolidate_`` (Synaptic
  Intelligence path integral), ``wva_attenuate_`` (weight-velocity attenuation).
* ``fused_step``: ``fused_step_`` (one optimizer step of SGD / Adam / AdamW with the EWC penalty
  gradient, SI accumulation and WVA attenuation in the same pass; used by :mod:`ewc_fast.optim`).
* ``persample``: ``persample_sq_`` (sum over samples of the squared and absolute per-sample weight
  gradients of a Linear layer, without materialising them).
* ``persample_conv``: ``persample_conv_sq_`` (the same for a convolution's weight: each sample's
  gradient is a direct correlation of its input with its output gradient, tile by tile, never
  unfolding the input).

Backends, side by side (same function names and signatures in each ``_<backend>.py``):

==========  ===============================  ===========================================  ==================
backend     module of family F               kernels                                      runs on
==========  ===============================  ===========================================  ==================
``torch``   ``ewc_fast/ops/F/_torch.py``     plain PyTorch (the readable reference)       any device
``cpp``     ``ewc_fast/ops/F/_cpp.py``       ``csrc/F.cpp`` -> ``ewc_fast._C`` (OpenMP)   CPU
``triton``  ``ewc_fast/ops/F/_triton.py``    ``kernels/F.py`` -> ``ewc_fast.kernels``     CUDA (CPU with
                                                                                          TRITON_INTERPRET=1)
==========  ===============================  ===========================================  ==================

``backend="auto"`` picks triton on CUDA, cpp on CPU, else torch (:mod:`.backends`; the
``EWC_FAST_BACKEND`` environment variable overrides it). Shared pieces: :mod:`.backends` (resolution,
``BackendUnavailable``), :mod:`._validate` (dtype sets, list/shape/device checks, finite scalars,
contiguous stand-ins), :mod:`._registry` (``define_op``, ``impl_module``, ``run_op``),
:mod:`._cpp_ext` (pointers and dtype codes for ``ewc_fast._C``). ``kernels/`` imports nothing from
``ewc_fast``.

How to add an op ``foo_`` to family F:

1. Implement ``foo(...)`` with one signature in each backend module of the family:
   ``ewc_fast/ops/F/_torch.py`` (the reference), ``_cpp.py`` (+ the kernel in ``csrc/F.cpp``,
   registered in ``init_F``) and ``_triton.py`` (+ the launcher in ``kernels/F.py``); ``"auto"`` may
   resolve to any of them.
2. In ``ewc_fast/ops/F/__init__.py``, define the eager body once; ``define_op`` registers it as
   ``ewc_fast::foo_`` with a derived fake implementation::

       @define_op("foo_", mutates=("out",), result=None, device_arg="params")
       def _foo(out: list[Tensor], params: list[Tensor], scale: float, backend: str) -> None:
           impl = resolve_impl(backend, "F", op_device(params))
           with contiguous_inout(out) as o:
               impl.foo(o, contiguous_in(params), scale)
           bump_versions(out)  # C++ / Triton write through raw pointers: tell autograd

   (``result="scalar"`` for an op returning a 0-dim float64 tensor on the op's device.)
3. Write the public ``foo_(...)``: validate *every* argument with :mod:`._validate` before the first
   write (error messages start with ``_foo.name``): ``check_tensor_lists`` (dtypes, shapes, devices,
   dense layout), ``check_no_overlap`` (written tensors: no internal overlap, no memory shared with
   any other argument) and ``check_writable`` (no in-place write to a tensor autograd tracks), then
   call ``_foo(...)`` once with positional arguments. Export it here.
4. Test it in ``tests/ops/`` on every backend against a float64 oracle (``ewc_fast/testing/``), plus
   ``torch.library.opcheck(torch.ops.ewc_fast.foo_.default, ...)``.
"""

from .consolidation import consolidate_, penalty_apply_, si_accumulate_, si_consolidate_, wva_attenuate_
from .fused_step import fused_step_
from .persample import persample_sq_
from .persample_conv import persample_conv_sq_

__all__ = [
    "penalty_apply_",
    "consolidate_",
    "si_accumulate_",
    "si_consolidate_",
    "wva_attenuate_",
    "fused_step_",
    "persample_sq_",
    "persample_conv_sq_",
]
