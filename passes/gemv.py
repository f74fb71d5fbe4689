"""gemv: decode-shaped linears on the GPU become GEMVs that carry their neighbours (norm, SwiGLU, residual).

At decode a linear reads its whole weight to make a few rows (one per sequence): it is bound by the weight's
bytes, and the ops around it (the RMSNorm before, SwiGLU and the residual add after) are kernels of their own
whose launches cost as much as their work. This pass rewrites `aten.linear(x, W, b)` with a constant float
weight and at most `rows` rows of x (or one token per sequence of a symbolic batch, [B, 1, K]: the kernel takes
the library past 16 rows at run time) into `tx.gemv_linear`, then folds into it:

- `add(linear, r)` of one shape and dtype -> `tx.gemv_linear(.., residual=r)`;
- `gated_act(slice(y, 0, F), slice(y, F, 2F), "silu")` of a merged gate/up linear (merge-linears) ->
  `tx.gemv_gated_linear`: the gate in the epilogue, no [M, 2F] intermediate;
- `linear(rms_norm(h, g, eps))` where the norm has no other user and g is a constant -> the norm's 1 / rms is
  summed as x streams and g multiplies the x tiles (the weight is not touched: no second rounding of W g).

The kernel (fxcc.codegen.triton_gemv, float weights) decides at its first call on the GPU: the library linear
with the same neighbours as torch ops is the incumbent, and a GEMV config is kept only when it beats it beyond
the noise (fxcc.measure.decide). Exact within floating-point tolerance (fp32 accumulation, one rounding at
the end). On CUDA only; `cpu=true` rewrites CPU graphs too (Triton's interpreter; tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.ir import fetch_attr
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import arg, is_op

aten = torch.ops.aten
tx = torch.ops.fxcc_tx
LINEAR = aten.linear.default
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Gemv(Pass):
    """Decode linears (at most `rows` rows of x, a constant float weight) -> tx.gemv_linear with folds.

    rows: the most rows of x a linear may have (the GEMV takes 16).
    fold: fold norms, gates and residual adds into the GEMVs.
    cpu: rewrite on CPU targets too (the kernel then runs under Triton's interpreter).
    """

    name = "gemv"
    reads = "tx"
    writes = "tx"
    rows: int = 16
    fold: bool = True
    cpu: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.rows <= 16:
            raise ValueError(f"rows must be in 1..16 (the GEMV's limit), got {self.rows}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.target != "cuda" and not (self.cpu and ctx.target == "cpu"):
            return PassResult(False)
        g = gm.graph
        linears = 0
        for node in list(g.nodes):
            if not self._decode_linear(gm, node):
                continue
            w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
            with g.inserting_before(node):
                new = g.call_function(tx.gemv_linear.default, (node.args[0], w, b, "triton"))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            linears += 1
        if not linears:
            return PassResult(False)
        stats = {"linears": linears}
        if self.fold:
            for what, fn in (("gated", _fold_gated), ("residual", _fold_residuals), ("norm", _fold_norms)):
                if n := fn(gm):
                    stats[what] = n
        g.lint()
        return PassResult(True, stats)

    def _decode_linear(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if not is_op(node, LINEAR) or node.kwargs:
            return False
        x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not isinstance(b, fx.Node)):
            return False
        xv, wv, yv = (getattr(n, "meta", {}).get("val") for n in (x, w, node))
        weight = fetch_attr(gm, w.target)
        if not all(isinstance(t, torch.Tensor) for t in (xv, wv, yv, weight)) or wv.dim() != 2 or xv.dim() < 1:
            return False
        if wv.dtype not in FLOATS or xv.dtype != wv.dtype or (b is not None and b.meta.get("val") is not None
                                                               and b.meta["val"].dtype != wv.dtype):
            return False
        if any(not isinstance(s, int) for s in (xv.shape[-1], *wv.shape)) or xv.shape[-1] == 0:
            return False
        return _decode_rows(xv, self.rows)


def _decode_rows(xv: torch.Tensor, most: int) -> bool:
    """Whether x [*lead, K] is a decode step's: at most `most` rows, or one token per sequence of a symbolic
    batch ([B, 1, K] and the like; the kernel runs the library past 16 rows, decided per size at run time)."""
    lead = xv.shape[:-1]
    if all(isinstance(s, int) for s in lead):
        return 0 < math.prod(lead) <= most
    return xv.dim() >= 3 and isinstance(xv.shape[-2], int) and xv.shape[-2] == 1


def _gemv(node: fx.Node, most: int) -> bool:
    """A tx.gemv_linear with no fold past argument `most` (4: none yet; 5: perhaps a residual)."""
    return (node.op == "call_function" and node.target is tx.gemv_linear.default and not node.kwargs
            and 4 <= len(node.args) <= most)


def residual_add(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(add, r) where `node`'s one user is `add(node, r)` of the same shape and dtype: a residual a linear's
    epilogue can take (this pass's GEMVs, and the quantized ones of mixed-precision)."""
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2 or add.args[0] is add.args[1]:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    y, r, z = node.meta.get("val"), getattr(other, "meta", {}).get("val"), add.meta.get("val")
    if not all(isinstance(t, torch.Tensor) for t in (y, r, z)) or not (y.shape == r.shape == z.shape
                                                                      and y.dtype == r.dtype == z.dtype):
        return None
    return add, other


def swiglu(node: fx.Node, two_f: int) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(gate, up, act) where `node`, a merged gate/up linear of `two_f` columns, is used only as
    `act = gated_act(slice(node, 0, F), slice(node, F, 2F), "silu")` (Llama's SwiGLU)."""
    x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if len(node.users) != 2 or two_f % 2 or not isinstance(x, torch.Tensor) or not x.dim():
        return None
    f = two_f // 2
    parts = {}
    for u in node.users:
        if u.target is aten.slice.Tensor and len(u.args) == 4 and u.args[1] in (-1, x.dim() - 1) and not u.kwargs:
            parts[(u.args[2], u.args[3])] = u
    gate, up = parts.get((0, f)), parts.get((f, two_f))
    if gate is None or up is None or len(gate.users) != 1 or len(up.users) != 1:
        return None
    act = next(iter(gate.users))
    if (act.target is not tx.gated_act.default or act.args[:3] != (gate, up, "silu") or act.kwargs
            or next(iter(up.users)) is not act):
        return None
    return gate, up, act


def _fold_residuals(gm: fx.GraphModule) -> int:
    g, folded = gm.graph, 0
    for node in list(g.nodes):
        found = residual_add(node) if _gemv(node, 4) else None
        if found is None:
            continue
        add, other = found
        with g.inserting_before(add):
            new = g.call_function(node.target, (*node.args, other))
        new.meta.update(add.meta)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        add.replace_all_uses_with(new)
        g.erase_node(add)
        g.erase_node(node)
        folded += 1
    return folded


def _fold_gated(gm: fx.GraphModule) -> int:
    g, folded = gm.graph, 0
    for node in list(g.nodes):
        found = swiglu(node, node.args[1].meta["val"].shape[0]) if _gemv(node, 4) else None
        if found is None:
            continue
        gate, up, act = found
        with g.inserting_before(act):
            new = g.call_function(tx.gemv_gated_linear.default, node.args[:4])
        new.meta.update(act.meta)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        act.replace_all_uses_with(new)
        for dead in (act, gate, up, node):
            g.erase_node(dead)
        folded += 1
    return folded


def _fold_norms(gm: fx.GraphModule) -> int:
    g, folded = gm.graph, 0
    rms = tx.rms_norm.default
    for node in list(g.nodes):
        plain = _gemv(node, 5)
        gated = node.op == "call_function" and node.target is tx.gemv_gated_linear.default and len(node.args) == 4
        if not (plain or gated) or node.kwargs:
            continue
        norm = node.args[0]
        if not (isinstance(norm, fx.Node) and norm.target is rms and len(norm.users) == 1 and len(norm.args) == 3
                and not norm.kwargs):
            continue
        h, weight, eps = norm.args
        xv = h.meta.get("val") if isinstance(h, fx.Node) else None
        wv = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor) and weight.op == "get_attr"
                and wv.shape == xv.shape[-1:] and isinstance(eps, float)):
            continue
        rest = (node.args[4] if len(node.args) > 4 else None,) if plain else ()
        with g.inserting_before(node):
            new = g.call_function(node.target, (h, *node.args[1:4], *rest, weight, float(eps)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        g.erase_node(norm)
        folded += 1
    return folded
