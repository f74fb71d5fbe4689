"""The first call of each compiled signature is checked against eager.

A model can compute something else when traced than when run: transformers builds an explicit causal
mask under tracing where eager, seeing an all-ones mask, passes none (and a module with is_causal=False
then attends both ways); a compiler bug does the same. Checking the first call costs one eager run per
compiled signature and turns a silently wrong result into eager execution with a warning naming where
the outputs differ. Eager runs on copies of the inputs, so an input the model mutates (a KV cache) is
mutated once, by the compiled call, whose result the first call returns when the two agree. When they
differ, the caller's inputs take what eager left in its copies (the compiled call's writes are undone) and
the first call returns eager's result, holding the caller's objects.
"""

from __future__ import annotations

import contextvars
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import rng
from .outputs import compare
from .state import is_state, restore, state_objects

log = logging.getLogger(__name__)
_REFERENCE = contextvars.ContextVar("fxcc_eager_reference_run", default=False)


def in_reference_run() -> bool:
    """Whether eager is running as the reference of a check: compiled modules inside it compile nothing."""
    return _REFERENCE.get()


def tolerance(dtype: torch.dtype) -> float:
    """Largest error relative to a leaf's scale that still counts as the same result."""
    return 1e-3 if dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 5e-2


def applies(gm: fx.GraphModule | None, exact: bool) -> str | None:
    """Why the check cannot run for a variant (None when it can): approximate passes change results on
    purpose; a graph that writes module state in place, or a DyCL host program's Python effects, would happen
    twice; ranks of a distributed model would each run the full eager model."""
    if not exact:
        return "approximate passes"
    if gm is None:  # its Python (attribute stores, appends to a default list, prints) would run twice
        return "a DyCL host program"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "distributed"
    if gm is not None and _writes_module_state(gm):
        return "writes module state"
    return None


def _is_view(n: fx.Node) -> bool:
    t = n.target
    return (n.op == "call_function" and bool(n.args) and isinstance(n.args[0], fx.Node)
            and isinstance(t, torch._ops.OpOverload) and any(r.alias_info for r in t._schema.returns))


def _writes_module_state(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
            for i, a in enumerate(t._schema.arguments):
                v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                if a.alias_info is not None and a.alias_info.is_write and isinstance(v, fx.Node):
                    while _is_view(v):
                        v = v.args[0]  # through views to what they view
                    if v.op == "get_attr":
                        return True
    return False


@dataclass
class Checked:
    """A checked first call: what the call returns (the compiled result, or eager's where they differ) and
    why the signature must run eagerly (None when compiled and eager agree)."""

    result: Any
    reason: str | None


def first_call(run: Callable[[list[Any]], Any], eager: Callable[..., Any], flatten: Callable[..., list[Any]],
               args: tuple, kwargs: dict, name: str) -> Checked | None:
    """Run `eager` on copies of the inputs, then the compiled `run` on the inputs, from one RNG state, which
    ends as the run whose result is returned left it; None (nothing run) when the inputs cannot be copied. A
    compiled call that raises where eager did not is a difference too (eager's result is returned)."""
    try:
        e_args, e_kwargs = copy.deepcopy((args, kwargs))
    except Exception as e:  # noqa: BLE001 - inputs that cannot be copied: run compiled, unchecked
        log.info("%s: first call not checked against eager: its inputs cannot be copied (%s)", name, e)
        return None
    start = rng.State()
    token = _REFERENCE.set(True)
    try:
        with torch.no_grad():
            want = eager(*e_args, **e_kwargs)
    finally:
        _REFERENCE.reset(token)
    after_eager = rng.State()
    start.restore()
    try:
        got = run(flatten(args, kwargs))
    except Exception as e:  # noqa: BLE001 - eager ran this call: an error of the compiled code only is fxcc's
        after_eager.restore()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return Checked(take_eagers(args, kwargs, e_args, e_kwargs, want),
                       f"the compiled call differs from eager: it raised {type(e).__name__}: {first} (eager did not)")
    c = compare(got, want, tol=tolerance)
    if c.equal:
        return Checked(got, None)
    after_eager.restore()  # the call returns eager's result: the generators are left as eager's run left them
    where = c.detail or f"{c.worst} differs by {c.max_rel:.3g} of its scale"
    return Checked(take_eagers(args, kwargs, e_args, e_kwargs, want),
                   f"the compiled call differs from eager on this call's inputs ({where})")


def take_eagers(args: tuple, kwargs: dict, e_args: tuple, e_kwargs: dict, want: Any) -> Any:
    """The caller's inputs made to hold what eager's run left in its copies of them (a KV cache as eager
    updated it, not as the compiled call did), and eager's result with the copies' objects and tensors replaced
    by the caller's."""
    mine = pytree.tree_leaves((tuple(args), dict(sorted(kwargs.items()))), is_leaf=is_state)
    theirs = pytree.tree_leaves((tuple(e_args), dict(sorted(e_kwargs.items()))), is_leaf=is_state)
    swap: dict[int, Any] = {}
    for a, b in zip(mine, theirs):
        if is_state(a) and type(a) is type(b):
            restore(a, b)
            swap[id(b)] = a
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if not torch.equal(a, b):  # an input tensor written in place, by the compiled call otherwise than eager
                with torch.no_grad():
                    a.copy_(b)
            swap[id(b)] = a
    for a, b in zip(state_objects(mine), state_objects(theirs)):  # the tensors inside them, now the caller's
        for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
            if isinstance(y, torch.Tensor):
                swap.setdefault(id(y), x)
    return pytree.tree_map(lambda x: swap.get(id(x), x), want, is_leaf=lambda x: id(x) in swap)
