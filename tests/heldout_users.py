"""Held-out programs of the kinds users compile that tests/user_programs.py, tests/heldout_programs.py,
tests/heldout_dynamic.py, the zoo and benchmarks/breadth do not: transformers models called as users call them
(`model(**inputs)` with padded masks, `output_hidden_states`, `output_attentions`, `return_dict=False`, batch and
length changing between calls), torch's own attention layers with their masks, FFTs, grid sampling and the
interpolation modes, linear algebra, order statistics, bucketing, padding modes, special functions, an embedding
with `max_norm` (eager renormalises its weight in place), `out=` arguments, keyword-only arguments and `*args`.

Each program runs under tests/user_programs.py's `run` (the default CPU pipeline, fxcc's own code compared:
`check_eager=False, time_vs_eager=False`), static (a changed size recompiles) and with `dynamic=True`; every call
is checked against eager on the same inputs (outputs with dtypes, shapes, strides and aliasing; inputs and module
state afterwards). Outcomes as there: ok, eager (ran eagerly with a warning), and the failing ones (raised,
differs, strides, mutation, alias, silent-eager).

    python tests/heldout_users.py [--only NAME[,NAME]] [--modes static,dynamic] [--verbose]

tests/test_heldout_users.py runs a CI-sized subset.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from user_programs import GOOD, Program, probe_main, run, table

PROGRAMS: dict[str, Program] = {}


def program(name: str, sizes: tuple[int, ...] = (5, 8, 3), low: bool = False, ctx: str = ""):
    def deco(make_inputs):
        def register(build):
            PROGRAMS[name] = Program(name, build, make_inputs, sizes, low, None, ctx)
            return build
        return register
    return deco


def fn(name: str, make_inputs, sizes: tuple[int, ...] = (5, 8, 3), low: bool = False):
    """A plain function, compiled as itself (`build` returns it)."""
    def register(f):
        PROGRAMS[name] = Program(name, lambda: f, make_inputs, sizes, low)
        return f
    return register


def _r(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _x(*shape):
    """Inputs: one random float tensor of `shape`, where a string in it names the call's size."""
    def make(n, g):
        return (_r(g, *[n if s == "n" else s for s in shape]),), {}
    return make


# ------------------------------------------------------------------------------------------------ transformers

def _hf(model_type: str, **settings):
    def build():
        from fxcc import zoo_models as zm

        return zm.build(model_type, zm.Shrink(**settings) if settings else zm.Shrink())
    return build


def _padded(b: int, t: int, left: bool = False) -> torch.Tensor:
    """Rows padded by different amounts (row 0 full), on the right or (left=True, as generation pads) the left."""
    m = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        k = min(t - 1, 2 * i)
        if left:
            m[i, :k] = 0
        else:
            m[i, t - k:] = 0
    return m


