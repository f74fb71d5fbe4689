"""The `gemv` pass and its kernel: decode-shaped float linears with their norm, SwiGLU and residual folded in.

Kernels run under Triton's interpreter on the CPU (tests/conftest.py turns it on without CUDA); the choice
between the GEMV and the library is made on a GPU (marked, skipped without CUDA)."""

from __future__ import annotations

import collections
import os

import fxcc
import pytest
import torch
import torch.nn.functional as F
from fxcc.dialects import KERNEL_OPS, kernel_body
from fxcc.pipeline import PassContext

tx = torch.ops.fxcc_tx
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interp = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                            reason="a Triton interpreter test (CPU tensors); the GPU tests cover the kernels here")
PIPE = "canonicalize,raise,merge-linears,gemv{cpu=true},fuse,codegen{backend=extern}"


def _case(glu: bool, norm: bool, res: bool, bias: bool, m: int = 5, k: int = 256, n: int = 48,
          dtype: torch.dtype = torch.float32, device: str = "cpu"):
    torch.manual_seed(7)
    x = torch.randn(m, k, device=device).to(dtype) * 3
    w = (torch.randn((2 if glu else 1) * n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(w.shape[0], device=device).to(dtype) if bias else None
    g = (torch.rand(k, device=device) + 0.5).to(dtype) if norm else None
    r = torch.randn(m, n, device=device).to(dtype) if res else None
    xin = x.float()
    if norm:
        xin = xin * torch.rsqrt(xin.pow(2).mean(-1, keepdim=True) + 1e-6) * g.float()
    y = F.linear(xin, w.float(), None if b is None else b.float())
    if glu:
        y = F.silu(y[:, :n]) * y[:, n:]
    if res:
        y = y + r.float()
    return x, w, b, g, r, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@interp
@pytest.mark.parametrize("glu,norm,res,bias", [(False, False, False, True), (False, False, True, False),
                                               (False, True, True, True), (True, False, False, False),
                                               (True, True, False, True)])
def test_float_gemv_kernel_matches_torch_with_each_epilogue(glu, norm, res, bias):
    """The GEMV on a float weight (no scale) with bias, residual, SwiGLU and the RMSNorm before it, twice
    (split-K state must be left clean), against fp32 torch."""
    from fxcc.codegen import triton_quant as tq

    x, w, b, g, r, want = _case(glu, norm, res, bias)
    for _ in range(2):
        got = tq.float_linear(x, w, b, r, g, 1e-6 if norm else None, glu=glu)
        assert got.shape == want.shape
        assert rel(got, want) < 1e-5


@interp
def test_float_gemv_takes_every_split_and_block_of_its_config_space():
    """Each (BLOCK_N, SPLIT, BLOCK_K) the config list gives a bf16-sized weight, run through the kernel with a
    gate and a norm: every one right, so a config can only win on the GPU by being fast."""
    from fxcc.codegen import triton_gemv as tg

    x, w, b, g, r, want = _case(True, True, False, True, m=2, k=512, n=64)
    cfgs = {(bn, split, bk) for bn, split, bk, *_ in tg.configs(2, 512, 64, True, wbytes=2)}
    cfgs |= {(16, 2, 128), (32, 4, 64)}
    for bn, split, bk in sorted(cfgs):
        y = torch.full((2, 64), float("nan"))
        tg.gemv(x, w, None, b, y, (bn, split, bk, 4, 2, 0), None, True, g, 1e-6)
        assert rel(y, want) < 1e-5, (bn, split, bk)


def test_a_quantized_weight_without_scales_is_refused():
    from fxcc.codegen import triton_gemv as tg

    with pytest.raises(ValueError, match="needs its scales"):
        tg.gemv(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), None, None, torch.empty(1, 8),
                (16, 1, 64, 4, 2, 0))


def _llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def _kernel_ops(cm) -> collections.Counter:
    bodies = [kernel_body(n.args[1]).body for n in cm.variants[-1].gm.graph.nodes
              if n.op == "call_function" and n.target in KERNEL_OPS]
    return collections.Counter(m.target for b in bodies for m in b.graph.nodes if m.op == "call_function")


@interp
def test_decode_llama_linears_become_gemvs_carrying_norms_gates_and_residuals(monkeypatch):
    """Per layer: one GEMV for the merged Q/K/V with the input norm, one for O with the residual, one gated
    GEMV for gate/up with the post-attention norm and SwiGLU, one for down with the residual; equal to eager."""
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "0")  # the interpreter is slow: keep the compiled graph to check it
    model, ids = _llama(), torch.randint(0, 128, (3, 1))
    cm = fxcc.compile(model, passes=PIPE)
    with torch.no_grad():
        out, ref = cm(ids).last_hidden_state, model(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("gemv"))
    assert record.result.stats == {"linears": 8, "gated": 2, "residual": 4, "norm": 4}
    ops = _kernel_ops(cm)
    assert ops[tx.gemv_linear.default] == 6 and ops[tx.gemv_gated_linear.default] == 2
    assert ops[tx.rms_norm.default] == 1  # the final norm; each layer's two ride in the GEMVs
    assert ops[torch.ops.aten.linear.default] == 0 and ops[tx.gated_act.default] == 0


