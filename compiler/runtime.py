"""CompiledModule: the callable `fxcc.compile` returns.

Guards on the call's structure, tensor shapes/strides/dtypes/devices, the module's training flag and the caller's
autocast and default dtype select a compiled variant or compile a new one; past `max_variants` variants of one
input structure (or that many structures), new signatures run eagerly with a warning. A variant serves one input
layout (strides where sizes exceed 1, not the storage offset; a symbolic one a layout class,
fxcc.dynamic.layout_class): captured on it, its outputs have the strides eager's have. The model's state the
variants depend on (fxcc.guards: its tensors by identity and layout, primitive attributes, the contents of weights
folded into constants) is checked on every call; a change drops the variants and compiles again.

Sizes that change recompile once with those sizes symbolic; a symbolic variant is chosen by its guard on
symbol ranges and relations (fxcc.dynamic), and every compile records why it happened. Objects the call
updates in place (KV caches) end in eager's state (fxcc.state).

A variant's executable is an fx graph whose parameters are bound once, when it is built, and whose
kernels are direct calls. On CUDA, where every value lives on the GPU, the executable is replayed as a
CUDA graph (fxcc.cuda_graphs): a static variant's captured at its first run, a variant whose sizes vary
or whose cache is written in place one graph per input shapes that repeat.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
import sys
import threading
import time
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from fxcc.autotune import pools, vs_eager
from fxcc.autotune.plan import check_call_plan, load_plan
from fxcc.codegen import backend
from fxcc.codegen import tvm as tvm_codegen
from fxcc.codegen.executable import BuiltKernel, build_executable
from torch.utils import _pytree as pytree

from . import dynamic, eager_check, graph_cache, held, hooks, ir, nested_fast_path, rng
from .capture import (
    Captured,
    CaptureError,
    GlobalReads,
    Missing,
    capture,
    check_call,
    describe,
    flatten_inputs,
    forward_as,
    original_forward,
    register_model_pytrees,
)
from .cuda_graphs import CudaGraph, CudaGraphs, copies_outweigh_launches, pays
from .decode_loop import DecodeLoop
from .dialects import KERNEL_OPS, dialect_of, op_name
from .guards import Churn, ModuleState, call_context, graph_sources, mark_code_constants
from .logs import topic_logger
from .measure import pinned, pinned_by
from .module_view import ModuleView
from .options import CompileOptions, settings
from .pipeline import DEFAULT_PIPELINE, PassContext, PassManager, PassRecord, parse_pipeline
from .quality import fit_quality_budget
from .state import Unchanged, holds_size, is_state, unflatten
from .store import default_cache
from .watch import tensor_guards
from .weights import Checkpoint, stand_in

log = logging.getLogger(__name__)
# compiles in one process take turns: torch's fake-tensor capture is not thread-safe, and a second thread that
# finds the variant it needs being compiled waits for it instead of compiling it again (a served model's first
# requests arrive together). Eager runs and DyCL programs (plain Python over the module) take it too: while a
# capture runs, export has the module's parameters swapped for fake tensors. Compiled variants take no lock.
COMPILE_LOCK = threading.RLock()
_MEMO = 4096  # guard keys remembered per compiled module for the symbolic variants that accepted them
recompiles = topic_logger("recompiles")




@dataclass
class Variant:
    """One compiled signature: the IR after all passes, the executable built from it, and the pass log.

    `bound` holds the parameters and constants the executable takes after the call's inputs; `kernels` what
    was built for the kernel ops' choices, by kernel key (the variant's own: no other variant shares it).
    `cuda_graph` is "pending" until the first run decides (capture on CUDA), then a CudaGraph or None.
    """

    captured: Captured
    gm: fx.GraphModule
    executable: fx.GraphModule
    records: list[PassRecord]
    compile_seconds: float
    bound: list[torch.Tensor] = field(default_factory=list)
    cuda_graph: Any = None
    name: str = "model"
    quality_loss: float | None = None  # measured loss of approximate passes under a quality budget
    kernels: dict[str, BuiltKernel] = field(default_factory=dict)
    shapes: dynamic.Shapes | None = None  # symbolic dimensions and their guard (fxcc.dynamic)
    writes_state: bool = False  # the graph writes into the module's buffers (a counter, a cache buffer)
    written: list[torch.Tensor] = field(default_factory=list)  # those buffers
    struct: Any = None  # the input structure it serves (dynamic.structure of its signature)
    reason: str = ""  # why it was compiled
    vs_eager: str | None = None  # the whole-graph timing against eager (fxcc.autotune.vs_eager), when taken
    slower_than_eager: bool = False  # measured so: calls of its signature run eagerly
    graph_key: str | None = None  # its graph-cache key (static variants the graph cache serves)
    unlike_eager: Any = None  # the _Eager its first call's check put in its place: it serves no other sizes either
    no_graph: str | None = None  # on CUDA, why it runs without a CUDA graph (fxcc.runtime.not_graphable)
    calls: int = 0  # calls checked or not, counted under check_eager="always"
    unchecked: str | None = None  # under check_eager="always", why its calls cannot be checked
    # "leaf" / "tuple": its result is its one output / a flat tuple of them; "size": it holds a torch.Size; "": else
    plain_out: str | None = None
    # the flat inputs its graph writes in place: a call where one shares memory with another input runs eagerly
    written_inputs: tuple[int, ...] = ()

    def check_applies(self, exact: bool) -> str | None:
        """Why a call cannot be compared with eager (fxcc.eager_check.applies); None when it can."""
        return eager_check.applies(self.gm, exact)

    def recording(self) -> Any:
        """A context in which a checked call keeps what localizing a difference needs (nothing here: the inputs)."""
        return contextlib.nullcontext()

    def checking_parts(self) -> Any:
        """A context in which a call that cannot be checked as a whole checks its parts (fxcc.dycl: segments); it
        gives what they found (`calls`, `events`), None where there are no parts."""
        return contextlib.nullcontext()

    def localize(self, flat: list[Any], recorded: Any, want: Any) -> str:
        """Where this variant's result on inputs `flat` (copies of a call's) first departs from eager's `want`."""
        return eager_check.localize_graph(self.gm, self.executable, self.bound, self.kernels, flat, want,
                                          self.captured.out_spec)

    @property
    def writes_back(self) -> bool:
        """Whether a call's result needs the caller's arguments: it returns an input or updates a cache."""
        al = self.captured.aliasing if self.captured is not None else None
        return al is not None and bool(al.leaves or al.n_state)

    def run(self, flat: list[Any], args: tuple | None = None, kwargs: dict | None = None,
            places: list | None = None) -> Any:
        """Run on the flattened call; with `args`/`kwargs` (needed when `writes_back`) update the caller's
        objects as eager would (`places`: where, fxcc.state._Plan.write_back)."""
        if self.cuda_graph is not None:
            if self.cuda_graph == "pending":  # a static variant whose inputs are all copied: capture now
                self.cuda_graph = self._capture(flat)
            outs = self.cuda_graph(flat) if self.cuda_graph is not None else None
            if outs is not None:
                return self._result(outs, flat, args, kwargs, places)
        if _grad_enabled():  # as torch.no_grad() does, without its objects (microseconds a call)
            _set_grad_enabled(False)
            try:
                outs = self._call(*flat)
            finally:
                _set_grad_enabled(True)
        else:  # the caller's no_grad: entering it again costs a microsecond per call
            outs = self._call(*flat)
        return self._result(list(outs), flat, args, kwargs, places)

    def _capture(self, flat: list[Any]) -> CudaGraph | None:
        """This static variant's CUDA graph, where it pays for its input copies (its outputs are handed out
        without copies): by estimate first (a large memory-bound graph is not captured), then by timing replay
        against running uncaptured."""
        ops = sum(n.op == "call_function" and op_name(n.target) != "py.getitem" for n in self.executable.graph.nodes)
        why = copies_outweigh_launches(flat, ops)
        graph = CudaGraph.capture(self._call, flat, self.name) if why is None else None
        if graph is not None and pinned_by() is None:  # a plan kept this graph: not timed again
            with torch.no_grad():
                why = pays(graph, flat, lambda: self._call(*flat))
        if why is not None:
            self.no_graph = why
            log.info("%s runs without a CUDA graph: %s", self.name, why)
            return None
        return graph

    def _result(self, outs: list[Any], flat: list[Any], args: tuple | None, kwargs: dict | None,
                places: list | None = None) -> Any:
        if args is None or not self.writes_back:
            plain = self.plain_out if self.plain_out is not None else self.plain()
            if plain == "leaf" and len(outs) == 1:
                return outs[0]
            if plain == "tuple":
                return tuple(outs)
            spec = self.captured.out_spec
            return unflatten(outs, spec) if plain == "size" else pytree.tree_unflatten(outs, spec)
        return self.captured.aliasing.write_back(args, kwargs or {}, flat, outs, self.captured.out_spec, places)

    def plain(self) -> str:
        """`plain_out`, found once: most graphs return a tensor or a flat tuple of them (no pytree walk per call);
        "size" where the output holds a torch.Size (fxcc.state.unflatten)."""
        if self.plain_out is None:
            spec = self.captured.out_spec
            self.plain_out = ("leaf" if spec.is_leaf() else "tuple" if spec.type is tuple and all(
                c.is_leaf() for c in spec.children()) else "size" if holds_size(spec) else "")
        return self.plain_out

    def _call(self, *flat: Any) -> Any:
        return self.executable.forward(*flat, *self.bound)  # the GraphModule's code, without nn.Module's call


@dataclass
class _EagerSide:
    """What a timing against eager runs for eager (`eager`), the untimed work before each call of either side
    (`setup`, fxcc.measure.interleaved), and what gives the call's own inputs their values back (`restore`)."""

    eager: Callable[[], Any]
    setup: dict[str, Callable[[], None]] = field(default_factory=dict)
    restore: Callable[[], None] = lambda: None


def _eager_side(run_eager: Callable[..., Any], args: tuple, kwargs: dict, flat: list[Any],
                device: str) -> _EagerSide | str:
    """The two sides of a timing against eager for this call, or why it cannot be timed. A plain call: eager on the
    call's own inputs. A call that carries a KV cache (eager appends to it; a static cache's prefill writes it in
    place): eager on a fresh copy of the call before each of its calls, and before each compiled call (run on
    the call's own tensors, where a CUDA graph reads them) those tensors given back the values they had."""
    if not dynamic.carries_state(args, kwargs):
        return _EagerSide(lambda: run_eager(*args, **kwargs))
    import copy

    tensors = [x for x in flat if isinstance(x, torch.Tensor) and torch._debug_has_internal_overlap(x) == 0]
    nbytes = sum(x.numel() * x.element_size() for x in tensors)
    if 3 * nbytes > _free_bytes(device) // 4:
        return (f"the call carries a KV cache, and three copies of its {nbytes / 2**20:.0f} MiB of inputs would not "
                f"fit in a quarter of the free {device} memory")
    try:
        pristine = copy.deepcopy((tuple(args), dict(kwargs)))
    except Exception as e:  # an input deepcopy cannot take
        return f"the call carries a KV cache, and its inputs cannot be copied ({type(e).__name__}: {e})"
    saved = [x.clone() for x in tensors]
    box: list[Any] = [pristine]

    def fresh() -> None:
        box[0] = copy.deepcopy(pristine)

    def restore() -> None:
        with torch.no_grad():
            for x, v in zip(tensors, saved):
                x.copy_(v)

    def eager() -> Any:
        a, k = box[0]
        return run_eager(*a, **k)

    return _EagerSide(eager, {"eager": fresh, "compiled": restore}, restore)


