"""decompose: ops with no lowering of their own -> the aten ops they are made of, so that fusion groups them
and the generated code (TVM, Triton) covers them.

Each op of `ROOTS` is traced through torch's decomposition tables (ELU/SELU/CELU, leaky ReLU, hardtanh,
hardswish, hardsigmoid, mish, softplus, log-sigmoid, logsumexp, MSE loss, softmax and log-softmax along a dim
other than the last, RMSNorm) or through the few decompositions written here where torch's go through prims or
none exists (inference batch norm, group and instance norm, variance and standard deviation: statistics as
means of the input and of its squared deviations; split, chunk, unbind and stack as the views they are; global
average pooling as a mean). The decomposition replaces the op only when every op it yields
is one fusion lowers (pointwise, reduction or view); otherwise the op stays as it is. Runs before
`canonicalize`, which then folds what the parameters alone compute (a batch norm's scale and shift).

An inference batch norm (or an instance norm on running statistics) is x * scale + shift per channel; where a
convolution or linear is all that reads it, the scale and shift fold into that op's weight and bias
(`fold_into_convolutions`): the library call computes the norm, and no kernel is left for it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxcc.dialects import classify
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.rewrite import Rewriter
from torch._decomp import get_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

aten = torch.ops.aten


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _normalize(x: torch.Tensor, dims: list[int], eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over `dims`, with the biased variance as the mean squared deviation."""
    d = x - aten.mean.dim(x, dims, True)
    return d * aten.rsqrt(aten.mean.dim(d * d, dims, True) + eps)


