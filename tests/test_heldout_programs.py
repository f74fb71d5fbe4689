"""Held-out programs (tests/heldout_programs.py) under the default CPU pipeline: every call equal to eager (values,
NaN positions, dtypes, shapes, strides, aliasing), at a first size twice, a second size (a recompile with the changed
sizes symbolic), a third and the first again. The programs that found bugs come first, then a spread of the rest.

The whole probe: `python tests/heldout_programs.py [--passes ...] [--dynamic]`.
"""

from __future__ import annotations

import pytest
from heldout_programs import GOOD, PROBES, run, table

# (program, dynamic=True from the first call)
FOUND_BUGS = [("attention_padding_bias_all_masked", False), ("rotary_broadcast_dtypes", True),
              ("returned_copies", False), ("equal_values_returned", False), ("weight_only_values_returned", True)]
SUBSET = ["argmax_argmin", "max_min_indices", "cumprod_dims", "masked_cumsum", "kl_div", "diag_matmul",
          "maxpool_dilation_indices", "embedding_bag", "float_floor_div_remainder", "small_int_wrap",
          "softmax_neg_inf_masks", "logsumexp_all_neg_inf", "nan_inf_reductions"]


@pytest.mark.parametrize("name,dynamic", FOUND_BUGS + [(n, False) for n in SUBSET])
def test_heldout_program_equals_eager(name, dynamic):
    r = run(PROBES[name], dynamic=True if dynamic else None)
    assert r.outcome in GOOD and r.outcome != "eager-fallback", table([r], verbose=True)
