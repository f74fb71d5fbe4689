"""What a compiled module assumed about its model's state, checked before every call (fxcc.runtime).

A compiled variant reads the model's parameters and buffers live (its executable holds the tensors
themselves), so in-place updates of most weights need nothing. What it does not read live is what a
compile baked in:
- the module tree, parameters, buffers and tensor attributes by identity (a replaced one is another model);
- their layouts (shape, strides, dtype, device): kernels were built for them (`p.data = t` may change them);
- primitive attributes of every submodule and of `config` objects (export folds `negative_slope`, `eps`,
  flags of the forward into the graph);
- which attributes exist: a submodule's attribute deleted, or added where the traced code could have read it
  (it looked the name up and did not find it, fxcc.capture.missing_lookups; or it shadows a class attribute);
  parameters, buffers and submodules added or deleted; `config` fields added or deleted. An attribute added
  that no traced code can have read (transformers' `_previous_max_cache_length`, set by a static-cache
  generate) and fxcc's own compiled forward installed on the model are no change;
- the contents of tensors a pass computed constants from (folded subgraphs, merged or quantized weights,
  shards: fxcc.ir.computed_from), watched by fxcc.watch, which also sees writes through `.data`;
- on CUDA graphs, the address of every tensor a graph reads (it replays the pointers it captured).
All of this holds for the modules compiled code read outside the model too (a module a compiled function reads as
a global or a closure variable: `reached_modules`), named by the name it was read by.
Packed copies the backends keep are checked by the backends themselves (fxcc.codegen.derived).
The check runs on every call: C-level loops over lists built once. Everything held in the module's dicts (its
`__dict__`, parameters, buffers, submodules, and `config` objects' fields) is first checked by the dicts' version
tags (PEP 509: a tag changes at every insertion, replacement or deletion, however it is made, `vars(m)[k] = v` and
`m._modules[k] = v` included), all of them in one C++ pass of torch's dict-version guard: where no tag moved, no
entry changed, and only primitive values that can change in place (lists) are compared. Where a tag moved, the
entries are compared one by one as before, and the tags are taken again when nothing that matters changed.
"""

from __future__ import annotations

import copy
import enum
import functools
import itertools
import logging
import operator
import types
from itertools import repeat
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import ir
from .capture import Closure, GlobalReads, Missing, own_tensors
from .graph_cache import MODULE_INTERNALS, held_items, named_tensors, primitive
from .module_view import ModuleView
from .watch import Layouts, Snapshot

try:  # torch's C++ guard tree (torch.compile's own guards): one pass over many dicts' version tags
    from torch._C._dynamo.guards import RootGuardManager as _RootGuardManager
    from torch._C._dynamo.guards import dict_version as _dict_version
    from torch._dynamo.guards import GuardManagerType as _GuardManagerType
except ImportError:  # pragma: no cover - a torch without it: the entries are compared one by one
    _RootGuardManager = _GuardManagerType = _dict_version = None

# flags of a module that no forward reads: transformers' "weights initialised" mark (on every submodule)
log = logging.getLogger(__name__)
# attributes no forward reads: transformers' own (a generate replaces or changes them; its GenerationConfig is
# too large to compare by value; a static-cache generate sets `_previous_max_cache_length` to the longest cache yet,
# so a longer prompt changes it)
_NOT_READ = frozenset({"_is_hf_initialized", "generation_config", "_previous_max_cache_length"})
_ADDRESS = torch._C._data_address
_OFFSET = torch.Tensor.storage_offset


def _STORAGE(t: torch.Tensor) -> int:  # noqa: N802 - a constant-like accessor, as the three above
    """Where t's storage begins, read without asking for a writable pointer (`untyped_storage().data_ptr()`
    gives a copy-on-write snapshot's tensor a copy of itself)."""
    return _ADDRESS(t) - t.storage_offset() * t.element_size()


def call_context() -> tuple:
    """The caller's torch state that changes what capture produces, hence part of every guard and graph key:
    autocast (device types and their dtypes) and the default dtype (of tensors the forward creates)."""
    autocast = ()
    if torch._C._is_any_autocast_enabled():
        autocast = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    return autocast, torch.get_default_dtype()


def reached_modules(module: nn.Module, globals_read: GlobalReads | None) -> list[tuple[str, nn.Module]]:
    """The modules compiled code read that are none of `module`'s tree, each with the name it was read by: a global
    (`G(x)` in a compiled function), a closure variable, an attribute of a compiled method's object, or an item of
    a list, tuple or dict held there. Their state is the compiled code's as the tree's is (their parameters are
    constants of its graph, which passes fold); a compiled module read there stands for its model."""
    seen = {id(m) for m in module.modules()}
    out = []
    for holder, fallback, names, _ in (globals_read or {}).values():
        for name in sorted(names):
            v = _lookup(holder, fallback, name)
            for x in itertools.islice(held_items(v), _HELD_ITEMS):
                x = x.module if isinstance(x, ModuleView) else x
                if isinstance(x, nn.Module) and id(x) not in seen:
                    seen.update(map(id, x.modules()))
                    out.append((name, x))
    return out


