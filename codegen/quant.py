"""The kernels of the quantized `tx` ops (defined in fxcc.dialects): int8 (weight-only and W8A8) and fp8 linears.

Ops (defined in fxcc.dialects with a plain-torch reference and a fake kernel; the kernels here are registered
on them, chosen by each call's `impl`):
  tx.quantize(x, dtype)                      -> (q, scale)  symmetric, one scale per row (last dim reduced)
  tx.dequantize(q, scale, dtype)             -> q * scale in `dtype`
  tx.int8_linear(x, qw, ws, b, act, impl)    act: none (weight-only) | token (dynamic per-token W8A8) |
                                             tensor (dynamic per-tensor W8A8, fbgemm's scheme)
                                             (+ residual, norm, rms_eps: folds of the pass, see the op)
  tx.int8_gated_linear(x, qw, ws, b, impl)   silu(gate) * up of a weight-only int8 linear over [gate; up] rows
  tx.fp8_linear(x, qw, ws, b, impl)          e4m3 weights (per-channel scale), activations per token

`impl` names the kernel; the mixed-precision pass measures the candidates of `kernels()` at compile time
and writes the fastest into the op, so the IR says what runs. `impl="ref"` is the reference.
Weights are quantized once, at compile time, by `quantize_weight`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fxcc.codegen import derived
from fxcc.dialects import (
    ACTS,
    fp8_linear,
    int8_gated_linear,
    int8_linear,
    int8_linear_reference,
    quantize_per_row,
)
from torch import Tensor


def quantize_weight(w: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """A linear weight [N, K] quantized per output channel: (q [N, K], scale [N] fp32). Compile time only."""
    with torch.no_grad():
        return quantize_per_row(w.detach(), dtype)


# ------------------------------------------------------------------------------------ int8 linear


def _int8_int_mm(x, qw, ws, b, act):
    """Per-token W8A8 through torch._int_mm (int32 accumulation), scales applied after."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_row(x2, "int8")
    acc = torch._int_mm(xq, qw.t())
    y = acc.float() * xs.unsqueeze(-1) * ws
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qw.shape[0])


def _packed(qw: Tensor, ws: Tensor, b: Tensor | None):
    """fbgemm/oneDNN packed weight for `qw` (with its scales and bias), built once (fxcc.codegen.derived)."""
    def pack():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensors; the packed kernel is still there
            qt = torch._make_per_channel_quantized_tensor(qw.cpu(), ws.double().cpu(),
                                                           torch.zeros(qw.shape[0], dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qt, None if b is None else b.float())
    return derived(_PACKED, qw, None, pack, (ws,) if b is None else (ws, b))


_PACKED: dict[int, tuple] = {}


def _int8_fbgemm(x, qw, ws, b, act):
    """Dynamic W8A8 by the library (fbgemm/oneDNN, `x86` engine): per-tensor u8 activations, 7-bit range."""
    y = torch.ops.quantized.linear_dynamic(x.float(), _packed(qw, ws, b), True)
    return y.to(x.dtype)


def _int8_dequant(x, qw, ws, b, act):
    """Weight-only: dequantize the weight to x's dtype, then the library GEMM."""
    return F.linear(x, (qw.to(x.dtype) * ws.to(x.dtype).unsqueeze(1)), None if b is None else b.to(x.dtype))


def _int8_pack_mm(x, qw, ws, b, act):
    """Weight-only: torch's int8-weight GEMM (_weight_int8pack_mm), scales in its epilogue."""
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qw, ws.to(x.dtype))
    y = y.reshape(*x.shape[:-1], qw.shape[0])
    return y if b is None else y + b.to(y.dtype)


def _int8_triton(x, qw, ws, b, act):
    from fxcc.codegen.triton_quant import int8_weight_linear
    return int8_weight_linear(x, qw, ws, b)


def _int8_triton_w8a8(x, qw, ws, b, act):
    from fxcc.codegen.triton_quant import int8_w8a8_linear
    return int8_w8a8_linear(x, qw, ws, b)


INT8_IMPLS: dict[str, Callable] = {"ref": int8_linear_reference, "int_mm": _int8_int_mm, "fbgemm": _int8_fbgemm,
                                     "dequant": _int8_dequant, "int8pack": _int8_pack_mm,
                                     "triton": _int8_triton, "triton_w8a8": _int8_triton_w8a8}


