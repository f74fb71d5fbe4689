"""layer-skip: Unified Layer Skipping on aten graphs (approximate, opt-in).

Finds the repeated blocks of a model (BERT `encoder.layer.N`, Llama `layers.N`, GPT-2 `h.N`, ...) from the
`nn_module_stack` of the captured graph, and removes `k` of them by forwarding each removed block's input
hidden state to where its output hidden state was used; dead-code elimination removes the rest.

Which blocks: never the first or the last; the removed ones sit evenly between the kept ends, at
`i * (N - 1) / (k + 1)` rounded half up, for i = 1..k (12 blocks, k = 3 -> 3, 6, 8). The choice depends only on N
and k, never on the input, so batched decoding and KV caches work.

How many: `skip=k`, or `speedup=s`. For a speedup, each block's share of the model's work comes from a
FLOP estimate of the graph (matrix products counted as 2*M*N*K, every other op as one FLOP per output
element) as b = (FLOPs inside blocks) / (all FLOPs); blocks are identical, so removing k of N saves
k*b/N of the work and the predicted speedup is 1/(1 - k*b/N).
The k whose predicted speedup is nearest to s (relative error) is taken, at most N - 2.

KV caches: a removed block's outputs other than its hidden state (its K/V cache entries) are kept,
computed from the hidden state that reaches the block: the skipped layer still projects K and V and
appends them to its cache, so every layer's cache has the same length and the cache object's bookkeeping
(sequence length, cropping, reordering) is untouched; the layer's attention and MLP are gone, and nothing
reads that cache. This costs the K/V projections of a skipped block (a few percent of a Llama block).

Place it on the aten graph, before `raise`: `canonicalize,layer-skip{speedup=1.25},raise,fuse,codegen`.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxcc.dialects import dialect_of
from fxcc.pipeline import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten

_INDEX = re.compile(r"\d+")


class LayerSkipError(ValueError):
    """layer-skip cannot apply to this graph or with these options; the message says what to change."""


@dataclass
class Blocks:
    """The repeated blocks of a graph: module path prefix (e.g. `encoder.layer`) and each block's nodes."""

    prefix: str
    nodes: list[list[fx.Node]]

    def __len__(self) -> int:
        return len(self.nodes)


