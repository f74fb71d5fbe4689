"""Small programs of the kinds a kernel benchmark (KernelBench levels 1-3 style) or a user brings, none of them in
the breadth suite (benchmarks/breadth), tests/user_programs.py or tests/graph_fuzz.py: argmax/argmin, prod and
cumprod, reverse and masked cumsum, max/min with indices, norms, losses, cosine similarity, matmuls with
transposed, broadcast and 4-D operands, dilated/strided/grouped/depthwise convolutions, transposed convolutions
with output_padding and groups, pooling with dilation and indices, upsampling, pixel shuffle, embedding bags,
scatter/gather/index ops, ints, bools, half, bfloat16 and float64, odd layouts, zero-size dims, recurrent layers,
small networks (causal attention, ResNet/VGG/ShuffleNet blocks, squeeze-excitation), -inf masks, NaN and inf.

Each program is compiled once and called at its first size twice, then at a second size where the program allows;
every call is compared with eager on the same inputs (tests/user_programs.py's check: values within fxcc's
tolerance for the dtype, NaN where eager has NaN, dtypes, shapes, strides, aliasing). fxcc's own code is what is
compared (`check_eager=False, time_vs_eager=False`).

Outcomes: equal, eager-fallback (equal, ran eagerly with a warning), SILENT-EAGER (ran eagerly with no warning),
DIFF (values, dtypes, strides, aliasing or inputs afterwards), FXCC-ERROR (fxcc raised where eager did not).

    python tests/heldout_programs.py [--only NAME[,NAME]] [--passes PIPELINE] [--verbose]

tests/test_heldout_programs.py runs a CI-sized subset.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from user_programs import _clone_args, _eager_warning, _leaves, _state, compare_call, probe_main

# ------------------------------------------------------------------------------------------------ programs


@dataclass
class Probe:
    """`build()` returns a fresh module; `inputs(n, g)` the positional arguments of one call at size `n`; the
    first size is called twice."""

    name: str
    build: type
    inputs: object
    sizes: tuple[int, ...] = (4, 6)
    low_precision: bool = False


PROBES: dict[str, Probe] = {}


def probe(name: str, sizes: tuple[int, ...] = (4, 6), low: bool = False):
    def deco(inputs):
        def register(build):
            PROBES[name] = Probe(name, build, inputs, sizes, low)
            return build
        return register
    return deco


def _r(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


class Fn(nn.Module):
    """A module around a plain function (programs written as functions)."""

    fn = staticmethod(lambda *a: a)

    def forward(self, *args):
        return type(self).fn(*args)


def fn_probe(name: str, inputs, sizes: tuple[int, ...] = (4, 6), low: bool = False):
    def deco(f):
        cls = type(name, (Fn,), {"fn": staticmethod(f)})
        probe(name, sizes, low)(inputs)(cls)
        return f
    return deco


# reductions with indices, products, cumulative ops ----------------------------------------------------------

fn_probe("argmax_argmin", lambda n, g: (_r(g, n, 7, 5),))(
    lambda x: (x.argmax(1), x.argmin(-1, keepdim=True), x.argmax(), torch.argmin(x, 0)))
fn_probe("argmax_ties_int", lambda n, g: (torch.randint(0, 3, (n, 9), generator=g),))(
    lambda x: (x.argmax(1), x.argmin(0), (x * 2).argmax(-1, keepdim=True)))
fn_probe("max_min_indices", lambda n, g: (_r(g, n, 6, 5),))(
    lambda x: (*x.max(dim=1), *torch.min(x, 0, keepdim=True), x.max(-1).values * 2 + 1))
fn_probe("prod_dims", lambda n, g: (_r(g, n, 6, 4) * 0.5 + 1,))(
    lambda x: (x.prod(1), x.prod(-1, keepdim=True), x.prod()))
fn_probe("cumprod_dims", lambda n, g: (_r(g, n, 8) * 0.3 + 1,))(
    lambda x: (x.cumprod(1), torch.cumprod(x, 0)))
fn_probe("reverse_cumsum", lambda n, g: (_r(g, n, 9),))(
    lambda x: x.flip(1).cumsum(1).flip(1))
fn_probe("masked_cumsum", lambda n, g: (_r(g, n, 9), torch.rand(n, 9, generator=g) > 0.5))(
    lambda x, m: (x * m).cumsum(-1))
fn_probe("exclusive_cumsum", lambda n, g: (_r(g, 3, n, 5),))(
    lambda x: torch.cat([torch.zeros_like(x[:, :1]), x.cumsum(1)[:, :-1]], 1))


# norms, distances, losses ----------------------------------------------------------------------------------

fn_probe("frobenius_norm", lambda n, g: (_r(g, n, 8, 6),))(lambda x: x / torch.norm(x, p="fro"))
fn_probe("l1_l2_norms", lambda n, g: (_r(g, n, 16),))(
    lambda x: (x / x.abs().sum(1, keepdim=True), F.normalize(x, dim=1), torch.linalg.vector_norm(x, 2, dim=0),
               x.norm(p=1, dim=1), torch.linalg.vector_norm(x, float("inf"), dim=1)))
fn_probe("cosine_similarity", lambda n, g: (_r(g, n, 12), _r(g, n, 12)))(
    lambda a, b: (F.cosine_similarity(a, b, dim=1), 1 - F.cosine_similarity(a, b, dim=1).mean()))
fn_probe("kl_div", lambda n, g: (_r(g, n, 10), _r(g, n, 10)))(
    lambda p, t: F.kl_div(torch.log_softmax(p, -1), torch.softmax(t, -1), reduction="batchmean"))
fn_probe("huber_smooth_l1", lambda n, g: (_r(g, n, 10) * 2, _r(g, n, 10)))(
    lambda a, b: (F.huber_loss(a, b, delta=0.7), F.smooth_l1_loss(a, b, beta=0.5), F.l1_loss(a, b, reduction="none")))
fn_probe("triplet_margin", lambda n, g: (_r(g, n, 16), _r(g, n, 16), _r(g, n, 16)))(
    lambda a, p, q: F.triplet_margin_loss(a, p, q, margin=1.0))
fn_probe("cosine_embedding", lambda n, g: (_r(g, n, 16), _r(g, n, 16), torch.randint(0, 2, (n,), generator=g) * 2 - 1))(
    lambda a, b, y: F.cosine_embedding_loss(a, b, y, margin=0.2))
fn_probe("hinge_margin_losses", lambda n, g: (_r(g, n), _r(g, n), torch.randint(0, 2, (n,), generator=g) * 2. - 1))(
    lambda a, b, y: (F.hinge_embedding_loss(a, y), F.margin_ranking_loss(a, b, y, margin=0.1),
                     F.soft_margin_loss(a, y)))
fn_probe("nll_bce_losses", lambda n, g: (_r(g, n, 5), torch.randint(0, 5, (n,), generator=g), torch.rand(n, 5, generator=g)))(
    lambda x, y, t: (F.nll_loss(torch.log_softmax(x, 1), y), F.binary_cross_entropy_with_logits(x, t),
                     F.cross_entropy(x, y, label_smoothing=0.1)))


# matmul shapes ---------------------------------------------------------------------------------------------

fn_probe("diag_matmul", lambda n, g: (_r(g, n), _r(g, n, 7)))(lambda a, b: torch.diag(a) @ b)
fn_probe("matmul_transposed", lambda n, g: (_r(g, 9, n), _r(g, 5, 9)))(lambda a, b: a.T @ b.T)
fn_probe("matmul_broadcast", lambda n, g: (_r(g, n, 6, 8), _r(g, 8, 5), _r(g, 1, 5, 3)))(
    lambda a, b, c: (a @ b, (a @ b) @ c, torch.matmul(a[0, 0], b)))
fn_probe("tensor4d_matrix", lambda n, g: (_r(g, 2, n, 3, 8), _r(g, 8, 6)))(
    lambda a, b: (torch.einsum("bijl,lk->bijk", a, b), torch.matmul(a, b)))
fn_probe("tensor3d_matrix_lowdim", lambda n, g: (_r(g, n, 5, 8), _r(g, 8)))(
    lambda a, v: (a @ v, v @ a.transpose(1, 2), torch.mv(a[0], v)))
fn_probe("baddbmm_addmm", lambda n, g: (_r(g, n, 4, 5), _r(g, n, 4, 6), _r(g, n, 6, 5)))(
    lambda c, a, b: (torch.baddbmm(c, a, b, beta=0.5, alpha=2.0), torch.addmm(c[0], a[0], b[0], alpha=-1.0)))


# convolutions and pooling ----------------------------------------------------------------------------------

class Conv1dDilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, stride=2, dilation=2, padding=2)
        self.b = nn.Conv1d(8, 8, 5, groups=4, padding="same")

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


probe("conv1d_dilated_grouped", sizes=(20, 27))(lambda n, g: (_r(g, 2, 4, n),))(Conv1dDilated)


class DepthwiseConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False)
        self.pw = nn.Conv2d(6, 12, 1)
        self.g = nn.Conv2d(12, 12, 3, dilation=2, groups=3, padding=2, padding_mode="reflect")

    def forward(self, x):
        return self.g(F.relu6(self.pw(self.dw(x))))


probe("conv2d_depthwise_grouped", sizes=(9, 12))(lambda n, g: (_r(g, 2, 6, n, n),))(DepthwiseConv2d)


class Conv3dStrided(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(3, 4, (3, 1, 3), stride=(1, 2, 2), dilation=(2, 1, 1), padding=(2, 0, 1))

    def forward(self, x):
        return torch.sigmoid(self.c(x)) * x.mean()


probe("conv3d_strided_dilated", sizes=(6, 7))(lambda n, g: (_r(g, 1, 3, n, n, n),))(Conv3dStrided)


class ConvTransposeOutPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.t2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.t1 = nn.ConvTranspose1d(4, 2, 4, stride=3, dilation=2, output_padding=1)

    def forward(self, x):
        return self.t2(x), self.t1(x.flatten(2))


probe("convtranspose_outpad_groups", sizes=(5, 7))(lambda n, g: (_r(g, 2, 4, n, n),))(ConvTransposeOutPad)


class ConvTranspose3dGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.ConvTranspose3d(4, 4, 3, stride=(2, 1, 2), padding=1, output_padding=(1, 0, 1), groups=4)

    def forward(self, x):
        return F.gelu(self.t(x))


probe("convtranspose3d_depthwise", sizes=(4, 5))(lambda n, g: (_r(g, 1, 4, n, n, n),))(ConvTranspose3dGroups)


class MaxPoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.MaxPool2d(3, stride=2, padding=1, dilation=2, return_indices=True)
        self.q = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        v, i = self.p(x)
        return v, i, self.q(x)


probe("maxpool_dilation_indices", sizes=(9, 11))(lambda n, g: (_r(g, 2, 3, n, n),))(MaxPoolIndices)


class MaxUnpool(nn.Module):
    def forward(self, x):
        v, i = F.max_pool2d(x, 2, return_indices=True)
        return F.max_unpool2d(v * 2, i, 2, output_size=x.shape[-2:])


probe("maxpool_unpool", sizes=(8, 10))(lambda n, g: (_r(g, 2, 3, n, n),))(MaxUnpool)


fn_probe("adaptive_max_pool", lambda n, g: (_r(g, 2, 3, n, n + 1),), sizes=(7, 10))(
    lambda x: (F.adaptive_max_pool2d(x, (3, 2)), F.adaptive_max_pool1d(x.flatten(2), 5), F.adaptive_avg_pool2d(x, (3, 4))))
fn_probe("avgpool_pad_ceil", lambda n, g: (_r(g, 2, 3, n, n),), sizes=(7, 9))(
    lambda x: (F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True, count_include_pad=False),
               F.avg_pool1d(x.flatten(2), 4, 3, ceil_mode=True), F.lp_pool2d(x.abs(), 2, 2)))
fn_probe("upsample", lambda n, g: (_r(g, 2, 3, n, n + 2),), sizes=(4, 5))(
    lambda x: (F.interpolate(x, scale_factor=2, mode="nearest"), F.interpolate(x, size=(7, 9), mode="bilinear"),
               F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=True),
               F.interpolate(x, scale_factor=2, mode="bicubic")))
fn_probe("upsample_1d_3d", lambda n, g: (_r(g, 1, 2, n, n, n),), sizes=(3, 4))(
    lambda x: (F.interpolate(x, scale_factor=2, mode="trilinear"), F.interpolate(x.flatten(2), size=11, mode="linear"),
               F.interpolate(x, scale_factor=(1, 2, 3), mode="nearest-exact")))
fn_probe("pixel_shuffle", lambda n, g: (_r(g, 2, 8, n, n),), sizes=(4, 6))(
    lambda x: (F.pixel_shuffle(x, 2), F.pixel_unshuffle(x, 2), F.pixel_shuffle(x, 2).sum(1)))
fn_probe("unfold_fold", lambda n, g: (_r(g, 2, 3, n, n),), sizes=(6, 8))(
    lambda x: (F.unfold(x, 3, padding=1, stride=2), F.fold(F.unfold(x, 2, stride=2), x.shape[-2:], 2, stride=2)))


# embedding bags, scatter / gather --------------------------------------------------------------------------

class EmbeddingBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = nn.EmbeddingBag(20, 6, mode="mean")
        self.sum = nn.EmbeddingBag(20, 6, mode="sum")
        self.max = nn.EmbeddingBag(20, 6, mode="max")

    def forward(self, ids, offsets, ids2d, w):
        return (self.mean(ids, offsets), self.max(ids, offsets), self.sum(ids2d), self.sum(ids, offsets, w))


probe("embedding_bag")(lambda n, g: (torch.randint(0, 20, (3 * n,), generator=g), torch.arange(0, 3 * n, 3),
                                     torch.randint(0, 20, (n, 4), generator=g), torch.rand(3 * n, generator=g)))(
    EmbeddingBags)
fn_probe("scatter_reduce_ops", lambda n, g: (_r(g, n, 5), torch.randint(0, 4, (n, 5), generator=g)))(
    lambda x, i: (torch.zeros(4, 5).scatter_add(0, i, x), torch.zeros(4, 5).scatter_reduce(0, i, x, "mean"),
                  torch.ones(4, 5).scatter_reduce(0, i, x, "prod", include_self=True),
                  torch.zeros(4, 5).scatter_reduce(0, i, x, "amin", include_self=False)))
fn_probe("gather_index_select", lambda n, g: (_r(g, n, 8), torch.randint(0, n, (3,), generator=g),
                                              torch.randint(0, 8, (n, 2), generator=g)))(
    lambda x, r, c: (x.index_select(0, r), x.index_select(1, c[:, 0]), x.gather(1, c).exp(), x[r][:, c[0]],
                     torch.zeros(x.shape[0], 3).index_add(1, torch.tensor([0, 2, 0]), x[:, :3], alpha=2)))
fn_probe("index_copy_fill", lambda n, g: (_r(g, n, 4), torch.randperm(n, generator=g)[:2]))(
    lambda x, i: (x.index_copy(0, i, x[:2] * 10), x.index_fill(1, torch.tensor([0, 3]), -1.0),
                  x.masked_fill(x > 0.5, float("-inf")).softmax(-1)))


# where / clamp / broadcasting ------------------------------------------------------------------------------

fn_probe("where_broadcast", lambda n, g: (_r(g, n, 1, 5), _r(g, 3, 1), torch.rand(5, generator=g) > 0.5))(
    lambda x, y, m: (torch.where(m, x, y), torch.where(x > 0, x, 0), torch.where(m, 1.0, y).sum(0)))
fn_probe("clamp_tensor_bounds", lambda n, g: (_r(g, n, 6), _r(g, 6) - 0.5, _r(g, n, 1) + 0.5))(
    lambda x, lo, hi: (torch.clamp(x, lo, hi), x.clamp(min=lo), x.clamp(max=hi), torch.clamp(x, -0.5, None)))


# dtypes ----------------------------------------------------------------------------------------------------

fn_probe("int_arith", lambda n, g: (torch.randint(-9, 9, (n, 6), generator=g, dtype=torch.int32),
                                    torch.randint(1, 5, (6,), generator=g)))(
    lambda a, b: (a // b, a % b, torch.fmod(a, b), torch.remainder(a, -b), a.sum(1), a.cumsum(0), (a * b).amax(0),
                  a.float().mean(1), torch.div(a, b, rounding_mode="trunc"), a / b, a.abs() ** 2))
fn_probe("bool_logic", lambda n, g: (torch.rand(n, 6, generator=g) > 0.5, torch.rand(n, 6, generator=g) > 0.3))(
    lambda a, b: (a & ~b, a ^ b, a.sum(1), a.any(1), b.all(0), a.float().mean(), (a | b).cumsum(1), a.int().prod(1)))
fn_probe("fp16_ops", lambda n, g: (_r(g, n, 16, dtype=torch.float16), _r(g, 16, 8, dtype=torch.float16)), low=True)(
    lambda x, w: (F.gelu(x @ w), x.softmax(-1), x.sum(1), x.float().sum(1), x.cumsum(1), F.layer_norm(x, (16,))))
fn_probe("bf16_ops", lambda n, g: (_r(g, n, 16, dtype=torch.bfloat16), _r(g, 16, dtype=torch.bfloat16)), low=True)(
    lambda x, b: (F.silu(x + b), x.mean(-1), x.var(-1), torch.logsumexp(x, 1), x.amax(0), x.argmax(1)))
fn_probe("fp64_ops", lambda n, g: (_r(g, n, 12, dtype=torch.float64), _r(g, 12, 5, dtype=torch.float64)))(
    lambda x, w: (torch.softmax(x @ w, -1), x.exp().log1p(), x.std(0), x.cumsum(-1), x.prod(1), F.normalize(x)))
fn_probe("mixed_dtype_promotion", lambda n, g: (_r(g, n, 4, dtype=torch.float16), torch.randint(0, 5, (n, 4), generator=g),
                                                _r(g, 4, dtype=torch.float64)), low=True)(
    lambda h, i, d: (h + i, i * 0.5, h * d, i.sum() + h.sum(), (i > 2) + i, torch.true_divide(i, 3)))


# layouts and sizes -----------------------------------------------------------------------------------------

class OddLayouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 5)
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, t, e, cl):
        return self.l(t), self.l(e), (e * t).sum(0), self.c(cl), cl.mean((2, 3)), F.relu(cl) + 1


probe("odd_layouts", sizes=(5, 6))(lambda n, g: (_r(g, 8, n).t(), _r(g, 1, 8).expand(n, 8),
                                                 _r(g, 2, 3, n, n).to(memory_format=torch.channels_last)))(OddLayouts)
fn_probe("sliced_strided_inputs", lambda n, g: (_r(g, n, 10)[:, 1::3], _r(g, 4, n, 3).permute(2, 1, 0)))(
    lambda a, b: (a.exp(), b @ b.transpose(1, 2), b.softmax(0), a.sum(0)))


class ZeroSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(5, 3)

    def forward(self, x, y):
        return self.l(x), x.sum(1), x.amax(1) if x.shape[0] else x.sum(1), torch.cat([y, x[:, :2]], 0), \
            y[:, :0].sum(1), y.new_zeros(0).sum(), x.softmax(0)


probe("zero_size_dims", sizes=(0, 3))(lambda n, g: (_r(g, n, 5), _r(g, 2, 2)))(ZeroSize)


# recurrent -------------------------------------------------------------------------------------------------

class BiGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y, h = self.rnn(x)
        return self.head(y[:, -1]), h


probe("gru_bidirectional", sizes=(5, 7))(lambda n, g: (_r(g, 2, n, 6),))(BiGRU)


class BiLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True, bidirectional=True, proj_size=0)

    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return y, h, c


probe("lstm_bidirectional_state", sizes=(5, 7))(lambda n, g: (_r(g, 3, n, 6), _r(g, 2, 3, 8), _r(g, 2, 3, 8)))(BiLSTM)


class RNNCells(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(4, 6)
        self.lcell = nn.LSTMCell(6, 6)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 6)
        c = torch.zeros(x.shape[1], 6)
        g = h
        for t in range(x.shape[0]):
            g = self.cell(x[t], g)
            h, c = self.lcell(g, (h, c))
        return h, c


probe("rnn_cells", sizes=(3, 4))(lambda n, g: (_r(g, n, 2, 4),))(RNNCells)


# networks --------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """MinGPT's attention block: one QKV projection, masked_fill with a registered tril buffer, softmax, dropout."""

    def __init__(self, d: int = 16, heads: int = 4, block: int = 16):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.heads = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(self.ln(x)).split(c, dim=2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = self.drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln(x))


