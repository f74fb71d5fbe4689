"""Decode loops written by hand in plain PyTorch (gpt-fast, nanoGPT and llama-reference styles), none of them
transformers' models (tests/test_generate.py covers those): tiny decoders (fp32, d=64, 2 layers, vocab 100) whose
KV caches are held in different ways, each run as a greedy decode loop of 24 tokens after a prompt, then again with
another prompt length (and, where the cache allows, another batch size).

KV caches: module buffers written at an `input_pos` tensor (`index_copy_`, `cache[:, :, input_pos] = k`) under a
mask slice over the whole cache; past (k, v) tuples grown with torch.cat and returned; a list per layer and a dict
mutated in place; preallocated caches passed as arguments at a position given as a Python int or a 0-d tensor;
llama reference's `start_pos: int` with `self.cache_k[:bsz, start_pos:start_pos + seqlen]`; the same models
through `torch.compile(backend="fxcc")`; a decode-step function taking its weights as arguments; sampling with
torch.multinomial under a seed.

Each loop is compared with eager's: the token ids equal, every step's logits within fp32 tolerance, the caches and
buffers the caller holds in eager's state, and the compiles counted: at most 2 in the first loop (prefill, then
the decode step), at most 1 in the second (the prefill at a new prompt length, recompiled with its length
symbolic: export keeps a decode step's length of 1 static, so the first prefill's variant was static, as
torch.compile's automatic dynamic does), none in a third with the same batch size (at most one where the batch
size changes), and none in any loop's second half.

Outcomes: equal, eager-fallback (equal, ran eagerly with a warning), SILENT-EAGER (eagerly without a warning),
MISMATCH (tokens, logits or caches), RECOMPILES (compiles in a loop's second half: a compile per token),
EXTRA-COMPILES (equal, none per token, more compiles than the above), CRASH (fxcc raised). The compiles column
counts the program's own per loop, and its DyCL segments' (seg ...) where it runs as a host program.

    python tests/heldout_decode.py [--only NAME[,NAME]] [--verbose]

tests/test_heldout_decode.py runs a fast subset.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from user_programs import probe_main

D, HEADS, LAYERS, VOCAB, TMAX, STEPS = 64, 4, 2, 100, 64, 24
DH = D // HEADS

# ------------------------------------------------------------------------------------------------ model pieces


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves rotated (x: [..., T, DH], cos/sin broadcast to it)."""
    a, b = x.chunk(2, -1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def rope_tables(positions: torch.Tensor, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at `positions` ([T]), computed from them: [T, DH // 2]."""
    inv = 1.0 / base ** (torch.arange(0, DH, 2, dtype=torch.float32, device=positions.device) / DH)
    f = positions.float()[:, None] * inv
    return f.cos(), f.sin()


class Block(nn.Module):
    """Pre-norm attention + MLP; the attention's cache handling is the caller's (`attend`)."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.wqkv = nn.Linear(D, 3 * D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.wqkv(self.n1(x)).split(D, -1)
        return tuple(y.view(b, t, HEADS, DH).transpose(1, 2) for y in (q, k, v))

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, D))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


# (1) gpt-fast: KVCache buffers [B, H, TMAX, DH], written at input_pos, a mask row per position over TMAX --------


class KVCache(nn.Module):
    def __init__(self, batch: int, setitem: bool):
        super().__init__()
        self.setitem = setitem
        self.register_buffer("k_cache", torch.zeros(batch, HEADS, TMAX, DH))
        self.register_buffer("v_cache", torch.zeros(batch, HEADS, TMAX, DH))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.setitem:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
        else:
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class GptFast(Decoder):
    """gpt-fast's Transformer: `setup_caches(batch)` allocates the caches; forward(idx, input_pos)."""

    def __init__(self, setitem: bool = False):
        super().__init__()
        self.setitem = setitem
        self.register_buffer("causal_mask", torch.tril(torch.ones(TMAX, TMAX, dtype=torch.bool)))
        cos, sin = rope_tables(torch.arange(TMAX))
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.caches = None

    def setup_caches(self, batch: int):
        """As gpt-fast's: caches of this batch size are kept (the mask hides what an earlier loop left)."""
        if self.caches is None or self.caches[0].k_cache.shape[0] != batch:
            self.caches = nn.ModuleList(KVCache(batch, self.setitem) for _ in range(LAYERS))

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask[None, None, input_pos]
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        x = self.emb(idx)
        for blk, cache in zip(self.layers, self.caches):
            q, k, v = blk.qkv(x)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            k, v = cache.update(input_pos, k, v)
            if self.setitem:  # attention written out
                s = (q @ k.transpose(-1, -2)) / math.sqrt(DH)
                y = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = blk.finish(x, y)
        return self.logits(x)


def gpt_fast_loop(call, model, ids, steps=STEPS, sample=None):
    """gpt-fast's generate: setup_caches, prefill at arange(T), then one token at input_pos = [T + i]."""
    b, t = ids.shape
    model.setup_caches(b)
    out, logits = [], []
    x, pos = ids, torch.arange(t)
    for _ in range(steps):
        lg = call(x, pos)
        logits.append(lg[:, -1])
        x = pick(lg[:, -1], sample)
        out.append(x)
        pos = pos[-1:] + 1
    return torch.cat(out, 1), logits, [b for c in model.caches for b in c.buffers()]


def pick(last: torch.Tensor, sample=None) -> torch.Tensor:
    if sample is None:
        return last.argmax(-1, keepdim=True)
    return torch.multinomial(torch.softmax(last / 0.8, -1), 1, generator=sample)


# (2) nanoGPT: past (k, v) per layer passed in and returned, grown with torch.cat ---------------------------------


class NanoGpt(Decoder):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(TMAX, D)

    def forward(self, idx: torch.Tensor, past: tuple | None = None):
        t = idx.shape[1]
        start = 0 if past is None else past[0][0].shape[2]
        x = self.emb(idx) + self.pos(torch.arange(start, start + t, device=idx.device))
        presents = []
        for i, blk in enumerate(self.layers):
            q, k, v = blk.qkv(x)
            if past is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            presents.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
            x = blk.finish(x, y)
        return self.logits(x), tuple(presents)


def nanogpt_loop(call, model, ids, steps=STEPS):
    out, logits, past, x = [], [], None, ids
    for _ in range(steps):
        lg, past = call(x, past)
        logits.append(lg[:, -1])
        x = pick(lg[:, -1])
        out.append(x)
    return torch.cat(out, 1), logits, [t for kv in past for t in kv]


# (3) a list per layer, (4) a dict: the caller's container mutated in place -------------------------------------


class ListCache(Decoder):
    """forward(idx, cache): `cache` a list, empty at the prefill (appended to), then cache[i] = (cat, cat)."""

    def forward(self, idx: torch.Tensor, cache: list) -> torch.Tensor:
        t = idx.shape[1]
        start = cache[0][0].shape[2] if cache else 0
        cos, sin = rope_tables(torch.arange(start, start + t))
        x = self.emb(idx)
        for i, blk in enumerate(self.layers):
            q, k, v = blk.qkv(x)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if len(cache) <= i:
                cache.append((k, v))
            else:
                cache[i] = (torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2))
            k, v = cache[i]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            x = blk.finish(x, y)
        return self.logits(x)


class DictCache(Decoder):
    """forward(idx, cache): `cache` a dict of preallocated tensors and the filled length `cache["len"]` (an int),
    written in place and the length advanced."""

    def forward(self, idx: torch.Tensor, cache: dict) -> torch.Tensor:
        t, start = idx.shape[1], cache["len"]
        cos, sin = rope_tables(torch.arange(start, start + t))
        x = self.emb(idx)
        for i, blk in enumerate(self.layers):
            q, k, v = blk.qkv(x)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            cache[f"k{i}"][:, :, start:start + t] = k
            cache[f"v{i}"][:, :, start:start + t] = v
            k, v = cache[f"k{i}"][:, :, :start + t], cache[f"v{i}"][:, :, :start + t]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
            x = blk.finish(x, y)
        cache["len"] = start + t
        return self.logits(x)


def list_loop(call, model, ids, steps=STEPS):
    out, logits, cache, x = [], [], [], ids
    for _ in range(steps):
        lg = call(x, cache)
        logits.append(lg[:, -1])
        x = pick(lg[:, -1])
        out.append(x)
    return torch.cat(out, 1), logits, [t for kv in cache for t in kv] + [len(cache)]


def dict_loop(call, model, ids, steps=STEPS):
    b = ids.shape[0]
    cache = {"len": 0, **{f"{n}{i}": torch.zeros(b, HEADS, TMAX, DH) for i in range(LAYERS) for n in "kv"}}
    out, logits, x = [], [], ids
    for _ in range(steps):
        lg = call(x, cache)
        logits.append(lg[:, -1])
        x = pick(lg[:, -1])
        out.append(x)
    return torch.cat(out, 1), logits, [cache[k] for k in sorted(cache)]


# (5) preallocated caches as arguments at a position given as a Python int or a 0-d tensor; (6) rotary from it ----


class PosArg(Decoder):
    """forward(idx, k_caches, v_caches, pos): the caches a list of [B, H, TMAX, DH] tensors written in place;
    `pos` an int (slices) or a 0-d tensor (index_copy_ at pos + arange(T), a mask over TMAX), as the model is built
    for; PosArgAsks tells the two apart with isinstance(), which fxcc takes for a read of the int's type (the int
    stays a constant)."""

    def __init__(self, tensor_pos: bool = False):
        super().__init__()
        self.tensor_pos = tensor_pos

    def is_tensor(self, pos) -> bool:
        return self.tensor_pos

    def forward(self, idx, k_caches, v_caches, pos):
        t = idx.shape[1]
        tensor_pos = self.is_tensor(pos)
        positions = pos + torch.arange(t) if tensor_pos else torch.arange(pos, pos + t)
        cos, sin = rope_tables(positions)
        x = self.emb(idx)
        for blk, kc, vc in zip(self.layers, k_caches, v_caches):
            q, k, v = blk.qkv(x)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if tensor_pos:
                kc.index_copy_(2, positions, k)
                vc.index_copy_(2, positions, v)
                mask = torch.arange(TMAX)[None, :] <= positions[:, None]
                y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
            else:
                kc[:, :, pos:pos + t] = k
                vc[:, :, pos:pos + t] = v
                y = F.scaled_dot_product_attention(q, kc[:, :, :pos + t], vc[:, :, :pos + t], is_causal=t > 1)
            x = blk.finish(x, y)
        return self.logits(x)


class PosArgAsks(PosArg):
    def is_tensor(self, pos) -> bool:
        return isinstance(pos, torch.Tensor)


def pos_loop(as_tensor: bool):
    def loop(call, model, ids, steps=STEPS):
        b, t = ids.shape
        kc = [torch.zeros(b, HEADS, TMAX, DH) for _ in range(LAYERS)]
        vc = [torch.zeros(b, HEADS, TMAX, DH) for _ in range(LAYERS)]
        out, logits, x, pos = [], [], ids, 0
        for _ in range(steps):
            lg = call(x, kc, vc, torch.tensor(pos) if as_tensor else pos)
            logits.append(lg[:, -1])
            pos += x.shape[1]
            x = pick(lg[:, -1])
            out.append(x)
        return torch.cat(out, 1), logits, kc + vc
    return loop


# (7) llama reference: forward(tokens, start_pos: int), cache_k [max_bsz, TMAX, H, DH] sliced by start_pos ------


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class LlamaAttention(nn.Module):
    def __init__(self, max_batch: int):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.cache_k = torch.zeros(max_batch, TMAX, HEADS, DH)  # plain attributes, as the reference has them
        self.cache_v = torch.zeros(max_batch, TMAX, HEADS, DH)

    def forward(self, x, start_pos: int, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, HEADS, DH)
        xk = self.wk(x).view(bsz, seqlen, HEADS, DH)
        xv = self.wv(x).view(bsz, seqlen, HEADS, DH)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        self.cache_k = self.cache_k.to(xq)
        self.cache_v = self.cache_v.to(xq)
        self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        keys = self.cache_k[:bsz, :start_pos + seqlen].transpose(1, 2)
        values = self.cache_v[:bsz, :start_pos + seqlen].transpose(1, 2)
        xq = xq.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(DH)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)


class LlamaBlock(nn.Module):
    def __init__(self, max_batch: int):
        super().__init__()
        self.attention = LlamaAttention(max_batch)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(D, eps=1e-5), nn.RMSNorm(D, eps=1e-5)
        self.w1, self.w3 = nn.Linear(D, 4 * D, bias=False), nn.Linear(D, 4 * D, bias=False)
        self.w2 = nn.Linear(4 * D, D, bias=False)

    def forward(self, x, start_pos, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class LlamaRef(nn.Module):
    def __init__(self, max_batch: int = 4):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(LlamaBlock(max_batch) for _ in range(LAYERS))
        self.norm = nn.RMSNorm(D, eps=1e-5)
        self.output = nn.Linear(D, VOCAB, bias=False)
        self.freqs_cis = precompute_freqs_cis(DH, TMAX * 2)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int):
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        self.freqs_cis = self.freqs_cis.to(h.device)
        freqs_cis = self.freqs_cis[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def llama_loop(call, model, ids, steps=STEPS):
    """The reference's generate: tokens[:, prev_pos:cur_pos] at start_pos = prev_pos."""
    b, t = ids.shape
    tokens = torch.zeros(b, t + steps, dtype=torch.long)
    tokens[:, :t] = ids
    prev, logits = 0, []
    for cur in range(t, t + steps):
        lg = call(tokens[:, prev:cur], prev)
        logits.append(lg[:, -1])
        tokens[:, cur] = lg[:, -1].argmax(-1)
        prev = cur
    caches = [t for layer in model.layers for t in (layer.attention.cache_k, layer.attention.cache_v)]
    return tokens[:, t:], logits, caches


# (9) a decode step as a function of its weights ----------------------------------------------------------------


def step_fn(w: dict, idx, k_caches, v_caches, input_pos):
    """One forward of a GptFast-shaped model from a dict of its weights, caches written at input_pos."""
    x = F.embedding(idx, w["emb.weight"])
    b, t, _ = x.shape
    cos, sin = rope_tables(input_pos)
    mask = torch.arange(TMAX)[None, :] <= input_pos[:, None]
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = F.layer_norm(x, (D,), w[p + "n1.weight"], w[p + "n1.bias"])
        q, k, v = (y.view(b, t, HEADS, DH).transpose(1, 2) for y in (h @ w[p + "wqkv.weight"].t()).split(D, -1))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k_caches[i].index_copy_(2, input_pos, k)
        v_caches[i].index_copy_(2, input_pos, v)
        y = F.scaled_dot_product_attention(q, k_caches[i], v_caches[i], attn_mask=mask)
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, D), w[p + "wo.weight"])
        h = F.layer_norm(x, (D,), w[p + "n2.weight"], w[p + "n2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, w[p + "up.weight"], w[p + "up.bias"])), w[p + "down.weight"], w[p + "down.bias"])
    return F.linear(F.layer_norm(x, (D,), w["norm.weight"], w["norm.bias"]), w["head.weight"])


class StepFn(nn.Module):
    """Holds the weights; the program compiled is `step_fn` itself, called with them."""

    def __init__(self):
        super().__init__()
        self.d = Decoder()

    def weights(self) -> dict:
        return dict(self.d.named_parameters())


def step_fn_loop(call, model, ids, steps=STEPS):
    b, t = ids.shape
    w = model.weights()
    kc = [torch.zeros(b, HEADS, TMAX, DH) for _ in range(LAYERS)]
    vc = [torch.zeros(b, HEADS, TMAX, DH) for _ in range(LAYERS)]
    out, logits, x, pos = [], [], ids, torch.arange(t)
    for _ in range(steps):
        lg = call(w, x, kc, vc, pos)
        logits.append(lg[:, -1])
        x = pick(lg[:, -1])
        out.append(x)
        pos = pos[-1:] + 1
    return torch.cat(out, 1), logits, kc + vc


# (10) gpt-fast's decode_one_token: a function taking the model, sampling inside ---------------------------------


def decode_one_token(model, x, input_pos):
    logits = model(x, input_pos)[:, -1]
    probs = torch.softmax(logits / 0.8, -1)
    return torch.multinomial(probs, 1), logits


def sampled_loop(call, model, ids, steps=STEPS):
    """Prefill eagerly (as gpt-fast's prefill may be), then the compiled `decode_one_token` under one seed."""
    b, t = ids.shape
    model.setup_caches(b)
    torch.manual_seed(1234)
    lg = model(ids, torch.arange(t))[:, -1]
    x, pos = pick(lg), torch.tensor([t])
    out, logits = [x], [lg]
    for _ in range(steps - 1):
        x, lg = call(model, x, pos)
        out.append(x)
        logits.append(lg)
        pos = pos + 1
    return torch.cat(out, 1), logits, [b for c in model.caches for b in c.buffers()]


def sampled_module_loop(call, model, ids, steps=STEPS):
    """The gpt-fast loop with sampling (torch.multinomial on the global generator) between compiled forwards."""
    torch.manual_seed(99)
    return gpt_fast_loop(call, model, ids, steps, sample=torch.default_generator)


# ------------------------------------------------------------------------------------------------ the programs


@dataclass
class Program:
    """`build()` a fresh model (seeded); `loop(call, model, ids)` runs one decode loop with `call` (eager's model or
    the compiled one) and returns (tokens, per-step logits, the state the caller holds afterwards); `loops` the
    (prompt length, batch) of each loop; `how` how it is compiled: "fxcc" (fxcc.compile of the model), "function"
    (fxcc.compile of `fn`), "torch" / "torch-dynamic" (torch.compile(model, backend="fxcc"[, dynamic=True]))."""

    name: str
    build: Callable[[], nn.Module]
    loop: Callable
    loops: tuple[tuple[int, int], ...] = ((5, 2), (9, 2), (7, 2))
    how: str = "fxcc"
    fn: Callable | None = None


PROGRAMS = {p.name: p for p in [
    Program("gpt_fast_index_copy", GptFast, gpt_fast_loop, loops=((5, 2), (9, 2), (7, 3))),
    Program("gpt_fast_setitem", lambda: GptFast(setitem=True), gpt_fast_loop),
    Program("nanogpt_cat", NanoGpt, nanogpt_loop),
    Program("list_cache", ListCache, list_loop),
    Program("dict_cache", DictCache, dict_loop),
    Program("pos_int", PosArg, pos_loop(False)),
    Program("pos_int_isinstance", PosArgAsks, pos_loop(False)),
    Program("pos_tensor", lambda: PosArg(tensor_pos=True), pos_loop(True), loops=((5, 2), (9, 3))),
    Program("llama_ref", LlamaRef, llama_loop),
    Program("torch_gpt_fast", GptFast, gpt_fast_loop, how="torch"),
    Program("torch_gpt_fast_dynamic", GptFast, gpt_fast_loop, how="torch-dynamic"),
    Program("torch_llama_ref", LlamaRef, llama_loop, how="torch"),
    Program("torch_llama_ref_dynamic", LlamaRef, llama_loop, how="torch-dynamic"),
    Program("step_fn_weights", StepFn, step_fn_loop, how="function", fn=step_fn),
    Program("sample_multinomial", GptFast, sampled_module_loop),
    Program("decode_one_token_fn", GptFast, sampled_loop, how="function", fn=decode_one_token),
]}

# ------------------------------------------------------------------------------------------------ the check


@dataclass
class Result:
    name: str
    outcome: str = "equal"
    compiles: list[int] = field(default_factory=list)  # the program's new compiles in each loop
    segments: list[int] = field(default_factory=list)  # its DyCL segments' in each loop
    detail: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


class _Count(logging.Handler):
    """fxcc's compiles, from its "compiling NAME: ..." and "recompiling NAME: ..." records: `top` those of the
    program (torch.compile's path: one CompiledModule per graph dynamo hands over), `all` with those of its DyCL
    segments (NAME.segN)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.top = self.all = 0

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(("compiling ", "recompiling ")) and ":" in msg:
            self.all += 1
            self.top += ".seg" not in msg.split(":")[0]


def _prompt(length: int, batch: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length * 7 + batch))


def _close(a, b) -> str:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs eager {type(b).__name__}"
    if not isinstance(a, torch.Tensor):
        return "" if a == b else f"{a!r} vs eager {b!r}"
    try:
        torch.testing.assert_close(a, b)
    except AssertionError as e:
        return str(e).replace("\n", " ")[:240]
    return ""


# kernels as extern calls and no kernel timing: the probe checks capture, guards, variants and state, in minutes
FAST = "canonicalize,raise,fuse,codegen{backend=extern}"


def run(p: Program, passes: str | None = FAST, loops: tuple | None = None) -> Result:
    """Eager and fxcc loop by loop; the first difference is the outcome."""
    import fxcc
    from fxcc.logs import topic_logger

    t0 = time.perf_counter()
    res = Result(p.name)
    torch.manual_seed(0)
    eager = p.build().eval()
    mine = copy.deepcopy(eager)
    opts = dict(time_vs_eager=False, check_eager=False, **({"passes": passes} if passes != "default" else {}))
    counter = _Count()
    logs = [logging.getLogger("fxcc.runtime"), topic_logger("recompiles")]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.addHandler(counter)
        lg.setLevel(logging.INFO)
    torch._dynamo.reset()
    kind, compiled = "ok", None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if p.how == "function":
                compiled = fxcc.compile(p.fn, options=opts)
            elif p.how.startswith("torch"):
                compiled = torch.compile(mine, backend="fxcc", dynamic=True if p.how == "torch-dynamic" else None,
                                         options=opts)
            else:
                compiled = fxcc.compile(mine, options=opts)
            eager_call = p.fn if p.how == "function" else eager
            for i, (length, batch) in enumerate(loops or p.loops):
                ids = _prompt(length, batch)
                torch.manual_seed(i)
                with torch.no_grad():
                    want = p.loop(eager_call if p.how != "function" else (lambda *a: p.fn(*a)), eager, ids)
                top, every, steps = counter.top, counter.all, []

                def counted(*a, _seen=steps, **k):
                    _seen.append(counter.all)
                    return compiled(*a, **k)

                torch.manual_seed(i)
                try:
                    with torch.no_grad():
                        got = p.loop(counted, mine, ids)
                except Exception as e:  # noqa: BLE001 - fxcc raising where eager did not is an outcome
                    kind = "crash"
                    res.detail = f"loop {i + 1} (prompt {length}, batch {batch}): {type(e).__name__}: " \
                        f"{str(e).splitlines()[0][:240] if str(e) else ''}\n" + traceback.format_exc(limit=-6)
                    break
                res.compiles.append(counter.top - top)
                res.segments.append(counter.all - every - res.compiles[-1])
                late = counter.all - steps[len(steps) // 2]  # compiles in the loop's second half: one per token
                where = f"loop {i + 1} (prompt {length}, batch {batch})"
                if not torch.equal(got[0], want[0]):
                    kind, res.detail = "mismatch", f"{where}: tokens {got[0].tolist()} vs eager {want[0].tolist()}"
                    break
                bad = next((f"step {s} logits: {m}" for s, (a, b) in enumerate(zip(got[1], want[1]))
                            if (m := _close(a, b))), "")
                bad = bad or next((f"caller's state {j}: {m}" for j, (a, b) in enumerate(zip(got[2], want[2]))
                                   if (m := _close(a, b))), "")
                bad = bad or next((f"module state {n}: {m}" for (n, a), (_, b) in
                                   zip(mine.state_dict().items(), eager.state_dict().items()) if (m := _close(a, b))), "")
                if bad:
                    kind, res.detail = "mismatch", f"{where}: {bad}"
                    break
                # prefill and decode step; then the prefill at a new length, its length symbolic (export keeps a
                # decode step's length 1 static, so the first prefill's variant is static, as under torch.compile's
                # automatic dynamic), or a new batch size; then nothing
                allowed = 2 if i == 0 else 1 if i == 1 or batch != (loops or p.loops)[i - 1][1] else 0
                if late and kind in ("ok", "extra"):
                    kind, res.detail = "recompiles", f"{where}: {late} compiles in the loop's last " \
                        f"{len(steps) - len(steps) // 2} steps (a compile per token)"
                elif res.compiles[-1] > allowed and kind == "ok":
                    kind, res.detail = "extra", f"{where}: {res.compiles[-1]} compiles (at most {allowed})"
    finally:
        for lg, level in zip(logs, levels):
            lg.removeHandler(counter)
            lg.setLevel(level)
    res.warnings = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught
                                      if "fxcc" in str(w.message)[:200]))
    cm = getattr(compiled, "fxcc", compiled)
    eager_calls = getattr(getattr(cm, "stats", None), "eager_calls", 0)
    eager_warned = any("eager" in w for w in res.warnings)
    if kind in ("ok", "recompiles", "extra") and (eager_calls or eager_warned):
        if kind == "ok":
            res.detail = "; ".join(res.warnings)[:300] or f"{eager_calls} eager calls without a warning"
        kind = "eager-fallback" if eager_warned else "SILENT-EAGER"
    elif kind == "ok" and res.warnings:
        res.detail = "warned: " + "; ".join(res.warnings)[:300]
    res.outcome = {"ok": "equal", "crash": "CRASH", "mismatch": "MISMATCH", "recompiles": "RECOMPILES",
                   "extra": "EXTRA-COMPILES"}.get(kind, kind)
    res.seconds = time.perf_counter() - t0
    return res


def _counts(r: Result) -> str:
    return ("+".join(map(str, r.compiles)) or "-") + (f" (seg {'+'.join(map(str, r.segments))})" if any(r.segments) else "")


def table(results: list[Result], verbose: bool = False) -> str:
    rows = [f"{'program':26} {'outcome':15} {'compiles':>18} {'s':>6}  detail"]
    for r in results:
        detail = r.detail if verbose else r.detail.splitlines()[0][:110] if r.detail else ""
        rows.append(f"{r.name:26} {r.outcome:15} {_counts(r):>18} {r.seconds:6.1f}  {detail}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    rows.append(f"{len(results)} programs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(rows)


GOOD = ("equal", "eager-fallback")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated program names (default: all)")
    ap.add_argument("--passes", default=FAST, help=f"a pipeline string, or 'default' (default: {FAST})")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    return probe_main(
        ap, a, PROGRAMS, lambda prog: [run(prog, a.passes)],
        lambda r: f"{r.name:26} {r.outcome:15} {_counts(r):>18} {r.seconds:6.1f}s  "
                  f"{r.detail.splitlines()[0][:160] if r.detail else ''}",
        table, lambda r: r.outcome in GOOD)


if __name__ == "__main__":
    sys.exit(main())
