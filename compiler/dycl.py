"""DyCL: compile a module whose control flow depends on tensor values, as a host program plus segments.

When capture fails on data-dependent control flow, `compile_dynamic` rewrites `forward` (see
`fxcc.dycl_rewrite`) into a generated host program, plain readable Python that evaluates the
conditions, and condition-free segments. Each segment is captured and compiled through the normal
pipeline and recompile policy (a CompiledModule per set of inputs it bakes); a loop calls one compiled body.

The host program is Python, so one serves every size of its input structure; its segments compile for their
own shapes as a module does: static first, then a size that changes (a new batch, the rows `nonzero` kept)
compiles once more with that size symbolic, and the symbolic variant serves the sizes its guard accepts
(`dynamic=False`: one static variant per shape). The host program is lean on purpose: the CompiledModule's
guard (input structure, parameters) runs once at the top, and a segment call is a dict lookup on its inputs'
shapes followed by a direct call of the compiled executable (no pytree, no parameter check). Past
`SEGMENT_MAX_VARIANTS` compiles a segment's new signatures run eagerly, with a warning.

Per input signature a segment runs the faster of compiled and plain Python, measured on its first
inputs: a segment whose plain Python takes under `SMALL_SEGMENT_US` is not compiled at all (a
comparison, a squeeze: a compiled call's dispatch costs as much; decided once for every size of its
input structure, as a symbolic variant serves them), and a compiled one falls back to plain
Python only when that measured faster by more than `PYTHON_MARGIN` (compiled and plain are timed in
alternating rounds, so load on a shared machine hits both alike).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import linecache
import logging
import operator
import re
import statistics
import time
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fxcc import ir, rng
from fxcc.capture import CaptureError, flatten_inputs
from fxcc.dycl_analysis import Wrapping, parse_function, target_function, wrapping
from fxcc.dycl_rewrite import (
    Callees,
    RewriteError,
    Rewritten,
    rewrite,
    segment_function,
    unparse,
)
from fxcc.dynamic import strides
from fxcc.eager_check import applies_to_program, localize_graph, take_eagers, tolerance
from fxcc.guards import Churn, ModuleState
from fxcc.logs import topic_logger
from fxcc.measure import interleaved, pinned_by
from fxcc.outputs import compare
from fxcc.runtime import COMPILE_LOCK, BufferState, CompiledModule, CompileStats, Variant, explain_variant
from fxcc.state import state_objects
from fxcc.store import cache_key, default_cache
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)
recompiles = topic_logger("recompiles")

SEGMENT_MAX_VARIANTS = 64
# exact guard keys a segment remembers for the signatures its symbolic variants serve (past it, they are looked up again)
_SERVED_KEYS = 4096
# a compiled segment is timed against the same statements run as plain Python (the segment function) on
# its first inputs, and the faster one runs: tiny segments (a comparison, a squeeze) gain nothing from
# kernels and pay their call overhead. Segments that mutate tensors in place or draw random numbers are
# not timed (running them again would change the result).
MEASURE_CHOICE = True
# a segment whose plain Python takes less than this (microseconds per call, measured on its first inputs)
# is not compiled: a compiled call's own dispatch costs about as much (`route == e`, a squeeze), and each
# such segment would be captured and compiled once per data-dependent shape for nothing.
SMALL_SEGMENT_US = 10.0
# a compiled segment's kernels were each chosen by measurement against the library call eager makes, so
# it runs unless its plain Python measured faster by more than this fraction (timing noise on a loaded
# machine should not send a segment back to eager)
PYTHON_MARGIN = 0.05
_IMPURE = re.compile(r"\w_\(|rand|dropout|bernoulli|multinomial|normal|exponential|uniform|poisson")


# values a segment guard compares by value: immutable, so a compiled variant can bake them
_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
              type(Ellipsis), slice)


# segment outputs torch.export cannot return (it takes tensors, numbers, None): they are passed around the
# captured graph, as the values the first eager run gave; a segment's guard fixes its inputs' devices and dtypes,
# which is all such a value can depend on
_PASSED = (torch.device, torch.dtype, torch.layout, torch.memory_format, str, bytes, type(Ellipsis), slice)


class Unguarded(Exception):
    """A segment input whose value no guard can check (a mutable object): the segment runs as Python."""


def _sig(a: Any) -> Any:
    """A segment's guard on one input: shape/strides/dtype/device for tensors (the strides where they matter,
    fxcc.dynamic.strides: a variant's outputs have eager's strides for its inputs' ones), the structure of
    containers, the value of constants, the identity of modules and functions (whose code does not change)."""
    if isinstance(a, torch.Tensor):
        return (a.shape, strides(a), a.dtype, a.device, a.layout)
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(map(_sig, a)))
    if isinstance(a, dict):
        return (type(a), tuple((k, _sig(v)) for k, v in a.items()))
    if isinstance(a, float):
        return (type(a), a.hex())  # -0.0 and 0.0 differ when baked; a NaN equals itself
    if isinstance(a, slice):  # by its bounds (a slice is unhashable before Python 3.12); baked only with int bounds
        bounds = (a.start, a.stop, a.step)
        if not all(b is None or type(b) in (int, bool) for b in bounds):
            raise Unguarded("a slice whose bounds are not integers")
        return (slice, bounds)
    if isinstance(a, _CONSTANTS):
        return (type(a), a)
    if isinstance(a, types.FunctionType) and "<locals>" in a.__qualname__:
        # made by a call (transformers' and_masks): a new object at each call, with its own closure, and a dead
        # one's id is reused; its identity pins nothing
        raise Unguarded(f"a function defined inside a call ({a.__qualname__})")
    if isinstance(a, types.MethodType):
        # made anew at each attribute access (`layer.ff_chunk`): a dead one's id is reused by the next layer's,
        # so it is guarded by what it binds, the function and the object, which live on
        return (types.MethodType, id(a.__func__), _bound_to(a.__self__, a.__qualname__))
    if isinstance(a, types.BuiltinMethodType) and not isinstance(a.__self__, (types.ModuleType, type(None))):
        return (types.BuiltinMethodType, a.__name__, _bound_to(a.__self__, a.__qualname__))
    if isinstance(a, (nn.Module, types.FunctionType, types.BuiltinFunctionType, type)):
        return (type(a), id(a))
    raise Unguarded(f"an input of type {type(a).__name__}")


def _bound_to(owner: Any, what: str) -> Any:
    """A bound method's object, guarded by identity where it lives as long as the model (a module, a class)."""
    if isinstance(owner, (nn.Module, type)):
        return (type(owner), id(owner))
    raise Unguarded(f"the method {what} of a {type(owner).__name__} object")


