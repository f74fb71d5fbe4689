"""An early-exit classifier (BranchyNet style) for `fxcc explain`: DyCL prints its host program and segments.

    fxcc explain examples/dynamic_early_exit.py:model --final-only
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from dynamic_nets import EarlyExit  # noqa: E402


def model() -> EarlyExit:
    torch.manual_seed(0)
    return EarlyExit(d=256, stages=3).eval()


def inputs() -> tuple[torch.Tensor]:
    return (torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 3.0,)
