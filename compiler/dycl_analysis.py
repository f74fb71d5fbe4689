"""DyCL analysis: what a function's source says before it is split (fxcc.dycl_rewrite lowers it).

- `parse_function`: the function's `ast`, with private names mangled as the class body would and `super()`
  made explicit, so that the source compiles to the same behaviour outside its class; constructs whose
  meaning depends on the frame itself (`locals()`, `exec`, generators) refuse the whole function.
- `Scope`: which expressions are decided without tensor values (shapes, constants, module attributes) and
  which are plain Python values (counters, flags, results of `.item()`).
- `Callees`: which calls reach user or library code (transformers included) that needs a host program of its
  own: tensor-dependent control flow, or effects a traced segment would replay only once or lose (attribute
  and container stores, in-place methods, printing), transitively; and which attributes the program stores
  (a segment must not bake them).
"""

from __future__ import annotations

import ast
import collections.abc
import inspect
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

SCALAR_SYNC_METHODS = {"item", "tolist"}
SHAPE_SYNC_METHODS = {"nonzero", "masked_select", "argwhere", "unique", "unique_consecutive", "numpy"}
SCALAR_SYNC_BUILTINS = {"bool", "int", "float", "complex"}
# builtins that compare or take the truth of their arguments: a host sync when an argument is a tensor
TRUTH_BUILTINS = {"min", "max", "any", "all", "sorted", "range", "round", "divmod", "hash", "len"}
TORCH_SCALAR_SYNC = {"equal", "allclose", "is_nonzero"}
TORCH_SHAPE_SYNC = {"nonzero", "masked_select", "argwhere", "unique", "unique_consecutive"}
STATIC_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "training"}
STATIC_CALLS = {"isinstance", "len", "hasattr", "range", "enumerate", "zip", "reversed", "type"}
# Python container mutations: a traced segment would apply them once, at capture
MUTATING_METHODS = {"append", "extend", "insert", "pop", "popitem", "remove", "clear", "setdefault", "reverse"}
# methods that change a list, dict or set in place (on an argument holding one: an effect its caller sees)
CONTAINER_METHODS = MUTATING_METHODS | {"update", "add", "discard", "sort", "difference_update",
                                        "intersection_update", "symmetric_difference_update"}
PYTHON_CONTAINERS = (collections.abc.MutableMapping, collections.abc.MutableSequence, collections.abc.MutableSet)
EFFECT_CALLS = {"print", "setattr", "delattr", "input", "breakpoint"}
FRAME_CALLS = {"locals", "vars", "dir", "eval", "exec", "globals"}


class RewriteError(Exception):
    """The function cannot become a host program at all: it runs eagerly (no source, a generator, exec)."""


@dataclass
class Source:
    """A function's parsed definition and where it lives (for messages and the segments' comments)."""

    fn: Any
    tree: ast.FunctionDef
    filename: str
    first_line: int
    qualname: str

    def where(self, node: ast.AST) -> str:
        return f"{self.filename}:{getattr(node, 'lineno', 1) + self.first_line - 1}"

    @property
    def line(self) -> str:
        return f"{self.filename}:{self.first_line}"


def _class_name(qualname: str) -> str | None:
    parts = qualname.split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return None
    return parts[-2].lstrip("_") or None