probe("mingpt_block", sizes=(5, 9))(lambda n, g: (_r(g, 2, n, 16),))(CausalSelfAttention)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)) + self.down(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


probe("tiny_resnet", sizes=(8, 12))(lambda n, g: (_r(g, 2, 3, n, n),))(TinyResNet)


class TinyVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                               nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Conv2d(8, 16, 3, padding=1),
                               nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.c = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.c(torch.flatten(F.adaptive_avg_pool2d(self.f(x), 2), 1))


probe("tiny_vgg", sizes=(8, 12))(lambda n, g: (_r(g, 2, 3, n, n),))(TinyVGG)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int = 12, groups: int = 3):
        super().__init__()
        self.groups = groups
        self.g1 = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.g2 = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def shuffle(self, x):
        b, c, h, w = x.size()
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def forward(self, x):
        y = F.relu(self.bn1(self.g1(x)))
        y = self.bn3(self.g2(self.bn2(self.dw(self.shuffle(y)))))
        left, right = x.chunk(2, dim=1)
        return F.relu(x + y), torch.cat([left, F.relu(right)], 1)


probe("shufflenet_unit", sizes=(6, 8))(lambda n, g: (_r(g, 2, 12, n, n),))(ShuffleUnit)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        y = F.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return y * s + x, F.hardsigmoid(y).amax((2, 3))


