"""Hand-written PyTorch programs of the kinds users compile and the other checks do not cover: data-dependent
output shapes (nonzero, masked_select, boolean masks, unique, one-argument where), sort/topk, cumulative ops,
scatter/index_add/index_put with accumulate, gather, einsum, hand-written attention and rotary embeddings, top-k/
top-p sampling with a generator, int/bool/float64/float16/bfloat16/complex tensors, in-place writes to inputs and
through views, outputs that alias inputs, nested outputs (dicts, dataclasses, None, Python scalars), Python scalars
and lists as arguments, keyword-only and default arguments, buffers written in forward, `.item()`/`.tolist()` in
the middle, empty and 0-d tensors, non-contiguous and channels-last inputs, broadcasting edge cases.

Each program runs under fxcc.compile with the default CPU pipeline (TVM + extern) on 2-3 shapes, once as compiled
by default (static, a changed size recompiles) and once with `dynamic=True`. Every call is checked against eager
on the same inputs: outputs (structure, Python values, dtype, shape, strides, values within fxcc's tolerance,
which outputs alias which inputs), the inputs and module buffers afterwards. fxcc's own code is what is compared
(`check_eager=False, time_vs_eager=False`); what it cannot compile must run eagerly with a warning.

Outcomes: ok (compiled, equal), eager (equal, some or all of it ran eagerly with a warning), silent-eager (ran
eagerly without a warning), differs, strides, mutation (inputs or buffers end differently), alias, raised (fxcc
raised where eager did not).

    python tests/user_programs.py [--only nonzero,unique] [--modes static,dynamic] [--user-defaults] [--verbose]

tests/test_user_programs.py runs a CI-sized subset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

# ------------------------------------------------------------------------------------------------ programs


@dataclass
class Program:
    """A program: `build()` returns the callable (a function or a fresh module); `inputs(size, g)` returns the
    positional and keyword arguments of one call at `size`; `sizes` are the call sizes (the first called twice)."""

    name: str
    build: Callable[[], Any]
    inputs: Callable[[int, torch.Generator], tuple[tuple, dict]]
    sizes: tuple[int, ...] = (5, 8, 3)
    low_precision: bool = False
    prepare: Callable[[Any, int], None] | None = None  # run on the program (eager's and fxcc's) before each call
    ctx: str = ""  # how calls are made: "" (as they come: gradients enabled), "no_grad", "inference_mode"
    train: bool = False  # a module left in training mode (else: model.eval(), as users call it)


PROGRAMS: dict[str, Program] = {}


def program(name: str, sizes: tuple[int, ...] = (5, 8, 3), low: bool = False, prepare=None, ctx: str = "",
            train: bool = False):
    def deco(make_inputs):
        def register(build):
            PROGRAMS[name] = Program(name, build, make_inputs, sizes, low, prepare, ctx, train)
            return build
        return register
    return deco


def _r(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _fn(f: Callable) -> Callable[[], Callable]:
    return lambda: f


# data-dependent output shapes ------------------------------------------------------------------------------

def nonzero(x):
    idx = (x > 0.3).nonzero()
    rows, cols = torch.nonzero(x < -0.3, as_tuple=True)
    return idx, rows * 10 + cols, x[rows, cols].sum()


program("nonzero")(lambda n, g: ((_r(g, n, 6),), {}))(_fn(nonzero))


def masked_select(x, y):
    m = x > y
    return torch.masked_select(x, m) * 2, x.masked_select(~m).sum()


program("masked_select")(lambda n, g: ((_r(g, n, 4), _r(g, 4)), {}))(_fn(masked_select))


def bool_index(x, m):
    picked = x[m]  # rows where m holds
    y = x.clone()
    y[y < 0] = 0.0
    return picked.mean(0), y, x[x.abs() > 1]


program("bool_index")(lambda n, g: ((_r(g, n, 3), torch.rand(n, generator=g) > 0.4), {}))(_fn(bool_index))


def unique(x):
    u, inv, cnt = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    c = torch.unique_consecutive(x.flatten())
    return u, inv, cnt, c


program("unique")(lambda n, g: ((torch.randint(0, 5, (n, 3), generator=g),), {}))(_fn(unique))


def where_one_arg(x):
    r, c = torch.where(x > 0)
    return r, c, torch.where(x > 0, x, torch.zeros_like(x)), torch.where(x > 0, x, 0.5)


program("where_one_arg")(lambda n, g: ((_r(g, n, 4),), {}))(_fn(where_one_arg))


def repeat_interleave(x, counts):
    return torch.repeat_interleave(x, counts, dim=0), torch.arange(int(counts.sum())) * 2


program("repeat_interleave")(lambda n, g: ((_r(g, n, 2), torch.randint(0, 3, (n,), generator=g)), {}))(
    _fn(repeat_interleave))


# sort, cumulative ops, scatter / gather -------------------------------------------------------------------

def sort_topk(x):
    v, i = x.sort(dim=-1, descending=True)
    tv, ti = torch.topk(x, 2, dim=0)
    a = torch.argsort(x, dim=1, stable=True)
    kv, ki = x.kthvalue(2, dim=1)
    return v, i, tv, ti, a, kv, ki, x.max(dim=1).indices, x.median(dim=0).values


program("sort_topk")(lambda n, g: ((_r(g, n, 5),), {}))(_fn(sort_topk))


def cumulative(x):
    return x.cumsum(1), torch.cumprod(x, dim=0), torch.cummax(x, 1)[0], torch.cummin(x, 1)[1], \
        torch.logcumsumexp(x, 1), (x > 0).cumsum(0)


program("cumulative")(lambda n, g: ((_r(g, n, 6),), {}))(_fn(cumulative))


def scatter(x, idx):
    src = x * 2
    a = torch.zeros(x.shape[0], 8).scatter_(1, idx, src)
    b = torch.zeros(x.shape[0], 8).scatter_add(1, idx, src)
    c = torch.full((x.shape[0], 8), 1.0).scatter_reduce(1, idx, src, reduce="amax", include_self=False)
    d = torch.zeros(x.shape[0], 8).scatter(1, idx, 3.0)
    return b, c, d, a.sum()  # `a` has duplicate indices: only its sum is deterministic


program("scatter")(lambda n, g: ((_r(g, n, 4), torch.randint(0, 8, (n, 4), generator=g)), {}))(_fn(scatter))


def index_add_put(x, idx, v):
    a = torch.zeros(6, x.shape[1]).index_add(0, idx, x)
    b = torch.zeros(6, x.shape[1])
    b.index_put_((idx,), x, accumulate=True)
    c = torch.zeros(6)
    c[idx] += 1  # duplicates: written once each (eager's semantics)
    d = x.clone()
    d[idx % x.shape[0], 0] = v
    return a, b, (c > 0).float(), d.sum(1)


program("index_add_put")(lambda n, g: ((_r(g, n, 3), torch.randint(0, 6, (n,), generator=g),
                                         _r(g, n)), {}))(_fn(index_add_put))


def gather(x, idx):
    return torch.gather(x, 1, idx), x.take_along_dim(idx, 1) + 1, x.index_select(0, idx[:, 0] % x.shape[0])


program("gather")(lambda n, g: ((_r(g, n, 7), torch.randint(0, 7, (n, 3), generator=g)), {}))(_fn(gather))


def einsum(a, b, c):
    return (torch.einsum("bij,bjk->bik", a, b), torch.einsum("bii->bi", c), torch.einsum("bij->b", a),
            torch.einsum("bij,bij->bj", a, a), torch.einsum("i,j->ij", a[0, 0], b[0, :, 0]))


program("einsum")(lambda n, g: ((_r(g, n, 3, 4), _r(g, n, 4, 5), _r(g, n, 3, 3)), {}))(_fn(einsum))


# attention, rotary, sampling -------------------------------------------------------------------------------

class MaskedAttention(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x, pad_mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        s = s.masked_fill(causal, float("-inf"))
        s = s.masked_fill(~pad_mask[:, None, None, :], torch.finfo(s.dtype).min)
        p = s.softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, d)), p


def _attn_inputs(n, g):
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, : n // 2] = False  # left padding
    return (_r(g, 2, n, 16), pad), {}


program("masked_attention")(_attn_inputs)(MaskedAttention)


class Rotary(nn.Module):
    def __init__(self, dim=8, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, q, k, offset: int = 0):
        t = torch.arange(offset, offset + q.shape[-2], dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin


program("rotary")(lambda n, g: ((_r(g, 1, 2, n, 8), _r(g, 1, 2, n, 8)), {"offset": n - 2}))(Rotary)


def sample(logits, gen, top_k: int = 4, top_p: float = 0.8, temperature: float = 0.7):
    logits = logits / temperature
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    remove = drop.scatter(-1, order, drop)
    logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 2, generator=gen), probs


program("sampling")(lambda n, g: ((_r(g, n, 10) * 3, torch.Generator().manual_seed(n)), {}))(_fn(sample))


def sample_global_rng(x):
    noise = torch.rand(x.shape)
    return x + noise, torch.randn_like(x), F.dropout(x, 0.5, training=True)


program("global_rng")(lambda n, g: ((_r(g, n, 4),), {}))(_fn(sample_global_rng))


# dtypes --------------------------------------------------------------------------------------------------

def ints(a, b):
    return (a // 3, a % 5, torch.remainder(-a, 4), a & b, a | 1, a ^ b, a << 2, a >> 1, a * b - 7,
            a / b.clamp(min=1), torch.div(a, 4, rounding_mode="floor"), torch.div(a, 4, rounding_mode="trunc"),
            a.sum(1), a.float().mean(), (a + 0.5).dtype == torch.float32, a.to(torch.int32) * 3, a.abs().max())


program("ints")(lambda n, g: ((torch.randint(-50, 50, (n, 4), generator=g),
                               torch.randint(0, 9, (n, 4), generator=g)), {}))(_fn(ints))


def bools(a, b):
    return a & b, a | ~b, a ^ b, a.any(1), b.all(0), a.sum(), (a.float() * 2).to(torch.bool), torch.logical_not(a), \
        a.int() + b.int(), torch.where(a, 1, 0).dtype


program("bools")(lambda n, g: ((torch.rand(n, 4, generator=g) > 0.5, torch.rand(n, 4, generator=g) > 0.3), {}))(
    _fn(bools))


class Float64Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 12).double(), nn.Linear(12, 3).double()
        self.norm = nn.LayerNorm(12).double()

    def forward(self, x):
        return self.l2(F.gelu(self.norm(self.l1(x)))).softmax(-1), x.sum(dtype=torch.float32)


program("float64")(lambda n, g: ((_r(g, n, 6, dtype=torch.float64),), {}))(Float64Mlp)


class HalfBlock(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.to(dtype)

    def forward(self, x):
        h = self.l2(F.silu(self.l1(self.norm(x))))
        return x + h, h.float().softmax(-1), (h * x).sum(-1, keepdim=True)


program("float16", low=True)(lambda n, g: ((_r(g, n, 8, dtype=torch.float16),), {}))(
    lambda: HalfBlock(torch.float16))
program("bfloat16", low=True)(lambda n, g: ((_r(g, 2, n, 8, dtype=torch.bfloat16),), {}))(
    lambda: HalfBlock(torch.bfloat16))


def complex_fft(x):
    f = torch.fft.rfft(x, dim=-1)
    f = f * torch.exp(1j * torch.arange(f.shape[-1]) * 0.1)
    back = torch.fft.irfft(f, n=x.shape[-1], dim=-1)
    c = torch.complex(x, x * 2)
    return back, f.abs(), torch.view_as_real(c * c.conj()), torch.fft.fft(c).angle()


program("complex_fft", sizes=(8, 6, 16))(lambda n, g: ((_r(g, 3, n),), {}))(_fn(complex_fft))


def mixed_promotion(i, x, s):
    return i + x, i * 0.5, i / 2, x.to(torch.float16) + x, i.float() + s, (i > 2) * x, torch.clamp(i, 0, 3)


program("promotion")(lambda n, g: ((torch.randint(0, 6, (n, 3), generator=g), _r(g, n, 3),
                                    torch.tensor(2.5)), {}))(_fn(mixed_promotion))


# in-place, views, aliases ---------------------------------------------------------------------------------

def inplace_inputs(x, y):
    x.add_(1)
    y.mul_(2).clamp_(max=1.0)
    return x + y


program("inplace_inputs")(lambda n, g: ((_r(g, n, 4), _r(g, n, 4)), {}))(_fn(inplace_inputs))


def view_writes(x, z):
    x[:, 0] = z.sum(1)
    x.narrow(1, 1, 2).copy_(z[:, :2] * 3)
    x.t()[3].fill_(-1)
    x[1:, 2:][x[1:, 2:] > 0.5] = 0.5
    return x.sum()


program("view_writes")(lambda n, g: ((_r(g, n, 5), _r(g, n, 3)), {}))(_fn(view_writes))


def return_aliases(x):
    return x, x.t(), x[1:], x.view(-1), x.unsqueeze(0).expand(2, -1, -1), x.detach(), x.contiguous(), \
        x.reshape(-1), x.to(torch.float32), x.float(), x.type_as(x), x.squeeze(), x.flatten(), x[..., None]


program("return_aliases")(lambda n, g: ((_r(g, n, 3),), {}))(_fn(return_aliases))


def inplace_returned(x):
    y = x.mul_(2)
    return y, x[0]


program("inplace_returned")(lambda n, g: ((_r(g, n, 3),), {}))(_fn(inplace_returned))


# calling convention ----------------------------------------------------------------------------------------

@dataclass
class Result:
    logits: torch.Tensor
    hidden: torch.Tensor | None
    n: int
    names: list[str]


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x)
        return {"result": Result(h.relu(), None, 3, ["a", "b"]), "pair": (h.sum(), None), "n": x.shape[0],
                "f": 1.5, "none": None}


program("structured_outputs")(lambda n, g: ((_r(g, n, 4),), {}))(Structured)


def returns_none(x):
    x.sub_(1)


program("returns_none")(lambda n, g: ((_r(g, n, 2),), {}))(_fn(returns_none))


def scalar_args(x, alpha: float, dims: list[int], k: int, flag: bool):
    y = x * alpha + k
    if flag:
        y = y.relu()
    return y.sum(dim=dims), y.permute(*reversed(range(y.dim())))


program("scalar_args")(lambda n, g: ((_r(g, n, 3, 2), 0.5 + n, [0, 2], n, n % 2 == 0), {}))(_fn(scalar_args))


def kwargs_only(x, *, scale: float = 2.0, bias: torch.Tensor | None = None, mode: str = "sum"):
    y = x * scale
    if bias is not None:
        y = y + bias
    return y.sum(-1) if mode == "sum" else y.amax(-1)


program("kwargs_only")(lambda n, g: ((_r(g, n, 4),), {"bias": _r(g, 4)} if n % 2 else {"mode": "max", "scale": 3.0}))(
    _fn(kwargs_only))


class DefaultArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x, mask=None, eps: float = 1e-5, out_list=(0, 2)):
        y = self.l(x)
        if mask is not None:
            y = y.masked_fill(mask, 0)
        return [y[:, i] + eps for i in out_list]


program("default_args")(lambda n, g: ((_r(g, n, 3),), {"mask": torch.rand(n, 3, generator=g) > 0.5} if n > 4 else {}))(
    DefaultArgs)


class RunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
            self.count += 1
        return (x - self.mean) / (self.count.float() + 1), self.bn(x)


def _train_mode():
    m = RunningStats()
    m.bn.train()
    return m


program("running_stats", ctx="no_grad", train=True)(lambda n, g: ((_r(g, n, 4),), {}))(_train_mode)


def item_tolist(x):
    s = x.abs().max().item()
    shape = x.sum(1).round().tolist()
    k = int((x > 0).sum().item()) % x.shape[1]
    return x / s, torch.tensor(shape), x[:, :k + 1], len(shape)


program("item_tolist")(lambda n, g: ((_r(g, n, 4),), {}))(_fn(item_tolist))


def shape_branch(x):
    if x.shape[0] > 4:
        return x.sum(0)
    if x.mean() > 0:  # data-dependent branch
        return x * 2
    return x - 1


program("shape_branch", sizes=(5, 3, 8))(lambda n, g: ((_r(g, n, 3),), {}))(_fn(shape_branch))


# shapes: empty, 0-d, layouts, broadcasting ----------------------------------------------------------------

class EmptyOk(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.l(x), x.sum(0), torch.cat([x, y], 0), x.amax(1) if x.shape[0] else x.sum(1), y.new_zeros(0, 3)


program("empty_tensors", sizes=(0, 3, 0))(lambda n, g: ((_r(g, n, 4), _r(g, 2, 4)), {}))(EmptyOk)


def zero_dim(s, x, t):
    return s * x + t, s.exp(), (s + t).item(), x.sum() * s, torch.stack([s, t]), s.clone().add_(1)


program("zero_dim")(lambda n, g: ((torch.tensor(float(n)), _r(g, n), torch.tensor(0.5)), {}))(_fn(zero_dim))


class ConvChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(8).eval()

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        return self.c2(y), F.adaptive_avg_pool2d(y, 1).flatten(1), y


program("channels_last", sizes=(8, 10))(
    lambda n, g: ((_r(g, 2, 3, n, n).to(memory_format=torch.channels_last),), {}))(ConvChannelsLast)


class NonContiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 4)

    def forward(self, x, y):
        return self.l(x), x * y, (x + 1).t(), x.sum(0)


program("non_contiguous")(lambda n, g: ((_r(g, 6, n).t(), _r(g, n, 12)[:, ::2]), {}))(NonContiguous)


def broadcasting(a, b, c):
    return a + b, a * c, (b - c).expand(2, -1, -1), torch.maximum(a, c), a.expand(0, -1) if False else a[:0] + b[:0]


program("broadcasting")(lambda n, g: ((_r(g, 1, n), _r(g, n, 1), _r(g, n)), {}))(_fn(broadcasting))


class EmbedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)
        self.eval()

    def forward(self, ids, lengths):
        h = self.drop(self.norm(self.emb(ids)))
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        pooled = (h * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1)
        return self.head(pooled).log_softmax(-1), mask


program("embed_pool")(lambda n, g: ((torch.randint(0, 20, (3, n), generator=g),
                                     torch.randint(0, n + 1, (3,), generator=g)), {}))(EmbedPool)


class LayerLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.skip = {1}

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.layers):
            if i in self.skip:
                continue
            x = torch.tanh(layer(x)) + x
            outs.append(x)
        return torch.stack(outs).mean(0), outs


program("layer_loop")(lambda n, g: ((_r(g, n, 4),), {}))(LayerLoop)


def norms_and_reductions(x):
    return (F.normalize(x, dim=-1), torch.linalg.vector_norm(x, ord=2, dim=0), x.var(0, unbiased=False),
            x.std(1, keepdim=True), torch.logsumexp(x, 1), x.prod(1), x.amin(), torch.nan_to_num(x.log()),
            x.clamp(-0.5, 0.5).square().sum(), torch.cdist(x, x))


program("reductions")(lambda n, g: ((_r(g, n, 5),), {}))(_fn(norms_and_reductions))


def inf_nan(x):
    y = x / (x > 0).float()  # inf and nan where x <= 0
    return y, torch.isfinite(y), y.nan_to_num(0.0, 1e4, -1e4), torch.softmax(x.masked_fill(x < 0, float("-inf")), 1)


program("inf_nan")(lambda n, g: ((_r(g, n, 4),), {}))(_fn(inf_nan))


def pads_and_shapes(x):
    b = x.shape[0]
    y = F.pad(x, (1, 2), value=-1.0)
    z = y.reshape(b, -1, 1).flip(1).roll(2, dims=1)
    return y, z, x.new_ones(b, 2), torch.arange(b, dtype=torch.float32).view(b, 1) * x, torch.tril(x[:, :b]), \
        x.repeat(2, 1), x.unfold(1, 2, 1), torch.meshgrid(x[:, 0], x[0], indexing="ij")[1]


program("pads_shapes")(lambda n, g: ((_r(g, n, 6),), {}))(_fn(pads_and_shapes))


# more of what users write -----------------------------------------------------------------------------------

def noncontig_inplace(x, y):
    x.add_(1)  # x is a transposed view of its storage
    y[:, 1] += x[:, 0]  # y is a strided slice
    return x * 2, y


program("noncontig_inplace")(lambda n, g: ((_r(g, 3, n).t(), _r(g, n, 6)[:, ::2]), {}))(_fn(noncontig_inplace))


def same_tensor_twice(x, y):
    y.mul_(2)  # called with y the same tensor as x
    return x + y, x


program("same_tensor_twice")(lambda n, g: (lambda t: ((t, t), {}))(_r(g, n, 3)))(_fn(same_tensor_twice))


def index_put_input(x, idx, v):
    x[idx] = v
    x[:, -1] = x[:, 0] * 2
    return x.sum(0)


program("index_put_input")(lambda n, g: ((_r(g, n, 3), torch.randperm(n, generator=g)[:2], _r(g, 2, 3)), {}))(
    _fn(index_put_input))


def output_aliases(x):
    y = x * 2
    return y, y, y.view(-1), y[0]


program("output_aliases")(lambda n, g: ((_r(g, n, 3),), {}))(_fn(output_aliases))


class BufferWrites(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("hist", torch.zeros(4, 3))
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self.eval()

    def forward(self, x):
        self.hist.copy_(self.hist.roll(1, 0))
        self.hist[0] = x.mean(0)
        self.pos.add_(1)
        return x - self.hist.mean(0), self.pos.clone()


program("buffer_writes")(lambda n, g: ((_r(g, n, 3),), {}))(BufferWrites)


class AttrState(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.calls = 0
        self.last = None
        self.eval()

    def forward(self, x):
        self.calls += 1
        y = self.l(x) * self.calls
        self.last = y.detach()
        return y


program("attr_state")(lambda n, g: ((_r(g, n, 3),), {}))(AttrState)


def uint8_image(img, mean, std):
    x = (img.float() / 255 - mean[:, None, None]) / std[:, None, None]
    back = (x * 64 + 128).round().clamp(0, 255).to(torch.uint8)
    return x, back, img.max(), (img > 128).sum(dtype=torch.int32), img.to(torch.int8)


program("uint8_image")(lambda n, g: ((torch.randint(0, 256, (3, n, n), generator=g, dtype=torch.uint8),
                                      torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])), {}))(
    _fn(uint8_image))


def int32_ops(a):
    b = a.to(torch.int32)
    return b * b, b // 7, (b * 100000).to(torch.int64), b.sum(), b.cumsum(0), b.float() / 3, (b % 2 == 0).nonzero()


program("int32_ops")(lambda n, g: ((torch.randint(-3000, 3000, (n, 2), generator=g),), {}))(_fn(int32_ops))


def search_count(x, edges, ids):
    return torch.bucketize(x, edges), torch.searchsorted(edges, x.flatten().sort().values), torch.bincount(ids), \
        torch.histc(x, bins=5, min=-2, max=2), F.one_hot(ids), F.one_hot(ids, 6).sum(0)


program("search_count")(lambda n, g: ((_r(g, n, 3), torch.linspace(-1, 1, 5), torch.randint(0, 6, (n,), generator=g)),
                                      {}))(_fn(search_count))


def index_fill_copy(x, idx, src):
    return x.index_fill(1, idx, -1.0), x.index_copy(0, torch.arange(src.shape[0]), src), \
        x.masked_scatter(x > 0, src.repeat(x.shape[0], 1)[:, :x.shape[1]])


program("index_fill_copy")(lambda n, g: ((_r(g, n, 4), torch.tensor([0, 2]), _r(g, 2, 4)), {}))(_fn(index_fill_copy))


def list_dict_inputs(xs: list, d: dict):
    return torch.stack(xs).sum(0) * d["scale"] + d["bias"], [x.mean() for x in xs], {"n": len(xs)}


program("list_dict_inputs")(lambda n, g: (([_r(g, n, 2) for _ in range(3)], {"scale": _r(g, 2), "bias": _r(g, n, 1)}),
                                          {}))(_fn(list_dict_inputs))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.gru = nn.GRU(6, 5, bidirectional=True)
        self.eval()

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        o2, h2 = self.gru(out.transpose(0, 1))
        return out, h, c, o2, h2


program("recurrent")(lambda n, g: ((_r(g, 2, n, 4),), {}))(Recurrent)


class TorchTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.eval()

    def forward(self, x, pad):
        h = self.enc(x, src_key_padding_mask=pad)
        a, w = self.mha(h, h, h, key_padding_mask=pad, need_weights=True)
        return h, a, w


def _tr_inputs(n, g):
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, n - 2:] = True
    return (_r(g, 2, n, 16), pad), {}


program("torch_transformer")(_tr_inputs)(TorchTransformer)


class Vision(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.eval()

    def forward(self, x):
        y, idx = F.max_pool2d(self.c(x), 2, return_indices=True)
        up = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        near = F.interpolate(y, size=(x.shape[-2], x.shape[-1]), mode="nearest")
        return up, near, idx, y.to(memory_format=torch.channels_last)


program("vision", sizes=(8, 12))(lambda n, g: ((_r(g, 1, 3, n, n),), {}))(Vision)


def distributions(logits, gen):
    probs = logits.softmax(-1)
    perm = torch.randperm(logits.shape[0], generator=gen)
    cat = torch.distributions.Categorical(logits=logits)
    return perm, cat.entropy(), cat.log_prob(torch.zeros(logits.shape[0], dtype=torch.long)), \
        torch.bernoulli(probs, generator=gen)


program("distributions")(lambda n, g: ((_r(g, n, 5), torch.Generator().manual_seed(7)), {}))(_fn(distributions))


def numpy_print(x):
    y = x * 2
    arr = y.numpy()
    print(f"user print {arr.shape}", file=sys.stderr if False else open("/dev/null", "w"))
    return torch.from_numpy(arr.copy()) + 1, float(arr.sum())


program("numpy_roundtrip")(lambda n, g: ((_r(g, n, 3),), {}))(_fn(numpy_print))


def half_reductions(x):
    return x.sum(), x.mean(0), x.softmax(-1), x.var(1), x.float().sum(), (x @ x.t()).diagonal(), x.cumsum(1)


program("half_reductions", low=True)(lambda n, g: ((_r(g, n, 64, dtype=torch.float16) * 4,), {}))(
    _fn(half_reductions))


def arange_linspace(x):
    n = x.shape[0]
    return torch.arange(0, n, 0.5) * x.sum(), torch.linspace(0, 1, n), x.new_tensor([n, n * 2]), \
        torch.tensor([x.shape[1]] * n) + x[:, 0].long(), torch.full((n,), 7, dtype=torch.int16), torch.eye(n)


program("arange_linspace")(lambda n, g: ((_r(g, n, 3) * 3,), {}))(_fn(arange_linspace))


# state that changes between calls, errors, calling contexts --------------------------------------------------

SCALE = torch.ones(3)
OFFSET = 0.0


def global_state(x):
    return x * SCALE + OFFSET


def _set_globals(_, n: int) -> None:
    global OFFSET
    SCALE.fill_(n)  # a tensor the function reads, changed in place between calls
    OFFSET = n / 2  # a Python global rebound between calls


program("global_state", prepare=_set_globals)(lambda n, g: ((_r(g, n, 3),), {}))(_fn(global_state))


class Tunable(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.temperature = 1.0
        self.eval()

    def forward(self, x):
        return self.l(x) / self.temperature


def _retune(m: Tunable, n: int) -> None:
    with torch.no_grad():
        m.l.weight.mul_(0.5)  # in place
    m.temperature = float(n)  # a primitive attribute
    if n == 8:
        m.l.bias = nn.Parameter(torch.full((3,), 0.25))  # a new parameter object


program("weights_change", prepare=_retune)(lambda n, g: ((_r(g, n, 3),), {}))(Tunable)


def raises_for_some(x):
    if x.shape[0] > 6:
        raise ValueError(f"sequence too long: {x.shape[0]}")
    return x @ torch.ones(3, 2)


program("raises_for_some")(lambda n, g: ((_r(g, n, 3),), {}))(_fn(raises_for_some))


def torch_error(x, w):
    return x @ w  # a size mismatch at size 8: eager's RuntimeError


program("torch_error")(lambda n, g: ((_r(g, n, 3), _r(g, 3 if n != 8 else 4, 2)), {}))(_fn(torch_error))


def varargs(*xs, **kw):
    out = sum(xs)
    for k in sorted(kw):
        out = out * kw[k]
    return out, len(xs)


program("varargs")(lambda n, g: (tuple(_r(g, n, 2) for _ in range(2 + n % 2)), {"a": 2.0, "b": _r(g, 2)}))(_fn(varargs))


class NoGradDeco(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.eval()

    @torch.no_grad()
    def forward(self, x):
        h = x
        while h.norm() > 1:  # a data-dependent loop
            h = h / 2
        return self.l(h), x.shape, h.tolist()[0]


program("nograd_loop")(lambda n, g: ((_r(g, n, 4) * 3,), {}))(NoGradDeco)


class InferenceMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))
        self.eval()

    def forward(self, x):
        self.seen.add_(x.sum(0))
        return self.l(x).relu_()


program("inference_mode", ctx="inference_mode")(lambda n, g: ((_r(g, n, 4),), {}))(InferenceMode)


# aliasing of module state, odd input layouts, dtype changes ------------------------------------------------------

class ReturnsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)
        self.register_buffer("steps", torch.zeros(2))
        self.eval()

    def forward(self, x):
        self.steps += 1
        return self.l(x), self.steps, self.l.weight, self.steps.view(1, 2)


program("returns_state")(lambda n, g: ((_r(g, n, 3),), {}))(ReturnsState)


def odd_layouts(a, b, c):
    return a * 2 + b, c.sum(0), (a + c[: a.shape[0], :1]).relu()


program("odd_layouts")(lambda n, g: ((_r(g, n + 2, 3)[2:], _r(g, 3).expand(n, 3), _r(g, 3, n + 1).t()), {}))(
    _fn(odd_layouts))


def dtype_switch(x, w):
    return (x @ w).softmax(-1), x.sum(dtype=torch.float64), x.to(w.dtype) * 2


program("dtype_switch")(lambda n, g: ((_r(g, n, 4, dtype=torch.float64 if n == 8 else torch.float32),
                                       _r(g, 4, 2, dtype=torch.float64 if n == 8 else torch.float32)), {}))(
    _fn(dtype_switch))


def branch_inplace(x, acc: list):
    if x.sum() > 0:  # data-dependent: DyCL
        x.mul_(2)
    else:
        x[0] = 0
    acc.append(x.mean().item())
    return x.cumsum(0), len(acc)


program("branch_inplace")(lambda n, g: ((_r(g, n, 3) + (0.5 if n % 2 else -0.5), [1.0]), {}))(_fn(branch_inplace))


# numerics as eager defines them --------------------------------------------------------------------------------

def _with_nans(n, g):
    x = _r(g, n, 6) * 3
    x[0, 1] = float("nan")
    x[n // 2, 4] = float("nan")
    x[n - 1, 0] = float("inf")
    x[1, 2] = float("-inf")
    return (x, _r(g, n, 6)), {}


def nan_propagation(x, y):
    return (torch.maximum(x, y), torch.minimum(x, y), x.relu(), x.clamp(-1, 1), torch.clamp(x, min=0.0),
            x.amax(1), x.amin(0), x.max(1).values, F.hardtanh(x), F.relu6(x), torch.fmax(x, y), x.sum(1),
            torch.where(x > 0, x, y), x.sigmoid(), x.tanh(), F.gelu(x.clamp(-1e4, 1e4)), torch.erf(x), F.softplus(x),
            x.exp(), F.elu(x), F.silu(x), F.leaky_relu(x, 0.1), torch.log_softmax(x, 1), F.hardswish(x))
    # (eager's gelu(+-inf) is itself inf or NaN by tensor size: its vectorized and scalar paths differ)


program("nan_propagation")(_with_nans)(_fn(nan_propagation))


def rounding(x):
    h = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997])
    return (x.round(), h.round() + x.sum() * 0, torch.round(x, decimals=1), x.floor(), x.ceil(), x.trunc(),
            x.frac(), torch.fmod(x, 1.3), torch.remainder(x, 1.3), x // 0.7, torch.floor_divide(x, -0.7),
            x.sign(), torch.copysign(torch.ones_like(x), x), (x * 4).round() / 4)


program("rounding")(lambda n, g: ((torch.cat([_r(g, n, 5) * 5, torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5]])]),),
                                  {}))(_fn(rounding))


def int_wrap(a):
    b = a.to(torch.int8)
    u = a.to(torch.uint8)
    return b * 3, b + 100, u + 200, u * u, (u - 10), a.to(torch.int16) * 300, b.abs(), -b, b // 3, b % 7, \
        torch.bitwise_not(u), u >> 1, b.sum(), u.sum(), (b * 3).float()


program("int_wrap")(lambda n, g: ((torch.randint(-128, 128, (n, 5), generator=g),), {}))(_fn(int_wrap))


def masked_rows(x, m):
    s = x.masked_fill(~m, float("-inf"))
    return s.softmax(-1), torch.logsumexp(s, -1), s.max(-1).values, s.log_softmax(-1), \
        F.softmax(s.masked_fill(~m, torch.finfo(x.dtype).min), -1)


def _masked_rows_inputs(n, g):
    m = torch.rand(n, 6, generator=g) > 0.5
    m[0] = False  # a row with nothing kept
    m[1] = True
    return (_r(g, n, 6), m), {}


program("masked_rows")(_masked_rows_inputs)(_fn(masked_rows))


def overflow(x):
    big = x * 1e5
    return big.half(), (big.half() * 2).float(), big.to(torch.bfloat16), x.exp() * 1e30, (x * 100).exp(), \
        torch.log(x.abs() * 0), (x * 0) / (x * 0)


program("overflow")(lambda n, g: ((_r(g, n, 4),), {}))(_fn(overflow))


def special_math(x):
    p = x.abs() + 1e-3
    return (torch.log1p(x * 1e-4), torch.expm1(x * 1e-4), torch.erf(x), torch.erfinv(x.clamp(-0.99, 0.99)),
            torch.lgamma(p), torch.digamma(p), F.gelu(x, approximate="tanh"), F.silu(x), F.mish(x),
            torch.atan2(x, p), torch.pow(p, x), torch.pow(x, 2), torch.pow(x, 3.0), x.rsqrt(), torch.sqrt(x),
            torch.xlogy(p, p), torch.sinc(x), torch.logit(p.clamp(max=0.999)), torch.hypot(x, p))


program("special_math")(lambda n, g: ((_r(g, n, 8) * 2,), {}))(_fn(special_math))


# ------------------------------------------------------------------------------------------------ the check


@dataclass
class Outcome:
    name: str
    mode: str
    kind: str = "ok"
    detail: str = ""
    calls: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _tol(prog: Program):
    from fxcc.eager_check import tolerance

    return lambda dtype: tolerance(torch.bfloat16 if prog.low_precision and dtype.is_floating_point else dtype)


def _clone_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of a call's arguments: tensors with their strides, generators with their state, one copy of an
    object passed twice."""
    memo: dict[int, Any] = {}

    def one(v):
        if id(v) not in memo:
            if isinstance(v, torch.Tensor):
                memo[id(v)] = _same_layout(v)
            elif isinstance(v, torch.Generator):
                memo[id(v)] = torch.Generator().set_state(v.get_state())
            else:
                memo[id(v)] = pytree.tree_map(one, v) if isinstance(v, (list, tuple, dict)) else copy.deepcopy(v)
        return memo[id(v)]
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _same_layout(v: torch.Tensor) -> torch.Tensor:
    """A copy with `v`'s sizes and strides (a transposed or sliced input stays transposed or sliced)."""
    n = v.untyped_storage().nbytes() // v.element_size()
    base = v.as_strided((n,), (1,), 0).clone()  # the whole storage: an expanded input stays expanded
    return base.as_strided(v.size(), v.stride(), v.storage_offset())


