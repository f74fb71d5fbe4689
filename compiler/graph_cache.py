"""The graph cache: the IR that capture and the graph passes produced, stored in the artifact cache.

A warm compile of the same model then skips `torch.export` and every pass before `codegen` (which
finds its kernels in the artifact cache too). The key covers what the IR depends on:

- the model's code: the source files of every module class in its tree and of the user's modules they
  import from (transitively), the versions of the libraries they come from, and fxcc's own files;
- its state: primitive attributes of every submodule (`eps`, `training`, ...), a `config`'s fields,
  the names, shapes, dtypes, devices and a sha1 of the contents of its parameters, buffers and tensor
  attributes;
- the call: input structure, shapes, strides, dtypes, devices, constant arguments (and the values of
  tensor inputs when an approximate pass calibrates on them), the caller's autocast and default dtype;
- the pipeline text, the target, the versions of torch/TVM/Triton/fxcc.

The Python globals the captured code read (fxcc.capture.global_reads) are stored with a fingerprint of each
value (numbers and strings by value, functions and classes by module, name and bytecode, tensors by contents):
an entry whose globals now hold something else is a miss, and a hit's globals are guarded as a capture's.
Closures count by what they hold, as they would in another process: a function's fingerprint has the values of
its closure cells (an object there by its attributes, a module by its state), and the key has those of the
functions the model's own classes define (a class a factory function defines reads the factory's arguments), so
`make(scale=3.0)` never gets the graph `make(scale=2.0)` stored; a bound method counts with its object's
attributes. The compiled method (`forward`, or another one) is part of the key.
A module a global holds counts with its state (attributes, weights), as one a closure holds.
Not covered, so turned off by `CompileOptions(graph_cache=False)`: the state of other objects the module only
references through a global (attributes read off an object a global holds are stored as globals; its other state
is not). Models with hooks and plain functions are never cached.
Entries are JSON plus raw tensor bytes (no pickle); anything the serializer does not know about makes
the compile go the normal way.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import keyword
import logging
import math
import operator
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from . import ir
from .capture import Closure, _own_functions, _record_closures, _source_file, in_project
from .dialects import KERNEL_OPS, KernelBody, intern_body, kernel_body
from .pipeline import PassRecord, PassResult
from .store import cache_key, fxcc_files, tensor_bytes

log = logging.getLogger(__name__)
SCHEMA = 4  # 2: constants name the model tensors they were computed from; 3: the globals read; 4: attributes read
# off objects closure variables hold
_PRIMITIVE = (bool, int, float, str, type(None))
_PY_TARGETS = {"operator.getitem": operator.getitem}


class Unserializable(Exception):
    """The graph holds something the cache does not store; the compile goes the normal way."""


@dataclass
class Hit:
    """A graph read back from the cache: the IR before codegen and what capture and the passes recorded."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    method: str
    records: list[PassRecord]
    missing: dict[int, frozenset[str] | None] | None = None  # as fxcc.capture.Captured's (None: not stored)
    globals: dict | None = None  # as fxcc.capture.Captured's


# ------------------------------------------------------------------------------------------- key


def graph_key(module: nn.Module, flat: list[Any], spec: pytree.TreeSpec, pipeline: str, target: str,
              calibrates: bool, context: str = "", machine: bool = False, method: str = "forward") -> str | None:
    """The cache key for compiling `module` on these inputs, or None when it cannot be keyed safely.
    `context`: the caller's torch state that capture sees (autocast, default dtype: fxcc.guards.call_context);
    `machine`: a pass chose by timing, so the machine (fxcc.store.target_id) is part of the key too;
    `method`: the name of the method compiled."""
    if type(module).__name__ == "FunctionModule" or _has_hooks(module):
        return None
    try:
        parts = {
            "schema": str(SCHEMA),
            "model": _model_fingerprint(module),
            "method": method,
            "closures": _class_closures(module),
            "weights": _weights_hash(module),
            "inputs": _inputs_fingerprint(flat, spec, values=calibrates),
            "code": _code_fingerprint(module),
            "pipeline": pipeline,
            "device": target,  # the IR depends on the device kind, not the machine's model
            "distributed": _distributed_fingerprint(),
            "context": context,
        }
    except Unserializable as e:
        log.debug("graph cache off for %s: %s", type(module).__name__, e)
        return None
    return "g" + cache_key("graph", target=target if machine else None, **parts)


