"""token-merge: ToMe-style token merging between attention and MLP, and On-device Sora's temporal merging.

Approximate (exact = False), opt-in. Runs on the captured aten graph, before `raise`:
`canonicalize,token-merge{r=8},raise,fuse,codegen`. It needs attention as
`aten.scaled_dot_product_attention` (transformers' default `attn_implementation="sdpa"`).

mode=bipartite (ToMe, Bolya et al. 2023): in every block, right after the attention's residual add, the
tokens are split alternately into sets A and B; each A token finds its most similar B token by cosine
similarity of the attention keys (mean over heads); the `r` most similar pairs are merged by a
size-weighted average, so T tokens become T - r and the MLP and every later block run on fewer tokens.
Later attentions add log(size) to their scores (proportional attention). The first token (CLS) is never
merged. Padding never leaks into real tokens: a padded token has weight 0 in every average, a real/padded
pair is the least preferred edge, and the key mask shrinks along with the tokens. After the last block an
unmerge gives each original token its merged token's value, so per-token outputs keep their shape.
`speedup=S` instead of `r` picks the smallest r whose estimated (matmul FLOP) speedup of the blocks is S.
Causal attention is refused: merging applies to encoders with at most a key-padding mask.

mode=temporal (On-device Sora's TDTM): the stream is video-shaped, with frames along `axis` (or
`frames` x tokens-per-frame flattened, frame-major, along `axis`). Before the first block each pair of
consecutive frames is averaged, the blocks run on half the frames, and after the last merged block each
frame is repeated back.

Shapes stay static: the pass rewrites the shape arguments of views, reshapes and expands downstream of a
merge, matching the dimensions that changed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter, arg, is_op, val

log = logging.getLogger(__name__)
aten = torch.ops.aten

tx = torch.ops.fxcc_tx

# ------------------------------------------------------------------------------------ graph analysis


def _stream_cuts(gm: fx.GraphModule, is_stream: Any) -> list[fx.Node]:
    """Nodes after which the residual stream is the only live stream tensor: the places a merge can go.

    A stream tensor is one `is_stream` accepts (e.g. [B, T, D] float); "live" means used after that node.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    cuts, live = [], set()
    for i, n in enumerate(nodes):
        if is_stream(n):
            live.add(n)
        live = {m for m in live if last_use[m] > i}
        if live == {n}:
            cuts.append(n)
    return cuts


def _float(n: fx.Node) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


# --------------------------------------------------------------------------------- shape re-writing


def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up the dims of two shapes of a view into groups of equal product ([2, 8, 32] / [2, 8, 4, 8])."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i == len(a):
            out.append(([], [j]))
            j += 1
            continue
        if j == len(b):
            out.append(([i], []))
            i += 1
            continue
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                gj.append(j)
                pb *= b[j]
                j += 1
        out.append((gi, gj))
    return out


def _reshaped(node: fx.Node, old_in: list[int], new_in: list[int], old_out: list[int], tokens: int,
              inner: bool) -> list[int]:
    """The static shape a view must take now that some of its input's dims (the token dims) changed.

    When one input dim splits into several ([B*T] -> [B, T]), the tokens are the output dim whose old size
    is the old token count `tokens`; when several are, the innermost (`inner`, as a [B, T] stream flattens)
    or the outermost (frames of a frame-major [F*N] axis).
    """
    new_out = list(old_out)
    for gi, gj in _groups(old_in, old_out):
        before = math.prod(old_in[k] for k in gi)
        after = math.prod(new_in[k] for k in gi)
        if before == after:
            continue
        if len(gj) == 1:
            new_out[gj[0]] = after
        elif len(gi) == 1 and (cands := [k for k in gj if old_out[k] == tokens and (tokens * after) % before == 0]):
            k = cands[-1] if inner else cands[0]
            new_out[k] = tokens * after // before
        else:
            raise ValueError(f"fxcc token-merge: cannot re-shape {node.name} ({node.target}) from {old_in} -> "
                             f"{old_out} for merged tokens {new_in}; the tokens are split across dimensions")
    return new_out


