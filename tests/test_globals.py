"""Compiled code follows the Python globals it read: a rebound global (or one changed in place) recompiles, with
the global named in the reason, and a store into an unrelated global does not (fxcc.capture.global_reads,
fxcc.guards.Globals)."""

from __future__ import annotations

import sys
import warnings

import fxcc
import globals_helper
import pytest
import torch
import torch.nn as nn
from fxcc import dycl

PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: no timing at compile
HERE = sys.modules[__name__]

SCALE = 2.0
STEPS = 3
W = torch.ones(8)
ACT = torch.relu
GAIN = 1.5
UNRELATED = 0
CONFIG = {"shift": 1.0}


def scaled(x):
    return x * SCALE + W


def stepped(x):
    for _ in range(STEPS):
        x = x * 0.5
    return x


class Act(nn.Module):
    def forward(self, x):
        return ACT(x) * 2


class Child(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * GAIN


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = Child()

    def forward(self, x):
        return self.child(x) + 1


class UsesHelper(nn.Module):
    def forward(self, x):
        return globals_helper.scaled(x) + globals_helper.OFFSET


class UsesLen(nn.Module):
    def forward(self, x):
        return x * len(x.shape)


class UsesConfig(nn.Module):
    def forward(self, x):
        return x + CONFIG["shift"]


class Knobs:
    scale = 2.0


class UsesKnobs(nn.Module):
    def forward(self, x):
        return x * Knobs.scale


class Branchy(nn.Module):
    """Data-dependent control flow: a DyCL host program whose segments read SCALE."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.lin(x)) * SCALE
        if h.sum() > 0:
            return h + 1
        return h - 1


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(4, 8)


def _follows(cm, eager, x, reason: str | None, caplog) -> None:
    """The compiled call equals eager's (under the recompile reason `reason`, which the log and the compile's
    recorded reasons name)."""
    compiles = cm.stats.compiles
    caplog.clear()
    with caplog.at_level("INFO", logger="fxcc.recompiles"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback, no first-call difference from eager
        torch.testing.assert_close(cm(x), eager(x))
    if reason is not None:
        assert cm.stats.compiles == compiles + 1
        assert reason in caplog.text
        assert reason in cm.stats.reasons[-1]
    torch.testing.assert_close(cm(x), eager(x))  # the next call, on the fast path


def _compiled(fn):
    return fxcc.compile(fn, passes=PASSES)


def test_a_rebound_float_recompiles_with_the_global_named(x, monkeypatch, caplog):
    cf = _compiled(scaled)
    torch.testing.assert_close(cf(x), scaled(x))
    monkeypatch.setattr(HERE, "SCALE", 5.0)
    _follows(cf.fxcc, scaled, x, f"global SCALE of module {__name__} changed: 2.0 -> 5.0", caplog)
    monkeypatch.setattr(HERE, "SCALE", 5.0 + 0.0)  # an equal value rebound: no change
    _follows(cf.fxcc, scaled, x, None, caplog)
    assert cf.fxcc.stats.compiles == 2


def test_a_rebound_int_recompiles(x, monkeypatch, caplog):
    cf = _compiled(stepped)
    torch.testing.assert_close(cf(x), stepped(x))
    monkeypatch.setattr(HERE, "STEPS", 5)
    _follows(cf.fxcc, stepped, x, "global STEPS", caplog)


def test_a_rebound_tensor_recompiles(x, monkeypatch, caplog):
    cf = _compiled(scaled)
    cf(x)
    monkeypatch.setattr(HERE, "W", torch.zeros(8))
    _follows(cf.fxcc, scaled, x, "global W", caplog)


def test_a_global_tensor_changed_in_place_recompiles(x, monkeypatch, caplog):
    monkeypatch.setattr(HERE, "W", torch.ones(8))
    cf = _compiled(scaled)
    cf(x)
    W.add_(1)
    _follows(cf.fxcc, scaled, x, "global W of module test_globals (a tensor) changed in place", caplog)
    with torch.no_grad():
        W.data.mul_(3)  # through `.data`: no version bump; the snapshot sees it
    _follows(cf.fxcc, scaled, x, "(a tensor) changed in place", caplog)


def test_a_rebound_function_in_a_module_forward_recompiles(x, monkeypatch, caplog):
    m = Act()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    monkeypatch.setattr(HERE, "ACT", torch.tanh)
    _follows(cm, m, x, "global ACT of module test_globals changed: torch", caplog)


def test_a_global_read_only_in_a_child_modules_forward_is_guarded(x, monkeypatch, caplog):
    m = Parent().eval()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    monkeypatch.setattr(HERE, "GAIN", -3.0)
    _follows(cm, m, x, "global GAIN", caplog)


def test_a_global_read_in_a_dycl_segment_rebuilds_the_segment(x, monkeypatch, caplog):
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)  # compile the small segments
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)  # compiled, not chosen by timing
    torch.manual_seed(0)
    m = Branchy().eval()
    cm = fxcc.compile(m, passes=PASSES)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))
        assert isinstance(cm.variants[0], dycl.DyclVariant)
        segments = [s for p in cm.variants[0].program.all_programs() for s in p.segments]
        assert any(r.variant is not None for s in segments for r in s.runs.values())
        monkeypatch.setattr(HERE, "SCALE", -4.0)
        caplog.clear()
        with caplog.at_level("INFO", logger="fxcc.recompiles"):
            torch.testing.assert_close(cm(x), m(x))
            torch.testing.assert_close(cm(-x), m(-x))
        assert "global SCALE of module test_globals changed: 2.0 -> -4.0" in caplog.text


def test_a_global_of_an_imported_helper_module_is_guarded(x, monkeypatch, caplog):
    m = UsesHelper()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    monkeypatch.setattr(globals_helper, "SCALE", 7.0)  # read in the helper's function
    _follows(cm, m, x, "global SCALE of module globals_helper changed: 2.0 -> 7.0", caplog)
    monkeypatch.setattr(globals_helper, "OFFSET", torch.full((8,), -2.0))  # read as `globals_helper.OFFSET`
    _follows(cm, m, x, "global OFFSET of module globals_helper", caplog)


def test_a_builtin_shadowed_in_the_module_recompiles(x, monkeypatch, caplog):
    m = UsesLen()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    monkeypatch.setattr(HERE, "len", lambda s: 10, raising=False)  # `len` rebound in the model's module
    _follows(cm, m, x, "global len of module test_globals changed: builtins.len -> ", caplog)


def test_a_global_dict_changed_in_place_recompiles(x, monkeypatch, caplog):
    monkeypatch.setattr(HERE, "CONFIG", {"shift": 1.0})
    m = UsesConfig()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    CONFIG["shift"] = 4.0
    _follows(cm, m, x, "global CONFIG of module test_globals (a dict) changed in place", caplog)


def test_a_class_attribute_read_through_a_global_is_guarded(x, monkeypatch, caplog):
    m = UsesKnobs()
    cm = fxcc.compile(m, passes=PASSES)
    cm(x)
    monkeypatch.setattr(Knobs, "scale", -1.0)
    _follows(cm, m, x, "attribute scale of a class a global holds changed: 2.0 -> -1.0", caplog)


def test_an_unrelated_global_store_does_not_recompile(x, monkeypatch, caplog):
    cf = _compiled(scaled)
    cf(x)
    for i in range(3 * 8):  # more stores than a dict's tag may move before it is compared name by name
        monkeypatch.setattr(HERE, "UNRELATED", i)
        _follows(cf.fxcc, scaled, x, None, caplog)
    assert cf.fxcc.stats.compiles == 1
    monkeypatch.setattr(HERE, "SCALE", 3.0)  # the one it read, after that: still seen
    _follows(cf.fxcc, scaled, x, "global SCALE", caplog)


def test_a_graph_cache_entry_is_not_used_once_a_global_it_read_holds_another_value(x, monkeypatch, caplog):
    opts = fxcc.CompileOptions(check_eager=False)
    first = fxcc.compile(Act(), passes=PASSES, options=opts)
    first(x)
    monkeypatch.setattr(HERE, "ACT", torch.sigmoid)
    m = Act()
    second = fxcc.compile(m, passes=PASSES, options=opts)  # same model, same key: the entry holds relu
    torch.testing.assert_close(second(x), m(x))
    monkeypatch.setattr(HERE, "ACT", torch.relu)
    third = fxcc.compile(Act(), passes=PASSES, options=opts)  # a hit again: still guarded
    third(x)
    assert "IR from the graph cache" in third.variants[0].captured.method
    monkeypatch.setattr(HERE, "ACT", torch.tanh)
    _follows(third, m, x, "global ACT", caplog)


DEFAULT = torch.ones(8)
ONES = torch.ones(8)


def with_default(x, t=DEFAULT):
    return x + t * 2


def with_keyword_default(x, *, t=DEFAULT):
    return x * t.sum()


class DefaultInForward(nn.Module):
    def forward(self, x, t=DEFAULT):
        return x + t * 3


@pytest.mark.parametrize("fn", [with_default, with_keyword_default, DefaultInForward()],
                         ids=["positional", "keyword-only", "module-forward"])
def test_a_default_tensor_changed_in_place_recompiles(fn, x, monkeypatch, caplog):
    """Export makes a default tensor the call does not override a constant of the graph (canonicalize may fold
    it): changed in place afterwards, the next call must see the new value, not the constant."""
    monkeypatch.setattr(DEFAULT, "data", torch.ones(8))
    cf = _compiled(fn)
    cm = cf if isinstance(cf, fxcc.CompiledModule) else cf.fxcc
    torch.testing.assert_close(cf(x), fn(x))
    with torch.no_grad():
        DEFAULT.fill_(5.0)
    _follows(cm, fn, x, "default value of parameter t of", caplog)


def test_a_rebound_default_tensor_is_read(x):
    def f(x, t=ONES):
        return x + t * 2

    cf = _compiled(f)
    torch.testing.assert_close(cf(x), f(x))
    f.__defaults__ = (torch.full((8,), 3.0),)
    torch.testing.assert_close(cf(x), f(x))


# ----------------------------------------------------------- a module read through a global or a closure variable


class Gated(nn.Module):
    """Two linears of one input (merge-linears copies their weights into one constant), a primitive attribute and
    a name it looks up and may not find."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.k = 2.0

    def forward(self, x):
        return self.a(x) * self.b(x) * self.k * getattr(self, "scale", 1.0)


