"""Capture: a module and example inputs -> a flat aten-level fx.GraphModule with pytree specs.

torch.export (non-strict) first; torch.fx.symbolic_trace when export fails; when both fail, a
CaptureError that names the user's source line.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dis
import functools
import importlib.metadata
import inspect
import linecache
import logging
import os
import re
import sys
import sysconfig
import textwrap
import traceback
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._functorch import predispatch
from torch._functorch.vmap import lazy_load_decompositions
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from .dynamic import dynamic_shapes, map_top, top_ints
from .ir import fetch_attr, flatten_inputs, written_in_place
from .logs import dropped, held_back, partial_graph_unprinted
from .mask_skip import eager_mask_skip
from .nested_fast_path import eager_fast_path
from .sliding_window import branch_free_sliding_window
from .state import Aliasing, recording, register_state_class, state_objects
from .watch import same_bits

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """Neither torch.export nor torch.fx.symbolic_trace could capture the model."""


@dataclass
class Captured:
    """A captured graph: flat tensor inputs in `in_spec` order, flat outputs rebuilt with `out_spec`.

    `aliasing` says which outputs are the call's own inputs and which input objects (KV caches) the call
    updates: their final state is part of the outputs (fxcc.state).
    """

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    method: str  # "export" or "symbolic_trace"
    export_error: str | None = None
    aliasing: Aliasing = field(default_factory=Aliasing)
    # per module of the model (by id): the names the traced code looked up on it and did not find (None for
    # a module whose lookups could not be watched); fxcc.guards recompiles when one of them is added later
    missing: Missing | None = None
    # int arguments asked to be symbolic that were captured as constants (flat input -> why): their type or text
    # was read, or export failed with them symbolic
    constant_ints: dict[int, str] = field(default_factory=dict)
    # the Python globals the traced code read (`global_reads`); fxcc.guards recompiles when one is rebound
    globals: GlobalReads = field(default_factory=dict)


Missing = dict[int, frozenset[str] | None]
# (id(holder), id(fallback)) -> (holder, fallback, names, path): a globals dict with its builtins as the fallback
# (path None), or the `__dict__` of a module, object or class reached from a global by attribute (`helper.SCALE`,
# `CFG.scale`; no fallback; a class's mappingproxy keyed by the class), with the way to it from the globals dict
# where the chain starts: (that dict, "CFG") for `CFG.scale`. Also read as globals are: the closure of a function
# the traced code ran (a `Closure`, keyed (id of its cells, 2); path None), and the `__dict__` of a compiled bound
# method's object and of objects reached from it by attribute (`self.k`, `self.opts.shift`; path ("self", that
# object, "opts")).
GlobalReads = dict[tuple[int, int], tuple[Any, Any, set[str], tuple | None]]


class Closure:
    """The closure of a function the traced code ran, as a read-only mapping of its free variables' names to what
    their cells hold: a holder of `GlobalReads`, so a `nonlocal` rebound after capture is seen as a rebound global
    is (fxcc.guards.Globals)."""

    __slots__ = ("fn", "cells", "defaults")

    def __init__(self, fn: Any, defaults: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.defaults = defaults is not None  # `_default_cells`: the function's tensor default values
        self.cells = dict(zip(fn.__code__.co_freevars, fn.__closure__)) if defaults is None else defaults

    def get(self, name: str, default: Any = None) -> Any:
        cell = self.cells.get(name)
        try:
            return default if cell is None else cell.cell_contents
        except ValueError:  # an empty cell (a variable not assigned yet)
            return default


def describe(model: Any) -> str:
    """The user's thing, by name: 'LlamaModel', 'my_fn'."""
    if isinstance(model, nn.Module):
        inner = getattr(model, "fn", None)
        if type(model).__name__ == "FunctionModule" and inner is not None:
            return getattr(inner, "__qualname__", repr(inner))
        return type(model).__name__
    return getattr(model, "__qualname__", type(model).__name__)


def check_call(module: nn.Module | Callable, args: tuple, kwargs: dict) -> None:
    """Raise the TypeError eager would raise for a call that does not fit forward's signature (or, for a
    bound method, the method's)."""
    if not isinstance(module, nn.Module):
        fn, module = module, module.__self__
    elif hasattr(module, "fn") and type(module).__name__ == "FunctionModule":
        fn = module.fn
    else:
        fn = original_forward(module)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        if _wrapper_takes(fn, args, kwargs):
            return
        raise TypeError(f"fxcc: {describe(module)} called with arguments that do not fit "
                        f"{getattr(fn, '__name__', 'forward')}{sig}: {e}") from None


