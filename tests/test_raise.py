"""The raise pass: golden IR for small hand-written modules, and differential runs on transformers models.

Set FXCC_UPDATE_GOLDEN=1 to rewrite tests/golden/raise_*.mlir from the current output.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc.capture import capture, flatten_inputs
from fxcc.ir import print_graph
from fxcc.pipeline import PassContext, PassManager, parse_pipeline
from torch.utils import _pytree as pytree

GOLDEN = Path(__file__).parent / "golden"


def raise_model(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """Capture, canonicalize and raise with verification after each pass; returns (gm, raise stats)."""
    kwargs = kwargs or {}
    gm = capture(model, args, kwargs).gm
    pm = PassManager(parse_pipeline("canonicalize,raise"), verify_each=True)
    pm.run(gm, PassContext(module=model, example_inputs=args))
    return gm, pm.records[-1].result.stats


def tx_ops(gm: torch.fx.GraphModule) -> Counter:
    return Counter(n.target.__name__.split(".")[0] for n in gm.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "fxcc_tx")


def assert_same_outputs(gm, model, args, kwargs=None, atol=1e-5):
    kwargs = kwargs or {}
    flat, _ = flatten_inputs(args, kwargs)
    with torch.no_grad():
        got = gm(*flat)
        want = pytree.tree_leaves(model(*args, **kwargs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------- golden modules


class RMSNormBlock(nn.Module):
    """Llama's RMSNorm (fp32 statistics, cast back, weight on the left) and a bare one without casts."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.weight * h.to(dtype)
        return y, y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class EagerAttention(nn.Module):
    """Grouped-query attention written out: repeat_kv, q @ k^T / sqrt(d) + mask, softmax, dropout, @ v."""

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask
        p = F.dropout(torch.softmax(scores, dim=-1), p=0.0, training=False)
        return torch.matmul(p, v)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """Llama's apply_rotary_pos_emb, once as written and once with every operand order swapped."""

    def forward(self, q, k, cos, sin):
        return q * cos + rotate_half(q) * sin, sin * rotate_half(k) + cos * k


class GatedMLP(nn.Module):
    """SwiGLU through F.silu, and GeGLU through the erf form of GELU written out."""

    def __init__(self, dim=4, hidden=8):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False),
                                         nn.Linear(hidden, dim, bias=False))

    def forward(self, x):
        g = self.gate(x)
        swiglu = F.silu(g) * self.up(x)
        geglu = self.up(x) * (g * 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0))))
        return self.down(swiglu + geglu)


class NewGELU(nn.Module):
    """GPT-2's tanh approximation, as transformers' NewGELUActivation writes it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


GOLDEN_CASES = {
    "rms_norm": (RMSNormBlock, lambda: (torch.randn(1, 2, 8),), {"rms_norm": 2}),
    "attention": (EagerAttention, lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                                           torch.randn(1, 1, 4, 4)), {"attention": 1}),
    "rotary": (Rotary, lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                                torch.randn(1, 1, 4, 8)), {"rotary": 2}),
    "gated_mlp": (GatedMLP, lambda: (torch.randn(1, 2, 4),), {"gated_act": 2}),
    "new_gelu": (NewGELU, lambda: (torch.randn(1, 2, 8),), {"gelu": 1}),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name):
    make, inputs, expected = GOLDEN_CASES[name]
    model, args = make().eval(), inputs()
    gm, stats = raise_model(model, args)
    assert stats == expected
    assert_same_outputs(gm, model, args)
    text = print_graph(gm) + "\n"
    path = GOLDEN / f"raise_{name}.mlir"
    if os.environ.get("FXCC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with FXCC_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"IR differs from {path}; run with FXCC_UPDATE_GOLDEN=1 if intended"


# ------------------------------------------------------------------------------ variants and misses


class T5Norm(nn.Module):
    """transformers' T5LayerNorm: fp32 statistics applied to the uncast input, cast to a half weight."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


