"""Padding-aware attention (fxcc.codegen.key_trim) and the codegen probe that times it on real masks."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_outputs_close
from fxcc.autotune.select import Probe, example_inputs
from fxcc.codegen import extern, key_trim
from fxcc.dialects import KERNEL_OPS, kernel_body


def padded_mask(lengths: list[int], t: int) -> torch.Tensor:
    """HF's boolean padding mask [B, 1, T, T]: a broadcast view, every query row alike."""
    m = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return m[:, None, None, :].expand(len(lengths), 1, t, t)


def test_key_extent_reads_boolean_and_additive_masks():
    m = padded_mask([5, 3, 7], 16)
    assert key_trim.key_extent(m) == 7
    assert key_trim.key_extent(m.contiguous()) == 7  # materialised, not a broadcast view
    additive = torch.zeros(3, 1, 16, 16).masked_fill(~m, torch.finfo(torch.float32).min)
    assert key_trim.key_extent(additive) == 7
    assert key_trim.key_extent(additive.masked_fill(~m, float("-inf"))) == 7
    # a large negative bias that softmax does not drive to zero is a live key
    assert key_trim.key_extent(torch.zeros(3, 1, 16, 16).masked_fill(~m, -1e4)) == 16
    assert key_trim.key_extent(torch.ones(2, 1, 4, 16, dtype=torch.bool)) == 16  # nothing to trim


def test_key_extent_keeps_every_key_when_a_row_has_none_live():
    m = padded_mask([5, 3], 8).contiguous()
    m[1, 0, 2] = False  # one query row of batch 1 attends to nothing: eager averages over all 8 keys
    assert key_trim.key_extent(m) == 8


@pytest.mark.parametrize("kind", ["bool", "additive", "gqa", "no-padding", "dead-row"])
def test_trimmed_attention_equals_sdpa(kind):
    torch.manual_seed(0)
    b, h, t, d = 3, 4, 32, 16
    kv = 2 if kind == "gqa" else h
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    m = padded_mask([t, 9, 3] if kind == "no-padding" else [11, 9, 3], t)
    if kind == "dead-row":
        m = m.contiguous()
        m[2, 0, 5] = False
    mask = torch.zeros(b, 1, t, t).masked_fill(~m, torch.finfo(torch.float32).min) if kind == "additive" else m
    expected = torch.ops.fxcc_tx.attention(q, k, v, mask, d ** -0.5, False)
    torch.testing.assert_close(key_trim.attention(q, k, v, mask, d ** -0.5, False), expected, atol=1e-6, rtol=1e-5)


class PaddedEncoder(torch.nn.Module):
    """One attention layer over a padded batch, the mask built from the lengths as HF encoders do."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.out, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t, dim = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = attention_mask.bool()[:, None, None, :].expand(b, 1, t, t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, t, dim)) + x


def test_codegen_times_attention_on_the_models_own_mask_and_stays_exact():
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = torch.randn(3, 24, 32)
    lengths = torch.tensor([7, 5, 9])
    am = (torch.arange(24)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        expected = model(x, am)
        cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{reps=3}")
        got = cm(x, am)
    assert_outputs_close(got, expected, atol=1e-5, rtol=1e-5)
    v = cm.variants[-1]
    att = [kernel_body(n.args[1]) for n in v.gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS
           and "tx.attention" in kernel_body(n.args[1]).text]
    assert att, "the attention was not raised into a kernel"
    kb = att[0]
    assert "trim" in v.kernels[kb.key].timings_ms, v.kernels[kb.key]  # offered and measured beside the others
    # the probe hands the kernel the mask the model builds, so the trimmed candidate is timed on padding
    probe = Probe(v.gm, ((x, am), {}))
    real = probe(kb)
    inputs = example_inputs(kb, "cpu", real)
    masks = [t for t in inputs if t.dtype == torch.bool]
    assert masks and key_trim.key_extent(masks[0]) == 9
    # a GEMM's weight is timed as the parameter it is (backends keep packed copies of parameters)
    gemm = next(kernel_body(n.args[1]) for n in v.gm.graph.nodes if n.op == "call_function"
                and n.target in KERNEL_OPS and kernel_body(n.args[1]).kind == "gemm")
    timed = example_inputs(gemm, "cpu", probe(gemm), probe.params(gemm))
    assert [isinstance(t, torch.nn.Parameter) for t in timed] == [False, True, True]  # x, weight, bias
    # the trimmed build gives eager's result on the real mask
    ref = extern.Extern(kb).build({}).fn(inputs)
    got = extern.Extern(kb, backend="trim").build({}).fn(inputs)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_probe_falls_back_to_random_masks_when_the_example_does_not_run():
    model = PaddedEncoder().eval()
    x, am = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{reps=3}")
        cm(x, am)
    v = cm.variants[-1]
    kb = next(kernel_body(n.args[1]) for n in v.gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS
              and "tx.attention" in kernel_body(n.args[1]).text)
    assert Probe(v.gm, ((torch.randn(5, 3),), {}))(kb) == {}  # wrong example: nothing recorded, no error
    assert Probe(v.gm, ())(kb) == {}


def test_edge_masks_keep_the_kernels_layout():
    """The all-False-row edge input of a broadcast mask keeps its stride-0 dimension: a clone made it a real
    one, whose other rows a kernel built for the broadcast never reads (the TVM attention was rejected)."""
    from fxcc.autotune.select import edge_inputs

    mask = torch.ones(2, 8, dtype=torch.bool)[:, None, None, :].expand(2, 1, 8, 8)
    (edge, tol, _), = [e for e in edge_inputs([mask]) if e[0][0].dtype == torch.bool]
    assert edge[0].stride() == mask.stride() and tol == 0.0
    assert not edge[0][0].any() and edge[0][1].all() and mask.all()


def test_edge_masks_broadcast_along_their_last_dim_are_written_once():
    """A mask broadcast along its last dim (one place per row): its all-False row is that one place."""
    from fxcc.autotune.select import edge_inputs

    mask = torch.ones(2, 1, 8, 1, dtype=torch.bool).expand(2, 1, 8, 8)
    (edge, _, _), = [e for e in edge_inputs([mask]) if e[0][0].dtype == torch.bool]
    assert edge[0].stride() == mask.stride()
    assert not edge[0][0, 0, 0].any() and edge[0][0, 0, 1:].all() and mask.all()
