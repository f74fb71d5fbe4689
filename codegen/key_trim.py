"""Padding-aware attention on the CPU: attention over the keys its mask leaves, not over the padded length.

A batch of sentences padded to a fixed length (MiniLM at seq 128 holds 14-19 real tokens per row)
spends most of its attention time on keys the mask removes: their softmax weight is exactly zero,
and so is their contribution to the output. This kernel finds, from the mask, the first key index past
which every key is masked out in every row, and runs attention over the keys before it. Queries are
not trimmed: padded positions keep the output eager computes for them.

Exactness: a masked key has mask value -inf (boolean False) or at most half the dtype's lowest value
(HF's additive masks use the lowest value). Against a row's largest logit, which a live key keeps
finite, its exp underflows to 0.0, so dropping it changes no term of the sums, only their order.
Trimming is skipped when some row has no live key at all (eager then averages over every key).
The check reads the mask once per call (its stride-0 broadcast dimensions are not expanded).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from fxcc.dialects import TX_OPS
from torch import Tensor

name = "trim"


def applies(kb_body: fx.GraphModule, target: str) -> bool:
    """A CPU kernel body holding an attention whose mask is a tensor (what trimming reads)."""
    return target == "cpu" and any(
        n.op == "call_function" and n.target is torch.ops.fxcc_tx.attention.default and len(n.args) > 3
        and isinstance(n.args[3], fx.Node) for n in kb_body.graph.nodes)


def key_extent(mask: Tensor) -> int:
    """The number of leading keys attention must read: every key at or past it is masked out in every row
    of `mask` (boolean: True attends; float: added to the logits). The full key count when trimming would
    change the result (a row with no live key) or saves nothing."""
    n_keys = mask.shape[-1]
    # a broadcast (stride-0) dimension holds one distinct slice: read that one
    m = mask[tuple(0 if st == 0 and sz > 1 else slice(None) for sz, st in zip(mask.shape[:-1], mask.stride()[:-1]))]
    live = (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2).reshape(-1, n_keys)
    live = live.view(torch.uint8)  # max over bytes runs vectorised; any() over bools does not (8x here)
    if not bool(live.amax(-1).amin()):
        return n_keys
    cols = live.amax(0).nonzero()
    return int(cols[-1]) + 1


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """`tx.attention` over the keys `mask` leaves (see the module doc); the plain attention otherwise."""
    n = key_extent(mask) if (mask is not None and not is_causal and mask.shape[-1] == k.shape[-2]
                             and mask.device.type == "cpu") else k.shape[-2]
    if n == k.shape[-2]:
        return TX_OPS["attention"]._init_fn(q, k, v, mask, scale, is_causal)  # the reference: nothing to trim
    k, v, m = k[..., :n, :], v[..., :n, :], mask[..., :n]
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    # a handful of keys: two small batched products and a softmax beat the flash kernel's blocking
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    s = s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m)
    return torch.matmul(torch.softmax(s, -1), v)
