"""raise: aten patterns -> tx ops (rms_norm, layer_norm, softmax, attention, rotary, gelu, silu, gated_act).

Attention masks that are constants equal to a causal mask (checked by value) become is_causal=True.

Multi-op patterns run first, so that a one-op raising (softmax -> tx.softmax) cannot split an attention
before it is recognised. Every rewrite keeps fp32 results within rounding: a variant whose tx op would
compute something else (other dtypes, dropout, other reductions) is left as it is.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxcc.dialects import op_name
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Pattern, Rewriter, apply_patterns, arg, is_op, val

aten = torch.ops.aten
tx = torch.ops.fxcc_tx

# ------------------------------------------------------------------------------------------ helpers


def _tensor(n: Any) -> bool:
    """A graph value that is a tensor (not a symbolic int or float argument, which is a node too)."""
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def _pairs(node: fx.Node) -> list[tuple[Any, Any]]:
    """Both operand orders of a commutative binary op."""
    if len(node.args) < 2:
        return []
    a, b = node.args[:2]
    return [(a, b), (b, a)]


def _other(node: Any, x: Any) -> Any:
    """The operand of binary `node` that is not `x`; None when `x` is not one of them."""
    return next((b for a, b in _pairs(node) if a is x), None) if x is not None else None


def _const(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _with_const(node: Any, op: Any) -> tuple[fx.Node, float] | None:
    """(t, c) for node = op(t, c) or op(c, t) with a Python number c (commutative ops only)."""
    if not is_op(node, op) or node.kwargs.get("alpha", 1) != 1:
        return None
    for t, c in _pairs(node):
        if isinstance(t, fx.Node) and _const(c) is not None:
            return t, _const(c)
    return None


def _near(c: float | None, ref: float) -> bool:
    return c is not None and math.isclose(c, ref, rel_tol=1e-6)


def _is_const(node: Any, op: Any, x: fx.Node, c: float) -> bool:
    """node is op(x, c) (either order) for the given tensor x and constant c."""
    found = _with_const(node, op)
    return found is not None and found[0] is x and _near(found[1], c)


def _cast(node: Any) -> tuple[fx.Node, torch.dtype] | None:
    """(x, dtype) for node = x.to(dtype) with nothing else changed (layout, device, memory format)."""
    if is_op(node, aten.to.dtype) and arg(node, 4, "memory_format") is None:
        return node.args[0], arg(node, 1, "dtype")
    if is_op(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"} and "dtype" in node.kwargs:
        return node.args[0], node.kwargs["dtype"]
    return None


def _last_dim(node: fx.Node, dim: Any) -> bool:
    return isinstance(dim, int) and dim in (-1, val(node).dim() - 1)


# ------------------------------------------------------------------------------------------ rms_norm


class RMSNorm(Pattern):
    """x * rsqrt(mean(x^2, -1, keepdim) + eps) with fp32 statistics -> tx.rms_norm(x, None, eps)."""

    name = "rms_norm"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.mul.Tensor):
            return False
        x, r = next(((x, r) for x, r in _pairs(node) if is_op(r, aten.rsqrt.default)), (None, None))
        if r is None or (eps_add := _with_const(r.args[0], aten.add)) is None:
            return False
        mean, eps = eps_add
        if not is_op(mean, aten.mean.dim) or arg(mean, 3, "dtype") is not None or not arg(mean, 2, "keepdim"):
            return False
        dims = mean.args[1]
        if len(dims) != 1 or not _last_dim(mean, dims[0]):
            return False
        sq = mean.args[0]
        if not is_op(sq, aten.pow.Tensor_Scalar) or sq.args[1] != 2:
            return False
        xf = sq.args[0]
        if val(xf).dtype != torch.float32:
            return False
        # Llama scales the fp32 copy, T5 the input it was cast from; both round the same
        if x is not xf and (_cast(xf) or (None,))[0] is not x:
            return False
        src = _cast(xf)
        if src is not None and val(src[0]).dtype == torch.float32:  # normalise x, not its no-op copy
            xf = src[0]
        rw.replace(node, rw.call(tx.rms_norm.default, (xf, None, eps), at=node))
        return True


class RMSNormCastBack(Pattern):
    """rms_norm(x.to(f32)).to(x.dtype) -> rms_norm(x): tx.rms_norm casts back to its input's dtype."""

    name = "rms_norm.cast"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if (cast := _cast(node)) is None:
            return False
        norm, dtype = cast
        if not is_op(norm, tx.rms_norm.default) or norm.args[1] is not None or len(norm.users) != 1:
            return False
        x, _, eps = norm.args
        src = _cast(x)
        if src is not None and val(src[0]).dtype == dtype:
            x = src[0]
        elif dtype != val(norm).dtype:  # only a cast to the dtype it already has can go
            return False
        rw.replace(node, rw.call(tx.rms_norm.default, (x, None, eps), at=node))
        return True


