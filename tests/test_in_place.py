"""Values written in place: canonicalize never merges two such buffers, fuse keeps every read on its side of
the write and the written memory out of kernels."""

from __future__ import annotations

import fxcc
import torch
import torch.nn as nn


class TwoStates(nn.Module):
    """Two zero-initialised states (a Mamba cache's per-layer conv states) each written in place: `zeros`
    twice is one CSE candidate, and merging them made both layers write one buffer."""

    def forward(self, x):
        a = torch.zeros(x.shape[0], 4)
        b = torch.zeros(x.shape[0], 4)
        a[:, :2].copy_(x[:, :2] * 2)
        b.copy_(x + 1)
        return a * 3, b - 1


def test_cse_keeps_buffers_written_in_place_apart():
    model, x = TwoStates(), torch.randn(3, 4)
    cm = fxcc.compile(model, passes="canonicalize,fuse,codegen{backend=extern}")
    for got, want in zip(cm(x), model(x)):
        torch.testing.assert_close(got, want)


class TwoFreshResults(nn.Module):
    """VITS's spline returns `zeros_like(inputs)` twice (outputs and log-determinants) and the caller writes each
    through a mask: CSE made them one tensor, so the second write overwrote the first result (found through
    `fxcc zoo --entry torch`, where the writes are in the next dynamo graph)."""

    def forward(self, x):
        return torch.zeros_like(x), torch.zeros_like(x), x + 1


def test_cse_keeps_two_returned_results_two_tensors():
    model, x = TwoFreshResults(), torch.randn(2, 8)
    cm = fxcc.compile(model, passes="canonicalize,fuse,codegen{backend=extern}")
    for compiled in (cm, torch.compile(model, backend="fxcc")):
        torch._dynamo.reset()
        a, b, _ = compiled(x)
        a[0] = 1.0  # the caller writes into one result; the other must stay zeros
        assert a.data_ptr() != b.data_ptr() and not b.any()


class WritesThroughAView(nn.Module):
    """`out[:, 0] = ...` writes through a view; the later read of `out` has no data edge to that write."""

    def forward(self, x):
        out = torch.zeros(2, 3)
        s = x * 2
        out[:, 0] = s[:, 0]
        return (s + out) * 3


def test_fuse_keeps_reads_after_a_write_through_a_view():
    model, x = WritesThroughAView(), torch.randn(2, 3)
    cm = fxcc.compile(model, passes="canonicalize,fuse,codegen{backend=extern}",
                      options=fxcc.CompileOptions(check_eager=False))
    torch.testing.assert_close(cm(x), model(x))  # the read of `out` was fused before the write: all zeros
    eager = {n.name: n.meta.get("fxcc_eager") for n in cm.variants[-1].gm.graph.nodes}
    assert "written in place" in eager["zeros"] and "mutates its inputs" in eager["copy_"]


class WritesItsOwnValues(nn.Module):
    """tests/graph_fuzz.py: in-place ops on values the forward computed itself (`v = x * 2; v.mul_(y)`) ran as
    eager ops, splitting the kernels around them; a read before a write still sees the value before it."""

    def forward(self, x, y):
        v = x * 2
        v.mul_(y)
        before = v.sigmoid()
        v.clamp_(-1.0, 1.0)
        u = x.clone()
        u += 1
        h = x.half()
        h.mul_(y)  # float16 written with a float32: stays an in-place op (the functional one is float32)
        return v + before, u, h


def test_in_place_ops_on_the_graphs_own_values_fuse():
    model, x, y = WritesItsOwnValues(), torch.randn(4, 8), torch.randn(8)
    cm = fxcc.compile(model, passes="canonicalize,fuse,codegen{backend=extern}")
    for got, want in zip(cm(x, y), model(x, y)):
        torch.testing.assert_close(got, want)
    text = cm.explain()
    assert "mul_.Tensor" in text.split("== final IR")[1]  # the float16 one
    eager = [ln for ln in text.split("== where ops run")[1].split("==")[0].splitlines() if "eager:" in ln]
    assert [ln.split()[1] for ln in eager if "mutates" in ln] == ["aten.mul_.Tensor"], eager