def _distributed_fingerprint() -> str:
    """Rank, world size, backend and the default group's ranks: passes such as tp-shard fold this rank's
    shard into the IR, so one rank's graph must never be served to another (or to another world size)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return "single process"
    group = dist.group.WORLD
    return repr((dist.get_rank(), dist.get_world_size(), dist.get_backend(),
                 dist.get_process_group_ranks(group)))


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as m
    if any((m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks)):
        return True
    return any(sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules())


def _model_fingerprint(module: nn.Module, within: tuple[int, ...] = ()) -> str:
    """`within`: as `_fingerprint`'s (a closure among the attributes may hold the module again)."""
    h = hashlib.sha1()
    within = (*within, id(module))
    classes: dict[type, None] = {}  # every class of the modules' classes, once, in the same order in every process
    for name, sub in module.named_modules(remove_duplicate=False):
        cls = type(sub)
        attrs = sorted((k, _attr_fingerprint(v, f"{name or 'model'}.{k}", within=within)) for k, v in vars(sub).items()
                       if k not in MODULE_INTERNALS and not isinstance(v, (nn.Module, torch.Tensor)))
        h.update(repr((name, cls.__module__, cls.__qualname__, attrs)).encode())
        classes.update(dict.fromkeys(cls.__mro__))
    for klass in classes:  # class attributes (set at run time, `Model.scale = ...`: not in the source the code key reads)
        if klass.__module__ == "builtins" or klass.__module__.partition(".")[0] == "torch":
            continue
        cattrs = sorted((k, _class_attr(v, f"{klass.__qualname__}.{k}", within)) for k, v in vars(klass).items()
                        if not k.startswith("__")
                        and not isinstance(v, (types.FunctionType, property, staticmethod, classmethod)))
        h.update(repr((klass.__module__, klass.__qualname__, cattrs)).encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(repr(sorted((k, repr(v)) for k, v in vars(config).items() if primitive(v))).encode())
    for name, t in named_tensors(module).items():
        h.update(repr((name, tuple(t.shape), t.stride(), t.dtype, str(t.device), isinstance(t, nn.Parameter))).encode())
    return h.hexdigest()


def _class_closures(module: nn.Module, within: tuple[int, ...] = ()) -> str:
    """What the closures of the functions the model's own classes define hold (`_closure_fingerprint`): a class
    that a factory function defines reads the factory's arguments there, and its source is the same for each."""
    h, within = hashlib.sha1(), (*within, id(module))
    for cls, name, fn in _own_functions(module):
        if fn.__closure__:
            h.update(repr((cls.__qualname__, name, _closure_fingerprint(fn, 0, within))).encode())
        if fn.__defaults__ or fn.__kwdefaults__:  # a default tensor is a constant of the graph: keyed by contents
            h.update(repr((cls.__qualname__, name, _defaults_fingerprint(fn, 0, within))).encode())
    return h.hexdigest()


def _defaults_fingerprint(fn: types.FunctionType, depth: int, within: tuple[int, ...]) -> list:
    """A function's default values (`_fingerprint`: tensors by contents)."""
    return [_fingerprint(fn.__defaults__ or (), depth + 1, False, within),
            _fingerprint(dict(sorted((fn.__kwdefaults__ or {}).items())), depth + 1, False, within)]


# _parameters, _buffers, _modules, hook dicts, ...: counted elsewhere (not `training`, which is keyed); and
# markers other tools leave on a module that do not change what it computes (torch.compile's, set when the
# same module was compiled with it too)
MODULE_INTERNALS = (frozenset(vars(nn.Module())) - {"training"}) | {"_is_torch_compile"}


def _class_attr(v: Any, where: str, within: tuple[int, ...]) -> str:
    """A class attribute's description for the key; one with none that is stable (a descriptor, a cache object a
    library keeps on its class) by its type: it does not turn the graph cache off for every model of the class."""
    try:
        return _attr_fingerprint(v, where, within=within)
    except Unserializable:
        return type(v).__qualname__


def _attr_fingerprint(v: Any, where: str, depth: int = 0, within: tuple[int, ...] = ()) -> str:
    """A module attribute as key text: values by repr, functions by their code and what their closure holds,
    containers item by item. Anything else whose repr names a memory address cannot be keyed: the model is then
    not graph-cached. `within`: as `_fingerprint`'s."""
    if primitive(v):
        return repr(v)
    if depth > 4:
        raise Unserializable(f"attribute {where} nests too deeply")
    if isinstance(v, (list, tuple)):
        return repr([_attr_fingerprint(x, where, depth + 1, within) for x in v])
    if isinstance(v, dict):
        return repr(sorted((repr(k), _attr_fingerprint(x, where, depth + 1, within)) for k, x in v.items()))
    if isinstance(v, (set, frozenset)):  # sorted: a set's repr order changes with each process's hash seed
        return repr(sorted(_attr_fingerprint(x, where, depth + 1, within) for x in v))
    if isinstance(v, nn.Module):
        return type(v).__qualname__  # counted where modules are
    if isinstance(v, torch.Tensor):
        # a tensor directly in the module's __dict__ is counted by _weights_hash; one inside a list, tuple or dict
        # attribute is not: key it by its contents here
        return repr(_fingerprint(v)) if depth else type(v).__qualname__
    if type(v).__module__ == "numpy" and hasattr(v, "tobytes"):  # repr elides the middle of a large array
        return repr(("numpy", str(getattr(v, "dtype", "")), getattr(v, "shape", ()),
                     hashlib.sha1(v.tobytes()).hexdigest()))
    fn = getattr(v, "__func__", v)  # a bound method: its function
    code = getattr(fn, "__code__", None)
    if code is not None:
        defaults = getattr(fn, "__defaults__", None) or ()
        owner = getattr(v, "__self__", None) if isinstance(v, types.MethodType) else None
        return repr((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""),
                     hashlib.sha1(code.co_code).hexdigest(), repr(code.co_consts), code.co_names,
                     _closure_fingerprint(fn, 0, within) if getattr(fn, "__closure__", None) else [],
                     [_attr_fingerprint(x, where, depth + 1, within) for x in defaults],
                     None if owner is None or isinstance(owner, nn.Module) else _fingerprint(owner, 0, True, within)))
    if type(getattr(v, "__dict__", None)) is dict and not isinstance(v, type):
        # a plain object (a config): by its public attributes, never by its repr (a custom __repr__ may leave out
        # the values the forward reads); private ones are left out (GenerationConfig's `_original_object_hash`
        # differs in every process)
        items = sorted((k, _attr_fingerprint(x, f"{where}.{k}", depth + 1, within)) for k, x in vars(v).items()
                       if not k.startswith("_"))
        return repr((type(v).__module__, type(v).__qualname__, items))
    text = repr(v)
    if " at 0x" in text or len(text) > 100_000:
        raise Unserializable(f"attribute {where} ({type(v).__qualname__}) has no stable description")
    return f"{type(v).__module__}.{type(v).__qualname__}:{text}"


