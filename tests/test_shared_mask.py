"""A boolean mask several attention calls read is made additive once per call of the graph
(fxcc.codegen.shared_mask): outputs bit for bit those of SDPA given the boolean mask at every call, the check that
guards it refusing a conversion that differs, the caller's random state untouched."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc.codegen import shared_mask as sm
from fxcc.dialects import REFERENCE

PLAIN = REFERENCE[torch.ops.fxcc_tx.attention.default]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def qkv(b, h, hkv, t, length, dtype, seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((b, h, t, d), (b, hkv, length, d), (b, hkv, length, d))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "hkv", "t", "length", "mask_t"), [
    (3, 4, 2, 1, 10, 1),  # a decode step: one query, grouped kv heads, the mask broadcast over heads
    (2, 4, 4, 5, 7, 5),   # a prefill over a cache: a mask per query row
])
def test_the_shared_mask_gives_sdpas_output_for_the_boolean_mask_at_every_layer(dtype, b, h, hkv, t, length, mask_t,
                                                                                 monkeypatch):
    monkeypatch.setattr(sm, "_CHECKED", {})
    g = torch.Generator().manual_seed(1)
    mask = torch.rand((b, 1, mask_t, length), generator=g) < 0.6
    mask[1] = False  # a row with no key allowed, where the backends' conventions differ
    shared = sm.SharedMask(mask)
    for layer in range(3):  # three layers of one graph call: one conversion, three attention calls
        q, k, v = qkv(b, h, hkv, t, length, dtype, seed=layer)
        assert same(sm.attention(q, k, v, shared, 0.25, False), PLAIN(q, k, v, mask, 0.25, False))
    assert len(shared.additive) == 1 and next(iter(shared.additive.values())) is not None


def test_a_conversion_unlike_sdpas_own_is_refused_by_the_check(monkeypatch):
    """Were the additive mask written here not the one SDPA makes (here: masked keys kept), the check on made-up
    masks finds it and every call takes the boolean mask: still SDPA's own output."""
    monkeypatch.setattr(sm, "_CHECKED", {})
    monkeypatch.setattr(sm, "convert", lambda mask, dtype, backend: torch.zeros(mask.shape, dtype=dtype))
    mask = torch.rand((2, 1, 1, 9), generator=torch.Generator().manual_seed(2)) < 0.5
    mask[..., 0] = True
    shared = sm.SharedMask(mask)
    q, k, v = qkv(2, 4, 4, 1, 9, torch.float32)
    assert same(sm.attention(q, k, v, shared, 0.25, False), PLAIN(q, k, v, mask, 0.25, False))
    assert list(shared.additive.values()) == [None] and list(sm._CHECKED.values()) == [False]


def test_the_check_leaves_the_callers_random_state_as_it_was(monkeypatch):
    monkeypatch.setattr(sm, "_CHECKED", {})
    mask = torch.ones((1, 1, 1, 6), dtype=torch.bool)
    q, k, v = qkv(1, 2, 2, 1, 6, torch.float32)
    before = torch.get_rng_state()
    sm.attention(q, k, v, sm.SharedMask(mask), 0.5, False)
    assert sm._CHECKED and torch.equal(torch.get_rng_state(), before)


class TwoLayers(nn.Module):
    """Two attention layers reading one boolean mask (as a decoder's layers read the step's), and with `peek` the
    mask also read by something else."""

    def __init__(self, peek: bool = False):
        super().__init__()
        self.q = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.peek = peek

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        mask = (keep[:, None, None, :] > 0) & (x[:, None, :, :1].transpose(-1, -2) > -3)
        for q in self.q:
            h = q(x).view(x.shape[0], x.shape[1], 2, 16).transpose(1, 2)
            x = x + F.scaled_dot_product_attention(h, h, h, attn_mask=mask).transpose(1, 2).reshape(x.shape)
        return x + mask.sum() if self.peek else x


def _shared_nodes(cm) -> int:
    ex = cm.variants[-1].executable
    return sum(n.op == "call_function" and n.target is sm.SharedMask for n in ex.graph.nodes)


@pytest.mark.parametrize("peek", [False, True])
def test_a_compiled_model_shares_a_mask_only_attention_reads(peek, monkeypatch):
    monkeypatch.setattr(sm, "DEVICES", ("cpu", "cuda"))  # shared on CUDA only by default
    torch.manual_seed(0)
    model = TwoLayers(peek).eval()
    x, keep = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}",
                       options={"time_vs_eager": False})
    with torch.no_grad():
        got, want = cm(x, keep), model(x, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attention = [n for n in cm.variants[-1].executable.graph.nodes
                 if n.op == "call_function" and n.target in (sm.attention, PLAIN)]
    assert len(attention) == 2
    assert _shared_nodes(cm) == (0 if peek else 1)
    assert all(n.target is (PLAIN if peek else sm.attention) for n in attention)


def test_on_the_cpu_masks_are_not_shared_by_default():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}",
                      options={"time_vs_eager": False})
    with torch.no_grad():
        cm(torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]))
    assert _shared_nodes(cm) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("b", [1, 8])
def test_on_cuda_a_decode_steps_mask_is_shared_and_exact(b, monkeypatch):
    """The bench's decode shapes in bf16 (16 query heads over 8 kv heads, a 768-key cache, a padded row): the
    backend SDPA picks (cuDNN on an H100/H200) is served by the shared mask, bit for bit its own output."""
    monkeypatch.setattr(sm, "_CHECKED", {})
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand((b, 1, 1, 768), generator=g) < 0.9).cuda()
    mask[..., 0] = False
    shared = sm.SharedMask(mask)
    for layer in range(3):
        q, k, v = (x.cuda() for x in qkv(b, 16, 8, 1, 768, torch.bfloat16, seed=layer, d=128))
        assert same(sm.attention(q, k, v, shared, 128 ** -0.5, False), PLAIN(q, k, v, mask, 128 ** -0.5, False))
    assert list(sm._CHECKED.values()) == [True], sm._CHECKED
