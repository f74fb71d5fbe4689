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


# ---------------------------------------------------------------- tp-shard: two gloo processes (CPU)

TP = "canonicalize,raise,tp-shard{tp=2},fuse,codegen{backend=extern}"


def small_llama() -> nn.Module:
    """`llama` with a small vocabulary: the replicated embedding 0.04 of the parameter bytes, so each rank's shards
    (half of every projection) are most of what it needs."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaModel(cfg).eval()


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for k, v in tensors.items()}


def _tp_held_worker(rank: int, world: int, cache_dir: str) -> dict:
    """One rank: fxcc.compile(model) with tp-shard{tp=2}, the caller's model dropped; live bytes against the model's
    parameter bytes, the outputs against TP=1 (eager), and what reads the model afterwards."""
    import os

    os.environ["FXCC_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    ids = torch.arange(8).reshape(1, 8) * 7 % 256
    base = live_bytes()
    model = small_llama()
    params = sum(p.nbytes for p in model.state_dict().values())
    digests = _digests(model.state_dict())
    with torch.no_grad():
        expected = model(ids, **KW).last_hidden_state
    compiled = fxcc.compile(model, passes=TP, options=OPTS)
    out = {"params": params}
    with torch.no_grad():
        first = compiled(ids, **KW).last_hidden_state
        second = compiled(ids, **KW).last_hidden_state
    out["held_while_the_caller_holds_the_model"] = compiled._held is not None
    del model
    with torch.no_grad():
        again = compiled(ids, **KW).last_hidden_state  # the first call after the caller let go: the originals go
    extra = sum(t.untyped_storage().nbytes() for t in (expected, first, second, again))
    out["live"] = live_bytes() - base - extra
    out["held"] = compiled._held is not None
    out["error"] = max((t - expected).abs().max().item() for t in (first, second, again))
    # what reads the model through the compiled module has the original bits back, from this rank alone
    out["state_dict_exact"] = _digests(compiled.state_dict()) == digests
    with torch.no_grad():
        out["eager_exact"] = torch.equal(compiled._eager(ids, **KW).last_hidden_state, expected)
        out["after_restore_error"] = (compiled(ids, **KW).last_hidden_state - expected).abs().max().item()
        compiled.layers[1].mlp.down_proj.weight.mul_(2)  # a change in place: both ranks compile again, from it
        changed = compiled._eager(ids, **KW).last_hidden_state
        out["changed_error"] = (compiled(ids, **KW).last_hidden_state - changed).abs().max().item()
        longer = torch.arange(12).reshape(1, 12) * 5 % 256  # another length: both ranks compile again
        out["longer_error"] = (compiled(longer, **KW).last_hidden_state
                               - compiled._eager(longer, **KW).last_hidden_state).abs().max().item()
    return out


@pytest.mark.slow
def test_tp_ranks_let_go_of_the_full_weights_their_shards_replace(tmp_path):
    """Under tp-shard{tp=2}, once the compiled module is the model's only holder, each rank lets go of the whole
    projections its graph holds only shards of (written to disk, read back bit for bit): at most 0.6 of the model's
    parameter bytes stay alive per rank where 1.4 did, the outputs stay TP=1's, and state_dict, the eager fallback, a
    change in place and a compile for another length read the original weights."""
    from fxcc.autotune.tp_plan import launch

    small_llama()  # import transformers' Llama here: forked ranks inherit it
    ranks = launch(_tp_held_worker, 2, str(tmp_path), backend="gloo", start_method="fork")
    for r in ranks:
        assert not r["held_while_the_caller_holds_the_model"], r
        assert r["held"], r
        assert r["live"] <= 0.6 * r["params"], f"{r['live'] / r['params']:.2f} of the parameter bytes live"
        assert r["error"] < 2e-5, r
        assert r["state_dict_exact"] and r["eager_exact"], r
        assert r["after_restore_error"] < 2e-5, r
        assert r["changed_error"] < 2e-5 and r["longer_error"] < 2e-5, r


def test_weights_are_not_written_to_a_file_system_in_memory():
    """A tmpfs keeps its files in memory: the sharded-away weights stay where they are."""
    from fxcc import held

    with open("/proc/mounts") as f:
        shm = next((line.split()[1] for line in f if line.split()[2] == "tmpfs"), None)
    if shm is None:
        pytest.skip("no tmpfs mounted")
    assert "in memory" in held._in_memory(shm)
    w = torch.ones(4, 4)
    assert held._Spill.of([w], shm) == []


class Tied(nn.Module):
    """Three linears, the last one's weight the first one's (tied weights read by two kernels)."""

    def __init__(self, d: int = 96):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.c.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("change", ["load_state_dict", "to_float64", "tied_in_place"])
def test_a_model_changed_through_the_compiled_module_after_its_weights_are_held(packed, change):
    """Held once, then new weights loaded, the model moved to float64 or a tied weight written through one of its
    names: the calls follow the change as eager does, and the tie stays."""
    torch.manual_seed(0)
    model = Tied().eval()
    reference = Tied().eval()
    reference.load_state_dict(model.state_dict())
    compiled = fxcc.compile(model, options=OPTS)
    del model
    x = torch.randn(4, 96)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        assert compiled._held is not None, "no weight was held once"
        if change == "load_state_dict":
            torch.manual_seed(1)
            reference.load_state_dict(Tied().state_dict())
            compiled.load_state_dict(reference.state_dict())
        elif change == "to_float64":
            compiled.to(torch.float64)
            reference.to(torch.float64)
            x = x.double()
        else:
            compiled.c.weight.mul_(0.5)
            reference.c.weight.mul_(0.5)
        for _ in range(3):
            torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-4)
    assert compiled.c.weight is compiled.a.weight