def _text(vocab: int = 90, left: bool = False, types: bool = False, **kw):
    """`model(input_ids=..., attention_mask=..., **kw)` at (batch, length) from the size: (n % 3 + 1, n + 2)."""
    def make(n, g):
        b, t = n % 3 + 1, n + 2
        ids = torch.randint(3, vocab, (b, t), generator=g)
        out = dict(input_ids=ids, attention_mask=_padded(b, t, left), **kw)
        if types:
            out["token_type_ids"] = (torch.arange(t) >= t // 2).long().expand(b, t).contiguous()
        return (), out
    return make


_ALL_OUT = dict(output_hidden_states=True, output_attentions=True, return_dict=False)

program("bert_all_outputs", ctx="no_grad")(_text(types=True, **_ALL_OUT))(_hf("bert"))
program("roberta_hidden_states", ctx="no_grad")(_text(output_hidden_states=True))(_hf("roberta"))
program("electra_tuple", ctx="no_grad")(_text(return_dict=False))(_hf("electra"))
program("deberta_v2_all_outputs", ctx="no_grad")(_text(**_ALL_OUT))(_hf("deberta-v2"))
program("distilbert_attentions", ctx="no_grad")(_text(output_attentions=True))(_hf("distilbert"))
program("gpt2_left_padded", ctx="no_grad")(_text(left=True, use_cache=False, output_hidden_states=True))(_hf("gpt2"))
program("llama_left_padded_tuple", ctx="no_grad")(_text(left=True, use_cache=False, return_dict=False))(_hf("llama"))
program("bloom_alibi_padded", ctx="no_grad")(_text(left=True, use_cache=False))(_hf("bloom"))
program("gemma2_padded_hidden", ctx="no_grad")(_text(use_cache=False, output_hidden_states=True))(_hf("gemma2"))
program("t5_encoder_padded", ctx="inference_mode")(_text(output_hidden_states=True))(
    lambda: _hf("t5")().get_encoder())
program("mpt_padded", ctx="no_grad")(_text(use_cache=False))(_hf("mpt"))
program("codegen_padded", ctx="no_grad")(_text(left=True, use_cache=False))(_hf("codegen"))


def _requires_no_grad(build):
    def b():
        m = build()
        m.requires_grad_(False)
        return m
    return b


# gradients enabled (no context), the weights frozen as a user freezing a backbone does
program("bert_frozen_grad_enabled")(_text(types=True, output_hidden_states=True))(_requires_no_grad(_hf("bert")))


# ------------------------------------------------------------------------------------------------ torch layers

class MHA(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=10)
        self.batch_first = batch_first

    def forward(self, q, k, v, pad):
        out, w = self.attn(q, k, v, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
        return out, w


def _mha_inputs(batch_first: bool):
    def make(n, g):
        b, lq, lk = 2, n, n + 3
        q, k, v = _r(g, b, lq, 16), _r(g, b, lk, 12), _r(g, b, lk, 10)
        if not batch_first:
            q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
        pad = torch.zeros(b, lk, dtype=torch.bool)
        pad[1, -2:] = True
        return (q, k, v, pad), {}
    return make


program("mha_kdim_vdim_padding", ctx="no_grad")(_mha_inputs(True))(lambda: MHA(True))
program("mha_seq_first_padding", ctx="no_grad")(_mha_inputs(False))(lambda: MHA(False))


class MHASelf(nn.Module):
    """Self-attention through the fast path's conditions (same q/k/v, batch_first, no grad) with a float mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, causal):
        return self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]


def _mha_self(n, g):
    return (_r(g, 3, n, 16), torch.triu(torch.full((n, n), float("-inf")), 1)), {}


program("mha_self_float_mask", ctx="inference_mode")(_mha_self)(MHASelf)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)

    def forward(self, tgt, memory, mem_pad):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.dec(tgt, memory, tgt_mask=mask, memory_key_padding_mask=mem_pad, tgt_is_causal=True)


def _dec_inputs(n, g):
    pad = torch.zeros(2, n + 1, dtype=torch.bool)
    pad[0, -1] = True
    return (_r(g, 2, n, 16), _r(g, 2, n + 1, 16), pad), {}


program("transformer_decoder_masks", ctx="no_grad")(_dec_inputs)(Decoder)


class EncoderCausal(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.enc(x, mask=mask, is_causal=True)


program("encoder_causal_fast_path", ctx="no_grad")(_x(2, "n", 16))(EncoderCausal)


class LSTMPacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, h


def _packed_inputs(n, g):
    return (_r(g, 3, n, 6), torch.tensor([n, max(1, n - 2), 1])), {}


program("lstm_packed_sequence", ctx="no_grad")(_packed_inputs)(LSTMPacked)


class EmbedMaxNorm(nn.Module):
    """nn.Embedding(max_norm=...) renormalises the looked-up rows of its weight in place, in eager."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=1.0, padding_idx=0)

    def forward(self, ids):
        return self.emb(ids).sum(1)


def _ids_inputs(n, g):
    return (torch.randint(0, 20, (2, n), generator=g),), {}


program("embedding_max_norm", ctx="no_grad")(_ids_inputs)(EmbedMaxNorm)


class ConvPaddingModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")
        self.b = nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="circular")
        self.c = nn.Conv1d(4, 4, 4, padding="same", padding_mode="replicate")

    def forward(self, x):
        y = self.b(self.a(x))
        return self.c(y.flatten(2)).view_as(y)


program("conv_padding_modes", ctx="no_grad")(_x(2, 3, "n", 7))(ConvPaddingModes)


class ChannelsLastBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.shuffle = nn.ChannelShuffle(2)
        self.unshuffle = nn.PixelUnshuffle(2)

    def forward(self, x):
        return self.unshuffle(self.shuffle(F.hardswish(self.bn(self.conv(x)))))


def _cl_inputs(n, g):
    return (_r(g, 2, 4, n, n + 2).contiguous(memory_format=torch.channels_last),), {}


program("channels_last_shuffle", ctx="no_grad", sizes=(4, 6, 8))(_cl_inputs)(ChannelsLastBlock)


# ------------------------------------------------------------------------------------------------ functions

@fn("fft_roundtrip", _x(3, "n"))
def fft_roundtrip(x):
    spec = torch.fft.rfft(x, n=2 * x.shape[-1], norm="ortho")
    back = torch.fft.irfft(spec * spec.abs().clamp(max=1.0), n=x.shape[-1], norm="ortho")
    f2 = torch.fft.fftshift(torch.fft.fft2(x.unsqueeze(0)), dim=(-2, -1))
    return back, spec.angle(), f2.abs()


@fn("complex_rotary", _x(2, "n", 4, 8))
def complex_rotary(x):
    t = torch.arange(x.shape[1], dtype=torch.float32)
    freqs = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    cis = torch.polar(torch.ones(x.shape[1], 4), torch.outer(t, freqs))
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def _grid_inputs(n, g):
    return (_r(g, 2, 3, n, n + 1), torch.rand(2, 5, n, 2, generator=g) * 2.4 - 1.2), {}


@fn("grid_sample_modes", _grid_inputs)
def grid_sample_modes(img, grid):
    a = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b = F.grid_sample(img, grid, mode="nearest", padding_mode="border", align_corners=True)
    c = F.grid_sample(img, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return a, b, c


def _theta_inputs(n, g):
    return (_r(g, 2, 3, n, n), _r(g, 2, 2, 3) * 0.3 + torch.eye(2, 3)), {}


@fn("affine_grid_warp", _theta_inputs)
def affine_grid_warp(img, theta):
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, align_corners=False)


@fn("interpolate_modes", _x(2, 3, "n", 9))
def interpolate_modes(x):
    return (F.interpolate(x, scale_factor=1.7, mode="bicubic", align_corners=True),
            F.interpolate(x, size=(3, 4), mode="bilinear", antialias=True),
            F.interpolate(x, scale_factor=(0.5, 1.5), mode="nearest-exact"),
            F.interpolate(x, scale_factor=2.5, mode="area", recompute_scale_factor=True),
            F.interpolate(x.flatten(2), scale_factor=1.5, mode="linear"))


def _sdpa_inputs(n, g):
    q, k, v = _r(g, 2, 4, n, 8), _r(g, 2, 2, n + 3, 8), _r(g, 2, 2, n + 3, 8)
    keep = torch.ones(n, n + 3, dtype=torch.bool).tril(3)
    return (q, k, v, keep), {}


@fn("sdpa_gqa_bool_scale", _sdpa_inputs)
def sdpa_gqa_bool_scale(q, k, v, keep):
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True, scale=0.2)
    b = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    return a, b


