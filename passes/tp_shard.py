"""tp-shard: tensor-parallel sharding of transformer blocks (Megatron-style column/row split).

Reads the tx level (after `raise`). Projections are found from the graph, not from parameter names: a
*region* is a set of column-parallel projections (aten.linear, or addmm/mm with a weight, as GPT-2's Conv1D
captures) whose outputs flow, through views, transposes, splits, rotary and elementwise ops only, into one
row-parallel projection, and nowhere else. A region is sharded when it holds an attention (q, k and v all
reach it from the columns; heads split with them) or an activation (an MLP, gated or not), its row maps back
to the features its columns read, and every op in it can follow the split dimension. Columns keep 1/tp of
their output features (a fused q/k/v projection split afterwards keeps 1/tp of each block), the row 1/tp of
its input features followed by a sum over the ranks (`tx.all_reduce`). Anything else stays replicated and is
logged with the reason; a graph with no region to shard is refused. Norms and embeddings stay replicated;
a norm inside a region (Qwen3's and Gemma-3's q/k norms over head_dim, after the view into heads) normalises
each rank's own heads, and one over all of a projection's features (OLMo-2's q/k norms) ends the region there,
replicated: it would need every rank's sum of squares. That bound also keeps a region's walk off the residual
stream, whose norms span every feature of the projection before it.

Mixture-of-experts blocks are regions too: their projections read a 3-D weight [experts, ., .] (`bmm(W[ids], x)`
as transformers' batched_mm experts capture, or a grouped matmul), and are split per matrix, every expert keeping
1/tp of its intermediate features. The all-reduces then move later past ops linear in the partial sums (the
routing-weighted combine) and merge where two meet at an add (a shared expert's), so an MoE block sums once,
[tokens, hidden]. The router stays replicated (its softmax and top-k read every expert's logit).

Each rank compiles its own graph: rank and world size come from torch.distributed (one process per
device, e.g. `torchrun --nproc-per-node 2 app.py`; gloo on the CPU, NCCL on GPUs). Weight shards are
sliced once, here, and bound as new constants of the graph; the full weights they came from are removed
from the graph module, so the compiled graph holds only this rank's shards (stat `param_bytes`).
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter, arg, val

log = logging.getLogger(__name__)

aten = torch.ops.aten
tx = torch.ops.fxcc_tx

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MOVES = {aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.chunk.default}
ATTENTION = {tx.attention.default, aten.scaled_dot_product_attention.default}
COPIES = {aten.clone.default, aten.contiguous.default, aten.to.dtype, aten._to_copy.default,
          aten.alias.default, aten.type_as.default}
ELEMENTWISE = COPIES | {tx.rotary.default, tx.gated_act.default, tx.silu.default, tx.gelu.default}
NORMS = {tx.rms_norm.default, tx.layer_norm.default}  # normalise over x's last dims (weight, bias: those dims)


class ShardError(ValueError):
    """The graph cannot be split across ranks as asked; the message names the node and what to change."""


class _Unproven(Exception):
    """A region the structural rule cannot prove shardable: it stays replicated (the message says why)."""


def _flat(*args: Any) -> list[Any]:
    """Every leaf of nested call arguments."""
    out: list[Any] = []
    fx.node.map_aggregate(args, out.append)
    return out


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("", None))[0] if stack else ""
    return f"%{node.name}" + (f" ({path})" if path else "")


def world(tp: int, rank: int | None) -> int:
    """This process's rank for a `tp`-way split: the `rank` option, else torch.distributed's rank."""
    if rank is not None:
        if not 0 <= rank < tp:
            raise ShardError(f"tp-shard{{tp={tp},rank={rank}}}: rank must be in 0..{tp - 1}")
        return rank
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ShardError(f"tp-shard{{tp={tp}}} needs torch.distributed initialised with {tp} processes, one per "
                         f"device: launch with `torchrun --nproc-per-node {tp} your_script.py` and call "
                         "torch.distributed.init_process_group() (gloo on the CPU, nccl on GPUs) before compiling")
    if dist.get_world_size() != tp:
        raise ShardError(f"tp-shard{{tp={tp}}}: torch.distributed has {dist.get_world_size()} ranks; launch "
                         f"{tp} processes or use tp={dist.get_world_size()}")
    return dist.get_rank()


# ------------------------------------------------------------------------------ projections


@dataclass(frozen=True)
class _Linear:
    """A projection by a parameter: `x @ W(.T) + b`; `out_dim` is the weight's dim of output features.

    An expert projection (mixture of experts) reads a 3-D weight [experts, ., .] through `w_user`: the rows
    of it picked by expert ids (batched_mm: `bmm(W[ids], x)`) or the whole of it, transposed or not, in a
    grouped matmul (grouped_mm: tokens sorted by expert, offsets per expert). `x_axis` and `out_axis` are the
    dims of x and of the result that carry the input and output features."""

    node: fx.Node
    x: fx.Node
    w: fx.Node
    b: fx.Node | None
    out_dim: int
    w_user: fx.Node | None = None  # experts: the node that reads the 3-D weight (index, transpose, the matmul)
    x_axis: int = -1
    out_axis: int = -1

    @property
    def in_dim(self) -> int:
        """The weight's dim of input features."""
        return 1 - self.out_dim if self.w_user is None else 3 - self.out_dim

    @property
    def features(self) -> tuple[int, int]:
        """(input, output) features."""
        shape = val(self.w).shape
        return shape[self.in_dim], shape[self.out_dim]