def _mangle(tree: ast.AST, cls: str) -> None:
    """Apply Python's private-name mangling (`__x` -> `_Cls__x`) that compiling in the class body did."""
    def m(name: str | None) -> str | None:
        if name and name.startswith("__") and not name.endswith("__") and "." not in name:
            return f"_{cls}{name}"
        return name

    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            node.id = m(node.id)
        elif isinstance(node, ast.Attribute):
            node.attr = m(node.attr)
        elif isinstance(node, ast.arg):
            node.arg = m(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            node.arg = m(node.arg)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            node.names = [m(n) for n in node.names]


@dataclass
class Wrapping:
    """A function behind `functools.wraps` decorators: each wrapper (outermost first) with the positions of
    its closure cells that hold the function it wraps, and the function they all wrap. A program of `inner`
    stands in those cells, so each wrapper's own code runs as written around it."""

    layers: list[tuple[types.FunctionType, tuple[int, ...]]]
    inner: Any


def wrapping(fn: Any) -> Wrapping:
    """The decorator wrappers around `fn` (`__wrapped__`, as `functools.wraps` sets it). `@torch.no_grad()`
    and friends are dropped: compiled code runs without autograd anyway. RewriteError, naming the wrapper,
    when one cannot be re-applied around a program: it is not a plain function, or it does not hold the
    function it wraps in a closure variable."""
    layers, f = [], fn
    while hasattr(f, "__wrapped__"):
        inner = f.__wrapped__
        if not _torch_context(f):
            cells = tuple(i for i, c in enumerate(getattr(f, "__closure__", None) or ())
                          if _cell_holds(c, inner))
            if not isinstance(f, types.FunctionType) or not cells:
                code = getattr(f, "__code__", None)
                at = f"`{code.co_name}` at {code.co_filename}:{code.co_firstlineno}" if code is not None else repr(f)
                what = "is not a Python function" if not isinstance(f, types.FunctionType) else \
                    "does not hold the function it wraps in a closure variable"
                raise RewriteError(f"{getattr(inspect.unwrap(fn), '__qualname__', repr(fn))} is wrapped by a "
                                   f"decorator ({at}) that {what}")
            layers.append((f, cells))
        f = inner
    return Wrapping(layers, f)


def _cell_holds(cell: Any, obj: Any) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


def decorated(fn: Any) -> str | None:
    """Why `fn` cannot be replaced by its wrappers around a program of the function it wraps (None: it can)."""
    try:
        wrapping(fn)
    except RewriteError as e:
        return str(e)
    return None


def parse_function(fn: Any, wrapped: bool = False) -> Source:
    """Parse `fn`'s source into its FunctionDef; RewriteError when it cannot be rewritten exactly (`wrapped`:
    a decorated function's own source is read, for analysis only)."""
    if not wrapped:
        layers = wrapping(fn).layers
        if layers:  # the wrappers are the caller's to re-apply (fxcc.dycl.Program): never dropped silently
            raise RewriteError(f"{getattr(inspect.unwrap(fn), '__qualname__', repr(fn))} is wrapped by a "
                               f"decorator; its wrapped function is rewritten, not the wrapper")
    fn = inspect.unwrap(fn)
    name = getattr(fn, "__qualname__", repr(fn))
    if not isinstance(fn, types.FunctionType):
        raise RewriteError(f"{name} is not a Python function ({type(fn).__name__})")
    try:
        lines, first = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError) as e:
        raise RewriteError(f"no Python source for {name} ({type(e).__name__}: {e})") from None
    fdef = tree.body[0] if tree.body else None
    if not isinstance(fdef, ast.FunctionDef) or fdef.name != fn.__name__:
        raise RewriteError(f"{name} is not defined by a def statement (a lambda?)")
    src = Source(fn, fdef, filename, first, name)
    for node in ast.walk(fdef):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await, ast.AsyncFor, ast.AsyncWith)):
            raise RewriteError(f"{name} is a generator or coroutine (at {src.where(node)})")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FRAME_CALLS:
            raise RewriteError(f"{name} reads its own frame with {node.func.id}() (at {src.where(node)})")
    cls = _class_name(name)
    if cls is not None:
        _mangle(fdef, cls)
    _explicit_super(src)
    return src


def _torch_context(fn: Any) -> bool:
    """`@torch.no_grad()` and friends: compiled code runs without autograd anyway."""
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("torch/utils/_contextlib.py")


def _explicit_super(src: Source) -> None:
    """`super()` -> `super(__class__, self)`: the generated functions get the original `__class__` cell."""
    args = src.tree.args.posonlyargs + src.tree.args.args
    for node in ast.walk(src.tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
                and not node.args and not node.keywords):
            if not args or "__class__" not in src.fn.__code__.co_freevars:
                raise RewriteError(f"{src.qualname} calls super() outside a method (at {src.where(node)})")
            node.args = [ast.Name("__class__", ast.Load()), ast.Name(args[0].arg, ast.Load())]


