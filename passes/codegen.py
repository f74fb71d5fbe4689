"""codegen: build every kernel op of the graph with a backend and record the choice."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from fxcc.codegen import extern
from fxcc.dialects import KERNEL_OPS, KERNELS
from fxcc.pipeline import Pass, PassContext, PassResult, register

BACKENDS = {extern.name: extern}


@register
@dataclass(frozen=True)
class Codegen(Pass):
    """Builds each distinct kernel once; `backend=auto` picks the best available backend per kernel."""

    name = "codegen"
    reads = "kernel"
    writes = "kernel"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; available: auto, {', '.join(BACKENDS)}")

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        keys = dict.fromkeys(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
        built = 0
        for key in keys:
            kb = KERNELS[key]
            if kb.impl is not None:
                continue
            backend = BACKENDS["extern" if self.backend == "auto" else self.backend]
            if backend is extern:  # torch calls gain nothing from a call boundary: the runtime inlines them
                kb.inline = extern.inline_graph(kb)
            kb.impl = backend.build(kb)
            kb.backend = backend.name
            built += 1
        # the graph is unchanged: kernels are looked up by key at run time
        return PassResult(False, {"kernels": len(keys), "built": built})
