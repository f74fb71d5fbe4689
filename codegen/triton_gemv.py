"""Decode-shaped int8 weight-only GEMV (M <= 16 rows of x), the weight as the MMA's left operand ("swap AB").

y[M, N] = x[M, K] @ (q[N, K] * s[N, None])^T is computed as y^T = q @ x^T. At decode the weight is the only
large operand, so the kernel is built around streaming it: each program reads a [BLOCK_N, BLOCK_K] int8 tile
of contiguous rows (16 bytes per thread along K), converts it to x's type in registers and multiplies it by
the few rows of x (the dot's right operand, padded to 16 columns; x stays in L1/L2). The per-channel scale,
bias, a gated activation and a residual add are applied in the epilogue, so one launch does the whole linear.

- SPLIT > 1 splits K over SPLIT programs per column block so that enough programs stream the weight
  (132 SMs on an H100/H200). Partial sums meet in an fp32 workspace by atomic adds; the last program of a
  column block (a counter says which) applies the epilogue, writes y and empties the workspace and the
  counter for the next call, so a CUDA graph can replay it.
- GLU: the weight holds gate rows [0, F) and up rows [F, 2F) (the mixed-precision pass's merged gate/up
  linear); a program reads the gate and the up tile of the same F columns and writes silu(gate) * up:
  Llama's SwiGLU without its own kernel and without the [M, 2F] intermediate.
- NORM: x is RMS-normalised first (the RMSNorm before q/k/v or gate/up): the squares of x are summed as its
  tiles stream (split-K: per column block, in the workspace) and each row's 1 / rms scales the accumulator;
  the norm's weight is folded into the int8 weight by the pass (or multiplies the x tiles: GAMMA).
Block sizes, SPLIT, warps and stages are chosen per shape by measurement (`configs`, timed by the caller).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from fxcc.codegen.launch import ReadOnly
from fxcc.measure import capture_graph, graph_timings
from torch import Tensor


@triton.jit
def _i8_to_bf16(w):
    """int8 -> bf16 without the integer-to-float unit: for 4 bytes at a time, x ^ 0x80 = x + 128 as unsigned
    bytes goes into the low byte of the float 2^23 (0x4B0000uu = 2^23 + x + 128), one fp32 subtraction of
    2^23 + 128 gives x exactly, and the upper halves of two such floats are their bf16 values (exact: |x| <= 128).
    Measured on an H200 it is no faster than Triton's own conversion (the GEMV is not bound by it: the same
    kernel on bf16 weights moves ~1.4x the bytes per second), so it is an option (CVT=2) the sweep times, not a
    default candidate."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, k, a0, a1, a2, a3;
        mov.b32 k, 0x4B000000;
        xor.b32 t, $2, 0x80808080;
        prmt.b32 a0, t, k, 0x7440;
        prmt.b32 a1, t, k, 0x7441;
        prmt.b32 a2, t, k, 0x7442;
        prmt.b32 a3, t, k, 0x7443;
        sub.f32 a0, a0, 0f4B000080;
        sub.f32 a1, a1, 0f4B000080;
        sub.f32 a2, a2, 0f4B000080;
        sub.f32 a3, a3, 0f4B000080;
        prmt.b32 $0, a0, a1, 0x7632;
        prmt.b32 $1, a2, a3, 0x7632;
        }""",
        constraints="=r,=r,r", args=[w], dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def _convert(w, dtype: tl.constexpr, CVT: tl.constexpr):
    """int8 weight tile -> the dot's type. CVT 0: through fp32 (what Triton emits for .to()), 1: .to() directly,
    2: the bit trick of `_i8_to_bf16` (bf16 on a GPU only; the interpreter cannot run PTX)."""
    if CVT == 2:
        return _i8_to_bf16(w)
    elif CVT == 1:
        return w.to(dtype)
    else:
        return w.to(tl.float32).to(dtype)


@triton.jit
def _epilogue(acc, acc_u, rn, rm, n_ok, m_ok, N, ws_ptr, b_ptr, r_ptr, y_ptr, srm, srn, sym, syn,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr, SCALE: tl.constexpr = True):
    """acc [BLOCK_N, BLOCK_M] (y transposed) -> scale (SCALE: per channel, ws; the int4 GEMV scales per group in
    its loop), bias, silu(gate) * up, residual -> store y[m, n]."""
    y = acc
    if SCALE:
        y = acc * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if GLU:
        u = acc_u
        if SCALE:
            u = acc_u * tl.load(ws_ptr + N + rn, mask=n_ok, other=0.0)[:, None]
        if HAS_BIAS:
            u += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y = y / (1.0 + tl.exp(-y)) * u
    mask = n_ok[:, None] & m_ok[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + rm[None, :] * srm + rn[:, None] * srn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[None, :] * sym + rn[:, None] * syn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(acc, acc_u, ss, rn, rm, n_ok, m_ok, pid_n, M, N, K, eps, ws_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr,
            ss_ptr, srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
            NORM: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """A program's partial sums acc, acc_u [BLOCK_N, BLOCK_M] (and ss, its rows' sums of squares of x for NORM) ->
    y. SPLIT == 1: 1 / rms, then the epilogue. SPLIT > 1: the split-K workspace protocol of the GEMVs (the int8
    one here and the int4 one of triton_int4.py): partial sums meet in the fp32 workspace by atomic adds, the last
    program of the column block (the counter says which) applies the epilogue and empties workspace and counter."""
    if SPLIT == 1:
        if NORM:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * rstd[None, :]
            acc_u = acc_u * rstd[None, :]
        _epilogue(acc, acc_u, rn, rm, n_ok, m_ok, N, ws_ptr, b_ptr, r_ptr, y_ptr, srm, srn, sym, syn,
                  HAS_BIAS, HAS_RES, GLU, SCALE)
    else:
        mask = n_ok[:, None] & m_ok[None, :]
        tile = acc_ptr + rm[None, :] * N + rn[:, None]  # workspace [M, N] (GLU: gate then up, [2, M, N])
        tl.atomic_add(tile, acc, mask=mask, sem="relaxed")
        if GLU:
            tl.atomic_add(tile + M * N, acc_u, mask=mask, sem="relaxed")
        if NORM:  # partial sums of squares of this program's K range, per column block
            tl.atomic_add(ss_ptr + pid_n * BLOCK_M + rm, ss, mask=m_ok, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are in before this program counts itself done
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
            _epilogue(tot, tot_u, rn, rm, n_ok, m_ok, N, ws_ptr, b_ptr, r_ptr, y_ptr, srm, srn, sym, syn,
                      HAS_BIAS, HAS_RES, GLU, SCALE)
            # every thread has read the sums before any empties them (a [BLOCK_M] vector is held by several
            # warps: without this, one warp's zeros raced another's read, seen with 4 warps on an H200)
            tl.debug_barrier()
            tl.store(tile, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), mask=mask)
            if GLU:
                tl.store(tile + M * N, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), mask=mask)
            if NORM:
                tl.store(ss_ptr + pid_n * BLOCK_M + rm, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=m_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _gemv(x_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, y_ptr, acc_ptr, cnt_ptr, g_ptr, ss_ptr, eps, M, N, K, K_PER, sxm, sxk,
          swn, swk, srm, srn, sym, syn, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr,
          NORM: tl.constexpr, GAMMA: tl.constexpr, SCALE: tl.constexpr,
          EVEN: tl.constexpr, IEEE: tl.constexpr, CVT: tl.constexpr, SPLIT: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    k_lo = pid_k * K_PER
    w_ptrs = w_ptr + rn[:, None] * swn + (k_lo + rk)[None, :] * swk
    x_ptrs = x_ptr + rm[None, :] * sxm + (k_lo + rk)[:, None] * sxk
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = acc
    ssq = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K_PER, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs)
            if GLU:
                wu = tl.load(w_ptrs + N * swn)
        else:
            k_ok = (k_lo + k0 + rk) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            if GLU:
                wu = tl.load(w_ptrs + N * swn, mask=n_ok[:, None] & k_ok[None, :], other=0)
        if EVEN:
            xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if NORM:  # RMSNorm of x: squares summed here (reduced once, after the loop), 1 / rms after the dot
            xf = xt.to(tl.float32)
            ssq += xf * xf
            if GAMMA:  # the norm's weight, unless the pass folded it into the weight's input channels
                gk = k_lo + k0 + rk
                gam = tl.load(g_ptr + gk, mask=gk < K, other=0.0).to(tl.float32)
                xt = (xf * gam[:, None]).to(xt.dtype)
        wx = _convert(w, xt.dtype, CVT)
        if IEEE:
            acc += tl.dot(wx, xt, input_precision="ieee")
        else:
            acc += tl.dot(wx, xt)
        if GLU:
            ux = _convert(wu, xt.dtype, CVT)
            if IEEE:
                acc_u += tl.dot(ux, xt, input_precision="ieee")
            else:
                acc_u += tl.dot(ux, xt)
        w_ptrs += BLOCK_K * swk
        x_ptrs += BLOCK_K * sxk
    _finish(acc, acc_u, tl.sum(ssq, axis=0), rn, rm, n_ok, m_ok, pid_n, M, N, K, eps, ws_ptr, b_ptr, r_ptr, y_ptr,
            acc_ptr, cnt_ptr, ss_ptr, srm, srn, sym, syn, HAS_BIAS, HAS_RES, GLU, NORM, SCALE, SPLIT, BLOCK_N, BLOCK_M)


# (BLOCK_N, SPLIT, BLOCK_K, num_warps, num_stages, CVT); CVT 2 (the bit trick) only for int8 -> bf16 on a GPU
Config = tuple[int, int, int, int, int, int]
_WORK: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def configs(M: int, K: int, N: int, glu: bool = False, cvts: tuple[int, ...] = (0,), wbytes: int = 1) -> list[Config]:
    """Candidate configs for y[M, N] (N: output columns) whose grid covers the GPU a few times over, each
    with every conversion in `cvts` (2, the bit trick, where x is bf16 on a GPU). Timed by the caller.
    `wbytes`: bytes per weight element (2 for a bf16 weight: tiles of half the elements, same bytes per stage).

    A sweep on an H200 (benchmarks/int8_gemv_sweep.py --broad, Llama 2048/8192 at M=8) found 32 output
    rows per program best on every shape, 2 warps with 3 or 5 stages (4 warps for the widest), K blocks of 128
    or 256; 16 and 64 rows, 512-wide K blocks and 8 warps lost by 5-100%. So the list is 32 rows in three
    variants plus one variant of 16 and 64 rows, to keep the first call (which checks and times every
    candidate) short."""
    out: list[Config] = []
    for bn, variants in ((32, ((2, 3), (2, 5), (4, 4))), (16, ((4, 4),)), (64, ((4, 4),))):
        for split in (1, 2, 4, 8, 16):
            for bk in (128, 256):
                per = K // split
                tile = bn * bk * (2 if glu else 1) * wbytes
                if K % split or per % bk or tile > 32768 or tile < 4096:
                    continue
                if not 128 <= triton.cdiv(N, bn) * split <= 2048:
                    continue
                out += [(bn, split, bk, w, st, c) for w, st in variants for c in cvts]
    if not out:  # small or ragged problems (tests under the interpreter): one config that fits
        bk = min(128, triton.next_power_of_2(K))
        out.append((16, 1, max(16, bk), 4, 2, 0))
    return out


def gemv(x2: Tensor, qw: Tensor, ws: Tensor | None, b: Tensor | None, y: Tensor, cfg: Config,
         r: Tensor | None = None, glu: bool = False, norm: Tensor | None = None, rms_eps: float | None = None
         ) -> None:
    """Launch one config: y[M, N] = x2 @ (qw * ws)^T (+ b) (GLU: silu(gate) * up) (+ r); M <= 16.
    `ws` None: qw is a float weight (bf16/fp16/fp32) read as it is, no scale (the `gemv` pass's decode linears).

    `rms_eps`: x2 is first RMS-normalised (tx.rms_norm(x2, norm, rms_eps)): the row's 1 / rms, from sums of
    squares taken in the same loop, scales the accumulator, so the norm costs no kernel and no pass over x of
    its own; the norm's weight `norm` multiplies the x tiles (None: the pass folded it into qw)."""
    bn, split, bk, warps, stages, cvt = cfg
    M, K = x2.shape
    N = y.shape[1]
    if M > 16:
        raise ValueError(f"int8 GEMV: {M} rows of x; this kernel takes at most 16 (use the tiled GEMM)")
    if qw.shape[0] != (2 * N if glu else N):
        raise ValueError(f"int8 GEMV: weight has {qw.shape[0]} rows for {N} outputs (glu={glu})")
    if cvt == 2 and not (x2.dtype == torch.bfloat16 and qw.dtype == torch.int8 and x2.is_cuda):
        raise ValueError("int8 GEMV: the bit-trick conversion (CVT=2) is for int8 weights, bf16 x, on a GPU")
    if split > 1 and (K % split or (K // split) % bk):
        raise ValueError(f"int8 GEMV: K={K} does not split into {split} parts of whole {bk}-blocks")
    acc, cnt, ss = _workspace(x2.device, M, N, glu) if split > 1 else (y, y, y)
    if norm is not None and (rms_eps is None or norm.shape != (K,)):
        raise ValueError(f"int8 GEMV: RMSNorm weight of shape {tuple(norm.shape)} for rows of {K} "
                         f"(and rms_eps={rms_eps})")
    even = K % bk == 0 and N % bn == 0
    if ws is None and not qw.dtype.is_floating_point:
        raise ValueError(f"GEMV: a {qw.dtype} weight needs its scales")
    scale = ws is not None
    ws = ws if scale else y  # never read without SCALE
    ReadOnly(_gemv)[(triton.cdiv(N, bn), split)](
        x2, qw, ws, b if b is not None else ws, r if r is not None else y, y, acc, cnt,
        norm if norm is not None else ws, ss, float(rms_eps or 0.0), M, N, K, K // split,
        x2.stride(0), x2.stride(1), qw.stride(0), qw.stride(1), *(r.stride() if r is not None else (0, 0)),
        y.stride(0), y.stride(1), HAS_BIAS=b is not None, HAS_RES=r is not None, GLU=glu, NORM=rms_eps is not None,
        GAMMA=norm is not None, SCALE=scale,
        EVEN=even,
        IEEE=x2.dtype == torch.float32, CVT=cvt, SPLIT=split, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)


def _workspace(device: torch.device, M: int, N: int, glu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The zeroed fp32 partial-sum buffer, tile counters and RMSNorm sums of squares (per column block) of
    split-K for one (M, N); each call leaves them zeroed again. Kernels of one stream run one after the other, so layers of one shape share them."""
    key = (str(device), M, N, glu)
    if key not in _WORK:
        _WORK[key] = (torch.zeros((2 if glu else 1) * M * N, device=device, dtype=torch.float32),
                      torch.zeros(triton.cdiv(N, 16), device=device, dtype=torch.int32),
                      torch.zeros(triton.cdiv(N, 16) * 16, device=device, dtype=torch.float32))
    return _WORK[key]


def checked(cands: list, run, y: Tensor, ref: Tensor, tol: float, what: str) -> list:
    """The configs whose output, twice over a poisoned `y` (split-K leaves state behind), is within `tol`
    (relative) of `ref`; `run(c)` writes config c's result into y. The others are dropped with a warning
    naming `what` (a config must never win by being wrong)."""
    good = []
    for c in cands:
        try:
            errs = []
            for _ in range(2):
                y.fill_(float("nan"))
                run(c)
                errs.append(((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item())
        except Exception as e:  # noqa: BLE001 - e.g. more shared memory than this GPU has
            errs = [str(e)[:200]]
        if all(isinstance(e, float) and e < tol for e in errs):
            good.append(c)
        else:
            logging.getLogger(__name__).warning("fxcc: %s config %s is wrong (%s); dropped", what, c, errs)
    return good


def time_candidates(cands: list, call, copies: int, rounds: int = 3, timings: bool = False) -> dict:
    """ms per call of each candidate, `call(cand, i)` running it on operand copy i (the copies together
    larger than the L2, as a model's weights stream from memory at decode). Each candidate's `copies` calls
    are one CUDA graph (as the runtime replays a step); `rounds` interleaved replays, median (`timings`: the
    Timing of each, for a decision beyond the noise). A candidate that fails to compile, launch or capture is
    left out."""
    graphs = {}
    for c in cands:
        def calls(c=c):
            for i in range(copies):
                call(c, i)
        try:
            call(c, 0)  # compiles, and makes split-K workspaces, outside the capture
            graphs[c], _ = capture_graph(calls, warmup=0)
        except Exception:  # noqa: BLE001 - e.g. a config over this GPU's shared memory
            torch.cuda.synchronize()
            continue
    got = graph_timings(graphs, calls=copies, rounds=rounds)
    return got if timings else {c: t.median for c, t in got.items()}


def stream_copies(nbytes: int) -> int:
    """How many copies of an operand of `nbytes` make twice the GPU's L2 (at most 48)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    return max(2, min(48, -(-2 * l2 // max(1, nbytes))))
