"""One boolean attention mask read by several attention calls (a decoder's layers all read the step's mask) made
into SDPA's additive mask once per call of the graph, not once per layer.

`F.scaled_dot_product_attention` turns a boolean mask into an additive one at every call: on a GPU two fills and an
elementwise kernel per layer, 48 of the about 300 kernels of a 16-layer decode step. `share` rewrites the executable
graph so that the layers reading one mask node read a `SharedMask` of it instead; `attention` converts the mask at
its first call for each set of shapes and backend and hands the additive mask to SDPA from then on.

Exact by construction, never by assumption:
- the conversion is SDPA's own for the backend it chooses for that call (`torch._fused_sdp_choice`): `where(not
  mask, -inf, 0)` in the query's dtype, and -65504 in place of -inf for cuDNN, as torch's attention does;
- the additive mask must lead SDPA to the same backend as the boolean one, else the call takes the boolean mask;
- before a (backend, dtype, device, kind of call) is served, the two are compared on the call's own query, keys and
  values under two made-up masks, one with no key allowed anywhere (where the backends' conventions differ) and a
  random one: only where the outputs are equal bit for bit (NaN where NaN) is the shared mask used, so a torch
  whose conversion differs from the one written here falls back to the per-call one. The check syncs with the
  device, so it is not run while a CUDA graph captures (a warm-up run before the capture makes it);
- a mask node is shared only where its readers are all attention calls: nothing writes it between two of them, and
  a `SharedMask` lives for one call of the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxcc.dialects import REFERENCE
from torch import Tensor

log = logging.getLogger(__name__)

_PLAIN = REFERENCE[torch.ops.fxcc_tx.attention.default]  # fxcc.dialects.attention: the library SDPA per call
_CUDNN = 3  # torch.nn.attention.SDPBackend.CUDNN_ATTENTION
_CHECKED: dict[tuple, bool] = {}  # (backend, dtype, device type, decode, gqa): whether sharing is exact
# where masks are shared: on a GPU the conversion is three kernels per layer; on the CPU it is a few microseconds,
# about what looking the shared mask up costs (16 layers of a decode step timed level within 1%)
DEVICES = ("cuda",)


class SharedMask:
    """A boolean mask and the additive masks made of it, for one call of the graph."""

    __slots__ = ("mask", "additive")

    def __init__(self, mask: Any):
        self.mask = mask
        self.additive: dict[tuple, Tensor | None] = {}


def share(graph: fx.Graph) -> int:
    """Attention calls reading one mask node, where every reader of that node is such a call and there are two or
    more and the mask is on one of `DEVICES`, read a `SharedMask` of it (made right after the mask). Returns how
    many masks are shared."""
    shared = 0
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _PLAIN and len(node.args) == 6 and not node.kwargs and \
                isinstance(node.args[3], fx.Node):
            readers.setdefault(node.args[3], []).append(node)
    for mask, calls in readers.items():
        val = mask.meta.get("val")
        if len(calls) < 2 or len(mask.users) != len(calls) or not isinstance(val, Tensor) or \
                val.device.type not in DEVICES:
            continue
        with graph.inserting_after(mask):
            box = graph.call_function(SharedMask, (mask,))
        for call in calls:
            call.args = (*call.args[:3], box, *call.args[4:])
            call.target = attention
        shared += 1
    return shared


def attention(q: Tensor, k: Tensor, v: Tensor, shared: SharedMask, scale: float, is_causal: bool) -> Tensor:
    """fxcc.dialects.attention with the mask of `shared`, made additive once per shapes and backend."""
    mask = shared.mask
    if not isinstance(mask, Tensor) or mask.dtype is not torch.bool or is_causal:
        return _PLAIN(q, k, v, mask, scale, is_causal)
    key = (q.shape, k.shape, v.shape, q.dtype, q.device)
    if key not in shared.additive:
        shared.additive[key] = _additive(q, k, v, mask, scale)
    additive = shared.additive[key]
    if additive is None:
        return _PLAIN(q, k, v, mask, scale, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale,
                                          enable_gqa=bool(k.shape[-3] != q.shape[-3]))


def convert(mask: Tensor, dtype: torch.dtype, backend: int) -> Tensor:
    """The additive mask SDPA makes of boolean `mask` for `backend`, in the query's `dtype`."""
    fill = -65504.0 if backend == _CUDNN else float("-inf")
    return torch.where(mask.logical_not(), fill, torch.scalar_tensor(0.0, dtype=dtype, device=mask.device))


def _additive(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor | None:
    """The additive mask for this call's shapes, where sharing it is exact (see the module doc), else None."""
    gqa = bool(k.shape[-3] != q.shape[-3])
    try:
        backend = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale, enable_gqa=gqa)
        additive = convert(mask, q.dtype, backend)
        if torch._fused_sdp_choice(q, k, v, additive, 0.0, False, scale=scale, enable_gqa=gqa) != backend:
            return None
    except (RuntimeError, TypeError) as e:  # a torch without this choice function or these arguments
        log.info("attention masks are converted per call: %s: %s", type(e).__name__, e)
        return None
    check = (backend, q.dtype, q.device.type, q.shape[-2] == 1, gqa)
    if check not in _CHECKED:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # no sync while capturing; the uncaptured warm-up before it checks
        _CHECKED[check] = _exact(q, k, v, mask, scale, gqa, backend)
        if not _CHECKED[check]:
            log.info("attention masks are converted per call for SDPA backend %d, %s on %s: the shared mask's "
                     "output differed from the boolean mask's", backend, q.dtype, q.device.type)
    return additive if _CHECKED[check] else None


def _exact(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, gqa: bool, backend: int) -> bool:
    """Whether SDPA gives the same output bit for bit on q, k, v under a boolean mask and its `convert`ed form,
    for a mask allowing no key and a random one (its own generator: the caller's random state is not drawn)."""
    gen = torch.Generator(device=mask.device).manual_seed(0)
    for made in (torch.zeros(mask.shape, dtype=torch.bool, device=mask.device),
                 torch.rand(mask.shape, generator=gen, device=mask.device) < 0.5):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=made, scale=scale, enable_gqa=gqa)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=convert(made, q.dtype, backend), scale=scale,
                                             enable_gqa=gqa)
        same = (got == want) | (got.isnan() & want.isnan())
        if got.dtype != want.dtype or got.shape != want.shape or not bool(same.all()):
            return False
    return True

