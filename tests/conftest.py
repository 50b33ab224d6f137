"""Test configuration: Triton runs in its CPU interpreter (must be set before Triton is imported)."""

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