@fn("linalg_ops", lambda n, g: ((_r(g, n, n) + n * torch.eye(n), _r(g, n, 2)), {}), sizes=(3, 5, 4))
def linalg_ops(a, b):
    spd = a @ a.mT + torch.eye(a.shape[0])
    return (torch.linalg.solve(a, b), torch.linalg.det(a), torch.linalg.inv(a), torch.linalg.cholesky(spd),
            torch.linalg.matrix_norm(a, "fro"), torch.linalg.svdvals(a), torch.linalg.eigvalsh(spd),
            torch.linalg.vector_norm(b, ord=3, dim=0))


@fn("order_statistics", _x(4, "n"))
def order_statistics(x):
    med, medi = x.median(dim=1)
    kth, _ = x.kthvalue(2, dim=1)
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]), dim=1, interpolation="linear")
    cmax, cmaxi = torch.cummax(x, dim=1)
    return med, medi, kth, q, cmax, cmaxi, torch.logcumsumexp(x, dim=1), x.nanmedian()


def _bucket_inputs(n, g):
    return (_r(g, 3, n), torch.linspace(-1.5, 1.5, 7)), {}


@fn("bucketize_search_hist", _bucket_inputs)
def bucketize_search_hist(x, edges):
    return (torch.bucketize(x, edges, right=True), torch.searchsorted(edges, x.contiguous(), side="left"),
            torch.histc(x, bins=6, min=-2, max=2), F.one_hot(torch.bucketize(x, edges), 8).sum(1))


