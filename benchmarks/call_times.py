"""Per-call wall times of one breadth module compiled by fxcc: alone, then interleaved with eager, one
synchronized call at a time. It looks for calls far slower than the median (the breadth bench's upper
quartiles), which a median hides.

    python benchmarks/call_times.py resnet18                        # GPU, full size, bf16, without the layout pass
    python benchmarks/call_times.py unet_stage --pipeline default   # with the default pipeline
    python benchmarks/call_times.py resnet18 --size small --threads 1 # on the CPU, a CI-size module

Last, torch.compile over the same model object is interleaved with fxcc, as `fxcc bench breadth` runs its
engines: torch.compile's kernels ask the weights for writable pointers, which breaks fxcc's copy-on-write
snapshots of them (fxcc.watch); the line after it gives fxcc's compiles and recompiles.

A trace, not a benchmark: ratios come from `fxcc bench breadth`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxcc  # noqa: E402
from breadth import CASES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("module", help="a breadth module name")
    p.add_argument("--pipeline", choices=["no-layout", "default"], default="no-layout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--size", choices=["small", "full"], default=None, help="default: full on the GPU, small on the CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    gpu = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = CASES[args.module].make(args.size or ("full" if gpu else "small"), args.device,
                                            torch.bfloat16 if gpu else torch.float32)
    passes = fxcc.DEFAULT_PIPELINE.replace(",layout,", ",") if args.pipeline == "no-layout" else None
    cm = fxcc.compile(model, passes=passes)

    def ms(fn) -> float:
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    ms(cm)  # compiles
    v = cm.variants[-1]
    print(f"{args.module} ({args.pipeline}, {args.device}): {v.vs_eager or 'not timed against eager'}; "
          f"CUDA graph: {type(v.cuda_graph).__name__ if v.cuda_graph is not None else v.no_graph}")
    print("fxcc alone, ms:", " ".join(f"{ms(cm):.1f}" for _ in range(args.calls)))
    print("eager alone, ms:", " ".join(f"{ms(model):.1f}" for _ in range(args.calls // 3)))
    print("interleaved, ms:", " ".join(f"f{ms(cm):.1f} e{ms(model):.1f}" for _ in range(args.calls // 2)))
    tc = torch.compile(model)
    ms(tc)  # compiles
    print("with torch.compile of the same model, ms:",
          " ".join(f"f{ms(cm):.1f} t{ms(tc):.1f}" for _ in range(args.calls // 2)))
    print("fxcc alone again, ms:", " ".join(f"{ms(cm):.1f}" for _ in range(args.calls)))
    print(f"fxcc: {cm.stats.compiles} compiles, {cm.stats.param_recompiles} for a changed model")


if __name__ == "__main__":
    main()
