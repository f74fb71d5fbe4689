"""Never slower than eager: a compiled variant measured slower than the module run eagerly is not used.

The decision's timings are replaced here (timings in tests are noise); one test runs the real timer and asserts
only what does not depend on its outcome.
"""

from __future__ import annotations

import itertools
import json
import warnings

import fxcc
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from fxcc.autotune import vs_eager
from fxcc.measure import Timing, using_timer
from fxcc.runtime import CompiledModule
from fxcc.store import default_cache


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.sigmoid(self.lin(x)) * 2 + x


@pytest.fixture(autouse=True)
def check_on(monkeypatch, tmp_path):
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "1")
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))  # verdicts are cached: one cache per test
    torch.manual_seed(0)


def fake_timer(monkeypatch, compiled_ms: float, eager_ms: float) -> list:
    """Make the check's timer report these per-call times; returns the list of timed labels it was asked for."""
    asked = []

    def timer(fns, **kw):
        asked.append(sorted(fns))
        for fn in fns.values():  # both still run: a failing call would fail here
            fn()
        return {"compiled": Timing([compiled_ms] * 5), "eager": Timing([eager_ms] * 5)}
    monkeypatch.setattr(vs_eager, "interleaved", timer)
    return asked


def test_a_variant_slower_than_eager_runs_eagerly_and_says_so(monkeypatch):
    asked = fake_timer(monkeypatch, compiled_ms=2.0, eager_ms=1.0)
    model = Scaled().eval()
    x = torch.randn(4, 16)
    cm = fxcc.compile(model)
    with pytest.warns(UserWarning, match=r"Scaled runs eagerly for inputs \(tensor<4x16xf32>\).*2\.000 ms.*1\.000 ms"):
        out = cm(x)
    assert asked == [["compiled", "eager"]]
    torch.testing.assert_close(out, model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at compile
        torch.testing.assert_close(cm(x), model(x))
    assert cm.stats.eager_calls == 2 and cm.stats.compiles == 1
    v = cm.variants[-1]
    assert v.slower_than_eager
    assert "whole graph 2.000 ms compiled, 1.000 ms eager: runs eagerly" in cm.explain()
    # the compiled graph itself is still exact: it was only slower
    torch.testing.assert_close(v.run([x]), model(x))


def test_a_variant_faster_than_eager_is_kept(monkeypatch):
    fake_timer(monkeypatch, compiled_ms=1.0, eager_ms=2.0)
    model = Scaled().eval()
    x = torch.randn(4, 16)
    cm = fxcc.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cm(x), model(x))
    assert cm.stats.eager_calls == 0 and not cm.variants[-1].slower_than_eager
    assert "whole graph 1.000 ms compiled, 2.000 ms eager: compiled kept" in cm.explain()


@pytest.mark.parametrize("off", ["option", "env"])
def test_the_check_can_be_turned_off(monkeypatch, off):
    asked = fake_timer(monkeypatch, compiled_ms=2.0, eager_ms=1.0)
    if off == "env":
        monkeypatch.setenv("FXCC_TIME_VS_EAGER", "0")
    cm = fxcc.compile(Scaled().eval(), options=fxcc.CompileOptions(time_vs_eager=off == "env"))
    cm(torch.randn(4, 16))
    assert asked == [] and cm.stats.eager_calls == 0 and cm.variants[-1].vs_eager is None


def test_the_real_timer_decides_and_outputs_stay_exact():
    model = Scaled().eval()
    x = torch.randn(4, 16)
    cm = fxcc.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # either outcome is right; which one is the machine's
        out = cm(x)
    torch.testing.assert_close(out, model(x))
    v = cm.variants[-1]
    assert v.vs_eager.startswith("whole graph ") and v.slower_than_eager == v.vs_eager.endswith("runs eagerly")


def test_graphs_with_side_effects_are_not_run_for_timing():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.add_.Tensor, (x, x))
    g.output(y)
    assert "writes its inputs" in vs_eager.unrepeatable(fx.GraphModule({}, g))
    y.target = torch.ops.aten.add.Tensor
    assert vs_eager.unrepeatable(fx.GraphModule({}, g)) is None
    y.meta["fxcc_eager"] = "a custom op"
    assert "runs eagerly (a custom op)" in vs_eager.unrepeatable(fx.GraphModule({}, g))