def primitive(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(primitive(x) for x in v)
    return isinstance(v, _PRIMITIVE) or isinstance(v, (torch.dtype, torch.device))


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model by name: parameters, buffers, and tensor attributes that are neither (export
    lifts those into the graph as constants)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update((n, b) for n, b in module.named_buffers(remove_duplicate=False) if b is not None)
    for path, sub in module.named_modules(remove_duplicate=False):
        out.update((f"{path}.{k}" if path else k, v) for k, v in vars(sub).items() if isinstance(v, torch.Tensor))
    return out


def _weights_hash(module: nn.Module) -> str:
    """sha1 over every parameter's and buffer's bytes (folded constants are computed from them)."""
    h = hashlib.sha1()
    seen: set[int] = set()
    for t in named_tensors(module).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _spec_text(spec: pytree.TreeSpec) -> str:
    """treespec_dumps, or Unserializable where a node type has no serialized name (torch.return_types.max,
    .median, .sort, .topk, .cummax...: torch registers these structseqs without one)."""
    try:
        return pytree.treespec_dumps(spec)
    except NotImplementedError as e:
        raise Unserializable(f"a pytree node with no serialized name: {e}") from e


def _inputs_fingerprint(flat: list[Any], spec: pytree.TreeSpec, values: bool) -> str:
    h = hashlib.sha1(_spec_text(spec).encode())
    for x in flat:
        if isinstance(x, torch.Tensor):
            h.update(repr((tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, str(x.device))).encode())
            if values:
                h.update(tensor_bytes(x))
        elif primitive(x):
            h.update(repr(("const", type(x).__name__, x)).encode())
        else:
            raise Unserializable(f"an input of type {type(x).__name__}")
    return h.hexdigest()


def _code_fingerprint(module: nn.Module) -> str:
    """What the graph's code depends on: the source files of the model's classes (and their bases) and of
    the user's modules they import from (followed transitively), the versions of the installed libraries
    among them (their files are not read), and fxcc's own files (its passes make the graph)."""
    files = set(fxcc_files())
    classes = {cls for sub in module.modules() for cls in type(sub).__mro__}
    for cls in classes:
        if cls.__module__ != "builtins" and not cls.__module__.startswith("torch") and _source_file(cls) is None:
            raise Unserializable(f"no source file for class {cls.__qualname__}")
    todo = [cls.__module__ for cls in classes]
    seen: set[str] = set()
    versions = []
    while todo:
        name = todo.pop()
        mod = sys.modules.get(name)
        if name in seen or mod is None or name == "fxcc" or name.startswith("fxcc."):
            continue  # fxcc's files are all counted above
        seen.add(name)
        path = getattr(mod, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        if not in_project(path):  # an installed library (or the stdlib): its version names its code
            top = sys.modules.get(name.partition(".")[0])
            versions.append(f"{name.partition('.')[0]}={getattr(top, '__version__', '')}")
            continue
        files.add(path)
        with warnings.catch_warnings():  # reading `__module__` of a deprecated object warns (torch.distributed's
            warnings.simplefilter("ignore")  # reduce_op); the key must not, a test that records warnings sees it
            for v in list(vars(mod).values()):
                ref = v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
                if isinstance(ref, str) and ref not in seen:
                    todo.append(ref)
    text = "".join(f"{p}:{_file_hash(p)};" for p in sorted(files)) + ";".join(sorted(set(versions)))
    return hashlib.sha1(text.encode()).hexdigest()


def _file_hash(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return _file_hash_at(path, st.st_mtime_ns, st.st_size)


@cache
def _file_hash_at(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


# ----------------------------------------------------------------------------------- store / load


def store(cache: Any, key: str, gm: fx.GraphModule, module: nn.Module, in_spec: pytree.TreeSpec,
          out_spec: pytree.TreeSpec, method: str, records: list[PassRecord],
          missing: dict[int, frozenset[str] | None] | None = None, globals_read: dict | None = None) -> bool:
    """Write the pre-codegen IR under `key`; False (and nothing written) when the graph is not storable.
    `missing`: the names capture looked up on each module and did not find, kept by the module's path;
    `globals_read`: the globals capture recorded (fxcc.capture.GlobalReads), kept with their values' fingerprints."""
    try:
        doc, files = _serialize(gm, module)
        doc["globals"] = _globals_doc(globals_read or {})
        doc["closure_reads"] = _closure_reads_doc(globals_read or {})
        if missing is not None:
            paths = {}
            for path, sub in module.named_modules(remove_duplicate=False):
                paths.setdefault(id(sub), path)
            doc["missing"] = {paths[k]: None if v is None else sorted(v) for k, v in missing.items() if k in paths}
        doc.update(schema=SCHEMA, method=method, in_spec=_spec_text(in_spec),
                   out_spec=_spec_text(out_spec),
                   records=[{"spec": r.spec, "seconds": r.seconds, "changed": r.result.changed,
                             "stats": r.result.stats} for r in records])
        files["graph.json"] = json.dumps(doc).encode()
    except (Unserializable, TypeError) as e:  # TypeError: a value JSON cannot hold (a data-dependent SymInt)
        log.info("the graph of %s is not cached: %s", type(module).__name__, e)
        return False
    try:
        cache.put(key, files, {"kind": "graph", "model": type(module).__qualname__})
    except OSError as e:
        log.warning("could not store the graph of %s in the artifact cache: %s", type(module).__name__, e)
        return False
    return True


def load(cache: Any, key: str, module: nn.Module, root: Any = None) -> Hit | None:
    """The cached graph for `key` bound to `module`'s tensors, or None (missing or not loadable). The entry is
    signed (fxcc.store) and is also checked against the schema: names are identifiers, targets are registered
    op overloads, tensors are the model's own or constants of the stated size; nothing of it becomes source
    text unchecked. An entry that fails is evicted with a warning and the model is captured again.
    `root`: the function compiled (fxcc.capture's root: the module's forward, or the method compiled), whose
    closure, and those it reaches, the hit's guards watch."""
    entry = cache.get(key)
    if entry is None or "graph.json" not in entry.files:
        return None
    try:
        doc = json.loads(entry.files["graph.json"].read_bytes())
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            return None
        read = _globals_now(doc.get("globals"))
        if read is None:
            return None
        _closures_now(read, module, root, doc.get("closure_reads", []))
        hit = _decode(doc, entry.files, module)
        hit.globals = read
        return hit
    except Exception as e:  # a cache entry must never fail a compile: go the normal way
        log.warning("cached graph %s of %s did not load (%s: %s); it was evicted, capturing again", key,
                    type(module).__name__, type(e).__name__, e)
        cache.remove(key)
        return None


def _globals_doc(read: dict) -> list:
    """The globals among `read` (fxcc.capture.GlobalReads) as [module, path, names and fingerprints, fingerprints
    of the builtins they fall back on]: path [] for the module's globals, ["CFG"] for the attributes of the object,
    class or module its global CFG holds. Unserializable when one cannot be found again from a module."""
    out = []
    for holder, fallback, names, path in read.values():
        if type(holder) is not dict and not isinstance(holder, types.MappingProxyType) or (
                path is not None and not isinstance(path[0], dict)):
            # a closure's cells (fxcc.capture.Closure), attributes read off the compiled method's object or off an
            # object a closure variable holds: guarded in the process, not in the entry
            continue
        if fallback is not None and fallback is not vars(builtins):
            raise Unserializable("the code read globals resolved in builtins other than the interpreter's")
        module, way = _module_of(holder), []
        if module is None and path is not None:
            module, way = _module_of(path[0]), list(path[1:])
        if module is None:
            raise Unserializable("the code read globals of a namespace that is no imported module's")
        out.append([module, way, {n: _global_fingerprint(holder.get(n, _ABSENT)) for n in sorted(names)},
                    None if fallback is None else {n: _global_fingerprint(fallback.get(n, _ABSENT))
                                                   for n in sorted(names)}])
    return out


class _Every:
    """Every code object counts as run (`_closures_now`: a hit does not know which did)."""

    def __contains__(self, code: Any) -> bool:
        return True


def _closure_reads_doc(read: dict) -> list:
    """The attributes read off objects that closure variables hold (fxcc.capture: path ("closure", variable,
    attributes on the way)), as [variable, attributes on the way, names read]; their values are keyed with the
    closures' (`_closure_fingerprint`), these let a hit guard them as capture's do."""
    out = []
    for _, _, names, path in read.values():
        if path is not None and path[0] == "self":  # only compiled bound methods of plain objects read these
            raise Unserializable("the code read attributes of the compiled method's object")
        if path is not None and path[0] == "closure":
            out.append([path[1], list(path[2:]), sorted(names)])
    return out


def _closures_now(read: dict, module: nn.Module, root: Any, stored: Any) -> None:
    """Add to `read` (a hit's globals, `_globals_now`) what capture records beside the globals: the closures of the
    compiled function `root`, of the functions the model's own classes define (`_own_functions`: a hit does not know which
    of them ran) and of the functions reached from them and from the globals (every one counts as run), and
    the attributes read off objects their variables hold (`stored`, `_closure_reads_doc`), where this walk finds
    them: a closure of library code that capture saw run is not reached, and not guarded after a hit."""
    if not (isinstance(stored, list) and all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], list)
            and isinstance(r[2], list) and all(isinstance(a, str) for a in (*r[1], *r[2])) for r in stored)):
        raise BadEntry("field 'closure_reads' is malformed")
    own = (fn for _, _, fn in _own_functions(module) if fn.__closure__)
    _record_closures(read, (*own, root), _Every())  # the root's walked first
    closures = [h for h, _, _, _ in read.values() if type(h) is Closure]
    for var, way, names in stored:
        found = False
        for closure in closures:
            value = closure.get(var, _ABSENT)
            for attr in way:
                value = getattr(value, "__dict__", {}).get(attr, _ABSENT) if value is not _ABSENT else _ABSENT
            d = getattr(value, "__dict__", None) if value is not _ABSENT else None
            if type(d) is dict:
                found = True
                read.setdefault((id(d), 0), (d, None, set(), ("closure", var, *way)))[2].update(names)
        if not found:  # a closure of library code that ran during capture (a transformers wrapper's `self`): the
            # walk above does not reach it, and the key does not cover library closures (their versions key them)
            log.debug("cached graph: closure variable %s (attributes %s) not found to guard", var,
                      ".".join([*way, *names]))


def _globals_now(stored: Any) -> dict | None:
    """The stored globals, each found in this process (fxcc.capture.GlobalReads), or None when one now holds
    something else or its module is not loaded (a miss: the model is captured again)."""
    if not isinstance(stored, list):
        raise BadEntry("field 'globals' is not a list")
    read = {}
    for item in stored:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], list)
                and all(isinstance(a, str) for a in item[1]) and isinstance(item[2], dict)
                and (item[3] is None or isinstance(item[3], dict))):
            raise BadEntry("an entry of field 'globals' is malformed")
        module, way, names, falls = item
        mod = sys.modules.get(module)
        if mod is None:
            return None
        holder, fallback, key = vars(mod), None if falls is None else vars(builtins), None
        if way:
            value = holder.get(way[0], vars(builtins).get(way[0], _ABSENT))
            for attr in way[1:]:
                value = getattr(value, "__dict__", {}).get(attr, _ABSENT) if value is not _ABSENT else _ABSENT
            d = getattr(value, "__dict__", None) if value is not _ABSENT else None
            if d is None or type(d) is not dict and not isinstance(value, type):
                return None
            holder, key = d, (id(value), 1) if isinstance(value, type) else (id(d), 0)
        for n, fp in names.items():
            try:
                changed = _global_fingerprint(holder.get(n, _ABSENT)) != fp or \
                    fallback is not None and _global_fingerprint(fallback.get(n, _ABSENT)) != falls.get(n)
            except Unserializable:  # it holds what no entry is stored for
                changed = True
            if changed:
                log.info("cached graph not used: %s of module %s changed since it was stored",
                         ".".join([*way, n]), module)
                return None
        read[key or (id(holder), id(fallback))] = (holder, fallback, set(names), None if not way else
                                                   (vars(mod), *way))
    return read


