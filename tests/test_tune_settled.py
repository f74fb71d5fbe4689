"""A decision made by measurement knows whether it was settled: one whose timings were too noisy to tell is used, but
not cached as final, so the next compile measures it again (up to FXCC_SETTLE_TRIES compiles); a settled one is
cached and applied without measuring. Kernel selection here; the compiled-vs-eager verdict in tests/test_vs_eager.py.

Timings come from the deterministic fake timer (`fxcc.measure.using_timer`): the test states what each call of each
candidate costs, including the preempted calls of a loaded machine, so which decision is settled is the test's."""

from __future__ import annotations

import itertools
import sys
import types

import fxcc
import pytest
import torch
import torch.nn.functional as F
from fxcc import codegen, store
from fxcc.codegen import Built, extern
from fxcc.measure import SETTLE_GAIN, Timing, compare, decide, using_timer
from fxcc.store import default_cache

PASSES = "canonicalize,raise,fuse,codegen{backend=auto,reps=5}"
RAN: list[str] = []  # the fake backend's calls append to it: the timer tells the candidates apart by it


class Fake:
    """A candidate that computes what extern computes (so it passes every check) and says when it ran."""

    backend = "fake"
    space: dict = {}
    defaults: dict = {}

    def __init__(self, kb):
        self.kb = kb

    def build(self, params: dict) -> Built:
        return load(self.kb, "fake", {}, params)


def load(kb, label, files, params) -> Built:
    ref = extern.Extern(kb).build({}).fn

    def fn(inputs):
        RAN.append("fake")
        return ref(inputs)
    return Built(fn, source="# fake")


@pytest.fixture(autouse=True)
def fake_backend(monkeypatch, tmp_path):
    """Candidates for every kernel: extern (the incumbent) and `fake`; one artifact cache per test; three tries."""
    mod = types.ModuleType("fxcc_test_fake_backend")
    mod.name, mod.available, mod.load = "fake", lambda target: None, load
    mod.candidates = lambda kb, target: [Fake(kb)]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    for name in [n for n in codegen.BACKENDS if n != "extern"]:
        monkeypatch.delitem(codegen.BACKENDS, name)
    monkeypatch.setitem(codegen.BACKENDS, "fake", mod.__name__)
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FXCC_SETTLE_TRIES", "3")
    store._default.clear()
    yield
    store._default.clear()


def timer(extern_ms, fake_ms):
    """Per-call costs: each argument a number or a sequence cycled through (a loaded machine's calls)."""
    costs = {name: itertools.cycle(v if isinstance(v, (list, tuple)) else [v])
             for name, v in (("extern", extern_ms), ("fake", fake_ms))}

    def time(fn, device):
        RAN.clear()
        fn()
        return next(costs["fake" if RAN else "extern"])
    return time


def untimed(fn, device):
    pytest.fail("a warm compile measured a settled decision again")


NOISY = dict(extern_ms=1.0, fake_ms=[0.5, 10.0, 10.0, 10.0, 10.0])  # fake: mostly preempted, once 2x faster
QUIET_FASTER = dict(extern_ms=1.0, fake_ms=0.5)


def f(x, r):
    return F.layer_norm(x + r, (64,)) * 2


X, R = torch.randn(8, 64), torch.randn(8, 64)


def compile_once(t):
    """One compile (a new compiled object: as a new process would) timed by `t`; its codegen stats and kernels."""
    cm = fxcc.compile(f, passes=PASSES)
    with using_timer(t):
        torch.testing.assert_close(cm(X, R), f(X, R))
    v = cm.fxcc.variants[-1]
    stats = next(r for r in v.records if r.spec.startswith("codegen")).result.stats
    return stats, list(v.kernels.values()), cm.fxcc.explain()


def stored():
    return {e.meta["kernel"]: e.meta for e in default_cache().entries() if "kernel" in e.meta}


def test_a_noisy_decision_is_not_cached_as_final_and_the_next_compile_measures_again():
    stats, ks, text = compile_once(timer(**NOISY))
    assert stats.get("built") and all(k.backend == "extern" for k in ks)  # noise: the incumbent stays
    meta = stored()
    assert meta and all(m["settled"] is False and m["tries"] == 1 and "fake's interval" in m["doubt"]
                        for m in meta.values())
    assert all(m["noise"]["fake"] > 0.5 and m["interval_ms"]["fake"][0] == 0.5 for m in meta.values())
    assert "unsettled (try 1 of 3), measured again by the next compile" in text

    stats, ks, text = compile_once(timer(**QUIET_FASTER))  # the machine is quiet now: fake wins, settled
    assert stats.get("remeasured") == stats["kernels"] and not stats.get("cached")
    assert all(k.backend == "fake" for k in ks)
    assert all(m["settled"] is True and m["tries"] == 2 and m["backend"] == "fake" for m in stored().values())
    assert "re-measured (was unsettled); settled" in text

    stats, ks, text = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"] and all(k.backend == "fake" for k in ks)
    assert "(cached (settled))" in text


