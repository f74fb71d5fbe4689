"""Capture: torch.export first, symbolic_trace as fallback, and a CaptureError naming the user's line."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc.capture import capture, flatten_inputs
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

CALLS = {"scaled_sin": 0, "no_fake_cos": 0}


@torch.library.custom_op("fxcc_test_capture::scaled_sin", mutates_args=())
def scaled_sin(x: torch.Tensor, scale: float) -> torch.Tensor:
    CALLS["scaled_sin"] += 1
    return torch.sin(x) * scale


@scaled_sin.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("fxcc_test_capture::no_fake_cos", mutates_args=())
def no_fake_cos(x: torch.Tensor) -> torch.Tensor:
    CALLS["no_fake_cos"] += 1
    return torch.cos(x) * 3


class WithCustomOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.op = op

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x)))) + 1


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # depends on tensor values: neither export nor symbolic_trace can follow it
            return h * 2
        return h - 1


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 8)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_export_is_the_first_choice(x):
    m = nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()
    cap = capture(m, (x,), {})
    assert cap.method == "export" and cap.export_error is None
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1  # parameters are attributes of the graph, not inputs
    ops = {str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function"}
    assert any(op.startswith("aten.") for op in ops)  # aten level
    out = cap.gm(x)
    close(torch.utils._pytree.tree_unflatten(list(out), cap.out_spec), m(x))


def test_flatten_inputs_ignores_keyword_order():
    a, b = torch.ones(1), torch.zeros(2)
    flat1, spec1 = flatten_inputs((a,), {"y": b, "x": a})
    flat2, spec2 = flatten_inputs((a,), {"x": a, "y": b})
    assert spec1 == spec2 and all(p is q for p, q in zip(flat1, flat2))


def test_data_dependent_control_flow_is_a_capture_error():
    cm = fxcc.compile(Branchy().eval(), options=fxcc.CompileOptions(dycl=False))  # DyCL would split it (test_dycl.py)
    with pytest.raises(fxcc.CaptureError) as e:
        cm(torch.randn(3, 4))
    msg = str(e.value)
    assert msg.startswith("fxcc cannot capture Branchy: control flow depends on tensor values")
    assert "test_capture.py:" in msg and "in forward" in msg
    assert "`if h.sum() > 0:" in msg
    assert "symbolic_trace fallback failed too" in msg
    assert "To proceed: make the condition independent of tensor values" in msg
    assert isinstance(e.value, RuntimeError)


def test_capture_error_in_function_names_its_line():
    def gate(x):
        return x * 2 if x.max() > 0.5 else x

    with pytest.raises(fxcc.CaptureError, match=r"cannot capture .*gate") as e:
        fxcc.compile(gate, options=fxcc.CompileOptions(dycl=False))(torch.randn(5))
    assert "return x * 2 if x.max() > 0.5 else x" in str(e.value)
    assert "test_capture.py" in str(e.value)


def test_shape_dependent_control_flow_is_fine():
    class ByShape(nn.Module):
        def forward(self, x):
            if x.shape[0] > 2:
                return x.sum(0)
            return x * 3

    m = ByShape()
    cm = fxcc.compile(m)
    for n in (2, 4):
        x = torch.randn(n, 3)
        close(cm(x), m(x))
    assert cm.stats.compiles == 2


def test_custom_op_runs_eagerly_inside_the_compiled_graph(x):
    m = WithCustomOp(lambda h: scaled_sin(h, 0.5)).eval()
    ref = m(x)
    cm = fxcc.compile(m)
    close(cm(x), ref)  # compiles; this first call also runs eager, to check the compiled result
    calls = CALLS["scaled_sin"]
    close(cm(x), ref)
    assert CALLS["scaled_sin"] == calls + 1  # the op's own kernel ran, once
    v = cm.variants[-1]
    assert v.captured.method == "export"
    text = cm.explain()
    row = next(line for line in text.splitlines() if line.strip().startswith("%scaled_sin"))
    assert "fxcc_test_capture.scaled_sin" in row
    assert "eager: fxcc_test_capture.scaled_sin is not an aten/tx op; fxcc has no lowering for it" in row
    assert "1 eager regions" in text
    assert "kernel.fused" in text  # the linears around it still run as kernels


def test_custom_op_without_fake_kernel_falls_back_to_symbolic_trace(x):
    m = WithCustomOp(no_fake_cos).eval()
    ref = m(x)
    cm = fxcc.compile(m)
    calls = CALLS["no_fake_cos"]
    close(cm(x), ref)
    assert CALLS["no_fake_cos"] > calls
    cap = cm.variants[-1].captured
    assert cap.method == "symbolic_trace"
    assert "no fake impl registered" in cap.export_error.lower()
    text = cm.explain()
    assert text.startswith("== WithCustomOp: captured with symbolic_trace (torch.export failed: ")
    row = next(line for line in text.splitlines() if "fxcc_test_capture.no_fake_cos" in line
               and line.strip().startswith("%"))
    assert "eager:" in row
    x2 = torch.randn(5, 8)
    close(cm(x2), m(x2))  # a second shape works the same way


def test_custom_op_without_fake_kernel_passes_the_verifier(x):
    m = WithCustomOp(no_fake_cos).eval()
    cm = fxcc.compile(m, options=fxcc.CompileOptions(verify_each=True))
    close(cm(x), m(x))
    assert cm.variants[-1].captured.method == "symbolic_trace"


def test_symbolic_trace_keeps_keyword_arguments():
    class Kw(nn.Module):
        def forward(self, x, *, scale=None, shift=None):
            return no_fake_cos(x) * scale + shift

    m = Kw()
    x, scale, shift = torch.randn(3), torch.randn(3), torch.randn(3)
    cm = fxcc.compile(m)
    close(cm(x, shift=shift, scale=scale), m(x, shift=shift, scale=scale))
    assert cm.variants[-1].captured.method == "symbolic_trace"


def test_symbolic_trace_keeps_structured_outputs(x):
    class Structured(nn.Module):
        def forward(self, x):
            c = no_fake_cos(x)
            return {"c": c, "pair": (c + 1, x)}

    m = Structured()
    out = fxcc.compile(m)(x)
    ref = m(x)
    assert set(out) == {"c", "pair"} and isinstance(out["pair"], tuple)
    close(out["c"], ref["c"])
    close(out["pair"][0], ref["pair"][0])
    close(out["pair"][1], x)


class VmapMask(nn.Module):
    """transformers' mask construction: a mask function of (batch, query, key) indices, vmapped over each, that
    reads the padding mask at batched indices (torch.export records the vmap as functorch calls)."""

    def forward(self, x, padding):
        b, t = padding.shape

        def allowed(i, q, k):
            return (k <= q) & (q - k < 3) & padding[i, k]

        idx = torch.arange(t)
        over_k = torch.vmap(allowed, in_dims=(None, None, 0))
        with TransformGetItemToIndex():  # as transformers: `padding[i, k]` of batched indices is an index op
            mask = torch.vmap(torch.vmap(over_k, in_dims=(None, 0, None)), in_dims=(0, None, None))(torch.arange(b), idx,
                                                                                                   idx)
        return torch.softmax((x @ x.transpose(1, 2)).masked_fill(~mask, -1e4), -1) @ x


def vmap_inputs(b, t):
    torch.manual_seed(0)
    padding = torch.ones(b, t, dtype=torch.bool)
    padding[0, t - 2:] = False
    return torch.randn(b, t, 8), padding


def test_a_vmap_is_captured_as_the_batched_aten_ops_it_computes():
    m = VmapMask()
    gm = capture(m, vmap_inputs(2, 5), {}).gm
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "functorch" in getattr(n.target, "__module__", "")]
    cm = fxcc.compile(m)
    for b, t in ((2, 5), (3, 7)):  # the second size compiles symbolic
        close(cm(*vmap_inputs(b, t)), m(*vmap_inputs(b, t)))
    assert not cm.eager_signatures and all(v.gm is not None for v in cm.variants)


def test_a_vmap_that_cannot_be_traced_is_a_capture_error_naming_it(monkeypatch):
    import fxcc.capture

    def fails(*args, **kwargs):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(fxcc.capture, "make_fx", fails)
    with pytest.raises(fxcc.CaptureError, match=r"^fxcc cannot capture VmapMask: a torch.vmap \(File .*test_capture.py"
                                                 r".* in forward: `mask = torch.vmap.*`\) could not be traced into "
                                                 r"batched aten ops: RuntimeError: no batching rule"):
        capture(VmapMask(), vmap_inputs(2, 5), {})


class ConvertsInForward(nn.Module):
    """Switch Transformers' router converts its classifier in every forward (a no-op in float32)."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        self.classifier = self.classifier.to(x.dtype)
        return self.classifier(x).softmax(-1)