probe("squeeze_excite", sizes=(6, 9))(lambda n, g: (_r(g, 2, 16, n, n),))(SqueezeExcite)


class GroupNormSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.ConvTranspose3d(4, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.gn2 = nn.GroupNorm(2, 8, affine=False, eps=1e-3)

    def forward(self, x):
        y = self.conv(x)
        y = self.gn(y)
        y = y * torch.sigmoid(y)
        y = self.gn2(F.hardswish(y) * 1.5)
        return y.amax(1) - y.mean(1)


probe("groupnorm_swish_chain", sizes=(3, 4))(lambda n, g: (_r(g, 2, 4, n, n, n),))(GroupNormSwish)


class GemmBNGeluGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.gn = nn.GroupNorm(4, 16)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.gn(F.gelu(self.bn(self.fc(x))))
        return torch.relu(y.mean(dim=1, keepdim=True)), y.max(1).values


probe("gemm_bn_gelu_gn_mean_relu")(lambda n, g: (_r(g, n, 12),))(GemmBNGeluGN)


class MatmulDivSumScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 8))

    def forward(self, x):
        y = torch.matmul(x, self.w.T) / 2
        return torch.sum(y, dim=1, keepdim=True) * 1.5, torch.logsumexp(y, 1).max(), y.min(1)[1]


