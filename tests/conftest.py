"""Test configuration: Triton runs in its CPU interpreter (must be set before Triton is imported).

On a CUDA machine, run the ``cuda``-marked tests with ``TRITON_INTERPRET=0`` so that the Triton kernels
are compiled for the card (``scripts/gpu_check.sh`` does); the CPU-interpreter cases then skip.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (tiny models: faster and steadier than a pool)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cuda_strict():
    """fp32 matmuls and convolutions on CUDA in full fp32 (no TF32), restored after the test: the
    float64 comparisons of fp32 results then hold with the CPU tolerances."""
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
