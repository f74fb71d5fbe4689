"""Compiled calls with inputs that change between calls as users' do (tests/call_probe.py), compared with eager,
and the bugs that probe found, each pinned by a test of its own."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn.functional as F
from call_probe import EXTERN, MODULES, SCENARIOS, run_one
from fxcc.codegen import reusable


def gelu_times(a, b):
    return F.gelu(a) * b + a.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", ["tvm", "auto"])
def test_zero_size_inputs_run_compiled_and_equal_eager(backend):
    """A batch of 0 rows: a TVM kernel's flat input buffer has 0 elements (not the extent of the other
    dimensions), and the candidate check at codegen feeds it one of 0 elements as the call does."""
    pytest.importorskip("tvm")
    f = fxcc.compile(gelu_times, passes=f"canonicalize,raise,fuse,codegen{{backend={backend}}}",
                     options=fxcc.CompileOptions(check_eager=False))
    for rows in (0, 3, 0):
        a, b = torch.randn(rows, 16), torch.randn(rows, 16)
        got = f(a, b)
        assert got.shape == (rows, 16)
        torch.testing.assert_close(got, gelu_times(a, b))


@pytest.mark.parametrize("backend", ["tvm", "extern"])
def test_an_output_whose_storage_the_caller_holds_is_not_written_by_a_later_call(backend):
    """Output buffers are reused once nothing holds them; the caller holding only the output's storage object
    (`y.untyped_storage()`, then dropping `y`) holds its memory too."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    c = fxcc.compile(m, passes=f"canonicalize,raise,fuse,codegen{{backend={backend}}}",
                     options=fxcc.CompileOptions(check_eager=False))
    xs = [torch.randn(4, 16) for _ in range(3)]
    c(xs[0])
    y = c(xs[1])
    kept = y.untyped_storage()
    del y
    c(xs[2])
    with torch.no_grad():
        want = m(xs[1])
    got = torch.empty(0).set_(kept, 0, (4, 16))
    torch.testing.assert_close(got, want)


def test_reusable_sees_every_holder_of_a_pooled_buffer():
    pool = [torch.randn(4)]
    assert reusable(pool, 0)  # held by the pool only: a kernel may write its next result into it
    view = pool[0][1:]
    assert not reusable(pool, 0)
    del view
    storage = pool[0].untyped_storage()
    assert not reusable(pool, 0)
    del storage
    assert reusable(pool, 0)


@pytest.mark.parametrize("module", list(MODULES))
def test_every_call_of_every_scenario_equals_eager(module):
    """The probe's fast subset: extern kernels, each scenario's calls, inputs afterwards and held outputs."""
    for scenario in SCENARIOS:
        o = run_one(module, scenario, EXTERN)
        assert not o.problem, f"{module} / {scenario}: {o.problem}"
        assert o.eager_calls == 0 and not any("differs" in w for w in o.warnings), (module, scenario, o.warnings)


@pytest.mark.parametrize("module", ["mlp", "two_inputs"])
def test_generated_kernels_on_the_scenarios_that_found_bugs(module):
    """TVM kernels (their flat buffers, their pooled outputs) on batches down to 0 and outputs kept as storage."""
    pytest.importorskip("tvm")
    for scenario in ("batches", "interop", "strided", "feedback"):
        o = run_one(module, scenario, "canonicalize,raise,fuse,codegen{backend=tvm}")
        assert not o.problem, f"{module} / {scenario}: {o.problem}"
        assert not any("differs" in w for w in o.warnings), (module, scenario, o.warnings)