class RMSNormWeight(Pattern):
    """weight * rms_norm(x) (either side) -> rms_norm(x, weight), for a weight of shape [hidden]."""

    name = "rms_norm.weight"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.mul.Tensor):
            return False
        for norm, w in _pairs(node):
            if (is_op(norm, tx.rms_norm.default) and norm.args[1] is None and len(norm.users) == 1
                    and _tensor(w) and tuple(val(w).shape) == tuple(val(norm).shape[-1:])):
                x, _, eps = norm.args
                rw.replace(node, rw.call(tx.rms_norm.default, (x, w, eps), at=node))
                return True
        return False


# ----------------------------------------------------------------------------------------- attention


def _repeat_kv_source(x: Any) -> fx.Node | None:
    """kv for x = kv[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D) (repeat_kv), else None.

    That order (head h reads kv head h // n) is repeat_interleave's, which tx.attention applies.
    """
    if not is_op(x, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = x.args[0]
    if not is_op(expand, aten.expand.default) or not is_op(unsq := _whole(expand.args[0]), aten.unsqueeze.default):
        return None
    kv = unsq.args[0]
    if val(kv).dim() != 4 or unsq.args[1] not in (2, -3):
        return None
    b, h, s, d = val(kv).shape
    n = val(expand).shape[2]
    if tuple(val(expand).shape) != (b, h, n, s, d) or tuple(val(x).shape) != (b, h * n, s, d):
        return None
    return kv


def _whole(x: Any) -> Any:
    """`x` through slices that keep every element (`kv[:, :, None, :, :]` records a slice over the whole
    of a dimension, which a symbolic cache length keeps in the graph)."""
    while is_op(x, aten.slice.Tensor) and arg(x, 4, "step", 1) == 1 and arg(x, 2, "start") in (0, None) and \
            [str(d) for d in val(x).shape] == [str(d) for d in val(x.args[0]).shape]:
        x = x.args[0]
    return x


def _ungroup(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Drop repeat_kv from k and v when both were repeated to the same head count."""
    gk, gv = _repeat_kv_source(k), _repeat_kv_source(v)
    if gk is None or gv is None or val(gk).shape[1] != val(gv).shape[1]:
        return k, v
    return gk, gv


def _attention(node: fx.Node, rw: Rewriter, q: fx.Node, k: fx.Node, v: fx.Node, mask: Any, scale: float,
               is_causal: bool) -> None:
    k, v = _ungroup(k, v)
    rw.replace(node, rw.call(tx.attention.default, (q, k, v, mask, scale, is_causal), at=node))


def _bhtd(*ts: Any) -> bool:
    return all(_tensor(t) and val(t).dim() == 4 for t in ts)


class SDPA(Pattern):
    """aten.scaled_dot_product_attention without dropout -> tx.attention with its scale made explicit."""

    name = "attention"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.scaled_dot_product_attention.default) or arg(node, 4, "dropout_p", 0.0) != 0:
            return False
        q, k, v = node.args[:3]
        if not _bhtd(q, k, v):
            return False
        scale = node.kwargs.get("scale")
        scale = 1.0 / math.sqrt(val(q).shape[-1]) if scale is None else float(scale)
        _attention(node, rw, q, k, v, arg(node, 3, "attn_mask"), scale, bool(arg(node, 5, "is_causal")))
        return True


def _no_dropout(node: Any) -> Any:
    if is_op(node, aten.dropout.default) and (node.args[1] == 0 or not node.args[2]):
        return node.args[0]
    return node


def _softmax_input(p: Any) -> fx.Node | None:
    """s for p = softmax(s, -1) with p in s's dtype (computed in it, or in fp32 and cast back)."""
    cast = _cast(p)
    sm = cast[0] if cast else p
    if not is_op(sm, aten.softmax.int, aten._softmax.default) or len(sm.users) != 1:
        return None
    s = sm.args[0]
    if not _last_dim(s, sm.args[1]) or (is_op(sm, aten._softmax.default) and sm.args[2]):
        return None
    return s if val(p).dtype == val(s).dtype else None


def _scores(s: Any) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """(q @ k^T, scale, masks) for s = q @ k^T [* scale | / d] [+ mask [+ mask ...]] in one dtype."""
    if is_op(s, aten.add.Tensor) and s.kwargs.get("alpha", 1) == 1:
        for inner, mask in _pairs(s):
            found = _scores(inner) if isinstance(mask, fx.Node) else None
            if found is not None and val(mask).dtype == val(s).dtype and val(inner).shape == val(s).shape:
                return found[0], found[1], [*found[2], mask]
        return None
    qk, scale = s, 1.0
    if (scaled := _with_const(s, aten.mul)) is not None:
        qk, scale = scaled
    elif is_op(s, aten.div.Tensor) and _const(s.args[1]):
        qk, scale = s.args[0], 1.0 / _const(s.args[1])
    return (qk, scale, []) if is_op(qk, aten.matmul.default) else None


def _transposed(kt: Any) -> fx.Node | None:
    """k for kt = k.transpose(-2, -1) of a 4-D k."""
    if not is_op(kt, aten.transpose.int) or val(kt).dim() != 4:
        return None
    return kt.args[0] if {kt.args[1] % 4, kt.args[2] % 4} == {2, 3} else None


def _may_block_a_row(mask: fx.Node, rw: Rewriter) -> bool:
    """Whether an additive mask may be -inf across all keys of a query: unknown until run unless it is a constant
    (a causal or padding buffer), which is checked by value."""
    value = _constant(mask, rw.gm, rw.__dict__.setdefault("_fxcc_constants", {}))
    if not isinstance(value, torch.Tensor):
        return True
    return bool((value == -math.inf).all(-1).any())


class EagerAttention(Pattern):
    """softmax(q @ k^T * scale + mask) @ v, as eager attention writes it -> tx.attention."""

    name = "attention"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.matmul.default):
            return False
        p, v = node.args
        if len(p.users) != 1 or len(_no_dropout(p).users) != 1:  # probabilities wanted elsewhere: keep them
            return False
        if (s := _softmax_input(_no_dropout(p))) is None or (found := _scores(s)) is None:
            return False
        qk, scale, masks = found
        q, kt = qk.args
        if (k := _transposed(kt)) is None or not _bhtd(q, k, v):
            return False
        mask = masks[0] if masks else None
        for m in masks[1:]:  # T5: position bias + padding mask, summed once instead of per score
            mask = rw.call(aten.add.Tensor, (mask, m), at=node)
        k, v = _ungroup(k, v)
        out = rw.call(tx.attention.default, (q, k, v, mask, scale, False), at=node)
        if mask is not None and _may_block_a_row(mask, rw):
            # softmax over a row of -inf scores is NaN in eager; tx.attention follows SDPA, which gives 0 there
            blocked = rw.call(aten.eq.Scalar, (mask, -math.inf), at=node)
            rows = rw.call(aten.all.dim, (blocked, -1, True), at=node)
            out = rw.call(aten.where.ScalarSelf, (rows, math.nan, out), at=node)
        rw.replace(node, out)
        if p is not _no_dropout(p) and not p.users:  # DCE keeps dropout (a random op) even in eval
            rw.gm.graph.erase_node(p)
        return True


# -------------------------------------------------------------------------------------------- rotary


def _bounds(s: Any, x: fx.Node) -> tuple[int, int] | None:
    """(start, end) of s = x[..., start:end] on x's last dimension, clamped as Python clamps slices."""
    if not is_op(s, aten.slice.Tensor) or s.args[0] is not x or arg(s, 4, "step", 1) != 1:
        return None
    if not _last_dim(x, arg(s, 1, "dim", 0)):
        return None
    start, end, n = arg(s, 2, "start"), arg(s, 3, "end"), val(x).shape[-1]
    if not all(isinstance(b, (int, type(None))) for b in (start, end, n)):
        return None  # symbolic bounds or size (dynamic=True): the halves are not known here
    return slice(start, end).indices(n)[:2]


def _rotate_half_source(node: Any) -> fx.Node | None:
    """x for node = cat(-x[..., h:], x[..., :h], -1) with h half of x's last dimension."""
    if not is_op(node, aten.cat.default) or not _last_dim(node, arg(node, 1, "dim", 0)):
        return None
    parts = node.args[0]
    if len(parts) != 2 or not is_op(parts[0], aten.neg.default) or not is_op(parts[0].args[0], aten.slice.Tensor):
        return None
    x = parts[0].args[0].args[0]
    n = val(x).shape[-1]
    if not isinstance(n, int) or n % 2 or _bounds(parts[0].args[0], x) != (n // 2, n) or _bounds(parts[1], x) != (0, n // 2):
        return None
    return x


class Rotary(Pattern):
    """x * cos + rotate_half(x) * sin (any operand order) -> tx.rotary(x, cos, sin)."""

    name = "rotary"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
            return False
        for x_cos, rot_sin in _pairs(node):
            if not (is_op(x_cos, aten.mul.Tensor) and is_op(rot_sin, aten.mul.Tensor)):
                return False
            for rot, sin in _pairs(rot_sin):
                x = _rotate_half_source(rot)
                cos = _other(x_cos, x)
                if _tensor(cos) and _tensor(sin):
                    rw.replace(node, rw.call(tx.rotary.default, (x, cos, sin), at=node))
                    return True
        return False


# --------------------------------------------------------------------------------------- activations


def _half_x_times(node: Any) -> list[tuple[fx.Node, Any]]:
    """(x, y) candidates for node = (x * 0.5) * y, either side."""
    if not is_op(node, aten.mul.Tensor):
        return []
    out = []
    for half, y in _pairs(node):
        found = _with_const(half, aten.mul)
        if found is not None and found[1] == 0.5:
            out.append((found[0], y))
    return out


def _one_plus(node: Any, op: Any) -> fx.Node | None:
    """u for node = 1 + op(u)."""
    found = _with_const(node, aten.add)
    if found is None or found[1] != 1.0 or not is_op(found[0], op):
        return None
    return found[0].args[0]


class GeluErf(Pattern):
    """x * 0.5 * (1 + erf(x / sqrt(2))) -> tx.gelu(x, "none")."""

    name = "gelu"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        for x, y in _half_x_times(node):
            u = _one_plus(y, aten.erf.default)
            by_div = is_op(u, aten.div.Tensor) and u.args[0] is x and _near(_const(u.args[1]), math.sqrt(2))
            if by_div or _is_const(u, aten.mul, x, math.sqrt(0.5)):
                rw.replace(node, rw.call(tx.gelu.default, (x, "none"), at=node))
                return True
        return False


class GeluTanh(Pattern):
    """0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), GPT-2's new gelu -> tx.gelu(x, "tanh")."""

    name = "gelu"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        for x, y in _half_x_times(node):
            scaled = _with_const(_one_plus(y, aten.tanh.default), aten.mul)
            if scaled is None or not _near(scaled[1], math.sqrt(2 / math.pi)):
                continue
            inner = scaled[0]
            if not is_op(inner, aten.add.Tensor) or inner.kwargs.get("alpha", 1) != 1:
                continue
            for t, cube in _pairs(inner):
                c = _with_const(cube, aten.mul)
                if (t is x and c is not None and _near(c[1], 0.044715)
                        and is_op(c[0], aten.pow.Tensor_Scalar) and c[0].args[0] is x and c[0].args[1] == 3):
                    rw.replace(node, rw.call(tx.gelu.default, (x, "tanh"), at=node))
                    return True
        return False


class SiluMul(Pattern):
    """x * sigmoid(x) -> tx.silu(x)."""

    name = "silu"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.mul.Tensor):
            return False
        for x, sig in _pairs(node):
            if is_op(sig, aten.sigmoid.default) and sig.args[0] is x:
                rw.replace(node, rw.call(tx.silu.default, (x,), at=node))
                return True
        return False


# ------------------------------------------------------------------------------------- one-op raises


class LayerNorm(Pattern):
    """aten.layer_norm, or native_layer_norm's first output -> tx.layer_norm."""

    name = "layer_norm"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        ln = node
        if is_op(node, operator.getitem):
            if node.args[1] != 0 or not is_op(ln := node.args[0], aten.native_layer_norm.default):
                return False
        elif not is_op(node, aten.layer_norm.default):
            return False
        x, shape = ln.args[:2]
        w, b, eps = arg(ln, 2, "weight"), arg(ln, 3, "bias"), arg(ln, 4, "eps", 1e-5)
        rw.replace(node, rw.call(tx.layer_norm.default, (x, list(shape), w, b, eps), at=node))
        return True


class Softmax(Pattern):
    """softmax(x, dim) computed in x's dtype -> tx.softmax."""

    name = "softmax"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if is_op(node, aten.softmax.int):
            ok = arg(node, 2, "dtype") in (None, val(node.args[0]).dtype)
        else:
            ok = is_op(node, aten._softmax.default) and not node.args[2]
        if not ok:
            return False
        rw.replace(node, rw.call(tx.softmax.default, tuple(node.args[:2]), at=node))
        return True


class Activation(Pattern):
    """aten.gelu / aten.silu -> tx.gelu / tx.silu."""

    name = "activation"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if is_op(node, aten.gelu.default):
            new = rw.call(tx.gelu.default, (node.args[0], arg(node, 1, "approximate", "none")), at=node)
        elif is_op(node, aten.silu.default):
            new = rw.call(tx.silu.default, (node.args[0],), at=node)
        else:
            return False
        rw.replace(node, new)
        return True


class GatedAct(Pattern):
    """act(gate) * up (either side), act a tx.silu or tx.gelu used only here -> tx.gated_act."""

    name = "gated_act"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, aten.mul.Tensor):
            return False
        for act, up in _pairs(node):
            if not _tensor(up) or not isinstance(act, fx.Node) or len(act.users) != 1:  # `up` no float
                continue
            if is_op(act, tx.silu.default):
                kind = "silu"
            elif is_op(act, tx.gelu.default):
                kind = "gelu_tanh" if act.args[1] == "tanh" else "gelu"
            else:
                continue
            rw.replace(node, rw.call(tx.gated_act.default, (act.args[0], up, kind), at=node))
            return True
        return False