_TENSOR = torch.Tensor


def _key(args: tuple, exact: bool = True) -> tuple:
    """A segment's guard key: `_sig` of each input (inlined for plain tensors, their strides as they are: this
    runs on every segment call; `exact=False` gives `_sig`'s alone, which a compile is keyed by), and which
    tensor inputs are one object: a capture traces one object passed twice as one input."""
    key = tuple([(a.shape, a.stride(), a.dtype, a.device, a.layout) if exact and type(a) is _TENSOR else _sig(a)
                 for a in args])
    ids = [id(t) for t in (args if all(type(a) is _TENSOR for a in args) else pytree.tree_leaves(args))
           if isinstance(t, torch.Tensor)]
    if len(set(ids)) < len(ids):
        return (*key, ("same object", tuple(map(ids.index, ids))))
    return key


class SegmentModule(nn.Module):
    """One segment as a module: its owner is a submodule, so export lifts the owner's parameters.

    Inputs that are modules (a host loop `for block in self.blocks`) are bound here as submodules, at
    their positions `fixed`, so each module gets its own compiled variant and the call passes only values.
    A method of a module (`apply_chunking_to_forward(self.ff_chunk, ...)`) binds its module the same way:
    its weights are the segment's parameters (read at run time, and keyed by the graph cache per module),
    not constants lifted from a closure, which one layer's graph would hand to the next.
    """

    def __init__(self, owner: Any, fn: Any, source: str, fixed: dict[int, Any], n_args: int,
                 passed: dict[int, Any] | None = None):
        super().__init__()
        self.owner = owner if isinstance(owner, nn.Module) else None
        modules = {i: m for i, m in fixed.items() if isinstance(m, nn.Module)}
        methods = {i: m for i, m in fixed.items()
                   if isinstance(m, types.MethodType) and isinstance(m.__self__, nn.Module)}
        self.bound_modules = nn.ModuleList([*modules.values(), *(m.__self__ for m in methods.values())])
        self._module_positions = tuple(modules)
        self._method_funcs = tuple((i, m.__func__) for i, m in methods.items())
        # the graph cache keys modules by their primitive attributes: the source, the methods' names and the
        # constants count
        self._methods = tuple((i, f"{f.__module__}.{f.__qualname__}") for i, f in self._method_funcs)
        self._source = source
        self._constants = tuple((i, c) for i, c in fixed.items() if i not in modules and i not in methods)
        self._fn = fn
        self._n_args = n_args
        self._passed = tuple(sorted((passed or {}).items()))  # outputs returned as None (see _PASSED)

    def forward(self, *args: Any) -> Any:
        fixed = dict(self._constants) | dict(zip(self._module_positions, self.bound_modules))
        owners = list(self.bound_modules)[len(self._module_positions):]
        fixed |= {i: types.MethodType(f, m) for (i, f), m in zip(self._method_funcs, owners)}
        rest = iter(args)
        out = self._fn(*[fixed[i] if i in fixed else next(rest) for i in range(self._n_args)])
        if self._passed:
            passed = dict(self._passed)
            out = tuple(None if i in passed else o for i, o in enumerate(out))
        return out


@dataclass
class SegmentRun:
    """How one input signature of a segment runs: compiled (with its Variant) or eagerly (with why)."""

    signature: str
    call: Any
    variant: Variant | None = None
    eager: str | None = None
    timing: str = ""  # the measured choice between the compiled variant and the plain Python segment


