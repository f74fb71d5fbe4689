"""DyCL program rewriting: a function's source -> a host program plus condition-free segments.

The contract is Python's semantics, exactly. Every statement ends up in one of two places:
- a *segment*: a maximal run of statements with no tensor-dependent decision, no host sync and no effect
  (assignments to local names; compound statements decided by shapes and constants), compiled as a
  function of the names it reads before writing them, returning the names it writes that anything else
  reads;
- the *host program*, plain Python: control flow on tensor values, syncs (`.item()`, `torch.equal`,
  `nonzero`), calls of functions that need host programs of their own (fxcc.dycl_analysis),
  mutations (in-place methods, `+=` on tensors, stores into attributes, containers and globals), returns.

Expressions that mix the two are split in Python's evaluation order: operands evaluated before a host
operation are computed into temporaries first, and `and`/`or`, conditional expressions, comparison chains
and comprehensions around one become host `if`s and loops, so what Python skips stays skipped. A compound
statement joins a segment only if every name it may read, or leave unwritten, is definitely assigned
before it: the host never reads a name eager would not have read. What cannot be kept exact (try, with
other than no_grad, a lambda or generator around a host operation, a call of a function defined inside)
runs in the host as written, reported with its file:line.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from fxcc.dycl_analysis import (
    Callees,
    RewriteError,
    Scope,
    Source,
    attr_root,
    bound_names,
    compiled_wrapper,
    decorated,
    free_loads,
    mutating_call,
    names_only,
    parse_function,
    resolve_call,
    sync_kind,
    target_function,
)

__all__ = ["Callees", "RewriteError", "Rewritten", "SegmentSpec", "rewrite", "segment_function", "unparse"]

SEG, HOST, VERBATIM = "seg", "host", "verbatim"  # a segment statement, lowered host code, host code as written
NO_GRAD = {("torch", ("no_grad",)), ("torch", ("inference_mode",)), ("torch", ("autograd", "no_grad"))}
UNLOWERABLE = {
    ast.Try: "exceptions used as control flow (try/except)",
    ast.With: "a with-block (its context manager may change what the body computes)",
}
if hasattr(ast, "TryStar"):
    UNLOWERABLE[ast.TryStar] = "exceptions used as control flow (try/except*)"
if hasattr(ast, "Match"):
    UNLOWERABLE[ast.Match] = "a match statement"
AS_WRITTEN = (ast.Raise, ast.Assert, ast.Delete, ast.Global, ast.Nonlocal, ast.Import, ast.ImportFrom)
SCOPES = (ast.Lambda, ast.GeneratorExp, ast.FunctionDef, ast.ClassDef)


class Unlowerable(Exception):
    """A statement the lowering cannot keep exact: it runs in the host as written."""


def _tag(stmt: ast.stmt, kind: str) -> ast.stmt:
    stmt._dycl = kind  # type: ignore[attr-defined]
    return stmt


def _kind(stmt: Any) -> str:
    return getattr(stmt, "_dycl", VERBATIM)


def _assign(name: str, value: ast.expr) -> ast.Assign:
    return ast.Assign([ast.Name(name, ast.Store())], value, lineno=getattr(value, "lineno", 0))


def _meet(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    """Definitely-assigned names where two paths join (None: a path that never gets there)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def definite_after(stmts: list[ast.stmt], d: set[str] | None) -> set[str] | None:
    """The names definitely assigned after `stmts` run, given those before (None: unreachable)."""
    for s in stmts:
        if d is None:
            return None
        if isinstance(s, (ast.Return, ast.Raise, ast.Break, ast.Continue)):
            return None
        if isinstance(s, ast.If):
            d = d | set(bound_names(s.test))
            d = _meet(definite_after(s.body, set(d)), definite_after(s.orelse, set(d)))
        elif isinstance(s, (ast.For, ast.While)):
            d = d | set(bound_names(getattr(s, "iter", None) or s.test))
        elif isinstance(s, ast.With):
            d = definite_after(s.body, d | {n for i in s.items for n in bound_names(i)})
        elif isinstance(s, ast.Delete):
            d = d - set(bound_names(s))
        elif not isinstance(s, tuple(UNLOWERABLE)):
            d = d | set(bound_names(s))
    return d


def _conditional_loads(e: ast.AST) -> list[str]:
    """Names an expression reads only on some paths: behind `and`/`or`, in a branch of `x if c else y`,
    in a comprehension's body or a lambda."""
    out: list[str] = []
    for node in ast.walk(e):
        if isinstance(node, ast.BoolOp):
            out += [n for v in node.values[1:] for n in free_loads(v)]
        elif isinstance(node, ast.IfExp):
            out += free_loads(node.body) + free_loads(node.orelse)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp, ast.Lambda)):
            first = free_loads(node.generators[0].iter) if not isinstance(node, ast.Lambda) else []
            out += [n for n in free_loads(node) if n not in first]
    return out


