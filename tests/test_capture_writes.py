"""In-place writes into tensors a forward reaches that are none of its inputs (a global, a default value, a
closure variable, an attribute of an argument object or of a module): capture runs the forward's Python on them
for real, so without care the write lands once more at capture. Each test compares successive calls with eager,
outputs and the written tensor after every call."""

from __future__ import annotations

import copy
import warnings

import fxcc
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
