"""Sweep the Triton row-reduction kernel's parameters (ROWS, RBLOCK, SPLIT, warps) on breadth modules, against its
shape-chosen defaults (`codegen/triton.py`, `row_defaults`): where the defaults' numbers in benchmarks/RESULTS.md
come from.

    python benchmarks/reduction_sweep.py var_d0,std_d1,group_norm,amax_d0,sum_d0 [--budget 22] [--grid all|inner]

Per module: eager's call, then each reduction kernel of fxcc's graph (built with the extern backend, so the bodies
are fxcc's own): the body run by torch, the defaults, and the five fastest of the grid (each checked against the
body within bf16 tolerance; medians of 15 calls by CUDA events). `--grid inner`: looped kernels of 1-4 rows and
2048-4096 columns on 4-16 warps. Without a GPU it runs the small sizes in Triton's interpreter (a check that the
script works; its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from breadth import CASES  # noqa: E402

EXTERN = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", help="comma-separated breadth module names")
    p.add_argument("--budget", type=float, default=22.0, help="seconds of sweeping per kernel")
    p.add_argument("--grid", choices=("all", "inner"), default="all")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("FXCC_TRITON_INTERPRET", "1")
    import fxcc
    from fxcc.autotune.select import example_inputs
    from fxcc.codegen import triton as backend
    from fxcc.dialects import KERNEL_OPS, kernel_body

    dev, size = ("cuda", "full") if gpu else ("cpu", "small")

    def timeit(fn, reps: int = 15) -> float:
        if not gpu:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def grid(top: int) -> list[dict]:
        if args.grid == "inner":
            return [{"RBLOCK": rb, "ROWS": rows, "SPLIT": 1, "num_warps": w} for rows in (2, 1, 4)
                    for w in (4, 8, 16) for rb in (4096, 2048)]
        out = []
        for w in (4, 8, 16):
            for rows in (1, 2, 4, 8, 16, 32, 64, 128):
                out += [{"RBLOCK": rb, "ROWS": rows, "SPLIT": 1, "num_warps": w} for rb in (top, 256, 1024, 4096)]
        out += [{"RBLOCK": rb, "ROWS": rows, "SPLIT": s, "num_warps": 8} for s in (4, 16, 64) for rb in (1024, 4096)
                for rows in (1, 8, 64)]
        return out

    for name in args.modules.split(","):
        started = time.time()
        try:
            m, ins = CASES[name].make(size, dev, torch.bfloat16)
            with torch.no_grad():
                eager_ms = timeit(lambda m=m, ins=ins: m(*ins))
                cm = fxcc.compile(m, passes=EXTERN)
                cm(*ins)
            gm = cm.variants[-1].gm
            keys = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
            kbs = [kernel_body(k) for k in dict.fromkeys(keys)]
            print(f"\n## {name}: eager {eager_ms:.3f} ms; kernels {[kb.kind for kb in kbs]}", flush=True)
            for kb in kbs:
                cands = backend.candidates(kb, dev) if kb.kind == "reduction" else []
                if not cands:
                    continue
                cand, inputs = cands[0], example_inputs(kb, dev)
                ref = kb.body(*inputs)

                def run(params: dict, cand=cand, inputs=inputs, ref=ref) -> float:
                    fn = cand.build({**cand.defaults, **params}).fn
                    for o, r in zip(fn(inputs), ref):
                        torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2, equal_nan=True)
                    return timeit(lambda: fn(inputs))

                body_ms, default_ms = timeit(lambda kb=kb, inputs=inputs: kb.body(*inputs)), run({})
                print(f"  reduction {[tuple(t.shape) for t in inputs]}: body by torch {body_ms:.3f} ms, defaults "
                      f"{cand.defaults} {default_ms:.3f} ms", flush=True)
                results, t0 = [], time.time()
                for params in grid(max(cand.space.get("RBLOCK", [1]))):
                    if time.time() - t0 > args.budget:
                        print("  (sweep budget spent)")
                        break
                    try:
                        results.append((run(params), params))
                    except Exception as e:  # a configuration Triton cannot build, or wrong: reported, not kept
                        results.append((float("inf"), {**params, "error": type(e).__name__}))
                results.sort(key=lambda r: r[0])
                for ms, params in results[:5]:
                    print(f"    {ms:.3f} ms  {params}")
                if results:
                    print(f"    tried {len(results)} in {time.time() - t0:.0f} s; defaults / best "
                          f"{default_ms / results[0][0]:.2f}x", flush=True)
        except Exception:
            traceback.print_exc()
        print(f"  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
