"""Sweep the Triton row-reduction kernel's parameters (ROWS, RBLOCK, SPLIT, warps) on breadth modules, against its
shape-chosen defaults (`codegen/triton.py`, `row_defaults`): where the defaults' numbers in benchmarks/RESULTS.md
come from; and the looped and split kernels' one-pass mean and variance (Welford) against the two-pass ones.

    python benchmarks/reduction_sweep.py var_d0,std_d1,group_norm,amax_d0,sum_d0 [--budget 22] [--grid all|inner]
    python benchmarks/reduction_sweep.py group_norm,layer_norm_2d,var_d0,std_d1,layer_norm,instance_norm2d \
        --grid passes --engines eager,torch.compile,fxcc,fxcc:two-pass

Per module: eager's call, then each reduction kernel of fxcc's graph (built with the extern backend, so the bodies
are fxcc's own): the body run by torch, the defaults (and, where its kernels differ, the defaults with the two-pass
statistics of FXCC_TRITON_WELFORD=0), and the five fastest of the grid (each checked against the body within bf16
tolerance; medians of 15 calls by CUDA events). `--grid inner`: looped kernels of 1-4 rows and 2048-4096 columns on
4-16 warps. `--grid passes`: the inner grid and a few splits, one-pass and two-pass side by side. `--grid none`: the
defaults only. `--engines`: then the modules end to end, as `fxcc bench breadth` times them (interleaved medians),
under the engines given; `fxcc:two-pass` is fxcc compiled with FXCC_TRITON_WELFORD=0. Without a GPU it runs the
small sizes in Triton's interpreter (a check that the script works; its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from breadth import CASES  # noqa: E402
from breadth.runner import environment, run_case  # noqa: E402

EXTERN = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"
PASSES = {"one-pass": "1", "two-pass": "0"}  # FXCC_TRITON_WELFORD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", help="comma-separated breadth module names")
    p.add_argument("--budget", type=float, default=22.0, help="seconds of sweeping per kernel")
    p.add_argument("--grid", choices=("all", "inner", "passes", "none"), default="all")
    p.add_argument("--engines", help="then time the modules end to end under these engines, e.g. "
                                     "eager,torch.compile,fxcc,fxcc:two-pass")
    p.add_argument("--reps", type=int, default=20, help="--engines: timed calls per engine, interleaved")
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
        if args.grid == "none":
            return []
        inner = [{"RBLOCK": rb, "ROWS": rows, "SPLIT": 1, "num_warps": w} for rows in (2, 1, 4)
                 for w in (4, 8, 16) for rb in (4096, 2048)]
        if args.grid == "inner":
            return inner
        if args.grid == "passes":
            return inner + [{"RBLOCK": 4096, "ROWS": rows, "SPLIT": s, "num_warps": 8} for s in (2, 4, 16)
                            for rows in (1, 2)]
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
                if kb.kind != "reduction":
                    continue
                cands = {}
                for label, flag in PASSES.items():  # the plan reads FXCC_TRITON_WELFORD when it is made
                    with environment(FXCC_TRITON_WELFORD=flag):
                        found = backend.candidates(kb, dev)
                    if found:
                        cands[label] = found[0]
                if not cands:
                    continue
                cand, inputs = cands["one-pass"], example_inputs(kb, dev)
                ref = kb.body(*inputs)
                built: dict = {}

                def run(params: dict, label: str = "one-pass", cands=cands, built=built, inputs=inputs,
                        ref=ref) -> float:
                    c = cands[label]
                    full = {**c.defaults, **params}
                    key = (label, tuple(sorted(full.items())))
                    if key not in built:
                        built[key] = c.build(full).fn
                    fn = built[key]
                    for o, r in zip(fn(inputs), ref):
                        torch.testing.assert_close(o.float(), r.float(), rtol=2e-2, atol=2e-2, equal_nan=True)
                    return timeit(lambda: fn(inputs))

                differ = cands["one-pass"].plan.source != cands["two-pass"].plan.source
                body_ms, default_ms = timeit(lambda kb=kb, inputs=inputs: kb.body(*inputs)), run({})
                two = f", two-pass {run({}, 'two-pass'):.3f} ms" if differ else " (no statistics to fuse)"
                print(f"  reduction {[tuple(t.shape) for t in inputs]}: body by torch {body_ms:.3f} ms, defaults "
                      f"{cand.defaults} {default_ms:.3f} ms{two}", flush=True)
                if args.grid == "passes":
                    compare(grid(0), run, args.budget, differ)
                    continue
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

    if args.engines:
        engines(args.modules.split(","), args.engines.split(","), size, dev, args.reps)


def compare(points: list[dict], run, budget: float, differ: bool) -> None:
    """Each grid point with the one-pass and the two-pass statistics (the same kernels where nothing differs)."""
    t0 = time.time()
    print(f"    {'params':<58} {'one-pass ms':>11} {'two-pass ms':>11} {'two/one':>8}")
    for params in points:
        if time.time() - t0 > budget:
            print("    (sweep budget spent)")
            break
        shown = {k: v for k, v in params.items() if k != "SPLIT" or v > 1}
        try:
            one = run(params)
            two = run(params, "two-pass") if differ else one
        except Exception as e:  # a configuration Triton cannot build, or wrong: reported
            print(f"    {str(shown):<58} {type(e).__name__}")
            continue
        print(f"    {str(shown):<58} {one:>11.3f} {two:>11.3f} {two / one:>7.2f}x", flush=True)


def engines(names: list[str], engine_names: list[str], size: str, device: str, reps: int) -> None:
    """The modules end to end, each engine's median of `reps` interleaved calls (fxcc bench breadth's protocol)."""
    def log(msg: str) -> None:
        print(f"  [{msg}]", file=sys.stderr, flush=True)

    print(f"\n## end to end, {size} size, bf16, medians of {reps} interleaved calls (ms)")
    print(f"{'module':<18} " + " ".join(f"{e:>16}" for e in engine_names) + "  notes")
    for name in names:
        # compiled cold, into empty caches (fxcc's, inductor's, Triton's), as `fxcc bench breadth` compiles
        with tempfile.TemporaryDirectory(prefix="fxcc-reduction-sweep-") as cache, \
                environment(FXCC_CACHE_DIR=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                            TRITON_CACHE_DIR=os.path.join(cache, "triton")):
            try:
                r = run_case(CASES[name], size=size, device=device, dtype=torch.bfloat16, engines=engine_names,
                             warmup=3, reps=reps, log=log)
            except Exception as e:  # one module that fails is a line of the table
                print(f"{name:<18} {type(e).__name__}: {str(e)[:200]}")
                continue
        cells = [f"{r.median_ms[e]:>16.3f}" if e in r.median_ms else f"{'-':>16}" for e in engine_names]
        notes = [*r.notes, *(["fxcc runs eagerly (measured slower)"] if r.kept_eager else [])]
        print(f"{name:<18} {' '.join(cells)}  {'; '.join(notes)}", flush=True)


if __name__ == "__main__":
    main()