class Segment:
    """A compiled segment: per input signature, a direct call of its executable.

    Its signatures compile as a module's do (one CompiledModule per set of baked inputs, whose recompile policy
    decides): static first, then a size that changes compiles once more with that size symbolic, and that variant
    serves every later signature its guard accepts, with no capture and no timing (`_served`)."""

    def __init__(self, spec: Any, owner: Any, name: str, options: Any):
        self.spec = spec
        self.source = ""
        self.name = name
        self.owner = owner
        # not timed against eager: a build times the segment against its plain Python itself (`_build_runs`)
        self.options = options.replace(dycl=False, max_variants=SEGMENT_MAX_VARIANTS, time_vs_eager=False)
        self.eager_call: Any = None  # the generated segment function (bound to the owner), set by Program
        self.runs: dict[Any, SegmentRun] = {}  # the signatures built (compiled or plain Python)
        self.served: dict[Any, SegmentRun] = {}  # other signatures, served by a run's symbolic variant
        # plain Python runs measured too small to compile, by their signature with sizes aside (`_sizes_aside`)
        self.small: dict[Any, SegmentRun] = {}
        self.by_key: dict[Any, Any] = {}
        self.modules: dict[Any, CompiledModule] = {}  # (`_baked_key`, passed outputs' types) -> what compiles them
        self.stats = CompileStats()  # the segment's compiles, with their reasons
        self.churn = Churn()  # rebuilds for state changes found soon after a build, in a row
        self.churned: str | None = None  # why every signature runs as plain Python: its state changes at every call

    def __call__(self, *args: Any) -> Any:
        try:
            key = _key(args)
        except Unguarded as e:
            return self._unguarded(args, str(e))
        call = self.by_key.get(key)
        if call is None:
            sig = _key(args, exact=False)  # strides of size-1 dimensions aside
            call = self.by_key.get(sig)
            if call is None:
                # its compile and timings draw nothing the call's own run would not (fxcc.rng); one thread at a
                # time builds (fxcc.runtime.COMPILE_LOCK), and one that waited finds the segment built
                with COMPILE_LOCK, rng.preserved(args):
                    call = self.by_key.get(sig) or self._served(args, sig) or self._build(args, sig)
            if len(self.by_key) >= _SERVED_KEYS:  # sizes that vary without bound (after `nonzero`)
                self.by_key = {k: c for k, c in self.by_key.items() if k in self.runs}
                self.served.clear()
            self.by_key[key] = call
        return call(*args)

    def run_of(self, sig: Any) -> SegmentRun | None:
        """How the signature `sig` (`_key(args, exact=False)`) runs: its own build, or the run serving it."""
        return self.runs.get(sig) or self.served.get(sig)

    def _served(self, args: tuple, sig: Any) -> Any:
        """The call of a built run whose symbolic variant's guard accepts these inputs (one object passed twice
        where the run's was too), or of a run measured too small to compile at other sizes of these inputs
        (`SMALL_SEGMENT_US`), kept for `sig`; None where none does. The smallness is measured once: timed again at
        each new size (a KV cache that grows at every token), one measurement past the threshold on a loaded
        machine would compile at some later token, a compile per run that no two runs would agree on."""
        small = self.small.get(_sizes_aside(sig))
        if small is not None:
            self.served[sig] = small
            self.by_key[sig] = small.call
            return small.call
        baked = _baked_key(args)
        same = _same_objects(sig)
        for (b, _), cm in self.modules.items():
            if b != baked:
                continue
            flat, spec, key = cm._guard(tuple(a for a in args if not _baked(a)), {})
            v = cm._symbolic(flat, spec, key)
            run = next((r for k, r in self.runs.items() if r.variant is v and _same_objects(k) == same), None) \
                if v is not None else None
            if run is not None:
                self.served[sig] = run
                self.by_key[sig] = run.call
                return run.call
        return None

    def _guarded(self, call: Any, state: ModuleState) -> Any:
        """`call` run while what its graph holds of the model's state (the contents of the tensors its constants were
        computed from, the Python globals its capture read: fxcc.guards.ModuleState.baked_changed) is unchanged; after
        a change, every signature of the segment is built again, or, where such changes keep coming soon after each
        build (fxcc.guards.Churn), the segment runs as plain Python from then on, with one warning."""
        checks = 0

        def guarded(*args: Any) -> Any:
            nonlocal checks
            checks += 1
            why = state.baked_changed()
            if why is None:
                return call(*args)
            self.runs.clear()
            self.served.clear()
            self.small.clear()
            self.by_key.clear()
            self.modules.clear()
            if self.churn.note(why, checks) and self.churned is None:
                self.churned = f"plain Python: {self.churn.text()}"
                warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}) runs as {self.churned}",
                              stacklevel=2)
            else:
                recompiles.info("recompiling DyCL segment %s (%s): %s", self.name, self.spec.where, why)
            return self(*args)

        return guarded

    def _unguarded(self, args: tuple, what: str) -> Any:
        if not self.runs.get("unguarded"):
            self.runs["unguarded"] = SegmentRun("(unguarded)", self.eager_call,
                                                eager=f"plain Python: {what} cannot be guarded")
        return self.eager_call(*args)

    def _build(self, args: tuple, key: Any) -> Any:
        # the build runs the segment several times (timed, checked as plain Python and compiled); module state
        # it writes (a BatchNorm's running stats in training mode) ends as before them, so the call's own run
        # is the one write eager makes
        state = BufferState([self.owner, *args])
        try:
            return self._build_runs(args, key, state)
        finally:
            state.restore()

    def _build_runs(self, args: tuple, key: Any, state: BufferState) -> Any:
        flat, _ = flatten_inputs(args, {})
        sig = ", ".join(ir.type_str(x) if isinstance(x, torch.Tensor) else type(x).__name__
                        if isinstance(x, nn.Module) else repr(x)[:20] for x in flat)
        compiled = [r for r in self.runs.values() if r.variant is not None]
        has_tensor = any(isinstance(x, torch.Tensor) for x in flat)
        # under a plan (fxcc.measure.pinned) a segment runs compiled, untimed
        measure = MEASURE_CHOICE and not _IMPURE.search(self.source) and pinned_by() is None
        t_py = _median_us(self.eager_call, _clones(args)) if measure and has_tensor else None

        @functools.cache
        def plain() -> Any:  # one run as plain Python on copies of the inputs (RNG state restored), for the checks
            state.restore()
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                return self.eager_call(*_clones(args))

        if not has_tensor:
            run = SegmentRun(sig, self.eager_call, eager="plain Python (no tensor inputs)")
        elif t_py is not None and t_py < SMALL_SEGMENT_US:
            why = (f"plain Python, not compiled: {t_py:.1f} us per call, less than a compiled call saves "
                   f"(SMALL_SEGMENT_US={SMALL_SEGMENT_US})")
            run = SegmentRun(sig, self.eager_call, eager=why)
            self.small[_sizes_aside(key)] = run
        elif made := self._made_state(args, plain):
            run = SegmentRun(sig, self.eager_call, eager=f"plain Python: it makes its own {made} (a compiled graph would "
                                                         "hand the same object to every call)")
        elif self.churned is not None:
            run = SegmentRun(sig, self.eager_call, eager=self.churned)
        elif len(compiled) >= SEGMENT_MAX_VARIANTS:
            why = (f"{len(compiled)} signatures are compiled already (SEGMENT_MAX_VARIANTS="
                   f"{SEGMENT_MAX_VARIANTS}); this one runs eagerly")
            warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}): {why}", stacklevel=4)
            run = SegmentRun(sig, self.eager_call, eager=why)
        else:
            fixed = {i: a for i, a in enumerate(args) if _baked(a)}
            values = tuple(a for i, a in enumerate(args) if i not in fixed)
            try:
                passed = _passed_outputs(plain())
                cm = self._module(args, fixed, passed)
                before = cm.stats.compiles
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    flat_values, spec, guard_key = cm._guard(values, {})
                    variant = cm._new_variant(values, {}, guard_key, flat_values, spec)
                if cm.stats.compiles > before:
                    self.stats.compiles += 1
                    self.stats.reasons.append(cm.stats.reasons[-1])
                    self.stats.history.append(cm.stats.history[-1])
                if not isinstance(variant, Variant):  # runs eagerly: hooks registered, a generator it cannot replay
                    raise CaptureError(variant.reason)
            except Exception as e:  # noqa: BLE001 - a segment fxcc cannot capture runs eagerly, reported
                first = (str(e).strip().splitlines() or [""])[0][:200]
                why = f"capture/compile failed: {type(e).__name__}: {first}"
                warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}) runs eagerly: {why}",
                              stacklevel=4)
                run = SegmentRun(sig, self.eager_call, eager=why)
            else:
                call = _passing(_direct_call(variant, values, len(self.spec.outputs), tuple(fixed)), passed)
                baked = cm._params
                if baked is not None and (baked.watched or baked.globals is not None):
                    call = self._guarded(call, baked)  # its graph holds values computed from them
                run = SegmentRun(sig, call, variant)
                differs = self._unlike_plain(call, args, state)
                if differs:
                    run.call, run.eager = self.eager_call, f"plain Python: {differs}"
                elif measure:
                    t_fx, t_py = _compare(call, self.eager_call, _clones(args))
                    run.timing = f"compiled {t_fx:.1f} us, plain Python {t_py:.1f} us per call"
                    if t_py < t_fx * (1 - PYTHON_MARGIN):
                        run.call, run.eager = self.eager_call, f"plain Python: measured faster ({run.timing})"
        self.runs[key] = run
        self.by_key[key] = run.call
        return run.call

    def _module(self, args: tuple, fixed: dict[int, Any], passed: dict[int, Any]) -> CompiledModule:
        """The CompiledModule that compiles the segment's signatures with these baked inputs (`fixed`) and outputs
        passed around its graph (`passed`), its inputs named as the segment's are. Where a passed output is a value
        that could follow the sizes (a string, a slice), it compiles static shapes only: a symbolic variant would
        hand every size the value of the first."""
        key = (_baked_key(args), tuple((i, type(v)) for i, v in passed.items()))
        cm = self.modules.get(key)
        if cm is None:
            options = self.options
            if any(not isinstance(v, (torch.device, torch.dtype, torch.layout, torch.memory_format))
                   for v in passed.values()):
                options = options.replace(dynamic=False)
            cm = CompiledModule(SegmentModule(self.owner, self.eager_call, self.source, fixed, len(args), passed),
                                options)
            cm.name, cm.echo_ir = self.name, False
            if len(self.spec.inputs) == len(args):  # recompile reasons name the segment's inputs
                cm.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY)
                                                      for i, n in enumerate(self.spec.inputs) if i not in fixed])
            self.modules[key] = cm
        return cm


    @staticmethod
    def _made_state(args: tuple, plain: Callable[[], Any]) -> str | None:
        """The type of a state object (a transformers cache) the segment returns and its inputs do not hold: one it
        makes. Its graph's output would keep that object, built at capture, and return it at every call, where
        eager makes a new one (BART's decoder makes its EncoderDecoderCache). From `plain`, the segment's outputs
        run as plain Python."""
        try:
            outs = plain()
        except Exception:  # noqa: BLE001 - the call itself raises it again, as eager does
            return None
        given = {id(o) for o in state_objects(args)}
        made = [o for o in state_objects(outs) if id(o) not in given]
        return type(made[0]).__name__ if made else None

    def _unlike_plain(self, call: Any, args: tuple, state: BufferState) -> str | None:
        """Why the compiled segment cannot stand in for its plain Python (None when it can): its outputs share
        memory differently (a view returned as a copy: an in-place update after it would reach other tensors
        than in eager), or its values differ beyond `eager_check.tolerance`. Both run on copies of the inputs
        (RNG state restored), so nothing the caller holds changes."""
        params = list(self.owner.parameters()) + list(self.owner.buffers()) if isinstance(self.owner, nn.Module) \
            else []
        pattern, results = [], []
        for fn in (self.eager_call, call):
            copies = _clones(args)
            state.restore()  # both read the module state the call will
            try:
                with rng.preserved(args), torch.no_grad():
                    outs = fn(*copies)
            except Exception as e:  # noqa: BLE001 - the real call (as plain Python) raises what eager raises
                return f"{'compiled' if fn is call else 'plain'} run on copies failed ({type(e).__name__})"
            pattern.append(_alias_pattern(outs, [*pytree.tree_leaves(copies), *params]))
            results.append(outs)
        if pattern[0] != pattern[1]:
            return "its outputs alias its inputs differently when compiled (a view would become a copy)"
        # a DyCL program is not checked against eager as a whole (its Python would run twice): each segment's
        # first run of a signature is, against the same segment as plain Python
        c = compare(results[1], results[0], tol=tolerance)
        if c.equal:
            return None
        why = f"its compiled result differs from plain Python's ({c.detail or f'{c.worst} off by {c.max_rel:.3g} of its scale'})"
        warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}) runs as plain Python for these inputs: "
                      f"{why}", stacklevel=5)
        return why


