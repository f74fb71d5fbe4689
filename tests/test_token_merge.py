"""token-merge: ToMe bipartite merging and temporal (TDTM) merging, by their IR and against plain-torch references.

Tiny BertConfig models with random weights (hidden 32, 2 layers); the reference below re-implements BERT's
encoder with the same merging rules in plain torch, one sentence at a time, so the differential tests
compare the pass with an independent implementation, not with its own ops.
"""

from __future__ import annotations

import math
import re

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fxcc.capture import capture
from fxcc.dialects import kernel_body, tome_bias, tome_match
from fxcc.ir import print_graph
from fxcc.pipeline import PassContext, PassManager, PipelineError, parse_pipeline

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 2, 100


def bert(layers: int = LAYERS) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                  num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return transformers.BertModel(cfg).eval()


def batch(seq: int = 12, real: tuple[int, ...] = (12, 7)) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask: sentence i has real[i] tokens, the rest is padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(real), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(real)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def run_passes(model: nn.Module, kwargs: dict, pipeline: str):
    cap = capture(model, (), kwargs)
    gm = cap.gm
    ctx = PassContext(module=model, example_inputs=tuple(kwargs.values()))
    pm = PassManager(parse_pipeline(pipeline), verify_each=True)
    return pm.run(gm, ctx), pm


# ------------------------------------------------------------------- reference: ToMe on BERT, plain torch


def ref_plan(keys: torch.Tensor, w: torch.Tensor, r: int) -> list[int]:
    """One sentence: keys [H, T, Dh], weights [T] -> each token's index among the T - r merged tokens."""
    m = keys.mean(0)
    m = m / m.norm(dim=-1, keepdim=True)
    t = m.shape[0]
    a_side, b_side = list(range(0, t, 2)), list(range(1, t, 2))
    edges = []
    for i in a_side:
        best, partner = None, None
        for j in b_side:
            if w[i] > 0 and w[j] > 0:
                s = float(m[i] @ m[j])
            else:
                s = 2.0 if (w[i] == 0 and w[j] == 0) else -3.0
            if best is None or s > best:
                best, partner = s, j
        edges.append((-math.inf if i == 0 else best, i, partner))
    chosen = sorted(edges, key=lambda e: -e[0])[:r]  # stable: ties keep token order
    into = {i: j for _, i, j in chosen}
    survivors = [k for k in range(t) if k not in into]
    index = {k: n for n, k in enumerate(survivors)}
    return [index[into.get(k, k)] for k in range(t)]


