"""merge-linears: sibling linears over one input become one linear on concatenated weights, then slices."""

from __future__ import annotations

import fxcc
import pytest
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


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("rows", [4, 32])
def test_on_cuda_only_decode_shaped_linears_merge_unless_asked(gpu, rows):
    """On the GPU the pass merges linears of at most 16 rows (decode: one GEMV for Q/K/V, see the gemv pass);
    larger ones only with gpu=true."""
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(rows, 32)
    cm = fxcc.compile(model, passes="canonicalize,raise")
    cm(x)
    gm = cm.variants[-1].gm
    from fxcc.passes.merge_linears import MergeLinears
    assert MergeLinears(gpu=gpu).apply(gm, PassContext(target="cuda")).changed == (gpu or rows <= 16)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def test_the_merged_weight_is_the_projections_storage_and_updates_after_compile_are_seen():
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 32)
    cm = fxcc.compile(model, passes=PIPE)
    assert_outputs_close(cm(x), model(x))
    gm = cm.variants[-1].gm
    merged = [t for n, t in gm.named_buffers() if n.startswith("_merged_weight")]
    assert len(merged) == 1
    q, k, v = model.q.weight, model.k.weight, model.v.weight
    assert _storage(q) == _storage(k) == _storage(v) == _storage(merged[0])  # held once
    assert [t.storage_offset() for t in (q, k, v)] == [0, 64 * 32, 80 * 32]
    assert merged[0].untyped_storage().nbytes() == 96 * 32 * 4
    assert torch.equal(merged[0], torch.cat([q, k, v]))
    taken = [id(s.copy) for _, s in cm._params.watched]
    assert_outputs_close(cm(x), model(x))
    assert [id(s.copy) for _, s in cm._params.watched] == taken  # reading the shared memory moved nothing

    with torch.no_grad():
        model.k.weight.data.mul_(2)  # through .data: no version bump
    assert_outputs_close(cm(x), model(x))
    with torch.no_grad():
        model.q.weight.copy_(torch.randn(64, 32))
        model.v.bias.copy_(torch.randn(16))
    assert_outputs_close(cm(x), model(x))
    other = QKV().eval()
    model.load_state_dict(other.state_dict())
    assert_outputs_close(cm(x), model(x))
    assert_outputs_close(cm(x), other(x))
    model.v.weight.data = torch.randn(16, 32)  # new memory for one part: merged again, the parts moved along
    assert_outputs_close(cm(x), model(x))
    assert _storage(model.q.weight) == _storage(model.k.weight) == _storage(model.v.weight)
    assert cm.stats.param_recompiles >= 1


def test_weights_that_share_their_storage_with_other_tensors_are_copied_not_moved():
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(4, 32)
    alias = model.k.weight.data  # the caller's own view of k's memory: must keep seeing k
    cm = fxcc.compile(model, passes=PIPE)
    assert_outputs_close(cm(x), model(x))
    assert _storage(model.k.weight) == _storage(alias)
    with torch.no_grad():
        alias.mul_(3)
    assert_outputs_close(cm(x), model(x))


def test_a_graph_cache_hit_shares_the_weights_too(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 32)
    twin = QKV().eval()
    twin.load_state_dict(model.state_dict())
    first = fxcc.compile(model, passes=PIPE)
    assert_outputs_close(first(x), model(x))
    second = fxcc.compile(twin, passes=PIPE)
    assert_outputs_close(second(x), twin(x))
    assert "graph cache" in second.variants[-1].captured.method
    merged = [t for n, t in second.variants[-1].gm.named_buffers() if n.startswith("_merged_weight")]
    assert _storage(twin.q.weight) == _storage(twin.v.weight) == _storage(merged[0])
    with torch.no_grad():
        twin.v.weight.data.add_(1)
    assert_outputs_close(second(x), twin(x))


def test_compiled_under_inference_mode_the_weights_stay_updatable_outside_it():
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 32)
    cm = fxcc.compile(model, passes=PIPE)
    with torch.inference_mode():
        out = cm(x)
    assert_outputs_close(out, model(x))
    assert not model.q.weight.is_inference() and _storage(model.q.weight) == _storage(model.v.weight)
    with torch.no_grad():
        model.q.weight.data.mul_(2)
    model.load_state_dict(QKV().state_dict())
    with torch.inference_mode():
        out, ref = cm(x), model(x)
    assert_outputs_close(out, ref)


class TimeMajorHeads(nn.Module):
    """F.multi_head_attention_forward's layout (WavLM): (T, B, C) projections viewed as (T, B * heads, head_dim),
    a view that merges the batch into the heads and so cannot view a column slice of a wider output."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        t, b, _ = x.shape
        q, k, v = (p(x).view(t, b * 2, 8).transpose(0, 1) for p in (self.q, self.k, self.v))
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def test_linears_whose_views_cannot_take_a_slice_stay_apart():
    torch.manual_seed(0)
    model = TimeMajorHeads().eval()
    cm = fxcc.compile(model, options=fxcc.CompileOptions(verify_each=True))
    for shape in ((5, 2, 16), (7, 3, 16)):  # static, then symbolic
        x = torch.randn(shape)
        with torch.no_grad():
            assert_outputs_close(cm(x), model(x))
    assert not cm.eager_signatures
    for v in cm.variants:
        assert next(r for r in v.records if r.spec == "merge-linears").result.stats == {}


class MaskedGatedMLP(nn.Module):
    """A gated MLP over the rows a mask selects (Higgs Audio's audio-token MLP): its rows are a data-dependent
    size, which layout checks cannot guard on."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x, mask):
        h = x[mask]
        return self.down(F.silu(self.gate(h)) * self.up(h))


def test_linears_over_rows_of_a_data_dependent_count_merge():
    torch.manual_seed(0)
    model = MaskedGatedMLP().eval()
    cm = fxcc.compile(model, options=fxcc.CompileOptions(verify_each=True))
    for n in (6, 9):
        x, mask = torch.randn(2, n, 16), torch.rand(2, n) > 0.5
        with torch.no_grad():
            assert_outputs_close(cm(x, mask), model(x, mask))
    assert not cm.eager_signatures
    rec = next(r for r in cm.variants[0].records if r.spec == "merge-linears")
    assert rec.result.stats == {"merged": 1, "linears": 2}


def test_a_merged_layout_that_cannot_be_computed_leaves_the_linears_apart(monkeypatch):
    """torch 2.11 cannot run a linear of symbolic rows copied into the pass's fake mode (a decode step's, on the
    GPU): the merged output's layout is then unknown, so the linears stay apart and the compile goes on."""
    from fxcc.passes import merge_linears

    def cannot(*a, **k):
        raise RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides\nmore")

    monkeypatch.setattr(merge_linears, "_merged_value", cannot)
    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 8, 32)
    cm = fxcc.compile(model, passes=PIPE, options=fxcc.CompileOptions(graph_cache=False))  # this graph, not a hit
    assert_outputs_close(cm(x), model(x))
    assert len(linears(cm)) == 4  # q, k, v and o, as written