def _baked_key(args: tuple) -> tuple:
    """The guard on a segment call's baked inputs (`_baked`), by position: one CompiledModule compiles their
    signatures."""
    return tuple((i, _sig(a)) for i, a in enumerate(args) if _baked(a))


def _sizes_aside(sig: Any) -> Any:
    """A segment's signature (`_key(args, exact=False)`) without its tensors' sizes and strides and its ints' values:
    what the signatures a growing KV cache gives at each token share."""
    if type(sig) is not tuple:
        return sig
    if sig and type(sig[0]) is torch.Size:  # a tensor's (shape, strides, dtype, device, layout)
        return (len(sig[0]), *sig[2:])
    if len(sig) == 2 and sig[0] is int:
        return (int,)
    return tuple(map(_sizes_aside, sig))


def _same_objects(sig: Any) -> Any:
    """Which tensor inputs of a signature (`_key`) are one object (None: all are distinct)."""
    last = sig[-1] if isinstance(sig, tuple) and sig else None
    return last[1] if isinstance(last, tuple) and len(last) == 2 and last[0] == "same object" else None


def _passed_outputs(outs: Any) -> dict[int, Any]:
    """The outputs, by position, that a captured graph cannot return (`_PASSED`: a device, a dtype), with their
    values, from the segment's outputs run as plain Python."""
    return {i: o for i, o in enumerate(outs) if isinstance(o, _PASSED)} if isinstance(outs, tuple) else {}


def _clones(args: tuple) -> tuple:
    """The inputs with every tensor copied (modules and constants as they are)."""
    return pytree.tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)


def _alias_pattern(outs: Any, ins: list[Any]) -> tuple:
    """For each tensor output: the inputs and earlier outputs whose storage it shares."""
    def ptr(t: torch.Tensor) -> int | None:
        return t.untyped_storage().data_ptr() or None if t.device.type != "meta" else None

    in_ptrs = [ptr(t) if isinstance(t, torch.Tensor) else None for t in ins]
    seen: list[int | None] = []
    out = []
    for t in pytree.tree_leaves(outs):
        if not isinstance(t, torch.Tensor):
            continue
        p = ptr(t)
        out.append((tuple(i for i, q in enumerate(in_ptrs) if p is not None and q == p),
                    tuple(j for j, q in enumerate(seen) if p is not None and q == p)))
        seen.append(p)
    return tuple(out)


def _compare(compiled: Any, plain: Any, args: tuple, rounds: int = 5) -> tuple[float, float]:
    """Per-call microseconds of the compiled segment and of its plain Python, timed in alternating
    rounds (the median of the rounds' medians), so that load drifting on a shared machine hits both."""
    t_fx, t_py = [], []
    for _ in range(rounds):
        t_fx.append(_median_us(compiled, args))
        t_py.append(_median_us(plain, args))
    return statistics.median(t_fx), statistics.median(t_py)


def _median_us(fn: Any, args: tuple, reps: int = 5) -> float:
    with torch.no_grad():
        return interleaved({"fn": lambda: fn(*args)}, device="cpu", warmup=1, reps=reps, rounds=1)["fn"].median * 1e3


