"""merge-linears: linears that read the same input with constant weights become one wider linear.

Attention's Q, K and V projections (and a gated MLP's gate and up projections) each multiply the same
activations by their own weight. One GEMM over the weights concatenated at compile time reads the
activations once and runs at a size libraries handle better (3 x 384 -> 1152 columns for MiniLM); the
results are column slices of its output, which the kernels after it read through their strides.
The concatenated weight is the weights' only copy: the model's projection weights become views into its rows
(fxcc.ir.concat_rows), so merging adds no memory and an in-place update of a weight is one of the whole.

Exact within floating-point tolerance. On the CPU by default. On the GPU, linears of at most 16 rows (decode,
where the `gemv` pass makes one GEMV of the three Q/K/V projections and gives the gate/up pair its SwiGLU
epilogue); all linears with `gpu=true` (the GPU's prefill GEMMs were tuned without it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.ir import _fake_of, computed_from, concat_rows, fetch_attr, layout_breaks
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter, arg, is_op, val

from .canonicalize import _fresh
from .gemv import _decode_rows as _gemv_rows

log = logging.getLogger(__name__)

LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class MergeLinears(Pass):
    """Merge sibling linears (same input, constant 2-D weights, same dtype, all with or all without bias).

    max_mb: the largest concatenated weight made (weights that cannot become views of it stay beside a copy).
    gpu: merge every linear on the GPU too (without it, only decode-shaped ones: at most 16 rows).
    """

    name = "merge-linears"
    reads = "tx"
    writes = "tx"
    max_mb: int = 256
    gpu: bool = False

    def __post_init__(self) -> None:
        if self.max_mb < 0:
            raise ValueError(f"max_mb must be >= 0, got {self.max_mb}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.target not in ("cpu", "cuda"):
            return PassResult(False)
        decode_only = ctx.target == "cuda" and not self.gpu
        rw, merged, linears = Rewriter(gm), 0, 0
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for x in list(gm.graph.nodes):
            if decode_only and not _decode_rows(x):
                continue
            groups: dict[tuple, list[fx.Node]] = {}
            for u in x.users:
                sig = self._signature(gm, u, x)
                if sig is not None:
                    groups.setdefault(sig, []).append(u)
            for group in groups.values():
                if len(group) > 1 and self._merge(gm, rw, sorted(group, key=order.__getitem__)):
                    merged += 1
                    linears += len(group)
        return PassResult(merged > 0, {"merged": merged, "linears": linears} if merged else {})

    def _signature(self, gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> tuple | None:
        """What siblings must share to merge, or None when `node` is not a mergeable linear of `x`."""
        if not is_op(node, LINEAR) or node.args[0] is not x:
            return None
        w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
        if not isinstance(w, fx.Node) or w.op != "get_attr" or (b is not None and (not isinstance(b, fx.Node)
                                                                                  or b.op != "get_attr")):
            return None
        wv = val(w)
        if not isinstance(wv, torch.Tensor) or wv.dim() != 2 or not isinstance(fetch_attr(gm, w.target), torch.Tensor):
            return None
        return (wv.dtype, wv.device, int(wv.shape[1]), b is None)

    def _merge(self, gm: fx.GraphModule, rw: Rewriter, group: list[fx.Node]) -> bool:
        ws = [fetch_attr(gm, arg(u, 1, "weight").target) for u in group]
        if sum(w.numel() * w.element_size() for w in ws) > self.max_mb * 2**20:
            return False
        if why := _slices_break(rw, group, ws):
            log.debug("%s not merged: %s", [u.name for u in group], why)
            return False
        bs = [arg(u, 2, "bias") for u in group]
        first = group[0]
        args = [first.args[0], _constant(gm, rw, first, "_merged_weight", concat_rows(ws))]
        if bs[0] is not None:  # a copy: small, and kernels that read a bias through DLPack ask to write it, which
            # would move a copy-on-write storage watched for changes (fxcc.watch) to new memory at every call
            biases = [fetch_attr(gm, b.target) for b in bs]
            with torch.no_grad():
                bias = torch.cat([b.detach() for b in biases])
            args.append(_constant(gm, rw, first, "_merged_bias", computed_from(bias, *biases)))
        wide = rw.call(LINEAR, tuple(args), at=first)
        parts, start = [], 0
        for w in ws:  # every slice sits before the first linear, so each precedes all uses of its linear
            parts.append(rw.call(torch.ops.aten.slice.Tensor, (wide, -1, start, start + w.shape[0]), at=first))
            start += w.shape[0]
        for u, part in zip(group, parts):
            rw.replace(u, part)
        return True



def _decode_rows(x: fx.Node) -> bool:
    """Whether `x` is a decode step's input: at most 16 rows (all but its last dimension), or one token per
    sequence of a symbolic batch ([B, 1, K]), as the `gemv` pass takes them."""
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and _gemv_rows(v, 16)


def _slices_break(rw: Rewriter, group: list[fx.Node], ws: list[torch.Tensor]) -> str | None:
    """Why a node after one of the linears would break on its slice of the merged output, whose rows are as wide
    as all of them (a `view` that merges the batch into the heads, as F.multi_head_attention_forward's
    (T, B * heads, head_dim) does, cannot view a slice); None when all of them take it."""
    try:
        wide = _merged_value(rw, val(group[0].args[0]), ws)
    except RuntimeError as e:  # torch 2.11: a linear of symbolic rows copied into another fake mode cannot run
        return f"the merged output's layout could not be computed ({str(e).splitlines()[0]})"
    start = 0
    for u, w in zip(group, ws):
        with rw.mode:
            part = wide[..., start:start + w.shape[0]]
        start += w.shape[0]
        if why := layout_breaks(u, part):
            return why
    return None


def _merged_value(rw: Rewriter, x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """The merged linear's output as a fake tensor of the pass's mode."""
    w = ws[0]
    with rw.mode:
        weight = torch.empty(sum(int(w.shape[0]) for w in ws), w.shape[1], dtype=w.dtype, device=w.device)
        return LINEAR(x if getattr(x, "fake_mode", None) is rw.mode else _fake_of(rw.mode, x), weight)


def _constant(gm: fx.GraphModule, rw: Rewriter, at: fx.Node, base: str, value: torch.Tensor) -> fx.Node:
    """A new buffer of `gm` read by a get_attr placed before `at`."""
    name = _fresh(gm, base)
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(at):
        node = gm.graph.get_attr(name)
    node.meta["val"] = rw.mode.from_tensor(value)
    return node
