"""The stride contract: every value has, at run time, the layout the IR records for it.

A `view` after a kernel works only on the strides it was traced with; canonicalize keeps the copies
that give a view its layout, a kernel's outputs have the strides its body computes (backends that write
another layout are copied into it), tx ops record their reference's layout, and verify-each names the pass
that breaks any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from fxcc import ir
from fxcc.capture import capture
from fxcc.codegen import Built
from fxcc.codegen.executable import BuiltKernel, layout_kept
from fxcc.dialects import KERNEL_OPS, Choice, kernel_body
from fxcc.pipeline import Pass, PassContext, PassManager, PassResult, parse_pipeline

aten = torch.ops.aten


class HeadsToBatch(nn.Module):
    """DeBERTa's transpose_for_scores: split heads, permute, `.contiguous()`, then a view that needs it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.proj(x).view(b, t, 4, 4).permute(0, 2, 1, 3).contiguous()
        return torch.relu(h.view(-1, t, 4)).sum(-1)


class Contiguous(nn.Module):
    """A `.contiguous()` of a value that already is: nothing to keep."""

    def forward(self, x):
        return (x * 2).contiguous().view(-1) + 1


def run(model, pipeline, *args, verify_each=True):
    gm = capture(model, args, {}).gm
    ctx = PassContext(options=fxcc.CompileOptions(), module=model, example_inputs=(args, {}), target="cpu")
    pm = PassManager(parse_pipeline(pipeline), verify_each=verify_each)
    return pm.run(gm, ctx)


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_canonicalize_keeps_the_copy_a_view_needs():
    model, x = HeadsToBatch().eval(), torch.randn(2, 5, 16)
    gm = run(model, "canonicalize", x)
    assert {aten.contiguous.default, aten.clone.default} & set(targets(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x))


def test_canonicalize_drops_a_copy_that_changes_no_layout():
    gm = run(Contiguous(), "canonicalize", torch.randn(3, 4))
    assert not {aten.contiguous.default, aten.clone.default} & set(targets(gm))


@pytest.fixture
def copy_dropping_pass(scratch_registry):
    """canonicalize as it was before the contract: every `.contiguous()` forwarded to its input."""

    @fxcc.register
    @dataclass(frozen=True)
    class DropCopies(Pass):
        name = "test-drop-copies"

        def apply(self, gm, ctx):
            for n in list(gm.graph.nodes):
                if n.target in (aten.contiguous.default, aten.clone.default):
                    n.replace_all_uses_with(n.args[0])
                    gm.graph.erase_node(n)
            return PassResult(True)


def test_verify_each_names_a_pass_that_drops_a_needed_copy(copy_dropping_pass):
    with pytest.raises(fxcc.VerificationError, match=r"^after pass 'test-drop-copies': %view_\d+ = aten.view "
                                                     r"fails on its operands: ValueError: Cannot view a tensor"):
        run(HeadsToBatch().eval(), "test-drop-copies,fuse", torch.randn(2, 5, 16))


class TransposedOut(nn.Module):
    """A fused kernel whose output is a transposed layout (a pointwise op on a transposed view keeps its layout;
    the view itself, returned, would stay a view outside the kernel)."""

    def forward(self, x):
        return (torch.sigmoid(x) + 1).transpose(1, 2) * 2


def test_verify_rejects_a_kernel_recorded_with_other_strides():
    x = torch.randn(2, 3, 4)
    gm = run(TransposedOut(), "canonicalize,fuse", x)
    kernel = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS
                  and not n.meta["val"][0].is_contiguous())
    ir.verify(gm)  # as fuse records it: the body's own strides
    kernel.meta["val"] = [v.contiguous() for v in kernel.meta["val"]]
    with pytest.raises(fxcc.VerificationError, match=rf"%{kernel.name} = kernel.fused is recorded with strides "
                                                     r"\(\(12, 3, 1\),\) but computes \(\(12, 1, 4\),\)"):
        ir.verify(gm)


