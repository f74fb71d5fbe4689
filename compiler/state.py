"""In-place state: the objects and tensors a call mutates, so a compiled call leaves them as eager does.

A KV cache passed to a transformers model is a Python object that eager updates in place: a
`DynamicCache` rebinds each layer's `keys`/`values` to longer tensors, a `StaticCache` writes into its
preallocated tensors at the current position. A captured graph is a function of tensors, so capture
makes the final state of every such input object an extra output (`traced`), and after each compiled
call `Aliasing.write_back` moves that state into the caller's objects: the caller's cache grows (or is
written) exactly as in eager, keeps its identity, and the returned output holds the caller's object.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .watch import Layouts

_CONTAINERS = (tuple, list, dict)


def register_state_class(cls: type) -> None:
    """Flatten instances of `cls` (a transformers cache class) with fxcc's state flattener: tensors and ints
    are leaves, everything else is context.

    transformers flattens a cache into its tensors and keeps every other attribute in the pytree context,
    so a length kept as an int (a sliding-window layer's `cumulative_length`) would be a constant of the
    captured graph and a new input structure at every step. As a leaf it is an input: symbolic when it
    changes, like a size. Instances are rebuilt as transformers rebuilds them (`__new__` + attributes)."""
    node = pytree.SUPPORTED_NODES.get(cls)
    if node is not None and node.flatten_fn is _flatten:
        return
    name = f"{cls.__module__}:{cls.__qualname__}"
    if node is not None:
        name = pytree.SUPPORTED_SERIALIZED_TYPES[cls].serialized_type_name
        pytree._deregister_pytree_node(cls)
    pytree.register_pytree_node(cls, _flatten, _unflatten, serialized_type_name=name,
                                flatten_with_keys_fn=_flatten_with_keys, to_dumpable_context=_dump,
                                from_dumpable_context=_load)


def _flatten(obj: Any) -> tuple[list, Any]:
    leaves: list[Any] = []
    return leaves, _context(obj, leaves, top=True)


def _flatten_with_keys(obj: Any) -> tuple[list, Any]:
    leaves, context = _flatten(obj)
    return [(pytree.SequenceKey(i), x) for i, x in enumerate(leaves)], context


def _unflatten(values: Any, context: Any) -> Any:
    return _rebuild(context, list(values))


def _is_leaf(x: Any) -> bool:
    # export wraps int inputs in its own _IntWrapper while it traces; they are ints all the same
    return isinstance(x, (torch.Tensor, torch.SymInt)) or type(x) is int or type(x).__name__ == "_IntWrapper"


def _walked_into(t: type) -> bool:
    """Whether an object of type `t` inside a state object is described attribute by attribute (its tensors leaves
    of the outer object, the object rebuilt with it): any unregistered object, and a state class registered here
    (an EncoderDecoderCache's two DynamicCaches). Kept by reference instead, a cache inside a cache would be shared
    by every rebuilt copy: capture would write its fake tensors into the caller's."""
    node = pytree.SUPPORTED_NODES.get(t)
    return node is None or node.flatten_fn is _flatten


def _context(x: Any, leaves: list[Any], top: bool = False) -> Any:
    """A comparable description of `x` with its tensors and ints replaced by leaf numbers."""
    t = type(x)  # the tests of _is_leaf, then the other types, each asked once (this runs at every call)
    if t is torch.Tensor or t is int or isinstance(x, (torch.Tensor, torch.SymInt)) or t.__name__ == "_IntWrapper":
        leaves.append(x)
        return ("leaf", len(leaves) - 1)
    if x is None or t is bool or t is float or t is str:
        return x
    if t is list or t is tuple:
        return (t.__name__, tuple([_context(v, leaves) for v in x]))
    if t is dict:
        return ("dict", tuple([(k, _context(v, leaves)) for k, v in x.items()]))
    if hasattr(x, "__dict__") and not isinstance(x, type) and (top or _walked_into(t)):
        items = vars(x).items()
        if top and _GENERATE_MARK in vars(x):
            items = [(k, v) for k, v in items if k != _GENERATE_MARK]
        return ("obj", t, tuple([(k, _context(v, leaves)) for k, v in items]))
    return ("const", x)  # a device, a dtype, a class: compared by value


# transformers' generate marks a cache its caller passed (`cache._is_user_defined = True`) and reads the mark itself,
# after the model's forward (whether the cache outlives the call); no forward reads it. Left out of the description,
# a caller's StaticCache and generate's own are one input structure: one compiled prefill and decode step for both
# (the caller's object keeps its mark: `adopt` and the plan's write-back set attributes, they delete none)
_GENERATE_MARK = "_is_user_defined"


def _dump(ctx: Any) -> str:
    """The context as JSON (the graph cache stores the input and output specs)."""
    return json.dumps(_jsonable(ctx))


def _load(text: str) -> Any:
    return _from_json(json.loads(text))


def _jsonable(ctx: Any) -> Any:
    if not isinstance(ctx, tuple):
        if ctx is None or type(ctx) in (bool, int, float, str):
            return ctx
        raise TypeError(f"cannot store {type(ctx).__name__} in a pytree context")
    tag = ctx[0]
    if tag == "leaf":
        return {"leaf": ctx[1]}
    if tag in ("list", "tuple"):
        return {tag: [_jsonable(v) for v in ctx[1]]}
    if tag == "dict":
        return {"dict": [[k, _jsonable(v)] for k, v in ctx[1]]}
    if tag == "obj":
        return {"obj": _path(ctx[1]), "state": [[k, _jsonable(v)] for k, v in ctx[2]]}
    x = ctx[1]
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, type):
        return {"type": _path(x)}
    raise TypeError(f"cannot store {type(x).__name__} in a pytree context")


def _from_json(j: Any) -> Any:
    if not isinstance(j, dict):
        return j
    if "leaf" in j:
        return ("leaf", j["leaf"])
    for tag in ("list", "tuple"):
        if tag in j:
            return (tag, tuple(_from_json(v) for v in j[tag]))
    if "dict" in j:
        return ("dict", tuple((k, _from_json(v)) for k, v in j["dict"]))
    if "obj" in j:
        return ("obj", _class(j["obj"]), tuple((k, _from_json(v)) for k, v in j["state"]))
    if "device" in j:
        return ("const", torch.device(j["device"]))
    if "dtype" in j:
        return ("const", getattr(torch, j["dtype"]))
    return ("const", _class(j["type"]))


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class(path: str) -> type:
    """A class named in a stored context: only transformers' (the caches fxcc registers hold nothing else)."""
    module, _, qualname = path.partition(":")
    if module != "transformers" and not module.startswith("transformers."):
        raise ValueError(f"a stored pytree context names {path!r}, not a transformers class")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"a stored pytree context names {path!r}, which is not a class")
    return obj


