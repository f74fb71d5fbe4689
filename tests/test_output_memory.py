"""Outputs own their memory where eager's do: canonicalize's copy forwarding, CSE and constant folding never
make an output the caller's input, a module's weight, another output of the call or an output of another call.
The caller may write any of them in place (`y = model(x); y += 1`)."""

from __future__ import annotations

import fxcc
import torch
import torch.nn as nn
from fxcc.capture import capture
from fxcc.pipeline import PassContext, PassManager, parse_pipeline

aten = torch.ops.aten
FAST = "canonicalize,fuse,codegen{backend=extern}"


def _compile(model: nn.Module):
    return fxcc.compile(model.eval(), passes=FAST, options=dict(time_vs_eager=False, check_eager=False))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Clones(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.arange(4.0))

    def forward(self, x):
        y = x * 2
        return x.clone(), self.b.clone(), y, y.clone()


def test_a_returned_clone_is_not_its_input_a_buffer_or_another_output():
    model, x = Clones(), torch.randn(3, 4)
    cm = _compile(model)
    with torch.no_grad():
        out = cm(x)
    assert not _shares(out[0], x)
    assert not _shares(out[1], model.b)
    assert not _shares(out[3], out[2])
    for t in out:
        t.add_(100)
    torch.testing.assert_close(model.b, torch.arange(4.0))
    torch.testing.assert_close(out[2], out[3])


class TwoEqual(nn.Module):
    def forward(self, x):
        return x + 1, (x + 1).t(), torch.remainder(x, -3), x % -3


def test_cse_keeps_two_equal_outputs_two_tensors():
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = _compile(TwoEqual())(x)
    assert not _shares(out[0], out[1]) and not _shares(out[2], out[3])


class ViewOfAConstant(nn.Module):
    """`self.w * 2` is computed from a weight only (canonicalize folds such values): its transpose is returned."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = self.w * 2
        return y.t(), x @ y


def test_a_returned_view_of_a_weight_only_value_is_new_memory_at_each_call():
    model, x = ViewOfAConstant().eval(), torch.randn(3, 4)
    cm = _compile(model)
    with torch.no_grad():
        first = cm(x)
        first[0].add_(100)  # the caller writes its result; the next call must not see it
        second, want = cm(x), model(x)
    assert not _shares(first[0], second[0])
    for got, ref in zip(second, want):
        torch.testing.assert_close(got, ref)


class Literal(nn.Module):
    def forward(self, x):
        return torch.tensor([1.0, 2.0, 3.0]), x + 1


def test_a_returned_tensor_literal_is_a_new_tensor_at_each_call():
    cm, x = _compile(Literal()), torch.randn(3, 4)
    with torch.no_grad():
        first = cm(x)
        first[0].add_(100)
        second = cm(x)
    assert not _shares(first[0], second[0])
    torch.testing.assert_close(second[0], torch.tensor([1.0, 2.0, 3.0]))


class CloneOfAnIntermediate(nn.Module):
    def forward(self, x):
        return (x * 2).clone() + 1, (x * 3).clone()


def test_canonicalize_still_drops_a_clone_nothing_else_sees():
    model, x = CloneOfAnIntermediate(), torch.randn(3, 4)
    gm = capture(model, (x,), {}).gm
    ctx = PassContext(options=fxcc.CompileOptions(), module=model, example_inputs=((x,), {}), target="cpu")
    gm = PassManager(parse_pipeline("canonicalize"), verify_each=True).run(gm, ctx)
    assert aten.clone.default not in [n.target for n in gm.graph.nodes]


def test_equal_values_one_returned_through_a_contiguous_copy_are_still_merged():
    """`relu(x)` and `relu(x).contiguous()` of a channels-last `x`: the contiguous is a copy of its own (another
    layout), so the two relus are one value (CSE) and the two outputs still own their memory."""
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    cm = fxcc.compile(lambda x: (torch.relu(x), torch.relu(x).contiguous()), passes="canonicalize",
                      options=dict(time_vs_eager=False, check_eager=False))
    with torch.no_grad():
        nhwc, nchw = cm(x)
    gm = (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1].gm
    assert sum(n.target is aten.relu.default for n in gm.graph.nodes) == 1
    assert not _shares(nhwc, nchw) and nchw.is_contiguous()
    assert torch.equal(nhwc, torch.relu(x)) and torch.equal(nchw, torch.relu(x).contiguous())