def test_a_backend_output_in_another_layout_is_copied_into_the_recorded_one():
    x = torch.randn(2, 3, 4)
    gm = run(TransposedOut(), "canonicalize,fuse", x)
    key = next(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS
               and not n.meta["val"][0].is_contiguous())
    kb = kernel_body(key)
    want = [o.stride() for o in kb.body(x)]
    contiguous = Built(lambda inputs: [o.contiguous() for o in kb.body(*inputs)])
    outs = layout_kept(BuiltKernel(kb, Choice("test", "extern"), contiguous))([x])
    assert [o.stride() for o in outs] == want
    torch.testing.assert_close(outs[0], kb.body(x)[0])


@pytest.mark.parametrize("op, args", [
    (torch.ops.fxcc_tx.softmax.default, lambda x: (x.transpose(1, 2), -1)),
    (torch.ops.fxcc_tx.gelu.default, lambda x: (x.transpose(1, 2), "none")),
    (torch.ops.fxcc_tx.attention.default, lambda x: (x.view(2, 3, 2, 2).transpose(1, 2),) * 3 + (None, 0.5, False)),
])
def test_tx_ops_record_the_layout_their_reference_produces(op, args):
    x = torch.randn(2, 3, 4)
    real = op(*args(x))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*args(mode.from_tensor(x)))
    assert fake.stride() == real.stride()


@pytest.mark.parametrize("arch", ["deberta-v2", "swin"])
def test_deberta_v2_and_swin_match_eager_on_two_shapes(arch):
    """Both raised `view size is not compatible` at the first call before the contract (canonicalize dropped
    the `.contiguous()` their views need). Kernels from the extern backend: TVM builds for every kernel of
    Swin take minutes here; a backend's own output layout is the layout_kept test's."""
    from fxcc import zoo_models as zm

    model = zm.build(arch)
    recipe = zm.recipes(model)[0]
    cm = fxcc.compile(model, passes=fxcc.DEFAULT_PIPELINE.replace("codegen", "codegen{backend=extern}"),
                      options=fxcc.CompileOptions(verify_each=True))
    for shape in range(len(zm.SHAPES)):
        kwargs = recipe.make(model, shape)
        with torch.no_grad():
            assert_outputs_close(cm(**kwargs), model(**kwargs), atol=1e-5, rtol=1e-4)


def test_a_symbolic_output_layout_gives_dense_strides_in_its_order_for_each_size():
    """A variant serving many sizes records its kernels' output strides as expressions of its symbols: the
    contract then asks for the dense strides in the recorded dimension order, computed for the call's sizes
    (a symbolic stride cannot be allocated)."""
    from fxcc.codegen.executable import _layout
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    real = torch.empty(4, 8, 6).permute(0, 2, 1)  # shape (4, 6, 8), dimension 1 innermost
    fake = mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3))
    assert not all(type(s) is int for s in fake.stride())
    strides = _layout(fake)
    assert callable(strides)
    assert strides(torch.Size([4, 6, 8])) == real.stride()
    assert strides(torch.Size([3, 5, 7])) == torch.empty(3, 7, 5).permute(0, 2, 1).stride()
    assert _layout(real) == real.stride()  # numbers stay numbers


# ------------------------------------------------------------------ the contract at the call: eager's output strides

TVM = "canonicalize,raise,fuse,codegen{backend=tvm}"  # kernels that write the layout their IR records


def gelu_times(a, b):
    return torch.nn.functional.gelu(a) * b + a


def compiled(fn, passes=TVM, **options):
    return fxcc.compile(fn, passes=passes, options=fxcc.CompileOptions(check_eager=False, graph_cache=False,
                                                                       **options))


def transposed(*shape):
    return torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))