def test_an_unsettled_decision_measured_again_times_the_builds_it_kept(monkeypatch):
    """The next compile measures an unsettled decision on the candidates' builds kept in the cache: nothing is
    generated or built again (for TVM: no import of its compiler, no LLVM), and one evicted is built again."""
    made, asked = [], []
    fake = sys.modules["fxcc_test_fake_backend"]
    offer = fake.candidates
    monkeypatch.setattr(fake, "candidates", lambda kb, target: asked.append(kb.key) or offer(kb, target))

    def build(self, params):  # a build with files, as TVM's (its shared library), so the cache can keep it
        made.append(self.kb.key)
        b = load(self.kb, "fake", {}, params)
        return Built(b.fn, b.source, {"kernel.bin": b"fake build"})
    monkeypatch.setattr(Fake, "build", build)
    stats, _, _ = compile_once(timer(**NOISY))
    assert made and len(asked) == len(made) == stats["kernels"]
    assert all(m["settled"] is False and [c[0] for c in m["candidates"]] == ["extern", "fake"]
               for m in stored().values())
    made.clear(), asked.clear()
    stats, ks, text = compile_once(timer(**NOISY))  # still noisy: measured again, on the kept builds
    assert stats.get("remeasured") == stats["kernels"] and not made and not asked
    assert all(m["tries"] == 2 and m["candidates"] for m in stored().values())
    cache = default_cache()
    for e in list(cache.entries()):  # the kept builds evicted: built again, from the candidates
        if "fallback_of" in e.meta:
            cache.remove(e.key)
    stats, ks, text = compile_once(timer(**QUIET_FASTER))
    assert stats.get("remeasured") == stats["kernels"] and len(made) == len(asked) == stats["kernels"]
    assert all(k.backend == "fake" for k in ks) and "re-measured (was unsettled); settled" in text


def kept_builds(monkeypatch) -> list[str]:
    """Fake builds with files that their loading reads, as TVM's (its shared library and spec); the kernels built."""
    made = []

    def build(self, params):
        made.append(self.kb.key)
        b = load(self.kb, "fake", {}, params)
        return Built(b.fn, b.source, {"kernel.bin": b"fake build"})

    def load_files(kb, label, files, params):
        if files["kernel.bin"].read_bytes() != b"fake build":
            raise ValueError("not the build stored")
        return load(kb, label, files, params)
    monkeypatch.setattr(Fake, "build", build)
    monkeypatch.setattr(sys.modules["fxcc_test_fake_backend"], "load", load_files)
    return made


def test_a_kept_build_that_wins_when_measured_again_is_stored_with_its_files(monkeypatch):
    """The re-measured decision's winner was loaded from its kept build; stored as the choice, it keeps that build's
    files, so later compiles load it instead of building and measuring every candidate again."""
    made = kept_builds(monkeypatch)
    compile_once(timer(**NOISY))
    made.clear()
    stats, ks, _ = compile_once(timer(**QUIET_FASTER))  # measured again on the kept builds: fake wins, settled
    assert stats.get("remeasured") == stats["kernels"] and all(k.backend == "fake" for k in ks) and not made
    stats, ks, text = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"] and all(k.backend == "fake" for k in ks) and not made


def test_a_cached_choice_whose_build_does_not_load_is_replaced_by_the_rebuild(monkeypatch):
    """A settled choice whose files are gone is rebuilt with a warning, once: the rebuild takes its place."""
    made = kept_builds(monkeypatch)
    compile_once(timer(**QUIET_FASTER))
    cache = default_cache()
    for e in list(cache.entries()):  # the choice's entry without its build
        if "kernel" in e.meta:
            cache.remove(e.key)
            cache.put(e.key, {}, e.meta)
    made.clear()
    with pytest.warns(UserWarning, match="did not load"):
        stats, ks, _ = compile_once(timer(**QUIET_FASTER))
    assert stats.get("built") == stats["kernels"] and made
    made.clear()
    stats, ks, _ = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"] and all(k.backend == "fake" for k in ks) and not made


