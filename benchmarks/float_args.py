"""Float arguments that change every call (issue 19): compiles and eager calls per workload under each `dynamic`
setting, the largest difference from eager, and the per-call time of a symbolic-float variant against the static
variant and eager (1 thread; median of 300 calls, 5 interleaved repetitions, min-max of the medians).

    FXCC_TIME_VS_EAGER=0 python benchmarks/float_args.py
"""

from __future__ import annotations

import statistics
import time
import warnings

import fxcc
import torch
import torch.nn as nn


def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def blend(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    return torch.lerp(a, b, w)


class Denoiser(nn.Module):
    """A diffusion model's step: the scheduler passes `sigma` as a Python float."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        return x + self.net(x * c_in) * sigma


def counts() -> None:
    cases = [("sampling, 10 temperatures", sample, lambda: (torch.randn(8, 1000),), [0.3 + 0.1 * i for i in range(10)]),
             ("denoiser, 20 sigmas", Denoiser().eval(), lambda: (torch.randn(16, 64),),
              torch.linspace(14.6, 0.03, 20).tolist()),
             ("lerp, 12 weights", blend, lambda: (torch.randn(64, 64), torch.randn(64, 64)), [i / 11 for i in range(12)])]
    for dyn in (None, True, False):
        for name, fn, inputs, values in cases:
            compiled = fxcc.compile(fn, dynamic=dyn)
            cm = getattr(compiled, "fxcc", compiled)
            args, worst = inputs(), 0.0
            with torch.no_grad():
                for v in values:
                    got, want = compiled(*args, v), fn(*args, v)
                    assert got.dtype == want.dtype
                    worst = max(worst, (got - want).abs().max().item())
            print(f"dynamic={dyn!s:5} {name:27} compiles={cm.stats.compiles:2d} eager_calls={cm.stats.eager_calls:2d} "
                  f"max|diff|={worst:.2e}")


def call_times() -> None:
    model, x = Denoiser(256).eval(), torch.randn(64, 256)
    static, symbolic = fxcc.compile(model, dynamic=False), fxcc.compile(model)
    with torch.no_grad():
        static(x, 0.7)
        symbolic(x, 0.7)
        symbolic(x, 0.8)  # recompiles with sigma symbolic

        def median_ms(fn, changing: bool) -> float:
            ts = []
            for i in range(300):
                v = 0.9 + i * 1e-3 if changing else 0.7
                t0 = time.perf_counter()
                fn(x, v)
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3

        res: dict[str, list[float]] = {"eager": [], "static variant (same sigma)": [],
                                       "symbolic variant (new sigma each call)": []}
        for _ in range(5):
            res["eager"].append(median_ms(model, True))
            res["static variant (same sigma)"].append(median_ms(static, False))
            res["symbolic variant (new sigma each call)"].append(median_ms(symbolic, True))
    for k, v in res.items():
        print(f"denoiser d=256 {k:40} {statistics.median(v):.4f} ms (min {min(v):.4f}, max {max(v):.4f})")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    counts()
    call_times()