# ------------------------------------------------------------------------------------------ names


def attr_root(e: ast.expr) -> tuple[str | None, list[str]]:
    """`self.a.b` -> ("self", ["a", "b"])."""
    path = []
    while isinstance(e, ast.Attribute):
        path.append(e.attr)
        e = e.value
    return (e.id if isinstance(e, ast.Name) else None), path[::-1]


def resolve_path(obj: Any, path: list[str]) -> tuple[bool, Any]:
    for p in path:
        try:
            obj = getattr(obj, p)
        except Exception:  # noqa: BLE001 - a property that raises is simply not resolvable
            return False, None
    return True, obj


def free_loads(node: ast.AST) -> list[str]:
    """Names `node` reads from the enclosing function (not those bound by its lambdas and comprehensions)."""
    out: list[str] = []

    def visit(n: ast.AST, bound: frozenset[str]) -> None:
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load) and n.id not in bound:
                out.append(n.id)
            return
        if isinstance(n, ast.Lambda):
            a = n.args
            for d in [*a.defaults, *[d for d in a.kw_defaults if d is not None]]:
                visit(d, bound)
            params = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None}
            visit(n.body, bound | params)
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = bound
            for i, g in enumerate(n.generators):
                visit(g.iter, bound if i == 0 else inner)
                inner = inner | set(bound_names(g.target))
                for c in g.ifs:
                    visit(c, inner)
            for part in ((n.key, n.value) if isinstance(n, ast.DictComp) else (n.elt,)):
                visit(part, inner)
            return
        for c in ast.iter_child_nodes(n):
            visit(c, bound)

    visit(node, frozenset())
    return out


def bound_names(node: ast.AST) -> list[str]:
    """Names `node` binds in the enclosing function: stores and dels, walrus targets, defs, imports;
    not the targets of its comprehensions or the parameters of its lambdas."""
    out: list[str] = []

    def visit(n: ast.AST) -> None:
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, (ast.Store, ast.Del)):
                out.append(n.id)
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(n.name)
            return
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.extend((a.asname or a.name).split(".")[0] for a in n.names)
            return
        if isinstance(n, ast.ExceptHandler) and n.name:
            out.append(n.name)
        if isinstance(n, ast.Lambda):
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            out.extend(t.target.id for t in ast.walk(n) if isinstance(t, ast.NamedExpr))
            visit(n.generators[0].iter)
            return
        for c in ast.iter_child_nodes(n):
            visit(c)

    visit(node)
    return out


def names_only(t: ast.expr) -> bool:
    if isinstance(t, ast.Name):
        return True
    if isinstance(t, (ast.Tuple, ast.List)):
        return all(names_only(e.value if isinstance(e, ast.Starred) else e) for e in t.elts)
    return False


# ------------------------------------------------------------------------------------------ scope