def _slots(e: ast.expr) -> list[tuple[Any, str, int | None]] | None:
    """The sub-expressions of `e` in Python's evaluation order, as (node, field, index)."""
    if isinstance(e, ast.BinOp):
        return [(e, "left", None), (e, "right", None)]
    if isinstance(e, ast.UnaryOp):
        return [(e, "operand", None)]
    if isinstance(e, ast.Call):
        return [(e, "func", None)] + [(e, "args", i) for i in range(len(e.args))] + [(k, "value", None)
                                                                                   for k in e.keywords]
    if isinstance(e, ast.Attribute):
        return [(e, "value", None)]
    if isinstance(e, ast.Subscript):
        return [(e, "value", None), (e, "slice", None)]
    if isinstance(e, ast.Slice):
        return [(e, f, None) for f in ("lower", "upper", "step") if getattr(e, f) is not None]
    if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
        return [(e, "elts", i) for i in range(len(e.elts))]
    if isinstance(e, ast.Dict):
        return [s for i, k in enumerate(e.keys) for s in ([(e, "keys", i)] if k is not None else []) + [(e, "values", i)]]
    if isinstance(e, ast.Compare) and len(e.ops) == 1:
        return [(e, "left", None), (e, "comparators", 0)]
    if isinstance(e, ast.Starred):
        return [(e, "value", None)]
    if isinstance(e, ast.JoinedStr):
        return [(v, "value", None) for v in e.values if isinstance(v, ast.FormattedValue)]
    return None


def _get(slot: tuple[Any, str, int | None]) -> ast.expr:
    node, name, i = slot
    v = getattr(node, name)
    return v if i is None else v[i]


def _put(slot: tuple[Any, str, int | None], value: ast.expr) -> None:
    node, name, i = slot
    if i is None:
        setattr(node, name, value)
    else:
        getattr(node, name)[i] = value


@dataclass
class SegmentSpec:
    """A maximal run of condition-free statements: compiled as `def segN(self, *inputs) -> outputs`."""

    index: int
    stmts: list[ast.stmt]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    where: str = ""
    name: str = ""


@dataclass
class Rewritten:
    """The host program's FunctionDef, its segments, and the callees that became programs of their own."""

    source: Source
    host: ast.FunctionDef
    segments: list[SegmentSpec]
    callees: dict[str, Any]  # name in the host program -> the module, method or function it calls
    dispatch: dict[str, list[Any]]  # name -> the candidates of a call chosen at run time
    eager: list[str]
    splits: int
    selfname: str | None


