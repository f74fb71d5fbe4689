"""The first call of each compiled signature is checked against eager.

A model can compute something else when traced than when run: transformers builds an explicit causal
mask under tracing where eager, seeing an all-ones mask, passes none (and a module with is_causal=False
then attends both ways); a compiler bug does the same. Checking the first call costs one eager run per
compiled signature and turns a silently wrong result into eager execution with a warning naming where
the outputs differ. Eager runs on copies of the inputs, so an input the model mutates (a KV cache) is
mutated once, by the compiled call, whose result the first call returns when the two agree. When they
differ, the caller's inputs take what eager left in its copies (the compiled call's writes are undone) and
the first call returns eager's result, holding the caller's objects.

`check_eager="always"` checks every call the same way (fxcc.runtime) and, where one differs, looks for where:
`localize_graph` finds the first kernel of a compiled graph whose built code differs from its reference (the
IR run as torch ops) on the same inputs; fxcc.dycl does the same per segment of a DyCL host program.
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
from fxcc.codegen.executable import KernelCall, layout_kept
from torch.utils import _pytree as pytree

from . import rng
from .dialects import KERNEL_OPS
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


def applies_to_program(exact: bool, effect: str | None) -> str | None:
    """Why a DyCL host program cannot be checked as a whole against eager (None when it can): its Python
    effects (`effect`, fxcc.dycl.python_effect) would happen twice; approximate passes; distributed."""
    if not exact:
        return "approximate passes"
    if effect:
        return f"its forward has {effect}, which would happen twice"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "distributed"
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
                if a.alias_info is None or not a.alias_info.is_write:
                    continue
                given = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
                for v in given if isinstance(given, (list, tuple)) else (given,):  # a foreach op writes a list
                    while isinstance(v, fx.Node) and _is_view(v):
                        v = v.args[0]  # through views to what they view
                    if isinstance(v, fx.Node) and v.op == "get_attr":
                        return True
    return False


_aten = torch.ops.aten
# ops whose kernels take operands of one dtype where their meta kernels, which capture traces, take any: a
# captured graph holding one with mixed operands fails only when it runs; the norms also take a bf16 or fp16 input
# with float32 parameters
_NORMS = frozenset({_aten.layer_norm.default, _aten.native_layer_norm.default, _aten.group_norm.default,
                    _aten.native_group_norm.default, _aten.batch_norm.default,
                    _aten._native_batch_norm_legit_no_training.default})
_ONE_DTYPE = _NORMS | {_aten.linear.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
                       _aten.baddbmm.default, _aten.mv.default, _aten.addmv.default, _aten.dot.default}
_NORM_MIXES = ({torch.float32, torch.bfloat16}, {torch.float32, torch.float16})


def mixed_operands(gm: fx.GraphModule) -> fx.Node | None:
    """The first node of a captured graph whose tensor operands differ in dtype where its kernel takes one (a
    long tensor into a float Linear): traced, it ran on its meta kernel; the first real call would raise."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _ONE_DTYPE:
            vals = [a.meta.get("val") for a in n.all_input_nodes]
            dtypes = {v.dtype for v in vals if isinstance(v, torch.Tensor)}
            if len(dtypes) > 1 and not (n.target in _NORMS and any(dtypes <= mix for mix in _NORM_MIXES)):
                return n
    return None


def eager_error(eager: Callable[..., Any], args: tuple, kwargs: dict) -> Exception | None:
    """The exception `eager` raises for this call, run on copies of its inputs from the RNG state as found (both
    left as they were); None where it returns or the inputs cannot be copied."""
    try:
        e_args, e_kwargs = copy.deepcopy((args, kwargs))
    except Exception:  # noqa: BLE001 - inputs that cannot be copied: nothing run, nothing known
        return None
    with rng.preserved():
        try:
            _reference(eager, e_args, e_kwargs)
        except Exception as e:  # noqa: BLE001 - what the caller raises in its place
            return e
    return None