def test_a_module_converted_in_forward_without_change_is_exported(x):
    m = ConvertsInForward().eval()
    cap = capture(m, (x,), {})
    assert cap.method == "export", cap.export_error
    close(torch.utils._pytree.tree_unflatten(list(cap.gm(x)), cap.out_spec), m(x))
    assert m.classifier.weight.dtype == torch.float32 and type(m.classifier.weight) is nn.Parameter


def _raises_when_negative(x):
    try:
        if x.sum() < 0:
            raise ValueError("negative")
        y = x + 1
    except ValueError:  # torch.fx's TraceError is a ValueError: a trace would land here whatever the values
        y = x - 1
    return y


class _CatchesAll(nn.Module):
    def forward(self, x):
        try:
            if x.sum() < 0:  # export's data-dependent guard error is an Exception
                return x * 2
        except Exception:
            pass
        return x * 3


@pytest.mark.parametrize("make", [lambda: _raises_when_negative, _CatchesAll], ids=["function", "module"])
def test_a_try_that_catches_the_tracers_own_error_is_not_traced_through_its_except(make):
    """The first call takes the branch a swallowed tracing error would also take, so its check against eager
    passes; later calls take the other branch. The capture sees the error it raised was caught and does not
    keep that trace: DyCL runs the `try` as written, with its warning."""
    model = make()
    cm = fxcc.compile(model)
    x = torch.ones(2, 3)
    with pytest.warns(UserWarning, match="try"):
        torch.testing.assert_close(cm(-x), model(-x))
    for inp in (x, 2 * x, -x):
        torch.testing.assert_close(cm(inp), model(inp))