class Lowerer:
    """Rewrites one function: host operations out of expressions, host statements, segment statements."""

    def __init__(self, src: Source, scope: Scope, callees: Callees):
        self.src, self.scope, self.callees = src, scope, callees
        a = src.tree.args
        self.params = [x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None]
        self.declared = {n for node in ast.walk(src.tree) if isinstance(node, (ast.Global, ast.Nonlocal))
                         for n in node.names}
        self.user_locals = ({n for s in src.tree.body for n in bound_names(s)} | set(self.params)) - self.declared
        self.taken = {n.id for n in ast.walk(src.tree) if isinstance(n, ast.Name)} | set(self.params)
        self.ntmp = 0
        self.callee_names: dict[int, str] = {}
        self.callee_objs: dict[str, Any] = {}
        self.dispatch: dict[str, list[Any]] = {}
        self.eager: list[str] = []
        self.splits = 0
        self.segments: list[SegmentSpec] = []
        self.definite: set[str] | None = set(self.params)
        self.candidates: dict[str, list[Any]] = {}  # loop variables over module lists -> their elements
        self.local_callables: set[str] = set()  # functions and lambdas defined inside: called by the host
        self.as_is: dict[Any, str] = {}  # callees with control flow the host calls as they are -> first call site
        self.walrus = False

    # ---------------------------------------------------------------------------------- helpers

    def fresh(self, prefix: str) -> str:
        while True:
            self.ntmp += 1
            name = f"_{prefix}{self.ntmp}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def unique(self, name: str) -> str:
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    def define(self, names: list[str] | set[str]) -> None:
        if self.definite is not None:
            self.definite |= set(names)

    def note_eager(self, node: ast.AST, what: str) -> None:
        self.splits += 1
        self.eager.append(f"{what} at {self.src.where(node)} runs eagerly "
                          f"(`{ast.unparse(node).splitlines()[0][:80]}`)")

    def callee_name(self, obj: Any) -> str:
        if id(obj) not in self.callee_names:
            base = type(obj).__name__ if not hasattr(obj, "__func__") and not hasattr(obj, "__code__") else \
                getattr(obj, "__name__", "fn")
            name = self.unique(f"_prog_{base}_{len(self.callee_names)}")
            self.callee_names[id(obj)] = name
            self.callee_objs[name] = obj
        return self.callee_names[id(obj)]

    def program_call(self, call: ast.Call) -> tuple[str, Any] | None:
        """('program', obj), ('dispatch', candidates) or ('effect', obj) for a call the host must make."""
        objs = resolve_call(call, self.scope, self.src.fn, self.user_locals, self.candidates)
        if not objs:
            return None
        if isinstance(call.func, ast.Subscript) or (isinstance(call.func, ast.Name) and call.func.id in self.candidates):
            return ("dispatch", objs) if any(self.callees.needs_program(o) for o in objs) else None
        obj = objs[0]
        if compiled_wrapper(obj):
            return "effect", obj  # it dispatches to its own compiled variants, from the host
        if self.callees.needs_program(obj) and (_hooked(obj) or decorated(target_function(obj)[1])):
            self.as_is.setdefault(obj, self.src.where(call))
            return "effect", obj  # it runs as it is, from the host
        return ("program", obj) if self.callees.needs_program(obj) else None

    def host_op(self, node: ast.AST) -> str | None:
        """Why `node` itself (not its parts) must be evaluated by the host, or None."""
        scope = self.scope
        if isinstance(node, ast.Call):
            kind = sync_kind(node, scope)
            if kind:
                return kind
            target = self.program_call(node)
            if target is not None:
                return target[0]
            return "effect" if mutating_call(node) else None
        if isinstance(node, ast.BoolOp):
            return "truth" if any(not scope.pyval(v) for v in node.values[:-1]) else None
        if isinstance(node, ast.IfExp):
            return None if scope.pyval(node.test) else "truth"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return None if scope.pyval(node.operand) else "truth"
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if len(node.ops) > 1 and not all(scope.pyval(x) for x in operands[:-1]):
                return "truth"
            if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and not all(map(scope.pyval, operands)):
                return "truth"
            return None
        if isinstance(node, ast.comprehension):
            return None if all(scope.pyval(c) for c in node.ifs) else "truth"
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) \
                and node.attr in self.callees.stored_attrs:
            return "state"
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in self.local_callables:
                return "local"
            if node.id in self.callees.mutated_names and node.id not in self.user_locals:
                return "state"  # a global or closure object the program changes: read it now, pass it in
        if isinstance(node, ast.JoinedStr):
            fv = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
            return None if all(scope.pyval(v) for v in fv) else "format"
        return None

    def needs_host(self, e: ast.AST) -> bool:
        return any(self.host_op(n) for n in ast.walk(e))

    # ------------------------------------------------------------------------------ expressions

    def lower(self, e: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """An expression equal to `e` once `pre` has run, with every host operation moved into `pre`."""
        if not self.needs_host(e):
            return e
        if isinstance(e, ast.BoolOp):
            return self.lower_boolop(e, pre)
        if isinstance(e, ast.IfExp):
            return self.lower_ifexp(e, pre)
        kind = self.host_op(e)
        if isinstance(e, ast.Compare) and (len(e.ops) > 1 or kind):
            return self.lower_compare(e, pre)
        if isinstance(e, (ast.ListComp, ast.SetComp, ast.DictComp)):
            return self.lower_comprehension(e, pre)
        if isinstance(e, (ast.Lambda, ast.GeneratorExp)):
            raise Unlowerable("a lambda or generator expression around a host operation")
        if isinstance(e, ast.NamedExpr):
            v = self.lower(e.value, pre)
            pre.append(self.classify(_assign(e.target.id, v), [e.target.id], v))
            self.define([e.target.id])
            return ast.Name(e.target.id, ast.Load())
        if kind == "local":
            raise Unlowerable("a call of a function defined inside the function")
        if kind is not None:
            return self.lower_host(e, kind, pre)
        slots = _slots(e)
        if slots is None:
            raise Unlowerable(f"a {type(e).__name__} expression around a host operation")
        last = max(i for i, s in enumerate(slots) if self.needs_host(_get(s)))
        for i, s in enumerate(slots[: last + 1]):
            v = self.lower(_get(s), pre)
            keep = i == last or (s[1] == "func" and attr_root(v)[0] is not None)  # a method lookup
            _put(s, v if keep else self.freeze(v, pre))
        return e

    def freeze(self, e: ast.expr, pre: list[ast.stmt], host: bool = False) -> ast.expr:
        """A name for the value of `e`, computed now (a segment computes it unless `host`)."""
        if isinstance(e, ast.Constant) or (isinstance(e, ast.Name) and not self.walrus):
            return e
        if isinstance(e, ast.Starred):
            return ast.Starred(self.freeze(e.value, pre, host), ast.Load())
        if isinstance(e, ast.Slice) or (isinstance(e, ast.Tuple) and any(isinstance(x, ast.Slice) for x in e.elts)):
            # `a:b` is syntax only inside a subscript (`x[:, 0]`): its parts get names, in order, and it stays
            for s in _slots(e):
                _put(s, self.freeze(_get(s), pre, host))
            return e
        name = self.fresh("t")
        stmt = _assign(name, e)
        if host or any(isinstance(n, SCOPES) for n in ast.walk(e)):
            pre.append(_tag(stmt, HOST))
        else:
            pre.append(self.classify(stmt, [name], e))
        self.define([name])
        return ast.Name(name, ast.Load())

    def lower_host(self, e: ast.expr, kind: str, pre: list[ast.stmt]) -> ast.Name:
        """`e` evaluated by the host into a temporary; its operands are computed first, in order."""
        effect = kind in ("effect", "state")
        if isinstance(e, ast.Call):
            f = e.func
            if kind == "program":
                f = ast.Name(self.callee_name(self.program_call(e)[1]), ast.Load())
            elif kind == "dispatch":
                recv = self.freeze(self.lower(f, pre), pre, host=True)
                name = self.unique(f"_dispatch_{len(self.dispatch)}")
                self.dispatch[name] = self.program_call(e)[1]
                f, e.args = ast.Name(name, ast.Load()), [recv, *e.args]
            elif isinstance(f, ast.Attribute):
                if attr_root(f)[0] is None or (not effect and attr_root(f)[0] not in ("torch",)):
                    f.value = self.freeze(self.lower(f.value, pre), pre, host=effect)
            elif not isinstance(f, ast.Name):
                f = self.freeze(self.lower(f, pre), pre, host=True)
            e.func = f
            e.args = [self.freeze(self.lower(a, pre), pre) for a in e.args]
            for k in e.keywords:
                k.value = self.freeze(self.lower(k.value, pre), pre)
        elif isinstance(e, ast.Attribute):  # an attribute the program assigns: read it now
            if attr_root(e)[0] is None:
                e.value = self.freeze(self.lower(e.value, pre), pre, host=True)
        elif isinstance(e, ast.Name):
            pass
        elif isinstance(e, ast.UnaryOp):
            e.operand = self.freeze(self.lower(e.operand, pre), pre)
        elif isinstance(e, ast.JoinedStr):
            for s in _slots(e):
                _put(s, self.freeze(self.lower(_get(s), pre), pre))
        else:
            raise Unlowerable(f"a {type(e).__name__} expression around a host operation")
        name = self.fresh("s" if kind in ("scalar", "truth", "format") else "h")
        pre.append(_tag(_assign(name, e), HOST))
        self.splits += 1
        if kind in ("scalar", "format") or isinstance(e, ast.UnaryOp):
            self.scope.py_names.add(name)
        self.define([name])
        return ast.Name(name, ast.Load())

    def branch(self, pre: list[ast.stmt], test: ast.expr, lower_body: Any) -> list[ast.stmt]:
        """A host `if test:` appended to `pre`, its body built by `lower_body(body)`; returns the body."""
        body: list[ast.stmt] = []
        before = None if self.definite is None else set(self.definite)
        lower_body(body)
        self.definite = before
        pre.append(_tag(ast.If(test, body, [], lineno=0), HOST))
        self.splits += 1
        return body

    def lower_boolop(self, e: ast.BoolOp, pre: list[ast.stmt]) -> ast.Name:
        """`a and b` -> `r = a; if r: r = b` (`or`: `if not r`): b is evaluated only when Python would."""
        r = self.fresh("b")
        v = self.lower(e.values[0], pre)
        pre.append(self.classify(_assign(r, v), [r], v))
        self.define([r])
        cur = pre
        for value in e.values[1:]:
            test = ast.Name(r, ast.Load()) if isinstance(e.op, ast.And) else ast.UnaryOp(ast.Not(), ast.Name(r, ast.Load()))

            def body_of(body: list[ast.stmt], value: ast.expr = value) -> None:
                v = self.lower(value, body)
                body.append(self.classify(_assign(r, v), [r], v))
            cur = self.branch(cur, test, body_of)
        return ast.Name(r, ast.Load())

    def lower_ifexp(self, e: ast.IfExp, pre: list[ast.stmt]) -> ast.Name:
        """`a if c else b` -> a host `if` assigning one temporary: only the chosen side is evaluated."""
        test = self.cond(e.test, pre)
        r = self.fresh("r")
        parts = []
        for value in (e.body, e.orelse):
            body: list[ast.stmt] = []
            before = None if self.definite is None else set(self.definite)
            v = self.lower(value, body)
            body.append(self.classify(_assign(r, v), [r], v))
            self.definite = before
            parts.append(body)
        pre.append(_tag(ast.If(test, parts[0], parts[1], lineno=0), HOST))
        self.splits += 1
        self.define([r])
        return ast.Name(r, ast.Load())

    def lower_compare(self, e: ast.Compare, pre: list[ast.stmt]) -> ast.Name:
        """`a < b < c` -> `r = a < b; if r: r = b < c` with b evaluated once; `x in y` on tensors: host."""
        r = self.fresh("c")
        left = self.freeze(self.lower(e.left, pre), pre)
        cur = pre
        ops = list(zip(e.ops, e.comparators))
        for i, (op, comp) in enumerate(ops):
            last = i == len(ops) - 1
            c = self.lower(comp, cur)
            if not last or isinstance(op, (ast.In, ast.NotIn)):
                c = self.freeze(c, cur)
            value = ast.Compare(left, [op], [c])
            truth = isinstance(op, (ast.In, ast.NotIn)) and not (self.scope.pyval(left) and self.scope.pyval(c))
            cur.append(_tag(_assign(r, value), HOST) if truth else self.classify(_assign(r, value), [r], value))
            self.define([r])
            if not last:
                body: list[ast.stmt] = []
                cur.append(_tag(ast.If(ast.Name(r, ast.Load()), body, [], lineno=0), HOST))
                self.splits += 1
                cur = body
            left = c
        return ast.Name(r, ast.Load())

    def lower_comprehension(self, e: ast.ListComp | ast.SetComp | ast.DictComp, pre: list[ast.stmt]) -> ast.Name:
        """A comprehension around a host operation -> host loops appending to a temporary, its loop
        variables renamed to fresh locals (they stay invisible to the function, as in Python)."""
        gens = e.generators
        inner = [g.iter for g in gens[1:]] + [c for g in gens for c in g.ifs] + \
                ([e.key, e.value] if isinstance(e, ast.DictComp) else [e.elt])
        if any(g.is_async for g in gens) or any(isinstance(n, (*SCOPES, ast.ListComp, ast.SetComp, ast.DictComp))
                                                for part in inner for n in ast.walk(part)):
            raise Unlowerable("a comprehension with a nested scope around a host operation")
        rename = {n: self.fresh(f"v_{n}") for g in gens for n in bound_names(g.target)}

        def renamed(node: ast.AST) -> Any:
            node = copy.deepcopy(node)
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id in rename:
                    n.id = rename[n.id]
            return node

        it = self.loop_iterable(self.lower(gens[0].iter, pre), pre)
        r = self.fresh("l")
        empty = {ast.ListComp: ast.List([], ast.Load()), ast.DictComp: ast.Dict([], []),
                 ast.SetComp: ast.Set([ast.Starred(ast.Tuple([], ast.Load()), ast.Load())])}[type(e)]
        pre.append(_tag(_assign(r, empty), HOST))
        self.define([r])
        before = None if self.definite is None else set(self.definite)

        def loop(i: int, out: list[ast.stmt], iterable: ast.expr) -> None:
            g = gens[i]
            target = renamed(g.target)
            self.define(bound_names(target))
            body: list[ast.stmt] = []
            cur = body
            for c in g.ifs:
                test = self.cond(renamed(c), cur)
                nxt: list[ast.stmt] = []
                cur.append(_tag(ast.If(test, nxt, [], lineno=0), HOST))
                cur = nxt
            if i + 1 < len(gens):
                loop(i + 1, cur, self.loop_iterable(self.lower(renamed(gens[i + 1].iter), cur), cur))
            elif isinstance(e, ast.DictComp):
                k = self.freeze(self.lower(renamed(e.key), cur), cur)
                v = self.freeze(self.lower(renamed(e.value), cur), cur)
                cur.append(_tag(ast.Assign([ast.Subscript(ast.Name(r, ast.Load()), k, ast.Store())], v, lineno=0),
                                HOST))
            else:
                v = self.freeze(self.lower(renamed(e.elt), cur), cur)
                method = "append" if isinstance(e, ast.ListComp) else "add"
                cur.append(_tag(ast.Expr(ast.Call(ast.Attribute(ast.Name(r, ast.Load()), method, ast.Load()), [v],
                                                  [])), HOST))
            out.append(_tag(ast.For(target, iterable, body, [], lineno=0), HOST))
            self.splits += 1

        loop(0, pre, it)
        self.definite = before
        return ast.Name(r, ast.Load())

    def cond(self, test: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """A condition for the host: tensor parts computed by the segment before it, syncs hoisted."""
        t = self.lower(test, pre)
        return t if self.scope.pyval(t) else self.freeze(t, pre)

    def classify(self, stmt: ast.Assign, targets: list[str], value: ast.expr) -> ast.stmt:
        """A segment statement, or a host one for Python bookkeeping, aliases and unsafe reads."""
        py = self.scope.py_names
        if set(targets) & self.declared or any(isinstance(n, SCOPES) for n in ast.walk(value)):
            py.difference_update(targets)
            return _tag(stmt, HOST)
        if isinstance(value, ast.Name):
            (py.update if value.id in py else py.difference_update)(targets)
            return _tag(stmt, HOST)  # an alias: nothing to compute
        if self.scope.python_expr(value):
            py.update(targets)
            return _tag(stmt, HOST)
        py.difference_update(targets)
        unbound = set(_conditional_loads(value)) & self.user_locals - (self.definite or set())
        return _tag(stmt, HOST if unbound else SEG)

    # ------------------------------------------------------------------------------- statements

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            if self.definite is None:  # unreachable: kept as written, it never runs
                out.append(_tag(s, VERBATIM))
                continue
            out += self.stmt(s)
        return out

    def stmt(self, s: ast.stmt) -> list[ast.stmt]:
        original = copy.deepcopy(s)
        saved = (None if self.definite is None else set(self.definite), set(self.scope.py_names),
                 dict(self.candidates))
        self.walrus = any(isinstance(n, ast.NamedExpr) for n in ast.walk(s))
        try:
            return self.lower_stmt(s)
        except Unlowerable as e:
            self.definite, self.scope.py_names, self.candidates = saved
            return [self.as_written(original, str(e))]

    def as_written(self, s: ast.stmt, why: str | None = None) -> ast.stmt:
        """`s` in the host exactly as written (eagerly); `why` is reported when it holds tensor work."""
        if why:
            self.note_eager(s, why)
        self.definite = definite_after([s], self.definite)
        names = bound_names(s)
        self.scope.py_names.difference_update(names)
        if isinstance(s, (ast.FunctionDef, ast.ClassDef)) or (isinstance(s, ast.Assign) and isinstance(
                s.value, (ast.Lambda, ast.GeneratorExp))):
            self.local_callables.update(names)
        return _tag(s, VERBATIM)

    def lower_stmt(self, s: ast.stmt) -> list[ast.stmt]:
        pre: list[ast.stmt] = []
        if isinstance(s, tuple(UNLOWERABLE)) and not (isinstance(s, ast.With) and self.no_grad(s)):
            raise Unlowerable(UNLOWERABLE[type(s)])
        if isinstance(s, (*AS_WRITTEN, ast.FunctionDef, ast.ClassDef)):
            return [self.as_written(s)]
        if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            return []
        if isinstance(s, ast.Expr):
            v = self.lower(s.value, pre)
            if v is not s.value and isinstance(v, ast.Name):
                return pre  # the statement was the host operation itself
            s.value = v
            self.define(bound_names(s))
            return pre + [_tag(s, HOST)]
        if isinstance(s, ast.AnnAssign):
            if s.value is None:
                return []
            s = ast.Assign([s.target], s.value, lineno=s.lineno)
        if isinstance(s, ast.Assign):
            return self.assign(s, pre)
        if isinstance(s, ast.AugAssign):
            return self.augassign(s, pre)
        if isinstance(s, ast.Return):
            if isinstance(s.value, ast.Name) and s.value.id in self.local_callables:
                pass  # a function defined inside, returned (transformers' `and_masks`): the host returns it
            elif s.value is not None:
                v = self.lower(s.value, pre)
                if isinstance(v, ast.Tuple) and not any(isinstance(x, ast.Starred) for x in v.elts):
                    v.elts = [self.freeze(x, pre) for x in v.elts]
                else:
                    v = self.freeze(v, pre)
                s.value = v
            self.splits += 1
            self.definite = None
            return pre + [_tag(s, HOST)]
        if isinstance(s, (ast.Break, ast.Continue)):
            self.splits += 1
            self.definite = None
            return [_tag(s, HOST)]
        if isinstance(s, ast.If):
            return self.lower_if(s, pre)
        if isinstance(s, ast.While):
            return self.lower_while(s)
        if isinstance(s, ast.For):
            return self.lower_for(s, pre)
        if isinstance(s, ast.With):
            s.body = self.block(s.body)
            return [_tag(s, HOST)]
        raise Unlowerable(f"a {type(s).__name__} statement")

    def no_grad(self, s: ast.With) -> bool:
        """`with torch.no_grad():` (or inference_mode): compiled code runs that way anyway."""
        for item in s.items:
            c = item.context_expr
            if item.optional_vars is not None or not isinstance(c, ast.Call) or c.args or c.keywords:
                return False
            root, path = attr_root(c.func)
            if (root, tuple(path)) not in NO_GRAD:
                return False
        return True

    def assign(self, s: ast.Assign, pre: list[ast.stmt]) -> list[ast.stmt]:
        names = [n for t in s.targets for n in bound_names(t)]
        if all(names_only(t) for t in s.targets) and not set(names) & self.declared:
            if isinstance(s.value, (ast.Lambda, ast.GeneratorExp)):
                return [self.as_written(s)]
            for n in names:  # `layer = self.layers[i]`: a later `layer(h)` may reach any of them
                self.candidates.pop(n, None)
            objs = self.elements(s.value.value if isinstance(s.value, ast.Subscript) else None)
            if objs and len(names) == 1:
                self.candidates[names[0]] = objs
            s.value = self.lower(s.value, pre)
            out = pre + [self.classify(s, names, s.value)]
            self.define(names)
            return out
        # stores into attributes, subscripts or globals: the host does them, in Python's order (value first)
        s.value = self.freeze(self.lower(s.value, pre), pre)
        for t in s.targets:
            self.lower_target(t, pre)
        self.scope.py_names.difference_update(names)
        self.define(names)
        self.splits += 1
        return pre + [_tag(s, HOST)]

    def augassign(self, s: ast.AugAssign, pre: list[ast.stmt]) -> list[ast.stmt]:
        """`x += v` is in place on tensors: the host applies it to the object eager would change."""
        t = s.target
        if isinstance(t, ast.Name) and t.id not in self.declared:
            v = self.lower(s.value, pre)
            if t.id in self.scope.py_names and self.scope.pyval(v):
                s.value = v
                return pre + [_tag(s, HOST)]  # a Python counter
            s.value = self.freeze(v, pre)
            self.scope.py_names.discard(t.id)
        else:
            self.lower_target(t, pre)
            s.value = self.freeze(self.lower(s.value, pre), pre)
        self.splits += 1
        return pre + [_tag(s, HOST)]

    def lower_target(self, t: ast.expr, pre: list[ast.stmt]) -> None:
        """Evaluate the parts of an assignment target (the object, the index) into names, in order."""
        if isinstance(t, (ast.Tuple, ast.List)):
            for x in t.elts:
                self.lower_target(x, pre)
        elif isinstance(t, ast.Starred):
            self.lower_target(t.value, pre)
        elif isinstance(t, (ast.Attribute, ast.Subscript)):
            if attr_root(t.value)[0] is None or self.needs_host(t.value):
                t.value = self.freeze(self.lower(t.value, pre), pre, host=True)
            if isinstance(t, ast.Subscript):
                if isinstance(t.slice, ast.Slice):
                    for s in _slots(t.slice):
                        _put(s, self.freeze(self.lower(_get(s), pre), pre))
                else:
                    t.slice = self.freeze(self.lower(t.slice, pre), pre)

    def pure(self, s: ast.stmt) -> bool:
        """A compound statement a segment can hold as is: decided by shapes and constants, no host operation
        inside, and every name it may read or leave unwritten definitely assigned before it."""
        for node in ast.walk(s):
            if isinstance(node, (ast.Return, ast.Break, ast.Continue, ast.Expr, *AS_WRITTEN, *SCOPES,
                                 *UNLOWERABLE)):
                return False
            if isinstance(node, (ast.If, ast.While)) and not self.scope.static(node.test):
                return False
            if isinstance(node, ast.For) and not (self.scope.static(node.iter) and names_only(node.target)):
                return False
            if isinstance(node, ast.AugAssign) and not (isinstance(node.target, ast.Name)
                                                        and node.target.id in self.scope.py_names):
                return False
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if not all(names_only(t) for t in targets) or set(bound_names(node)) & self.declared \
                        or node.value is None:
                    return False
            if isinstance(node, (ast.expr, ast.comprehension)) and self.host_op(node):
                return False
        ue, dw, mw = seg_flow([s])
        return ((set(ue) | (mw - dw)) & self.user_locals) <= (self.definite or set())

    def lower_if(self, s: ast.If, pre: list[ast.stmt]) -> list[ast.stmt]:
        if self.scope.static(s.test) and self.pure(s):
            self.definite = definite_after([s], self.definite)
            return [_tag(s, SEG)]
        s.test = self.cond(s.test, pre)
        before = None if self.definite is None else set(self.definite)
        s.body = self.block(s.body)
        after_body, self.definite = self.definite, before
        s.orelse = self.block(s.orelse)
        self.definite = _meet(after_body, self.definite)
        self.splits += 1
        return pre + [_tag(s, HOST)]

    def lower_while(self, s: ast.While) -> list[ast.stmt]:
        if self.scope.static(s.test) and self.pure(s):
            self.definite = definite_after([s], self.definite)
            return [_tag(s, SEG)]
        self.splits += 1
        before = None if self.definite is None else set(self.definite)
        test_pre: list[ast.stmt] = []
        test = self.cond(s.test, test_pre)
        body = self.block(s.body)
        self.definite = before
        if not test_pre:
            s.test, s.body, s.orelse = test, body, self.block(s.orelse)
            self.definite = before
            return [_tag(s, HOST)]
        # `while True:` computing the test each round; `else` runs when the test fails, not after a break
        out: list[ast.stmt] = []
        stop: list[ast.stmt] = [_tag(ast.Break(), HOST)]
        if s.orelse:
            flag = self.fresh("w")
            out.append(_tag(_assign(flag, ast.Constant(False)), HOST))
            stop.insert(0, _tag(_assign(flag, ast.Constant(True)), HOST))
        check = _tag(ast.If(ast.UnaryOp(ast.Not(), test), stop, [], lineno=s.lineno), HOST)
        out.append(_tag(ast.While(ast.Constant(True), test_pre + [check] + body, [], lineno=s.lineno), HOST))
        if s.orelse:
            out.append(_tag(ast.If(ast.Name(flag, ast.Load()), self.block(s.orelse), [], lineno=s.lineno), HOST))
        self.definite = before
        return out

    def loop_iterable(self, it: ast.expr, pre: list[ast.stmt]) -> ast.expr:
        """The iterable of a host loop. `zip(...)`, `enumerate(...)` and `reversed(...)` stay host calls over
        arguments a segment computes: the iterator they make is no value a captured segment can return."""
        if self.scope.pyval(it):
            return it
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("zip", "enumerate", "reversed") \
                and it.func.id not in self.user_locals and getattr(self.scope.fn, "__globals__", {}).get(it.func.id) is None:
            it.args = [self.freeze(a, pre) for a in it.args]
            for k in it.keywords:
                k.value = self.freeze(k.value, pre)
            return it
        return self.freeze(it, pre)

    def lower_for(self, s: ast.For, pre: list[ast.stmt]) -> list[ast.stmt]:
        saved = dict(self.candidates)
        self.candidates.update(self.loop_candidates(s))
        try:
            if self.scope.static(s.iter) and self.pure(s):
                self.definite = definite_after([s], self.definite)
                return [_tag(s, SEG)]
            it = s.iter
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("range", "enumerate"):
                first = s.target.elts[0] if it.func.id == "enumerate" and isinstance(s.target, ast.Tuple) else \
                    s.target if it.func.id == "range" else None
                if first is not None:
                    self.scope.py_names.update(bound_names(first))
            s.iter = self.loop_iterable(self.lower(it, pre), pre)
            self.lower_target(s.target, pre) if not names_only(s.target) else None
            before = None if self.definite is None else set(self.definite)
            self.define(bound_names(s.target))
            s.body = self.block(s.body)
            self.definite = before
            s.orelse = self.block(s.orelse)
            self.definite = before
            self.splits += 1
            return pre + [_tag(s, HOST)]
        finally:
            self.candidates = saved

    def elements(self, e: ast.expr | None) -> list[Any] | None:
        """The callables in the list of modules `e` names (`self.blocks`), or None."""
        root = attr_root(e)[0] if e is not None else None
        if root is None or (root in self.user_locals and root != self.scope.selfname):
            return None
        ok, obj = self.scope.resolve(e)
        if ok and isinstance(obj, (list, tuple, nn.ModuleList, nn.Sequential)):
            return [m for m in obj if callable(m)]
        return None

    def loop_candidates(self, s: ast.For) -> dict[str, list[Any]]:
        """Loop variables over lists of modules (`for blk in self.blocks`, zip, enumerate): their elements."""
        it, target = s.iter, s.target
        pairs: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and not it.keywords:
            if it.func.id == "zip" and isinstance(target, ast.Tuple) and len(target.elts) == len(it.args):
                pairs = list(zip(target.elts, it.args))
            elif it.func.id == "enumerate" and isinstance(target, ast.Tuple) and len(target.elts) == 2 and it.args:
                pairs = [(target.elts[1], it.args[0])]
            elif it.func.id == "reversed" and len(it.args) == 1:
                pairs = [(target, it.args[0])]
        else:
            pairs = [(target, it)]
        out = {}
        for t, e in pairs:
            objs = self.elements(e) if isinstance(t, ast.Name) else None
            if objs and t.id not in {n for b in s.body for n in bound_names(b)}:
                out[t.id] = objs
        return out

    # --------------------------------------------------------------------------------- grouping

    def group(self, stmts: list[ast.stmt]) -> list[ast.stmt | SegmentSpec]:
        out: list[ast.stmt | SegmentSpec] = []
        for s in stmts:
            if _kind(s) == SEG:
                if out and isinstance(out[-1], SegmentSpec):
                    out[-1].stmts.append(s)
                else:
                    out.append(SegmentSpec(len(self.segments), [s]))
                    self.segments.append(out[-1])
                continue
            if _kind(s) == HOST and isinstance(s, (ast.If, ast.While, ast.For, ast.With)):
                s.body = self.group(s.body)
                if not isinstance(s, ast.With):
                    s.orelse = self.group(s.orelse)
            out.append(s)
        return out


def _hooked(obj: Any) -> bool:
    """A module with forward hooks: calling it is more than its forward, so the host calls it as it is."""
    return bool(getattr(obj, "_forward_hooks", None) or getattr(obj, "_forward_pre_hooks", None))


def seg_flow(stmts: list[ast.stmt]) -> tuple[list[str], set[str], set[str]]:
    """(names read before written, in order; names definitely written; names possibly written)."""
    ue: list[str] = []
    dw: set[str] = set()
    mw: set[str] = set()

    def use(names: list[str]) -> None:
        ue.extend(n for n in names if n not in dw and n not in ue)

    for s in stmts:
        if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            use(free_loads(s.value) + ([s.target.id] if isinstance(s, ast.AugAssign) else []))
            w = set(bound_names(s))
            dw |= w
            mw |= w
        elif isinstance(s, ast.If):
            use(free_loads(s.test))
            (u1, d1, m1), (u2, d2, m2) = seg_flow(s.body), seg_flow(s.orelse)
            use(u1 + u2)
            dw |= d1 & d2
            mw |= m1 | m2 | set(bound_names(s.test))
        elif isinstance(s, ast.For):
            use(free_loads(s.iter))
            t = set(bound_names(s.target))
            (u1, _, m1), (u2, _, m2) = seg_flow(s.body), seg_flow(s.orelse)
            use([n for n in u1 if n not in t] + u2)
            mw |= m1 | m2 | t
        elif isinstance(s, ast.While):
            (u1, _, m1), (u2, _, m2) = seg_flow(s.body), seg_flow(s.orelse)
            use(free_loads(s.test) + u1 + u2)
            mw |= m1 | m2
    return ue, dw, mw


def _host_parts(items: list) -> list[ast.AST]:
    """The host program's own code, segments excluded: the heads of its lowered compound statements (test,
    iterable, target, context managers; their bodies are walked in turn) and every other statement."""
    parts: list[ast.AST] = []
    for it in items:
        if isinstance(it, SegmentSpec):
            continue
        if _kind(it) == HOST and isinstance(it, (ast.If, ast.While, ast.For, ast.With)):
            parts += [h for h in (getattr(it, "test", None), getattr(it, "iter", None), getattr(it, "target", None),
                                  *getattr(it, "items", [])) if h is not None]
            parts += _host_parts(it.body) + _host_parts(getattr(it, "orelse", []))
        else:
            parts.append(it)
    return parts


def _reads(node: ast.AST) -> list[str]:
    """Names `node` reads, deletes or updates in place (`x += 1` reads x)."""
    return (free_loads(node) + [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Del)]
            + [n.target.id for n in ast.walk(node) if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)])