probe("gemm_div_sum_scale")(lambda n, g: (_r(g, n, 8),))(MatmulDivSumScale)


class InstanceNorm1dPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.InstanceNorm1d(6)
        self.p = nn.PReLU(6, init=0.1)
        self.ln = nn.LayerNorm(9, elementwise_affine=False)
        self.glu = nn.GLU(1)

    def forward(self, x):
        return self.glu(self.p(self.n(x))), self.ln(x), F.local_response_norm(x, 3)


probe("instancenorm1d_prelu_glu", sizes=(9, 9))(lambda n, g: (_r(g, n, 6, 9),))(InstanceNorm1dPReLU)


class BilinearTril(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Bilinear(5, 4, 3)

    def forward(self, x, y, s):
        return self.b(x, y), torch.tril(s, -1), torch.triu(s, 1).roll(1, 0), s.flip(0, 1).repeat(2, 1), \
            torch.narrow(s, 1, 1, 2).tile(1, 3), s.diagonal().sum(), torch.trace(s)


probe("bilinear_tril_roll")(lambda n, g: (_r(g, n, 5), _r(g, n, 4), _r(g, n, n)))(BilinearTril)


fn_probe("activations_options", lambda n, g: (_r(g, n, 10) * 4,))(
    lambda x: (F.softplus(x, beta=2, threshold=3), F.hardtanh(x, -2, 3), F.relu6(x), F.celu(x, 0.5), F.elu(x, 2.0),
               F.leaky_relu(x, 0.3), F.rrelu(x, training=False), F.softshrink(x, 0.5), F.hardshrink(x, 0.7),
               F.tanhshrink(x), F.logsigmoid(x), F.threshold(x, 0.5, -1.0), F.softsign(x)))
fn_probe("std_var_corrections", lambda n, g: (_r(g, n, 7),))(
    lambda x: (x.std(1, correction=0), torch.var_mean(x, 0), x.var(unbiased=True), torch.std_mean(x, (0, 1)),
               x.var(1, keepdim=True, correction=2)))


# -inf masks, NaN and inf -----------------------------------------------------------------------------------

fn_probe("softmax_neg_inf_masks", lambda n, g: (_r(g, n, 6), torch.rand(n, 6, generator=g) > 0.5))(
    lambda x, m: (x.masked_fill(~m, float("-inf")).softmax(-1),
                  x.masked_fill(torch.arange(6) >= 3, float("-inf")).log_softmax(-1),
                  x.masked_fill(torch.ones_like(m), float("-inf")).softmax(0)))
fn_probe("logsumexp_all_neg_inf", lambda n, g: (_r(g, n, 5),))(
    lambda x: (torch.logsumexp(torch.where(torch.arange(x.shape[0])[:, None] % 2 == 0, float("-inf"), x), 1),
               torch.logsumexp(torch.full_like(x, float("-inf")), 0),
               torch.logsumexp(x.masked_fill(x > 100, float("inf")) + float("inf") * (x[:, :1] > 1), -1)))


def _nan_inf(n, g):
    x = _r(g, n, 6)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[-1, 0] = float("-inf")
    return (x,)


fn_probe("nan_inf_reductions", _nan_inf)(
    lambda x: (x.amax(1), x.amin(0), x.max(1).values, x.max(1).indices, x.argmax(1), x.argmin(0), x.softmax(1),
               torch.relu(x), x.clamp(-1, 1), x.sum(1), x.mean(0), x.cumsum(1), x.prod(1), x.sort(1).values,
               torch.nan_to_num(x), torch.maximum(x, torch.zeros(6)), torch.fmax(x, torch.zeros(6)), x.isnan().any(1),
               torch.nansum(x, 1), torch.sigmoid(x), torch.tanh(x), x.log_softmax(1),
               # eager's own gelu of +inf is nan in its vectorized loop and inf in its scalar one (torch.compile's
               # and fxcc's: inf), which of the two runs depending on the size and the CPU: +inf goes in as 1e30
               F.gelu(x.clamp(max=1e30))))
fn_probe("nan_inf_norms", _nan_inf)(
    lambda x: (F.layer_norm(x, (6,)), F.normalize(x, dim=1), x.norm(dim=1), F.hardtanh(x), F.relu6(x),
               F.leaky_relu(x), F.silu(x), F.elu(x), F.softplus(x), torch.round(x * 3), torch.sign(x),
               x.clamp(min=0.0), torch.minimum(x, x.flip(0))))


# numerics at the edges: rounding rules, overflow, exact integers, reductions long enough to be split --------

fn_probe("float_floor_div_remainder", lambda n, g: (torch.tensor([1.0, -1.0, 7.5, 0.3, -0.7, 5.0] * n),
                                                   torch.tensor([0.1, 0.1, -2.0, 0.1, 0.2, -0.5] * n)))(
    lambda a, b: (a // b, torch.floor_divide(a, 0.1), torch.remainder(a, b), torch.fmod(a, b), a % 0.1,
                  torch.div(a, b, rounding_mode="floor"), torch.div(a, b, rounding_mode="trunc")))
fn_probe("clamp_min_above_max", lambda n, g: (_r(g, n, 6), _r(g, n, 6)))(
    lambda x, y: (torch.clamp(x, min=1.0, max=0.5), torch.clamp(x, y, y - 1), F.hardtanh(x, 0.5, 0.5),
                  x.clamp(min=float("nan")), torch.clamp(x, torch.full((6,), float("nan")), None)))
fn_probe("int_clamp_promotion", lambda n, g: (torch.randint(-5, 5, (n, 6), generator=g),))(
    lambda a: (a.clamp(min=0.5), a.clamp(-2, 3), a.clamp(min=-1) * 2, torch.relu(a), a.abs(), -a, a.sign(),
               a.clamp_max(torch.tensor(1))))
fn_probe("int64_exact_large", lambda n, g: (torch.randint(2 ** 55, 2 ** 60, (n, 5), generator=g),))(
    lambda a: (a.sum(1), a.amax(0), a.cumsum(1), a + 1, a.argmax(1), a - a.amin(1, keepdim=True), a // 3, a % 7,
               (a + 1 > a).all(), a.max(1).values))
fn_probe("small_int_wrap", lambda n, g: (torch.randint(0, 256, (n, 8), generator=g, dtype=torch.uint8),
                                         torch.randint(-128, 128, (n, 8), generator=g, dtype=torch.int8)))(
    lambda u, i: (u + u, u - 200, u * 3, i * i, i.abs(), -i, u + i, u.sum(1), i.cumsum(1), (u // 7) * 7,
                  u.to(torch.int16) * 300, i << 2, u >> 3, ~i, u & 0x0F, i.to(torch.float16)))
fn_probe("int16_int32_ops", lambda n, g: (torch.randint(-30000, 30000, (n, 6), generator=g, dtype=torch.int16),
                                          torch.randint(-2 ** 30, 2 ** 30, (n, 6), generator=g, dtype=torch.int32)))(
    lambda s, i: (s * 3, i * 5, i + i, s.sum(0), i.prod(1), i.amax(1), s + i, s.float() / 7, torch.maximum(s, s.flip(0))))
fn_probe("fp64_cancellation", lambda n, g: (_r(g, n, 8, dtype=torch.float64) * 1e-6,))(
    lambda x: ((x + 1e8) - 1e8, (x * 1e-30).exp() - 1, x.sum(1) + 1e12 - 1e12, torch.log1p(x), torch.expm1(x),
               (x + 1).log(), x.cumsum(1) * 1e9))
fn_probe("fp16_overflow_chain", lambda n, g: (_r(g, n, 8, dtype=torch.float16) * 100,), low=True)(
    lambda x: (x * 1000 * 0.001, (x * x) / 1000, (x.exp() + 1).log(), x.float() * 1000, torch.tanh(x * 1000) * 2))
fn_probe("bf16_chain", lambda n, g: (_r(g, n, 8, dtype=torch.bfloat16), _r(g, n, 8, dtype=torch.bfloat16)), low=True)(
    lambda a, b: ((a + 1000) - 1000, a * b + a, (a - b) / (a + 2), torch.sigmoid(a) * b, F.gelu(a * 3) + b))
fn_probe("fp16_long_reductions", lambda n, g: (_r(g, n, 4096, dtype=torch.float16),), low=True)(
    lambda x: (x.sum(1), x.mean(1), x.cumsum(1)[:, -1], x.var(1), x.softmax(1).amax(1), x.float().sum(1),
               (x * x).sum(1), torch.logsumexp(x, 1), x.norm(dim=1)))
fn_probe("long_row_reductions", lambda n, g: (_r(g, n, 5000) + 3, _r(g, 3001, n)), sizes=(3, 5))(
    lambda x, y: (x.sum(1), x.mean(1), x.var(1), x.amax(1), x.argmax(1), x.softmax(1), x.prod(1) * 0,
                  y.sum(0), y.std(0), y.softmax(0), y.log_softmax(0), y.cumsum(0), F.layer_norm(x, (5000,))))
fn_probe("reduce_dtype_args", lambda n, g: (_r(g, n, 9), torch.randint(0, 9, (n, 9), generator=g, dtype=torch.int32)))(
    lambda x, i: (x.sum(1, dtype=torch.float64), i.sum(1, dtype=torch.int16), x.cumsum(0, dtype=torch.float64),
                  x.softmax(1, dtype=torch.float64), x.half().log_softmax(1, dtype=torch.float32), i.mean(1, dtype=torch.float32),
                  torch.prod(i, 0, dtype=torch.int64), i.float().mean()))
fn_probe("division_edges", lambda n, g: (_r(g, n, 6), torch.zeros(n, 6)))(
    lambda x, z: (x / z, z / z, torch.remainder(x, z), torch.fmod(x, z), x.rsqrt(), torch.log(z), x ** -1, z ** 0,
                  torch.sqrt(x), x.pow(0.5), x.reciprocal() * z, torch.atan2(x, z), torch.xlogy(z, z)))
fn_probe("int_div_by_zero", lambda n, g: (torch.randint(-5, 5, (n, 4), generator=g), torch.randint(0, 2, (n, 4), generator=g)))(
    lambda a, b: (a // b, a % b))
fn_probe("round_half_even", lambda n, g: (torch.arange(-2 * n, 2 * n) * 0.5 + 0.0,))(
    lambda x: (torch.round(x), torch.round(x * 0.1, decimals=1), x.floor(), x.ceil(), x.trunc(), x.frac(),
               torch.round(x.half()), torch.fix(-x), (x * 10).round() / 10))
fn_probe("bool_casts", lambda n, g: (_r(g, n, 6),))(
    lambda x: ((x > 0).float() * x, x.bool(), torch.where(x > 0, 1, x.int()), (x > 0) + (x < 0), (x > 0) * 2.5,
               x.masked_fill(x > 0, True), torch.logical_xor(x, x > 0), x.to(torch.int32), x.to(torch.uint8).clamp(0, 3) * 0,
               x.nan_to_num().bool().sum(1), (x * 0).bool().any()))
fn_probe("binary_math", lambda n, g: (_r(g, n, 7), _r(g, n, 7), _r(g, 7)))(
    lambda a, b, c: (torch.hypot(a, b), torch.copysign(a, b), torch.lerp(a, b, 0.3), torch.lerp(a, b, c),
                     torch.addcmul(a, b, c, value=0.5), torch.addcdiv(a, b, c.abs() + 1, value=-2),
                     torch.logaddexp(a, b), torch.nextafter(a, b) - a, torch.fmin(a, b), torch.heaviside(a, c),
                     torch.float_power(a.abs(), 2.5), torch.pow(a.abs(), b), torch.xlogy(a.abs(), b.abs())))
fn_probe("scalar_tensor_inputs", lambda n, g: (_r(g, n, 5), torch.tensor(float(n)), torch.tensor(3), torch.tensor(True)))(
    lambda x, s, i, b: (x * s, x + i, x ** i, x.masked_fill(b, 0.0), x.sum() / s, (s > i) * x,
                        torch.where(b, x, s), i * 2, s.expand(3)))
fn_probe("softmax_extremes", lambda n, g: (_r(g, n, 6) * 1e4, _r(g, n, 6, dtype=torch.float16) * 1e3), low=True)(
    lambda x, h: (x.softmax(1), x.log_softmax(1), torch.logsumexp(x, 1), h.softmax(1), h.log_softmax(1),
                  torch.sigmoid(x), F.softplus(x), F.silu(h), torch.exp(h), F.gelu(h), torch.logsumexp(h, 1)))
fn_probe("empty_reductions", lambda n, g: (_r(g, n, 0), _r(g, 0, n)))(
    lambda a, b: (a.sum(1), a.prod(1), a.mean(1), b.sum(0), b.softmax(0), b.cumsum(0), a.logsumexp(1), a.any(1),
                  a.all(1), b.norm(dim=0), a.argmax(0) if a.shape[0] == 0 else a.sum(0)))
fn_probe("noncontig_reductions", lambda n, g: (_r(g, 9, n, 7).permute(2, 0, 1), _r(g, n, 12)[:, ::3]))(
    lambda x, y: (x.sum(1), x.amax(2), x.softmax(1), x.cumsum(2), x.mean((0, 2)), x.argmin(0), y.var(0), y.logsumexp(1),
                  y.t().contiguous() * 2, x.norm(dim=0)))
fn_probe("expand_broadcast_writes", lambda n, g: (_r(g, 1, 6).expand(n, 6), _r(g, n, 1)))(
    lambda x, y: (x + y, x.cumsum(0), x.sum(0), (x * y).softmax(0), x.clone(), x.contiguous().add_(1), y.expand(-1, 3) * 2))
fn_probe("repeat_cat_stack_views", lambda n, g: (_r(g, n, 3, 4),))(
    lambda x: (torch.stack([x, x * 2], -1).flatten(-2), x.repeat_interleave(2, dim=1), x.unsqueeze(1).expand(-1, 2, -1, -1).reshape(-1, 3, 4),
               torch.cat([x, x.flip(2)], 2).transpose(0, 2), x.movedim(0, -1) + 1, x.unflatten(2, (2, 2)).sum(-1), torch.hstack([x, x]),
               x.view(-1)[::5], torch.diag_embed(x[:, 0]), x.tril(), torch.block_diag(x[0], x[1])))


# patterns the raise and decompose passes rewrite, and near-misses of them ----------------------------------

def _qkv(n, g, dtype=torch.float32):
    return tuple(_r(g, 2, 2, n, 8, dtype=dtype) for _ in range(3))


def _padding_bias(n, g):
    """An additive key-padding mask: batch 0 sees its first keys, batch 1 none (a fully padded sequence)."""
    bias = torch.zeros(2, 1, 1, n)
    bias[0, ..., n // 2:] = float("-inf")
    bias[1] = float("-inf")
    return bias


fn_probe("attention_padding_bias_all_masked", lambda n, g: (*_qkv(n, g), _padding_bias(n, g)))(
    lambda q, k, v, bias: torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5 + bias, dim=-1) @ v)
fn_probe("sdpa_masks", lambda n, g: (*_qkv(n, g), torch.rand(2, 1, n, n, generator=g) > 0.3, _padding_bias(n, g)))(
    lambda q, k, v, m, bias: (F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                              F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3),
                              F.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3], is_causal=True),
                              F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)))
