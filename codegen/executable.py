"""The executable: a compiled graph whose kernel ops call what their backend built, or are spliced in inline.

The choice for each kernel is an attribute of its op (fxcc.dialects.Choice); `build_executable` turns the
graph's choices into the variant's own table of built kernels, taking what the codegen decision built in
this compile and loading or building the rest. Nothing here outlives the variant that holds it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.codegen import Built, KernelFn, backend, shared_mask
from fxcc.dialects import KERNEL_OPS, Choice, KernelBody, choice_of, kernel_body, same_strides, strided_copy
from fxcc.store import default_cache


@dataclass
class BuiltKernel:
    """One kernel as a compiled variant holds it: its body, the choice its op names (None: no codegen ran,
    the body runs as written), what was built, and how the choice was made (for `explain`)."""

    body: KernelBody
    choice: Choice | None
    built: Built
    timings_ms: dict[str, float] = field(default_factory=dict)  # candidate label -> ms, as measured
    cached: bool = False  # the choice came from the artifact cache
    note: str = ""
    stored: str = ""  # where the codegen decision stored the choice (or why it did not)
    decided: str = ""  # how settled its measured decision is ("cached (settled)", "re-measured (was unsettled)", ...)

    @property
    def key(self) -> str:
        return self.body.key

    @property
    def kind(self) -> str:
        return self.body.kind

    @property
    def backend(self) -> str:
        return self.choice.backend if self.choice else "reference"

    @property
    def fn(self) -> KernelFn:
        return self.built.fn


class KernelCall:
    """A kernel op in the executable graph: a plain call of what the backend built (no table lookup)."""

    def __init__(self, kernel: BuiltKernel):
        self.key = kernel.key
        self.__name__ = f"kernel_{kernel.key}"  # the name the executable's code shows
        self.impl = layout_kept(kernel)

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.impl(inputs)


def layout_kept(kernel: BuiltKernel) -> KernelFn:
    """The kernel's function, whose outputs have the strides the IR records for it (its body's: the stride
    contract): an output a backend writes in another layout (Triton's contiguous buffers, TVM's for a
    non-dense layout) is copied into the recorded one, so a `view` after the kernel works as in eager."""
    fn = kernel.fn
    if kernel.choice is None:  # the body as written: its layout by construction
        return fn
    out = next(n for n in kernel.body.body.graph.nodes if n.op == "output")
    want = [_layout(o.meta["val"]) for o in out.args[0]]
    writes = getattr(fn, "strides", None)  # the strides a backend declares its outputs have (static kernels)
    if writes is not None and len(writes) == len(want) and all(
            isinstance(w, tuple) and _alike(o.meta["val"].shape, s, w) for o, s, w in zip(out.args[0], writes, want)):
        return fn  # nothing to check per call

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = list(fn(inputs))
        for i, (o, w) in enumerate(zip(outs, want)):
            stride = w(o.shape) if callable(w) else w
            if stride is not None and not same_strides(o, stride):
                outs[i] = strided_copy(o, stride)
        return outs

    return run


def _alike(shape: tuple, a: tuple, b: tuple) -> bool:
    """Whether static strides `a` and `b` agree where they matter (dimensions of size above 1)."""
    return len(a) == len(b) == len(shape) and all(n <= 1 or x == y for n, x, y in zip(shape, a, b))


def _layout(val: torch.Tensor) -> tuple[int, ...] | Any:
    """The strides a kernel output must have: the recorded ones where they are numbers; where they are
    symbolic (a variant serving many sizes), a function of the call's shape giving the dense strides in the
    recorded dimension order; None (the backend's layout is kept) for a symbolic layout that is not dense."""
    stride = tuple(val.stride())
    if all(type(s) is int for s in stride):
        return stride
    try:
        sizes, hints = [ir.hint(n) for n in val.shape], [ir.hint(s) for s in stride]
    except Exception:  # noqa: BLE001 (a size known only at run time: no order to read)
        return None
    order = sorted(range(len(sizes)), key=lambda d: (hints[d], sizes[d]))  # innermost dimension first
    dense = 1
    for d in order:
        if sizes[d] > 1 and hints[d] != dense:
            return None
        dense *= sizes[d]

    def strides(shape: torch.Size) -> tuple[int, ...]:
        out, step = [0] * len(shape), 1
        for d in order:
            out[d], step = step, step * shape[d]
        return tuple(out)

    return strides


def build_kernel(body: KernelBody, choice: Choice | None) -> BuiltKernel:
    """What `choice` names for `body`, built now: loaded from the artifact cache when the choice has a key
    there, else built by its backend module (no measurement: the choice is made)."""
    if choice is None:
        return BuiltKernel(body, None, Built(lambda inputs: list(body.body(*inputs)), body.text))
    mod = backend(choice.module)
    entry = default_cache().get(choice.key) if choice.key else None
    if entry is not None:
        return BuiltKernel(body, choice, mod.load(body, choice.backend, entry.files, choice.params), cached=True)
    target = "cuda" if any(isinstance(v := p.meta.get("val"), torch.Tensor) and v.is_cuda
                           for p in body.body.graph.nodes if p.op == "placeholder") else "cpu"
    cand = next((c for c in mod.candidates(body, target) if c.backend == choice.backend), None)
    if cand is None:
        raise RuntimeError(f"fxcc: kernel {body.key} names candidate {choice.backend!r} of backend "
                           f"{choice.module!r}, which offers none for it here; recompile the model")
    return BuiltKernel(body, choice, cand.build(choice.params))


def build_executable(gm: fx.GraphModule, ready: dict[str, BuiltKernel] | None = None
                     ) -> tuple[fx.GraphModule, list[Any], dict[str, BuiltKernel]]:
    """A copy of the final IR where kernel ops call what their backend built, or are spliced in inline.

    `ready`: kernels built for these choices in this compile (by the codegen decision), by kernel key; the
    others are built now. Parameters and constants (get_attr) become trailing inputs, fetched here once.
    Returns the executable, those values (passed after the call's own inputs), and the variant's kernels.
    """
    kernels: dict[str, BuiltKernel] = {}
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
            k = _kernel(node, kernels, ready or {})
            inputs = [env[i] for i in node.args[0]]
            if k.built.inline is not None:
                params = [n for n in k.built.inline.nodes if n.op == "placeholder"]
                env[node] = graph.graph_copy(k.built.inline, dict(zip(params, inputs)))
                continue
            env[node] = graph.call_function(KernelCall(k), (inputs,), name=f"kernel_{k.key}")
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined kernel
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    _fold_int_round_trips(graph)
    _direct_calls(graph)
    shared_mask.share(graph)  # a mask several attention calls read, made additive once per call
    return fx.GraphModule(gm, graph), bound, kernels  # takes the submodules eager regions call


_aten = torch.ops.aten
# aten ops of eager regions and of kernels spliced in inline, called through torch's own Python functions or tensor
# methods: an OpOverload's call parses its arguments against the schema in Python-facing C++ that boxes them (about
# 6.7 against 2 us for a reshape); these functions take the same positional arguments (and keywords, where
# `_KEYWORDS` names them) and select that same overload
_FUNCTIONS = {
    _aten.reshape.default: torch.reshape, _aten.transpose.int: torch.transpose, _aten.unsqueeze.default: torch.unsqueeze,
    _aten.squeeze.dim: torch.squeeze, _aten.permute.default: torch.permute, _aten.select.int: torch.select,
    _aten.t.default: torch.t, _aten.add.Tensor: torch.add, _aten.sub.Tensor: torch.sub, _aten.mul.Tensor: torch.mul,
    _aten.div.Tensor: torch.div, _aten.neg.default: torch.neg, _aten.rsqrt.default: torch.rsqrt,
    _aten.mm.default: torch.mm, _aten.bmm.default: torch.bmm, _aten.cat.default: torch.cat,
    _aten.embedding.default: torch.embedding, _aten.index_copy.default: torch.index_copy,
}
_METHODS = {_aten.view.default: "view", _aten.add_.Tensor: "add_", _aten.index_copy_.default: "index_copy_",
            _aten.copy_.default: "copy_"}
_KEYWORDS = {_aten.add.Tensor: {"alpha"}, _aten.sub.Tensor: {"alpha"}, _aten.add_.Tensor: {"alpha"}}


def _direct_calls(graph: fx.Graph) -> None:
    """Calls of the aten ops in `_FUNCTIONS` and `_METHODS` made through torch's Python functions and tensor
    methods: the same op, without the OpOverload's slower argument parsing (tens of them per decode step)."""
    for node in graph.nodes:
        if node.op != "call_function" or not (node.kwargs.keys() <= _KEYWORDS.get(node.target, set())):
            continue
        fn, method = _FUNCTIONS.get(node.target), _METHODS.get(node.target)
        if fn is not None:
            node.target = fn
        elif method is not None and node.args and isinstance(node.args[0], fx.Node):
            node.op, node.target = "call_method", method


def _fold_int_round_trips(graph: fx.Graph) -> None:
    """`item(scalar_tensor(n))` -> `n` (an int, or a float through float64: exact). Fusion passes an int input (or
    a float one) to a kernel as a 0-d tensor on the kernel's
    device, which the kernel body reads back with `item`; where the body is spliced in as torch calls, that
    read is a device-to-host copy: a host sync per call, and an op no CUDA graph can capture."""
    for node in list(graph.nodes):
        src = node.args[0] if node.op == "call_function" and node.target is torch.ops.aten.item.default else None
        if (isinstance(src, fx.Node) and src.target is torch.ops.aten.scalar_tensor.default
                and src.kwargs.get("dtype") in (torch.int64, torch.float64)
                and isinstance(src.args[0], (fx.Node, int, float))):
            node.replace_all_uses_with(src.args[0])
            graph.erase_node(node)
            if not src.users:
                graph.erase_node(src)


def _kernel(node: fx.Node, kernels: dict[str, BuiltKernel], ready: dict[str, BuiltKernel]) -> BuiltKernel:
    """The built kernel for a kernel op: one per key and variant (identical layers share it)."""
    key, choice = node.args[1], choice_of(node)
    k = kernels.get(key)
    if k is None:
        k = ready.get(key)
        if k is None or k.choice != choice:
            k = build_kernel(kernel_body(key), choice)
        kernels[key] = k
    elif k.choice != choice:
        raise RuntimeError(f"fxcc: kernel {key} has two choices in one graph ({k.choice} and {choice}); "
                           "the codegen decision writes one per kernel")
    return k
