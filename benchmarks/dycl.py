"""DyCL benchmark: the dynamic-network suite under eager, torch.compile and fxcc (DyCL), side by side.

    python benchmarks/dycl.py [--hidden 512] [--batch 32] [--threads 2] [--networks early_exit,moe_top1]

Per network, one timed round calls the model once on each of its inputs (18 inputs that together take
every branch), so the branch mix is the same for every engine; the engines' rounds alternate (eager,
torch.compile, fxcc, eager, ...) so that load drifting on a shared machine hits all of them alike, and
the median of `--reps` rounds per engine is reported. Outputs are checked against eager before timing.
Ratios are eager time / engine time (> 1: faster than eager); the last line is the geometric mean over
the networks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from dynamic_nets import NETWORKS  # noqa: E402


def timed_round(fn, xs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for x in xs:
        fn(x)
    return time.perf_counter() - t0


def measure(fns: dict, xs: list[torch.Tensor], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per round of each engine, the engines' rounds alternating."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                timed_round(fn, xs)
        for _ in range(reps):
            for name, fn in fns.items():
                samples[name].append(timed_round(fn, xs))
    return {name: statistics.median(t) for name, t in samples.items()}


def check(fn, model, xs: list[torch.Tensor], name: str, engine: str) -> None:
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(fn(x), model(x), atol=1e-3, rtol=1e-3,
                                       msg=lambda m: f"{name}/{engine} differs from eager: {m}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--networks", help="comma-separated subset of: " + ", ".join(NETWORKS))
    p.add_argument("--engines", default="eager,torch.compile,fxcc")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fxcc

    names = args.networks.split(",") if args.networks else list(NETWORKS)
    engines = args.engines.split(",")
    print(f"DyCL suite: hidden {args.hidden}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.reps} rounds (one round = every input once)")
    print(f"{'network':<16} {'eager ms':>9} {'compile ms':>11} {'fxcc ms':>9} {'eager/compile':>14} "
          f"{'eager/fxcc':>11} {'fxcc build s':>13}")
    rows = []
    for name in names:
        model, xs = NETWORKS[name](args.hidden, args.batch)
        row: dict = {"network": name}
        fns = {"eager_ms": model}
        if "torch.compile" in engines:
            torch._dynamo.reset()
            tc = torch.compile(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(tc, model, xs, name, "torch.compile")
            fns["compile_ms"] = tc
        if "fxcc" in engines:
            cm = fxcc.compile(model)
            t0 = time.perf_counter()
            check(cm, model, xs, name, "fxcc")  # compiles every segment signature the inputs reach
            row["fxcc_build_s"] = time.perf_counter() - t0
            fns["fxcc_ms"] = cm
        row.update({k: t * 1e3 for k, t in measure(fns, xs, args.warmup, args.reps).items()})
        rows.append(row)

        def fmt(key: str, width: int, row: dict = row) -> str:
            return f"{row[key]:>{width}.2f}" if key in row else f"{'-':>{width}}"

        r_tc = row["eager_ms"] / row["compile_ms"] if "compile_ms" in row else None
        r_fx = row["eager_ms"] / row["fxcc_ms"] if "fxcc_ms" in row else None
        row["eager/compile"], row["eager/fxcc"] = r_tc, r_fx
        print(f"{name:<16} {fmt('eager_ms', 9)} {fmt('compile_ms', 11)} {fmt('fxcc_ms', 9)} "
              f"{(f'{r_tc:.2f}x' if r_tc else '-'):>14} {(f'{r_fx:.2f}x' if r_fx else '-'):>11} "
              f"{fmt('fxcc_build_s', 13)}", flush=True)

    def geomean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key)]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

    g_tc, g_fx = geomean("eager/compile"), geomean("eager/fxcc")
    print(f"{'geomean':<16} {'':>9} {'':>11} {'':>9} {(f'{g_tc:.2f}x' if g_tc else '-'):>14} "
          f"{(f'{g_fx:.2f}x' if g_fx else '-'):>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "geomean": {"eager/compile": g_tc, "eager/fxcc": g_fx}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
