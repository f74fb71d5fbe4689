"""How close the Optuna tuner gets to the exhaustive best of a real kernel's schedule space, and how fast.

The kernel: MiniLM's attention output projection (linear 384 -> 384 with bias over 8 x 128 tokens), its
fully generated TVM candidate, whose space (tile_m x tile_n x tile_mb x unroll) has 96 points. Every point
is built and timed once (grid search); then TPE runs with a quarter of that many trials, for three
seeds. Finally the best parameters each search found are rebuilt and timed side by side, interleaved,
so the comparison does not depend on the machine's state while one search ran.

    python benchmarks/tune_quality.py [--threads 2] [--reps 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10, help="timed calls per trial")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.25, help="TPE trials as a fraction of the grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import fxcc
    from fxcc.autotune.select import example_inputs
    from fxcc.autotune.tune import tune_kernel
    from fxcc.bench import minilm
    from fxcc.codegen import extern
    from fxcc.codegen import tvm as tvm_backend
    from fxcc.dialects import KERNEL_OPS, kernel_body
    from fxcc.measure import interleaved

    w = minilm(8, 128)
    cm = fxcc.compile(w.model, passes="canonicalize,raise,fuse")
    with torch.inference_mode():
        cm(**w.kwargs)
    keys = [n.args[1] for n in cm.variants[-1].gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
    kb = next(kernel_body(k) for k in keys if kernel_body(k).kind == "gemm" and "tensor<384x384xf32>" in kernel_body(k).text
              and "transpose" not in kernel_body(k).text)
    cand = next(c for c in tvm_backend.candidates(kb, "cpu") if c.backend == "tvm")
    grid = math.prod(len(v) for v in cand.space.values())
    budget = max(1, round(args.fraction * grid))
    inputs = example_inputs(kb, "cpu")
    ref = extern.build(kb)(inputs)
    print(f"kernel {kb.key}: {kb.text.splitlines()[1].strip()[:100]} ...")
    print(f"space {cand.space}: {grid} points; TPE budget {budget} trials ({args.fraction:.0%})\n")

    with tempfile.TemporaryDirectory() as d:
        storage = f"journal:{os.path.join(d, 'studies.log')}"
        common = dict(storage=storage, device="cpu", progress=True, reps=args.reps, warmup=2)
        runs = {"grid (exhaustive)": tune_kernel(cand, inputs, ref, trials=grid, sampler="grid",
                                                 study_name="grid", **common)}
        for seed in range(args.seeds):
            runs[f"tpe seed {seed}"] = tune_kernel(cand, inputs, ref, trials=budget, sampler="tpe", seed=seed,
                                                   study_name=f"tpe{seed}", **common)

    fns = {"defaults": cand.build(cand.defaults).fn, "extern (library)": extern.build(kb)}
    fns.update({name: cand.build(r.params).fn for name, r in runs.items()})
    final = interleaved({k: (lambda f=f: f(inputs)) for k, f in fns.items()}, device="cpu", warmup=3,
                        reps=40, rounds=8)
    best = final["grid (exhaustive)"].median
    print(f"\n{'search':<20} {'trials':>6} {'seconds':>8} {'ms (re-timed)':>14} {'vs exhaustive best':>19}  params")
    for name, t in final.items():
        r = runs.get(name)
        trials = "-" if r is None else str(r.trials)
        secs = "-" if r is None else f"{r.seconds:.0f}"
        params = "" if r is None else str(r.params)
        print(f"{name:<20} {trials:>6} {secs:>8} {t.median:>14.3f} {t.median / best:>18.3f}x  {params}")


if __name__ == "__main__":
    main()
