"""Every contender of the comparison, in report order, and lookup by name."""

from __future__ import annotations

import torch

from .asdl_fisher import ASDL
from .avalanche_lib import AvalancheLib
from .avalanche_style import AvalancheStyle
from .backpack_sgs import BackPACK
from .base import Contender
from .nngeometry_fim import NNGeometry
from .opacus_gsm import OpacusGSM
from .ours import EwcFast
from .reference import PerSampleLoop, PlainFwdBwd
from .torch_func import TorchFunc


def all_contenders(device="cpu") -> list[Contender]:
    """Every contender, in report order (ewc_fast backends for ``device`` first)."""
    backends = ("triton", "torch") if torch.device(device).type == "cuda" else ("cpp", "torch")
    out: list[Contender] = [EwcFast(b) for b in backends]
    out += [
        PerSampleLoop(),
        TorchFunc(),
        OpacusGSM(),
        BackPACK(),
        NNGeometry(False),
        NNGeometry(True),
        ASDL(),
        AvalancheStyle(),
        AvalancheLib(),
    ]
    return out


def get_contender(name: str, device="cpu") -> Contender:
    """The contender called ``name`` (``plain``, any of :func:`all_contenders`, or ``ewc_fast[<backend>]``)."""
    if name == "plain":
        return PlainFwdBwd()
    for c in all_contenders(device):
        if c.name == name:
            return c
    if name.startswith("ewc_fast[") and name.endswith("]"):
        return EwcFast(name[len("ewc_fast[") : -1])
    raise ValueError(f"unknown contender {name!r}; valid: plain, " + ", ".join(c.name for c in all_contenders(device)))