def model_tensors(module: nn.Module, reached: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """Every tensor of the model by name (fxcc.graph_cache.named_tensors), and those of the modules compiled code
    read outside it (`reached`: `reached_modules`)."""
    out = named_tensors(module)
    for name, mod in reached:
        out.update((f"{name}.{k}", t) for k, t in named_tensors(mod).items())
    return out


def graph_sources(gm: fx.GraphModule, module: nn.Module,
                  globals_read: GlobalReads | None = None) -> list[torch.Tensor] | None:
    """The model's tensors the constants of `gm` were computed from; None when a constant's origin is unknown
    (then every tensor of the model counts). Constants that are the model's own tensors are read live.
    `globals_read`: what the capture read outside the model, whose modules' tensors count as the model's."""
    mine = {id(t) for t in model_tensors(module, reached_modules(module, globals_read)).values()}
    out: dict[int, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        t = ir.fetch_attr(gm, n.target)
        if not isinstance(t, torch.Tensor) or id(t) in mine:
            continue
        refs = ir.sources_of(t)
        if refs is None:
            return None
        for r in refs:
            s = r()
            if s is not None and id(s) in mine:
                out[id(s)] = s
    return list(out.values())


def mark_code_constants(gm: fx.GraphModule, module: nn.Module, globals_read: GlobalReads | None = None) -> None:
    """Constants right after capture that are not the model's tensors (nor those of a module read outside it,
    `reached_modules`) come from its code (`torch.tensor(...)` in forward): computed from nothing the user can
    change. Export lifts the tensors of a module read outside the model as aliases of them (another tensor over
    the same memory): such a constant is computed from the tensor it aliases, which is then watched (fxcc.watch;
    `.data =` on it leaves the alias reading the old memory)."""
    reached = reached_modules(module, globals_read)
    mine = {id(t) for t in model_tensors(module, reached).values()}
    outside = {_alias_key(t): t for _, m in reached for t in named_tensors(m).values() if _alias_key(t) is not None}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = ir.peek_attr(gm, n.target)  # a weight still in its checkpoint is not read for this
            if isinstance(t, torch.Tensor) and id(t) not in mine and ir.sources_of(t) is None:
                source = outside.get(_alias_key(t)) if outside else None
                if source is None:
                    ir.computed_from(t)
                else:
                    ir.computed_from(t, source)


def _alias_key(t: torch.Tensor) -> tuple | None:
    """Where and how `t` lies in memory: equal for two tensors that are views of one another with one layout."""
    if t.device.type == "meta" or type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        return None
    return _STORAGE(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device


class Globals:
    """The Python globals compiled code read at capture (fxcc.capture.global_reads), as they are now; `unchanged()`
    is the check on every call, `what()` names the first global rebound or changed since.

    A rebinding moves its dict's version tag (PEP 509), so where no tag moved (one C++ pass over the dicts) no global
    was rebound. Where one moved, only that dict's names are looked up again and compared: by identity, numbers,
    strings and the like by value (`SCALE = 2.0` again is no change). A dict whose tag keeps moving without a change
    that matters (a script's loop counter, stored in its module's globals at every step) leaves the tagged set
    after _BUSY such moves: its few names are then compared at every call. A global list, dict or set is compared
    by its contents at every call, and a global tensor by its snapshot (fxcc.watch): export lifts a global tensor
    as a constant of the graph, which passes may fold.

    The closure variables the code read (fxcc.capture.Closure) and the attributes of a compiled bound method's object
    are read as globals are: a cell has no version tag, so the cells are compared by identity at every call (one
    C-level pass), and by value where one was rebound (`scale = 2.0` again is no change).

    `written`: the tensors every compiled variant writes in place (a global a helper writes through its parameter:
    the graph makes the write). No variant folds them (fxcc.ir.written_in_place), so a variant's own write into one
    is no change: `accept_writes` takes its snapshot again after the call, and only a write made by other code
    between calls is seen."""

    def __init__(self, reads: GlobalReads, written: list[torch.Tensor] | None = None) -> None:
        self.holders, self.fallbacks, self.names, self.paths = [], [], [], []
        dicts: dict[int, dict] = {}
        for holder, fallback, names, path in reads.values():
            for d in (holder, fallback):
                if d is not None and type(d) is not Closure:
                    dicts[id(d)] = d
            for n in sorted(names):
                self.holders.append(holder)
                self.fallbacks.append(fallback)
                self.names.append(n)
                self.paths.append(path)
        self.values = list(map(_lookup, self.holders, self.fallbacks, self.names))
        self.dicts = list(dicts.values())
        self.of: dict[int, list[int]] = {k: [] for k in dicts}  # dict -> the entries that resolve through it
        for i, (h, f) in enumerate(zip(self.holders, self.fallbacks)):
            if type(h) is not Closure:
                self.of[id(h)].append(i)
            if f is not None:
                self.of[id(f)].append(i)
        self._cell_entries = [i for i, h in enumerate(self.holders) if type(h) is Closure]
        self._cells = [self.holders[i].cells[self.names[i]] for i in self._cell_entries]
        self._cell_values = [self.values[i] for i in self._cell_entries]
        # a class's attributes (a mappingproxy) have no version tag: compared at every call from the start
        self.moves = {k: 0 if type(d) is dict else _BUSY + 1 for k, d in dicts.items()}
        self.busy = sorted({i for k, n in self.moves.items() if n > _BUSY for i in self.of[k]})  # compared every call
        boxes = [i for i, v in enumerate(self.values) if type(v) in _CONTAINERS]
        self.boxes = [(self.values[i], _copied(self.values[i]), i) for i in boxes]
        tensors = {id(v): (v, i) for i, v in enumerate(self.values) if isinstance(v, torch.Tensor)}
        self.tensors = [(t, Snapshot(t), i) for t, i in tensors.values()]
        self.in_place = bool(self.boxes or self.tensors)
        self._box_values, self._box_copies = [v for v, _, _ in self.boxes], [c for _, c, _ in self.boxes]
        self._snaps, self._global_tensors = [s for _, s, _ in self.tensors], [t for t, _, _ in self.tensors]
        own = {id(t) for t in written or ()}
        self.own = [(t, s) for t, s, _ in self.tensors if id(t) in own]  # what `accept_writes` takes again
        self._tag()

    def _tag(self) -> None:
        self.quiet = [d for d in self.dicts if self.moves[id(d)] <= _BUSY]
        self.root = _dict_versions(self.quiet) if _VERSIONS else None
        self.single = [_dict_versions([d]) for d in self.quiet] if self.root is not None else None

    def unchanged(self) -> bool:
        """No global rebound or changed in place (the check on every call)."""
        root = self.root
        if root is not None and root.check(self.quiet):
            if self.busy and not self._same(self.busy):
                return False
        elif not self._moved():
            return False
        if self._cells and not all(map(operator.is_, map(_contents, self._cells), self._cell_values)) \
                and not self._cells_same():
            return False
        return not self.in_place or self._contents_same()

    def _cells_same(self) -> bool:
        """Some closure cell holds another object: the same value (an equal number, string) is no change, and the
        values are taken again."""
        if not self._same(self._cell_entries):
            return False
        self._cell_values = list(map(_contents, self._cells))
        for i, v in zip(self._cell_entries, self._cell_values):
            self.values[i] = v
        return True

    def _same(self, entries: Any) -> bool:
        for i in entries:
            v, old = _lookup(self.holders[i], self.fallbacks[i], self.names[i]), self.values[i]
            if v is not old and not _equal(v, old):
                return False
        return True

    def _moved(self) -> bool:
        """Some tag moved: the names of the dicts whose tags moved compared; when they are the same, those values
        and tags are taken again."""
        if self.root is None:
            return self._same(range(len(self.names)))
        moved = [d for d, g in zip(self.quiet, self.single) if g is None or not g.check([d])]
        entries = sorted({i for d in moved for i in self.of[id(d)]}.union(self.busy))
        if not self._same(entries):
            return False
        for i in entries:
            self.values[i] = _lookup(self.holders[i], self.fallbacks[i], self.names[i])
        for d in moved:
            self.moves[id(d)] += 1
            if self.moves[id(d)] == _BUSY + 1:
                log.debug("a globals dict keeps changing (%s): its names are compared at every call",
                          d.get("__name__", "an object's attributes"))
        self.busy = sorted({i for k, n in self.moves.items() if n > _BUSY for i in self.of[k]})
        self._tag()
        return True

    def accept_writes(self, written: list[torch.Tensor]) -> None:
        """The compiled code itself wrote into `written`: the snapshots of those among the tensors every variant
        writes (`own`) are taken again. The guard ran just before the call: nothing else changed them since."""
        ids = {id(t) for t in written}
        for t, s in self.own:
            if id(t) in ids:
                s.take(t)

    def _contents_same(self) -> bool:
        return all(map(_same_contents, self._box_values, self._box_copies)) and \
            all(map(Snapshot.same, self._snaps, self._global_tensors))

    def what(self) -> str | None:
        """The first global rebound or changed in place since the snapshot, with its old and new value; None when
        none was."""
        for holder, fallback, name, old, path in zip(self.holders, self.fallbacks, self.names, self.values,
                                                     self.paths):
            new = _lookup(holder, fallback, name)
            if new is not old and not _equal(new, old):
                return f"{_where(holder, fallback, name, path)} changed: {_short(old)} -> {_short(new)}"
        for v, c, i in self.boxes:
            if not _same_contents(v, c):
                return f"{_where(self.holders[i], self.fallbacks[i], self.names[i], self.paths[i])} (a " \
                       f"{type(v).__name__}) changed in place"
        for t, s, i in self.tensors:
            if not s.same(t):
                return f"{_where(self.holders[i], self.fallbacks[i], self.names[i], self.paths[i])} (a tensor) " \
                       "changed in place"
        return None


_BUSY = 8  # times a globals dict's tag may move with nothing that matters changed before it is left untagged


_CONTAINERS = (list, dict, set, bytearray)


def _lookup(holder: dict, fallback: dict | None, name: str) -> Any:
    """What a global load of `name` finds: in `holder`, else in `fallback` (the builtins)."""
    v = holder.get(name, _MISSING)
    return fallback.get(name, _MISSING) if v is _MISSING and fallback is not None else v


def _equal(a: Any, b: Any) -> bool:
    """Equal numbers, strings, dtypes... of one type (so `1 == 1.0 == True` counts as a change)."""
    return type(a) is type(b) and _immutable(a) and a == b


def _copied(v: Any) -> Any:
    """A plain container's contents, nested containers copied too, for `_same_contents`."""
    if type(v) is dict:
        return {k: _copied(x) for k, x in v.items()}
    if type(v) in (list, set, bytearray):
        return type(v)(_copied(x) for x in v) if type(v) is list else type(v)(v)
    return v


def _same_contents(v: Any, c: Any) -> bool:
    """Container `v` holds what its copy `c` holds: the same objects, or equal plain values."""
    if type(v) is not type(c):
        return False
    if type(v) is dict:
        return v.keys() == c.keys() and all(_same_contents(x, c[k]) for k, x in v.items())
    if type(v) is list:
        return len(v) == len(c) and all(map(_same_contents, v, c))
    if type(v) in (set, bytearray):
        return v == c
    return v is c or _equal(v, c)


def _contents(cell: Any) -> Any:
    """What a closure cell holds (_MISSING: nothing yet)."""
    try:
        return cell.cell_contents
    except ValueError:
        return _MISSING


def _where(holder: Any, fallback: dict | None, name: str, path: tuple | None = None) -> str:
    if type(holder) is Closure:
        what = "default value of parameter" if holder.defaults else "variable"
        return f"{what} {name} of {'' if holder.defaults else 'the closure of '}{holder.fn.__qualname__}"
    if path is not None and path[0] == "self":  # ("self", the compiled method's object, attributes on the way)
        return f"attribute {'.'.join(['self', *path[2:], name])} of the compiled method's {type(path[1]).__name__}"
    if path is not None and path[0] == "closure":  # ("closure", the variable, attributes on the way)
        return f"attribute {'.'.join([*path[1:], name])} of an object a closure variable holds"
    if fallback is not None and name not in holder and name in fallback:
        return f"builtin {name}"
    module = holder.get("__name__")
    if isinstance(module, str) and ("__builtins__" in holder or "__spec__" in holder):
        return f"global {name} of module {module}"
    if type(holder) is not dict:
        return f"attribute {name} of a class a global holds"
    return f"attribute {name} of an object a global holds"


def _short(v: Any) -> str:
    if v is _MISSING:
        return "(not defined)"
    if isinstance(v, torch.Tensor):
        return f"a tensor {ir.type_str(v)} at {hex(id(v))}"
    fn = getattr(v, "__func__", v)
    if callable(fn) and isinstance(getattr(fn, "__qualname__", None), str):
        return f"{getattr(fn, '__module__', None) or type(v).__name__}.{fn.__qualname__}"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class ModuleState:
    """The state of `module` that compiled code depends on, as it is now; `changed()` says what differs later.

    sources: tensors whose contents were folded into constants (None: all of the model's tensors).
    live: tensors a replayed CUDA graph reads where they were at its capture: their addresses are checked too.
    Only those: a tensor the graph does not read may move (an eager op that asks a copy-on-write snapshot's
    tensor for a writable pointer gives it a fresh buffer with the same values; its watch sees that).
    written: the tensors every compiled variant writes in place, whose writes `accept_writes` takes as the
    variant's own.
    """

    def __init__(self, module: nn.Module, sources: list[torch.Tensor] | None,
                 live: list[torch.Tensor] | None = None, missing: Missing | None = None,
                 globals_read: GlobalReads | None = None, written: list[torch.Tensor] | None = None) -> None:
        self.owners, self.names, self.objs, self.where = [], [], [], []
        self.dicts, self.keys, self.values, self.attr_where = [], [], [], []  # primitive attributes
        self.counts_of: list[dict] = []  # dicts whose keys matter, each with the keys it had and what it is
        self.bases: list[frozenset] = []
        self.kinds: list[tuple[str, Any, str]] = []  # ("attrs", module, at) | (store kind, module, at) | ("config", ..)
        self.missing = missing  # names the traced code looked up and did not find, per module (None: not known)
        self.miss_dicts: list[dict] = []  # (dict, name) pairs: the name is in none of them (checked on every call)
        self.miss_names: list[str] = []
        self.modes: list[dict] = []  # submodules' attributes, whose `training` must keep its relation to the root's
        self.held: set[int] = set()  # dicts whose contents `_held` records: each once
        self.module = module
        self.written = {id(t) for t in written or ()}  # the tensors every variant writes (`accept_writes`)
        self.globals = Globals(globals_read, written) if globals_read else None  # the Python globals compiled code read
        for path, mod in module.named_modules(remove_duplicate=False):
            self._module(path, mod, root=mod is module)
        reached = reached_modules(module, globals_read)
        for name, top in reached:  # modules read through a global: watched alike
            for path, mod in top.named_modules(prefix=name, remove_duplicate=False):
                self._module(path, mod, root=False)
        self.relative = self._relative()
        self.root_training = module.training
        self.trainings = self._trainings()
        tensors = model_tensors(module, reached)
        self.tensors = list({id(t): t for t in tensors.values()}.values())
        self.tensor_names = {id(t): n for n, t in tensors.items()}
        self.layouts = Layouts(self.tensors)
        self.counts = list(map(len, self.counts_of))
        self._split_mutable()
        self.rearms = 0
        self.checks = 0  # calls of `changed()` since the snapshot (or since the runtime last set it to 0)
        # the root module's own dict is tagged apart: fxcc's generate installs its forward there and takes it away
        # (`taken_again`), and taking that one tag again costs nothing where rebuilding the others' check costs ms
        self.root_dict = vars(module)
        self.tagged = [d for d in self.counts_of if d is not self.root_dict]
        self.versions = _dict_versions(self.tagged) if _VERSIONS else None
        self.root_tag = _dict_version(self.root_dict) if self.versions is not None else None
        watched = self.tensors if sources is None else sources
        self.watched = [(t, Snapshot(t)) for t in watched]  # first: a snapshot may move a tensor's memory
        self._index_watched()
        read = {id(t) for t in live or ()}
        # a tensor of fxcc's own that a graph reads (a merged Q/K/V or gate/up weight) shares its memory with the
        # model's tensors that are its rows: a request for a writable pointer to one of them (torch.compile's
        # launches make one) moves that memory for all, and the graph goes on reading the old one, which only
        # their snapshots hold. Those tensors count as read: their move keeps that memory (`_live_kept`).
        shared = {_ADDRESS(t) for t in live or () if isinstance(t, torch.Tensor)} - {0}
        self.live = [t for t in self.tensors if id(t) in read or _ADDRESS(t) in shared]
        self.addresses = list(map(_ADDRESS, self.live)) if self.live else None
        self._live_ok = None  # the live tensors' addresses `_live_kept` last found good (their snapshots since kept)

    def _module(self, path: str, mod: nn.Module, root: bool) -> None:
        at = f"{path}." if path else ""
        stores = ((mod._modules, "submodule"), (mod._parameters, "parameter"), (mod._buffers, "buffer"))
        for store, kind in stores:
            for name, obj in store.items():
                self._identity(store, name, obj, f"{kind} {at}{name}")
            self._keys_of(store, (kind, mod, at))
        attrs = vars(mod)
        self._keys_of(attrs, ("attrs", mod, at))
        for name in self._missing_on(mod):
            if not any(name in d for d in (attrs, *(st for st, _ in stores))):
                for d in (attrs, *(st for st, _ in stores)):
                    self.miss_dicts.append(d)
                    self.miss_names.append(name)
        for k, v in attrs.items():
            if isinstance(v, torch.Tensor):  # a tensor attribute: export lifts it as a constant of the graph
                self._identity(attrs, k, v, f"tensor attribute {at}{k}")
            elif k == "training":  # the root's is part of the variant's key; submodules' count relative to it
                if not root and isinstance(v, bool):
                    self.modes.append(attrs)
            elif k not in MODULE_INTERNALS and k not in _NOT_READ:
                if primitive(v):
                    self._attr(attrs, k, v, f"attribute {at}{k}")
                elif own_tensors(mod, v):
                    # nn.RNNBase's list of its own weights: the graph reads the parameters, whose entries above see
                    # one replaced (RNNBase puts it in the list too) and are read live (a change in place is seen);
                    # the list by identity (`flatten_parameters`, `.to()` build a new one)
                    self._identity(attrs, k, v, f"attribute {at}{k}")
                elif k not in ("config", "forward") and not isinstance(mod, fx.GraphModule):
                    # not a forward set on the instance (capture and the eager fallback call the class's own:
                    # fxcc.capture.original_forward; a timer wrapped around it is no state of the graph), nor an
                    # fx GraphModule's own attributes (its graph, torch.compile's bookkeeping: its code is fixed)
                    self._held(attrs, k, v, f"attribute {at}{k}", 0)
        config = attrs.get("config")
        if config is not None and hasattr(config, "__dict__") and not isinstance(config, (nn.Module, torch.Tensor)):
            cfg = vars(config)
            if not any(d is cfg for d in self.counts_of):
                self._keys_of(cfg, ("config", config, f"{at}config."))
                for k, v in cfg.items():
                    if primitive(v):
                        self._attr(cfg, k, v, f"config field {at}config.{k}")

    def _identity(self, d: dict, k: Any, v: Any, where: str) -> None:
        """`d[k]`, watched by identity: the call finds it changed where `d[k] is not v`."""
        self.owners.append(d)
        self.names.append(k)
        self.objs.append(v)
        self.where.append(where)

    def _held(self, d: dict, k: Any, v: Any, where: str, depth: int) -> None:
        """`d[k]`, a value no primitive (fxcc.graph_cache.primitive): an Enum member, a function, a class or a Python
        module by identity, which their dict's tag covers; a list, tuple, set or dict of such values (and of
        primitives) by value; another dict, a SimpleNamespace or another object with a `__dict__` by identity and
        its entries as a module's attributes are (its dict's keys and tag too, so a change in place costs nothing
        to see where none was made).
        Past _HELD_DEPTH levels or _HELD_ITEMS entries, or holding what cannot be compared (an object without a
        `__dict__`), a container is watched by identity only, said once. Tensors and modules are watched apart."""
        if isinstance(v, (torch.Tensor, nn.Module)):
            return
        if type(v) in (list, tuple, set, frozenset) or type(v) is dict and _by_value(v, depth):
            # by value, compared at every call as a list is: replaced by an equal one is no change (transformers'
            # generate sets a model's `_tp_plan` dict anew at every call)
            if _by_value(v, depth):
                self._attr(d, k, v, where)
                return
        elif _plain(v):
            self._identity(d, k, v, where)
            inner = v if type(v) is dict else vars(v)
            if id(inner) in self.held:  # held by another attribute too (or by itself): its contents are watched
                return
            if depth < _HELD_DEPTH and len(inner) <= _HELD_ITEMS:
                self.held.add(id(inner))
                self._keys_of(inner, ("entry", v, where))
                for kk, vv in inner.items():
                    at = f"{where}[{kk!r}]" if type(v) is dict else f"{where}.{kk}"
                    if primitive(vv):
                        self._attr(inner, kk, vv, at)
                    else:
                        self._held(inner, kk, vv, at, depth + 1)
                return
        else:  # a function, a class, an Enum member, a Python module, an object without a __dict__: its identity
            self._identity(d, k, v, where)
            return
        self._identity(d, k, v, where)  # too deep or too large (or holding what cannot be compared): by identity only
        if where not in _UNWATCHED:
            _UNWATCHED.add(where)
            log.warning("%s (a %s) is watched by identity only (more than %d levels or %d entries, or it holds "
                        "objects that cannot be compared): a change made inside it after the compile is not seen; "
                        "replace it instead (`m.x = new`), which recompiles", where, type(v).__name__,
                        _HELD_DEPTH, _HELD_ITEMS)

    def _keys_of(self, d: dict, kind: tuple[str, Any, str]) -> None:
        self.counts_of.append(d)
        self.kinds.append(kind)
        mod = kind[1]
        self.bases.append(frozenset(k for k, v in d.items() if kind[0] != "attrs" or not _own_forward(mod, v)))

    def _missing_on(self, mod: nn.Module) -> frozenset[str]:
        if self.missing is None:
            return frozenset()
        return self.missing.get(id(mod)) or frozenset()

    def _attr(self, d: dict, k: str, v: Any, where: str) -> None:
        self.dicts.append(d)
        self.keys.append(k)
        self.values.append(copy.deepcopy(v))  # a list changed in place must not change the recorded value
        self.attr_where.append(where)

    def changed(self, layouts: bool = True) -> str | None:
        """None when everything compiled code depends on is as it was; else what changed, for the log.
        `layouts` False: the caller compared the tensors' layouts itself (fxcc.runtime's hot path)."""
        self.checks += 1
        if (self._entries_same()
                and (not layouts or self.layouts.same())
                and (self.addresses is None or self._live_in_place())
                and (not self.watched or self._watched_same())  # most models' weights are read live: none watched
                and (self.globals is None or self.globals.unchanged())):
            return None
        return self._what()

    def baked_changed(self) -> str | None:
        """What changed of the values compiled code holds rather than reads live (the contents of the tensors its
        constants were computed from, the globals it read); None when nothing did. The check of a DyCL segment,
        whose host program's own guard compares the rest (identities, layouts, attributes) on every call."""
        if self._watched_same() and (self.globals is None or self.globals.unchanged()):
            return None
        why = self.globals.what() if self.globals is not None else None
        if why is not None:
            return why
        for t, s in self.watched:
            if not s.same(t):
                return f"the contents of {self._name(t)} changed (compiled code holds values computed from it)"
        return None  # a snapshot was taken again: contents were the same

    def _entries_same(self) -> bool:
        """The dicts' entries compiled code depends on are as they were: by the dicts' version tags where none
        moved (then only lists are compared: they change in place), else entry by entry (and, when they are the
        same, the tags are taken again: the root module's alone where only its dict moved, as transformers'
        generate moves it at every call; all of them in one guard built again otherwise)."""
        versions = self.versions
        if self.tags_hold():
            return (not self.mutable_dicts
                    or list(map(dict.get, self.mutable_dicts, self.mutable_keys)) == self.mutable_values)
        same = self._entries_equal()
        if same and versions is not None:
            self._tags_again()
        return same

    def _tags_again(self) -> None:
        """The tags taken again after a change that did not matter: the root module's alone where only its dict
        moved (transformers' generate records its state there at every call), else all (`_retag`)."""
        if self.versions.check(self.tagged):
            self.root_tag = _dict_version(self.root_dict)
        else:
            self._retag()

    def _entries_equal(self) -> bool:
        """The entries compared one by one: objects by identity, primitive values by equality, modes, counts."""
        return (all(map(operator.is_, map(dict.get, self.owners, self.names), self.objs))
                and list(map(dict.get, self.dicts, self.keys)) == self.values
                and self._same_modes()
                and list(map(len, self.counts_of)) == self.counts
                and not any(map(operator.contains, self.miss_dicts, self.miss_names)))

    def tags_hold(self) -> bool:
        """Whether the dicts' version tags are kept and none moved (the cheap check of `_entries_same`)."""
        return (self.versions is not None and _dict_version(self.root_dict) == self.root_tag
                and self.versions.check(self.tagged))

    def taken_again(self) -> None:
        """After fxcc's own change of a module's dict (`CompiledModule.generate` installs its forward on the model
        and takes it away again): where the dicts' version tags moved and the entries compiled code depends on are
        as they were, the tags are taken again without counting that among the changes that did not matter
        (_REARMS), which a served model's every generate would otherwise use up."""
        if (self.versions is not None and _dict_version(self.root_dict) != self.root_tag
                and self.versions.check(self.tagged) and self._entries_equal()):  # only the root's dict moved
            self.root_tag = _dict_version(self.root_dict)

    def accept_attribute_writes(self) -> None:
        """A DyCL host program ran: it reads the model's attributes live and its segments check only what they
        baked (`baked_changed`), so the primitive values the call itself stored (`self.calls += 1`) are no change of
        the model: they are recorded again. `changed()` ran just before the call: nothing else changed them since."""
        # primitive values only: a tensor or an object stored where one was is still a change (compared by value
        # it has no single truth value)
        now = list(map(dict.get, self.dicts, self.keys))
        every = all(map(_immutable, now))
        self.values = [copy.deepcopy(n) if _immutable(n) else was for n, was in zip(now, self.values)]
        self._split_mutable()
        if self.versions is not None and every:  # else the tags stay: the next check compares the entries
            self.versions = _dict_versions(self.tagged)
            self.root_tag = _dict_version(self.root_dict)

    def _split_mutable(self) -> None:
        """The recorded values that can change in place (lists: no dict tag moves), compared at every check."""
        mutable = [i for i, v in enumerate(self.values) if not _immutable(v)]
        self.mutable_dicts = [self.dicts[i] for i in mutable]
        self.mutable_keys = [self.keys[i] for i in mutable]
        self.mutable_values = [self.values[i] for i in mutable]

    def _retag(self) -> None:
        """Take the dicts' version tags again after a change that compiled code does not depend on (an attribute
        nothing reads, a value set to an equal one); given up after _REARMS such changes (a model that keeps
        changing its attributes), so that each call does not pay for both checks."""
        self.rearms += 1
        self.versions = _dict_versions(self.tagged) if self.rearms <= _REARMS else None
        self.root_tag = _dict_version(self.root_dict) if self.versions is not None else None
        if self.versions is None:
            log.debug("module state compared entry by entry from now on (%d changes that did not matter)",
                      self.rearms - 1)

    def _live_in_place(self) -> bool:
        """The tensors a CUDA graph reads are where it was captured, or `_live_kept`. Where they are where they were
        at the last check that found them kept, that check stands: each such snapshot holds the graph's memory
        since, and whether the tensors still hold those values is `_watched_same`'s comparison, made next."""
        now = list(map(_ADDRESS, self.live))
        if now == self.addresses or now == self._live_ok:
            return True
        if self._live_kept():
            self._live_ok = now
            return True
        return False

    def _live_kept(self) -> bool:
        """Every tensor a CUDA graph reads that is no longer where the graph was captured holds what it held, and
        the memory the graph reads is its snapshot's own plain copy (fxcc.watch: a tensor other code keeps asking
        for a writable pointer), so the graph reads the same values where they were."""
        snaps = {id(t): s for t, s in self.watched}
        for t, at in zip(self.live, self.addresses):
            if _ADDRESS(t) != at:
                s = snaps.get(id(t))
                if s is None or not s.same(t, keep=True) or not s.holds(at):
                    return False
        return True

    def rewatch(self) -> None:
        """The watched snapshots let go of their copies or took them again (fxcc.held): their addresses indexed anew."""
        self._index_watched()

    def _index_watched(self) -> None:
        """The watched tensors' buffer addresses and storage offsets as lists, where every snapshot is
        copy-on-write and every watched tensor's layout is one `changed` compares anyway: then two C-level
        passes prove what `Snapshot.same` proves one tensor at a time (its buffer is still the snapshot's)."""
        fast = all(s.watching() and id(t) in self.tensor_names for t, s in self.watched)
        self._watched_tensors = [t for t, _ in self.watched] if fast else None
        self._watched_at = [s.watched_at() for _, s in self.watched] if fast else None
        self._watched_offsets = [s.layout[2] for _, s in self.watched] if fast else None

    def _watched_same(self) -> bool:
        """Every watched tensor holds what its snapshot holds (called after the layouts were compared)."""
        ts = self._watched_tensors
        if ts is not None and list(map(_ADDRESS, ts)) == self._watched_at \
                and list(map(_OFFSET, ts)) == self._watched_offsets:
            return True
        same = all(s.same(t) for t, s in self.watched)
        if same:
            self._index_watched()  # a snapshot taken again (same bits, new buffer) has a new address
        return same

    def accept_writes(self, written: list[torch.Tensor]) -> None:
        """The compiled code itself wrote into `written`, buffers of the model (a KV cache held by the module) or
        tensors its code reached (a global a helper writes: `Globals.accept_writes`): that is no change of the
        model, so the watched contents over their memory are taken again. Only theirs: `changed()` ran just before
        the call, so nothing else can have changed since. And only where every variant writes them: a variant that
        only reads one may have folded it into a constant, which that write made stale."""
        written = [t for t in written if id(t) in self.written]
        if not written:
            return
        if self.globals is not None and self.globals.own:
            self.globals.accept_writes(written)
        ptrs = {_STORAGE(t) for t in written}
        hit = [_STORAGE(t) in ptrs for t, _ in self.watched]
        if any(hit):
            self.watched = [(t, Snapshot(t)) if h else (t, s) for (t, s), h in zip(self.watched, hit)]
            self._live_ok = None  # a new snapshot holds no memory a graph reads
            self._index_watched()

    def _what(self) -> str | None:
        why = self.globals.what() if self.globals is not None else None
        if why is not None:
            return why
        for d, k, obj, where in zip(self.owners, self.names, self.objs, self.where):
            if d.get(k, obj) is not obj:  # deleted: said below, with the keys added and deleted
                return f"{where} was replaced"
        for d, k, v, where in zip(self.dicts, self.keys, self.values, self.attr_where):
            if k not in d:
                return f"{where} was deleted"
            if d[k] is not v and (type(d[k]) is not type(v) or d[k] != v):
                return f"{where} changed from {_short(v)} to {_short(d[k])}"
        counts = list(map(len, self.counts_of))
        if counts != self.counts or any(map(operator.contains, self.miss_dicts, self.miss_names)):
            why = self._added_or_deleted()
            if why is not None:
                return why
            self.counts = counts  # only attributes nothing compiled can have read: the same state
            if self.versions is not None:
                self._tags_again()
        if self._relative() != self.relative:
            return "a submodule was put in training or eval mode on its own"
        lay = self.layouts
        for t, shape, stride, dtype, device in zip(self.tensors, lay.shapes, lay.strides, lay.dtypes, lay.devices):
            if (t.shape, t.stride(), t.dtype, t.device) != (shape, stride, dtype, device):
                return f"{self._name(t)} changed layout (now {t.dtype} {list(t.shape)})"
        if self.addresses is not None and not self._live_in_place():
            return "a tensor of the model moved to other memory (`.data =`): a CUDA graph reads the old one"
        for t, s in self.watched:
            if not s.same(t):
                return f"the contents of {self._name(t)} changed (compiled code holds values computed from it)"
        return None  # a snapshot was taken again: contents were the same

    def _added_or_deleted(self) -> str | None:
        """The first attribute, parameter, buffer, submodule or config field added or deleted since the snapshot
        that compiled code can have read (see the module's doc); None when there is none."""
        for d, base, (kind, owner, at) in zip(self.counts_of, self.bases, self.kinds):
            if d.keys() == base:
                continue
            gone = sorted(base - d.keys(), key=str)
            if kind == "entry":  # the contents of a container a module attribute holds (`_held`)
                return f"{at} had an entry {'deleted' if gone else 'added'}: " \
                       f"{(gone or sorted(d.keys() - base, key=str))[0]!r}"
            if gone:
                what = "attribute" if kind == "attrs" else "field" if kind == "config" else kind
                return f"{what} {at}{gone[0]} was deleted"
            for k in d.keys() - base:
                if kind == "config":
                    return f"config field {at}{k} was added (what compiled code looks up on a config is not recorded)"
                if kind != "attrs":
                    return f"{kind} {at}{k} was added"
                why = self._read(owner, k, d[k])
                if why is not None:
                    return f"attribute {at}{k} was added: {why}"
                log.debug("attribute %s%s was added; no compiled code can have read it: no recompile", at, k)
        return None

    def _read(self, mod: nn.Module, name: str, value: Any) -> str | None:
        """Why compiled code may read `mod.name`, an attribute added since the snapshot; None when none can."""
        if _own_forward(mod, value):
            return None
        if self.missing is None or id(mod) not in self.missing or self.missing[id(mod)] is None:
            return "which names the compiled code looked up on the module is not recorded"
        if name in self.missing[id(mod)]:
            return "the compiled code looked it up and did not find it"
        for cls in type(mod).__mro__:
            if name in vars(cls):
                return f"it shadows the class attribute {cls.__qualname__}.{name}"
        return None

    def _trainings(self) -> list[Any]:
        return list(map(dict.get, self.modes, repeat("training")))

    def _same_modes(self) -> bool:
        """`_relative() == self.relative`, without the xor while the root's mode is the one taken."""
        if self.module.training is self.root_training:
            return self._trainings() == self.trainings
        return self._relative() == self.relative

    def _relative(self) -> list[bool]:
        """Each submodule's `training` as it relates to the root's (train() and eval() on the model keep it)."""
        return list(map(operator.xor, map(dict.get, self.modes, repeat("training")), repeat(self.module.training)))

    def _name(self, t: torch.Tensor) -> str:
        return self.tensor_names.get(id(t), "a tensor of the model")


class Churn:
    """Changes of the model's state that keep coming: a compiled variant (or segment) dropped for a change found
    within QUICK checks of its compile, LIMIT times in a row, means the state changes at (nearly) every call (a step
    counter the forward writes, an attribute set before each call): each compile would serve a call or two, so the
    caller stops compiling and runs eagerly, as torch.compile does past its recompile limit. A change found after
    more checks starts the count anew (weights updated now and then recompile as often as they change)."""

    LIMIT = 8
    QUICK = 16

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def note(self, why: str, checks: int) -> bool:
        """A drop for `why`, found at the `checks`-th check after the compile; True once the limit is reached."""
        self.reasons = [*self.reasons, why] if checks <= self.QUICK else [why]
        return len(self.reasons) >= self.LIMIT

    def text(self) -> str:
        """The limit reached, with the last reason, for the one warning."""
        return (f"its state changed {len(self.reasons)} times in a row, each within {self.QUICK} calls of a "
                f"compile (last: {self.reasons[-1].split('; ')[0]})")


_HELD_DEPTH = 3  # levels of containers inside a module attribute whose contents are watched (`ModuleState._held`)
_HELD_ITEMS = 64  # entries of one such container
_UNWATCHED: set[str] = set()  # attributes said to be watched by identity only (said once per process)


def _plain(v: Any) -> bool:
    """A dict, or an object whose state is its own `__dict__` (a SimpleNamespace, a dataclass): not a function,
    class, Python module or Enum member, which are what they are."""
    return type(v) is dict or (type(getattr(v, "__dict__", None)) is dict and not isinstance(
        v, (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType, enum.Enum,
            functools.partial)))


def _by_value(v: Any, depth: int) -> bool:
    """Whether a list, tuple or set can be watched by value (deep-copied, compared with ==): within the bounds,
    it holds primitives, Enum members, functions, classes and Python modules (equal only to themselves), and
    dicts, lists, tuples and sets of them."""
    if depth >= _HELD_DEPTH or len(v) > _HELD_ITEMS:
        return False
    if type(v) is dict and not all(primitive(k) or _immutable(k) for k in v):
        return False  # keyed by objects (an fx graph's names by node): not a value
    items = v.items() if type(v) is dict else ((None, x) for x in v)
    for _, x in items:
        if type(x) in (list, tuple, set, frozenset, dict):
            if not _by_value(x, depth + 1):
                return False
        elif not (primitive(x) or _immutable(x)):
            return False
    return True


_MISSING = object()
_REARMS = 32  # times the tags are taken again after a change that did not matter before they are given up


def _immutable(v: Any) -> bool:
    """A primitive value that cannot change without being replaced in its dict (then its dict's tag moves)."""
    t = type(v)
    if t is tuple:
        return all(map(_immutable, v))
    return t in (bool, int, float, str, type(None), torch.dtype, torch.device) or isinstance(v, _IDENTICAL)


# values equal only to themselves, that stay what they are: compared by identity, their dict's tag covers them
_IDENTICAL = (enum.Enum, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type)


def _dict_versions(dicts: list[dict]) -> Any:
    """A check that every dict of `dicts` (the list itself passed to its `check`) holds what it holds now: each
    one's version tag, in one C++ pass; None where torch has no such guard or its tags do not follow changes."""
    if _RootGuardManager is None:
        return None
    try:
        root, plain = _RootGuardManager(), _GuardManagerType.GUARD_MANAGER
        for i, d in enumerate(dicts):
            where = f"dicts[{i}]"
            root.list_getitem_manager(i, where, d, plain).add_dict_version_guard(d, [where], None)
        return root
    except (TypeError, RuntimeError, AttributeError, ValueError) as e:
        log.debug("no dict-version guard (%s): module state compared entry by entry", e)
        return None


def _versions_follow_changes() -> bool:
    """Whether the dict-version guard (and a dict's own tag) sees a replacement made with `dict.__setitem__` (no
    Python-level hook) and a deletion: checked once, so a Python or torch whose tags do not move falls back to
    comparing entries."""
    d = {"k": 1}
    guard = _dict_versions([d])
    if guard is None or not guard.check([d]):
        return False
    dict.__setitem__(d, "k", 2)
    if guard.check([d]):
        return False
    guard = _dict_versions([d])
    del d["k"]
    if guard.check([d]) or _dict_version is None:
        return False
    tag = _dict_version(d)  # the root module's dict is checked by its own tag: it must move the same way
    dict.__setitem__(d, "k", 3)
    return _dict_version(d) != tag


_VERSIONS = _versions_follow_changes()


def _own_forward(mod: nn.Module, value: Any) -> bool:
    """`value` is fxcc's compiled callable of `mod` installed over its forward (`m.forward = fxcc.compile(
    m.forward)`, or while a compiled module runs `generate`): capture and eager fallback call the module's own."""
    return getattr(getattr(value, "fxcc", None), "module", None) is mod
