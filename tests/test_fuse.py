"""fuse: which ops share a kernel (bodies by their ops), and outputs equal eager (extern kernels, so these tests
check the grouping itself)."""

from __future__ import annotations

import fxcc
import torch
import torch.nn as nn
import torch.nn.functional as F

PIPE = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"


def bodies(fn, *args) -> list[tuple[str, list[str]]]:
    """(kind, the ops' short names) of every kernel of fxcc's compile, after checking outputs against eager."""
    cm = fxcc.compile(fn, passes=PIPE)
    got, want = cm(*args), fn(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    v = (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1]
    return [(k.kind, [str(b.target).split(".")[1] for b in k.body.body.graph.nodes if b.op == "call_function"])
            for k in v.kernels.values()]


def test_convolution_anchors_its_epilogue():
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()

    def f(x, r):
        return torch.sigmoid(F.relu(conv(x)) * 0.5 + r)
    (kb,) = bodies(f, torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6))
    assert kb == ("gemm", ["conv2d", "relu", "mul", "add", "sigmoid"])


def test_conv_batch_norm_relu_and_pooling_are_one_kernel():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)).eval()
    (kb,) = bodies(net, torch.randn(1, 3, 9, 9))
    assert kb[0] == "gemm" and kb[1][0] == "conv2d" and kb[1][-1] == "max_pool2d"
    assert "batch_norm" not in str(kb)


def test_pointwise_siblings_merge_when_one_op_reads_both():
    def f(x):
        return torch.where(x > 0, x * 2, torch.exp(x) - 1)  # three branches from x, one consumer
    assert bodies(f, torch.randn(5, 7)) == [("pointwise", ["gt", "mul", "exp", "sub", "where"])]


def test_reductions_over_one_domain_share_a_kernel_and_others_do_not():
    def f(x):
        m = x.amax(1, keepdim=True)
        e = (x - m).exp()
        return e / e.sum(1, keepdim=True), x.sum(2)
    kbs = bodies(f, torch.randn(3, 4, 5))
    assert sorted(kb[1].count("amax") + kb[1].count("sum") for kb in kbs) == [1, 2]


def test_gathers_fuse_with_their_producers():
    def f(x, y):
        return F.pad(torch.cat([x.relu(), y * 2], 1), (1, 1)).roll(1, 2)
    (kb,) = bodies(f, torch.randn(2, 3, 4), torch.randn(2, 2, 4))
    assert kb[0] == "pointwise" and {"cat", "pad", "roll"} <= set(kb[1])


def test_random_ops_run_eagerly_in_eagers_order_of_draws():
    def f(x):
        y = x.sin()
        b = torch.bernoulli(y.sigmoid())  # first draw: reads a value of the group that takes `y * r`
        r = torch.randn_like(x)  # second draw
        return b, y * r

    x = torch.randn(4, 8)
    cm = fxcc.compile(f, passes=PIPE)
    for seed in (1, 2):  # the first call (compile, then the call) and a later one
        torch.manual_seed(seed)
        got, after = cm(x), torch.rand(2)
        torch.manual_seed(seed)
        want = f(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(after, torch.rand(2))  # the generator ends where eager leaves it
    gm = cm.fxcc.variants[-1].gm
    draws = [n for n in gm.graph.nodes if n.meta.get("fxcc_eager", "").endswith("it draws what eager draws)")]
    assert [str(n.target) for n in draws] == ["aten.bernoulli.default", "aten.randn_like.default"]


def test_gapped_views_move_into_the_kernel_that_reads_them():
    # one projection of every step, then per step a slice of it read by the next GEMM's kernel: the slices are
    # gapped (a step of a row), so the projection's kernel writes its dense result once and each reader slices it
    torch.manual_seed(0)
    proj, step = nn.Linear(8, 12), nn.Linear(4, 4)

    def f(x):
        xs = proj(x)
        h = step(xs[:, 1, :4])
        return torch.tanh(h + xs[:, 2, 4:8])
    kbs = bodies(f, torch.randn(2, 6, 8))
    first, second = kbs
    assert first == ("gemm", ["linear"])
    assert second[0] == "gemm" and {"select", "slice", "linear", "tanh"} <= set(second[1])

