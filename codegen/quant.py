"""Quantized ops of the `tx` dialect and their kernels: int8 (weight-only and W8A8) and fp8 e4m3 linears.

Ops (registered with torch.library, each with a plain-torch reference and a fake kernel):
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
from torch import Tensor

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ACTS = ("none", "token", "tensor")


def _qdtype(dtype: str) -> torch.dtype:
    if dtype == "int8":
        return torch.int8
    if dtype == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"tx.quantize: unknown dtype {dtype!r} (expected 'int8' or 'fp8')")


def _quantize(x: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    qd = _qdtype(dtype)
    top = INT8_MAX if dtype == "int8" else FP8_MAX
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12)
    y = xf / scale
    q = y.round().clamp_(-INT8_MAX, INT8_MAX).to(qd) if dtype == "int8" else y.clamp_(-FP8_MAX, FP8_MAX).to(qd)
    return q, scale.squeeze(-1)


@torch.library.custom_op("fxcc_tx::quantize", mutates_args=())
def quantize(x: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """Symmetric quantization with one fp32 scale per row: q = round(x / s), s = max|row| / qmax."""
    return _quantize(x, dtype)


@quantize.register_fake
def _(x, dtype):
    return x.new_empty(x.shape, dtype=_qdtype(dtype)), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fxcc_tx::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale (one scale per row) in `dtype`: the inverse of tx.quantize up to rounding."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


@dequantize.register_fake
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def quantize_weight(w: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """A linear weight [N, K] quantized per output channel: (q [N, K], scale [N] fp32). Compile time only."""
    with torch.no_grad():
        return _quantize(w.detach(), dtype)


# ------------------------------------------------------------------------------------ int8 linear


def _int8_ref(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, act: str) -> Tensor:
    """Plain torch: activations quantized as `act` says, products in fp32 (exact for int8 up to K ~ 1000)."""
    xf = x.float()
    if act == "token":
        xq, xs = _quantize(xf, "int8")
        xf = xq.float() * xs.unsqueeze(-1)
    elif act == "tensor":  # fbgemm's dynamic scheme: asymmetric u8 over [min(x, 0), max(x, 0)], 7-bit range
        lo, hi = xf.min().clamp_max(0), xf.max().clamp_min(0)
        s = ((hi - lo) / 127).clamp_min(1e-12)
        zp = (-lo / s).round().clamp(0, 127)
        xf = ((xf / s).round() + zp).clamp(0, 127).sub(zp) * s
    y = F.linear(xf, qw.float()) * ws
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


def _int8_int_mm(x, qw, ws, b, act):
    """Per-token W8A8 through torch._int_mm (int32 accumulation), scales applied after."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = _quantize(x2, "int8")
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
    return derived(_PACKED, qw, (id(b), ws.data_ptr()), pack)


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


INT8_KERNELS: dict[str, Callable] = {"ref": _int8_ref, "int_mm": _int8_int_mm, "fbgemm": _int8_fbgemm,
                                     "dequant": _int8_dequant, "int8pack": _int8_pack_mm,
                                     "triton": _int8_triton, "triton_w8a8": _int8_triton_w8a8}


@torch.library.custom_op("fxcc_tx::int8_linear", mutates_args=())
def int8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, act: str, impl: str,
                residual: Tensor | None = None, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """x @ (qweight * wscale[:, None]).T + bias (+ residual) with int8 weights; activations quantized per
    `act`. `residual` is an add the mixed-precision pass folded in (the Triton kernel adds it in its epilogue).
    `rms_eps`: x is first tx.rms_norm(x, norm, rms_eps), a norm the pass folded in (the Triton GEMV applies it;
    norm=None when the pass folded the norm's weight into qweight's input channels)."""
    if rms_eps is not None and not (impl == "triton" and act == "none"):
        x, rms_eps = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps), None
    if act not in ACTS:
        raise ValueError(f"tx.int8_linear: act={act!r}; expected one of {', '.join(ACTS)}")
    fn = INT8_KERNELS.get(impl)
    if fn is None:
        raise ValueError(f"tx.int8_linear: unknown impl {impl!r}; known: {', '.join(INT8_KERNELS)}")
    if (residual is not None or rms_eps is not None) and impl == "triton" and act == "none":
        from fxcc.codegen.triton_quant import int8_weight_linear
        return int8_weight_linear(x, qweight, wscale, bias, residual, norm, rms_eps)
    y = fn(x, qweight, wscale, bias, act)
    return y if residual is None else y + residual


