"""Triton GEMMs for quantized linears, the dequantisation fused in the epilogue (GPU; CPU via the interpreter).

One kernel, three modes (a constexpr), y[M, N] = x[M, K] @ W[N, K]^T with W = q * wscale[:, None]:
- MODE 0, int8 weight-only: int8 tiles are converted to x's type in registers, the per-channel scale
  multiplies the accumulator once in the epilogue. For decode-shaped steps (small M) the GEMM is
  bound by weight bytes, which int8 halves against bf16.
- MODE 1, int8 W8A8: each program first finds its rows' max |x| (dynamic per-token scale), quantizes x
  tiles to int8 in registers and accumulates int8 x int8 in int32; epilogue: * xscale[m] * wscale[n].
- MODE 2, fp8 e4m3 (Hopper): as MODE 1 with e4m3 tiles and fp32 accumulation; the activation
  quantization lives inside the kernel (no extra launch, but x is re-quantized for every N tile).
- MODE 3, fp8 e4m3 for prefill (compute-bound): x quantized once per row by `quantize_rows` (one launch),
  then e4m3 x e4m3 tiles with the two scales in the epilogue.
Weight-only int8 at decode (<= 16 rows) runs the GEMV of `triton_gemv.py` (with the folded gate / RMSNorm),
against a few configs of the older split-K and tiled kernels here. Block sizes are chosen per shape by
measurement on the GPU at the first call (the mixed-precision pass makes it at compile time): weight-only
candidates are first checked against plain torch twice (wrong ones are dropped), then timed in CUDA graphs
over weight copies larger than the L2; under the interpreter the first config is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fxcc.codegen import triton_gemv as tg
from fxcc.codegen.launch import ReadOnly
from fxcc.measure import decide, pinned_by
from torch import Tensor

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); small-M configs first
_SMALL_M = [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 32, 512, 4, 3), (16, 16, 512, 4, 4),
            (16, 64, 128, 4, 5), (16, 128, 128, 4, 4), (16, 64, 512, 8, 3), (16, 128, 256, 8, 3),
            (16, 32, 1024, 4, 2)]
_LARGE_M = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
            (128, 64, 128, 4, 4)]
_BEST: dict[tuple, tuple] = {}
_DEFAULT: dict[tuple, tuple] = {}  # under a plan: each problem's first candidate


@triton.jit
def _qgemm(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, y_ptr, M, N, K, sxm, sxk, swn, swk, srm, srn, sym, syn,
           MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    if MODE == 3:  # x arrives quantized (e4m3 bits) with its per-row scales
        xs = tl.load(xs_ptr + rm, mask=m_ok, other=1.0)
    if MODE == 1 or MODE == 2:  # dynamic per-token scale: max |x| over each row
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                         mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xt.to(tl.float32)), axis=1))
        qmax = 127.0 if MODE == 1 else 448.0
        xs = tl.maximum(amax / qmax, 1e-12)
        inv = 1.0 / xs
    if MODE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None], other=0)
        if MODE == 0:
            wx = wt.to(tl.float32).to(xt.dtype)
            if IEEE:
                acc += tl.dot(xt, wx, input_precision="ieee")
            else:
                acc += tl.dot(xt, wx)
        elif MODE == 1:
            xr = xt.to(tl.float32) * inv[:, None]
            xr = tl.where(xr >= 0, tl.floor(xr + 0.5), tl.ceil(xr - 0.5))  # round half away from zero
            acc += tl.dot(xr.to(tl.int8), wt)
        elif MODE == 2:
            xq = tl.clamp(xt.to(tl.float32) * inv[:, None], -448.0, 448.0).to(tl.float8e4nv)
            acc += tl.dot(xq, wt.to(tl.float8e4nv, bitcast=True))
        else:
            acc += tl.dot(xt.to(tl.float8e4nv, bitcast=True), wt.to(tl.float8e4nv, bitcast=True))
    y = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if MODE != 0:
        y = y * xs[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:  # a residual add the pass folded into this GEMM
        y += tl.load(r_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=m_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w8_splitk(x_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr, M, N, K, K_PER, sxm, sxk, swn, swk,
               srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
               SPLIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight-only int8 for small M (decode), K split over SPLIT programs per N tile so that enough
    programs stream the weight. Partial sums go to an fp32 workspace by atomic adds; the last program of
    a tile (a counter says which) applies scale and bias, writes y and zeroes the workspace for the next call."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER
    for k0 in range(k_lo, k_lo + K_PER, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None], other=0)
        wx = wt.to(tl.float32).to(xt.dtype)
        if IEEE:
            acc += tl.dot(xt, wx, input_precision="ieee")
        else:
            acc += tl.dot(xt, wx)
    mask = m_ok[:, None] & n_ok[None, :]
    tile = acc_ptr + rm[:, None] * N + rn[None, :]
    tl.atomic_add(tile, acc, mask=mask)
    done = tl.atomic_add(cnt_ptr + pid_n, 1)
    if done == SPLIT - 1:
        tot = tl.load(tile, mask=mask, other=0.0, cache_modifier=".cg")
        y = tot * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            y += tl.load(r_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(tile, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, K, sxm, FP8: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: s = max|x| / qmax, q = x / s (int8 rounded, or e4m3 bits)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < K
    x = tl.load(x_ptr + row * sxm + offs, mask=ok, other=0.0).to(tl.float32)
    qmax = 448.0 if FP8 else 127.0
    sc = tl.maximum(tl.max(tl.abs(x), axis=0) / qmax, 1e-12)
    y = x / sc
    if FP8:
        q = tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5)).to(tl.int8)
    tl.store(q_ptr + row * K + offs, q, mask=ok)
    tl.store(s_ptr + row, sc)


def quantize_rows(x: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """tx.quantize's per-row symmetric quantization of a 2-D x in one launch: (q [M, K], scale [M] fp32)."""
    M, K = x.shape
    fp8 = dtype == "fp8"
    q = torch.empty((M, K), device=x.device, dtype=torch.uint8 if fp8 else torch.int8)
    sc = torch.empty(M, device=x.device, dtype=torch.float32)
    ReadOnly(_quant_rows)[(M,)](x, q, sc, K, x.stride(0), FP8=fp8, BLOCK=triton.next_power_of_2(K),
                      num_warps=8 if K >= 4096 else 4)
    return (q.view(torch.float8_e4m3fn) if fp8 else q), sc


