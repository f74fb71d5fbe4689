"""In-place writes into tensors a forward reaches that are none of its inputs (a global, a default value, a
closure variable, an attribute of an argument object or of a module): capture runs the forward's Python on them
for real, so without care the write lands once more at capture. Each test compares successive calls with eager,
outputs and the written tensor after every call."""

from __future__ import annotations

import copy
import warnings

import fxcc
import globals_helper
import pytest
import torch
import torch.nn as nn
from fxcc.capture import CaptureError, capture

PASSES = "fuse,codegen{backend=extern}"
CALLS = 5

G = torch.zeros(3)
D = torch.zeros(3)


def global_write(x):
    G.add_(1)
    return x * 2 + G


def default_write(x, t=D):
    t.add_(1)
    return x * 2 + t


class Holder:
    def __init__(self):
        self.t = torch.zeros(3)


def attribute_write(x, obj):
    obj.t.add_(1)
    return x * 2 + obj.t


def bump():
    G.mul_(2).add_(1)


def callee_write(x):
    bump()
    return x - G


def closure_write():
    k = torch.zeros(3)

    def f(x):
        k.add_(1)
        return x * 2 + k

    return f, k


class Inner:
    def __init__(self):
        self.t = torch.zeros(3)


class PlainAttributes(nn.Module):
    """Tensors held as plain attributes (not buffers) of the module and of an object it holds."""

    def __init__(self):
        super().__init__()
        self.t = torch.zeros(3)
        self.o = Inner()
        self.register_buffer("b", torch.zeros(3))

    def forward(self, x):
        self.t.add_(1)
        self.o.t.add_(2)
        self.b.add_(3)
        return x * 2 + self.t + self.o.t + self.b


def check(fn, fresh, calls: int = CALLS, compiled=None):
    """`fn` (or `compiled`) through fxcc against eager over `calls` successive calls, each side from fresh state:
    `fresh()` resets what `fn` writes and returns (its arguments, the tensors it writes). Equal outputs and equal
    written tensors after every call; returns the compiled function and the warnings it gave."""
    args, written = fresh()
    want = []
    for _ in range(calls):
        out = fn(*args)
        want.append((out, [t.clone() for t in written]))
    args, written = fresh()
    if compiled is None:
        compiled = fxcc.compile(fn, passes=PASSES, options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (out, state) in enumerate(want):
            got = compiled(*args)
            assert torch.equal(got, out), f"call {i}: output {got.tolist()}, eager {out.tolist()}"
            for t, s in zip(written, state):
                assert torch.equal(t, s), f"call {i}: written tensor {t.tolist()}, eager {s.tolist()}"
    return compiled, [str(w.message) for w in caught]


def ran_compiled(messages: list[str]) -> None:
    assert not [m for m in messages if "eagerly" in m], messages


def reset(*ts: torch.Tensor) -> None:
    for t in ts:
        t.zero_()


def test_a_global_tensor_written_in_place_is_written_once_per_call():
    x = torch.ones(3)

    def fresh():
        reset(G)
        return (x,), [G]

    compiled, messages = check(global_write, fresh)
    ran_compiled(messages)
    # a DyCL host program makes the write, on the caller's tensor, at every call
    assert any("writes `G` in place" in r for r in compiled.fxcc.stats.reasons), compiled.fxcc.stats.reasons


@pytest.mark.parametrize("fn, written", [(callee_write, G), (default_write, D)], ids=["callee", "default-argument"])
def test_a_tensor_written_by_a_callee_or_as_a_default_argument_is_written_once_per_call(fn, written):
    x = torch.ones(3)

    def fresh():
        reset(written)
        return (x,), [written]

    _, messages = check(fn, fresh)
    ran_compiled(messages)


def test_a_tensor_passed_for_a_defaulted_parameter_is_an_input():
    x, t = torch.ones(3), torch.zeros(3)

    def fresh():
        reset(t, D)
        return (x, t), [t, D]

    compiled, messages = check(default_write, fresh)
    ran_compiled(messages)
    assert all(v.gm is not None for v in compiled.fxcc.variants), "an input written in place is one graph's work"


def test_an_attribute_of_an_argument_object_written_in_place_is_written_once_per_call():
    x, obj = torch.ones(3), Holder()

    def fresh():
        reset(obj.t)
        return (x, obj), [obj.t]

    _, messages = check(attribute_write, fresh)
    ran_compiled(messages)


def test_a_closure_tensor_written_in_place_is_written_once_per_call():
    x = torch.ones(3)
    f, k = closure_write()

    def fresh():
        reset(k)
        return (x,), [k]

    _, messages = check(f, fresh)
    ran_compiled(messages)


def test_plain_tensor_attributes_of_a_module_written_in_place_are_written_once_per_call():
    x = torch.ones(3)
    eager = PlainAttributes()
    twin = copy.deepcopy(eager)
    compiled = fxcc.compile(twin, passes=PASSES, options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))
    for i in range(CALLS):
        want, got = eager(x), compiled(x)
        assert torch.equal(got, want), f"call {i}: output {got.tolist()}, eager {want.tolist()}"
        for a, b in ((eager.t, twin.t), (eager.o.t, twin.o.t), (eager.b, twin.b)):
            assert torch.equal(a, b), f"call {i}: {b.tolist()}, eager {a.tolist()}"