@dataclass
class Scope:
    """What is known about names while one function is analysed."""

    owner: Any
    selfname: str | None
    static_names: set[str] = field(default_factory=set)
    py_names: set[str] = field(default_factory=set)
    fn: Any = None  # the function analysed: its globals and closure cells resolve free names

    def resolve(self, e: ast.expr) -> tuple[bool, Any]:
        """The object an attribute chain on `self`, or on a global or closure module, refers to now."""
        return _resolve_expr(e, self, self.fn, None) if self.fn is not None else (False, None)

    def static(self, e: ast.expr) -> bool:
        """Whether `e` can be decided at capture time (no tensor values involved)."""
        if isinstance(e, ast.Constant):
            return True
        if isinstance(e, ast.Name):
            return e.id in self.static_names
        if isinstance(e, ast.Attribute):
            root, path = attr_root(e)
            if root is not None and root == self.selfname:
                ok, val = resolve_path(self.owner, path)
                return ok and not isinstance(val, torch.Tensor)
            if root is not None and e.attr not in STATIC_ATTRS:
                ok, val = self.resolve(e)
                return ok and not isinstance(val, torch.Tensor)
            return e.attr in STATIC_ATTRS
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Name) and f.id in STATIC_CALLS:
                return f.id in ("isinstance", "len", "hasattr", "type") or all(self.static(a) for a in e.args)
            return isinstance(f, ast.Attribute) and f.attr in ("size", "dim")
        if isinstance(e, ast.Subscript):
            return self.static(e.value) and self.static(e.slice)
        if isinstance(e, ast.Compare):
            if all(isinstance(op, (ast.Is, ast.IsNot)) for op in e.ops):
                return True
            return self.static(e.left) and all(self.static(c) for c in e.comparators)
        if isinstance(e, ast.BoolOp):
            return all(self.static(v) for v in e.values)
        if isinstance(e, ast.UnaryOp):
            return self.static(e.operand)
        if isinstance(e, ast.BinOp):
            return self.static(e.left) and self.static(e.right)
        if isinstance(e, (ast.Tuple, ast.List)):
            return all(self.static(x) for x in e.elts)
        if isinstance(e, ast.Slice):
            return all(x is None or self.static(x) for x in (e.lower, e.upper, e.step))
        return False

    def python_expr(self, e: ast.expr) -> bool:
        """Plain Python bookkeeping (counters, flags, empty lists): no tensor is read or made."""
        if isinstance(e, ast.Constant) or self.static(e):
            return True
        if isinstance(e, ast.Name):
            return e.id in self.py_names
        if isinstance(e, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp)):
            return all(self.python_expr(c) for c in ast.iter_child_nodes(e) if isinstance(c, ast.expr))
        if isinstance(e, (ast.List, ast.Tuple, ast.Set)):
            return all(self.python_expr(x) for x in e.elts)
        if isinstance(e, ast.Dict):
            return all(x is None or self.python_expr(x) for x in [*e.keys, *e.values])
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in ("len", "range", "min", "max",
                                                                                       "abs", "round", "int",
                                                                                       "float", "bool"):
            return e.func.id == "len" or all(self.python_expr(a) for a in e.args)
        return False

    def pyval(self, e: ast.expr) -> bool:
        """Whether `e` is known not to be a tensor (so truth tests and comparisons on it need no sync)."""
        return self.static(e) or self.python_expr(e)


def sync_kind(call: ast.Call, scope: Scope | None = None) -> str | None:
    """'scalar' for host syncs giving Python values, 'shape' for ops with data-dependent output shapes."""
    f = call.func
    if isinstance(f, ast.Attribute):
        root, path = attr_root(f)
        if root == "torch" and len(path) == 1:
            if path[0] in TORCH_SCALAR_SYNC:
                return "scalar"
            if path[0] in TORCH_SHAPE_SYNC or (path[0] == "where" and len(call.args) == 1 and not call.keywords):
                return "shape"
            return None
        if f.attr in SCALAR_SYNC_METHODS:
            return "scalar"
        if f.attr in SHAPE_SYNC_METHODS:
            return "shape"
    elif isinstance(f, ast.Name):
        if f.id in SCALAR_SYNC_BUILTINS and len(call.args) == 1:
            return None if scope is not None and scope.pyval(call.args[0]) else "scalar"
        if f.id in TRUTH_BUILTINS and scope is not None:
            args = [a.value if isinstance(a, ast.Starred) else a for a in call.args]
            if f.id == "len":
                return None
            if any(not scope.pyval(a) for a in args) or call.keywords:
                return "truth"
    return None


def in_place_method(name: str) -> bool:
    """A tensor method that writes its tensor (`add_`, `copy_`; not `__init__`, `_private`)."""
    return name.endswith("_") and not name.startswith("_")


def written_operands(call: ast.Call) -> list[ast.expr]:
    """What a call writes in place as a tensor: the object of an in-place method (`t.add_(1)`), an `out=` argument,
    the first argument of a call with `inplace=True` (`F.relu(t, inplace=True)`)."""
    out = [call.func.value] if isinstance(call.func, ast.Attribute) and in_place_method(call.func.attr) else []
    for k in call.keywords:
        if k.arg == "out":
            out.append(k.value)
        elif k.arg == "inplace" and call.args and not (isinstance(k.value, ast.Constant) and not k.value.value):
            out.append(call.args[0])
    return out