fn_probe("attention_fp16_scores_fp32_softmax", lambda n, g: _qkv(n, g, torch.bfloat16), low=True)(
    lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)) * 0.35, dim=-1, dtype=torch.float32).to(q.dtype) @ v)


class HandAttentionVariants(nn.Module):
    """Attention with the scale on q, a division, a bias bigger than any mask, probabilities also returned."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel", torch.randn(1, 2, 16, 16) * 3)

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = torch.softmax((q * 0.5) @ k.transpose(2, 3), -1) @ v
        b = torch.softmax(q @ k.transpose(-1, -2) / 3.0 + self.rel[..., :t, :t], -1) @ v
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        c = p @ v
        mask = torch.triu(torch.full((t, t), -1e9), 1)  # a large finite blocking value, not -inf
        d = torch.softmax(q @ k.transpose(-1, -2) + mask, -1) @ v
        return a, b, c, p, d


probe("attention_variants")(lambda n, g: _qkv(n, g))(HandAttentionVariants)


class NearMissNorms(nn.Module):
    """RMSNorm with eps outside the square root, LayerNorm with the unbiased variance, gelu/silu look-alikes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        rms_out = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-2) * self.w
        rms_in = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2) * self.w
        ln_unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        quick_gelu = x * torch.sigmoid(1.702 * x)
        gelu_ish = 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x ** 3)))
        gelu_erf = x * 0.5 * (1.0 + torch.erf(x / 1.41421356237))
        rms_sum = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
        return rms_out, rms_in, ln_unbiased, quick_gelu, gelu_ish, gelu_erf, rms_sum


