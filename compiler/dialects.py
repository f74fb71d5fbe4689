"""Dialect ops: the `tx` (transformer) and `kernel` levels of the IR, registered with torch.library.

Every op of both dialects is defined here, with a reference implementation in plain torch and a fake
kernel, so a graph at any level can be run, exported and shape-checked. Ops with an `impl` argument
(quantized linears, the fused all-reduce + RMSNorm) name the kernel that runs them; the backend module
providing those kernels registers them on the op (`register_kernel`, fxcc.codegen.quant and
fxcc.codegen.allreduce_rmsnorm), and the body here is the definition they are checked against.
The `kernel` ops name their body by a content hash (`kernel_body`), the way an MLIR op names a function by
symbol: the body is a GraphModule holding aten/tx ops; the op's other attributes record the codegen choice.
"""

from __future__ import annotations

import json
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from . import gather
from .rng import draws_random

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------- tx level


@torch.library.custom_op("fxcc_tx::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm as Llama-family models write it: statistics in fp32, cast back, then scale."""
    xf = x.to(torch.float32)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


@torch.library.custom_op("fxcc_tx::layer_norm", mutates_args=())
def layer_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


@torch.library.custom_op("fxcc_tx::softmax", mutates_args=())
def softmax(x: Tensor, dim: int) -> Tensor:
    return torch.softmax(x, dim)


@torch.library.custom_op("fxcc_tx::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, T, D]; k and v may have fewer (grouped) heads, query head h
    reading kv head h // (H / Hkv) (SDPA's enable_gqa: a decode step reads the KV cache, never a copy of it
    with the heads repeated)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=bool(k.shape[-3] != q.shape[-3]))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.library.custom_op("fxcc_tx::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, half-rotation form: x * cos + rotate_half(x) * sin."""
    return x * cos + _rotate_half(x) * sin


@torch.library.custom_op("fxcc_tx::gelu", mutates_args=())
def gelu(x: Tensor, approximate: str) -> Tensor:
    return F.gelu(x, approximate=approximate)


@torch.library.custom_op("fxcc_tx::silu", mutates_args=())
def silu(x: Tensor) -> Tensor:
    return F.silu(x)


@torch.library.custom_op("fxcc_tx::gated_act", mutates_args=())
def gated_act(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """The gated-MLP piece act(gate) * up (SwiGLU with act='silu', GeGLU with 'gelu'/'gelu_tanh')."""
    if act == "silu":
        a = F.silu(gate)
    elif act in ("gelu", "gelu_tanh"):
        a = F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")
    else:
        raise ValueError(f"tx.gated_act: unknown activation {act!r} (expected silu, gelu or gelu_tanh)")
    return a * up


@torch.library.custom_op("fxcc_tx::all_reduce", mutates_args=())
def all_reduce(x: Tensor, op: str, group: str) -> Tensor:
    """Sum (or max/min/avg) over the ranks of a process group; a copy when no group spans several ranks."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return x.clone()
    import torch.distributed._functional_collectives as fc

    pg = dist.group.WORLD if group in ("", "world") else group
    if dist.get_world_size(pg) == 1:
        return x.clone()
    return fc.wait_tensor(fc.all_reduce(x, op, pg))


@all_reduce.register_fake
def _(x, op, group):
    return torch.empty_like(x)


# ------------------------------------------------------------------- fused all-reduce + RMSNorm (tensor parallel)

ALL_REDUCE_IMPLS = ("auto", "symm", "nccl", "reference")  # what `impl` of the two ops below may name


@torch.library.custom_op("fxcc_tx::all_reduce_rms_norm", mutates_args=())
def all_reduce_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, group: str, impl: str,
                        site: int) -> tuple[Tensor, Tensor]:
    """(rms_norm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) in one op. `impl` names the
    kernel (auto, symm, nccl: fxcc.codegen.allreduce_rmsnorm; reference: this body); `site` is the call site."""
    s = all_reduce(x, "sum", group) + residual
    return rms_norm(s, weight, eps), s


@all_reduce_rms_norm.register_fake
def _(x, residual, weight, eps, group, impl, site):
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


@torch.library.custom_op("fxcc_tx::linear_all_reduce_rms_norm", mutates_args=())
def linear_all_reduce_rms_norm(a: Tensor, w: Tensor, residual: Tensor, weight: Tensor | None, eps: float,
                               group: str, impl: str, site: int, ratio: float) -> tuple[Tensor, Tensor]:
    """all_reduce_rms_norm(a @ w.T, ...); the kernels split the tokens by `ratio` to overlap communication with
    compute (the result is the same)."""
    return all_reduce_rms_norm(F.linear(a, w), residual, weight, eps, group, impl, site)


@linear_all_reduce_rms_norm.register_fake
def _(a, w, residual, weight, eps, group, impl, site, ratio):
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


# ------------------------------------------------------------------------------ quantized linears

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ACTS = ("none", "token", "tensor")


def _qdtype(dtype: str) -> torch.dtype:
    if dtype == "int8":
        return torch.int8
    if dtype == "fp8":
        return torch.float8_e4m3fn
    raise ValueError(f"tx.quantize: unknown dtype {dtype!r} (expected 'int8' or 'fp8')")


def quantize_per_row(x: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """Symmetric quantization, one fp32 scale per row (last dim reduced): the definition tx.quantize names."""
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
    return quantize_per_row(x, dtype)


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


def int8_linear_reference(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, act: str) -> Tensor:
    """Plain torch: activations quantized as `act` says, products in fp32 (exact for int8 up to K ~ 1000)."""
    if act not in ACTS:
        raise ValueError(f"tx.int8_linear: act={act!r}; expected one of {', '.join(ACTS)}")
    xf = x.float()
    if act == "token":
        xq, xs = quantize_per_row(xf, "int8")
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


@torch.library.custom_op("fxcc_tx::int8_linear", mutates_args=())
def int8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, act: str, impl: str,
                residual: Tensor | None = None, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """x @ (qweight * wscale[:, None]).T + bias (+ residual) with int8 weights; activations quantized per
    `act`. `residual` is an add the mixed-precision pass folded in (the Triton kernel adds it in its epilogue).
    `rms_eps`: x is first tx.rms_norm(x, norm, rms_eps), a norm the pass folded in (the Triton GEMV applies it;
    norm=None when the pass folded the norm's weight into qweight's input channels)."""
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    y = int8_linear_reference(x, qweight, wscale, bias, act)
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
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    gate, up = int8_linear_reference(x, qweight, wscale, bias, "none").split(qweight.shape[0] // 2, dim=-1)
    return F.silu(gate) * up


@int8_gated_linear.register_fake
def _(x, qweight, wscale, bias, impl, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


@torch.library.custom_op("fxcc_tx::gemv_linear", mutates_args=())
def gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str, residual: Tensor | None = None,
                norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """A decode-shaped linear with a float weight (at most 16 rows of x), the `gemv` pass's form of aten.linear:
    linear(x, weight, bias) (+ residual). `rms_eps`: x is first tx.rms_norm(x, norm, rms_eps). `impl` "triton":
    the GEMV of fxcc.codegen.triton_gemv does all of it in one kernel where it beats the library (measured)."""
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


@gemv_linear.register_fake
def _(x, weight, bias, impl, residual=None, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fxcc_tx::gemv_gated_linear", mutates_args=())
def gemv_gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, impl: str, norm: Tensor | None = None,
                      rms_eps: float | None = None) -> Tensor:
    """silu(gate) * up of one float linear whose rows are the gate's, then the up projection's (weight [2F, K]):
    a merged SwiGLU the `gemv` pass gives the GEMV's epilogue. [.., F]. `rms_eps`: x is first tx.rms_norm."""
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    gate, up = F.linear(x, weight, bias).split(weight.shape[0] // 2, dim=-1)
    return F.silu(gate) * up


@gemv_gated_linear.register_fake
def _(x, weight, bias, impl, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


@torch.library.custom_op("fxcc_tx::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """x @ (qweight * wscale[:, None]).T + bias with e4m3 weights and per-token e4m3 activations."""
    xq, xs = quantize_per_row(x, "fp8")
    y = F.linear(xq.float() * xs.unsqueeze(-1), qweight.float()) * wscale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@fp8_linear.register_fake
def _(x, qweight, wscale, bias, impl):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# ----------------------------------------------------------------------------- int4 weights (W4A16)

# Asymmetric int4 per group of `group` input channels (W4A16): w ~ (q - 8) * scale + zero, q in [0, 15], with
# scale = (max - min) / 15 and zero = min + 8 * scale of each group, both in the activation dtype. Asymmetric
# because a group's 16 levels then span [min, max] (symmetric wastes a level and half the range of a skewed
# group), at the cost of one fused multiply-add per group, and because it is torch's own int4 scheme
# (`_weight_int4pack_mm*`), so the CPU kernel takes the same scales and zeros. `scale_zero` is
# [K / group, N, 2] (scale, zero): torch's `qScaleAndZeros` tensor.
#
# fxcc's packed layout ("fxcc"): uint8 [N, K / 2]. Within each group of G = `group` columns of a row, byte j
# (0 <= j < G/2) holds q[j] in its low nibble and q[j + G/2] in its high nibble. A row's group is G/2
# contiguous bytes (16 bytes at G = 32, four 16-byte vectors at G = 128), and its low nibbles are the first
# half of the group's K range in order, its high nibbles the second half: a kernel loads a [rows, G/2] byte
# tile with 16-byte vectors and multiplies the two nibble tiles by two contiguous slices of x, with no shuffle.
# Another layout ("torch-cpu": `_convert_weight_to_int4pack_for_cpu`'s blocked one) is what the kernel `impl`
# that reads it takes (INT4_LAYOUTS).
INT4_GROUPS = (128, 64, 32)  # group sizes tried, largest first: 128 unless K is not a multiple of it
INT4_LAYOUTS = {"int4pack": "torch-cpu"}  # impl -> the qweight layout it reads; others read "fxcc"


def int4_group(k: int, group: int = 128) -> int | None:
    """The group size for K input channels: `group` if it divides K, else the largest smaller one of
    INT4_GROUPS that does (at least 32: a group is at least one 16-byte vector); None when none divides K."""
    return next((g for g in INT4_GROUPS if g <= group and k % g == 0), None)


def quantize_int4(w: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q int32 [N, K] in [0, 15], scale_zero [K / group, N, 2] in `dtype`): asymmetric int4."""
    n, k = w.shape
    if group not in INT4_GROUPS or k % group:
        raise ValueError(f"int4 quantization: group={group} for K={k}; the group must be one of "
                         f"{INT4_GROUPS} and divide K")
    wg = w.detach().float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    # scale and zero rounded to the activation dtype first, so q is chosen against the values the kernel uses
    scale = scale.to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()
    q = ((wg - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)


def pack_int4(q: Tensor, group: int) -> Tensor:
    """q int [N, K] in [0, 15] -> uint8 [N, K / 2] in fxcc's layout (above)."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // group, 2, group // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(p: Tensor, group: int) -> Tensor:
    """uint8 [N, K / 2] in fxcc's layout -> q uint8 [N, K] in [0, 15]: the inverse of pack_int4."""
    n, half = p.shape
    g = p.reshape(n, 2 * half // group, 1, group // 2)
    return torch.cat([g & 15, g >> 4], 2).reshape(n, 2 * half)


def _eye_rows(lo: int, hi: int, k: int) -> Tensor:
    """Rows lo..hi of the k x k identity (fp32)."""
    e = torch.zeros(hi - lo, k)
    e[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
    return e


def int4_dequantize(qweight: Tensor, scale_zero: Tensor, group: int, impl: str = "ref") -> Tensor:
    """The [N, K] fp32 weight int4 weights stand for, read in the layout kernel `impl` takes."""
    groups, n, two = scale_zero.shape
    if two != 2 or qweight.dim() != 2 or qweight.shape[0] != n or groups * group != 2 * qweight.shape[1]:
        raise ValueError(f"int4 weights: qweight {tuple(qweight.shape)} and scale_zero {tuple(scale_zero.shape)} "
                         f"do not fit group={group} (expected [N, K/2] and [K/group, N, 2])")
    sz = scale_zero.float()
    if INT4_LAYOUTS.get(impl) == "torch-cpu":  # its layout is the library's own: unpacked by the library,
        k = groups * group                      # rows of the identity times W^T, 512 at a time
        return torch.cat([aten._weight_int4pack_mm_for_cpu(_eye_rows(i, min(i + 512, k), k), qweight, group, sz)
                          for i in range(0, k, 512)]).t()
    q = unpack_int4(qweight, group).float().reshape(n, groups, group)
    return ((q - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).reshape(n, groups * group)


def int4_linear_reference(x: Tensor, qweight: Tensor, scale_zero: Tensor, bias: Tensor | None, group: int,
                          impl: str = "ref") -> Tensor:
    """Plain torch: the dequantized weight, products in fp32."""
    y = F.linear(x.float(), int4_dequantize(qweight, scale_zero, group, impl))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("fxcc_tx::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scale_zero: Tensor, bias: Tensor | None, group: int, impl: str,
                residual: Tensor | None = None, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """x @ W.T + bias (+ residual) with W int4 per group of `group` input channels (see quantize_int4; qweight in
    the layout `impl` reads); activations stay in their dtype (W4A16). `residual`, `norm`, `rms_eps`: folds of the
    mixed-precision pass, as tx.int8_linear's."""
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    y = int4_linear_reference(x, qweight, scale_zero, bias, group, impl)
    return y if residual is None else y + residual


@int4_linear.register_fake
def _(x, qweight, scale_zero, bias, group, impl, residual=None, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], scale_zero.shape[1]))


@torch.library.custom_op("fxcc_tx::int4_gated_linear", mutates_args=())
def int4_gated_linear(x: Tensor, qweight: Tensor, scale_zero: Tensor, bias: Tensor | None, group: int, impl: str,
                      norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    """silu(gate) * up of one int4 linear over [gate; up] rows (tx.int8_gated_linear's int4 form). [.., N / 2]."""
    if rms_eps is not None:
        x = rms_norm(x, norm, rms_eps)
    gate, up = int4_linear_reference(x, qweight, scale_zero, bias, group, impl).split(scale_zero.shape[1] // 2, -1)
    return F.silu(gate) * up


@int4_gated_linear.register_fake
def _(x, qweight, scale_zero, bias, group, impl, norm=None, rms_eps=None):
    return x.new_empty((*x.shape[:-1], scale_zero.shape[1] // 2))


# ------------------------------------------------------------------------------------ tx ops (ToMe)

# preference order of edges: padded/padded (free), real/real (cosine in [-1, 1]), real/padded (exact
# move or drop, weight 0 keeps the real value), never the protected first token
_PAD_PAD, _REAL_PAD = 2.0, -3.0


@torch.library.custom_op("fxcc_tx::tome_key_weights", mutates_args=())
def tome_key_weights(keys: Tensor, mask: Tensor | None) -> Tensor:
    """Per-token weights [B, T] (1 real, 0 padding) for keys [B, H, T, Dh] from their attention mask.

    The mask (bool, or additive float) must not vary over heads or queries: a key-padding mask, as encoders
    build it. A causal mask does vary; token merging does not apply to it.
    """
    bsz, tokens = keys.shape[0], keys.shape[-2]
    if mask is None:
        return torch.ones(bsz, tokens, device=keys.device)
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(bsz, m.shape[1], m.shape[2], tokens)
    keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    if not bool((keep == keep[:, :1, :1, :]).all()):
        raise ValueError("fxcc token-merge: the attention mask differs between queries (a causal mask?); "
                         "token merging needs a key-padding mask (encoder models)")
    return keep[:, 0, 0, :].to(torch.float32).contiguous()


@tome_key_weights.register_fake
def _(keys, mask):
    return keys.new_empty((keys.shape[0], keys.shape[-2]), dtype=torch.float32)


@torch.library.custom_op("fxcc_tx::tome_match", mutates_args=())
def tome_match(keys: Tensor, weights: Tensor, r: int, protect_first: bool) -> Tensor:
    """Bipartite soft matching on keys [B, H, T, Dh]: each token's index [B, T] among the T - r merged tokens.

    A = even, B = odd tokens; the r A tokens with the most similar B token merge into it; surviving tokens
    keep their order, so the first token stays first.
    """
    metric = F.normalize(keys.float().mean(1), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    real_a = (weights[:, ::2] > 0)[:, :, None]
    real_b = (weights[:, 1::2] > 0)[:, None, :]
    scores = torch.where(real_a & real_b, scores,
                         torch.where(real_a | real_b, scores.new_tensor(_REAL_PAD), scores.new_tensor(_PAD_PAD)))
    best, best_b = scores.max(dim=-1)
    if protect_first:
        best[:, 0] = -math.inf
    src = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # A indices that merge away
    bsz, t = weights.shape
    keep = torch.ones(bsz, t, dtype=torch.bool, device=keys.device)
    keep.scatter_(1, 2 * src, False)
    rank = keep.long().cumsum(1) - 1
    dst = 2 * best_b.gather(1, src) + 1  # their B partners (always kept)
    return rank.scatter(1, 2 * src, rank.gather(1, dst))


@tome_match.register_fake
def _(keys, weights, r, protect_first):
    return weights.new_empty(weights.shape, dtype=torch.int64)


@torch.library.custom_op("fxcc_tx::tome_merge", mutates_args=())
def tome_merge(x: Tensor, weights: Tensor, dest: Tensor, tokens: int) -> Tensor:
    """Weighted average of the tokens of x [B, T, D] that share a destination: [B, tokens, D].

    Weights are sizes times the padding mask, so padding never enters a real token's average.
    """
    w = weights.to(torch.float32)
    idx = dest[..., None].expand(-1, -1, x.shape[-1])
    total = x.new_zeros((x.shape[0], tokens, x.shape[-1]), dtype=torch.float32)
    total.scatter_add_(1, idx, x.float() * w[..., None])
    norm = w.new_zeros((x.shape[0], tokens)).scatter_add_(1, dest, w)
    return (total / norm.clamp_min(1e-30)[..., None]).to(x.dtype)


@tome_merge.register_fake
def _(x, weights, dest, tokens):
    return x.new_empty((x.shape[0], tokens, x.shape[-1]))


@torch.library.custom_op("fxcc_tx::tome_sizes", mutates_args=())
def tome_sizes(weights: Tensor, dest: Tensor, tokens: int) -> Tensor:
    """Weights [B, tokens] of the merged tokens: their real sizes (0 for merged padding)."""
    return weights.new_zeros((weights.shape[0], tokens)).scatter_add_(1, dest, weights)


@tome_sizes.register_fake
def _(weights, dest, tokens):
    return weights.new_empty((weights.shape[0], tokens))


@torch.library.custom_op("fxcc_tx::tome_compose", mutates_args=())
def tome_compose(pos: Tensor | None, dest: Tensor) -> Tensor:
    """Where each original token sits after one more merge: dest[pos] (dest itself for the first merge)."""
    return dest.clone() if pos is None else dest.gather(1, pos)


@tome_compose.register_fake
def _(pos, dest):
    return dest.new_empty(dest.shape if pos is None else pos.shape)


@torch.library.custom_op("fxcc_tx::tome_bias", mutates_args=())
def tome_bias(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention: log(size) of each key as an additive mask [B, 1, 1, T]; padding -> dtype min."""
    real = weights > 0
    bias = torch.where(real, weights.clamp_min(1).log(), torch.finfo(dtype).min)
    return bias[:, None, None, :].to(dtype)


@tome_bias.register_fake
def _(weights, dtype):
    return weights.new_empty((weights.shape[0], 1, 1, weights.shape[1]), dtype=dtype)


@torch.library.custom_op("fxcc_tx::tome_unmerge", mutates_args=())
def tome_unmerge(x: Tensor, pos: Tensor) -> Tensor:
    """Back to the original tokens [B, T0, D]: each takes the value of the merged token it went into."""
    return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))


@tome_unmerge.register_fake
def _(x, pos):
    return x.new_empty((x.shape[0], pos.shape[1], x.shape[-1]))


# -------------------------------------------------------------------------------- tx ops (temporal)


def _frame_view(x: Tensor, axis: int, frames: int) -> tuple[int, list[int]]:
    """(axis, shape) of x with `axis` split into [frames, tokens per frame] when frames > 0."""
    axis = axis % x.dim()
    shape = list(x.shape)
    if frames > 0:
        if shape[axis] % frames:
            raise ValueError(f"fxcc token-merge temporal: axis {axis} has {shape[axis]} entries, not a multiple "
                             f"of frames={frames}")
        shape[axis:axis + 1] = [frames, shape[axis] // frames]
    return axis, shape


@torch.library.custom_op("fxcc_tx::temporal_merge", mutates_args=())
def temporal_merge(x: Tensor, axis: int, frames: int) -> Tensor:
    """Average each pair of consecutive frames along `axis`: F frames -> F / 2 (TDTM)."""
    ax, shape = _frame_view(x, axis, frames)
    n = shape[ax]
    if n % 2:
        raise ValueError(f"fxcc token-merge temporal: {n} frames along axis {ax}; merging pairs needs an even count")
    y = x.reshape(*shape[:ax], n // 2, 2, *shape[ax + 1:]).mean(ax + 1)
    out = list(x.shape)
    out[ax] //= 2
    return y.reshape(out)


@temporal_merge.register_fake
def _(x, axis, frames):
    out = list(x.shape)
    out[axis % x.dim()] //= 2
    return x.new_empty(out)


@torch.library.custom_op("fxcc_tx::temporal_unmerge", mutates_args=())
def temporal_unmerge(x: Tensor, axis: int, frames: int) -> Tensor:
    """Repeat each merged frame twice along `axis`: F / 2 frames -> F."""
    ax, shape = _frame_view(x, axis, frames // 2 if frames else 0)
    y = x.reshape(shape).repeat_interleave(2, dim=ax)
    out = list(x.shape)
    out[ax] *= 2
    return y.reshape(out)


@temporal_unmerge.register_fake
def _(x, axis, frames):
    out = list(x.shape)
    out[axis % x.dim()] *= 2
    return x.new_empty(out)


# The fake kernel of a tx op is its reference itself, run on FakeTensors: shapes, dtypes and strides recorded
# in the IR are the ones the reference produces (a `view` after it sees the layout it will get).
for _op in (rms_norm, layer_norm, softmax, rotary, gelu, silu, gated_act):
    _op.register_fake(_op._init_fn)


@attention.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """The reference on FakeTensors; where that fails on symbolic sizes (torch before 2.13 cannot pad a mask of
    symbolic length in SDPA's fake kernel), the reference's output layout for the example sizes, given the
    symbolic shape."""
    from .logs import held_back

    with held_back("torch._subclasses.fake_tensor", logging.CRITICAL):  # a failure here is handled, not news
        try:
            return attention._init_fn(q, k, v, mask, scale, is_causal)
        except RuntimeError as e:
            symbolic = [t for t in (q, k, v, mask)
                        if t is not None and any(isinstance(d, torch.SymInt) for d in t.shape)]
            if not symbolic:
                raise
            first = e
        from .ir import hint

        def example(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.new_empty([hint(d) for d in t.shape])

        try:
            out = attention._init_fn(example(q), example(k), example(v), example(mask), scale, is_causal)
        except RuntimeError:  # the example sizes do not fit together either (a size with no hint)
            raise first from None
    order = sorted(range(out.dim()), key=lambda d: -out.stride(d))  # outermost first
    shape = [*q.shape[:-1], v.shape[-1]]
    return q.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(out.dim())])


TX_OPS = {
    "rms_norm": rms_norm, "layer_norm": layer_norm, "softmax": softmax, "attention": attention,
    "rotary": rotary, "gelu": gelu, "silu": silu, "gated_act": gated_act, "all_reduce": all_reduce,
    "all_reduce_rms_norm": all_reduce_rms_norm, "linear_all_reduce_rms_norm": linear_all_reduce_rms_norm,
    "quantize": quantize, "dequantize": dequantize, "int8_linear": int8_linear,
    "int8_gated_linear": int8_gated_linear, "fp8_linear": fp8_linear, "int4_linear": int4_linear,
    "int4_gated_linear": int4_gated_linear, "gemv_linear": gemv_linear, "gemv_gated_linear": gemv_gated_linear,
    "tome_key_weights": tome_key_weights, "tome_match": tome_match, "tome_merge": tome_merge,
    "tome_sizes": tome_sizes, "tome_compose": tome_compose, "tome_bias": tome_bias, "tome_unmerge": tome_unmerge,
    "temporal_merge": temporal_merge, "temporal_unmerge": temporal_unmerge,
}
# ops whose `impl` argument names a kernel registered by a backend: calling their body would bypass it
KERNEL_CHOSEN = {"all_reduce_rms_norm", "linear_all_reduce_rms_norm", "int8_linear", "int8_gated_linear",
                 "fp8_linear", "int4_linear", "int4_gated_linear", "gemv_linear", "gemv_gated_linear"}
# op -> its Python body, for code that calls tx ops without the dispatcher (a kernel costs what eager costs)
REFERENCE = {getattr(torch.ops.fxcc_tx, n).default: op._init_fn for n, op in TX_OPS.items() if n not in KERNEL_CHOSEN}

# ------------------------------------------------------------------------------------- kernel level


@dataclass(frozen=True)
class KernelBody:
    """One kernel: a GraphModule body over aten/tx ops, its kind and its canonical text (the hash input).

    Pure IR, named by `key` (a hash of `text`): what a backend builds for it is a choice its `kernel` op
    records (`Choice`), and what was built belongs to the compiled variant (fxcc.codegen.executable).
    """

    key: str
    kind: str  # pointwise | reduction | gemm | extern
    body: torch.fx.GraphModule
    text: str


# key -> body, written once per key: a key is the hash of the body's text, so an entry never changes and
# every graph naming it (any model, any variant) means the same body, like a function symbol in MLIR
_BODIES: dict[str, KernelBody] = {}


def intern_body(kb: KernelBody) -> KernelBody:
    """The body registered under kb.key: `kb` itself the first time, the (identical) earlier one after."""
    return _BODIES.setdefault(kb.key, kb)


def kernel_body(key: str) -> KernelBody:
    """The body a kernel op names; RuntimeError when no graph of this process lowered it."""
    try:
        return _BODIES[key]
    except KeyError:
        raise RuntimeError(f"fxcc: kernel {key!r} is not registered in this process; a graph holding "
                           "kernel ops can only run where it was lowered (recompile the model)") from None


@dataclass(frozen=True)
class Choice:
    """What the codegen decision chose for a kernel op, kept as the op's attributes: the candidate's label
    (`backend`: tvm, tvm+onednn, mkl, ...), the backend module that makes it, its parameters, and the
    artifact-cache key of the choice ("" when it is not cached)."""

    backend: str
    module: str
    params: dict = field(default_factory=dict)
    key: str = ""

    def attrs(self) -> tuple[str, str, str, str]:
        return self.backend, self.module, json.dumps(self.params, sort_keys=True), self.key


def choice_of(node: fx.Node) -> Choice | None:
    """The choice a kernel op's attributes record, or None before the codegen decision ran."""
    if len(node.args) < 4 or not node.args[2]:
        return None
    backend, module, params, key = (list(node.args[2:6]) + [""] * 4)[:4]
    return Choice(backend, module, json.loads(params) if params else {}, key)


def set_choice(node: fx.Node, choice: Choice) -> None:
    """Write `choice` as the attributes of kernel op `node`."""
    node.args = (node.args[0], node.args[1], *choice.attrs())


def strided_copy(t: Tensor, stride: tuple[int, ...]) -> Tensor:
    """`t`'s values in a fresh tensor with `stride`: a dense or gapped layout, or one with broadcast (stride-0)
    dimensions, whose values are alike along them (one slice of memory holds them)."""
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    at = tuple(0 if s == 0 and n > 1 else slice(None) for n, s in zip(t.shape, stride))
    out[at].copy_(t[at])
    return out


def same_strides(t: Tensor, stride: tuple[int, ...]) -> bool:
    """Whether `t` has `stride` where it matters (dimensions of size above 1)."""
    return all(n <= 1 or a == b for n, a, b in zip(t.shape, t.stride(), stride))


def dense_order(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...] | None:
    """The memory order of dims (outermost first) if `stride` is a permutation of a contiguous layout (NHWC's
    is (0, 2, 3, 1)), else None."""
    order = tuple(sorted(range(len(shape)), key=lambda d: (-stride[d], d)))
    expect = 1
    for d in reversed(order):
        if shape[d] != 1 and stride[d] != expect:
            return None
        expect *= shape[d]
    return order


def _detach_aliases(inputs: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    # custom ops may not return an input (or a view of one) as an output: a copy with the same layout
    ids = {id(t) for t in inputs}
    return [strided_copy(o, o.stride()) if id(o) in ids or o._base is not None else o for o in outs]


def _outputs_like(inputs: list[Tensor], kernel: str, backend: str = "", module: str = "", params: str = "",
                  key: str = "") -> list[Tensor]:
    """The stride contract: a kernel's outputs have the shapes, dtypes and strides its body computes."""
    return [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
            for o in kernel_body(kernel).body(*inputs)]


@torch.library.custom_op("fxcc_kernel::fused", mutates_args=())
def fused(inputs: list[Tensor], kernel: str, backend: str = "", module: str = "", params: str = "",
          key: str = "") -> list[Tensor]:
    """A fused group of pointwise/reduction/gemm ops, generated as one kernel by a backend. Run as an op, the
    body runs as written; the compiled variant calls what its backend built for the chosen `backend`."""
    return _detach_aliases(inputs, list(kernel_body(kernel).body(*inputs)))


fused.register_fake(_outputs_like)


@torch.library.custom_op("fxcc_kernel::extern", mutates_args=())
def extern(inputs: list[Tensor], kernel: str, backend: str = "", module: str = "", params: str = "",
           key: str = "") -> list[Tensor]:
    """One op run by a library (torch, cuBLAS, oneDNN) rather than generated code."""
    return _detach_aliases(inputs, list(kernel_body(kernel).body(*inputs)))


extern.register_fake(_outputs_like)


KERNEL_OPS = (torch.ops.fxcc_kernel.fused.default, torch.ops.fxcc_kernel.extern.default)


def op_name(target: Any) -> str:
    """Dialect-qualified name of a call target: 'tx.rms_norm', 'aten.add.Tensor', 'kernel.fused'."""
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        ns = {"fxcc_tx": "tx", "fxcc_kernel": "kernel"}.get(ns, ns)
        base = target._schema.name.split("::", 1)[1]
        ov = target._overloadname
        return f"{ns}.{base}" if ov == "default" else f"{ns}.{base}.{ov}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if mod in ("_operator", "operator"):
        return f"py.{name}"
    return f"{mod}.{name}" if mod else name


def dialect_of(target: Any) -> str:
    return op_name(target).split(".", 1)[0]


# ------------------------------------------------------------------------ what each op is, to lowering

tx = torch.ops.fxcc_tx
GEMM = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default,
        aten.baddbmm.default}
# convolutions run in the library like GEMMs, with what follows them fused as a generated epilogue
CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
        aten.conv3d.padding, aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
        aten.conv_transpose3d.input}
ANCHORS = GEMM | CONV
REDUCTION = {tx.rms_norm.default, tx.layer_norm.default, tx.softmax.default, aten.softmax.int,
             aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default, aten.layer_norm.default,
             aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
             aten.amin.default, aten.var.correction, aten.max.dim, aten.min.dim}
POINTWISE_TX = {tx.gelu.default, tx.silu.default, tx.gated_act.default, tx.rotary.default}
POINTWISE_EXTRA = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default,
                   aten.contiguous.default, aten.type_as.default, aten.alias.default}


# reads of a tensor's size (or, under torch.compile with dynamic floats, of a 0-d tensor's value)
_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
             aten.item.default, aten._local_scalar_dense.default}
_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def is_size(node: fx.Node) -> bool:
    """A size computation: reads a tensor's size (or a 0-d tensor's value), or does Python arithmetic on
    sizes (SymInt values). Sizes stay outside kernels; a kernel recomputes the ones it needs."""
    if node.op != "call_function" or not isinstance(node.meta.get("val"), _SCALARS):
        return False
    t = node.target
    if t in _SIZE_OPS:
        return True
    module = getattr(t, "__module__", None) or ""
    return (module in ("_operator", "operator", "math") or t in (torch.sym_max, torch.sym_min, torch.sym_float,
                                                                 torch.sym_int, torch.sym_not, math.ceil)) and \
        all(is_size(i) for i in node.all_input_nodes)


def classify(node: fx.Node) -> tuple[str, str]:
    """(category, reason): category is gemm | reduction | pointwise | view | extern | eager | size."""
    if is_size(node):
        return "size", ""
    if node.meta.get("fxcc_eager"):
        return "eager", node.meta["fxcc_eager"]
    if node.op != "call_function":
        return "eager", f"{node.op} {node.target!r} is not an op fxcc lowers"
    t = node.target
    if t is operator.getitem:
        return "view", ""
    if not isinstance(t, torch._ops.OpOverload):
        return "eager", f"Python call {op_name(t)} is not an op fxcc lowers"
    if t.namespace not in ("aten", "fxcc_tx", "prims"):
        return "eager", f"{op_name(t)} is not an aten/tx op; fxcc has no lowering for it"
    if t._schema.is_mutable:
        return "eager", f"{op_name(t)} mutates its inputs"
    if draws_random(node):
        return "eager", f"{op_name(t)} draws random numbers (run by torch, in eager's order: it draws what eager draws)"
    if _data_dependent(node):
        return "eager", f"{op_name(t)} has sizes that depend on tensor values (known only at run time)"
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return "extern", ""  # multi-output ops
    if t in ANCHORS:
        return "gemm", ""
    if t in REDUCTION:
        return "reduction", ""
    if t in POINTWISE_TX or t in POINTWISE_EXTRA or torch.Tag.pointwise in t.tags or (t in gather.OPS
                                                                                       and gather.generated(node)):
        return "pointwise", ""
    if any(r.alias_info is not None for r in t._schema.returns) or t in (aten.reshape.default, aten.flatten.using_ints):
        return "view", ""
    return "extern", ""


def _data_dependent(node: fx.Node) -> bool:
    """Whether the node reads or makes a value whose size is data-dependent (an unbacked symbol: after
    `nonzero`, `item`, a split by computed sizes). Kernels are built for sizes known at compile time. A symbolic
    float argument (unbacked too: export guards nothing on it) is a value a kernel takes, not a size."""
    vals = [node.meta.get("val"), *(a.meta.get("val") for a in node.all_input_nodes)]
    return any(free_unbacked_symbols(v) for v in vals if v is not None and not isinstance(v, torch.SymFloat))


def domain(node: fx.Node) -> tuple | None:
    """(input shape, reduced dims) of a reduction: two reductions over one domain share their loops (a
    softmax's max and sum, a norm's mean and variance), so they may share a kernel. None when unknown."""
    t, x = node.target, node.args[0] if node.args else None
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    rank = v.dim()
    if t is tx.rms_norm.default:
        dims = [rank - 1]
    elif t in (tx.layer_norm.default, aten.layer_norm.default):
        dims = list(range(rank - len(node.args[1]), rank))
    elif t in (tx.softmax.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
               aten._log_softmax.default):
        dims = [node.args[1]]
    elif t in (aten.sum.default, aten.mean.default):
        dims = list(range(rank))
    elif t in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction):
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(rank)) if not d else [d] if isinstance(d, int) else list(d)
    else:
        return None
    # symbolic sizes by their expression: a domain is compared and hashed, which a SymInt refuses
    shape = tuple(s if isinstance(s, int) else str(s) for s in v.shape)
    return shape, tuple(sorted(d % rank for d in dims))