def _leaves(x: Any) -> list[tuple[str, Any]]:
    """Every leaf with its path: pytree containers, then the fields of dataclasses and other objects."""
    flat, _ = pytree.tree_flatten_with_path(x)
    out = []
    for kp, v in flat:
        p = "out" + pytree.keystr(kp)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                out += [(f"{p}.{f.name}{q[3:]}", w) for q, w in _leaves(getattr(v, f.name))]
        elif isinstance(v, torch.Generator):
            out.append((p + ".get_state()", v.get_state()))  # a generator: compared by its state
        else:
            out.append((p, v))
    return out


def _strides_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return any(sa != sb for sa, sb, n in zip(a.stride(), b.stride(), b.shape) if n > 1) and b.numel() > 1


def compare_call(got: Any, want: Any, args: tuple, args_e: tuple, tol, before: Any = None,
                 before_e: Any = None) -> tuple[str, str]:
    """('ok', '') or (kind, detail): the outputs' structure, Python values, dtypes, shapes, strides, values and
    aliasing of inputs and (`before`, `before_e`: the previous call's outputs, still held) of an earlier result: a
    tensor handed out twice is one the caller may write, changing what it holds from the other call."""
    from fxcc.outputs import compare

    g, e = _leaves(got), _leaves(want)
    if [p for p, _ in g] != [p for p, _ in e]:
        return "differs", f"structure: fxcc {[p for p, _ in g][:6]} vs eager {[p for p, _ in e][:6]}"
    ins = [a for a in args if isinstance(a, torch.Tensor)]
    ins_e = [a for a in args_e if isinstance(a, torch.Tensor)]
    for (p, a), (_, b) in zip(g, e):
        if not isinstance(b, torch.Tensor):
            if type(a) is not type(b) or a != b:
                return "differs", f"{p}: fxcc {a!r:.60} vs eager {b!r:.60}"
            continue
        if not isinstance(a, torch.Tensor):
            return "differs", f"{p}: fxcc {type(a).__name__} vs eager tensor"
        c = compare(a, b, tol=tol)
        if not c.equal and b.is_floating_point() and b.numel() and torch.equal(a.isnan(), b.isnan()):
            floor = 1e-5 if tol(b.dtype) <= 1e-3 else 1e-2
            if ((a.double() - b.double()).abs().nan_to_num(0).max().item() <= floor):
                c.equal = True
        if not c.equal:
            return "differs", f"{p}: {c.detail or f'max rel error {c.max_rel:.3g}'}"
        if _strides_differ(a, b):
            return "strides", f"{p}: strides {a.stride()} vs eager's {b.stride()} (shape {tuple(b.shape)})"
        alias_e = [i for i, t in enumerate(ins_e) if b.numel() and _shares(b, t)]
        alias = [i for i, t in enumerate(ins) if a.numel() and _shares(a, t)]
        if alias_e != alias:
            return "alias", f"{p}: aliases inputs {alias} under fxcc, {alias_e} in eager"
        old_e = [q for q, t in _leaves(before_e) if isinstance(t, torch.Tensor) and b.numel() and _shares(b, t)]
        old = [q for q, t in _leaves(before) if isinstance(t, torch.Tensor) and a.numel() and _shares(a, t)]
        if old_e != old:
            return "alias", f"{p}: shares memory with the previous call's {old} under fxcc, {old_e} in eager"
    outs = [(p, t) for p, t in e if isinstance(t, torch.Tensor) and t.numel()]
    outs_g = dict((p, t) for p, t in g if isinstance(t, torch.Tensor))
    for i, (p, t) in enumerate(outs):
        for q, u in outs[:i]:
            if _shares(t, u) != _shares(outs_g[p], outs_g[q]):
                return "alias", f"{p} and {q} share memory in {'eager' if _shares(t, u) else 'fxcc'} only"
    return "ok", ""