probe("near_miss_norms_acts")(lambda n, g: (_r(g, n, 16) * 0.2,))(NearMissNorms)


class RotaryBroadcast(nn.Module):
    """Rotary where cos/sin have more dims than x, in another dtype, and an interleaved (GPT-J) rotation."""

    def forward(self, x, cos, sin):
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        a = x * cos + rot * sin
        x2 = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        b = x * cos + x2 * sin
        return a, b


probe("rotary_broadcast_dtypes")(lambda n, g: (_r(g, 1, 1, n, 8), _r(g, 2, 3, n, 8), _r(g, 2, 3, n, 8)))(RotaryBroadcast)
fn_probe("rotary_half_x_float_cos", lambda n, g: (_r(g, 2, 2, n, 8, dtype=torch.float16), _r(g, n, 8), _r(g, n, 8)), low=True)(
    lambda x, cos, sin: x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin)


class GatedBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 16)
        self.up = nn.Linear(8, 16)
        self.g1 = nn.Linear(8, 1)

    def forward(self, x, y):
        a = F.silu(self.g1(x)) * self.up(x)  # a gate of one column scales every column
        b = F.gelu(self.gate(x), approximate="tanh") * y  # an `up` of another dtype
        c = F.silu(self.gate(x)) * self.up(x)[:1]
        return a, b, c


probe("gated_act_broadcast")(lambda n, g: (_r(g, n, 8), _r(g, n, 16, dtype=torch.float64)))(GatedBroadcast)


class NormStatsModes(nn.Module):
    """Norms whose eval-mode statistics are not the running ones (or are, for an instance norm)."""

    def __init__(self):
        super().__init__()
        self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)
        self.in_running = nn.InstanceNorm2d(4, track_running_stats=True, affine=True)
        self.bn1d = nn.BatchNorm1d(6)
        self.lin = nn.Linear(6, 6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            for m in (self.in_running, self.bn1d, self.bn):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x, s):
        y = self.conv(x)
        z = self.bn(y)  # the convolution's output is read twice: no fold
        seq = self.bn1d(self.lin(s))  # linear over the last dim (6), norm over dim 1 (also 6)
        return self.bn_batch(z), self.in_running(z), y + z, seq


probe("norm_stats_modes", sizes=(5, 6))(lambda n, g: (_r(g, 2, 3, n, n), _r(g, 3, 6, 6)))(NormStatsModes)


class ConvFoldEdges(nn.Module):
    """Per-channel scales and shifts after convolutions that look foldable: grouped transposed, a scale with a zero,
    a linear on a 3-D input followed by a per-feature scale."""

    def __init__(self):
        super().__init__()
        self.t = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.lin = nn.Linear(5, 5)
        self.register_buffer("s", torch.tensor([1.5, 0.0, -2.0, 1.0]).view(1, 4, 1, 1))
        self.register_buffer("f", torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0]))

    def forward(self, x, seq):
        return self.t(x) * self.s + 1, self.c(x) * self.s - self.s, self.lin(seq) * self.f + self.f, \
            self.c(x).mul(self.s.view(4, 1, 1))


probe("conv_fold_edges", sizes=(4, 5))(lambda n, g: (_r(g, 2, 4, n, n), _r(g, 3, n, 5)))(ConvFoldEdges)


fn_probe("argmax_long_ties", lambda n, g: (torch.randint(0, 3, (n, 4100), generator=g).float(),
                                           torch.randint(0, 3, (4100, n), generator=g)), sizes=(3, 5))(
    lambda x, y: (x.argmax(1), x.argmin(1), x.max(1).indices, x.min(1), y.argmax(0), y.argmin(0), x.argmax(),
                  torch.max(y, 0).indices, (x * -1).argmax(1)))
fn_probe("argmax_long_nan", lambda n, g: (torch.where(torch.rand(n, 3000, generator=g) > 0.999, float("nan"),
                                                      torch.randn(n, 3000, generator=g)),), sizes=(3, 5))(
    lambda x: (x.argmax(1), x.argmin(1), x.amax(1), x.amin(1), x.max(1), x.min(1), x.softmax(1).sum(1)))


