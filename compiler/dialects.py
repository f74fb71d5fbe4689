"""Dialect ops: the `tx` (transformer) and `kernel` levels of the IR, registered with torch.library.

Every op has a reference implementation in plain torch and a fake kernel, so a graph at any level can be
run, exported and shape-checked. The `kernel` ops name their body by a content hash into KERNELS, the
way an MLIR op names a function by symbol: the body is a GraphModule holding aten/tx ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------- tx level


@torch.library.custom_op("fxcc_tx::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm as Llama-family models write it: statistics in fp32, cast back, then scale."""
    xf = x.to(torch.float32)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


@rms_norm.register_fake
def _(x, weight, eps):
    out = x.new_empty(x.shape)
    return out * weight if weight is not None else out


@torch.library.custom_op("fxcc_tx::layer_norm", mutates_args=())
def layer_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


@layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("fxcc_tx::softmax", mutates_args=())
def softmax(x: Tensor, dim: int) -> Tensor:
    return torch.softmax(x, dim)


@softmax.register_fake
def _(x, dim):
    return x.new_empty(x.shape)


@torch.library.custom_op("fxcc_tx::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, T, D]; k and v may have fewer (grouped) heads."""
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


@attention.register_fake
def _(q, k, v, mask, scale, is_causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.library.custom_op("fxcc_tx::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, half-rotation form: x * cos + rotate_half(x) * sin."""
    return x * cos + _rotate_half(x) * sin


@rotary.register_fake
def _(x, cos, sin):
    return torch.empty(torch.broadcast_shapes(x.shape, cos.shape, sin.shape), dtype=torch.result_type(x, cos),
                       device=x.device)


@torch.library.custom_op("fxcc_tx::gelu", mutates_args=())
def gelu(x: Tensor, approximate: str) -> Tensor:
    return F.gelu(x, approximate=approximate)


@gelu.register_fake
def _(x, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("fxcc_tx::silu", mutates_args=())
def silu(x: Tensor) -> Tensor:
    return F.silu(x)


@silu.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fxcc_tx::gated_act", mutates_args=())
def gated_act(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """The gated-MLP piece act(gate) * up (SwiGLU with act='silu', GeGLU with 'gelu'/'gelu_tanh')."""
    if act == "silu":
        a = F.silu(gate)
    elif act in ("gelu", "gelu_tanh"):
        a = F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")
    else:
        raise ValueError(f"tx.gated_act: unknown activation {act!r} (expected silu, gelu or gelu_tanh)")
    return a * up


@gated_act.register_fake
def _(gate, up, act):
    return torch.empty(torch.broadcast_shapes(gate.shape, up.shape), dtype=torch.result_type(gate, up),
                       device=gate.device)


@torch.library.custom_op("fxcc_tx::all_reduce", mutates_args=())
def all_reduce(x: Tensor, op: str, group: str) -> Tensor:
    """Sum (or max/min/avg) over the ranks of a process group; a copy when no group spans several ranks."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return x.clone()
    import torch.distributed._functional_collectives as fc

    pg = dist.group.WORLD if group in ("", "world") else group
    if dist.get_world_size(pg) == 1:
        return x.clone()
    return fc.wait_tensor(fc.all_reduce(x, op, pg))


@all_reduce.register_fake
def _(x, op, group):
    return x.new_empty(x.shape)


TX_OPS = {
    "rms_norm": rms_norm, "layer_norm": layer_norm, "softmax": softmax, "attention": attention,
    "rotary": rotary, "gelu": gelu, "silu": silu, "gated_act": gated_act, "all_reduce": all_reduce,
}

# ------------------------------------------------------------------------------------- kernel level


@dataclass
class KernelBody:
    """One kernel: a GraphModule body over aten/tx ops, its kind and its canonical text (the hash input).

    `impl` is what codegen built for it (a callable taking a list of tensors, returning a list); until a
    backend builds one, the body runs as written. `inline`, when a backend sets it, is a graph the
    runtime splices into the executable instead of calling `impl`.
    """

    key: str
    kind: str  # pointwise | reduction | gemm | extern
    body: torch.fx.GraphModule
    text: str
    impl: Any = None
    inline: torch.fx.Graph | None = None
    backend: str = "reference"
    info: dict = field(default_factory=dict)

    def run(self, inputs: list[Tensor]) -> list[Tensor]:
        if self.impl is not None:
            return self.impl(inputs)
        return list(self.body(*inputs))


KERNELS: dict[str, KernelBody] = {}


def _lookup(kernel: str) -> KernelBody:
    try:
        return KERNELS[kernel]
    except KeyError:
        raise RuntimeError(f"fxcc: kernel {kernel!r} is not registered in this process; a graph holding "
                           "kernel ops can only run where it was lowered (recompile the model)") from None


def _detach_aliases(inputs: list[Tensor], outs: list[Tensor]) -> list[Tensor]:
    # custom ops may not return an input (or a view of one) as an output
    ids = {id(t) for t in inputs}
    return [o.clone() if id(o) in ids or o._base is not None else o for o in outs]


@torch.library.custom_op("fxcc_kernel::fused", mutates_args=())
def fused(inputs: list[Tensor], kernel: str) -> list[Tensor]:
    """A fused group of pointwise/reduction/gemm ops, generated as one kernel by a backend."""
    return _detach_aliases(inputs, _lookup(kernel).run(inputs))


@fused.register_fake
def _(inputs, kernel):
    return [o.clone() for o in _lookup(kernel).body(*inputs)]


@torch.library.custom_op("fxcc_kernel::extern", mutates_args=())
def extern(inputs: list[Tensor], kernel: str) -> list[Tensor]:
    """One op run by a library (torch, cuBLAS, oneDNN) rather than generated code."""
    return _detach_aliases(inputs, _lookup(kernel).run(inputs))


@extern.register_fake
def _(inputs, kernel):
    return [o.clone() for o in _lookup(kernel).body(*inputs)]


KERNEL_OPS = (torch.ops.fxcc_kernel.fused.default, torch.ops.fxcc_kernel.extern.default)


def op_name(target: Any) -> str:
    """Dialect-qualified name of a call target: 'tx.rms_norm', 'aten.add.Tensor', 'kernel.fused'."""
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        ns = {"fxcc_tx": "tx", "fxcc_kernel": "kernel"}.get(ns, ns)
        base = target._schema.name.split("::", 1)[1]
        ov = target._overloadname
        return f"{ns}.{base}" if ov == "default" else f"{ns}.{base}.{ov}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if mod in ("_operator", "operator"):
        return f"py.{name}"
    return f"{mod}.{name}" if mod else name


def dialect_of(target: Any) -> str:
    return op_name(target).split(".", 1)[0]