def test_a_transposed_input_gives_eagers_output_strides_and_compiles_its_own_variant(caplog):
    pytest.importorskip("tvm")
    f = compiled(gelu_times)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert f(a, b).stride() == (16, 1)
    at, bt = transposed(4, 16), transposed(4, 16)
    with caplog.at_level("INFO", logger="fxcc.recompiles"):
        got = f(at, bt)
    assert got.stride() == gelu_times(at, bt).stride() == (1, 4)
    torch.testing.assert_close(got, gelu_times(at, bt))
    assert f.fxcc.stats.compiles == 2
    assert ("input `a`'s strides (1, 4) differ from (16, 1): it is dims (0, 1) innermost first where the variant "
            "serves contiguous inputs (variant 1)") in f.fxcc.stats.reasons[-1]
    assert "strides (1, 4) differ from (16, 1)" in caplog.text
    assert f(a, b).stride() == (16, 1)  # each layout keeps its variant
    shifted = torch.randn(5, 16)[1:]  # another storage offset: no recompile
    torch.testing.assert_close(f(shifted, b), gelu_times(shifted, b))
    assert f.fxcc.stats.compiles == 2


def test_a_view_on_the_output_that_works_in_eager_works_compiled():
    pytest.importorskip("tvm")
    f = compiled(gelu_times)
    f(torch.randn(6, 8), torch.randn(6, 8))
    a, b = transposed(6, 8), transposed(6, 8)
    want = gelu_times(a, b).t().view(-1)  # eager's output is the transpose of a contiguous tensor
    torch.testing.assert_close(f(a, b).t().view(-1), want)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.c2(torch.relu(self.c1(x)))) * x


def test_a_channels_last_conv_net_gives_a_channels_last_output_as_eager():
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    model = ConvNet().eval()
    cm = compiled(model)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert cm(x).is_contiguous()
        cl = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
        got, want = cm(cl), model(cl)
    assert want.is_contiguous(memory_format=torch.channels_last)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


def test_a_symbolic_variant_serves_strided_inputs_of_other_sizes_with_eagers_strides():
    """Sizes that change make a symbolic variant; a transposed input is another layout class, compiled
    symbolic at once (the sizes already varied), which then serves transposed inputs of other sizes."""
    pytest.importorskip("tvm")
    f = compiled(gelu_times)
    for rows in (4, 7):
        f(torch.randn(rows, 16), torch.randn(rows, 16))
    assert f.fxcc.stats.compiles == 2 and "symbolic" in f.fxcc.stats.reasons[-1]
    for rows in (5, 9, 3):
        a, b = transposed(rows, 16), transposed(rows, 16)
        got = f(a, b)
        assert got.stride() == gelu_times(a, b).stride() == (1, rows)
        torch.testing.assert_close(got, gelu_times(a, b))
    assert f.fxcc.stats.compiles == 3
    assert "input `a`'s strides (1, 5) differ from (16, 1)" in f.fxcc.stats.reasons[-1]
    assert "symbolic" in f.fxcc.stats.reasons[-1]
    wide = [torch.randn(6, 32)[:, ::2] for _ in range(2)]  # gapped rows: eager's output is dense
    assert f(*wide).stride() == gelu_times(*wide).stride() == (16, 1)


def _gelu_mix(a, b):
    return torch.nn.functional.gelu(a) * b + a.sum(-1, keepdim=True) - b.mean()


def test_a_symbolic_kernel_for_transposed_inputs_is_not_the_row_major_ones():
    """Batch-symbolic variants for row-major inputs, then for transposed ones: the kernel bodies print alike
    but for their strides (`(1, s0)` against `(16, 1)`), so their text records symbolic strides too; sharing
    one key, the transposed variant ran the row-major body and returned row-major outputs (tvm codegen)."""
    pytest.importorskip("tvm")
    cm = fxcc.compile(_gelu_mix, passes="canonicalize,raise,fuse,codegen{backend=tvm}",
                      options=fxcc.CompileOptions(time_vs_eager=False, graph_cache=False))
    for b in (4, 7):
        cm(torch.randn(b, 16), torch.randn(b, 16))
    for b in (5, 9):
        a, x = torch.randn(16, b).t(), torch.randn(16, b).t()
        got, want = cm(a, x), _gelu_mix(a, x)
        assert got.stride() == want.stride() == (1, b)
        torch.testing.assert_close(got, want)

