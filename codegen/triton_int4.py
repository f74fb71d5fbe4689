"""W4A16 GEMV (decode, M <= 16) and small-batch GEMM: int4 weights dequantized in registers (GPU; CPU via the
interpreter).

y[M, N] = x[M, K] @ W[N, K]^T with W = (q - 8) * scale + zero per group of G input channels
(fxcc.dialects.quantize_int4; scale_zero [K / G, N, 2] in x's dtype). The weight is in fxcc's int4 layout
(fxcc.dialects.pack_int4): a row's group is G / 2 contiguous bytes whose low nibbles are the group's first G / 2
channels and whose high nibbles its last G / 2. Each program streams GPB groups a step, a [BLOCK_N, G / 2]
byte tile each (16-byte vectors along K; the GPB loads are independent and issued together, and the pipeliner
prefetches whole steps), turns each nibble into a float and multiplies the two nibble tiles by the two halves of
the group's x tile (the dot's right operand: "swap AB", as the int8 GEMV of triton_gemv.py). The group's scale
and zero are applied to the dot's [BLOCK_N, BLOCK_M] result, not to every weight element:
sum_k x_k ((q_k - 8) s + z) = s * dot(q - 8, x) + z * sum_k x_k, so dequantization costs two multiply-adds per
output per group, and the group's sums of x come from a dot with a tile of ones (tensor cores, no barrier).

With two weights a byte, Triton's own conversion (CVT 0: int32, the quarter-rate int-to-float unit, fp32 -> 16
bits, per weight) costs per byte of weight twice what the int8 GEMV's does. CVT 1 and 2 convert by bits: the
nibble goes under the exponent of MAGIC (128 in bf16, 1024 in fp16: MAGIC + q is exact) with an and and an or,
in plain Triton (1) or in PTX on four bytes a time (2, GPU only); the dot then sees MAGIC + q for q - 8, and
s * (MAGIC + 8) * sum_k x_k comes off with the zero (OFF; fp32 x subtracts 2^23 + 8 instead: exact).

Epilogues as the int8 GEMV's (its `_epilogue`, through its `_finish`): bias, silu(gate) * up of a merged gate/up
weight (GLU), a residual add, and an RMSNorm of x (NORM: squares summed as x streams, 1 / rms scales the
accumulator; the norm's weight folded into W by the pass, or multiplying the x tiles: GAMMA). SPLIT > 1 splits
the groups over SPLIT programs per column block (partial sums meet in the int8 GEMV's fp32 workspace, by its
`_finish`; the last program applies the epilogue and empties it). A third grid axis over blocks of BLOCK_M rows
makes it the small-batch GEMM.
Configs are chosen per shape by measurement on the GPU at the first call (checked against the reference first,
then timed in CUDA graphs over weight copies larger than the L2); under the interpreter the first is used.

Two other inner loops are options of a config (its eighth field, LOOP; int4_linear's list holds the loop above, 0,
alone until a GPU sweep, benchmarks/int4_sweep.py, says otherwise). In loop 0 Triton's pipeliner prefetches the
weight only: x (two dots read it with different operand layouts) and the scales (2-byte loads that feed the
accumulator, not a dot) are loaded in the loop body, so every step waits out a memory latency for them (the LDGs in
its loop, benchmarks/gemv_sass.py). Loop 1 (DEQUANT) dequantizes (q - 8) * s + z in registers in x's type (MAGIC + q
less MAGIC + 8 is exact, then one packed multiply-add a pair of weights) and feeds that to the dot: one dot a half
onto the accumulator, no sums of x, no rescaling, and every load (weight, x in tiles of 8 or 16 rows, scale-zero
pairs as 32-bit words) feeds a dot operand, so all are prefetched. Loop 2 (_w4_fma) uses the CUDA cores: weight words
dequantized to fp32 by bits in the load's own layout, x read in that same layout, one FMA a weight and row of x, and
M=1 is not padded to an MMA tile.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl
from fxcc.codegen import triton_gemv as tg
from fxcc.codegen.launch import ReadOnly
from fxcc.codegen.triton_gemv import _finish
from fxcc.dialects import int4_dequantize
from fxcc.measure import pinned_by
from fxcc.options import settings
from torch import Tensor

log = logging.getLogger(__name__)


def _nibbles_asm(magic: int, high: bool) -> str:
    """The PTX of `_nibbles_ptx` for a MAGIC byte repeated in a register (0x43: bf16 128, 0x64: fp16 1024): two
    prmt place bytes 0-1 (then 2-3) of the input (shifted right by 4 for the high nibbles) under that byte, an and
    keeps the nibble and MAGIC's byte."""
    src = "s" if high else "$2"
    return ("{\n.reg .b32 s, t, m;\n"
            f"mov.b32 m, {magic:#010x};\n"
            + ("shr.b32 s, $2, 4;\n" if high else "")
            + f"prmt.b32 t, {src}, m, 0x5140;\nand.b32 $0, t, 0xFF0FFF0F;\n"
            f"prmt.b32 t, {src}, m, 0x5342;\nand.b32 $1, t, 0xFF0FFF0F;\n}}")


_BF16_LOW, _BF16_HIGH = tl.constexpr(_nibbles_asm(0x43434343, False)), tl.constexpr(_nibbles_asm(0x43434343, True))
_FP16_LOW, _FP16_HIGH = tl.constexpr(_nibbles_asm(0x64646464, False)), tl.constexpr(_nibbles_asm(0x64646464, True))


