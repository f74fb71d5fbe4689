"""tp-shard: tensor-parallel sharding of a Llama-style decoder (Megatron-style column/row split).

Reads the tx level (after `raise`). Column-parallel projections (q/k/v, gate, up) keep 1/tp of their
output features, row-parallel ones (o_proj, down) 1/tp of their input features followed by a sum over
the ranks (`tx.all_reduce`, a functional collective). Attention heads, grouped KV heads included, are
split with them: every view/reshape/expand between the two projections is rewritten for the local head
count by following which dimension of each value is split across ranks.

Each rank compiles its own graph: rank and world size come from torch.distributed (one process per
device, e.g. `torchrun --nproc-per-node 2 app.py`; gloo on the CPU, NCCL on GPUs). Weight shards are
sliced once, here, from the full weights and bound as new constants of the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter, arg, val

aten = torch.ops.aten
tx = torch.ops.fxcc_tx

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
ELEMENTWISE = {aten.clone.default, aten.contiguous.default, aten.to.dtype, aten._to_copy.default,
               aten.alias.default, aten.type_as.default, tx.rotary.default, tx.gated_act.default,
               tx.silu.default, tx.gelu.default}


class ShardError(ValueError):
    """The graph cannot be split across ranks as asked; the message names the node and what to change."""


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


def _param_role(gm: fx.GraphModule, node: Any) -> tuple[str, str] | None:
    """('column' | 'row', 'weight' | 'bias') for a get_attr of a projection this pass splits."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    parts = str(node.target).split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    if parts[-2] in COLUMN:
        return "column", parts[-1]
    if parts[-2] in ROW:
        return "row", parts[-1]
    return None


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

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.tp == 1:
            return PassResult(False)
        rank = world(self.tp, self.rank)
        return _Sharder(gm, self.tp, rank, self.group).run()