@pytest.mark.parametrize("make, expected", [(RMSNormBlock, {"rms_norm": 1}), (T5Norm, {"rms_norm": 1})])
def test_rms_norm_bf16_is_bitwise(make, expected):
    # the bare norm of RMSNormBlock takes bf16 statistics: tx.rms_norm would take fp32 ones, so it stays
    model, args = make().to(torch.bfloat16).eval(), (torch.randn(1, 2, 8, dtype=torch.bfloat16),)
    gm, stats = raise_model(model, args)
    assert stats == expected
    flat, _ = flatten_inputs(args, {})
    for got, want in zip(gm(*flat), pytree.tree_leaves(model(*args))):
        assert torch.equal(got, want)


class OneOps(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        native = torch.ops.aten.native_layer_norm(x, [8], self.ln.weight, self.ln.bias, 1e-5)[0]
        return (torch.softmax(x, -1), torch.softmax(x, -1, dtype=torch.float64), self.ln(x), native,
                x * torch.sigmoid(x), F.gelu(x, approximate="tanh"), F.silu(x))


def test_one_op_raises():
    # softmax into float64 would change the dtype tx.softmax keeps: not raised
    model, args = OneOps().eval(), (torch.randn(1, 2, 8),)
    gm, stats = raise_model(model, args)
    assert stats == {"softmax": 1, "layer_norm": 2, "silu": 2, "gelu": 1}
    assert_same_outputs(gm, model, args)


class SDPAVariants(nn.Module):
    def forward(self, q, k, v):
        return (F.scaled_dot_product_attention(q, k, v),
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5),
                F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True))


def test_sdpa_variants():
    model, args = SDPAVariants().eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3))
    gm, stats = raise_model(model, args)
    assert stats == {"attention": 3}
    scales = [n.args[4] for n in gm.graph.nodes if n.op == "call_function" and "attention" in str(n.target)]
    assert scales == [1 / math.sqrt(8), 0.5, 1 / math.sqrt(8)]
    assert_same_outputs(gm, model, args)


class SDPADropout(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_sdpa_with_dropout_is_not_raised():
    gm, stats = raise_model(SDPADropout(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert stats == {}


# ------------------------------------------------------------------------ transformers, differential


def _tiny(name: str, attn: str):
    T = pytest.importorskip("transformers")
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    ids = (torch.randint(0, 100, (1, 8)),)
    if name == "llama":  # grouped-query attention: 4 query heads over 2 kv heads
        model, args = T.LlamaModel(T.LlamaConfig(num_key_value_heads=2, **common)), ids
    elif name == "qwen2":
        model, args = T.Qwen2Model(T.Qwen2Config(num_key_value_heads=2, **common)), ids
    elif name == "bert":
        model, args = T.BertModel(T.BertConfig(**common)), ids
    elif name == "gpt2":
        cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                           eos_token_id=0)
        model, args = T.GPT2Model(cfg), ids
    elif name == "t5":
        model, args = T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                  num_heads=4)), ids
    else:
        cfg = T.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=8)
        model, args = T.ViTModel(cfg), (torch.randn(1, 3, 16, 16),)
    model.config._attn_implementation = attn
    return model.eval(), args


# causal_mask: the constant masks these models build are causal (decoders) or allow everything (encoders
# called without a padding mask), so attention runs unmasked; T5's position bias is a bias, not a mask.
# Called without a padding mask, SDPA decoders build no mask at all, as in eager (fxcc.mask_skip).
DECODER = {"rms_norm": 2 * 2 + 1, "attention": 2, "rotary": 2 * 2, "gated_act": 2, "causal_mask": 2}
ENCODER = {"layer_norm": 2 * 2 + 1, "attention": 2, "gelu": 2, "causal_mask": 2}
SDPA_DECODER = {k: v for k, v in DECODER.items() if k != "causal_mask"}