def _module_of(d: dict) -> str | None:
    name = d.get("__name__")
    mod = sys.modules.get(name) if isinstance(name, str) else None
    return name if mod is not None and getattr(mod, "__dict__", None) is d else None


_ABSENT = object()


def _fingerprint(v: Any, depth: int = 0, state: bool = False, within: tuple[int, ...] = ()) -> Any:
    """What a global holds, as JSON that another process computes alike for the same value: numbers, strings and
    the like by value, modules by name, functions and classes by module, name and bytecode (a function with the
    values its closure holds, a bound method with its object's attributes), tensors by contents, containers by their
    items; another object by its type only (the attributes the code read off it are stored apart), unless `state`:
    a value a closure holds, whose reads are not, counts with its attributes (an nn.Module with its parameters).
    `within`: the functions and objects being fingerprinted around this one (a closure may hold itself)."""
    if v is _ABSENT:
        return "absent"
    if type(v) in _PRIMITIVE or isinstance(v, (torch.dtype, torch.device)):
        return [type(v).__name__, repr(v)]
    if isinstance(v, types.ModuleType):
        return ["module", v.__name__]
    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype), list(v.shape), hashlib.sha1(tensor_bytes(v)).hexdigest()]
    if depth < 4 and type(v) in (tuple, list, set, frozenset):
        items = sorted(map(repr, v)) if type(v) in (set, frozenset) else \
            [_fingerprint(x, depth + 1, state, within) for x in v]
        return [type(v).__name__, items]
    if depth < 4 and type(v) is dict:
        return ["dict", [[repr(k), _fingerprint(x, depth + 1, state, within)] for k, x in v.items()]]
    if id(v) in within:
        return ["again", type(v).__qualname__]
    if state and isinstance(v, nn.Module):  # not one of the model's: its state is not keyed elsewhere
        return ["nn.Module", _model_fingerprint(v, within), _class_closures(v, within), _weights_hash(v)]
    fn = getattr(v, "__func__", v)
    if callable(fn) and hasattr(fn, "__qualname__"):
        code = getattr(fn, "__code__", None)
        digest = hashlib.sha1(code.co_code + repr([c for c in code.co_consts if type(c) in _PRIMITIVE]).encode())\
            .hexdigest() if code is not None else ""
        out = ["callable", getattr(fn, "__module__", None), fn.__qualname__, digest]
        if getattr(fn, "__closure__", None):
            out.append(_closure_fingerprint(fn, depth, within))
        if isinstance(fn, types.FunctionType) and (fn.__defaults__ or fn.__kwdefaults__):
            out.append(_defaults_fingerprint(fn, depth, within))
        if isinstance(v, types.MethodType) and not isinstance(v.__self__, type):  # its object's attributes
            out.append(_fingerprint(v.__self__, depth + 1, True, (*within, id(v))))
        return out
    if state and depth < 4 and type(getattr(v, "__dict__", None)) is dict:
        return ["object", type(v).__module__, type(v).__qualname__,
                [[k, _fingerprint(x, depth + 1, True, (*within, id(v)))] for k, x in sorted(vars(v).items())]]
    return ["object", type(v).__module__, type(v).__qualname__]