def _is_param(node: Any, dims: int) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(val(node), torch.Tensor) \
        and val(node).dim() == dims


def as_linear(node: fx.Node) -> _Linear | None:
    """The projection `node` computes: aten.linear (weight [out, in]), or addmm / mm with a weight [in, out]
    (GPT-2's Conv1D after capture); None for anything else, a product of two activations included."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, w, b, out_dim = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), 0
    elif node.target is aten.addmm.default and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):
        b, x, w = node.args[:3]
        out_dim = 1
    elif node.target is aten.mm.default:
        (x, w), b, out_dim = node.args[:2], None, 1
    else:
        return None
    if not isinstance(x, fx.Node) or not _is_param(w, 2) or not (b is None or _is_param(b, 1)):
        return None
    return _Linear(node, x, w, b, out_dim)


TRACEABLE_EXPERTS = ("batched_mm", "grouped_mm")  # transformers' experts implementations captured as one graph
GROUPED_MM = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")  # (x [S, in], W [E, in, out], offs)


def _expert_rows(node: Any) -> fx.Node | None:
    """The 3-D parameter `node` picks whole experts of, `W[ids]` with ids a 1-D integer tensor; else None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.target is aten.index.Tensor and len(node.args[1]) == 1:
        w, ids = node.args[0], node.args[1][0]
    elif node.target is aten.index_select.default and node.args[1] == 0:
        w, ids = node.args[0], node.args[2]
    else:
        return None
    ok = isinstance(ids, fx.Node) and val(ids) is not None and val(ids).dim() == 1 and not val(ids).is_floating_point()
    return w if ok and _is_param(w, 3) else None


def as_expert(node: fx.Node) -> _Linear | None:
    """The expert projection `node` computes (see _Linear), None for anything else."""
    if node.op != "call_function":
        return None
    if node.target is aten.bmm.default:
        a, b = node.args[:2]
        if (w := _expert_rows(a)) is not None and isinstance(b, fx.Node):  # W[ids] [S, out, in] @ x [S, in, n]
            return _Linear(node, b, w, None, 1, a, x_axis=1, out_axis=1)
        if (w := _expert_rows(b)) is not None and isinstance(a, fx.Node):  # x [S, n, in] @ W[ids] [S, in, out]
            return _Linear(node, a, w, None, 2, b, x_axis=2, out_axis=2)
        return None
    if not isinstance(node.target, torch._ops.OpOverload) or node.target.name() not in GROUPED_MM:
        return None
    x, w = node.args[:2]
    if arg(node, 3, "bias") is not None or arg(node, 4, "out_dtype") is not None or not isinstance(x, fx.Node):
        return None
    if _is_param(w, 3):  # W [E, in, out]
        return _Linear(node, x, w, None, 2, node)
    if isinstance(w, fx.Node) and w.target is aten.transpose.int and len(w.users) == 1 and _is_param(w.args[0], 3) \
            and {d % 3 for d in w.args[1:3]} == {1, 2}:  # W [E, out, in] transposed
        return _Linear(node, x, w.args[0], None, 1, w)
    return None


def _passes_split(node: fx.Node) -> bool:
    """Ops a value split across ranks may flow through inside a region."""
    t = node.target
    if node.op != "call_function":
        return False
    return (t in VIEWS or t in MOVES or t in SPLITS or t is operator.getitem or t in ATTENTION or t in ELEMENTWISE
            or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags))


@dataclass
class _Region:
    """Column projections, the one row projection their outputs reach, and the nodes in between."""

    columns: list[_Linear]
    rows: set[fx.Node] = field(default_factory=set)
    inside: set[fx.Node] = field(default_factory=set)
    why_not: str | None = None  # the first reason the region cannot be sharded