def _rebuild(ctx: Any, leaves: list[Any]) -> Any:
    if not isinstance(ctx, tuple):
        return ctx
    tag = ctx[0]
    if tag == "leaf":
        return leaves[ctx[1]]
    if tag in ("list", "tuple"):
        items = [_rebuild(v, leaves) for v in ctx[1]]
        return items if tag == "list" else tuple(items)
    if tag == "dict":
        return {k: _rebuild(v, leaves) for k, v in ctx[1]}
    if tag == "obj":
        obj = ctx[1].__new__(ctx[1])
        obj.__dict__.update((k, _rebuild(v, leaves)) for k, v in ctx[2])
        return obj
    return ctx[1]


_CONSTS = (torch.device, torch.dtype, type)  # what `_context` keeps by value and cannot change in place


class Unchanged:
    """Whether a state object still holds what it held when taken: the same objects in every attribute, list and
    dict its flattening walks (`_context`), and its tensors the same layout. Then it flattens to the same leaves
    (the same objects, at the same places), so a call reuses them without walking the pytree (the guard's fast
    path: a static cache's decode step passes the same cache, written in place, at every token). `ok` is False
    for an object whose flattening keeps something mutable by value (then only the full flatten can tell).

    The containers are checked in C-level passes over lists built once: their lengths, then every item by
    identity (a dict's by key: a key deleted and added again, in another order, holds the same objects)."""

    __slots__ = ("leaves", "containers", "lengths", "places", "keys", "items", "layouts", "ok", "ref")

    def __init__(self, obj: Any):
        node = pytree.SUPPORTED_NODES.get(type(obj))
        self.containers: list[Any] = []
        walked: list[tuple[Any, tuple | None, tuple]] = []
        self.ok = node is not None and node.flatten_fn is _flatten and _walk(obj, walked, top=True)
        try:  # the object itself is not held: a new one at the same address is not it
            self.ref = weakref.ref(obj)
        except TypeError:
            self.ok = False
        self.containers = [c for c, _, _ in walked]
        self.lengths = list(map(len, self.containers))
        self.places, self.keys, self.items = [], [], []
        for c, keys, items in walked:
            self.places += [c] * len(items)
            self.keys += keys if keys is not None else range(len(items))
            self.items += items
        self.leaves = _flatten(obj)[0] if self.ok else []
        self.layouts = Layouts([t for t in self.leaves if isinstance(t, torch.Tensor)])

    def holds(self, obj: Any) -> bool:
        if self.ref() is not obj or list(map(len, self.containers)) != self.lengths:
            return False
        try:
            if not all(map(operator.is_, map(operator.getitem, self.places, self.keys), self.items)):
                return False
        except KeyError:  # as many keys as before, not the same ones
            return False
        return self.layouts.same()