def test_a_warm_compile_reads_the_verdict_instead_of_timing_again(monkeypatch):
    """The verdict is kept with the graph in the artifact cache: a second compile of the same model on the same
    machine (a new process, here a new compiled object) makes the same choice without timing."""
    asked = fake_timer(monkeypatch, compiled_ms=2.0, eager_ms=1.0)
    model = Scaled().eval()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="runs eagerly"):
        fxcc.compile(model)(x)
    assert len(asked) == 1
    again = fxcc.compile(model)
    with pytest.warns(UserWarning, match="runs eagerly"):
        torch.testing.assert_close(again(x), model(x))
    assert len(asked) == 1  # not timed again
    assert again.stats.eager_calls == 1
    fake_timer(monkeypatch, compiled_ms=1.0, eager_ms=2.0)
    other = fxcc.compile(model, options=fxcc.CompileOptions(cuda_graphs=False))  # other options: timed anew
    torch.testing.assert_close(other(x), model(x))
    assert other.stats.eager_calls == 0


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # tensor-dependent: a DyCL host program, whose segments choose for themselves
            return h * 2
        return h - 1


def test_a_dycl_program_is_not_timed_as_a_whole_graph(monkeypatch):
    asked = fake_timer(monkeypatch, compiled_ms=1.0, eager_ms=2.0)
    model = Branchy().eval()
    compiled = fxcc.compile(model, options=fxcc.CompileOptions(graph_cache=False))
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sign in (1.0, -1.0):
            torch.testing.assert_close(compiled(x * sign), model(x * sign), rtol=0, atol=1e-5)
    assert compiled.variants[0].gm is None and asked == []


EAGER_CALLS: list[int] = []  # appended by every eager call of a compiled module (see `eager_counted`)


@pytest.fixture
def eager_counted(monkeypatch):
    """Eager calls of a compiled module say so, for the fake timer to tell them from the compiled graph's."""
    plain = CompiledModule._eager

    def _eager(self, *args, **kwargs):
        EAGER_CALLS.append(1)
        return plain(self, *args, **kwargs)
    monkeypatch.setattr(CompiledModule, "_eager", _eager)
    monkeypatch.setenv("FXCC_SETTLE_TRIES", "3")


def per_call(compiled_ms, eager_ms):
    """The deterministic fake timer (fxcc.measure.using_timer): per-call costs, each a number or a sequence cycled
    through (the preempted calls of a loaded machine), told apart by whether the model's forward ran."""
    costs = {k: itertools.cycle(v if isinstance(v, (list, tuple)) else [v])
             for k, v in (("compiled", compiled_ms), ("eager", eager_ms))}

    def timer(fn, device):
        EAGER_CALLS.clear()
        fn()
        return next(costs["eager" if EAGER_CALLS else "compiled"])
    return timer


