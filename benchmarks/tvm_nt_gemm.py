"""The generated GEMM on an [N, K] weight read as it is (`tvm+rows`) against the one on its column panels (`tvm`,
a [N/16, K, 16] copy kept beside the weight) and eager `F.linear`, at the linear shapes of benchmarks/weight_memory.py's
llama and bert (merged q/k/v and gate/up as merge-linears makes them).

    python benchmarks/tvm_nt_gemm.py [--models llama bert] [--rows 1 8 32 128 512] [--threads 1] [--reps 60] [--cold]

`tvm+rows` (fxcc.codegen.tvm_lower `_gemm_rows`) packs the activation into panels of 16 rows at every call and
broadcasts each weight element against a vector of rows: the panel GEMM with its operands' roles swapped, so the
weight needs no copy. Each kernel is built with its default parameters through fxcc's own candidates and called as
fxcc calls it (a [1, rows, K] activation); each shape's engines are timed interleaved (fxcc.measure.interleaved).
Prints per engine the fastest and the median call in microseconds, and rows / panels: the ratio of the medians
and of the fastest calls. A shape where `tvm+rows` is not offered (fewer than 8 rows per vector) prints "-".
"""

from __future__ import annotations

import argparse
import os
import statistics

SHAPES = {  # (N, K) of each linear, merged as merge-linears leaves them
    "llama": {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2752, 512), "down": (512, 1376)},
    "bert": {"qkv": (1536, 512), "o": (512, 512), "up": (2048, 512), "down": (512, 2048)},
}


def candidates(rows: int, n: int, k: int):
    """The weight, the activation and fxcc's built `tvm` and `tvm+rows` kernels for `F.linear(x, w)` at this shape."""
    import fxcc
    import torch
    import torch.nn.functional as F
    from fxcc.codegen import tvm as tvm_backend

    w = torch.nn.Parameter(torch.randn(n, k), requires_grad=False)
    x = torch.randn(1, rows, k)

    def linear(x, w):
        return F.linear(x, w)
    cm = fxcc.compile(linear, passes="canonicalize,raise,fuse")
    cm(x, w)
    kb = next(k.body for k in cm.fxcc.variants[-1].kernels.values() if k.body.kind == "gemm")
    built = {c.backend: c.build(c.defaults).fn for c in tvm_backend.candidates(kb, "cpu")
             if c.backend in ("tvm", tvm_backend.ROWS)}
    return w, x, built


def time_shape(rows: int, n: int, k: int, reps: int, cold: bool) -> dict[str, tuple[float, float]]:
    """Per engine, (fastest, median) call in microseconds at this shape, the engines timed interleaved. `cold`: each
    call reads the next of weight copies taking COLD_BYTES together, so a weight comes from memory as in the model,
    where the other layers' weights pass between two reads of one (fxcc.autotune.select.rotation)."""
    import torch
    import torch.nn.functional as F
    from fxcc.measure import interleaved

    w, x, built = candidates(rows, n, k)
    copies = max(1, COLD_BYTES // w.nbytes) if cold else 1
    ref = F.linear(x, w)
    eager = [w.detach().clone() for _ in range(copies)]
    fns = {"eager": rotating(lambda t: F.linear(x, t), eager)}
    for label, fn in built.items():
        # each engine its own copies of the weight: what one engine derives from a weight touches no other's
        mine = [torch.nn.Parameter(w.detach().clone(), requires_grad=False) for _ in range(copies)]
        for t in mine:
            torch.testing.assert_close(fn([x, t])[0], ref, atol=1e-3, rtol=1e-4)  # and panels made, before timing
        fns[label] = rotating(lambda t, fn=fn: fn([x, t]), mine)
    t = interleaved(fns, device="cpu", warmup=copies, reps=reps, rounds=max(1, reps // 5))
    return {label: (1e3 * min(x.samples), 1e3 * statistics.median(x.samples)) for label, x in t.items()}


COLD_BYTES = 48 * 2**20  # more than this machine's L3 (32 MB)


def rotating(call, weights: list):
    """A callable running `call` on the next of `weights` each time."""
    at = [0]

    def run():
        at[0] = (at[0] + 1) % len(weights)
        return call(weights[at[0]])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 128, 512])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--cold", action="store_true", help="each call reads the next of 48 MB of weight copies")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import torch
    from fxcc.codegen import tvm as tvm_backend

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU fp32, {args.threads} thread(s), {args.reps} calls per engine, weights "
          f"{'cold (48 MB of copies in turn)' if args.cold else 'hot (one copy)'}, microseconds: fastest / median")
    print(f"{'model':<6} {'linear':<8} {'M':>4} {'N':>5} {'K':>5} {'eager':>13} {'tvm (panels)':>13} "
          f"{'tvm+rows':>13}   rows/panels: median, fastest")
    for model in args.models:
        for name, (n, k) in SHAPES[model].items():
            for rows in args.rows:
                stats = time_shape(rows, n, k, args.reps, args.cold)
                cells = [f"{stats[lb][0]:6.0f}/{stats[lb][1]:<6.0f}" if lb in stats else f"{'-':>13}"
                         for lb in ("eager", "tvm", tvm_backend.ROWS)]
                ratio = ""
                if "tvm" in stats and tvm_backend.ROWS in stats:
                    (pf, pm), (rf, rm) = stats["tvm"], stats[tvm_backend.ROWS]
                    ratio = f"{rm / pm:.3f}, {rf / pf:.3f}"
                print(f"{model:<6} {name:<8} {rows:>4} {n:>5} {k:>5} {' '.join(cells)}   {ratio}", flush=True)


if __name__ == "__main__":
    main()