def _free_bytes(device: str) -> int:
    """Free memory on `device` (CUDA: the current device's; the CPU: what the OS reports available)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


class BufferState:
    """The buffers of the modules among `objs` as they are now; `restore` writes back those that changed since.
    A compile runs the graph (kernel timings, checks) and a DyCL segment's build runs the segment: a graph that
    writes a buffer (a BatchNorm's running stats in training mode, a counter) would move it at every such run;
    restored, the call's own run is the one write eager makes."""

    def __init__(self, objs: list[Any]):
        seen: dict[int, torch.Tensor] = {}
        for m in objs:
            m = m.__self__ if isinstance(m, types.MethodType) else m
            if isinstance(m, nn.Module):
                seen |= {id(b): b for b in m.buffers() if not b.is_meta}  # meta: no values to move
        self.kept = [(b, b.clone()) for b in seen.values()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, saved in self.kept:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


class FullGraphError(RuntimeError):
    """Under `fullgraph=True` (as torch.compile's): what would otherwise run eagerly, with a warning."""


@dataclass
class _Eager:
    """A signature that runs eagerly: past `max_variants`, or compiled and measured slower than eager (`compiled`,
    kept for fxcc.explain). Calls go to the original module."""

    reason: str
    compiled: Variant | None = None


@dataclass
class CompileStats:
    """Counts of one CompiledModule; `history` has each compile's input types, `reasons` why it compiled."""

    compiles: int = 0
    eager_calls: int = 0
    checked_calls: int = 0  # calls compared with eager under check_eager="always"
    checked_parts: int = 0  # under "always", parts (DyCL segment calls) of calls not checkable whole, compared
    param_recompiles: int = 0
    history: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):  # strides: a variant's outputs have the strides eager's have for its inputs'
        return (tuple(x.shape), x.dtype, x.device, x.layout, dynamic.strides(x))
    try:
        hash(x)
        return ("const", type(x), x)
    except TypeError:
        return ("object", type(x), id(x))


def _compiled_again(module: nn.Module, options: CompileOptions, method: str | None) -> CompiledModule:
    """A copied or unpickled CompiledModule (CompiledModule.__reduce_ex__): `module`, or its method, compiled anew."""
    bound = getattr(type(module), method).__get__(module) if method else None
    return CompiledModule(module, options, method=bound)


def _fast_key(args: tuple, training: bool) -> tuple | None:
    """The guard key of a call whose arguments are all plain tensors (None for any other call). Strides as they
    are (one C call); a miss finds the variant by the full guard, which ignores the strides of size-1 dims."""
    if not all(type(a) is torch.Tensor for a in args):
        return None
    return (training, call_context(), *[(a.shape, a.stride(), a.dtype, a.device, a.layout) for a in args])


def _wants_grads(args: tuple, kwargs: dict) -> bool:
    """Whether an argument (positional or keyword, not inside containers) is a tensor that requires gradients (an
    nn.Parameter too: torch.compile hands a training module's parameters to its backend as arguments)."""
    for a in args:  # a loop, not any() over a generator: on every call with gradients enabled
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return bool(kwargs) and any(isinstance(v, torch.Tensor) and v.requires_grad for v in kwargs.values())


class _Hot:
    """A plain-tensor call signature served compiled, checked in one pass of torch's C++ tensor guard over the
    arguments and the model's tensors (type, dispatch keys, dtype, device, sizes, strides: stricter than
    `_fast_key` and `Layouts.same` together, which it stands for; a miss takes the path with both). It saves
    3-8 us a call on the small breadth networks (densenet_transition's call 34 against 37 us, medians of 3000
    calls of one compiled module with it and without, in rotating order).

    What a call of it runs is decided here, once, so the call reaches it without the layers between: `call`, the
    eager callable of a signature that runs eagerly; `direct`, the executable of a variant whose run is that alone
    (its graph's code, the weights bound after the arguments: all `CompiledModule._run` would do)."""

    __slots__ = ("guard", "n", "state", "tensors", "training", "context", "plain", "dtype", "variant", "eager",
                 "call", "direct", "bound", "leaf")

    def __init__(self, guard: Any, n: int, state: ModuleState | None, training: bool,
                 variant: Variant | _Eager, call: Callable[..., Any] | None = None) -> None:
        self.guard, self.n, self.state = guard, n, state
        self.tensors = state.layouts.tensors if state is not None else ()
        self.training, self.context, self.variant = training, call_context(), variant
        # no autocast (the common case): the context holds while none is on and the default dtype is this one
        self.plain, self.dtype = not self.context[0], self.context[1]
        self.eager = state is None
        self.call, self.direct, self.bound, self.leaf = call, None, (), False

    def context_holds(self) -> bool:
        """The caller's autocast and default dtype are those the signature was served under (`call_context`);
        where that is no autocast (`plain`), the call checks that itself, without building the context."""
        return call_context() == self.context

    @staticmethod
    def of(variant: Variant | _Eager, args: tuple, state: ModuleState, training: bool, direct: bool) -> _Hot | None:
        """`direct`: the module runs variants by `CompiledModule._run` itself (no plan, no check of each call)."""
        if not isinstance(variant, Variant):
            return None
        guard = tensor_guards([*args, *state.layouts.tensors])
        if guard is None:
            return None
        hot = _Hot(guard, len(args), state, training, variant)
        # a variant whose run is its executable alone: no CUDA graph, nothing written back, into the module's
        # state or into an input (`_run` checks that it shares no memory with another), a graph (not a DyCL program),
        # its result one tensor or a flat tuple
        if (direct and type(variant) is Variant and variant.cuda_graph is None and not variant.writes_state
                and not variant.writes_back and not variant.written_inputs and variant.executable is not None
                and variant.plain() in ("leaf", "tuple")):
            hot.direct, hot.bound, hot.leaf = variant.executable.forward, tuple(variant.bound), variant.plain() == "leaf"
        return hot

    @staticmethod
    def eager_of(variant: _Eager, args: tuple, training: bool, call: Callable[..., Any] | None) -> _Hot | None:
        """A plain-tensor signature that runs eagerly: its arguments checked in one C++ pass, the model's state
        not at all (eager reads it live); `call` what runs it (None: `CompiledModule._eager` decides at each call)."""
        guard = tensor_guards(list(args))
        if (isinstance(call, nn.Module) and type(call).__call__ is nn.Module.__call__ and not hooks.any_on(call)
                and getattr(call, "_compiled_call_impl", None) is None):  # nn.Module.__call__ would call forward alone
            call = type(call).forward.__get__(call)
        return _Hot(guard, len(args), None, training, variant, call) if guard is not None else None


_any_autocast, _default_dtype = torch._C._is_any_autocast_enabled, torch.get_default_dtype
_refcount = sys.getrefcount
_is_compiling, _grad_enabled, _EPOCH = torch.compiler.is_compiling, torch.is_grad_enabled, hooks.EPOCH
_set_grad_enabled = torch._C._set_grad_enabled


_HOT_MISSES = 16  # calls of other signatures before the hot one is given up
_PLAIN = (bool, int, float, str)
_MAX_CALLS = 64  # call shapes remembered by the keyword fast path
_ANY_FLOAT = (float, "any value")  # a float argument in a call key, whatever its value
_MAX_MISSES = 2  # times a call shape's state objects may change before it is no longer remembered


def _call_key(args: tuple, kwargs: dict, training: bool, floats: bool = True) -> tuple | None:
    """The guard key of a call whose arguments are tensors, plain values, None and state objects (a KV cache,
    by identity; `_Call.holds` checks what it holds): the keyword-call fast path's key (None for other calls).
    With `floats` False, float arguments count by type alone: the key of calls a variant symbolic in each of them
    serves whatever their values (a temperature that changes every call)."""
    parts: list[Any] = [training, call_context(), len(args), tuple(kwargs)]
    for a in (*args, *kwargs.values()):
        t = type(a)
        if t is torch.Tensor:
            parts.append((a.shape, a.stride(), a.dtype, a.device, a.layout))
        elif t is float and not floats:
            parts.append(_ANY_FLOAT)
        elif a is None or t in _PLAIN:
            parts.append((t, a))
        elif is_state(a):
            parts.append(("state", id(a)))
        else:
            return None
    return tuple(parts)


_FRESH_TRIES = 16  # net misses of the new-state-object path before it is no longer tried


def _fresh_key(ckey: tuple, args: tuple, kwargs: dict) -> tuple[tuple, list[Any], tuple] | None:
    """For a call whose `_call_key` is `ckey`: the same key with each state object's identity replaced by its
    structure (its class, its pytree context and the guard's key of each of its leaves), the call's flat
    inputs in `flatten_inputs` order, and the identities of the state objects and their leaves; None where a
    state object does not flatten into tensors and plain values under a hashable context. Two calls with equal
    keys have equal full guard keys: a new KV cache of a structure served before (transformers' generate makes
    one per call) is served without the full guard."""
    parts, leaves_of = list(ckey), {}
    for i, a in enumerate((*args, *kwargs.values()), start=4):  # 4: _call_key's parts before the arguments'
        if is_state(a):
            leaves, context = pytree.SUPPORTED_NODES[type(a)].flatten_fn(a)
            if not all(type(x) is torch.Tensor or type(x) in _PLAIN for x in leaves):
                return None
            parts[i] = ("state", type(a), context, tuple(_leaf_key(x) for x in leaves))
            leaves_of[id(a)] = leaves
    try:
        hash(tuple(parts))
    except TypeError:  # a context holding what cannot be hashed
        return None
    flat: list[Any] = []
    for a in (*args, *(kwargs[n] for n in sorted(kwargs))):
        if id(a) in leaves_of:
            flat.extend(leaves_of[id(a)])
        else:  # None too: a leaf of flatten_inputs
            flat.append(a)
    return tuple(parts), flat, tuple((k, *map(id, leaves)) for k, leaves in leaves_of.items())


class _Calls(dict):
    """Call shapes -> _Call; referable weakly, so a state object's finalizer drops its entry without keeping the
    entries (their variants, hence the model's weights) alive after the compiled module is gone."""


def _forget(calls: weakref.ref, key: tuple) -> None:
    d = calls()
    if d is not None:
        d.pop(key, None)


@dataclass
class _Call:
    """What the full guard found for a call's shape (`_call_key`): its variant, and each state argument's
    snapshot. While every state object holds what it held, the call flattens as that one did: `flat` puts the
    new tensors and the state objects' leaves in the order of `flatten_inputs`."""

    variant: Variant
    names: list[str]  # keyword names, sorted as flatten_inputs sorts them
    states: dict[int, Unchanged]  # id of a state argument -> its snapshot
    places: list = field(default_factory=list)  # where the write-back puts each leaf (fxcc.state._Plan.write_back)

    @staticmethod
    def of(variant: Variant, args: tuple, kwargs: dict, forget: Callable[[], Any]) -> _Call | None:
        """The entry for this call, or None; `forget` drops it once a state object it holds is gone (it holds
        that object's containers, hence its tensors: a KV cache the caller dropped is not kept alive)."""
        objs = [a for a in (*args, *kwargs.values()) if is_state(a)]
        states = {id(a): Unchanged(a) for a in objs}
        if len(states) != len(objs) or not all(u.ok for u in states.values()):
            return None
        for a in objs:
            weakref.finalize(a, forget)
        return _Call(variant, sorted(kwargs), states)

    def holds(self, args: tuple, kwargs: dict) -> bool:
        return all(u.holds(a) for a in (*args, *kwargs.values()) if (u := self.states.get(id(a))) is not None)

    def flat(self, args: tuple, kwargs: dict) -> list[Any]:
        flat: list[Any] = []
        for a in (*args, *(kwargs[n] for n in self.names)):  # None is a leaf of flatten_inputs: kept, in its place
            u = self.states.get(id(a)) if not isinstance(a, (torch.Tensor, *_PLAIN)) else None
            if u is not None:
                flat.extend(u.leaves)
            else:
                flat.append(a)
        return flat


# Device types on which `CompiledModule.generate` reads the stop flag one step late (transformers' DeferredStopCheck):
# the host queues step n+1 while the device runs step n instead of waiting at every token; transformers itself
# defers on "mps" only. Same tokens: the one extra step it may run past a finished batch is undone by transformers.
DEFERRED_STOP_DEVICES = ("cuda",)
_DEFERRED_LOCK = threading.Lock()
_deferred_users = 0


@contextlib.contextmanager
def deferred_stop_check(device_types: tuple[str, ...]) -> Iterator[None]:
    """Within the block, transformers' generate defers its stop check (`DeferredStopCheck`) on `device_types` too,
    under the conditions it applies on "mps" (no assistant model; a cache returned to the caller must be
    croppable, so the extra step can be taken back). Without that class (another transformers), nothing changes."""
    global _deferred_users
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        yield
        return
    own = DeferredStopCheck.__dict__.get("is_supported")
    if not isinstance(own, staticmethod):
        yield
        return
    with _DEFERRED_LOCK:
        _deferred_users += 1
        if _deferred_users == 1:
            def is_supported(device: torch.device, *rest: Any, **kw: Any) -> bool:
                if device.type in device_types:
                    device = torch.device("mps")  # its conditions, as for the device it was written for
                return own.__func__(device, *rest, **kw)

            is_supported.fxcc_original = own
            DeferredStopCheck.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        with _DEFERRED_LOCK:
            _deferred_users -= 1
            if _deferred_users == 0:
                DeferredStopCheck.is_supported = own


def _scalars(flat: list[Any]) -> frozenset[int]:
    """The flat inputs that are Python ints and floats."""
    return frozenset(i for i, x in enumerate(flat) if type(x) in (int, float))


def _sized_in(struct: tuple | None) -> frozenset[int]:
    """The flat inputs a variant's structure (`CompiledModule._structure`) holds by type: its size ints and floats."""
    return frozenset(i for i, e in enumerate(struct[1]) if e in (("int",), ("float",))) if struct else frozenset()


class CompiledModule(ModuleView):
    """Callable with the original calling convention, backed by compiled variants chosen by guards; an
    nn.Module whose parameters, state and training flag are the original module's (fxcc.module_view)."""

    def __init__(self, module: nn.Module, options: CompileOptions, eager_call: Callable | None = None,
                 method: Callable | None = None, checkpoint: Checkpoint | None = None):
        super().__init__(module)
        self._held: held.Held | None = None  # the weights held as their packed copies alone
        self._hold_below = sys.maxsize  # the model's reference count under which `_hold_once` looks again
        # weights loaded by the compile (fxcc.weights): the model stays on the meta device, so there is no eager
        # model to fall back on, check the first call against or time against: what cannot compile is an error
        self.checkpoint = checkpoint
        if checkpoint is not None:
            checkpoint.check(module, describe(module))
            options = options.replace(fullgraph=True, check_eager=False, time_vs_eager=False, graph_cache=False)
        self.options = options
        self.method = method  # a bound method of `module` compiled instead of its forward
        self.name = describe(module) + (f".{method.__name__}" if method is not None else "")
        self._eager_call = eager_call or method or module
        self._variants: dict[Any, Variant | _Eager] = {}
        self._compiled: list[Variant] = []  # every compiled variant, oldest first
        # variants measured slower than eager: their shape class runs eagerly, compiled no more
        self._slower: list[_Eager] = []
        self._attempts: list[Variant] = []  # every variant compiled, kept or measured slower, oldest first
        self._memo: dict[Any, Variant | _Eager] = {}  # guard key -> the symbolic variant whose guard accepted it
        self._sized: dict[Any, frozenset[int]] = {}  # input spec -> its ints that are sizes (_sizes_of)
        self._static_ints: dict[Any, dict[int, str]] = {}  # input spec -> int arguments kept constants, and why
        self._fast: dict[tuple, Variant | _Eager] = {}  # _fast_key -> variant, for calls with plain tensor arguments
        self._hot: _Hot | None = None  # the plain-tensor signature served last, checked in one C++ pass
        self._hot_misses = 0
        # nn.TransformerEncoders and encoder layers whose eager fast path hangs on the caller's grad mode
        # (fxcc.nested_fast_path)
        self._fast_paths = nested_fast_path.fast_paths(module)
        self._calls: _Calls = _Calls()  # _call_key -> what the guard found (None: not kept)
        self._call_misses: dict[tuple, int] = {}  # _call_key -> times its state objects had changed
        self._fresh: dict[tuple, Variant | _Eager] = {}  # _fresh_key -> what the guard found (new state objects)
        self._fresh_misses = 0  # net misses of _fresh: past _FRESH_TRIES the structural path is not tried
        self._fresh_last: tuple | None = None  # the last call _fresh served: its call key, its state objects' ids
        self._symbolic_floats = False  # some call key in _calls takes its float arguments whatever their values
        self._params: ModuleState | None = None  # the model's state the variants depend on (fxcc.guards)
        self._sources: dict[int, torch.Tensor] | None = {}  # tensors folded into the variants' constants (None: all)
        self._live: dict[int, torch.Tensor] = {}  # tensors CUDA graphs of the variants read where they were captured
        self._missing: Missing | None = {}  # names the variants' traced code looked up and did not find (None: unknown)
        self._globals: GlobalReads = {}  # the Python globals the variants' traced code read (fxcc.capture.global_reads)
        self._written: dict[int, torch.Tensor] | None = None  # the tensors every variant's graph writes (None: no graph)
        self._dropped = ""  # why the variants were dropped: the next compile's reason
        self._churn = Churn()  # state changes found soon after compiles, in a row (fxcc.guards.Churn)
        self._churned: str | None = None  # why every signature runs eagerly: its state changes at every call
        self.stats = CompileStats()
        hooks.watch_registrations()  # a forward hook added or removed later is seen (fxcc.hooks)
        self._hooks: tuple | None = None  # the forward hooks when the variants compiled (fxcc.hooks.fingerprint)
        self._hook_epoch = _EPOCH[0]
        self.unlike_eager: list[str] = []  # calls check_eager="always" found to differ from eager, and where
        self.capturing = False  # True while capture traces the module (a compiled class calls its original)
        self.dims_hint: dict[int, set[int]] = {}  # flat input -> dimensions (a scalar: {0}) symbolic from the start
        self.echo_ir = True  # print_ir_after prints to stdout; fxcc.explain only records the IR for its report
        # generate's own decode loop where the call allows it (fxcc.decode_loop), its step compiled with these options
        self.decode_loop = DecodeLoop(module, lambda step: CompiledModule(step, self.options))
        # errors surface at compile(); only None means the default ("" is an empty, malformed pipeline)
        self._passes = parse_pipeline(DEFAULT_PIPELINE if options.passes is None else options.passes)
        try:
            self.__signature__ = inspect.signature(method or getattr(module, "fn", None) or original_forward(module))
        except (TypeError, ValueError):
            pass
        register_model_pytrees(module)  # KV caches flatten the same way at the first call's guard and later

    # ------------------------------------------------- behaving like the module it compiles

    def __getattr__(self, name: str) -> Any:
        """Attributes come from the original module; its methods that return it return this instead. While weights
        are held once (`module` out of the dict), `module` and every attribute give the model with its weights back."""
        module = self.__dict__.get("module")
        if module is None and self.__dict__.get("_held") is not None and not name.startswith("__"):
            module = self._whole()
        if module is None or name.startswith("__"):
            raise AttributeError(name)
        if name == "module":
            return module
        attr = getattr(module, name)
        if inspect.ismethod(attr) and attr.__self__ is module:
            @functools.wraps(attr)
            def method(*args, **kwargs):
                out = attr(*args, **kwargs)
                return self if out is module else out
            return method
        return attr

    def __repr__(self) -> str:
        return f"fxcc.CompiledModule({self._model!r})"

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Copied or pickled (copy.deepcopy, pickle, torch.save): the uncompiled module and the options, as a
        torch.compile'd module is; the copy compiles anew at its first call (from the artifact cache, without
        measuring, when this one compiled there). What it compiled (kernels, guards) is not copied."""
        if self.checkpoint is not None:
            raise TypeError(f"fxcc: {self.name} cannot be copied or pickled: its weights live only in the compiled "
                            "graph (fxcc.compile(..., state_dict=...)); copy or save the checkpoint instead")
        if self._eager_call is not self.module and self.method is None:
            raise TypeError(f"fxcc: {self.name} cannot be copied or pickled: copy or pickle the module it compiles "
                            "(a compiled class's instance, a function) and compile the copy")
        return (_compiled_again, (self.module, self.options, self.method.__name__ if self.method else None))

    # --------------------------------------------------------------------------------- calling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _is_compiling():
            if torch.compiler.is_exporting():  # inside an enclosing capture: its graph takes the module's own ops
                return self._eager(*args, **kwargs)
            return _opaque_call(self, args, kwargs)  # inside code torch.compile traces (transformers' generate)
        if _refcount(self._model) < self._hold_below:  # fewer references to the model: the weights may be held once
            self._hold_once()
        module = self._model
        if _grad_enabled() and ((module.training and self._trains()) or _wants_grads(args, kwargs)):
            return self._call_for_gradients(args, kwargs)
        if self._fast_paths and (why := nested_fast_path.untaken(self._fast_paths)) is not None:
            return self._call_off_fast_path(why, args, kwargs)
        if _EPOCH[0] != self._hook_epoch:  # a module hook was registered or removed somewhere
            self._hot = None  # an eager signature's call may step around nn.Module.__call__ (_Hot.eager_of)
            self._check_hooks()
        hot = self._hot
        if hot is not None and not kwargs:  # the signature served last: one C++ check of arguments and tensors
            if (len(args) == hot.n and (hot.state is self._params or hot.eager) and hot.guard.check(*args, *hot.tensors)
                    and module.training is hot.training
                    and (not _any_autocast() and _default_dtype() is hot.dtype if hot.plain else hot.context_holds())):
                if hot.eager:  # a signature that runs eagerly: the model as it is now, its state unchecked
                    self.stats.eager_calls += 1
                    if hot.call is not None and "forward" not in module.__dict__:  # no fxcc forward to step around
                        with COMPILE_LOCK:  # as _eager: not while another thread captures
                            return hot.call(*args)
                    return self._eager(*args)
                if hot.state.changed(layouts=False) is None:
                    if hot.direct is None:
                        return self._run(hot.variant, list(args), args, kwargs)
                    if _grad_enabled():  # as Variant.run: outside the caller's no_grad, in one
                        _set_grad_enabled(False)
                        try:
                            outs = hot.direct(*args, *hot.bound)
                        finally:
                            _set_grad_enabled(True)
                    else:
                        outs = hot.direct(*args, *hot.bound)
                    return outs[0] if hot.leaf else tuple(outs)
            else:
                self._hot_misses += 1
                if self._hot_misses > _HOT_MISSES:  # another signature is the common one now: taken at its next call
                    self._hot = None
        # fast path: all arguments plain tensors, positional, with a compiled variant: no pytree flatten
        fast = None if kwargs else _fast_key(args, module.training)
        variant = self._fast.get(fast) if fast is not None else None
        if type(variant) is _Eager:  # runs the model as it is now: its state is not checked (a change keeps it)
            if self._hot is None:
                self._hot = _Hot.eager_of(variant, args, module.training,
                                          self._eager_call if self.checkpoint is None else None)
            self.stats.eager_calls += 1
            return self._eager(*args)
        if variant is not None and (not self._params or self._params_unchanged()):
            if self._hot is None and self._params is not None:
                self._hot = _Hot.of(variant, args, self._params, module.training,
                                    direct=self.options.plan is None and "_run" not in self.__dict__)
            return self._run(variant, list(args), args, kwargs)
        # keyword and KV-cache calls: the same call shape, with its state objects holding what they held
        ckey = _call_key(args, kwargs, module.training) if fast is None else None
        call = self._calls.get(ckey) if ckey is not None else None
        if call is None and ckey is not None and self._symbolic_floats:  # a variant that takes any value of them
            call = self._calls.get(_call_key(args, kwargs, module.training, floats=False))
        if call is not None and call.holds(args, kwargs) and (not self._params or self._params_unchanged()):
            return self._run(call.variant, call.flat(args, kwargs), args, kwargs, call.places)
        # a state object not seen before (a new KV cache per generate) of a structure served before
        fresh = (_fresh_key(ckey, args, kwargs) if ckey is not None and ckey not in self._calls
                 and self._fresh_misses <= _FRESH_TRIES else None)
        if fresh is not None:
            variant = self._fresh.get(fresh[0])
            if variant is None:
                self._fresh_misses += 1
            else:
                self._fresh_misses = max(self._fresh_misses - 1, 0)
                if type(variant) is _Eager:  # runs the model as it is now, as the fast path's _Eager does
                    self.stats.eager_calls += 1
                    return self._eager(*args, **kwargs)
                if not self._params or self._params_unchanged():
                    # the same state objects holding the same tensors as at the last call it served (a static
                    # cache, written in place, at each decode step of a new generate): kept as the guard keeps
                    # a call, checked at the next call without flattening the objects again
                    seen, self._fresh_last = self._fresh_last, (ckey, fresh[2])
                    if seen == self._fresh_last:
                        with COMPILE_LOCK:
                            self._remember_call(ckey, variant, args, kwargs)
                    return self._run(variant, fresh[1], args, kwargs)
        with COMPILE_LOCK:  # one thread at a time guards, compiles and checks (capture is not thread-safe)
            return self._slow_call(args, kwargs, fast, ckey, fresh[0] if fresh is not None else None)

    def _slow_call(self, args: tuple, kwargs: dict, fast: tuple | None, ckey: tuple | None,
                   fresh: tuple | None = None) -> Any:
        """A call the fast paths did not serve: the full guard, a recompile for changed parameters, a new or
        symbolic variant (compiled and checked against eager at its first call), then the call; `fresh`: its
        `_fresh_key`, under which what the guard found is kept for the next call with new state objects."""
        flat, spec, key = self._guard(args, kwargs)
        why = self._params.changed() if self._params else None
        if why is not None:
            checks = self._params.checks
            self._drop_variants(why, keep_eager=True)
            if self._churn.note(why, checks) and self._churned is None:
                self._churned = f"{self.name} runs eagerly from now on: {self._churn.text()}"
                if self.options.fullgraph:
                    raise FullGraphError(f"fxcc: {self._churned}; fullgraph=True makes this an error")
                warnings.warn(f"fxcc: {self._churned}. Keep state the forward changes at every call out of the "
                              "module, or pass it as an argument.", stacklevel=3)
        variant = self._variants.get(key) or self._memo.get(key) or self._symbolic(flat, spec, key)
        if variant is None:
            if eager_check.in_reference_run():  # eager's side of an enclosing model's check: compile nothing
                return self._eager(*args, **kwargs)
            variant = self._new_variant(args, kwargs, key, flat, spec)
            if self._params is not None:  # the guard's checks while compiling (timings) are no calls served
                self._params.checks = 0
            checked = self._check_first_call(variant, args, kwargs, key)
            if checked is not None:
                if fast is not None:  # a signature found to differ runs eagerly: its _Eager takes the fast path
                    self._fast[fast] = variant if checked.reason is None else self._variants[key]
                    self._hot = None
                return checked.result
        if isinstance(variant, _Eager) and self.options.fullgraph:  # told once; raised at every call
            raise FullGraphError(f"fxcc: {variant.reason}; fullgraph=True makes this an error")
        if fast is not None:
            self._fast[fast] = variant
            self._hot = None
        if fresh is not None:
            if len(self._fresh) >= _MAX_CALLS:
                self._fresh.clear()
            self._fresh[fresh] = variant
        if isinstance(variant, _Eager):
            self.stats.eager_calls += 1
            return self._eager(*args, **kwargs)
        if ckey is not None:
            self._remember_call(ckey, variant, args, kwargs)
        return self._run(variant, flat, args, kwargs)

    def _remember_call(self, ckey: tuple, variant: Variant, args: tuple, kwargs: dict) -> None:
        """Keep what the guard found for this call shape and the state objects as the guard saw them (before the
        call: a call writing a static cache in place leaves it holding the same objects). A shape whose objects
        changed since it was kept more than _MAX_MISSES times (a growing cache rebinds its tensors at every step)
        is not kept again: the snapshot would cost more than it saves. A variant symbolic in each float argument
        is kept for the shape whatever their values (`_call_key(floats=False)`)."""
        floats = dynamic.top_ints(args, kwargs, float)
        shapes = getattr(variant, "shapes", None)
        if floats and shapes is not None and floats <= shapes.dims.keys():
            ckey = _call_key(args, kwargs, self._model.training, floats=False)
            self._symbolic_floats = True
        if ckey in self._calls:
            self._call_misses[ckey] = misses = self._call_misses.get(ckey, 0) + 1
            if misses > _MAX_MISSES or self._calls[ckey] is None:
                self._calls[ckey] = None
                return
        if len(self._calls) >= _MAX_CALLS:
            self._calls.clear()
            self._call_misses.clear()
        self._calls[ckey] = _Call.of(variant, args, kwargs, functools.partial(_forget, weakref.ref(self._calls), ckey))

    def _check_first_call(self, variant: Variant | _Eager, args: tuple, kwargs: dict,
                          key: Any) -> eager_check.Checked | None:
        """The first call of a new variant, compared with eager (fxcc.eager_check); a signature whose
        compiled result differs runs eagerly from now on, with a warning. None when not checked."""
        check = CompileOptions.from_env(self.options).check_eager
        if isinstance(variant, _Eager) or not check or check == "always":  # always: _run_checked checks it
            return None
        why_not = eager_check.applies(variant.gm, all(p.exact for p in self._passes))
        if why_not is not None:
            log.debug("%s: first call not checked against eager (%s)", self.name, why_not)
            return None
        checked = eager_check.first_call(lambda flat: self._run(variant, flat, args, kwargs), self._eager,
                                         lambda a, k: flatten_inputs(a, k)[0],
                                         args, kwargs, self.name)
        if checked is not None and checked.reason is not None:
            variant.unlike_eager = self._runs_eagerly(
                key, f"{self.name}: {checked.reason}; this input signature runs eagerly",
                "`fxcc explain` shows the IR and where each op runs; CompileOptions(check_eager=False) skips the "
                "check.", stacklevel=4, reason=checked.reason)
        return checked

    def _runs_eagerly(self, key: Any, why: str, advice: str, stacklevel: int, reason: str | None = None) -> _Eager:
        """This input signature runs eagerly from now on (`reason`, default `why`, is what `eager_signatures`
        reports), with a warning; under fullgraph=True an error."""
        self._variants[key] = _Eager(reason or why)
        if self.options.fullgraph:
            raise FullGraphError(f"fxcc: {why}; fullgraph=True makes this an error. {advice}")
        warnings.warn(f"fxcc: {why}" + (f". {advice}" if advice else ""), stacklevel=stacklevel)
        return self._variants[key]

    def _trains(self) -> bool:
        """Whether eager would record gradients: the module has a parameter that requires them."""
        return any(p.requires_grad for p in self._model.parameters())

    def _check_hooks(self) -> None:
        """After a forward hook was registered or removed anywhere: if this module's hooks are not those its
        variants compiled with, every variant (eager ones too) is dropped and the next call compiles again."""
        self._hook_epoch = hooks.EPOCH[0]
        if self._hooks is None:
            return
        now = hooks.fingerprint(self._model)
        if now == self._hooks:
            return
        with COMPILE_LOCK:
            self._drop_variants("its forward hooks changed", keep_eager=False)
            self._hooks = None

    def _drop_variants(self, why: str, keep_eager: bool) -> None:
        """A change of the model the variants depend on: drop them, with what they recorded about it (DyCL
        programs' segments bound the old state), so the next call compiles again; `keep_eager`: signatures that
        run eagerly stay so (they depend on nothing), else they are dropped too."""
        self.stats.param_recompiles += 1
        recompiles.info("recompiling %s: %s", self.name, why)
        self._variants = {k: v for k, v in self._variants.items() if isinstance(v, _Eager)} if keep_eager else {}
        self._fresh = {k: v for k, v in self._fresh.items() if isinstance(v, _Eager)} if keep_eager else {}
        self._compiled, self._memo, self._fast, self._calls, self._call_misses = [], {}, {}, _Calls(), {}
        self._slower = self._slower if keep_eager else []
        self._attempts = [e.compiled for e in self._slower]
        self._hot = None
        self._sources, self._live, self._missing, self._globals, self._dropped = {}, {}, {}, {}, why
        self._written = None
        self.__dict__.get("_dycl_programs", {}).clear()
        self._params = None  # a compile snapshots the state anew

    def _call_for_gradients(self, args: tuple, kwargs: dict) -> Any:
        """A call that eager would record gradients for runs eagerly, so its outputs carry gradients as eager's
        do (compiled code computes none): in training mode with gradients enabled, or given an input that requires
        gradients with gradients enabled (a saliency map, an adversarial input); one warning each, or an error
        under fullgraph=True."""
        if self.module.training and self._trains():
            how, flag = "called in training mode", "_warned_gradients"
            advice = "Call model.eval() or run it under torch.no_grad() / torch.inference_mode() to run it compiled."
        else:
            how, flag = "given an input that requires gradients", "_warned_input_gradients"
            advice = ("Pass inputs that do not require gradients (x.detach(); through torch.compile a module's "
                      "parameters are inputs too: model.requires_grad_(False)) or call it under torch.no_grad() / "
                      "torch.inference_mode() to run it compiled.")
        why = (f"{self.name} is {how} with gradients enabled, and fxcc compiles inference only (its "
               "outputs would carry no gradients); it runs eagerly")
        if self.options.fullgraph:
            raise FullGraphError(f"fxcc: {why}; fullgraph=True makes this an error. {advice}")
        if not self.__dict__.get(flag):
            self.__dict__[flag] = True
            warnings.warn(f"fxcc: {why}. {advice}", stacklevel=3)
        self.stats.eager_calls += 1
        return self._eager(*args, **kwargs)

    def _call_off_fast_path(self, why: str, args: tuple, kwargs: dict) -> Any:
        """A call where eager would skip the fast path of nn.TransformerEncoder (nested tensors) or of an encoder
        layer that the compiled graph takes (fxcc.nested_fast_path) runs eagerly, with one warning."""
        if not self.__dict__.get("_warned_fast_path"):
            self.__dict__["_warned_fast_path"] = True
            warnings.warn(f"fxcc: {self.name} runs eagerly at calls where {why}: its compiled graph gives the fast "
                          "path's result (padded rows zero, a padding mask read as bool). Call it under "
                          "torch.no_grad() to run it compiled.", stacklevel=3)
        self.stats.eager_calls += 1
        return self._eager(*args, **kwargs)

    def _run(self, variant: Variant, flat: list[Any], args: tuple, kwargs: dict, places: list | None = None) -> Any:
        if variant.written_inputs and (pair := ir.written_sharing(flat, variant.written_inputs)) is not None:
            return self._sharing_call(pair, args, kwargs)
        if self.options.plan is None:
            out = variant.run(flat, args, kwargs, places) if variant.writes_back else variant.run(flat)
        else:  # a plan pins what a first run would time (a CUDA graph's worth, a Triton GEMM's config)
            with pinned(self.options.plan):
                out = variant.run(flat, args, kwargs, places) if variant.writes_back else variant.run(flat)
        if getattr(variant, "writes_state", False):  # its own writes to buffers are no parameter change
            if self._params is not None:
                self._params.accept_writes(variant.written)
        elif variant.gm is None and getattr(variant, "program", None) is not None and self._params is not None:
            self._params.accept_attribute_writes()  # a DyCL host program's own attribute stores
        return out

    def _sharing_call(self, pair: tuple[int, int], args: tuple, kwargs: dict) -> Any:
        """A call where an input the compiled graph writes in place shares memory with another input
        (fxcc.ir.written_sharing) runs eagerly, with one warning, or an error under fullgraph=True."""
        i, j = pair
        why = (f"{self.name}: inputs {i} and {j} of this call (flattened) share memory, and the compiled graph writes "
               f"input {i} in place; compiled code takes its inputs as distinct memory, so such a call runs eagerly")
        advice = "Pass tensors that do not share memory (a .clone() of one) to run it compiled."
        if self.options.fullgraph:
            raise FullGraphError(f"fxcc: {why}; fullgraph=True makes this an error. {advice}")
        if not self.__dict__.get("_warned_sharing"):
            self.__dict__["_warned_sharing"] = True
            warnings.warn(f"fxcc: {why}. {advice}", stacklevel=4)
        self.stats.eager_calls += 1
        return self._eager(*args, **kwargs)

    def _run_checked(self, variant: Variant, flat: list[Any], args: tuple, kwargs: dict,
                     places: list | None = None) -> Any:
        """`_run` under check_eager="always": each call compared with eager as the first call is
        (fxcc.eager_check.first_call); one that differs returns eager's result, is located
        (`Variant.localize`), warned about and listed by `explain`, and its variant runs eagerly from then on."""
        variant.calls += 1

        def run(fl: list[Any]) -> Any:
            return CompiledModule._run(self, variant, fl, args, kwargs, places)

        if variant.unchecked is None:
            variant.unchecked = variant.check_applies(all(p.exact for p in self._passes)) or ""
            if variant.unchecked:
                self._note_unchecked(variant, variant.unchecked)
        if variant.unchecked:
            with variant.checking_parts() as parts:
                out = run(flat)
            if parts is not None:
                self.stats.checked_parts += parts.calls
                for event in parts.events:
                    self.unlike_eager.append(f"call {variant.calls}: {event}")
                    warnings.warn(f"fxcc: {self.name}: call {variant.calls}: {event}; that part runs eagerly from now "
                                  "on (check_eager='always')", stacklevel=4)
            return out
        pre = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]  # the inputs, to locate a difference
        with variant.recording() as recorded:
            checked = eager_check.first_call(run, self._eager, lambda a, k: flat, args, kwargs, self.name)
        if checked is None:
            self._note_unchecked(variant, "its inputs cannot be copied")
            return run(flat)
        self.stats.checked_calls += 1
        if checked.reason is None:
            return checked.result
        try:
            where = variant.localize(pre, recorded, checked.result)
        except Exception as e:  # noqa: BLE001 - the difference is reported whether or not it can be located
            where = f"not located ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        number = next((i for i, v in enumerate(self._compiled, 1) if v is variant), len(self._compiled) + 1)
        sig = ", ".join(ir.type_str(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in pre)
        event = f"variant {number} ({sig}), call {variant.calls}: {checked.reason}; located: {where}"
        self.unlike_eager.append(event)
        self._no_longer_compiled(variant, f"{checked.reason} (call {variant.calls} of the variant)")
        why = f"{self.name}: {event}. This variant runs eagerly from now on (check_eager='always')"
        if self.options.fullgraph:
            raise FullGraphError(f"fxcc: {why}; fullgraph=True makes this an error")
        warnings.warn(f"fxcc: {why}", stacklevel=4)
        return checked.result

    def _note_unchecked(self, variant: Variant, why: str) -> None:
        """check_eager="always" on a variant whose calls cannot be checked: said once, and listed by `explain`."""
        text = f"{self.name}: calls of a variant are not checked against eager (check_eager='always'): {why}"
        if text not in self.unlike_eager:
            self.unlike_eager.append(text)
            warnings.warn(f"fxcc: {text}", stacklevel=5)

    def _no_longer_compiled(self, variant: Variant, reason: str) -> None:
        """Every signature `variant` serves runs eagerly from now on (a symbolic variant's other sizes too)."""
        eager = variant.unlike_eager = _Eager(reason, variant)
        self._hot = None
        for table in (self._variants, self._memo, self._fast, self._fresh):
            for k, v in list(table.items()):
                if v is variant:
                    table[k] = eager
        for k, c in list(self._calls.items()):
            if c is not None and c.variant is variant:
                del self._calls[k]

    def _guard(self, args: tuple, kwargs: dict) -> tuple[list[Any], Any, Any]:
        flat, spec = flatten_inputs(args, kwargs)
        return flat, spec, (spec, tuple(_leaf_key(x) for x in flat), self._model.training, call_context())

    def _symbolic(self, flat: list[Any], spec: Any, key: Any) -> Variant | _Eager | None:
        """A compiled symbolic variant whose guard accepts these inputs (remembered for the next call); eager
        where that variant's first call differed from eager."""
        structs: dict[Any, tuple] = {}

        def structure(v: Variant) -> tuple:
            """The call's structure as `v` was compiled for it: a DyCL host program's (`_host_structure`), or with
            the ints that were sizes then (`_sized_in`). An int made a constant by a later compile (export failed
            with it symbolic at another value) stays a size for the variants that had it so: their guards hold
            its value where export specialized it."""
            sized = "host" if getattr(v, "program", None) is not None else _sized_in(v.struct)
            if sized not in structs:
                structs[sized] = self._host_structure(flat, spec) if sized == "host" else \
                    self._structure(flat, spec, sized)
            return structs[sized]

        for v in self._compiled:
            if v.shapes is None or not v.shapes.dims:
                continue
            if v.struct == structure(v) and (getattr(v, "program", None) is not None or v.shapes.matches(flat)):
                if len(self._memo) >= _MEMO:
                    self._memo.clear()
                self._memo[key] = v.unlike_eager or v
                return self._memo[key]
        for e in self._slower:  # a shape class already measured slower than eager: eager, not another compile
            v = e.compiled
            if v.shapes is None:
                continue
            if v.struct == structure(v) and v.shapes.matches(flat):
                if len(self._memo) >= _MEMO:
                    self._memo.clear()
                self._memo[key] = e
                return e
        return None

    def _structure(self, flat: list[Any], spec: Any, sized: frozenset[int]) -> tuple:
        """What a call must share with a variant whatever its sizes (`dynamic.structure`), the training flag and the
        caller's autocast and default dtype (`call_context`: a variant traced without an autocast has none of its
        casts)."""
        return spec, dynamic.structure(flat, sized), self._model.training, call_context()

    def _host_structure(self, flat: list[Any], spec: Any) -> tuple:
        """What a call must share with a DyCL host program's variant: its `_structure` with every int and float
        argument by type and no tensor's layout class. The host program is Python over the call's own values: it
        reads a position or a length as eager does, and each of its segments guards the sizes, values and strides
        of its own inputs (a layout or an int that changed recompiled the host program, whose segments then
        compiled again for the same inputs)."""
        spec, struct, training, context = self._structure(flat, spec, _scalars(flat))
        return spec, dynamic.without_layouts(struct), training, context

    def _eager(self, *args: Any, **kwargs: Any) -> Any:
        """The original module (or method), with fxcc's own forward, if installed on it, out of the way."""
        if self.checkpoint is not None:
            raise RuntimeError(f"fxcc: {self.name} cannot run eagerly: its weights were loaded into the compiled graph "
                               "only (fxcc.compile(..., state_dict=...)) and the model is on the meta device. Load "
                               "them into the model (load_state_dict(..., assign=True)) and compile without "
                               "state_dict to keep an eager fallback.")
        fwd = self.module.__dict__.get("forward")
        with COMPILE_LOCK:  # not while another thread captures: export swaps the module's parameters for fakes
            if self.method is None and fwd is not None and hasattr(fwd, "fxcc"):
                with forward_as(self.module, original_forward(self.module)):
                    return self._eager_call(*args, **kwargs)
            return self._eager_call(*args, **kwargs)

    def warm(self, *args: Any, **kwargs: Any) -> None:
        """Compile for these inputs now (as the first call would), without running the model."""
        flat, spec, key = self._guard(args, kwargs)
        if key not in self._variants and self._symbolic(flat, spec, key) is None:
            self._new_variant(args, kwargs, key, flat, spec)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own `generate` (transformers), with every forward it makes running compiled; greedy decoding
        with a static cache runs fxcc's own decode loop (fxcc.decode_loop: `self.decode_loop.last` says which loop
        ran and why)."""
        gen = getattr(self.module, "generate", None)
        if gen is None or self.method is not None:
            raise AttributeError(f"{self.name} has no generate method")

        # with the model's own signature: generate reads it to decide what to pass (GPT-2 gets `position_ids`
        # from the attention mask only if its forward names them; without them a left-padded row differs)
        @functools.wraps(original_forward(self.module))
        def forward(*a: Any, **k: Any) -> Any:
            return self(*a, **k)

        forward.fxcc = self  # marks it as fxcc's, so capture and the eager fallback call the model's own
        try:
            with forward_as(self.module, forward), deferred_stop_check(DEFERRED_STOP_DEVICES):
                self._own_change()
                return self.decode_loop.generate(gen, args, kwargs)
        finally:
            self._own_change()

    def _hold_once(self) -> None:
        """Where nothing but this compiled module reaches the model, hold the weights its kernels read only as packed
        copies as those copies alone (fxcc.held); else look again once the model has fewer references. Not while a
        signature runs eagerly or a decode loop's step is compiled (they read the weights)."""
        with COMPILE_LOCK:
            self._hold_below = 0
            if (self._held is not None or self.checkpoint is not None or self._params is None or self._slower
                    or self.capturing or any(type(v) is not Variant for v in (*self._variants.values(),
                                                                            *self._fast.values()))):
                return
            weights = held.packed_only(self._compiled, bool(self.decode_loop.steps))
            sharded = held.sharded_away(self._compiled, self._model, bool(self.decode_loop.steps))
            self._held = held.release(self, weights, self._params.watched, sharded, settings().cache_dir) \
                if weights or sharded else None
            del weights, sharded
            if self._held is None:
                self._hold_below = _refcount(self._model)
                return
            del self.__dict__["module"]  # read through `__getattr__`, which gives the weights back first
            self._params.rewatch()

    def _whole(self) -> nn.Module:
        """The model with the weights `_hold_once` let go back in place, as anything but the kernels reads it."""
        with COMPILE_LOCK:
            if self._held is not None:
                self._held.restore()
                self._held = None
                object.__setattr__(self, "module", self._model)
                self._params.rewatch()
                self._hold_below = _refcount(self._model)  # again only when the caller lets go of it again
        return self._model

    def _own_change(self) -> None:
        """fxcc changed the model's dict itself (generate's forward, installed or taken away): the module-state
        guard takes its version tags again, not counting it as the model's change (fxcc.guards.ModuleState)."""
        if self._params is not None:
            self._params.taken_again()

    def _params_unchanged(self) -> bool:
        return self._params.changed() is None

    def _snapshot_params(self, sources: list[torch.Tensor] | None = None, live: list[Any] = (),
                         missing: Missing | None = None, globals_read: GlobalReads | None = None,
                         written: list[torch.Tensor] | None = None) -> None:
        """Record the model's state the variants depend on; `sources`: the tensors this variant's constants
        were computed from (None: unknown, so all), `live`: the tensors its CUDA graphs read in place,
        `missing`: the names its traced code looked up on each module and did not find (None: unknown, so any
        attribute added counts, as for a DyCL program, which reads attributes as it runs), `globals_read`: the
        Python globals its traced code read; all added to those of the variants compiled before. `written`: the
        tensors its graph writes in place (None: it has no graph); only those every graph writes are a call's
        own writes (fxcc.guards.Globals): a variant that only reads one may have folded it."""
        if written is not None:
            self._written = {id(t): t for t in written if self._written is None or id(t) in self._written}
        if sources is None or self._sources is None:
            self._sources = None
        else:
            self._sources.update((id(t), t) for t in sources)
        self._live.update((id(t), t) for t in live if isinstance(t, torch.Tensor))
        if missing is None or self._missing is None:
            self._missing = None
        elif self._params is None:  # the first variant since the state was taken
            self._missing = dict(missing)
        else:  # a module recorded by one variant's capture and not by another's: unknown
            self._missing = {k: None if names is None or missing.get(k) is None else names | missing[k]
                             for k, names in self._missing.items()} | {k: None for k in missing.keys() - self._missing}
        for k, (holder, fallback, names, path) in (globals_read or {}).items():
            self._globals.setdefault(k, (holder, fallback, set(), path))[2].update(names)
        self._params = ModuleState(self.module, None if self._sources is None else list(self._sources.values()),
                                   list(self._live.values()), self._missing, self._globals,
                                   list(self._written.values()) if self._written else None)

    # ------------------------------------------------------------------------------- compiling

    def _new_variant(self, args: tuple, kwargs: dict, key: Any, flat: list[Any], spec: Any) -> Variant | _Eager:
        """Compile a variant for this call, or decide it runs eagerly; the RNG state is left as found (capture,
        example runs and timings draw from it), so the call itself draws what eager would (fxcc.rng)."""
        self._hold_below = sys.maxsize  # the next call looks whether its weights can be held once
        kept = BufferState([self.module, self.method])
        try:
            with rng.preserved(args, kwargs), pinned(self.options.plan):
                variant = self._compile_variant(args, kwargs, key, flat, spec)
        finally:
            kept.restore()
        if CompileOptions.from_env(self.options).check_eager == "always":  # every call from now on: no cost otherwise
            self.__dict__["_run"] = self._run_checked
            self._hot = None  # a hot signature served by its executable directly is checked from now on too
        return variant

    def _compile_variant(self, args: tuple, kwargs: dict, key: Any, flat: list[Any], spec: Any) -> Variant | _Eager:
        names = dynamic.leaf_names(args, kwargs, getattr(self, "__signature__", None))
        sized, scalar = self._sizes_of(args, kwargs, flat, spec, names)
        struct = self._structure(flat, spec, sized)
        dims, reason = self._plan(flat, struct, names, sized, dynamic.carries_state(args, kwargs), scalar)
        self._dropped = ""  # said once, by this compile
        if self._churned is not None:  # said once, when its state was found changing at every call
            self._variants[key] = _Eager(self._churned)
            return self._variants[key]
        # the bound is per input structure: a generate's prefill (an empty cache) and its decode steps (a filled one)
        # are two, and the variants one of them needs (a sliding-window cache's branches, per batch class) leave the
        # other its own; the structures are bounded too (a list argument one longer at every call), and all the
        # variants together at twice the bound
        bound, kinds = self.options.max_variants, []
        for v in self._attempts:
            if v.struct is not None and all(v.struct[0] != k for k in kinds):
                kinds.append(v.struct[0])
        spent = sum(v.struct is None or v.struct[0] == spec for v in self._attempts)
        if spent >= bound or (not spent and len(kinds) >= bound) or len(self._attempts) >= 2 * bound:
            what = (f"{spent} compiled variants (max_variants={bound}) for calls of this input structure"
                    if spent >= bound else
                    f"compiled variants for {len(kinds)} input structures (max_variants={bound})" if not spent else
                    f"{len(self._attempts)} compiled variants in all (twice max_variants={bound})")
            why = (f"{self.name} already has {what}; this input signature runs eagerly (it would recompile: "
                   f"{reason})")
            advice = ("Raise CompileOptions.max_variants, or keep what the reason names the same between calls "
                      "(fxcc.explain lists each variant's reason)." if self.options.dynamic is True else
                      "Use fixed input shapes, CompileOptions(dynamic=True) or raise CompileOptions.max_variants.")
            return self._runs_eagerly(key, why, advice, stacklevel=5)
        if call_context()[0]:  # export does not trace the caller's autocast: compiled code would skip its casts
            why = f"{self.name} is called under torch.autocast, which fxcc does not compile; it runs eagerly there"
            return self._runs_eagerly(key, why, "Compile the model in the dtype you want (model.to(torch.bfloat16)) "
                                      "to run it compiled.", stacklevel=5)
        self._hooks, self._hook_epoch = hooks.fingerprint(self.module), hooks.EPOCH[0]
        hooked = hooks.foreign(self.module, own_run=self.method is not None)
        if hooked:
            why = (f"{self.name} runs eagerly while forward hooks are registered ({'; '.join(hooked[:3])}"
                   f"{f'; {len(hooked) - 3} more' if len(hooked) > 3 else ''}): a compiled graph would run them once, "
                   "at capture, on fake tensors, and never at its calls")
            return self._runs_eagerly(key, why, "Remove them (handle.remove()): the next call compiles.", stacklevel=5)
        check_call(self.method or self.module, args, kwargs)
        try:
            variant = self.compile_for(args, kwargs, dims=dims)
        except CaptureError as e:
            if dynamic.carries_state(args, kwargs):
                return self._runs_eagerly(key, f"{self.name} runs eagerly for calls with a KV cache: {e}", "",
                                          stacklevel=5)
            if not self.options.dycl or self.options.fullgraph:  # one graph or nothing, as asked: the error
                raise
            # neither export nor DyCL could take it (`.numpy()` in a function whose source Python cannot find):
            # it runs as eager does, said once
            return self._runs_eagerly(key, f"{self.name} runs eagerly: {e}", "", stacklevel=5)
        unmatched = rng.unmatched(variant.gm) if isinstance(variant, Variant) else None
        if unmatched is not None:
            return self._runs_eagerly(key, f"{self.name} runs eagerly: {unmatched}",
                                      "Draw from the default generator (torch.manual_seed) to run it compiled.",
                                      stacklevel=5)
        const = getattr(getattr(variant, "captured", None), "constant_ints", None) or {}
        # int arguments the capture kept constants stay so for this input structure, but for one of 0 or 1, which
        # export specializes: a decode position, 0 at each prefill, would stay a constant for every decode step
        const = {i: why for i, why in const.items() if not (type(flat[i]) is int and flat[i] in (0, 1))}
        if const:
            self._static_ints[spec] = {**self._static_ints.get(spec, {}), **const}
            sized = self._sized[spec] = sized - const.keys()
            struct = self._structure(flat, spec, sized)
            reason += "".join(f"; `{names[i]}` stays a constant: {why}" for i, why in const.items())
        if isinstance(variant, Variant) and variant.captured is not None:
            variant.shapes = dynamic.Shapes.of(variant.gm, flat, names, sized)
            variant.struct = struct
            kept = [i for i in dims or {} if type(flat[i]) in (int, float) and i not in variant.shapes.dims and i not in const]
            reason += "".join(f"; `{names[i]}` stays a constant: the program needs its value "
                              f"({_specialized_by(variant, i, ())})" for i in kept)
            # a size that changed from an earlier variant's, asked for symbolic, that export specialized (a Python
            # loop over it: Mamba's `range(seq_len)`): each new value compiles again, which the reason should say
            moved: dict[int, set[int]] = {}
            for v in self._attempts:
                if v.shapes is not None and v.struct is not None and v.struct[0] == spec:
                    for i, ds in v.shapes.changed(flat).items():
                        moved.setdefault(i, set()).update(ds)
            fixed = {i: sorted(d for d in set(ds) & moved.get(i, set()) - set(variant.shapes.dims.get(i, ())))
                     for i, ds in (dims or {}).items() if isinstance(flat[i], torch.Tensor)}
            reason += "".join(f"; `{names[i]}` dim {'/'.join(map(str, ds))} stays static: the program needs its value "
                              f"({_specialized_by(variant, i, ds)}), so each new size compiles"
                              for i, ds in fixed.items() if ds)
            symbolic = variant.shapes.describe()
            reason += f"; symbolic: {symbolic}" if symbolic else "; static shapes"
        elif isinstance(variant, Variant) and getattr(variant, "program", None) is not None:
            # a DyCL host program is Python: it serves every size of this input structure, and each of its segments
            # compiles for its own shapes as a module does (static first, a size that changes symbolic)
            variant.shapes = dynamic.Shapes.any_sizes(flat, names, sized | _scalars(flat))
            variant.struct = self._host_structure(flat, spec)
            reason += "; a host program serves any sizes (its segments compile for theirs)"
        if getattr(variant, "reason", ""):  # a DyCL variant says why it is a host program
            reason += f"; {variant.reason}"
        variant.reason = reason
        if self._attempts:
            recompiles.info("recompiling %s: %s", self.name, reason)
        else:
            log.info("compiling %s: %s", self.name, reason)
        try:
            variant = self._against_eager(variant, args, kwargs)
        except Exception:  # the compiled code raised on these inputs: where eager raises too, eager's error
            self._raise_eagers(args, kwargs)
            raise
        self._variants[key] = variant
        if not isinstance(variant, _Eager):
            self._compiled.append(variant)
            self._attempts.append(variant)
        elif variant.compiled is not None and variant.compiled.shapes is not None:
            # measured slower than eager: its shape class runs eagerly without compiling again, a size that
            # changes from it recompiles symbolic (automatic dynamic, as from a kept one) and it counts toward
            # max_variants: a model slower than eager at every size stops compiling
            self._slower.append(variant)
            self._attempts.append(variant.compiled)
        self.stats.compiles += 1
        self.stats.reasons.append(reason)
        self.stats.history.append(", ".join(ir.type_str(x) for x in flat))
        return variant

    def _raise_eagers(self, args: tuple, kwargs: dict) -> None:
        """Raise what eager raises for this call, where it raises (an input the model rejects: the user's error,
        from the user's code, in place of a compiled kernel's); eager runs on copies, the model's buffers kept."""
        kept = BufferState([self.module, self.method])
        try:
            err = eager_check.eager_error(self._eager, args, kwargs)
        finally:
            kept.restore()
        if err is not None:
            raise err from None

    def _sizes_of(self, args: tuple, kwargs: dict, flat: list[Any], spec: Any,
                  names: list[str]) -> tuple[frozenset[int], str]:
        """The call's ints that are sizes (symbolic where the program allows): those inside a KV cache, and its
        int and float arguments under dynamic=True or once their value changed (dynamic=None), as torch.compile's
        automatic dynamic; with the reason where this call's value made one so (`argument `n` changed 1 -> 2`)."""
        sized = self._sized.setdefault(spec, dynamic.state_ints(args, kwargs))
        if self.options.dynamic is False:
            return sized, ""
        static = self._static_ints.get(spec, {})
        ints = dynamic.top_ints(args, kwargs) | dynamic.top_ints(args, kwargs, float)
        text = ""
        if self.options.dynamic is True:
            sized |= ints - static.keys()
        else:
            sized |= ints & self.dims_hint.keys() - static.keys()  # (torch.compile's backend: dynamo made them so)
            seen = [v.struct[1] for v in self._attempts if v.struct is not None and v.struct[0] == spec
                    and v.struct[2] == self._model.training]
            changes = dynamic.scalar_changes(flat, dynamic.structure(flat, sized), ints, sized, seen)
            sized |= changes.keys() - static.keys()
            text = "; ".join(f"argument `{names[i]}` changed {a} -> {b}; " + (
                f"it stays a constant ({static[i]})" if i in static else "recompiling with it symbolic")
                for i, (a, b) in sorted(changes.items()))
        self._sized[spec] = sized
        return sized, text

    def _plan(self, flat: list[Any], struct: Any, names: list[str], sized: frozenset[int],
              state: bool, scalar: str = "") -> tuple[dict, str]:
        """Which input dimensions the next compile makes symbolic, and why it compiles (fxcc.dynamic); `scalar`:
        the int arguments whose change made them sizes (`_sizes_of`)."""
        # variants of this structure but for inputs laid out otherwise, or compiled while an int that is now a
        # size was a constant: their sizes count as this one's would
        def bare(st: Any) -> tuple:
            consts = tuple(("int",) if i in sized else e for i, e in enumerate(st[1]))
            return st[0], dynamic.without_layouts(consts), st[2], st[3]

        kin = [v for v in self._attempts if v.shapes is not None and v.struct is not None
               and len(v.struct[1]) == len(struct[1]) and bare(v.struct) == bare(struct)]
        same = [v for v in kin if v.struct == struct]
        last = (same or kin or [None])[-1]
        if not self._attempts:
            reason = self._dropped or "first call"
        elif last is None:
            reason = f"new input structure ({', '.join(ir.type_str(x) for x in flat)})"
        else:
            if same:  # a shape that fails its guard, or a static variant's strides
                why = last.shapes.mismatch(flat, names) or dynamic.stride_change(flat, names,
                                                                                 last.shapes.example_strides)
            else:  # another layout class (a transposed, channels-last, sliced or broadcast input)
                why = dynamic.stride_change(flat, names, last.shapes.example_strides, last.struct[1])
            reason = f"{why or 'no variant accepts the call'} (variant {self._attempts.index(last) + 1})"
        if scalar:
            reason = scalar
        mode = self.options.dynamic
        if mode is False:
            return {}, reason
        if mode is True:
            return self._nonnegative(dynamic.all_dims(flat, sized), flat, names, reason)
        ints = {i: {0} for i in sized if type(flat[i]) in (int, float)}  # int and float arguments made symbolic
        dims = dynamic.merge(dynamic.marked_dims(flat), self.dims_hint, dynamic.all_dims(flat, sized) if state else ints)
        for v in kin:
            changed = v.shapes.changed(flat)
            dims = dynamic.merge(dims, {i: set(ds) for i, ds in v.shapes.dims.items()}, changed)
        if last is not None and not state:
            changed = last.shapes.changed(flat)
            if changed:
                reason += f": {dynamic.change_text(flat, names, last.shapes, changed)}"
        elif state and not same:
            reason += " (a KV cache call: sizes symbolic from the start)"
        return self._nonnegative(dims, flat, names, reason)

    @staticmethod
    def _nonnegative(dims: dict[int, set[int]], flat: list[Any], names: list[str], reason: str) -> tuple[dict, str]:
        """`dims` without the ints whose value is negative: export takes a symbolic int to be a size (0 or more),
        and a graph traced so could be wrong for this call; that int stays a constant of this compile."""
        neg = [i for i in dims if type(flat[i]) is int and flat[i] < 0]
        for i in neg:
            del dims[i]
            reason += f"; `{names[i]}` stays a constant ({flat[i]}: a symbolic int is taken to be 0 or more)"
        return dims, reason

    def _against_eager(self, variant: Variant, args: tuple, kwargs: dict) -> Variant | _Eager:
        """The variant, or eager where the variant measures slower on these inputs (fxcc.autotune.vs_eager)."""
        if not CompileOptions.from_env(self.options).time_vs_eager or not isinstance(variant, Variant) \
                or variant.gm is None:
            return variant  # a DyCL program (no graph) chooses compiled or plain Python per segment itself
        state = dynamic.carries_state(args, kwargs)
        if state and variant.writes_state:
            variant.vs_eager = "not timed against eager: the call carries a KV cache and writes the module's buffers"
            return variant
        why = vs_eager.unrepeatable(variant.gm, inputs_restored=state)
        if why is not None:
            variant.vs_eager = f"not timed against eager: {why}"
            return variant
        flat = flatten_inputs(args, kwargs)[0]
        device = "cuda" if any(isinstance(x, torch.Tensor) and x.is_cuda for x in flat) else "cpu"
        sides = _eager_side(self._eager, args, kwargs, flat, device)
        if isinstance(sides, str):
            variant.vs_eager = f"not timed against eager: {sides}"
            return variant
        try:
            return self._judged(variant, args, kwargs, flat, device, sides)
        finally:
            sides.restore()  # a KV cache the timed calls wrote holds the caller's values again

    def _judged(self, variant: Variant, args: tuple, kwargs: dict, flat: list[Any], device: str,
                sides: _EagerSide) -> Variant | _Eager:
        cache, vkey, verdict = default_cache(), None, None
        if self.options.plan is not None:  # the plan's decision, not timed again
            plan = load_plan(self.options.plan)
            verdict = vs_eager.planned(plan.latency_ms, plan.eager_ms, repr(self.options.plan))
            if verdict is None:
                variant.vs_eager = f"not timed against eager: plan {self.options.plan!r} records no timing"
                return variant
        elif variant.graph_key and cache.problem() is None:
            choices = sorted((k, b.choice.backend, b.choice.module, sorted(b.choice.params.items()))
                             for k, b in variant.kernels.items())
            program = (variant.gm.code + repr(choices) + repr(CompileOptions.from_env(self.options))
                       + repr(variant.cuda_graph is not None) + "timed with its guard, eager the incumbent")
            vkey = vs_eager.verdict_key(variant.graph_key, program, device)
        verdict = verdict or (vs_eager.remembered(cache, vkey) if vkey else None)
        if verdict is None or verdict.remeasure:  # not measured yet, or its timings were too noisy to settle it
            verdict = vs_eager.judge(self._as_called(variant, flat), sides.eager, device, was=verdict,
                                     setup=sides.setup)
            if vkey:
                vs_eager.remember(cache, vkey, verdict, self.name)
        variant.vs_eager = verdict.text()
        log.info("%s: %s", self.name, variant.vs_eager)
        if verdict.keep_compiled or self.options.fullgraph:  # fullgraph=True: compiled even where slower
            return variant
        if (other := self._without_layout(variant, args, kwargs, flat, device, verdict, sides)) is not None:
            return other
        variant.slower_than_eager = True
        sig = ", ".join(ir.type_str(x) for x in flat)
        how = "" if verdict.compiled_ms > verdict.eager_ms else ", no faster beyond the noise"
        reason = (f"{self.name} runs eagerly for inputs ({sig}): compiled, it measured {verdict.compiled_ms:.3f} ms "
                  f"per call against eager's {verdict.eager_ms:.3f} ms{how}")
        warnings.warn(f"fxcc: {reason}. fxcc.explain shows its kernels; CompileOptions(time_vs_eager=False) keeps "
                      "the compiled one.", stacklevel=5)
        return _Eager(reason, variant)

    def _as_called(self, variant: Variant, flat: list[Any]) -> Callable[[], Any]:
        """The compiled side of a timing against eager as a call pays for it: the module-state guard each call
        runs (a few microseconds: on a graph of a few ops that can be what decides), then the variant."""
        state = self._params

        def call() -> Any:
            if state is not None:
                state.changed()
            return variant.run(flat)

        return call

    def _without_layout(self, variant: Variant, args: tuple, kwargs: dict, flat: list[Any], device: str,
                        verdict: vs_eager.Verdict, sides: _EagerSide) -> Variant | None:
        """A variant compiled without the `layout` rewrite, where that rewrite changed a graph that then measured
        slower than eager and the graph without it measures faster than eager; else None. The layout pass decides
        by timing the graph's torch ops, which the generated kernels can belie (a whole UNet stage channels-last)."""
        if self.options.plan is not None or not any(r.spec.split("{")[0] == "layout" and r.result.changed
                                                    for r in variant.records):
            return None
        other = self.compile_for(args, kwargs, variant.shapes.dims if variant.shapes is not None else None,
                                 [p for p in self._passes if p.name != "layout"])
        again = vs_eager.judge(self._as_called(other, flat), sides.eager, device, setup=sides.setup)
        log.info("%s: without the layout rewrite: %s", self.name, again.text())
        if not again.keep_compiled:
            return None
        other.vs_eager = (f"{again.text()}; with the layout rewrite it measured {verdict.compiled_ms:.3f} ms against "
                          f"eager's {verdict.eager_ms:.3f} ms, so it is compiled without it")
        warnings.warn(f"fxcc: {self.name}: the graph kept channels-last (the layout pass) measured slower than eager "
                      f"({verdict.compiled_ms:.3f} ms against {verdict.eager_ms:.3f} ms); compiled without that rewrite "
                      f"it measured {again.compiled_ms:.3f} ms, which is kept", stacklevel=6)
        return other

    def compile_for(self, args: tuple, kwargs: dict, dims: dict[int, set[int]] | None = None,
                    passes: list | None = None) -> Variant:
        """Capture and compile for these example inputs, the input dimensions in `dims` symbolic, through `passes`
        (default: the compile's pipeline); does not register the variant. One compile at a time (COMPILE_LOCK)."""
        with COMPILE_LOCK:
            return self._compile_for(args, kwargs, dims, passes)

    def _compile_for(self, args: tuple, kwargs: dict, dims: dict[int, set[int]] | None,
                     passes: list | None) -> Variant:
        t0 = time.perf_counter()
        opts = CompileOptions.from_env(self.options)
        # passes and kernel choice run the graph on the example inputs: on copies, since a graph may write
        # into its inputs (a KV cache) and the real call has yet to run
        example = pytree.tree_map_only(torch.Tensor, torch.clone, (tuple(args), dict(kwargs)))
        target = resolve_target(opts.target, self.module, args, kwargs)
        triton = backend("triton") if target == "cuda" else None  # imported on first use: CPU compiles never do
        ctx = PassContext(options=opts, module=self.module, example_inputs=example, target=target,
                          pointwise_kernel=triton.pointwise_kernel if triton and triton.available(target) is None
                          else None)
        if opts.plan is not None:  # the plan must fit this model, target and libraries (PlanError if not)
            check_call_plan(opts, self.module, args, kwargs, ctx.target)

        def manager(passes: list) -> PassManager:
            return PassManager(passes, verify_each=opts.verify_each, print_ir_after=set(opts.print_ir_after),
                               echo=self.echo_ir and bool(opts.print_ir_after))

        front, back = split_at_codegen(self._passes if passes is None else passes)
        if opts.dycl:  # Python effects (attribute stores...) a traced graph would apply once: a DyCL host program
            from fxcc import dycl

            effect = dycl.python_effect(self.module, args, kwargs)
            if effect is not None and opts.fullgraph:
                raise FullGraphError(f"fxcc: {self.name}'s forward has {effect}, which one traced graph would do only "
                                     "once (fxcc would split it into a DyCL host program); fullgraph=True makes this "
                                     "an error")
            if effect is not None:
                for p in front:
                    p.check_split(self.module)
                return dycl.compile_dynamic(self, args, kwargs, None, effect)
            unread = dycl.source_unread(self.module)  # then capture looks for the effects DyCL could not
        else:
            unread = None
        # the IR before codegen comes from the graph cache when an earlier compile stored it
        loss = None  # quality loss of approximate passes, measured under a quality budget
        plain = not dims and not dynamic.carries_state(args, kwargs)  # what the graph cache keys and stores
        cache, key = self._graph_cache_key(front, args, kwargs, ctx.target, opts) if plain else (None, None)
        hit = graph_cache.load(cache, key, self.module, self.method or original_forward(self.module)) if key else None
        if hit is not None:
            cap = Captured(hit.gm, hit.in_spec, hit.out_spec, f"{hit.method} (IR from the graph cache)",
                           missing=hit.missing, globals=hit.globals or {})
            gm, records = hit.gm, hit.records
        else:
            self.capturing = True
            try:
                with self._stand_ins(args, kwargs):
                    cap = capture(self.module, args, kwargs, dims=dims, forward=self.method, unread=unread)
            except CaptureError as e:  # tensor-dependent control flow: a DyCL host program + compiled segments
                own = type(self.module).forward
                other_method = self.method is not None and self.method.__func__ is not own and \
                    self.method.__func__ is not getattr(own, "__wrapped__", None)  # @fxcc.compile on forward
                if dynamic.carries_state(args, kwargs) or other_method:  # DyCL splits forward, keeps no cache
                    raise
                if opts.fullgraph:
                    raise FullGraphError(f"fxcc: {self.name} cannot be captured as one graph (fxcc would split it into "
                                         f"a DyCL host program); fullgraph=True makes this an error. {e}") from e
                from fxcc import dycl

                for p in front:
                    p.check_split(self.module)
                return dycl.compile_dynamic(self, args, kwargs, e)
            finally:
                self.capturing = False
            mark_code_constants(cap.gm, self.module, cap.globals)
            if eager_check.mixed_operands(cap.gm) is not None:  # an input the model rejects: no compile spent on it
                self._raise_eagers(args, kwargs)
            if opts.verify_each:
                ir.verify(cap.gm, who="after capture")
            # under a plan the approximate passes take its assignment (checked against the budget by plan_options)
            if opts.quality_budget is not None and opts.plan is None and any(not p.exact for p in front):
                front, loss = fit_quality_budget(front, cap.gm, flatten_inputs(*example)[0], ctx,
                                                 opts.quality_budget, self.name)
            if self.checkpoint is None:
                pm = manager(front)
                gm, records = pm.run(cap.gm, ctx), pm.records
            else:
                gm, records = self._front_loading(front, cap.gm, ctx, manager)
            if key:
                graph_cache.store(cache, key, gm, self.module, cap.in_spec, cap.out_spec, cap.method, records,
                                  cap.missing, cap.globals)
        pm = manager(back)
        gm = pm.run(gm, ctx)
        pm.records[:0] = records
        callers = self.checkpoint.callers() if self.checkpoint is not None else set()
        if self.checkpoint is not None:  # a state dict is the caller's again; a file is read again at a recompile
            self.checkpoint.release()
        if ctx.target == "cpu" and opts.plan is None:  # kernels chosen alone, checked together: one thread pool if
            # that is faster (a plan records the kernels as settled)
            pools.settle(gm, flatten_inputs(*example)[0], self.name, ctx.kernels)
        executable, bound, kernels = build_executable(gm, ctx.kernels)
        if self.checkpoint is not None and ctx.target == "cpu":  # no eager module reads the graph's constants
            if dropped := tvm_codegen.hold_panels(gm, executable, bound, kernels, callers):
                log.info("%s: %d bytes of constants held only as the TVM kernels' column panels", self.name, dropped)
        seconds = time.perf_counter() - t0
        log.info("compiled %s in %.2f s (%s)", self.name, seconds, cap.method)
        graph = None
        why_not = not_graphable(gm) if opts.cuda_graphs and ctx.target == "cuda" else "off"
        if why_not is None and opts.plan is not None and load_plan(opts.plan).cuda_graph is False:
            why_not = f"plan {opts.plan!r} runs it without one (as it measured faster)"
        graphs = why_not is None
        if why_not not in (None, "off"):
            log.info("%s runs without a CUDA graph: %s", self.name, why_not)
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        writes = ir.written_in_place(gm)
        written_inputs = tuple(i for i, p in enumerate(places) if p in writes)
        if graphs:
            inplace = in_place_inputs(gm, args, kwargs)
            keep = frozenset(j for j, _ in cap.aliasing.leaves)
            graph = "pending" if not dims and not inplace and not keep else \
                CudaGraphs(lambda *a, ex=executable, b=bound: ex(*a, *b), self.name, inplace, keep)
        written = [ir.fetch_attr(gm, n.target) for n in writes if n.op == "get_attr"]
        self._snapshot_params(graph_sources(gm, self.module, cap.globals), live=bound if graphs else (),
                              missing=cap.missing, globals_read=cap.globals, written=written)
        return Variant(cap, gm, executable, pm.records, seconds, bound, graph, self.name, quality_loss=loss,
                       kernels=kernels, writes_state=bool(written), written=written, graph_key=key,
                       no_graph=why_not if why_not != "off" else None, written_inputs=written_inputs)

    def _stand_ins(self, args: tuple, kwargs: dict) -> Any:
        """Capture of a model whose weights a checkpoint holds sees stand-ins of them (fxcc.weights)."""
        if self.checkpoint is None:
            return contextlib.nullcontext()
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in pytree.tree_leaves((args, kwargs)))
        return stand_in(self.module, self.checkpoint, torch.device("cuda" if cuda else "cpu"))

    def _front_loading(self, front: list, gm: fx.GraphModule, ctx: PassContext,
                       manager: Callable[[list], PassManager]) -> tuple[fx.GraphModule, list]:
        """The passes before codegen on a graph whose weights are still in the checkpoint: those up to the last
        tp-shard read only shapes (canonicalize loads a weight it folds), so tp-shard reads each weight only where
        this rank's shard lies; then every weight the graph still reads is loaded, and the rest of the passes run.
        What a pass replaced (merged, quantized, sharded weights) leaves the graph: each weight is held once."""
        names = [p.name for p in front]
        cut = len(names) - names[::-1].index("tp-shard") if "tp-shard" in names else 0
        if any(p.measures for p in front[:cut]):  # a pass that runs the graph needs the values
            cut = 0
        first, rest = manager(front[:cut]), manager(front[cut:])
        gm = first.run(gm, ctx)
        loaded = ir.load_pending(gm)
        gm = rest.run(gm, ctx)
        ir.drop_unused_constants(gm)
        log.info("%s: %d weights read whole from %r, %d bytes of constants in the graph", self.name, loaded,
                 self.checkpoint, ir.constant_bytes(gm))
        return gm, first.records + rest.records

    def _graph_cache_key(self, front: list, args: tuple, kwargs: dict, target: str,
                         opts: CompileOptions) -> tuple[Any, str | None]:
        """The artifact cache and this compile's graph key; no key when the graph cache does not apply."""
        if not opts.graph_cache or opts.verify_each or opts.print_ir_after or opts.quality_budget is not None:
            return None, None
        register_model_pytrees(self.module)
        flat, spec = flatten_inputs(args, kwargs)
        pipeline = ",".join(p.spec() for p in front)
        if opts.plan is not None:  # the plan's assignment is part of what the passes did
            pipeline += f" with precision {sorted(load_plan(opts.plan).precision.items())}"
        key = graph_cache.graph_key(self.module, flat, spec, pipeline, target,
                                    calibrates=any(not p.exact for p in front), context=repr(call_context()),
                                    machine=any(p.measures for p in front),
                                    method=self.method.__name__ if self.method is not None else "forward")
        return (default_cache(), key) if key else (None, None)

    # ------------------------------------------------------------------------------- reporting

    @property
    def eager_signatures(self) -> list[str]:
        """Why each input signature that runs eagerly does (past max_variants; a first call unlike eager)."""
        return [v.reason for v in self._variants.values() if isinstance(v, _Eager)]

    @property
    def variants(self) -> list[Variant]:
        """The compiled variants, in compile order, with those measured slower than eager (which run eagerly:
        their `vs_eager` says so)."""
        return [v if isinstance(v, Variant) else v.compiled for v in self._variants.values()
                if isinstance(v, Variant) or v.compiled is not None]

    def explain(self, *, ir_after_each: bool = False) -> str:
        """Capture method, what each pass did, the final IR and where every op runs."""
        if not self.variants:
            return f"{self.name}: not compiled yet (call it once, or use fxcc.explain with example inputs)"
        v = self.variants[-1]
        checks = "\n\n" + self.unlike_eager_text() if self.unlike_eager or self.stats.checked_calls else ""
        if hasattr(v, "report"):  # a DyCL variant (fxcc.dycl): host program and segments
            return v.report(self.name, ir_after_each=ir_after_each) + checks
        loop = self.decode_loop.text()
        return (explain_variant(self.name, v, ir_after_each=ir_after_each) + "\n\n" + self.compiles_text() + checks
                + (f"\n\n{loop}" if loop else ""))

    def unlike_eager_text(self) -> str:
        """What check_eager="always" found: calls that differed from eager and where, variants not checked."""
        out = [f"== check_eager='always': {self.stats.checked_calls} calls compared with eager"
               + (f", {self.stats.checked_parts} segment calls with their plain Python" if self.stats.checked_parts
                  else "")]
        return "\n".join(out + [f"  {e}" for e in self.unlike_eager])

    def compiles_text(self) -> str:
        """Each compile with its reason (what changed, which guard failed) and the sizes it made symbolic
        (the report above is the last compile's)."""
        out = [f"== compiles of {self.name}: {self.stats.compiles} (eager calls: {self.stats.eager_calls})"]
        for i, reason in enumerate(self.stats.reasons, 1):
            out.append(f"  {i}. {reason}")
        eager = {x.reason: None for x in self._variants.values() if isinstance(x, _Eager)}
        out += [f"  eager: {reason}" for reason in eager]
        return "\n".join(out)