def _normalised(node: fx.Node) -> int:
    """How many trailing dims of its input a norm (NORMS) reduces over."""
    return 1 if node.target is tx.rms_norm.default else len(node.args[1])


def _per_head_norm(norm: fx.Node, lin: _Linear) -> str | None:
    """None when `norm` normalises fewer features than `lin` outputs (a head's: Qwen3's and Gemma-3's q/k norms
    after the view to [.., heads, head_dim]), so a split by heads may pass it (`_Sharder.norm` checks the dims);
    else why not. A norm over all of them (OLMo-2's q_norm, or one on the residual stream) ends the walk there:
    the region stays within its own ops."""
    x = norm.args[0]
    n, features = math.prod(val(x).shape[-_normalised(norm):]), lin.features[1]
    if n < features:
        return None
    return (f"%{x.name} flows into {norm.target} at {_where(norm)}, which normalises all {n} output features of "
            f"{_where(lin.node)} at once: split across ranks, it would need every rank's sum of "
            "squares")


def _closure(lin: _Linear, linears: dict[fx.Node, _Linear]) -> _Region:
    """Everything `lin`'s output reaches before a projection reads it; why_not when it escapes elsewhere."""
    r = _Region([lin])
    todo = [lin.node]
    while todo:
        v = todo.pop()
        for u in v.users:
            other = linears.get(u)
            if other is not None and other.x is v:
                r.rows.add(u)
            elif u.op == "output":
                r.why_not = f"%{v.name} is a model output"
                return r
            elif u.target in NORMS and u.args[0] is v:
                if (why := _per_head_norm(u, lin)) is not None:
                    r.why_not = why
                    return r
                if u not in r.inside:
                    r.inside.add(u)
                    todo.append(u)
            elif not _passes_split(u):
                r.why_not = f"%{v.name} flows into {u.target} at {_where(u)}, which cannot take a split value"
                return r
            elif u not in r.inside:
                r.inside.add(u)
                todo.append(u)
    return r


def projection(node: fx.Node) -> _Linear | None:
    """The projection `node` computes, a linear or an expert one; None for anything else."""
    return as_linear(node) or as_expert(node)


def regions(gm: fx.GraphModule) -> list[_Region]:
    """The graph's candidate regions in program order: closures of projections that meet are merged
    (q, k and v meet at their attention, gate and up at their gated activation, all at their row)."""
    linears = {n: lin for n in gm.graph.nodes if (lin := projection(n)) is not None}
    merged: list[_Region] = []
    for lin in linears.values():
        r = _closure(lin, linears)
        for other in [m for m in merged if m.inside & r.inside or m.rows & r.rows]:
            merged.remove(other)
            r = _Region(other.columns + r.columns, other.rows | r.rows, other.inside | r.inside,
                        other.why_not or r.why_not)
        merged.append(r)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for r in merged:
        r.columns.sort(key=lambda c: order[c.node])
    merged.sort(key=lambda r: order[r.columns[0].node])
    return [_check(r, linears) for r in merged]


def _check(r: _Region, linears: dict[fx.Node, _Linear]) -> _Region:
    """Fill in why_not for a region that is not a Megatron attention or MLP block."""
    if r.why_not:
        return r
    if len(r.rows) != 1:
        r.why_not = f"its output reaches {len(r.rows)} projections, not one"
        return r
    row = linears[next(iter(r.rows))]
    if any(c.node is row.node for c in r.columns):
        r.why_not = f"its projection {_where(row.node)} reads its own output"
        return r
    if not any(n.target in ATTENTION or n.target not in VIEWS | MOVES | SPLITS | COPIES | {operator.getitem}
               for n in r.inside):
        r.why_not = f"there is no attention or activation between it and {_where(row.node)}"
        return r
    hidden = {c.features[0] for c in r.columns}
    if hidden != {row.features[1]}:
        r.why_not = (f"{_where(row.node)} maps to {row.features[1]} features, not back to the "
                     f"{sorted(hidden)} its columns read")
    return r


# ------------------------------------------------------------------------------ the pass


