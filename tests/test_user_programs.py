"""Hand-written user programs (tests/user_programs.py) under the default CPU pipeline: each call equal to eager
(outputs with their dtypes, shapes, strides and aliasing; inputs and module buffers afterwards), or run eagerly
with a warning; never an exception eager does not raise. A CI-sized subset, plus the regressions the suite found.

The whole suite: `python tests/user_programs.py`.
"""

from __future__ import annotations

import copy
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from user_programs import GOOD, PROGRAMS, run, table

OPTS = dict(check_eager=False, time_vs_eager=False)  # fxcc's own code, not its first-call safety net

# quick to compile cold, and between them: data-dependent shapes, scatter/gather, ints and bools, float64 and
# bfloat16, in-place writes to inputs and through views, aliases, nested outputs, keyword and scalar arguments,
# buffers, empty and 0-d tensors, layouts, errors eager raises, state changed between calls
SUBSET = ["masked_select", "unique", "scatter", "index_add_put", "einsum", "ints", "bools", "float64", "bfloat16",
          "inplace_inputs", "view_writes", "return_aliases", "structured_outputs", "kwargs_only", "buffer_writes",
          "empty_tensors", "zero_dim", "non_contiguous", "same_tensor_twice", "raises_for_some", "weights_change"]
DYNAMIC = ["masked_select", "scatter", "view_writes", "kwargs_only", "empty_tensors"]


@pytest.mark.parametrize("mode,name", [("static", n) for n in SUBSET] + [("dynamic", n) for n in DYNAMIC])
def test_program_equals_eager_or_runs_eagerly_with_a_warning(name, mode):
    o = run(PROGRAMS[name], mode)
    assert o.kind in GOOD and o.kind != "skipped", table([o], verbose=True)
    assert o.calls == len(PROGRAMS[name].sizes) + 1, table([o])  # every call made (the first size twice)


# ------------------------------------------------------------------------------ regressions the suite found


def test_batchnorm_in_training_mode_in_a_segment_updates_running_stats_once_per_call():
    """A DyCL segment's build ran the segment for its timing and checks: each run moved the running stats."""
    o = run(PROGRAMS["running_stats"], "static")
    assert o.kind == "ok", table([o], verbose=True)


def test_a_generator_argument_draws_as_in_eager_from_the_first_call():
    """Capture and example runs drew from the call's own torch.Generator: the first call sampled other tokens."""
    o = run(PROGRAMS["sampling"], "static")
    assert o.kind == "eager" and "torch.Generator of its own" in o.detail, table([o], verbose=True)


def test_returned_views_share_memory_with_their_base_as_in_eager():
    """fuse made `y.view(-1)`, returned next to `y`, a second output of y's kernel: a copy, not a view."""
    def f(x):
        y = x * 2
        return y, y.view(-1), y[0], y.unsqueeze(0).expand(2, -1, -1)

    y, flat, row, wide = fxcc.compile(f, options=OPTS)(torch.randn(4, 3))
    assert all(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in (flat, row, wide))
    y.add_(1)
    assert torch.equal(flat.view(4, 3), y) and torch.equal(row, y[0]) and torch.equal(wide[1], y)
    o = run(PROGRAMS["output_aliases"], "static")
    assert o.kind == "ok", table([o], verbose=True)


def _without_source(code: str) -> dict:
    """Definitions made by exec: Python has no source for them (as in `python -c` or a file edited since)."""
    ns = {"torch": torch, "nn": nn}
    exec(code, ns)  # noqa: S102 - the test's own fixed text
    return ns


def test_a_function_neither_export_nor_dycl_can_take_runs_eagerly_with_a_warning():
    f = _without_source("def to_numpy(x):\n    return torch.from_numpy((x * 2).numpy().copy()) + 1\n")["to_numpy"]
    x = torch.randn(3, 2)
    with pytest.warns(UserWarning, match=r"to_numpy runs eagerly: .*numpy"):
        got = fxcc.compile(f, options=OPTS)(x)
    assert torch.equal(got, f(x))


def test_an_attribute_store_in_a_forward_without_source_runs_eagerly_with_a_warning():
    """Without its source DyCL saw no store, and export's graph baked `self.calls` at its traced value."""
    ns = _without_source(
        "class Counting(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.l = nn.Linear(3, 3)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        return self.l(x) * self.calls\n")
    m = ns["Counting"]().eval()
    e = copy.deepcopy(m)
    cm = fxcc.compile(m, options=OPTS)
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"Counting runs eagerly: .*changed attribute `calls` while traced"):
        cm(x)
    e(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        for _ in range(2):
            assert torch.equal(cm(x), e(x))
    assert m.calls == e.calls == 3


def test_a_forward_without_source_and_without_effects_still_compiles():
    ns = _without_source(
        "class Plain(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.l = nn.Linear(3, 3)\n"
        "    def forward(self, x):\n"
        "        return self.l(x).relu()\n")
    m = ns["Plain"]().eval()
    cm = fxcc.compile(m, options=OPTS)
    x = torch.randn(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.eager_calls == 0 and cm.stats.compiles == 1


def test_buffers_a_graph_writes_end_as_eager_leaves_them_after_a_cold_compile(tmp_path, monkeypatch):
    """A cold compile ran the graph for its kernel timings: each run wrote the module's buffers again."""
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))  # nothing measured before: the timings run
    o = run(PROGRAMS["buffer_writes"], "static")
    assert o.kind == "ok", table([o], verbose=True)


TVM = "decompose,canonicalize,raise,merge-linears,fuse,codegen{backend=tvm}"


def test_tvm_kernels_keep_nan_and_inf_as_torch_does():
    """TVM's max/min dropped a NaN operand (relu(NaN) was 0, clamp(NaN) a bound, amax or a max-pool window over a
    NaN a number), its erf clamped NaN to 1, its simplifier folded x * 0 to 0 (inf * 0 is NaN), and a max over -inf
    values started from the lowest finite float."""
    x = torch.randn(4, 64)
    x[0, 5], x[1, 63], x[3, 0], x[2] = float("nan"), float("nan"), float("inf"), float("-inf")

    def f(x):
        return (x.relu() + 1, x.clamp(-1, 1) * 2, torch.maximum(x, x.flip(1)) + 1, torch.minimum(x, x.flip(0)) * 3,
                torch.erf(x) + 1, x * 0 + 1, x.amax(1) + 1, x.amin(0) * 2,
                F.max_pool1d(x[None], 4) + 1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every kernel built by TVM (a failed build warns and takes another backend)
        got = fxcc.compile(f, options=dict(OPTS, passes=TVM))(x)
    for i, (a, b) in enumerate(zip(got, f(x))):
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, i=i: f"output {i}: {m}")
    o = run(PROGRAMS["nan_propagation"], "static")
    assert o.kind == "ok", table([o], verbose=True)
