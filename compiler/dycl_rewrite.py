"""DyCL program rewriting: a function's Python source -> a host program plus condition-free segments.

Works on the `ast` of `forward` (or of any method / function). Statements whose behaviour depends on
tensor values stay in the host program: `if`/`while`/`for` with tensor-dependent conditions or trip
counts, early `return`, `break`/`continue`, and the host syncs themselves (`.item()`, `.tolist()`,
`bool/int/float(tensor)`, `torch.equal`, `nonzero` and the other ops whose output shape depends on
data). Their tensor operands are hoisted into temporaries computed by the segment before them. Maximal
runs of the remaining statements become segments: functions of their live-in names returning their
live-out names, each captured and compiled on its own. Calls of submodules or methods that have
dynamic control flow of their own become calls of their own host programs (recursion included).
Statements that cannot be rewritten (try/raise, with, global, del, generators) run eagerly, reported
with their file:line.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

SCALAR_SYNC_METHODS = {"item", "tolist"}
SHAPE_SYNC_METHODS = {"nonzero", "masked_select", "argwhere", "unique", "unique_consecutive", "numpy"}
SCALAR_SYNC_BUILTINS = {"bool", "int", "float"}
TORCH_SCALAR_SYNC = {"equal", "allclose", "is_nonzero"}
TORCH_SHAPE_SYNC = {"nonzero", "masked_select", "argwhere", "unique", "unique_consecutive"}
STATIC_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "training"}
STATIC_CALLS = {"isinstance", "len", "hasattr", "range", "enumerate", "zip", "reversed"}
MUTATING_METHODS = {"append", "extend", "insert", "pop", "remove", "clear", "update", "add", "setdefault"}
UNSUPPORTED = {
    ast.Try: "exceptions used as control flow (try/except)",
    ast.Raise: "raising an exception",
    ast.With: "a with-block",
    ast.Global: "mutation of Python globals",
    ast.Nonlocal: "mutation of enclosing variables",
    ast.Delete: "del",
    ast.Assert: "assert",
    ast.Import: "import inside forward",
    ast.ImportFrom: "import inside forward",
    ast.FunctionDef: "a nested function",
    ast.ClassDef: "a nested class",
}
if hasattr(ast, "TryStar"):
    UNSUPPORTED[ast.TryStar] = "exceptions used as control flow (try/except*)"
if hasattr(ast, "Match"):
    UNSUPPORTED[ast.Match] = "a match statement"


class RewriteError(Exception):
    """The function cannot become a host program at all (no source, a generator, super())."""


@dataclass
class Source:
    """A function's parsed definition and where it lives (for messages and the segments' comments)."""

    fn: Any
    tree: ast.FunctionDef
    filename: str
    first_line: int
    qualname: str

    def where(self, node: ast.AST) -> str:
        return f"{self.filename}:{node.lineno + self.first_line - 1}"


def parse_function(fn: Any) -> Source:
    """Parse `fn`'s source into its FunctionDef; RewriteError when there is none or it is a generator."""
    fn = inspect.unwrap(fn)
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        lines, first = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError) as e:
        raise RewriteError(f"no Python source for {name} ({e})") from None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fdef = tree.body[0]
    if not isinstance(fdef, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise RewriteError(f"{name} is not defined by a def statement (a lambda?)")
    src = Source(fn, fdef, filename, first, name)
    for node in ast.walk(fdef):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            raise RewriteError(f"{name} is a generator (`yield` at {src.where(node)})")
        if isinstance(node, ast.Name) and node.id == "super":
            raise RewriteError(f"{name} calls super() (at {src.where(node)})")
    return src


def _attr_root(e: ast.expr) -> tuple[str | None, list[str]]:
    """`self.a.b` -> ("self", ["a", "b"])."""
    path = []
    while isinstance(e, ast.Attribute):
        path.append(e.attr)
        e = e.value
    return (e.id if isinstance(e, ast.Name) else None), path[::-1]


def resolve_self_attr(owner: Any, path: list[str]) -> tuple[bool, Any]:
    obj = owner
    for p in path:
        try:
            obj = getattr(obj, p)
        except AttributeError:
            return False, None
    return True, obj


@dataclass
class Scope:
    """What is known about names while one function is analysed."""

    owner: Any
    selfname: str | None
    static_names: set[str] = field(default_factory=set)
    py_names: set[str] = field(default_factory=set)

    def static(self, e: ast.expr) -> bool:
        """Whether `e` can be decided at capture time (no tensor values involved)."""
        if isinstance(e, ast.Constant):
            return True
        if isinstance(e, ast.Name):
            return e.id in self.static_names
        if isinstance(e, ast.Attribute):
            root, path = _attr_root(e)
            if root is not None and root == self.selfname:
                ok, val = resolve_self_attr(self.owner, path)
                return ok and not isinstance(val, torch.Tensor)
            return e.attr in STATIC_ATTRS
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Name) and f.id in STATIC_CALLS:
                return f.id in ("isinstance", "len", "hasattr") or all(self.static(a) for a in e.args)
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
        if isinstance(e, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
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


def sync_kind(call: ast.Call) -> str | None:
    """'scalar' for host syncs giving Python values, 'shape' for ops with data-dependent output shapes."""
    f = call.func
    if isinstance(f, ast.Attribute):
        root, path = _attr_root(f)
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
    elif isinstance(f, ast.Name) and f.id in SCALAR_SYNC_BUILTINS and len(call.args) == 1:
        return "scalar"
    return None


def callee_of(call: ast.Call, scope: Scope) -> Any:
    """The object `self.name(...)` calls: a submodule or a bound method of the owner; None otherwise."""
    f = call.func
    if not isinstance(f, ast.Attribute) or scope.selfname is None:
        return None
    root, path = _attr_root(f)
    if root != scope.selfname:
        return None
    ok, obj = resolve_self_attr(scope.owner, path)
    if not ok:
        return None
    if isinstance(obj, nn.Module):
        return obj
    if inspect.ismethod(obj) and isinstance(obj.__self__, nn.Module):
        return obj
    return None


def target_function(obj: Any) -> tuple[Any, Any]:
    """(owner, plain function) for a submodule (its forward) or a bound method."""
    if isinstance(obj, nn.Module):
        return obj, type(obj).forward
    return obj.__self__, obj.__func__


def _user_code(owner: Any, fn: Any) -> bool:
    mod = getattr(fn, "__module__", "") or ""
    return not (mod.startswith("torch.") or mod.startswith("transformers.") or mod.startswith("fxcc"))


class DynamicCallees:
    """Decides which callees have dynamic control flow of their own (memoised; recursion counts as dynamic)."""

    def __init__(self) -> None:
        self.memo: dict[tuple[int, Any], bool] = {}

    def dynamic(self, obj: Any) -> bool:
        owner, fn = target_function(obj)
        if not _user_code(owner, fn):
            return False
        key = (id(owner), fn)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = True  # while analysing: a recursive call is dynamic
        try:
            src = parse_function(fn)
        except RewriteError:
            self.memo[key] = False
            return False
        params = [a.arg for a in src.tree.args.args]
        scope = Scope(owner, params[0] if params else None)
        self.memo[key] = self._has_split(src.tree, scope)
        return self.memo[key]

    def _has_split(self, fdef: ast.FunctionDef, scope: Scope) -> bool:
        for node in ast.walk(fdef):
            if isinstance(node, (ast.If, ast.While, ast.IfExp)) and not scope.static(node.test):
                return True
            if isinstance(node, ast.For) and not scope.static(node.iter):
                return True
            if isinstance(node, ast.Call):
                if sync_kind(node):
                    return True
                callee = callee_of(node, scope)
                if callee is not None and self.dynamic(callee):
                    return True
        return False


# ------------------------------------------------------------------------------------------ lowering

HOST, SEG = "host", "seg"


def _tag(stmt: ast.stmt, kind: str) -> ast.stmt:
    stmt._dycl = kind  # type: ignore[attr-defined]
    return stmt


def _assign(name: str, value: ast.expr) -> ast.Assign:
    return ast.Assign([ast.Name(name, ast.Store())], value, lineno=getattr(value, "lineno", 0))


def _loads(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def _stores(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))]