def ref_merge(x: torch.Tensor, w: torch.Tensor, dest: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted averages of one sentence's tokens x [T, D] by destination; padding weighs 0."""
    out, sizes = torch.zeros(n, x.shape[-1]), torch.zeros(n)
    for k, d in enumerate(dest):
        out[d] += w[k] * x[k]
        sizes[d] += w[k]
    return torch.where(sizes[:, None] > 0, out / sizes.clamp_min(1e-30)[:, None], 0.0), sizes


def ref_bert_tome(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, r: int):
    """BertModel's forward with ToMe after each attention residual add, proportional attention, unmerge."""
    h = model.embeddings(input_ids=input_ids)
    bsz, t0, d = h.shape
    w = attention_mask.float()
    pos = torch.arange(t0).expand(bsz, t0).clone()
    for layer in model.encoder.layer:
        att = layer.attention
        t = h.shape[1]

        def heads(lin, h=h, t=t):
            return lin(h).view(bsz, t, HEADS, d // HEADS).transpose(1, 2)

        q, k, v = heads(att.self.query), heads(att.self.key), heads(att.self.value)
        bias = torch.where(w > 0, w.clamp_min(1).log(), torch.finfo(torch.float32).min)[:, None, None, :]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(bsz, t, d)
        x = att.output.dense(ctx) + h
        rr = min(r, (t + 1) // 2 - 1)
        xs, ws, new_pos = [], [], []
        for b in range(bsz):
            dest = ref_plan(k[b], w[b], rr)
            xm, wm = ref_merge(x[b], w[b], dest, t - rr)
            xs.append(xm)
            ws.append(wm)
            new_pos.append(torch.tensor(dest)[pos[b]])
        x, w, pos = torch.stack(xs), torch.stack(ws), torch.stack(new_pos)
        a = att.output.LayerNorm(x)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    last = torch.stack([h[b, pos[b]] for b in range(bsz)])
    return last, model.pooler(last)


# ------------------------------------------------------------------------------------------ golden IR


def test_golden_ir_shows_merges_and_shrinking_tokens(golden):
    model, kwargs = bert(), batch(seq=8, real=(8, 5))
    gm, pm = run_passes(model, kwargs, "canonicalize,token-merge{r=2}")
    text = print_graph(gm)
    golden("token_merge_bert.mlir", text)
    assert text.count("tx.tome_match(") == 2 and text.count("tx.tome_merge(") == 2
    assert text.count("tx.tome_bias(") == 1 and text.count("tx.tome_unmerge(") == 1
    # 8 tokens -> 6 after block 0 -> 4 after block 1, then unmerged back to 8 for the output
    assert "-> tensor<2x6x32xf32>" in text and "-> tensor<2x4x32xf32>" in text
    assert re.search(r"tx\.tome_unmerge\(.*-> tensor<2x8x32xf32>", text)
    assert pm.records[1].result.stats == {"merged_blocks": 2, "tokens_merged": 4, "tokens_final": 4}


def test_r0_is_exact_and_a_no_op():
    model, kwargs = bert(), batch()
    gm, pm = run_passes(model, kwargs, "canonicalize,token-merge{r=0}")
    assert not pm.records[1].result.changed and "tome" not in print_graph(gm)
    with torch.no_grad():
        ref = model(**kwargs)
        got = fxcc.compile(model, passes="canonicalize,token-merge{r=0},raise,fuse")(**kwargs)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_pass_is_marked_approximate_and_options_are_checked():
    (p,) = parse_pipeline("token-merge{r=3}")
    assert p.exact is False and p.spec() == "token-merge{r=3}"
    with pytest.raises(PipelineError, match="r applies to mode=bipartite"):
        parse_pipeline("token-merge{mode=temporal,r=2}")
    with pytest.raises(PipelineError, match="cannot be negative"):
        parse_pipeline("token-merge{r=-1}")


# ------------------------------------------------------------------------------- end to end, reference


@pytest.mark.parametrize("r, rest", [(4, ",raise,fuse,codegen"), (5, "")])
def test_compiled_bert_matches_plain_torch_reference(r, rest):
    """Through the whole pipeline (r=4; codegen builds are the slow part of this file) and the pass alone."""
    model, kwargs = bert(), batch(seq=12, real=(12, 7))
    cm = fxcc.compile(model, passes=f"canonicalize,token-merge{{r={r}}}{rest}")
    with torch.no_grad():
        got = cm(**kwargs)
        last, pooled = ref_bert_tome(model, kwargs["input_ids"], kwargs["attention_mask"], r)
        exact = model(**kwargs)
    assert got.last_hidden_state.shape == exact.last_hidden_state.shape  # unmerge restores T
    torch.testing.assert_close(got.last_hidden_state, last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, pooled, atol=1e-4, rtol=1e-4)
    assert (got.last_hidden_state - exact.last_hidden_state).abs().max() > 1e-3  # it did approximate
    if rest:  # after fuse every merge op runs as an extern kernel, none as an eager region
        top = [n for n in cm.variants[-1].gm.graph.nodes if n.op == "call_function"]
        assert not any("tome" in str(n.target) for n in top)
        bodies = [kernel_body(n.args[1]) for n in top if n.target is torch.ops.fxcc_kernel.extern.default]
        inside = {str(m.target) for kb in bodies for m in kb.body.graph.nodes if "tome" in str(m.target)}
        assert {f"fxcc_tx.tome_{op}.default" for op in ("match", "merge", "unmerge", "bias")} <= inside


def test_unmerge_gives_merged_tokens_one_value():
    model, kwargs = bert(), batch(seq=12, real=(12, 12))
    with torch.no_grad():
        out = fxcc.compile(model, passes="canonicalize,token-merge{r=3}")(**kwargs).last_hidden_state
    assert out.shape == (2, 12, HIDDEN)
    for b in range(2):  # 12 -> 9 -> 6 tokens: six distinct rows, each original token has one of them
        assert len(torch.unique(out[b], dim=0)) == 6


# ----------------------------------------------------------------------------------------- mask safety


def test_matching_never_groups_padding_with_real_tokens():
    torch.manual_seed(0)
    keys = torch.randn(3, 4, 16, 8)
    weights = torch.ones(3, 16)
    weights[1, 9:] = 0
    weights[2, 4:] = 0
    for r in (1, 4, 7):
        dest = tome_match(keys, weights, r, True)
        for b in range(3):
            assert dest[b].max() == 16 - r - 1 and len(dest[b].unique()) == 16 - r
            assert dest[b, 0] == 0  # the first token stays alone, first
            assert (dest[b] == 0).sum() == 1
            real = weights[b] > 0
            assert not set(dest[b, real].tolist()) & set(dest[b, ~real].tolist()), (b, r)


def test_padding_content_never_reaches_real_tokens():
    model = bert()
    kwargs = batch(seq=16, real=(16, 6))
    other = {k: v.clone() for k, v in kwargs.items()}
    other["input_ids"][1, 6:] = torch.arange(10) + 3  # different padding content, same mask
    cm = fxcc.compile(model, passes="canonicalize,token-merge{r=6},raise,fuse")
    with torch.no_grad():
        a = cm(**kwargs).last_hidden_state
        b = cm(**other).last_hidden_state
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1, :6], b[1, :6], atol=1e-6, rtol=1e-6)


def test_forced_real_padding_pairs_keep_real_values():
    """r larger than the real/real and padded/padded pairs: a padded token joins a real one with weight 0."""
    from fxcc.dialects import tome_merge, tome_sizes

    torch.manual_seed(0)
    x, keys = torch.randn(2, 6, 4), torch.randn(2, 2, 6, 8)
    # sentence 0: real A tokens, padded B tokens (real moves into padding); sentence 1: the other way round
    weights = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    dest = tome_match(keys, weights, 2, True)
    merged, sizes = tome_merge(x, weights, dest, 4), tome_sizes(weights, dest, 4)
    for b in range(2):
        assert len(dest[b].unique()) == 4
        for g in range(4):  # each merged token: the mean of its real members only, sized by their count
            real = (dest[b] == g) & (weights[b] > 0)
            assert sizes[b, g] == real.sum()
            if real.any():
                torch.testing.assert_close(merged[b, g], x[b, real].mean(0))
    assert sizes.sum(1).tolist() == weights.sum(1).tolist()


# ------------------------------------------------------------------------------ proportional attention


def test_proportional_attention_equals_attention_over_duplicates():
    """Two identical tokens merged into one of size 2: log(2) on its score gives back the duplicated result."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 3, 8)
    k = torch.randn(1, 1, 3, 8)
    v = torch.randn(1, 1, 3, 8)
    k_dup = torch.cat([k[:, :, :1], k[:, :, :1], k[:, :, 1:]], dim=2)  # token 0 twice
    v_dup = torch.cat([v[:, :, :1], v[:, :, :1], v[:, :, 1:]], dim=2)
    full = F.scaled_dot_product_attention(q, k_dup, v_dup)
    bias = tome_bias(torch.tensor([[2.0, 1.0, 1.0]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([math.log(2), 0.0, 0.0]))
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(merged, full)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert (plain - full).abs().max() > 1e-3  # without the size term the merged token is under-weighted
    padded = tome_bias(torch.tensor([[2.0, 0.0, 1.0]]), torch.float32)
    assert padded[0, 0, 0, 1] == torch.finfo(torch.float32).min


# ---------------------------------------------------------------------------------------- temporal mode


class Block(nn.Module):
    """A pre-norm transformer block over all frame x patch tokens of x [B, F, N, D]."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, n, d = x.shape
        h = self.ln1(x).reshape(b, f * n, d)
        q, k, v = self.qkv(h).view(b, f * n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class Video(nn.Module):
    def __init__(self, depth: int = 3, flat: bool = False):
        super().__init__()
        self.flat = flat
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(16, 4)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, f, n, d = video.shape
        x = video.reshape(b, f * n, d) if self.flat else video
        for blk in self.blocks:
            x = blk(x.reshape(b, f, n, d)).reshape(x.shape)
        return self.head(x)


def _tdtm_reference(model: Video, video: torch.Tensor, blocks: int) -> torch.Tensor:
    b, f, n, d = video.shape
    x = video.view(b, f // 2, 2, n, d).mean(2)
    for i, blk in enumerate(model.blocks):
        if i == blocks:
            x = x.repeat_interleave(2, dim=1)
        x = blk(x)
    if blocks >= len(model.blocks):
        x = x.repeat_interleave(2, dim=1)
    return model.head(x if not model.flat else x.reshape(b, f * n, d))


@pytest.mark.parametrize("flat, blocks, rest", [(False, 0, ",raise,fuse,codegen{backend=extern}"), (False, 2, ""), (True, 0, "")])
def test_temporal_merge_matches_reference(flat, blocks, rest):
    torch.manual_seed(0)
    model = Video(flat=flat).eval()
    video = torch.randn(2, 6, 5, 16)
    spec = "token-merge{mode=temporal" + (",frames=6" if flat else "") + (f",blocks={blocks}" if blocks else "") + "}"
    gm, _ = run_passes(model, {"video": video}, f"canonicalize,{spec}")
    text = print_graph(gm)
    assert text.count("tx.temporal_merge(") == 1 and text.count("tx.temporal_unmerge(") == 1
    assert "tensor<2x3x5x16xf32>" in text or "tensor<2x15x16xf32>" in text  # 6 frames -> 3
    with torch.no_grad():
        got = fxcc.compile(model, passes=f"canonicalize,{spec}{rest}")(video)
        ref = _tdtm_reference(model, video, blocks or len(model.blocks))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - model(video)).abs().max() > 1e-4


def test_temporal_merge_of_repeated_frames_is_exact_for_pointwise_work():
    """Frames that come in identical pairs average to themselves: the merge/unmerge round trip is lossless."""
    from fxcc.dialects import temporal_merge, temporal_unmerge

    x = torch.randn(2, 3, 5, 16).repeat_interleave(2, dim=1)
    torch.testing.assert_close(temporal_unmerge(temporal_merge(x, 1, 0), 1, 0), x)
    flat = x.reshape(2, 30, 16)
    torch.testing.assert_close(temporal_unmerge(temporal_merge(flat, 1, 6), 1, 6), flat)


# ------------------------------------------------------------------------------------------------ errors


def test_error_names_what_to_do_without_sdpa():
    model = bert()
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        run_passes(model, batch(), "canonicalize,token-merge{r=2}")


def test_odd_frame_count_is_refused():
    model = Video(depth=1).eval()
    with pytest.raises(ValueError, match="even frame count"):
        run_passes(model, {"video": torch.randn(1, 5, 4, 16)}, "canonicalize,token-merge{mode=temporal}")


# ------------------------------------------------------------------------------ speedup option, backoff


def test_speedup_option_picks_the_smallest_r_that_reaches_it():
    from fxcc.passes.token_merge import estimated_speedup

    model, kwargs = bert(), batch(seq=16, real=(16, 16))
    _, pm = run_passes(model, kwargs, "canonicalize,token-merge{speedup=1.3}")
    r = pm.records[1].result.stats["r"]
    assert estimated_speedup(r, 16, HIDDEN, LAYERS) >= 1.3 > estimated_speedup(r - 1, 16, HIDDEN, LAYERS)
    assert estimated_speedup(0, 16, HIDDEN, LAYERS) == 1.0
    with pytest.raises(PipelineError, match="either r or a speedup"):
        parse_pipeline("token-merge{r=2,speedup=1.5}")


def test_backoff_weakens_until_nothing_is_left():
    from fxcc.pipeline import PassResult

    (p,) = parse_pipeline("token-merge{r=8}")
    assert p.backoff(PassResult(True)).spec() == "token-merge{r=4}"
    assert parse_pipeline("token-merge{r=1}")[0].backoff(PassResult(True)) is None
    (s,) = parse_pipeline("token-merge{speedup=1.5}")
    assert s.backoff(PassResult(True, {"r": 6})).spec() == "token-merge{r=3}"
    (t,) = parse_pipeline("token-merge{mode=temporal}")
    assert t.backoff(PassResult(True, {"merged_blocks": 3})).spec() == "token-merge{mode=temporal,blocks=2}"
    assert t.backoff(PassResult(True, {"merged_blocks": 1})) is None


# -------------------------------------------------------------------------------- other architectures


def test_pre_norm_vit_merges_and_keeps_its_outputs_shape():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                                 image_size=32, patch_size=8)
    model, pixels = transformers.ViTModel(cfg).eval(), torch.randn(2, 3, 32, 32)
    gm, pm = run_passes(model, {"pixel_values": pixels}, "canonicalize,token-merge{r=3}")
    assert pm.records[1].result.stats["tokens_final"] == 17 - 2 * 3  # CLS + 16 patches
    with torch.no_grad():
        exact, got = model(pixels), fxcc.compile(model, passes="canonicalize,token-merge{r=3}")(pixels)
    assert got.last_hidden_state.shape == exact.last_hidden_state.shape
    assert F.cosine_similarity(got.pooler_output, exact.pooler_output).min() > 0.9


def test_decoder_with_a_causal_mask_is_refused():
    g = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=HEADS,
                                                       n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    cm = fxcc.compile(g, passes="canonicalize,token-merge{r=2}")
    with pytest.raises(ValueError, match="causal"):
        cm(torch.randint(0, VOCAB, (1, 8)))


def test_quality_budget_backs_r_off_then_refuses():
    """compile(quality_budget=...) weakens token-merge through its backoff (r=4, 2, 1), then refuses."""
    from fxcc.quality import QualityBudgetError

    model, kwargs = bert(layers=1), batch(seq=8, real=(8, 8))
    with pytest.raises(QualityBudgetError, match=r"token-merge\{r=1\}"):  # tried r=4, 2, 1
        fxcc.compile(model, passes="canonicalize,token-merge{r=4}", quality_budget=1e-9)(**kwargs)
