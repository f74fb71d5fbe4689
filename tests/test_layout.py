"""The layout pass (fxcc.passes.layout): channels-last through graphs of 2-D convolutions, forced on the CPU
(`layout{cpu=true}`; on CUDA it is in the default pipeline and chosen by measurement). Its IR (which values
are channels-last, where the copies are) and differential runs: outputs equal eager's, in eager's strides,
for NCHW and channels-last inputs."""

from __future__ import annotations

import os
import sys

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc import ir
from fxcc.capture import capture
from fxcc.dialects import KERNEL_OPS, kernel_body
from fxcc.passes.layout import channels_last, is_conv2d, per_conv
from fxcc.pipeline import PassContext, PassManager, parse_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from breadth import CASES  # noqa: E402
from breadth.nets import ChannelsFirstLayerNorm  # noqa: E402

aten = torch.ops.aten
CL = torch.channels_last
GRAPH = "decompose,canonicalize,raise,merge-linears,gemv,layout{cpu=true}"
EXTERN = GRAPH + ",fuse,codegen{backend=extern}"


def graph_after(model, passes, *args):
    gm = capture(model, args, {}).gm
    ctx = PassContext(options=fxcc.CompileOptions(), module=model, example_inputs=(args, {}), target="cpu")
    return PassManager(parse_pipeline(passes), verify_each=True).run(gm, ctx)


def kernel_ops(cm):
    """The compiled graph's kernel ops, as (the body key the op names, the built kernel)."""
    v = cm.variants[-1]
    return [(n.args[1], v.kernels[n.args[1]]) for n in v.gm.graph.nodes
            if n.op == "call_function" and n.target in KERNEL_OPS]


def run_in_recorded_strides(k):
    """Kernel `k`'s backend function on random inputs in its body's recorded strides: (inputs, each output
    node of its body with what the function returned for it)."""
    body = k.body.body
    holders = [p.meta["val"] for p in body.graph.nodes if p.op == "placeholder"]
    inputs = [torch.randn(v.shape).as_strided(v.shape, v.stride()) for v in holders]
    outs = next(o for o in body.graph.nodes if o.op == "output").args[0]
    return inputs, list(zip(outs, k.fn(inputs)))


def copies(gm, fmt):
    return [n for n in gm.graph.nodes if n.target is aten.clone.default and n.kwargs.get("memory_format") == fmt]


