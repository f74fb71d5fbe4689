"""Symbolic shapes: which input sizes a compile makes symbolic, and the guards of a symbolic variant.

Policy (as torch.compile's automatic dynamic): a first compile is static; when a call differs from a
compiled variant of the same input structure only in sizes, the recompile makes those dimensions
symbolic (`torch.export.Dim.AUTO`: export keeps a dimension static where the program needs it to be).
`CompileOptions.dynamic=True` makes every dimension symbolic from the first compile, `False` none;
`torch._dynamo.mark_dynamic(t, d)` marks a dimension before the first call. A call that carries a KV
cache (a transformers `Cache`) is a step of generation, whose lengths change every call: its sizes are
symbolic from the first compile, so a `generate()` compiles its prefill and its decode step once each.
An int or float argument of the call whose value changes is made symbolic the same way (a symbolic float is
no size: it has no guard, fxcc.capture.symbolic_floats).

A symbolic variant is guarded by what torch's ShapeEnv recorded while exporting it (ranges of the
symbols and relations between them, `ShapeEnv.produce_guards_expression`), compiled once to Python.
Every recompile has a reason naming the input, the dimension and the old and new sizes, or the guard.
"""

from __future__ import annotations

import ast
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
from torch.utils import _pytree as pytree

from .ir import is_symbolic
from .state import is_state, state_objects

_ONE = 1  # `_ONE.__lt__`: n > 1, as a C call


def leaf_names(args: tuple, kwargs: dict, signature: inspect.Signature | None = None) -> list[str]:
    """A readable name for each flattened input: `input_ids`, `cache[3]`, `x[1]` (positional arguments by
    their parameter's name in `signature`, else `args[i]`)."""
    params = [p.name for p in signature.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] if signature is not None else []
    paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
    names = []
    for path, _ in paths:
        head, first, rest = path[0], path[1], path[2:]
        if head.idx == 0:  # positional
            names.append((params[first.idx] if first.idx < len(params) else f"args[{first.idx}]") + pytree.keystr(rest))
        else:
            names.append(str(first.key) + pytree.keystr(rest))
    return names


def state_ints(args: tuple, kwargs: dict) -> frozenset[int]:
    """The flat inputs that are ints inside a state object (a cache's length): sizes, not constants. An int
    argument of the call is a constant until its value changes (`top_ints`)."""
    return _state_leaves(args, kwargs, lambda x: type(x) is int)


def top_ints(args: tuple, kwargs: dict, kind: type = int) -> frozenset[int]:
    """The flat inputs that are int arguments of the call, positional or keyword, or ints inside a list, tuple or
    dict given as one (a cache's `{"len": 5}`; not inside a state object, whose ints are sizes: `state_ints`; a
    bool is no int): the Python numbers a caller varies from call to call (a timestep, a length, a loop index).
    Their value is a constant of a first compile; one that changes recompiles once with it symbolic
    (`scalar_changes`), as torch.compile's automatic dynamic does. With `kind` float: the float arguments
    themselves (`map_top` passes them as tensors to the capture)."""
    out: set[int] = set()
    i = 0

    def walk(v: Any) -> None:
        nonlocal i
        if type(v) is kind:
            out.add(i)
            i += 1
        elif kind is int and type(v) in (list, tuple, dict):
            for c in (v.values() if type(v) is dict else v):
                walk(c)
        else:
            i += len(pytree.tree_leaves(v))

    for v in (*args, *(kwargs[k] for k in sorted(kwargs))):
        walk(v)
    return frozenset(out)


def map_top(args: tuple, kwargs: dict, which: frozenset[int], fn: Any) -> tuple[tuple, dict]:
    """The call with `fn` applied to its top-level arguments whose flat input is in `which` (as `top_ints`
    numbers them: positional first, then keywords sorted by name)."""
    out, new, i = list(args), dict(kwargs), 0
    for j, v in enumerate(args):
        if i in which:
            out[j] = fn(v)
        i += len(pytree.tree_leaves(v))
    for k in sorted(kwargs):
        if i in which:
            new[k] = fn(kwargs[k])
        i += len(pytree.tree_leaves(kwargs[k]))
    return tuple(out), new


def scalar_changes(flat: list[Any], struct: tuple, ints: frozenset[int], sized: frozenset[int],
                   compiled: list[tuple]) -> dict[int, tuple[Any, Any]]:
    """The top-level ints or floats (`ints`) whose value alone makes this call (`struct`, its `structure` under `sized`)
    differ from the latest compiled structure in `compiled` that it differs from only in such values (or in
    ints that are sizes there or here): input -> (old value, new value); empty where there is none."""
    for old in reversed(compiled):
        if len(old) != len(struct):
            continue
        diff = {i for i, (a, b) in enumerate(zip(old, struct)) if a != b}
        if not diff or not diff <= ints | sized:
            continue
        changed = {i: (old[i][2], flat[i]) for i in diff if old[i][0] == "const" and i in ints and i not in sized}
        if changed:
            return changed
    return {}