@dataclass(frozen=True)
class TPShard(Pass):
    """Split projections, heads and their reshapes across `tp` ranks; all-reduce after row projections."""

    name = "tp-shard"
    reads = "tx"
    writes = "tx"
    tp: int = 1
    rank: int | None = None  # None: torch.distributed's rank (tests set it to print one rank's graph)
    group: str = ""  # process group name for the all-reduces; "" is the default (world) group

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")

    def check_split(self, module: Any) -> None:
        """Experts whose forward loops over the experts hit (transformers' experts_implementation "eager":
        `nonzero`, a loop of data-dependent length) cannot be sharded: in a DyCL host program their layers
        would run eagerly, whole, on every rank. Refused, naming the implementations tp-shard splits."""
        if self.tp == 1 or not isinstance(module, torch.nn.Module):
            return
        for path, m in module.named_modules():
            impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
            weights = [n for n, w in m.named_parameters(recurse=False) if w.dim() == 3]
            if impl is not None and weights and impl not in TRACEABLE_EXPERTS:
                raise ShardError(
                    f"tp-shard{{tp={self.tp}}}: the experts {path} ({type(m).__name__}, weights {', '.join(weights)}) "
                    f"run with experts_implementation={impl!r}, "
                    + ("a loop over the experts the routing hits, " if impl == "eager" else "")
                    + "which fxcc cannot capture as one graph (it would run them eagerly and whole on every rank); "
                    f"tp-shard splits the experts of {' and '.join(map(repr, TRACEABLE_EXPERTS))}: call "
                    '`model.set_experts_implementation("batched_mm")` before compiling (or load it with '
                    '`from_pretrained(..., experts_implementation="batched_mm")`)')

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.tp == 1:
            return PassResult(False)
        rank = world(self.tp, self.rank)
        return _Sharder(gm, self.tp, rank, self.group).run()


@dataclass
class _Plan:
    """What sharding one region changes, decided before anything is rewritten: the split dim of every value,
    the new size arguments of views, expands and splits, and the blocks of each column's output features."""

    region: _Region
    split: dict[fx.Node, int] = field(default_factory=dict)
    args: dict[fx.Node, tuple] = field(default_factory=dict)
    blocks: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    whole: dict[fx.Node, fx.Node] = field(default_factory=dict)  # value -> column whose full features it holds


