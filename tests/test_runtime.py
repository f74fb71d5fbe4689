"""CompiledModule at run time: guards, variants, recompiles on parameter changes, the eager fallback."""

from __future__ import annotations

import re
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn


class Scaled(nn.Module):
    """`self.w * 2 + 1` only reads a parameter, so canonicalize folds it into a constant."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.lin(x)) * (self.w * 2 + 1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Scaled().eval()


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_parameter_only_subgraph_is_folded(model):
    cm = fxcc.compile(model)
    cm(torch.randn(2, 8))
    canon = next(r for r in cm.variants[-1].records if r.spec == "canonicalize")
    assert canon.result.stats.get("folded") == 1
    assert '= param "_folded_' in fxcc.print_graph(cm.variants[-1].gm)


def test_new_shape_compiles_a_variant(model):
    cm = fxcc.compile(model)
    a, b = torch.randn(2, 8), torch.randn(5, 3, 8)
    close(cm(a), model(a))
    assert cm.stats.compiles == 1
    close(cm(b), model(b))
    assert cm.stats.compiles == 2 and len(cm.variants) == 2
    close(cm(a), model(a))
    a2 = torch.randn(2, 8)
    close(cm(a2), model(a2))
    assert cm.stats.compiles == 2
    assert cm.stats.history == ["tensor<2x8xf32>", "tensor<5x3x8xf32>"]


def test_same_shape_new_values_do_not_recompile(model):
    cm = fxcc.compile(model)
    for _ in range(3):
        x = torch.randn(4, 8)
        close(cm(x), model(x))
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0


def test_dtype_change_recompiles(model):
    cm = fxcc.compile(model)
    x = torch.randn(2, 8)
    close(cm(x), model(x))
    m64 = model.double()
    cm.double()  # methods of the module are forwarded
    y = cm(x.double())
    assert y.dtype == torch.float64
    assert cm.stats.compiles == 2
    torch.testing.assert_close(y, m64(x.double()))


def test_input_dtype_change_recompiles():
    @fxcc.compile
    def f(x):
        return torch.softmax(x * 2, dim=-1)

    x = torch.randn(3, 5)
    close(f(x), torch.softmax(x * 2, dim=-1))
    y = f(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.softmax(x.double() * 2, dim=-1))
    assert f.fxcc.stats.compiles == 2
    assert f.fxcc.stats.history == ["tensor<3x5xf32>", "tensor<3x5xf64>"]


def test_max_variants_bounds_each_input_structure_apart():
    """A generate's prefill (an empty cache) and its decode steps (a filled one) are two input structures: the
    variants one of them spends (a sliding-window cache's branches, per batch class) left the other none, and it ran
    eagerly from its first call (gemma2 with a DynamicCache, batch 1 then 2)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()

    def step(x, past=None):
        return lin(x) if past is None else lin(x) + past["k"].sum(-2, keepdim=True)

    cm = fxcc.compile(step, options=fxcc.CompileOptions(max_variants=2, dynamic=False))
    for n in (1, 2):  # the first structure spends the bound
        cm(torch.randn(n, 8))
    x, past = torch.randn(1, 8), {"k": torch.randn(3, 8)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiled, not eagerly with a warning
        close(cm(x, past), step(x, past))
    assert cm.fxcc.stats.compiles == 3 and cm.fxcc.stats.eager_calls == 0
    past = {"k": torch.randn(3, 8), "v": None}  # a third structure: past the bound on structures
    with pytest.warns(UserWarning, match=r"compiled variants for 2 input structures \(max_variants=2\)"):
        close(cm(x, past), step(x, past))


def test_past_max_variants_runs_eagerly_with_a_warning(model):
    # static shapes only: with automatic dynamic the second batch size would compile a symbolic variant
    cm = fxcc.compile(model, options=fxcc.CompileOptions(max_variants=2, dynamic=False))
    for n in (1, 2):
        cm(torch.randn(n, 8))
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match=r"Scaled already has 2 compiled variants \(max_variants=2\)"):
        y = cm(x)
    close(y, model(x))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the signature is known to run eagerly: no second warning
        close(cm(x), model(x))
    assert cm.stats.eager_calls == 2
    x2 = torch.randn(2, 8)  # a compiled signature still runs compiled
    close(cm(x2), model(x2))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 2


def test_in_place_update_of_a_folded_parameter_recompiles(model):
    cm = fxcc.compile(model)
    x = torch.randn(2, 8)
    before = cm(x)
    close(before, model(x))
    with torch.no_grad():
        model.w.add_(1)  # feeds the folded constant
    after = cm(x)
    close(after, model(x))
    assert not torch.allclose(before, after)
    assert cm.stats.compiles == 2 and cm.stats.param_recompiles == 1
    with torch.no_grad():
        model.lin.weight.mul_(2)  # read live by the compiled code: right without compiling again
    close(cm(x), model(x))
    assert cm.stats.param_recompiles == 1


def test_in_place_update_through_the_compiled_module(model):
    cm = fxcc.compile(model)
    x = torch.randn(2, 8)
    cm(x)
    with torch.no_grad():
        for p in cm.parameters():
            p.add_(0.5)
    close(cm(x), model(x))
    assert cm.stats.param_recompiles == 1


def test_replacing_a_parameter_recompiles(model):
    cm = fxcc.compile(model)
    x = torch.randn(2, 8)
    cm(x)
    model.w = nn.Parameter(torch.full((8,), 3.0))
    close(cm(x), model(x))
    assert cm.stats.param_recompiles == 1 and cm.stats.compiles == 2
    model.lin = nn.Linear(8, 8)
    close(cm(x), model(x))
    assert cm.stats.param_recompiles == 2


def test_parameter_change_drops_every_shape_variant(model):
    cm = fxcc.compile(model)
    a, b = torch.randn(2, 8), torch.randn(3, 8)
    cm(a), cm(b)
    with torch.no_grad():
        model.w.zero_()
    close(cm(a), model(a))
    close(cm(b), model(b))
    assert cm.stats.compiles == 4 and cm.stats.param_recompiles == 1


def test_buffer_update_recompiles():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.ones(4))

        def forward(self, x):
            return x + self.shift.exp()

    m = WithBuffer()
    cm = fxcc.compile(m)
    x = torch.randn(4)
    close(cm(x), m(x))
    m.shift.fill_(-2.0)
    close(cm(x), m(x))
    assert cm.stats.param_recompiles == 1


