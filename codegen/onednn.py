"""oneDNN GEMMs on weights packed once into oneDNN's blocked layout (CPU).

A library GEMM reads its weight in the layout torch keeps it in, and re-blocks it on every call.
oneDNN can take the weight pre-reordered for the matrix sizes at hand; fxcc does that once per weight
(and again only when the weight changes: fxcc.codegen.derived, which sees `.data` writes too) and keeps
the packed copy beside it, as inductor's freezing does. Whether it pays is measured per kernel: the
extern backend offers `onednn` as a candidate next to the plain library call.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from fxcc.codegen import derived, linear_weight, readable, store

_PACKED: dict[int, tuple] = store()  # packed weights (fxcc.codegen.derived)
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def applies(node: fx.Node) -> bool:
    """A linear whose weight is a 2-D kernel input of a type oneDNN packs."""
    val = linear_weight(node)
    return val is not None and val.dtype in _DTYPES and val.device.type == "cpu" and available()


def packed(w: torch.Tensor, rows: int) -> torch.Tensor:
    """`w` reordered for GEMMs of about `rows` rows (a hint: the packed weight serves any row count), made
    once per weight (again when it changes): a weight used at several row counts (experts) is packed once."""
    return derived(_PACKED, w, None, lambda: torch.ops.mkldnn._reorder_linear_weight(readable(w.detach()), rows))


def kept(w: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of `w` made before, where `w` has not changed since; None where there is none."""
    hit = _PACKED.get(id(w))
    if hit is None or hit[0]() is not w or not hit[1][0].same(w):
        return None
    return hit[3]


def copy_bytes(w: torch.Tensor) -> int:
    """Bytes of the packed copy of `w` (a fake tensor serves): oneDNN's blocked layout holds the weight's elements
    (its padding of odd sizes is not counted)."""
    return w.numel() * w.element_size()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)` through oneDNN with `w` packed (falls back to torch off the CPU or for odd types)."""
    if x.device.type != "cpu" or x.dtype != w.dtype or x.dtype not in _DTYPES or w.dim() != 2:
        return torch.nn.functional.linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(x2, packed(w, x2.shape[0]), b, "none", [], "")
    return out.view(*x.shape[:-1], w.shape[0])
