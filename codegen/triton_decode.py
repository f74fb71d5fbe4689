"""Decode attention split along the KV cache (flash-decoding), as Triton kernels.

A decode step has one query token per sequence, so attention has batch x heads rows of work: too few
programs for a GPU when the batch is small. The key/value length is split into chunks; a first kernel
computes, per (row, chunk), the chunk's softmax statistics (max, sum) and its weighted sum of values, and a
second combines the chunks. The cache length, batch and every stride are run-time arguments: one build
serves every step of a growing cache and every static-cache length.

Grouped-query heads read their KV head in place (no repeat), and a mask (boolean or additive, broadcast
over batch or heads) is read with zero strides along its broadcast dimensions.
"""

from __future__ import annotations

import math

import torch

SOURCE = '''
@triton.jit
def fxcc_decode_split(Q, K, V, M, PO, PM, PL, L, CHUNK, scale,
                      sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smn,
                      HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + d * sqd).to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(K + b * skb + hk * skh + n[:, None] * skn + d[None, :] * skd, mask=valid[:, None], other=0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        if HAS_MASK:
            if MASK_BOOL:
                keep = tl.load(M + b * smb + h * smh + n * smn, mask=valid, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s = s + tl.load(M + b * smb + h * smh + n * smn, mask=valid, other=0).to(tl.float32)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svn + d[None, :] * svd, mask=valid[:, None], other=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    row = bh * nsplit + split
    tl.store(PO + row * D + d, acc)
    tl.store(PM + row, m_i)
    tl.store(PL + row, l_i)


@triton.jit
def fxcc_decode_combine(PO, PM, PL, O, NSPLIT, sob, soh, sod,
                        HQ: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    valid = s < NSPLIT
    m = tl.load(PM + bh * NSPLIT + s, mask=valid, other=float("-inf"))
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)
    den = tl.sum(w * tl.load(PL + bh * NSPLIT + s, mask=valid, other=0), axis=0)
    part = tl.load(PO + (bh * NSPLIT + s[:, None]) * D + d[None, :], mask=valid[:, None], other=0)
    # a sequence whose mask keeps no key gives 0 (every chunk's sum is 0), as eager and the flash kernel give
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(den == 0.0, 1.0, den)
    tl.store(O + b * sob + h * soh + d * sod, out.to(O.dtype.element_ty))
'''


def splits_for(length: int, rows: int, block_n: int, target: int) -> int:
    """How many chunks to cut a cache of `length` into: enough programs (rows x chunks) to reach `target`,
    never a chunk shorter than one block."""
    blocks = max(1, math.ceil(length / block_n))
    return max(1, min(blocks, math.ceil(target / max(rows, 1)), 64))


def launcher(ns: dict, *, heads: int, group: int, head_dim: int, scale: float, mask_bool: bool | None,
             block_n: int, num_warps: int, target: int):
    """A function (q, k, v, mask) -> (B, heads, 1, head_dim) running the two kernels; `mask_bool` None when
    there is no mask. Every size but the head count and head dim is read from the tensors at each call."""
    split_fn, combine_fn = ns["fxcc_decode_split"], ns["fxcc_decode_combine"]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = q.shape[0], k.shape[2]
        rows = batch * heads
        nsplit = splits_for(length, rows, block_n, target)
        chunk = math.ceil(math.ceil(length / nsplit) / block_n) * block_n
        nsplit = max(1, math.ceil(length / chunk))
        dev = q.device
        po = torch.empty(rows * nsplit * head_dim, dtype=torch.float32, device=dev)
        pm = torch.empty(rows * nsplit, dtype=torch.float32, device=dev)
        pl = torch.empty(rows * nsplit, dtype=torch.float32, device=dev)
        out = torch.empty((batch, heads, 1, head_dim), dtype=q.dtype, device=dev)
        if mask is not None:
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            ms = [m.stride(0) if m.shape[0] != 1 else 0, m.stride(1) if m.shape[1] != 1 else 0, m.stride(3)]
        else:
            m, ms = q, [0, 0, 0]
        split_fn[(rows, nsplit)](q, k, v, m, po, pm, pl, length, chunk, scale,
                                 q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *ms,
                                 HQ=heads, GROUP=group, D=head_dim, BLOCK_N=block_n, HAS_MASK=mask is not None,
                                 MASK_BOOL=bool(mask_bool), num_warps=num_warps)
        combine_fn[(rows,)](po, pm, pl, out, nsplit, out.stride(0), out.stride(1), out.stride(3),
                            HQ=heads, D=head_dim, SPLITS=1 << max(0, math.ceil(math.log2(nsplit))), num_warps=1)
        return out

    return run