GATED = None  # set by each test


def through_a_global(x):
    return GATED(x) + 1


def _through_a_closure(model):
    def fn(x):
        return model(x) + 1

    return fn


MODULE_CHANGES = {  # each changes what the module read computes; the reason its recompile gives
    "an attribute it looked up added": (lambda m: setattr(m, "scale", 3.0), "attribute GATED.scale was added"),
    "a primitive attribute": (lambda m: setattr(m, "k", 5.0), "attribute GATED.k changed from 2.0 to 5.0"),
    "a submodule replaced": (lambda m: setattr(m, "b", nn.Linear(8, 8)), "submodule GATED.b was replaced"),
    "a merged weight written in place": (lambda m: m.a.weight.data.mul_(3), "the contents of GATED.a.weight changed"),
    "a merged weight's .data replaced": (lambda m: setattr(m.a.weight, "data", torch.randn(8, 8)),
                                         "the contents of GATED.a.weight changed"),
}


@pytest.mark.parametrize("how", list(MODULE_CHANGES))
@pytest.mark.parametrize("via", ["global", "closure"])
def test_a_module_a_compiled_function_reads_outside_its_arguments_is_guarded(via, how, x, monkeypatch, caplog):
    """A compiled function that calls a module it reads as a global or a closure variable depends on that module's
    state as a compiled model does on its own (its weights are constants of the graph, folded by merge-linears)."""
    torch.manual_seed(0)
    model = Gated().eval()
    monkeypatch.setattr(HERE, "GATED", model)
    fn = through_a_global if via == "global" else _through_a_closure(model)
    cm = fxcc.compile(fn, passes="canonicalize,raise,merge-linears,fuse,codegen{backend=extern}").fxcc
    torch.testing.assert_close(cm(x), fn(x))
    before = fn(x)
    change, reason = MODULE_CHANGES[how]
    with torch.no_grad():
        change(model)
    assert not torch.allclose(fn(x), before)
    _follows(cm, fn, x, reason if via == "global" else reason.replace("GATED", "model"), caplog)