def _affine(y: torch.Tensor, weight, bias, channels: int) -> torch.Tensor:
    shape = [1, channels] + [1] * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def group_norm(x, groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    n, c = x.shape[:2]
    y = _normalize(x.to(_stats_dtype(x)).reshape(n, groups, -1), [2], eps).reshape(x.shape)
    return _affine(y, weight, bias, c).to(x.dtype)


def _bn_inference(x, weight, bias, running_mean, running_var, eps):
    """x * scale + shift per channel, the scale and shift computed from the parameters alone as eager's CPU
    kernel computes them (canonicalize folds each into one constant; a convolution before absorbs both)."""
    dt, shape = _stats_dtype(x), [1, x.shape[1]] + [1] * (x.dim() - 2)
    scale = 1 / aten.sqrt(running_var.to(dt) + eps)
    if weight is not None:
        scale = scale * weight.to(dt)
    shift = -running_mean.to(dt) * scale
    if bias is not None:
        shift = shift + bias.to(dt)
    return (x.to(dt) * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    if training or running_mean is None or running_var is None:
        raise NotImplementedError("batch statistics")  # not decomposed: the op stays as it is
    return _bn_inference(x, weight, bias, running_mean, running_var, eps)


def batch_norm_no_training(x, weight, bias, running_mean, running_var, momentum, eps):
    empty = x.new_zeros((0,))
    return _bn_inference(x, weight, bias, running_mean, running_var, eps), empty, empty


def instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    if not use_input_stats:  # the running statistics: an inference batch norm
        return _bn_inference(x, weight, bias, running_mean, running_var, eps)
    y = _normalize(x.to(_stats_dtype(x)), list(range(2, x.dim())), eps)
    return _affine(y, weight, bias, x.shape[1]).to(x.dtype)


def var(x, dims=None, *, correction=None, keepdim=False):
    dims = list(range(x.dim())) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    n = 1
    for d in dims:
        n *= x.shape[d]
    d = x - aten.mean.dim(x, dims, True)
    return aten.sum.dim_IntList(d * d, dims, keepdim) / max(0, n - (1 if correction is None else correction))


def std(x, dims=None, *, correction=None, keepdim=False):
    return aten.sqrt(var(x, dims, correction=correction, keepdim=keepdim))


def _var_dim(x, dims, unbiased=True, keepdim=False):
    return var(x, dims, correction=1 if unbiased else 0, keepdim=keepdim)


def _std_dim(x, dims, unbiased=True, keepdim=False):
    return std(x, dims, correction=1 if unbiased else 0, keepdim=keepdim)


def split_with_sizes(x, sizes, dim=0):
    out, start = [], 0
    for n in sizes:
        out.append(aten.slice.Tensor(x, dim, start, start + n))
        start += n
    return out


def split(x, size, dim=0):
    n = x.shape[dim]
    return split_with_sizes(x, [min(size, n - i) for i in range(0, n, size)] if n else [0], dim)


def chunk(x, chunks, dim=0):
    n = x.shape[dim]
    return split(x, -(-n // chunks) if n else 1, dim)


def unbind(x, dim=0):
    return [aten.select.int(x, dim, i) for i in range(x.shape[dim])]


def broadcast_tensors(tensors):
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return [t if t.shape == shape else aten.expand.default(t, list(shape)) for t in tensors]


def stack(tensors, dim=0):
    return aten.cat.default([aten.unsqueeze.default(t, dim) for t in tensors], dim)


def new_zeros(x, size, *, dtype=None, layout=None, device=None, pin_memory=None):
    return aten.full.default(size, 0, dtype=dtype or x.dtype, device=device or x.device)


def adaptive_avg_pool(x, output_size):
    return aten.mean.dim(x, list(range(-len(output_size), 0)), True)


OWN: dict = {aten.batch_norm.default: batch_norm,
             aten._native_batch_norm_legit_no_training.default: batch_norm_no_training,
             aten.group_norm.default: group_norm, aten.instance_norm.default: instance_norm,
             aten.var.correction: var, aten.var.dim: _var_dim, aten.std.correction: std, aten.std.dim: _std_dim,
             aten.split_with_sizes.default: split_with_sizes, aten.split.Tensor: split, aten.chunk.default: chunk,
             aten.unbind.int: unbind, aten.broadcast_tensors.default: broadcast_tensors, aten.stack.default: stack,
             aten.new_zeros.default: new_zeros, aten.adaptive_avg_pool1d.default: adaptive_avg_pool,
             aten.adaptive_avg_pool2d.default: adaptive_avg_pool, aten.adaptive_avg_pool3d.default: adaptive_avg_pool}
TORCH_TABLE = get_decompositions([
    aten.native_batch_norm, aten.elu, aten.celu, aten.leaky_relu,
    aten.hardtanh, aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus, aten.log_sigmoid_forward,
    aten.logsumexp, aten.mse_loss, aten._softmax, aten._log_softmax])
TABLE = {**TORCH_TABLE, **OWN}


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _not_last(node: fx.Node) -> bool:
    dim, rank = _arg(node, 1, "dim"), node.args[0].meta["val"].dim()
    return isinstance(dim, int) and dim % max(rank, 1) != rank - 1


def _inference(node: fx.Node) -> bool:
    return _arg(node, 5, "training") is False


def _global(node: fx.Node) -> bool:
    return all(s == 1 for s in _arg(node, 1, "output_size"))


# root op -> when it is decomposed (ops `raise` turns into tx ops, softmax along the last dim, stay)
ROOTS: dict = {
    aten.batch_norm.default: _inference, aten._native_batch_norm_legit_no_training.default: lambda n: True,
    aten.group_norm.default: lambda n: True, aten.instance_norm.default: lambda n: True,
    aten.elu.default: lambda n: True, aten.selu.default: lambda n: True, aten.celu.default: lambda n: True,
    aten.leaky_relu.default: lambda n: True, aten.hardtanh.default: lambda n: True,
    aten.relu6.default: lambda n: True, aten.hardswish.default: lambda n: True,
    aten.hardsigmoid.default: lambda n: True, aten.mish.default: lambda n: True,
    aten.softplus.default: lambda n: True, aten.log_sigmoid.default: lambda n: True,
    aten.logsumexp.default: lambda n: True, aten.var.correction: lambda n: True, aten.var.dim: lambda n: True,
    aten.std.correction: lambda n: True, aten.std.dim: lambda n: True, aten.mse_loss.default: lambda n: True,
    aten.rms_norm.default: lambda n: True, aten.softmax.int: _not_last, aten._softmax.default: _not_last,
    aten.log_softmax.int: _not_last, aten._log_softmax.default: _not_last,
    aten.split_with_sizes.default: lambda n: True, aten.split.Tensor: lambda n: True,
    aten.chunk.default: lambda n: True, aten.unbind.int: lambda n: True,
    aten.broadcast_tensors.default: lambda n: True, aten.stack.default: lambda n: True,
    aten.new_zeros.default: lambda n: True, aten.adaptive_avg_pool1d.default: _global,
    aten.adaptive_avg_pool2d.default: _global, aten.adaptive_avg_pool3d.default: _global,
}
# in-place ops a composite's decomposition may apply to its own temporaries -> their out-of-place forms
_OUT_OF_PLACE = {aten.add_.Scalar: aten.add.Scalar, aten.add_.Tensor: aten.add.Tensor,
                 aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
                 aten.div_.Tensor: aten.div.Tensor, aten.sub_.Tensor: aten.sub.Tensor}


def trace(node: fx.Node) -> fx.GraphModule | None:
    """The decomposition of `node` as a graph over its tensor operands (placeholders in `all_input_nodes`
    order), or None when it cannot be traced or leaves an in-place op that is not its own temporary's."""
    inputs = node.all_input_nodes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = []
    for x in inputs:
        v = x.meta.get("val")
        if not isinstance(v, torch.Tensor):
            return None
        with mode:
            fakes.append(torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device))
    fn = OWN.get(node.target, node.target)

    def call(*ts: torch.Tensor):
        env = dict(zip(inputs, ts))
        out = fn(*fx.node.map_arg(node.args, env.__getitem__), **fx.node.map_arg(node.kwargs, env.__getitem__))
        return out.contiguous() if _contiguous_in_eager(node, out) else out
    try:
        gm = make_fx(call, decomposition_table=TABLE, tracing_mode="fake")(*fakes)
    except Exception:  # noqa: BLE001 - an op torch cannot decompose here stays as it is
        return None
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            src = n.args[0]
            if n.target not in _OUT_OF_PLACE or src.op == "placeholder" or len(src.users) != 1:
                return None
            n.target = _OUT_OF_PLACE[n.target]
    gm.graph.eliminate_dead_code()
    return gm


def _contiguous_in_eager(node: fx.Node, out: object) -> bool:
    """Whether the op's output is contiguous where its decomposition's is not: an instance norm of a channels-last
    input returns a contiguous tensor, its decomposition one laid out as its input (a later `view` then fails)."""
    want = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(want, torch.Tensor):
        return False
    return guard_or_false(want.is_contiguous()) and not guard_or_true(out.is_contiguous())


def splice(node: fx.Node, traced: fx.GraphModule, rw: Rewriter) -> None:
    """Replace `node` by the ops of `traced`, placed before it with its provenance; a node with several
    outputs is replaced through the `getitem`s that read them."""
    env = dict(zip((p for p in traced.graph.nodes if p.op == "placeholder"), node.all_input_nodes))
    out = None
    for n in traced.graph.nodes:
        if n.op == "call_function":
            env[n] = rw.call(n.target, fx.node.map_arg(n.args, env.__getitem__),
                             fx.node.map_arg(n.kwargs, env.__getitem__), at=node)
        elif n.op == "output":
            out = fx.node.map_arg(n.args[0], env.__getitem__)
    if isinstance(out, fx.Node):
        rw.replace(node, out)
        return
    for user in list(node.users):
        rw.replace(user, out[user.args[1]])


def _outputs_ok(node: fx.Node) -> bool:
    """A tensor, or a list of tensors read only through getitem (split, chunk, unbind)."""
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return True
    return (isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v)
            and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))


def _lowerable(traced: fx.GraphModule) -> bool:
    """Whether fusion lowers every op of the decomposition (no library call or eager op left)."""
    for n in traced.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        if classify(n)[0] not in ("pointwise", "reduction", "view") and n.target not in _CONSTANTS:
            return False
    return True


# ops that make a constant (a fill value); they fold into what reads them
_CONSTANTS = {aten.scalar_tensor.default, aten.full.default}


# convolutions and linears, the library ops a per-channel scale and shift fold into
_CONVS = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default, aten.conv_transpose1d.default,
          aten.conv_transpose2d.input, aten.conv_transpose3d.input}


