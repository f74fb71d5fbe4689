"""What fxcc's call adds over calling the module directly, per call (CPU; a shared machine only adds time):

- past max_variants: a one-op module compiled with `max_variants=1`, called with a second shape (runs eagerly);
- eager verdict: the same module compiled and measured slower than eager by the compile-time timing (the timing's
  verdict is forced here, `vs_eager.judge` answering "eager wins", so the case does not hang on this machine's
  noise), so its signature runs eagerly;
- compiled: a small graph of pointwise ops on a weight, run compiled; added over the variant's own executable
  called directly (what fxcc's call costs), and beside it the module run eagerly.

Each under torch.inference_mode(), under torch.no_grad() and with gradients enabled (eval modules: a call that
records no gradients). The eager paths read nothing of the device; on the CPU the compiled path
has no CUDA graph to replay. Fastest of 7 runs of 20000 calls each, the two sides interleaved, in microseconds
of the process's CPU time per call (time another process takes on a shared machine does not count).

    python benchmarks/eager_call_overhead.py
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable

import torch


class Sum(torch.nn.Module):
    def forward(self, x):
        return x.sum(0)


class Pointwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.relu(x * self.w + 1.0).neg() * 2.0


def per_call_us(fns: list[Callable[[torch.Tensor], object]], x: torch.Tensor, number: int = 20000,
                repeat: int = 7) -> list[float]:
    """Fastest per-call microseconds of each of `fns` called on `x`, timed in turn within each repeat."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            for _ in range(number):
                fn(x)
            best[i] = min(best[i], (time.process_time() - t0) / number * 1e6)
    return best


def past_max_variants(fxcc) -> tuple[Callable, Callable, Callable]:
    m = Sum().eval()
    c = fxcc.compile(m, dynamic=False, options={"max_variants": 1, "time_vs_eager": False})
    a, b = torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad():
        c(a)  # the one compiled variant
        c(b)  # past max_variants: this signature runs eagerly
    assert c.eager_signatures, "the second signature should run eagerly"
    return c, m, b


def eager_verdict(fxcc) -> tuple[Callable, Callable, Callable]:
    from fxcc.autotune import vs_eager

    judge, remembered = vs_eager.judge, vs_eager.remembered
    vs_eager.judge = lambda *a, **k: vs_eager.Verdict(compiled_ms=2.0, eager_ms=1.0, eager_wins=True)
    vs_eager.remembered = lambda cache, key: None
    try:
        m = Sum().eval()
        c = fxcc.compile(m, dynamic=False, options={"time_vs_eager": True})
        b = torch.randn(3, 8)
        with torch.no_grad():
            c(b)
    finally:
        vs_eager.judge, vs_eager.remembered = judge, remembered
    assert c.variants[-1].slower_than_eager, "the timing's verdict should keep eager"
    return c, m, b


def compiled(fxcc) -> tuple[Callable, Callable, Callable]:
    m = Pointwise().eval()
    c = fxcc.compile(m, dynamic=False, options={"time_vs_eager": False})
    b = torch.randn(4, 8)
    with torch.no_grad():
        c(b)
    v = c.variants[-1]
    assert not c.eager_signatures and c.stats.eager_calls == 0, "the graph should run compiled"

    def direct(x):  # the variant's executable with its bound weights, as fxcc's call ends up running it
        if torch.is_grad_enabled():
            with torch.no_grad():
                return v._call(x)
        return v._call(x)

    return c, direct, b


def main() -> None:
    import fxcc

    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU us per call, fastest of 7 x 20000")
    for name, make in (("past max_variants", past_max_variants), ("eager verdict", eager_verdict),
                       ("compiled pointwise", compiled)):
        c, direct, x = make(fxcc)
        for mode, ctx in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad),
                          ("grad enabled", contextlib.nullcontext)):
            with ctx():
                c(x)  # the hot path taken under this mode
                d_us, c_us = per_call_us([direct, c], x)
            what = "its executable" if name.startswith("compiled") else "the module"
            print(f"{name:20s} {mode:15s} {what} {d_us:6.2f}, through fxcc {c_us:6.2f}: {c_us - d_us:5.2f} added")


if __name__ == "__main__":
    main()
