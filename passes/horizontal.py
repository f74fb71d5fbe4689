"""horizontal: small ops of one kind on distinct graph inputs become one op (one kernel) over all of them.

A model that keeps state per layer repeats the same bookkeeping on each layer's own tensor: a transformers
StaticCache gives every layer a `cumulative_length` counter, and each layer's cache update computes
`arange(n) + counter` (where its keys go) and then `counter.add_(n)`. In a 16-layer decode step that is 32 tiny
int64 kernels that no CSE can merge (each reads another tensor, and every counter must end as eager leaves it).
This pass batches them:

- in-place updates `x.add_(c)` (`sub_`, `mul_`, `div_`) of distinct graph inputs by the same number become one
  `_foreach_add_([x0, x1, ...], c)` (one multi-tensor kernel on CUDA) after the last of them, where no node
  between an update and that point reads or writes the input (or a view of it);
- elementwise ops of one signature whose operands are graph inputs or constants (one output of at most
  `max_numel` elements each) become one op over their stacked operands, placed at the first of them, each
  result a row of it (`add(C, stack([x0, x1, ...]))[k]`), where no node before a member writes its inputs.

Exact: integer and float elementwise ops give the same values on a row of a stack as alone (the operands share
one dtype, so a 0-dim operand promotes no differently), and the writes keep their order relative to every node
that touches the memory they write. Like the captured graph itself, it takes distinct graph inputs as distinct
memory. Reads and writes tx/aten; run before fuse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.ir import is_view
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter

from .canonicalize import returned_values

log = logging.getLogger(__name__)

aten = torch.ops.aten
# an in-place update by a number -> the multi-tensor op that applies it to a list of tensors
FOREACH = {aten.add_.Tensor: aten._foreach_add_.Scalar, aten.add_.Scalar: aten._foreach_add_.Scalar,
           aten.sub_.Tensor: aten._foreach_sub_.Scalar, aten.sub_.Scalar: aten._foreach_sub_.Scalar,
           aten.mul_.Tensor: aten._foreach_mul_.Scalar, aten.mul_.Scalar: aten._foreach_mul_.Scalar,
           aten.div_.Tensor: aten._foreach_div_.Scalar, aten.div_.Scalar: aten._foreach_div_.Scalar}


@dataclass(frozen=True)
class Horizontal(Pass):
    """Batch per-input updates into one foreach op and per-input elementwise ops into one op over a stack.

    max_numel: the largest output (elements) of an elementwise op that is stacked (stacking copies its operands).
    """

    name = "horizontal"
    reads = "tx"
    writes = "tx"
    max_numel: int = 1024
    updates: bool = True
    elementwise: bool = True

    def __post_init__(self) -> None:
        if self.max_numel < 1:
            raise ValueError(f"max_numel must be >= 1, got {self.max_numel}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"updates": 0, "elementwise": 0}
        if self.updates:
            stats["updates"] = _batch_updates(gm)
        if self.elementwise:
            stats["elementwise"] = _batch_elementwise(gm, self.max_numel)
        if any(stats.values()):
            gm.graph.lint()
            gm.recompile()
        return PassResult(any(stats.values()), {k: v for k, v in stats.items() if v})


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _aliases(x: fx.Node) -> list[fx.Node]:
    """`x` and every value that may share its memory through the graph: views of it and results of ops that write
    it in place (which return it), transitively."""
    out, todo = [x], [x]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in out and u.op == "call_function" and is_view(u) and u.args and u.args[0] is n:
                out.append(u)
                todo.append(u)
    return out


def _update(node: fx.Node) -> tuple | None:
    """The group key of an in-place update by a number of a graph input, or None."""
    if node.op != "call_function" or node.target not in FOREACH or len(node.args) != 2:
        return None
    x, c = node.args
    alpha = node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"alpha"} or alpha != 1 or not isinstance(x, fx.Node) or x.op != "placeholder":
        return None
    v = x.meta.get("val")
    if not isinstance(v, torch.Tensor) or type(c) not in (int, float) or \
            (not v.dtype.is_floating_point and type(c) is not int):
        return None
    return (FOREACH[node.target], type(c), c, v.dtype, v.device)


def _batch_updates(gm: fx.GraphModule) -> int:
    groups: dict[tuple, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        key = _update(n)
        if key is not None:
            groups.setdefault(key, []).append(n)
    batched = 0
    for key, group in groups.items():
        if len({n.args[0] for n in group}) != len(group):
            continue  # one input updated twice: its updates stay in order
        order = _order(gm)
        while len(group) > 1:  # drop members something touches before the group's last update, until none does
            last = max(order[n] for n in group)
            keep = [n for n in group if not _touched_between(n, order, last)]
            if len(keep) == len(group):
                break
            group = keep
        if len(group) < 2:
            continue
        last = max(group, key=order.__getitem__)
        with gm.graph.inserting_after(last):
            each = gm.graph.call_function(key[0], ([n.args[0] for n in group], key[2]))
        each.meta["val"] = None
        for n in group:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
        log.debug("%d updates batched into %s", len(group), each.name)
        batched += len(group)
    return batched


def _touched_between(update: fx.Node, order: dict[fx.Node, int], last: int) -> bool:
    """Whether a node after `update` and up to position `last` reads or writes the memory `update` writes."""
    at = order[update]
    for a in _aliases(update.args[0]):
        for u in a.users:
            if u is not update and at < order[u] <= last:
                return True
    return False


def _elementwise(node: fx.Node, returned: set[fx.Node], max_numel: int) -> tuple | None:
    """The group key of an elementwise op on graph inputs and constants, or None: its target, its arguments with
    each tensor operand replaced by its shape, and the output's shape."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or torch.Tag.pointwise not in t.tags \
            or t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags or node in returned:
        return None
    out = node.meta.get("val")
    operands = node.all_input_nodes
    if not isinstance(out, torch.Tensor) or not operands or \
            any(a.op not in ("placeholder", "get_attr") for a in operands):
        return None
    vals = [a.meta.get("val") for a in operands]
    if not all(isinstance(v, torch.Tensor) and v.dtype == out.dtype == vals[0].dtype and v.device == out.device
               for v in vals):
        return None  # one dtype: a stacked 0-dim operand promotes as it did alone
    # static sizes only, tested before any comparison: one on a symbolic size would guard the variant to it
    if not all(type(s) is int for v in (out, *vals) for s in v.shape) or out.numel() > max_numel:
        return None

    def shape(a: object) -> object:
        if isinstance(a, fx.Node):
            return ("tensor", tuple(a.meta["val"].shape))
        if isinstance(a, (list, tuple)):
            return tuple(map(shape, a))
        return (type(a).__name__, a)

    return (t, shape(node.args), tuple(sorted((k, shape(v)) for k, v in node.kwargs.items())), tuple(out.shape),
            out.dtype, out.device)