@int8_linear.register_fake
def _(x, qweight, wscale, bias, act, impl, residual=None, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("fxcc_tx::int8_gated_linear", mutates_args=())
def int8_gated_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, impl: str,
                      norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """silu(gate) * up from one weight-only int8 linear whose rows are the gate's, then the up projection's
    (qweight [2F, K]): the SwiGLU the mixed-precision pass folds into the GEMV's epilogue. [.., F].
    `rms_eps`: x is first tx.rms_norm(x, norm, rms_eps) (in the GEMV at decode)."""
    if impl == "triton":
        from fxcc.codegen.triton_quant import int8_gated_linear as tri
        return tri(x, qweight, wscale, bias, norm, rms_eps)
    if rms_eps is not None:
        x = torch.ops.fxcc_tx.rms_norm(x, norm, rms_eps)
    fn = INT8_KERNELS.get(impl)
    if fn is None:
        raise ValueError(f"tx.int8_gated_linear: unknown impl {impl!r}; known: {', '.join(INT8_KERNELS)}")
    gate, up = fn(x, qweight, wscale, bias, "none").split(qweight.shape[0] // 2, dim=-1)
    return F.silu(gate) * up


@int8_gated_linear.register_fake
def _(x, qweight, wscale, bias, impl, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


# ------------------------------------------------------------------------------------- fp8 linear


def _fp8_ref(x, qw, ws, b):
    """Plain torch: activations rounded to e4m3 per token, products in fp32."""
    xq, xs = _quantize(x, "fp8")
    y = F.linear(xq.float() * xs.unsqueeze(-1), qw.float()) * ws
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


def _fp8_scaled_mm(x, qw, ws, b):
    """torch._scaled_mm (cuBLASLt fp8, Hopper): row-wise scales for both operands."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        from fxcc.codegen.triton_quant import quantize_rows
        xq, xs = quantize_rows(x2, "fp8")  # one launch instead of five torch ops
    else:
        xq, xs = _quantize(x2, "fp8")
    y = torch._scaled_mm(xq, qw.t(), scale_a=xs.unsqueeze(1), scale_b=ws.unsqueeze(0),
                         bias=None if b is None else b.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y.to(x.dtype).reshape(*x.shape[:-1], qw.shape[0])


def _fp8_triton(x, qw, ws, b):
    from fxcc.codegen.triton_quant import fp8_linear as tri
    return tri(x, qw, ws, b)


def _fp8_triton_fused(x, qw, ws, b):
    from fxcc.codegen.triton_quant import fp8_linear_fused
    return fp8_linear_fused(x, qw, ws, b)


FP8_KERNELS: dict[str, Callable] = {"ref": _fp8_ref, "scaled_mm": _fp8_scaled_mm, "triton": _fp8_triton,
                                    "triton_fused": _fp8_triton_fused}


@torch.library.custom_op("fxcc_tx::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """x @ (qweight * wscale[:, None]).T + bias with e4m3 weights and per-token e4m3 activations."""
    fn = FP8_KERNELS.get(impl)
    if fn is None:
        raise ValueError(f"tx.fp8_linear: unknown impl {impl!r}; known: {', '.join(FP8_KERNELS)}")
    return fn(x, qweight, wscale, bias)


@fp8_linear.register_fake
def _(x, qweight, wscale, bias, impl):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


QUANT_OPS = {"quantize": quantize, "dequantize": dequantize, "int8_linear": int8_linear,
             "int8_gated_linear": int8_gated_linear, "fp8_linear": fp8_linear}


def kernels(precision: str, device: str) -> list[str]:
    """The kernels worth measuring for a precision on a device (first: the default)."""
    cpu = device == "cpu"
    table = {
        "int8-weight": ["dequant", "int8pack"] if cpu else ["triton", "dequant"],
        "int8": ["int_mm", "ref"] if cpu else ["triton_w8a8", "int_mm"],
        "int8-tensor": ["fbgemm"] if cpu else [],
        "fp8": [] if cpu else ["scaled_mm", "triton", "triton_fused"],
    }
    return table.get(precision, [])