@triton.jit
def _nibbles_ptx(w, dtype: tl.constexpr, HIGH: tl.constexpr):
    """A uint8 tile -> its low (HIGH: high) nibbles q as MAGIC + q in bf16 / fp16 (MAGIC 128 / 1024), by bits
    alone, two weights an instruction pair: for 4 bytes at a time (one register), prmt puts bytes 0 and 1 (then 2
    and 3) under MAGIC's upper byte in two 16-bit halves, and an and keeps the nibble and that byte (HIGH: the
    register shifted by 4 first). q <= 15 fits in MAGIC's mantissa. No integer-to-float conversion (a
    quarter-rate unit, used twice per byte by Triton's own path); the kernel takes the MAGIC + 8 off through the
    zero term (OFF). GPU only (the interpreter cannot run PTX)."""
    if dtype == tl.bfloat16:
        if HIGH:
            return tl.inline_asm_elementwise(asm=_BF16_HIGH, constraints="=r,=r,r", args=[w], dtype=tl.bfloat16,
                                             is_pure=True, pack=4)
        return tl.inline_asm_elementwise(asm=_BF16_LOW, constraints="=r,=r,r", args=[w], dtype=tl.bfloat16,
                                         is_pure=True, pack=4)
    else:  # an else, not a fall-through: Triton types the returns of a constexpr branch alone only so
        if HIGH:
            return tl.inline_asm_elementwise(asm=_FP16_HIGH, constraints="=r,=r,r", args=[w], dtype=tl.float16,
                                             is_pure=True, pack=4)
        return tl.inline_asm_elementwise(asm=_FP16_LOW, constraints="=r,=r,r", args=[w], dtype=tl.float16,
                                         is_pure=True, pack=4)