def compiled_call(model, x, timer):
    cm = fxcc.compile(model)
    with using_timer(timer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(cm(x), model(x))
    return cm.variants[-1]


def test_a_noisy_verdict_keeps_the_compiled_graph_and_the_next_compile_times_it_again(eager_counted):
    model, x = Scaled().eval(), torch.randn(4, 16)
    # eager mostly preempted, once 3x faster than compiled: no win beyond the noise, and no telling either
    v = compiled_call(model, x, per_call(1.0, [0.3, 5.0, 5.0, 5.0, 5.0]))
    assert not v.slower_than_eager and "compiled kept" in v.vs_eager
    assert "unsettled (try 1 of 3), measured again by the next compile" in v.vs_eager
    v = compiled_call(model, x, per_call(2.0, 1.0))  # quiet now: eager is faster beyond the noise
    assert v.slower_than_eager and "runs eagerly (re-measured (was unsettled); settled)" in v.vs_eager

    def untimed(fn, device):
        pytest.fail("a settled verdict was timed again")
    v = compiled_call(model, x, untimed)
    assert v.slower_than_eager and "runs eagerly (cached (settled)" in v.vs_eager


def test_a_settled_verdict_is_not_timed_again_and_a_tie_runs_eagerly(eager_counted):
    """Eager is the incumbent: a compiled graph 2% slower, or 2% faster, within the noise, buys nothing."""
    model, x = Scaled().eval(), torch.randn(4, 16)
    v = compiled_call(model, x, per_call([1.0, 1.02, 1.04, 1.06, 1.08], [0.98, 1.0, 1.02, 1.04, 1.06]))
    assert v.slower_than_eager and v.vs_eager.endswith("runs eagerly")
    v = compiled_call(model, x, lambda fn, device: pytest.fail("a settled verdict was timed again"))
    assert v.slower_than_eager and "runs eagerly (cached (settled)" in v.vs_eager
    torch.manual_seed(1)
    model = Scaled().eval()  # other weights: another graph key, timed afresh
    with pytest.warns(UserWarning, match="no faster beyond the noise"):
        cm = fxcc.compile(model)
        with using_timer(per_call([0.98, 1.0, 1.02, 1.04, 1.06], [1.0, 1.02, 1.04, 1.06, 1.08])):
            torch.testing.assert_close(cm(x), model(x))
    v = cm.variants[-1]
    assert v.slower_than_eager and "runs eagerly (no faster beyond the noise)" in v.vs_eager


def test_a_compiled_graph_faster_beyond_the_noise_is_kept_and_settled(eager_counted):
    model, x = Scaled().eval(), torch.randn(4, 16)
    v = compiled_call(model, x, per_call([0.8, 0.81, 0.82], [1.0, 1.01, 1.02]))
    assert not v.slower_than_eager and v.vs_eager.endswith("compiled kept")


def test_after_the_last_unsettled_try_the_compiled_graph_is_kept_and_said_so(eager_counted, monkeypatch):
    monkeypatch.setenv("FXCC_SETTLE_TRIES", "2")
    model, x = Scaled().eval(), torch.randn(4, 16)
    for _ in range(2):
        v = compiled_call(model, x, per_call(1.0, [0.3, 5.0, 5.0, 5.0, 5.0]))
    assert "unsettled after 2 measurement(s), kept as final" in v.vs_eager and not v.slower_than_eager
    v = compiled_call(model, x, lambda fn, device: pytest.fail("a final verdict was timed again"))
    assert "compiled kept (cached (unsettled after 2 measurement(s), kept as final" in v.vs_eager


def test_a_verdict_stored_without_a_record_of_its_noise_is_timed_again(eager_counted):
    """A verdict an older fxcc stored (its two estimates only; on a loaded machine five networks ran eagerly so)."""
    model, x = Scaled().eval(), torch.randn(4, 16)
    compiled_call(model, x, per_call(1.0, 2.0))
    cache = default_cache()
    (e,) = [e for e in cache.entries() if e.meta.get("kind") == "vs-eager"]
    cache.remove(e.key)
    cache.put(e.key, {"verdict.json": json.dumps({"compiled_ms": 2.0, "eager_ms": 1.0}).encode()},
              {"kind": "vs-eager", "model": "Scaled"})
    v = compiled_call(model, x, per_call(1.0, 2.0))
    assert not v.slower_than_eager and "re-measured (was unsettled); settled" in v.vs_eager


def test_the_compiled_side_is_timed_with_the_guard_its_calls_run(monkeypatch):
    """A call of the compiled module checks the model's state before the variant runs (a few microseconds: on
    a graph of a few ops, what decides): the timing against eager pays for it too."""
    from fxcc.guards import ModuleState

    fake_timer(monkeypatch, compiled_ms=1.0, eager_ms=2.0)
    counted = []
    changed = ModuleState.changed

    def counting(self, *a, **kw):
        counted.append(self)
        return changed(self, *a, **kw)

    model = Scaled().eval()
    cm = fxcc.compile(model)
    x = torch.randn(4, 16)
    monkeypatch.setattr(ModuleState, "changed", counting)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    assert counted and all(s is cm._params for s in counted)  # the timed compiled call ran the guard


def setup_timer(monkeypatch, compiled_ms: float, eager_ms: float, calls: int = 3) -> list:
    """A fake timer that runs each side `calls` times as the real one does (its untimed setup before each call)."""
    asked = []

    def timer(fns, setup=None, **kw):
        asked.append(sorted(fns))
        for name, fn in fns.items():
            for _ in range(calls):
                if setup and name in setup:
                    setup[name]()
                fn()
        return {"compiled": Timing([compiled_ms] * 5), "eager": Timing([eager_ms] * 5)}
    monkeypatch.setattr(vs_eager, "interleaved", timer)
    return asked


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=0)).eval()