@fn("pad_modes", _x(2, 3, "n", 6))
def pad_modes(x):
    return (F.pad(x, (2, 1, 1, 2), mode="reflect"), F.pad(x, (1, 3, 0, 2), mode="replicate"),
            F.pad(x, (2, 2, 1, 1), mode="circular"), F.pad(x, (-1, 2, 1, -1), value=0.5))


@fn("special_functions", lambda n, g: ((torch.rand(3, n, generator=g) * 0.9 + 0.05,), {}))
def special_functions(p):
    return (torch.special.erfinv(2 * p - 1), torch.special.i0(p * 3), torch.special.digamma(p + 1),
            torch.lgamma(p * 5), torch.polygamma(1, p + 0.5), torch.xlogy(p, p), torch.special.logit(p, eps=1e-6),
            torch.special.ndtri(p), torch.special.entr(p), torch.special.sinc(p * 4 - 2))


@fn("where_scalars_promotion", lambda n, g: ((torch.randint(-5, 5, (3, n), generator=g),), {}))
def where_scalars_promotion(x):
    return (torch.where(x > 0, x, 0.5), torch.where(x > 0, 2, -1), torch.where(x < 0, 1.5, x.float()),
            torch.clamp(x, min=-2.5), x.masked_fill(x == 0, 7))


@fn("kwonly_defaults_varargs", lambda n, g: ((_r(g, 2, n), _r(g, 2, n), _r(g, 2, n)), {"scale": 0.5}))
def kwonly_defaults_varargs(*xs, scale=1.0, bias=None, mode="sum"):
    out = xs[0] * scale
    for x in xs[1:]:
        out = out + x if mode == "sum" else out * x
    return {"out": out, "parts": [x.mean() for x in xs], "bias": bias}


@fn("out_arguments", lambda n, g: ((_r(g, 3, n), _r(g, 3, n), torch.empty(3, n)), {}))
def out_arguments(a, b, buf):
    torch.add(a, b, alpha=2, out=buf)
    torch.mul(buf, a, out=a)
    return buf.sum(), a


@fn("einsum_diag_ellipsis", lambda n, g: ((_r(g, 2, n, n), _r(g, n, 3)), {}))
def einsum_diag_ellipsis(a, b):
    return (torch.einsum("...ii->...i", a), torch.einsum("bij,jk->bik", a, b), torch.einsum("bii", a),
            torch.tensordot(a, b, dims=([2], [0])), torch.kron(b[:2], b[:, :2].T))


