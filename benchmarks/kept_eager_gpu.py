"""GPU: what fxcc's call adds to breadth modules it runs eagerly (or compiled), per call: the host's CPU time per
call of the module and of fxcc's compiled module (fastest of 5 x 2000 calls), and their device-timed medians over 60
interleaved calls (CUDA events around each call: host work before the first launch counts).

    python benchmarks/kept_eager_gpu.py sum_d0,mean_d12,amin_d2,adaptive_avg_pool2d

Full-size bf16 inputs of `benchmarks/breadth`; needs a CUDA device.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def host_us(fn, inputs: tuple, calls: int = 2000) -> float:
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.process_time()
        for _ in range(calls):
            fn(*inputs)
        best = min(best, (time.process_time() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("kept_eager_gpu.py needs a CUDA device")
    import fxcc
    from fxcc import measure

    from benchmarks.breadth import CASES

    warnings.simplefilter("ignore")
    for name in sys.argv[1].split(","):
        module, inputs = CASES[name].make("full", "cuda", torch.bfloat16)
        compiled = fxcc.compile(module)
        with torch.no_grad():
            for _ in range(3):
                compiled(*inputs)
            torch.cuda.synchronize()
            eager = compiled.stats.eager_calls > 0
            he, hc = host_us(module, inputs), host_us(compiled, inputs)
            t = measure.interleaved({"eager": lambda m=module, x=inputs: m(*x), "fxcc": lambda c=compiled, x=inputs: c(*x)},
                                    device="cuda", warmup=5, reps=60)
        me, mc = t["eager"].median, t["fxcc"].median
        print(f"{name:24} {'runs eagerly' if eager else 'compiled':12} host us per call: eager {he:6.1f} fxcc {hc:6.1f} "
              f"(+{hc - he:4.1f})  device-timed ms: eager {me:.4f} fxcc {mc:.4f}  eager/fxcc {me / mc:.3f}")


if __name__ == "__main__":
    main()