def _baked(a: Any) -> bool:
    """Inputs bound into a segment's variant instead of passed: modules, functions and Python constants (the
    segment's guard key holds their identity or value already, so a variant only ever sees one). An int is passed:
    a length or position that changes at every call (a decode loop's `start`) recompiles once with it symbolic, as
    a module's int argument does, where a baked one would compile for every value."""
    return type(a) is not int and isinstance(a, (nn.Module, *_CONSTANTS, types.FunctionType,
                                                  types.BuiltinFunctionType, types.MethodType, type))


def _passing(call: Any, passed: dict[int, Any]) -> Any:
    """`call` with the outputs its graph returns as None (`_PASSED`) put back."""
    if not passed:
        return call

    def call_passing(*a: Any) -> Any:
        out = list(call(*a))
        for i, v in passed.items():
            out[i] = v
        return tuple(out)
    return call_passing


def _direct_call(variant: Variant, values: tuple, n_out: int, fixed: tuple[int, ...]) -> Any:
    """The leanest call of a variant: its executable's code with the bound parameters appended.

    `fixed` are the positions of baked inputs (modules, constants), dropped from the call.
    """
    cap = variant.captured
    flat_in = all(not isinstance(a, (list, tuple, dict)) for a in values)
    flat_out = cap.out_spec == pytree.tree_structure(tuple(range(n_out)))
    if flat_in and flat_out and variant.cuda_graph is None:
        ex, bound = variant.executable.forward, tuple(variant.bound)
        if not fixed:
            def call(*a: Any) -> Any:
                return ex(*a, *bound)
            return call
        keep = [i for i in range(len(values) + len(fixed)) if i not in fixed]
        if len(keep) == 1:
            k = keep[0]

            def call_one(*a: Any) -> Any:
                return ex(a[k], *bound)
            return call_one
        pick = operator.itemgetter(*keep)

        def call_picking(*a: Any) -> Any:
            return ex(*pick(a), *bound)
        return call_picking

    def call_general(*a: Any) -> Any:
        kept = tuple(x for i, x in enumerate(a) if i not in fixed)
        return tuple(variant.run(flatten_inputs(kept, {})[0]))
    return call_general


class Program:
    """One function rewritten by DyCL: the generated host program, its segments and sub-programs.

    A function DyCL cannot rewrite at all (no source, a generator, `exec`) runs as it is: `call` is the
    original, and `warning` says why (compile_dynamic issues one warning per function)."""

    def __init__(self, owner: Any, fn: Any, name: str, options: Any, cache: dict, callees: Callees,
                 static_names: set[str] | None = None, method: bool = True, eager: tuple[Any, str] | None = None):
        cache[(id(owner), fn)] = self  # before the callees: recursion finds this program
        self.name = name
        self.segments: list[Segment] = []
        self.subprograms: dict[str, Program] = {}
        self.dispatchers: dict[str, Dispatch] = {}
        self.host_source = ""
        self.warning: str | None = None
        self.eager_reason: str | None = None
        self.rw: Rewritten | None = None
        try:
            if eager is not None:
                raise RewriteError(eager[1])
            wrapped = wrapping(fn)  # decorators: the function they wrap is rewritten, and they run around it
            self.rw = rewrite(wrapped.inner, owner, callees, static_names, method)
        except RewriteError as e:
            self.eager_reason = str(e)
            code = getattr(inspect.unwrap(fn), "__code__", None)
            where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
            self.warning = f"fxcc DyCL: {name}{where} runs eagerly, as written: {e}"
            self.call = eager[0] if eager is not None else types.MethodType(fn, owner) if method else fn
            return
        rw = self.rw
        self.segments = [Segment(s, owner if method else None, f"{name}.seg{s.index}", options)
                         for s in rw.segments]
        for pname, obj in rw.callees.items():
            self.subprograms[pname] = _program_for(obj, options, cache, callees)
        for dname, objs in rw.dispatch.items():
            self.dispatchers[dname] = Dispatch({id(o): _program_for(o, options, cache, callees) for o in objs
                                                if callees.needs_program(o)})
        self.host_source = unparse(rw.host)
        seg_defs = [segment_function(s, rw.selfname) for s in rw.segments]
        for seg, fdef in zip(self.segments, seg_defs):
            seg.source = unparse(fdef)
        for seg, f in zip(self.segments, _make_functions(seg_defs, wrapped.inner, {})):
            seg.eager_call = f if not method else types.MethodType(f, owner)
        injected = {s.name: seg for s, seg in zip(rw.segments, self.segments)} | self.subprograms | self.dispatchers
        host = _make_functions([rw.host], wrapped.inner, injected, host=True)[0]
        host = _rewrap(host, wrapped, owner, name)
        self.call = types.MethodType(host, owner) if method else host
        if rw.eager:
            self.warning = f"fxcc DyCL: {rw.source.qualname}: " + "; ".join(rw.eager)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def all_programs(self, seen: set[int] | None = None) -> list[Program]:
        seen = set() if seen is None else seen
        if id(self) in seen:
            return []
        seen.add(id(self))
        subs = [*self.subprograms.values(), *[p for d in self.dispatchers.values() for p in d.programs.values()]]
        return [self] + [p for sub in subs for p in sub.all_programs(seen)]


_WARNED_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StandIn:
    """What a decorator's wrapper calls instead of the function it wraps: that function's program (or the
    next wrapper in). Attribute reads reach the original (`func.__name__`, `func.__code__`), so the wrapper's
    own code runs exactly as written. With `owner` a module, a call while forward hooks are registered in it
    runs the original (transformers' output-capturing wrappers install theirs on the first call that asks
    for hidden states or attentions, just before they call the function they wrap): a compiled segment
    would not run them."""

    def __init__(self, call: Any, original: Any, owner: Any = None, name: str = ""):
        self.call, self.__wrapped__, self.name = call, original, name
        self.owner = owner if isinstance(owner, nn.Module) else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner is not None and _hooked_anywhere(self.owner):
            warned = _WARNED_HOOKED.setdefault(self.owner, set())
            if self.name not in warned:  # once per module and function, over the programs rebuilt for it
                warned.add(self.name)
                warnings.warn(f"fxcc DyCL: {self.name} runs eagerly, as written, while forward hooks are registered "
                              "on its modules (compiled segments would not run them)", stacklevel=3)
            return self.__wrapped__(*args, **kwargs)
        return self.call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)