def mutating_call(call: ast.Call) -> bool:
    """In-place tensor methods (`x.add_(...)`), container mutations, `out=`/`inplace=True`, printing."""
    f = call.func
    if isinstance(f, ast.Attribute):
        a = f.attr
        if a in MUTATING_METHODS or in_place_method(a):
            return True
    elif isinstance(f, ast.Name) and f.id in EFFECT_CALLS:
        return True
    for k in call.keywords:
        if k.arg == "out" or (k.arg == "inplace" and not (isinstance(k.value, ast.Constant) and not k.value.value)):
            return True
    return False


# ------------------------------------------------------------------------------------------ callees


LIBRARIES = ("transformers.",)  # library code DyCL reads once it splits a function (see `Callees.libraries`)


def _user_code(fn: Any, libraries: bool = True) -> bool:
    """Code DyCL reads: the user's, and with `libraries` that of libraries like transformers (whose callees
    have tensor-dependent control flow of their own); never torch's (its functions are ops to trace) or fxcc's."""
    mod = getattr(fn, "__module__", "") or ""
    if mod.startswith(("torch.", "fxcc")) or mod in ("torch", "builtins"):
        return False
    return libraries or not mod.startswith(LIBRARIES)


def compiled_wrapper(obj: Any) -> bool:
    """An object fxcc.compile returned (it dispatches to its own variants: the host calls it as it is)."""
    return type(obj).__name__ == "CompiledModule" or hasattr(obj, "fxcc")


def target_function(obj: Any, libraries: bool = True) -> tuple[Any, Any, bool] | None:
    """(owner, plain function, is_method) of a callable the rewriter can read: a module's forward, a bound
    method, a plain Python function; None for anything else (builtins, torch, classes; without `libraries`,
    library code)."""
    if compiled_wrapper(obj):
        return None
    if isinstance(obj, nn.Module):
        fn = type(obj).forward
        return (obj, fn, True) if _user_code(fn, libraries) else None
    if inspect.ismethod(obj) and isinstance(obj.__func__, types.FunctionType) and not inspect.isclass(obj.__self__):
        return (obj.__self__, obj.__func__, True) if _user_code(obj.__func__, libraries) else None
    if isinstance(obj, types.FunctionType):
        return (None, obj, False) if _user_code(obj, libraries) else None
    return None


@dataclass
class FunctionInfo:
    """One user function, read once: its source, and what it does that a traced segment cannot replay."""

    source: Source | None
    scope: Scope | None
    host: bool = False  # tensor-dependent control flow, host syncs, or effects of its own
    effect: str | None = None  # a Python effect no trace replays (an attribute store...), with its line
    stores: set[str] = field(default_factory=set)  # attribute names it assigns
    loads: set[str] = field(default_factory=set)  # attribute names it reads
    # writes into what a parameter holds (`extras[k] = v`, `feats.append(h)`, `cfg.log += [x]`): (parameter,
    # attribute path, what, with its line); an effect where the call's argument there is a Python container, or a
    # tensor that is none of the call's inputs (a default value, an attribute of an object it was given)
    argument_writes: list[tuple[str, list[str], str]] = field(default_factory=list)
    # in-place tensor writes into what a parameter holds (`obj.t.add_(1)`, `t.add_(1)`, `feats[0].mul_(2)`): an
    # effect where a tensor there is none of the call's inputs
    tensor_writes: list[tuple[str, list[str], str]] = field(default_factory=list)
    callees: list[Any] = field(default_factory=list)


