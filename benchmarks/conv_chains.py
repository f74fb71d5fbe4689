"""Conv chains of the breadth suite on the GPU, with the layout pass's decision: eager (NCHW and channels-last),
torch.compile (default mode) and fxcc side by side in one process, then fxcc's `explain`.

    python benchmarks/conv_chains.py conv2d_bias_relu,conv2d_hardtanh_mean,conv2d_bn_relu,conv2d_relu_avgpool

Each module at its full size in bf16 (`benchmarks/breadth/`), timed by CUDA events: the median of 20 calls after 3
warm-up calls per engine. "eager-CL" runs the module and its 4-D inputs in channels-last (no copies: the floor a
layout rewrite aims at). The layout pass logs its three timings (`fxcc.passes.layout`) before each row.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _row(name: str) -> tuple:
    """One module's timings (eager, eager channels-last, torch.compile, fxcc) and fxcc's compiled module."""
    import fxcc

    import benchmarks.breadth as breadth

    model, inputs = breadth.CASES[name].make("full", "cuda", torch.bfloat16)
    with torch.inference_mode():
        eager = _time(lambda: model(*inputs))
        cl = model.to(memory_format=torch.channels_last)
        cl_inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
        eager_cl = _time(lambda: cl(*cl_inputs))
        model = model.to(memory_format=torch.contiguous_format)
        torch._dynamo.reset()
        tc = torch.compile(model)
        tc_ms = _time(lambda: tc(*inputs))
        compiled = fxcc.compile(model)
        compiled(*inputs)
        fx_ms = _time(lambda: compiled(*inputs))
    return (name, eager, eager_cl, tc_ms, fx_ms), compiled


def main() -> None:
    import benchmarks.breadth.chains  # noqa: F401  (registers the cases)
    import benchmarks.breadth.nets  # noqa: F401

    if not torch.cuda.is_available():
        sys.exit("benchmarks/conv_chains.py needs a CUDA GPU")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    logging.getLogger("fxcc.passes.layout").setLevel(logging.INFO)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["conv2d_bias_relu"]
    rows = []
    for name in names:
        row, compiled = _row(name)
        rows.append(row)
        print(compiled.explain()[:4000], flush=True)
    print(f"\n{torch.cuda.get_device_name()} (torch {torch.__version__}); ms, median of 20 CUDA-event timings")
    print(f"{'module':34} {'eager':>8} {'eager-CL':>9} {'torch.compile':>14} {'fxcc':>8} {'eager/fxcc':>11}")
    for name, e, ecl, t, f in rows:
        print(f"{name:34} {e:8.3f} {ecl:9.3f} {t:14.3f} {f:8.3f} {e / f:10.2f}x")


if __name__ == "__main__":
    main()