def _constant(node: object) -> bool:
    """Whether `node` is computed from parameters, buffers and constants alone (canonicalize folds it)."""
    if not isinstance(node, fx.Node):
        return node is None or isinstance(node, (int, float, bool))
    if node.op == "get_attr":
        return True
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and not node.target._schema.is_mutable and all(map(_constant, node.all_input_nodes)))


def _channel_dim(op: fx.Node) -> int:
    """The dim of `op`'s output that its weight's dim 0 makes: a convolution's channels, a linear's features."""
    return op.meta["val"].dim() - 1 if op.target is aten.linear.default else 1


def _per_channel(node: object, op: fx.Node) -> bool:
    """A constant of `op`'s output dtype holding one value per output channel of `op` (a [C, 1, ...] or
    [1, C, 1, ...] tensor for a convolution, [C] or [1, C] for a linear)."""
    v, out = node.meta.get("val") if isinstance(node, fx.Node) else None, op.meta["val"]
    if not isinstance(v, torch.Tensor) or v.dtype != out.dtype or v.dim() > out.dim() or not _constant(node):
        return False
    shape, c = [1] * (out.dim() - v.dim()) + list(v.shape), _channel_dim(op)
    return shape[c] == out.shape[c] and all(n == 1 for i, n in enumerate(shape) if i != c)