_WORK: dict[tuple, tuple[Tensor, Tensor]] = {}


def _splitk_configs(M: int, K: int, N: int) -> list[tuple]:
    """(BLOCK_N, SPLIT, BLOCK_K) giving a few hundred programs, K split into whole blocks."""
    out = []
    for bn in (32, 64, 128):
        for split in (1, 2, 4, 8, 16):
            per = K // split
            bk = min(256, per)
            if K % split or per % bk or bk < 32 or not 96 <= triton.cdiv(N, bn) * split <= 1024:
                continue
            out += [(bn, split, bk, 4, 3), (bn, split, bk, 8, 4)]
    return out


def _launch_splitk(x2: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, y: Tensor, cfg: tuple,
                   r: Tensor | None = None) -> None:
    bn, split, bk, warps, stages = cfg
    M, K = x2.shape
    N = qw.shape[0]
    key = (str(x2.device), M, N)
    if key not in _WORK:
        _WORK[key] = (torch.zeros(M * N, device=x2.device, dtype=torch.float32),
                      torch.zeros(triton.cdiv(N, 32), device=x2.device, dtype=torch.int32))
    acc, cnt = _WORK[key]
    ReadOnly(_w8_splitk)[(triton.cdiv(N, bn), split)](
        x2, qw, ws, b if b is not None else ws, r if r is not None else y, y, acc, cnt, M, N, K, K // split,
        x2.stride(0), x2.stride(1), qw.stride(0), qw.stride(1), *(r.stride() if r is not None else (0, 0)),
        y.stride(0), y.stride(1), HAS_BIAS=b is not None, HAS_RES=r is not None,
        IEEE=x2.dtype == torch.float32, SPLIT=split, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)