class ConvFlatten(nn.Module):
    """A convolution's output read by a view that needs rows (C, H, W into one dimension) and a linear, by a
    flatten (a reshape: any layout) and by a view that NHWC can give (H, W into one), summed over the channels
    (contiguous in NHWC; a sum over H, W would read rows: see the test of spatial reductions)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 5, 4)

    def forward(self, x):
        y = F.relu(self.conv2(torch.sigmoid(self.conv1(x)) * 2.0))
        return self.fc(y.view(y.shape[0], -1)), y.flatten(1) * 2, y.view(y.shape[0], 8, -1).sum(1)


def test_the_conv_chain_is_channels_last_between_one_copy_in_and_one_back():
    torch.manual_seed(0)
    model, x = ConvFlatten().eval(), torch.randn(2, 3, 6, 5)
    gm = graph_after(model, GRAPH, x)
    convs = [n for n in gm.graph.nodes if is_conv2d(n)]
    assert len(convs) == 2 and all(channels_last(c.meta["val"]) for c in convs)
    assert all(channels_last(c.args[1].meta["val"]) for c in convs)  # weights: constants, not copies per call
    assert all(c.args[1].op == "get_attr" for c in convs)
    (copy_in,) = copies(gm, CL)
    assert copy_in.args[0].op == "placeholder"
    pointwise = [n for n in gm.graph.nodes if n.target in (aten.sigmoid.default, aten.relu.default)]
    assert pointwise and all(channels_last(n.meta["val"]) for n in pointwise)
    # the first view cannot view NHWC: it reads a contiguous copy; the flatten and the second view need none
    (copy_back,) = copies(gm, torch.contiguous_format)
    assert copy_back.args[0].target is aten.relu.default
    assert [u.target for u in copy_back.users] == [aten.view.default]
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want)
            assert got.stride() == want.stride()


def test_weights_become_constants_computed_from_the_parameters():
    torch.manual_seed(0)
    model, x = ConvFlatten().eval(), torch.randn(2, 3, 6, 5)
    gm = graph_after(model, GRAPH, x)
    convs = [n for n in gm.graph.nodes if is_conv2d(n)]
    for conv, param in zip(convs, (model.conv1.weight, model.conv2.weight)):
        w = ir.fetch_attr(gm, conv.args[1].target)
        assert w.is_contiguous(memory_format=CL) and not w.is_contiguous()
        assert [r() for r in ir.sources_of(w)] == [param]  # watched: a change to the parameter recompiles
        torch.testing.assert_close(w, param, rtol=0, atol=0)


def test_off_on_the_cpu_by_default_and_without_convolutions():
    torch.manual_seed(0)
    model, x = ConvFlatten().eval(), torch.randn(2, 3, 6, 5)
    gm = graph_after(model, "decompose,canonicalize,raise,layout", x)
    assert not copies(gm, CL)
    assert all(not channels_last(n.meta.get("val")) for n in gm.graph.nodes)
    lin = graph_after(nn.Linear(4, 4).eval(), "layout{cpu=true}", torch.randn(2, 4))
    assert not copies(lin, CL)


def test_a_channels_last_input_is_read_as_it_is():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=CL)
    gm = graph_after(model, GRAPH, x)
    assert not copies(gm, CL) and not copies(gm, torch.contiguous_format)  # eager gives NHWC too
    with torch.no_grad():
        (got,), want = gm(x), model(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


NETS = ["resnet18", "mobilenet_v2", "convnext_block", "convnext_stage", "unet_stage", "densenet_block",
        "conv2d_bn_relu", "conv2d_gelu_scale_residual"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", NETS)
def test_breadth_networks_equal_eager_in_eagers_strides(name, layout):
    model, (x,) = CASES[name].make("small")
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    cm = fxcc.compile(model, passes=EXTERN, options=fxcc.CompileOptions(verify_each=True))
    with torch.no_grad():
        want, got = model(x), cm(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.stride() == want.stride()
    convs = [n for key, _ in kernel_ops(cm) for n in kernel_body(key).body.graph.nodes if is_conv2d(n)]
    assert convs and all(channels_last(c.meta["val"]) or c.meta["val"].is_contiguous(memory_format=CL)
                         for c in convs)


class ConvEpilogue(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6).eval()

    def forward(self, x):
        y = torch.sigmoid(self.bn(self.conv1(x))) * 2.0 + 1.0
        return self.conv2(F.max_pool2d(y, 2)) + 1.0


def test_triton_kernels_read_and_write_channels_last(monkeypatch):
    """Under Triton's interpreter: the input's copy and the first convolution's epilogue (with the pool fused
    into it) write NHWC themselves, as the IR records it (no copy into another layout after the kernel); the
    second convolution's epilogue reads its NHWC result and writes the output in eager's strides."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model, x = ConvEpilogue().eval(), torch.randn(2, 4, 6, 8)
    cm = fxcc.compile(model, passes=GRAPH + ",fuse,codegen{backend=triton}")
    with torch.no_grad():
        want, got = model(x), cm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.stride() == want.stride()
    written = []
    for _, k in kernel_ops(cm):
        assert k.backend.startswith("triton")
        for o, r in run_in_recorded_strides(k)[1]:  # the backend's function: no copy into the recorded layout after it
            assert r.stride() == o.meta["val"].stride()
            written.append((k.kind, channels_last(r)))
    assert written == [("pointwise", True), ("gemm", True), ("gemm", False)]


def test_the_per_convolution_incumbent_it_is_timed_against_is_exact():
    """`per_conv` (each convolution on NHWC copies, its result copied back: what the per-kernel candidates
    run) is what the pass is measured against on CUDA; it equals eager in eager's strides."""
    torch.manual_seed(0)
    model, x = ConvFlatten().eval(), torch.randn(2, 3, 6, 5)
    gm = graph_after(model, "decompose,canonicalize,raise", x)
    per_conv(gm)
    convs = [n for n in gm.graph.nodes if is_conv2d(n)]
    assert all(channels_last(c.args[0].meta["val"]) and channels_last(c.meta["val"]) for c in convs)
    assert all([u.target for u in c.users] == [aten.clone.default] for c in convs)
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want)
            assert got.stride() == want.stride()