def _names_only(t: ast.expr) -> bool:
    if isinstance(t, ast.Name):
        return True
    if isinstance(t, (ast.Tuple, ast.List)):
        return all(_names_only(e.value if isinstance(e, ast.Starred) else e) for e in t.elts)
    return False


@dataclass
class SegmentSpec:
    """A maximal run of condition-free statements: compiled as `def segN(self, *inputs) -> outputs`."""

    index: int
    stmts: list[ast.stmt]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    where: str = ""


@dataclass
class Rewritten:
    """The host program's FunctionDef, its segments, and the callees that became programs of their own."""

    source: Source
    host: ast.FunctionDef
    segments: list[SegmentSpec]
    callees: dict[str, Any]
    eager: list[str]
    splits: int
    selfname: str | None


class Lowerer:
    """Rewrites one function: hoists host syncs, keeps dynamic control flow in the host, groups segments."""

    def __init__(self, src: Source, scope: Scope, callees: DynamicCallees):
        self.src = src
        self.scope = scope
        self.callees = callees
        self.ntmp = 0
        self.callee_names: dict[int, str] = {}
        self.callee_objs: dict[str, Any] = {}
        self.eager: list[str] = []
        self.splits = 0
        self.segments: list[SegmentSpec] = []
        self.assigned: set[str] = {a.arg for a in src.tree.args.args + src.tree.args.kwonlyargs}
        self.globals = {n for node in ast.walk(src.tree) if isinstance(node, (ast.Global, ast.Nonlocal))
                        for n in node.names}

    # ---------------------------------------------------------------------------------- helpers

    def tmp(self, prefix: str) -> str:
        self.ntmp += 1
        return f"_{prefix}{self.ntmp}"

    def note_eager(self, node: ast.AST, what: str) -> None:
        self.splits += 1
        self.eager.append(f"{self.src.qualname}: {what} at {self.src.where(node)} runs eagerly "
                          f"(`{ast.unparse(node).splitlines()[0][:80]}`)")

    def dynamic_call(self, call: ast.Call) -> Any:
        callee = callee_of(call, self.scope)
        return callee if callee is not None and self.callees.dynamic(callee) else None

    def has_host_call(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Call) and (sync_kind(n) or self.dynamic_call(n)) for n in ast.walk(node))

    def callee_name(self, obj: Any) -> str:
        owner, fn = target_function(obj)
        key = id(obj)
        if key not in self.callee_names:
            base = getattr(fn, "__name__", "fn") if not isinstance(obj, nn.Module) else type(obj).__name__
            name = f"_prog_{base}_{len(self.callee_names)}"
            self.callee_names[key] = name
            self.callee_objs[name] = obj
        return self.callee_names[key]

    def to_name(self, e: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """A Name or constant for `e`: other expressions are computed into a temporary first."""
        if isinstance(e, (ast.Name, ast.Constant)):
            return e
        name = self.tmp("t")
        pre.append(self.classify_assign(_assign(name, e), [name], e))
        return ast.Name(name, ast.Load())

    def classify_assign(self, stmt: ast.stmt, targets: list[str], value: ast.expr) -> ast.stmt:
        if isinstance(value, ast.Name) and isinstance(stmt, ast.Assign) and not self.globals & set(targets):
            if value.id in self.scope.py_names:
                self.scope.py_names.update(targets)
            else:
                self.scope.py_names.difference_update(targets)
            return _tag(stmt, HOST)  # an alias: nothing to compute
        if self.scope.python_expr(value) or any(t in self.globals for t in targets):
            self.scope.py_names.update(targets)
            if any(t in self.globals for t in targets):
                self.note_eager(stmt, "mutation of a Python global")
            return _tag(stmt, HOST)
        self.scope.py_names.difference_update(targets)
        return _tag(stmt, SEG)

    def hoist(self, e: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """Pull host syncs and calls of dynamic callees out of `e` into temporaries (in evaluation order)."""
        if isinstance(e, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return e  # own scope: left whole (a statement with a sync inside runs in the host)
        if isinstance(e, ast.Call):
            kind = sync_kind(e)
            callee = None if kind else self.dynamic_call(e)
            if kind or callee is not None:
                f = e.func
                if callee is not None:
                    func: ast.expr = ast.Name(self.callee_name(callee), ast.Load())
                elif isinstance(f, ast.Attribute) and _attr_root(f)[0] != "torch":
                    func = ast.Attribute(self.to_name(self.hoist(f.value, pre), pre), f.attr, ast.Load())
                else:
                    func = f
                args = [a if isinstance(a, ast.Starred) else self.to_name(self.hoist(a, pre), pre) for a in e.args]
                kws = [ast.keyword(k.arg, self.to_name(self.hoist(k.value, pre), pre)) for k in e.keywords]
                name = self.tmp("s" if kind == "scalar" else "h")
                pre.append(_tag(_assign(name, ast.Call(func, args, kws)), HOST))
                self.splits += 1
                if kind == "scalar":
                    self.scope.py_names.add(name)
                return ast.Name(name, ast.Load())
        for fname, value in ast.iter_fields(e):
            if isinstance(value, ast.expr) and not isinstance(value, ast.expr_context):
                setattr(e, fname, self.hoist(value, pre))
            elif isinstance(value, list):
                setattr(e, fname, [self.hoist(v, pre) if isinstance(v, ast.expr) else v for v in value])
        return e

    def pure(self, s: ast.stmt) -> bool:
        """A compound statement export can trace as is (static conditions, nothing for the host inside)."""
        for node in ast.walk(s):
            if isinstance(node, (ast.Return, ast.Break, ast.Continue, ast.Expr, *UNSUPPORTED)):
                return False
            if isinstance(node, (ast.If, ast.While, ast.IfExp)) and not self.scope.static(node.test):
                return False
            if isinstance(node, ast.For) and not (self.scope.static(node.iter) and _names_only(node.target)):
                return False
            if isinstance(node, ast.Call) and (sync_kind(node) or self.dynamic_call(node)):
                return False
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                ts = node.targets if isinstance(node, ast.Assign) else [node.target]
                if not all(_names_only(t) for t in ts) or any(n in self.globals for n in _stores(node)):
                    return False
        return True

    # ------------------------------------------------------------------------------- statements

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            out += self.stmt(s)
            self.assigned.update(_stores(s))
        return out

    def stmt(self, s: ast.stmt) -> list[ast.stmt]:
        pre: list[ast.stmt] = []
        for kind, what in UNSUPPORTED.items():
            if isinstance(s, kind):
                self.note_eager(s, what)
                return [_tag(s, HOST)]
        if isinstance(s, ast.Expr):
            if isinstance(s.value, ast.Constant):
                return []  # a docstring
            s.value = self.hoist(s.value, pre)
            return pre + [_tag(s, HOST)]
        if isinstance(s, ast.AnnAssign):
            if s.value is None:
                return []
            s = ast.Assign([s.target], s.value, lineno=s.lineno)
        if isinstance(s, (ast.Assign, ast.AugAssign)):
            return self.assign(s)
        if isinstance(s, ast.Return):
            if isinstance(s.value, ast.IfExp) and not self.scope.static(s.value.test):
                v = s.value
                return self.stmt(ast.If(v.test, [ast.Return(v.body, lineno=s.lineno)],
                                        [ast.Return(v.orelse, lineno=s.lineno)], lineno=s.lineno))
            if s.value is not None:
                v = self.hoist(s.value, pre)
                if isinstance(v, ast.Tuple):
                    v.elts = [self.to_name(x, pre) for x in v.elts]
                else:
                    v = self.to_name(v, pre)
                s.value = v
            self.splits += 1
            return pre + [_tag(s, HOST)]
        if isinstance(s, (ast.Break, ast.Continue)):
            self.splits += 1
            return [_tag(s, HOST)]
        if isinstance(s, ast.Pass):
            return []
        if isinstance(s, ast.If):
            if self.scope.static(s.test) and self.pure(s):
                return [_tag(s, SEG)]
            s.test = self.cond(s.test, pre)
            s.body, s.orelse = self.block(s.body), self.block(s.orelse)
            self.splits += 1
            return pre + [_tag(s, HOST)]
        if isinstance(s, ast.While):
            if self.scope.static(s.test) and self.pure(s):
                return [_tag(s, SEG)]
            if s.orelse:
                self.note_eager(s, "while-else")
                return [_tag(s, HOST)]
            test = self.cond(s.test, pre)
            body = self.block(s.body)
            self.splits += 1
            if not pre:
                s.test, s.body = test, body
                return [_tag(s, HOST)]
            stop = _tag(ast.If(ast.UnaryOp(ast.Not(), test), [_tag(ast.Break(), HOST)], [], lineno=s.lineno), HOST)
            return [_tag(ast.While(ast.Constant(True), pre + [stop] + body, [], lineno=s.lineno), HOST)]
        if isinstance(s, ast.For):
            if self.scope.static(s.iter) and self.pure(s):
                return [_tag(s, SEG)]
            it = s.iter
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("range", "enumerate"):
                self.scope.py_names.update(_stores(s.target) if it.func.id == "range" else
                                           _stores(s.target.elts[0]) if isinstance(s.target, ast.Tuple) else [])
            s.iter = self.hoist(s.iter, pre)
            if not (self.scope.python_expr(s.iter) or self.scope.static(s.iter)):
                s.iter = self.to_name(s.iter, pre)
            s.body, s.orelse = self.block(s.body), self.block(s.orelse)
            self.splits += 1
            return pre + [_tag(s, HOST)]
        self.note_eager(s, f"a {type(s).__name__} statement")
        return [_tag(s, HOST)]

    def cond(self, test: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """A condition for the host: tensor parts computed by the segment before it, syncs hoisted."""
        test = self.hoist(test, pre)
        if self.scope.python_expr(test) or self.scope.static(test):
            return test
        return self.to_name(test, pre)  # a tensor: the host calls bool() on it

    def assign(self, s: ast.Assign | ast.AugAssign) -> list[ast.stmt]:
        pre: list[ast.stmt] = []
        targets = s.targets if isinstance(s, ast.Assign) else [s.target]
        if (isinstance(s, ast.Assign) and len(targets) == 1 and isinstance(targets[0], ast.Name)
                and isinstance(s.value, ast.IfExp) and not self.scope.static(s.value.test)):
            v, t = s.value, targets[0]
            return self.stmt(ast.If(v.test, [ast.Assign([t], v.body, lineno=s.lineno)],
                                    [ast.Assign([ast.Name(t.id, ast.Store())], v.orelse, lineno=s.lineno)],
                                    lineno=s.lineno))
        if self.has_host_call(s.value) and any(isinstance(n, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                                                              ast.GeneratorExp)) for n in ast.walk(s.value)):
            self.note_eager(s, "a host sync inside a comprehension or lambda")
            return [_tag(s, HOST)]
        s.value = self.hoist(s.value, pre)
        if not all(_names_only(t) for t in targets):  # stores into subscripts/attributes: the host does them
            for t in targets:
                if isinstance(t, ast.Subscript):
                    t.slice = self.to_name(self.hoist(t.slice, pre), pre) if not isinstance(t.slice, ast.Slice) \
                        else t.slice
            s.value = self.to_name(s.value, pre)
            return pre + [_tag(s, HOST)]
        names = [n for t in targets for n in _stores(t)]
        value = s.value if isinstance(s, ast.Assign) else ast.BinOp(ast.Name(names[0], ast.Load()), s.op, s.value)
        return pre + [self.classify_assign(s, names, value)]

    # --------------------------------------------------------------------------------- grouping

    def group(self, stmts: list[ast.stmt]) -> list[ast.stmt | SegmentSpec]:
        out: list[ast.stmt | SegmentSpec] = []
        for s in stmts:
            if getattr(s, "_dycl", HOST) == SEG:
                if out and isinstance(out[-1], SegmentSpec):
                    out[-1].stmts.append(s)
                else:
                    out.append(SegmentSpec(len(self.segments), [s]))
                    self.segments.append(out[-1])
                continue
            for attr in ("body", "orelse"):
                if isinstance(s, (ast.If, ast.While, ast.For)) and getattr(s, "_dycl", HOST) == HOST:
                    setattr(s, attr, self.group(getattr(s, attr)))
            out.append(s)
        return out


def _seg_reads_writes(seg: SegmentSpec) -> tuple[list[str], set[str], set[str]]:
    """(names read before written, names written, names a compound statement may leave unwritten)."""
    reads: list[str] = []
    writes: set[str] = set()
    maybe: set[str] = set()
    for s in seg.stmts:
        if isinstance(s, (ast.Assign, ast.AugAssign)):
            loads = _loads(s.value) + (_stores(s.target) if isinstance(s, ast.AugAssign) else [])
            reads += [n for n in loads if n not in writes and n not in reads]
            writes.update(_stores(s))
        else:
            reads += [n for n in _loads(s) if n not in writes and n not in reads]
            st = set(_stores(s))
            maybe |= st - writes
            writes |= st
    return reads, writes, maybe


def rewrite(fn: Any, owner: Any, callees: DynamicCallees, static_names: set[str] | None = None,
            method: bool = True) -> Rewritten:
    """Rewrite `fn` (a method of `owner` when `method`) into a host program and segments."""
    src = parse_function(fn)
    params = [a.arg for a in src.tree.args.args]
    selfname = params[0] if method and params else None
    scope = Scope(owner, selfname, set(static_names or ()), set(static_names or ()))
    low = Lowerer(src, scope, callees)
    tree = src.tree
    body = low.group(low.block(list(tree.body)))
    all_params = {a.arg for a in tree.args.args + tree.args.kwonlyargs}
    for a in (tree.args.vararg, tree.args.kwarg):
        if a is not None:
            all_params.add(a.arg)

    # liveness: a segment returns what it writes and anything else reads (or it reads itself, in loops)
    infos = {seg.index: _seg_reads_writes(seg) for seg in low.segments}
    local = all_params | {n for node in ast.walk(tree) for n in _stores(node)} | {
        n for s in low.segments for st in s.stmts for n in _stores(st)}

    def host_loads(items: list) -> list[str]:
        names = []
        for it in items:
            if isinstance(it, SegmentSpec):
                continue
            if isinstance(it, (ast.If, ast.While, ast.For)) and getattr(it, "_dycl", HOST) == HOST:
                parts = [getattr(it, "test", None), getattr(it, "iter", None), getattr(it, "target", None)]
                names += [n for p in parts if p is not None for n in _loads(p)]
                names += host_loads(it.body) + host_loads(it.orelse)
            else:
                names += _loads(it)
        return names

    total: dict[str, int] = {}
    for n in host_loads(body) + [n for i in infos.values() for n in i[0]]:
        total[n] = total.get(n, 0) + 1
    for seg in low.segments:
        reads, writes, maybe = infos[seg.index]
        own = {n: reads.count(n) for n in set(reads)}
        reads = list(dict.fromkeys(n for n in reads if n != selfname))
        seg.inputs = [n for n in reads if n in local and n not in low.globals] + sorted(
            n for n in maybe if n in local and n not in reads and n in low.assigned and n not in low.globals)
        seg.outputs = sorted(n for n in writes if total.get(n, 0) - own.get(n, 0) > 0 or n in reads)
        lines = [st.lineno for st in seg.stmts if getattr(st, "lineno", 0)]
        first, last = (min(lines), max(ast.walk(seg.stmts[-1]), key=lambda n: getattr(n, "lineno", 0)).lineno) \
            if lines else (tree.lineno, tree.lineno)
        seg.where = f"{src.filename}:{first + src.first_line - 1}" + (
            f"-{last + src.first_line - 1}" if last > first else "")

    def emit(items: list) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for it in items:
            if isinstance(it, SegmentSpec):
                if not it.outputs:
                    continue  # nothing it computes is read: dead
                out.append(ast.Expr(ast.Constant(f"__dycl_comment__ segment {it.index}: {it.where}")))
                call = ast.Call(ast.Name(f"_seg{it.index}", ast.Load()),
                                [ast.Name(n, ast.Load()) for n in it.inputs], [])
                target = ast.Tuple([ast.Name(n, ast.Store()) for n in it.outputs], ast.Store())
                out.append(ast.Assign([target], call, lineno=0))
                continue
            if isinstance(it, (ast.If, ast.While, ast.For)) and getattr(it, "_dycl", HOST) == HOST:
                it.body = emit(it.body) or [ast.Pass()]
                it.orelse = emit(it.orelse)
            out.append(it)
        return out

    host = ast.FunctionDef(tree.name, tree.args, emit(body) or [ast.Pass()], [], None, lineno=1)
    if hasattr(ast.FunctionDef, "type_params") or "type_params" in ast.FunctionDef._fields:
        host.type_params = []
    return Rewritten(src, ast.fix_missing_locations(host), low.segments, low.callee_objs, low.eager, low.splits,
                     selfname)


def segment_function(rw: Rewritten, seg: SegmentSpec, selfname: str | None) -> ast.FunctionDef:
    """`def _segN(self, *inputs): <statements>; return (outputs,)`."""
    args = ([selfname] if selfname else []) + seg.inputs
    fdef = ast.FunctionDef(f"_seg{seg.index}", ast.arguments([], [ast.arg(a) for a in args], None, [], [], None, []),
                           [*seg.stmts, ast.Return(ast.Tuple([ast.Name(n, ast.Load()) for n in seg.outputs],
                                                             ast.Load()))], [], None, lineno=1)
    if "type_params" in ast.FunctionDef._fields:
        fdef.type_params = []
    return ast.fix_missing_locations(fdef)


def unparse(fdef: ast.FunctionDef) -> str:
    """Readable source; the segment markers become comments."""
    lines = []
    for line in ast.unparse(fdef).splitlines():
        stripped = line.strip().strip("'\"")
        if stripped.startswith("__dycl_comment__ "):
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(f"{indent}# {stripped[len('__dycl_comment__ '):]}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"