def module_path(node: fx.Node) -> str | None:
    """The innermost module a node was traced in (`layers.3.self_attn.q_proj`), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _signature(nodes: list[fx.Node], prefix: str, index: int) -> tuple:
    """What makes two blocks structurally identical: their ops on parameters, in order, with the relative
    module path and parameter shapes. Ops without parameters are left out, since CSE may have merged such
    ops of all blocks into the first one (e.g. the unsqueeze of shared rotary tables)."""
    head = f"{prefix}.{index}"

    def entry(n: fx.Node) -> tuple:
        params = tuple(tuple(_tensor_val(a).shape) if _tensor_val(a) is not None else ()
                       for a in n.all_input_nodes if a.op == "get_attr")
        return (str(n.target), (module_path(n) or "")[len(head):], params)

    with_params = [n for n in nodes if n.op == "call_function" and any(a.op == "get_attr" for a in n.all_input_nodes)]
    return tuple(entry(n) for n in with_params or nodes)


def find_blocks(gm: fx.GraphModule, model_name: str = "the model") -> Blocks:
    """The outermost module list whose numbered children are structurally identical, with >= 2 of them.

    Raises LayerSkipError naming `model_name` when no such repetition exists.
    """
    groups: dict[str, dict[int, list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    for node in gm.graph.nodes:
        path = module_path(node)
        if not path:
            continue
        parts = path.split(".")
        for j, part in enumerate(parts):
            if _INDEX.fullmatch(part):
                groups[".".join(parts[:j])][int(part)].append(node)
    found = []
    for prefix, by_index in groups.items():
        indices = sorted(by_index)
        if len(indices) < 2 or indices != list(range(len(indices))):
            continue
        sigs = {_signature(by_index[i], prefix, i) for i in indices}
        if len(sigs) == 1:
            found.append(Blocks(prefix, [by_index[i] for i in indices]))
    if not found:
        candidates = ", ".join(sorted(f"{p or '<root>'}.N ({len(b)} blocks)" for p, b in groups.items())) or "none"
        raise LayerSkipError(
            f"layer-skip found no repeated blocks in {model_name}: it needs a module list of >= 2 structurally "
            f"identical numbered blocks (like `layers.0`, `layers.1`, ...) in the graph's nn_module_stack "
            f"(numbered modules seen: {candidates}). Remove layer-skip from the pipeline for this model.")
    return max(found, key=lambda b: sum(map(len, b.nodes)))


def balanced_choice(n_blocks: int, k: int) -> list[int]:
    """Indices of `k` blocks to remove out of `n_blocks`, spread evenly, never the first or the last."""
    if k < 0 or k > n_blocks - 2:
        raise LayerSkipError(f"layer-skip cannot remove {k} of {n_blocks} blocks: the first and last always "
                             f"stay, so skip must be between 0 and {max(0, n_blocks - 2)}")
    step = (n_blocks - 1) / (k + 1)
    return [math.floor(i * step + 0.5) for i in range(1, k + 1)]


def blocks_for_speedup(speedup: float, n_blocks: int, block_share: float) -> int:
    """How many blocks to remove so that 1 / (1 - k * block_share / n_blocks) is nearest to `speedup`."""
    per_block = block_share / n_blocks
    best, best_err = 0, abs(1.0 - speedup) / speedup
    for k in range(1, n_blocks - 1):
        rest = 1.0 - k * per_block
        if rest <= 0:
            break
        err = abs(1.0 / rest - speedup) / speedup
        if err < best_err:
            best, best_err = k, err
    return best


# ------------------------------------------------------------------------------ FLOP estimate

def _numel(v: Any) -> int:
    return v.numel() if isinstance(v, torch.Tensor) else 0


def node_flops(node: fx.Node) -> int:
    """Rough FLOPs of one aten node from its recorded shapes: 2*M*N*K for matrix products, else 1 per element."""
    if node.op != "call_function":
        return 0
    out = node.meta.get("val")
    t = node.target
    if t is operator.getitem:
        return 0
    args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    if t in (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default):
        return 2 * _numel(out) * args[0].shape[-1]
    if t in (aten.addmm.default, aten.baddbmm.default):
        return 2 * _numel(out) * args[1].shape[-1]
    if t is aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        return 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if t is aten.convolution.default:
        w = args[1]
        return 2 * _numel(out) * w.shape[1:].numel()
    if isinstance(t, torch._ops.OpOverload) and any(r.alias_info for r in t._schema.returns):
        return 0  # views
    return sum(_numel(v) for v in (out if isinstance(out, (list, tuple)) else [out]))


def block_share(gm: fx.GraphModule, blocks: Blocks) -> float:
    """Fraction of the graph's estimated FLOPs spent inside the repeated blocks."""
    total = sum(node_flops(n) for n in gm.graph.nodes)
    inside = sum(node_flops(n) for b in blocks.nodes for n in b)
    return inside / total if total else 1.0


# ------------------------------------------------------------------------------------ rewiring

