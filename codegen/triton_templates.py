"""Triton templates with an epilogue slot: a tiled GEMM and flash attention.

Each function returns the source of one `@triton.jit` kernel whose shapes are literals and whose
meta-parameters (BLOCK_*, GROUP_M, num_warps, num_stages) come at launch. The epilogue lines, emitted
by fxcc.codegen.triton_gen from the kernel body, read the anchor's tile (`acc`) at the tile's index
(`mm, nn` for a GEMM; `bz, hz, om, od` for attention) and store every output under `mask`.
"""

from __future__ import annotations

import math


def _sig(*parts: list[str] | str) -> str:
    out: list[str] = []
    for p in parts:
        out.extend([p] if isinstance(p, str) else p)
    return ", ".join(out)


def gemm_source(*, args: list[str], a: str, b: str, outs: list[str], strides: list[str], m: int, n: int, k: int,
                dot_options: str, epilogue: str) -> str:
    """acc[BLOCK_M, BLOCK_N] = a[m, :] @ b[:, n] in fp32, tiles ordered in groups of GROUP_M rows."""
    sig = _sig(args, outs, ["stride_am", "stride_ak", "stride_bk", "stride_bn"], strides,
               ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr", "GROUP_M: tl.constexpr",
                "EVEN_K: tl.constexpr", "DOT_F32: tl.constexpr"])
    return f'''@triton.jit
def fxcc_gemm({sig}):
    # neighbouring programs take GROUP_M row tiles of one column band, so B tiles are reused from L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv({m}, BLOCK_M)
    tiles_n = tl.cdiv({n}, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows and columns past the edge read row / column 0 (their results are never stored)
    am = tl.where(rm < {m}, rm, 0)
    bn = tl.where(rn < {n}, rn, 0)
    a_ptrs = {a} + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = {b} + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv({k}, BLOCK_K)):
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs)
        else:
            kmask = rk < {k} - kk * BLOCK_K
            at = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter would multiply bf16 tiles as raw bits: widen them first
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt, acc{dot_options})
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mm = rm[:, None]
    nn = rn[None, :]
    mask = (mm < {m}) & (nn < {n})
{epilogue}
'''


def attention_source(*, args: list[str], q: str, k: str, v: str, mask: str | None, mask_bool: bool, outs: list[str],
                     strides: list[str], heads: int, group: int, tq: int, tk: int, d: int, scale: float, causal: bool,
                     fp32: bool, epilogue: str) -> str:
    """softmax(q k^T * scale [+ mask]) v per (query block, batch * head), online over key blocks.

    Query head h reads kv head h // group (grouped-query attention without copies). With `causal`, key
    blocks wholly left of the query block run unmasked and blocks right of the diagonal are skipped.
    """
    mask_strides = ["smb", "smh", "smq", "smk"] if mask else []
    sig = _sig(args, outs, ["sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd", "svb", "svh", "svt", "svd"],
               mask_strides, strides, ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "DOT_F32: tl.constexpr"])
    has_mask = mask is not None
    mask_base = f"{mask} + bz * smb + hz * smh" if mask else "q_base"
    smq, smk = ("smq", "smk") if mask else ("0", "0")
    call = (f"acc, m_i, l_i = fxcc_attention_block(acc, m_i, l_i, qt, k_base, v_base, mask_base, rm, rd, start, "
            f"skt, skd, svt, svd, {smq}, {smk}, {scale * math.log2(math.e)!r}, {tq}, {tk}, BLOCK_N, {{causal}}, "
            f"{has_mask}, {mask_bool}, {fp32}, DOT_F32)")
    if causal:
        loops = f'''    # keys left of this query block are visible to all of its rows; the diagonal blocks need the mask
    full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
    for start in range(0, full, BLOCK_N):
        {call.format(causal=False)}
    for start in range(full, tl.minimum((pid_m + 1) * BLOCK_M, {tk}), BLOCK_N):
        {call.format(causal=True)}'''
    else:
        loops = f'''    for start in range(0, {tk}, BLOCK_N):
        {call.format(causal=False)}'''
    return f'''@triton.jit
def fxcc_attention_block(acc, m_i, l_i, qt, k_base, v_base, mask_base, rm, rd, start, skt, skd, svt, svd, smq, smk,
                         qk_scale, TQ: tl.constexpr, TK: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, FP32: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """One key block: scores in base 2, running max m_i and sum l_i, rescaled accumulator."""
    rn = start + tl.arange(0, BLOCK_N)
    kt = tl.load(k_base + rn[None, :] * skt + rd[:, None] * skd, mask=rn[None, :] < TK, other=0.0)
    if DOT_F32:  # the CPU interpreter would multiply bf16 tiles as raw bits: widen them first
        qt = qt.to(tl.float32)
        kt = kt.to(tl.float32)
    if FP32:
        s = tl.dot(qt, kt, input_precision="ieee") * qk_scale
    else:
        s = tl.dot(qt, kt) * qk_scale
    keep = rn[None, :] < TK
    # a mask adds -inf, as eager does (a NaN or inf score under it stays NaN); future keys (causal) and lanes
    # past the end are dropped whatever their score
    if HAS_MASK:
        mv = tl.load(mask_base + rm[:, None] * smq + rn[None, :] * smk, mask=(rm[:, None] < TQ) & keep, other=0)
        if MASK_BOOL:
            s = s + tl.where(mv != 0, 0.0, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CAUSAL:
        keep = keep & (rn[None, :] <= rm[:, None])
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = tl.load(v_base + rn[:, None] * svt + rd[None, :] * svd, mask=rn[:, None] < TK, other=0.0)
    if FP32:
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
    elif DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32))
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return acc, m_new, l_i


@triton.jit
def fxcc_attention({sig}):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bz = bh // {heads}
    hz = bh % {heads}
    hk = hz // {group}
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, {d})
    q_base = {q} + bz * sqb + hz * sqh
    qt = tl.load(q_base + rm[:, None] * sqt + rd[None, :] * sqd, mask=rm[:, None] < {tq}, other=0.0)
    k_base = {k} + bz * skb + hk * skh
    v_base = {v} + bz * svb + hk * svh
    mask_base = {mask_base}
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, {d}), tl.float32)
{loops}
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row whose keys are all masked gives 0, as eager
    om = rm[:, None]
    od = rd[None, :]
    mask = (om < {tq}) & (od < {d})
{epilogue}
'''