def _hooked_anywhere(module: nn.Module) -> bool:
    """Whether a forward hook would run in a call of `module`: a global one or one of any submodule."""
    mm = nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks) or \
        any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _rewrap(call: Any, wrapped: Wrapping, owner: Any, name: str) -> Any:
    """`call`, the program of `wrapped.inner`, inside copies of the decorators' wrappers (innermost first): each
    copy is the wrapper's own code, globals, defaults and closure, with the cells that held the function it
    wraps holding a stand-in for the program instead."""
    original = wrapped.inner
    for i, (layer, cells) in enumerate(reversed(wrapped.layers)):
        stand_in = _StandIn(call, original, owner if i == 0 else None, name)
        closure = tuple(types.CellType(stand_in) if j in cells else c for j, c in enumerate(layer.__closure__))
        copy = types.FunctionType(layer.__code__, layer.__globals__, layer.__name__, layer.__defaults__, closure)
        copy.__kwdefaults__ = layer.__kwdefaults__
        copy.__dict__.update(layer.__dict__)
        copy.__qualname__, copy.__wrapped__ = layer.__qualname__, stand_in
        call, original = copy, layer
    return call


def _program_for(obj: Any, options: Any, cache: dict, callees: Callees) -> Program:
    """The program of a module's forward, a bound method or a function (one per object and function)."""
    owner, fn, method = target_function(obj)
    prog = cache.get((id(owner), fn))
    if prog is None:
        name = f"{type(owner).__name__}.{fn.__name__}" if method else fn.__qualname__
        prog = Program(owner, fn, name, options, cache, callees, method=method)
    return prog


class Dispatch:
    """A call whose callee is chosen at run time (`blk(h)` in a loop over a module list): the callee's
    program when it has one, else the callee itself."""

    def __init__(self, programs: dict[int, Program]):
        self.programs = programs

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        prog = self.programs.get(id(obj))
        return prog.call(*args, **kwargs) if prog is not None else obj(*args, **kwargs)


def _make_functions(defs: list[ast.FunctionDef], fn: Any, injected: dict[str, Any],
                    host: bool = False) -> list[types.FunctionType]:
    """Define the generated functions in `fn`'s globals (so `global` works), sharing `fn`'s closure cells
    (closures see later rebindings, `nonlocal` writes reach them) and closing over `injected`: segments,
    programs. The host gets `fn`'s own default values (the same objects, as eager has them)."""
    code = fn.__code__
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    params = list(injected) + [n for n in code.co_freevars if n not in injected]
    maker = ast.FunctionDef("_dycl_make", ast.arguments([], [ast.arg(p) for p in params], None, [], [], None, []),
                            [*defs, ast.Return(ast.Tuple([ast.Name(d.name, ast.Load()) for d in defs], ast.Load()))],
                            [], None, lineno=1)
    if "type_params" in ast.FunctionDef._fields:
        maker.type_params = []
    text = ast.unparse(ast.Module([maker], []))
    filename = f"<fxcc-dycl-{hashlib.sha1(text.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)  # tracebacks show the lines
    scope: dict[str, Any] = {}
    exec(compile(text, filename, "exec"), fn.__globals__, scope)  # noqa: S102 - our own generated code
    out = []
    for f in scope["_dycl_make"](*[None] * len(params)):
        closure = tuple(cells[n] if n in cells else types.CellType(injected[n]) for n in f.__code__.co_freevars)
        g = types.FunctionType(f.__code__, fn.__globals__, f.__name__, fn.__defaults__ if host else None,
                               closure or None)
        if host:
            g.__kwdefaults__ = fn.__kwdefaults__
        out.append(g)
    return out


@dataclass
class DyclVariant(Variant):
    """A compiled signature of a dynamic module: calls run the generated host program."""

    program: Program | None = None
    in_spec: Any = None
    reason: str = ""
    host_cache_key: str | None = None
    eager_notes: list[str] = field(default_factory=list)
    effect: str | None = None  # the Python effect it was made a host program for (fxcc.dycl.python_effect)
    parts_checked: bool = False  # under check_eager="always": its segments are checked, not its calls whole

    def check_applies(self, exact: bool) -> str | None:
        """A host program is checked against eager as a whole where its Python has no effect that would happen
        twice (a forward split for its tensor-dependent control flow); else its segments are (`checking_parts`)."""
        why = applies_to_program(exact, self.effect)
        self.parts_checked = why is not None and why == applies_to_program(True, self.effect) and bool(self.effect)
        return f"{why}; each compiled segment call is checked against its plain Python instead" \
            if self.parts_checked else why

    def recording(self) -> Any:
        """While a checked call runs, every segment call of the program is kept (`SegmentCall`), to locate a
        difference."""
        return self._segments_as(_Recording, [])

    def checking_parts(self) -> Any:
        """While a call that cannot be checked as a whole runs, each compiled segment call is checked against
        its plain Python (`_Checking`); the context gives the `SegmentChecks`."""
        return self._segments_as(_Checking, SegmentChecks()) if self.parts_checked else contextlib.nullcontext()

    @contextlib.contextmanager
    def _segments_as(self, cls: type, record: Any) -> Any:
        """The program's segments take class `cls`, sharing `record`, for the time of one call (no cost to other
        calls)."""
        segments = [seg for p in self.program.all_programs() for seg in p.segments]
        for seg in segments:
            seg.__class__, seg.record = cls, record
        try:
            yield record
        finally:
            for seg in segments:
                seg.__class__ = Segment
                del seg.record

    def localize(self, flat: list[Any], recorded: Any, want: Any) -> str:
        return localize_segments(recorded)

    @property
    def writes_back(self) -> bool:
        """The host program runs on the caller's own arguments (fxcc.runtime passes them): what its Python does
        to them (an attribute rebound on a state object, an item appended to a list) reaches the caller's
        objects, as in eager. Rebuilt from the flat leaves they would be copies, left as they were."""
        return True

    def run(self, flat: list[Any], args: tuple | None = None, kwargs: dict | None = None,
            places: list | None = None) -> Any:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._call(flat, args, kwargs)
        return self._call(flat, args, kwargs)

    def _call(self, flat: list[Any], args: tuple | None, kwargs: dict | None) -> Any:
        if args is None:  # a caller holding only the flat inputs (copies of the objects, rebuilt)
            args, kwargs = pytree.tree_unflatten(flat, self.in_spec)
        with COMPILE_LOCK:  # plain Python over the module: not while another thread captures (fxcc.runtime)
            return self.program.call(*args, **(kwargs or {}))

    def report(self, name: str, *, ir_after_each: bool = False) -> str:
        """What `fxcc explain` prints: the host program(s), then every segment's source, IR and placement."""
        out = [f"== {name}: DyCL host program + compiled segments ({self.reason})",
               f"compile time {self.compile_seconds:.2f} s (segments compile at their first call)"]
        if self.host_cache_key:
            out.append(f"host program stored in the artifact cache: {self.host_cache_key}")
        for prog in self.program.all_programs():
            if prog.rw is None:
                out.append(f"\n== {prog.name} runs eagerly, as written: {prog.eager_reason}")
                continue
            src = prog.rw.source
            out.append(f"\n== host program for {prog.name} (generated from {src.filename}:{src.first_line})")
            out.append(prog.host_source.rstrip())
            for seg in prog.segments:
                out.append(f"\n== segment {seg.name} ({seg.spec.where}): inputs ({', '.join(seg.spec.inputs)}) "
                           f"-> outputs ({', '.join(seg.spec.outputs)})")
                out.append(seg.source.rstrip())
                if not seg.runs:
                    out.append("  (not called yet: compiled at its first call)")
                if seg.stats.compiles:
                    out.append(f"  compiles: {seg.stats.compiles}")
                    out += [f"    {i}. {reason}" for i, reason in enumerate(seg.stats.reasons, 1)]
                for run in seg.runs.values():
                    served = sum(r is run for r in seg.served.values())
                    if run.variant is None:
                        serves = f"; it serves {served} other signatures of other sizes" if served else ""
                        out.append(f"  [{run.signature}] eager: {run.eager}{serves}")
                        continue
                    kernels = sum(1 for n in run.variant.gm.graph.nodes if n.op == "call_function"
                                  and str(n.target).startswith("fxcc_kernel"))
                    timing = f"; {run.timing}" if run.timing else ""
                    serves = f"; it serves {served} other signatures by its symbolic sizes" if served else ""
                    if run.eager:
                        out.append(f"  [{run.signature}] compiled, but runs as {run.eager}{serves}")
                    else:
                        out.append(f"  [{run.signature}] compiled: {kernels} kernel calls{timing}{serves}")
                    text = explain_variant(seg.name, run.variant, ir_after_each=ir_after_each)
                    out.append("    " + text.replace("\n", "\n    "))
        notes = [f"{p.name}: {n}" for p in self.program.all_programs() for n in (p.rw.eager if p.rw else [])]
        out.append("\n== statements that run eagerly" + ("" if notes else ": none"))
        out += [f"  {n}" for n in notes]
        return "\n".join(out)


