"""The breadth suite: non-transformer modules written here, each buildable at a CI size and a realistic one.

Categories: `ops` (single ops at realistic sizes), `chains` (conv / conv-transpose / GEMM / bmm followed by
an epilogue), `nets` (whole networks: ResNet, MobileNet, DenseNet, Inception, ConvNeXt, ViT, Swin, UNet,
LSTM/GRU, MLP-Mixer, an audio encoder). `CASES[name].make(size, device, dtype)` returns the module (eval
mode, on the device) and its example inputs. `fxcc bench breadth` runs them (benchmarks/breadth/runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

SIZES = ("small", "full")
CATEGORIES = ("ops", "chains", "nets")


@dataclass(frozen=True)
class Size:
    """Which size to build (`small`: tiny, for CI; `full`: realistic for the device) and where."""

    name: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def pick(self, small, cpu, gpu=None):
        """The value for this size: `small`, or the full size for the CPU or the GPU (default: the CPU's)."""
        if self.name == "small":
            return small
        return gpu if self.device == "cuda" and gpu is not None else cpu

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, dtype=self.dtype)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, device=self.device)


@dataclass(frozen=True)
class Case:
    """One module of the suite: `build(size)` returns the module and its example inputs."""

    name: str
    category: str
    build: Callable[[Size], tuple[nn.Module, tuple]]

    def make(self, size: str = "small", device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple]:
        """The module in eval mode on `device` in `dtype` (floating parameters) and its inputs (seeded)."""
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; use one of {', '.join(SIZES)}")
        torch.manual_seed(0)
        s = Size(size, device, dtype)
        with torch.device(device):
            module, inputs = self.build(s)
        return module.to(device=device, dtype=dtype).eval(), inputs


CASES: dict[str, Case] = {}


def case(category: str, name: str | None = None):
    """Register `build(size) -> (module, inputs)` under `name` (default: the function's name)."""
    assert category in CATEGORIES, category

    def deco(build: Callable[[Size], tuple[nn.Module, tuple]]):
        key = name or build.__name__
        assert key not in CASES, f"duplicate breadth case {key}"
        CASES[key] = Case(key, category, build)
        return build
    return deco


def select(only: str | None = None, category: str | None = None) -> list[Case]:
    """Cases by comma-separated names (`only`; a trailing `*` matches a prefix) and/or category."""
    cases = list(CASES.values())
    if category:
        cats = category.split(",")
        unknown = [c for c in cats if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown category {', '.join(unknown)}; use {', '.join(CATEGORIES)}")
        cases = [c for c in cases if c.category in cats]
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        missing = [p for p in pats if not any(_matches(p, c.name) for c in CASES.values())]
        if missing:
            raise ValueError(f"no breadth module named {', '.join(missing)}; `--list` shows them")
        cases = [c for c in cases if any(_matches(p, c.name) for p in pats)]
    return cases


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


from . import chains, nets, ops  # noqa: E402,F401  (each registers its cases)
