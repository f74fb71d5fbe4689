"""merge-linears: sibling linears over one input become one linear on concatenated weights, then slices."""

from __future__ import annotations

import fxcc
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_outputs_close
from fxcc.pipeline import PassContext

PIPE = "canonicalize,raise,merge-linears"


class QKV(nn.Module):
    """Grouped-query shaped projections: q is wider than k and v; `o` reads another input."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 64, bias=bias), nn.Linear(32, 16, bias=bias), nn.Linear(32, 16, bias=bias)
        self.o = nn.Linear(64, 32)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(q) + k.sum(-1, keepdim=True) * v.mean(-1, keepdim=True)


def linears(cm) -> list:
    gm = cm.variants[-1].gm
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]


def test_three_projections_of_one_input_become_one_linear_and_slices():
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 32)
    cm = fxcc.compile(model, passes=PIPE, options=fxcc.CompileOptions(verify_each=True))
    out = cm(x)
    assert_outputs_close(out, model(x))
    lin = linears(cm)
    assert len(lin) == 2  # q|k|v merged, o alone
    wide = next(n for n in lin if n.meta["val"].shape[-1] == 96)
    slices = [u for u in wide.users if u.target is torch.ops.aten.slice.Tensor]
    assert [(s.args[2], s.args[3]) for s in slices] == [(0, 64), (64, 80), (80, 96)]
    rec = next(r for r in cm.variants[-1].records if r.spec == "merge-linears")
    assert rec.result.stats == {"merged": 1, "linears": 3}
    # the default pipeline merges them too, and the compiled model still equals eager
    full = fxcc.compile(model)
    assert_outputs_close(full(x), model(x))


def test_linears_without_bias_merge_and_mixed_bias_or_input_weights_do_not():
    torch.manual_seed(0)
    model, x = QKV(bias=False).eval(), torch.randn(4, 32)
    cm = fxcc.compile(model, passes=PIPE)
    assert_outputs_close(cm(x), model(x))
    assert len(linears(cm)) == 2

    mixed = QKV().eval()
    mixed.k = nn.Linear(32, 16, bias=False)
    cm = fxcc.compile(mixed, passes=PIPE)
    assert_outputs_close(cm(x), mixed(x))
    assert len(linears(cm)) == 3  # q and v merge (both with bias); k stays alone

    def f(x, w1, w2):  # weights that arrive as inputs are not constants: nothing to concatenate
        return F.linear(x, w1) + F.linear(x, w2)
    w1, w2 = torch.randn(8, 32), torch.randn(8, 32)
    cm = fxcc.compile(f, passes=PIPE)
    torch.testing.assert_close(cm(x, w1, w2), f(x, w1, w2))
    assert len(linears(cm.fxcc)) == 2


def test_the_pass_leaves_cuda_graphs_alone():
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(4, 32)
    cm = fxcc.compile(model, passes="canonicalize,raise")
    cm(x)
    gm = cm.variants[-1].gm
    from fxcc.passes.merge_linears import MergeLinears
    assert not MergeLinears().apply(gm, PassContext(target="cuda")).changed
    assert MergeLinears().apply(gm, PassContext(target="cpu")).changed