def _launch(mode: int, x2: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, y: Tensor, cfg: tuple,
            xs: Tensor | None = None, r: Tensor | None = None) -> None:
    bm, bn, bk, warps, stages = cfg
    M, K = x2.shape
    N = qw.shape[0]
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    if qw.dtype == torch.float8_e4m3fn:
        qw = qw.view(torch.uint8)  # loaded as bits (masked lanes read 0 = +0.0) and bitcast in the kernel
    if x2.dtype == torch.float8_e4m3fn:
        x2 = x2.view(torch.uint8)
    ReadOnly(_qgemm)[grid](x2, xs if xs is not None else ws, qw, ws, b if b is not None else ws, r if r is not None else y, y,
                 M, N, K, x2.stride(0), x2.stride(1), qw.stride(0), qw.stride(1),
                 *(r.stride() if r is not None else (0, 0)), y.stride(0), y.stride(1), MODE=mode,
                 HAS_BIAS=b is not None, HAS_RES=r is not None,
                 IEEE=y.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 num_warps=warps, num_stages=stages)


def _configs(M: int, K: int, N: int) -> list[tuple]:
    cands = _SMALL_M if M <= 64 else _LARGE_M
    # blocks no larger than the problem (the interpreter pays for every padded element)
    fit = [c for c in cands if c[1] <= max(16, triton.next_power_of_2(N)) and c[2] <= max(32, triton.next_power_of_2(K))]
    if M > 64:
        return fit or cands[:1]
    return fit or [(16, 16, 32, 4, 2)]


def _run(mode: int, x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, r: Tensor | None = None,
         glu: bool = False, norm: Tensor | None = None, rms_eps: float | None = None) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    gemv_only = mode == 0 and x2.shape[0] <= 16
    if rms_eps is not None and not gemv_only:  # only the GEMV normalises x itself
        x2, norm, rms_eps = torch.ops.fxcc_tx.rms_norm(x2, norm, rms_eps), None, None
    N = qw.shape[0] // 2 if glu else qw.shape[0]
    r2 = None if r is None else r.expand(*x.shape[:-1], N).reshape(-1, N)
    xs = None
    if mode == 3:  # quantize x once (one launch), not once per N tile
        x2, xs = quantize_rows(x2, "fp8")
    M, K = x2.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    key = (mode, M, N, K, x.dtype, b is not None, str(x.device), r is not None, glu, rms_eps is not None,
           norm is not None)
    pinned = pinned_by() is not None  # a plan is applied: the first candidate, untimed (and not remembered)
    cfg = (_DEFAULT if pinned else _BEST).get(key)
    if cfg is None:
        cands = [] if glu else _configs(M, K, N)
        if mode == 0 and M <= 16:  # decode: the GEMV first (the default under the interpreter), then split-K
            # and the older split-K and tiled kernels' configs that won before the GEMV (a few, to keep the
            # first call short)
            old = [("splitk", *c) for c in _splitk_configs(M, K, N) if c[3:] == (4, 3)][:4] + cands[:3]
            cands = [("gemv", *c) for c in tg.configs(M, K, N, glu)] + ([] if glu or rms_eps is not None else old)
        if x.is_cuda and len(cands) > 1 and not torch.cuda.is_current_stream_capturing() and not pinned:
            cfg = _measure(mode, cands, x2, qw, ws, b, y, xs, r2, glu, norm, rms_eps)
        else:
            cfg = cands[0]
        (_DEFAULT if pinned else _BEST)[key] = cfg
    _go(mode, x2, qw, ws, b, y, cfg, xs, r2, glu, norm, rms_eps)
    return y.reshape(*x.shape[:-1], N)


TIMES: dict[tuple, dict] = {}  # problem key -> {config: ms}, what the choice was made from (benchmark logs)


