"""Triton kernels of ewc_fast, installed as ``ewc_fast.kernels``.

Import these modules only when Triton is installed; they are reached through the op layer
(``ewc_fast.ops``), never directly by estimators. On CPU tensors they run only under
``TRITON_INTERPRET=1`` (set before import).
"""