@dataclass
class SegmentCall:
    """One segment call of a checked program call: copies of its inputs, what it returned and copies of that
    as it returned it."""

    segment: Segment
    key: Any
    args: tuple
    outs: Any
    returned: Any


class _Recording(Segment):
    """A segment while its program's call is checked against eager: each call is kept in `record`."""

    record: list[SegmentCall]

    def __call__(self, *args: Any) -> Any:
        try:
            key = _key(args, exact=False)
        except Unguarded:
            key = "unguarded"
        before = _clones(args)
        out = Segment.__call__(self, *args)
        self.record.append(SegmentCall(self, key, before, out, _clones(out)))
        return out


@dataclass
class SegmentChecks:
    """The segment calls `_Checking` compared with their plain Python during one call, and those that differed."""

    calls: int = 0
    events: list[str] = field(default_factory=list)


class _Checking(Segment):
    """A segment of a program whose call cannot be checked against eager as a whole (its Python has effects),
    under check_eager="always": each compiled call is compared with its plain Python on copies of its inputs
    (RNG state as for the first-call check); one that differs returns plain Python's result (its inputs left
    as plain Python left them), and its signature runs as plain Python from then on."""

    record: SegmentChecks

    def __call__(self, *args: Any) -> Any:
        try:
            key = _key(args, exact=False)
        except Unguarded:
            key = None
        if key is not None and key not in self.by_key:  # a signature a symbolic variant serves is checked too
            with COMPILE_LOCK:
                self._served(args, key)
        call = self.by_key.get(key) if key is not None else None
        run = self.run_of(key)
        if call is None or call is self.eager_call or run is None or run.variant is None:
            return Segment.__call__(self, *args)  # plain Python, or a first call (checked as it is built)
        self.record.calls += 1
        pre, copies = _clones(args), _clones(args)
        start = rng.State()
        with torch.no_grad():
            want = self.eager_call(*copies)
        after = rng.State()
        start.restore()
        got = call(*args)
        c = compare(got, want, tol=tolerance)
        if c.equal:
            return got
        after.restore()
        v = run.variant
        try:
            inner = localize_graph(v.gm, v.executable, v.bound, v.kernels,
                                   flatten_inputs(tuple(a for a in pre if not _baked(a)), {})[0])
        except Exception as e:  # noqa: BLE001 - the segment is named whether or not a kernel can be
            inner = f"no kernel located ({type(e).__name__})"
        where = c.detail or f"{c.worst} differs by {c.max_rel:.3g} of its scale"
        kernels = ", ".join(f"{k} {b.kind} {b.backend}" for k, b in v.kernels.items()) or "none"
        self.record.events.append(f"segment {self.name} ({self.spec.where}) [{run.signature}] differs from its plain "
                                  f"Python ({where}); its kernels: {kernels}; {inner}")
        self.by_key = {k: self.eager_call if c is call else c for k, c in self.by_key.items()}  # exact keys too
        run.call, run.eager = self.eager_call, f"plain Python: a call differed ({where}; check_eager='always')"
        return take_eagers(args, {}, copies, {}, want)


def localize_segments(record: list[SegmentCall]) -> str:
    """Where a DyCL program's call first departs from eager: the first compiled segment call whose result
    differs from its plain Python on the inputs it saw (with the first kernel inside that differs, from
    fxcc.eager_check.localize_graph); else the first segment output written after it was returned; else the
    host program's own Python."""
    compiled = 0
    for i, c in enumerate(record, 1):
        seg, run = c.segment, c.segment.run_of(c.key)
        call = seg.by_key.get(c.key)
        if run is None or run.variant is None or call is None or call is seg.eager_call:
            continue
        compiled += 1
        with rng.preserved(c.args), torch.no_grad():
            want = seg.eager_call(*_clones(c.args))
        with rng.preserved(c.args), torch.no_grad():
            got = call(*_clones(c.args))
        cmp = compare(got, want, tol=tolerance)
        if cmp.equal:
            continue
        v = run.variant
        kernels = ", ".join(f"{k} {b.kind} {b.backend}" for k, b in v.kernels.items()) or "none"
        values = tuple(a for a in c.args if not _baked(a))
        try:
            inner = localize_graph(v.gm, v.executable, v.bound, v.kernels, flatten_inputs(_clones(values), {})[0])
        except Exception as e:  # noqa: BLE001 - the segment is named whether or not a kernel can be
            inner = f"no kernel located ({type(e).__name__})"
        where = cmp.detail or f"{cmp.worst} differs by {cmp.max_rel:.3g} of its scale"
        return (f"segment {seg.name} ({seg.spec.where}) [{run.signature}], segment call {i} of {len(record)}, differs "
                f"from its plain Python on the inputs it saw ({where}); its kernels: {kernels}; {inner}")
    for i, c in enumerate(record, 1):
        cmp = compare(c.outs, c.returned, tol=0.0)
        if not cmp.equal:
            return (f"each compiled segment agrees with its plain Python on the inputs it saw, but the output "
                    f"{cmp.worst} of segment {c.segment.name} ({c.segment.spec.where}), call {i} of {len(record)}, "
                    "changed after it was returned (a later write into it: a reused output buffer, or the host "
                    "program's own in-place update)")
    return (f"each of the {compiled} compiled segment calls agrees with its plain Python on the inputs it saw, and "
            "no segment output changed after it was returned: the difference is in the host program or the "
            "statements that run as plain Python")


