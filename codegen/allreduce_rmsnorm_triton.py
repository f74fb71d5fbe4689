"""Triton kernels of the fused all-reduce + residual + RMSNorm (see allreduce_rmsnorm.py).

One program per row (a token): the row's hidden vector fits in registers (hidden <= 16384). Rounding
follows the unfused ops exactly: the all-reduced sum and the residual sum are rounded to the input dtype,
the statistics are fp32, the normalised row is rounded before the weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fxcc.codegen.launch import ReadOnly
from torch import Tensor


@triton.jit
def _finish(row, xsum, res_ptr, w_ptr, y_ptr, s_ptr, H, eps, cols, mask, HAS_W: tl.constexpr):
    """xsum (fp32, the all-reduced row) -> s = round(round(xsum) + residual), y = round(norm(s)) * w."""
    dt = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    s = (xsum.to(dt).to(tl.float32) + r).to(dt)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)
    y = (sf * rstd).to(dt)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (y.to(tl.float32) * w.to(tl.float32)).to(dt)
    tl.store(s_ptr + row * H + cols, s, mask=mask)
    tl.store(y_ptr + row * H + cols, y, mask=mask)


@triton.jit
def _residual_rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, H, eps, BLOCK: tl.constexpr,
                              HAS_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    _finish(row, x, res_ptr, w_ptr, y_ptr, s_ptr, H, eps, cols, mask, HAS_W)


@triton.jit
def _symm_kernel(ptrs_ptr, res_ptr, w_ptr, y_ptr, s_ptr, H, eps, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_W: tl.constexpr):
    """Every rank's partial row, read from its symmetric buffer (peer loads over NVLink), summed in rank order."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        base = tl.load(ptrs_ptr + r).to(res_ptr.dtype)
        part = tl.load(base + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        if r == 0:
            acc = part
        else:  # rank order, rounded per step: for 2 ranks exactly the NCCL sum, the same bits on every rank
            acc = (acc + part).to(res_ptr.dtype.element_ty).to(tl.float32)
    _finish(row, acc, res_ptr, w_ptr, y_ptr, s_ptr, H, eps, cols, mask, HAS_W)


def _outs(residual: Tensor, out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    if out is not None and all(o.is_contiguous() and o.shape == residual.shape for o in out):
        return out
    return torch.empty_like(residual), torch.empty_like(residual)


def _launch(kernel, first: Tensor, x_like: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
            out: tuple[Tensor, Tensor] | None, **const) -> tuple[Tensor, Tensor]:
    h = residual.shape[-1]
    rows = residual.numel() // h
    residual = residual.contiguous()
    y, s = _outs(residual, out)
    block = triton.next_power_of_2(h)
    w = weight if weight is not None else residual
    ReadOnly(kernel)[(rows,)](first, residual, w, y, s, h, eps, BLOCK=block, HAS_W=weight is not None,
                    num_warps=8 if block >= 4096 else 4, **const)
    return y, s


def residual_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                      out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) in one pass over the rows."""
    return _launch(_residual_rms_norm_kernel, x.contiguous(), x, residual, weight, eps, out)


def symm_all_reduce_rms_norm(ptrs: Tensor, x: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                             world: int, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`ptrs` holds each rank's buffer address (int64); every buffer starts with that rank's partial rows."""
    return _launch(_symm_kernel, ptrs, x, residual, weight, eps, out, WORLD=world)
