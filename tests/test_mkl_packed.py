"""MKL packed-weight GEMMs (fxcc.codegen.mkl) and the guard's fast path for plain tensor arguments."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc.codegen import extern, mkl
from fxcc.dialects import KERNEL_OPS, kernel_body

needs_mkl = pytest.mark.skipif(not mkl.available(), reason="torch built without MKL packed linear ops")


def gemm_kernel(cm):
    gm = cm.variants[-1].gm
    nodes = (n for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
    keys = dict.fromkeys(n.args[1] for n in nodes)
    return next(kernel_body(k) for k in keys if kernel_body(k).kind == "gemm")


@needs_mkl
def test_one_packed_copy_serves_every_row_count_and_follows_in_place_changes():
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    first = mkl.packed(w, 7)
    for rows in (1, 2, 7, 16, 33, 100):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(mkl.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mkl.linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)
    assert mkl.packed(w, 100) is first  # packed once, whatever the row count
    x3 = torch.randn(2, 3, 64)
    torch.testing.assert_close(mkl.linear(x3, w, b), F.linear(x3, w, b), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        w.mul_(-1)  # changed in place: packed again, the result follows
    assert mkl.packed(w, 4) is not first
    torch.testing.assert_close(mkl.linear(x3, w, b), F.linear(x3, w, b), atol=1e-4, rtol=1e-4)


def test_other_types_and_devices_take_the_library_call():
    w = torch.randn(8, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(mkl.linear(x, w), F.linear(x, w))
    assert id(w) not in mkl._PACKED
    assert mkl.linear(torch.randn(0, 4), torch.randn(8, 4)).shape == (0, 8)


@needs_mkl
def test_extern_offers_the_mkl_candidate_for_fp32_linears_and_codegen_measures_it():
    lin = nn.Linear(64, 128).eval()
    x = torch.randn(16, 64)
    cm = fxcc.compile(lin, passes="canonicalize,raise,fuse,codegen{backend=auto,reps=3}")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), lin(x), atol=1e-4, rtol=1e-4)
    kb = gemm_kernel(cm)
    labels = {c.backend for c in extern.candidates(kb, "cpu")}
    assert "mkl" in labels and "mkl" not in {c.backend for c in extern.candidates(kb, "cuda")}
    timings = cm.variants[-1].kernels[kb.key].timings_ms
    assert "mkl" in timings, timings  # built, checked and timed beside the others
    built = next(c for c in extern.candidates(kb, "cpu") if c.backend == "mkl").build({})
    torch.testing.assert_close(built.fn([x, lin.weight, lin.bias])[0], lin(x).detach(), atol=1e-4, rtol=1e-4)


def test_bf16_linears_get_no_mkl_candidate():
    lin = nn.Linear(16, 16).to(torch.bfloat16).eval()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    cm = fxcc.compile(lin, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), lin(x), atol=2e-2, rtol=2e-2)
    assert "mkl" not in {c.backend for c in extern.candidates(gemm_kernel(cm), "cpu")}


def test_plain_tensor_calls_take_the_fast_guard_and_still_see_shape_and_parameter_changes():
    lin = nn.Linear(8, 4).eval()
    cm = fxcc.compile(lin, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    with torch.no_grad():
        x = torch.randn(3, 8)
        torch.testing.assert_close(cm(x), lin(x))
        assert len(cm._fast) == 1 and cm.stats.compiles == 1
        torch.testing.assert_close(cm(x * 2), lin(x * 2))  # the fast path: no new compile
        assert cm.stats.compiles == 1
        y = torch.randn(5, 8)
        torch.testing.assert_close(cm(y), lin(y))  # another shape: another variant
        assert cm.stats.compiles == 2 and len(cm._fast) == 2
        lin.weight.mul_(2)  # parameters changed in place: read live (packed again), not served stale
        torch.testing.assert_close(cm(x), lin(x))
        lin.weight.data.mul_(2)  # through `.data`: no version bump, still seen
        torch.testing.assert_close(cm(x), lin(x))
        assert cm.stats.param_recompiles == 0 and cm.stats.compiles == 2
        torch.testing.assert_close(cm(x.double().float()), lin(x))
        p = nn.Parameter(torch.randn(3, 8), requires_grad=False)  # a tensor subclass takes the full guard
        torch.testing.assert_close(cm(p), lin(p))
