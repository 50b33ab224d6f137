"""Shared (backend, device) fixtures of the EWC / SI / WVA tests.

``torch`` and ``auto`` on CPU (``auto`` resolves to the C++ kernels when the extension is built, else to
torch); on CUDA (marked ``cuda``, skipped without a card) ``torch`` and ``auto``, which resolves to the
Triton kernels compiled for the card (skipped while ``TRITON_INTERPRET=1``).
"""

import pytest

from tests.helpers import cuda_marks

CASES = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("auto", "cpu"), id="auto"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=cuda_marks()),
    pytest.param(("auto", "cuda"), id="auto-cuda", marks=cuda_marks(triton=True)),
]


@pytest.fixture(params=CASES)
def case(request):
    """One ``(backend, device)`` pair of :data:`CASES`."""
    return request.param


@pytest.fixture
def device(case):
    """Device of the model (its parameters, gradients and importances)."""
    return case[1]


@pytest.fixture
def backend(case, cuda_strict):
    """Op backend passed to the consolidation object."""
    return case[0]