# fused kernels: broadcasts on inner dims, reductions read back, views and joins inside a group ---------------

fn_probe("fused_broadcast_reduce_back", lambda n, g: (_r(g, n, 3, 5, 7), _r(g, 3, 1, 7), _r(g, 5, 1)))(
    lambda x, a, b: ((x - x.mean((1, 3), keepdim=True)) / (x.std((1, 3), keepdim=True) + 1e-3) * a + b,
                     x * x.amax(2, keepdim=True) - x.sum(0, keepdim=True), (x + a).softmax(2) * (x.sum(1, keepdim=True) > 0),
                     torch.exp(x - x.logsumexp(-1, keepdim=True)).sum(-1)))
fn_probe("fused_views_inside", lambda n, g: (_r(g, n, 6, 4), _r(g, 4, 6)))(
    lambda x, y: ((x.transpose(1, 2) + y).relu().sum(-1), (x * 2).reshape(x.shape[0], 24)[:, ::5] + 1,
                  torch.cat([x.sigmoid(), x.flip(-1).tanh()], -1).mean(1), F.pad(x.exp(), (1, 2, 0, 1), value=-1.0) * 3,
                  x.permute(2, 0, 1).contiguous().neg(), (x[:, 1:] - x[:, :-1]).abs().amax(1)))
fn_probe("int_bool_fused", lambda n, g: (torch.randint(-50, 50, (n, 7), generator=g), _r(g, n, 7)))(
    lambda i, x: ((i > 0) & (x > 0), (i * 3 - 1) % 5, torch.where(i > 0, x, i.float()), (i.abs() + 1).float().log(),
                  (x > 0).to(torch.uint8) * 200 + 100, torch.bitwise_xor(i, 7) | 1, (x * 10).to(torch.int64) // 3,
                  i.clamp(-3, 3).to(torch.int8), (i == i.amax(1, keepdim=True)).sum(1), x.ge(0.0).logical_not()))
fn_probe("fp64_fused", lambda n, g: (_r(g, n, 9, dtype=torch.float64), _r(g, 9)))(
    lambda x, y: (F.gelu(x) * y, torch.sigmoid(x * y).sum(1), x.softmax(0), F.layer_norm(x, (9,)), (x.double() * 1e-200) * 1e200,
                  torch.erf(x) + torch.tanh(x) - torch.special.expit(x)))
fn_probe("expanded_stride0_inputs", lambda n, g: (_r(g, 1, 7).expand(n, 7), _r(g, n, 1, 3).expand(n, 4, 3)))(
    lambda a, b: (a.sum(1), a.softmax(0), b.amax(1), (b * 2).cumsum(1), a + 1, b.transpose(1, 2).reshape(b.shape[0], -1)))
fn_probe("outputs_views_of_intermediates", lambda n, g: (_r(g, n, 6),))(
    lambda x: ((x + 1).t(), (x * 2)[:, ::2], (x - 1).unsqueeze(0).expand(3, -1, -1), (x + 2)[1:], (x * 3).view(-1, 3)[:, 0],
               x.relu().diagonal(), (x + 4).T.contiguous()))
fn_probe("same_value_returned_twice", lambda n, g: (_r(g, n, 4),))(
    lambda x: (lambda y: (y, y, y.t(), x, x.view(-1)))(x.exp()))
fn_probe("channels_last_pointwise_reduce", lambda n, g: (_r(g, 2, 8, n, n).to(memory_format=torch.channels_last),
                                                         _r(g, 1, 8, 1, 1)), sizes=(5, 6))(
    lambda x, b: ((x + b).relu(), x.sum(1), x.mean((2, 3)), x.softmax(1), (x * b).amax(1, keepdim=True), x.flatten(2)))



# memory the caller holds: copies, equal values and weight-only values returned, inputs written in place --------

fn_probe("returned_copies", lambda n, g: (_r(g, n, 6), _r(g, 2, 3, n, n).to(memory_format=torch.channels_last)))(
    lambda x, c: (x.clone(), c.clone(), c.contiguous(), (x * 2).clone(), x.detach(), x.contiguous(), c + 1,
                  torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4, 5]]).t(), x + torch.tensor(2.0)))
fn_probe("equal_values_returned", lambda n, g: (_r(g, n, 6), torch.randint(-20, 20, (n, 6), generator=g)))(
    lambda x, i: (x + 1, x + 1, (x + 1).t(), torch.remainder(i, -3), i % -3, torch.pow(2, i.abs()), 2 ** i.abs()))


class WeightOnlyReturned(nn.Module):
    """Values computed from weights only (canonicalize folds them into constants), returned and viewed."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.register_buffer("b", torch.arange(6.0))

    def forward(self, x):
        y = self.w * 2
        return y.t(), x @ y, self.b.clone(), (self.b + 1)[::2], x + self.b, self.w


probe("weight_only_values_returned")(lambda n, g: (_r(g, n, 6),))(WeightOnlyReturned)
fn_probe("inputs_written_in_place", lambda n, g: (_r(g, n, 5), _r(g, 5, n).t(), torch.randint(-9, 9, (n, 5), generator=g),
                                                  torch.rand(n, 5, generator=g) > 0.5))(
    lambda x, t, i, m: (x.add_(t), t.mul_(2).clamp_(-1, 1), i.floor_divide_(-2), i.remainder_(3), x.masked_fill_(m, 0.0),
                        m.logical_not_(), x[:, 1:3].copy_(t[:, :2]), x.sum(1)))
fn_probe("ints_divided_by_negatives", lambda n, g: (torch.randint(-20, 20, (n, 6), generator=g),
                                                    torch.tensor([3, -3, 4, -4, 7, -7]).repeat(n, 1),
                                                    torch.randint(-100, 100, (n, 6), generator=g, dtype=torch.int8)))(
    lambda a, b, c: (a // b, a % b, torch.fmod(a, b), a.div(b, rounding_mode="trunc"), a / b, -7 // b, torch.remainder(-7, b),
                     c // -7, c % -7, (c + 100) // 3, a // -3, a.int() % 4))
fn_probe("where_with_scalars", lambda n, g: (_r(g, n, 5), torch.randint(-3, 3, (n, 5), generator=g)))(
    lambda x, i: (torch.where(x > 0, 1.0, 0.0), torch.where(x > 0, x, 0), torch.where(i > 0, i, -1), torch.where(i > 0, 1.5, i),
                  torch.where(i > 0, 3, 4), torch.where(x > 0, float("inf"), x), torch.where(x > 0, True, False),
                  torch.where(i > 0, x, i)))
fn_probe("python_scalar_promotion", lambda n, g: (torch.randint(-5, 5, (n, 4), generator=g), _r(g, n, 4, dtype=torch.float16),
                                                  torch.rand(n, 4, generator=g) > 0.5), low=True)(
    lambda i, h, b: (i * 1.5, i + True, i / 2, i ** 2, 2 - i, 1 / (i.abs() + 1), h * 1e5, h + 1, b * 2, b + 1.5,
                     torch.tensor(3) * h, torch.tensor(2.5) * i, torch.tensor(2.5, dtype=torch.float64) * h))
fn_probe("zero_d_and_empty", lambda n, g: (torch.tensor(2.5), torch.tensor(-3), _r(g, n, 3), _r(g, 0, n)))(
    lambda s, i, x, e: (s * 2, s + i, i // 2, i % 2, x * s, (x > s).sum(), s.expand(x.shape[0]), x.sum(), x.argmax(), x[0, 0],
                        e + 1, e.t() @ e, e.sum(0), torch.cat([e, e]), e.mean(1)))
fn_probe("returns_containers", lambda n, g: (_r(g, n, 4),))(
    lambda x: {"a": x * 2, "b": [x.sum(), None, (x.t(), 3)], "c": None, "shape": x.shape, "n": x.shape[0] * 2})

# ------------------------------------------------------------------------------------------------ the check


@dataclass
class Result:
    name: str
    outcome: str = "equal"
    max_err: float = 0.0
    detail: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


LABELS = {"ok": "equal", "raised": "FXCC-ERROR"}


def _max_err(got, want) -> float:
    err = 0.0
    for (_, a), (_, b) in zip(_leaves(got), _leaves(want)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and b.numel() \
                and not b.is_complex():
            d = (a.double() - b.double()).abs()
            d = d[~(a.double().isnan() & b.double().isnan()) & ~(a.double() == b.double())]
            err = max(err, d.max().item() if d.numel() else 0.0)
    return err


def _tol(p: Probe):
    from fxcc.eager_check import tolerance

    return lambda dtype: tolerance(torch.bfloat16 if p.low_precision and dtype.is_floating_point else dtype)


def call_sizes(p: Probe) -> tuple[int, ...]:
    """The first size twice (the second call reuses the first compile), the second size (a recompile, with the
    changed sizes symbolic), one more (the symbolic variant at a size it was not compiled at), the first again."""
    if len(set(p.sizes)) == 1:
        return (p.sizes[0],) * 3
    return (p.sizes[0], p.sizes[0], p.sizes[1], p.sizes[1] + 1, p.sizes[0])


def _py_state(m: nn.Module) -> dict:
    """A module's plain Python attributes (counters, lists), compared after every call (`strict`)."""
    out = {}
    for name, mod in m.named_modules():
        for k, v in vars(mod).items():
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, list, tuple, dict)) and k != "training":
                out[f"{name}.{k}"] = copy.deepcopy(v)
    return out