def _walk(x: Any, out: list, top: bool = False) -> bool:
    """Record the containers `_context` walks in `x` (with their items, by identity); False where it keeps a
    mutable object by value."""
    if _is_leaf(x) or x is None or type(x) in (bool, float, str) or isinstance(x, _CONSTS):
        return True
    if type(x) is tuple:
        return all(_walk(v, out) for v in x)
    if type(x) is list:
        out.append((x, None, tuple(x)))
        return all(_walk(v, out) for v in x)
    if type(x) is dict:
        out.append((x, tuple(x), tuple(x.values())))
        return all(_walk(v, out) for v in x.values())
    if hasattr(x, "__dict__") and (top or _walked_into(type(x))):
        d = vars(x)
        out.append((d, tuple(d), tuple(d.values())))
        return all(_walk(v, out) for v in d.values())
    return False


def is_state(x: Any) -> bool:
    """A mutable object a pytree flattens into tensors (a transformers Cache): not a container, not a tensor."""
    return (type(x) in pytree.SUPPORTED_NODES and not isinstance(x, _CONTAINERS) and hasattr(x, "__dict__")
            and not isinstance(x, torch.Tensor))


def state_objects(tree: Any) -> list[Any]:
    """The state objects of a pytree, outermost first, in flattening order."""
    leaves = pytree.tree_leaves(tree, is_leaf=is_state)
    return [x for x in leaves if is_state(x)]


def holds_size(spec: pytree.TreeSpec) -> bool:
    """Whether an output of this structure holds a torch.Size (see `unflatten`)."""
    return spec.type is torch.Size or any(map(holds_size, spec.children()))


def unflatten(leaves: list[Any], spec: pytree.TreeSpec) -> Any:
    """pytree.tree_unflatten of a structure that `holds_size`, where a torch.Size comes back a torch.Size, as eager
    returns it: torch registers the Size node to unflatten as a plain tuple, which its own tracing needs
    (torch.fx.experimental.proxy_tensor). Callers decide once per structure whether it holds one."""
    it = iter(leaves)

    def build(s: pytree.TreeSpec) -> Any:
        if s.is_leaf():
            return next(it)
        children = [build(c) for c in s.children()]
        return torch.Size(children) if s.type is torch.Size else pytree.SUPPORTED_NODES[s.type].unflatten_fn(
            children, s.context)
    return build(spec)