def test_train_and_eval_are_separate_variants(model):
    cm = fxcc.compile(model)
    x = torch.randn(4, 8)
    assert cm.eval() is cm  # methods that return the module return the compiled module
    y_eval = cm(x)
    close(y_eval, model(x))
    assert cm.train() is cm and model.training
    torch.manual_seed(1)
    with torch.no_grad():  # with gradients enabled, training mode runs eagerly (tests/test_torch_conventions.py)
        y_train = cm(x)
    assert cm.stats.compiles == 2 and len(cm.variants) == 2
    dropped = y_train == 0
    assert dropped.any() and not dropped.all()  # dropout is active in the training variant
    close(y_train[~dropped], 2 * y_eval[~dropped])
    cm.eval()
    close(cm(x), y_eval)
    assert cm.stats.compiles == 2


def test_outputs_do_not_require_grad(model):
    """Inference: an eval-mode model's compiled outputs carry no autograd history, though its parameters require
    gradients (an input that requires them runs eagerly: test_torch_conventions)."""
    cm = fxcc.compile(model)
    x = torch.randn(2, 8)
    y = cm(x)
    assert model(x).requires_grad
    assert not y.requires_grad and y.grad_fn is None


def test_returned_tensors_are_fresh_each_call():
    class ConstOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x + 1, self.w * 2

    cm = fxcc.compile(ConstOut().eval())
    first = cm(torch.zeros(3))
    first[1].add_(5)  # the caller owns what it gets back
    second = cm(torch.zeros(3))
    close(second[1], torch.full((3,), 2.0))


