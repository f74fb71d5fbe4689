"""mixed-precision: quantize/dequantize ops, int8/fp8 linear kernels against their reference, Triton
quantized GEMMs under the interpreter (GPU: marked, skipped without CUDA), and the pass: IR, per-layer
report, budget, policy errors."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc.codegen import quant
from fxcc.passes.mixed_precision import _error, mixed_precision_report
from fxcc.pipeline import PipelineError, parse_pipeline

tx = torch.ops.fxcc_tx
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_int8_weight_only(lin, dtype):
    tq = _triton()
    x, w, b, qw, ws = lin
    x = x.to(dtype)
    got = tq.int8_weight_linear(x, qw, ws, b)
    ref = quant._int8_ref(x, qw, ws, b, "none")
    assert got.dtype == dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=1e-2)


@pytest.mark.parametrize("cfg", [(32, 4, 32, 4, 3), (32, 2, 128, 4, 3)])
def test_triton_int8_split_k_twice(cfg):
    """Split-K (decode): partial sums meet in a workspace the last program of a tile empties, so a second
    call on the same workspace gives the same result."""
    tq = _triton()
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 256), torch.randn(96, 256), torch.randn(96)
    qw, ws = quant.quantize_weight(w, "int8")
    ref = quant._int8_ref(x, qw, ws, b, "none")
    for _ in range(2):
        y = torch.full((3, 96), float("nan"))
        tq._launch_splitk(x, qw, ws, b, y, cfg)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [False, True])
def test_triton_int8_residual_epilogue(lin, split):
    tq = _triton()
    x, w, b, qw, ws = lin
    r = torch.randn(2, 5, 48)
    want = quant._int8_ref(x, qw, ws, b, "none") + r
    if split:
        y = torch.empty(10, 48)
        tq._launch_splitk(x.reshape(10, 64), qw, ws, b, y, (32, 2, 32, 4, 3), r.reshape(10, 48))
        got = y.reshape(2, 5, 48)
    else:
        got = tx.int8_linear(x, qw, ws, b, "none", "triton", r)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tx.int8_linear(x, qw, ws, b, "none", "dequant", r), want, atol=1e-3, rtol=1e-3)


def test_triton_quantize_rows_matches_tx_quantize():
    tq = _triton()
    x = torch.randn(5, 300) * torch.logspace(-1, 1, 5)[:, None]
    q, s = tq.quantize_rows(x, "int8")
    q_ref, s_ref = tx.quantize(x, "int8")
    assert torch.equal(q, q_ref) and torch.allclose(s, s_ref)


def test_triton_int8_w8a8_per_token(lin):
    tq = _triton()
    x, w, b, qw, ws = lin
    got = tq.int8_w8a8_linear(x, qw, ws, b)
    torch.testing.assert_close(got, quant._int8_ref(x, qw, ws, b, "token"), atol=1e-3, rtol=1e-3)


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
                               quant._int8_ref(x, qw, ws, None, "none").float(), atol=0.5, rtol=2e-2)
    torch.testing.assert_close(tq.int8_w8a8_linear(x, qw, ws).float(),
                               quant._int8_ref(x, qw, ws, None, "token").float(), atol=0.5, rtol=2e-2)
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
    assert _error([ref], [out]) == pytest.approx(rep.measured_error, rel=0.2, abs=1e-6)
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
    assert _error([ref], [out]) <= budget * 1.5  # codegen may reorder fp32 sums; the pass measured on its own graph
    for r in rep.layers:
        assert r.precision == "keep" or r.error_alone[r.precision] <= budget


def test_bf16_policy_inserts_casts():
    cm, out, ref = _compile("bf16", 0.01)
    rep = mixed_precision_report(cm)
    assert {r.precision for r in rep.layers} == {"bf16"}
    assert rel(out, ref) < 0.02 and not torch.equal(out, ref)


def test_policy_errors():
    with pytest.raises(PipelineError, match="policy='int4' is not one of auto"):
        parse_pipeline("mixed-precision{policy=int4}")
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
    assert rep.measured_error <= rep.budget and _error([ref], [out]) <= rep.budget
    record = next(r for r in cm.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert record.result.stats["merged"] == 5  # q, k, v and gate, up
    # the residual adds fold only into the Triton kernel (GPU); CPU kernels leave them to `fuse`
    assert record.result.stats.get("residual", 0) == (2 if rep.layers[0].kernel == "triton" else 0)
    assert record.ir_after.count("tx.int8_linear(") == 4  # qkv, o, gate+up, down
    assert record.ir_after.count("aten.slice.Tensor(") == 5


def test_residual_add_folds_into_the_triton_kernel_only(lin):
    import torch.fx as fx
    from fxcc import ir
    from fxcc.passes.mixed_precision import _fold_residuals

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
