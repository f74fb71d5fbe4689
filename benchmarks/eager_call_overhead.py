"""What fxcc's call adds to a signature that runs eagerly: a one-op module compiled with `max_variants=1`, called
with a second shape (past max_variants: eagerly), against the module called directly. Fastest of 7 runs of
20000 calls each, in microseconds per call (CPU; a shared machine only adds time).

    python benchmarks/eager_call_overhead.py
"""

from __future__ import annotations

import time
import warnings

import torch


class Sum(torch.nn.Module):
    def forward(self, x):
        return x.sum(0)


def per_call_us(fn, x: torch.Tensor, number: int = 20000, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(x)
        best = min(best, (time.perf_counter() - t0) / number * 1e6)
    return best


def main() -> None:
    import fxcc

    warnings.simplefilter("ignore")
    m = Sum()
    c = fxcc.compile(m, dynamic=False, options={"max_variants": 1})
    a, b = torch.randn(4, 8), torch.randn(3, 8)
    with torch.inference_mode():
        c(a)  # the one compiled variant
        c(b)  # past max_variants: this signature runs eagerly
        eager, fxcc_us = per_call_us(m, b), per_call_us(c, b)
    print(f"eager {eager:.2f} us a call; through fxcc (runs eagerly) {fxcc_us:.2f} us: {fxcc_us - eager:.2f} us added")


if __name__ == "__main__":
    main()
