"""canonicalize: drop runtime asserts, fold parameter-only subgraphs into constants, CSE, DCE."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.ir import computed_from, fetch_attr, is_pending, is_view, peek_attr, written_in_place
from fxcc.pipeline import Pass, PassContext, PassResult

aten = torch.ops.aten

# Export-time checks that guard the traced shapes; fxcc's own guards cover them at the call boundary.
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}
# Value-preserving ops that only matter to autograd or to later mutation; with no mutation left in the
# graph (inference), their result is their input, as long as it also has their layout.
_IDENTITY = {aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default, aten.alias.default,
             aten.clone.default, aten.contiguous.default}
# Those of them that give eager's caller memory of its own, where the others return their input.
_COPIES = {aten.clone.default, aten.lift_fresh_copy.default}


def same_layout(a: object, b: object) -> bool:
    """Whether two recorded tensor values have one shape and the same strides (size-1 dimensions aside):
    where they differ, a `view` that works on one may fail on the other."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a.shape == b.shape and all(n <= 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _is_deterministic_op(node: fx.Node) -> bool:
    t = node.target
    if node.op != "call_function" or node.is_impure():
        return False
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in t.tags and not t._schema.is_mutable
    return t is operator.getitem


@dataclass(frozen=True)
class Canonicalize(Pass):
    """DCE, CSE and constant folding of parameter-only subgraphs (exact)."""

    name = "canonicalize"
    fold: bool = True
    cse: bool = True
    max_fold_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.max_fold_mb < 0:
            raise ValueError(f"max_fold_mb must be >= 0, got {self.max_fold_mb}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"asserts": 0, "functionalized": 0, "identity": 0, "folded": 0, "cse": 0, "dce": 0}
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _ASSERTS:
                gm.graph.erase_node(node)
                stats["asserts"] += 1
        stats["functionalized"] = functionalize_fresh(gm)
        stats["identity"] = _drop_identities(gm)
        if self.cse:  # first too: equal values computed from constants (each layer's `arange`) fold into one buffer
            stats["cse"] = _cse(gm)
        if self.fold:
            stats["folded"] = self._fold(gm)
        if self.cse:
            stats["cse"] += _cse(gm)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        stats["dce"] = before - len(gm.graph.nodes)
        return PassResult(any(stats.values()), {k: v for k, v in stats.items() if v})

    def _fold(self, gm: fx.GraphModule) -> int:
        """Evaluate nodes computed only from parameters/buffers/constants; store results as buffers."""
        const: dict[fx.Node, object] = {}
        sources: dict[fx.Node, list] = {}  # the parameters, buffers and constants each value is computed from
        written = storage_written(gm)  # folded, these would be shared constants mutated by every call
        for node in gm.graph.nodes:
            if node in written:
                continue
            if node.op == "get_attr":
                held = peek_attr(gm, node.target)
                if is_pending(held) and held.dim() > 1:
                    continue  # a matrix still in its checkpoint (tp-shard may read a slice of it): not folded
                const[node] = fetch_attr(gm, node.target)
                sources[node] = [const[node]]
            elif node.op == "call_function" and _is_deterministic_op(node):
                inputs = node.all_input_nodes
                if all(n in const for n in inputs):
                    args = fx.node.map_arg(node.args, lambda n: const[n])
                    kwargs = fx.node.map_arg(node.kwargs, lambda n: const[n])
                    with torch.no_grad():
                        const[node] = node.target(*args, **kwargs)
                    sources[node] = [t for n in inputs for t in sources[n]]
        # materialise only the frontier: folded nodes used by non-folded ones, computed by a real op
        folded = 0
        budget = self.max_fold_mb * 2**20
        returned = returned_values(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node not in const or (is_view(node) and not _of_computed(node)):
                continue  # a view of a parameter stays a view of it (no copy of a weight)
            value = const[node]
            if not isinstance(value, torch.Tensor):
                continue
            if all(u in const for u in node.users):
                continue
            if node in returned:
                continue  # a returned constant, or one a returned view looks at, would be one tensor shared by
                # every call's result: the caller writing one result would change the next
            size = value.numel() * value.element_size()
            if size > budget:
                continue
            budget -= size
            name = _fresh(gm, f"_folded_{node.name}")
            value = value.contiguous() if not value.is_contiguous() else value
            gm.register_buffer(name, computed_from(value, *sources[node]), persistent=False)
            # with the parameters, before any computation (passes that add parameters append them there)
            first = next(n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr"))
            with gm.graph.inserting_before(first):
                attr = gm.graph.get_attr(name)
            attr.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
            node.replace_all_uses_with(attr)
            folded += 1
        return folded


def _of_computed(node: fx.Node) -> bool:
    """Whether view `node` looks at a value computed from parameters (a batch norm's scale), not at one."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "call_function"


def view_chain(node: fx.Node) -> list[fx.Node]:
    """`node` and the values it may look at the memory of: its chain of views, back to the value it starts from."""
    chain = [node]
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node) and not _copies(node):
        node = node.args[0]
        chain.append(node)
    return chain


def _copies(node: fx.Node) -> bool:
    """A `contiguous` whose input is recorded in another layout: eager gives it memory of its own (the schema's
    alias annotation covers the case where the input is contiguous already)."""
    if node.target is not aten.contiguous.default:
        return False
    a, b = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not same_layout(a, b)


def returned_values(gm: fx.GraphModule) -> set[fx.Node]:
    """The values the graph returns and those a returned view looks at. Each is memory the caller holds: a second
    value merged into one (CSE), a copy of an input, a weight or another output forwarded to one, or a constant
    folded into one, would make two outputs eager returns apart share memory, or an output be the caller's input,
    a weight or the result of another call."""
    return {n for out in gm.graph.output_node().all_input_nodes for n in view_chain(out)}


def storage_written(gm: fx.GraphModule) -> set[fx.Node]:
    """Values whose memory some op writes in place: the written values, the values they are views of, and
    every view of those. Two of them may not be merged (CSE) nor folded into one shared constant."""
    written = written_in_place(gm)
    if not written:
        return set()
    out = {view_chain(n)[-1] for n in written}
    for n in gm.graph.nodes:  # program order: a view comes after what it views
        if is_view(n) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in out:
            out.add(n)
    return out


def _out_of_place(target: object) -> torch._ops.OpOverload | None:
    """`aten.mul.Tensor` for `aten.mul_.Tensor`: the functional overload of an in-place aten op, if any."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def functionalize_fresh(gm: fx.GraphModule) -> int:
    """In-place ops on values the graph computed itself (`v = x * 2; v.mul_(y)`) become their functional
    op, read from then on instead of the written value: the op fuses instead of running eagerly. Only where
    nothing else sees that memory: the written value is no view and no input, no view of it was taken, and the
    functional op has its dtype (`mul_` of a float16 value by a float32 one stays float16; `mul` would not)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for node in list(gm.graph.nodes):
        functional = _out_of_place(node.target) if node.op == "call_function" else None
        if functional is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        a = node.args[0]
        val = a.meta.get("val")
        if a.op != "call_function" or is_view(a) or not isinstance(val, torch.Tensor) or \
                not val.dtype.is_floating_point or any(is_view(u) and u is not node for u in a.users):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor) or out.shape != val.shape or out.dtype != val.dtype or \
                torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        if any(a is not t and isinstance(t, fx.Node) and (
                not isinstance(t.meta.get("val"), torch.Tensor) or t.meta["val"].dtype != val.dtype)
               for t in (*node.args, *node.kwargs.values())):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(functional, node.args, node.kwargs)
        new.meta = dict(node.meta)
        order[new] = order[node]
        for u in list(a.users):
            if u is not node and order.get(u, -1) > order[node]:
                u.replace_input_with(a, new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.recompile()
    return done


def _drop_identities(gm: fx.GraphModule) -> int:
    """Forward detach/clone/contiguous/lift_fresh_copy (and dropout with train=False) to their input when
    nothing in the graph mutates a value and the input has the result's layout (a `.contiguous()` before a
    `view` stays). A returned copy stays where its input is an input, a weight or another output's memory."""
    mutating = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                and n.target._schema.is_mutable and n.target is not aten.detach_.default]
    if mutating:
        return 0
    dropped = 0
    returned = returned_values(gm)
    for node in list(gm.graph.nodes):
        inference_dropout = node.target in (aten.dropout.default, aten.feature_dropout.default) and (
            node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True) is False)
        if node.op == "call_function" and (inference_dropout or node.target in _IDENTITY):
            src = node.args[0]
            if not same_layout(src.meta.get("val"), node.meta.get("val")):
                continue
            if node.target is aten.detach_.default and any(u.op == "output" for u in node.users):
                continue
            if node.target in _COPIES and node in returned:
                chain = view_chain(src)
                if chain[-1].op != "call_function" or returned.intersection(chain):
                    continue
                returned.update(chain)
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def _fresh(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _freeze(a):
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_freeze(x) for x in a))
    if isinstance(a, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in a.items()))
    if isinstance(a, fx.Node):
        return ("node", a)
    if isinstance(a, float):
        return ("float", a)
    if isinstance(a, (int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(a).__name__, a)
    raise TypeError


def _cse(gm: fx.GraphModule) -> int:
    seen: dict[object, fx.Node] = {}
    hits = 0
    written = storage_written(gm)  # two fresh buffers that are written in place must stay two
    returned = returned_values(gm)  # and two returned ones: the caller holds two tensors
    for node in list(gm.graph.nodes):
        if node in written:
            continue
        if node.op == "get_attr":
            key = ("get_attr", node.target)
        elif node.op == "call_function" and _is_deterministic_op(node):
            try:
                key = (node.target, _freeze(node.args), _freeze(node.kwargs))
            except TypeError:
                continue
        else:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = node
        elif node in returned and prev in returned:
            continue
        else:
            if node in returned:
                returned.update(view_chain(prev))
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            hits += 1
    return hits