def state_tensors(args: tuple, kwargs: dict) -> frozenset[int]:
    """The flat inputs that are tensors inside a state object (a KV cache's keys, values, lengths)."""
    return _state_leaves(args, kwargs, lambda x: isinstance(x, torch.Tensor))


def _state_leaves(args: tuple, kwargs: dict, pick: Any) -> frozenset[int]:
    out, i = set(), 0
    for x in pytree.tree_leaves((tuple(args), dict(sorted(kwargs.items()))), is_leaf=is_state):
        if not is_state(x):
            i += 1
            continue
        leaves = pytree.tree_leaves(x)
        out.update(i + j for j, leaf in enumerate(leaves) if pick(leaf))
        i += len(leaves)
    return frozenset(out)


def structure(flat: list[Any], sized: frozenset[int]) -> tuple:
    """What a call must share with a variant, whatever the sizes: tensors' rank, dtype, device, layout and
    layout class (`layout_class`); the ints (and floats) in `sized` are symbolic, by type; other constants by value."""
    return tuple((x.dim(), x.dtype, x.device, x.layout, layout_class(x)) if isinstance(x, torch.Tensor)
                 else (type(x).__name__,) if i in sized else _const(x) for i, x in enumerate(flat))


def without_layouts(struct: tuple) -> tuple:
    """A `structure` without its tensors' layout classes: what variants for other layouts of a call share."""
    return tuple(e[:4] if len(e) == 5 and isinstance(e[3], torch.layout) else e for e in struct)


def strides(t: torch.Tensor) -> tuple[int, ...]:
    """`t`'s strides where they matter (a dimension of size 1 has none that changes an address: 0 there; an
    empty tensor none at all): a static variant serves exactly these, whatever the storage offset."""
    shape = t.shape
    if 0 in shape:
        return ()
    if 1 not in shape:  # every size above 1: the strides as they are
        return t.stride()
    return tuple(map(operator.mul, t.stride(), map(_ONE.__lt__, shape)))  # s * (n > 1): s, or 0 where n is 1


def layout_class(t: torch.Tensor) -> Any:
    """What a tensor's layout is, whatever its sizes: "contiguous", else the order of its dimensions of size
    above 1 in memory (innermost first), those broadcast (stride 0), and whether the rest are packed without
    gaps. Inputs of one class give outputs of one layout class in eager (a transposed input, a transposed
    output): a symbolic variant serves one class, and its captured strides (expressions of its sizes)."""
    if t.is_contiguous():
        return "contiguous"
    shape, stride = t.shape, t.stride()
    dims = [d for d in range(t.dim()) if shape[d] > 1]
    order = tuple(sorted((d for d in dims if stride[d]), key=lambda d: (stride[d], -d)))
    step, dense = 1, True
    for d in order:
        dense, step = dense and stride[d] == step, step * shape[d]
    return order, tuple(d for d in dims if not stride[d]), dense


def stride_change(flat: list[Any], names: list[str], old: list[tuple[int, ...] | None],
                  classes: tuple | None = None) -> str:
    """`input x's strides (1, 4) differ from (16, 1)` for the first tensor input whose strides (`strides`)
    differ from those a variant was compiled for (`old`, per input), or, given that variant's `structure`
    (`classes`), whose layout class differs; empty where none does."""
    for i, (x, was) in enumerate(zip(flat, old)):
        if not isinstance(x, torch.Tensor) or was is None:
            continue
        if classes is None:
            if strides(x) != was:
                return f"input `{names[i]}`'s strides {strides(x)} differ from {was}"
        elif (now := layout_class(x)) != classes[i][4]:
            return (f"input `{names[i]}`'s strides {strides(x)} differ from {was}: it is {layout_text(now)} where the "
                    f"variant serves {layout_text(classes[i][4])} inputs")
    return ""


def layout_text(cls: Any) -> str:
    """A `layout_class` in words: `contiguous`, `row-major with gaps` (a slice of a longer tensor), `dims (0, 1)
    innermost first` (a transpose), with the dimensions it broadcasts."""
    if cls == "contiguous":
        return "contiguous"
    order, broadcast, dense = cls
    text = "row-major" if list(order) == sorted(order, reverse=True) else f"dims {order} innermost first"
    text += "" if dense else " with gaps"
    return text + (f", broadcast along dim {'/'.join(map(str, broadcast))}" if broadcast else "")


def _const(x: Any) -> Any:
    try:
        hash(x)
        return ("const", type(x), x)
    except TypeError:
        return ("object", type(x), id(x))