def write(t):
    t.add_(1)


def passes_global(x):
    write(G)
    return x * 2 + G


def test_a_global_written_by_a_callee_through_its_parameter_matches_eager():
    """The source read finds no write into a global here (`write` writes its parameter): capture gives `G` its
    values back and the graph, which holds `G` itself as a constant, makes the write at each call."""
    x = torch.ones(3)

    def fresh():
        reset(G)
        return (x,), [G]

    check(passes_global, fresh)


def test_a_write_the_graph_does_not_make_runs_eagerly_with_a_warning():
    """A write through `.data` is not in export's graph, and DyCL cannot read a function defined by exec: the
    function runs eagerly, said once."""
    scope = {"G": G}
    exec("def f(x):\n    G.data.add_(1)\n    return x * 2 + G\n", scope)  # noqa: S102 - no source for DyCL
    x = torch.ones(3)

    def fresh():
        reset(G)
        return (x,), [G]

    _, messages = check(scope["f"], fresh)
    assert [m for m in messages if "runs eagerly" in m and "`G`" in m], messages


def test_a_global_write_in_a_function_without_source_matches_eager():
    """DyCL cannot read the source: capture itself leaves the global as it was and the graph makes the write."""
    scope = {"G": G}
    exec("def f(x):\n    G.add_(1)\n    return x * 2 + G\n", scope)  # noqa: S102 - no source for DyCL to read
    x = torch.ones(3)

    def fresh():
        reset(G)
        return (x,), [G]

    check(scope["f"], fresh)


# ------------------------------------------------------------------------------------------- capture itself


class GlobalWriter(nn.Module):
    def forward(self, x):
        G.add_(1)
        return x * 2 + G


class ObjectWriter(nn.Module):
    def forward(self, x, obj):
        obj.t.add_(1)
        return x * 2 + obj.t


def test_capture_leaves_a_global_as_it_was_and_its_graph_makes_the_write():
    reset(G)
    x = torch.ones(3)
    cap = capture(GlobalWriter(), (x,), {})
    assert torch.equal(G, torch.zeros(3)), "capture wrote into the global"
    (out,) = cap.gm(x)
    assert torch.equal(G, torch.ones(3)) and torch.equal(out, x * 2 + 1)


def test_a_write_the_traced_graph_would_not_make_is_a_capture_error_naming_the_tensor():
    """export cannot take a plain object argument; symbolic_trace runs `obj.t.add_(1)` on the real tensor and
    records nothing: the capture is refused, and the tensor holds what it held."""
    obj = Holder()
    with pytest.raises(CaptureError, match="obj"):
        capture(ObjectWriter(), (torch.ones(3), obj), {})
    assert torch.equal(obj.t, torch.zeros(3)), "capture wrote into the argument's attribute"


# ------------------------------------------- writes the source reader cannot see: the graph's own, accepted


BUF = torch.zeros(3)
DEF = torch.zeros(3)


class Accumulates(nn.Module):
    """Its forward passes a global to a helper of another file that writes its parameter in place: no source the
    reader sees writes `BUF`, so one graph makes the write at each call."""

    def forward(self, x):
        globals_helper.accumulate(BUF, x)
        return x * 2 + BUF


def accumulates_default(x, t=DEF):
    globals_helper.accumulate(t, x)
    return x * 2 + t


def accumulates_closure():
    k = torch.zeros(3)

    def f(x):
        globals_helper.accumulate(k, x)
        return x * 2 + k

    return f, k


def accumulates_attribute(x, obj):
    globals_helper.accumulate(obj.t, x)
    return x * 2 + obj.t


