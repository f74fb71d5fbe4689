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
from fxcc.codegen import Built, KernelFn, reusable
from fxcc.dialects import TX_OPS, KernelBody

name = "extern"

_DIRECT = {getattr(torch.ops.fxcc_tx, n).default: op._init_fn for n, op in TX_OPS.items()}


def available(target: str) -> str | None:
    return None


def candidates(kb: KernelBody, target: str) -> list[Extern]:
    return [Extern(kb)]


@dataclass
class Extern:
    """The kernel body as torch calls; nothing to tune."""

    kb: KernelBody
    backend: str = name
    space: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)

    def build(self, params: dict) -> Built:
        return Built(build(self.kb), source=self.kb.text)


def load(kb: KernelBody, label: str, files: dict[str, Path], params: dict) -> Built:
    return Built(build(kb), source=kb.text)


def inline_graph(kb: KernelBody) -> fx.Graph:
    """The kernel body with tx ops calling their reference functions: what the runtime splices in place."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(kb.body.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _DIRECT:
            node.target = _DIRECT[node.target]
        elif node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            node.target = pooled_linear()
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


def build(kb: KernelBody) -> KernelFn:
    """A callable running the kernel body with plain torch calls (reusing `kb.inline` when set)."""
    fn = fx.GraphModule(kb.body, kb.inline or inline_graph(kb))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(fn(*inputs))

    return run
