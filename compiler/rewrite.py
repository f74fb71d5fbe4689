"""Rewrite patterns and the greedy driver that applies them until nothing changes (MLIR/xDSL style)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .ir import _fake_of, conv_backends_unguarded


class Rewriter:
    """Builds replacement nodes next to the node being rewritten, with shapes and provenance filled in."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def call(self, target: Any, args: tuple, kwargs: dict | None = None, *, at: fx.Node) -> fx.Node:
        """Insert `target(*args, **kwargs)` just before `at`; meta['val'] is computed, provenance copied."""
        with self.gm.graph.inserting_before(at):
            node = self.gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in at.meta:
                node.meta[key] = at.meta[key]
        node.meta["val"] = self.infer(node)
        return node

    def infer(self, node: fx.Node) -> Any:
        def fake(n: fx.Node) -> Any:
            v = n.meta.get("val")
            return _fake_of(self.mode, v) if isinstance(v, torch.Tensor) else v

        args = fx.node.map_arg(node.args, fake)
        kwargs = fx.node.map_arg(node.kwargs, fake)
        with self.mode, conv_backends_unguarded():  # a conv built here (a BN folded in) as propagation runs one
            return node.target(*args, **kwargs)

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Route every use of `old` to `new`; dead producers are left for dead-code elimination."""
        old.replace_all_uses_with(new)
        if not old.users:
            self.gm.graph.erase_node(old)


class Pattern:
    """One rewrite: `match_and_rewrite` returns False at the first non-match, True after rewriting."""

    name: str = ""

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        raise NotImplementedError


def apply_patterns(gm: fx.GraphModule, patterns: list[Pattern], max_rounds: int = 10) -> Counter:
    """Apply patterns to every call node, greedily, until a round rewrites nothing. Returns hit counts."""
    rw = Rewriter(gm)
    hits: Counter = Counter()
    for _ in range(max_rounds):
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            for p in patterns:
                if p.match_and_rewrite(node, rw):
                    hits[p.name or type(p).__name__] += 1
                    changed = True
                    break
        if not changed:
            break
        gm.graph.eliminate_dead_code()
    return hits


# ------------------------------------------------------------------------- small matching helpers


def is_op(node: Any, *targets: Any) -> bool:
    """True when `node` is a call of one of `targets` (OpOverloads, or packets matching any overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(node.target, "overloadpacket", None) is t:
            return True
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None
