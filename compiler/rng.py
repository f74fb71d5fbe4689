"""Random numbers as eager draws them (torch.compile's convention): under one seed a compiled call draws what
eager draws, from the same generator in the same order.

Two halves: random ops run through torch's generator in program order, never inside a generated kernel
(`draws_random` marks them; fusion keeps them eager and in their place), and fxcc's own runs around the
user's call (capture, example-input runs, kernel and whole-graph timing, the check against eager) happen
inside `preserved`, so the user's call starts from the generator state eager would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

aten = torch.ops.aten

# ops that draw only when training with a non-zero probability, some of them untagged
_DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout",
                       "_fused_dropout"})


def _arg(node: fx.Node, schema: torch.FunctionSchema, name: str) -> object:
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, a.default_value)
    return None


def draws_random(node: fx.Node) -> bool:
    """Whether the op of `node` draws from torch's generator when run (rand, randn, randperm, bernoulli,
    multinomial, dropout in training, attention with dropout_p > 0...)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    seeded = torch.Tag.nondeterministic_seeded in t.tags
    name = t._schema.name.split("::")[-1]
    if not seeded and name not in _DROPOUTS:
        return False
    schema = t._schema
    names = {a.name for a in schema.arguments}
    if "train" in names and _arg(node, schema, "train") is False:  # dropout, RNNs in eval
        return False
    for p in ("dropout_p", "dropout") if name not in _DROPOUTS else ("p",):  # attention, RNNs, dropouts
        if p in names and _arg(node, schema, p) == 0:
            return False
    return True


def unmatched(gm: fx.GraphModule | None) -> str | None:
    """Why the graph cannot draw what eager draws (None when it can): an op drawing from a torch.Generator of the
    model's own, which the captured graph holds as a copy (eager advances the model's generator, the copy would
    repeat or diverge)."""
    for n in gm.graph.nodes if gm is not None else ():
        if draws_random(n) and isinstance(n.kwargs.get("generator"), fx.Node):
            return (f"{n.name} ({n.target}) draws from a torch.Generator of its own, which a compiled graph cannot "
                    "advance as eager does")
    return None


def _cuda_devices() -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


@contextlib.contextmanager
def preserved(*args: object) -> Iterator[None]:
    """Run the body with the CPU and CUDA generators' states saved and put back after it, so work fxcc does
    on the side (a compile, a timing, a reference run) leaves the user's next draw where eager would find it;
    so are those of the torch.Generators among `args` (a call's own: `sample(logits, generator)`)."""
    state = State()
    own = [(g, g.get_state()) for g in pytree.tree_leaves(args) if isinstance(g, torch.Generator)]
    try:
        yield
    finally:
        state.restore()
        for g, s in own:
            g.set_state(s)


class State:
    """The CPU and CUDA generators' states at one moment, to set again later (`restore`)."""

    def __init__(self) -> None:
        self.devices = _cuda_devices()
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)