@dataclass
class Aliasing:
    """What a captured call does to its inputs, recorded by identity while it was traced.

    leaves: (output leaf, input leaf) pairs where the call returns an input tensor itself (a static cache's
    tensor written in place). objects: (output object, input object) pairs where it returns an input object
    (the cache it was given). `n_state` input objects have their final state appended to the graph's outputs.
    """

    leaves: list[tuple[int, int]] = field(default_factory=list)
    objects: list[tuple[int, int]] = field(default_factory=list)
    n_state: int = 0
    plan: Any = field(default=None, compare=False, repr=False)  # _Plan, made at the first write-back; False: none
    sized: bool | None = field(default=None, compare=False, repr=False)  # the result holds a torch.Size (found once)

    def write_back(self, args: tuple, kwargs: dict, flat_in: list[Any], flat_out: list[Any],
                   out_spec: pytree.TreeSpec, places: list | None = None) -> Any:
        """The call's result from the graph's flat outputs, with the caller's objects updated and returned.
        `places`: see _Plan.write_back."""
        for j, i in self.leaves:
            flat_out[j] = flat_in[i]
        if self.n_state and self.plan is None:
            self.plan = _Plan.of(self, args, kwargs, flat_in, flat_out, out_spec) or False
        if self.plan:
            return self.plan.write_back(args, kwargs, flat_out, places)
        if self.sized is None:
            self.sized = holds_size(out_spec)
        result = unflatten(flat_out, out_spec) if self.sized else pytree.tree_unflatten(flat_out, out_spec)
        if not self.n_state:
            return result
        result, final = result
        callers = state_objects((tuple(args), dict(sorted(kwargs.items()))))
        for dst, src in zip(callers, final):
            adopt(dst, src)
        if not self.objects:
            return result
        outs = state_objects(result)
        swap = {id(outs[j]): callers[i] for j, i in self.objects}
        return pytree.tree_map(lambda x: swap.get(id(x), x), result, is_leaf=is_state)


@dataclass
class _Plan:
    """Aliasing.write_back for the calls of one compiled variant (one input structure, so one plan), without
    rebuilding the state objects it writes back: the caller's objects take the graph's flat outputs by path
    (where the call keeps their structure: a decode step), and the result is rebuilt around them.

    callers: where each state object sits among the call's arguments (("arg", i) or ("kw", name)).
    paths: per state object, (index, path) of each of its leaves to write (not those the call returns as the
    input it read there), or None where the call changes its structure
    (a prefill filling an empty cache: then `adopt` from the rebuilt object). `starts`: where each one's final
    leaves begin in the flat outputs. `spec`, `layout`: the result's spec with the objects that are the
    caller's as leaves, and per leaf of it the flat output it takes (>= 0) or the caller's object (-1 - i).
    """

    callers: list[tuple[str, Any]]
    paths: list[list[tuple] | None]
    starts: list[int]
    finals: list[pytree.TreeSpec]
    spec: pytree.TreeSpec
    layout: list[int]

    @staticmethod
    def of(al: Aliasing, args: tuple, kwargs: dict, flat_in: list[Any], flat_out: list[Any],
           out_spec: pytree.TreeSpec) -> _Plan | None:
        """The plan for this call's structure; None where the state objects are not arguments of their own.
        A leaf the graph returns as the very input it read from that place (a static cache's tensor, written in
        place) is already where it belongs: the plan leaves it out."""
        if out_spec.type is not tuple or len(out_spec.children()) != 2:
            return None
        result_spec, final_spec = out_spec.children()
        callers = [("arg", i) for i, a in enumerate(args) if is_state(a)]
        callers += [("kw", k) for k in sorted(kwargs) if is_state(kwargs[k])]
        objs = [args[w] if kind == "arg" else kwargs[w] for kind, w in callers]
        if [id(o) for o in objs] != [id(o) for o in state_objects((tuple(args), dict(sorted(kwargs.items()))))] \
                or len(objs) != len(final_spec.children()):
            return None  # a state object inside a container
        starts, paths, at = [], [], result_spec.num_leaves
        passed = dict(al.leaves)  # flat output -> the flat input it is
        for obj, fin in zip(objs, final_spec.children()):
            starts.append(at)
            at += fin.num_leaves
            now = pytree.tree_flatten(obj)[1]
            same = now.type is fin.type and now.context == fin.context and _flatten in (
                getattr(pytree.SUPPORTED_NODES.get(fin.type), "flatten_fn", None),)
            leaf_paths = _leaf_paths(fin.context) if same else None
            if leaf_paths is not None:
                leaf_paths = [(k, path) for k, path in enumerate(leaf_paths)
                              if not _passed_through(obj, path, at - fin.num_leaves + k, passed, flat_in)]
            paths.append(leaf_paths)
        n_obj = [0]
        spec, layout = _with_callers(result_spec, dict(al.objects), n_obj, [0])
        result = pytree.tree_unflatten(flat_out[:result_spec.num_leaves], result_spec)
        if n_obj[0] != len(state_objects(result)):
            return None
        return _Plan(callers, paths, starts, list(final_spec.children()), spec, layout)

    def write_back(self, args: tuple, kwargs: dict, flat_out: list[Any], places: list | None = None) -> Any:
        """`places`, where given, is a list the caller keeps for as long as the state objects hold the containers
        they hold now (fxcc.runtime._Call checks that before every call): the containers and keys each leaf is
        written to, found by walking the paths at its first use, taken from it after."""
        objs = [args[w] if kind == "arg" else kwargs[w] for kind, w in self.callers]
        if places is not None:
            if not places:
                places.append(self._places(objs))
            if places[0] is not None:
                for c, key, j in places[0]:
                    c[key] = flat_out[j]
                return pytree.tree_unflatten([flat_out[x] if x >= 0 else objs[-1 - x] for x in self.layout],
                                             self.spec)
        for obj, paths, start, fin in zip(objs, self.paths, self.starts, self.finals):
            values = flat_out[start:start + fin.num_leaves]
            if paths is None:
                adopt(obj, pytree.tree_unflatten(values, fin))
                continue
            for k, path in paths:
                value, at = values[k], obj
                for step in path[:-1]:
                    at = at.__dict__[step] if type(step) is str else at[step[0]]
                last = path[-1]
                if type(last) is str:
                    at.__dict__[last] = value
                else:
                    at[last[0]] = value
        return pytree.tree_unflatten([flat_out[x] if x >= 0 else objs[-1 - x] for x in self.layout], self.spec)


    def _places(self, objs: list[Any]) -> list[tuple[Any, Any, int]] | None:
        """(container, key, flat output) for each leaf write of `write_back` (None where an object is adopted)."""
        out = []
        for obj, paths, start in zip(objs, self.paths, self.starts):
            if paths is None:
                return None
            for k, path in paths:
                at = obj
                for step in path[:-1]:
                    at = at.__dict__[step] if type(step) is str else at[step[0]]
                last = path[-1]
                out.append((at.__dict__, last, start + k) if type(last) is str else (at, last[0], start + k))
        return out


