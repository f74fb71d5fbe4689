"""The graph fuzzer in the suite: random straight-line programs (tests/graph_fuzz.py) compiled with the default
CPU pipeline, each equal to eager or run eagerly with a warning, never raising.

A fixed seed range by default (under a minute on one core); any range with
`FXCC_GRAPH_FUZZ_SEEDS=0:500 pytest tests/test_graph_fuzz.py` (or `python tests/graph_fuzz.py --seeds 0:500`).
"""

from __future__ import annotations

import os

import torch
from graph_fuzz import Gen, parse_seeds, run_one, show_program, summary

SEEDS = parse_seeds(os.environ.get("FXCC_GRAPH_FUZZ_SEEDS", "0:24"))


def test_a_seed_is_one_program():
    assert Gen(7).program().source() == Gen(7).program().source() != Gen(8).program().source()


def test_random_programs_equal_eager_or_run_eagerly_with_a_warning():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [run_one(seed) for seed in SEEDS]
    finally:
        torch.set_num_threads(threads)
    outcomes = [o for o, _, _ in results]
    bad = [(o, small or prog) for o, prog, small in results if o.kind not in ("equal", "eager", "skipped")]
    assert not bad, (f"{summary(outcomes)}\n\nseed {bad[0][0].seed}: {bad[0][0].kind}: {bad[0][0].detail}\n"
                     f"shrunk:\n{show_program(bad[0][1])}")
    # what ran eagerly said why; the programs are real: most compiled and called, many on two batch sizes
    assert all(o.warnings for o in outcomes if o.kind == "eager"), summary(outcomes)
    assert sum(o.kind == "equal" for o in outcomes) >= 0.8 * len(outcomes), summary(outcomes)
    assert sum(o.dynamic for o in outcomes) >= 0.4 * len(outcomes), summary(outcomes)


class _Cancels(torch.nn.Module):
    """A sum of an instance-normalized tensor: about 0, its rounding noise the size of its terms' (seed 5100)."""

    def forward(self, x):
        return torch.nn.functional.instance_norm(x).sum()


class _Source:
    def source(self) -> str:
        return "v1 = F.instance_norm(x)\nv2 = v1.sum()"


def test_an_output_that_cancels_is_judged_against_float64_and_a_wrong_one_still_differs():
    from graph_fuzz import _within_eagers_own_error

    model, x = _Cancels(), torch.randn(6, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        # the terms summed in another order (what a generated kernel does): far from eager on the output's scale,
        # as close as eager to the float64 sum
        got = torch.nn.functional.instance_norm(x).flatten().flip(0).cumsum(0)[-1]
        assert _within_eagers_own_error(model, [x], got, want, _Source())
        assert not _within_eagers_own_error(model, [x], got + 1e-3, want, _Source())
        assert not _within_eagers_own_error(model, [x], want.new_tensor(float("nan")), want, _Source())



def _tied_argmax(spread: str = "") -> object:
    """Seed 9347 shrunk: `softmax(...).mean(...)` is 0.5 up to an ulp in every batch row, so the argmax over the
    batch picks by rounding, which eager and fxcc do differently."""
    from graph_fuzz import Op, Program

    ops = [Op("v4", "F.conv2d(x, self.w2, self.w3, stride=1, padding=0, dilation=2, groups=8)", ["x"], "conv"),
           Op("v5", "F.softmax(v4, dim=-2)", ["v4"], "softmax"),
           Op("v8", "torch.cat([v5, v5 * 2], 1)", ["v5"], "cat"),
           Op("v9", "v8.float().mean(2, dtype=torch.float64).float()", ["v8"], "reduce"),
           Op("v14", "torch.einsum('bij,jk->bik', v9, self.w11)" + spread, ["v9"], "matmul"),
           Op("v15", "v14.argmax(-3, keepdim=True)", ["v14"], "reduce")]
    return Program(9347, [("x", (4, 8, 2, 3), "sliced")],
                   {"w2": ("param", (16, 1, 1, 1)), "w3": ("param", (16,)), "w11": ("param", (3, 8))}, ops, dyn=False)


def test_an_argmax_among_values_equal_within_tolerance_is_judged_equal_and_a_wrong_pick_still_differs():
    from graph_fuzz import _argmax_ties, call_inputs, run_program, tolerance_for

    prog = _tied_argmax()
    assert run_program(prog, None).kind == "equal"
    args = call_inputs(prog, None, 0)
    with torch.no_grad():
        want = prog.build()(*args)
    assert _argmax_ties(prog, args, (want + 1) % 4, want, tolerance_for(prog))  # another of the tied rows
    # rows that differ: another pick is wrong
    spread = _tied_argmax(" + torch.arange(4.0)[:, None, None]")
    with torch.no_grad():
        want = spread.build()(*args)
    assert not _argmax_ties(spread, args, (want + 1) % 4, want, tolerance_for(spread))