def _weight_out_dim(conv: fx.Node) -> int | None:
    """The dim of `conv`'s weight that indexes its output channels: 0, or 1 for a transposed convolution of one
    group (None for grouped transposed ones, whose dim 1 counts the channels of one group)."""
    if conv.target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
        return 1 if _arg(conv, 6, "groups", 1) == 1 else None
    if conv.target is aten.convolution.default and _arg(conv, 6, "transposed"):
        return 1 if _arg(conv, 8, "groups") == 1 else None
    return 0


def _conv_epilogue(conv: fx.Node) -> tuple[fx.Node, fx.Node, str] | None:
    """(the op, its per-channel constant, "mul" | "add") when `conv`'s one reader scales or shifts each output
    channel by a constant: it folds into the convolution's weight or bias."""
    if len(conv.users) != 1 or conv.target not in _CONVS or _weight_out_dim(conv) is None:
        return None
    (user,) = conv.users
    kinds = {aten.mul.Tensor: "mul", aten.add.Tensor: "add"}
    if user.op != "call_function" or user.target not in kinds or len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is conv else user.args[0]
    out, w, b = conv.meta.get("val"), _arg(conv, 1, "weight"), _arg(conv, 2, "bias")
    if other is conv or not isinstance(out, torch.Tensor) or user.meta.get("val") is None \
            or user.meta["val"].shape != out.shape or not isinstance(w, fx.Node) or not _constant(w) or not _constant(b) \
            or not _per_channel(other, conv):
        return None
    return user, other, kinds[user.target]


def fold_into_convolutions(gm: fx.GraphModule, rw: Rewriter, budget_mb: float) -> int:
    """conv(x, W, b) * s + t, s and t constants per output channel (an inference batch norm) ->
    conv(x, W * s, b * s + t), a linear's likewise: the library convolution or GEMM does it all, its new weight
    and bias folded by canonicalize into constants. Equal up to rounding (eager's CPU kernels fold the same way
    inside a batch norm). A scaled weight is a copy held beside the model's: at most `budget_mb` of them (past
    it the scale stays a pointwise op). Returns the number of ops folded."""
    folded, budget = 0, budget_mb * 2**20
    for conv in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CONVS]:
        while (hit := _conv_epilogue(conv)) is not None:
            user, c, kind = hit
            if kind == "mul":
                wv = _arg(conv, 1, "weight").meta["val"]
                budget -= wv.numel() * wv.element_size()
                if budget < 0:
                    break
            channels = conv.meta["val"].shape[_channel_dim(conv)]
            w, b = _arg(conv, 1, "weight"), _arg(conv, 2, "bias")
            args = [conv.args[0], w, b, *conv.args[3:]]
            row = rw.call(aten.reshape.default, (c, [channels]), at=user)
            if kind == "mul":
                d = _weight_out_dim(conv)
                col = rw.call(aten.reshape.default, (c, [channels if i == d else 1 for i in range(w.meta["val"].dim())]),
                              at=user)
                args[1] = rw.call(aten.mul.Tensor, (w, col), at=user)
                args[2] = None if b is None else rw.call(aten.mul.Tensor, (b, row), at=user)
            else:
                args[2] = row if b is None else rw.call(aten.add.Tensor, (b, row), at=user)
            kwargs = {k: v for k, v in conv.kwargs.items() if k not in ("weight", "bias")}
            new = rw.call(conv.target, tuple(args), kwargs, at=user)
            rw.replace(user, new)
            gm.graph.erase_node(conv)
            conv = new
            folded += 1
    return folded


@dataclass(frozen=True)
class Decompose(Pass):
    """Ops with no lowering -> the aten ops they are made of, where fusion lowers all of those (exact)."""

    name = "decompose"
    fold_mb: float = 128.0  # at most this much of convolution / linear weights scaled by a batch norm (copies)

    def __post_init__(self) -> None:
        if self.fold_mb < 0:
            raise ValueError(f"fold_mb must be >= 0, got {self.fold_mb}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rw = Rewriter(gm)
        done: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            when: Callable | None = ROOTS.get(node.target) if node.op == "call_function" else None
            if when is None or not _outputs_ok(node) or not when(node):
                continue
            traced = trace(node)
            if traced is None or not _lowerable(traced):
                continue
            splice(node, traced, rw)
            key = f"decomposed.{node.target.__name__.split('.')[0]}"
            done[key] = done.get(key, 0) + 1
        gm.graph.eliminate_dead_code()
        if n := fold_into_convolutions(gm, rw, self.fold_mb):
            done["folded_into_convolutions"] = n
            gm.graph.eliminate_dead_code()
        return PassResult(bool(done), done)
