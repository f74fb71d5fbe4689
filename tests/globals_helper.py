"""A helper module whose globals a compiled model reads (tests/test_globals.py)."""

import torch

SCALE = 2.0
OFFSET = torch.ones(8)


def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE
