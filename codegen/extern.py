"""extern backend: a kernel runs as the torch calls its body holds (the always-correct fallback).

tx ops inside a body call their reference implementation directly rather than through the
dispatcher, so a kernel costs what the equivalent eager code costs. GEMMs here go to the library
torch links (MKL/oneDNN on CPU, cuBLAS on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from fxcc.codegen import Built, KernelFn
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
    return graph


def build(kb: KernelBody) -> KernelFn:
    """A callable running the kernel body with plain torch calls (reusing `kb.inline` when set)."""
    fn = fx.GraphModule(kb.body, kb.inline or inline_graph(kb))

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(fn(*inputs))

    return run
