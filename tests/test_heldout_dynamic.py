"""Held-out dynamic programs (tests/heldout_dynamic.py): tensor-dependent control flow compiled by DyCL, each called
five times on inputs that take different branches and compared with eager (outputs and their Python types,
exceptions, inputs afterwards, module state). The programs that found a bug come first, then a spread of the rest;
a few that DyCL runs eagerly must say so.

The whole probe: `python tests/heldout_dynamic.py`.
"""

from __future__ import annotations

import pytest
from heldout_dynamic import PROBES, run, table

# loops over `enumerate`/`zip` of tensors a segment computed ran eagerly (the segment returned the iterator)
FOUND_BUGS = ["list_dict_returned", "zip_break_nested_return"]
SUBSET = ["if_sum_in_loop", "early_return_loop", "break_continue_item", "nonzero_rows", "beam_topk", "greedy_gru",
          "self_state_counter", "raise_on_tensor", "inplace_input_in_branch", "python_scalars_returned"]
# DyCL runs these eagerly, with a warning naming the construct
WARNED_EAGER = ["match_on_item", "try_except_tensor_raise"]


@pytest.mark.parametrize("name", FOUND_BUGS + SUBSET)
def test_heldout_dynamic_program_equals_eager(name):
    r = run(PROBES[name])
    assert r.outcome == "equal", table([r], verbose=True)


@pytest.mark.parametrize("name", WARNED_EAGER)
def test_heldout_dynamic_program_runs_eagerly_with_a_warning(name):
    r = run(PROBES[name])
    assert r.outcome == "eager-fallback", table([r], verbose=True)
