"""Weights held once (fxcc.held): once nothing but the compiled module reaches the model, a weight its kernels read only
as a packed copy is held as that copy alone; whatever reads the model again (state_dict, the eager fallback, an
attribute) gets the original bits back first, and nothing is let go while the caller holds the model or any part of
its weights."""

from __future__ import annotations

import dataclasses
import weakref

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc.autotune import select
from fxcc.codegen import onednn
from test_weight_memory import live_bytes  # every live CPU tensor storage, each once

pytest.importorskip("transformers")

OPTS = fxcc.CompileOptions(time_vs_eager=False)
IDS = torch.arange(8).reshape(1, 8) * 7 % 1024
KW = {"use_cache": False}


@pytest.fixture
def packed(monkeypatch, tmp_path):
    """Every linear that oneDNN can serve runs on its packed copy, whatever the timing says (a fresh artifact cache:
    no choice made elsewhere in the session is read back)."""
    if not onednn.available():
        pytest.skip("oneDNN is not available")
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))
    real = select.compare

    def compare(fns, incumbent, **kw):
        d = real(fns, incumbent, **kw)
        return dataclasses.replace(d, winner=next((lb for lb in ("onednn", "tvm+onednn") if lb in d.timings),
                                                  d.winner))
    monkeypatch.setattr(select, "compare", compare)
    monkeypatch.setattr(select, "_holding_no_copy", lambda decision, plain: decision)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=64)
    return LlamaModel(cfg).eval()


def compiled_llama() -> tuple[fxcc.CompiledModule, int, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """A compiled llama, called once, whose model only the compiled module holds: (compiled, parameter bytes, the
    compiled output, the state dict's values, eager's output)."""
    model = llama()
    with torch.no_grad():
        expected = model(IDS, **KW).last_hidden_state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(v.nbytes for v in state.values())
    compiled = fxcc.compile(model, options=OPTS)
    with torch.no_grad():
        first = compiled(IDS, **KW).last_hidden_state
    assert onednn._PACKED, "no weight was packed: nothing to hold once"
    return compiled, params, first, state, expected


def test_weights_read_only_as_packed_copies_are_held_once(packed):
    """Llama with every projection on oneDNN's packed copies: 1.5x its parameter bytes alive while the compiled module
    kept each weight beside its copy; held once, about 1.0x, and the calls return what they returned before."""
    base = live_bytes()
    compiled, params, first, state, expected = compiled_llama()
    extra = sum(v.untyped_storage().nbytes() for v in (first, expected, *state.values()))
    with torch.no_grad():
        again = compiled(IDS, **KW).last_hidden_state  # the first call after the caller let go of the model
        third = compiled(IDS, **KW).last_hidden_state
    assert torch.equal(again, first) and torch.equal(third, first)
    extra += again.untyped_storage().nbytes() + third.untyped_storage().nbytes()
    live = live_bytes() - base - extra
    assert live <= 1.1 * params, f"{live / 2**20:.2f} MB live for {params / 2**20:.2f} MB of parameters"
    assert compiled.stats.compiles == 1


def test_state_dict_eager_and_attributes_give_the_original_weights_back(packed):
    """What reads the model through the compiled module sees the weights as they were, bit for bit, and a weight
    changed in place afterwards is followed as before."""
    compiled, _, first, state, expected = compiled_llama()
    with torch.no_grad():
        compiled(IDS, **KW)
    assert compiled._held is not None, "no weight was held once"
    now = compiled.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(compiled._eager(IDS, **KW).last_hidden_state, expected)
        assert torch.equal(compiled(IDS, **KW).last_hidden_state, first)
        compiled.module.layers[0].mlp.down_proj.weight.mul_(2)
        compiled.layers[1].self_attn.o_proj.weight.add_(0.01)
        changed = compiled._eager(IDS, **KW).last_hidden_state
        torch.testing.assert_close(compiled(IDS, **KW).last_hidden_state, changed, atol=1e-4, rtol=1e-4)


def test_the_eager_fallback_gets_the_weights_back(packed):
    """A call the compiled variants do not serve (another sequence length: a compile, which runs the model) reads the
    weights as they were."""
    compiled, _, first, state, _ = compiled_llama()
    with torch.no_grad():
        compiled(IDS, **KW)
        assert compiled._held is not None
        ids = torch.arange(12).reshape(1, 12) * 5 % 1024
        got = compiled(ids, **KW).last_hidden_state
        expected = compiled._eager(ids, **KW).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(compiled.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("keep", ["model", "layer", "parameter", "view", "storage", "state_dict", "weakref"])
def test_nothing_is_let_go_while_the_caller_reaches_the_weights(packed, keep):
    """The caller still holds the model, a submodule, a parameter, a view of a weight, its storage or a state dict
    (whose tensors share the weights' memory), or a weak reference to a submodule: every weight stays, and so do the
    results."""
    model = llama()
    compiled = fxcc.compile(model, options=OPTS)
    with torch.no_grad():
        first = compiled(IDS, **KW).last_hidden_state
    held = {"model": lambda m: m, "layer": lambda m: m.layers[1], "parameter": lambda m: m.layers[1].mlp.down_proj.weight,
            "view": lambda m: m.layers[0].mlp.up_proj.weight[3],
            "storage": lambda m: m.layers[1].mlp.down_proj.weight.untyped_storage(),
            "state_dict": lambda m: m.state_dict(), "weakref": lambda m: weakref.ref(m.layers[0].mlp)}[keep](model)
    del model
    with torch.no_grad():
        again = compiled(IDS, **KW).last_hidden_state
    assert compiled._held is None
    assert torch.equal(again, first)
    if keep == "model":  # let go of at last: the next call holds the weights once (the model's references counted)
        del held
        with torch.no_grad():
            assert torch.equal(compiled(IDS, **KW).last_hidden_state, first)
        assert compiled._held is not None