class _Sharder:
    """One walk in program order, tracking for every value the dimension split across ranks (if any)."""

    def __init__(self, gm: fx.GraphModule, tp: int, rank: int, group: str):
        self.gm, self.tp, self.rank, self.group = gm, tp, rank, group
        self.rw = Rewriter(gm)
        self.split: dict[fx.Node, int] = {}
        self.shards: dict[tuple[str, int], fx.Node] = {}
        self.stats = {"column": 0, "row": 0, "all_reduce": 0, "reshape": 0}

    def run(self) -> PassResult:
        for node in list(self.gm.graph.nodes):
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                bad = [a for a in node.all_input_nodes if a in self.split]
                if bad:
                    raise ShardError(f"tp-shard: the model output {_where(bad[0])} is split across ranks; "
                                     "tp-shard expects every output to come after a row-parallel projection")
        if not self.stats["column"]:
            raise ShardError(f"tp-shard{{tp={self.tp}}}: found no projection to split (aten.linear of a weight named "
                             f"*.{'/'.join(COLUMN + ROW)}.weight after `raise`); tp-shard knows Llama-style "
                             "decoders, and needs `raise` before it in the pipeline")
        self.gm.graph.lint()
        self.gm.recompile()
        ir.propagate(self.gm, who="tp-shard")  # the local shapes, recorded for the passes after this one
        return PassResult(any(self.stats.values()), {k: v for k, v in self.stats.items() if v})

    # ------------------------------------------------------------------------------ weights

    def shard_param(self, node: fx.Node, dim: int, at: fx.Node) -> fx.Node:
        """A get_attr of this rank's 1/tp slice of parameter `node` along `dim` (sliced once, cached)."""
        key = (str(node.target), dim)
        if key in self.shards:
            return self.shards[key]
        full = ir.fetch_attr(self.gm, str(node.target))
        size = full.shape[dim]
        if size % self.tp:
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {node.target} has {size} features along dim {dim}, "
                             f"not divisible by tp={self.tp}; choose a tp that divides it")
        n = size // self.tp
        shard = ir.computed_from(full.detach().narrow(dim, self.rank * n, n).contiguous().clone(), full)
        name = f"tp_{str(node.target).replace('.', '_')}"
        self.gm.register_buffer(name, shard)
        attrs = [n for n in self.gm.graph.nodes if n.op == "get_attr"]
        with self.gm.graph.inserting_after(attrs[-1]):  # with the other parameters, in order of first use
            new = self.gm.graph.get_attr(name)
        new.meta["val"] = self.rw.mode.from_tensor(shard)
        self.shards[key] = new
        return new

    # ------------------------------------------------------------------------------ rules

    def visit(self, node: fx.Node) -> None:
        t = node.target
        if t is aten.linear.default and _param_role(self.gm, arg(node, 1, "weight")):
            return self.linear(node)
        inputs = [a for a in node.all_input_nodes if a in self.split]
        if not inputs:
            return
        if t in VIEWS:
            return self.view(node)
        if t is aten.transpose.int:
            nd = val(node).dim()
            d0, d1 = (d % nd for d in node.args[1:3])
            s = self.split[node.args[0]]
            self.split[node] = d1 if s == d0 else d0 if s == d1 else s
            return
        if t is aten.permute.default:
            self.split[node] = [d % val(node).dim() for d in node.args[1]].index(self.split[node.args[0]])
            return
        if t is aten.unsqueeze.default:
            d = node.args[1] % val(node).dim()
            s = self.split[node.args[0]]
            self.split[node] = s + 1 if d <= s else s
            return
        if t is aten.expand.default:
            return self.expand(node)
        if t in (tx.attention.default, aten.scaled_dot_product_attention.default):
            return self.attention(node)
        if t in ELEMENTWISE or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
            return self.elementwise(node)
        src = inputs[0]
        raise ShardError(f"tp-shard{{tp={self.tp}}}: cannot shard {t} at {_where(node)}: its input %{src.name} "
                         f"is split across ranks along dim {self.split[src]}, and tp-shard knows only "
                         "Llama-style decoders (projections, head reshapes, rotary, attention, gated MLP)")

    def linear(self, node: fx.Node) -> None:
        x, w = node.args[0], arg(node, 1, "weight")
        b = arg(node, 2, "bias")
        role, _ = _param_role(self.gm, w)
        if role == "column":
            if x in self.split:
                raise ShardError(f"tp-shard: column-parallel projection {_where(node)} gets an input that is "
                                 "already split across ranks")
            args = [x, self.shard_param(w, 0, node)] + ([self.shard_param(b, 0, node)] if b is not None else [])
            node.args, node.kwargs = tuple(args), {}
            self.split[node] = val(node).dim() - 1
            self.stats["column"] += 1
            return
        if self.split.get(x) != val(x).dim() - 1:
            raise ShardError(f"tp-shard: row-parallel projection {_where(node)} needs its input split along the "
                             f"last dim (the output of a column-parallel projection); got {x.name}")
        node.args, node.kwargs = (x, self.shard_param(w, 1, node)), {}
        users = list(node.users)
        with self.gm.graph.inserting_after(node):
            ar = self.gm.graph.call_function(tx.all_reduce.default, (node, "sum", self.group))
        ar.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        ar.meta["val"] = val(node)
        out = ar
        if b is not None:  # the bias is added once, after the sum
            with self.gm.graph.inserting_after(ar):
                out = self.gm.graph.call_function(aten.add.Tensor, (ar, b))
            out.meta["val"] = val(node)
        for u in users:
            u.replace_input_with(node, out)
        self.stats["row"] += 1
        self.stats["all_reduce"] += 1

    def view(self, node: fx.Node) -> None:
        src = node.args[0]
        s = self.split[src]
        shape_in, shape_out = list(val(src).shape), list(val(node).shape)
        prefix = math.prod(shape_in[:s])
        j = next((j for j in range(len(shape_out)) if math.prod(shape_out[:j]) == prefix and shape_out[j] > 1),
                 None)
        if j is None:
            raise ShardError(f"tp-shard: cannot follow the split dim {s} of %{src.name} through {_where(node)} "
                             f"({shape_in} -> {shape_out})")
        if shape_out[j] % self.tp:
            raise ShardError(f"tp-shard{{tp={self.tp}}}: {_where(node)} splits into {shape_out[j]} heads (dim {j} "
                             f"of {shape_out}), which tp={self.tp} does not divide; choose a tp that divides the "
                             "number of attention heads and of key/value heads")
        shape_out[j] //= self.tp
        node.args = (src, shape_out, *node.args[2:])
        self.split[node] = j
        self.stats["reshape"] += 1

    def expand(self, node: fx.Node) -> None:
        src = node.args[0]
        sizes = list(node.args[1])
        j = self.split[src] + len(sizes) - val(src).dim()
        if sizes[j] != -1:
            sizes[j] //= self.tp
        node.args = (src, sizes, *node.args[2:])
        self.split[node] = j
        self.stats["reshape"] += 1

    def attention(self, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        head = val(q).dim() - 3
        if any(self.split.get(a) != val(a).dim() - 3 for a in (q, k, v)):
            raise ShardError(f"tp-shard: attention {_where(node)} needs q, k and v split by heads "
                             "(from column-parallel projections)")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and val(mask).dim() >= 3 and val(mask).shape[-3] > 1:
            raise ShardError(f"tp-shard: attention {_where(node)} has a per-head mask; tp-shard supports masks "
                             "broadcast over heads only")
        self.split[node] = head

    def elementwise(self, node: fx.Node) -> None:
        nd = val(node).dim()
        dims = set()
        for a in node.all_input_nodes:
            v = val(a)
            if not isinstance(v, torch.Tensor):
                continue
            if a in self.split:
                dims.add(self.split[a] + nd - v.dim())
        if len(dims) != 1:
            raise ShardError(f"tp-shard: {_where(node)} combines values split along different dims {sorted(dims)}")
        d = dims.pop()
        for a in node.all_input_nodes:
            v = val(a)
            if isinstance(v, torch.Tensor) and a not in self.split:
                k = d - (nd - v.dim())
                if 0 <= k < v.dim() and v.shape[k] > 1:
                    raise ShardError(f"tp-shard: {_where(node)} combines a value split across ranks with "
                                     f"%{a.name}, which is not split (dim {k} of size {v.shape[k]})")
        self.split[node] = d