def rewrite(fn: Any, owner: Any, callees: Callees, static_names: set[str] | None = None,
            method: bool = True) -> Rewritten:
    """Rewrite `fn` (a method of `owner` when `method`) into a host program and segments."""
    src = parse_function(fn)
    callees.function(src.fn, owner, method)  # reads fn and all it calls: the attributes the program stores
    params = [a.arg for a in src.tree.args.posonlyargs + src.tree.args.args]
    selfname = params[0] if method and params else None
    scope = Scope(owner, selfname, set(static_names or ()), set(static_names or ()), src.fn)
    low = Lowerer(src, scope, callees)
    body = low.group(low.block(list(src.tree.body)))
    for seg in low.segments:
        seg.name = low.unique(f"_seg{seg.index}")
    for obj, where in low.as_is.items():
        callee_owner, callee_fn, _ = target_function(obj)
        why = decorated(callee_fn) or f"{type(callee_owner).__name__} has forward hooks"
        low.eager.append(f"{why}: the call at {where} runs eagerly")

    flows = {seg.index: seg_flow(seg.stmts) for seg in low.segments}
    host = _host_parts(body)
    local = (low.user_locals | {n for s in low.segments for st in s.stmts for n in bound_names(st)}
             | {n for part in host for n in bound_names(part)}) - low.declared
    read = {n for part in host for n in _reads(part)} | {n for ue, _, _ in flows.values() for n in ue}
    for seg in low.segments:
        ue, dw, mw = flows[seg.index]
        seg.outputs = sorted(n for n in mw if n in read and n in local)
        passed = [n for n in seg.outputs if n not in dw and n not in ue]  # possibly unwritten: keep the old value
        seg.inputs = [n for n in ue if n in local and n != selfname] + passed
        lines = [getattr(n, "lineno", 0) for st in seg.stmts for n in ast.walk(st) if getattr(n, "lineno", 0)]
        first, last = (min(lines), max(lines)) if lines else (src.tree.lineno, src.tree.lineno)
        seg.where = f"{src.filename}:{first + src.first_line - 1}" + (
            f"-{last + src.first_line - 1}" if last > first else "")

    def emit(items: list) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for it in items:
            if isinstance(it, SegmentSpec):
                if not it.outputs:
                    continue  # nothing it computes is read, and segments have no effects: dead
                out.append(ast.Expr(ast.Constant(f"__dycl_comment__ segment {it.index}: {it.where}")))
                call = ast.Call(ast.Name(it.name, ast.Load()), [ast.Name(n, ast.Load()) for n in it.inputs], [])
                target = ast.Tuple([ast.Name(n, ast.Store()) for n in it.outputs], ast.Store())
                out.append(ast.Assign([target], call, lineno=0))
                continue
            if _kind(it) == HOST and isinstance(it, (ast.If, ast.While, ast.For, ast.With)):
                it.body = emit(it.body) or [ast.Pass()]
                if not isinstance(it, ast.With):
                    it.orelse = emit(it.orelse)
            out.append(it)
        return out

    args = copy.deepcopy(src.tree.args)  # defaults and annotations: the original function's own objects
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    args.defaults, args.kw_defaults = [], [None] * len(args.kwonlyargs)
    fdef = ast.FunctionDef(src.tree.name, args, emit(body) or [ast.Pass()], [], None, lineno=1)
    if "type_params" in ast.FunctionDef._fields:
        fdef.type_params = []
    return Rewritten(src, ast.fix_missing_locations(fdef), low.segments, low.callee_objs, low.dispatch, low.eager,
                     low.splits, selfname)


def segment_function(seg: SegmentSpec, selfname: str | None) -> ast.FunctionDef:
    """`def _segN(self, *inputs): <statements>; return (outputs,)`."""
    args = ([selfname] if selfname else []) + seg.inputs
    fdef = ast.FunctionDef(seg.name, ast.arguments([], [ast.arg(a) for a in args], None, [], [], None, []),
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