def _fix_node(node: fx.Node, old: dict[fx.Node, Any], rw: Rewriter, tokens: int, inner: bool) -> None:
    """Rewrite baked shape arguments of `node` for inputs whose shape changed, then re-infer its type.

    `tokens`: the unmerged size of the merged axis (see _reshaped, as `inner`).
    """
    if is_op(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        x = node.args[0]
        new = _reshaped(node, old[x], list(val(x).shape), old[node], tokens, inner)
        node.args = (x, new, *node.args[2:])
    elif is_op(node, aten.expand.default):
        x, sizes = node.args[0], list(node.args[1])
        lead = len(sizes) - len(old[x])
        for k, (o, n) in enumerate(zip(old[x], val(x).shape)):
            if o != n and sizes[lead + k] != -1:
                sizes[lead + k] = n
        node.args = (x, sizes, *node.args[2:])
    try:
        node.meta["val"] = rw.infer(node)
    except Exception as e:  # noqa: BLE001 - any failure means the graph cannot take merged tokens here
        raise ValueError(f"fxcc token-merge: {node.name} ({node.target}) does not accept the merged token "
                         f"count: {e}") from None


def _shape(v: Any) -> Any:
    """A value's shape, also for ops returning several tensors (unbind, split); None for non-tensors."""
    if isinstance(v, torch.Tensor):
        return list(v.shape)
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [list(t.shape) for t in v]
    return None


def _shapes(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    return {n: s for n in gm.graph.nodes if (s := _shape(val(n))) is not None}


def _changed(node: fx.Node, old: dict[fx.Node, Any]) -> bool:
    """Whether an input of `node` changed shape; nodes the pass inserted count as changed."""
    return any(_shape(val(a)) is not None and (a not in old or _shape(val(a)) != old[a])
               for a in node.all_input_nodes)


def _insert(rw: Rewriter, node: fx.Node, target: Any, args: tuple, *, before: bool = False) -> fx.Node:
    """Insert target(*args) right after (or before) `node`, named after the op, carrying node's provenance."""
    graph = rw.gm.graph
    with graph.inserting_before(node) if before else graph.inserting_after(node):
        new = graph.create_node("call_function", target, args, name=target._schema.name.split("::")[-1])
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    new.meta["val"] = rw.infer(new)
    return new


# ------------------------------------------------------------------------------------- r from speedup


def _clamp(r: int, tokens: int, protect_first: bool) -> int:
    """At most all of set A (less the protected first token) can merge in one block."""
    return max(0, min(r, (tokens + 1) // 2 - (1 if protect_first else 0)))


def estimated_speedup(r: int, tokens: int, hidden: int, blocks: int, protect_first: bool = True) -> float:
    """Blocks' matmul work exact / merged: Q,K,V,O (4 d^2) and scores (2 T d) on T_in, the MLP (8 d^2) on T_out.

    An estimate of the blocks alone (embeddings, heads and the merge ops themselves are not counted).
    """
    def block(t_in: int, t_out: int) -> float:
        return (4 * hidden + 2 * t_in) * hidden * t_in + 8 * hidden * hidden * t_out

    exact, merged, t = blocks * block(tokens, tokens), 0.0, tokens
    for _ in range(blocks):
        k = _clamp(r, t, protect_first)
        merged += block(t, t - k)
        t -= k
    return exact / merged


def r_for_speedup(target: float, tokens: int, hidden: int, blocks: int, protect_first: bool = True) -> int:
    """The smallest r whose estimated speedup reaches `target` (the largest useful r when none does)."""
    top = _clamp(tokens, tokens, protect_first)
    for r in range(1, top + 1):
        if estimated_speedup(r, tokens, hidden, blocks, protect_first) >= target:
            return r
    log.warning("token-merge: speedup=%s is beyond the estimate's reach (%.2fx at r=%d); using r=%d", target,
                estimated_speedup(top, tokens, hidden, blocks, protect_first), top, top)
    return top


# -------------------------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class TokenMerge(Pass):
    """Merge tokens to cut work (approximate): ToMe bipartite merging, or temporal pairs of frames.

    r: tokens merged per block (bipartite; 0 = no change). speedup: instead of r, the smallest r whose
    estimated speedup of the blocks (matmul FLOPs, MLP 4x hidden) reaches this factor.
    protect_first: never merge token 0 (CLS).
    axis / frames / blocks: temporal mode's frame axis, frame count when frames x tokens share that axis
    (0 = the axis holds frames only), and how many leading blocks run on merged frames (0 = all).
    """

    name = "token-merge"
    exact = False
    r: int = 0
    speedup: float | None = None
    mode: Literal["bipartite", "temporal"] = "bipartite"
    protect_first: bool = True
    axis: int = 1
    frames: int = 0
    blocks: int = 0

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r={self.r}: the number of tokens merged per block cannot be negative")
        if self.speedup is not None and (self.r or self.mode != "bipartite" or not self.speedup > 1):
            raise ValueError(f"speedup={self.speedup}: give either r or a speedup > 1, for mode=bipartite")
        if self.mode == "temporal" and self.r:
            raise ValueError("r applies to mode=bipartite; mode=temporal merges pairs of frames (use blocks=N)")
        if self.blocks < 0 or self.frames < 0:
            raise ValueError("blocks and frames must be >= 0")

    def backoff(self, result: PassResult) -> Pass | None:
        """Weaker: half the tokens per block (bipartite), one merged block fewer (temporal); None at r=1 / 1 block."""
        if self.mode == "temporal":
            n = result.stats.get("merged_blocks", 0)
            return dataclasses.replace(self, blocks=n - 1) if n > 1 else None
        r = result.stats.get("r", self.r)
        return dataclasses.replace(self, r=r // 2, speedup=None) if r > 1 else None

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.mode == "bipartite" and self.r == 0 and self.speedup is None:
            return PassResult(False)
        attns = [n for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention.default)]
        if not attns:
            raise ValueError("fxcc token-merge: no aten.scaled_dot_product_attention in the graph; load the model "
                             "with attn_implementation='sdpa' and put token-merge before raise in the pipeline")
        causal = [a.name for a in attns if arg(a, 5, "is_causal")]
        if causal:
            raise ValueError(f"fxcc token-merge: attention {causal[0]} is causal; token merging applies to encoders "
                             "(bidirectional attention with at most a key-padding mask)")
        if self.mode == "temporal":
            return self._temporal(gm, attns)
        return self._bipartite(gm, attns)

    # ------------------------------------------------------------------------------------ bipartite

    def _bipartite(self, gm: fx.GraphModule, attns: list[fx.Node]) -> PassResult:
        bsz, heads, t0, dh = val(attns[0].args[0]).shape
        r_block = self.r if self.speedup is None else r_for_speedup(self.speedup, t0, heads * dh, len(attns),
                                                                   self.protect_first)

        def is_stream(n: fx.Node) -> bool:
            v = val(n)
            return _float(n) and v.dim() == 3 and tuple(v.shape[:2]) == (bsz, t0)

        cuts = _stream_cuts(gm, is_stream)
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        merge_at: dict[fx.Node, fx.Node] = {}  # cut -> its block's attention
        for i, a in enumerate(attns):
            end = pos[attns[i + 1]] if i + 1 < len(attns) else len(pos)
            cut = next((c for c in cuts if pos[a] < pos[c] < end), None)
            if cut is None:
                raise ValueError(f"fxcc token-merge: found no single residual stream after attention {a.name}; "
                                 "the block's structure is not one token-merge knows")
            merge_at[cut] = a
        final = [c for c in cuts if pos[c] > pos[attns[-1]] and c not in merge_at][-1:]
        if not final:
            raise ValueError("fxcc token-merge: found no residual stream after the last block to unmerge")
        final = final[0]

        rw = Rewriter(gm)
        old = _shapes(gm)
        weights = pos_map = None
        tokens, merges, merged = t0, 0, 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node in attns and weights is not None and merges:
                mask = _insert(rw, node, tx.tome_bias.default, (weights, val(node.args[0]).dtype), before=True)
                node.args = (*node.args[:3], mask, *node.args[4:])
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
            if _changed(node, old) or (node in attns and merges):
                _fix_node(node, old, rw, t0, True)
            if node in attns and weights is None:
                mask = arg(node, 3, "attn_mask")
                weights = _insert(rw, node, tx.tome_key_weights.default, (node.args[1], mask), before=True)
            if node in merge_at:
                r = _clamp(r_block, tokens, self.protect_first)
                if r > 0:
                    keys = merge_at[node].args[1]
                    users = list(node.users)
                    dest = _insert(rw, node, tx.tome_match.default, (keys, weights, r, self.protect_first))
                    x = _insert(rw, dest, tx.tome_merge.default, (node, weights, dest, tokens - r))
                    weights = _insert(rw, x, tx.tome_sizes.default, (weights, dest, tokens - r))
                    pos_map = _insert(rw, weights, tx.tome_compose.default, (pos_map, dest))
                    for u in users:
                        u.replace_input_with(node, x)
                    tokens, merges, merged = tokens - r, merges + 1, merged + r
            if node is final and pos_map is not None:
                users = list(node.users)
                out = _insert(rw, node, tx.tome_unmerge.default, (node, pos_map))
                for u in users:
                    u.replace_input_with(node, out)
        log.info("token-merge: %d tokens -> %d over %d blocks (r=%d)", t0, tokens, merges, r_block)
        stats = {"merged_blocks": merges, "tokens_merged": merged, "tokens_final": tokens}
        return PassResult(merges > 0, stats if self.speedup is None else {**stats, "r": r_block})

    # ------------------------------------------------------------------------------------- temporal

    def _temporal(self, gm: fx.GraphModule, attns: list[fx.Node]) -> PassResult:
        q = val(attns[0].args[0])
        numel = q.shape[0] * q.shape[-2] * q.shape[-3] * q.shape[-1]

        def is_stream(n: fx.Node) -> bool:
            v = val(n)
            return _float(n) and v.dim() >= 3 and v.numel() == numel

        cuts = _stream_cuts(gm, is_stream)
        pos = {n: i for i, n in enumerate(gm.graph.nodes)}
        starts = []
        for i, a in enumerate(attns):
            begin = pos[attns[i - 1]] if i else -1
            start = [c for c in cuts if begin < pos[c] < pos[a]]
            if not start:
                raise ValueError(f"fxcc token-merge: found no block input before attention {a.name}")
            starts.append(start[-1])
        n_blocks = min(self.blocks, len(attns)) or len(attns)
        first = starts[0]
        later = [c for c in cuts if pos[c] > pos[attns[n_blocks - 1]]]
        if n_blocks < len(attns):
            last = starts[n_blocks]
            later = [c for c in later if pos[c] <= pos[last]]
        if not later:
            raise ValueError("fxcc token-merge: found no block output to unmerge after the merged blocks")
        end = later[-1]
        for a in attns[:n_blocks]:
            if arg(a, 3, "attn_mask") is not None:
                raise ValueError(f"fxcc token-merge temporal: attention {a.name} has a mask; temporal merging "
                                 "supports unmasked attention only")
        ax = self.axis % val(first).dim()
        frames_here = self.frames or val(first).shape[ax]
        if frames_here % 2:
            raise ValueError(f"fxcc token-merge temporal: {frames_here} frames along axis {self.axis} of "
                             f"{first.name}; merging pairs needs an even frame count")

        rw = Rewriter(gm)
        old = _shapes(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" and node is not first:
                continue
            if _changed(node, old):
                _fix_node(node, old, rw, frames_here, False)
            if node is first:
                users = list(node.users)
                x = _insert(rw, node, tx.temporal_merge.default, (node, ax, self.frames))
                for u in users:
                    u.replace_input_with(node, x)
            if node is end:
                users = list(node.users)
                y = _insert(rw, node, tx.temporal_unmerge.default, (node, ax, self.frames))
                for u in users:
                    u.replace_input_with(node, y)
                break
        return PassResult(True, {"merged_blocks": n_blocks, "frames": frames_here})
