"""The layout pass timing each pointwise chain fused (EPILOGUE_REGIONS=6) against the layout copies alone (-1).

    python benchmarks/layout_timing.py MODULE[,MODULE...] [--reps 30]

GPU only. For each module of benchmarks/breadth (full size, bf16): eager, torch.compile and fxcc compiled twice
(each on its own copy of the module; `old`: the pass times its graphs with only the layout copies as generated
kernels, `new`: every pointwise chain as the kernel the compile makes of it), the layout pass's decision lines,
then CUDA-event medians of `--reps` interleaved calls of each engine and the first call's wall time of each fxcc
compile.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxcc  # noqa: E402
import fxcc.passes.layout as layout  # noqa: E402
from breadth import CASES  # noqa: E402


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", help="comma-separated benchmarks/breadth module names")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("layout_timing.py times the layout pass on a CUDA device; none is available")
    lines = _Lines()
    log = logging.getLogger("fxcc.passes.layout")
    log.setLevel(logging.INFO)
    log.addHandler(lines)
    print(f"{'module':34s} {'eager':>7s} {'tc':>7s} {'old':>7s} {'new':>7s}  old/new  tc/new  first call old/new s")
    for name in args.modules.split(","):
        model, inputs = CASES[name].make("full", "cuda", torch.bfloat16)
        engines = {"eager": model, "tc": torch.compile(copy.deepcopy(model))}
        first = {}
        for tag, regions in (("old", -1), ("new", 6)):
            layout.EPILOGUE_REGIONS = regions
            lines.lines.clear()
            # each in a fresh artifact cache: the cache's key does not hold EPILOGUE_REGIONS, so a second compile of the
            # same module would be served the first one's graph
            os.environ["FXCC_CACHE_DIR"] = tempfile.mkdtemp()  # read when the first call compiles
            compiled = fxcc.compile(copy.deepcopy(model))
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                compiled(*inputs)
            torch.cuda.synchronize()
            first[tag] = time.perf_counter() - t
            engines[tag] = compiled
            for line in lines.lines:
                print(f"   [{tag}] {line[:230]}")
        layout.EPILOGUE_REGIONS = 6
        times = {k: [] for k in engines}
        with torch.no_grad():
            for fn in engines.values():
                for _ in range(3):
                    fn(*inputs)
            for _ in range(args.reps):
                for k, fn in engines.items():
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn(*inputs)
                    b.record()
                    b.synchronize()
                    times[k].append(a.elapsed_time(b))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:34s} {med['eager']:7.3f} {med['tc']:7.3f} {med['old']:7.3f} {med['new']:7.3f}  "
              f"{med['old'] / med['new']:6.2f}x {med['tc'] / med['new']:6.2f}x  {first['old']:.1f}/{first['new']:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
