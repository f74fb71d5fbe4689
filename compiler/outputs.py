"""Two runs' outputs compared leaf by leaf: every tensor of a ModelOutput, tuple, dict or cache, each
leaf's largest error relative to its own scale. Used by the first-call check against eager (runtime) and
by the model-zoo sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree


def tensor_leaves(x: Any, path: str = "out", depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in an output, with its path: pytree containers (ModelOutputs and the caches
    transformers registers), then the attributes of any other object (a cache type not registered)."""
    flat, _ = pytree.tree_flatten_with_path(x)
    out = []
    for kp, v in flat:
        p = path + pytree.keystr(kp)
        if isinstance(v, torch.Tensor):
            out.append((p, v))
        elif depth < 4 and hasattr(v, "__dict__") and not isinstance(v, (type, nn.Module)):
            for name, attr in vars(v).items():
                out += tensor_leaves(attr, f"{p}.{name}", depth + 1)
    return out


@dataclass
class Comparison:
    """Outcome of comparing every tensor leaf: the worst leaf's error relative to its scale."""

    equal: bool
    max_rel: float
    worst: str
    leaves: int
    detail: str = ""


def compare(got: Any, expected: Any, tol: Any = 1e-4) -> Comparison:
    """Max abs error of each leaf divided by that leaf's scale (max |expected|); equal when <= `tol` on
    every leaf (`tol` may be a function of the leaf's dtype), integer and boolean leaves exactly, NaNs in
    the same places, the same structure."""
    g, e = tensor_leaves(got), tensor_leaves(expected)
    if [p for p, _ in g] != [p for p, _ in e]:
        only_e = [p for p, _ in e if p not in dict(g)][:3]
        only_g = [p for p, _ in g if p not in dict(e)][:3]
        return Comparison(False, math.inf, "structure", len(e),
                          f"output structure differs: eager has {len(e)} tensors, fxcc {len(g)} "
                          f"(only eager: {only_e}, only fxcc: {only_g})")
    worst, worst_path, worst_ratio = 0.0, "", 0.0
    for (path, a), (_, b) in zip(g, e):
        if a.shape != b.shape or a.dtype != b.dtype:
            return Comparison(False, math.inf, path, len(e), f"{path}: {a.dtype}{list(a.shape)} vs "
                                                              f"{b.dtype}{list(b.shape)}")
        dtype = b.dtype
        if not dtype.is_floating_point and not dtype.is_complex:
            err = 0.0 if torch.equal(a, b) else math.inf
        elif b.numel() == 0:
            err = 0.0
        else:
            if dtype.is_complex:
                a, b = torch.view_as_real(a), torch.view_as_real(b)
            a, b = a.detach().double(), b.detach().double()
            nan = torch.isnan(b)
            if not torch.equal(nan, torch.isnan(a)):
                err = math.inf
            else:
                diff = (a - b).abs().masked_fill(nan, 0)
                diff = diff.masked_fill(torch.isinf(b) & (a == b), 0)
                scale = b.abs().masked_fill(nan | torch.isinf(b), 0).max().item()
                err = diff.max().item() / max(scale, 1e-30)
        limit = tol(dtype) if callable(tol) else tol
        ratio = err / limit if limit else (0.0 if err == 0 else math.inf)
        if ratio > worst_ratio or not worst_path:
            worst, worst_path, worst_ratio = err, path, ratio
    return Comparison(worst_ratio <= 1.0, worst, worst_path, len(e))

