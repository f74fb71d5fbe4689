"""decompose: ops with no lowering become the aten ops they are made of (IR), computing what eager does;
and fusion then groups them (one kernel per norm, softmax or activation)."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

FRONT = "decompose,canonicalize"
EXTERN = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"


def ops_after(fn, *args, passes: str = FRONT) -> list[str]:
    cm = fxcc.compile(fn, passes=passes)
    gm = (cm.fxcc if hasattr(cm, "fxcc") else cm).compile_for(args, {}).gm
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def kernels(fn, *args, passes: str = EXTERN):
    """(outputs, kernel bodies' op lists) of fxcc's compile with extern kernels."""
    cm = fxcc.compile(fn, passes=passes)
    out = cm(*args)
    v = (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1]
    return out, [[str(b.target) for b in k.body.body.graph.nodes if b.op == "call_function"]
                 for k in v.kernels.values()]


def test_inference_batch_norm_becomes_pointwise_with_its_scale_folded():
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 5)
    ops = ops_after(bn, x)
    assert not any("batch_norm" in o for o in ops), ops
    # what the running statistics and the affine parameters compute alone is folded into one scale and one
    # shift per channel: x * scale + shift remains
    assert sorted(o for o in ops if "unsqueeze" not in o) == ["aten.add.Tensor", "aten.mul.Tensor"]
    out, bodies = kernels(bn, x)
    torch.testing.assert_close(out, bn(x))
    assert len(bodies) == 1


@pytest.mark.parametrize("make", [lambda: nn.GroupNorm(4, 8), lambda: nn.InstanceNorm2d(8, affine=True),
                                  lambda: nn.GroupNorm(8, 8, affine=False)])
def test_group_and_instance_norm_are_means_in_one_reduction_kernel(make):
    norm = make().eval()
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    ops = ops_after(norm, x)
    assert "aten.mean.dim" in ops and not any("norm" in o for o in ops), ops
    out, bodies = kernels(norm, x)
    torch.testing.assert_close(out, norm(x), atol=1e-5, rtol=1e-5)
    assert len(bodies) == 1 and bodies[0].count("aten.mean.dim") == 2


@pytest.mark.parametrize("make, flat", [(lambda: nn.InstanceNorm2d(2), torch.Tensor.view),
                                        (lambda: nn.GroupNorm(2, 4), torch.Tensor.reshape),
                                        (lambda: nn.BatchNorm2d(4).eval(), torch.Tensor.reshape)],
                         ids=["instance", "group", "batch"])
def test_a_decomposed_norm_of_a_channels_last_input_keeps_eagers_output_layout(make, flat):
    # eager's instance norm returns a contiguous tensor for a channels-last input, its decomposition one laid out
    # as the input: the `view` that eager allows after it then raised (group and batch norm keep channels-last)
    norm = make()

    def f(x):
        y = norm(x)
        return y, flat(y, (y.size(0), -1))
    for n in (3, 5):  # static, then a symbolic batch size
        x = torch.randn(n, 4, 6, 5).to(memory_format=torch.channels_last)
        out, ref = fxcc.compile(f, passes=EXTERN)(x), f(x)
        assert out[0].stride() == ref[0].stride(), (out[0].stride(), ref[0].stride())
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op, kwargs", [
    (torch.var, {"dim": 1}), (torch.var, {"dim": (0, 2), "keepdim": True}), (torch.std, {"dim": 2}),
    (torch.var, {"dim": 1, "correction": 0}), (torch.std, {"dim": (1, 2), "unbiased": False}),
])
def test_variance_and_standard_deviation(op, kwargs):
    def f(x):
        return op(x, **kwargs)
    x = torch.randn(4, 6, 10) + 5
    assert not any(o.startswith(("aten.var", "aten.std")) for o in ops_after(f, x))
    out, bodies = kernels(f, x)
    torch.testing.assert_close(out, f(x), atol=1e-5, rtol=1e-5)
    assert len(bodies) == 1


def test_softmax_along_the_last_dim_stays_for_raise_and_other_dims_are_one_kernel():
    x = torch.randn(3, 5, 7)
    assert "aten.softmax.int" in ops_after(lambda x: x.softmax(-1), x)

    def f(x):
        return x.softmax(0), x.log_softmax(1), torch.logsumexp(x, 1)
    assert not any("softmax" in o or "logsumexp" in o for o in ops_after(f, x))
    out, bodies = kernels(f, x)
    for got, want in zip(out, f(x)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # each statistic pair (max and sum over one dim) shares its kernel
    assert all(b.count("aten.amax.default") <= 1 for b in bodies) and len(bodies) <= 3


@pytest.mark.parametrize("act", [F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh, F.relu6, F.hardswish,
                                 F.hardsigmoid, F.mish, F.softplus, F.logsigmoid])
def test_activations_become_one_pointwise_kernel(act):
    x = torch.randn(4, 33) * 4
    ops = ops_after(act, x)
    assert act.__name__.replace("_", "") not in "".join(ops).replace("_", ""), ops
    out, bodies = kernels(act, x)
    torch.testing.assert_close(out, act(x), atol=1e-6, rtol=1e-6)
    assert len(bodies) == 1, bodies


def test_multi_output_views_become_slices_read_through_getitem():
    def f(x):
        a, b = x.chunk(2, dim=1)
        c, d, e = x.unbind(0)
        s, t = torch.split(x, [1, 3], dim=1)
        return a * b, c + d * e, s.sum(), torch.stack([t, t + 1]).mean(0)
    x = torch.randn(3, 4, 5)
    ops = ops_after(f, x)
    assert not any(o.split(".")[1] in ("chunk", "unbind", "split_with_sizes", "stack") for o in ops), ops
    out, _ = kernels(f, x)
    for got, want in zip(out, f(x)):
        torch.testing.assert_close(got, want)


def test_an_op_whose_decomposition_leaves_a_library_call_stays():
    def f(x, y):
        return F.cross_entropy(x, y)
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert "aten.cross_entropy_loss.default" in ops_after(f, x, y)


def test_decomposed_ops_keep_their_module_provenance():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.norm(x)
    cm = fxcc.compile(M(), passes="decompose")
    gm = cm.compile_for((torch.randn(1, 4, 3, 3),), {}).gm
    stacks = [n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"]
    assert stacks and all(s and any("norm" in str(v) for v in s.values()) for s in stacks)


def _bn(kind, c: int, affine: bool = True):
    """A batch norm in eval mode with running statistics and affine parameters away from their initial values."""
    bn = kind(c, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("conv, bn, shape, op", [
    (lambda: nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d, (2, 3, 7, 7), "conv2d.default"),
    (lambda: nn.Conv2d(6, 6, 3, groups=3, bias=False), nn.BatchNorm2d, (1, 6, 6, 5), "conv2d.default"),  # grouped
    (lambda: nn.Conv2d(6, 6, 3, groups=6, padding="same"), nn.BatchNorm2d, (2, 6, 5, 5), "conv2d.padding"),
    (lambda: nn.Conv1d(4, 5, 3, stride=2), nn.BatchNorm1d, (2, 4, 11), "conv1d.default"),
    (lambda: nn.Conv3d(2, 3, 2, bias=False), nn.BatchNorm3d, (1, 2, 4, 4, 4), "conv3d.default"),
    (lambda: nn.Linear(5, 6), nn.BatchNorm1d, (4, 5), "linear.default"),
    (lambda: nn.ConvTranspose3d(3, 4, 2, stride=2), nn.BatchNorm3d, (1, 3, 3, 3, 3), "conv_transpose3d.input"),
    (lambda: nn.ConvTranspose1d(3, 4, 3, bias=False), nn.BatchNorm1d, (2, 3, 5), "conv_transpose1d.default"),
])
@pytest.mark.parametrize("affine", [True, False])
def test_a_batch_norm_after_a_convolution_folds_into_its_weight_and_bias(conv, bn, shape, op, affine):
    torch.manual_seed(0)
    c = conv()
    m = nn.Sequential(c, _bn(bn, getattr(c, "out_channels", None) or c.out_features, affine), nn.ReLU()).eval()
    x = torch.randn(*shape)
    # the library convolution (or GEMM) computes the norm too: only the activation is left after it
    assert [o for o in ops_after(m, x) if o.startswith("aten.")] == [f"aten.{op}", "aten.relu.default"]
    out, bodies = kernels(m, x)
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
    assert len(bodies) == 1 and not any(o.startswith(("aten.mul", "aten.add", "aten.sub")) for o in bodies[0])


def test_a_channels_last_convolution_with_a_batch_norm_folds_and_keeps_its_layout():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), _bn(nn.BatchNorm2d, 8)).eval()
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    assert [o for o in ops_after(m, x) if o.startswith("aten.")] == ["aten.conv2d.default"]
    out, _ = kernels(m, x)
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out.stride() == want.stride()


def test_a_batch_norm_folds_only_where_the_convolution_has_no_other_reader_and_one_group_if_transposed():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), _bn(nn.BatchNorm2d, 4)
            self.up, self.bn2 = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), _bn(nn.BatchNorm2d, 4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn2(self.up(self.bn(y))), y  # conv read twice; grouped transposed conv
    m = Two().eval()
    x = torch.randn(1, 3, 4, 4)
    ops = ops_after(m, x)
    assert ops.count("aten.mul.Tensor") == 2 and ops.count("aten.add.Tensor") == 2, ops
    out, _ = kernels(m, x)
    with torch.no_grad():
        for got, want in zip(out, m(x)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_instance_norm_with_running_statistics_is_a_batch_norm_and_folds():
    norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), norm).eval()
    x = torch.randn(2, 2, 6, 6)
    assert [o for o in ops_after(m, x) if o.startswith("aten.")] == ["aten.conv2d.default"]
    out, _ = kernels(m, x)
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_convolutions_match_eager_with_the_default_pipeline(channels_last):
    """conv -> batch norm -> ReLU -> conv -> batch norm (no affine) through TVM and the library: equal to eager,
    in eager's strides, with no kernel left for either norm."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(nn.BatchNorm2d, 6), nn.ReLU(),
                      nn.Conv2d(6, 5, 1, bias=False), _bn(nn.BatchNorm2d, 5, affine=False)).eval()
    x = torch.randn(2, 3, 9, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cm = fxcc.compile(m, options=fxcc.CompileOptions(time_vs_eager=False))
    with torch.no_grad():
        got, want = cm(x), m(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.stride() == want.stride()
    v = cm.variants[-1]
    bodies = [[str(b.target) for b in k.body.body.graph.nodes if b.op == "call_function"] for k in v.kernels.values()]
    assert len(bodies) == 2 and all(not any(o.startswith(("aten.mul", "aten.sub")) for o in b) for b in bodies), bodies


def test_weights_scaled_by_a_batch_norm_are_copies_within_fold_mb():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(nn.BatchNorm2d, 4)).eval()
    x = torch.randn(1, 3, 6, 6)
    ops = ops_after(m, x, passes="decompose{fold_mb=0},canonicalize")
    assert [o for o in ops if o.startswith("aten.")] == ["aten.conv2d.default", "aten.mul.Tensor", "aten.add.Tensor"]
    out, _ = kernels(m, x, passes="decompose{fold_mb=0},canonicalize,raise,fuse,codegen{backend=extern}")
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fold_mb"):
        fxcc.compile(m, passes="decompose{fold_mb=-1}")(x)
