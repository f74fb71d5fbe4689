"""mixed-precision: quantize/dequantize ops, int8/fp8 linear kernels against their reference, Triton
quantized GEMMs under the interpreter (GPU: marked, skipped without CUDA), and the pass: IR, per-layer
report, budget, policy errors."""

from __future__ import annotations

import math
import os

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc.autotune.mixed_precision import mixed_precision_report
from fxcc.codegen import quant
from fxcc.dialects import int8_linear_reference
from fxcc.pipeline import PipelineError, parse_pipeline
from fxcc.quality import quality_loss

tx = torch.ops.fxcc_tx
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Triton kernels on CPU tensors run only under the interpreter (tests/conftest.py turns it on without CUDA);
# on a GPU machine the GPU tests cover the same kernels
interp = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                            reason="a Triton interpreter test (CPU tensors); the GPU tests cover the kernels here")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------- ops


def test_int8_round_trip_within_half_a_step():
    x = torch.randn(6, 33) * torch.logspace(-2, 2, 6)[:, None]  # rows of very different magnitude
    q, s = tx.quantize(x, "int8")
    assert q.dtype == torch.int8 and s.shape == (6,) and q.abs().max() <= 127
    back = tx.dequantize(q, s, torch.float32)
    assert ((back - x).abs() <= s[:, None] / 2 + 1e-6).all()


def test_fp8_round_trip_relative_error():
    x = torch.randn(4, 64)
    q, s = tx.quantize(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    back = tx.dequantize(q, s, torch.float32)
    assert rel(back, x) < 0.05  # e4m3 keeps 3 mantissa bits: ~3% per element at worst, less on average
    assert rel(back, x) > 0  # it did round


def test_quantize_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="int4"):
        tx.quantize(torch.randn(2, 4), "int4")


@pytest.fixture
def lin():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 64), torch.randn(48, 64), torch.randn(48)
    qw, ws = quant.quantize_weight(w, "int8")
    return x, w, b, qw, ws


@pytest.mark.parametrize("act,impl", [("none", "dequant"), ("none", "int8pack"), ("token", "int_mm"),
                                      ("tensor", "fbgemm")])
def test_int8_kernels_match_reference(lin, act, impl):
    x, w, b, qw, ws = lin
    got = tx.int8_linear(x, qw, ws, b, act, impl)
    ref = tx.int8_linear(x, qw, ws, b, act, "ref")
    assert got.shape == (2, 5, 48)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    assert rel(ref, x @ w.T + b) < 0.05  # and the reference approximates the fp32 linear


def test_int8_linear_errors_name_the_option(lin):
    x, w, b, qw, ws = lin
    with pytest.raises(ValueError, match="act='channel'"):
        tx.int8_linear(x, qw, ws, b, "channel", "ref")
    with pytest.raises(ValueError, match="unknown impl 'cutlass'"):
        tx.int8_linear(x, qw, ws, b, "none", "cutlass")


def test_fp8_reference_close_to_fp32(lin):
    x, w, b, _, _ = lin
    qw, ws = quant.quantize_weight(w, "fp8")
    assert rel(tx.fp8_linear(x, qw, ws, b, "ref"), x @ w.T + b) < 0.08


# ------------------------------------------------------------------- Triton (interpreter on CPU)


def _triton():
    return pytest.importorskip("fxcc.codegen.triton_quant")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int8_weight_only(lin, dtype):
    tq = _triton()
    x, w, b, qw, ws = lin
    x = x.to(dtype)
    got = tq.int8_weight_linear(x, qw, ws, b)
    ref = int8_linear_reference(x, qw, ws, b, "none")
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=1e-2)


@interp
@pytest.mark.parametrize("cfg", [(32, 4, 32, 4, 3), (32, 2, 128, 4, 3)])
def test_triton_int8_split_k_twice(cfg):
    """Split-K (decode): partial sums meet in a workspace the last program of a tile empties, so a second
    call on the same workspace gives the same result."""
    tq = _triton()
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 256), torch.randn(96, 256), torch.randn(96)
    qw, ws = quant.quantize_weight(w, "int8")
    ref = int8_linear_reference(x, qw, ws, b, "none")
    for _ in range(2):
        y = torch.full((3, 96), float("nan"))
        tq._launch_splitk(x, qw, ws, b, y, cfg)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@interp
@pytest.mark.parametrize("split", [False, True])
def test_triton_int8_residual_epilogue(lin, split):
    tq = _triton()
    x, w, b, qw, ws = lin
    r = torch.randn(2, 5, 48)
    want = int8_linear_reference(x, qw, ws, b, "none") + r
    if split:
        y = torch.empty(10, 48)
        tq._launch_splitk(x.reshape(10, 64), qw, ws, b, y, (32, 2, 32, 4, 3), r.reshape(10, 48))
        got = y.reshape(2, 5, 48)
    else:
        got = tx.int8_linear(x, qw, ws, b, "none", "triton", r)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tx.int8_linear(x, qw, ws, b, "none", "dequant", r), want, atol=1e-3, rtol=1e-3)


@interp
def test_triton_quantize_rows_matches_tx_quantize():
    tq = _triton()
    x = torch.randn(5, 300) * torch.logspace(-1, 1, 5)[:, None]
    q, s = tq.quantize_rows(x, "int8")
    q_ref, s_ref = tx.quantize(x, "int8")
    assert torch.equal(q, q_ref) and torch.allclose(s, s_ref)


@interp
def test_triton_int8_w8a8_per_token(lin):
    tq = _triton()
    x, w, b, qw, ws = lin
    got = tq.int8_w8a8_linear(x, qw, ws, b)
    torch.testing.assert_close(got, int8_linear_reference(x, qw, ws, b, "token"), atol=1e-3, rtol=1e-3)


@interp
def test_triton_fp8_close_to_reference(lin):
    tq = _triton()
    x, w, b, _, _ = lin
    qw, ws = quant.quantize_weight(w, "fp8")
    for fn in (tq.fp8_linear, tq.fp8_linear_fused):
        got = fn(x, qw, ws, b)
        # the interpreter's fp32 -> e4m3 rounding may differ from torch's in the last bit
        assert rel(got, quant._fp8_ref(x, qw, ws, b)) < 0.05
        assert rel(got, x @ w.T + b) < 0.08


