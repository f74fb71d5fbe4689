"""Per-kernel device time on the GPU (torch.profiler): where a decode step or a breadth module spends it.

    python benchmarks/gpu_kernels.py decode                         # fxcc:static Llama decode (hidden 2048, 16 layers,
                                                                    #   16/8 heads, ffn 8192, bf16, prompt 512)
    python benchmarks/gpu_kernels.py decode-loop [--batch 8]        # fxcc's decode loop, its steps only (the prefill
                                                                    #   not profiled)
    python benchmarks/gpu_kernels.py convnext_block,mobilenet_v2    # breadth modules (full size, bf16): eager,
                                                                    #   torch.compile, fxcc and fxcc:no-layout

Per engine: the wall time per call (20 calls after 3 warm-up, synchronized), then the kernels by total device time
over 5 profiled calls, per call, with their launch counts. For decode, the figures are per generate step (64 new
tokens, the prefill's share included). A profile, not a benchmark: ratios come from `fxcc bench`.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile


def table(prof, title: str, steps: int, rows: int) -> None:
    agg: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name][0] += e.device_time_total
            agg[e.name][1] += 1
    total = sum(t for t, _ in agg.values())
    launches = sum(c for _, c in agg.values())
    print(f"--- {title}: {total / steps:.1f} us of device time and {launches / steps:.0f} kernels per call")
    for name, (t, c) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{t / steps:9.1f} us {c / steps:6.1f}x  {name[:110]}")


def decode(rows: int) -> None:
    import fxcc
    from fxcc.bench_generate import llama
    from fxcc.capture import forward_as

    model = llama(2048, 16, 16, 8, 8192, torch.bfloat16, "cuda")
    compiled = fxcc.compile(type(model).forward.__get__(model))
    ids = torch.randint(1, 32000, (1, 512), device="cuda")
    new = 64

    def generate() -> None:
        with torch.inference_mode(), forward_as(model, compiled):
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           cache_implementation="static")
        torch.cuda.synchronize()

    generate()
    generate()
    t = time.perf_counter()
    generate()
    print(f"=== fxcc:static decode: {(time.perf_counter() - t) / new * 1e3:.2f} ms per generated token (wall)")
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        generate()
    table(p, "fxcc:static decode", new, rows)


def decode_loop(rows: int, batch: int) -> None:
    """The kernels of fxcc's decode loop (`fxcc.compile(model).generate`, static cache): the profiler starts when
    generate's prefill returns, so the table is the steps' alone."""
    import fxcc
    from fxcc.bench_generate import llama

    model = llama(2048, 16, 16, 8, 8192, torch.bfloat16, "cuda")
    compiled = fxcc.compile(model)
    ids = torch.randint(1, 32000, (batch, 512), device="cuda")
    new = 64
    prof = profile(activities=[ProfilerActivity.CUDA])
    prefill = type(model)._prefill
    profiling = False

    def prefill_then_profile(self, *args, **kwargs):
        out = prefill(self, *args, **kwargs)
        if profiling:
            torch.cuda.synchronize()
            prof.start()
        return out

    def generate() -> None:
        with torch.inference_mode():
            compiled.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              cache_implementation="static")
        torch.cuda.synchronize()

    type(model)._prefill = prefill_then_profile
    generate()
    generate()
    t = time.perf_counter()
    generate()
    print(f"=== fxcc:loop decode, batch {batch}: {(time.perf_counter() - t) / new * 1e3:.2f} ms per generated token "
          f"(wall, the prefill's share included); {compiled.decode_loop.text()}")
    profiling = True
    generate()
    prof.stop()
    table(prof, f"fxcc:loop decode steps, batch {batch}", new - 1, rows)


def breadth(only: str, rows: int) -> None:
    import fxcc
    from breadth import select  # benchmarks/breadth, next to this script

    for case in select(only):
        module, inputs = case.make("full", "cuda", torch.bfloat16)
        no_layout = fxcc.DEFAULT_PIPELINE.replace(",layout,", ",")  # channels-last per convolution only
        for name, fn in {"eager": module, "torch.compile": torch.compile(module), "fxcc": fxcc.compile(module),
                         "fxcc:no-layout": fxcc.compile(module, passes=no_layout)}.items():
            with torch.inference_mode():
                for _ in range(3):
                    fn(*inputs)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    fn(*inputs)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / 20 * 1e6
                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        fn(*inputs)
                    torch.cuda.synchronize()
            print(f"=== {case.name} {name}: {wall:.0f} us per call (wall)")
            table(p, f"{case.name} {name}", 5, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="`decode`, `decode-loop`, or breadth module names (comma-separated)")
    p.add_argument("--batch", type=int, default=1, help="decode-loop: the batch")
    p.add_argument("--rows", type=int, default=20, help="kernels listed per engine")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA device")
    if args.what == "decode":
        decode(args.rows)
    elif args.what == "decode-loop":
        decode_loop(args.rows, args.batch)
    else:
        breadth(args.what, args.rows)


if __name__ == "__main__":
    main()
