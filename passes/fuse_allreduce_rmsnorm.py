"""fuse-allreduce-rmsnorm: all_reduce -> (+ residual) -> rms_norm becomes one tx.all_reduce_rms_norm.

Reads and writes the tx level, after tp-shard. The fused op returns the normalised value and the new
residual (the sum), so other users of the sum keep working. With `split=true` the row-parallel projection
that feeds the all-reduce joins the op (tx.linear_all_reduce_rms_norm), whose tokens are split at about
`ratio` (whole 128-row tiles) so one part's all-reduce overlaps the other part's projection on a second
CUDA stream. `impl` picks the kernel (see fxcc.codegen.allreduce_rmsnorm): auto, symm, nccl, reference.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.dialects import ALL_REDUCE_IMPLS
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter, is_op, val

aten = torch.ops.aten
tx = torch.ops.fxcc_tx


def _match(norm: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(all_reduce, add, residual) when norm = rms_norm(all_reduce(x) + residual), else None."""
    if not is_op(norm, tx.rms_norm.default):
        return None
    add = norm.args[0]
    if not is_op(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    for ar, res in (add.args, add.args[::-1]):
        if (is_op(ar, tx.all_reduce.default) and ar.args[1] == "sum" and len(ar.users) == 1
                and isinstance(res, fx.Node) and val(res) is not None
                and val(res).shape == val(add).shape == val(ar).shape and val(res).dtype == val(ar).dtype):
            return ar, add, res
    return None


def _row_linear(x: fx.Node) -> bool:
    """x = linear(a, w) without bias, used only by the all-reduce: the projection can join the fused op."""
    return is_op(x, aten.linear.default) and len(x.args) == 2 and not x.kwargs and len(x.users) == 1


@dataclass(frozen=True)
class FuseAllReduceRMSNorm(Pass):
    """Fuse all-reduce + residual add + RMSNorm; optionally absorb the projection and split its tokens."""

    name = "fuse-allreduce-rmsnorm"
    reads = "tx"
    writes = "tx"
    impl: str = "auto"
    split: bool = False
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.impl not in ALL_REDUCE_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(ALL_REDUCE_IMPLS)}, got {self.impl!r}")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio is the first part's share of the tokens, in (0, 1); got {self.ratio}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm)
        fused = split = 0
        for norm in list(gm.graph.nodes):
            m = _match(norm)
            if m is None:
                continue
            ar, add, res = m
            x, group = ar.args[0], ar.args[2]
            weight, eps = norm.args[1], norm.args[2]
            absorb = self.split and _row_linear(x)
            # at the add: users of the sum may come before the norm
            if absorb:
                a, w = x.args
                f = rw.call(tx.linear_all_reduce_rms_norm.default,
                            (a, w, res, weight, eps, group, self.impl, fused, self.ratio), at=add)
                split += 1
            else:
                f = rw.call(tx.all_reduce_rms_norm.default, (x, res, weight, eps, group, self.impl, fused), at=add)
            y = rw.call(operator.getitem, (f, 0), at=add)
            s = rw.call(operator.getitem, (f, 1), at=add)
            norm.replace_all_uses_with(y)
            add.replace_all_uses_with(s)
            for n in (norm, add, ar) + ((x,) if absorb else ()):
                gm.graph.erase_node(n)
            fused += 1
        stats = {"fused": fused} | ({"split": split} if split else {})
        return PassResult(fused > 0, stats)
