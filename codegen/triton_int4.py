"""W4A16 GEMV (decode, M <= 16) and small-batch GEMM: int4 weights dequantized in registers (GPU; CPU via the
interpreter).

y[M, N] = x[M, K] @ W[N, K]^T with W = (q - 8) * scale + zero per group of G input channels
(fxcc.dialects.quantize_int4; scale_zero [K / G, N, 2] in x's dtype). The weight is in fxcc's int4 layout
(fxcc.dialects.pack_int4): a row's group is G / 2 contiguous bytes whose low nibbles are the group's first G / 2
channels and whose high nibbles its last G / 2. Each program streams a [BLOCK_N, G / 2] byte tile per group
(16-byte vectors along K), takes q - 8 of each nibble (exact in bf16 / fp16) and multiplies the two nibble tiles
by the two halves of the group's x tile (the dot's right operand: "swap AB", as the int8 GEMV of
triton_gemv.py). The group's scale and zero are applied to the dot's [BLOCK_N, BLOCK_M] result, not to every
weight element: sum_k x_k ((q_k - 8) s + z) = s * dot(q - 8, x) + z * sum_k x_k, so dequantization costs two
multiply-adds per output per group.

Epilogues as the int8 GEMV's (its `_epilogue`): bias, silu(gate) * up of a merged gate/up weight (GLU), a
residual add, and an RMSNorm of x (NORM: squares summed as x streams, 1 / rms scales the accumulator; the
norm's weight folded into W by the pass, or multiplying the x tiles: GAMMA). SPLIT > 1 splits the groups over
SPLIT programs per column block (partial sums meet in the int8 GEMV's fp32 workspace; the last program applies
the epilogue and empties it). A third grid axis over blocks of BLOCK_M rows makes it the small-batch GEMM.
Configs are chosen per shape by measurement on the GPU at the first call (checked against the reference first,
then timed in CUDA graphs over weight copies larger than the L2); under the interpreter the first is used.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from fxcc.codegen import triton_gemv as tg
from fxcc.codegen.launch import ReadOnly
from fxcc.codegen.triton_gemv import _epilogue
from fxcc.dialects import int4_dequantize
from torch import Tensor

log = logging.getLogger(__name__)


@triton.jit
def _nibbles(w, dtype: tl.constexpr):
    """A uint8 tile -> (low - 8, high - 8) in `dtype` (exact: values in [-8, 7])."""
    lo = (w & 15).to(tl.int32) - 8
    hi = (w >> 4).to(tl.int32) - 8
    return lo.to(tl.float32).to(dtype), hi.to(tl.float32).to(dtype)


@triton.jit
def _group_dot(wl, wh, xl, xh, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(wl, xl, input_precision="ieee") + tl.dot(wh, xh, input_precision="ieee")
    return tl.dot(wl, xl) + tl.dot(wh, xh)


@triton.jit
def _w4(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr, g_ptr, ss_ptr, eps, M, N, NT, K, G_PER,
        sxm, sxk, swn, srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
        NORM: tl.constexpr, GAMMA: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    s_ptrs = sz_ptr + g_lo * NT * 2 + rn * 2  # [K / G, NT, 2]: scale, zero of (group, row)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = acc
    ssq = tl.zeros((HALF, BLOCK_M), dtype=tl.float32)
    for gi in range(0, G_PER):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        xl = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        xh = tl.load(x_ptrs + HALF * sxk, mask=m_ok[None, :], other=0.0)
        if NORM:  # RMSNorm of x: squares summed here, 1 / rms after the loop
            xlf = xl.to(tl.float32)
            xhf = xh.to(tl.float32)
            ssq += xlf * xlf + xhf * xhf
            if GAMMA:  # the norm's weight, unless the pass folded it into the weight
                k0 = (g_lo + gi) * GROUP
                xl = (xlf * tl.load(g_ptr + k0 + rh).to(tl.float32)[:, None]).to(xl.dtype)
                xh = (xhf * tl.load(g_ptr + k0 + HALF + rh).to(tl.float32)[:, None]).to(xh.dtype)
        xsum = tl.sum(xl.to(tl.float32), axis=0) + tl.sum(xh.to(tl.float32), axis=0)
        wl, wh = _nibbles(w, xl.dtype)
        sc = tl.load(s_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        ze = tl.load(s_ptrs + 1, mask=n_ok, other=0.0).to(tl.float32)
        acc += _group_dot(wl, wh, xl, xh, IEEE) * sc[:, None] + ze[:, None] * xsum[None, :]
        if GLU:  # the up rows [N, 2N) of the same columns
            wu = tl.load(w_ptrs + N * swn, mask=n_ok[:, None], other=0)
            ul, uh = _nibbles(wu, xl.dtype)
            su = tl.load(s_ptrs + 2 * N, mask=n_ok, other=0.0).to(tl.float32)
            zu = tl.load(s_ptrs + 2 * N + 1, mask=n_ok, other=0.0).to(tl.float32)
            acc_u += _group_dot(ul, uh, xl, xh, IEEE) * su[:, None] + zu[:, None] * xsum[None, :]
        w_ptrs += HALF
        x_ptrs += GROUP * sxk
        s_ptrs += NT * 2
    ss = tl.sum(ssq, axis=0)
    if SPLIT == 1:
        if NORM:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * rstd[None, :]
            acc_u = acc_u * rstd[None, :]
        _epilogue(acc, acc_u, rn, rm, n_ok, m_ok, N, sz_ptr, b_ptr, r_ptr, y_ptr, srm, srn, sym, syn,
                  HAS_BIAS, HAS_RES, GLU, False)
    else:  # one block of rows (the launcher checks): the int8 GEMV's workspace protocol
        mask = n_ok[:, None] & m_ok[None, :]
        tile = acc_ptr + rm[None, :] * N + rn[:, None]
        tl.atomic_add(tile, acc, mask=mask, sem="relaxed")
        if GLU:
            tl.atomic_add(tile + M * N, acc_u, mask=mask, sem="relaxed")
        if NORM:
            tl.atomic_add(ss_ptr + pid_n * BLOCK_M + rm, ss, mask=m_ok, sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            tot = tl.load(tile, mask=mask, other=0.0, cache_modifier=".cg")
            tot_u = tot
            if GLU:
                tot_u = tl.load(tile + M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if NORM:
                ss_all = tl.load(ss_ptr + pid_n * BLOCK_M + rm, mask=m_ok, other=0.0, cache_modifier=".cg")
                rstd = 1.0 / tl.sqrt(ss_all / K + eps)
                tot = tot * rstd[None, :]
                tot_u = tot_u * rstd[None, :]
            _epilogue(tot, tot_u, rn, rm, n_ok, m_ok, N, sz_ptr, b_ptr, r_ptr, y_ptr, srm, srn, sym, syn,
                      HAS_BIAS, HAS_RES, GLU, False)
            tl.debug_barrier()
            tl.store(tile, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), mask=mask)
            if GLU:
                tl.store(tile + M * N, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), mask=mask)
            if NORM:
                tl.store(ss_ptr + pid_n * BLOCK_M + rm, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=m_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


# (BLOCK_N, SPLIT, BLOCK_M, num_warps, num_stages)
Config = tuple[int, int, int, int, int]
_BEST: dict[tuple, Config] = {}
TIMES: dict[tuple, dict] = {}  # problem key -> {config: us}, what the choice was made from (benchmark logs)


def configs(M: int, K: int, N: int, group: int, glu: bool = False) -> list[Config]:
    """Candidate configs for y[M, N]. Decode (M <= 16): one 16-row block, split over K so that the grid covers
    the GPU a few times (as the int8 GEMV's); up to 64 rows: 16-, 32- or 64-row blocks, no split."""
    groups = K // group
    out: list[Config] = []
    if M <= 16:
        for bn, variants in ((32, ((2, 3), (4, 4))), (64, ((4, 4),)), (16, ((2, 4),))):
            for split in (1, 2, 4, 8, 16):
                if groups % split or not 128 <= triton.cdiv(N, bn) * split <= 2048:
                    continue
                out += [(bn, split, 16, w, st) for w, st in variants]
    else:
        for bm in (16, 32, 64):
            if bm >= 2 * triton.next_power_of_2(M):
                continue
            for bn in (32, 64, 128):
                if 64 <= triton.cdiv(N, bn) * triton.cdiv(M, bm) or bn == 32:
                    out.append((bn, 1, bm, 4, 3))
    if not out:  # small problems (tests under the interpreter): one config that fits
        out.append((16 if N <= 16 else 32, 1, 16, 4, 2))
    return out


def w4_gemm(x2: Tensor, qw: Tensor, sz: Tensor, b: Tensor | None, y: Tensor, group: int, cfg: Config,
            r: Tensor | None = None, glu: bool = False, norm: Tensor | None = None,
            rms_eps: float | None = None) -> None:
    """Launch one config: y[M, N] = x2 @ W^T (+ b) (GLU: silu(gate) * up) (+ r), W int4 in fxcc's layout;
    `rms_eps`: x2 RMS-normalised first (weight `norm`, or None when the pass folded it into W)."""
    bn, split, bm, warps, stages = cfg
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
    if norm is not None and (rms_eps is None or norm.shape != (K,)):
        raise ValueError(f"int4 GEMM: RMSNorm weight of shape {tuple(norm.shape)} for rows of {K} (rms_eps={rms_eps})")
    if not qw.is_contiguous():
        raise ValueError("int4 GEMM: the packed weight must be contiguous (16-byte rows of groups)")
    acc, cnt, ss = tg._workspace(x2.device, M, N, glu) if split > 1 else (y, y, y)
    ReadOnly(_w4)[(triton.cdiv(N, bn), split, triton.cdiv(M, bm))](
        x2, qw, sz, b if b is not None else sz, r if r is not None else y, y, acc, cnt,
        norm if norm is not None else sz, ss, float(rms_eps or 0.0), M, N, NT, K, K // group // split,
        x2.stride(0), x2.stride(1), qw.stride(0), *(r.stride() if r is not None else (0, 0)), y.stride(0),
        y.stride(1), HAS_BIAS=b is not None, HAS_RES=r is not None, GLU=glu, NORM=rms_eps is not None,
        GAMMA=norm is not None, IEEE=x2.dtype == torch.float32, SPLIT=split, GROUP=group, BLOCK_M=bm,
        BLOCK_N=bn, num_warps=warps, num_stages=stages)


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
    cfg = _BEST.get(key)
    if cfg is None:
        cands = configs(M, K, N, group, glu)
        if x.is_cuda and len(cands) > 1 and not torch.cuda.is_current_stream_capturing():
            cfg = _measure(cands, x2, qw, sz, b, y, group, r2, glu, norm, rms_eps)
        else:
            cfg = cands[0]
        _BEST[key] = cfg
    w4_gemm(x2, qw, sz, b, y, group, cfg, r2, glu, norm, rms_eps)
    return y.reshape(*x.shape[:-1], N)


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
    good = []
    for c in cands:
        try:
            errs = []
            for _ in range(2):
                y.fill_(float("nan"))
                w4_gemm(x2, qw, sz, b, y, group, c, r2, glu, norm, rms_eps)
                errs.append(((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item())
        except Exception as e:  # noqa: BLE001 - e.g. more shared memory than this GPU has
            errs = [str(e)[:200]]
        if all(isinstance(e, float) and e < 2e-2 for e in errs):
            good.append(c)
        else:
            log.warning("int4 GEMM config %s for x %s, weight %s is wrong (%s); dropped", c, tuple(x2.shape),
                        tuple(qw.shape), errs)
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
