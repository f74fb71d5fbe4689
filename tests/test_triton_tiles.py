"""Tiled Triton kernels for values written across a layout (fxcc.codegen.triton.tiled_plan): the layout copies the
layout pass inserts (NCHW <-> NHWC), a transpose made contiguous, and a convolution's epilogue reading NHWC and
writing NCHW, each offered as a 2-D tiled candidate beside the 1-D kernel. Run in Triton's interpreter on the CPU:
results equal torch's copies bit for bit (a copy and relu round nothing), in the recorded strides, at sizes that
are no multiple of the tiles, in fp32 and bf16. Which candidate runs is measured on the GPU (benchmarks/layout_copy.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

triton = pytest.importorskip("triton")

import fxcc  # noqa: E402
from fxcc.autotune.select import example_inputs  # noqa: E402
from fxcc.codegen import triton as backend  # noqa: E402
from fxcc.dialects import KERNEL_OPS, kernel_body  # noqa: E402

CL = torch.channels_last
LAYOUT = "decompose,canonicalize,raise,layout{cpu=true},fuse,codegen{backend=extern}"
SMALL = {"BLOCK_A": 16, "BLOCK_B": 16, "num_warps": 1}  # several tiles, the last ones partial on both axes


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def kernels_of(fn, x, passes: str = "canonicalize,raise,fuse,codegen{backend=extern}") -> list:
    cm = fxcc.compile(fn, passes=passes, options=fxcc.CompileOptions(time_vs_eager=False))
    with torch.no_grad():
        cm(x)
    gm = (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1].gm
    keys = dict.fromkeys(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
    return [kernel_body(k) for k in keys]


def candidate(kb, label: str):
    found = {c.backend: c for c in backend.candidates(kb, "cpu")}
    assert label in found, (sorted(found), kb.text)
    return found[label]


def run_exact(kb, label: str, params: dict) -> list[torch.Tensor]:
    """The candidate's outputs on the kernel's example inputs, checked equal to the body run by torch, in its
    strides."""
    inputs = example_inputs(kb, "cpu")
    want = kb.body(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    c = candidate(kb, label)
    got = c.build({**c.defaults, **params}).fn(inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.stride() == w.stride()
        assert torch.equal(g, w)
    return got


def tiles(kb) -> backend._Tiles:
    placeholders, _, outs = backend.body_nodes(kb.body)
    return backend.transposed_tiles(placeholders, outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 37, 6, 11)], ids=["tiny", "wide"])
@pytest.mark.parametrize("params", [{}, SMALL], ids=["defaults", "small-tiles"])
def test_nchw_to_nhwc_copies_read_hw_rows_and_write_channel_rows(dtype, shape, params):
    x = torch.randn(shape).to(dtype)
    (kb,) = kernels_of(lambda x: x.contiguous(memory_format=CL), x)
    # the input's H, W are one run of memory (tile axis 0), the output's C (axis 1); the batch is the grid's
    # (a batch of one is no dim to walk)
    assert tiles(kb) == backend._Tiles(outer=(0,) if shape[0] > 1 else (), a=(2, 3), b=(1,))
    (got,) = run_exact(kb, "triton-tiled", params)
    assert got.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("params", [{}, SMALL], ids=["defaults", "small-tiles"])
def test_nhwc_to_nchw_copies_read_channel_rows_and_write_hw_rows(dtype, params):
    x = torch.randn(2, 37, 6, 11).to(dtype).contiguous(memory_format=CL)
    (kb,) = kernels_of(lambda x: x.contiguous(), x)
    assert tiles(kb) == backend._Tiles(outer=(0,), a=(1,), b=(2, 3))
    (got,) = run_exact(kb, "triton-tiled", params)
    assert got.is_contiguous()


def test_a_permute_made_contiguous_is_tiled_by_the_dims_it_moves():
    x = torch.randn(3, 19, 5, 7)
    (kb,) = kernels_of(lambda x: x.permute(0, 2, 3, 1).contiguous() * 2.0, x)
    # output [N, H, W, C] row-major; the input's contiguous W, H are the output's dims 1, 2
    assert tiles(kb) == backend._Tiles(outer=(0,), a=(1, 2), b=(3,))
    run_exact(kb, "triton-tiled", SMALL)


def test_an_input_read_at_the_grids_dims_alone_is_tiled():
    """A value per index of the outer dims (the grid's), broadcast over the tile, beside a transposed input: its
    load was one pointer under the tile's mask, which Triton refuses (the graph fuzzer's seed 172)."""
    w = torch.randn(5, 1, 1)
    x = torch.randn(5, 6, 5).transpose(1, 2)
    (kb,) = kernels_of(lambda x: (x / (torch.maximum(x, w).abs() + 1)).contiguous(), x)
    assert tiles(kb) == backend._Tiles(outer=(0,), a=(1,), b=(2,))
    run_exact(kb, "triton-tiled", SMALL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_relu_kept_nhwc_and_copied_nchw_writes_both_from_one_tile(dtype):
    """Outputs of one shape in two layouts (a relu a later convolution reads NHWC, and its copy returned NCHW):
    one tiled kernel stores each along its own contiguous dims."""
    x = torch.randn(2, 37, 6, 11).to(dtype).contiguous(memory_format=CL)
    (kb,) = kernels_of(lambda x: (torch.relu(x), torch.relu(x).contiguous()), x)
    assert tiles(kb) == backend._Tiles(outer=(0,), a=(1,), b=(2, 3))
    nhwc, nchw = run_exact(kb, "triton-tiled", SMALL)
    assert nhwc.is_contiguous(memory_format=CL) and nchw.is_contiguous()


def test_pointwise_kernels_in_one_layout_get_no_tiled_candidate():
    """No extra build or timing where the 1-D kernel reads and writes along the same dims already."""
    for x, fn in ((torch.randn(2, 5, 7, 9), lambda x: torch.relu(x) * 2.0),
                  (torch.randn(2, 5, 7, 9).contiguous(memory_format=CL), lambda x: torch.relu(x) + 1.0),
                  (torch.randn(4, 8), lambda x: x + torch.randn(8))):
        (kb,) = kernels_of(fn, x)
        assert [c.backend for c in backend.candidates(kb, "cpu")] == ["triton"], kb.text


class ConvRelu(nn.Module):
    def __init__(self, cin: int = 5, cout: int = 19):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_channels_last_graphs_copy_in_and_relu_epilogue_written_nchw_are_tiled(dtype):
    """The layout pass's graph: the input copied NHWC (a pointwise kernel), the convolution NHWC and its relu
    epilogue writing the output back in eager's NCHW (the copy fused into the epilogue): both tiled, exact."""
    model, x = ConvRelu().eval().to(dtype), torch.randn(2, 5, 7, 9).to(dtype)
    kbs = kernels_of(model, x, LAYOUT)
    assert [kb.kind for kb in kbs] == ["pointwise", "gemm"]
    copy_in, conv = kbs
    assert tiles(copy_in) == backend._Tiles(outer=(0,), a=(2, 3), b=(1,))
    run_exact(copy_in, "triton-tiled", SMALL)
    (got,) = run_exact(conv, "triton+lib-tiled", SMALL)
    assert got.is_contiguous()
    (untiled,) = run_exact(conv, "triton+lib", {})
    assert torch.equal(got, untiled)