def _state(program: Any) -> list[torch.Tensor]:
    """A module's parameters and buffers (outputs that are, or view, one of them must be so under fxcc too)."""
    return [*program.parameters(), *program.buffers()] if isinstance(program, nn.Module) else []


def _context(ctx: str):
    return {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(ctx, contextlib.nullcontext)()


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _eager_warning(ws: list[str]) -> bool:
    return any("eager" in w for w in ws)


def _compare_state(mine: nn.Module, eager: nn.Module, tol, aliases: bool) -> tuple[str, str]:
    """The module's state after a call: its values, and (`aliases`) which of its tensors share memory."""
    if aliases:
        return compare_call(dict(mine.state_dict()), dict(eager.state_dict()), (), (), tol)
    want = eager.state_dict()
    for k, v in mine.state_dict().items():
        kind, detail = compare_call({k: v}, {k: want[k]}, (), (), tol)
        if kind != "ok":
            return kind, detail
    return "ok", ""


def run(prog: Program, mode: str, options: dict | None = None, user_defaults: bool = False,
        state_aliases: bool = True) -> Outcome:
    """Eager and fxcc on the same inputs, call by call (the first size twice); the first difference is the
    outcome. `user_defaults`: fxcc's options as users get them (its first-call check against eager and its timing
    against eager on), else those two off, so that what is compared is fxcc's own code. `state_aliases=False`:
    the module's tensors afterwards are compared by value only (merge-linears makes sibling projection weights
    views of one merged weight, by design)."""
    import fxcc

    t0 = time.perf_counter()
    out = Outcome(prog.name, mode)
    eager = prog.build()
    if isinstance(eager, nn.Module) and not prog.train:
        eager.eval()
    mine = copy.deepcopy(eager) if isinstance(eager, nn.Module) else eager
    opts = {} if user_defaults else dict(time_vs_eager=False, check_eager=False)
    opts.update(options or {})
    tol = _tol(prog)
    sizes = (prog.sizes[0], *prog.sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fxcc.compile(mine, dynamic=True if mode == "dynamic" else None, options=opts)
        held = (None, None)  # the previous call's outputs, fxcc's and eager's
        for i, n in enumerate(sizes):
            g = torch.Generator().manual_seed(100 * n + i)
            args_e, kw_e = prog.inputs(n, g)
            args, kw = _clone_args(args_e, kw_e)
            if prog.prepare is not None:
                prog.prepare(eager, n)
                if mine is not eager:
                    prog.prepare(mine, n)
            torch.manual_seed(i)
            try:
                with _context(prog.ctx):
                    want = eager(*args_e, **kw_e)
            except Exception as e:  # noqa: BLE001 - then fxcc raises the same
                want = e
            torch.manual_seed(i)
            try:
                with _context(prog.ctx):
                    got = compiled(*args, **kw)
            except Exception as e:  # noqa: BLE001 - fxcc raising where eager did not is an outcome
                if isinstance(want, Exception) and type(e) is type(want):
                    out.calls += 1
                    continue
                out.kind = "raised"
                out.detail = f"call {i + 1} (size {n}): {type(e).__name__}: {str(e).splitlines()[0][:300]}\n" + \
                    traceback.format_exc(limit=-8)
                break
            if isinstance(want, Exception):
                out.kind, out.detail = "differs", f"call {i + 1} (size {n}): eager raised {type(want).__name__}, fxcc not"
                break
            out.calls += 1
            kind, detail = compare_call(got, want, (*args, *_state(mine)), (*args_e, *_state(eager)), tol, *held)
            held = (got, want)
            if kind == "ok":
                kind, detail = compare_call((args, kw), (args_e, kw_e), (), (), tol)
                if kind != "ok":
                    kind, detail = "mutation", "inputs after the call: " + detail
            if kind == "ok" and isinstance(eager, nn.Module):
                kind, detail = _compare_state(mine, eager, tol, state_aliases)
                if kind != "ok":
                    kind, detail = "mutation", "module state after the call: " + detail
            if kind != "ok":
                out.kind, out.detail = kind, f"call {i + 1} (size {n}): {detail}"
                break
    out.warnings = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                                      if str(w.message).startswith("fxcc")))
    cm = compiled if hasattr(compiled, "stats") else getattr(compiled, "fxcc", None)
    eager_calls = getattr(getattr(cm, "stats", None), "eager_calls", 0)
    if out.kind == "ok" and (eager_calls or _eager_warning(out.warnings)):
        out.kind = "eager" if _eager_warning(out.warnings) else "silent-eager"
        out.detail = "; ".join(out.warnings)[:300] or f"{eager_calls} eager calls without a warning"
    out.seconds = time.perf_counter() - t0
    return out