class Callees:
    """Which callables reached from a compiled function need a host program of their own (memoised).

    A callable needs one when it has tensor-dependent control flow or host syncs, effects a traced segment
    would replay once (stores into attributes or containers, in-place methods, printing), stores an attribute
    on an object it made (a segment's graph would return that object rebuilt without it), reads an attribute
    the program stores, or calls a callable that needs one (recursion counts).
    """

    def __init__(self, libraries: bool = True) -> None:
        # library code (transformers) is read where DyCL splits a function; the scan for effects that decides
        # whether a capturable forward is split at all leaves it out (fxcc's runtime keeps transformers' caches)
        self.libraries = libraries
        self.infos: dict[tuple[int, Any], FunctionInfo] = {}
        self.keep: list[Any] = []  # owners whose ids key `infos`
        self.stored_attrs: set[str] = set()
        self.mutated_names: set[str] = set()  # globals and closure variables some function changes in place
        self._needs: dict[int, bool] = {}  # id(FunctionInfo) -> needs a program

    def info(self, obj: Any) -> FunctionInfo | None:
        t = target_function(obj, self.libraries)
        if t is None:
            return None
        owner, fn, method = t
        key = (id(owner), fn)
        if key in self.infos:
            return self.infos[key]
        self.keep.append(owner)
        info = self.infos[key] = FunctionInfo(None, None)
        try:
            info.source = parse_function(fn, wrapped=True)
        except RewriteError:
            return info
        params = [a.arg for a in info.source.tree.args.posonlyargs + info.source.tree.args.args]
        info.scope = Scope(owner, params[0] if method and params else None, fn=info.source.fn)
        self._read(info)
        self._needs.clear()
        return info

    def function(self, fn: Any, owner: Any, method: bool) -> FunctionInfo | None:
        """The info of `fn` itself (the function being compiled)."""
        return self.info(types.MethodType(fn, owner) if method else fn)

    def _read(self, info: FunctionInfo) -> None:
        scope, tree = info.scope, info.source.tree
        params = {a.arg for a in [*tree.args.posonlyargs, *tree.args.args, *tree.args.kwonlyargs,
                                  tree.args.vararg, tree.args.kwarg] if a is not None}
        declared = {n for g in ast.walk(tree) if isinstance(g, (ast.Global, ast.Nonlocal)) for n in g.names}
        local = {n for s in tree.body for n in bound_names(s)} - params - declared
        packed = {a.arg for a in (tree.args.vararg, tree.args.kwarg) if a is not None}

        def outside(target: ast.expr) -> bool:  # a store or mutation the caller can see
            while isinstance(target, (ast.Attribute, ast.Subscript)):
                target = target.value
            return not (isinstance(target, ast.Name) and target.id in local)

        def python_object(e: ast.expr) -> bool:  # not a tensor (whose in-place updates a trace does replay)
            root, path = attr_root(e)
            if root is None or root != scope.selfname:
                return root is None or root not in params
            ok, obj = resolve_path(scope.owner, path)
            return not ok or not isinstance(obj, torch.Tensor)

        def mutated(target: ast.expr) -> None:  # `self.log.append(...)`, `self.cache[k] = v`: `log`, `cache` change
            while isinstance(target, ast.Subscript):
                target = target.value
            if isinstance(target, ast.Attribute):
                info.stores.add(target.attr)
            elif isinstance(target, ast.Name) and target.id not in local and target.id not in params:
                self.mutated_names.add(target.id)  # a global or closure object changed in place

        def argument_write(target: ast.expr, node: ast.AST, what: str, tensor: bool = False) -> None:
            while isinstance(target, ast.Subscript):
                target = target.value
            root, path = attr_root(target)  # `*args` and `**kwargs` are the call's own tuple and dict
            if root in params and root not in packed and root != scope.selfname:
                writes = info.tensor_writes if tensor else info.argument_writes
                writes.append((root, path, f"{what} at {info.source.where(node)}"))

        def held_tensor(target: ast.expr) -> bool:  # `G`, `helper.G`, a closure's `k`: a tensor it is not given
            while isinstance(target, ast.Subscript):
                target = target.value
            root, path = attr_root(target)
            if root is None or root in params or root == scope.selfname or not outside(target):
                return False
            ok, obj = _lookup(root, info.source.fn)
            ok, obj = resolve_path(obj, path) if ok else (False, None)
            return ok and bool(_tensors(obj))

        def effect(node: ast.AST, what: str) -> None:
            info.host = True
            if info.effect is None:
                info.effect = f"{what} at {info.source.where(node)}"

        # the body only: decorators, default values and annotations ran once, when the function was defined
        # (`@register("name")` storing into a registry is no effect of a call)
        for node in (n for s in tree.body for n in ast.walk(s)):
            if isinstance(node, ast.Attribute):
                if isinstance(node.ctx, (ast.Store, ast.Del)):
                    info.stores.add(node.attr)
                    if outside(node):
                        effect(node, f"stores attribute `{node.attr}`")
                    else:  # on an object it made: traced, the store would live on the object a segment's graph
                        info.host = True  # rebuilds from its pytree leaves (`out.pooler = ...`: an attribute lost)
                else:
                    info.loads.add(node.attr)
            if isinstance(node, (ast.Global, ast.Nonlocal)):
                self.mutated_names.update(node.names)
                effect(node, f"assigns `{type(node).__name__.lower()} {', '.join(node.names)}`")
            elif isinstance(node, (ast.If, ast.While, ast.IfExp)) and not scope.static(node.test):
                info.host = True
            elif isinstance(node, ast.For) and not scope.static(node.iter):
                info.host = True
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
                mutated(node.value)
                argument_write(node.value, node, "stores into a container it was given")
                if outside(node):
                    info.host = True
                    if python_object(node.value):
                        effect(node, "stores into a container it was given")
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):  # `feats += [h]`
                argument_write(node.target, node, f"updates `{node.target.id}` in place")
                if node.target.id in params - packed:  # in place on what the caller holds (a list, a tensor)
                    info.host = True
            elif isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr in CONTAINER_METHODS:
                    argument_write(node.func.value, node, f"calls `.{node.func.attr}()` on a container it was given")
                for target in written_operands(node):  # traced, a write into a tensor it is not given happens
                    text = ast.unparse(target)  # at capture, on the real tensor, and the graph may not repeat it
                    argument_write(target, node, f"writes `{text}` in place", tensor=True)
                    if held_tensor(target):
                        effect(node, f"writes `{text}` in place (a tensor it is not given as an argument)")
                if sync_kind(node, scope):
                    info.host = True
                elif mutating_call(node):
                    f = node.func
                    if not isinstance(f, ast.Attribute):
                        effect(node, f"calls {ast.unparse(f)}()")
                    elif outside(f.value):
                        mutated(f.value)
                        info.host = True
                        if f.attr in MUTATING_METHODS and python_object(f.value):
                            effect(node, f"calls `.{f.attr}()` on a container it was given")
                for obj in resolve_call(node, scope, info.source.fn):
                    info.callees.append(obj)
                    self.info(obj)
        self.stored_attrs |= info.stores

    def effect(self, obj: Any, seen: set[int] | None = None) -> str | None:
        """The first Python effect `obj` or a callee of it has that a traced graph would not replay."""
        info = self.info(obj)
        seen = set() if seen is None else seen
        if info is None or info.source is None or id(info) in seen:
            return None
        seen.add(id(info))
        if info.effect is not None:
            return f"{info.source.qualname} {info.effect}"
        return next((e for c in info.callees if (e := self.effect(c, seen))), None)

    def argument_effect(self, obj: Any, args: tuple, kwargs: dict) -> str | None:
        """The first write of `obj` into a Python list, dict or set it is given in this call (`extras[k] = v`,
        `feats.append(h)`): a traced graph would make it on capture's copies of the containers, never on the
        caller's; or into a tensor that is none of the call's inputs (`t.add_(1)` on a default value, `obj.t.add_(1)`
        on an attribute of an object it is given): the trace would make it on the real tensor, once. A tensor the
        call passes (itself, or inside a tuple, list or dict) is an input: its in-place updates are traced."""
        info = self.info(obj)
        if info is None or info.source is None or not (info.argument_writes or info.tensor_writes):
            return None
        owner = getattr(obj, "__self__", None) if inspect.ismethod(obj) else None
        try:
            bound = inspect.signature(info.source.fn).bind(*((owner,) if owner is not None else ()), *args, **kwargs)
        except TypeError:  # a decorator's own signature: the wrapped function's parameters are not these
            return None
        bound.apply_defaults()  # a default value is the function's own object, shared by every call
        inputs = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        writes = [(w, True) for w in info.argument_writes] + [(w, False) for w in info.tensor_writes]
        for (name, path, what), container in writes:
            if name not in bound.arguments:
                continue
            ok, value = resolve_path(bound.arguments[name], path)
            if not ok:
                continue
            if container and isinstance(value, PYTHON_CONTAINERS) and not isinstance(value, torch.Tensor):
                return f"{info.source.qualname} {what}"
            if any(id(t) not in inputs for t in _tensors(value)):
                return f"{info.source.qualname} {what}, a tensor that is none of the call's inputs"
        return None

    def needs_program(self, obj: Any) -> bool:
        info = self.info(obj)
        if info is None:
            return False
        return self._needs_info(info, set())

    def reads_state(self, info: FunctionInfo) -> bool:
        """Whether the function reads an attribute or a global/closure object the program changes."""
        if info.loads & self.stored_attrs:
            return True
        code = info.source.fn.__code__
        return bool(self.mutated_names & (set(code.co_names) | set(code.co_freevars)))

    def _needs_info(self, info: FunctionInfo, seen: set[int]) -> bool:
        key = id(info)
        if key in self._needs:
            return self._needs[key]
        if key in seen:
            return True  # recursion: the call cannot be traced through
        seen.add(key)
        result = info.source is not None and (
            info.host or self.reads_state(info)
            or any(self._needs_info(self.info(c), seen) for c in info.callees if self.info(c) is not None))
        self._needs[key] = result
        return result


