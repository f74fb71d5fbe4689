"""TVM kernels on torch's OpenMP threads (fxcc.codegen.tvm_omp)."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")
from fxcc.codegen import tvm_omp  # noqa: E402

TVM = "canonicalize,raise,fuse,codegen{backend=tvm}"


@pytest.fixture
def fresh_launcher():
    tvm_omp.launcher.cache_clear()
    yield
    tvm_omp.launcher.cache_clear()


def gemm_model():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 64), requires_grad=False)

    def f(x):
        return F.gelu(F.linear(x, w)) + 1
    return f, torch.randn(3, 40, 64)


def libgomp_copies() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "libgomp" in line}


def test_kernels_run_on_torchs_openmp_runtime(fresh_launcher):
    if not tvm_omp.enabled():
        pytest.skip("no C compiler with OpenMP here")
    f, x = gemm_model()
    for threads in (2, 1):
        torch.set_num_threads(threads)
        cm = fxcc.compile(f, passes=TVM)
        torch.testing.assert_close(cm(x), f(x), atol=1e-4, rtol=1e-4)
    assert len(libgomp_copies()) == 1  # joined torch's OpenMP runtime, did not load a second one


def test_tvm_pool_by_choice_or_without_a_compiler(fresh_launcher, monkeypatch):
    monkeypatch.setenv("FXCC_TVM_POOL", "tvm")
    assert not tvm_omp.enabled()
    monkeypatch.delenv("FXCC_TVM_POOL")
    tvm_omp.launcher.cache_clear()

    def no_compiler():
        raise RuntimeError("no C compiler (cc) on PATH")
    monkeypatch.setattr(tvm_omp, "_built", no_compiler)
    assert tvm_omp.launcher() is None  # kernels stay on TVM's pool, and still run
    f, x = gemm_model()
    cm = fxcc.compile(f, passes=TVM, tune="off")
    torch.testing.assert_close(cm(x), f(x), atol=1e-4, rtol=1e-4)
