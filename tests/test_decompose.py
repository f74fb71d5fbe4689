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
    # what the running statistics and the affine parameters compute alone is folded: only x's ops remain
    assert sorted(o for o in ops if "unsqueeze" not in o) == ["aten.add.Tensor", "aten.mul.Tensor",
                                                              "aten.mul.Tensor", "aten.sub.Tensor"]
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