def test_the_per_convolution_nhwc_epilogue_is_tiled_along_the_layout_the_library_leaves():
    """In an NCHW graph the `nhwc` candidate runs the convolution channels-last and its epilogue reads that
    result: the tiled epilogue plans for NHWC (not the NCHW the IR records) and equals the 1-D one."""
    model, x = ConvRelu().eval(), torch.randn(2, 5, 7, 9)
    (conv,) = kernels_of(model, x)
    inputs = example_inputs(conv, "cpu")
    outs = {}
    for label in ("triton+lib-nhwc", "triton+lib-nhwc-tiled"):
        c = candidate(conv, label)
        outs[label] = c.build({**c.defaults, **SMALL} if "tiled" in label else c.defaults).fn(inputs)
    (tiled,), (plain,) = outs["triton+lib-nhwc-tiled"], outs["triton+lib-nhwc"]
    assert torch.equal(tiled, plain) and tiled.is_contiguous()
    (want,) = conv.body(*inputs)
    torch.testing.assert_close(tiled, want, atol=1e-5, rtol=1e-5)
    assert "BLOCK_A" in candidate(conv, "triton+lib-nhwc-tiled").plan.source  # (1-D: the channels a stride apart)


class ConvOut(nn.Module):
    """The convolution's own result is an output beside its epilogue's."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups)

    def forward(self, x):
        y = self.conv(x)
        return y, torch.sigmoid(y) * 2.0


@pytest.mark.parametrize("model", [ConvRelu(), ConvOut()], ids=["epilogue", "conv-and-epilogue"])
@pytest.mark.parametrize("label", ["triton+lib", "triton+lib-nhwc", "triton+lib-nhwc-tiled"])
def test_a_convolutions_bias_is_added_by_the_epilogue_where_the_library_adds_it_apart(model, label, monkeypatch):
    """On the GPU cuDNN's convolution is followed by a separate strided add of the bias: the library candidates
    call the convolution without it and the generated epilogue adds it (the CPU stands in for the GPU here)."""
    monkeypatch.setattr(backend, "BIAS_APART", ("cuda", "cpu"))
    model = model.eval()
    (conv,) = kernels_of(model, torch.randn(2, 5 if isinstance(model, ConvRelu) else 6, 7, 9))
    inputs = example_inputs(conv, "cpu")
    want = conv.body(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    calls, library_call = [], backend._library_call

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("without_bias", False))
        return library_call(*args, **kwargs)
    monkeypatch.setattr(backend, "_library_call", recorded)
    c = candidate(conv, label)
    got = c.build({**c.defaults, **(SMALL if "tiled" in label else {})}).fn(inputs)
    assert calls[-1] is True  # the library leaves the bias out; the values below show the epilogue adds it once
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.stride() == w.stride()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_a_grouped_convolution_and_the_cpu_keep_the_bias_in_the_library_call(monkeypatch):
    """ATen's depthwise kernels add the bias inside, and so does the CPU's library: the call keeps it."""
    depthwise = kernels_of(ConvOut(groups=6).eval(), torch.randn(2, 6, 7, 9))[0]
    dense = kernels_of(ConvOut().eval(), torch.randn(2, 6, 7, 9))[0]
    anchors = [next(n for n in kb.body.graph.nodes if n.op == "call_function" and n.target in backend.CONV)
               for kb in (depthwise, dense)]
    assert [backend._bias_apart(a) for a in anchors] == [None, None]
    monkeypatch.setattr(backend, "BIAS_APART", ("cpu",))  # a device whose library adds the bias apart
    assert backend._bias_apart(anchors[0]) is None and backend._bias_apart(anchors[1]) is not None