def split_at_codegen(passes: list) -> tuple[list, list]:
    """The passes before the first `codegen` (their IR is what the graph cache keeps) and the rest."""
    i = next((i for i, p in enumerate(passes) if p.name == "codegen"), len(passes))
    return passes[:i], passes[i:]


def resolve_target(target: str, module: nn.Module, args: tuple, kwargs: dict) -> str:
    if target != "auto":
        return target
    tensors = [t for t in [*module.parameters(), *pytree.tree_leaves((args, kwargs))] if isinstance(t, torch.Tensor)]
    return "cuda" if any(t.is_cuda for t in tensors) else "cpu"


def graphable(gm: fx.GraphModule) -> bool:
    """Whether the final IR may run as a CUDA graph (`not_graphable` says why not)."""
    return not_graphable(gm) is None


def not_graphable(gm: fx.GraphModule) -> str | None:
    """Why the final IR may not run as a CUDA graph, or None when it may: every tensor on CUDA and no eager
    region other than a kernel, an aten op writing in place (a KV cache update: a device op like any kernel) or
    reading memory written in place (the views of a static cache that attention reads).

    A CPU op inside a capture would run once, at capture, and never again: such graphs are not captured.
    """
    written = ir.written_in_place(gm)
    for node in gm.graph.nodes:
        eager = node.meta.get("fxcc_eager")
        # a kernel runs on the device whatever its mark says of shape propagation ("no shape function" where
        # fake tensors cannot follow a data-dependent size); one that syncs with the host fails its capture
        device_op = node.op == "call_function" and node.target in KERNEL_OPS or isinstance(
            node.target, torch._ops.OpOverload) and (eager == ir.EAGER_WRITTEN or (
                node.target.namespace == "aten" and (node.target._schema.is_mutable or node in written)))
        if eager and not device_op:
            return f"{node.name} ({op_name(node.target) if node.op == 'call_function' else node.op}) runs eagerly: {eager}"
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (list, tuple)) else [vals]:
            if isinstance(v, torch.Tensor) and v.device.type != "cuda":
                return f"{node.name} is a tensor on {v.device.type}"
    return None