def _sequence(make, fresh, steps):
    """`steps` ("call", or a function given the written tensor: the user's own change between calls) run on eager
    and then on `make()`'s compiled function, each from `fresh()` state ((arguments, written tensor)): equal
    outputs and written tensor after every call. Returns the compiled function and the compile counts seen after
    each call."""
    args, t = fresh()
    want = []
    for step in steps:
        if step == "call":
            want.append((make.eager(*args), t.clone()))
        else:
            step(t)
    args, t = fresh()
    compiled, calls, counts = make(), iter(want), []
    for i, step in enumerate(steps):
        if step != "call":
            step(t)
            continue
        out, state = next(calls)
        got = compiled(*args)
        assert torch.equal(got, out), f"step {i}: output {got.tolist()}, eager {out.tolist()}"
        assert torch.equal(t, state), f"step {i}: written tensor {t.tolist()}, eager {state.tolist()}"
        counts.append(_stats(compiled).compiles)
    return compiled, counts


def _stats(compiled):
    return _runtime(compiled).stats


def _runtime(compiled):
    """The CompiledModule behind what fxcc.compile returned (a module's, or a function's `.fxcc`)."""
    return compiled if isinstance(compiled, fxcc.runtime.CompiledModule) else compiled.fxcc


class _Make:
    """The function (or module) compiled for `_sequence`: `eager` runs it as it is."""

    def __init__(self, fn):
        self.eager = fn

    def __call__(self):
        opts = fxcc.CompileOptions(graph_cache=False, passes=PASSES, time_vs_eager=False, check_eager=False)
        return fxcc.compile(self.eager, options=opts)


def _by(case):
    """(what `_sequence` compiles, fresh state) for each way the written tensor is reached."""
    x = torch.ones(3)
    if case == "global":
        return _Make(Accumulates()), lambda: ((x,), reset(BUF) or BUF)
    if case == "default argument":
        return _Make(accumulates_default), lambda: ((x,), reset(DEF) or DEF)
    if case == "closure":
        f, k = accumulates_closure()
        return _Make(f), lambda: ((x,), reset(k) or k)
    obj = Holder()
    return _Make(accumulates_attribute), lambda: ((x, obj), reset(obj.t) or obj.t)


WAYS = ["global", "default argument", "closure", "argument's attribute"]


@pytest.mark.parametrize("case", WAYS)
def test_a_tensor_the_graph_itself_writes_is_no_change_of_its_state(case):
    """The graph's own write into a tensor it reached (through a helper's parameter: DyCL sees none) is accepted
    after the call (fxcc.guards.Globals.accept_writes): one compile serves every call."""
    make, fresh = _by(case)
    compiled, counts = _sequence(make, fresh, ["call"] * CALLS)
    assert counts == [1] * CALLS, _stats(compiled).reasons
    if case != "argument's attribute":  # export takes no plain object argument: a DyCL program makes that write
        assert all(v.gm is not None for v in _runtime(compiled).variants), "one graph makes the write"


@pytest.mark.parametrize("case", WAYS)
def test_the_users_own_change_between_calls_is_still_seen(case):
    """A change the graph did not make (the user's `fill_` between calls) is read or recompiles: never a stale
    value."""
    make, fresh = _by(case)
    compiled, counts = _sequence(make, fresh, ["call", "call", lambda t: t.fill_(7), "call", "call",
                                               lambda t: t.mul_(-1), "call"])
    assert counts[:2] == [1, 1], _stats(compiled).reasons


def writes_for_long_inputs(x):
    if x.shape[0] > 3:
        globals_helper.accumulate(BUF, x)
    return x + BUF * 2


def test_a_write_one_variant_makes_is_a_change_for_a_variant_that_folded_the_tensor():
    """The variant for short inputs reads `BUF` only, and folds `BUF * 2` into a constant; the one for long inputs
    writes it. That write is a change for the first: it recompiles, and never serves the old constant."""
    short, long = torch.ones(2, 3), torch.ones(4, 3)
    steps = [short, long, short, long, short]
    reset(BUF)
    want = [(writes_for_long_inputs(x), BUF.clone()) for x in steps]
    reset(BUF)
    passes = "canonicalize,fuse,codegen{backend=extern}"
    opts = fxcc.CompileOptions(graph_cache=False, passes=passes, time_vs_eager=False, check_eager=False)
    compiled = fxcc.compile(writes_for_long_inputs, options=opts)
    for i, (x, (out, state)) in enumerate(zip(steps, want)):
        got = compiled(x)
        assert torch.equal(got, out), f"call {i}: output {got.tolist()}, eager {out.tolist()}"
        assert torch.equal(BUF, state), f"call {i}: BUF {BUF.tolist()}, eager {state.tolist()}"
    assert any(r.result.stats.get("folded") for v in compiled.fxcc.variants if v.gm is not None for r in v.records
               if r.spec.startswith("canonicalize")), "the short variant folds `BUF * 2`"

