"""What the input guard's strides cost per call: the fast path's key (fxcc.runtime._fast_key, shapes, strides,
dtypes, devices of plain tensor arguments) against the same key without strides, and a whole compiled call of a
small MLP (extern kernels, 1 thread) for scale:

    python benchmarks/input_key_cost.py [--reps 20000] [--rounds 7]

Each figure is the median over rounds of the mean of `reps` calls, with the rounds' min-max spread; the two keys
are timed interleaved, round by round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import fxcc
import torch
from fxcc.guards import call_context
from fxcc.runtime import _fast_key


def without_strides(args: tuple, training: bool) -> tuple | None:
    """The key as it was before the strides: for comparison only."""
    if not all(type(a) is torch.Tensor for a in args):
        return None
    return (training, call_context(), *[(a.shape, a.dtype, a.device, a.layout) for a in args])


def mean_us(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} us ({min(xs):.2f}-{max(xs):.2f})"

    for n in (1, 2, 8):
        ts = tuple(torch.randn(4, 16) for _ in range(n))
        new, old = [], []
        for _ in range(args.rounds):
            new.append(mean_us(lambda ts=ts: _fast_key(ts, False), args.reps))
            old.append(mean_us(lambda ts=ts: without_strides(ts, False), args.reps))
        print(f"{n} tensor argument(s): key with strides {spread(new)}, without {spread(old)}")
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}",
                      options=fxcc.CompileOptions(check_eager=False, time_vs_eager=False))
    x = torch.randn(4, 16)
    with torch.no_grad():
        cm(x)
        calls = [mean_us(lambda: cm(x), args.reps // 10) for _ in range(args.rounds)]
    print(f"compiled MLP call (1 tensor argument): {spread(calls)}")


if __name__ == "__main__":
    main()
