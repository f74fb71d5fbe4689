"""layer-skip (Unified Layer Skipping) and compile(quality_budget=...): IR, choice of blocks, errors, cached
decode against a layer-deleted reference, and backing off under a quality budget.

Set FXCC_UPDATE_GOLDEN=1 to rewrite tests/golden/layer_skip_*.mlir.
"""

from __future__ import annotations

import copy
import math

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from fxcc.capture import capture
from fxcc.ir import print_graph
from fxcc.passes.layer_skip import LayerSkipError, balanced_choice, blocks_for_speedup
from fxcc.pipeline import PassContext, PassManager, PipelineError, parse_pipeline
from fxcc.quality import QualityBudgetError, quality_loss

transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Stack(nn.Module):
    """Linear in, `n` residual blocks, linear out: the smallest model with repeated blocks."""

    def __init__(self, n: int = 5, d: int = 4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def without_blocks(model: Stack, drop: list[int]) -> Stack:
    ref = copy.deepcopy(model)
    ref.blocks = nn.ModuleList(b for i, b in enumerate(ref.blocks) if i not in drop)
    return ref


def run_passes(model: nn.Module, pipeline: str, *args):
    cap = capture(model, args, {})
    pm = PassManager(parse_pipeline(pipeline))
    gm = pm.run(cap.gm, PassContext(module=model, example_inputs=(args, {})))
    return gm, pm.records


# ------------------------------------------------------------------------------------------ choice


@pytest.mark.parametrize("n, k, expected", [
    (12, 3, [3, 6, 8]), (6, 1, [3]), (6, 2, [2, 3]), (6, 4, [1, 2, 3, 4]), (5, 2, [1, 3]), (12, 0, []),
])
def test_balanced_choice(n, k, expected):
    assert balanced_choice(n, k) == expected


def test_balanced_choice_never_first_or_last_and_evenly_spaced():
    for n in range(3, 40):
        for k in range(n - 1):
            got = balanced_choice(n, k)
            assert got == sorted(set(got)) and len(got) == k
            assert all(1 <= i <= n - 2 for i in got)
            step = (n - 1) / (k + 1)  # the kept first and last blocks and the removed ones: equal spacing, rounded
            gaps = {b - a for a, b in zip([0, *got], [*got, n - 1])}
            assert gaps <= {math.floor(step), math.ceil(step)}, (n, k, got)


def test_balanced_choice_rejects_first_and_last():
    with pytest.raises(LayerSkipError, match="between 0 and 4"):
        balanced_choice(6, 5)


@pytest.mark.parametrize("speedup, n, share, expected", [
    (1.5, 6, 1.0, 2),     # 1 / (1 - 2/6) = 1.5 exactly
    (1.25, 6, 1.0, 1),    # 1.2 (4% off) beats 1.5 (20% off)
    (2.0, 12, 0.9, 7),    # per block 0.075: 7 -> 2.105x (5% off), 6 -> 1.818x (9% off)
    (10.0, 6, 1.0, 4),    # capped at n - 2
    (1.0, 6, 1.0, 0),
    (1.05, 6, 1.0, 0),    # 1.0 (4.8% off) beats 1.2 (14% off)
])
def test_blocks_for_speedup(speedup, n, share, expected):
    assert blocks_for_speedup(speedup, n, share) == expected


# ------------------------------------------------------------------------------------- IR and runs


def test_golden_ir_shows_removed_blocks(golden):
    torch.manual_seed(0)
    model = Stack(5).eval()
    x = torch.randn(2, 4)
    gm, records = run_passes(model, "canonicalize,layer-skip{skip=2}", x)
    assert records[-1].result.stats == {"skipped": 2, "blocks": 5, "skipped.blocks.1": 1, "skipped.blocks.3": 1}
    text = print_graph(gm)
    golden("layer_skip_blocks.mlir", text)
    assert "blocks.1." not in text and "blocks.3." not in text and "blocks.2.fc.weight" in text
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], without_blocks(model, [1, 3])(x))


def test_compiled_stack_equals_model_without_those_blocks():
    torch.manual_seed(0)
    model = Stack(6, d=16).eval()
    x = torch.randn(3, 16)
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=3},raise,fuse,codegen")
    assert_outputs_close(cm(x), without_blocks(model, balanced_choice(6, 3))(x).detach())


def test_skip_zero_is_exact_and_a_no_op():
    torch.manual_seed(0)
    model = Stack(5).eval()
    x = torch.randn(2, 4)
    gm0, _ = run_passes(model, "canonicalize", x)
    gm, records = run_passes(model, "canonicalize,layer-skip{skip=0}", x)
    assert records[-1].result.changed is False
    assert print_graph(gm) == print_graph(gm0)
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=0},raise,fuse,codegen")
    assert_outputs_close(cm(x), model(x).detach())