def _message(e: Exception) -> str:
    """An exception's message with its numbers to 4 significant digits (a sum in a message may differ in the last
    bits, as any value within tolerance)."""
    return re.sub(r"-?\d+\.\d+(e[-+]?\d+)?", lambda m: f"{float(m.group()):.4g}", str(e))


def run(p: Probe, passes: str | None = None, dynamic: bool | None = None, *, sizes: tuple[int, ...] | None = None,
        functions: type | None = None, strict: bool = False) -> Result:
    """Eager and fxcc on the same inputs, call by call; the first difference is the outcome. `sizes`: the calls'
    sizes (default `call_sizes`). `functions`: a module class whose programs are compiled as their function itself
    (built again for fxcc: deepcopy does not copy a closure). `strict`: an exception must carry eager's message, and
    the module's tensors and Python attributes must end each call as eager's."""
    import fxcc

    t0 = time.perf_counter()
    res = Result(p.name)
    torch.manual_seed(0)
    eager = p.build().eval()
    function = functions is not None and isinstance(eager, functions)
    mine = p.build().eval() if function else copy.deepcopy(eager)
    opts = dict(time_vs_eager=False, check_eager=False)
    kind = "ok"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fxcc.compile(mine.fn if function else mine, dynamic=dynamic,
                                options=dict(opts, **({"passes": passes} if passes else {})))
        held = (None, None)  # the previous call's outputs, fxcc's and eager's
        for i, n in enumerate(sizes or call_sizes(p)):
            g = torch.Generator().manual_seed(100 * n + i)
            args_e = p.inputs(n, g)
            args, _ = _clone_args(args_e, {})
            try:
                with torch.no_grad():
                    want = eager(*args_e)
            except Exception as e:  # noqa: BLE001 - then fxcc must raise the same
                want = e
            try:
                with torch.no_grad():
                    got = compiled(*args)
            except Exception as e:  # noqa: BLE001 - fxcc raising where eager did not is an outcome
                if isinstance(want, Exception) and type(e) is type(want) and \
                        (not strict or _message(e) == _message(want)):
                    continue
                kind, res.detail = "raised", f"call {i + 1} (n={n}): {type(e).__name__}: {str(e).splitlines()[0][:300]}" \
                    + (f" (eager: {type(want).__name__}: {want})" if isinstance(want, Exception) else "") + "\n" \
                    + traceback.format_exc(limit=-8)
                break
            if isinstance(want, Exception):
                kind, res.detail = "differs", f"call {i + 1} (n={n}): eager raised {type(want).__name__}, fxcc not"
                break
            res.max_err = max(res.max_err, _max_err(got, want))
            kind, detail = compare_call(got, want, (*args, *_state(mine)), (*args_e, *_state(eager)), _tol(p), *held)
            held = (got, want)
            if kind == "ok":
                kind, detail = compare_call(args, args_e, (), (), _tol(p))
                kind = "ok" if kind == "ok" else "mutation"
            if strict and kind == "ok":
                kind, detail = compare_call(_state(mine), _state(eager), (), (), _tol(p))
                kind = "ok" if kind == "ok" else "state"
            if strict and kind == "ok" and _py_state(mine) != _py_state(eager):
                kind, detail = "state", f"attributes: fxcc {_py_state(mine)} vs eager {_py_state(eager)}"[:300]
            if kind != "ok":
                res.detail = f"call {i + 1} (n={n}): {detail}"
                break
    res.warnings = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                                      if str(w.message).startswith("fxcc")))
    cm = getattr(compiled, "fxcc", compiled)
    eager_calls = getattr(getattr(cm, "stats", None), "eager_calls", 0)
    if kind == "ok" and (eager_calls or _eager_warning(res.warnings)):
        kind = "eager-fallback" if _eager_warning(res.warnings) else "SILENT-EAGER"
        res.detail = "; ".join(res.warnings)[:300] or f"{eager_calls} eager calls without a warning"
    elif kind == "ok" and res.warnings:
        res.detail = "warned: " + "; ".join(res.warnings)[:300]
    res.outcome = LABELS.get(kind, kind if kind in ("eager-fallback", "SILENT-EAGER") else f"DIFF({kind})")
    res.seconds = time.perf_counter() - t0
    return res


def table(results: list[Result], verbose: bool = False) -> str:
    rows = [f"{'program':28} {'outcome':16} {'max err':>9} {'s':>6}  detail"]
    for r in results:
        detail = r.detail if verbose else r.detail.splitlines()[0][:100] if r.detail else ""
        rows.append(f"{r.name:28} {r.outcome:16} {r.max_err:9.2g} {r.seconds:6.1f}  {detail}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.split("(")[0]] = counts.get(r.outcome.split("(")[0], 0) + 1
    rows.append(f"{len(results)} programs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(rows)


GOOD = ("equal", "eager-fallback")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated program names (default: all)")
    ap.add_argument("--passes", default=None, help="a pipeline string (default: fxcc's default pipeline)")
    ap.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (symbolic sizes from the start)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    return probe_main(
        ap, a, PROBES, lambda probe: [run(probe, a.passes, True if a.dynamic else None)],
        lambda r: f"{r.name:28} {r.outcome:16} {r.max_err:9.2g} {r.seconds:6.1f}s  "
                  f"{r.detail.splitlines()[0][:140] if r.detail else ''}",
        table, lambda r: r.outcome in GOOD)


if __name__ == "__main__":
    sys.exit(main())
