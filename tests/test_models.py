"""Differential tests on transformers architectures: compiled == eager in fp32 for every tensor of the output.

Tiny configs with random weights (hidden 32, 2 layers, seq 8), so the whole file runs in well under a
minute on a laptop CPU; fine for CI.
"""

from __future__ import annotations

import fxcc
import pytest
import torch
from conftest import assert_outputs_close, tensor_leaves

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 100, 32, 2, 4, 8
DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)


def bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32))


def gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32,
        bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaModel(transformers.LlamaConfig(**DECODER))


def qwen2():
    return transformers.Qwen2Model(transformers.Qwen2Config(**DECODER))


def mistral():
    return transformers.MistralModel(transformers.MistralConfig(**DECODER))


def vit():
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
        image_size=16, patch_size=8))


def t5_encoder():
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=HEADS))


def token_ids():
    return torch.randint(0, VOCAB, (2, SEQ))


def build(make):
    torch.manual_seed(0)
    return make().eval()


def check(model, *args, verify_each: bool = False, **kwargs):
    with torch.no_grad():
        expected = model(*args, **kwargs)
    cm = fxcc.compile(model, options=fxcc.CompileOptions(verify_each=verify_each))
    got = cm(*args, **kwargs)
    assert_outputs_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    return cm, got


@pytest.mark.parametrize("make, verify_each", [
    (bert, True), (gpt2, False), (llama, True), (qwen2, False), (mistral, True), (t5_encoder, True),
], ids=["bert", "gpt2", "llama", "qwen2", "mistral", "t5-encoder"])
def test_text_model_matches_eager(make, verify_each):
    model = build(make)
    cm, out = check(model, token_ids(), verify_each=verify_each)
    assert cm.variants[-1].captured.method == "export"
    assert out.last_hidden_state.shape == (2, SEQ, HIDDEN)


def test_decoder_kv_cache_matches_eager():
    model = build(llama)
    _, out = check(model, token_ids(), use_cache=True)
    # the returned cache, found by type (the output field is named `cache` or `past_key_values` by version)
    caches = [v for v in out.values() if isinstance(v, transformers.Cache)]
    assert len(caches) == 1, f"expected one Cache in the output, got fields {list(out.keys())}"
    assert caches[0].get_seq_length() == SEQ and len(caches[0].layers) == LAYERS
    compared = [path for path, _ in tensor_leaves(out) if ".layers[" in path]
    assert len(compared) == 2 * LAYERS  # check() compared keys and values of every layer


def test_vit_matches_eager():
    model = build(vit)
    torch.manual_seed(1)
    cm, out = check(model, torch.randn(2, 3, 16, 16), verify_each=True)
    assert type(out).__name__ == "BaseModelOutputWithPooling"
    assert out.pooler_output.shape == (2, HIDDEN)


def test_bert_with_padding_mask_matches_eager():
    model = build(bert)
    ids = token_ids()
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 5:] = 0  # second sequence is padded
    cm, out = check(model, ids, attention_mask=mask, verify_each=True)
    # the mask is an input, not a constant: other padding reuses the variant and stays exact
    mask2 = torch.ones_like(mask)
    mask2[0, 3:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask2)
    assert_outputs_close(cm(ids, attention_mask=mask2), expected)
    assert cm.stats.compiles == 1


def test_bert_as_class_decorator_matches_eager():
    Compiled = fxcc.compile(transformers.BertModel)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = Compiled(config).eval()
    ids = token_ids()
    with torch.no_grad():
        expected = torch.nn.Module.__call__(model, ids)
    assert_outputs_close(model(ids), expected)
    assert model.__dict__["_fxcc_compiled"].stats.compiles == 1


def _count_in_raise_ir(cm, op: str) -> int:
    record = next(r for r in cm.variants[-1].records if r.spec == "raise")
    assert record.ir_after is not None
    return record.ir_after.count(f" = {op}(")


def test_llama_explain_shows_raised_ops_for_every_layer():
    model = build(llama)
    ids = token_ids()
    cm = fxcc.compile(model, options=fxcc.CompileOptions(print_ir_after=("raise",)))
    cm.echo_ir = False
    with torch.no_grad():
        expected = model(ids)
    assert_outputs_close(cm(ids), expected)
    assert _count_in_raise_ir(cm, "tx.rms_norm") == 2 * LAYERS + 1
    assert _count_in_raise_ir(cm, "tx.attention") == LAYERS
    report = fxcc.explain(model, ids)
    after_raise = report.split("// -----// IR after raise //----- //", 1)[1].split("// -----//", 1)[0]
    assert after_raise.count(" = tx.rms_norm(") == 2 * LAYERS + 1
    assert after_raise.count(" = tx.attention(") == LAYERS


def test_repeated_calls_stay_exact_when_the_graph_writes_a_temporary_in_place():
    # T5's relative-position buckets are built with `+=` on a tensor computed from shapes only: folding
    # it into a constant would let every call's in-place add mutate the one shared copy
    model = build(t5_encoder)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids)
    cm = fxcc.compile(model)
    for _ in range(3):
        assert_outputs_close(cm(ids), expected, atol=1e-5, rtol=1e-5)


def aimv2_text():
    """A causal text tower whose attention modules say is_causal=False (AIMv2's; PaliGemma's Gemma too)."""
    return transformers.Aimv2TextModel(transformers.Aimv2TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=32, eos_token_id=VOCAB - 1))


def test_a_mask_eager_skips_is_skipped_alike_with_and_without_padding():
    """Eager transformers builds no mask when nothing is padded, and then such a model attends both ways; the
    compiled graph does the same from one variant, whatever the padding of the call."""
    model = build(aimv2_text)
    ids = token_ids()
    ones, padded = torch.ones(2, SEQ, dtype=torch.long), torch.ones(2, SEQ, dtype=torch.long)
    padded[1, 5:] = 0
    cm, _ = check(model, ids, attention_mask=ones)
    for mask in (padded, ones):
        with torch.no_grad():
            expected = model(ids, attention_mask=mask)
        assert_outputs_close(cm(ids, attention_mask=mask), expected, atol=1e-5, rtol=1e-5)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    with torch.no_grad():  # and without a mask, which eager decides from sizes alone
        expected = model(ids)
    assert_outputs_close(cm(ids), expected, atol=1e-5, rtol=1e-5)