def in_place_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> frozenset[int]:
    """Flat inputs a CUDA graph reads where they are: those the graph writes in place, and the tensors of
    state objects (a KV cache, which keeps its tensors from call to call)."""
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = ir.written_in_place(gm)
    return frozenset({i for i, p in enumerate(places) if p in written} | dynamic.state_tensors(args, kwargs))


def placement(gm: fx.GraphModule, kernels: dict[str, BuiltKernel]) -> list[tuple[str, str, str]]:
    """Where each compute op runs: (node, op, 'kernel.fused[kind] via backend' | 'eager: reason')."""
    rows = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or op_name(n.target) == "py.getitem":
            continue
        if n.op == "call_function" and n.target in KERNEL_OPS:
            k = kernels[n.args[1]]
            ops = Counter(op_name(b.target) for b in k.body.body.graph.nodes if b.op == "call_function")
            rows.append((n.name, f"{op_name(n.target)}[{k.kind}]",
                         f"{k.backend}: " + ", ".join(f"{k}" + (f" x{c}" if c > 1 else "") for k, c in ops.items())))
        elif n.meta.get("fxcc_eager"):
            name = op_name(n.target) if n.op == "call_function" else f"py.{n.op}:{n.target}"
            rows.append((n.name, name, f"eager: {n.meta['fxcc_eager']}"))
    return rows