def _batch_elementwise(gm: fx.GraphModule, max_numel: int) -> int:
    returned = returned_values(gm)
    groups: dict[tuple, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        key = _elementwise(n, returned, max_numel)
        if key is not None:
            groups.setdefault(key, []).append(n)
    rw, batched = Rewriter(gm), 0
    for key, group in groups.items():
        if len(group) < 2 or group[0].kwargs:
            continue
        order = _order(gm)
        first = group[0]
        group = [n for n in group if n is first or not _written_before(n, order, order[first])]
        # operands the members share stay as they are; the others are stacked
        varying = [i for i, a in enumerate(first.args)
                   if isinstance(a, fx.Node) and any(n.args[i] is not a for n in group)]
        if len(group) < 2 or not varying or any(not isinstance(a, fx.Node) and any(n.args[i] != a for n in group)
                                                for i, a in enumerate(first.args)):
            continue
        rank = len(key[3])
        args = list(first.args)
        for i in varying:
            shape = tuple(first.args[i].meta["val"].shape)
            stacked = rw.call(aten.stack.default, ([n.args[i] for n in group],), at=first)
            if len(shape) < rank:  # aligned with the output's dimensions, as broadcasting aligns each alone
                stacked = rw.call(aten.view.default, (stacked, [len(group), *[1] * (rank - len(shape)), *shape]),
                                  at=first)
            args[i] = stacked
        wide = rw.call(first.target, tuple(args), at=first)
        rows = [rw.call(aten.select.int, (wide, 0, k), at=first) for k in range(len(group))]
        for n, row in zip(group, rows):
            rw.replace(n, row)
        log.debug("%d %s batched", len(group), key[0])
        batched += len(group)
    return batched


def _written_before(node: fx.Node, order: dict[fx.Node, int], start: int) -> bool:
    """Whether a node from position `start` up to `node` may write one of `node`'s operands (an op that writes in
    place takes it, or a view of it, as an operand)."""
    at = order[node]
    for x in node.all_input_nodes:
        for a in _aliases(x):
            for u in a.users:
                if u is not node and start <= order[u] < at and u.op == "call_function" and \
                        isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable:
                    return True
    return False
