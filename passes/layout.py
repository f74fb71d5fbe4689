"""layout: a graph of 2-D convolutions kept channels-last from its first convolution to its outputs.

cuDNN's fast 16-bit convolutions read and write NHWC. Converting around each convolution (the per-kernel
`nhwc` candidates of fxcc.codegen.conv_layout) pays a copy of the input, the weight and the result at every
call; torch.compile instead keeps the whole graph channels-last. This pass does the same at the tx level,
before fusion, so every kernel after it records (and its generated code reads and writes) the new strides:

- each 2-D convolution's weight, when it is a constant, becomes a channels-last constant computed once now
  (`computed_from` the parameter: a change to it recompiles); a computed weight is converted in the graph;
- a convolution's input that is not channels-last (a graph input, the output of a view) is converted once,
  before the first convolution that reads it; one that already is is read as it is;
- every other op computes on what it is given (values do not depend on strides), so the layout flows through
  pointwise ops, norms, pooling and concatenation as eager's own ops would carry it;
- an op that cannot take the new layout (a `view` that fails on it, an op reading strides) and ops that want
  rows (GEMMs, tx ops other than pointwise) get a contiguous copy of what changed; graph outputs are copied
  back into eager's strides.

On CUDA the pass times the graph as torch runs it (eager ops, convolutions by cuDNN) three ways: as it was,
with every convolution on channels-last copies (the per-kernel candidates), and channels-last throughout;
it keeps the rewrite only where it beats both beyond the noise (fxcc.measure.decide). The layout copies in those
graphs run as the compile will run them (`as_compiled`: the generated kernels, tiled across the two layouts, each
with the pointwise ops fused into it), not as torch's copies, which read or write a stride apart and cost several
times as much (an H100, bf16 64x128x128x128: 0.77 ms into NHWC, 1.0 ms back; inductor's copy 0.25 ms).
`measure=false` applies it without timing (and so does a compile applying a plan). Off on the CPU unless `cpu=true` (tests:
exactness of the rewrite). Exact: only strides change.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.dialects import CONV, classify, dense_order, domain
from fxcc.measure import decide, interleaved, pinned_by
from fxcc.pipeline import Pass, PassContext, PassResult
from torch._subclasses.fake_tensor import FakeTensorMode

log = logging.getLogger(__name__)

aten = torch.ops.aten
CL = torch.channels_last
# what reads strides (or fails on a layout it was not traced with even when fake propagation passes)
_READS_STRIDES = {aten.as_strided.default, aten.sym_stride.int}
# ops whose result follows their operands' layout as eager's kernels carry it: kept channels-last
_POOLS = {aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool2d.default,
          aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.cat.default,
          aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.pad.default,
          aten.constant_pad_nd.default, aten._native_batch_norm_legit_no_training.default,
          aten.batch_norm.default, aten.group_norm.default, aten.native_group_norm.default}


def is_conv2d(node: fx.Node) -> bool:
    """A 2-D convolution (or transposed one) over 4-D floating operands."""
    if node.op != "call_function" or node.target not in CONV or len(node.args) < 2:
        return False
    return all(isinstance(a, fx.Node) and _four_d(a.meta.get("val")) for a in node.args[:2])


def _four_d(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype.is_floating_point


def channels_last(v: Any) -> bool:
    """A 4-D value laid out NHWC (and not also plainly contiguous, as a tensor with C = 1 or H = W = 1 is)."""
    return _four_d(v) and v.is_contiguous(memory_format=CL) and not v.is_contiguous()


# the pointwise chains (kernels) of a graph up to which the layout pass times every chain fused, as the compile
# runs it; beyond, only the layout copies with what they absorb are generated kernels in the timed graphs
EPILOGUE_REGIONS = 6


class NotApplied(Exception):
    """The rewrite cannot keep the graph exact (an output layout it cannot restore): the graph stays."""


@dataclass(frozen=True)
class Layout(Pass):
    """Channels-last through a graph holding 2-D convolutions (CUDA; `cpu=true` on the CPU too).

    measure: on CUDA, keep the rewrite only where the graph times faster with it (eager ops) than without.
    cpu: rewrite CPU graphs too (tests check it is exact there).
    """

    name = "layout"
    reads = "tx"
    writes = "tx"
    measures = True
    measure: bool = True
    cpu: bool = False

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.target != "cuda" and not (self.cpu and ctx.target == "cpu"):
            return PassResult(False)
        convs = [n for n in gm.graph.nodes if is_conv2d(n)]
        if not convs:
            return PassResult(False)
        if ir.symbolic_mode(gm) is not None:
            log.info("layout: sizes are symbolic; the graph stays in eager's layout")
            return PassResult(False)
        if ir.written_in_place(gm):
            log.info("layout: the graph writes memory in place; it stays in eager's layout")
            return PassResult(False)
        new = ir.clone_graph(gm)
        try:
            stats = rewrite(new, gm)
        except NotApplied as e:
            log.info("layout: %s; the graph stays in eager's layout", e)
            return PassResult(False, {"layout.kept_eager": 1})
        if ctx.target == "cuda" and self.measure and pinned_by() is None and not self._faster(gm, new, ctx):
            return PassResult(False, {"layout.measured_slower": 1})
        for name, value in new.named_buffers():
            if name.startswith("_channels_last_") and not hasattr(gm, name):
                gm.register_buffer(name, value, persistent=False)
        graph = fx.Graph()
        graph.output(graph.graph_copy(new.graph, {}))
        gm.graph = graph
        gm.recompile()
        return PassResult(True, stats)

    def _faster(self, gm: fx.GraphModule, new: fx.GraphModule, ctx: PassContext) -> bool:
        """Whether `new` (channels-last throughout) beats the graph as it is and with every convolution on
        channels-last copies, run as torch ops on the example inputs (their layout copies by the generated kernels
        where the context has them), beyond the noise."""
        args, kwargs = ctx.example_inputs if ctx.example_inputs else ((), {})
        flat, _ = ir.flatten_inputs(tuple(args), dict(kwargs))
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(flat) != len(holders) or not all(
                not isinstance(t, torch.Tensor) or tuple(t.shape) == tuple(h.meta["val"].shape)
                for t, h in zip(flat, holders)):
            log.info("layout: the example inputs do not match the graph's; applied without timing")
            return True
        local = ir.clone_graph(gm)
        per_conv(local)
        timed = {"nchw": gm, "per-conv": local, "channels-last": new}
        if ctx.pointwise_kernel is not None:  # the copies as the compile runs them, not as torch's slow copies
            # and, in a graph of few, every pointwise chain as the one kernel fusion makes of it, in all three
            # (each chain is one more kernel to build at this compile: many convolutions keep torch's ops). Not in
            # a graph with a reduction: that stays torch's op in the timed graphs, which the compile generates, and
            # with the chains fused its torch cost, unlike the generated kernel's, decides (conv2d_logsumexp_clamp on
            # an H100: per-conv chosen, 1.21 ms, against channels-last's 0.89 with the copies alone timed)
            epilogues = not any(n.op == "call_function" and classify(n)[0] == "reduction" for n in new.graph.nodes) \
                and len(_regions(new, False, True)) <= EPILOGUE_REGIONS
            if epilogues:
                timed["nchw"] = as_compiled(gm, ctx.pointwise_kernel, epilogues=True)
            timed["per-conv"] = as_compiled(local, ctx.pointwise_kernel, backs_only=True, epilogues=epilogues)
            timed["channels-last"] = as_compiled(new, ctx.pointwise_kernel, epilogues=epilogues)
        fns = {name: (lambda m=m: m(*flat)) for name, m in timed.items()}
        with torch.no_grad():
            timings = interleaved(fns, device="cuda", warmup=3, reps=20)
        incumbent = min(("nchw", "per-conv"), key=lambda n: timings[n].own)
        decision = decide(timings, incumbent)
        log.info("layout: %s", decision.summary())
        return decision.winner == "channels-last"


def _fresh(gm: fx.GraphModule, base: str, owner: fx.GraphModule | None) -> str:
    name, i = base, 0
    while hasattr(gm, name) or hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


class _Walk:
    """One pass over the graph in order, each node's value recomputed with FakeTensors as it goes."""

    def __init__(self, gm: fx.GraphModule, owner: fx.GraphModule | None = None):
        self.gm, self.graph, self.owner = gm, gm.graph, owner
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.eager = {n: n.meta.get("val") for n in gm.graph.nodes}  # the layouts eager gives
        self.copies: dict[tuple[fx.Node, Any], fx.Node] = {}  # (value, memory format) -> its copy
        self.weights: dict[fx.Node, fx.Node] = {}
        self.stats = {"layout.convolutions": 0, "layout.weights": 0, "layout.copies_in": 0,
                      "layout.copies_back": 0}

    def fake(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ir._fake_of(self.mode, v)
        if isinstance(v, (list, tuple)):
            return type(v)(self.fake(x) for x in v)
        return v

    def compute(self, node: fx.Node) -> Any:
        load = lambda a: fx.node.map_arg(a, lambda n: self.fake(n.meta.get("val")))  # noqa: E731
        with self.mode:
            return node.target(*load(node.args), **load(node.kwargs))

    def copy(self, x: fx.Node, fmt: torch.memory_format, at: fx.Node) -> fx.Node:
        """`x` copied into `fmt` before `at` (one copy per value and format, shared by later readers)."""
        key = (x, fmt)
        if key not in self.copies:
            with self.graph.inserting_before(at):
                c = self.graph.call_function(aten.clone.default, (x,), {"memory_format": fmt})
            for k in ("nn_module_stack", "stack_trace"):
                if k in x.meta:
                    c.meta[k] = x.meta[k]
            c.meta["val"] = self.compute(c)
            self.copies[key] = c
        return self.copies[key]

    def weight(self, w: fx.Node, at: fx.Node) -> fx.Node:
        """A convolution weight channels-last: a constant computed now, or a copy in the graph."""
        if channels_last(w.meta["val"]) or w.meta["val"].is_contiguous(memory_format=CL) and w.op == "get_attr":
            return w
        if w.op != "get_attr":
            return self.copy(w, CL, at)
        if w not in self.weights:
            source = ir.fetch_attr(self.gm, w.target)
            with torch.no_grad():
                value = ir.computed_from(source.detach().contiguous(memory_format=CL), source)
            name = _fresh(self.gm, "_channels_last_" + w.target.replace(".", "_"), self.owner)
            self.gm.register_buffer(name, value, persistent=False)
            with self.graph.inserting_after(w):
                node = self.graph.get_attr(name)
            node.meta = {k: v for k, v in w.meta.items() if k in ("nn_module_stack", "stack_trace")}
            node.meta["val"] = self.fake(value)
            self.weights[w] = node
            self.stats["layout.weights"] += 1
        return self.weights[w]

    def changed(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor) and \
            ir._strides(n.meta["val"]) != ir._strides(self.eager.get(n))

    def contiguous_inputs(self, node: fx.Node) -> bool:
        """Route each operand of `node` whose layout changed (and is not dense row-major now) through a
        contiguous copy; whether any was."""
        moved = False
        for x in list(node.all_input_nodes):
            v = x.meta.get("val")
            if self.changed(x) and isinstance(v, torch.Tensor) and not v.is_contiguous():
                node.replace_input_with(x, self.copy(x, torch.contiguous_format, node))
                self.stats["layout.copies_back"] += 1
                moved = True
        return moved

    def rows_from(self, node: fx.Node, order: dict[fx.Node, int]) -> None:
        """`node` (a reduction that would read its input strided) and every later reader of that input read
        a contiguous copy of it: a norm's `x - mean` shares the reduction's row kernel and must read rows too.
        What follows is computed in rows until the next convolution converts it back."""
        x = node.args[0]
        c = self.copy(x, torch.contiguous_format, node)
        for u in list(x.users):
            if u is not c and order.get(u, -1) >= order[node]:
                u.replace_input_with(x, c)
        self.stats["layout.copies_back"] += 1


def _follows(node: fx.Node) -> bool:
    """Ops that compute on any layout and carry it on (their result's strides follow their operands')."""
    if node.target is operator.getitem or node.target in _POOLS:
        return True
    cat, _ = classify(node)
    if cat in ("pointwise", "view", "size"):
        return True
    t = node.target
    return cat == "reduction" and isinstance(t, torch._ops.OpOverload) and t.namespace == "aten"


def reads_strided(node: fx.Node) -> bool:
    """A reduction whose reduced dims are not the innermost of its input's memory order (a mean over H, W
    of an NHWC value, as InstanceNorm and global average pooling take): fxcc's row kernels (a row per kept
    index, its columns the reduced elements) would load each column from another memory segment. Torch's
    reductions reorder their loops around the strides, so the timing as torch ops cannot see the cost."""
    d, x = domain(node), node.args[0]
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    if d is None or not isinstance(v, torch.Tensor) or not all(type(s) is int for s in (*v.shape, *v.stride())):
        return False
    order = dense_order(tuple(v.shape), tuple(v.stride()))
    if order is None:
        return False
    inner = [i for i in order if v.shape[i] != 1]
    reduced = {i for i in d[1] if v.shape[i] != 1}
    return set(inner[len(inner) - len(reduced):]) != reduced


def rewrite(gm: fx.GraphModule, owner: fx.GraphModule | None = None) -> dict[str, int]:
    """Channels-last from the convolutions on, in place; eager's strides at the outputs. Returns statistics.
    Raises NotApplied (gm then half rewritten: pass a copy) when the rewrite cannot stay exact. New constants
    get names free in `gm` and in `owner` (the module gm is a copy of, which will hold them)."""
    walk = _Walk(gm, owner)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op == "output":
            _restore_outputs(walk, node)
            continue
        if node.op != "call_function":
            continue
        if is_conv2d(node):
            x, w = node.args[:2]
            if not channels_last(x.meta["val"]):
                node.replace_input_with(x, walk.copy(x, CL, node))
                walk.stats["layout.copies_in"] += 1
            node.replace_input_with(w, walk.weight(w, node))
            walk.stats["layout.convolutions"] += 1
        elif not _follows(node) or node.target in _READS_STRIDES:
            walk.contiguous_inputs(node)
        elif reads_strided(node) and walk.changed(node.args[0]):
            walk.rows_from(node, order)
        try:
            node.meta["val"] = walk.compute(node)
        except Exception as e:  # noqa: BLE001 - a view that cannot view the new layout: give it rows
            if walk.contiguous_inputs(node):
                node.meta["val"] = walk.compute(node)
            elif not node.meta.get("fxcc_eager"):  # an op without a shape function keeps its recorded value
                raise NotApplied(f"%{node.name} = {node.target} fails on the new layout: {e}") from e
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return walk.stats


def _restore_outputs(walk: _Walk, out: fx.Node) -> None:
    """Each output whose strides changed, copied back into eager's strides."""
    def back(x: Any) -> Any:
        want = walk.eager.get(x)
        if not isinstance(x, fx.Node) or not isinstance(want, torch.Tensor) or \
                tuple(x.meta["val"].stride()) == tuple(want.stride()):  # every stride, of size-1 dims too
            return x
        fmt = next((f for f in (torch.contiguous_format, CL) if want.is_contiguous(memory_format=f)), None)
        if fmt is None:
            raise NotApplied(f"output %{x.name} has strides {tuple(want.stride())} in eager, no memory format")
        walk.stats["layout.copies_back"] += 1
        return walk.copy(x, fmt, out)

    out.args = (fx.node.map_aggregate(out.args[0], back),)


def _is_copy(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.clone.default and "memory_format" in node.kwargs


class _Kernel:
    """A generated kernel called in a timed graph: its inputs as the graph's arguments, its one output."""

    def __init__(self, fn: Any):
        self.fn, self.__name__ = fn, "fxcc_generated"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(list(inputs))[0]


def as_compiled(gm: fx.GraphModule, build: Any, backs_only: bool = False, epilogues: bool = False) -> fx.GraphModule:
    """A copy of `gm` whose layout copies run as the generated kernels a compile makes of them (torch's copies
    between NCHW and NHWC read or write a stride apart and cost several times a kernel's tiled copy): each copy
    with the pointwise ops only it reads (fusion puts them in the copy's kernel: a convolution's relu and the copy
    of its result back to NCHW are one epilogue). `build`: a pointwise body -> its kernel, or None (the ops stay
    torch's). `backs_only`: only the copies of convolutions' results (the per-convolution candidates copy their
    operands in by torch). `epilogues`: every chain of pointwise ops is one kernel, not only those ending in a
    copy (a convolution's epilogue that reads its result across layouts, `x + gelu(conv(x))` with `x` NCHW and the
    convolution NHWC, is one tiled kernel in the compile, several torch ops reading a stride apart here). For
    timing only: the ops are those of `gm`, so its results are unchanged."""
    out = ir.clone_graph(gm)
    for members in _regions(out, backs_only, epilogues):
        copy = members[-1]
        inputs = list(dict.fromkeys(i for m in members for i in m.all_input_nodes if i not in members))
        body, env = fx.Graph(), {}
        for k, i in enumerate(inputs):
            env[i] = body.placeholder(f"in{k}")
            env[i].meta["val"] = i.meta.get("val")
        for m in members:
            env[m] = body.node_copy(m, env.__getitem__)
        body.output((env[copy],))
        try:
            fn = build(fx.GraphModule(torch.nn.Module(), body))
        except Exception as e:  # noqa: BLE001 - a kernel that does not build leaves torch's ops in the timing
            log.info("layout: no generated kernel to time for %%%s (%s: %s)", copy.name, type(e).__name__, e)
            fn = None
        if fn is None:
            continue
        with out.graph.inserting_before(copy):
            call = out.graph.call_function(_Kernel(fn), tuple(inputs))
        call.meta["val"] = copy.meta.get("val")
        copy.replace_all_uses_with(call)
        for m in reversed(members):
            out.graph.erase_node(m)
    out.recompile()
    return out


def _regions(gm: fx.GraphModule, backs_only: bool, epilogues: bool) -> list[list[fx.Node]]:
    """The node groups `as_compiled` runs as one kernel each, its last node the group's result: each layout copy
    with the pointwise ops only it reads; with `epilogues`, every pointwise op read by something other than
    pointwise ops of one group starts a group too, and a copy back from a convolution joins the group reading it
    (fusion reads the convolution's result across layouts in the epilogue)."""
    def copy_in(n: fx.Node) -> bool:  # a copy of an operand into a convolution's layout (torch's, per convolution)
        return backs_only and not (isinstance(n.args[0], fx.Node) and is_conv2d(n.args[0]))
    if not epilogues:
        return [_fused_with(n) for n in gm.graph.nodes if _is_copy(n) and not copy_in(n)]
    regions, taken = [], set()
    for n in reversed(list(gm.graph.nodes)):
        if n in taken or n.op != "call_function" or (_is_copy(n) and copy_in(n)) or \
                not (_is_copy(n) or classify(n)[0] == "pointwise"):
            continue
        members = _fused_with(n, copies=lambda c: not copy_in(c) and not any(is_conv2d(u) for u in c.users))
        taken.update(members)
        regions.append(members)
    return regions[::-1]


def _fused_with(copy: fx.Node, copies: Any = lambda c: False) -> list[fx.Node]:
    """`copy` and the pointwise ops before it whose every reader is among them, in program order; layout copies
    among them only where `copies(copy)` says."""
    members, todo = [copy], [copy]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i not in members and i.op == "call_function" and (not _is_copy(i) or copies(i)) and \
                    (_is_copy(i) or classify(i)[0] == "pointwise") and all(u in members for u in i.users):
                members.append(i)
                todo.append(i)
    order = {n: k for k, n in enumerate(copy.graph.nodes)}
    return sorted(members, key=order.__getitem__)


def per_conv(gm: fx.GraphModule) -> None:
    """Every 2-D convolution of `gm` on channels-last copies of its operands, its result copied back into
    eager's layout: what the per-kernel `nhwc` candidates run (the incumbent `Layout` is timed against)."""
    walk = _Walk(gm)
    for node in list(gm.graph.nodes):
        if not is_conv2d(node):
            continue
        eager = node.meta["val"]
        for a in node.args[:2]:
            node.replace_input_with(a, walk.copy(a, CL, node))
        node.meta["val"] = walk.compute(node)
        fmt = torch.contiguous_format if eager.is_contiguous() else CL
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(aten.clone.default, (node,), {"memory_format": fmt})
        node.replace_all_uses_with(back, delete_user_cb=lambda u, b=back: u is not b)
        back.meta["val"] = walk.compute(back)
    gm.recompile()