def _reference(eager: Callable[..., Any], e_args: tuple, e_kwargs: dict) -> Any:
    """`eager` on copies of a call's inputs, as the reference run (fxcc's calls inside it run eagerly)."""
    token = _REFERENCE.set(True)
    try:
        with torch.no_grad():
            return eager(*e_args, **e_kwargs)
    finally:
        _REFERENCE.reset(token)


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
    want = _reference(eager, e_args, e_kwargs)
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


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


class _KernelByKernel(fx.Interpreter):
    """The final IR run as torch ops (each kernel op's reference body), each kernel's built code run beside it
    on the same inputs (copies): `first` is the first kernel whose result differs, with the comparison."""

    def __init__(self, gm: fx.GraphModule, impls: dict[str, Callable]):
        super().__init__(gm)
        self.impls = impls
        self.first: tuple[fx.Node, Any] | None = None
        self.checked = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.first is None and n.op == "call_function" and n.target in KERNEL_OPS:
            inputs = [_clone(x) for x in self.fetch_args_kwargs_from_env(n)[0][0]]
            impl = self.impls.get(n.args[1])
            if impl is not None:
                self.checked += 1
                c = compare(list(impl(inputs)), list(out), tol=tolerance)
                if not c.equal:
                    self.first = (n, c)
        return out


def localize_graph(gm: fx.GraphModule, executable: fx.GraphModule, bound: list[Any], kernels: dict[str, Any],
                   flat: list[Any], want: Any = None, out_spec: Any = None) -> str:
    """Where a compiled graph's result departs from its IR run as torch ops, on inputs `flat` (copies are
    taken): the first kernel whose built code (as the executable calls it) differs from its op's reference on
    the reference's inputs; else whether the executable, run again, differs from the IR as torch ops (a fault
    outside the kernels) or not: then, given eager's result `want` and the graph's `out_spec`, whether the IR as
    torch ops differs from eager (made before codegen) or not (a fault depending on earlier calls)."""
    impls: dict[str, Callable] = {k: layout_kept(b) for k, b in kernels.items()}
    impls |= {n.target.key: n.target for n in executable.graph.nodes if isinstance(n.target, KernelCall)}
    with rng.preserved(flat), torch.no_grad():
        walk = _KernelByKernel(gm, impls)
        ref = walk.run(*[_clone(x) for x in flat])
        if walk.first is not None:
            n, c = walk.first
            k = kernels.get(n.args[1])
            what = f"{k.kind}, {k.backend}" if k is not None else "kernel"
            where = c.detail or f"{c.worst} differs by {c.max_rel:.3g} of its scale"
            return (f"kernel {n.args[1]} ({what}; node %{n.name}) differs from its reference (the IR as torch ops) "
                    f"on the same inputs: {where}")
        again = executable(*[_clone(x) for x in flat], *bound)
    c = compare(list(again), list(ref), tol=tolerance)
    if not c.equal:
        return (f"each of the {walk.checked} kernels agrees with its reference, but the executable run again differs "
                f"from the IR as torch ops ({c.detail or f'{c.worst} by {c.max_rel:.3g} of its scale'}): a fault "
                "outside the kernels (spliced torch code, output buffers)")
    same = f"each of the {walk.checked} kernels agrees with its reference and the executable run again from these " \
           "inputs agrees with the IR as torch ops"
    try:
        c = compare(pytree.tree_unflatten(list(ref), out_spec), want, tol=tolerance) if out_spec is not None else None
    except Exception:  # noqa: BLE001 - a result that updates the caller's objects: not comparable here
        c = None
    if c is not None and not c.equal:
        return (f"{same}, which differs from eager ({c.detail or f'{c.worst} by {c.max_rel:.3g} of its scale'}): "
                "made before codegen (capture, a graph pass)")
    return f"{same}: the difference depends on earlier calls (an output buffer reused while held, state)"
