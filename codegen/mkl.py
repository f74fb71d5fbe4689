"""MKL GEMMs on fp32 weights packed once with MKL's own packing (`cblas_sgemm_pack`), on the CPU.

A plain `F.linear` hands MKL the weight as torch keeps it, and MKL re-packs it into its internal panel
layout on every call; at the row counts of small-batch inference (tens of rows) that copy of a
megabyte-sized weight costs as much as the product. Packed once, the GEMM reads the panels directly
(inductor's CPU freezing path does the same). On an Intel Xeon (2 threads, 32 x 512 -> 1024) it measured
151 us against 401 us for `F.linear`; on an AMD EPYC it is about even, so, like oneDNN's, it is a
candidate whose use is decided by measurement per kernel (the extern backend offers it).

The packed copy (3.4x to 5x the weight's size, by CPU) is made again only when the weight changes. MKL's packing
takes a row count, but the panels it writes do not depend on it: one copy serves every row count (checked
against `F.linear` for 1 to 257 rows; and codegen checks every candidate against the reference at its
shapes before using it), so a weight used at many row counts (experts behind data-dependent routing)
is packed once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxcc.codegen import derived, linear_weight, readable, store

_F32 = torch.float32
_PACKED: dict[int, tuple] = store()  # id(weight) -> (weakref, snapshots, key, packed) (fxcc.codegen.derived)


@functools.cache
def available() -> bool:
    """Whether this torch build has MKL and the packed-weight linear ops."""
    ops = torch.ops.mkl
    return (torch.backends.mkl.is_available() and hasattr(ops, "_mkl_linear")
            and hasattr(ops, "_mkl_reorder_linear_weight"))


def applies(node: fx.Node) -> bool:
    """A linear whose weight is a 2-D fp32 CPU kernel input (MKL packs single precision only)."""
    val = linear_weight(node)
    return val is not None and val.dtype == torch.float32 and val.device.type == "cpu" and available()


def packed(w: torch.Tensor, rows: int) -> torch.Tensor:
    """`w` packed by MKL (`rows`: the row count of the first GEMM, a hint), again only when `w` changes."""
    def pack() -> torch.Tensor:
        return torch.ops.mkl._mkl_reorder_linear_weight(readable(w.detach()), max(rows, 1))
    return derived(_PACKED, w, None, pack)


@functools.cache
def _copy_bytes(n: int, k: int) -> int:
    return torch.ops.mkl._mkl_reorder_linear_weight(torch.zeros(n, k), 1).numel() * 4


def copy_bytes(w: torch.Tensor) -> int:
    """Bytes of MKL's packed copy of an [N, K] fp32 weight (`w` may be a fake tensor): what MKL allocates for that
    shape, found once per shape by packing zeros (3.7x to 10x the weight on a Xeon: more for smaller shapes)."""
    return _copy_bytes(*(int(d) for d in w.shape))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)` through MKL with `w` packed (the library call off the CPU or for other types).

    It runs once per GEMM of every call, so the common case (the packed copy of this weight, unchanged,
    exists) is checked inline, without `derived`'s call."""
    if x.dtype is not _F32 or w.dtype is not _F32 or not x.is_cpu or w.dim() != 2 or x.dim() < 1:
        return F.linear(x, w, b)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not rows:
        return F.linear(x, w, b)
    hit = _PACKED.get(id(w))
    if hit is None or hit[0]() is not w or not hit[1][0].same(w):
        return _op()(x, packed(w, rows), w, b, rows)
    # the op runs the packed GEMM when its last argument equals the input's row count (else the library call)
    return _op()(x, hit[3], w, b, rows)


@functools.cache
def _op() -> Any:
    return torch.ops.mkl._mkl_linear.default