@fn("slice_assign_inputs", lambda n, g: ((_r(g, 4, n), _r(g, 4, (n + 1) // 2)), {}))
def slice_assign_inputs(x, y):
    x[:, ::2] = y
    x[1:3].mul_(2)
    x.T[0].zero_()
    return x.cumsum(1)


@fn("unfold_windows", _x(2, "n", 8))
def unfold_windows(x):
    w = x.unfold(2, 3, 2)
    s = torch.as_strided(x, (2, x.shape[1] - 1, 2, 8), (x.shape[1] * 8, 8, 8, 1))
    return w.amax(-1), s.mean(2), x.diff(dim=1, n=2), torch.rot90(x, 1, (1, 2)).flip(0)


@fn("bf16_norms_acts", lambda n, g: ((_r(g, 3, n, 16, dtype=torch.bfloat16),), {}), low=True)
def bf16_norms_acts(x):
    y = F.layer_norm(x, (16,))
    return F.gelu(y, approximate="tanh"), F.mish(y), F.softmax(y, -1), F.normalize(y, dim=-1), y.float().sum()


@fn("fp16_matmul_softmax", lambda n, g: ((_r(g, 2, n, 8, dtype=torch.float16), _r(g, 2, 8, n, dtype=torch.float16)),
                                         {}), low=True)
def fp16_matmul_softmax(a, b):
    s = (a @ b) / 8 ** 0.5
    return s.softmax(-1), torch.log_softmax(s.float(), -1), (s.exp() * s).sum(-1)


@fn("expanded_inputs", lambda n, g: ((_r(g, 1, n).expand(4, n), _r(g, 4, 1).expand(4, n), _r(g, n, 4).T), {}))
def expanded_inputs(a, b, c):
    return a * b + c, (a - c).abs().max(1), torch.cat([a, c], 0)


@fn("sort_stable_ties", lambda n, g: ((torch.randint(0, 3, (3, n), generator=g).float(),), {}))
def sort_stable_ties(x):
    v, i = torch.sort(x, dim=1, stable=True, descending=True)
    return v, i, torch.argsort(x, dim=1, stable=True), torch.topk(x, 2, dim=1, largest=False)[0], \
        torch.unique_consecutive(x.flatten(), return_counts=True)


@fn("scatter_gather_index_put", lambda n, g: ((_r(g, 4, n), torch.randint(0, 4, (4, n), generator=g)), {}))
def scatter_gather_index_put(x, idx):
    s = torch.zeros(4, n_cols(x)).scatter_reduce(0, idx, x, reduce="amax", include_self=False)
    acc = torch.zeros(4).index_put((idx[:, 0],), x[:, 0], accumulate=True)
    return s, acc, x.gather(0, idx), torch.take_along_dim(x, idx.argsort(1), 1)


def n_cols(x):
    return x.shape[1]


@fn("cdist_cov", lambda n, g: ((_r(g, n, 3), _r(g, n + 2, 3)), {}))
def cdist_cov(a, b):
    return torch.cdist(a, b), torch.cdist(a, b, p=1), torch.cov(a.T), torch.corrcoef(b.T), torch.pdist(a)


@fn("embedding_bag_weighted", lambda n, g: ((torch.randint(0, 10, (n * 2,), generator=g), torch.tensor([0, 2, n]),
                                             torch.rand(n * 2, generator=g), _r(g, 10, 4)), {}))
def embedding_bag_weighted(ids, offsets, w, table):
    a = F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=w, include_last_offset=False)
    b = F.embedding_bag(ids, table, offsets, mode="max", padding_idx=0)
    return a, b


@fn("int_bit_ops", lambda n, g: ((torch.randint(0, 255, (3, n), generator=g, dtype=torch.uint8),
                                  torch.randint(-50, 50, (3, n), generator=g)), {}))
def int_bit_ops(u, i):
    return (u >> 2, u << 1, u ^ 0x5A, ~u, torch.gcd(i, torch.tensor(12)), i.abs() % 7, i // -3,
            torch.bitwise_right_shift(i, 1), (i.float() / 3).trunc().int())


@fn("zero_size_batch", lambda n, g: ((_r(g, 0, n), _r(g, n, 4)), {}), sizes=(3, 5, 2))
def zero_size_batch(x, w):
    y = x @ w
    return y.softmax(-1), y.sum(0), x.amax(1) if x.shape[0] else x.sum(1), torch.cat([y, y], 0).shape


# ------------------------------------------------------------------------------------------------ sizes of one

# sizes that become 1 or leave 1 between calls: broadcasting, a softmax or norm over one element, a matmul with
# an inner size of one, a conv whose spatial size is one

@fn("size_one_broadcast", lambda n, g: ((_r(g, n, 4), _r(g, 1, n), _r(g, n, 1)), {}), sizes=(1, 4, 1, 6))
def size_one_broadcast(a, b, c):
    return (a * c + b.T, (a @ a.T) * b, c.softmax(0), F.layer_norm(c, (1,)), b.squeeze(0), a.expand(3, -1, -1).sum(0))


@fn("size_one_inner_matmul", lambda n, g: ((_r(g, 3, n), _r(g, n, 5)), {}), sizes=(1, 4, 1))
def size_one_inner_matmul(a, b):
    return a @ b, torch.einsum("ik,kj->ij", a, b).relu(), (a.unsqueeze(-1) * b).sum(1)


class ConvToOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.pool(y).flatten(1).softmax(-1), y.mean((2, 3)), y.std(dim=(2, 3), unbiased=True)


def _conv_one_inputs(n, g):
    return (_r(g, n % 3 + 1, 3, n, 1),), {}


program("conv_spatial_one", ctx="no_grad", sizes=(1, 5, 2))(_conv_one_inputs)(ConvToOne)


@fn("dtype_changes", lambda n, g: ((_r(g, 3, n).to({1: torch.float64, 4: torch.float32, 2: torch.float16}[n]),
                                    torch.randint(0, 5, (3, n), generator=g)), {}), sizes=(4, 1, 2))
def dtype_changes(x, i):
    return x * i, (x + 1).softmax(-1), x.mean(), i.float().mean() + x.sum(), torch.where(i > 2, x, i)


# a keyword argument given at some calls and not at others, and a Python number that changes at every call
def _kw_inputs(n, g):
    return (_r(g, 2, n),), ({"mask": torch.rand(2, n, generator=g) > 0.3} if n % 2 else {}) | {"temp": 0.5 + n / 10}


@fn("optional_kwarg_temp", _kw_inputs, sizes=(3, 4, 5, 6))
def optional_kwarg_temp(x, mask=None, temp=1.0):
    s = x / temp
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1), torch.logsumexp(s, -1)


# ------------------------------------------------------------------------------------------------ decorators

MODEL_REGISTRY: dict[str, object] = {}


def register_model(name: str):
    """A model zoo's registering decorator: it stores into a dict once, when the function is defined."""
    def deco(f):
        MODEL_REGISTRY[name] = f
        return f
    return deco


@fn("registered_function", _x(3, "n"))
@register_model("registered_function")
def registered_function(x):
    return F.gelu(x @ x.T).softmax(-1)


def deprecate_kwarg(old: str, new: str):
    """A wrapper that takes a keyword its function does not, as transformers' `@deprecate_kwarg`."""
    def deco(f):
        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return f(*args, **kwargs)
        return wrapped
    return deco


class DeprecatedKwarg(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    @deprecate_kwarg("factor", "scale")
    def forward(self, x, scale=1.0):
        return self.a(x) * scale


class DeprecatedKwargAssigned(DeprecatedKwarg):
    def _forward(self, x, scale=1.0):
        return self.a(x) * scale

    forward = deprecate_kwarg("factor", "scale")(_forward)


def _factor_inputs(n, g):
    return (_r(g, n, 4),), {"factor": n / 2}


program("deprecated_kwarg_module", ctx="no_grad")(_factor_inputs)(DeprecatedKwarg)
program("deprecated_kwarg_assigned", ctx="no_grad")(_factor_inputs)(DeprecatedKwargAssigned)



# ------------------------------------------------------------------------------------------------ state passed in

def _per_layer_state(n, g):
    """A float input, 4 int64 counters and 3 running means, each layer's own tensor, passed as arguments."""
    counters = [torch.tensor(3 * k) for k in range(4)]
    means = [_r(g, n) for _ in range(3)]
    return (_r(g, n), counters, means), {}


@fn("per_layer_state_args", _per_layer_state)
def per_layer_state_args(x, counters, means):
    """Bookkeeping repeated per layer on arguments (a static cache's counters, running means): each counter read where
    it is advanced by the same number, each mean decayed by one factor, one mean read between the updates."""
    out = []
    for c in counters:
        out.append(torch.arange(2) + c)
        c.add_(1)
    seen = means[1] * 1
    for m in means:
        m.mul_(0.9).add_(x)
    for c in counters[:2]:
        c.sub_(2)
    return torch.stack(out), seen, sum(means)


def _one_tensor_twice(n, g):
    t = _r(g, 3, n)
    return (t, t), {}


@fn("one_tensor_twice_written", _one_tensor_twice)
def one_tensor_twice_written(a, b):
    """One tensor passed as both arguments, written through each: eager's reads see every write before them (fxcc's
    passes take distinct inputs as distinct memory, so such a call runs eagerly, with a warning)."""
    a.add_(1)
    y = b * 1
    b.add_(1)
    z = b * 3
    a.mul_(2)
    return y + z, a


# ------------------------------------------------------------------------------------------------ main

MODES = ("static", "dynamic")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated program names (default: all)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    return probe_main(
        ap, a, PROGRAMS, lambda prog: [run(prog, mode, state_aliases=False) for mode in a.modes.split(",")],
        lambda o: f"{o.name:26} {o.mode:8} {o.kind:13} {o.seconds:6.1f}s  {o.detail.splitlines()[0][:140] if o.detail else ''}",
        table, lambda o: o.kind in GOOD)


if __name__ == "__main__":
    sys.exit(main())
