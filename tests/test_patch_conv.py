"""Patch convolutions (stride equal to the kernel) computed as one GEMM: the candidate's arithmetic against
torch's convolution, which convolutions it takes, and a compiled patch embedding equal to eager."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fxcc.codegen import extern, patch_conv
from fxcc.dialects import KernelBody

aten = torch.ops.aten


@pytest.mark.parametrize("shape,kernel", [
    ((1, 3, 32, 32), (8, 8)),      # a ViT's patch embedding
    ((2, 3, 30, 33), (4, 4)),      # a remainder past the last whole patch in both dims, batch 2
    ((3, 5, 12, 20), (3, 5)),      # non-square patches
    ((2, 4, 21), (3,)),            # 1-D, with a remainder
    ((1, 2, 8, 8, 6), (2, 4, 3)),  # 3-D
])
@pytest.mark.parametrize("bias", [True, False])
def test_the_gemm_is_the_convolution(shape, kernel, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(7, shape[1], *kernel, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    want = conv(x, w, b, stride=kernel)
    got = patch_conv.patch_gemm(x, w, b, list(kernel))
    assert got.shape == want.shape and got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.convolution.default}[len(kernel)]
    args = ((x, w, b, list(kernel), [0] * len(kernel), [1] * len(kernel), False, [0] * len(kernel), 1)
            if op is aten.convolution.default else (x, w, b, list(kernel)))
    graph = fx.Graph()
    operands = [graph.placeholder(f"a{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    for node, a in zip(operands, args):
        if isinstance(node, fx.Node):
            node.meta["val"] = a
    node = graph.call_function(op, tuple(operands))
    assert patch_conv.applies(node)
    torch.testing.assert_close(patch_conv.conv(node)(*args), want, rtol=1e-5, atol=1e-5)




def _val(*shape):
    return torch.empty(*shape)


@pytest.mark.parametrize("call,takes", [
    ((aten.conv2d.default, (1, 3, 32, 32), (16, 3, 8, 8), [8, 8]), True),
    ((aten.conv2d.default, (1, 3, 32, 32), (16, 3, 8, 8), [4, 4]), False),   # overlapping patches
    ((aten.conv2d.default, (1, 3, 32, 32), (16, 3, 3, 3), [1, 1]), False),   # an ordinary convolution
    ((aten.conv2d.default, (1, 3, 4, 4), (16, 3, 8, 8), [8, 8]), False),     # an input smaller than a patch
    ((aten.conv1d.default, (2, 4, 40), (8, 4, 2), [2]), True),
])
def test_which_convolutions_it_takes(call, takes):
    target, xs, ws, stride = call
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["val"], w.meta["val"] = _val(*xs), _val(*ws)
    node = g.call_function(target, (x, w, None, stride))
    assert patch_conv.applies(node) is takes
    grouped = g.call_function(target, (x, w, None, stride, [0] * len(stride), [1] * len(stride), 3))
    assert not patch_conv.applies(grouped)  # groups
    padded = g.call_function(target, (x, w, None, stride, [1] * len(stride)))
    assert not patch_conv.applies(padded)


class PatchEmbed(nn.Module):
    """A ViT's patch embedding with its class token and position embedding: the kernel the candidate serves."""

    def __init__(self, dim=32, patch=8, image=32):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim))

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos


def test_a_compiled_patch_embedding_offers_the_gemm_and_equals_eager():
    torch.manual_seed(0)
    m = PatchEmbed().eval()
    x = torch.randn(2, 3, 32, 32)
    c = fxcc.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
    variant = next(v for v in c._variants.values() if getattr(v, "kernels", None))
    conv_kernels = [b for b in variant.kernels.values()
                    if any(patch_conv.applies(n) for n in b.body.body.graph.nodes)]
    assert conv_kernels, "the patch convolution is in a kernel"
    labels = {label for b in conv_kernels for label in b.timings_ms}
    assert "patch" in labels  # the candidate was built, checked and timed beside the library convolution
    body = conv_kernels[0].body
    assert any(e.backend == "patch" for e in extern.candidates(body, "cpu"))
    assert not any(e.backend == "patch" for e in extern.candidates(body, "cuda"))
    assert isinstance(body, KernelBody)