@pytest.mark.parametrize("via", ["global", "closure"])
def test_an_attribute_no_compiled_code_looked_up_added_to_a_module_read_outside_does_not_recompile(via, x, monkeypatch):
    torch.manual_seed(0)
    model = Gated().eval()
    monkeypatch.setattr(HERE, "GATED", model)
    fn = through_a_global if via == "global" else _through_a_closure(model)
    cm = _compiled(fn).fxcc
    torch.testing.assert_close(cm(x), fn(x))
    model.note, model.a.note = "a user's note", 3
    torch.testing.assert_close(cm(x), fn(x))
    assert cm.stats.compiles == 1
    model.scale = 3.0  # the name it looked up
    torch.testing.assert_close(cm(x), fn(x))
    assert cm.stats.compiles == 2 and "attribute" in cm.stats.reasons[-1] and ".scale was added" in cm.stats.reasons[-1]


class CallsGated(nn.Module):
    def forward(self, x):
        return GATED(x) - 1


@pytest.mark.parametrize("how", ["an attribute it looked up added", "a primitive attribute", "a submodule replaced"])
def test_a_module_a_forward_reads_as_a_global_is_guarded_and_its_stored_graph_not_reused(how, x, monkeypatch, caplog):
    """A model's forward that calls a module it reads as a global: a change of that module recompiles, and the
    recompile does not take the graph the first compile stored in the graph cache (its key does not cover the
    global module's state; its stored globals do)."""
    torch.manual_seed(0)
    monkeypatch.setattr(HERE, "GATED", Gated().eval())
    m = CallsGated().eval()
    for _ in range(2):  # the second finds the graph the first stored
        cm = _compiled(m)
        torch.testing.assert_close(cm(x), m(x))
    assert "IR from the graph cache" in cm.variants[0].captured.method
    change, reason = MODULE_CHANGES[how]
    change(GATED)
    _follows(cm, m, x, reason, caplog)
    assert "IR from the graph cache" not in cm.variants[-1].captured.method