def _tensors(v: Any) -> list[torch.Tensor]:
    """The tensor `v`, or the tensors a tuple, list or dict `v` holds (one level)."""
    if isinstance(v, torch.Tensor):
        return [v]
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
    return [x for x in items if isinstance(x, torch.Tensor)]


def _lookup(name: str, fn: Any) -> tuple[bool, Any]:
    """The object a free name of `fn` refers to now: a closure cell or a global."""
    code = getattr(fn, "__code__", None)
    if code is not None and name in code.co_freevars and fn.__closure__:
        try:
            return True, fn.__closure__[code.co_freevars.index(name)].cell_contents
        except ValueError:  # an empty cell
            return False, None
    g = getattr(fn, "__globals__", {})
    if name in g:
        return True, g[name]
    return False, None


def resolve_call(call: ast.Call, scope: Scope, fn: Any, local: set[str] | None = None,
                 candidates: dict[str, list[Any]] | None = None) -> list[Any]:
    """The objects a call may reach, read from the source: `self.a.b(...)`, `self(...)`, a global or closure
    function or module, `self.blocks[i](...)` (every element), a loop variable over a module list."""
    f = call.func
    if isinstance(f, ast.Subscript):
        ok, container = _resolve_expr(f.value, scope, fn, local)
        if ok and isinstance(container, (nn.ModuleList, nn.Sequential, list, tuple)):
            return [m for m in container if callable(m)]
        if ok and isinstance(container, (nn.ModuleDict, dict)):
            return [m for m in container.values() if callable(m)]
        return []
    if isinstance(f, ast.Name) and candidates and f.id in candidates:
        return list(candidates[f.id])
    ok, obj = _resolve_expr(f, scope, fn, local)
    return [obj] if ok and callable(obj) else []


def _resolve_expr(e: ast.expr, scope: Scope, fn: Any, local: set[str] | None) -> tuple[bool, Any]:
    root, path = attr_root(e)
    if root is None:
        return False, None
    if root == scope.selfname:
        obj = scope.owner
    elif local is not None and root in local:
        return False, None
    elif local is None and root in fn.__code__.co_varnames + fn.__code__.co_cellvars:
        return False, None
    else:
        ok, obj = _lookup(root, fn)
        if not ok:
            return False, None
        if path and not isinstance(obj, (types.ModuleType, nn.Module, type)):
            return False, None
    return resolve_path(obj, path)