@cuda
@pytest.mark.parametrize("M", [8, 256])
def test_triton_quant_gemms_on_gpu(M):
    tq = _triton()
    torch.manual_seed(0)
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda")
    qw, ws = quant.quantize_weight(w, "int8")
    torch.testing.assert_close(tq.int8_weight_linear(x, qw, ws).float(),
                               int8_linear_reference(x, qw, ws, None, "none").float(), atol=0.5, rtol=2e-2)
    torch.testing.assert_close(tq.int8_w8a8_linear(x, qw, ws).float(),
                               int8_linear_reference(x, qw, ws, None, "token").float(), atol=0.5, rtol=2e-2)
    if torch.cuda.get_device_capability() >= (8, 9):
        qf, fs = quant.quantize_weight(w, "fp8")
        assert rel(tq.fp8_linear(x, qf, fs), quant._fp8_ref(x, qf, fs, None)) < 0.02


# ------------------------------------------------------------------------------------ the pass


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.nn.functional.gelu(self.up(x)))) + x)


def _compile(policy: str, budget: float, **extra: str):
    opts = "".join(f",{k}={v}" for k, v in extra.items())
    model = MLP().eval()
    x = torch.randn(4, 16, 64)
    cm = fxcc.compile(model, passes=f"canonicalize,raise,mixed-precision{{policy={policy},budget={budget}"
                                    f",reps=2{opts}}},fuse,codegen{{backend=extern}}")
    with torch.no_grad():
        out, ref = cm(x), model(x)
    return cm, out, ref


def test_int8_policy_lowers_linears_and_stays_within_budget():
    cm, out, ref = _compile("int8", 0.01)
    rep = mixed_precision_report(cm)
    assert [r.module for r in rep.layers] == ["up", "down", "head"]
    chosen = [r.precision for r in rep.layers]
    assert all(p in ("int8", "int8-tensor") for p in chosen)  # MLP weights quantize well: all fit the budget
    text = fxcc.explain(MLP().eval(), torch.randn(4, 16, 64), passes="canonicalize,raise,mixed-precision{policy=int8,"
                        "reps=2},fuse,codegen{backend=extern}", ir_after_each=False)
    assert "tx.int8_linear" in text and "aten.linear" not in text.split("== final IR")[1].split("== where")[0]
    assert "== mixed-precision policy=int8" in text  # explain prints the per-layer report
    # measured error is what the pass says, and within budget, on the calibration inputs
    assert rep.measured_error <= rep.budget
    assert quality_loss([ref], [out]) == pytest.approx(rep.measured_error, rel=0.2, abs=1e-6)
    assert rep.predicted_error == pytest.approx(sum(r.error_alone[r.precision] for r in rep.layers))
    assert "int8" in rep.text() and "predicted error" in rep.text()


def test_tight_budget_keeps_full_precision():
    cm, out, ref = _compile("int8-weight", 1e-12)
    rep = mixed_precision_report(cm)
    assert [r.precision for r in rep.layers] == ["keep"] * 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_search_respects_budget():
    pytest.importorskip("optuna")
    budget = 2e-4
    cm, out, ref = _compile("auto", budget, trials=20)
    rep = mixed_precision_report(cm)
    assert rep.search.startswith("optuna")
    assert rep.predicted_error <= budget and rep.measured_error <= budget
    assert quality_loss([ref], [out]) <= budget * 1.5  # codegen may reorder fp32 sums; the pass measured on its own graph
    for r in rep.layers:
        assert r.precision == "keep" or r.error_alone[r.precision] <= budget


def test_bf16_policy_inserts_casts():
    cm, out, ref = _compile("bf16", 0.01)
    rep = mixed_precision_report(cm)
    assert {r.precision for r in rep.layers} == {"bf16"}
    assert rel(out, ref) < 0.02 and not torch.equal(out, ref)


def test_policy_errors():
    with pytest.raises(PipelineError, match="policy='int3' is not one of auto"):
        parse_pipeline("mixed-precision{policy=int3}")
    with pytest.raises(PipelineError, match="budget=-1.0 must be a positive"):
        parse_pipeline("mixed-precision{budget=-1}")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="policy=fp8 needs a GPU"):
            _compile("fp8", 0.01)


