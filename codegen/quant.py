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
  tx.int4_linear(x, qw, sz, b, group, impl)  W4A16: asymmetric int4 per group of input channels, scale and zero
                                             in x's dtype; qw in the layout `impl` reads (`int4_weight`)
                                             (+ residual, norm, rms_eps as tx.int8_linear)
  tx.int4_gated_linear(x, qw, sz, b, group, impl)  silu(gate) * up of a merged int4 gate/up linear

`impl` names the kernel; the mixed-precision pass measures the candidates of `kernels()` at compile time
and writes the fastest into the op, so the IR says what runs. `impl="ref"` is the reference.
Weights are quantized once, at compile time, by `quantize_weight`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fxcc.codegen import derived, store
from fxcc.dialects import (
    ACTS,
    INT4_LAYOUTS,
    fp8_linear,
    gemv_gated_linear,
    gemv_linear,
    int4_dequantize,
    int4_gated_linear,
    int4_group,
    int4_linear,
    int4_linear_reference,
    int8_gated_linear,
    int8_linear,
    int8_linear_reference,
    pack_int4,
    quantize_int4,
    quantize_per_row,
    unpack_int4,
)
from fxcc.options import settings
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


_PACKED: dict[int, tuple] = store()


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



# ------------------------------------------------------------------------------------ int4 linear


def quantize_weight_int4(w: Tensor, dtype: torch.dtype, group: int = 128) -> tuple[Tensor, Tensor] | str:
    """A linear weight [N, K] as int4 per group (fxcc's packed layout, uint8 [N, K/2]) with scale_zero
    [K/group, N, 2] in `dtype` (the activations'); the group is `group` or the largest smaller one dividing K.
    A string says why the weight cannot be int4 (no group of at least 32 divides K). Compile time only."""
    n, k = w.shape
    g = int4_group(k, group)
    if g is None:
        return f"K={k} is not a multiple of 32 (the smallest int4 group)"
    with torch.no_grad():
        q, sz = quantize_int4(w, g, dtype)
    return pack_int4(q, g), sz


def int4_group_of(qw: Tensor, sz: Tensor) -> int:
    """The group size of int4 weights: K / the number of groups."""
    return 2 * qw.shape[1] // sz.shape[0]


def int4_weight(qw: Tensor, group: int, impl: str) -> Tensor:
    """Packed int4 weights (fxcc's layout) in the layout kernel `impl` reads (the same tensor where it is fxcc's):
    what the lowered graph holds, so each weight is held once, in its kernel's form."""
    if INT4_LAYOUTS.get(impl) == "torch-cpu":
        with torch.no_grad():
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qw, group).to(torch.int32), 1)
    return qw


def _int4_dequant(x, qw, sz, b, group):
    """Dequantize the weight to x's dtype, then the library GEMM (any shape, any device; pays the dequantization
    per call)."""
    return F.linear(x, int4_dequantize(qw, sz, group).to(x.dtype), None if b is None else b.to(x.dtype))


def _int4_pack_mm(x, qw, sz, b, group):
    """torch's CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`) on the weight in its own layout; N a multiple of 16.
    fp32 x is computed with bf16 activations (W4A16 as the name says): torch's fp32 path of this kernel measured
    about 100x slower than its bf16 path (1024x384x384 on a 2-core AVX2 CPU, torch 2.13: 438 ms against 3.6 ms)."""
    x2 = x.reshape(-1, x.shape[-1])
    dt = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dt), qw, group, sz.to(dt)).to(x.dtype)
    y = y.reshape(*x.shape[:-1], sz.shape[1])
    return y if b is None else y + b.to(y.dtype)


def _int4_ref(x, qw, sz, b, group, impl="ref"):
    return int4_linear_reference(x, qw, sz, b, group, impl)


INT4_IMPLS: dict[str, Callable] = {"ref": _int4_ref, "dequant": _int4_dequant, "int4pack": _int4_pack_mm}


