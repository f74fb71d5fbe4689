"""Where a prefill's time goes: generate's first forward call (the prompt through an empty KV cache), eager
against fxcc, with the dynamic cache and with transformers' static cache. The model is `fxcc bench
generate`'s Llama.

    python benchmarks/prefill_profile.py                               # GPU: hidden 2048, 16 layers, bf16, prompt 512
    python benchmarks/prefill_profile.py --device cpu --hidden 128 --layers 2 --prompt 32 --reps 5

Per cache kind, the first forward call's inputs are recorded from a real generate (before it runs), then
eager and `fxcc.compile(forward, dynamic=False)` run them on fresh copies of the cache (copied untimed),
alternating, and the medians are printed with the spread; then a profiler table of one call of each,
sorted by device time (GPU) or host time (CPU). fxcc's kernel placement (`fxcc explain`'s summary) follows.
A trace, not a benchmark of record: TTFT comes from `fxcc bench generate`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxcc  # noqa: E402
from fxcc import bench_generate as bg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--caches", default="static,dynamic")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rows", type=int, default=20, help="profiler table rows")
    args = p.parse_args()
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads = max(args.hidden // 128, 2)
    model = bg.llama(args.hidden, args.layers, heads, max(heads // 2, 1), 4 * args.hidden, dtype, args.device)
    ids = torch.randint(2, 32000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    own = type(model).forward.__get__(model)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def once(fn, inputs) -> float:
        a, k = copy.deepcopy(inputs)
        sync()
        t0 = time.perf_counter()
        fn(*a, **k)
        sync()
        return (time.perf_counter() - t0) * 1e3

    for kind in args.caches.split(","):
        e = bg.Engine(kind, None, "static" if kind == "static" else None)
        inputs = bg.first_call_inputs(model, e, ids, args.new_tokens, args.device)
        compiled = fxcc.compile(own, dynamic=False)
        with torch.inference_mode():
            t0 = time.perf_counter()
            once(compiled, inputs)
            compile_s = time.perf_counter() - t0
            ref_a, ref_k = copy.deepcopy(inputs)
            ref = own(*ref_a, **ref_k).logits
            got_a, got_k = copy.deepcopy(inputs)
            got = compiled(*got_a, **got_k).logits
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            for _ in range(3):
                once(own, inputs), once(compiled, inputs)
            times = {"eager": [], "fxcc": []}
            for r in range(args.reps):
                order = (("eager", own), ("fxcc", compiled)) if r % 2 else (("fxcc", compiled), ("eager", own))
                for name, fn in order:
                    times[name].append(once(fn, inputs))
        ratios = sorted(a / b for a, b in zip(times["eager"], times["fxcc"]))
        q = len(ratios) // 4
        print(f"== {kind} cache, batch {args.batch}, prompt {args.prompt}: eager {statistics.median(times['eager']):.2f} ms, "
              f"fxcc {statistics.median(times['fxcc']):.2f} ms, eager/fxcc {statistics.median(ratios):.2f} "
              f"[{ratios[q]:.2f}-{ratios[-q - 1]:.2f}] over {args.reps} alternating calls; "
              f"fxcc compile {compile_s:.1f} s, {compiled.fxcc.stats.compiles} compiles; max rel err {err:.2e}")
        sort = "device_time_total" if gpu else "cpu_time_total"
        for name, fn in (("eager", own), ("fxcc", compiled)):
            a, k = copy.deepcopy(inputs)
            sync()
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]
                                                 + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
                fn(*a, **k)
                sync()
            print(f"-- {kind} cache, {name}: one call")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
        text = compiled.fxcc.explain()
        print(f"-- {kind} cache, fxcc explain: where ops run and the kernel choices")
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if "== where ops run" in line), len(lines))
        for line in [line for line in lines if "not timed against eager" in line] + lines[start:]:
            print("  " + line[:220])

if __name__ == "__main__":
    main()