def explain_variant(name: str, v: Variant, *, ir_after_each: bool = False) -> str:
    cap = v.captured
    out = [f"== {name}: captured with {cap.method}" + (f" (torch.export failed: {cap.export_error})"
                                                         if cap.export_error else "")]
    out.append(f"compile time {v.compile_seconds:.2f} s")
    if v.vs_eager:
        out.append(v.vs_eager)
    if v.no_graph:
        out.append(f"no CUDA graph: {v.no_graph}")
    if getattr(v.cuda_graph, "overlapped", 0):
        out.append(f"CUDA graph: {v.cuda_graph.overlapped} calls ran uncaptured, the caller holding the outputs of "
                   "both its captures (a replay would have overwritten them)")
    if v.quality_loss is not None:
        out.append(f"quality loss {v.quality_loss:.5f} (1 - min cosine vs the exact pipeline, calibration inputs)")
    out.append("\n== passes")
    for r in v.records:
        stats = ", ".join(f"{k}={c}" for k, c in r.result.stats.items()) or ("changed" if r.result.changed else "no change")
        out.append(f"  {r.spec:<28} {r.seconds * 1e3:8.1f} ms  {stats}")
        if r.guards:
            out.append(f"      guards on symbolic sizes: {', '.join(r.guards)}")
    if v.gm.meta.get("fxcc_mixed_precision") is not None:  # per-layer precisions (autotune/mixed_precision.py)
        out.append("\n== " + v.gm.meta["fxcc_mixed_precision"].text())
    if ir_after_each:
        for r in v.records:
            if r.ir_after:
                out.append(f"\n// -----// IR after {r.spec} //----- //\n{r.ir_after}")
    out.append("\n== final IR\n" + ir.print_graph(v.gm))
    rows = placement(v.gm, v.kernels)
    eager = [r for r in rows if r[2].startswith("eager")]
    dialects = Counter(dialect_of(n.target) for n in v.gm.graph.nodes if n.op == "call_function")
    out.append(f"\n== where ops run ({len(rows) - len(eager)} kernels, {len(eager)} eager regions; "
               f"ops by dialect: {dict(dialects)})")
    for node, op, where in rows:
        out.append(f"  %{node:<24} {op:<28} {where}")
    out.append("\n== kernel choices (ms per candidate, fastest fifth of the timed calls; * chosen)")
    for key, k in v.kernels.items():
        t = k.timings_ms
        cands = "  ".join(f"{'*' if b == k.backend else ''}{b} {ms:.3f}" for b, ms in t.items()) or "only candidate"
        src = f" ({k.decided})" if k.decided else " (from the artifact cache)" if k.cached else ""
        params = k.choice.params if k.choice else {}
        extra = f"  params {params}" if params else ""
        out.append(f"  {key} {k.kind:<10} -> {k.backend:<11} {cands}{extra}{src}")
        if k.note:
            out.append(f"      {k.note}")
    return "\n".join(out)


