"""Kernels are exact on every input, not only the example they were chosen on.

A compiled attention or reduction is called again with masks and values that its compile never saw: rows
whose keys are all masked (eager gives zeros), additive masks with -inf rows, random sizes, large
magnitudes. Every backend that can take the kernel is forced in turn (tvm, extern, triton under the
interpreter on the CPU) and compared with eager.
"""

from __future__ import annotations

import os
import warnings

import fxcc
import pytest
import torch
import torch.nn.functional as F

BACKENDS = ["extern", "tvm", "triton"]


def pipeline(backend: str) -> str:
    return f"canonicalize,raise,fuse,codegen{{backend={backend},reps=1}}"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "tvm":
        pytest.importorskip("tvm")
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            if os.environ.get("TRITON_INTERPRET") != "1":
                pytest.skip("Triton's interpreter mode is fixed at its first import (tests/conftest.py sets it)")
            monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    return request.param


def attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def random_bool_mask(gen: torch.Generator, b: int, tq: int, tk: int) -> torch.Tensor:
    m = torch.rand(b, 1, tq, tk, generator=gen) > 0.4
    dead = torch.rand(b, 1, tq, generator=gen) < 0.3  # rows with no key at all
    m[dead] = False
    m[0, 0, 0] = False  # at least one
    return m


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 9, 16), (1, 2, 2, 1, 5, 8), (2, 4, 1, 12, 12, 32)],
                         ids=["gqa", "one-query", "mqa"])
def test_attention_all_masked_rows_equal_eager_on_every_backend(backend, shape):
    b, h, hk, tq, tk, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n, t in ((h, tq), (hk, tk), (hk, tk)))
    cm = fxcc.compile(attention, passes=pipeline(backend))
    cm(q, k, v, torch.ones(b, 1, tq, tk, dtype=torch.bool))  # compiled on a mask with every key live
    for _ in range(4):
        mask = random_bool_mask(gen, b, tq, tk)
        q, k, v = (torch.randn_like(x) for x in (q, k, v))
        got, want = cm(q, k, v, mask), attention(q, k, v, mask)
        assert not want.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cm.fxcc.stats.compiles == 1


def test_attention_additive_mask_with_dead_rows(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    cm = fxcc.compile(attention, passes=pipeline(backend))
    cm(q, k, v, torch.zeros(2, 1, 6, 6))
    for scale in (1.0, 1e3):  # large magnitudes too
        mask = torch.where(random_bool_mask(gen, 2, 6, 6), 0.0, float("-inf"))
        q2 = q * scale
        torch.testing.assert_close(cm(q2, k, v, mask), attention(q2, k, v, mask), atol=1e-4, rtol=1e-5,
                                   equal_nan=True)


REDUCTIONS = {
    "softmax-last": lambda x: torch.softmax(x, -1),
    "log-softmax-last": lambda x: torch.log_softmax(x, -1),
    "sum-last": lambda x: x.sum(-1) * 2,
    "mean-first": lambda x: x.mean(0) + 1,
    "amax-last": lambda x: x.amax(-1) - 1,
    "layer-norm": lambda x: F.layer_norm(x, x.shape[-1:]) * 3,
    "rms-norm": lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reductions_hold_on_new_values(backend, name):
    fn = REDUCTIONS[name]
    gen = torch.Generator().manual_seed(len(name))
    x = torch.randn(6, 40, generator=gen)
    cm = fxcc.compile(fn, passes=pipeline(backend))
    cm(x)
    for scale in (1.0, 1e-3, 1e3):
        y = torch.randn(6, 40, generator=gen) * scale
        y[1] = -y[1].abs() * 50  # a row far from the others
        torch.testing.assert_close(cm(y), fn(y), atol=1e-5 * max(1.0, scale), rtol=1e-4)


def test_a_gemm_squashed_by_tanh_is_not_refused_for_rounding_at_large_magnitudes():
    """A pooler (linear then tanh) checked on activations 1e3 times larger: the GEMM's terms cancel where its
    output is near zero, and any other summation order than eager's differs there by ~1e-3 after tanh. That is
    rounding, not a wrong kernel: the generated GEMM must still be a candidate (it was refused on every BERT)."""
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.Tanh()).eval()
    x = torch.randn(64, 384)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = fxcc.compile(m, passes=pipeline("tvm"), options=fxcc.CompileOptions(graph_cache=False))
        with torch.no_grad():
            got = cm(x)
    assert not [str(w.message) for w in caught if "using another backend" in str(w.message)]
    torch.testing.assert_close(got, m(x), atol=1e-5, rtol=1e-5)
    state = cm.fxcc if hasattr(cm, "fxcc") else cm
    assert "tvm" in {k.choice.backend for k in state.variants[0].kernels.values() if k.choice}


def test_kernel_timing_inputs_of_a_complex_placeholder():
    """A kernel fed complex numbers (DeepSeek-V2 writes its rotary embedding with them) is timed on random
    complex inputs; making them crashed the whole compile (`check_random_bounds`)."""
    import types

    import torch.fx as fx
    from fxcc.autotune.select import example_inputs

    g = fx.Graph()
    p = g.placeholder("x")
    p.meta["val"] = torch.empty(2, 3, dtype=torch.complex64)
    g.output(p)
    (x,) = example_inputs(types.SimpleNamespace(body=fx.GraphModule(torch.nn.Module(), g)), "cpu")
    assert x.dtype == torch.complex64 and x.shape == (2, 3) and bool((x != 0).all())


def test_a_kernel_reading_one_fixed_element_of_a_stacked_row_compiles_on_triton(monkeypatch):
    # horizontal stacks two layers' `arange(1) + counter` into one op; the kernel reads row 1 of the stack at
    # every lane: a single address under the tile's mask, which Triton refuses unless the address is a tile too
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton's interpreter mode is fixed at its first import (tests/conftest.py sets it)")
        monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def counters(a, c0, c1):
        r = torch.arange(1, device=a.device)
        return a + (r + c0), a * (r + c1)

    cm = fxcc.compile(counters, passes="canonicalize,raise,horizontal,fuse,codegen{backend=triton,reps=1}",
                      options=fxcc.CompileOptions(graph_cache=False))
    a, c0, c1 = (torch.tensor([v], device=dev) for v in (3, 4, 5))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = cm(a, c0, c1)
    assert not [w for w in seen if "triton failed" in str(w.message)], [str(w.message) for w in seen]
    for got, want in zip(out, counters(a, c0, c1)):
        assert torch.equal(got, want)
    state = cm.fxcc if hasattr(cm, "fxcc") else cm
    assert "triton" in {k.choice.backend for k in state.variants[0].kernels.values() if k.choice}