def _tensor_val(node: fx.Node) -> torch.Tensor | None:
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _same_type(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and a.device == b.device


def hidden_state(blocks: Blocks, i: int) -> tuple[fx.Node, fx.Node]:
    """(input, output) hidden state of block i: the tensor the block takes from outside and the same-typed
    tensor it hands on to the next block."""
    inside = set(blocks.nodes[i])
    prev = set(blocks.nodes[i - 1]) if i > 0 else set()
    nxt = set(blocks.nodes[i + 1]) if i + 1 < len(blocks) else set()
    ins = list(dict.fromkeys(a for n in blocks.nodes[i] for a in n.all_input_nodes
                             if a not in inside and a.op != "get_attr" and _tensor_val(a) is not None))
    outs = [n for n in blocks.nodes[i] if _tensor_val(n) is not None and any(u not in inside for u in n.users)]
    pairs = [(a, b) for a in ins for b in outs if _same_type(_tensor_val(a), _tensor_val(b))]
    if len(pairs) > 1:  # prefer the chain: produced by the previous block, consumed by the next one
        pairs = [(a, b) for a, b in pairs if (not prev or a in prev) and (not nxt or any(u in nxt for u in b.users))]
    if len(pairs) != 1:
        what = "no" if not pairs else f"{len(pairs)} candidate"
        raise LayerSkipError(f"layer-skip found {what} hidden-state input/output pair(s) for block "
                             f"{blocks.prefix}.{i}; it needs one tensor in and one tensor of the same shape out. "
                             "Remove layer-skip from the pipeline for this model.")
    return pairs[0]


def skip_blocks(gm: fx.GraphModule, blocks: Blocks, indices: list[int]) -> None:
    """Forward the input hidden state of each chosen block to the users of its output hidden state."""
    pairs = {i: hidden_state(blocks, i) for i in indices}
    forwarded: dict[fx.Node, fx.Node] = {}
    for i in sorted(indices):
        src, dst = pairs[i]
        src = forwarded.get(src, src)  # consecutive skipped blocks: reach back to the last kept one
        inside = set(blocks.nodes[i])
        dst.replace_all_uses_with(src, delete_user_cb=lambda u, inside=inside: u not in inside)
        forwarded[dst] = src
    for i in indices:
        _erase_unused(gm, blocks.nodes[i])


def _erase_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the nodes of a skipped block that nothing reads any more. fx's dead-code elimination keeps ops it
    counts as impure, attention among them (tagged `nondeterministic_seeded` for its dropout): a skipped
    block's attention would stay in the graph, run for nothing and look like a live block to the passes
    after this one (token-merge). Ops that write in place (a KV cache update) stay."""
    for n in reversed(nodes):
        if n.users or n.op != "call_function" or n.graph is not gm.graph:
            continue
        t = n.target
        op = isinstance(t, torch._ops.OpOverload)
        if op and t._schema.is_mutable:
            continue
        if n.is_impure() and not (op and torch.Tag.nondeterministic_seeded in t.tags):
            continue
        gm.graph.erase_node(n)


@dataclass(frozen=True)
class LayerSkip(Pass):
    """Remove `skip` repeated blocks (or as many as reach `speedup`), balanced between the first and last."""

    name = "layer-skip"
    exact = False
    speedup: float | None = None
    skip: int | None = None

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.skip is None):
            raise ValueError("give exactly one of speedup=... (e.g. 1.25) or skip=... (a number of blocks)")
        if self.skip is not None and self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if self.speedup is not None and not self.speedup >= 1.0:
            raise ValueError(f"speedup must be >= 1.0 (a target like 1.25), got {self.speedup}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.skip == 0:
            return PassResult(False, {"skipped": 0})
        raised = Counter(dialect_of(n.target) for n in gm.graph.nodes if n.op == "call_function")
        merged = [n for n in gm.graph.nodes if n.op == "call_function" and dialect_of(n.target) == "tx"
                  and "merge" in getattr(n.target, "__name__", "")]
        if merged and not raised["kernel"]:
            raise LayerSkipError(f"{self.spec()} runs after token-merge (found {merged[0].name}): blocks that merge "
                                 f"tokens no longer hand on a hidden state of their input's shape. Put it before "
                                 f"token-merge, e.g. 'canonicalize,{self.spec()},token-merge{{r=8}},raise,fuse,codegen'")
        if raised["tx"] or raised["kernel"]:
            raise LayerSkipError(
                f"{self.spec()} reads aten graphs, but it runs after passes that raised or lowered them "
                f"(found {raised['tx']} tx and {raised['kernel']} kernel ops); put it before `raise`, e.g. "
                f"'canonicalize,{self.spec()},raise,fuse,codegen'")
        model = type(ctx.module).__name__ if ctx.module is not None else "the model"
        blocks = find_blocks(gm, model)
        n = len(blocks)
        if self.skip is not None:
            if self.skip > n - 2:
                raise LayerSkipError(f"{self.spec()}: {model} has {n} blocks ({blocks.prefix}.0-{n - 1}); the first "
                                     f"and last always stay, so skip can be at most {max(0, n - 2)}")
            k = self.skip
        else:
            share = block_share(gm, blocks)
            k = blocks_for_speedup(self.speedup, n, share)
            predicted = 1.0 / (1.0 - k * share / n)
            log.info("layer-skip{speedup=%s}: %d blocks carry %.1f%% of the estimated FLOPs; skipping %d "
                     "(predicted speedup %.2fx)", self.speedup, n, 100 * share, k, predicted)
        chosen = balanced_choice(n, k)
        if not chosen:
            return PassResult(False, {"skipped": 0, "blocks": n})
        skip_blocks(gm, blocks, chosen)
        log.info("layer-skip removed %s of %s.0-%d", ", ".join(f"{blocks.prefix}.{i}" for i in chosen),
                 blocks.prefix, n - 1)
        stats = {"skipped": k, "blocks": n}
        stats.update({f"skipped.{blocks.prefix}.{i}": 1 for i in chosen})
        return PassResult(True, stats)

    def backoff(self, result: PassResult) -> Pass | None:
        """One block fewer than this run removed; None when it removed one (or none): nothing weaker is approximate."""
        k = result.stats.get("skipped", 0)
        return LayerSkip(skip=k - 1) if k > 1 else None