# ------------------------------------------------------------------------------------- causal masks

_MAX_MASK_ELEMENTS = 1 << 26


def _constant(node: Any, gm: fx.GraphModule, memo: dict) -> Any:
    """The value of `node` when it is computed from parameters, buffers and literals only, else None.

    Evaluated here, once per node and rewrite, so a pattern can check what a folded mask holds instead of
    trusting how it was built. Random and mutating ops, and results over 64M elements, count as unknown.
    """
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    memo[node] = None  # also stops cycles through a node being evaluated
    value = None
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        t = node.target
        if not t._schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags:
            inputs = {n: _constant(n, gm, memo) for n in node.all_input_nodes}
            if all(v is not None for v in inputs.values()):
                args = fx.node.map_arg(node.args, lambda n: inputs[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: inputs[n])
                with torch.no_grad():
                    value = t(*args, **kwargs)
    elif node.op == "call_function" and node.target is operator.getitem:
        src = _constant(node.args[0], gm, memo)
        value = src[node.args[1]] if isinstance(src, (list, tuple)) else None
    if isinstance(value, torch.Tensor) and value.numel() > _MAX_MASK_ELEMENTS:
        value = None
    memo[node] = value
    return value


def _mask_kind(mask: torch.Tensor, tq: int, tk: int) -> str | None:
    """'all' when `mask` lets every query see every key, 'causal' when exactly key <= query, else None.

    A bool mask allows where True; an additive float mask allows where 0 and must block with -inf or at
    most half the dtype's lowest value (so the blocked weight is exactly 0 after softmax).
    """
    if mask.dim() < 2 or mask.shape[-2] not in (1, tq) or mask.shape[-1] not in (1, tk):
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.dtype.is_floating_point:
        allowed = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((allowed | blocked).all()):
            return None  # a bias, not a mask
    else:
        return None
    if bool(allowed.all()):
        return "all"
    if tq != tk:
        return None
    tril = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril()
    full = allowed.expand(*allowed.shape[:-2], tq, tk)
    return "causal" if bool((full == tril).all()) else None


class CausalMask(Pattern):
    """tx.attention whose constant mask is exactly causal -> is_causal=True; one allowing all -> no mask.

    The mask's value is computed at compile time and compared element by element (never inferred from
    how the graph built it), so the rewrite is exact; it lets attention run as a flash kernel.
    """

    name = "causal_mask"

    def match_and_rewrite(self, node: fx.Node, rw: Rewriter) -> bool:
        if not is_op(node, tx.attention.default):
            return False
        q, k, v, mask, scale, is_causal = node.args
        if not isinstance(mask, fx.Node) or is_causal:
            return False
        memo = rw.__dict__.setdefault("_fxcc_constants", {})
        value = _constant(mask, rw.gm, memo)
        if not isinstance(value, torch.Tensor):
            return False
        kind = _mask_kind(value, val(q).shape[-2], val(k).shape[-2])
        if kind is None:
            return False
        rw.replace(node, rw.call(tx.attention.default, (q, k, v, None, scale, kind == "causal"), at=node))
        return True


# ---------------------------------------------------------------------------------------------- pass

# multi-op patterns first: one-op raises inside them (softmax, silu) would otherwise hide them
COMPOSITE = [RMSNorm(), RMSNormCastBack(), RMSNormWeight(), SDPA(), EagerAttention(), Rotary(), GeluErf(),
             GeluTanh(), SiluMul()]
ONE_OP = [LayerNorm(), Softmax(), Activation(), GatedAct(), CausalMask()]


def _tx_counts(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n.target)[3:] for n in gm.graph.nodes
                   if n.op == "call_function" and op_name(n.target).startswith("tx."))


@dataclass(frozen=True)
class Raise(Pass):
    """Rewrite aten patterns into tx ops; stats count the tx ops raised, by name."""

    name = "raise"
    reads = "aten"
    writes = "tx"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = _tx_counts(gm)
        hits = apply_patterns(gm, COMPOSITE) + apply_patterns(gm, ONE_OP)
        raised = _tx_counts(gm) - before
        stats = dict(sorted(raised.items()))
        if hits["causal_mask"]:  # masks dropped or turned into is_causal (no new tx op to count)
            stats["causal_mask"] = hits["causal_mask"]
        return PassResult(bool(hits), stats)
