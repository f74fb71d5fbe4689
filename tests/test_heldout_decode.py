"""Hand-written decode loops (tests/heldout_decode.py) under fxcc: tokens, logits and the caller's caches equal
eager's, with a bounded number of compiles; a fast subset of the probe (two loops each, fewer tokens), then the
bugs it found, each in its smallest form.

The whole probe: `python tests/heldout_decode.py`.
"""

from __future__ import annotations

import logging
import warnings

import fxcc
import heldout_decode as hd
import pytest
import torch
import torch.nn as nn

# programs that the probe finds equal with at most the compiles it allows (the others: the probe's report)
SUBSET = ["gpt_fast_setitem", "torch_gpt_fast_dynamic", "step_fn_weights"]


@pytest.mark.parametrize("name", SUBSET)
def test_decode_loop_equals_eager(name, monkeypatch):
    monkeypatch.setattr(hd, "STEPS", 8)
    r = hd.run(hd.PROGRAMS[name], loops=((5, 2), (9, 2)))
    assert r.outcome == "equal", hd.table([r], verbose=True)


def _compiles(names: list[str]) -> logging.Handler:
    class Seen(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith(("compiling ", "recompiling ")):
                names.append(msg.split(" ", 1)[1].split(":")[0])
    return Seen(logging.INFO)


def test_a_dycl_segment_given_a_growing_int_compiles_it_symbolic():
    """A list cache appended to is a DyCL host program; its first segment takes the cache length, an int that grows
    at every token. A segment baked its ints, so it compiled once per value: per token."""
    torch.manual_seed(0)
    model = hd.ListCache().eval()
    cm = fxcc.compile(model, passes=hd.FAST, options=dict(time_vs_eager=False, check_eager=False))
    names: list[str] = []
    handler = _compiles(names)
    logs = [logging.getLogger("fxcc.runtime"), logging.getLogger("fxcc.recompiles")]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        cache: list = []
        x = hd._prompt(5, 2)
        with torch.no_grad():
            for _ in range(10):
                x = cm(x, cache)[:, -1:].argmax(-1)
    finally:
        for lg, level in zip(logs, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert names.count("ListCache.seg0") == 2, names  # static at start 0, then symbolic


def test_a_function_given_a_module_as_an_argument_runs_as_eager():
    """gpt-fast's `decode_one_token(model, x, input_pos)`: export lifted the module argument's weights as graph
    inputs that no call supplied (a TypeError at the first compiled call); it runs eagerly, with a warning, or as
    a host program whose segments bind the module."""
    lin = nn.Linear(4, 4)

    def step(m, x):
        return m(x).relu()

    compiled = fxcc.compile(step, options=dict(check_eager=False, time_vs_eager=False, passes=hd.FAST))
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(compiled(lin, x), step(lin, x))
    if compiled.fxcc.stats.eager_calls:
        assert any("given a module" in str(w.message) for w in caught)


class Window(nn.Module):
    """Reads a window at a position held in a dict argument, as a hand-written cache holds its length."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, meta: dict) -> torch.Tensor:
        start = meta["len"]
        return self.lin(x[:, start:start + 2]).relu() + start


def test_an_int_in_a_dict_argument_that_changes_compiles_once_symbolic():
    """An int inside a container argument was a constant of every compile: a cache length in a dict compiled once
    per token, then (past max_variants) ran eagerly."""
    torch.manual_seed(0)
    model = Window().eval()
    cm = fxcc.compile(model, passes=hd.FAST, options=dict(time_vs_eager=False, check_eager=False))
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        for n in range(10):
            torch.testing.assert_close(cm(x, {"len": n}), model(x, {"len": n}))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0, cm.stats.reasons


def test_an_int_position_that_is_0_at_a_prefill_stays_symbolic_for_the_decode_steps():
    """`pos` 0 at the second prompt's prefill: its capture with `pos` symbolic failed (export specializes 0), which
    kept `pos` a constant for that input structure from then on, and every decode step after compiled again."""
    torch.manual_seed(0)
    model = hd.PosArg().eval()
    cm = fxcc.compile(model, passes=hd.FAST, options=dict(time_vs_eager=False, check_eager=False))
    loop = hd.pos_loop(False)
    with torch.no_grad():
        loop(cm, model, hd._prompt(5, 2), steps=4)
        loop(cm, model, hd._prompt(9, 2), steps=2)
        compiles = cm.stats.compiles
        loop(cm, model, hd._prompt(9, 2), steps=6)
    assert cm.stats.compiles == compiles and cm.stats.eager_calls == 0, cm.stats.reasons
