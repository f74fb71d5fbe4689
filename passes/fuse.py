"""fuse: group aten/tx ops into `kernel` ops (the lowering that decides fusion; codegen only emits).

Groups grow greedily in program order. A group has at most one anchor (a gemm or a convolution), or
reductions over one domain; pointwise ops join the group of a producer (as prologue of a reduction or epilogue
of an anchor), and merge the other pointwise groups they read;
views join their producer's group and never start one. Ops run by a library form single-op `extern`
kernels. Ops fxcc does not know (user custom ops, mutating ops, ops without shape functions, Python
calls) stay in the graph and run eagerly, marked with the reason, which `fxcc explain` reports.

With symbolic shapes, sizes are values of the graph (`aten.sym_size.int(%x, 1)` and arithmetic on
them). They stay outside kernels; a kernel that needs one (a view to `[s0, 128]`) recomputes it from the
tensor it is read from, which becomes a kernel input, so a kernel's inputs stay tensors and one built
kernel serves every size.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from fxcc import gather, ir
from fxcc.dialects import (
    KERNEL_OPS,
    REDUCTION,
    KernelBody,
    classify,
    dense_order,
    domain,
    intern_body,
    is_size,
)
from fxcc.passes.canonicalize import storage_written
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rng import draws_random
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

aten = torch.ops.aten


@dataclass(eq=False)
class Group:
    kind: str  # pointwise | reduction | gemm | extern
    first: int
    members: list[fx.Node] = field(default_factory=list)
    epoch: int = 0  # in-place writes before it: a group never spans one (see Fuse.apply)

    @property
    def anchored(self) -> bool:
        return self.kind != "pointwise"


@dataclass(frozen=True)
class Fuse(Pass):
    """Fusion grouping: aten/tx ops -> kernel.fused / kernel.extern ops (exact)."""

    name = "fuse"
    reads = "tx"
    writes = "kernel"
    max_group: int = 64

    def __post_init__(self) -> None:
        if self.max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {self.max_group}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        group_of: dict[fx.Node, Group] = {}
        groups: list[Group] = []
        eager = 0
        # An op writing memory in place or drawing random numbers is a barrier: no group spans it, and the rebuilt
        # graph keeps every unit on its side (a read of that memory through another alias has no data edge to
        # the write; draws stay in eager's order). Values
        # whose memory is written stay out of kernels: a kernel's output may be a copy, the write would miss.
        written, epoch, epoch_of = storage_written(gm), 0, {}
        returned = _returned_views(gm)
        for node in nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            if _barrier(node):
                epoch += 1
            epoch_of[node] = epoch
            cat, reason = classify(node)
            if cat not in ("eager", "size") and node in written:
                cat, reason = "eager", ir.EAGER_WRITTEN
            if cat == "size":
                continue
            if cat == "eager":
                node.meta["fxcc_eager"] = reason
                eager += 1
                continue
            # a view the graph returns stays a view of its base (a kernel output would be a copy: eager's result
            # shares memory with its base, another output or a value an in-place op writes)
            target = None if node in returned else self._choose(node, cat, group_of, pos, epoch)
            if target is not None and cat == "pointwise":
                _absorb(node, target, group_of, groups, pos)
            if target is None:
                if cat == "view":
                    continue  # a view of a graph input or of an eager value stays a plain view
                target = Group("pointwise" if cat == "pointwise" else cat, pos[node], epoch=epoch)
                groups.append(target)
            elif cat in ("reduction", "gemm"):
                target.kind = cat
            target.members.append(node)
            group_of[node] = target
        _sink_views(groups, group_of, pos)
        kept = [g for g in groups if _outputs_are_tensors(g, group_of)]
        stats = _rebuild(gm, nodes, pos, {n: g for n, g in group_of.items() if g in kept}, epoch_of)
        if eager:
            stats["eager"] = eager
        return PassResult(bool(kept), stats)

    def _choose(self, node: fx.Node, cat: str, group_of: dict, pos: dict, epoch: int) -> Group | None:
        """The producer group `node` may join, or None for a group of its own."""
        if cat in ("gemm", "extern"):
            return None
        candidates = []
        for x in node.all_input_nodes:
            g = group_of.get(x)
            if g is None or g in candidates or len(g.members) >= self.max_group or g.epoch != epoch:
                continue
            if cat == "pointwise" and g.kind == "extern":
                continue
            if cat == "reduction" and g.anchored and not _same_domain(g, node):
                continue
            candidates.append(g)
        for g in sorted(candidates, key=lambda g: -g.first):
            if not any(x not in g.members and _depends_on(x, g, group_of, pos) for x in node.all_input_nodes):
                return g
        return None


def _returned_views(gm: fx.GraphModule) -> set[fx.Node]:
    """The view ops whose results the graph returns, and the views those are taken from in turn."""
    out: set[fx.Node] = set()
    stack = [a for a in gm.graph.output_node().all_input_nodes]
    while stack:
        n = stack.pop()
        if n in out or n.op != "call_function" or classify(n)[0] != "view":
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out


def _same_domain(g: Group, node: fx.Node) -> bool:
    """Whether reduction `node` reduces what every reduction of group `g` reduces (so they share loops)."""
    d = domain(node)
    return (g.kind == "reduction" and d is not None
            and all(domain(m) == d for m in g.members if m.target in REDUCTION))


def _absorb(node: fx.Node, g: Group, group_of: dict, groups: list[Group], pos: dict) -> None:
    """Merge into `g` (which pointwise `node` joins) the other pointwise groups `node` reads, when their
    values have node's shape (or `node` copies them: a concatenation, a pad) and no value outside both groups
    runs between them (no cycle)."""
    shape = node.meta["val"].shape
    for x in node.all_input_nodes:
        h = group_of.get(x)
        if h is None or h is g or h.kind != "pointwise" or h.epoch != g.epoch:  # never across an in-place write
            continue
        if any(not isinstance(m.meta.get("val"), torch.Tensor) or (not ir.same_shape(m.meta["val"].shape, shape)
                                                                    and node.target not in gather.COPIES)
               for m in h.members):
            continue
        outside = [i for a, b in ((h, g), (g, h)) for m in a.members for i in m.all_input_nodes
                   if group_of.get(i) not in (g, h)]
        if any(_depends_on(i, g, group_of, pos) or _depends_on(i, h, group_of, pos) for i in outside):
            continue
        g.members = sorted(g.members + h.members, key=pos.__getitem__)
        g.first = min(g.first, h.first)
        for m in h.members:
            group_of[m] = g
        groups.remove(h)


def _sink_views(groups: list[Group], group_of: dict, pos: dict) -> None:
    """Move a view that only another kernel reads into that kernel, when it is gapped (a slice of a row,
    a step of a sequence): as an output of its producer it would be written densely and then copied into eager's
    gapped layout at every call (the stride contract); read by its consumer through strides, the producer writes
    its dense base once. Chains of views move together, last view first."""
    for g in groups:
        moved = True
        while moved:
            moved = False
            for m in reversed(g.members):
                h = _view_consumer(m, g, group_of)
                if h is None:
                    continue
                g.members.remove(m)
                h.members = sorted(h.members + [m], key=pos.__getitem__)
                h.first = min(h.first, pos[m])
                group_of[m] = h
                moved = True


def _view_consumer(m: fx.Node, g: Group, group_of: dict) -> Group | None:
    """The one group of `g`'s epoch that reads view `m` of `g`, when `m` is gapped, its base is a value of `g` and
    nothing in `g` reads `m`; else None."""
    t, val = m.target, m.meta.get("val")
    if (not isinstance(t, torch._ops.OpOverload) or classify(m)[0] != "view" or not isinstance(val, torch.Tensor)
            or not all(type(d) is int for d in (*val.shape, *val.stride())) or dense_order(val.shape, val.stride())):
        return None
    bases = [x for x in m.all_input_nodes if not is_size(x)]
    if len(bases) != 1 or group_of.get(bases[0]) is not g:
        return None
    readers = {group_of.get(u) for u in m.users}
    if len(readers) != 1:
        return None
    h = readers.pop()
    if h is None or h is g or h.epoch != g.epoch:
        return None
    return h


def _depends_on(x: fx.Node, g: Group, group_of: dict, pos: dict) -> bool:
    """Whether value `x` is computed from group `g` (so `g` taking a consumer of `x` would make a cycle)."""
    stack, seen = [x], set()
    while stack:
        y = stack.pop()
        if y in seen or pos[y] < g.first:
            continue
        seen.add(y)
        h = group_of.get(y)
        if h is g:
            return True
        stack.extend(i for m in (h.members if h else [y]) for i in m.all_input_nodes)
    return False


def _outputs_are_tensors(g: Group, group_of: dict) -> bool:
    return all(isinstance(m.meta.get("val"), torch.Tensor)
               for m in g.members if any(group_of.get(u) is not g for u in m.users))


def _barrier(node: fx.Node) -> bool:
    """An op no group spans and every unit stays on its side of: a write in place (a read of that memory through
    another alias has no data edge to it) or a random draw (draws keep eager's order: fxcc.rng)."""
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and (
        t._schema.is_mutable or draws_random(node))


def _rebuild(gm: fx.GraphModule, nodes: list[fx.Node], pos: dict, group_of: dict, epoch_of: dict) -> dict:
    """Emit a new graph: groups become kernel ops, placed by a stable topological order of the units that
    keeps each unit on its side of every in-place write (`epoch_of`)."""
    def unit(n):
        return group_of.get(n, n)

    def members(u):
        return u.members if isinstance(u, Group) else [u]

    units = list(dict.fromkeys(unit(n) for n in nodes))
    deps = {u: {unit(i) for m in members(u) for i in m.all_input_nodes} - {u} for u in units}
    epochs: dict[int, list] = {}
    for u in units:
        if not isinstance(u, Group) and u.op == "output":
            continue  # emitted last anyway
        epochs.setdefault(u.epoch if isinstance(u, Group) else epoch_of.get(u, 0), []).append(u)
    barriers = {epoch_of[n]: n for n in nodes if _barrier(n)}
    for e, barrier in barriers.items():
        deps[barrier] |= set(epochs.get(e - 1, []))
        deps[barrier] |= {b for f, b in barriers.items() if f < e}
        for u in epochs.get(e, []):
            if u is not barrier:
                deps[u].add(barrier)
    users: dict = {u: [] for u in units}
    for u, ds in deps.items():
        for d in ds:
            users[d].append(u)
    first = {u: min(pos[m] for m in members(u)) for u in units}
    order = {u: i for i, u in enumerate(units)}
    waiting = {u: len(ds) for u, ds in deps.items()}
    ready = [(first[u], order[u], u) for u in units if waiting[u] == 0]
    heapq.heapify(ready)
    graph, env = fx.Graph(), {}
    stats = {"kernels": 0, "extern": 0}
    output_node = None
    while ready:
        _, _, u = heapq.heappop(ready)
        if isinstance(u, Group):
            _emit_group(graph, env, u, group_of, stats)
        elif u.op == "output":
            output_node = u
        else:
            env[u] = graph.node_copy(u, lambda n: env[n])
        for v in users[u]:
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(ready, (first[v], order[v], v))
    graph.node_copy(output_node, lambda n: env[n])
    for n in reversed(graph.nodes):  # sizes only kernels read are recomputed inside them
        if is_size(n) and not n.users:
            graph.erase_node(n)
    gm.graph = graph
    stats["unique"] = len({n.args[1] for n in graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS})
    return {k: v for k, v in stats.items() if v}


def _emit_group(graph: fx.Graph, env: dict, g: Group, group_of: dict, stats: dict) -> None:
    used = dict.fromkeys(i for m in g.members for i in m.all_input_nodes if group_of.get(i) is not g)
    sizes = _size_closure([i for i in used if is_size(i)])
    inputs = list(dict.fromkeys([i for i in used if not is_size(i)] +
                                [i for s in sizes for i in s.all_input_nodes if not is_size(i)]))
    scalars = {i for i in inputs if not isinstance(i.meta.get("val"), torch.Tensor)}
    outputs = [m for m in g.members if any(group_of.get(u) is not g for u in m.users)]
    kb = _register_body(g, inputs, outputs, sizes, scalars)
    op = torch.ops.fxcc_kernel.extern.default if g.kind == "extern" else torch.ops.fxcc_kernel.fused.default
    args = [_as_tensor(graph, env[i], g) if i in scalars else env[i] for i in inputs]
    call = graph.create_node("call_function", op, (args, kb.key), name=g.kind)
    call.meta["val"] = [o.meta["val"] for o in outputs]
    call.meta["nn_module_stack"] = g.members[-1].meta.get("nn_module_stack", {})
    for j, o in enumerate(outputs):
        get = graph.call_function(operator.getitem, (call, j))
        get.meta = {"val": o.meta["val"]}
        env[o] = get
    stats["extern" if g.kind == "extern" else "kernels"] += 1


def _as_tensor(graph: fx.Graph, x: fx.Node, g: Group) -> fx.Node:
    """An int input of the graph (a cache length kept as an int) or a float one (a symbolic float argument) as
    the 0-d tensor a kernel takes (int64, float64: the Python number exactly), on the device of the group's
    values, so a CUDA graph reads it like any input (its value is part of the key)."""
    device, dtype = _device(g), _scalar_dtype(x)
    node = graph.call_function(aten.scalar_tensor.default, (x,), {"dtype": dtype, "device": device})
    mode = next((m.meta["val"].fake_mode for m in g.members if isinstance(m.meta.get("val"), FakeTensor)), None)
    with mode or FakeTensorMode():
        node.meta["val"] = torch.empty((), dtype=dtype, device=device)
    return node


def _scalar_dtype(x: fx.Node) -> torch.dtype:
    return torch.float64 if isinstance(x.meta.get("val"), (float, torch.SymFloat)) else torch.int64


def _device(g: Group) -> torch.device:
    return next((m.meta["val"].device for m in g.members if isinstance(m.meta.get("val"), torch.Tensor)),
                torch.device("cpu"))


def _size_closure(nodes: list[fx.Node]) -> list[fx.Node]:
    """The size computations `nodes` are built from, in program order (inputs before users)."""
    seen: dict[fx.Node, None] = {}

    def visit(n: fx.Node) -> None:
        if n in seen or not is_size(n):
            return
        for i in n.all_input_nodes:
            visit(i)
        seen[n] = None

    for n in nodes:
        visit(n)
    return list(seen)


def _register_body(g: Group, inputs: list[fx.Node], outputs: list[fx.Node],
                   sizes: list[fx.Node] = (), scalars: set[fx.Node] = frozenset()) -> KernelBody:
    """The group as a GraphModule with canonical names, so identical layers share one kernel; the sizes it
    uses are recomputed from its inputs (an int input, passed as a 0-d tensor, is read back)."""
    body, env = fx.Graph(), {}
    for i, x in enumerate(inputs):
        env[x] = body.placeholder(f"in{i}")
        if x in scalars:
            with FakeTensorMode():
                env[x].meta["val"] = torch.empty((), dtype=_scalar_dtype(x), device=_device(g))
            env[x] = body.call_function(aten.item.default, (env[x],))
        env[x].meta["val"] = x.meta.get("val")
    for i, s in enumerate(sizes):
        env[s] = body.create_node("call_function", s.target, fx.node.map_arg(s.args, lambda n: env[n]),
                                  fx.node.map_arg(s.kwargs, lambda n: env[n]), name=f"size{i}")
        env[s].meta["val"] = s.meta.get("val")
    for i, m in enumerate(g.members):
        env[m] = body.create_node("call_function", m.target, fx.node.map_arg(m.args, lambda n: env[n]),
                                  fx.node.map_arg(m.kwargs, lambda n: env[n]), name=f"v{i}")
        env[m].meta["val"] = m.meta.get("val")
    body.output(tuple(env[o] for o in outputs))
    body_gm = fx.GraphModule(torch.nn.Module(), body)
    text = ir.kernel_text(body_gm, g.kind)
    return intern_body(KernelBody(f"k{ir.fingerprint(text)}", g.kind, body_gm, text))

