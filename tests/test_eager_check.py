"""The first call of each compiled signature is compared with eager; where they differ, fxcc runs eagerly
and says so (fxcc.eager_check)."""

from __future__ import annotations

import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import eager_check


class TracesDifferently(nn.Module):
    """Computes something else under tracing, as transformers' mask helpers do (an explicit causal mask when
    tracing, none for an all-ones mask in eager)."""

    def forward(self, x):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return x * 2
        return x * 3


class BumpsState(nn.Module):
    def forward(self, x, state):
        state.add_(1)
        return x + state


def test_a_model_that_traces_differently_runs_eagerly_with_a_warning():
    cm = fxcc.compile(TracesDifferently())
    x = torch.ones(2, 3)
    with pytest.warns(UserWarning, match=r"fxcc: TracesDifferently: the compiled call differs from eager on this "
                                         r"call's inputs \(out differs by 0.333 of its scale\); this input "
                                         r"signature runs eagerly"):
        first = cm(x)
    torch.testing.assert_close(first, x * 3)
    torch.testing.assert_close(cm(x), x * 3)
    assert cm.eager_signatures == ["the compiled call differs from eager on this call's inputs (out differs by "
                                   "0.333 of its scale)"]
    assert cm.stats.eager_calls == 1


def test_an_agreeing_first_call_returns_the_compiled_result_and_mutates_inputs_once():
    cm = fxcc.compile(BumpsState())
    x, state = torch.zeros(3), torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cm(x, state), torch.ones(3))
    torch.testing.assert_close(state, torch.ones(3))  # eager ran on a copy
    assert cm.eager_signatures == [] and len(cm.variants) == 1


@pytest.mark.parametrize("how", ["option", "env"])
def test_the_check_can_be_turned_off(how, monkeypatch):
    if how == "env":
        monkeypatch.setenv("FXCC_CHECK_EAGER", "0")
        cm = fxcc.compile(TracesDifferently())
    else:
        cm = fxcc.compile(TracesDifferently(), options=fxcc.CompileOptions(check_eager=False))
    x = torch.ones(2)
    torch.testing.assert_close(cm(x), x * 2)  # what was traced, unchecked
    assert cm.eager_signatures == []


def test_approximate_passes_and_written_module_state_are_not_checked():
    assert eager_check.applies(None, exact=False) == "approximate passes"

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * self.calls

    cm = fxcc.compile(Counter(), options=fxcc.CompileOptions(check_eager=True))
    x = torch.ones(2)
    torch.testing.assert_close(cm(x), x)  # the buffer counts one call, not two
    assert eager_check.applies(cm.variants[0].gm, exact=True) == "writes module state"


class PlusOne(nn.Module):
    def forward(self, x):
        return x + 1


def test_a_compiled_call_that_raises_where_eager_does_not_runs_eagerly_with_a_warning():
    """A graph that fails when run (as a vmap traced out of its transform does: Nemotron ASR's masks)."""
    x = torch.ones(2, 3)
    first_call = eager_check.first_call(lambda flat: torch.mm(flat[0], flat[0]), PlusOne(),  # [2, 3] @ [2, 3]
                                        lambda a, k: list(a), (x,), {}, "PlusOne")
    torch.testing.assert_close(first_call.result, x + 1)
    assert first_call.reason.startswith("the compiled call differs from eager: it raised RuntimeError: ")
    assert first_call.reason.endswith("(eager did not)")


class WritesStateDifferently(nn.Module):
    """Writes into the tensor it is given otherwise under tracing (a compiled KV cache update gone wrong)."""

    def forward(self, x, state):
        k = 2 if torch.compiler.is_compiling() or torch.compiler.is_exporting() else 3
        state.add_(x * k)
        return x + state, state


def test_a_differing_first_call_leaves_the_callers_state_as_eager_does():
    cm = fxcc.compile(WritesStateDifferently())
    x, state = torch.ones(3), torch.zeros(3)
    with pytest.warns(UserWarning, match="the compiled call differs from eager"):
        out, returned = cm(x, state)
    torch.testing.assert_close(state, torch.full((3,), 3.0))  # eager's write once, not the compiled one's
    torch.testing.assert_close(out, torch.full((3,), 4.0))
    assert returned is state  # eager returns the caller's tensor, not the copy it ran on
    cm(x, state)  # the signature now runs eagerly, from the caller's state
    torch.testing.assert_close(state, torch.full((3,), 6.0))


def test_a_first_call_that_raises_leaves_the_callers_state_as_eager_does():
    x, state = torch.ones(3), torch.zeros(3)

    def compiled(flat):
        flat[1].add_(100)  # wrote before it failed
        raise RuntimeError("kernel failed")

    checked = eager_check.first_call(compiled, WritesStateDifferently(), lambda a, k: list(a), (x, state), {}, "W")
    torch.testing.assert_close(state, torch.full((3,), 3.0))
    assert checked.result[1] is state
