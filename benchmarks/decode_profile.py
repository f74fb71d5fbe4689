"""Where a decode step's time goes: the compiled forward against the generate loop around it, then a kernel
table of decode steps (torch.profiler). The model is `fxcc bench generate`'s Llama.

    python benchmarks/decode_profile.py                                   # GPU: hidden 2048, 16 layers, bf16, batch 1
    python benchmarks/decode_profile.py --batch 8 --engines fxcc:static,torch.compile:reduce-overhead
    python benchmarks/decode_profile.py --device cpu --hidden 128 --layers 2 --prompt 32 --new-tokens 24

Per engine: the median forward call (synchronized before and after: host and device) and the median time
between two forward calls (transformers' generate loop: logits processing, stopping checks, cache
bookkeeping), then the profiler's table over decode steps 20-40 sorted by device time (--table FILE also writes
it whole). A trace, not a benchmark: decode ratios come from `fxcc bench generate`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fxcc import bench_generate as bg  # noqa: E402
from fxcc.capture import forward_as  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engines", default="fxcc:static")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=65)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--table", default=None, help="write each engine's whole table to FILE.<engine>.txt")
    args = p.parse_args()
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads = max(args.hidden // 128, 2)
    model = bg.llama(args.hidden, args.layers, heads, max(heads // 2, 1), 4 * args.hidden, dtype, args.device)
    ids = torch.randint(2, 32000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    new = max(args.new_tokens, 41)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    for e in bg.engines(model, args.engines.split(","), args.device):
        own = e.forward or type(model).forward.__get__(model)
        for _ in range(2):  # compiles prefill and decode (a static cache is as long as this generate's)
            bg.generate(model, e, ids, new, args.device)
        spans, state = [], {"n": 0, "prof": None}

        def call(*a, own=own, spans=spans, state=state, **k):
            state["n"] += 1
            if state["n"] == 20:
                state["prof"] = profile(activities=[ProfilerActivity.CPU]
                                        + ([ProfilerActivity.CUDA] if gpu else []))
                state["prof"].__enter__()
            sync()
            t0 = time.perf_counter()
            out = own(*a, **k)
            sync()
            spans.append((t0, time.perf_counter()))
            if state["n"] == 40:
                state["prof"].__exit__(None, None, None)
            return out

        kw = {"cache_implementation": e.cache} if e.cache else {}
        call.__signature__ = inspect.signature(own)  # generate decides what to pass from the forward's signature
        with torch.inference_mode(), forward_as(model, call):
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
        decode = [s for i, s in enumerate(spans[1:], 1) if not 20 <= i <= 40]  # outside the profiled steps
        forward = statistics.median(b - a for a, b in decode) * 1e3
        loop = statistics.median(spans[i + 1][0] - spans[i][1] for i in range(1, len(spans) - 1)
                                 if not 19 <= i <= 40) * 1e3
        print(f"{e.name}, batch {args.batch}: forward {forward:.3f} ms, generate loop between forwards {loop:.3f} ms "
              f"(medians over {len(decode)} decode steps)")
        sort = "device_time_total" if gpu else "cpu_time_total"
        table = state["prof"].key_averages()
        print(table.table(sort_by=sort, row_limit=25, max_name_column_width=80))
        if args.table:
            with open(f"{args.table}.{e.name.replace(':', '_')}.txt", "w") as f:
                f.write(table.table(sort_by=sort, row_limit=200, max_name_column_width=120))


if __name__ == "__main__":
    main()