@pytest.mark.parametrize("name, attn, expected", [
    ("llama", "sdpa", SDPA_DECODER), ("llama", "eager", DECODER), ("qwen2", "sdpa", SDPA_DECODER),
    ("bert", "sdpa", ENCODER), ("bert", "eager", ENCODER), ("gpt2", "sdpa", {k: v for k, v in ENCODER.items() if k != "causal_mask"}),
    ("gpt2", "eager", ENCODER), ("vit", "sdpa", ENCODER),
    ("t5", "sdpa", {"rms_norm": 2 * 2 + 1, "attention": 2}), ("t5", "eager", {"rms_norm": 2 * 2 + 1, "attention": 2}),
])
def test_transformers(name, attn, expected):
    model, args = _tiny(name, attn)
    gm, stats = raise_model(model, args)
    assert stats == expected
    assert tx_ops(gm) == Counter({k: v for k, v in expected.items() if k != "causal_mask"})
    assert_same_outputs(gm, model, args)


# ------------------------------------------------------------------------------------- causal masks


class MaskedSDPA(nn.Module):
    """SDPA with a mask built from constants, as transformers builds it under export."""

    def __init__(self, kind: str, t: int = 4):
        super().__init__()
        pos = torch.arange(t)
        if kind == "bool_causal":
            mask = pos[None, :] <= pos[:, None]
        elif kind == "additive_causal":
            mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
        elif kind == "all":
            mask = torch.ones(t, t, dtype=torch.bool)
        elif kind == "window":  # causal and at most one key back: not causal
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - 1)
        else:  # a real bias: small values are not a mask
            mask = torch.randn(t, t)
        self.register_buffer("mask", mask[None, None])

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class InputMask(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_args(gm):
    return [n.args[3:] for n in gm.graph.nodes if n.op == "call_function" and "attention" in str(n.target)]


def test_golden_causal_mask(golden):
    model, args = MaskedSDPA("bool_causal").eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3))
    gm, stats = raise_model(model, args)
    assert stats == {"attention": 1, "causal_mask": 1}
    assert_same_outputs(gm, model, args)
    golden("raise_causal_mask.mlir", print_graph(gm))


@pytest.mark.parametrize("kind, expected", [
    ("bool_causal", (None, 0.35355339059327373, True)), ("additive_causal", (None, 0.35355339059327373, True)),
    ("all", (None, 0.35355339059327373, False)),
])
def test_causal_mask_is_checked_by_value(kind, expected):
    model, args = MaskedSDPA(kind).eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3))
    gm, stats = raise_model(model, args)
    assert stats["causal_mask"] == 1
    assert _attention_args(gm) == [expected]
    assert_same_outputs(gm, model, args)


@pytest.mark.parametrize("kind", ["window", "bias"])
def test_other_constant_masks_stay(kind):
    model, args = MaskedSDPA(kind).eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3))
    gm, stats = raise_model(model, args)
    assert "causal_mask" not in stats
    (mask, _, is_causal), = _attention_args(gm)
    assert mask is not None and not is_causal
    assert_same_outputs(gm, model, args)


def test_mask_from_an_input_stays():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    gm, stats = raise_model(InputMask(), (*(torch.randn(1, 2, 4, 8) for _ in range(3)), causal))
    assert "causal_mask" not in stats  # the next call may pass another mask


class PaddedEagerAttention(nn.Module):
    """Attention written out with an additive key-padding mask (a runtime input, or a constant buffer)."""

    def __init__(self, t: int = 4):
        super().__init__()
        self.register_buffer("causal", torch.full((t, t), float("-inf")).triu(1))

    def forward(self, q, k, v, bias):
        padded = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + bias, dim=-1) @ v
        causal = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + self.causal, dim=-1) @ v
        return padded, causal