def _static_names(fn: Any, method: bool, args: tuple, kwargs: dict) -> set[str]:
    """Parameters bound to plain Python values in this call: conditions on them are decided at capture."""
    try:
        bound = inspect.signature(fn).bind(*((None,) if method else ()), *args, **kwargs)
    except (TypeError, ValueError):
        return set()
    return {k for k, v in bound.arguments.items()
            if isinstance(v, (bool, int, float, str, type(None))) and not (method and k == next(iter(bound.arguments)))}


def _entry(module: nn.Module) -> tuple[Any, Any, bool]:
    """(owner, function, is_method) of what a CompiledModule runs: a module's forward, a bound method, a
    function."""
    inner = getattr(module, "fn", None) if type(module).__name__ == "FunctionModule" else None
    if inner is None:
        fn = type(module).forward
        if hasattr(fn, "fxcc") and hasattr(fn, "__wrapped__"):  # `@fxcc.compile` on forward in the class body
            fn = fn.__wrapped__
        return module, fn, True
    if inspect.ismethod(inner) and isinstance(inner.__func__, types.FunctionType):
        return inner.__self__, inner.__func__, True  # a bound method: its object is `self`
    return None, inner, False


def python_effect(module: nn.Module, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """A Python effect of the module's forward, or of a function it calls, that a traced graph would apply
    once, at capture (an attribute store, `global`, a list it was given appended to), or, for the call with
    `args` and `kwargs`, would make on capture's copies of a list, dict or set argument and never on the caller's
    (`extras["hidden"] = h`): such a forward runs as a DyCL host program, which does them on every call, on the
    caller's objects. Library code (transformers) is not scanned: fxcc's runtime keeps the state it changes
    (caches), as for a forward captured whole."""
    owner, fn, method = _entry(module)
    callees, entry = Callees(libraries=False), types.MethodType(fn, owner) if method else fn
    return callees.effect(entry) or callees.argument_effect(entry, args, kwargs or {})


def source_unread(module: nn.Module) -> str | None:
    """Why the source of the module's forward (or compiled function) cannot be read, so `python_effect` saw
    nothing (defined by exec, in `python -c`, in a file edited since); None when it can."""
    _, fn, _ = _entry(module)
    try:
        parse_function(fn, wrapped=True)
    except RewriteError as e:
        return str(e)
    return None


def compile_dynamic(cm: Any, args: tuple, kwargs: dict, error: CaptureError | None,
                    effect: str | None = None) -> DyclVariant:
    """Build a DyCL variant for `cm`'s module after capture failed with `error` (or, with `effect`, for a
    forward with Python effects a trace would not replay).

    Capture failed on tensor-dependent control flow: a host program, or, for what DyCL cannot rewrite, the
    function run as it is, with one warning per function. Any other capture failure: `error` is raised
    again unless DyCL finds tensor-dependent control flow to split at."""
    if not getattr(cm.options, "dycl", True):
        raise error
    t0 = time.perf_counter()
    owner, fn, method = _entry(cm.module)
    data_dependent = error is None or "control flow depends on tensor values" in str(error)
    reason = f"{effect}, which a traced graph would do only once" if error is None else \
        f"capture failed: {str(error).splitlines()[0]}"
    programs = cm.__dict__.setdefault("_dycl_programs", {})
    if cm._params and not cm._params_unchanged():  # segments bind parameters: changed ones need new programs
        programs.clear()
    program = programs.get((id(owner), fn))
    if program is None:
        name = cm.name if method else getattr(fn, "__qualname__", "fn")
        static = _static_names(fn, method, args, kwargs)
        hooks = method and isinstance(owner, nn.Module) and bool(owner._forward_hooks or owner._forward_pre_hooks)
        program = Program(owner, fn, name, cm.options, programs, Callees(), static, method,
                          eager=(cm._eager_call, "it has forward hooks") if hooks else None)
        if not data_dependent and (program.rw is None or not any(p.rw and p.rw.splits
                                                                 for p in program.all_programs())):
            programs.clear()
            if program.rw is None:
                raise CaptureError(f"{error}\n  DyCL could not rewrite it either: {program.eager_reason}") from error
            raise error
        for p in program.all_programs():
            if p.warning:
                warnings.warn(p.warning, stacklevel=5)
    # the host program reads the model live; each segment checks the contents its own constants were computed from
    # (Segment._guarded), so a buffer the program writes at every call (a step counter) is no change of the model
    cm._snapshot_params(sources=[])
    in_spec = flatten_inputs(args, kwargs)[1]
    key = _store_host(cm.name, program)
    log.info("%s compiled with DyCL: %d host programs, %d segments", cm.name, len(program.all_programs()),
             sum(len(p.segments) for p in program.all_programs()))
    return DyclVariant(captured=None, gm=None, executable=None, records=[],
                       compile_seconds=time.perf_counter() - t0, name=cm.name, program=program, in_spec=in_spec,
                       reason=reason, host_cache_key=key, effect=effect)


def _store_host(name: str, program: Program) -> str | None:
    """Keep the generated host programs and segment sources with the artifacts (content-addressed)."""
    try:
        files = {}
        for i, prog in enumerate(program.all_programs()):
            files[f"host{i}.py"] = prog.host_source.encode()
            for seg in prog.segments:
                files[f"host{i}_seg{seg.spec.index}.py"] = seg.source.encode()
        digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()
        key = cache_key("dycl-host", source=digest)
        default_cache().put(key, files, {"kind": "dycl-host", "model": name})
        return key
    except Exception as e:  # noqa: BLE001 - storing the program is a convenience; the compile goes on
        log.warning("could not store the DyCL host program of %s in the artifact cache: %s", name, e)
        return None