@torch.compiler.disable
def _opaque_call(cm: CompiledModule, args: tuple, kwargs: dict) -> Any:
    """A compiled module called from code that torch.compile traces: Dynamo does not trace into fxcc's runtime
    (its guards, caches and launchers are not traceable), it breaks its graph here and calls the module as it is
    called outside, which fxcc compiled already."""
    return cm(*args, **kwargs)


def _specialized_by(variant: Variant, i: int, dims: Any) -> str:
    """Who made flat input `i`'s sizes `dims` (an int input's value: `()`) numbers in `variant`: the first pass
    whose guards name the symbol export gave it (fxcc.pipeline.PassRecord.guards), else export itself, which gave
    it a number."""
    vals = [n.meta.get("val") for n in variant.gm.graph.nodes if n.op == "placeholder"]
    v = vals[i] if i < len(vals) else None
    sizes = [v] if isinstance(v, (torch.SymInt, torch.SymFloat)) else (
        [v.shape[d] for d in dims if d < v.dim()] if isinstance(v, torch.Tensor) else [])
    symbols = {str(x) for s in sizes if isinstance(s, (torch.SymInt, torch.SymFloat))
               for x in getattr(s.node, "_expr", s.node.expr).free_symbols}  # as export made it, before any guard
    for r in variant.records:
        if symbols and any(symbols & set(re.findall(r"\w+", g)) for g in r.guards):
            return f"pass {r.spec} specialized it"
    return "export specialized it"