@pytest.mark.parametrize("compiled_ms,eager_ms", [(2.0, 1.0), (1.0, 2.0)])
def test_a_call_with_a_growing_kv_cache_is_timed_on_copies_and_the_cache_grows_once(monkeypatch, compiled_ms, eager_ms):
    from transformers import DynamicCache
    asked = setup_timer(monkeypatch, compiled_ms, eager_ms)
    model = tiny_llama()
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    mine, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
    cm = fxcc.compile(model)
    with torch.no_grad(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = cm(ids, past_key_values=mine, use_cache=True)
        want = model(ids, past_key_values=theirs, use_cache=True)
    assert asked == [["compiled", "eager"]]  # timed, though the call carries a cache
    torch.testing.assert_close(got.logits, want.logits)
    assert mine.get_seq_length() == theirs.get_seq_length() == 7  # the timed calls appended to copies only
    for a, b in zip(mine.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    slower = compiled_ms > eager_ms
    assert any("runs eagerly" in str(w.message) for w in said) == slower
    assert cm.stats.eager_calls == int(slower)
    assert ("runs eagerly" if slower else "compiled kept") in cm.variants[-1].vs_eager


@pytest.mark.parametrize("compiled_ms,eager_ms", [(2.0, 1.0), (1.0, 2.0)])
def test_a_static_cache_prefill_is_timed_and_the_cache_ends_as_eager_leaves_it(monkeypatch, compiled_ms, eager_ms):
    from transformers import StaticCache
    asked = setup_timer(monkeypatch, compiled_ms, eager_ms)
    model = tiny_llama()
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    cm = fxcc.compile(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cm(ids, past_key_values=caches[0], use_cache=True)
        want = model(ids, past_key_values=caches[1], use_cache=True)
    assert asked == [["compiled", "eager"]]  # its in-place writes into the cache do not keep it from being timed
    torch.testing.assert_close(got.logits, want.logits)
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    assert ("runs eagerly" if compiled_ms > eager_ms else "compiled kept") in cm.variants[-1].vs_eager


def test_writes_into_inputs_are_repeatable_once_the_inputs_are_restored_but_writes_into_buffers_never():
    aten = torch.ops.aten
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(aten.add_.Tensor, (g.call_function(aten.slice.Tensor, (x, 0, 0, 2)), 1.0))
    g.output(x)
    into_input = fx.GraphModule(nn.Module(), g)
    assert "writes its inputs" in vs_eager.unrepeatable(into_input)
    assert vs_eager.unrepeatable(into_input, inputs_restored=True) is None
    root = nn.Module()
    root.register_buffer("count", torch.zeros(2))
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(aten.add_.Tensor, (g.get_attr("count"), 1.0))
    g.output(x)
    into_buffer = fx.GraphModule(root, g)
    assert "writes its inputs" in vs_eager.unrepeatable(into_buffer, inputs_restored=True)


def test_a_shape_class_measured_slower_runs_eagerly_at_every_size_without_compiling_again(monkeypatch):
    """A symbolic variant measured slower than eager serves its shape class eagerly: twenty batch sizes cost
    the static compile and one symbolic one (it compiled a new symbolic variant per size, without end), and
    they count toward max_variants."""
    fake_timer(monkeypatch, compiled_ms=2.0, eager_ms=1.0)
    model = Scaled().eval()
    cm = fxcc.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(4, 24):
            x = torch.randn(b, 16)
            torch.testing.assert_close(cm(x), model(x))
    assert cm.stats.compiles == 2, cm.stats.reasons
    assert cm.stats.eager_calls == 20


def test_a_generate_whose_variants_are_no_faster_than_eager_compiles_twice_in_all(monkeypatch):
    """Prefill and decode both judged no faster than eager (as a loaded machine may measure): each decode step's
    new KV length and a second generate's new prompt length run eagerly under those verdicts; they compiled
    again at every token, past max_variants."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(vs_eager, "judge", lambda *a, **k: vs_eager.Verdict(compiled_ms=1.05, eager_ms=1.0,
                                                                             eager_wins=True))
    monkeypatch.setattr(vs_eager, "remembered", lambda cache, key: None)
    cfg = transformers.GPTBigCodeConfig(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                        n_inner=128, multi_query=True, bos_token_id=0, eos_token_id=None,
                                        pad_token_id=0)
    m = transformers.GPTBigCodeForCausalLM(cfg).eval()
    ids, longer = torch.randint(1, 1000, (1, 6)), torch.randint(1, 1000, (1, 9))
    with torch.no_grad():
        want = [m.generate(p, max_new_tokens=12, do_sample=False) for p in (ids, longer)]
    m.forward = fxcc.compile(m.forward, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            got = [m.generate(p, max_new_tokens=12, do_sample=False) for p in (ids, longer)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    stats = m.forward.fxcc.stats
    assert stats.compiles == 2, stats.reasons
    assert stats.eager_calls == 24