@triton.jit
def _nibble(q, dtype: tl.constexpr, CVT: tl.constexpr):
    """Nibble values q in [0, 15] (uint8) -> the dot's type. CVT 0: q - 8 through int32 and fp32 (Triton's
    conversions); 1: by bits, MAGIC + q (bf16 / fp16, MAGIC 128 / 1024: the kernel takes MAGIC + 8 off through the
    zero term) or, for fp32, 2^23 + q less 2^23 + 8 (exact)."""
    if CVT == 0:
        return (q.to(tl.int32) - 8).to(tl.float32).to(dtype)
    elif dtype == tl.float32:
        return (q.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    elif dtype == tl.bfloat16:
        return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        return (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _nibbles(w, dtype: tl.constexpr, CVT: tl.constexpr):
    """A uint8 tile -> (low, high) nibble tiles in `dtype`: q - 8, or MAGIC + q (see _nibble, _nibbles_ptx)."""
    if CVT == 2:
        return _nibbles_ptx(w, dtype, False), _nibbles_ptx(w, dtype, True)
    return _nibble(w & 15, dtype, CVT), _nibble(w >> 4, dtype, CVT)


@triton.jit
def _group_dot(wl, wh, xl, xh, IEEE: tl.constexpr):
    """wl @ xl + wh @ xh, the second accumulating onto the first."""
    if IEEE:
        return tl.dot(wh, xh, tl.dot(wl, xl, input_precision="ieee"), input_precision="ieee")
    return tl.dot(wh, xh, tl.dot(wl, xl))


@triton.jit
def _group_dot_acc(wl, wh, xl, xh, acc, IEEE: tl.constexpr):
    """acc + wl @ xl + wh @ xh, accumulated by the MMA itself."""
    if IEEE:
        return tl.dot(wh, xh, tl.dot(wl, xl, acc, input_precision="ieee"), input_precision="ieee")
    return tl.dot(wh, xh, tl.dot(wl, xl, acc))


@triton.jit
def _scale_zero(sz_ptr, pair, mask, EVEN_N: tl.constexpr):
    """The scales and zeros at pair indices `pair` (group * NT + row) of scale_zero, two tensors of pair's shape
    in scale_zero's dtype. A 16-bit pair is read as one 32-bit word: a load the software pipeliner prefetches
    (it leaves loads under 4 bytes a thread in the loop, where each waits out a memory latency), split by bits."""
    sz_ty: tl.constexpr = sz_ptr.dtype.element_ty
    if sz_ty == tl.float32:
        if EVEN_N:
            return tl.load(sz_ptr + 2 * pair), tl.load(sz_ptr + 2 * pair + 1)
        return tl.load(sz_ptr + 2 * pair, mask=mask, other=0.0), tl.load(sz_ptr + 2 * pair + 1, mask=mask, other=0.0)
    else:
        u = _words(sz_ptr, pair, mask, EVEN_N)
        return ((u & 0xFFFF).to(tl.uint16).to(sz_ty, bitcast=True),
                (u >> 16).to(tl.uint16).to(sz_ty, bitcast=True))


@triton.jit
def _words(sz_ptr, pair, mask, EVEN_N: tl.constexpr):
    """16-bit scale-zero pairs as 32-bit words (scale in the low half)."""
    p = sz_ptr.to(tl.pointer_type(tl.uint32), bitcast=True) + pair
    if EVEN_N:
        return tl.load(p)
    return tl.load(p, mask=mask, other=0)


@triton.jit
def _dequant(w, sc, ze, dtype: tl.constexpr, CVT: tl.constexpr, OFF: tl.constexpr):
    """A uint8 tile [BLOCK_N, G / 2] -> its (low, high) nibble weights (q - 8) * s + z in `dtype` (the dot's type):
    MAGIC + q less MAGIC + 8 is exact in bf16 / fp16 (OFF), then one multiply-add (a packed one for two weights)
    rounds once to x's type."""
    wl, wh = _nibbles(w, dtype, CVT)
    if OFF != 0.0:
        wl = wl - OFF
        wh = wh - OFF
    s = sc.to(dtype)[:, None]
    z = ze.to(dtype)[:, None]
    return wl * s + z, wh * s + z


@triton.jit
def _rows(ptrs, n_ok, EVEN_N: tl.constexpr):
    """A [BLOCK_N, ...] tile of rows, masked where the block runs past N (EVEN_N: it never does)."""
    if EVEN_N:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=n_ok[:, None], other=0)


@triton.jit
def _w4(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr, g_ptr, ss_ptr, eps, M, N, NT, K, G_PER,
        sxm, sxk, swn, srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
        NORM: tl.constexpr, GAMMA: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr, CVT: tl.constexpr,
        OFF: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr = False):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.arange(0, HALF)
    n_ok = rn < N
    m_ok = rm < M
    g_lo = pid_k * G_PER
    w_ptrs = w_ptr + rn[:, None] * swn + (g_lo * HALF + rh)[None, :]
    x_ptrs = x_ptr + rm[None, :] * sxm + (g_lo * GROUP + rh)[:, None] * sxk
    # [K / G, NT, 2]: a row's scale and zero of one group are one 4-byte (8-byte in fp32) vector
    s_ptrs = sz_ptr + g_lo * NT * 2 + rn[:, None] * 2 + tl.arange(0, 2)[None, :]
    ones = tl.full((BLOCK_N, HALF), 1.0, x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = acc
    ssq = tl.zeros((HALF, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, G_PER, GPB):
        for gi in tl.static_range(GPB):  # GPB groups a step: their loads issued together
            w = _rows(w_ptrs + gi * HALF, n_ok, EVEN_N)
            if GLU:  # the up rows [N, 2N) of the same columns
                wu = _rows(w_ptrs + gi * HALF + N * swn, n_ok, EVEN_N)
            xl = tl.load(x_ptrs + gi * GROUP * sxk, mask=m_ok[None, :], other=0.0)
            xh = tl.load(x_ptrs + (gi * GROUP + HALF) * sxk, mask=m_ok[None, :], other=0.0)
            if NORM:  # RMSNorm of x: squares summed here, 1 / rms after the loop
                xlf = xl.to(tl.float32)
                xhf = xh.to(tl.float32)
                ssq += xlf * xlf + xhf * xhf
                if GAMMA:  # the norm's weight, unless the pass folded it into the weight
                    k0 = (g_lo + g0 + gi) * GROUP
                    xl = (xlf * tl.load(g_ptr + k0 + rh).to(tl.float32)[:, None]).to(xl.dtype)
                    xh = (xhf * tl.load(g_ptr + k0 + HALF + rh).to(tl.float32)[:, None]).to(xh.dtype)
            if DEQUANT:  # (q - 8) * s + z in registers: one dot a half onto the accumulator, no sums of x
                sc, ze = _scale_zero(sz_ptr, (g_lo + g0 + gi) * NT + rn, n_ok, EVEN_N)
                wl, wh = _dequant(w, sc, ze, xl.dtype, CVT, OFF)
                acc = _group_dot_acc(wl, wh, xl, xh, acc, IEEE)
                if GLU:
                    su, zu = _scale_zero(sz_ptr, (g_lo + g0 + gi) * NT + rn + N, n_ok, EVEN_N)
                    ul, uh = _dequant(wu, su, zu, xl.dtype, CVT, OFF)
                    acc_u = _group_dot_acc(ul, uh, xl, xh, acc_u, IEEE)
            else:
                # the group's sums of x, in the accumulator's layout (every row alike): on the tensor cores, which
                # have time to spare, not a cross-warp reduction with a barrier per group
                xs = _group_dot(ones, ones, xl, xh, IEEE)
                wl, wh = _nibbles(w, xl.dtype, CVT)
                sc, ze = tl.split(_rows(s_ptrs + gi * NT * 2, n_ok, EVEN_N).to(tl.float32))
                acc += _group_dot(wl, wh, xl, xh, IEEE) * sc[:, None] + (ze - OFF * sc)[:, None] * xs
                if GLU:
                    ul, uh = _nibbles(wu, xl.dtype, CVT)
                    su, zu = tl.split(_rows(s_ptrs + gi * NT * 2 + 2 * N, n_ok, EVEN_N).to(tl.float32))
                    acc_u += _group_dot(ul, uh, xl, xh, IEEE) * su[:, None] + (zu - OFF * su)[:, None] * xs
        w_ptrs += GPB * HALF
        x_ptrs += GPB * GROUP * sxk
        s_ptrs += GPB * NT * 2
    # one block of rows when split (the launcher checks): the int8 GEMV's workspace protocol
    _finish(acc, acc_u, tl.sum(ssq, axis=0), rn, rm, n_ok, m_ok, pid_n, M, N, K, eps, sz_ptr, b_ptr, r_ptr,
            y_ptr, acc_ptr, cnt_ptr, ss_ptr, srm, srn, sym, syn, HAS_BIAS, HAS_RES, GLU, NORM, False, SPLIT,
            BLOCK_N, BLOCK_M)


@triton.jit
def _units(w, j: tl.constexpr, HIGH: tl.constexpr, CVT: tl.constexpr):
    """Nibble j of each byte's low (HIGH: high) half of uint32 weight words: CVT 0, q - 8 by Triton's conversions;
    1, the fp32 1 + q / 16 by bits: a shift puts the nibble under the exponent of 1.0 and an and-or (one LOP3) keeps
    it there, two instructions a weight."""
    sh: tl.constexpr = 8 * j + 4 * HIGH
    if CVT == 0:
        return ((w >> sh) & 15).to(tl.int32).to(tl.float32) - 8.0
    if sh <= 19:
        t = w << (19 - sh)
    else:
        t = w >> (sh - 19)
    return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _fours(ptr, offs4, mask, j: tl.constexpr, MASKED: tl.constexpr):
    """Element 4 * offs4 + j of a 16-bit or fp32 vector as fp32. 16-bit values are read four at a time as one
    64-bit word (one 16-byte load a thread covers the 8 that meet a thread's 16 weight bytes), and split by bits."""
    ty: tl.constexpr = ptr.dtype.element_ty
    if ty == tl.float32:
        if MASKED:
            return tl.load(ptr + 4 * offs4 + j, mask=mask, other=0.0)
        return tl.load(ptr + 4 * offs4 + j)
    else:
        p = ptr.to(tl.pointer_type(tl.uint64), bitcast=True) + offs4
        if MASKED:
            v = tl.load(p, mask=mask, other=0)
        else:
            v = tl.load(p)
        h = ((v >> (16 * j)) & 0xFFFF).to(tl.uint32)
        if ty == tl.bfloat16:
            return (h << 16).to(tl.float32, bitcast=True)
        return h.to(tl.uint16).to(ty, bitcast=True).to(tl.float32)


@triton.jit
def _step_w(w_ptrs, sz_ptr, pair, mask, EVEN: tl.constexpr):
    """A step's weight words [BLOCK_N, GPB, G / 8] and their scales and zeros in fp32 (`pair` and `mask` of the same
    shape, alike along the last dim: Triton gives the three loads one layout, no transpose between them)."""
    if EVEN:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=mask, other=0)
    sc, ze = _scale_zero(sz_ptr, pair, mask, EVEN)
    return w, sc.to(tl.float32), ze.to(tl.float32)


@triton.jit
def _w4_fma(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr, g_ptr, ss_ptr, eps, M, N, NT, K, G_PER,
            sxm, sxk, swn, srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
            NORM: tl.constexpr, GAMMA: tl.constexpr, EVEN_N: tl.constexpr, CVT: tl.constexpr, SPLIT: tl.constexpr,
            GROUP: tl.constexpr, GPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            STAGES: tl.constexpr, EVEN_M: tl.constexpr):
    """The decode GEMV on the CUDA cores, no tl.dot (x contiguous along K, its row stride a multiple of 4). A step's
    GPB groups are one [BLOCK_N, GPB, G / 8] tile of 32-bit words (4 bytes: 4 low and 4 high nibbles), dequantized
    to fp32 in the load's own layout, nibble by nibble, and multiplied by the x values they meet, read as 64-bit words
    (4 values) in tiles of the same shape whose rows are alike: same shape and order as the weight's, so Triton gives
    both one layout (16 bytes a thread along K) and no shared-memory transpose or barrier comes between them. No
    padding of M to an MMA tile. STAGES 1: a step's loads are issued together and waited for in the loop, other
    warps hide them; 2: the next step's weight and scale words are loaded into registers while this one computes.
    BLOCK_M == 1: the products accumulate elementwise over the program's K range and are summed across threads once,
    after the loop; more rows: each row's products are summed per step."""
    HALF: tl.constexpr = GROUP // 2
    Q: tl.constexpr = HALF // 4
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_M)
    rm = pid_m * BLOCK_M + rb
    rg = tl.arange(0, GPB)[None, :, None]
    rq = tl.arange(0, Q)[None, None, :]
    n_ok = rn < N
    m_ok = rm < M
    g_lo = pid_k * G_PER
    w_ptrs = w_ptr.to(tl.pointer_type(tl.uint32), bitcast=True) + rn[:, None, None] * (swn // 4) + (g_lo + rg) * Q + rq
    rows = tl.zeros((BLOCK_N, GPB, Q), dtype=tl.int32)  # tiles alike along a dim
    x4 = rows + (g_lo + rg) * (GROUP // 4) + rq  # x's low halves, in fours (+ Q: high halves); rows alike
    # scale-zero pairs, alike along the last dim; contiguous along the rows, but said not to be, so that Triton lays
    # the load out as the weight's (its order follows the most contiguous dim) instead of transposing it every step
    pair = tl.max_contiguous(rows + (g_lo + rg) * NT + rn[:, None, None], [1, 1, 1])
    sz_ok = (rows + rn[:, None, None]) < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = acc
    ss2 = acc  # BLOCK_M > 1 and NORM: sums of squares of x, a column a row of x (every row of the tile alike)
    prod = tl.zeros((BLOCK_N, GPB, Q), dtype=tl.float32)  # BLOCK_M == 1: products, summed after the loop
    prod_u = prod
    sq = prod  # BLOCK_M == 1 and NORM: squares of x (every row alike)
    if STAGES == 2:  # the first step's weights, ahead of the loop
        w_nx, s_nx, z_nx = _step_w(w_ptrs, sz_ptr, pair, sz_ok, EVEN_N)
        if GLU:
            wu_nx, su_nx, zu_nx = _step_w(w_ptrs + N * (swn // 4), sz_ptr, pair + N, sz_ok, EVEN_N)
    for _ in range(0, G_PER, GPB):
        if STAGES == 2:  # this step's from the last; the next step's loads issued before this one computes
            w, s, z = w_nx, s_nx, z_nx
            more = sz_ok & (pair + GPB * NT < (g_lo + G_PER) * NT)  # the next step is this program's
            w_nx, s_nx, z_nx = _step_w(w_ptrs + GPB * Q, sz_ptr, pair + GPB * NT, more, False)
            if GLU:
                wu, su, zu = wu_nx, su_nx, zu_nx
                wu_nx, su_nx, zu_nx = _step_w(w_ptrs + GPB * Q + N * (swn // 4), sz_ptr, pair + GPB * NT + N, more,
                                              False)
        else:
            w, s, z = _step_w(w_ptrs, sz_ptr, pair, sz_ok, EVEN_N)
            if GLU:  # the up rows [N, 2N) of the same columns
                wu, su, zu = _step_w(w_ptrs + N * (swn // 4), sz_ptr, pair + N, sz_ok, EVEN_N)
        if CVT != 0:  # (1 + q / 16) * 16 s + (z - 24 s) = (q - 8) * s + z: one multiply-add a weight
            z = z - 24.0 * s
            s = 16.0 * s
            if GLU:
                zu = zu - 24.0 * su
                su = 16.0 * su
        for m in tl.static_range(BLOCK_M):
            row = (pid_m * BLOCK_M + m) * (sxm // 4)
            row_ok = rows + pid_m * BLOCK_M + m < M
            t = tl.zeros((BLOCK_N, GPB, Q), dtype=tl.float32)
            t_u = t
            t_s = t
            for j in tl.static_range(4):
                xl = _fours(x_ptr, row + x4, row_ok, j, not EVEN_M)
                xh = _fours(x_ptr, row + x4 + Q, row_ok, j, not EVEN_M)
                if NORM:  # RMSNorm of x: squares summed here, 1 / rms after the loop
                    if BLOCK_M == 1:
                        sq += xl * xl
                        sq += xh * xh
                    else:
                        t_s += xl * xl
                        t_s += xh * xh
                    if GAMMA:  # the norm's weight, unless the pass folded it into the weight
                        xl = xl * _fours(g_ptr, x4, row_ok, j, False)
                        xh = xh * _fours(g_ptr, x4 + Q, row_ok, j, False)
                wl = _units(w, j, False, CVT) * s + z
                wh = _units(w, j, True, CVT) * s + z
                if BLOCK_M == 1:  # separate statements: each a multiply-add, not a multiply and an add
                    prod += wl * xl
                    prod += wh * xh
                else:
                    t += wl * xl
                    t += wh * xh
                if GLU:
                    ul = _units(wu, j, False, CVT) * su + zu
                    uh = _units(wu, j, True, CVT) * su + zu
                    if BLOCK_M == 1:
                        prod_u += ul * xl
                        prod_u += uh * xh
                    else:
                        t_u += ul * xl
                        t_u += uh * xh
            if BLOCK_M > 1:
                sel = rb[None, :] == m
                acc += tl.where(sel, tl.sum(tl.sum(t, axis=2), axis=1)[:, None], 0.0)
                if GLU:
                    acc_u += tl.where(sel, tl.sum(tl.sum(t_u, axis=2), axis=1)[:, None], 0.0)
                if NORM:
                    ss2 += tl.where(sel, tl.sum(tl.sum(t_s, axis=2), axis=1)[:, None], 0.0)
        w_ptrs += GPB * Q
        x4 += GPB * (GROUP // 4)
        pair += GPB * NT
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(prod, axis=2), axis=1)[:, None]
        acc_u = tl.sum(tl.sum(prod_u, axis=2), axis=1)[:, None]
        ssq = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.sum(tl.sum(tl.sum(sq, axis=2), axis=1), axis=0) / BLOCK_N
    else:
        ssq = tl.sum(ss2, axis=0) / BLOCK_N
    _finish(acc, acc_u, ssq, rn, rm, n_ok, m_ok, pid_n, M, N, K, eps, sz_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr,
            ss_ptr, srm, srn, sym, syn, HAS_BIAS, HAS_RES, GLU, NORM, False, SPLIT, BLOCK_N, BLOCK_M)


# (BLOCK_N, SPLIT, BLOCK_M, GPB: groups a step, num_warps, num_stages, CVT: nibble conversion, see _nibble), and
# optionally LOOP (absent: 0), the inner loop: 0 the MMA on nibbles, scale and zero applied to its result with the
# group's sums of x (a second dot with ones); 1 the MMA on weights dequantized in registers (DEQUANT of _w4); 2 the
# CUDA cores, no MMA (_w4_fma: num_stages 1 loads each step in the loop, 2 prefetches the next into registers)
Config = tuple[int, ...]
LOOPS = {0: "mma", 1: "mma-dequant", 2: "fma"}
_BEST: dict[tuple, Config] = {}
_DEFAULT: dict[tuple, Config] = {}  # under a plan: each problem's first candidate
TIMES: dict[tuple, dict] = {}  # problem key -> {config: us}, what the choice was made from (benchmark logs)


def configs(M: int, K: int, N: int, group: int, glu: bool = False, cvts: tuple[int, ...] = (1,),
            broad: bool = False, loops: tuple[int, ...] = (0,), narrow: bool = False) -> list[Config]:
    """Candidate configs for y[M, N], each with every nibble conversion in `cvts`; `loops`: the inner loops whose
    candidates to list (LOOPS; 1 and 2, decode only, from `_decode_configs`, for the GPU sweep of
    benchmarks/int4_sweep.py until a measurement puts them in int4_linear's list). Loop 0, decode (M <= 16): one
    block of the next power of two of M rows (tl.dot pads it; at M=1 a 16-row block, as the int8 GEMV's, costs 4.0 SASS
    instructions a weight in the loop against 2.8 for a 1-row one: benchmarks/gemv_sass.py, at
    (32, 1, ., 2, 2, 3, 2)); BLOCK_N rows by GPB groups a step (more for groups under 128), so a program reads
    4-16 KiB of weight a step (the int8 GEMV's best read 4-8 KiB), 16 rows a warp, and split over K so that
    128-2048 programs cover the GPU. Up to 64 rows: 16-, 32- or 64-row blocks, no split. `broad`: a wider space
    for the GPU sweep (benchmarks/int4_gpu_check.py), whose winners the default list should hold. `narrow`: loop 1
    and 2's shapes and stages where the H100 sweep's winners were (int4_linear's list: fewer Triton builds)."""
    groups, half = K // group, group // 2
    out: list[Config] = []
    for loop in loops:
        out += _decode_configs(loop, M, K, N, group, glu, cvts, narrow) if loop and M <= 16 else []
    if 0 not in loops:
        return out
    if M <= 16:
        bm = min(16, triton.next_power_of_2(M))
        default = ((32, (2, 4), ((2, 3), (2, 4)), bm), (64, (1, 2), ((4, 3),), bm))
        shapes = default
        if broad:  # more block shapes, warps and stages; the default ones with 16-row blocks too
            shapes = ((16, (2, 4, 8), ((1, 3), (2, 3)), bm), (32, (1, 2, 4, 8), ((2, 3), (2, 5), (4, 3)), bm),
                      (64, (1, 2, 4), ((4, 3), (8, 3)), bm), (128, (1, 2), ((8, 3), (4, 3)), bm))
            shapes += tuple((bn, gpbs, variants, 16) for bn, gpbs, variants, _ in default if bm != 16)
        tiles, programs = ((2048, 32768), (64, 4096)) if broad else ((4096, 16384), (128, 2048))
        for bn, gpbs, variants, rows in shapes:
            for gpb in (g * max(1, 128 // group) for g in gpbs):  # GPB counted in 128 channels a row
                tile = bn * gpb * half * (2 if glu else 1)  # weight bytes a program reads a step
                for split in (1, 2, 4, 8, 16, 32):
                    if groups % split or (groups // split) % gpb or not tiles[0] <= tile <= tiles[1]:
                        continue
                    if not programs[0] <= triton.cdiv(N, bn) * split <= programs[1]:
                        continue
                    out += [(bn, split, rows, gpb, w, st, c) for w, st in variants for c in cvts]
    else:
        for bm in (16, 32, 64):
            if bm >= 2 * triton.next_power_of_2(M):
                continue
            for bn in (32, 64, 128):
                if 64 <= triton.cdiv(N, bn) * triton.cdiv(M, bm) or bn == 32:
                    out += [(bn, 1, bm, gpb, 4, 3, c) for gpb in (1, 2) if groups % gpb == 0 for c in cvts]
    if not out:  # small problems (tests under the interpreter): one config that fits
        out.append((16 if N <= 16 else 32, 1, 16, 1, 4, 2, cvts[0]))
    return out


def _decode_configs(loop: int, M: int, K: int, N: int, group: int, glu: bool, cvts: tuple[int, ...],
                    narrow: bool = False) -> list[Config]:
    """Candidates of loop 1 (MMA on weights dequantized in registers) or 2 (CUDA cores) at M <= 16 rows: a few
    block shapes, GPB groups a step (counted in 128 channels a row), stages, and the two splits of K whose
    programs come nearest to 2 and 4 per SM (loop 2, which hides latency with warps more than with stages: 4 and
    8) of an H100's 132. Loop 1 pads M to an 8-row MMA tile (M <= 8): x's tile then loads 16 bytes a thread, which
    the pipeliner prefetches (not the 2 bytes of a 1-row one). Loop 2 uses CVT 0 or 1 (its bit conversion is
    plain Triton) and register prefetch (2 stages) only where a step's weight is at most 8 KiB (else it spills)."""
    groups, half, per128 = K // group, group // 2, max(1, 128 // group)
    if loop == 1:
        bm, target, cvs = (8 if M <= 8 else 16), (2, 4), cvts
        shapes = ((32, 2, (2,), (3, 5)), (32, 2, (4,), (3, 4)), (64, 4, (2,), (3,)))  # the int8 GEMV's best: 3-5
        if narrow:  # every shape's best on an H100 (Llama-1B's o, qkv, gate/up, down at M=1 and 8) was among these
            shapes = ((32, 2, (2,), (3,)), (64, 4, (2,), (3,)))
    else:
        bm, target, cvs = triton.next_power_of_2(M), (4, 8), tuple(dict.fromkeys(min(c, 1) for c in cvts))
        shapes = (((32, 2, (2, 4), (1, 2)), (64, 2, (2,), (1, 2)), (64, 4, (2,), (1,))) if M == 1 else
                  ((32, 2, (1,), (1,)),))
    out: list[Config] = []
    for bn, warps, gpbs, stages in shapes:
        for gpb in (g * per128 for g in gpbs):
            splits = [s for s in (1, 2, 4, 8, 16, 32) if groups % s == 0 and (groups // s) % gpb == 0]
            if not splits:
                continue
            cols = triton.cdiv(N, bn)
            picks = dict.fromkeys(min(splits, key=lambda s: abs(math.log(cols * s / (t * 132)))) for t in target)
            tile = bn * gpb * half * (2 if glu else 1)
            out += [(bn, s, bm, gpb, warps, st, c, loop) for s in picks for st in stages for c in cvs
                    if not (loop == 2 and st == 2 and tile > 8192)]
    return out


def default_cvts(x: Tensor) -> tuple[int, ...]:
    """The nibble conversions int4_linear tries: the PTX one (2) for 16-bit x on a GPU, else the bit one (1)."""
    return (2,) if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else (1,)


# CVT 1 and 2 give MAGIC + q for q - 8 in 16-bit types: the scale times MAGIC + 8 comes off the zero
_OFFSET = {torch.bfloat16: 136.0, torch.float16: 1032.0}


def w4_gemm(x2: Tensor, qw: Tensor, sz: Tensor, b: Tensor | None, y: Tensor, group: int, cfg: Config,
            r: Tensor | None = None, glu: bool = False, norm: Tensor | None = None,
            rms_eps: float | None = None) -> None:
    """Launch one config: y[M, N] = x2 @ W^T (+ b) (GLU: silu(gate) * up) (+ r), W int4 in fxcc's layout;
    `rms_eps`: x2 RMS-normalised first (weight `norm`, or None when the pass folded it into W)."""
    bn, split, bm, gpb, warps, stages, cvt = cfg[:7]
    loop = cfg[7] if len(cfg) > 7 else 0
    M, K = x2.shape
    N = y.shape[1]
    NT = 2 * N if glu else N
    if qw.dtype != torch.uint8 or qw.shape != (NT, K // 2) or sz.shape != (K // group, NT, 2):
        raise ValueError(f"int4 GEMM: weight {tuple(qw.shape)} {qw.dtype} and scale_zero {tuple(sz.shape)} for x "
                         f"{tuple(x2.shape)}, {N} outputs (glu={glu}), group {group}: expected uint8 [{NT}, {K // 2}] "
                         f"and [{K // group}, {NT}, 2] (fxcc.dialects.pack_int4 / quantize_int4)")
    if K % group or group < 32 or group & (group - 1):
        raise ValueError(f"int4 GEMM: group {group} for K={K}: a power of two of at least 32 dividing K")
    if split > 1 and ((K // group) % split or M > bm):
        raise ValueError(f"int4 GEMM: split {split} needs the {K // group} groups in whole parts and M={M} <= {bm}")
    if (K // group // split) % gpb:
        raise ValueError(f"int4 GEMM: {gpb} groups a step do not divide the {K // group // split} groups of a program "
                         f"(K={K}, group {group}, split {split})")
    if cvt == 2 and not (x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError("int4 GEMM: the PTX nibble conversion (CVT=2) is for bf16 / fp16 x on a GPU")
    if loop not in LOOPS or loop == 2 and (bm > 16 or cvt == 2 or stages > 2):
        raise ValueError(f"int4 GEMM: loop {loop} with BLOCK_M={bm}, CVT={cvt}, {stages} stages: the loops are "
                         f"{LOOPS}; the CUDA-core one (2) takes blocks of at most 16 rows, CVT 0 or 1 and 1 or 2 "
                         "stages")
    if norm is not None and (rms_eps is None or norm.shape != (K,)):
        raise ValueError(f"int4 GEMM: RMSNorm weight of shape {tuple(norm.shape)} for rows of {K} (rms_eps={rms_eps})")
    if not qw.is_contiguous():
        raise ValueError("int4 GEMM: the packed weight must be contiguous (16-byte rows of groups)")
    if loop == 2:  # reads x (and the norm's weight) four values a 64-bit word, the weight a 32-bit word
        x2, norm = _aligned(x2, 4), None if norm is None else _aligned(norm, 4)
        if qw.data_ptr() % 4:
            raise ValueError("int4 GEMM: the CUDA-core loop reads the packed weight in 32-bit words; its data pointer "
                             f"{qw.data_ptr():#x} is not 4-byte aligned")
    acc, cnt, ss = tg._workspace(x2.device, M, N, glu) if split > 1 else (y, y, y)
    args = (x2, qw, sz, b if b is not None else sz, r if r is not None else y, y, acc, cnt,
            norm if norm is not None else sz, ss, float(rms_eps or 0.0), M, N, NT, K, K // group // split,
            x2.stride(0), x2.stride(1), qw.stride(0), *(r.stride() if r is not None else (0, 0)), y.stride(0),
            y.stride(1))
    flags = dict(HAS_BIAS=b is not None, HAS_RES=r is not None, GLU=glu, NORM=rms_eps is not None,
                 GAMMA=norm is not None, EVEN_N=N % bn == 0, CVT=cvt, SPLIT=split, GROUP=group, GPB=gpb, BLOCK_M=bm,
                 BLOCK_N=bn, num_warps=warps)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    if loop == 2:
        ReadOnly(_w4_fma)[grid](*args, **flags, STAGES=stages, EVEN_M=M % bm == 0, num_stages=1)
    else:
        ReadOnly(_w4)[grid](*args, **flags, IEEE=x2.dtype == torch.float32, DEQUANT=loop == 1,
                            OFF=_OFFSET.get(x2.dtype, 0.0) if cvt else 0.0, num_stages=stages)


def _aligned(t: Tensor, n: int) -> Tensor:
    """t, or a contiguous copy, contiguous along its last dim with rows (and data) starting at multiples of n
    elements."""
    if t.stride(-1) == 1 and (t.dim() == 1 or t.stride(0) % n == 0) and t.data_ptr() % (n * t.element_size()) == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def int4_linear(x: Tensor, qw: Tensor, sz: Tensor, b: Tensor | None, group: int, residual: Tensor | None = None,
                norm: Tensor | None = None, rms_eps: float | None = None, glu: bool = False) -> Tensor:
    """W4A16 linear x [.., K] -> [.., N] (GLU: silu(gate) * up, [.., N / 2]) with the config measured fastest for
    this shape (the first at a new shape; under the interpreter the first config)."""
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = sz.shape[1] // 2 if glu else sz.shape[1]
    r2 = None if residual is None else residual.expand(*x.shape[:-1], N).reshape(-1, N)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    key = (M, N, K, group, x.dtype, b is not None, str(x.device), r2 is not None, glu, rms_eps is not None,
           norm is not None)
    pinned = pinned_by() is not None  # a plan is applied: the first candidate, untimed (and not remembered)
    cfg = (_DEFAULT if pinned else _BEST).get(key)
    if cfg is None:
        cands = _candidates(x2, M, K, N, group, glu)
        if x.is_cuda and len(cands) > 1 and not torch.cuda.is_current_stream_capturing() and not pinned:
            cfg = _measure(cands, x2, qw, sz, b, y, group, r2, glu, norm, rms_eps)
        else:
            cfg = cands[0]
        (_DEFAULT if pinned else _BEST)[key] = cfg
    w4_gemm(x2, qw, sz, b, y, group, cfg, r2, glu, norm, rms_eps)
    return y.reshape(*x.shape[:-1], N)


def _candidates(x2: Tensor, M: int, K: int, N: int, group: int, glu: bool) -> list[Config]:
    """configs() with the default conversions, after one config for the first (used unmeasured, e.g. when the
    first call is captured in a CUDA graph) and as a fallback should the PTX conversion or a block of fewer than
    16 rows fail on some GPU or Triton: the bit conversion (1) on a 16-row block."""
    cands = configs(M, K, N, group, glu, default_cvts(x2))
    # loop 1 (MMA on weights dequantized in registers) is listed by default: on an H100 its best config ran a Llama-1B
    # decode layer's four linears in 30.8 us at M=1 (31.4 at M=8) against loop 0's 36.6 (38.3) and the int8 GEMV's
    # 37.7 (38.6) (benchmarks/int4_sweep.py); loop 2 (CUDA cores) lost everywhere and is listed only on request.
    # FXCC_INT4_LOOPS=0: loop 0 alone; =1,2: both (fxcc.options.settings).
    loops = settings().int4_loops
    cands += configs(M, K, N, group, glu, default_cvts(x2), loops=loops, narrow=True) if loops else []
    bn, split, bm, gpb, warps, stages, _ = cands[0][:7]
    safe = (bn, split, max(bm, 16), gpb, warps, stages, 1)  # 16 rows: as the kernel ran before small blocks
    return [safe] + [c for c in cands if c != safe]


def _reference(x2, qw, sz, b, group, r2, glu, norm, rms_eps) -> Tensor:
    xin = x2 if rms_eps is None else torch.ops.fxcc_tx.rms_norm(x2, norm, rms_eps)
    ref = xin.float() @ int4_dequantize(qw, sz, group).t()
    if b is not None:
        ref = ref + b.float()
    if glu:
        g, u = ref.split(sz.shape[1] // 2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
    return ref if r2 is None else ref + r2.float()


def _measure(cands, x2, qw, sz, b, y, group, r2, glu, norm, rms_eps) -> Config:
    """The fastest config that is right (twice over a poisoned output: split-K leaves state behind), timed in
    CUDA graphs over weight copies larger than the L2 (fxcc.codegen.triton_gemv.time_candidates)."""
    ref = _reference(x2, qw, sz, b, group, r2, glu, norm, rms_eps)
    good = tg.checked(cands, lambda c: w4_gemm(x2, qw, sz, b, y, group, c, r2, glu, norm, rms_eps), y, ref, 2e-2,
                      f"int4 GEMM for x {tuple(x2.shape)}, weight {tuple(qw.shape)}:")
    copies = tg.stream_copies(qw.numel())
    qws = [qw] + [qw.clone() for _ in range(copies - 1)]
    times = tg.time_candidates(good, lambda c, i: w4_gemm(x2, qws[i], sz, b, y, group, c, r2, glu, norm, rms_eps),
                               copies)
    if not times:
        raise RuntimeError(f"no Triton config of the int4 GEMM ran for x {tuple(x2.shape)}, weight "
                           f"{tuple(qw.shape)}; check the Triton install (python -c 'import triton')")
    TIMES[(*x2.shape, qw.shape[0], group, glu, rms_eps is not None)] = {
        str(c): round(t * 1e3, 2) for c, t in sorted(times.items(), key=lambda kv: kv[1])}
    return min(times, key=times.get)


def chosen_configs() -> dict[str, Config]:
    """Configs chosen so far, by problem (benchmark logs)."""
    return {f"int4 g{k[3]}{'+norm' if k[9] else ''}{'+glu' if k[8] else ''}{'+res' if k[7] else ''} M={k[0]} "
            f"N={k[1]} K={k[2]} {str(k[4]).replace('torch.', '')}": v for k, v in _BEST.items()}
