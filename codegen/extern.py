"""extern backend: a kernel runs as the torch calls its body holds (the always-correct fallback).

tx ops inside a body call their reference implementation directly rather than through the
dispatcher, so a kernel costs what the equivalent eager code costs. GEMMs here go to the library
torch links (MKL/oneDNN on CPU, cuBLAS on GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxcc.codegen import (
    Built,
    KernelFn,
    conv_layout,
    key_trim,
    linear_weight,
    mkl,
    onednn,
    patch_conv,
    reusable,
)
from fxcc.dialects import CONV, REFERENCE, KernelBody

name = "extern"

def available(target: str) -> str | None:
    return None


def candidates(kb: KernelBody, target: str) -> list[Extern]:
    """The body as torch calls; on the CPU, when it holds a linear, also with that GEMM on a packed weight
    (oneDNN's; MKL's for fp32), and when it holds a masked attention, also with that attention over the
    keys its mask leaves; on the GPU, when it holds a 2-D convolution, also with that convolution in
    channels-last (fxcc.codegen.conv_layout); on the CPU, when it holds a convolution whose stride is its kernel,
    also with that convolution as one GEMM (fxcc.codegen.patch_conv)."""
    out = [Extern(kb)]
    if target == "cpu" and any(onednn.applies(n) for n in kb.body.graph.nodes):
        out.append(Extern(kb, backend="onednn"))
    if target == "cpu" and any(mkl.applies(n) for n in kb.body.graph.nodes):
        out.append(Extern(kb, backend="mkl"))
    if key_trim.applies(kb.body, target):
        out.append(Extern(kb, backend=key_trim.name))
    if conv_layout.applies(kb.body, target):
        out.append(Extern(kb, backend=conv_layout.name))
    if patch_conv.body_applies(kb.body, target):
        out.append(Extern(kb, backend=patch_conv.name))
    return out


def copies(kb: KernelBody, label: str) -> list[tuple[int, int, str]]:
    """(placeholder index, bytes, store) of every weight copy candidate `label` keeps beside its kernel inputs
    across calls: the packed weights of `onednn` and `mkl` (one copy per weight and store, shared by the kernels
    that read it); the other candidates read their inputs as they are."""
    if label not in ("onednn", "mkl"):
        return []
    lib = onednn if label == "onednn" else mkl
    places = [n for n in kb.body.graph.nodes if n.op == "placeholder"]
    return [(places.index(n.args[1]), lib.copy_bytes(linear_weight(n)), label) for n in kb.body.graph.nodes
            if lib.applies(n)]


@dataclass
class Extern:
    """The kernel body as torch calls (`onednn` / `mkl`: its linears on oneDNN / MKL with packed weights;
    `trim`: its attention over the keys the mask leaves; `nhwc`: its 2-D convolutions in channels-last;
    `patch`: its patch convolutions as one GEMM);
    nothing to tune."""

    kb: KernelBody
    backend: str = name
    space: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    def build(self, params: dict) -> Built:
        return load(self.kb, self.backend, {}, params)


def load(kb: KernelBody, label: str, files: dict[str, Path], params: dict) -> Built:
    graph = inline_graph(kb, packed=label == "onednn", trim=label == key_trim.name, mkl_packed=label == "mkl",
                         nhwc=label == conv_layout.name, patch=label == patch_conv.name)
    return Built(build(kb, graph), source=kb.text, inline=graph)


def inline_graph(kb: KernelBody, packed: bool = False, trim: bool = False,
                 mkl_packed: bool = False, nhwc: bool = False, patch: bool = False) -> fx.Graph:
    """The kernel body with tx ops calling their reference functions: what the runtime splices in place.
    Linears write into a reused buffer, or run on packed weights (oneDNN with `packed`, MKL with
    `mkl_packed`); with `trim`, attention skips the keys its mask removes (fxcc.codegen.key_trim); with
    `nhwc`, convolutions run on channels-last operands (fxcc.codegen.conv_layout); with `patch`, patch
    convolutions run as one GEMM (fxcc.codegen.patch_conv)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(kb.body.graph, {}))
    for node in graph.nodes:
        if trim and node.op == "call_function" and node.target is torch.ops.fxcc_tx.attention.default:
            node.target = key_trim.attention
        elif nhwc and node.op == "call_function" and node.target in CONV:
            node.target = conv_layout.nhwc(node.target)
        elif patch and patch_conv.applies(node):
            node.target = patch_conv.conv(node)
        elif node.op == "call_function" and node.target in REFERENCE:
            node.target = REFERENCE[node.target]
        elif node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            node.target = (onednn.linear if packed and onednn.applies(node)
                           else mkl.linear if mkl_packed and mkl.applies(node) else pooled_linear())
    return graph


def pooled_linear():
    """`F.linear` writing into the buffer of its previous call once nothing holds that buffer (CPU):
    the product is the same, a fresh output allocation per call is not."""
    local = threading.local()

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() < 2:
            return F.linear(x, w, b)
        shape = (*x.shape[:-1], w.shape[0])
        pool = getattr(local, "pool", None) or [None]
        if not (reusable(pool, 0) and pool[0].shape == shape and pool[0].dtype == x.dtype):
            pool[0] = torch.empty(shape, dtype=x.dtype)
        local.pool = pool
        out = pool[0].view(-1, shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if b is None:
            torch.mm(x2, w.t(), out=out)
        else:
            torch.addmm(b, x2, w.t(), out=out)
        return pool[0]
    return linear


def build(kb: KernelBody, graph: fx.Graph | None = None) -> KernelFn:
    """A callable running the kernel body with plain torch calls (`graph`, else the body as `inline_graph`
    makes it)."""
    fn = fx.GraphModule(kb.body, graph or inline_graph(kb))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(fn(*inputs))

    return run