def test_speedup_picks_blocks_from_flop_share():
    torch.manual_seed(0)
    model = Stack(6, d=16).eval()
    x = torch.randn(2, 16)
    # FLOPs per row of 16: each linear 2*16*16 = 512, relu and add 16 each -> a block 544, in + out 1024:
    # block share 6*544 / (6*544 + 1024) = 0.761, per block 0.127; 3 blocks -> 1.61x (7% off 1.5x),
    # 2 blocks -> 1.34x (11% off)
    _, records = run_passes(model, "canonicalize,layer-skip{speedup=1.5}", x)
    assert records[-1].result.stats["skipped"] == 3
    removed = [k for k in records[-1].result.stats if k.startswith("skipped.")]
    assert removed == ["skipped.blocks.1", "skipped.blocks.3", "skipped.blocks.4"]


# ------------------------------------------------------------------------------------------ errors


def test_needs_exactly_one_option():
    with pytest.raises(PipelineError, match="exactly one of speedup"):
        parse_pipeline("layer-skip{speedup=1.5,skip=2}")
    with pytest.raises(PipelineError, match="exactly one of speedup"):
        parse_pipeline("layer-skip")
    with pytest.raises(PipelineError, match="speedup must be >= 1.0"):
        parse_pipeline("layer-skip{speedup=0.5}")


def test_skip_too_many_names_the_model_and_the_limit():
    model = Stack(6).eval()
    with pytest.raises(LayerSkipError, match=r"Stack has 6 blocks \(blocks.0-5\).*at most 4"):
        run_passes(model, "layer-skip{skip=5}", torch.randn(2, 4))


def test_no_repeated_blocks_names_the_model():
    with pytest.raises(LayerSkipError, match="no repeated blocks in MLP"):
        run_passes(MLP().eval(), "canonicalize,layer-skip{skip=1}", torch.randn(2, 4))


class NormBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_after_raise_is_refused_with_where_to_put_it():
    model = Stack(4).eval()
    model.blocks = nn.ModuleList(NormBlock(4) for _ in range(4))  # layer norms raise to tx.layer_norm
    with pytest.raises(LayerSkipError, match=r"found 4 tx and 0 kernel ops\); put it before `raise`"):
        run_passes(model, "canonicalize,raise,layer-skip{skip=1}", torch.randn(2, 4))


# ------------------------------------------------------------------------------- transformers models


def bert(layers: int) -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32))


def gpt2(layers: int) -> nn.Module:
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("make, where", [(bert, "encoder.layer"), (gpt2, "h")], ids=["bert", "gpt2"])
def test_finds_blocks_of_encoders_and_decoders(make, where):
    torch.manual_seed(0)
    model = make(4).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm, records = run_passes(model, "canonicalize,layer-skip{skip=1}", ids)
    assert records[-1].result.stats == {"skipped": 1, "blocks": 4, f"skipped.{where}.2": 1}
    ref = copy.deepcopy(model)
    parent = ref.get_submodule(where.rpartition(".")[0]) if "." in where else ref
    name = where.rpartition(".")[2]
    setattr(parent, name, nn.ModuleList(b for i, b in enumerate(getattr(parent, name)) if i != 2))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids)[0], ref(ids, use_cache=False).last_hidden_state)


# ------------------------------------------------------------------------------- decoder, KV cache


def llama(layers: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).eval()


def llama_without(model: nn.Module, drop: list[int]) -> nn.Module:
    """The eager reference: a copy of the HF model with those decoder layers deleted (cache indices renumbered)."""
    ref = copy.deepcopy(model)
    keep = [i for i in range(len(ref.layers)) if i not in drop]
    ref.layers = nn.ModuleList(ref.layers[i] for i in keep)
    for j, layer in enumerate(ref.layers):
        layer.self_attn.layer_idx = j
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


def test_cached_decode_matches_layer_deleted_model():
    model = llama(6)
    drop = balanced_choice(6, 2)
    assert drop == [2, 3]
    ref = llama_without(model, drop)
    # through `raise` only: kernels and codegen of skipped graphs are covered by the Stack tests, and four
    # decoder compiles with codegen would take minutes on CI
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=2},raise")
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        want, got = ref(ids, use_cache=True), cm(ids, use_cache=True)
        for step in range(2):  # prefill, then two decode steps on the compiled model's own cache
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, s=step: f"decode step {s}: {m}")
            # every layer's cache grows, the skipped ones too (their K/V of the hidden state reaching them)
            assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == [5 + step] * 6
            nxt = torch.randint(0, 100, (2, 1))
            want = ref(nxt, past_key_values=want.past_key_values, use_cache=True)
            got = cm(nxt, past_key_values=got.past_key_values, use_cache=True)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert all("skipped.layers.2" in v.records[1].result.stats for v in cm.variants)