def sizes(flat: list[Any], sized: frozenset[int]) -> list[tuple[int, ...] | None]:
    """Each input's sizes: a tensor's shape, a size int's value (as a 1-tuple), None for anything else."""
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else (x,) if i in sized else None
            for i, x in enumerate(flat)]


def marked_dims(flat: list[Any]) -> dict[int, set[int]]:
    """Dimensions marked with torch._dynamo.mark_dynamic (or maybe_mark_dynamic) on the call's tensors."""
    out = {}
    for i, x in enumerate(flat):
        dims = set(getattr(x, "_dynamo_dynamic_indices", ())) | set(getattr(x, "_dynamo_weak_dynamic_indices", ()))
        if isinstance(x, torch.Tensor) and dims:
            out[i] = dims
    return out


def all_dims(flat: list[Any], sized: frozenset[int]) -> dict[int, set[int]]:
    """Every dimension of every tensor, and every size int, of a call."""
    return {i: set(range(len(sz))) for i, sz in enumerate(sizes(flat, sized)) if sz}


def carries_state(args: tuple, kwargs: dict) -> bool:
    """Whether the call passes a KV cache (or another state object a pytree flattens)."""
    return bool(state_objects((tuple(args), kwargs)))


def dynamic_shapes(args: tuple, kwargs: dict, dims: dict[int, set[int]],
                   signature: inspect.Signature) -> dict[str, Any] | None:
    """torch.export's dynamic_shapes for a call: `Dim.AUTO` on each chosen dimension (and int) of the flat
    inputs in `dims`, arranged as export wants them (by parameter name, mirroring each input's pytree)."""
    if not dims:
        return None
    counter = iter(range(1 << 30))

    def leaf(x: Any) -> Any:
        ds = dims.get(next(counter))
        if isinstance(x, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in sorted(ds)} if ds else None
        return torch.export.Dim.AUTO if ds and type(x) is int else None

    positional = [_shape_spec(a, leaf) for a in args]
    named = {k: _shape_spec(v, leaf) for k, v in sorted(kwargs.items())}
    return dict(signature.bind(*positional, **named).arguments)


def _shape_spec(x: Any, leaf: Any) -> Any:
    """One input's dynamic_shapes entry: containers mirrored, a registered pytree node as the list of its
    children's entries, leaves from `leaf` (called in flattening order)."""
    node = pytree.SUPPORTED_NODES.get(type(x))
    if node is None:
        return leaf(x)
    children, _ = node.flatten_fn(x)
    if type(x) in (list, tuple):
        return type(x)(_shape_spec(c, leaf) for c in children)
    if type(x) is dict:
        return {k: _shape_spec(v, leaf) for k, v in zip(x.keys(), children)}
    return [_shape_spec(c, leaf) for c in children]


