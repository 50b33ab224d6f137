"""The device parametrisation of the suite (tests/helpers.py): strided copies and the cuda marks."""

import pytest
import torch

from tests.helpers import CUDA, DEVICES, INTERPRET, TRITON_ON_CUDA_SKIP, cuda_marks, on_device, same_layout


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, 7),
        lambda: torch.randn(7, 5).t(),
        lambda: torch.randn(12, 4)[::3],
        lambda: torch.randn(3, 8, 6).transpose(0, 1)[:, :, ::2],
        lambda: torch.randn(1, 4, 3).expand(5, 4, 3),
        lambda: torch.randn(0, 3),
        lambda: torch.randn(6).to(torch.bfloat16)[1::2],
    ],
    ids=["contiguous", "transposed", "sliced", "permuted-sliced", "expanded", "empty", "bf16-offset"],
)
def test_same_layout_keeps_strides_and_values(make):
    t = make()
    c = same_layout(t, t.device, force=True)
    assert c.shape == t.shape and c.stride() == t.stride() and c.dtype == t.dtype
    assert torch.equal(c, t)
    if t.numel():
        assert c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert same_layout(t, t.device) is t  # already there: no copy


def test_on_device_walks_containers():
    a, b = torch.randn(3), torch.randn(2, 2).t()
    out = on_device({"x": [a, (b, None)], "n": 3}, "cpu")
    assert out["x"][0] is a and out["x"][1][0] is b and out["x"][1][1] is None and out["n"] == 3


def test_cuda_params_are_marked_and_skip_without_a_card():
    cpu, cuda = DEVICES
    assert cpu.values == ("cpu",) and not cpu.marks
    names = [m.name for m in cuda.marks]
    assert names == ["cuda", "skipif"]
    skip = cuda.marks[1]
    assert skip.args[0] is (not CUDA)
    triton_skip = cuda_marks(triton=True)[1]
    assert triton_skip.args[0] is (TRITON_ON_CUDA_SKIP is not None)
    if CUDA and INTERPRET:  # on a card, Triton under the interpreter would prove nothing
        assert "TRITON_INTERPRET=1" in TRITON_ON_CUDA_SKIP