# ----------------------------------------------------------------------------------- quality budget


@pytest.fixture(scope="module")
def budget_case():
    """A 6-block Stack, its input, and the loss of skipping 1, 2, 3 blocks, from block-deleted references."""
    torch.manual_seed(0)
    model = Stack(6, d=16).eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = {k: quality_loss(model(x), without_blocks(model, balanced_choice(6, k))(x)) for k in (1, 2, 3)}
    assert 0 < losses[1] < losses[2], losses  # the fixture must make backing off matter
    return model, x, losses


def test_quality_budget_backs_off_until_within_budget(budget_case):
    model, x, losses = budget_case
    budget = (losses[1] + min(losses[2], losses[3])) / 2
    expected = next(k for k in (3, 2, 1) if losses[k] <= budget)
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=3},raise,fuse,codegen", quality_budget=budget)
    out = cm(x)
    v = cm.variants[-1]
    assert [r.spec for r in v.records][1] == f"layer-skip{{skip={expected}}}"
    assert v.quality_loss == pytest.approx(losses[expected], rel=1e-3, abs=1e-7)
    assert_outputs_close(out, without_blocks(model, balanced_choice(6, expected))(x).detach())
    assert "quality loss" in cm.explain()


def test_quality_budget_keeps_knob_when_within(budget_case):
    model, x, losses = budget_case
    # a budget every loss here fits (CompileOptions takes budgets in [0, 1))
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=3},raise", quality_budget=0.999)
    cm(x)
    assert cm.variants[-1].records[1].spec == "layer-skip{skip=3}"
    assert cm.variants[-1].quality_loss == pytest.approx(losses[3], rel=1e-3, abs=1e-7)


def test_quality_budget_refuses_naming_pass_and_loss(budget_case):
    model, x, losses = budget_case
    cm = fxcc.compile(model, passes="canonicalize,layer-skip{skip=2},raise", quality_budget=losses[1] / 2)
    with pytest.raises(QualityBudgetError, match=r"layer-skip\{skip=1\} on Stack loses 0\.\d+ .*over "
                                                 r"quality_budget=.*remove layer-skip from the pipeline"):
        cm(x)


def test_quality_loss_metric():
    a = torch.randn(3, 4, 5)
    assert quality_loss(a, a.clone()) == 0.0
    b = a.clone()
    b[1] = -b[1]  # one batch item reversed: cosine -1 -> loss 2
    assert quality_loss(a, b) == pytest.approx(2.0)
    assert quality_loss((a, torch.arange(3)), (a, torch.arange(3) + 1)) == 0.0  # integer outputs are not compared


# ------------------------------------------------------------------------------- with token-merge


def test_skipped_attention_leaves_the_graph():
    """fx's dead-code elimination keeps attention (tagged nondeterministic for its dropout): the pass erases a
    skipped block's attention itself, so no later pass sees it as a live block."""
    torch.manual_seed(0)
    model = bert(4).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm, _ = run_passes(model, "canonicalize,layer-skip{skip=1}", ids)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 3
    assert "encoder.layer.2." not in print_graph(gm)


def test_layer_skip_then_token_merge_on_bert_equals_token_merge_on_the_layer_deleted_model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval()
    cut = copy.deepcopy(model)
    del cut.encoder.layer[balanced_choice(4, 1)[0]]
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    opts = fxcc.CompileOptions(time_vs_eager=False)
    both = fxcc.compile(model, passes="canonicalize,layer-skip{skip=1},token-merge{r=4},raise,fuse,codegen{backend=extern}",
                        options=opts)
    merged_only = fxcc.compile(cut, passes="canonicalize,token-merge{r=4},raise,fuse,codegen{backend=extern}", options=opts)
    got = both(input_ids=ids, attention_mask=mask)
    assert_outputs_close(got, merged_only(input_ids=ids, attention_mask=mask))
    stats = {r.spec: r.result.stats for r in both.variants[-1].records}
    assert stats["layer-skip{skip=1}"]["skipped"] == 1 and stats["token-merge{r=4}"]
    # the other order is refused with the order to use
    with pytest.raises(LayerSkipError, match=r"runs after token-merge .*Put it before token-merge"):
        run_passes(model, "canonicalize,token-merge{r=4},layer-skip{skip=1}", ids)