def test_compiled_module_forwards_attributes(model):
    cm = fxcc.compile(model)
    assert list(cm.state_dict()) == list(model.state_dict())
    assert cm.lin is model.lin and cm.training is False
    assert [n for n, _ in cm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert "Scaled" in repr(cm)
    with pytest.raises(AttributeError):
        _ = cm.no_such_attribute


def test_explain_before_and_after_first_call(model):
    cm = fxcc.compile(model)
    assert "not compiled yet" in cm.explain()
    cm(torch.randn(2, 8))
    text = cm.explain()
    assert text.startswith("== Scaled: captured with export")
    assert "== passes" in text and "== final IR" in text and "kernel.fused" in text
    assert "0 eager regions" in text


def test_fxcc_explain_returns_ir_after_each_pass(model, capsys):
    text = fxcc.explain(model, torch.randn(2, 8))
    for name in ("canonicalize", "raise", "fuse", "codegen"):
        assert f"// -----// IR after {name} //----- //" in text
    assert capsys.readouterr().out == ""  # the report is returned, not printed as well


def test_print_ir_after_option_prints(model, capsys):
    cm = fxcc.compile(model, options=fxcc.CompileOptions(print_ir_after=("fuse",)))
    cm(torch.randn(2, 8))
    printed = capsys.readouterr()
    out = printed.err  # IR is a report: stderr, never stdout
    assert "// -----// IR after fuse //----- //" in out and "kernel.fused" in out and printed.out == ""
    assert "IR after canonicalize" not in out
    records = cm.variants[-1].records
    assert [r.spec for r in records if r.ir_after is not None] == ["fuse"]
    assert [r.spec for r in records] == fxcc.DEFAULT_PIPELINE.split(",")


def test_env_variables_map_onto_options(model, monkeypatch, capsys):
    monkeypatch.setenv("FXCC_PRINT_IR_AFTER", "canonicalize")
    monkeypatch.setenv("FXCC_VERIFY_EACH", "1")
    cm = fxcc.compile(model)
    cm(torch.randn(2, 8))
    assert "// -----// IR after canonicalize //----- //" in capsys.readouterr().err
    canon = next(r for r in cm.variants[-1].records if r.spec == "canonicalize")
    assert canon.ir_after.startswith("func @forward(%x: tensor<2x8xf32>)")


@pytest.mark.parametrize("name, value, message", [
    ("FXCC_PRINT_IR_AFTER", "rise", "FXCC_PRINT_IR_AFTER names no pass: 'rise'; passes: all, "),
    ("FXCC_VERIFY_EACH", "maybe", "FXCC_VERIFY_EACH='maybe' is not a yes/no value; use one of 1, 0, true"),
    ("FXCC_LOGS", "recompile", "unknown log topic 'recompile'; topics: recompiles, passes, kernels, tuning"),
    ("FXCC_LOGS", "+tunning", "unknown log topic 'tunning'"),
    ("FXCC_TVM_POOL", "omp", "FXCC_TVM_POOL='omp'; use one of openmp, tvm"),
])
def test_unknown_names_in_fxcc_settings_are_errors_listing_the_valid_ones(model, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        fxcc.compile(model)


def test_every_recompile_logs_its_reason_under_fxcc_logs(model, monkeypatch, capsys):
    monkeypatch.setenv("FXCC_LOGS", "recompiles")
    try:
        cm = fxcc.compile(model, tune="off")
        cm(torch.randn(2, 8))
        cm(torch.randn(3, 8))
        cm(torch.randn(3, 8).t().contiguous().t())  # same shape, other strides: a variant of its own (eager's
        cm(torch.randn(5, 8).t().contiguous().t())  # output strides), symbolic at once, serving other sizes
        cm(torch.randn(3, 8)[None])
        with torch.no_grad():
            model.w.add_(1)  # folded into a constant: compiled code depends on its value
        cm(torch.randn(3, 8))
    finally:
        monkeypatch.delenv("FXCC_LOGS")
        fxcc.compile(model)  # the next compile takes the topics' handler away
    err = capsys.readouterr().err.splitlines()
    reasons = [line for line in err if "recompiling" in line]
    assert len(reasons) == 4 and reasons[:3] == [
        "[fxcc INFO] fxcc.recompiles: recompiling Scaled: input `x` dim 0 is 3 where this variant has 2 (variant 1): "
        "x dim 0: 2 -> 3; symbolic: x dim 0",
        "[fxcc INFO] fxcc.recompiles: recompiling Scaled: input `x`'s strides (1, 3) differ from (8, 1): it is dims "
        "(0, 1) innermost first where the variant serves contiguous inputs (variant 2); symbolic: x dim 0",
        "[fxcc INFO] fxcc.recompiles: recompiling Scaled: new input structure (tensor<1x3x8xf32>); static shapes",
    ], err[:3]
    assert reasons[3].startswith("[fxcc INFO] fxcc.recompiles: recompiling Scaled: the contents of w changed")
    assert cm.stats.compiles == 5 and cm.stats.param_recompiles == 1


def test_two_models_keep_their_own_kernel_choices(tmp_path, monkeypatch):
    """The same kernel body chosen differently by two compiles in one process: each variant keeps its own
    (the choice is an attribute of the kernel op; the built kernels belong to the variant)."""
    pytest.importorskip("tvm")
    from fxcc.dialects import KERNEL_OPS, choice_of

    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    a, b = Scaled().eval(), Scaled().eval()
    b.load_state_dict(a.state_dict())  # identical models: identical kernel bodies
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = a(x)
        ca = fxcc.compile(a, passes="canonicalize,raise,fuse,codegen{backend=extern}")
        cb = fxcc.compile(b, passes="canonicalize,raise,fuse,codegen{backend=tvm}")
        torch.testing.assert_close(ca(x), expected)
        torch.testing.assert_close(cb(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ca(x), expected)  # still its own kernels after the other compile
    va, vb = ca.variants[-1], cb.variants[-1]
    assert set(va.kernels) == set(vb.kernels)  # the same bodies (keys are content hashes) ...
    assert {k.backend for k in va.kernels.values()} == {"extern"}  # ... with their own choices
    assert any(k.backend.startswith("tvm") for k in vb.kernels.values())
    for v in (va, vb):  # the IR records each variant's choice, and the variant built exactly that
        for n in v.gm.graph.nodes:
            if n.op == "call_function" and n.target in KERNEL_OPS:
                assert choice_of(n) == v.kernels[n.args[1]].choice
    assert 'backend = "extern"' in fxcc.print_graph(va.gm) and 'backend = "tvm' in fxcc.print_graph(vb.gm)


def test_a_none_argument_between_tensors_keeps_its_place_on_later_calls():
    """A call `cm(x, None, mask)` is served from the keyword-call table after its first calls: None is a leaf of the
    graph's inputs there too, so the tensors after it (and the graph's own weights) stay in their places."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, bias=None, mask=None):
            y = self.lin(x)
            if bias is not None:
                y = y + bias
            return y.masked_fill(mask[..., None], 0.0) if mask is not None else y

    torch.manual_seed(0)
    m = Masked().eval()
    cm = fxcc.compile(m)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(cm(x, None, mask), m(x, None, mask))
            torch.testing.assert_close(cm(x, None, mask=mask), m(x, None, mask=mask))
    assert cm.stats.compiles == 2