def test_linears_of_one_input_merge_into_one_gemm():
    """Llama: q/k/v and gate/up read one input each; quantized, each set is one GEMM and slices."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    pipe = "canonicalize,raise,mixed-precision{policy=int8-weight,reps=2},fuse,codegen{backend=extern}"
    cm = fxcc.compile(model, passes=pipe, options=fxcc.CompileOptions(print_ir_after=("mixed-precision",)))
    cm.echo_ir = False
    with torch.no_grad():
        out, ref = cm(ids).last_hidden_state, model(ids).last_hidden_state
    rep = mixed_precision_report(cm)
    assert [r.precision for r in rep.layers] == ["int8-weight"] * 7
    assert rep.measured_error <= rep.budget and quality_loss([ref], [out]) <= rep.budget
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert record.result.stats["merged"] == 5  # q, k, v and gate, up
    # the residual adds fold only into the Triton kernel (GPU); CPU kernels leave them to `fuse`
    assert record.result.stats.get("residual", 0) == (2 if rep.layers[0].kernel == "triton" else 0)
    assert record.ir_after.count("tx.int8_linear(") == 4  # qkv, o, gate+up, down
    assert record.ir_after.count("aten.slice.Tensor(") == 5


@interp
def test_residual_add_folds_into_the_triton_kernel_only(lin):
    import torch.fx as fx
    from fxcc import ir
    from fxcc.autotune.mixed_precision import _fold_residuals

    x, w, b, qw, ws = lin
    r = torch.randn(2, 5, 48)

    def f(x, r, qw, ws, b):
        y1 = tx.int8_linear.default(x, qw, ws, b, "none", "triton")
        y2 = tx.int8_linear.default(x, qw, ws, b, "none", "dequant")
        return torch.ops.aten.add.Tensor(y1, r), torch.ops.aten.add.Tensor(r, y2)

    gm = fx.symbolic_trace(f)
    args = (x, r, qw, ws, b)
    for p, a in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        p.meta["val"] = a
    ir.propagate(gm)
    want = gm(*args)
    assert _fold_residuals(gm) == 1
    gm.recompile()
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(n.target is torch.ops.aten.add.Tensor for n in ops) == 1  # the dequant one keeps its add
    got = gm(*args)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- decode GEMV (swap AB), gated epilogue, folding


def _gemv_case(glu: bool, dtype: torch.dtype = torch.float32, m: int = 5, k: int = 256, n: int = 48,
               device: str = "cpu"):
    torch.manual_seed(3)
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn((2 if glu else 1) * n, k, device=device)
    b = torch.randn(w.shape[0], device=device)
    r = torch.randn(m, n, device=device).to(dtype)
    qw, ws = quant.quantize_weight(w, "int8")
    full = int8_linear_reference(x.float(), qw, ws, b, "none")
    want = (torch.nn.functional.silu(full[:, :n]) * full[:, n:] if glu else full) + r.float()
    return x, qw, ws, b, r, want


@interp
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("cfg", [(16, 1, 64, 4, 2, 0), (32, 4, 32, 4, 2, 1), (16, 2, 128, 4, 2, 0)])
def test_gemv_matches_reference_twice(glu, cfg):
    """Swap-AB GEMV (ragged N=48 against 32-wide blocks too), split-K: a second call on the same workspace
    gives the same result; the poisoned output is fully written; the gate runs in the epilogue."""
    tg = pytest.importorskip("fxcc.codegen.triton_gemv")
    x, qw, ws, b, r, want = _gemv_case(glu)
    for _ in range(2):
        y = torch.full((5, 48), float("nan"))
        tg.gemv(x, qw, ws, b, y, cfg, r, glu)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_gemv_rejects_what_it_cannot_do():
    tg = pytest.importorskip("fxcc.codegen.triton_gemv")
    x, qw, ws, b, r, _ = _gemv_case(False, m=5)
    with pytest.raises(ValueError, match="at most 16"):
        tg.gemv(torch.randn(17, 256), qw, ws, b, torch.empty(17, 48), (16, 1, 64, 4, 2, 0))
    with pytest.raises(ValueError, match="split"):
        tg.gemv(x, qw, ws, b, torch.empty(5, 48), (16, 3, 64, 4, 2, 0))
    with pytest.raises(ValueError, match="bit-trick"):
        tg.gemv(x, qw, ws, b, torch.empty(5, 48), (16, 1, 64, 4, 2, 2))
    with pytest.raises(ValueError, match="rows"):
        tg.gemv(x, qw, ws, b, torch.empty(5, 48), (16, 1, 64, 4, 2, 0), glu=True)


@interp
def test_int8_gated_linear_op_all_kernels():
    x, qw, ws, b, r, want = _gemv_case(True)
    for impl in ("ref", "dequant", "triton"):
        got = tx.int8_gated_linear(x.reshape(1, 5, 256), qw, ws, b, impl)
        assert got.shape == (1, 5, 48)
        torch.testing.assert_close(got.reshape(5, 48) + r, want, atol=1e-3, rtol=1e-3)


@interp
def test_gated_act_folds_into_the_triton_gemv_at_decode_only():
    import torch.fx as fx
    from fxcc import ir
    from fxcc.autotune.mixed_precision import _fold_gated

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qw, self.ws = quant.quantize_weight(torch.randn(96, 64), "int8")
            self.b = torch.randn(96)

        def forward(self, x):
            y = tx.int8_linear.default(x, self.qw, self.ws, self.b, "none", "triton")
            gate, up = torch.ops.aten.slice.Tensor(y, -1, 0, 48), torch.ops.aten.slice.Tensor(y, -1, 48, 96)
            return tx.gated_act.default(gate, up, "silu")

    for rows, folds in ((6, 1), (40, 0)):  # decode-shaped only: prefill keeps the fused pointwise kernel
        gm = fx.symbolic_trace(Gated())
        x = torch.randn(2, rows // 2, 64)
        next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"] = x
        ir.propagate(gm)
        want = gm(x)
        assert _fold_gated(gm) == folds
        gm.recompile()
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert (tx.int8_gated_linear.default in targets) == bool(folds)
        assert (tx.gated_act.default in targets) != bool(folds)
        torch.testing.assert_close(gm(x), want, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("glu,norm", [(False, False), (True, False), (False, True), (True, True)])
def test_gemv_on_gpu_every_config_bf16(glu, norm):
    """Every decode config the pass may time (both int8 -> bf16 conversions), three times, poisoned output;
    with the RMSNorm (a split-K race between warps once gave errors of 1e3 with 4 warps)."""
    tg = pytest.importorskip("fxcc.codegen.triton_gemv")
    x, qw, ws, b, r, want = _gemv_case(glu, torch.bfloat16, m=8, k=1024, n=512, device="cuda")
    if norm:
        full = int8_linear_reference(tx.rms_norm(x, None, 1e-5).float(), qw, ws, b, "none")
        want = (torch.nn.functional.silu(full[:, :512]) * full[:, 512:] if glu else full) + r.float()
    for cfg in tg.configs(8, 1024, 512, glu, (0, 2)):
        for _ in range(3):
            y = torch.full((8, 512), float("nan"), device="cuda", dtype=torch.bfloat16)
            tg.gemv(x, qw, ws, b, y, cfg, r, glu, None, 1e-5 if norm else None)
            assert rel(y, want) < 1e-2, cfg


@interp
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("cfg", [(16, 1, 64, 4, 2, 0), (16, 2, 128, 4, 2, 0)])
def test_gemv_applies_rms_norm_of_x(glu, cfg):
    """norm=: the GEMV equals tx.rms_norm then the linear (split-K: sums of squares meet across programs)."""
    tg = pytest.importorskip("fxcc.codegen.triton_gemv")
    x, qw, ws, b, r, _ = _gemv_case(glu)
    x = x * 3.0 + 1.0
    gamma = torch.rand(256) + 0.5
    xn = tx.rms_norm(x, gamma, 1e-5)
    full = int8_linear_reference(xn, qw, ws, b, "none")
    want = (torch.nn.functional.silu(full[:, :48]) * full[:, 48:] if glu else full) + r
    for _ in range(2):
        y = torch.full((5, 48), float("nan"))
        tg.gemv(x, qw, ws, b, y, cfg, r, glu, gamma, 1e-5)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    # without its weight (the pass folds it into the weight): the rows' 1 / rms only
    full = int8_linear_reference(tx.rms_norm(x, None, 1e-5), qw, ws, b, "none")
    want0 = (torch.nn.functional.silu(full[:, :48]) * full[:, 48:] if glu else full) + r
    y = torch.full((5, 48), float("nan"))
    tg.gemv(x, qw, ws, b, y, cfg, r, glu, None, 1e-5)
    torch.testing.assert_close(y, want0, atol=1e-4, rtol=1e-4)
    # the op: the same through tx.int8_linear / tx.int8_gated_linear (Triton and a library kernel)
    for impl in ("triton", "dequant"):
        got = (tx.int8_gated_linear(x, qw, ws, b, impl, gamma, 1e-5) if glu
               else tx.int8_linear(x, qw, ws, b, "none", impl, None, gamma, 1e-5))
        torch.testing.assert_close(got + r, want, atol=1e-3, rtol=1e-3)


@interp
def test_rms_norm_folds_only_when_the_linear_is_its_only_user():
    import torch.fx as fx
    from fxcc import ir
    from fxcc.autotune.mixed_precision import SOURCE, _fold_norms

    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qw, self.ws = quant.quantize_weight(torch.randn(48, 64), "int8")
            self.g1, self.g2 = torch.rand(64) + 0.5, torch.rand(64) + 0.5

        def forward(self, h):
            a = tx.int8_linear.default(tx.rms_norm.default(h, self.g1, 1e-6), self.qw, self.ws, None, "none", "triton")
            n2 = tx.rms_norm.default(h, self.g2, 1e-6)  # two users: stays
            b = tx.int8_linear.default(n2, self.qw, self.ws, None, "none", "triton")
            return a, b, n2

    mod = Normed()
    w = torch.randn(48, 64)
    mod.qw, mod.ws = quant.quantize_weight(w, "int8")
    gm = fx.symbolic_trace(mod)
    h = torch.randn(2, 3, 64)
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"] = h
    ir.propagate(gm)
    for n in gm.graph.nodes:
        if n.target is tx.int8_linear.default:
            n.meta[SOURCE] = [w]  # what lowering records: the float weight the norm's weight is folded into
    want = gm(h)
    assert _fold_norms(gm) == 1
    gm.recompile()
    assert sum(n.target is tx.rms_norm.default for n in gm.graph.nodes) == 1
    folded = next(n for n in gm.graph.nodes if n.target is tx.int8_linear.default and n.args[0].op == "placeholder")
    assert folded.args[7] is None and folded.args[8] == 1e-6  # the norm's weight went into the int8 weight
    got = gm(h)
    assert rel(got[0], want[0]) < 2e-2  # quantized again with g folded in: int8 error, not exact
    torch.testing.assert_close(got[1], want[1])


@interp
def test_decode_llama_with_triton_gemv_folds_norm_gate_and_residual(monkeypatch):
    """Decode-shaped Llama with the Triton kernel (the interpreter on the CPU): per layer the two RMSNorms,
    SwiGLU and both residual adds move into the int8 GEMVs; the output stays within the budget."""
    from transformers import LlamaConfig, LlamaModel

    pytest.importorskip("fxcc.codegen.triton_gemv")
    monkeypatch.setattr(quant, "impls", lambda p, d: ["triton"] if p == "int8-weight" else [])
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (3, 1))
    cm = fxcc.compile(model, passes="canonicalize,raise,mixed-precision{policy=int8-weight,reps=1},fuse,"
                                    "codegen{backend=extern}")
    with torch.no_grad():
        out, ref = cm(ids).last_hidden_state, model(ids).last_hidden_state
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert {k: record.result.stats.get(k) for k in ("residual", "gated", "norm")} == {"residual": 2, "gated": 1,
                                                                                      "norm": 2}
    from fxcc.dialects import KERNEL_OPS, kernel_body

    bodies = [kernel_body(n.args[1]).body for n in cm.variants[-1].gm.graph.nodes
              if n.op == "call_function" and n.target in KERNEL_OPS]
    ops = [m.target for b in bodies for m in b.graph.nodes if m.op == "call_function"]
    assert ops.count(tx.rms_norm.default) == 1  # the model's final norm; the layer's two are in the GEMVs
    assert tx.gated_act.default not in ops and ops.count(tx.int8_gated_linear.default) == 1
    rep = mixed_precision_report(cm)  # the error reported is the folded graph's, what runs
    assert rep.search.endswith("+folds") and abs(rep.measured_error - quality_loss([ref], [out])) < 1e-4
    assert quality_loss([ref], [out]) <= mixed_precision_report(cm).budget


@interp
def test_wrong_or_failing_configs_are_dropped_before_timing(monkeypatch):
    tq = _triton()
    from fxcc.codegen import triton_gemv as tg

    x, qw, ws, b, r, _ = _gemv_case(False)
    y = torch.empty(5, 48)
    good, bad_split, racy = ("gemv", 16, 1, 64, 4, 2, 0), ("gemv", 16, 3, 64, 4, 2, 0), ("gemv", 16, 2, 128, 4, 2, 0)
    real = tg.gemv
    calls = {"n": 0}

    def flaky(x2, qw, ws, b, y, cfg, *rest):  # right on the first call, wrong on the second (a race's symptom)
        real(x2, qw, ws, b, y, cfg, *rest)
        if cfg == racy[1:]:
            calls["n"] += 1
            if calls["n"] == 2:
                y.mul_(1.5)

    monkeypatch.setattr(tg, "gemv", flaky)
    assert tq._correct([good, bad_split, racy], x, qw, ws, b, y, r, False, None, None) == [good]
    xg, qg, sg, bg, rg, _ = _gemv_case(True)
    assert tq._correct([good], xg, qg, sg, bg, torch.empty(5, 48), rg, True, None, 1e-5) == [good]


# ------------------------------------------------------------------------- int4 weight-only (W4A16)


def _int4_case(n: int = 48, k: int = 256, m: int = 5, glu: bool = False, dtype: torch.dtype = torch.float32,
               group: int = 128):
    from fxcc.dialects import pack_int4, quantize_int4

    torch.manual_seed(4)
    w = torch.randn((2 if glu else 1) * n, k)
    q, sz = quantize_int4(w, group, dtype)
    x = torch.randn(m, k).to(dtype)
    return x, w, pack_int4(q, group), sz, torch.randn(w.shape[0]), torch.randn(m, n).to(dtype)


def test_int4_round_trip_within_half_a_step_and_layout():
    """Asymmetric int4 per group: every weight within half a step of its group's grid, both ends of each group
    representable; fxcc's layout: byte j of a row's group holds q[j] (low nibble) and q[j + G/2] (high)."""
    from fxcc.dialects import int4_dequantize, pack_int4, quantize_int4, unpack_int4

    w = torch.randn(32, 256) * torch.logspace(-2, 1, 32)[:, None]  # rows of very different magnitude
    q, sz = quantize_int4(w, 128, torch.float32)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (2, 32, 2)
    p = pack_int4(q, 128)
    assert p.dtype == torch.uint8 and p.shape == (32, 128) and torch.equal(unpack_int4(p, 128).int(), q)
    assert torch.equal((p[:, 5] & 15).int(), q[:, 5]) and torch.equal((p[:, 5] >> 4).int(), q[:, 69])
    assert torch.equal((p[:, 64 + 3] & 15).int(), q[:, 128 + 3])  # second group
    back = int4_dequantize(p, sz, 128)
    step = sz[..., 0].t().repeat_interleave(128, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6 * w.abs().amax()).all()
    assert rel(back, w) < 0.12 and rel(back, w) > 0


def test_int4_group_falls_back_to_a_smaller_one_or_says_why():
    from fxcc.dialects import int4_group

    assert [int4_group(k) for k in (384, 320, 96, 100)] == [128, 64, 32, None]
    why = quant.quantize_weight_int4(torch.randn(16, 100), torch.float32)
    assert isinstance(why, str) and "K=100" in why and "32" in why
    qw, sz = quant.quantize_weight_int4(torch.randn(16, 96), torch.bfloat16)
    assert quant.int4_group_of(qw, sz) == 32 and sz.dtype == torch.bfloat16  # scales in the activation dtype


@pytest.mark.parametrize("impl", ["dequant", "int4pack"])
def test_int4_cpu_kernels_match_reference(impl):
    x, w, qw, sz, b, _ = _int4_case()
    x = x.reshape(1, 5, 256)
    ref = tx.int4_linear(x, qw, sz, b, 128, "ref")
    qk = quant.int4_weight(qw, 128, impl)  # the layout this kernel reads (torch's own for int4pack)
    got = tx.int4_linear(x, qk, sz, b, 128, impl)
    assert got.shape == (1, 5, 48) and got.dtype == x.dtype
    tol = 2e-2 if impl == "int4pack" else 1e-4  # int4pack computes fp32 x with bf16 activations
    assert rel(got, ref) < tol
    assert rel(ref, x @ w.T + b) < 0.15  # and the reference approximates the fp32 linear
    # the reference reads the kernel's layout too (what the lowered graph holds)
    torch.testing.assert_close(tx.int4_linear(x, qk, sz, b, 128, "ref") if impl == "dequant" else
                               fxcc.dialects.int4_linear_reference(x, qk, sz, b, 128, impl), ref, atol=1e-4, rtol=1e-4)


def test_int4_linear_errors_name_the_argument():
    x, w, qw, sz, b, _ = _int4_case()
    with pytest.raises(ValueError, match="unknown impl 'marlin'"):
        tx.int4_linear(x, qw, sz, b, 128, "marlin")
    with pytest.raises(ValueError, match="do not fit group=64"):
        tx.int4_linear(x, qw, sz, b, 64, "dequant")
    with pytest.raises(ValueError, match="group=100"):
        fxcc.dialects.quantize_int4(w, 100, torch.float32)


@interp
@pytest.mark.parametrize("m,k,n,group,cfg", [
    (1, 96, 40, 32, (16, 3, 16, 1, 4, 2, 1)),     # decode, 3 groups of 32 split over 3 programs, ragged N
    (5, 256, 48, 128, (32, 1, 16, 2, 4, 2, 1)),   # M=5, two groups in one step, one program per column block
    (5, 384, 48, 128, (16, 3, 16, 1, 4, 2, 0)),   # K = 3 groups, split-K, Triton's own conversion
    (20, 320, 40, 64, (32, 1, 16, 1, 4, 2, 1)),   # small-batch GEMM: two 16-row blocks, group 64
])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_int4_matches_dequantized_reference_twice(m, k, n, group, cfg, bias):
    """The int4 kernel (interpreter) against dequantize-then-matmul, with a residual epilogue; split-K twice on one
    workspace gives the same result; the poisoned output is fully written."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    x, _, qw, sz, b, r = _int4_case(n, k, m, group=group)
    b = b if bias else None
    want = int4_linear_reference(x, qw, sz, b, group) + r
    for _ in range(2):
        y = torch.full((m, n), float("nan"))
        t4.w4_gemm(x, qw, sz, b, y, group, cfg, r)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def _spread_int4(n: int, k: int, group: int):
    """Packed int4 weights [n, k] whose group g has scale 2^g and zero g (a scale or zero applied to another group's
    K range, or a step that skips or repeats a group, is far off), with scale_zero (fp32)."""
    from fxcc.dialects import pack_int4, quantize_int4

    spread = (2.0 ** torch.arange(k // group)).repeat_interleave(group)
    q, sz = quantize_int4(torch.randn(n, k) * spread + torch.arange(k) // group, group, torch.float32)
    return pack_int4(q, group), sz


@interp
@pytest.mark.parametrize("m,n,k,group", [(1, 40, 256, 32), (8, 64, 1024, 128)])
def test_triton_int4_every_block_shape_and_conversion_of_the_config_space(m, n, k, group):
    """Each (BLOCK_N, BLOCK_M, GPB) of the decode config space at M rows (default and broad), the two conversions
    the interpreter runs and splits from 1 to 8 taking turns, against dequantize-then-matmul. Groups differ by up
    to 128x in scale and in zero, so a scale or zero applied to another group's K range, or a step that skips or
    repeats a group, is far off. N=40: ragged blocks; N=64: whole ones (unmasked loads) but for BLOCK_N=128."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    torch.manual_seed(5)
    groups = k // group
    qw, sz = _spread_int4(n, k, group)
    x, b, r = torch.randn(m, k) + 0.5, torch.randn(n), torch.randn(m, n)
    want = int4_linear_reference(x, qw, sz, b, group) + r
    space = sorted({(c[0], c[2], c[3]) for c in t4.configs(m, 2048, 8192, 128, broad=True) +
                    t4.configs(m, 8192, 2048, 128)})
    assert {c[0] for c in space} >= {16, 32, 64, 128} and {c[1] for c in space} == {m, 16}
    assert {c[2] for c in space} >= {1, 2, 4, 8}
    for i, (bn, bm, gpb) in enumerate(space):
        splits = [s for s in (1, 2, 4, 8) if groups % s == 0 and (groups // s) % gpb == 0]
        cfg = (bn, splits[i % len(splits)], bm, gpb, 4, 2, i % 2)  # splits and conversions take turns
        y = torch.full((m, n), float("nan"))
        t4.w4_gemm(x, qw, sz, b, y, group, cfg, r)
        torch.testing.assert_close(y, want, atol=1e-3, rtol=1e-4, msg=lambda e, cfg=cfg: f"{cfg}: {e}")


@interp
@pytest.mark.parametrize("glu,norm,cfg", [(True, False, (16, 2, 16, 1, 4, 2, 1)),
                                          (False, True, (32, 1, 16, 2, 4, 2, 1)),
                                          (True, True, (16, 2, 16, 1, 4, 2, 1))])
def test_triton_int4_gate_and_norm_epilogues(glu, norm, cfg):
    """SwiGLU of a merged gate/up weight and the RMSNorm of x (with its weight, and folded away) in the kernel."""
    from fxcc.codegen import triton_int4 as t4

    x, _, qw, sz, b, r = _int4_case(glu=glu)
    x = x * 3.0 + 1.0
    gamma = torch.rand(256) + 0.5
    for g in (gamma, None) if norm else (None,):
        eps = 1e-5 if norm else None
        want = t4._reference(x, qw, sz, b, 128, r, glu, g, eps)
        for _ in range(2):
            y = torch.full((5, 48), float("nan"))
            t4.w4_gemm(x, qw, sz, b, y, 128, cfg, r, glu, g, eps)
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    # the ops, by the Triton kernel and a library one
    for impl in ("triton", "dequant"):
        g, eps = (gamma, 1e-5) if norm else (None, None)
        got = (tx.int4_gated_linear(x, qw, sz, b, 128, impl, g, eps) if glu
               else tx.int4_linear(x, qw, sz, b, 128, impl, None, g, eps))
        torch.testing.assert_close(got + r, t4._reference(x, qw, sz, b, 128, r, glu, g, eps), atol=1e-3, rtol=1e-3)


def _decode_rows(loop: int, m: int) -> int:
    """BLOCK_M of a decode loop at M rows: loop 1 pads to an 8- or 16-row MMA tile, loop 2 to a power of two."""
    return (8 if m <= 8 else 16) if loop == 1 else 1 << (m - 1).bit_length()


@interp
@pytest.mark.parametrize("loop", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_triton_int4_decode_loops_match_dequantized_reference(loop, m):
    """The new decode loops (1: the MMA on weights dequantized in registers, 2: the CUDA cores) against
    dequantize-then-matmul at M rows: ragged N, bias and residual, splits of K twice on one workspace, one and two
    groups a step, both conversions the interpreter runs and both stage settings of each loop; then the SwiGLU of a
    merged gate/up weight and the RMSNorm of x (its weight in the kernel, and folded away)."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    torch.manual_seed(6)
    n, k, group, bm = 40, 512, 128, _decode_rows(loop, m)
    bn = 16 if loop == 1 else 64  # ragged blocks either way; one program a split where the interpreter is slow
    qw, sz = _spread_int4(n, k, group)
    x, b, r = torch.randn(m, k) + 0.5, torch.randn(n), torch.randn(m, n)
    want = int4_linear_reference(x, qw, sz, b, group) + r
    stages = (3, 4) if loop == 1 else (1, 2)
    for split, gpb, cvt, st in ((1, 2, 1, stages[0]), (2, 1, 0, stages[1]), (4, 1, 1, stages[1])):
        cfg = (bn, split, bm, gpb, 4, st, cvt, loop)
        for _ in range(2 if split > 1 else 1):
            y = torch.full((m, n), float("nan"))
            t4.w4_gemm(x, qw, sz, b, y, group, cfg, r)
            torch.testing.assert_close(y, want, atol=1e-3, rtol=1e-4, msg=lambda e, cfg=cfg: f"{cfg}: {e}")
    gamma = torch.rand(256) + 0.5
    cases = ((True, None, None), (False, gamma, 1e-5), (True, None, 1e-5), (True, gamma, 1e-5))
    for i, (glu, g, eps) in enumerate(cases):  # the two configs take turns: one unsplit, one split
        xg, _, qg, szg, bg, rg = _int4_case(n, 256, m, glu=glu)
        xg = xg * 3.0 + 1.0
        want = t4._reference(xg, qg, szg, bg, 128, rg, glu, g, eps)
        pair = ((bn, 1, bm, 2, 4, stages[0], 1, loop), (bn * (3 - loop), 2, bm, 1, 4, stages[1], 1, loop))
        for cfg in pair[i % 2::2]:
            for _ in range(cfg[1]):
                y = torch.full((m, n), float("nan"))
                t4.w4_gemm(xg, qg, szg, bg, y, 128, cfg, rg, glu, g, eps)
                # gated outputs reach thousands: fp32 sums in another order than torch's differ there by 1e-6 of
                # the largest, and small outputs of large gate and up values share that absolute error
                err = ((y - want).abs().max() / want.abs().max()).item()
                assert err < 1e-5, f"{cfg} glu={glu} gamma={g is not None} eps={eps}: {err}"


@interp
@pytest.mark.parametrize("m", [1, 8])
def test_triton_int4_every_candidate_of_the_decode_loops(m):
    """Each (BLOCK_N, BLOCK_M, GPB, warps, stages, loop) the sweep's candidates of loops 1 and 2 hold at M rows
    (o/qkv and down shapes, plain and SwiGLU), splits taking turns, on a small problem against
    dequantize-then-matmul; N=40 ragged for every block."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    torch.manual_seed(7)
    n, k, group = 40, 1024, 128
    qw, sz = _spread_int4(n, k, group)
    x, b, r = torch.randn(m, k) + 0.5, torch.randn(n), torch.randn(m, n)
    want = int4_linear_reference(x, qw, sz, b, group) + r
    space = sorted({c[:1] + c[2:6] + c[7:] for glu in (False, True) for kk, nn_ in ((2048, 3072), (8192, 2048))
                    for c in t4.configs(m, kk, nn_, 128, glu, (1,), loops=(1, 2))})
    assert {c[-1] for c in space} == {1, 2} and all(c[1] == _decode_rows(c[-1], m) for c in space)
    for i, (bn, bm, gpb, warps, st, loop) in enumerate(space):
        splits = [s for s in (1, 2, 4, 8) if (k // group) % s == 0 and (k // group // s) % gpb == 0]
        cfg = (bn, splits[i % len(splits)], bm, gpb, warps, st, 1, loop)
        y = torch.full((m, n), float("nan"))
        t4.w4_gemm(x, qw, sz, b, y, group, cfg, r)
        torch.testing.assert_close(y, want, atol=1e-3, rtol=1e-4, msg=lambda e, cfg=cfg: f"{cfg}: {e}")


@interp
@pytest.mark.parametrize("loop", [1, 2])
def test_triton_int4_decode_loops_half(loop):
    """fp16 x and scales in the new loops: scale-zero pairs read as 32-bit words, x four values a 64-bit word."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    for m in (1, 5):
        x, _, qw, sz, b, r = _int4_case(m=m, dtype=torch.float16)
        y = torch.full((m, 48), float("nan"), dtype=torch.float16)
        t4.w4_gemm(x, qw, sz, b, y, 128, (16, 2, _decode_rows(loop, m), 1, 4, 2, 1, loop), r)
        assert rel(y, int4_linear_reference(x.float(), qw, sz, b, 128) + r.float()) < 1e-2


def test_triton_int4_config_list_keeps_its_loop_and_names_the_new_ones():
    """int4_linear's list is loop 0 alone, 7 fields (the new loops come only when asked for); they have 8."""
    from fxcc.codegen import triton_int4 as t4

    for m, k, n, glu in ((1, 2048, 8192, True), (8, 8192, 2048, False), (1, 2048, 2048, False)):
        plain = t4.configs(m, k, n, 128, glu, (2,))
        assert plain == t4.configs(m, k, n, 128, glu, (2,), loops=(0,)) and {len(c) for c in plain} == {7}
        new = t4.configs(m, k, n, 128, glu, (2,), loops=(1, 2))
        assert new and {len(c) for c in new} == {8} and {c[7] for c in new} == {1, 2}
        assert all(c[6] in (0, 1) for c in new if c[7] == 2) and len(new) <= 24
    x, _, qw, sz, b, _ = _int4_case()
    with pytest.raises(ValueError, match="loops are"):
        t4.w4_gemm(x, qw, sz, b, torch.empty(5, 48), 128, (16, 1, 8, 1, 4, 2, 1, 3))
    with pytest.raises(ValueError, match="1 or 2 stages"):
        t4.w4_gemm(x, qw, sz, b, torch.empty(5, 48), 128, (16, 1, 8, 1, 4, 3, 1, 2))


@interp
def test_triton_int4_half():
    """16-bit activations and scales (fp16: the interpreter converts fp32 -> bf16 wrongly; bf16 on the GPU test)."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import int4_linear_reference

    x, _, qw, sz, b, r = _int4_case(dtype=torch.float16)
    got = t4.int4_linear(x, qw, sz, b, 128, r)
    assert got.dtype == torch.float16
    assert rel(got, int4_linear_reference(x.float(), qw, sz, b, 128) + r.float()) < 1e-2


@cuda
@pytest.mark.parametrize("m,glu,norm", [(1, False, False), (8, True, True), (8, False, True), (48, False, False)])
def test_triton_int4_every_config_on_gpu_bf16(m, glu, norm):
    """Every config the kernel may time (both bit conversions), and the new decode loops' candidates, three times over
    a poisoned output (split-K workspaces)."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.dialects import pack_int4, quantize_int4

    torch.manual_seed(0)
    w = torch.randn((2 if glu else 1) * 512, 2048, device="cuda")
    q, sz = quantize_int4(w, 128, torch.bfloat16)
    qw, x = pack_int4(q, 128), torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    b, r = torch.randn(w.shape[0], device="cuda"), torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    eps = 1e-5 if norm else None
    want = t4._reference(x, qw, sz, b, 128, r, glu, None, eps)
    for cfg in dict.fromkeys(t4.configs(m, 2048, 512, 128, glu, cvts=(1, 2)) +
                             t4.configs(m, 2048, 512, 128, glu, cvts=(2,), loops=(1, 2)) +
                             t4._candidates(x, m, 2048, 512, 128, glu)):  # the latter's first: 16 rows
        for _ in range(3):
            y = torch.full((m, 512), float("nan"), device="cuda", dtype=torch.bfloat16)
            t4.w4_gemm(x, qw, sz, b, y, 128, cfg, r, glu, None, eps)
            assert rel(y, want) < 1e-2, cfg


def test_int4_linear_times_the_dequantizing_mma_loop_by_default(monkeypatch):
    """Decode shapes list loop 1's configs (the H100 sweep's fastest) beside loop 0's; FXCC_INT4_LOOPS=0 lists loop 0
    alone, and larger M (no decode loop) is unchanged."""
    from fxcc.codegen import triton_int4 as t4

    x = torch.randn(1, 2048)
    loops = lambda cands: {c[7] if len(c) > 7 else 0 for c in cands}  # noqa: E731
    monkeypatch.delenv("FXCC_INT4_LOOPS", raising=False)
    assert loops(t4._candidates(x, 1, 2048, 512, 128, False)) == {0, 1}
    listed = [c for c in t4._candidates(x, 1, 2048, 512, 128, False) if len(c) > 7]
    assert set(listed) <= set(t4.configs(1, 2048, 512, 128, False, cvts=(1,), loops=(1,)))  # what the sweep checks
    assert loops(t4._candidates(torch.randn(32, 2048), 32, 2048, 512, 128, False)) == {0}
    monkeypatch.setenv("FXCC_INT4_LOOPS", "0")
    assert loops(t4._candidates(x, 1, 2048, 512, 128, False)) == {0}
    monkeypatch.setenv("FXCC_INT4_LOOPS", "1,2")
    assert loops(t4._candidates(x, 1, 2048, 512, 128, False)) == {0, 1, 2}
    monkeypatch.setenv("FXCC_INT4_LOOPS", "3")
    with pytest.raises(ValueError, match="FXCC_INT4_LOOPS='3'"):
        t4._candidates(x, 1, 2048, 512, 128, False)


def test_triton_int4_rejects_what_it_cannot_do():
    from fxcc.codegen import triton_int4 as t4

    x, _, qw, sz, b, _ = _int4_case()
    with pytest.raises(ValueError, match="expected uint8"):
        t4.w4_gemm(x, qw[:, :64], sz, b, torch.empty(5, 48), 128, (16, 1, 16, 1, 4, 2, 1))
    with pytest.raises(ValueError, match="split 3"):
        t4.w4_gemm(x, qw, sz, b, torch.empty(5, 48), 128, (16, 3, 16, 1, 4, 2, 1))
    with pytest.raises(ValueError, match="groups a step"):
        t4.w4_gemm(x, qw, sz, b, torch.empty(5, 48), 128, (16, 2, 16, 2, 4, 2, 1))
    with pytest.raises(ValueError, match="PTX"):
        t4.w4_gemm(x, qw, sz, b, torch.empty(5, 48), 128, (16, 1, 16, 1, 4, 2, 2))


class Ragged(nn.Module):
    """An MLP whose first linear has K=100: no int4 group divides it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(100, 128)
        self.b = nn.Linear(128, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_int4_policy_keeps_a_layer_no_group_divides_and_says_why():
    cm = fxcc.compile(Ragged().eval(), passes="canonicalize,raise,mixed-precision{policy=int4,budget=0.05,reps=2},"
                                              "fuse,codegen{backend=extern}")
    with torch.no_grad():
        cm(torch.randn(4, 100))
    rep = mixed_precision_report(cm)
    a, b = rep.layers
    assert a.precision == "keep" and "K=100" in a.notes["int4"] and "no int4: K=100" in rep.text()
    assert b.precision == "int4" and "int4" in b.error_alone


def test_auto_chooses_among_int4_too():
    from fxcc.autotune.mixed_precision import _available

    assert "int4" in _available("auto", "cpu", torch.float32) and "int4" in _available("auto", "cpu", torch.bfloat16)
    assert _available("int4", "cpu", torch.bfloat16) == ["keep", "int4"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128)).eval()


def test_int4_policy_on_tiny_llama_within_budget_and_int4_in_the_ir():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    pipe = "canonicalize,raise,mixed-precision{policy=int4,reps=2},fuse,codegen{backend=extern}"
    cm = fxcc.compile(model, passes=pipe, options=fxcc.CompileOptions(print_ir_after=("mixed-precision",)))
    cm.echo_ir = False
    with torch.no_grad():
        out, ref = cm(ids).last_hidden_state, model(ids).last_hidden_state
    assert 1 - quality_loss([ref], [out]) >= 0.99  # cosine vs fp32 eager
    rep = mixed_precision_report(cm)
    chosen = [r.precision for r in rep.layers]
    assert set(chosen) <= {"int4", "keep"} and chosen.count("int4") >= 8  # of 14 (k/v projections are sensitive)
    assert all(r.precision == "int4" for r in rep.layers if ".mlp." in r.module)
    assert all("int4" in r.error_alone for r in rep.layers)  # quality per layer, also where not taken
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert record.ir_after.count("tx.int4_linear(") >= 4 and "ui8" in record.ir_after
    assert record.result.stats["int4"] == chosen.count("int4")
    assert "int4" in rep.text() and "int4pack" in rep.text()  # torch's CPU int4 kernel measured and named


@interp
def test_decode_llama_int4_triton_folds_norm_gate_and_residual(monkeypatch):
    """Decode-shaped Llama with the int4 Triton kernel (interpreter): per layer the two RMSNorms, SwiGLU and both
    residual adds move into the int4 GEMVs; the reported error is the folded graph's and within budget."""
    monkeypatch.setattr(quant, "impls", lambda p, d: ["triton"] if p == "int4" else [])
    model = _tiny_llama()
    model.layers = model.layers[:1]
    ids = torch.randint(0, 128, (3, 1))
    cm = fxcc.compile(model, passes="canonicalize,raise,mixed-precision{policy=int4,reps=1,budget=0.05},fuse,"
                                    "codegen{backend=extern}")
    with torch.no_grad():
        out, ref = cm(ids).last_hidden_state, model(ids).last_hidden_state
    rep = mixed_precision_report(cm)
    assert [r.precision for r in rep.layers] == ["int4"] * 7
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert {k: record.result.stats.get(k) for k in ("residual", "gated", "norm")} == {"residual": 2, "gated": 1,
                                                                                      "norm": 2}
    from fxcc.dialects import KERNEL_OPS, kernel_body

    bodies = [kernel_body(n.args[1]).body for n in cm.variants[-1].gm.graph.nodes
              if n.op == "call_function" and n.target in KERNEL_OPS]
    ops = [m.target for b in bodies for m in b.graph.nodes if m.op == "call_function"]
    assert ops.count(tx.int4_gated_linear.default) == 1 and ops.count(tx.int4_linear.default) == 3
    # the weights re-quantized with the norms' weights replaced the first ones: each int4 weight held once
    packed = sum(t.numel() for n, t in cm.variants[-1].gm.named_buffers() if t.dtype == torch.uint8)
    assert packed == sum(math.prod(r.shape[1:]) for r in rep.layers) // 2
    assert ops.count(tx.rms_norm.default) == 1  # the final norm; the layer's two are in the GEMVs
    assert rep.search.endswith("+folds") and abs(rep.measured_error - quality_loss([ref], [out])) < 1e-4
    assert quality_loss([ref], [out]) <= rep.budget


def test_int4_weights_held_once_in_their_kernels_layout():
    """The compiled graph holds each int4 linear's weight once, in the layout of the kernel the IR names (no copy
    in another layout, no candidate precision left over): about 1/8 of the fp32 bytes plus the scales and zeros."""
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    cm = fxcc.compile(model, passes="canonicalize,raise,mixed-precision{policy=int4,reps=2,budget=0.05},fuse,"
                                    "codegen{backend=extern}")
    with torch.no_grad():
        cm(ids)
    rep = mixed_precision_report(cm)
    gm = cm.variants[-1].gm
    derived = {n: t for n, t in gm.named_buffers() if n.startswith("_mp_")}
    assert derived and all(t.dtype == torch.uint8 or n.endswith("_scale") for n, t in derived.items())
    w_int4 = sum(math.prod(r.shape[1:]) for r in rep.layers if r.precision == "int4")  # K * N of the int4 linears
    held = sum(t.numel() * t.element_size() for t in derived.values())
    packed = sum(t.numel() for t in derived.values() if t.dtype == torch.uint8)
    assert packed == w_int4 // 2  # two weights a byte, each weight once
    assert held <= 0.16 * 4 * w_int4  # with fp32 scales and zeros per group of 128: 1/8 + 1/16 of fp32 bytes
