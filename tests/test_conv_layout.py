"""Channels-last convolutions (fxcc.codegen.conv_layout): offered on the GPU for 2-D convolutions, equal to
the NCHW call, and returning the layout eager returns."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc.codegen import conv_layout, extern, triton
from fxcc.dialects import KERNEL_OPS, kernel_body

aten = torch.ops.aten


class ConvChain(nn.Module):
    def __init__(self, dim: int = 2, groups: int = 1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
        self.conv = conv(8, 8, 3, padding=1, groups=groups)

    def forward(self, x):
        return torch.sigmoid(F.relu(self.conv(x)) * 0.5 + 1.0)


def conv_kernel(m: nn.Module, x: torch.Tensor):
    cm = fxcc.compile(m, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))
    gm = cm.variants[-1].gm
    keys = dict.fromkeys(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
    return next(kernel_body(k) for k in keys if any(
        n.op == "call_function" and n.target in conv_layout.CONV for n in kernel_body(k).body.graph.nodes))


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_a_2d_convolution_offers_channels_last_candidates_on_the_gpu_only(groups):
    torch.manual_seed(0)
    kb = conv_kernel(ConvChain(2, groups).eval(), torch.randn(2, 8, 10, 12))
    assert conv_layout.name in {c.backend for c in extern.candidates(kb, "cuda")}
    assert conv_layout.name not in {c.backend for c in extern.candidates(kb, "cpu")}
    assert "triton+lib-nhwc" in {c.backend for c in triton.candidates(kb, "cuda")}
    kb1 = conv_kernel(ConvChain(1).eval(), torch.randn(2, 8, 10))
    assert conv_layout.name not in {c.backend for c in extern.candidates(kb1, "cuda")}
    assert "triton+lib-nhwc" not in {c.backend for c in triton.candidates(kb1, "cuda")}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_channels_last_candidate_equals_the_reference_in_eagers_layout(layout):
    torch.manual_seed(0)
    kb = conv_kernel(ConvChain(2, 8).eval(), torch.randn(2, 8, 10, 12))
    ref = extern.Extern(kb).build({}).fn
    got = extern.Extern(kb, backend=conv_layout.name).build({}).fn
    inputs = [torch.randn(p.meta["val"].shape) for p in kb.body.graph.nodes if p.op == "placeholder"]
    if layout == "channels_last":
        inputs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
    want, have = ref(inputs), got(inputs)
    for w, h in zip(want, have):
        torch.testing.assert_close(h, w)
        assert h.stride() == w.stride()  # the layout eager gives, whichever the conv ran in


@pytest.mark.parametrize("op", ["conv2d", "convolution", "conv_transpose2d"])
def test_nhwc_wraps_every_convolution_signature(op):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 9, 7), torch.randn(4, 4, 3, 3), torch.randn(4)
    call = {"conv2d": (aten.conv2d.default, (x, w, b, [2, 1], [1, 0], [1, 1], 1)),
            "convolution": (aten.convolution.default, (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
            "conv_transpose2d": (aten.conv_transpose2d.input, (x, w, b, [2, 2], [1, 1], [1, 1], 1, [1, 1]))}
    target, args = call[op]
    want = target(*args)
    have = conv_layout.nhwc(target)(*args)
    torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert have.is_contiguous()


class ConvAndEpilogue(nn.Module):
    """The convolution's own result is an output beside its epilogue's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.sigmoid(y) * 2.0


@pytest.mark.parametrize("make", [lambda: ConvChain(2, 8), ConvAndEpilogue], ids=["epilogue", "conv-and-epilogue"])
def test_the_channels_last_library_epilogue_reads_the_nhwc_result_and_outputs_eagers_strides(make, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    m = make().eval()
    channels = m.conv.in_channels
    kb = conv_kernel(m, torch.randn(2, channels, 6, 5))
    cand = next(c for c in triton.candidates(kb, "cpu") if c.backend == "triton+lib-nhwc")
    inputs = [torch.randn(p.meta["val"].shape) for p in kb.body.graph.nodes if p.op == "placeholder"]
    want = list(kb.body(*inputs))
    got = cand.build(cand.defaults).fn(inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert g.stride() == w.stride()