def held_items(v: Any) -> Any:
    """What a global holds as a container of objects: a list's or tuple's items, a dict's values, else `v` itself."""
    return v.values() if type(v) is dict else v if type(v) in (list, tuple) else (v,)


def _global_fingerprint(v: Any) -> Any:
    """A global's `_fingerprint`; a module (or a list, tuple or dict of modules) with its state: the graph of code
    that calls a module it reads as a global holds that module's attributes and weights (fxcc.guards.reached_modules
    recompiles when they change; the recompile must not find the graph stored before)."""
    return _fingerprint(v, 0, any(isinstance(x, nn.Module) for x in held_items(v)))


def _closure_fingerprint(fn: types.FunctionType, depth: int = 0, within: tuple[int, ...] = ()) -> list:
    """The values a function's closure cells hold, by name (`_fingerprint`, with their state): another process that
    made the same function with other values (a factory's argument) gets another fingerprint."""
    if depth >= 8:
        raise Unserializable(f"the closure of {fn.__qualname__} nests too deeply to be keyed")
    cells = []
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a variable not assigned yet)
            value = _ABSENT
        cells.append([name, _fingerprint(value, depth + 1, True, (*within, id(fn)))])
    return cells


# ------------------------------------------------------------------------------------ serializer


class BadEntry(ValueError):
    """A graph entry that does not fit the schema: it is refused before anything of it runs."""