MODES = ("static", "dynamic")
GOOD = ("ok", "eager", "skipped")


def table(outcomes: list[Outcome], verbose: bool = False) -> str:
    rows = [f"{'program':22} {'mode':8} {'outcome':13} {'calls':>5} {'s':>6}  detail"]
    for o in outcomes:
        detail = o.detail if verbose else o.detail.splitlines()[0][:110] if o.detail else ""
        rows.append(f"{o.name:22} {o.mode:8} {o.kind:13} {o.calls:5d} {o.seconds:6.1f}  {detail}")
    bad = sum(o.kind not in GOOD for o in outcomes)
    rows.append(f"{len(outcomes)} runs: {sum(o.kind == 'ok' for o in outcomes)} ok, "
                f"{sum(o.kind == 'eager' for o in outcomes)} eager with a warning, {bad} failing")
    return "\n".join(rows)


def probe_main(ap: argparse.ArgumentParser, a: argparse.Namespace, known: dict, runs: Callable[[Any], list],
               line: Callable[[Any], str], table: Callable[[list, bool], str], good: Callable[[Any], bool]) -> int:
    """The probe scripts' command line: the programs `--only` picks from `known` (all by default; an unknown name
    is the parser's error), each run as `runs(program)` returns its results, a `line` each on stderr as they end,
    then the `table`; 0 when every result is `good`."""
    names = a.only.split(",") if a.only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown programs {unknown}; known: {', '.join(known)}")
    results = []
    for name in names:
        for r in runs(known[name]):
            print(line(r), file=sys.stderr, flush=True)
            results.append(r)
    print(table(results, a.verbose))
    return 0 if all(map(good, results)) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated program names (default: all)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--passes", default=None, help="a pipeline string (default: fxcc's default pipeline)")
    ap.add_argument("--user-defaults", action="store_true",
                    help="fxcc's options as users get them (check_eager and time_vs_eager on)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    return probe_main(
        ap, a, PROGRAMS,
        lambda prog: [run(prog, mode, {"passes": a.passes} if a.passes else None, a.user_defaults)
                      for mode in a.modes.split(",")],
        lambda o: f"{o.name:22} {o.mode:8} {o.kind:13} {o.seconds:6.1f}s  {o.detail.splitlines()[0][:140] if o.detail else ''}",
        table, lambda o: o.kind in GOOD)


if __name__ == "__main__":
    sys.exit(main())