def _wrapper_takes(fn: Any, args: tuple, kwargs: dict) -> bool:
    """Whether `fn` is a decorator's wrapper (`functools.wraps`; not `torch.no_grad()` and friends, which pass
    the call on as it is) whose own signature takes this call: it may change the arguments before the
    function it wraps sees them (pop `return_dict`, rename a deprecated keyword)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if not hasattr(fn, "__wrapped__") or code is None or \
            code.co_filename.replace("\\", "/").endswith("torch/utils/_contextlib.py"):
        return False
    try:
        inspect.signature(fn, follow_wrapped=False).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return True


def register_model_pytrees(module: nn.Module) -> None:
    """transformers models return cache objects; make them pytrees so export can flatten them."""
    if not type(module).__module__.startswith("transformers."):
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # older transformers
        try:
            from transformers.integrations.executorch import register_dynamic_cache_export_support
        except ImportError:
            return
        register_dynamic_cache_export_support()
        return
    register_cache_pytrees_for_model(module)
    try:
        from transformers.exporters.exporter_dynamo import is_cache_class
    except ImportError:  # transformers before 5.2x: a cache class is a subclass of its Cache
        from transformers.cache_utils import Cache

        def is_cache_class(cls: type) -> bool:
            return issubclass(cls, Cache)
    for cls in list(pytree.SUPPORTED_NODES):
        if isinstance(cls, type) and cls.__module__.startswith("transformers.") and is_cache_class(cls):
            register_state_class(cls)


def original_forward(module: nn.Module) -> Callable:
    """What `module` computes: its own `forward`, not fxcc's compiled one installed over it (by
    `model.forward = fxcc.compile(model.forward)` or while a compiled module runs `generate`)."""
    fwd = module.__dict__.get("forward")
    if fwd is None or hasattr(fwd, "fxcc"):
        own = type(module).forward
        if hasattr(own, "fxcc") and hasattr(own, "__wrapped__"):  # `@fxcc.compile` on forward in the class body
            own = own.__wrapped__
        return own.__get__(module)
    return fwd


def own_tensors(module: nn.Module, v: Any) -> bool:
    """`v` is a list or tuple of `module`'s own parameters and buffers (and None, and weak references to tensors):
    a second reference to its weights, as nn.RNNBase keeps them (`_flat_weights`, `_flat_weight_refs`), which the
    traced graph reads as the parameters themselves and whose guards cover. A weak reference may outlive the
    parameter it was taken of (RNNBase takes them again only when it rebuilds the list): no way to read a weight."""
    if type(v) not in (list, tuple) or not v:
        return False
    own = {id(t) for t in (*module._parameters.values(), *module._buffers.values()) if t is not None}
    found = False
    for x in v:
        weak = type(x) is weakref.ref
        x = x() if weak else x
        if x is not None and not isinstance(x, torch.Tensor) or not weak and x is not None and id(x) not in own:
            return False
        found = found or x is not None and id(x) in own
    return found


@contextlib.contextmanager
def own_tensors_unwarned(module: nn.Module) -> Iterator[None]:
    """torch.export warns that tensor attributes "were assigned during export" where they are the items of such a
    list (`own_tensors`): nn.RNNBase's forward rebuilds `_flat_weights` from the fake parameters export swapped in,
    and export puts the list back after. The warning is held back where it names those items alone; one that names
    any other tensor attribute passes."""
    items = [re.escape(f"self.{path}.{k}[{i}]" if path else f"self.{k}[{i}]")
             for path, mod in module.named_modules() for k, v in vars(mod).items() if own_tensors(mod, v)
             for i in range(len(v))]
    if not items:
        yield
        return
    item = f"(?:{'|'.join(items)})"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", f"The tensor attributes? {item}(?:, {item})* (?:was|were) assigned during "
                                "export", UserWarning)
        yield


@contextlib.contextmanager
def forward_as(module: nn.Module, fn: Callable | None) -> Iterator[None]:
    """Within the block, `module.forward` is `fn` (the class's own forward for None)."""
    missing = object()
    old = module.__dict__.get("forward", missing)
    if fn is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = fn
    try:
        yield
    finally:
        if old is missing:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = old


@contextlib.contextmanager
def missing_lookups(module: nn.Module) -> Iterator[Missing]:
    """Within the block, record the names looked up on each module of `module`'s tree and not found there.

    Normal attribute lookup finds what is in a module's `__dict__` or on its class; only a name it did not find
    reaches `__getattr__` (nn.Module's looks in `_parameters`, `_buffers`, `_modules`), and one that is not
    there either raises AttributeError (`getattr(self, "scale", 1.0)`, `hasattr`). So an attribute added later
    can change what traced code computed only when its name is recorded here (or it shadows a class attribute,
    or is a parameter, buffer or submodule: fxcc.guards checks those). The recorder is installed on each module
    class for the block, not on nn.Module: fx and export patch nn.Module.__getattr__ while they trace, with a
    wrapper of the original that would bypass one installed there.

    Each module of the tree whose class took the recorder has its entry from the start, empty where it missed no
    name: an entry says its lookups were recorded, so a module without one (its class took no recorder, or it is
    none of the tree's) counts as unknown (fxcc.guards recompiles at any attribute added to it). Another instance
    of a class that took the recorder (a module reached through a global) has an entry where it missed a name."""
    found: Missing = {}
    mods = list(module.modules())
    fn = getattr(module, "fn", None) if type(module).__name__ == "FunctionModule" else None
    if isinstance(getattr(fn, "__self__", None), nn.Module):  # a compiled bound method's object
        mods += list(fn.__self__.modules())
    # the modules the compiled function (or the forward) reads as globals or closure variables
    reads = _values_read(fn if fn is not None else getattr(type(module), "forward", None))
    mods += [m for v in reads if isinstance(v, nn.Module) for m in v.modules()]
    installed: list[tuple[type, Any]] = []
    for cls in dict.fromkeys(type(m) for m in mods):
        own = cls.__dict__.get("__getattr__")
        try:
            cls.__getattr__ = _recorder(cls, own, found)
        except (TypeError, AttributeError):  # a class that takes no attribute: its modules' lookups are unknown
            found.update((id(m), None) for m in mods if type(m) is cls)
            continue
        installed.append((cls, own))
        for m in mods:
            if type(m) is cls:
                found.setdefault(id(m), set())
    try:
        yield found
    finally:
        for cls, own in reversed(installed):
            if own is None:
                del cls.__getattr__
            else:
                cls.__getattr__ = own
    for k, v in list(found.items()):
        found[k] = None if v is None else frozenset(v)


def _values_read(fn: Any) -> list[Any]:
    """What function `fn` holds in its closure and the globals its code names: the objects it reads directly."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if not isinstance(fn, types.FunctionType) or code is None:
        return []
    cells = [c.cell_contents for c in fn.__closure__ or () if _full(c)]
    return cells + [fn.__globals__[n] for n in code.co_names if n in fn.__globals__]


def _recorder(cls: type, own: Any, found: dict) -> Callable[[Any, str], Any]:
    """`cls.__getattr__` that records each name it raises AttributeError for, per object, in `found`; it calls
    the class's own `__getattr__`, or the next one up its bases (nn.Module's, or the tracer's patch of it)."""

    def __getattr__(self: Any, name: str) -> Any:
        try:
            return own(self, name) if own is not None else super(cls, self).__getattr__(name)
        except AttributeError:
            names = found.setdefault(id(self), set())
            if names is not None:
                names.add(name)
            raise

    return __getattr__


@contextlib.contextmanager
def unchanged_conversions_skipped() -> Iterator[None]:
    """Within the block, a module conversion that changes none of its tensors returns the module as it is.

    A forward may convert a submodule (Switch Transformers' router: `self.classifier = self.classifier.to(
    self.dtype)`); under export its parameters are fake tensors, which `nn.Module._apply` replaces with
    `swap_tensors`, and that fails ("Couldn't swap Linear.weight") even when the conversion is a no-op.
    """
    original = nn.Module._apply

    def _apply(self: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
        mods = self.modules() if recurse else (self,)
        tensors = [t for m in mods for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        with torch.no_grad():
            if all(fn(t) is t for t in tensors):
                return self
        return original(self, fn, recurse)

    nn.Module._apply = _apply
    try:
        yield
    finally:
        nn.Module._apply = original


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _sdpa_deciding_flags(*args: Any, **kwargs: Any) -> Any:
    args = tuple(bool(a) if isinstance(a, torch.SymBool) else a for a in args)
    kwargs = {k: bool(v) if isinstance(v, torch.SymBool) else v for k, v in kwargs.items()}
    return _SDPA(*args, **kwargs)


@contextlib.contextmanager
def symbolic_flags_decided() -> Iterator[None]:
    """Within the block, `F.scaled_dot_product_attention` takes a symbolic bool for its flags: `is_causal=t > 1`,
    the decode loop's test of its step's length (transformers' `query.shape[2] > 1` too). The op takes a Python
    bool only, and a trace with the length symbolic hands it a SymBool, which failed the capture: the length then
    stayed static, a compile per prompt length. The flag is decided as dynamo decides it, `bool()` on it: a guard
    on the length (t >= 2) that the variant's shape guard holds, so a call on the other side (t = 1) compiles its
    own variant."""
    torch.nn.functional.scaled_dot_product_attention = _sdpa_deciding_flags
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


def capture(module: nn.Module, args: tuple, kwargs: dict, *, dims: dict[int, set[int]] | None = None,
            forward: Callable | None = None, unread: str | None = None) -> Captured:
    """Capture `module` (calling `forward`, by default its own) for these inputs, with the input
    dimensions in `dims` (flat input -> dimensions) symbolic; `Captured.missing` says which attributes
    the traced code looked up on each of its modules and did not find.

    An int argument in `dims` is traced as a symbolic int, which computes as the int does (sizes, slices,
    `range`, comparisons: export guards or specializes them) but fails `isinstance(n, int)` and prints as its
    symbol. A float argument in `dims` is traced as a symbolic float (`symbolic_floats`), which computes as the
    Python float does (double precision, a Python scalar's dtype promotion) and fails wherever the program needs
    its value (a branch, a size, `math`). Where the model's code may read the type or the text of one
    (`int_type_reads`), or export fails with them symbolic, the capture is made again with these arguments
    constants (`Captured.constant_ints`).

    `unread`: why fxcc cannot read the forward's source (so DyCL found no Python effects in it): a trace that
    changes the module's attributes, a closure cell or a container among them is then a CaptureError (the graph
    would make the change once, at capture). `Captured.globals`: the Python globals the traced code read."""
    passed = next((v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, nn.Module)), None)
    if passed is not None:
        # export lifts a module argument's parameters and buffers as graph inputs, which the call's flat inputs (the
        # module one leaf) never supply
        raise CaptureError(f"fxcc cannot capture {describe(module)}: it is given a module ({type(passed).__name__}) "
                           "as an argument; compile that module itself (fxcc.compile(model)), or make it an "
                           "attribute of the module compiled")
    read: GlobalReads = {}
    cap = _capture_attempts(module, args, kwargs, dims, forward, unread, read)
    cap.globals = read
    return cap


def _capture_attempts(module: nn.Module, args: tuple, kwargs: dict, dims: dict[int, set[int]] | None,
                      forward: Callable | None, unread: str | None, read: GlobalReads) -> Captured:
    floats = frozenset(top_ints(args, kwargs, float) & (dims or {}).keys())
    ints = frozenset(top_ints(args, kwargs) & (dims or {}).keys())
    # symbolic ints and floats; where that fails, the ints alone (a float branched on keeps a symbolic step); where
    # that fails too and there are a few ints, all but one of them, each in turn: one int whose use export cannot
    # take symbolic (`is_causal=t > 1`, a SymBool) need not keep the others constant (a decode loop's position)
    attempts = [ints | floats] + [ints] * bool(ints and floats) if ints | floats else []
    singles = [ints - {i} for i in sorted(ints)] if 1 < len(ints) <= _ONE_AT_A_TIME else []
    scalars = ints | floats
    constant: dict[int, str] = {}  # why each one was made a constant, in the attempt that gave it up
    for k, symbolic in enumerate([*attempts, *singles]):
        watched: set[Any] = set()
        tried = {i: ds for i, ds in dims.items() if i in symbolic or i not in scalars}
        with missing_lookups(module) as missing, int_type_reads(watched) as reads:
            try:
                cap = _capture(module, args, kwargs, dims=tried, forward=forward, watched=watched,
                               floats=symbolic & floats, unread=unread, read=read)
            except CaptureError as e:
                cap, why = None, _symbolic_failure(e)
        if cap is not None and cap.method == "export" and not reads:
            cap.missing = missing
            cap.constant_ints = {i: constant[i] for i in sorted(scalars - symbolic)}
            return cap
        why = (f"the model's code may read its type or text ({reads[0]})" if reads else
               why if cap is None else f"export failed with it symbolic: {cap.export_error or cap.method}")
        if k < len(attempts):
            unmade = symbolic & floats if len(attempts) > 1 and k == 0 else symbolic
            constant.update(dict.fromkeys(sorted(unmade), why))
    with missing_lookups(module) as missing:
        static = {i: ds for i, ds in dims.items() if i not in scalars} if scalars else dims
        cap = _capture(module, args, kwargs, dims=static, forward=forward, unread=unread, read=read)
    cap.missing = missing
    cap.constant_ints = constant
    return cap


# at most this many symbolic int arguments are tried one at a time as constants (a capture each) when all of them
# symbolic failed
_ONE_AT_A_TIME = 4


def _symbolic_failure(e: Exception) -> str:
    """Why a capture with symbolic int or float arguments failed, for the recompile's reason."""
    cause = e.__cause__ or e
    first = _first_line(cause) if str(cause) else type(cause).__name__
    if type(cause).__name__ == "GuardOnDataDependentSymNode":  # a symbolic float's value decides something
        return f"the program needs its value ({first})"
    return f"export failed with it symbolic: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def symbolic_floats(fn: Callable, floats: frozenset[int], watched: set[Any] | None) -> Callable:
    """`fn` for a capture whose float arguments at flat inputs `floats` are given as 0-d float64 tensors: it reads
    each back with `.item()` (a symbolic float, unbacked: export can guard nothing on its value, so a program
    that branches on it or computes a size from it fails, never specializes) and calls `fn` with the number.
    Its symbols are added to `watched` (`int_type_reads`). `floats_read_directly` then makes the captured graph
    take the Python float itself."""

    def read(t: torch.Tensor) -> Any:
        v = t.item()
        if watched is not None and isinstance(v, torch.SymFloat):
            watched.update(v.node.expr.free_symbols)
        return v

    @functools.wraps(fn)
    def reading(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = map_top(args, kwargs, floats, read)
        return fn(*args, **kwargs)

    if hasattr(fn, "__signature__"):
        reading.__signature__ = fn.__signature__
    return reading


def floats_read_directly(gm: fx.GraphModule, floats: frozenset[int]) -> None:
    """The graph of a `symbolic_floats` capture made to take those inputs as Python floats: each placeholder's
    `.item()` is the placeholder itself, whose value is the symbolic float; anything else reading the 0-d tensor
    is a CaptureError (the capture is made again with the float a constant)."""
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in sorted(floats):
        p = places[i]
        users = list(p.users)
        if not users:  # the graph does not read it: any value computes the same (a fresh symbol says so)
            mode = detect_fake_mode([q.meta.get("val") for q in places])
            if mode is None or mode.shape_env is None:
                raise CaptureError(f"float input {p.name} is unused and the graph has no shape environment")
            p.meta["val"] = mode.shape_env.create_unbacked_symfloat()
            p.meta.pop("tensor_meta", None)
            continue
        if any(u.target is not torch.ops.aten.item.default for u in users):
            raise CaptureError(f"float input {p.name} is read other than as a number")
        p.meta["val"] = users[0].meta["val"]
        p.meta.pop("tensor_meta", None)
        for u in users:
            u.replace_all_uses_with(p)
            gm.graph.erase_node(u)


# names whose use may tell a symbolic int from an int by its type (its text is seen where it is made)
_TYPE_READS = frozenset({"isinstance", "type", "issubclass", "__class__", "Integral", "Number", "Real"})
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


@contextlib.contextmanager
def int_type_reads(watched: set[Any]) -> Iterator[list[str]]:
    """Within the block, record where code outside torch and fxcc may read the type or reads the text of a symbolic
    int argument. A type test (`isinstance(n, int)`, `type(n)`) cannot be seen happen: a function called with one
    (or with a tuple, list or dict holding one) among its arguments whose code names a type test counts
    (conservative: it may test another value). The text (`f"{n}"`, `str(n)`, `"%s" % n`, `print(n)`, a value
    computed from it or a container holding it) is seen where it is made: the symbolic value's `__repr__`,
    `__str__` or `__format__` called from that code, or from the standard library on its behalf (`str.format`,
    `pprint`). An f-string of another value (`cache[f"k{i}"]` beside the int) reads nothing.

    `watched` holds the symbols of the int arguments: `watch_ints` adds them when the traced forward is
    entered (its top-level SymInts are those of the int arguments)."""
    found: list[str] = []
    suspect: dict[Any, bool] = {}
    skip: dict[str, bool] = {}
    library: dict[str, bool] = {}
    previous = sys.gettrace()

    def foreign(path: str) -> bool:
        if path not in skip:
            skip[path] = _handles_symbols(path)
        return not skip[path]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        local = previous(frame, event, arg) if previous is not None else None
        if event != "call" or not watched or not foreign(frame.f_code.co_filename):
            return local
        code = frame.f_code
        bad = suspect.get(code)
        if bad is None:
            bad = suspect[code] = bool(_TYPE_READS.intersection(code.co_names))
        if bad and _holds(frame.f_locals.values(), watched):
            found.append(f"{code.co_name} at {code.co_filename}:{frame.f_lineno}")
        return local

    def reader() -> Any:
        """The frame that asked for the text: the first one out of the standard library."""
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if path not in library:
                library[path] = _stdlib(path)
            if not library[path]:
                return frame
            frame = frame.f_back
        return None

    def reading(original: Any) -> Any:
        def read(self: Any, *a: Any) -> Any:
            if watched and _holds([self], watched) and (caller := reader()) and foreign(caller.f_code.co_filename):
                found.append(f"{caller.f_code.co_name} at {caller.f_code.co_filename}:{caller.f_lineno} "
                             "makes its text")
            return original(self, *a)
        return read

    texts = {(c, name): getattr(c, name) for c in _SYMBOLIC for name in ("__repr__", "__str__", "__format__")}
    for (c, name), original in texts.items():
        setattr(c, name, reading(original))
    sys.settrace(tracer)
    try:
        yield found
    finally:
        sys.settrace(previous)
        for (c, name), original in texts.items():
            if name in vars(c) and original is getattr(object, name):  # inherited from object: inherited again
                delattr(c, name)
            else:
                setattr(c, name, original)


_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
# Globals of libraries that grow as other modules are imported and that no graph's values depend on: not guarded.
# transformers registers each ModelOutput class as a pytree node once, when the first instance is made, and
# remembers it in this set; keying a graph on the set's contents made a process that had imported another model
# (whose module defines its own output classes) miss the graph another process stored.
_REGISTRIES = {"transformers.utils.generic": frozenset({"_registered_model_output_types"})}
_NO_LOADS = (frozenset(), (), ())  # `_global_loads` of model code that loads no global
_ATTR_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
_ABSENT = object()


def reading_globals(fn: Callable, read: GlobalReads, roots: tuple = (), reached: Reached | None = None) -> Callable:
    """`fn` recording into `read` the globals its run loads (`global_reads`, from `roots`: the compiled function),
    and into `reached` the tensors it reaches that are none of its inputs: the hook is on while the traced forward
    runs only, not while export prepares and lowers around it (the hook slows every Python call)."""

    @functools.wraps(fn)
    def reading(*args: Any, **kwargs: Any) -> Any:
        if reached is not None:  # also where the hook does not look (a function defined by exec)
            for root in roots:
                reached.reach_function(root)
        with global_reads(read, roots, reached):
            return fn(*args, **kwargs)

    if hasattr(fn, "__signature__"):
        reading.__signature__ = fn.__signature__
    return reading


@contextlib.contextmanager
def global_reads(found: GlobalReads | None = None, roots: tuple = (),
                 reached: Reached | None = None) -> Iterator[GlobalReads]:
    """Within the block, record the globals that Python code run in it can load: for each function called whose
    code is the model's (`_model_code`: not torch's, its dependencies', fxcc's or the standard library's, and
    not a module body run by an import), every name its code loads as a
    global (LOAD_GLOBAL, LOAD_NAME) with the globals dict and the builtins it resolves in, and the attributes it
    reads from a global that is a module or an object with a `__dict__` (`helper.SCALE`, `CFG.scale`: that
    `__dict__` and the name). A trace hook on calls only, chained with any other (`int_type_reads` installs its
    own inside). Every name the code can load counts, taken or not: a guard on one too many costs a recompile
    when it is rebound, never a wrong result.

    Two more kinds of state are read the same way. The closures (`Closure`) of the functions that ran, found from
    `roots` (the compiled function), the functions the globals read hold, and those their closures hold; and,
    where a root is a bound method of an object that is no module (a module's attributes are fxcc.guards'), the
    attributes the code reads off that object as its first argument (`self.k`, `self.opts.shift`).

    `reached`: where given, each call of model code adds to it the tensors it can reach that are none of the
    traced inputs (`Reached.reach`), before its body runs."""
    found = {} if found is None else found
    loads: dict[Any, Any] = {}  # code object -> its loads (None: code whose globals are not recorded)
    skip: dict[str, bool] = {}
    previous = sys.gettrace()
    ran: set[Any] = set()  # model code that ran (its function's closure and tensor defaults are guarded)
    selves = {id(o): o for r in roots if _plain_object(o := getattr(r, "__self__", None))}

    def first(frame: Any) -> Any:
        code = frame.f_code
        path = code.co_filename
        if path not in skip:
            skip[path] = _handles_symbols(path)
        model = not skip[path] and _model_code(frame)
        # model code that loads nothing is still looked into for the tensors it reaches (its default values)
        mine = (_global_loads(code) or (_NO_LOADS if reached is not None else None)) if model else None
        registries = _REGISTRIES.get(frame.f_globals.get("__name__")) if mine else None
        if registries and registries & mine[0]:
            mine = (mine[0] - registries, *mine[1:])
        loads[code] = mine
        return mine

    # the global trace function sees "call" events only; it runs at every Python call of the capture (export's own
    # included), so the common case, a code object seen before that is not the model's, is one dict lookup
    def tracer(frame: Any, event: str, arg: Any) -> None:
        mine = loads.get(frame.f_code, _ABSENT)
        if mine is None:
            return
        if mine is _ABSENT:
            mine = first(frame)
        if mine is not None:
            if reached is not None:
                reached.reach(frame, mine)
            _record_reads(found, frame.f_globals, frame.f_builtins, mine)
            if mine[2]:
                _record_own(found, frame, mine[2], selves)
            ran.add(frame.f_code)

    def chained(frame: Any, event: str, arg: Any) -> Any:
        tracer(frame, event, arg)
        return previous(frame, event, arg)

    sys.settrace(tracer if previous is None else chained)
    try:
        yield found
    finally:
        sys.settrace(previous)
        if ran:
            _record_closures(found, roots, ran, modules=True)


def _record_own(found: GlobalReads, frame: Any, chains: tuple, selves: dict[int, Any]) -> None:
    """Record the attribute chains read off the frame's first argument, where that is a compiled bound method's
    object (`selves`), and off its free variables that hold plain objects (a closure's `cfg.scale`)."""
    code, values = frame.f_code, frame.f_locals
    first = code.co_varnames[0] if code.co_argcount else None
    for chain in chains:
        obj = values.get(chain[0], _ABSENT)
        if chain[0] == first and chain[0] not in code.co_freevars:
            if id(obj) in selves:
                _follow(found, obj, chain, ("self", obj))
        elif _plain_object(obj):
            _follow(found, obj, chain, ("closure", chain[0]))


_MAX_FUNCTIONS = 256  # functions visited looking for the closures of the code that ran


def _record_closures(found: GlobalReads, roots: tuple, ran: set[Any], modules: bool = False) -> None:
    """Record the closure of each function whose code ran (`ran`), found from `roots`, from the functions the
    recorded globals hold, and from the functions those closures hold in turn; with `modules`, also from the
    modules among them (a root's bound method's too): the functions their modules' classes define whose code ran
    (`_functions_run`)."""
    todo = list(roots)
    for holder, fallback, names, _ in list(found.values()):
        todo += [holder.get(n, fallback.get(n) if fallback is not None else None) for n in names]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_FUNCTIONS:
        fn = todo.pop()
        mod = getattr(fn, "__self__", fn) if modules else None
        if isinstance(mod, nn.Module) and id(mod) not in seen:
            seen.add(id(mod))
            todo += _functions_run(mod, ran)
        fn = getattr(fn, "__func__", fn)  # a bound method's function
        if not isinstance(fn, types.FunctionType) or id(fn) in seen:
            continue
        seen.add(id(fn))
        wrapped = fn.__dict__.get("__wrapped__")
        if wrapped is not None:
            todo.append(wrapped)
        if (fn.__defaults__ or fn.__kwdefaults__) and fn.__code__ in ran:
            cells = _default_cells(fn)
            if cells:
                found[(id(fn), 3)] = (Closure(fn, cells), None, set(cells), None)
        if fn.__closure__ is None:
            continue
        closure = Closure(fn)
        todo += [closure.get(n) for n in closure.cells]
        if fn.__code__ in ran:
            key = (id(fn.__closure__), 2)
            entry = found.get(key)
            if entry is None:
                entry = found[key] = (closure, None, set(), None)
            entry[2].update(fn.__code__.co_freevars)


class _DefaultCell:
    """A parameter's default value read as a closure cell is (`cell_contents`, now): export makes a default tensor
    the call did not override a constant of the graph, so a change in place (a snapshot, fxcc.guards.Globals) or
    a new default (`f.__defaults__ = ...`, a rebinding) must recompile."""

    __slots__ = ("fn", "at")

    def __init__(self, fn: types.FunctionType, at: int | str) -> None:
        self.fn, self.at = fn, at  # an index into __defaults__, or a keyword-only parameter's name

    @property
    def cell_contents(self) -> Any:
        d = self.fn.__kwdefaults__ if isinstance(self.at, str) else self.fn.__defaults__
        try:
            return d[self.at]
        except (TypeError, IndexError, KeyError):
            raise ValueError("no default") from None  # as an empty cell reads


def _default_cells(fn: types.FunctionType) -> dict[str, _DefaultCell]:
    """The parameters of `fn` whose default values hold tensors, each as a `_DefaultCell`."""
    code, defaults = fn.__code__, fn.__defaults__ or ()
    names = code.co_varnames[code.co_argcount - len(defaults):code.co_argcount]
    out = {n: _DefaultCell(fn, i) for i, (n, v) in enumerate(zip(names, defaults)) if _holds_tensor(v)}
    out |= {n: _DefaultCell(fn, n) for n, v in (fn.__kwdefaults__ or {}).items() if _holds_tensor(v)}
    return out


def _holds_tensor(v: Any, depth: int = 0) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if depth < 3 and type(v) in (list, tuple, dict):
        return any(_holds_tensor(x, depth + 1) for x in (v.values() if type(v) is dict else v))
    return False


def _functions_run(module: nn.Module, ran: set[Any]) -> list[types.FunctionType]:
    """The functions the classes of `module`'s modules define in the user's files (`_own_functions`) whose code
    ran: nothing else leads to a submodule's forward, whose closure holds what the factory function that defined
    its class was given (`def make(scale): class Block(nn.Module): ...`). Not an installed library's classes
    (transformers'), as the graph cache's key has them by version only: their closures are decorators' (a guard on
    each of their cells would cost every call)."""
    return [fn for _, _, fn in _own_functions(module) if fn.__code__ in ran]


def _own_functions(module: nn.Module) -> Iterator[tuple[type, str, types.FunctionType]]:
    """The functions (methods, static and class methods, properties' accessors) that the classes of the model's
    modules define in the user's files (`_own_class`), in the same order in every process."""
    seen: set[type] = set()
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls in seen or not _own_class(cls):
                continue
            seen.add(cls)
            for name, attr in vars(cls).items():  # in definition order
                for fn in (getattr(attr, "__func__", attr), *(getattr(attr, a, None) for a in ("fget", "fset"))):
                    if isinstance(fn, types.FunctionType):
                        yield cls, name, fn


def _own_class(cls: type) -> bool:
    """A class of the user's files (not torch's, a library's or the standard library's: their versions key them)."""
    if cls.__module__ == "builtins" or cls.__module__.partition(".")[0] == "torch":
        return False
    path = _source_file(cls)
    return path is not None and in_project(path)


def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None


@functools.cache
def in_project(path: str) -> bool:
    """Whether a module file lies outside the Python installation (its standard library and site-packages)."""
    roots = install_roots()
    return not (path.startswith(roots) or os.path.realpath(path).startswith(roots))


@functools.cache
def install_roots() -> tuple[str, ...]:
    """The interpreter's library folders, and any other site-packages on sys.path (a .pth file or a venv
    with system site packages adds another installation's)."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")}
    return tuple(sorted(paths | {os.path.realpath(p) for p in paths}))


def _plain_object(v: Any) -> bool:
    """An object whose attributes a guard compares as a globals dict's names: its own `__dict__`, and neither a
    module (fxcc.guards watches those), a tensor, a class nor a Python module."""
    return type(getattr(v, "__dict__", None)) is dict and not isinstance(
        v, (nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType))


def _model_code(frame: Any) -> bool:
    """Whether the code run in `frame` is code of the model (its own or a library's such as transformers) rather
    than what torch runs while it traces (torch calls sympy, networkx, typing's `eval`): a function of an
    imported module (or of `__main__`) that is none of torch's dependencies, fxcc or the standard library.
    Module and class bodies and what an import runs (a module imported for the first time inside the trace) are
    no part of what is traced. Decided at the first call of each code object."""
    if not frame.f_code.co_flags & inspect.CO_OPTIMIZED:
        return False
    g = frame.f_globals
    name = g.get("__name__")
    mod = sys.modules.get(name) if isinstance(name, str) else None
    if mod is None or getattr(mod, "__dict__", None) is not g or name.partition(".")[0] in _torch_dependencies():
        return False
    path = getattr(mod, "__file__", None)
    if not (name == "__main__" if path is None else not _handles_symbols(os.path.abspath(path))):
        return False
    f = frame.f_back
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            return False
        f = f.f_back
    return True


@functools.cache
def _torch_dependencies() -> frozenset[str]:
    """The import names of torch's required packages and theirs (sympy, mpmath, networkx, ...)."""
    found: set[str] = set()
    todo = ["torch"]
    while todo:
        try:
            reqs = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in reqs:
            dist = re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].strip().lower().replace("-", "_")
            if "extra ==" not in r and dist and dist not in found:
                found.add(dist)
                todo.append(dist)
    return frozenset(found)


def _global_loads(code: Any) -> tuple | None:
    """The names `code` loads as globals, the attribute chains read off them (`helper.SCALE` -> ('helper',
    'SCALE')), the attribute chains read off its first argument or a free variable (`self.k` -> ('self', 'k'),
    `cfg.scale` of a closure's `cfg`) and whether it has free variables (a closure); None when there is none."""
    names: set[str] = set()
    chains: set[tuple[str, ...]] = set()
    own: set[tuple[str, ...]] = set()  # off the first argument or a free variable
    first = code.co_varnames[0] if code.co_argcount else None
    local = {first, *code.co_freevars}

    def ins_global(name: str) -> bool:
        return name not in local
    chain: list[str] | None = None
    for ins in dis.get_instructions(code):
        if ins.opname in _ATTR_LOADS and chain is not None:
            chain.append(ins.argval)
            continue
        if chain is not None and len(chain) > 1:
            (chains if ins_global(chain[0]) else own).add(tuple(chain))
        chain = None
        if ins.opname in _GLOBAL_LOADS:
            names.add(ins.argval)
            chain = [ins.argval]
        elif ins.opname == "LOAD_FAST" and ins.argval == first or \
                ins.opname == "LOAD_DEREF" and ins.argval in code.co_freevars:
            chain = [ins.argval]
    if chain is not None and len(chain) > 1:
        (chains if ins_global(chain[0]) else own).add(tuple(chain))
    if not (names or own or code.co_freevars):
        return None
    return frozenset(names), tuple(chains), tuple(own)


def _record_reads(found: GlobalReads, g: dict, b: dict, loads: tuple) -> None:
    names, chains = loads[0], loads[1]
    if not names:
        return
    entry = found.get((id(g), id(b)))
    if entry is None:
        entry = found[(id(g), id(b))] = (g, b, set(), None)
    entry[2].update(names)
    for chain in chains:
        value = g.get(chain[0], _ABSENT)
        if value is _ABSENT:
            value = b.get(chain[0], _ABSENT)
        _follow(found, value, chain, (g, chain[0]))


def _follow(found: GlobalReads, value: Any, chain: tuple[str, ...], path: tuple) -> None:
    """Record the attributes `chain[1:]` read one after the other starting from `value` (what `path` leads to),
    each in the `__dict__` it is found in (a class's: its mappingproxy), as far as the objects have one."""
    for attr in chain[1:]:
        try:
            d = getattr(value, "__dict__", None) if value is not _ABSENT else None
        except Exception:  # noqa: BLE001 - an object whose attribute lookup fails: not followed
            d = None
        if type(d) is not dict and not isinstance(value, type):
            break
        key = (id(value), 1) if isinstance(value, type) else (id(d), 0)  # a class's mappingproxy is made anew
        entry = found.get(key)
        if entry is None:
            entry = found[key] = (d, None, set(), path)
        entry[2].add(attr)
        value = d.get(attr, _ABSENT)
        path = (*path, attr)


def _handles_symbols(path: str) -> bool:
    """Whether code in file `path` handles symbolic ints as torch means them: torch's, fxcc's and the standard
    library's (`inspect` binding arguments, `functools` wrappers; not the packages installed beside it)."""
    own = [os.path.dirname(torch.__file__)] + [os.path.dirname(sys.modules[m].__file__) for m in (
        "fxcc", "fxcc.passes", "fxcc.codegen", "fxcc.autotune") if m in sys.modules]
    return any(path.startswith(os.path.join(os.path.abspath(d), "")) for d in own) or _stdlib(path)


def _stdlib(path: str) -> bool:
    """Whether code in file `path` is the standard library's (not a package installed beside it)."""
    stdlib = os.path.join(os.path.abspath(sysconfig.get_paths()["stdlib"]), "")
    return path.startswith("<frozen") or (path.startswith(stdlib) and "site-packages" not in path[len(stdlib):])


def _holds(values: Any, watched: set[Any]) -> bool:
    """Whether a symbolic value among `values` (or in a tuple, list or dict among them) is of a `watched` symbol."""
    for v in values:
        for x in (v.values() if type(v) is dict else v if type(v) in (tuple, list) else (v,)):
            if type(x) in (torch.SymInt, torch.SymFloat, torch.SymBool) and x.node.expr.free_symbols & watched:
                return True
    return False


_data_address = torch._C._data_address  # a storage's data pointer, read without asking for write access
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # a vmap's batched value, a functional wrapper
_MODULE_KEYS = frozenset(vars(nn.Module()))  # what every module's `__dict__` holds: its parameters, buffers, hooks
_MAX_ITEMS = 64  # entries of one container or object looked into for tensors
_MAX_DEPTH = 2  # levels of objects and containers looked into from a value a frame holds (`obj.cfg.t`, `self.o.t`)


class Reached:
    """The tensors the traced forward reached that are none of the traced inputs, each with a copy-on-write clone
    (`torch._lazy_clone`: no copy until one of the two is written) of what it held when first reached: a global
    (or an attribute of a global module or object), a closure variable, a parameter's default value, an attribute
    of an object the call was given or of a module (not its parameters and buffers). The trace runs the forward's
    Python on them for real, so an in-place write (`G.add_(1)`) lands in them at capture; `undo` gives each one
    written its values back."""

    def __init__(self) -> None:
        self.kept: dict[int, list[Any]] = {}  # id -> [tensor, version, address, clone, copy-on-write, where]
        self.walked: dict[int, Any] = {}  # objects and containers looked into (held: their ids stay theirs)

    def reach(self, frame: Any, loads: tuple) -> None:
        """At a call of model code (`global_reads`, before its body runs): the tensors among its arguments (default
        values included) and free variables, among the globals it loads (`_global_loads`) and the attributes it
        reads off them, and in the objects, modules and containers these hold."""
        code = frame.f_code
        at = f" in {getattr(code, 'co_qualname', code.co_name)}"
        for name, value in frame.f_locals.items():
            self._walk(value, name, at, 0)
        g, module = frame.f_globals, _a_global_of(frame.f_globals)
        for name in loads[0]:
            self._walk(g.get(name), name, module, 0)
        for chain in loads[1]:  # `helper.G`: a Python module is not looked into as a whole
            value = g.get(chain[0])
            for attr in chain[1:]:
                d = getattr(value, "__dict__", None) if isinstance(value, (types.ModuleType, type)) else None
                value = d.get(attr) if d is not None else None
            self._walk(value, ".".join(chain), module, 0)

    def reach_function(self, fn: Any) -> None:
        """What function `fn` (a compiled function or forward) reaches before it runs: its closure variables,
        default values and the globals its code loads."""
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if not isinstance(fn, types.FunctionType) or code is None:
            return
        at = f" in {fn.__qualname__}"
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            if _full(cell):
                self._walk(cell.cell_contents, name, at, 0)
        defaults = fn.__defaults__ or ()
        for name, value in zip(code.co_varnames[code.co_argcount - len(defaults):code.co_argcount], defaults):
            self._walk(value, name, at, 0)
        for name, value in (fn.__kwdefaults__ or {}).items():
            self._walk(value, name, at, 0)
        loads = _global_loads(code)
        for name in loads[0] if loads else ():
            self._walk(fn.__globals__.get(name), name, _a_global_of(fn.__globals__), 0)

    def _walk(self, v: Any, name: str, at: str, depth: int) -> None:
        t = type(v)
        if t is torch.Tensor or t is nn.Parameter:  # a traced input is a FakeTensor (export) or a Proxy (fx)
            if id(v) not in self.kept:
                self._keep(v, f"`{name}`{at}")
            return
        if v is None or t in (int, float, bool, str) or depth >= _MAX_DEPTH or id(v) in self.walked:
            return
        if t in (list, tuple):
            self.walked[id(v)] = v
            for i, x in enumerate(v[:_MAX_ITEMS]):
                self._walk(x, f"{name}[{i}]", at, depth + 1)
        elif t is dict:
            self.walked[id(v)] = v
            for k, x in list(v.items())[:_MAX_ITEMS]:
                self._walk(x, f"{name}[{k!r}]", at, depth + 1)
        elif isinstance(v, nn.Module):
            for path, m in v.named_modules():
                if id(m) in self.walked:
                    continue
                self.walked[id(m)] = m
                for k, x in list(vars(m).items())[:_MAX_ITEMS]:
                    if k not in _MODULE_KEYS:
                        self._walk(x, ".".join(p for p in (name, path, k) if p), at, depth + 1)
        elif _plain_object(v) and not t.__module__.startswith("torch"):  # not a Proxy, a SymInt's node, a tracer
            self.walked[id(v)] = v
            for k, x in list(vars(v).items())[:_MAX_ITEMS]:
                self._walk(x, f"{name}.{k}", at, depth + 1)

    def _keep(self, t: torch.Tensor, where: str) -> None:
        # a stand-in of a weight (fxcc.weights) has no values; a vmapped or functionalized value is traced
        if t.is_meta or t.layout is not torch.strided or _functorch_wrapped(t):
            return
        # taken inside the trace: export's modes would make the clone a fake tensor and a node of the graph
        with _disable_current_modes(), torch._C.DisableTorchFunction(), torch.no_grad():
            try:
                clone, cow = torch._lazy_clone(t.detach()), True
            except (RuntimeError, TypeError, NotImplementedError):
                clone, cow = t.detach().clone(), False
        self.kept[id(t)] = [t, t._version, _data_address(t), clone, cow, where]

    def undo(self) -> list[tuple[torch.Tensor, str]]:
        """Give each kept tensor written since it was kept (or since the last `undo`) its values back; returns
        those, each with where the forward reached it."""
        written = []
        for entry in self.kept.values():
            t, version, address, clone, cow, where = entry
            if t._version == version and (cow and _data_address(t) == address or (
                    t.shape == clone.shape and t.stride() == clone.stride() and same_bits(t, clone))):
                continue  # unwritten (a write through `.data`, which counts apart, moves a copy-on-write buffer)
            with torch.no_grad():
                if t.shape == clone.shape:
                    t.copy_(clone)
                else:  # resized
                    t.set_(clone.clone())
            entry[1], entry[2] = t._version, _data_address(t)
            written.append((t, where))
        return written


def _a_global_of(g: dict) -> str:
    name = g.get("__name__")
    return f" (a global of {name})" if isinstance(name, str) else " (a global)"


def _writes_kept(gm: fx.GraphModule, written: list[tuple[torch.Tensor, str]], module: nn.Module) -> None:
    """Capture gave the tensors in `written` their values back (`Reached.undo`): the captured graph must make those
    writes itself, into constants that are those tensors (export lifts a global or an attribute as such a
    constant); a write it does not make (symbolic_trace ran it on the real tensor and recorded nothing) is a
    CaptureError."""
    if not written:
        return
    consts = [fetch_attr(gm, n.target) for n in written_in_place(gm) if n.op == "get_attr"]
    kept = {c.untyped_storage()._cdata for c in consts if isinstance(c, torch.Tensor)}
    lost = [where for t, where in written if t.untyped_storage()._cdata not in kept]
    if lost:
        raise CaptureError(f"fxcc cannot capture {describe(module)}: its forward wrote in place into {lost[0]}, a "
                           "tensor that is none of the call's inputs, and the traced graph would not make that write "
                           "at its calls (capture gave the tensor its values back)\n  To proceed: pass the tensor as "
                           "an argument, register it as a buffer of the module, or run this module eagerly.")


def watch_effects(fn: Callable, module: nn.Module, found: list[str]) -> Callable:
    """`fn` adding to `found` what its run changed in `module`'s state (ModuleState), looked at from its start
    to its end (export undoes attribute stores after its trace)."""

    @functools.wraps(fn)
    def watching(*args: Any, **kwargs: Any) -> Any:
        state = ModuleState(module)
        out = fn(*args, **kwargs)
        changed = state.changed()
        if changed is not None:
            found.append(changed)
        return out

    if hasattr(fn, "__signature__"):
        watching.__signature__ = fn.__signature__
    return watching


def watch_arguments(fn: Callable, found: list[str]) -> Callable:
    """`fn` adding to `found` the first list, dict or set among its arguments (nested in tuples, lists and dicts)
    whose items its run changed (`extras["hidden"] = h`, `feats.append(h)`): traced, that write lands in
    capture's copies of the containers, and the captured graph would never make it in the caller's."""

    @functools.wraps(fn)
    def watching(*args: Any, **kwargs: Any) -> Any:
        try:
            named = inspect.signature(fn).bind(*args, **kwargs).arguments
        except TypeError:
            named = {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}
        before: dict[int, tuple[str, Any, tuple]] = {}
        for name, value in named.items():
            _containers(value, f"`{name}`", before)
        out = fn(*args, **kwargs)
        changed = next((where for where, c, items in before.values() if _items(c) != items), None)
        if changed is not None:
            found.append(changed)
        return out

    if hasattr(fn, "__signature__"):
        watching.__signature__ = fn.__signature__
    return watching


def _items(c: Any) -> tuple:
    """What a container holds, by identity (a write of an equal value into a list is a write)."""
    if isinstance(c, dict):
        return tuple((k, id(v)) for k, v in c.items())
    return tuple(sorted(map(id, c))) if isinstance(c, set) else tuple(map(id, c))


def _containers(value: Any, where: str, out: dict[int, tuple[str, Any, tuple]]) -> None:
    """The lists, dicts and sets in `value` (it, and inside its tuples, lists and dicts), by id: (where, it,
    its items)."""
    if id(value) in out or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, dict, set) or isinstance(value, (list, dict, set)):
        out[id(value)] = (f"the {type(value).__name__} argument {where}", value, _items(value))
    if isinstance(value, dict):
        for k, v in value.items():
            _containers(v, f"{where}[{k!r}]", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _containers(v, f"{where}[{i}]", out)


def watch_ints(fn: Callable, watched: set[Any]) -> Callable:
    """`fn` adding the symbols of the SymInts it is called with (its int arguments made symbolic, and ints in its
    container arguments) to `watched` (`int_type_reads`)."""

    @functools.wraps(fn)
    def watching(*args: Any, **kwargs: Any) -> Any:
        for a in pytree.tree_leaves((args, kwargs)):  # ints in a list or dict argument too (`top_ints`)
            if type(a) is torch.SymInt:
                watched.update(a.node.expr.free_symbols)
        return fn(*args, **kwargs)

    if hasattr(fn, "__signature__"):
        watching.__signature__ = fn.__signature__
    return watching


@contextlib.contextmanager
def own_hooks_held(module: nn.Module) -> Iterator[None]:
    """Within the block, `module`'s own forward hooks are held back (export calls the module through
    nn.Module.__call__, which would run them on fake tensors): what is captured is its forward, and its own hooks
    run around the compiled forward (`module.forward = fxcc.compile(module.forward)`), or the module runs eagerly
    (fxcc.hooks)."""
    held = [(d, dict(d)) for d in (module._forward_hooks, module._forward_pre_hooks) if d]
    for d, _ in held:
        d.clear()
    try:
        yield
    finally:
        for d, items in held:
            d.update(items)


def _capture(module: nn.Module, args: tuple, kwargs: dict, *, dims: dict[int, set[int]] | None,
             forward: Callable | None, watched: set[Any] | None = None,
             floats: frozenset[int] = frozenset(), unread: str | None = None,
             read: GlobalReads | None = None) -> Captured:
    with own_hooks_held(module), eager_fast_path():  # before `_capture_held` reads the forward it traces
        return _capture_held(module, args, kwargs, dims=dims, forward=forward, watched=watched, floats=floats,
                             unread=unread, read=read)


def _capture_held(module: nn.Module, args: tuple, kwargs: dict, *, dims: dict[int, set[int]] | None,
                  forward: Callable | None, watched: set[Any] | None = None,
                  floats: frozenset[int] = frozenset(), unread: str | None = None,
                  read: GlobalReads | None = None) -> Captured:
    fn = forward or original_forward(module)
    inner = getattr(module, "fn", None) if type(module).__name__ == "FunctionModule" else None  # a compiled function
    if not any(_has_try(f) for f in (fn, inner) if f is not None):
        return _capture_traced(module, args, kwargs, dims=dims, forward=forward, watched=watched, floats=floats,
                               unread=unread, read=read)
    with _tracing_errors() as raised:
        captured = _capture_traced(module, args, kwargs, dims=dims, forward=forward, watched=watched, floats=floats,
                                   unread=unread, read=read)
    if raised:
        raise CaptureError(f"fxcc cannot capture {describe(module)}: a `try` in its forward caught the tracer's own "
                           f"error ({raised[0]}), so the trace took its `except` branch whatever the values")
    return captured


def _has_try(fn: Callable) -> bool:
    """Whether `fn`'s source holds a `try` statement (a `try` around a value-dependent branch can swallow the
    tracer's error and trace its `except` branch)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return False
    return any(isinstance(n, ast.Try) for n in ast.walk(ast.parse(source))) if "try" in source else False


@contextlib.contextmanager
def _tracing_errors() -> Iterator[list[str]]:
    """Within the block, the names of the tracing errors raised (torch.fx's TraceError for a Proxy's bool, export's
    GuardOnDataDependentSymNode for a data-dependent branch), caught or not."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    from torch.fx.proxy import TraceError

    raised: list[str] = []
    inits = {cls: cls.__init__ for cls in (TraceError, GuardOnDataDependentSymNode)}

    def counting(cls: type) -> Callable:
        def init(self: Any, *a: Any, **k: Any) -> None:
            raised.append(cls.__name__)
            inits[cls](self, *a, **k)
        return init

    for cls in inits:
        cls.__init__ = counting(cls)
    _ATTEMPT[0] = raised
    try:
        yield raised
    finally:
        _ATTEMPT[0] = None
        for cls, init in inits.items():
            cls.__init__ = init


_ATTEMPT: list[list[str] | None] = [None]  # the tracing errors of the capture attempt running (`_tracing_errors`)


def _new_attempt() -> None:
    """A capture attempt begins: the errors an earlier, failed one raised are not this one's."""
    if _ATTEMPT[0] is not None:
        _ATTEMPT[0].clear()


def _capture_traced(module: nn.Module, args: tuple, kwargs: dict, *, dims: dict[int, set[int]] | None,
                    forward: Callable | None, watched: set[Any] | None = None,
                    floats: frozenset[int] = frozenset(), unread: str | None = None,
                    read: GlobalReads | None = None) -> Captured:
    # the tensors the trace reaches that are no inputs (a global, a default value) hold what they held before it,
    # whatever it wrote into them; a write the graph does not make at its calls is a CaptureError
    reached = Reached()
    try:
        cap = _capture_run(module, args, kwargs, dims=dims, forward=forward, watched=watched, floats=floats,
                           unread=unread, read={} if read is None else read, reached=reached)
    finally:
        undone = reached.undo()
    _writes_kept(cap.gm, undone, module)
    return cap


def _capture_run(module: nn.Module, args: tuple, kwargs: dict, *, dims: dict[int, set[int]] | None,
                 forward: Callable | None, watched: set[Any] | None, floats: frozenset[int], unread: str | None,
                 read: GlobalReads, reached: Reached) -> Captured:
    kwargs = dict(sorted(kwargs.items()))
    register_model_pytrees(module)
    state = ModuleState(module)  # a failed attempt ran forward's Python on fake values: undo it
    sink: list[Aliasing] = []
    fn = forward or original_forward(module)
    inner = getattr(module, "fn", None) if type(module).__name__ == "FunctionModule" else None
    fn = reading_globals(fn, read, (fn, inner), reached)
    # export marks (and then unmarks) its input tensors' dynamic dimensions: it gets aliases, so the
    # caller's tensors (and torch.compile's guards on them) keep their own marks
    traced = recording(fn, sink, kwargs)
    if watched is not None:
        traced = watch_ints(traced, watched)
    if floats:  # given as 0-d tensors, read back as symbolic floats
        traced = symbolic_floats(traced, floats, watched)
        args, kwargs = map_top(args, kwargs, floats, lambda v: torch.tensor(v, dtype=torch.float64))
        dims = {i: ds for i, ds in (dims or {}).items() if i not in floats}
    effects: list[str] = []
    if unread is not None:
        traced = watch_effects(traced, module, effects)
    written: list[str] = []  # argument containers the forward wrote into (`watch_arguments`)
    traced = watch_arguments(traced, written)
    method = "export"
    try:
        shapes = dynamic_shapes(args, kwargs, dims or {}, inspect.signature(traced))
    except TypeError as e:
        # export names dynamic shapes by the parameters of the innermost wrapped function; a decorator that takes
        # other keywords (`@deprecate_kwarg("factor", "scale")` given `factor=`) leaves none to name: static sizes
        shapes, dims, method = None, {}, f"export (static: the call's arguments do not bind to the wrapped function: {e})"

    def export(shapes: Any) -> torch.export.ExportedProgram:
        # fresh aliases each attempt: a failed export leaves its dynamic marks on the ones it had
        ex_args, ex_kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (tuple(args), kwargs))
        sink.clear()
        _new_attempt()
        # export warns for every `Dim.AUTO` dimension it keeps static (size 0 or 1): expected, not news; a trace
        # failing on a data-dependent value (handled below) prints its partial graph and warns where torch's advice
        # finds no name in the user's code for the value (a symbolic float's `.item()`)
        quiet = held_back("torch._export.non_strict_utils", logging.ERROR)
        unfound = dropped("torch.fx.experimental.symbolic_shapes", "Unable to find user code corresponding to")
        # an input the model rejects fails in a meta kernel, which logs the traceback at ERROR before raising: the
        # error reaches the user once, as eager's own (`eager_check`) or fxcc's
        unmet = dropped("torch._subclasses.fake_tensor", "failed while attempting to run meta for")
        with (torch.no_grad(), forward_as(module, traced), quiet, unfound, unmet, partial_graph_unprinted(),
              eager_mask_skip(), branch_free_sliding_window(), unchanged_conversions_skipped(),
              own_tensors_unwarned(module), symbolic_flags_decided()):
            return torch.export.export(module, ex_args, ex_kwargs, strict=False, dynamic_shapes=shapes)

    try:
        try:
            ep = export(shapes)
        except Exception as symbolic_exc:  # noqa: BLE001 - retried with static sizes below
            if not dims:
                raise
            # export's constraint solver can fail on symbolic sizes a static capture has no trouble with (a
            # chunk of a padded flattened tensor: "Eq((216*s77 + 1)//(72*s77 + 1), 2) is inconsistent"):
            # these sizes compile static, a recompile for the next ones
            state.restore()
            reached.undo()
            ep = export(None)
            why = " ".join(str(symbolic_exc).split())[:200]
            method = f"export (static: symbolic sizes failed: {type(symbolic_exc).__name__}: {why})"
            log.info("capturing %s with static sizes: %s", describe(module), method)
    except Exception as export_exc:  # noqa: BLE001 - any export failure falls back to symbolic_trace
        state.restore()
        reached.undo()
        if floats:  # captured again with them constants (`capture`)
            raise CaptureError(f"export failed with symbolic floats: {_first_line(export_exc)}") from export_exc
        if state_objects((args, kwargs)):  # a traced graph would leave the caller's cache as it was
            raise CaptureError(_explain_failure(module, export_exc, None)) from export_exc
        try:
            _new_attempt()
            with forward_as(module, fn):
                return _symbolic_trace(module, args, kwargs, export_exc)
        except Exception as trace_exc:  # noqa: BLE001
            state.restore()
            raise CaptureError(_explain_failure(module, export_exc, trace_exc)) from export_exc
    changed = effects[0] if effects else None
    if changed is not None:
        raise CaptureError(f"fxcc cannot capture {describe(module)}: its forward changed {changed} while traced, which "
                           f"a traced graph would do only once, at capture; DyCL, which would keep it, cannot read "
                           f"the source ({unread})")
    if written:
        raise CaptureError(f"fxcc cannot capture {describe(module)}: its forward wrote into {written[-1]} while traced; "
                           "a traced graph would make that write only in capture's copies, never in the caller's object")
    gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph._codegen = fx.graph.CodeGen()
    inline_vmap(gm, describe(module))
    if floats:
        floats_read_directly(gm, floats)
    gm.recompile()
    return Captured(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, method, aliasing=sink[0] if sink else Aliasing())


# torch.export records a torch.vmap (transformers builds attention masks with one) as these functorch calls
# around the per-element ops; run by themselves, only in their order and with their nesting calls kept, they
# give batched tensors that no pass, kernel or dead-code elimination may touch
_VMAP_ENTER, _VMAP_EXIT = predispatch._vmap_increment_nesting, predispatch._vmap_decrement_nesting
_FUNCTORCH = {_VMAP_ENTER, _VMAP_EXIT, predispatch._add_batch_dim, predispatch._remove_batch_dim,
              lazy_load_decompositions}


def inline_vmap(gm: fx.GraphModule, name: str) -> None:
    """Replace each vmap torch.export recorded in `gm` (functorch's pre-dispatch calls) by the batched aten ops
    it computes, traced with make_fx: the graph is plain aten that every pass and kernel handles. A vmap that
    cannot be traced so is a CaptureError naming `name` and the construct."""
    for region in _vmap_regions(gm):
        try:
            _inline(gm, region)
        except Exception as e:  # noqa: BLE001 - any tracing failure is the user's construct, named
            where = [ln.strip() for ln in region[0].meta.get("stack_trace", "").strip().splitlines()]
            at = f" ({where[-2]}: `{where[-1]}`)" if len(where) >= 2 else ""
            raise CaptureError(f"fxcc cannot capture {name}: a torch.vmap{at} could not be traced into batched aten "
                               f"ops: {type(e).__name__}: {_first_line(e)}\n  To proceed: run this module eagerly, or "
                               "compute the vmapped function on broadcast tensors instead.") from e


def _vmap_regions(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The nodes of each outermost vmap, from its first functorch call to its last `_vmap_decrement_nesting`."""
    regions, current, depth = [], None, 0
    for n in gm.graph.nodes:
        functorch = n.op == "call_function" and n.target in _FUNCTORCH
        if current is None and not functorch:
            continue
        if current is None:
            current = []
        current.append(n)
        depth += (n.target is _VMAP_ENTER) - (n.target is _VMAP_EXIT) if functorch else 0
        if functorch and n.target is _VMAP_EXIT and depth == 0:
            regions.append(current)
            current = None
    if current is not None:
        regions.append(current)  # unbalanced: _inline fails on it, with the construct named
    return regions


def _inline(gm: fx.GraphModule, region: list[fx.Node]) -> None:
    inside = set(region)
    # tensors are inputs of the trace (fake, as recorded); other attributes (a function spec) stay attributes
    body = [n for n in region if n.op != "get_attr" or not isinstance(fetch_attr(gm, n.target), torch.Tensor)]
    inputs: dict[fx.Node, None] = {}
    for n in body:
        for a in n.all_input_nodes:
            if a not in inside or a not in body:
                inputs[a] = None
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    sub, env = fx.Graph(), {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
    for n in body:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    mode = detect_fake_mode([a.meta.get("val") for a in inputs])
    vals = [a.meta["val"] if "val" in a.meta or a.op != "get_attr" else mode.from_tensor(fetch_attr(gm, a.target))
            for a in inputs]
    symbolic = any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in v.shape)) for v in vals)
    traced = make_fx(fx.GraphModule(gm, sub), tracing_mode="symbolic" if symbolic else "fake")(*vals)
    env = dict(zip((p for p in traced.graph.nodes if p.op == "placeholder"), inputs))
    provenance = {k: region[-1].meta[k] for k in ("nn_module_stack", "stack_trace") if k in region[-1].meta}
    with gm.graph.inserting_before(region[0]):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                for old, new in zip(outputs, n.args[0]):
                    old.replace_all_uses_with(env[new])
                continue
            if n.op == "get_attr":  # a constant the trace made (a scalar tensor)
                attr = _fresh_attr(gm, "_vmap_constant")
                gm.register_buffer(attr, getattr(traced, n.target), persistent=False)
                env[n] = gm.graph.get_attr(attr)
            else:
                env[n] = gm.graph.node_copy(n, env.__getitem__)
            env[n].meta.update({**provenance, **{k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")}})
    for n in reversed(body):
        if not n.users:
            gm.graph.erase_node(n)


def _fresh_attr(gm: fx.GraphModule, base: str) -> str:
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def _symbolic_trace(module: nn.Module, args: tuple, kwargs: dict, export_exc: Exception) -> Captured:
    flat, in_spec = flatten_inputs(args, kwargs)
    names = [f"in{i}" for i in range(len(flat))]
    # a wrapper whose forward takes the flat leaves, so both capture paths share one calling convention
    src = (f"def forward(self, {', '.join(names)}):\n"
           f"    args, kwargs = tree_unflatten([{', '.join(names)}], self.in_spec)\n"
           f"    return self.model(*args, **kwargs)\n")
    scope: dict[str, Any] = {"tree_unflatten": pytree.tree_unflatten}
    exec(compile(src, "<fxcc-flat-wrapper>", "exec"), scope)
    wrapper = type("FlatInputs", (nn.Module,), {"forward": scope["forward"]})()
    wrapper.model, wrapper.in_spec = module, in_spec
    concrete = {n: v for n, v in zip(names, flat) if not isinstance(v, torch.Tensor)}
    gm = fx.symbolic_trace(wrapper, concrete_args=concrete)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out, out_spec = pytree.tree_flatten(out.args[0])
    out.args = (tuple(flat_out),)
    gm.recompile()
    _record_values(gm, flat)
    return Captured(gm, in_spec, out_spec, "symbolic_trace", f"{type(export_exc).__name__}: {export_exc}")


def _record_values(gm: fx.GraphModule, flat: list[Any]) -> None:
    """Give every node of a symbolically traced graph a FakeTensor meta['val'] by running it once."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = pytree.tree_map_only(torch.Tensor, mode.from_tensor, out)
            return out

    with torch.no_grad():
        Recorder(gm).run(*flat)


def _user_frame(*excs: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the model's own code (not torch, not fxcc, not the standard library)."""
    # fxcc's own folders only: the repository around them (tests, examples) is user code
    fxcc_dirs = [os.path.dirname(sys.modules[m].__file__) for m in ("fxcc", "fxcc.passes", "fxcc.codegen",
                                                                    "fxcc.autotune") if m in sys.modules]
    paths = sysconfig.get_paths()
    site = (paths["purelib"], paths["platlib"])

    def ours(path: str) -> bool:
        def under(d: str) -> bool:
            return path.startswith(os.path.join(os.path.abspath(d), ""))
        return (any(under(d) for d in (os.path.dirname(torch.__file__), *fxcc_dirs))
                or (under(paths["stdlib"]) and not any(under(d) for d in site)))

    best = None
    for exc in excs:
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            for fr in traceback.extract_tb(exc.__traceback__):
                if not ours(os.path.abspath(fr.filename)) and not fr.filename.startswith("<"):
                    best = fr
            if best is not None:
                return best
            exc = exc.__cause__ or exc.__context__
    return best


def _explain_failure(module: nn.Module, export_exc: Exception, trace_exc: Exception | None) -> str:
    """Lead with torch.export's reason and the model line it points at; symbolic_trace's is secondary."""
    name = describe(module)
    fr = _user_frame(export_exc) or (_user_frame(trace_exc) if trace_exc is not None else None)
    where = ""
    if fr is not None:
        line = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
        where = f"\n  at {fr.filename}:{fr.lineno} in {fr.name}: `{line}`"
    text = f"{type(export_exc).__name__}: {export_exc}"
    data_dependent = any(k in text for k in ("data-dependent", "DataDependent", "GuardOnDataDependent"))
    why = ("control flow depends on tensor values" if data_dependent
           else f"torch.export failed: {type(export_exc).__name__}: {_first_line(export_exc)}")
    advice = ("make the condition independent of tensor values, or run this module eagerly"
              if data_dependent else "run this module eagerly, or change the construct at that line")
    fallback = ("  (its inputs hold state it updates in place, such as a KV cache: symbolic_trace cannot keep "
                "that, so it was not tried)" if trace_exc is None else
                f"  (the symbolic_trace fallback failed too: {type(trace_exc).__name__}: {_first_line(trace_exc)})")
    return f"fxcc cannot capture {name}: {why}{where}\n{fallback}\n  To proceed: {advice}."


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


class ModuleState:
    """The attributes of a module tree, the closure cells and defaults of a compiled function, and the
    contents of the lists, dicts and sets among them, kept to undo what a failed capture attempt did to
    them: it ran forward's Python, storing fake tensors and proxies, appending, counting."""

    def __init__(self, module: nn.Module):
        mods = list(module.modules())
        fn = getattr(module, "fn", None) if type(module).__name__ == "FunctionModule" else None
        bound = getattr(fn, "__self__", None)  # a compiled bound method's object
        if isinstance(bound, nn.Module):
            mods += list(bound.modules())
        fn = getattr(fn, "__func__", fn)
        self.cells = [(c, c.cell_contents) for c in getattr(fn, "__closure__", None) or () if _full(c)]
        values = [v for _, v in self.cells] + list(getattr(fn, "__defaults__", None) or ()) + list(
            (getattr(fn, "__kwdefaults__", None) or {}).values())
        self.saved = [(m.__dict__, dict(m.__dict__), _contents(m.__dict__.values())) for m in mods]
        self.saved.append(({}, {}, _contents(values)))

    def changed(self) -> str | None:
        """What differs from when this state was kept (an attribute, a closure cell, a container's contents), named;
        None when nothing does."""
        for cell, value in self.cells:
            if not _same(cell.cell_contents, value):
                return "a variable of its closure"
        for d, attrs, contents in self.saved:
            for k in d.keys() | attrs.keys():
                if k not in d or k not in attrs or not _same(d[k], attrs[k]):
                    return f"attribute `{k}`"
            for obj, old in contents:
                if isinstance(obj, set):
                    if obj != old:
                        return "the contents of a set it holds"
                elif len(obj) != len(old) or any(not _same(a, b) for a, b in zip(
                        obj.items() if isinstance(obj, dict) else obj, old.items() if isinstance(old, dict) else old)):
                    return f"the contents of a {type(obj).__name__} it holds"
        return None

    def restore(self) -> None:
        for cell, value in self.cells:
            cell.cell_contents = value
        for d, attrs, contents in self.saved:
            for k in [k for k in d if k not in attrs]:
                del d[k]
            d.update(attrs)
            for obj, old in contents:
                if isinstance(obj, list):
                    obj[:] = old
                else:
                    obj.clear()
                    obj.update(old)


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal plain values (a container's pairs compared item by item)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is tuple:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) in (bool, int, float, str, type(None)) and a == b


def _full(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def _contents(values: Any) -> list[tuple[Any, Any]]:
    # OrderedDict: a module's hook tables (a hook registered by the attempt would run twice after the real call
    # registers it again)
    return [(v, type(v)(v)) for v in values if type(v) in (list, dict, set, collections.OrderedDict)]