class NormThenConv(nn.Module):
    """ConvNeXt's downsampling: a LayerNorm over the channels of an NCHW tensor (means over dim 1), its result
    copied channels-last for the convolution after it; then a mean over H, W of the channels-last result."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv = ChannelsFirstLayerNorm(4), nn.Conv2d(4, 6, 2, stride=2)

    def forward(self, x):
        y = self.conv(self.norm(x))
        return y, y.mean((2, 3))


def test_triton_reductions_write_channels_last_outputs_in_their_strides(monkeypatch):
    """The reduction kernel writing the norm's result (the copy into channels-last fused after it) stores it
    at its recorded strides, not row-major (it was wrong on the GPU: caught by the candidate check)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model, x = NormThenConv().eval(), torch.randn(2, 4, 6, 8)
    cm = fxcc.compile(model, passes=GRAPH + ",fuse,codegen{backend=triton}",
                      options=fxcc.CompileOptions(time_vs_eager=False))
    with torch.no_grad():
        want, got = model(x), cm(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert g.stride() == w.stride()
    written = []
    for _, k in kernel_ops(cm):
        if k.kind != "reduction":
            continue
        assert k.backend == "triton"  # not the extern fallback after a failed check
        inputs, ran = run_in_recorded_strides(k)
        refs = k.body.body(*inputs)
        for (o, r), ref in zip(ran, refs if isinstance(refs, (tuple, list)) else [refs]):
            assert r.stride() == o.meta["val"].stride()
            torch.testing.assert_close(r, ref, atol=1e-5, rtol=1e-5)
            written.append(channels_last(r))
    assert True in written


class Norms(nn.Module):
    """InstanceNorm (means over H, W), a LayerNorm over the channels (means over C) and global average
    pooling (a mean over H, W) between convolutions."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.inorm, self.ln = nn.InstanceNorm2d(8, affine=True), ChannelsFirstLayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.inorm(self.c1(x))))
        y = torch.sigmoid(self.c3(self.ln(y) + y))
        return self.fc(y.mean((2, 3)))


def test_reductions_over_spatial_dims_read_rows_and_over_channels_read_nhwc():
    """A mean over H, W of an NHWC value would make fxcc's row kernels load every element from another
    memory segment: the pass gives it (and every later reader of that value: the norm's x - mean, fused into
    the same row kernel) a contiguous copy. A mean over C reads NHWC as it is (its rows are contiguous)."""
    torch.manual_seed(0)
    model, x = Norms().eval(), torch.randn(2, 3, 6, 5)
    gm = graph_after(model, GRAPH, x)
    means = {}
    for n in gm.graph.nodes:
        if n.target is aten.mean.dim:
            means.setdefault(tuple(n.args[1]), []).append(n.args[0].meta["val"])
    assert sorted(means) == [(1,), (2, 3)]
    assert len(means[(1,)]) == 2 and all(channels_last(v) for v in means[(1,)])  # LayerNorm over channels
    assert len(means[(2, 3)]) == 3 and all(v.is_contiguous() for v in means[(2, 3)])  # InstanceNorm, pooling
    inorm_sub = next(n for n in gm.graph.nodes if n.target is aten.sub.Tensor)
    assert inorm_sub.meta["val"].is_contiguous()  # x - mean reads the same copy
    assert all(channels_last(c.meta["val"]) for c in gm.graph.nodes if is_conv2d(c))
    with torch.no_grad():
        want, (got,) = model(x), gm(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


def test_an_nhwc_input_keeps_eagers_layouts_where_eager_changes_them():
    """With an NHWC input eager's convolutions give NHWC values, but its instance norm gives a contiguous one (the
    decomposition copies its result so, `decompose`): the pass reads the norm's input as it is, copies the norm's
    result back to NHWC for the next convolution, and the spatial mean of an NHWC value reads rows."""
    torch.manual_seed(0)
    model, x = Norms().eval(), torch.randn(2, 3, 6, 5).contiguous(memory_format=CL)
    gm = graph_after(model, GRAPH, x)
    (to_cl,) = copies(gm, CL)
    assert [u.target for u in to_cl.users] == [aten.conv2d.default]
    norm_copy = to_cl.args[0].args[0]  # relu's operand: the instance norm's contiguous copy
    assert norm_copy.target is aten.clone.default and norm_copy.kwargs["memory_format"] == torch.contiguous_format
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x))


def test_unet_stage_stays_channels_last_throughout():
    """UNet's stage holds no reduction (its batch norms are folded into per-channel affines), max pooling,
    a transposed convolution and a concatenation, all carried NHWC: the whole graph is rewritten, one copy in
    (the input) and one back (the one-channel output, into eager's stride of its size-1 channel dim)."""
    model, (x,) = CASES["unet_stage"].make("small")
    gm = graph_after(model, GRAPH, x)
    (back,) = copies(gm, torch.contiguous_format)
    assert len(copies(gm, CL)) == 1 and [u.op for u in back.users] == ["output"]
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.max_pool2d.default, aten.cat.default,
                                                    aten.conv_transpose2d.input):
            assert channels_last(n.meta["val"]), n.name
    with torch.no_grad():
        want, got = model(x), gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.stride() == want.stride()