def _target_name(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"op:{t.name()}"  # "aten::addmm.default" style, resolved back through torch.ops
    for name, fn in _PY_TARGETS.items():
        if t is fn:
            return f"py:{name}"
    raise Unserializable(f"call target {t!r}")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP = re.compile(r"op:([A-Za-z_][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")
_KINDS = ("pointwise", "reduction", "gemm", "extern")


def _ident(x: Any, what: str) -> str:
    """A Python identifier that is no keyword and no dunder: what fx may write into generated code."""
    if not (isinstance(x, str) and _IDENT.fullmatch(x) and not keyword.iskeyword(x) and not x.startswith("__")):
        raise BadEntry(f"{what} {x!r} is not a plain identifier")
    return x


def _dotted(x: Any, what: str) -> str:
    """An attribute path such as `layers.0.mlp.weight`: identifiers, or indices into a module list."""
    if not isinstance(x, str):
        raise BadEntry(f"{what} {x!r} is not a string")
    for part in x.split("."):
        if not re.fullmatch(r"[0-9]+", part):
            _ident(part, what)
    return x


def _resolve(name: Any) -> Any:
    """A call target by name: a registered op overload (`op:ns::name.overload`) or one of `_PY_TARGETS`."""
    if isinstance(name, str) and name.startswith("py:") and name[3:] in _PY_TARGETS:
        return _PY_TARGETS[name[3:]]
    m = _OP.fullmatch(name) if isinstance(name, str) else None
    # op names may be dunders (aten::__and__.Tensor); namespaces and overloads may not
    if m is None or m[1].startswith("__") or (m[3] or "").startswith("__"):
        raise BadEntry(f"call target {name!r} is not a registered op")
    try:
        packet = getattr(getattr(torch.ops, m[1]), m[2])
        op = getattr(packet, m[3] or "default") if isinstance(packet, torch._ops.OpOverloadPacket) else None
    except (AttributeError, RuntimeError):
        raise BadEntry(f"call target {name!r} is not a registered op") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise BadEntry(f"call target {name!r} is not an op overload")
    return op


def _of(x: Any, kind: type, what: str) -> Any:
    if not isinstance(getattr(torch, x, None) if isinstance(x, str) and _IDENT.fullmatch(x) else None, kind):
        raise BadEntry(f"{what} {x!r} is not a torch.{kind.__name__}")
    return getattr(torch, x)


def _device(x: Any) -> torch.device:
    if not isinstance(x, str):
        raise BadEntry(f"device {x!r} is not a string")
    try:
        return torch.device(x)
    except RuntimeError:
        raise BadEntry(f"device {x!r} is not a device") from None


def _float(x: Any) -> float:
    if not isinstance(x, str):
        raise BadEntry(f"float {x!r} is not written as a string")
    try:
        return float(x)
    except ValueError:
        raise BadEntry(f"float {x!r} is not a number") from None


def _int(x: Any, what: str, low: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise BadEntry(f"{what} {x!r} is not an integer >= {low}")
    return x


def _ints(x: Any, what: str) -> list[int]:
    if not isinstance(x, list):
        raise BadEntry(f"{what} {x!r} is not a list")
    return [_int(i, what) for i in x]


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"n": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return {"f": repr(a)}  # keeps inf and nan exact
    if isinstance(a, (list, tuple)):
        return {"l" if isinstance(a, list) else "t": [_enc(x) for x in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"mf": str(a).removeprefix("torch.")}
    raise Unserializable(f"an argument of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, fx.Node]) -> Any:
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if not isinstance(a, dict) or len(a) != 1:
        raise BadEntry(f"argument {a!r} is not an encoded value")
    (tag, v), = a.items()
    if tag == "n":
        if v not in env:
            raise BadEntry(f"argument names node {v!r}, not defined before it")
        return env[v]
    if tag == "f":
        return _float(v)
    if tag in ("l", "t") and isinstance(v, list):
        items = [_dec(x, env) for x in v]
        return items if tag == "l" else tuple(items)
    if tag == "device":
        return _device(v)
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "mf": torch.memory_format}
    if tag in kinds:
        return _of(v, kinds[tag], tag)
    raise BadEntry(f"argument {a!r} has an unknown tag")


def _enc_val(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return {"T": [list(v.shape), list(v.stride()), int(v.storage_offset()), str(v.dtype).removeprefix("torch."),
                      str(v.device)]}
    if isinstance(v, (list, tuple)):
        return {"l" if isinstance(v, list) else "t": [_enc_val(x) for x in v]}
    if isinstance(v, (bool, int, float)) or v is None:
        return {"f": repr(v)} if isinstance(v, float) else v
    raise Unserializable(f"a value of type {type(v).__name__}")


def _dec_val(v: Any, fakes: dict) -> Any:
    """A value recorded by `_enc_val`; tensors come back as FakeTensors, one per distinct layout."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if not isinstance(v, dict) or len(v) != 1:
        raise BadEntry(f"value {v!r} is not an encoded value")
    (tag, x), = v.items()
    if tag == "T":
        if not (isinstance(x, list) and len(x) == 5):
            raise BadEntry(f"tensor value {x!r} is not [shape, stride, offset, dtype, device]")
        shape, stride, offset = _ints(x[0], "shape"), _ints(x[1], "stride"), _int(x[2], "storage offset")
        dtype, device = _of(x[3], torch.dtype, "dtype"), _device(x[4])
        if len(shape) != len(stride):
            raise BadEntry(f"tensor value {x!r}: shape and stride differ in length")
        layout = repr(x)
        if layout not in fakes:
            with fakes["mode"]:
                t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                fakes[layout] = t.as_strided(shape, stride, offset) if offset else t
        return fakes[layout]
    if tag == "f":
        return _float(x)
    if tag in ("l", "t") and isinstance(x, list):
        items = [_dec_val(i, fakes) for i in x]
        return items if tag == "l" else tuple(items)
    raise BadEntry(f"value {v!r} has an unknown tag")


def _enc_graph(graph: fx.Graph) -> list[dict]:
    nodes = []
    for n in graph.nodes:
        d = {"name": n.name, "op": n.op, "args": _enc(tuple(n.args)), "kwargs": {k: _enc(v) for k, v in n.kwargs.items()}}
        if n.op == "call_function":
            d["target"] = _target_name(n.target)
        elif n.op in ("placeholder", "get_attr"):
            d["target"] = n.target
        elif n.op != "output":
            raise Unserializable(f"a {n.op} node ({n.name})")
        if "val" in n.meta:
            d["val"] = _enc_val(n.meta["val"])
        if n.meta.get("fxcc_eager"):
            d["eager"] = n.meta["fxcc_eager"]
        nodes.append(d)
    return nodes


def _dec_graph(nodes: Any, fakes: dict, attrs: dict) -> fx.Graph:
    """The graph a node list describes, every field checked first (BadEntry names the first that is not)."""
    if not isinstance(nodes, list):
        raise BadEntry("the graph is not a list of nodes")
    graph, env = fx.Graph(), {}
    for d in nodes:
        if not isinstance(d, dict) or not isinstance(d.get("kwargs"), dict):
            raise BadEntry(f"node {d!r} is not a node record")
        name, op = _ident(d.get("name"), "node name"), d.get("op")
        if name in env:
            raise BadEntry(f"node name {name!r} is used twice")
        if op == "placeholder":
            target = _ident(d.get("target"), "placeholder")
        elif op == "get_attr":
            target = _dotted(d.get("target"), "attribute")
            if target not in attrs:
                raise BadEntry(f"attribute {target!r} is not among the entry's tensors")
        elif op == "call_function":
            target = _resolve(d.get("target"))
        elif op == "output":
            target = "output"
        else:
            raise BadEntry(f"node {name!r} has op {op!r}")
        args = _dec(d.get("args"), env)
        if not isinstance(args, tuple):
            raise BadEntry(f"node {name!r}: arguments are not a tuple")
        kwargs = {_ident(k, "keyword"): _dec(v, env) for k, v in d["kwargs"].items()}
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise BadEntry(f"node name {name!r} clashes with a name fx reserves")
        if "val" in d:
            node.meta["val"] = _dec_val(d["val"], fakes)
        if "eager" in d:
            if not isinstance(d["eager"], str):
                raise BadEntry(f"node {name!r}: its eager reason is not a string")
            node.meta["fxcc_eager"] = d["eager"]
        env[name] = node
    return graph


def _serialize(gm: fx.GraphModule, module: nn.Module) -> tuple[dict, dict[str, bytes]]:
    by_id = {id(t): n for n, t in named_tensors(module).items()}
    attrs, files = {}, {}
    kernels = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = ir.fetch_attr(gm, n.target)
            if not isinstance(t, torch.Tensor):
                raise Unserializable(f"attribute {n.target} of type {type(t).__name__}")
            parts = ir.parts_of(t)
            if id(t) in by_id:
                attrs[n.target] = {"param": by_id[id(t)]}
            elif parts is not None and all(id(p) in by_id for p in parts):  # model tensors concatenated in place
                attrs[n.target] = {"concat": [by_id[id(p)] for p in parts]}
            else:
                refs = ir.sources_of(t)
                if refs is None:
                    raise Unserializable(f"constant {n.target} of unknown origin")
                name = f"const{len(files)}.bin"
                files[name] = tensor_bytes(t).tobytes()
                attrs[n.target] = {"const": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                   "device": str(t.device), "parameter": isinstance(t, nn.Parameter),
                                   "sources": sorted({by_id[id(r())] for r in refs if id(r()) in by_id})}
        elif n.op == "call_function" and n.target in KERNEL_OPS and n.args[1] not in kernels:
            kb = kernel_body(n.args[1])
            kernels[kb.key] = {"kind": kb.kind, "text": kb.text, "graph": _enc_graph(kb.body.graph)}
    return {"graph": _enc_graph(gm.graph), "attrs": attrs, "kernels": kernels}, files


def _decode(doc: dict, files: dict, module: nn.Module) -> Hit:
    for field, kind in (("method", str), ("in_spec", str), ("out_spec", str), ("records", list), ("attrs", dict),
                        ("kernels", dict)):
        if not isinstance(doc.get(field), kind):
            raise BadEntry(f"field {field!r} is missing or not a {kind.__name__}")
    records = []
    for r in doc["records"]:
        if not (isinstance(r, dict) and isinstance(r.get("spec"), str) and isinstance(r.get("seconds"), (int, float))
                and isinstance(r.get("changed"), bool) and isinstance(r.get("stats"), dict)):
            raise BadEntry(f"pass record {r!r} is malformed")
        records.append(PassRecord(r["spec"], r["seconds"], PassResult(r["changed"], r["stats"])))
    gm = _deserialize(doc, files, module)
    return Hit(gm, pytree.treespec_loads(doc["in_spec"]), pytree.treespec_loads(doc["out_spec"]), doc["method"],
               records, _missing(doc.get("missing"), module))


def _missing(stored: Any, module: nn.Module) -> dict[int, frozenset[str] | None] | None:
    """The stored names capture looked up and did not find, by module path, as they are for `module` (by id)."""
    if stored is None:
        return None
    if not isinstance(stored, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, list) and all(isinstance(n, str) for n in v))
            for k, v in stored.items()):
        raise BadEntry("field 'missing' is not a map of module paths to lists of names")
    mods = dict(module.named_modules(remove_duplicate=False))
    return {id(mods[p]): None if v is None else frozenset(v) for p, v in stored.items() if p in mods}


def _deserialize(doc: dict, files: dict, module: nn.Module) -> fx.GraphModule:
    fakes: dict[str, Any] = {"mode": FakeTensorMode(allow_non_fake_inputs=True)}
    tensors = named_tensors(module)
    root: dict[str, Any] = {}
    for target, a in doc["attrs"].items():
        _dotted(target, "attribute")
        if not isinstance(a, dict):
            raise BadEntry(f"attribute {target!r} is not a record")
        if "param" in a:
            if a["param"] not in tensors:
                raise BadEntry(f"attribute {target!r} names {a['param']!r}, which the model does not have")
            root[target] = tensors[a["param"]]
            continue
        if "concat" in a:
            parts = a["concat"]
            if not isinstance(parts, list) or not parts or any(p not in tensors for p in parts):
                raise BadEntry(f"attribute {target!r}: its parts are not tensors of the model")
            root[target] = ir.concat_rows([tensors[p] for p in parts])
            continue
        if a.get("const") not in files:
            raise BadEntry(f"attribute {target!r} names no file of the entry")
        shape, dtype = _ints(a.get("shape"), "shape"), _of(a.get("dtype"), torch.dtype, "dtype")
        device, sources = _device(a.get("device")), a.get("sources")
        if not isinstance(sources, list) or any(s not in tensors for s in sources):
            raise BadEntry(f"attribute {target!r}: its sources are not tensors of the model")
        raw = bytearray(files[a["const"]].read_bytes())
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise BadEntry(f"attribute {target!r}: {len(raw)} bytes for a {dtype} tensor of shape {shape}")
        t = torch.empty(shape, dtype=dtype)  # torch's allocator aligns it (a bytearray's buffer may not be: kernels
        if raw:  # that assume 64-byte alignment would copy a misaligned constant at every call)
            t.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(raw, dtype=torch.uint8))
        t = t.to(device)
        t = nn.Parameter(t, requires_grad=False) if a.get("parameter") is True else t
        root[target] = ir.computed_from(t, *(tensors[s] for s in sources))
    for key, k in doc["kernels"].items():
        if not (isinstance(k, dict) and k.get("kind") in _KINDS and isinstance(k.get("text"), str)):
            raise BadEntry(f"kernel {key!r} is malformed")
        body = fx.GraphModule(nn.Module(), _dec_graph(k.get("graph"), fakes, {}))
        if f"k{ir.fingerprint(k['text'])}" != key or ir.kernel_text(body, k["kind"]) != k["text"]:
            raise BadEntry(f"kernel {key!r}: its graph does not match its key")
        intern_body(KernelBody(key, k["kind"], body, k["text"]))
    return fx.GraphModule(root, _dec_graph(doc["graph"], fakes, root))