def _int4_check(impl: str, qw: Tensor, sz: Tensor, group: int, op: str) -> Callable | None:
    if impl != "triton" and impl not in INT4_IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; known: {', '.join([*INT4_IMPLS, 'triton'])}")
    if qw.dtype != torch.uint8 or qw.dim() != 2 or sz.dim() != 3 or sz.shape[1] != qw.shape[0] \
            or sz.shape[0] * group != 2 * qw.shape[1]:
        raise ValueError(f"{op}: qweight {tuple(qw.shape)} {qw.dtype} and scale_zero {tuple(sz.shape)} do not fit "
                         f"group={group}; quantize with fxcc.codegen.quant.quantize_weight_int4")
    return INT4_IMPLS.get(impl)


@int4_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, qweight: Tensor, scale_zero: Tensor, bias: Tensor | None, group: int, impl: str,
      residual: Tensor | None = None, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """tx.int4_linear by the kernel `impl` names (the Triton kernel applies a folded norm and residual itself)."""
    fn = _int4_check(impl, qweight, scale_zero, group, "tx.int4_linear")
    if impl == "triton":
        from fxcc.codegen.triton_int4 import int4_linear as tri
        return tri(x, qweight, scale_zero, bias, group, residual, norm, rms_eps)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    y = fn(x, qweight, scale_zero, bias, group)
    return y if residual is None else y + residual


@int4_gated_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, qweight: Tensor, scale_zero: Tensor, bias: Tensor | None, group: int, impl: str,
      norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """tx.int4_gated_linear by the kernel `impl` names (the Triton kernel computes the norm and SwiGLU too)."""
    fn = _int4_check(impl, qweight, scale_zero, group, "tx.int4_gated_linear")
    if impl == "triton":
        from fxcc.codegen.triton_int4 import int4_linear as tri
        return tri(x, qweight, scale_zero, bias, group, None, norm, rms_eps, glu=True)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    gate, up = fn(x, qweight, scale_zero, bias, group).split(scale_zero.shape[1] // 2, dim=-1)
    return F.silu(gate) * up


def impls(precision: str, device: str) -> list[str]:
    """The implementations (`impl` of the quantized ops) worth measuring for a precision on a device (first: the
    default)."""
    cpu = device == "cpu"
    table = {
        "int8-weight": ["dequant", "int8pack"] if cpu else ["triton", "dequant"],
        "int8": ["int_mm", "ref"] if cpu else ["triton_w8a8", "int_mm"],
        "int8-tensor": ["fbgemm"] if cpu else [],
        "fp8": [] if cpu else ["scaled_mm", "triton", "triton_fused"],
        "int4": ["int4pack", "dequant"] if cpu else ["triton", "dequant"],
    }
    return table.get(precision, [])



# ------------------------------------------------------------------- float decode linears (the `gemv` pass)


def _gemv_kernel(impl: str, x: Tensor, name: str) -> bool:
    """Whether the Triton GEMV runs `impl` here: on a GPU, or on the CPU under the interpreter (tests)."""
    if impl not in ("triton", "library"):
        raise ValueError(f"tx.{name}: unknown impl {impl!r}; known: triton, library")
    if impl == "library":
        return False
    return x.is_cuda or settings().triton_interpret


@gemv_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str, residual: Tensor | None = None,
      norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """tx.gemv_linear: the Triton GEMV (or the library, as measured) with the folded norm and residual."""
    if _gemv_kernel(impl, x, "gemv_linear"):
        from fxcc.codegen.triton_quant import float_linear
        return float_linear(x, weight, bias, residual, norm, rms_eps)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


@gemv_gated_linear.register_kernel(("cpu", "cuda"))
def _(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str, norm: Tensor | None = None,
      rms_eps: float | None = None) -> Tensor:
    """tx.gemv_gated_linear: the Triton GEMV with the SwiGLU epilogue (or the library, as measured)."""
    if _gemv_kernel(impl, x, "gemv_gated_linear"):
        from fxcc.codegen.triton_quant import float_linear
        return float_linear(x, weight, bias, None, norm, rms_eps, glu=True)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    gate, up = F.linear(x, weight, bias).split(weight.shape[0] // 2, dim=-1)
    return F.silu(gate) * up