@int8_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, act: str, impl: str,
      residual: Tensor | None = None, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """tx.int8_linear by the kernel `impl` names (the Triton GEMV applies a folded norm and residual itself)."""
    if rms_eps is not None and not (impl == "triton" and act == "none"):
        x, rms_eps = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps), None
    if act not in ACTS:
        raise ValueError(f"tx.int8_linear: act={act!r}; expected one of {', '.join(ACTS)}")
    fn = INT8_IMPLS.get(impl)
    if fn is None:
        raise ValueError(f"tx.int8_linear: unknown impl {impl!r}; known: {', '.join(INT8_IMPLS)}")
    if (residual is not None or rms_eps is not None) and impl == "triton" and act == "none":
        from fxcc.codegen.triton_quant import int8_weight_linear
        return int8_weight_linear(x, qweight, wscale, bias, residual, norm, rms_eps)
    y = fn(x, qweight, wscale, bias, act)
    return y if residual is None else y + residual



@int8_gated_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, impl: str,
      norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """tx.int8_gated_linear by the kernel `impl` names (the Triton GEMV computes the norm and SwiGLU too)."""
    if impl == "triton":
        from fxcc.codegen.triton_quant import int8_gated_linear as tri
        return tri(x, qweight, wscale, bias, norm, rms_eps)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    fn = INT8_IMPLS.get(impl)
    if fn is None:
        raise ValueError(f"tx.int8_gated_linear: unknown impl {impl!r}; known: {', '.join(INT8_IMPLS)}")
    gate, up = fn(x, qweight, wscale, bias, "none").split(qweight.shape[0] // 2, dim=-1)
    return F.silu(gate) * up



# ------------------------------------------------------------------------------------- fp8 linear


def _fp8_scaled_mm(x, qw, ws, b):
    """torch._scaled_mm (cuBLASLt fp8, Hopper): row-wise scales for both operands."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        from fxcc.codegen.triton_quant import quantize_rows
        xq, xs = quantize_rows(x2, "fp8")  # one launch instead of five torch ops
    else:
        xq, xs = quantize_per_row(x2, "fp8")
    y = torch._scaled_mm(xq, qw.t(), scale_a=xs.unsqueeze(1), scale_b=ws.unsqueeze(0),
                         bias=None if b is None else b.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y.to(x.dtype).reshape(*x.shape[:-1], qw.shape[0])


def _fp8_triton(x, qw, ws, b):
    from fxcc.codegen.triton_quant import fp8_linear as tri
    return tri(x, qw, ws, b)


def _fp8_triton_fused(x, qw, ws, b):
    from fxcc.codegen.triton_quant import fp8_linear_fused
    return fp8_linear_fused(x, qw, ws, b)


def _fp8_ref(x, qw, ws, b):
    """The op's definition (fxcc.dialects): activations rounded to e4m3 per token, products in fp32."""
    return fp8_linear._init_fn(x, qw, ws, b, "ref")


FP8_IMPLS: dict[str, Callable] = {"ref": _fp8_ref, "scaled_mm": _fp8_scaled_mm, "triton": _fp8_triton,
                                    "triton_fused": _fp8_triton_fused}


@fp8_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """tx.fp8_linear by the kernel `impl` names."""
    fn = FP8_IMPLS.get(impl)
    if fn is None:
        raise ValueError(f"tx.fp8_linear: unknown impl {impl!r}; known: {', '.join(FP8_IMPLS)}")
    return fn(x, qweight, wscale, bias)



def impls(precision: str, device: str) -> list[str]:
    """The implementations (`impl` of the quantized ops) worth measuring for a precision on a device (first: the
    default)."""
    cpu = device == "cpu"
    table = {
        "int8-weight": ["dequant", "int8pack"] if cpu else ["triton", "dequant"],
        "int8": ["int_mm", "ref"] if cpu else ["triton_w8a8", "int_mm"],
        "int8-tensor": ["fbgemm"] if cpu else [],
        "fp8": [] if cpu else ["scaled_mm", "triton", "triton_fused"],
    }
    return table.get(precision, [])
