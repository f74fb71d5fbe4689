"""Hand-written decode loops (tests/heldout_decode.py) under fxcc: tokens, logits and the caller's caches equal
eager's, with a bounded number of compiles; a fast subset of the probe (two loops each, fewer tokens), then the
bugs it found, each in its smallest form.

The whole probe: `python tests/heldout_decode.py`.
"""

from __future__ import annotations

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