def _passed_through(obj: Any, path: tuple, j: int, passed: dict[int, int], flat_in: list[Any]) -> bool:
    """Whether flat output `j` is the input the call read at `path` of `obj`: the same place in every call of
    this structure, so writing it back changes nothing."""
    if j not in passed:
        return False
    at = obj
    try:
        for step in path:
            at = at.__dict__[step] if type(step) is str else at[step[0]]
    except (KeyError, IndexError, TypeError, AttributeError):
        return False
    return at is flat_in[passed[j]]


def _leaf_paths(ctx: Any) -> list[tuple] | None:
    """The path to each leaf of a state object's context (attribute names; (index,) or (key,) into lists and
    dicts), in leaf order; None where a leaf sits in a tuple (it cannot be set)."""
    out: dict[int, tuple] = {}

    def walk(c: Any, path: tuple) -> bool:
        if not isinstance(c, tuple):
            return True
        tag = c[0]
        if tag == "leaf":
            out[c[1]] = path
            return True
        if tag == "list":
            return all(walk(v, path + ((i,),)) for i, v in enumerate(c[1]))
        if tag == "tuple":
            return not any(isinstance(v, tuple) and _has_leaf(v) for v in c[1])
        if tag == "dict":
            return all(walk(v, path + ((k,),)) for k, v in c[1])
        if tag == "obj":
            return all(walk(v, path + (k,)) for k, v in c[2])
        return True

    if not walk(ctx, ()) or any(not p for p in out.values()):
        return None
    return [out[i] for i in range(len(out))]


def _has_leaf(ctx: Any) -> bool:
    if not isinstance(ctx, tuple):
        return False
    if ctx[0] == "leaf":
        return True
    if ctx[0] in ("list", "tuple"):
        return any(_has_leaf(v) for v in ctx[1])
    if ctx[0] == "dict":
        return any(_has_leaf(v) for _, v in ctx[1])
    if ctx[0] == "obj":
        return any(_has_leaf(v) for _, v in ctx[2])
    return False


