"""A helper module whose globals a compiled model reads (tests/test_globals.py)."""

import torch

SCALE = 2.0
OFFSET = torch.ones(8)


def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE


def accumulate(t: torch.Tensor, x: torch.Tensor) -> None:
    """Writes its parameter in place: a caller that passes a global sees no write into it in its own source
    (tests/test_capture_writes.py)."""
    t.add_(x.sum())