def test_a_layout_rewrite_measured_slower_than_eager_is_compiled_again_without_it(monkeypatch):
    """The pass decides by timing torch ops; where the compiled graph it made then measures slower than eager,
    the graph is compiled once more without the rewrite and kept if that one beats eager (else eager runs)."""
    from fxcc.autotune import vs_eager
    verdicts = iter([vs_eager.Verdict(3.0, 2.0), vs_eager.Verdict(1.0, 2.0)])  # with the rewrite, then without
    seen = []

    def judge(compiled, eager, device, was=None, setup=None):
        compiled()
        seen.append(device)
        return next(verdicts)
    monkeypatch.setattr(vs_eager, "judge", judge)
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "1")
    model, x = ConvEpilogue().eval(), torch.randn(2, 4, 8, 8)
    cm = fxcc.compile(model, passes=EXTERN, options=fxcc.CompileOptions(time_vs_eager=True, graph_cache=False))
    with torch.no_grad(), pytest.warns(UserWarning, match="compiled without that rewrite"):
        got = cm(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    assert seen == ["cpu", "cpu"]
    v = cm.variants[-1]
    assert not [r for r in v.records if r.spec.startswith("layout") and r.result.changed]
    assert not copies(v.gm, CL) and "without it" in v.vs_eager


def test_a_kernel_alike_but_for_layout_is_its_own_kernel():
    """Kernel bodies are named by their text; the types print shapes only, so an NCHW body compiled earlier in the
    process used to be served for the same body in NHWC (its strides, its generated code, its cached choice)."""
    model, x = ConvEpilogue().eval(), torch.randn(2, 4, 8, 8)
    first = fxcc.compile(model, passes="decompose,canonicalize,raise,fuse,codegen{backend=extern}")
    then = fxcc.compile(model, passes=EXTERN)
    with torch.no_grad():
        want, a, b = model(x), first(x), then(x)
    torch.testing.assert_close(a, want)
    torch.testing.assert_close(b, want)

    def convs(cm):
        return [(key, c) for key, _ in kernel_ops(cm) for c in kernel_body(key).body.graph.nodes if is_conv2d(c)]
    assert all(not channels_last(c.meta["val"]) for _, c in convs(first))
    assert convs(then) and all(channels_last(c.meta["val"]) for _, c in convs(then))
    assert not {k for k, _ in convs(first)} & {k for k, _ in convs(then)}


class ConvRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 19, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _timed_candidates(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple[list, list]:
    """The layout pass's timing of `model` on CUDA, run under Triton's interpreter with every timing equal (the
    incumbent stays): the ops of each kernel it built, and what each timed graph returned."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    from fxcc.codegen import triton as backend
    from fxcc.measure import using_timer
    from fxcc.passes.layout import Layout, rewrite
    torch.manual_seed(0)
    gm = graph_after(model, "decompose,canonicalize,raise", x)
    new = ir.clone_graph(gm)
    rewrite(new, gm)
    built, ran = [], []

    def build(body):
        built.append(sorted(str(n.target) for n in body.graph.nodes if n.op == "call_function"))
        return backend.pointwise_kernel(body)

    def timer(fn, device):
        ran.append(fn())
        return 1.0
    ctx = PassContext(options=fxcc.CompileOptions(), module=model, example_inputs=((x,), {}), target="cuda",
                      pointwise_kernel=build)
    with torch.no_grad(), using_timer(timer):
        assert Layout()._faster(gm, new, ctx) is False  # equal timings: the incumbent stays
    return built, ran


def test_the_timed_graphs_run_their_copies_as_the_generated_kernels(monkeypatch):
    """On CUDA the pass times its candidates with the copies and the pointwise chains run by the kernels the
    compile generates (torch's NCHW <-> NHWC copies are several times slower): in the channels-last graph the
    input's copy, and the relu with the copy of its result back to NCHW as one kernel (fusion makes them one
    epilogue); in the per-convolution one the copy back with the relu (its copies in are torch's, as the `nhwc`
    candidates make them); in the graph as it is the relu. Under Triton's interpreter: each timed graph's outputs
    equal eager's."""
    model, x = ConvRelu().eval(), torch.randn(2, 5, 7, 9)
    built, ran = _timed_candidates(model, x, monkeypatch)
    assert sorted(built) == [["aten.clone.default"], ["aten.clone.default", "aten.relu.default"],
                             ["aten.clone.default", "aten.relu.default"], ["aten.relu.default"]]
    want = model(x)
    assert len(ran) > 3
    for (got,) in ran:
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


class ConvLogsumexp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 6, 3, padding=1)

    def forward(self, x):
        return torch.logsumexp(torch.relu(self.conv(x)), dim=1, keepdim=True).clamp(-1.0, 1.0)


def test_a_graph_with_a_reduction_is_timed_with_its_copies_alone_as_kernels(monkeypatch):
    """A reduction stays torch's op in the timed graphs (the compile generates it), and with the pointwise chains
    fused its torch cost would decide between layouts: there only the layout copies (with what they absorb) are
    timed as the generated kernels, and the graph as it is runs torch's ops. The timed graphs equal eager."""
    model, x = ConvLogsumexp().eval(), torch.randn(2, 5, 7, 9)
    assert any("amax" in str(n.target) for n in graph_after(model, "decompose,canonicalize,raise", x).graph.nodes)
    built, ran = _timed_candidates(model, x, monkeypatch)
    assert built and all(any("clone" in t for t in b) for b in built)  # every kernel built is a layout copy's
    want = model(x)
    for (got,) in ran:
        torch.testing.assert_close(got, want)


class ConvGeluResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return x + F.gelu(self.conv(x)) * 0.5


def test_a_residual_epilogue_across_layouts_is_timed_as_one_kernel(monkeypatch):
    """`x + gelu(conv(x)) * 0.5` channels-last: the epilogue reads the convolution's NHWC result and the NCHW input
    and writes NCHW; the compile fuses it into one tiled kernel, so the pass times it as one (as torch's three ops
    reading a stride apart it lost to NCHW by more than the kernel saves). The timed graphs equal eager."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FXCC_TRITON_INTERPRET", "1")
    from fxcc.codegen import triton as backend
    from fxcc.passes.layout import as_compiled, rewrite
    torch.manual_seed(0)
    model, x = ConvGeluResidual().eval(), torch.randn(2, 6, 7, 9)
    gm = graph_after(model, "decompose,canonicalize,raise", x)
    new = ir.clone_graph(gm)
    rewrite(new, gm)
    built = []

    def build(body):
        built.append(sorted(str(n.target) for n in body.graph.nodes if n.op == "call_function"))
        return backend.pointwise_kernel(body)
    timed = as_compiled(new, build, epilogues=True)
    calls = [n for n in timed.graph.nodes if n.op == "call_function"]
    assert len(built) == 2 and ["aten.clone.default"] in built  # the copy in, and the whole epilogue
    assert len(calls) == 3  # the copy in, the convolution, the epilogue
    # every op but the convolution is in a generated kernel
    assert sum(map(len, built)) == len([n for n in new.graph.nodes if n.op == "call_function"]) - 1
    with torch.no_grad():
        want = model(x)
        for g in (timed, as_compiled(gm, build, epilogues=True)):
            got = g(x)[0]
            torch.testing.assert_close(got, want)
            assert got.stride() == want.stride()


def test_as_compiled_leaves_a_copy_torchs_where_no_kernel_is_built():
    from fxcc.passes.layout import as_compiled, rewrite
    torch.manual_seed(0)
    model, x = ConvRelu().eval(), torch.randn(2, 5, 7, 9)
    gm = graph_after(model, "decompose,canonicalize,raise", x)
    new = ir.clone_graph(gm)
    rewrite(new, gm)
    timed = as_compiled(new, lambda body: None)
    assert len(copies(timed, CL)) == 1 and len(copies(timed, torch.contiguous_format)) == 1
    with torch.no_grad():
        torch.testing.assert_close(timed(x)[0], model(x))