def _measure(mode: int, cands: list, x2: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, y: Tensor,
             xs: Tensor | None, r2: Tensor | None, glu: bool, norm: Tensor | None,
             rms_eps: float | None) -> tuple:
    """The fastest candidate by CUDA-graph timing over copies of the weight larger than the L2 (a model's
    weights are read once per step from memory, not from the cache); the best few are timed again."""
    if mode == 0:  # every candidate is checked against plain torch first (twice: split-K leaves state behind)
        cands = _correct(cands, x2, qw, ws, b, y, r2, glu, norm, rms_eps)
    copies = tg.stream_copies(qw.numel() * qw.element_size())
    qws = [qw] + [qw.clone() for _ in range(copies - 1)]

    def call(c, i):
        _go(mode, x2, qws[i], ws, b, y, c, xs, r2, glu, norm, rms_eps)

    times = tg.time_candidates(cands, call, copies)
    if not times:
        raise RuntimeError(f"no Triton config of the quantized GEMM ran for x {tuple(x2.shape)}, weight "
                           f"{tuple(qw.shape)}; check the Triton install (python -c 'import triton')")
    best = sorted(times, key=times.get)[:3]
    again = tg.time_candidates(best, call, copies, rounds=5)  # the close ones, more rounds
    times.update(again)
    TIMES[(mode, *x2.shape, qw.shape[0], glu, rms_eps is not None)] = {str(c): round(t * 1e3, 2) for c, t in sorted(times.items(),
                                                                                              key=lambda kv: kv[1])}
    return min(again or times, key=(again or times).get)


