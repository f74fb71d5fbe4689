"""Symbolic prefill (the first forward of `generate`, compiled with KV-cache sizes symbolic from the start) against
the same prefill compiled static, side by side: interleaved calls on fresh copies of generate's first-call inputs.

    .venv/bin/python benchmarks/symbolic_prefill.py [--reps 15] [--prompt 128] [--threads 2] [--extern-symbolic]

`--extern-symbolic` keeps symbolic kernels off TVM (what fxcc did before TVM took symbolic sizes), for a before/after
comparison in one tree. Prints each engine's median and range, and the per-round ratio symbolic / static.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import fxcc
import torch
from fxcc import bench_generate as bg
from fxcc.codegen import tvm as tvm_backend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extern-symbolic", action="store_true")
    a = ap.parse_args()
    if a.extern_symbolic:
        candidates = tvm_backend.candidates

        def static_only(kb, target):
            vals = [n.meta.get("val") for n in kb.body.graph.nodes]
            if any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor) and any(
                    isinstance(d, torch.SymInt) for d in (*v.shape, *v.stride())) for v in vals):
                return []
            return candidates(kb, target)
        tvm_backend.candidates = static_only
    torch.set_num_threads(a.threads)
    model = bg.llama(512, 8, 8, 4, 2048, torch.float32, "cpu")
    ids = torch.randint(1, 32000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    e = bg.engines(model, ["fxcc"], "cpu")[0]
    args, kwargs = bg.first_call_inputs(model, e, ids, 8, "cpu")
    forward = type(model).forward.__get__(model)
    engines = {"symbolic": fxcc.compile(forward), "static": fxcc.compile(forward, dynamic=False)}
    with torch.inference_mode():
        ref = forward(*copy.deepcopy(args), **copy.deepcopy(kwargs)).logits
        for name, f in engines.items():
            t0 = time.perf_counter()
            got = f(*copy.deepcopy(args), **copy.deepcopy(kwargs)).logits
            print(f"{name}: compile+first call {time.perf_counter() - t0:.1f} s, max |logits - eager| "
                  f"{(got - ref).abs().max().item():.2e}")
        for name, f in engines.items():
            kinds: dict[str, int] = {}
            for k in f.fxcc.variants[0].kernels.values():
                kinds[k.backend] = kinds.get(k.backend, 0) + 1
            print(f"{name}: {f.fxcc.stats.reasons[0]} | distinct kernels by backend: {kinds}")
        times: dict[str, list[float]] = {n: [] for n in engines}
        for _ in range(3 + a.reps):
            for name, f in engines.items():
                x, kw = copy.deepcopy(args), copy.deepcopy(kwargs)
                t0 = time.perf_counter()
                f(*x, **kw)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for name in times:
        times[name] = times[name][3:]
        t = times[name]
        print(f"{name:9s} median {statistics.median(t):7.1f} ms  lower quartile {statistics.quantiles(t, n=4)[0]:7.1f} ms  "
              f"range {min(t):.1f}-{max(t):.1f}")
    r = [s / t for s, t in zip(times["symbolic"], times["static"])]
    print(f"symbolic/static per round: median {statistics.median(r):.3f}  range {min(r):.3f}-{max(r):.3f}  "
          f"(ratio of medians {statistics.median(times['symbolic']) / statistics.median(times['static']):.3f}, "
          f"of minima {min(times['symbolic']) / min(times['static']):.3f}); "
          f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