def test_a_settled_decision_is_cached_and_not_measured_again():
    stats, ks, text = compile_once(timer(extern_ms=1.0, fake_ms=2.0))  # fake slower, no noise
    assert stats.get("built") and all(k.backend == "extern" for k in ks)
    assert all(m["settled"] is True and m["tries"] == 1 for m in stored().values())
    assert "measured; settled" in text
    stats, ks, text = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"] and all(k.backend == "extern" for k in ks)
    assert "(cached (settled))" in text


def test_a_challenger_losing_within_the_noise_keeps_the_incumbent_as_a_settled_decision():
    """Fake is 3% faster, within a 4% noise: not a win, and too close for fake to be much faster, so settled."""
    stats, ks, _ = compile_once(timer(extern_ms=[1.0, 1.04, 1.02], fake_ms=[0.97, 1.01, 0.99]))
    assert all(k.backend == "extern" for k in ks)
    assert all(m["settled"] is True and m["backend"] == "extern" for m in stored().values())
    compile_once(untimed)


def test_after_the_last_unsettled_try_the_incumbent_is_kept_as_final_and_said_so():
    for tries in (1, 2, 3):
        stats, ks, text = compile_once(timer(**NOISY))
        assert stats.get("remeasured" if tries > 1 else "built") == stats["kernels"]
        assert all(m["settled"] is False and m["tries"] == tries for m in stored().values())
    assert all(k.backend == "extern" for k in ks) and "unsettled after 3 measurement(s), kept as final" in text
    stats, ks, text = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"] and all(k.backend == "extern" for k in ks)
    assert "cached (unsettled after 3 measurement(s), kept as final" in text


def test_an_entry_stored_before_settledness_was_recorded_is_measured_again_once():
    compile_once(timer(extern_ms=1.0, fake_ms=2.0))
    cache = default_cache()
    for e in list(cache.entries()):  # rewrite each entry as an older fxcc stored it: no record of its noise
        if "kernel" in e.meta:
            old = {k: v for k, v in e.meta.items() if k not in ("settled", "doubt", "tries", "noise", "interval_ms")}
            files = {name: p.read_bytes() for name, p in e.files.items()}
            cache.remove(e.key)
            cache.put(e.key, files, old)
    stats, _, _ = compile_once(timer(extern_ms=1.0, fake_ms=2.0))
    assert stats.get("remeasured") == stats["kernels"]
    stats, _, _ = compile_once(untimed)
    assert stats.get("cached") == stats["kernels"]


def test_settled_is_defined_by_the_intervals():
    steady = Timing([1.0] * 20)
    assert decide({"inc": steady, "ch": Timing([2.0] * 20)}, "inc").settled  # a clear loser
    assert decide({"inc": steady, "ch": Timing([0.5] * 20)}, "inc").settled  # a clear winner
    near = Timing([1.0 - SETTLE_GAIN / 2] * 20)  # faster, but under the least gain: the incumbent stays, settled
    d = decide({"inc": steady, "ch": near}, "inc", min_gain=0.1)
    assert d.winner == "inc" and d.settled
    noisy = Timing([0.5] + [10.0] * 19)  # one call 2x faster, the rest ten times slower (preempted)
    d = decide({"inc": steady, "ch": noisy}, "inc")
    assert d.winner == "inc" and not d.settled and "could be 2.0x faster" in d.doubt and "unsettled" in d.summary()
    # a winner that another challenger could still beat by much is not settled either
    d = decide({"inc": Timing([4.0] * 20), "a": Timing([1.0] * 20), "b": Timing([0.5] + [9.0] * 19)}, "inc")
    assert d.winner == "a" and not d.settled


def test_compare_measures_an_unsettled_decision_again_within_its_budget():
    calls = []

    def t(fn, device):
        RAN.clear()
        fn()
        calls.append(bool(RAN))
        return 0.5 if RAN and len(calls) % 10 == 0 else 10.0 if RAN else 1.0

    def fake():
        RAN.append("fake")
    with using_timer(t):
        d = compare({"extern": lambda: None, "fake": fake}, "extern", device="cpu", warmup=0, reps=5, rounds=5,
                    max_reps=15)
    assert not d.settled and len(d.timings["extern"].samples) == 15 and len(calls) == 30  # three batches, no more
    with using_timer(lambda fn, device: (fn(), 1.0)[1]):
        d = compare({"extern": lambda: None, "fake": lambda: None}, "extern", device="cpu", warmup=0, reps=5)
    assert d.settled and len(d.timings["extern"].samples) == 5  # settled at once: one batch
