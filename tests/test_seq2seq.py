"""Encoder-decoder generation (T5, BART, Whisper): `generate` through a compiled model or a compiled forward gives
eager's tokens, compiled, and a nested cache (EncoderDecoderCache holds two DynamicCaches) is the caller's own.

A cache inside a cache used to be kept by reference in the outer one's pytree context: export then wrote its fake
tensors into the caller's inner caches, the capture failed and the eager fallback ran on a corrupted cache.
"""

from __future__ import annotations

import warnings

import fxcc
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

transformers = pytest.importorskip("transformers")

EXTERN = "canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"
SMALL = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128)
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)


def t5():
    cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
                                vocab_size=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg), dict(input_ids=torch.randint(2, 128, (2, 9)))


def bart():
    cfg = transformers.BartConfig(**SMALL, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg), dict(input_ids=torch.randint(3, 128, (2, 9)))


def whisper():
    cfg = transformers.WhisperConfig(**SMALL, num_mel_bins=16, max_source_positions=32, max_target_positions=64,
                                     decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
                                     begin_suppress_tokens=None, suppress_tokens=None)
    return transformers.WhisperForConditionalGeneration(cfg), dict(input_features=torch.randn(2, 16, 64))


def _fakes(obj, seen=None) -> int:
    """Fake tensors anywhere in `obj`'s attributes, lists and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, type):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return int(isinstance(obj, FakeTensor))
    items = obj if isinstance(obj, (list, tuple)) else obj.values() if isinstance(obj, dict) else \
        vars(obj).values() if hasattr(obj, "__dict__") else ()
    return sum(_fakes(v, seen) for v in items)


@pytest.mark.parametrize("make, how", [(bart, "module"), (whisper, "module"), (t5, "forward")])
def test_seq2seq_generate_runs_compiled_with_eagers_tokens(make, how):
    torch.manual_seed(0)
    model, inputs = make()
    model.eval()
    with torch.no_grad():
        want = model.generate(**inputs, **GEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback, no warning
        if how == "module":
            compiled = fxcc.compile(model, passes=EXTERN)
            got = [compiled.generate(**inputs, **GEN) for _ in range(2)]
            stats = compiled.stats
        else:
            model.forward = fxcc.compile(model.forward, passes=EXTERN)
            got = [model.generate(**inputs, **GEN) for _ in range(2)]
            stats = model.forward.fxcc.stats
    assert all(torch.equal(g, want) for g in got)
    # the first decoder step (cross-attention cache filled), then the decode step static and symbolic; the
    # second generate compiles nothing
    assert stats.compiles <= 3 and stats.eager_calls == 0


def test_a_nested_cache_is_updated_as_eager_updates_it():
    torch.manual_seed(0)
    model, inputs = bart()
    model.eval()
    dec = torch.zeros(2, 1, dtype=torch.long)

    def cache():
        return transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())

    compiled = fxcc.compile(model, passes=EXTERN)
    mine, theirs = cache(), cache()
    with torch.no_grad():
        got = compiled(**inputs, decoder_input_ids=dec, past_key_values=mine, use_cache=True)
        want = model(**inputs, decoder_input_ids=dec, past_key_values=theirs, use_cache=True)
    assert _fakes(mine) == 0 and _fakes(got) == 0
    torch.testing.assert_close(got.logits, want.logits)
    for a, b in ((mine.self_attention_cache, theirs.self_attention_cache),
                 (mine.cross_attention_cache, theirs.cross_attention_cache)):
        assert len(a.layers) == len(b.layers) == 2
        for la, lb in zip(a.layers, b.layers):
            torch.testing.assert_close(la.keys, lb.keys)
            torch.testing.assert_close(la.values, lb.values)
