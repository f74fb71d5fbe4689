"""The DyCL control-flow fuzzer in the suite: random programs (tests/dycl_fuzz.py) compiled and equal to eager.

200 programs by default (about three minutes on one core), in parts of 50; any range with
`FXCC_FUZZ_SEEDS=0:5000 pytest tests/test_dycl_fuzz.py` (or `python tests/dycl_fuzz.py --seeds 0:5000`).
"""

from __future__ import annotations

import os
import re

import pytest
from dycl_fuzz import Gen, compiles_segments, parse_seeds, run_one, summary

SEEDS = parse_seeds(os.environ.get("FXCC_FUZZ_SEEDS", "0:200"))
PARTS = [SEEDS[i:i + 50] for i in range(0, len(SEEDS), 50)]
CONSTRUCTS = {"if", "while", "for", "break", "continue", "early_return", "loop_else", "boolop", "chain", "ternary",
              "none_check", "patience", "comprehension", "child", "module_list", "recursion", "function", "method",
              "data_trip_count", "inplace", "attribute", "with", "try", "raise", "nonlocal", "order", "walrus"}


def test_a_seed_is_one_program():
    assert Gen(7).program() == Gen(7).program() != Gen(8).program()


def test_the_seeds_generate_every_construct():
    """Gen(seed) alone decides a program's constructs: the seeds the run below compiles meet every one."""
    if len(SEEDS) < 50:
        pytest.skip("a seed range this short need not meet every construct")
    seen = set()
    for seed in SEEDS:
        gen = Gen(seed)
        gen.program()
        seen |= gen.features
    assert CONSTRUCTS <= seen, f"never generated: {sorted(CONSTRUCTS - seen)}"
    assert sum(compiles_segments(seed) for seed in SEEDS) >= len(SEEDS) // 5


@pytest.mark.slow
@pytest.mark.parametrize("seeds", PARTS, ids=lambda r: f"{r.start}:{r.stop}")
def test_random_programs_equal_eager(seeds, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    outcomes = [run_one(seed, str(tmp_path)) for seed in seeds]
    failed = [o for o in outcomes if not o.ok]
    assert not failed, f"{summary(outcomes)}\n\nfirst failure, seed {failed[0].seed}:\n{failed[0].detail}"
    # the inputs really take different paths through the programs
    assert sum(o.paths >= 2 for o in outcomes) >= 0.9 * len(outcomes), summary(outcomes)
    # what runs eagerly says where: a construct and the program's file:line; no segment had to fall back
    for o in outcomes:
        assert all(re.search(r"dycl_fuzz_\d+\.py:\d+", w) for w in o.warnings), o.warnings
        assert not [w for w in o.warnings if "capture/compile failed" in w], (o.seed, o.warnings)
