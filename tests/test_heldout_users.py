"""Held-out user programs (tests/heldout_users.py) under the default CPU pipeline: each call equal to eager, or
run eagerly with a warning. A CI-sized subset, plus the regressions the probe found.

The whole probe: `python tests/heldout_users.py`.
"""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
from heldout_users import PROGRAMS, deprecate_kwarg
from user_programs import GOOD, run, table

# quick to compile cold: an embedding renormalising its weight in place, FFTs and complex rotary, order
# statistics, bucketing, keyword-only and *args, out= arguments, einsum diagonals, slice writes into inputs,
# stable sorts, scatter/gather, cdist/cov, weighted embedding bags, an empty batch, dtypes changing between calls, one
# tensor passed as two written arguments
SUBSET = ["embedding_max_norm", "fft_roundtrip", "complex_rotary", "order_statistics", "bucketize_search_hist",
          "kwonly_defaults_varargs", "out_arguments", "einsum_diag_ellipsis", "slice_assign_inputs",
          "sort_stable_ties", "scatter_gather_index_put", "cdist_cov", "embedding_bag_weighted", "zero_size_batch",
          "dtype_changes", "one_tensor_twice_written"]


@pytest.mark.parametrize("name", SUBSET)
def test_program_equals_eager_or_runs_eagerly_with_a_warning(name):
    o = run(PROGRAMS[name], "static", state_aliases=False)
    assert o.kind in GOOD and o.kind != "skipped", table([o], verbose=True)
    assert o.calls == len(PROGRAMS[name].sizes) + 1, table([o])


# ------------------------------------------------------------------------------ regressions the probe found

REGISTRY: dict[str, object] = {}


def register(name: str):
    """A registering decorator, as model zoos write them (`@register_model`): it stores into a dict once, when
    the function is defined."""
    def deco(f):
        REGISTRY[name] = f
        return f
    return deco


def noted(value: float) -> float:
    REGISTRY.setdefault("defaults", []).append(value)
    return value


@register("gelu_scale")
def registered(a, b):
    return torch.nn.functional.gelu(a @ b.T) * 2


def with_noted_default(a, b, scale=noted(0.5)):  # noqa: B008 - what users write
    return (a + b).softmax(-1) * scale


@pytest.mark.parametrize("fn", [registered, with_noted_default])
def test_what_runs_once_at_definition_is_no_effect_of_the_call(fn):
    # a decorator or a default value that stores into a container ran when the function was defined: the
    # function is one traced graph (fullgraph=True would raise, were it split into a DyCL host program)
    cm = fxcc.compile(fn, fullgraph=True, options=dict(check_eager=False, time_vs_eager=False))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cm(a, b), fn(a, b))
    assert cm.fxcc.stats.eager_calls == 0


class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def _forward(self, x, scale=1.0):
        return self.a(x) * scale

    forward = deprecate_kwarg("factor", "scale")(_forward)


def test_a_wrapper_renaming_a_keyword_is_called_with_it_at_changing_sizes():
    # the recompile for a changed size named its dynamic sizes by the wrapped function's parameters, which
    # `factor` is not: it raised TypeError
    model = Renamed().eval()
    cm = fxcc.compile(model, options=dict(check_eager=False, time_vs_eager=False))
    with torch.no_grad():
        for n, factor in ((2, 3.0), (5, 3.0), (3, 0.5)):
            x = torch.randn(n, 4)
            torch.testing.assert_close(cm(x, factor=factor), model(x, factor=factor))