def _correct(cands: list, x2: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, y: Tensor, r2: Tensor | None,
             glu: bool, norm: Tensor | None, rms_eps: float | None) -> list:
    """The weight-only candidates whose output, twice over a poisoned `y`, is within 2e-2 (relative) of the
    plain-torch result; the others are dropped with a warning (a config must never win by being wrong)."""

    xin = x2 if rms_eps is None else torch.ops.fxcc_tx.rms_norm(x2, norm, rms_eps)
    ref = torch.nn.functional.linear(xin.float(), qw.float()) * ws
    if b is not None:
        ref = ref + b.float()
    if glu:
        g, u = ref.split(qw.shape[0] // 2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
    if r2 is not None:
        ref = ref + r2.float()
    return tg.checked(cands, lambda c: _go(0, x2, qw, ws, b, y, c, None, r2, glu, norm, rms_eps), y, ref, 2e-2,
                      f"int8 GEMM for x {tuple(x2.shape)}, weight {tuple(qw.shape)}:")


def _go(mode: int, x2: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None, y: Tensor, cfg: tuple,
        xs: Tensor | None = None, r: Tensor | None = None, glu: bool = False, norm: Tensor | None = None,
        rms_eps: float | None = None) -> None:
    if cfg[0] == "gemv":
        tg.gemv(x2, qw, ws, b, y, cfg[1:], r, glu, norm, rms_eps)
    elif glu or rms_eps is not None:
        raise ValueError(f"config {cfg} has no gated epilogue or RMSNorm")
    elif cfg[0] == "splitk":
        _launch_splitk(x2, qw, ws, b, y, cfg[1:], r)
    else:
        _launch(mode, x2, qw, ws, b, y, cfg, xs, r)


def int8_weight_linear(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None = None,
                       residual: Tensor | None = None, norm: Tensor | None = None,
                       rms_eps: float | None = None) -> Tensor:
    """Weight-only int8 linear: x [.., K] (bf16/fp16/fp32), qw int8 [N, K], ws fp32 [N]; + residual.
    `rms_eps`: x is RMS-normalised first (tx.rms_norm(x, norm, rms_eps)); at decode inside the GEMV."""
    return _run(0, x, qw, ws, b, residual, norm=norm, rms_eps=rms_eps)


def int8_gated_linear(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None = None, norm: Tensor | None = None,
                      rms_eps: float | None = None) -> Tensor:
    """silu(gate) * up of a merged int8 gate/up linear (qw [2F, K]: gate rows, then up rows) in one kernel
    (decode: the GEMV with the gated epilogue); [.., F]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= 16:
        return _run(0, x, qw, ws, b, glu=True, norm=norm, rms_eps=rms_eps)
    y = _run(0, x, qw, ws, b, norm=norm, rms_eps=rms_eps)  # prefill-shaped: the tiled GEMM, then the gate in torch
    g, u = y.split(qw.shape[0] // 2, dim=-1)
    return torch.nn.functional.silu(g) * u


def int8_w8a8_linear(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None = None) -> Tensor:
    """W8A8 int8 linear with dynamic per-token activation scales computed inside the kernel."""
    return _run(1, x, qw, ws, b)


def fp8_linear(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None = None) -> Tensor:
    """fp8 e4m3 linear: qw float8_e4m3fn [N, K] with per-channel ws, activations quantized per token
    by one `quantize_rows` launch, then an e4m3 x e4m3 GEMM (MODE 3)."""
    return _run(3, x, qw, ws, b)


def fp8_linear_fused(x: Tensor, qw: Tensor, ws: Tensor, b: Tensor | None = None) -> Tensor:
    """fp8 linear quantizing x inside the GEMM (MODE 2): one launch, but x is quantized per N tile."""
    return _run(2, x, qw, ws, b)


def chosen_configs() -> dict[str, tuple]:
    """Block sizes chosen so far, by problem: what a report or a benchmark log prints."""
    names = {0: "int8-weight", 1: "int8", 2: "fp8-fused", 3: "fp8"}
    return {f"{names[k[0]]}{'+norm' if k[9] else ''}{'+gamma' if k[10] else ''}{'+glu' if k[8] else ''}{'+res' if k[7] else ''} M={k[1]} N={k[2]} K={k[3]} "
            f"{str(k[4]).replace('torch.', '')}": v for k, v in _BEST.items()}


# ----------------------------------------------------------- float weights at decode (the `gemv` pass)

_FBEST: dict[tuple, tuple] = {}
FLOAT_DECISIONS: dict[str, str] = {}  # problem -> the decision's one line (timings, noise, what was kept)


def _library(x2: Tensor, w: Tensor, b: Tensor | None, y: Tensor, r2: Tensor | None, glu: bool,
             norm: Tensor | None, rms_eps: float | None) -> None:
    """The incumbent: the library GEMM (cuBLAS on the GPU), the norm, gate and residual as torch ops."""
    xin = x2 if rms_eps is None else torch.ops.fxcc_tx.rms_norm(x2, norm, rms_eps)
    z = torch.nn.functional.linear(xin, w, b)
    if glu:
        g, u = z.split(w.shape[0] // 2, dim=-1)
        z = torch.nn.functional.silu(g) * u
    y.copy_(z if r2 is None else z + r2)


def _go_float(cfg: tuple, x2: Tensor, w: Tensor, b: Tensor | None, y: Tensor, r2: Tensor | None, glu: bool,
              norm: Tensor | None, rms_eps: float | None) -> None:
    if cfg[0] == "library":
        _library(x2, w, b, y, r2, glu, norm, rms_eps)
    else:
        tg.gemv(x2, w, None, b, y, cfg[1:], r2, glu, norm, rms_eps)


def _float_reference(x2: Tensor, w: Tensor, b: Tensor | None, r2: Tensor | None, glu: bool, norm: Tensor | None,
                     rms_eps: float | None) -> Tensor:
    xin = x2 if rms_eps is None else torch.ops.fxcc_tx.rms_norm(x2, norm, rms_eps)
    z = torch.nn.functional.linear(xin.float(), w.float(), None if b is None else b.float())
    if glu:
        g, u = z.split(w.shape[0] // 2, dim=-1)
        z = torch.nn.functional.silu(g) * u
    return z if r2 is None else z + r2.float()


def _float_correct(cands: list, x2: Tensor, w: Tensor, b: Tensor | None, y: Tensor, r2: Tensor | None, glu: bool,
                   norm: Tensor | None, rms_eps: float | None) -> list:
    """The GEMV configs whose output, twice over a poisoned `y`, is within 1e-2 (relative) of fp32 torch."""

    ref = _float_reference(x2, w, b, r2, glu, norm, rms_eps)
    return tg.checked(cands, lambda c: _go_float(c, x2, w, b, y, r2, glu, norm, rms_eps), y, ref, 1e-2,
                      f"GEMV for x {tuple(x2.shape)}, weight {tuple(w.shape)}:")


def _measure_float(cands: list, x2: Tensor, w: Tensor, b: Tensor | None, y: Tensor, r2: Tensor | None, glu: bool,
                   norm: Tensor | None, rms_eps: float | None) -> tuple:
    """The library (incumbent) or the fastest correct GEMV config, which must beat it beyond the noise
    (fxcc.measure.decide) in CUDA graphs over weight copies larger than the L2."""
    import logging

    lib = ("library",)
    cands = _float_correct(cands, x2, w, b, y, r2, glu, norm, rms_eps)
    copies = tg.stream_copies(w.numel() * w.element_size())
    wsx = [w] + [w.clone() for _ in range(copies - 1)]

    def call(c, i):
        _go_float(c, x2, wsx[i], b, y, r2, glu, norm, rms_eps)

    times = tg.time_candidates([lib, *cands], call, copies)
    if lib not in times:
        raise RuntimeError(f"the library linear for x {tuple(x2.shape)}, weight {tuple(w.shape)} failed to run in a "
                           "CUDA graph")
    best = sorted((c for c in times if c != lib), key=times.get)[:2]
    final = tg.time_candidates([lib, *best], call, copies, rounds=15, timings=True)
    decision = decide({str(c): t for c, t in final.items()}, str(lib))
    what = (f"GEMV x {tuple(x2.shape)} weight {tuple(w.shape)} {str(w.dtype).replace('torch.', '')}"
            f"{' +glu' if glu else ''}{' +norm' if rms_eps is not None else ''}{' +res' if r2 is not None else ''}")
    FLOAT_DECISIONS[what] = decision.summary()
    logging.getLogger(__name__).info("fxcc: %s: %s", what, decision.summary())
    return next(c for c in final if str(c) == decision.winner)


def float_linear(x: Tensor, w: Tensor, b: Tensor | None = None, residual: Tensor | None = None,
                 norm: Tensor | None = None, rms_eps: float | None = None, glu: bool = False) -> Tensor:
    """A decode linear with float weights (tx.gemv_linear / tx.gemv_gated_linear): the GEMV of triton_gemv.py
    with its epilogues (bias, SwiGLU, residual) and the RMSNorm before it, or the library linear; on the GPU the
    first call of each shape decides by measurement, the library staying unless a GEMV beats it beyond the
    noise. Under the interpreter (CPU tests) the first config runs."""
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.shape[0] // 2 if glu else w.shape[0]
    r2 = None if residual is None else residual.expand(*x.shape[:-1], N).reshape(-1, N)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    key = (M, N, K, x.dtype, w.dtype, b is not None, r2 is not None, glu, rms_eps is not None, norm is not None,
           str(x.device))
    pinned = pinned_by() is not None  # a plan is applied: nothing is timed, the library (the incumbent) runs
    cfg = ("library",) if pinned and x.is_cuda else _FBEST.get(key)
    if cfg is None:
        cands = [("gemv", *c) for c in tg.configs(M, K, N, glu, wbytes=w.element_size())] if M <= 16 else []
        if not cands:
            cfg = ("library",)
        elif not x.is_cuda:
            cfg = cands[0]
        elif torch.cuda.is_current_stream_capturing():  # nothing can be timed inside a capture: not kept
            _go_float(("library",), x2, w, b, y, r2, glu, norm, rms_eps)
            return y.reshape(*x.shape[:-1], N)
        else:
            cfg = _measure_float(cands, x2, w, b, y, r2, glu, norm, rms_eps)
        _FBEST[key] = cfg
    _go_float(cfg, x2, w, b, y, r2, glu, norm, rms_eps)
    return y.reshape(*x.shape[:-1], N)
