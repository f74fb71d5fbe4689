"""An early-exit classifier (BranchyNet style) for `fxcc explain`: DyCL prints its host program and segments.

    fxcc explain examples/dynamic_early_exit.py:model --final-only
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A residual MLP block."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(F.gelu(self.fc1(h)))


class EarlyExit(nn.Module):
    """An exit head after every stage; the forward returns when the whole batch is confident."""

    def __init__(self, d: int = 256, classes: int = 10, stages: int = 3, threshold: float = 0.6):
        super().__init__()
        self.stages = nn.ModuleList(Block(d) for _ in range(stages))
        self.exits = nn.ModuleList(nn.Linear(d, classes) for _ in range(stages))
        self.threshold = threshold

    def forward(self, x):
        h = x
        for stage, head in zip(self.stages, self.exits):
            h = stage(h)
            logits = head(h)
            confidence = logits.softmax(-1).amax(-1).min()
            if confidence.item() > self.threshold:  # tensor-dependent control flow: a host-program branch
                return logits
        return logits


def model() -> EarlyExit:
    torch.manual_seed(0)
    return EarlyExit(d=256, stages=3).eval()


def inputs() -> tuple[torch.Tensor]:
    return (torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 3.0,)