def test_eager_attention_keeps_nan_of_a_fully_masked_row():
    # eager's softmax over a row of -inf is NaN; tx.attention follows SDPA, whose fully masked rows are 0
    bias = torch.zeros(2, 1, 1, 4)
    bias[0, ..., 2:] = float("-inf")
    bias[1] = float("-inf")  # batch 1: every key padded
    model, args = PaddedEagerAttention().eval(), (*(torch.randn(2, 2, 4, 8) for _ in range(3)), bias)
    gm, stats = raise_model(model, args)
    assert stats == {"attention": 2, "causal_mask": 1}
    padded, causal = gm(*args)
    want_padded, want_causal = model(*args)
    assert padded[1].isnan().all() and not padded[0].isnan().any()
    torch.testing.assert_close(padded, want_padded, equal_nan=True)
    torch.testing.assert_close(causal, want_causal)
    # a constant mask that blocks no whole row needs no NaN fix-up after the attention
    assert sum(n.target is torch.ops.aten.where.ScalarSelf for n in gm.graph.nodes) == 1


class RotaryHalfOfSize(nn.Module):
    def forward(self, x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def test_rotary_with_a_symbolic_head_dim_stays():
    # with every dim symbolic the slice bounds are symbols: raise cannot tell they are the halves (it raised a
    # TypeError from slice.indices), and the graph keeps the ops
    x, cos, sin = torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    gm = capture(RotaryHalfOfSize(), (x, cos, sin), {}, dims={0: {2, 3}, 1: {0, 1}, 2: {0, 1}}).gm
    pm = PassManager(parse_pipeline("canonicalize,raise"), verify_each=True)
    pm.run(gm, PassContext(module=RotaryHalfOfSize(), example_inputs=(x, cos, sin)))
    assert "rotary" not in pm.records[-1].result.stats
    torch.testing.assert_close(gm(x, cos, sin)[0], RotaryHalfOfSize()(x, cos, sin))


def test_causal_needs_square_scores():
    # with more keys than queries a lower-triangular mask is not SDPA's is_causal (top-left aligned)
    model = MaskedSDPA("bool_causal")
    model.mask = model.mask[:, :, 1:]  # 3 queries x 4 keys
    args = (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    gm, stats = raise_model(model.eval(), args)
    assert "causal_mask" not in stats
    assert_same_outputs(gm, model, args)


def test_attention_fake_gives_a_symbolic_shape_where_the_reference_cannot(monkeypatch):
    """torch before 2.13 cannot run SDPA's fake kernel with a mask of symbolic length: the attention op's fake
    kernel then gives the reference's layout for the example sizes on the symbolic shape."""
    from fxcc import dialects
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    reference = dialects.attention._init_fn

    def older_torch(q, k, v, mask, scale, is_causal):
        if any(isinstance(d, torch.SymInt) for t in (q, k, v, mask) if t is not None for d in t.shape):
            raise RuntimeError("SymIntArrayRef expected to contain only concrete integers")
        return reference(q, k, v, mask, scale, is_causal)

    monkeypatch.setattr(dialects.attention, "_init_fn", older_torch)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dyn = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC,
                                                  DimDynamic.STATIC])
    q = mode.from_tensor(torch.randn(2, 4, 1, 8))
    k, v = (mode.from_tensor(torch.randn(2, 2, 9, 8), symbolic_context=dyn) for _ in range(2))
    mask = mode.from_tensor(torch.zeros(2, 1, 1, 9), symbolic_context=dyn.__class__(
        dynamic_sizes=[DimDynamic.STATIC] * 3 + [DimDynamic.DYNAMIC]))
    with mode:
        out = dialects._attention_fake(q, k, v, mask, 0.35, False)
        expected = reference(torch.empty(2, 4, 1, 8), torch.empty(2, 2, 9, 8), torch.empty(2, 2, 9, 8),
                             torch.empty(2, 1, 1, 9), 0.35, False)
    assert isinstance(k.shape[2], torch.SymInt) and isinstance(mask.shape[3], torch.SymInt)
    assert list(out.shape) == [2, 4, 1, 8] and out.dtype == q.dtype
    assert out.stride() == expected.stride()
