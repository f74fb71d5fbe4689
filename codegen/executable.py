"""The executable: a compiled graph whose kernel ops call what their backend built, or are spliced in inline."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.dialects import KERNEL_OPS, KERNELS


class KernelCall:
    """A kernel op in the executable graph: a plain call of what the backend built (no module lookup)."""

    def __init__(self, key: str):
        self.key = key
        self.__name__ = f"kernel_{key}"  # the name the executable's code shows
        self.impl = KERNELS[key].impl or KERNELS[key].run

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.impl(inputs)


def build_executable(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Any]]:
    """A copy of the final IR where kernel ops call what their backend built, or are spliced in inline.

    Parameters and constants (get_attr) become trailing inputs, fetched here once: returns the
    executable and those values, to be passed after the call's own inputs.
    """
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    for node in attrs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    bound = [ir.fetch_attr(gm, n.target) for n in attrs]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "call_function" and node.target in KERNEL_OPS:
            kb = KERNELS[node.args[1]]
            inputs = [env[i] for i in node.args[0]]
            if kb.inline is not None:
                params = [n for n in kb.inline.nodes if n.op == "placeholder"]
                env[node] = graph.graph_copy(kb.inline, dict(zip(params, inputs)))
                continue
            env[node] = graph.call_function(KernelCall(kb.key), (inputs,), name=f"kernel_{kb.key}")
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined kernel
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph), bound  # takes the submodules eager regions call
