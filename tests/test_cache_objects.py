"""A new KV cache object per call (transformers' generate makes one per generate) of a structure served before:
served by fxcc's structural call key, without the full guard or a recompile, with eager's results."""

from __future__ import annotations

import fxcc
import pytest
import torch
from test_generate import FAST, _count_guards, assert_same_cache, build, greedy, llama, make_cache, prompt

transformers = pytest.importorskip("transformers")


def _prefill(run, model, ids):
    with torch.no_grad():
        return run(input_ids=ids, cache=make_cache("static", model), use_cache=True).logits


@pytest.mark.parametrize("eagerly", [False, True], ids=["compiled", "runs eagerly"])
def test_a_fresh_static_cache_per_call_skips_the_full_guard(monkeypatch, eagerly):
    model = build(llama)
    ids = prompt(6)
    expected = _prefill(model, model, ids)
    cm = fxcc.compile(model, passes=FAST)
    torch.testing.assert_close(_prefill(cm, model, ids), expected)  # compiles
    if eagerly:  # as a vs-eager verdict or a failed check leaves it
        cm._no_longer_compiled(cm._compiled[0], "told to in a test")
    seen = _count_guards(monkeypatch, cm)
    eager_calls = cm.stats.eager_calls
    for _ in range(4):
        torch.testing.assert_close(_prefill(cm, model, ids), expected)
    assert len(seen) == 1  # the first new cache takes the full guard; the next three the structural key
    assert cm.stats.compiles == 1
    assert cm.stats.eager_calls - eager_calls == (4 if eagerly else 0)


def test_decode_steps_with_a_new_static_cache_are_kept_as_the_first_loops_are(monkeypatch):
    """A second decode loop with its own new static cache: its steps are served by the structural key until one
    serves the same cache holding the same tensors twice, then by the kept call (no flatten of the cache per
    step), with eager's tokens and cache; a dynamic cache, whose tensors change at every step, gives eager's too."""
    from fxcc import runtime

    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    for kind in ("static", "dynamic"):
        eager_cache = make_cache(kind, model)
        expected = greedy(model, prompt(6), eager_cache, steps=8)
        assert greedy(cm, prompt(6), make_cache(kind, model), steps=8) == expected  # compiles
        flattened, fresh_key = [], runtime._fresh_key
        monkeypatch.setattr(runtime, "_fresh_key", lambda *a, f=flattened, k=fresh_key: f.append(1) or k(*a))
        seen = _count_guards(monkeypatch, cm)
        cache = make_cache(kind, model)
        assert greedy(cm, prompt(6), cache, steps=8) == expected
        assert_same_cache(cache, eager_cache)
        if kind == "static":
            # the first decode step takes the full guard (its variant's first call was checked, not kept by the
            # structural key); the prefill and the first two steps flatten the cache, the other five do not
            assert len(seen) == 1 and len(flattened) == 3
        monkeypatch.undo()
