"""A TVM kernel's expression lets are stored in local buffers before code generation (fxcc.codegen.tvm_lets):
the same outputs, bit for bit, and no chain of let bindings left for LLVM code generation's analyzer, whose
work grew exponentially with the nesting of transcendental functions (exp five deep took 91 s to build)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from fxcc.codegen import tvm_lets  # noqa: E402
from fxcc.codegen import tvm_lower as tl  # noqa: E402
from fxcc.codegen.tvm import host_target  # noqa: E402


def nested_exp(depth: int, vectorize: bool, guard: bool = False):
    """B[i] = (exp(... exp(A[i]) ...) * 0.3) `depth` deep; with `guard`, only for i < 1000 (else 0), through an
    if_then_else whose branch loads A."""
    from tvm import te, tirx

    a = te.placeholder((1024,), "float32", name="A")

    def f(i):
        x = a[i] + tirx.const(0.0, "float32")
        for _ in range(depth):
            x = tl.fast_exp(x) * tirx.const(0.3, "float32")
        return tirx.if_then_else(i < 1000, x, tirx.const(0.0, "float32")) if guard else x
    b = te.compute((1024,), f, name="B")
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([a, b])}))
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    _, inner = sch.split(loop, [None, 8])
    if vectorize:
        sch.vectorize(inner)
    return sch.mod


def run(lib) -> np.ndarray:
    x = np.random.RandomState(0).randn(1024).astype("float32") * 0.1
    out = tvm.runtime.tensor(np.zeros(1024, "float32"), tvm.cpu())
    lib["main"](tvm.runtime.tensor(x, tvm.cpu()), out)
    return out.numpy()


def lets_in_stores(mod) -> int:
    """Let expressions in buffer stores, outside the guarded branches of if_then_else."""
    import tvm_ffi
    from tvm.tirx import stmt as S
    let_t, call_t, _, if_then_else = tvm_lets._kinds(tvm)
    count = []

    def on_let(let, m):
        count.append(1)
        return m.default_mutate(let)

    def on_call(call, m):
        if call.op.same_as(if_then_else):
            m.mutate(call.args[0])
            return call
        return m.default_mutate(call)

    def on_store(store, m):
        tvm_ffi.structural_mutate(store.value, [(let_t, on_let), (call_t, on_call)])
        return store
    tvm_ffi.structural_mutate(mod, [(S.BufferStore, on_store)])
    return len(count)


@pytest.mark.parametrize("vectorize", [False, True])
def test_stored_lets_give_the_same_bits_and_leave_no_let_chain(vectorize):
    mod = nested_exp(3, vectorize)
    target = tvm.target.Target(host_target())
    plain = run(tvm.compile(mod, target=target))
    stored = run(tvm_lets.build(tvm, mod, host_target()))
    np.testing.assert_array_equal(stored, plain)
    expected = np.random.RandomState(0).randn(1024).astype("float64") * 0.1
    for _ in range(3):
        expected = np.exp(expected) * 0.3
    np.testing.assert_allclose(stored, expected, rtol=1e-6)
    # what code generation would see: the pipeline's output, before and after storing the lets
    bound = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    lowered = tvm.tirx.get_default_tir_pipeline(target)[0](bound)
    assert lets_in_stores(lowered) > 10 and lets_in_stores(tvm_lets.stored_lets(tvm, lowered)) == 0
    # the buffers are stack slots, not a heap workspace allocated per element
    import importlib
    host, _ = importlib.import_module("tvm.tirx.build").split_host_device_mods(tvm_lets.stored_lets(tvm, lowered))
    finalized = tvm.tirx.get_default_tir_pipeline(target)[1]()(host).script()
    assert "TVMBackendAllocWorkspace" not in finalized and "t_2" in finalized


def test_deep_nesting_builds_and_is_right():
    """Six exps deep: about 0.03 s with the lets stored; bound with lets, minutes (five deep took 91 s)."""
    out = run(tvm_lets.build(tvm, nested_exp(6, True), host_target()))
    expected = np.random.RandomState(0).randn(1024).astype("float64") * 0.1
    for _ in range(6):
        expected = np.exp(expected) * 0.3
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_a_guarded_branch_stores_its_lets_inside_an_if():
    """if_then_else(i < 1000, exp(exp(A[i])) ..., 0): the branch's lets are stored under an `if` on the condition
    (never evaluated where the guard is false), and its result read from there."""
    mod = nested_exp(2, True, guard=True)
    target = tvm.target.Target(host_target())
    out = run(tvm_lets.build(tvm, mod, host_target()))
    np.testing.assert_array_equal(out, run(tvm.compile(mod, target=target)))
    assert (out[1000:] == 0).all() and (out[:1000] > 0).all()
    lowered = tvm.tirx.get_default_tir_pipeline(target)[0](tvm.tirx.transform.BindTarget(target.with_host(target))(mod))
    assert "T.if_then_else" in lowered.script() and lets_in_stores(lowered) == 0  # the lets sat in its branch
    stored = tvm_lets.stored_lets(tvm, lowered).script()
    assert "T.Let" not in stored and "if " in stored and "branch = " in stored
    body = stored[stored.index("if "):]
    assert body.index("if ") < body.index("T.floor")  # the branch's exp is computed under the `if`


def test_a_compiled_gru_cell_equals_eager():
    """The kernel whose build this was for: a GRU cell's gates (sigmoids under a tanh), through fxcc on TVM."""
    import fxcc
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(16, 16).eval()
    x, h = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(fxcc.compile(cell)(x, h), cell(x, h), rtol=1e-5, atol=1e-5)
