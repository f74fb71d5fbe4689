"""Build a TVM module with its expression-level `Let`s stored in local scalars: a compile time linear in the
kernel's size instead of exponential in how deeply its transcendental functions nest.

The lowering binds every value used more than once with `tirx.Let` (fxcc.codegen.tvm_lower.let): exp, tanh,
sigmoid, erf and GELU each bind several. TVM's LLVM code generator binds each let variable in its arithmetic
analyzer, which simplifies the bound value with the values of the lets inside it inlined: the work doubles or
more with each nesting level although the LLVM IR it emits stays small. A GRU cell's gate kernel (a tanh over
sigmoids) took 0.6-0.8 s to build where one sigmoid takes 0.02 s; exp nested four deep took 2.1 s, five deep
91 s (`python benchmarks/tvm_build_time.py --plain-max 5`).

`build` runs TVM's own pipeline and, before code generation, rewrites each buffer store whose value holds
`Let`s: every binding becomes a store into its own one-element local buffer, in dependency order, and its
uses loads of it. The buffers are stack slots (annotated so TVM's builtin lowering does not make each a heap
workspace allocated per element); LLVM promotes them to registers, so the
code runs as fast and gives the same bits (tests/test_tvm_lets.py). A `Bind` statement would not do: the code
generator simplifies its value with the earlier bindings substituted, as exponential as the lets.

This runs after vectorization, so a binding is a whole vector and each vector lane keeps its own value. A
scalar `if_then_else` whose branches hold lets (a concatenation's last part computed in place) becomes an `if`
statement storing its result, each branch's lets inside its branch: moved out, a load there could read out of
bounds (TVM has by then made every `Select` whose branches load memory an `if_then_else`, so hoisting out of a
`Select` is safe). A vector `if_then_else` keeps its branches' lets. Only floating-point lets are stored (the
transcendental chains); integer and boolean ones stay as they are.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


def build(tvm: Any, mod: Any, target: Any) -> Any:
    """`tvm.compile(mod, target)` for a module of PrimFuncs on the CPU, with its lets stored (see the module
    docstring); the pass context in force applies to the pipeline as it does in `tvm.compile`."""
    tb = importlib.import_module("tvm.tirx.build")  # `tvm.tirx.build` the attribute is the function
    target = tvm.target.Target(target)
    target = target.with_host(target)
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    pipeline, host_passes, device_passes = tvm.tirx.get_default_tir_pipeline(target)
    mod = stored_lets(tvm, pipeline(mod))
    host, devices = tb.split_host_device_mods(mod)
    return tb.tir_to_runtime(host_passes()(host), {t: device_passes()(d) for t, d in devices.items()}, target)


def stored_lets(tvm: Any, mod: Any) -> Any:
    """`mod` with each buffer store's `Let`s stored in local buffers before the store."""
    import tvm_ffi
    from tvm.tirx import stmt as S
    return tvm_ffi.structural_mutate(mod, [(S.BufferStore, lambda store, _: _store(tvm, store))])


@functools.cache
def _kinds(tvm: Any) -> tuple[type, type, type, Any]:
    """The classes of TIR's Let, Call and Var expressions (not all exported by name) and the if_then_else op."""
    from tvm import tirx
    x = tirx.Var("x", "float32")
    return (type(tirx.Let(x, tirx.const(0.0, "float32"), x)), type(tirx.exp(x)), type(x),
            tvm.ir.Op.get("prim.if_then_else"))


@functools.cache
def _slot() -> tuple[list, dict]:
    """A one-element buffer's index, and the annotation that makes it a stack slot (LLVM promotes it to a
    register), not the heap workspace TVM's lowering gives a local buffer otherwise (one allocation per element)."""
    from tvm import tirx
    return [tirx.const(0, "int32")], {"disable_lower_builtin": tirx.const(1, "bool")}


def _store(tvm: Any, store: Any) -> Any:
    from tvm.tirx import stmt as S

    loads: list[tuple[Any, Any]] = []  # let variable -> the load of its buffer
    stmts, value = _flat(tvm, store.value, loads)
    if not stmts:
        return store
    return S.SeqStmt(stmts + [S.BufferStore(store.buffer, value, store.indices)])


def _flat(tvm: Any, expr: Any, loads: list[tuple[Any, Any]]) -> tuple[list, Any]:
    """The statements that store `expr`'s lets, in the order they are needed, and `expr` reading them. A scalar
    if_then_else whose branches hold lets becomes a statement-level if storing its result, each branch's lets
    inside it; a vector one keeps its branches' lets (its branches are both evaluated, lane by lane)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.tirx import stmt as S

    let_t, call_t, var_t, if_then_else = _kinds(tvm)
    zero, stack = _slot()
    stmts: list = []

    def local(like: Any, name: str) -> tuple[Any, Any]:
        buf = tirx.decl_buffer((1,), str(like.ty.dtype), name, scope="local")
        return buf, tirx.BufferLoad(buf, zero)

    def on_var(v: Any, _: Any) -> Any:
        return next((load for var, load in loads if var.same_as(v)), v)

    def on_let(let: Any, m: Any) -> Any:
        if not let.var.ty.dtype.is_float:  # integer and boolean lets stay (with whatever lets they hold)
            return tvm_ffi.structural_mutate(let, [(var_t, on_var)])
        if not any(var.same_as(let.var) for var, _ in loads):  # a subexpression shared twice binds once
            bound = m.mutate(let.value)  # its own lets first: they come before it
            buf, load = local(let.var, let.var.name)
            stmts.extend([S.AllocBuffer(buf, annotations=stack), S.BufferStore(buf, bound, zero)])
            loads.append((let.var, load))
        return m.mutate(let.body)

    def on_call(call: Any, m: Any) -> Any:
        if not call.op.same_as(if_then_else):
            return m.default_mutate(call)
        cond = m.mutate(call.args[0])
        if cond.ty.dtype.lanes != 1:  # lanes evaluated apart: its branches keep their lets (outer ones read)
            branches = [tvm_ffi.structural_mutate(b, [(var_t, on_var)]) for b in call.args[1:]]
            return _call_like(call, [cond, *branches])
        (then_s, then_v), (else_s, else_v) = (_flat(tvm, b, loads) for b in call.args[1:])
        if not then_s and not else_s:
            return _call_like(call, [cond, then_v, else_v])
        buf, load = local(call, "branch")
        stmts.extend([S.AllocBuffer(buf, annotations=stack),
                      S.IfThenElse(cond, _block(then_s + [S.BufferStore(buf, then_v, zero)]),
                                   _block(else_s + [S.BufferStore(buf, else_v, zero)]))])
        return load

    value = tvm_ffi.structural_mutate(expr, [(let_t, on_let), (call_t, on_call), (var_t, on_var)])
    return stmts, value


def _block(body: list) -> Any:
    from tvm.tirx import stmt as S
    return body[0] if len(body) == 1 else S.SeqStmt(body)  # TVM refuses a sequence of one


def _call_like(call: Any, args: list) -> Any:
    return type(call)(call.op, args, attrs=call.attrs, ty_args=call.ty_args, span=call.span, ret_ty=call.ty)