class _Sharder:
    """Decide every region (`plan`), then rewrite the ones that can be sharded, in program order."""

    def __init__(self, gm: fx.GraphModule, tp: int, rank: int, group: str):
        self.gm, self.tp, self.rank, self.group = gm, tp, rank, group
        self.rw = Rewriter(gm)
        self.shards: dict[tuple[str, int, tuple[int, ...]], fx.Node] = {}
        self.stats = {"column": 0, "row": 0, "all_reduce": 0, "reshape": 0, "replicated": 0, "expert": 0,
                      "all_reduce_moved": 0}
        self.all_reduces: list[fx.Node] = []

    def run(self) -> PassResult:
        full = self.param_bytes()
        plans, skipped, taken = [], [], set()
        for r in regions(self.gm):
            plan = None
            if not r.why_not:
                if {c.node for c in r.columns} & taken or r.rows & taken:  # a row here, a column there
                    r.why_not = "one of its projections is already sharded in another block"
                else:
                    try:
                        plan = self.plan(r)
                    except _Unproven as e:
                        r.why_not = str(e)
            if plan is None:
                skipped.append(r)
                continue
            taken |= {c.node for c in r.columns} | r.rows
            plans.append(plan)
        experts = {c.w for p in plans for c in [*p.region.columns, *map(projection, p.region.rows)]}
        for n in self.gm.graph.nodes:  # 3-D weights no expert projection recognised reads (another experts forward)
            if _is_param(n, 3) and n not in experts and any(u.target is not aten.convolution.default for u in n.users):
                log.info("tp-shard: %s %s stays replicated: no expert projection (W[ids] @ x, grouped_mm) reads it",
                         _where(n), list(val(n).shape))
        for r in skipped:
            left = [c.node for c in r.columns if c.node not in taken]  # not the row of a sharded block
            self.stats["replicated"] += len(left)
            if left:
                log.info("tp-shard: %s stays replicated: %s", ", ".join(map(_where, left)), r.why_not)
        if not plans:
            why = "; ".join(f"{_where(r.columns[0].node)}: {r.why_not}" for r in skipped[:4])
            raise ShardError(f"tp-shard{{tp={self.tp}}}: found no projection to split: no linear feeds an "
                             "attention (q, k, v) or an activation that one projection back to the hidden size "
                             f"reads ({why or 'the graph has no linear of a weight'}); tp-shard needs `raise` "
                             "before it in the pipeline")
        for plan in plans:
            self.rewrite(plan)
        self.sink_all_reduces()
        self.drop_unused_params()
        self.gm.graph.lint()
        self.gm.recompile()
        ir.propagate(self.gm, who="tp-shard")  # the local shapes, recorded for the passes after this one
        stats = {k: v for k, v in self.stats.items() if v}
        stats.update(param_bytes=self.param_bytes(), param_bytes_tp1=full)
        return PassResult(True, stats)

    # ------------------------------------------------------------------------------ deciding

    def plan(self, r: _Region) -> _Plan:
        """Follow the split dimension through the region; _Unproven when an op cannot follow it, ShardError
        when the sizes do not divide by tp (the user's choice of tp, not the model, is then wrong)."""
        p = _Plan(r)
        (row_node,) = r.rows
        columns = {c.node: c for c in r.columns}
        for node in self.gm.graph.nodes:
            if node in columns:
                c = columns[node]
                n = c.features[1]
                if n % self.tp:
                    raise ShardError(f"tp-shard{{tp={self.tp}}}: {c.w.target} has {n} features along dim "
                                     f"{c.out_dim}, not divisible by tp={self.tp}; choose a tp that divides it")
                p.split[node] = c.out_axis % val(node).dim()
                p.whole[node] = node
            elif node in r.inside:
                self.follow(node, p)
            elif node is row_node:
                row = projection(node)
                x = row.x
                if p.split.get(x) != row.x_axis % val(x).dim():
                    raise _Unproven(f"{_where(node)} reads %{x.name} split along dim {p.split.get(x)}, not "
                                    f"its feature dim {row.x_axis % val(x).dim()}")
        for c in r.columns:
            blocks = p.blocks.setdefault(c.node, (c.features[1],))
            if len(blocks) == 1:
                continue
            # a fused projection: its whole output may reach nothing but the splits into its blocks
            holds = {v for v, col in p.whole.items() if col is c.node}
            for v in holds:
                other = next((u for u in v.users if u not in holds and u.target not in SPLITS), None)
                if other is not None:
                    raise _Unproven(f"{_where(other)} reads the fused projection {_where(c.node)} before it is "
                                    "split into its blocks")
        return p

    def follow(self, node: fx.Node, p: _Plan) -> None:
        t = node.target
        if t in VIEWS:
            return self.view(node, p)
        if t is operator.getitem:
            p.split[node] = p.split[node.args[0]]
            return
        if t is aten.slice.Tensor:
            return self.slice(node, p)
        if t in SPLITS:
            return self.split(node, p)
        if t in ATTENTION:
            return self.attention(node, p)
        if t in MOVES:
            return self.move(node, p)
        if t in NORMS:
            return self.norm(node, p)
        return self.elementwise(node, p)

    def norm(self, node: fx.Node, p: _Plan) -> None:
        """A norm over dims that do not hold the split (a head's features): each rank normalises its own heads
        exactly; its weight and bias (per head_dim) stay whole."""
        x = node.args[0]
        s, nd = p.split[x], val(x).dim()
        if s >= nd - _normalised(node):
            raise _Unproven(f"{_where(node)} normalises over dim {s} of %{x.name}, the dim split across ranks "
                            "(it would need every rank's sum of squares)")
        if any(a in p.split for a in node.all_input_nodes if a is not x):
            raise _Unproven(f"{_where(node)} reads a split weight")
        p.split[node] = s

    def move(self, node: fx.Node, p: _Plan) -> None:
        """transpose, permute, unsqueeze, expand: the split dim moves with its data."""
        src, t = node.args[0], node.target
        s, nd = p.split[src], val(node).dim()
        if t is aten.transpose.int:
            d0, d1 = (d % nd for d in node.args[1:3])
            p.split[node] = d1 if s == d0 else d0 if s == d1 else s
        elif t is aten.permute.default:
            p.split[node] = [d % nd for d in node.args[1]].index(s)
        elif t is aten.unsqueeze.default:
            d = node.args[1] % nd
            p.split[node] = s + 1 if d <= s else s
        elif t is aten.squeeze.dim:
            d = node.args[1] % val(src).dim()
            if val(src).shape[d] != 1:  # no dim removed
                p.split[node] = s
            elif d == s:
                raise _Unproven(f"{_where(node)} squeezes the split dim")
            else:
                p.split[node] = s - 1 if d < s else s
        else:
            sizes = list(node.args[1])
            j = s + len(sizes) - val(src).dim()
            if sizes[j] != -1:
                sizes[j] //= self.tp
            p.args[node] = (src, sizes, *node.args[2:])
            p.split[node] = j
            return
        if src in p.whole:
            p.whole[node] = p.whole[src]

    def view(self, node: fx.Node, p: _Plan) -> None:
        src = node.args[0]
        s = p.split[src]
        shape_in, shape_out = list(val(src).shape), list(val(node).shape)
        prefix = math.prod(shape_in[:s])
        j = next((j for j in range(len(shape_out)) if math.prod(shape_out[:j]) == prefix and shape_out[j] > 1),
                 None)
        if j is None:
            raise _Unproven(f"cannot follow the split dim {s} of %{src.name} through {_where(node)} "
                            f"({shape_in} -> {shape_out})")
        if shape_out[j] == shape_in[s] and src in p.whole:
            p.whole[node] = p.whole[src]  # the feature dim moved whole: a later split still sees its blocks
        if shape_out[j] % self.tp:
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {_where(node)} splits into {shape_out[j]} heads (dim {j} "
                             f"of {shape_out}), which tp={self.tp} does not divide; choose a tp that divides the "
                             "number of attention heads and of key/value heads")
        # the node's own sizes, where a symbolic one is a node (sym_size) the graph computes: the value's shape holds a
        # symbol no code defines
        sizes = list(node.args[1]) if len(node.args[1]) == len(shape_out) else shape_out
        sizes[j] = shape_out[j] // self.tp
        p.args[node] = (src, sizes, *node.args[2:])
        p.split[node] = j

    def split(self, node: fx.Node, p: _Plan) -> None:
        """A split of the split dim is a fused projection's blocks (GPT-2's c_attn into q, k, v): the column
        then keeps 1/tp of every block, so each piece of the split is this rank's part of one projection."""
        src = node.args[0]
        s = p.split[src]
        dim = arg(node, 2, "dim", 0) % val(src).dim()
        if dim != s:
            p.split[node] = s
            return
        col = p.whole.get(src)
        if col is None:
            raise _Unproven(f"{_where(node)} splits %{src.name} along its split dim, and that value is not one "
                            "projection's whole output features")
        n = val(src).shape[s]
        if node.target is aten.chunk.default:  # chunk(2) of an expert's gate_up: the gate and up blocks
            if n % node.args[1]:
                raise _Unproven(f"{_where(node)} chunks {n} features into unequal pieces")
            sizes = (n // node.args[1],) * node.args[1]
        elif node.target is aten.split.Tensor:
            size = node.args[1]
            if n % size:
                raise _Unproven(f"{_where(node)} splits {n} features into unequal pieces of {size}")
            sizes = (size,) * (n // size)
        else:
            sizes = tuple(node.args[1])
        if any(b % self.tp for b in sizes):
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {_where(node)} splits the output of %{col.name} into "
                             f"blocks of {list(sizes)} features, which tp={self.tp} does not divide")
        if p.blocks.setdefault(col, sizes) != sizes:
            raise _Unproven(f"%{col.name} is split into different blocks at {_where(node)}")
        if node.target is not aten.chunk.default:  # a chunk of 1/tp of every block keeps its number of pieces
            local = sizes[0] // self.tp if node.target is aten.split.Tensor else [b // self.tp for b in sizes]
            p.args[node] = (src, local, *node.args[2:])
        p.split[node] = s

    def slice(self, node: fx.Node, p: _Plan) -> None:
        """Slices that cut the split dim into consecutive blocks are a split (GPT-2's q, k, v after decompose)."""
        src = node.args[0]
        s, nd = p.split[src], val(src).dim()
        if arg(node, 1, "dim", 0) % nd != s:
            p.split[node] = s
            return
        col, n = p.whole.get(src), val(src).shape[s]
        cuts = {}
        for u in src.users:
            if u.target is aten.slice.Tensor and arg(u, 1, "dim", 0) % nd == s:
                start, end, step = arg(u, 2, "start"), arg(u, 3, "end"), arg(u, 4, "step", 1)
                start, end = min(max(start or 0, 0), n), min(n if end is None else end, n)
                if step != 1 or start < 0 or end <= start:
                    raise _Unproven(f"{_where(u)} slices %{src.name} with step {step} or from its end")
                cuts[u] = (start, end)
        bounds = sorted(set(cuts.values()))
        if col is None or bounds[0][0] != 0 or bounds[-1][1] != n or \
                any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise _Unproven(f"{_where(node)} slices %{src.name} along its split dim, and the slices are not "
                            "consecutive blocks of one projection's output features")
        sizes = tuple(e - b for b, e in bounds)
        if any(b % self.tp for b in sizes):
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {_where(node)} slices the output of %{col.name} into "
                             f"blocks of {list(sizes)} features, which tp={self.tp} does not divide")
        if p.blocks.setdefault(col, sizes) != sizes:
            raise _Unproven(f"%{col.name} is split into different blocks at {_where(node)}")
        i = bounds.index(cuts[node])
        start = sum(sizes[:i]) // self.tp
        p.args[node] = (src, node.args[1], start, start + sizes[i] // self.tp, *node.args[4:])
        p.split[node] = s

    def attention(self, node: fx.Node, p: _Plan) -> None:
        q, k, v = node.args[:3]
        whole = [f"{name} (%{a.name})" for name, a in zip("qkv", (q, k, v)) if p.split.get(a) != val(a).dim() - 3]
        if whole:
            raise _Unproven(f"attention {_where(node)} needs q, k and v split by heads (from column-parallel "
                            f"projections), and its {', '.join(whole)} {'is' if len(whole) == 1 else 'are'} not")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and (mask in p.split or val(mask).dim() >= 3 and val(mask).shape[-3] > 1):
            raise _Unproven(f"attention {_where(node)} has a per-head mask; tp-shard supports masks broadcast "
                            "over heads only")
        p.split[node] = val(q).dim() - 3

    def elementwise(self, node: fx.Node, p: _Plan) -> None:
        nd = val(node).dim()
        dims = {p.split[a] + nd - val(a).dim() for a in node.all_input_nodes if a in p.split}
        if len(dims) != 1:
            raise _Unproven(f"{_where(node)} combines values split along different dims {sorted(dims)}")
        d = dims.pop()
        if node.target is tx.rotary.default and d == nd - 1:
            raise _Unproven(f"rotary {_where(node)} rotates along the split dim")
        for a in node.all_input_nodes:
            v = val(a)
            if isinstance(v, torch.Tensor) and a not in p.split:
                k = d - (nd - v.dim())
                if 0 <= k < v.dim() and v.shape[k] > 1:
                    raise _Unproven(f"{_where(node)} combines a value split across ranks with %{a.name}, which is "
                                    f"not split (dim {k} of size {v.shape[k]})")
        p.split[node] = d
        ins = [a for a in node.all_input_nodes if a in p.split]
        if len(ins) == 1 and ins[0] in p.whole and val(ins[0]).shape == val(node).shape:
            p.whole[node] = p.whole[ins[0]]

    # ------------------------------------------------------------------------------ rewriting

    def rewrite(self, p: _Plan) -> None:
        for c in p.region.columns:
            blocks = p.blocks[c.node]
            w = self.shard_param(c.w, c.out_dim, blocks)
            b = self.shard_param(c.b, 0, blocks) if c.b is not None else None
            if c.w_user is not None:  # experts: every expert keeps 1/tp of its features
                c.w_user.replace_input_with(c.w, w)
                self.stats["expert"] += 1
            elif c.node.target is aten.linear.default:
                c.node.args, c.node.kwargs = (c.x, w) + ((b,) if b is not None else ()), {}
            elif c.node.target is aten.addmm.default:
                c.node.args, c.node.kwargs = (b, c.x, w), {}
            else:
                c.node.args = (c.x, w)
            self.stats["column"] += 1
        for node, args in p.args.items():
            node.args = args
            self.stats["reshape"] += 1
        (row,) = p.region.rows
        self.all_reduces.append(self.row(projection(row)))

    def row(self, lin: _Linear) -> fx.Node:
        node = lin.node
        w = self.shard_param(lin.w, lin.in_dim, (lin.features[0],))
        if lin.w_user is not None:
            lin.w_user.replace_input_with(lin.w, w)
            self.stats["expert"] += 1
        elif node.target is aten.linear.default:
            node.args, node.kwargs = (lin.x, w), {}
        else:
            node.target, node.args, node.kwargs = aten.mm.default, (lin.x, w), {}
        users = list(node.users)
        with self.gm.graph.inserting_after(node):
            ar = self.gm.graph.call_function(tx.all_reduce.default, (node, "sum", self.group))
        ar.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        ar.meta["val"] = val(node)
        out = ar
        if lin.b is not None:  # the bias is added once, after the sum
            with self.gm.graph.inserting_after(ar):
                out = self.gm.graph.call_function(aten.add.Tensor, (ar, lin.b))
            out.meta["val"] = val(node)
        for u in users:
            u.replace_input_with(node, out)
        self.stats["row"] += 1
        self.stats["all_reduce"] += 1
        return ar

    # ------------------------------------------------------------------------------ all-reduces moved later

    def sink_all_reduces(self) -> None:
        """Move each all-reduce past the ops after it that are linear in the partial sums it adds up, while
        they make the value no larger: an expert block's routing-weighted combine (gather back to token order,
        weight, sum over the top k) then sums [tokens, hidden] once, not [tokens * k, hidden]; two that meet at
        an add (routed experts + a shared expert) become one. A dense block's all-reduce, followed by its bias
        or the residual add, stays where it is."""
        work = list(self.all_reduces)
        while work:
            ar = work.pop()
            if ar.graph is not self.gm.graph or len(ar.users) != 1:
                continue
            (u,) = ar.users
            other = self.linear_in(u, ar)
            if other is None:
                continue
            u.replace_input_with(ar, ar.args[0])
            gone = [ar]
            if isinstance(other, fx.Node):  # an add of two partial sums
                u.replace_input_with(other, other.args[0])
                gone.append(other)
                self.stats["all_reduce"] -= 1
            with self.gm.graph.inserting_after(u):
                new = self.gm.graph.call_function(tx.all_reduce.default, (u, *ar.args[1:]))
            new.meta.update({k: u.meta[k] for k in ("nn_module_stack", "stack_trace", "val") if k in u.meta})
            u.replace_all_uses_with(new, delete_user_cb=lambda n, new=new: n is not new)
            for n in gone:
                self.gm.graph.erase_node(n)
            self.stats["all_reduce_moved"] += 1
            work.append(new)

    def linear_in(self, u: fx.Node, ar: fx.Node) -> bool | fx.Node | None:
        """Whether `u` may read the partial sums instead of `ar` (then the sum follows u): True, or for an add
        of two all-reduces the other one; None when it may not."""
        if u.op != "call_function" or sum(a is ar for a in _flat(u.args, u.kwargs)) != 1 or \
                not isinstance(val(u), torch.Tensor) or val(u).numel() > val(ar).numel():
            return None
        t, first = u.target, u.args[0] is ar
        if t in VIEWS or t in MOVES - {aten.expand.default} or t in {aten.clone.default, aten.contiguous.default}:
            return first or None
        if t in {aten.to.dtype, aten._to_copy.default}:
            a, b = val(ar), val(u)
            widens = b.dtype.is_floating_point and b.dtype.itemsize >= a.dtype.itemsize and b.device == a.device
            return (first and widens) or None
        if t is aten.sum.dim_IntList or t is aten.index.Tensor or t is aten.div.Tensor:
            return first and (t is not aten.sum.dim_IntList or "dtype" not in u.kwargs) or None
        if t is aten.mul.Tensor:
            return True  # every other value is whole on every rank: scaling commutes with the sum
        if t is aten.add.Tensor and "alpha" not in u.kwargs and len(u.args) == 2:
            other = u.args[1] if first else u.args[0]
            if isinstance(other, fx.Node) and other is not ar and other.target is tx.all_reduce.default and \
                    other.args[1:] == ar.args[1:] and len(other.users) == 1 and val(other).shape == val(u).shape \
                    and val(ar).shape == val(u).shape:
                return other
        return None

    def shard_param(self, node: fx.Node, dim: int, blocks: tuple[int, ...]) -> fx.Node:
        """A get_attr of this rank's 1/tp of every block of parameter `node` along `dim` (sliced once)."""
        key = (str(node.target), dim, blocks)
        if key in self.shards:
            return self.shards[key]
        size = val(node).shape[dim]
        if size % self.tp or sum(blocks) != size:
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {node.target} has {size} features along dim "
                             f"{dim}, not divisible by tp={self.tp}; choose a tp that divides it")
        spans, start = [], 0
        for b in blocks:
            n = b // self.tp
            spans.append((start + self.rank * n, n))
            start += b
        # a weight still in its checkpoint (fxcc.compile(..., state_dict=...)) is read only where this rank's are
        shard, sources = ir.fetch_rows(self.gm, str(node.target), dim, spans)
        shard = ir.computed_from(shard, *sources)
        name = f"tp_{str(node.target).replace('.', '_')}"
        self.gm.register_buffer(name, shard)
        attrs = [n for n in self.gm.graph.nodes if n.op == "get_attr"]
        with self.gm.graph.inserting_after(attrs[-1]):  # with the other parameters, in order of first use
            new = self.gm.graph.get_attr(name)
        new.meta["val"] = self.rw.mode.from_tensor(shard)
        self.shards[key] = new
        return new

    # ------------------------------------------------------------------------------ weights held once

    def drop_unused_params(self) -> None:
        """The full weights of the shards leave the graph: it keeps no reference to them."""
        ir.drop_unused_constants(self.gm)

    def param_bytes(self) -> int:
        """Bytes of the tensors the graph reads as constants, each storage once (fxcc.ir.constant_bytes)."""
        return ir.constant_bytes(self.gm)