def _with_callers(spec: pytree.TreeSpec, swap: dict[int, int], n_obj: list[int],
                  n_leaf: list[int]) -> tuple[pytree.TreeSpec, list[int]]:
    """`spec` with the output state objects in `swap` (by their index among the output's state objects) as
    leaves, and the layout of its leaves (see _Plan)."""
    if spec.is_leaf():
        n_leaf[0] += 1
        return spec, [n_leaf[0] - 1]
    if _is_state_type(spec.type):
        j = n_obj[0]
        n_obj[0] += 1
        first = n_leaf[0]
        n_leaf[0] += spec.num_leaves
        if j in swap:
            return pytree.treespec_leaf(), [-1 - swap[j]]
        return spec, list(range(first, first + spec.num_leaves))
    children, layout = [], []
    for c in spec.children():
        cs, cl = _with_callers(c, swap, n_obj, n_leaf)
        children.append(cs)
        layout += cl
    return pytree.TreeSpec(spec.type, spec.context, children), layout


def _is_state_type(t: Any) -> bool:
    """is_state, for the type a spec names."""
    return (isinstance(t, type) and t in pytree.SUPPORTED_NODES and not issubclass(t, (*_CONTAINERS, torch.Tensor))
            and getattr(t, "__dictoffset__", 0) != 0)


def adopt(dst: Any, src: Any) -> None:
    """Make object `dst` hold `src`'s state, keeping the identity of `dst` and of the objects inside it."""
    for name, value in vars(src).items():
        current = dst.__dict__.get(name, src)
        if current is value:
            continue
        if _same_kind(current, value):
            adopt(current, value)
        elif (isinstance(current, list) and isinstance(value, list) and len(current) == len(value)
              and all(_same_kind(a, b) for a, b in zip(current, value))):
            for a, b in zip(current, value):
                adopt(a, b)
        else:
            dst.__dict__[name] = value


def restore(dst: Any, src: Any) -> None:
    """Make object `dst` hold the state of `src` (a copy of what `dst` was before a call, since updated by
    another run of that call): as `adopt`, but a tensor of `dst` whose layout is that of its counterpart takes its
    values in place, so tensors a caller holds (a static cache's) keep their identity."""
    for name, value in vars(src).items():
        current = dst.__dict__.get(name, src)
        if isinstance(current, list) and isinstance(value, list) and len(current) == len(value):
            for i, (a, b) in enumerate(zip(current, value)):
                if _same_kind(a, b):
                    restore(a, b)
                elif not _copy_into(a, b):
                    current[i] = b
        elif _same_kind(current, value):
            restore(current, value)
        elif not _copy_into(current, value):
            dst.__dict__[name] = value


def _copy_into(dst: Any, src: Any) -> bool:
    """Copy tensor `src` into tensor `dst` where they have one layout (True), else nothing (False)."""
    if not (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor)) or \
            (dst.shape, dst.stride(), dst.dtype, dst.device) != (src.shape, src.stride(), src.dtype, src.device):
        return False
    if dst is not src:
        with torch.no_grad():
            dst.copy_(src)
    return True


def _same_kind(a: Any, b: Any) -> bool:
    return type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, (torch.Tensor, type))


def recording(fn: Callable, sink: list[Aliasing], kwargs: dict | None = None) -> Callable:
    """`fn` as it is traced for capture: it also returns the final state of its input objects, and records
    into `sink` which outputs are its inputs (by identity). Its signature names the call's keyword
    arguments that `fn` takes through `**kwargs` (export's dynamic shapes need a name for each input)."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        ins = (tuple(args), dict(sorted(kwargs.items())))
        in_objects = state_objects(ins)
        in_leaves = {id(x): i for i, x in enumerate(pytree.tree_leaves(ins)) if isinstance(x, torch.Tensor)}
        out = fn(*args, **kwargs)
        by_id = {id(x): i for i, x in enumerate(in_objects)}
        found = Aliasing(objects=[(j, by_id[id(o)]) for j, o in enumerate(state_objects(out)) if id(o) in by_id],
                         n_state=len(in_objects))
        result = (out, in_objects) if in_objects else out
        found.leaves = [(j, in_leaves[id(x)]) for j, x in enumerate(pytree.tree_leaves(result))
                        if isinstance(x, torch.Tensor) and id(x) in in_leaves]
        sink[:] = [found]
        return result

    traced.__signature__ = _explicit(fn, kwargs or {})
    return traced


def _explicit(fn: Callable, kwargs: dict) -> inspect.Signature | None:
    """fn's signature with `**kwargs` replaced by one keyword-only parameter per name the call passes."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(params) == len(sig.parameters):
        return sig
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
             for k in kwargs if k not in sig.parameters]
    return sig.replace(parameters=params + extra)
