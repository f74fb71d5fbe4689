"""The IR: its MLIR-like text (golden), the FakeTensor verifier, and the PassManager's instrumentation.

Set FXCC_UPDATE_GOLDEN=1 to rewrite tests/golden/printer_*.mlir from the current output.
"""

from __future__ import annotations

from dataclasses import dataclass

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import ir
from fxcc.capture import capture
from fxcc.dialects import KERNEL_OPS, choice_of
from fxcc.pipeline import PASSES, Pass, PassContext, PassManager, PassResult, parse_pipeline

aten = torch.ops.aten


class Printed(nn.Module):
    """Something of everything canonicalize touches: a foldable parameter chain, a CSE pair, a detach."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x, mask):
        h = self.lin(x)
        a = torch.relu(h) * (self.gain * 2 + 1)
        b = torch.relu(h).detach()
        s = torch.softmax((a + b).masked_fill(mask, -1e4), dim=-1)
        return s, (s.sum(-1, keepdim=True) > 0.5).to(torch.float16)


def printed_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8), torch.rand(2, 3, 4) > 0.5


def captured(model, *args):
    cap = capture(model, args, {})
    return cap.gm


def ctx_for(model, *args):
    return PassContext(options=fxcc.CompileOptions(), module=model, example_inputs=(args, {}), target="cpu")


def run_passes(model, pipeline, *args, **pm_kwargs):
    gm = captured(model, *args)
    pm = PassManager(parse_pipeline(pipeline), **pm_kwargs)
    gm = pm.run(gm, ctx_for(model, *args))
    return gm, pm


# --------------------------------------------------------------------------------------------- printer


def test_printer_golden_after_canonicalize(golden):
    model = Printed().eval()
    args = printed_inputs()
    gm, pm = run_passes(model, "canonicalize", *args, verify_each=True)
    text = fxcc.print_graph(gm)
    golden("printer_canonicalize.mlir", text)
    stats = pm.records[0].result.stats
    assert stats["folded"] == 1 and stats["cse"] == 1 and stats["identity"] >= 1
    with torch.no_grad():
        got = gm(*args)
        want = model(*args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_printer_shows_types_attributes_and_params():
    gm, _ = run_passes(Printed().eval(), "canonicalize", *printed_inputs())
    text = fxcc.print_graph(gm)
    lines = text.splitlines()
    assert lines[0] == "func @forward(%x: tensor<2x3x8xf32>, %mask: tensor<2x3x4xi1>) {"
    assert lines[-1] == "}" and lines[-2].startswith("  return %")
    assert '%lin_weight = param "lin.weight" : tensor<4x8xf32>' in text
    assert "= param \"_folded_" in text  # the gain chain became one constant
    assert text.count("aten.relu(") == 1  # the two relus are one after CSE
    assert "aten.detach" not in text
    assert "aten.softmax.int(%masked_fill) {dim = -1}" in text  # attributes by schema name
    assert "{value = -10000.0}" in text
    assert "{dtype = f16}" in text
    assert ": (tensor<2x3x4xf32>, tensor<2x3x4xi1>) -> tensor<2x3x4xf32>" in text  # masked_fill's signature


def test_printer_of_kernels_names_kind_and_backend():
    gm, _ = run_passes(Printed().eval(), "canonicalize,fuse,codegen", *printed_inputs())
    text = fxcc.print_graph(gm)
    assert "kernel.fused[gemm](%x, %lin_weight, %lin_bias" in text
    assert 'backend = "extern"' in text
    assert "kernel.fused[reduction]" in text
    assert "aten." not in text  # every aten op went into a kernel


@pytest.mark.parametrize("value, expected", [
    (torch.zeros(2, 3), "tensor<2x3xf32>"),
    (torch.zeros((), dtype=torch.int64), "tensor<i64>"),
    (torch.zeros(1, dtype=torch.bfloat16), "tensor<1xbf16>"),
    (torch.zeros(4, dtype=torch.bool), "tensor<4xi1>"),
    ((torch.zeros(2), [torch.zeros(1, dtype=torch.float16)]), "(tensor<2xf32>, (tensor<1xf16>))"),
    (3, "index"),
    (0.5, "f64"),
    (None, "none"),
])
def test_type_str(value, expected):
    assert ir.type_str(value) == expected


# -------------------------------------------------------------------------------------------- verifier


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_verify_accepts_a_captured_graph():
    gm = captured(Printed().eval(), *printed_inputs())
    ir.verify(gm)
    ir.verify(gm, ir.output_types(gm))


def test_verify_rejects_a_wrong_recorded_shape():
    gm = captured(Printed().eval(), *printed_inputs())
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    relu.meta["val"] = torch.empty(9, 9)
    with pytest.raises(fxcc.VerificationError) as e:
        ir.verify(gm, who="after my edit")
    assert str(e.value) == (f"after my edit: %{relu.name} = aten.relu is recorded as tensor<9x9xf32> "
                            "but computes tensor<2x3x4xf32>")


def test_verify_rejects_a_wrong_recorded_dtype():
    gm = captured(Printed().eval(), *printed_inputs())
    node = next(n for n in gm.graph.nodes if n.target is aten.softmax.int)
    node.meta["val"] = node.meta["val"].to(torch.float64)
    with pytest.raises(fxcc.VerificationError, match=rf"%{node.name} = aten.softmax.int is recorded as "
                                                     r"tensor<2x3x4xf64> but computes tensor<2x3x4xf32>"):
        ir.verify(gm)


def test_verify_rejects_ops_that_fail_on_their_operands():
    gm = captured(Printed().eval(), *printed_inputs())
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    x, w, b = linear.args
    linear.args = (x, b, w)  # weight and bias swapped: the shapes no longer fit
    with pytest.raises(fxcc.VerificationError, match=rf"verify: %{linear.name} = aten.linear fails on its operands"):
        ir.verify(gm)


def test_verify_rejects_a_changed_output_signature():
    gm = captured(Printed().eval(), *printed_inputs())
    with pytest.raises(fxcc.VerificationError, match=r"graph outputs changed from \['tensor<1xf32>'\] to "
                                                     r"\['tensor<2x3x4xf32>', 'tensor<2x3x1xf16>'\]"):
        ir.verify(gm, ["tensor<1xf32>"], who="check")


def test_verify_needs_input_types():
    gm = captured(Printed().eval(), *printed_inputs())
    _node(gm, "mask").meta.pop("val")
    with pytest.raises(fxcc.VerificationError, match=r"input %mask has no recorded type"):
        ir.verify(gm)


@pytest.fixture
def test_passes():
    """Passes that exist only in these tests; the registry is restored afterwards."""
    before = dict(PASSES)

    @fxcc.register
    @dataclass(frozen=True)
    class BreakShapes(Pass):
        """Turns relu into a full sum but leaves the recorded shape: the kind of bug verify-each is for."""

        name = "test-break-shapes"

        def apply(self, gm, ctx):
            for n in gm.graph.nodes:
                if n.target is aten.relu.default:
                    n.target = aten.sum.default
                    return PassResult(True, {"broken": 1})
            return PassResult(False)

    @fxcc.register
    @dataclass(frozen=True)
    class ChangeOutputs(Pass):
        """Returns only the first output: consistent inside, but the graph's signature changed."""

        name = "test-drop-output"

        def apply(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            out.args = (out.args[0][:1],)
            return PassResult(True)

    yield
    PASSES.clear()
    PASSES.update(before)


def test_verify_each_names_the_breaking_pass(test_passes):
    model, args = Printed().eval(), printed_inputs()
    with pytest.raises(fxcc.VerificationError,
                       match=r"^after pass 'test-break-shapes': %relu = aten.sum is recorded as tensor<2x3x4xf32> "
                             r"but computes tensor<f32>"):
        run_passes(model, "canonicalize,test-break-shapes,fuse", *args, verify_each=True)


def test_verify_each_catches_a_changed_signature(test_passes):
    model, args = Printed().eval(), printed_inputs()
    with pytest.raises(fxcc.VerificationError, match=r"^after pass 'test-drop-output': graph outputs changed"):
        run_passes(model, "canonicalize,test-drop-output", *args, verify_each=True)


def test_compile_with_verify_each_names_the_pass(test_passes):
    cm = fxcc.compile(Printed().eval(), passes="test-break-shapes,fuse,codegen",
                      options=fxcc.CompileOptions(verify_each=True))
    with pytest.raises(fxcc.VerificationError, match="after pass 'test-break-shapes'"):
        cm(*printed_inputs())


def test_verify_each_passes_on_the_default_pipeline():
    model, args = Printed().eval(), printed_inputs()
    gm, pm = run_passes(model, "default", *args, verify_each=True)
    with torch.no_grad():
        got, want = gm(*args), model(*args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_user_op_without_fake_kernel_is_opaque_to_the_verifier():
    @torch.library.custom_op("fxcc_test_ir::opaque", mutates_args=())
    def opaque(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    gm = captured(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4))
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    with gm.graph.inserting_after(relu):
        call = gm.graph.call_function(torch.ops.fxcc_test_ir.opaque.default, (relu,))
    relu.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
    call.meta["val"] = relu.meta["val"]
    gm.recompile()
    ir.verify(gm)  # no fake kernel: the recorded type is kept, the op is marked to run eagerly
    assert "no shape function" in call.meta["fxcc_eager"]


# ---------------------------------------------------------------------------------------- pass manager


def test_pass_manager_records_every_pass():
    gm, pm = run_passes(Printed().eval(), "canonicalize{cse=false},fuse,codegen", *printed_inputs())
    assert [r.spec for r in pm.records] == ["canonicalize{cse=false}", "fuse", "codegen"]
    assert all(isinstance(r.seconds, float) and r.seconds >= 0 for r in pm.records)
    canon, fuse, codegen = (r.result for r in pm.records)
    assert canon.changed and canon.stats["folded"] == 1 and "cse" not in canon.stats
    assert fuse.changed and fuse.stats["kernels"] >= 2
    # the choices are attributes of the kernel ops: the decision changed the IR
    assert codegen.changed and codegen.stats["kernels"] == fuse.stats["unique"]
    kernel_ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
    assert kernel_ops and all(choice_of(n) is not None for n in kernel_ops)
    assert 'backend = "' in ir.print_graph(gm)
    assert all(r.ir_after is None for r in pm.records)


def test_print_ir_after_records_ir_text(capsys):
    gm, pm = run_passes(Printed().eval(), "canonicalize,fuse,codegen", *printed_inputs(),
                        print_ir_after={"fuse"})
    assert [r.ir_after is not None for r in pm.records] == [False, True, False]
    after_fuse = pm.records[1].ir_after
    assert after_fuse.startswith("func @forward(%x: tensor<2x3x8xf32>, %mask: tensor<2x3x4xi1>) {")
    assert "kernel.fused[" in after_fuse
    assert capsys.readouterr().out == ""  # recorded, not printed, without echo


def test_print_ir_after_all_with_echo(capsys):
    gm, pm = run_passes(Printed().eval(), "canonicalize,fuse", *printed_inputs(), print_ir_after={"all"},
                        echo=True)
    printed = capsys.readouterr()
    out = printed.err  # IR is a report: stderr, never stdout
    assert printed.out == ""
    assert "// -----// IR after canonicalize //----- //\nfunc @forward(" in out
    assert "// -----// IR after fuse //----- //\nfunc @forward(" in out
    assert pm.records[0].ir_after in out and pm.records[1].ir_after in out
    assert pm.records[1].ir_after == fxcc.print_graph(gm)