def test_prefill_shaped_linears_and_cpu_targets_are_left_to_the_library():
    """More than 16 rows (a prefill) keeps aten.linear; on the CPU the pass does nothing unless asked."""
    from fxcc.passes.gemv import Gemv

    model = _llama(1)
    cm = fxcc.compile(model, passes="canonicalize,raise,merge-linears")
    cm(torch.randint(0, 128, (1, 24)))
    gm = cm.variants[-1].gm
    assert not Gemv().apply(gm, PassContext(target="cuda")).changed  # 24 rows: a prefill
    assert not Gemv().apply(gm, PassContext(target="cpu")).changed
    cm = fxcc.compile(model, passes="canonicalize,raise,merge-linears")  # a new compile: a second shape
    cm(torch.randint(0, 128, (2, 1)))                                       # would be symbolic (automatic dynamic)
    gm = cm.variants[-1].gm
    assert not Gemv().apply(gm, PassContext(target="cpu")).changed
    assert Gemv().apply(gm, PassContext(target="cuda")).stats["linears"] == 4


@interp
def test_static_cache_generate_with_a_symbolic_batch_decodes_through_gemvs():
    """A KV-cache decode step has a symbolic batch ([B, 1, K] rows): its linears still become GEMVs (the kernel
    checks the rows at run time); the greedy tokens equal eager's, and the prefill keeps its linears but the head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=None)).eval()
    model.generation_config.disable_compile = True
    ids = torch.randint(1, 128, (3, 5))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static")
    fn = fxcc.compile(type(model).forward.__get__(model), passes=PIPE)
    model.forward = fn
    with torch.inference_mode():
        got = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
    per_variant = []
    for v in fn.fxcc.variants:
        gemv = next(r for r in v.records if r.spec.startswith("gemv"))
        per_variant.append(gemv.result.stats.get("linears", 0))
    # prefill (5 rows per sequence): only the LM head, which reads the last token's row; decode: Q/K/V, O,
    # gate/up, down and the head
    assert sorted(per_variant) == [1, 5]


def test_bad_rows_option_is_refused():
    with pytest.raises(ValueError, match="rows must be in 1..16"):
        fxcc.parse_pipeline("gemv{rows=32}")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("glu,norm,res", [(False, False, True), (True, True, False), (False, True, False)])
def test_gpu_choice_between_gemv_and_library_is_right_and_logged(glu, norm, res):
    """On the GPU the first call times the GEMV configs against the library linear (the incumbent) and keeps
    a GEMV only beyond the noise; whichever runs is right, and the decision is recorded."""
    from fxcc.codegen import triton_quant as tq

    x, w, b, g, r, want = _case(glu, norm, res, False, m=1, k=2048, n=2048, dtype=torch.bfloat16, device="cuda")
    tq.FLOAT_DECISIONS.clear()
    got = tq.float_linear(x, w, b, r, g, 1e-6 if norm else None, glu=glu)
    assert rel(got, want) < 1e-2
    assert len(tq.FLOAT_DECISIONS) == 1
    line = next(iter(tq.FLOAT_DECISIONS.values()))
    assert "library" in line and ("stays" in line or "kept" in line)
    again = tq.float_linear(x, w, b, r, g, 1e-6 if norm else None, glu=glu)  # the choice is reused
    assert len(tq.FLOAT_DECISIONS) == 1 and rel(again, want) < 1e-2