@dataclass
class Shapes:
    """The symbolic part of a compiled variant: its symbolic dimensions per input and its guard."""

    dims: dict[int, tuple[int, ...]]  # flat input -> its symbolic dimensions
    static: list[tuple[int | None, ...] | None]  # per input: sizes, None where symbolic
    example: list[tuple[int, ...] | None]  # the sizes it was compiled for
    names: list[str]
    example_strides: list[tuple[int, ...] | None] = field(default_factory=list)  # and the strides (`strides`)
    guard: Any = None  # compiled guard expression, evaluated with L = {"t<k>": input}
    clauses: list[str] = field(default_factory=list)
    guarded: list[int] = field(default_factory=list)  # flat input of each t<k>
    ints: set[int] = field(default_factory=set)  # inputs that are ints, not tensors
    _checks: Any = field(default=None, init=False, repr=False, compare=False)  # `static` as itemgetters (matches)

    @staticmethod
    def of(gm: fx.GraphModule, flat: list[Any], names: list[str], sized: frozenset[int]) -> Shapes:
        """Read the symbols export gave the graph's inputs (placeholders in flat order) and build the guard."""
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        dims, static = {}, []
        for i, v in enumerate(vals):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else (v,) if i in sized else None
            if shape is None:
                static.append(None)
                continue
            sym = tuple(d for d, s in enumerate(shape) if is_symbolic(s) or isinstance(s, torch.SymFloat))
            if sym:
                dims[i] = sym
            static.append(tuple(None if d in sym else s if isinstance(s, float) else int(s)
                                for d, s in enumerate(shape)))
        shapes = Shapes(dims, static, sizes(flat, sized), names, ints=set(sized),
                        example_strides=[strides(x) if isinstance(x, torch.Tensor) else None for x in flat])
        if dims:
            guarded = [i for i, v in enumerate(vals) if isinstance(v, (torch.Tensor, torch.SymInt))]
            env = next(vals[i].node.shape_env if isinstance(vals[i], (torch.SymInt, torch.SymFloat))
                       else vals[i].fake_mode.shape_env for i in dims)
            code = env.produce_guards_expression([vals[i] for i in guarded], ignore_static=True)
            shapes.guarded = guarded
            if code:
                shapes.clauses = conjuncts(code)
                shapes.guard = compile(code, "<fxcc-shape-guard>", "eval")
        return shapes

    @staticmethod
    def any_sizes(flat: list[Any], names: list[str], sized: frozenset[int]) -> Shapes:
        """Every dimension (and size int) symbolic, without a guard: a program that is Python, not one graph (a DyCL
        host program, whose segments compile for their own shapes), serves any sizes of its input structure."""
        example = sizes(flat, sized)
        dims = {i: tuple(range(len(sz))) for i, sz in enumerate(example) if sz}
        return Shapes(dims, [tuple(None for _ in sz) if sz is not None else None for sz in example], example, names,
                      example_strides=[strides(x) if isinstance(x, torch.Tensor) else None for x in flat],
                      ints=set(sized))

    def matches(self, flat: list[Any]) -> bool:
        """Whether a call with these inputs (of this variant's structure) may run this variant."""
        if self._checks is None:
            self._checks = _static_checks(self.static)
        for i, rank, pick, want in self._checks:
            shape = _shape(flat[i])
            if len(shape) == rank:
                if pick(shape) != want:
                    return False
            elif any(s is not None and s != n for s, n in zip(self.static[i], shape)):
                return False
        if self.guard is None:
            return True
        return bool(eval(self.guard, SYMPY_INTERP, {"L": self._locals(flat)}))

    def _locals(self, flat: list[Any]) -> dict[str, Any]:
        return {f"t{k}": flat[i] for k, i in enumerate(self.guarded)}

    def mismatch(self, flat: list[Any], names: list[str]) -> str:
        """Why a call does not fit this variant: the first size or guard that fails, by input name."""
        for i, st in enumerate(self.static):
            if st is None:
                continue
            for d, (s, n) in enumerate(zip(st, _shape(flat[i]))):
                if s is not None and s != n:
                    return (f"argument `{names[i]}` is {n} where this variant has {s}" if i in self.ints else
                            f"input `{names[i]}` dim {d} is {n} where this variant has {s}")
        scope = self._locals(flat)
        for clause in self.clauses:
            if not eval(clause, SYMPY_INTERP, {"L": scope}):
                readable = clause
                for k, i in reversed(list(enumerate(self.guarded))):
                    readable = readable.replace(f"L['t{k}']", names[i])
                return f"shape guard `{readable}` fails"
        return ""

    def changed(self, flat: list[Any]) -> dict[int, set[int]]:
        """Dimensions where a call's sizes differ from the sizes this variant was compiled for."""
        out: dict[int, set[int]] = {}
        for i, ex in enumerate(self.example):
            if ex is not None:
                ds = {d for d, (a, b) in enumerate(zip(ex, _shape(flat[i]))) if a != b}
                if ds:
                    out[i] = ds
        return out

    def describe(self) -> str:
        """`input_ids dim 1, cache[0] dim 2, cache[2]` (an int input by its name alone; empty when static)."""
        return ", ".join(self.names[i] if i in self.ints else f"{self.names[i]} dim {'/'.join(map(str, ds))}"
                         for i, ds in self.dims.items())


def conjuncts(code: str) -> list[str]:
    """The clauses of a guard expression `a and b and ...`, split at its top level only: a clause may hold an
    `and` of its own inside parentheses (`not (1 - L['t2'] < 0 and ...)`)."""
    expr = ast.parse(code, mode="eval").body
    parts = expr.values if isinstance(expr, ast.BoolOp) and isinstance(expr.op, ast.And) else [expr]
    return [ast.get_source_segment(code, p) for p in parts]


def _static_checks(static: list[tuple[int | None, ...] | None]) -> list[tuple[int, int, Any, Any]]:
    """Per input with a static size: (input, rank, a getter of its static dimensions' sizes, what they must be),
    so that `Shapes.matches` compares them in one C call per input."""
    out = []
    for i, st in enumerate(static):
        at = [d for d, s in enumerate(st or ()) if s is not None]
        if at:
            out.append((i, len(st), operator.itemgetter(*at), operator.itemgetter(*at)(st)))
    return out


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else (x,)


def merge(*dims: dict[int, set[int]]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for d in dims:
        for i, ds in d.items():
            out.setdefault(i, set()).update(ds)
    return out


def change_text(flat: list[Any], names: list[str], old: Shapes, changed: dict[int, set[int]]) -> str:
    """`cache[0] dim 2: 8 -> 9` for each changed dimension."""
    parts = [f"{names[i]}{'' if i in old.ints else f' dim {d}'}: {old.example[i][d]} -> {_shape(flat[i])[d]}"
             for i, ds in sorted(changed.items()) for d in sorted(ds)]
    return ", ".join(parts)
