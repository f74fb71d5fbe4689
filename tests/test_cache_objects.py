"""A new KV cache object per call (transformers' generate makes one per generate) of a structure served before:
served by fxcc's structural call key, without the full guard or a recompile, with eager's results."""

from __future__ import annotations

import fxcc
import pytest
import torch
from test_generate import FAST, _count_guards, build, llama, make_cache, prompt

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
