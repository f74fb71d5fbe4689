"""Apply a plan written by `fxcc search` in a fresh process and compare with what the plan recorded.

    python benchmarks/plan_reproduce.py examples/minilm.py minilm.plan.json [--reps 10] [--threads 2]
    torchrun --nproc-per-node 2 benchmarks/plan_reproduce.py MODEL.py tp.plan.json   # a parallel plan

Loads `model()` and `inputs()` from the model file, compiles with `fxcc.compile(model, plan=PLAN)` (no
search), checks the outputs against the uncompiled model (quality error = 1 - min cosine per sample, as
the search measures it) and times the plan interleaved with the uncompiled model (warm-up, median). The
speedup over eager is the number to compare on a shared machine: both engines see the same load.

A parallel plan (its `parallel.tp` > 1) runs under torchrun, one process per rank: every rank applies the plan
(fxcc joins torchrun's process group), the ranks time it in lockstep as the search did (fxcc.tp_bench.rank_timings:
eager on rank 0 alone at the search's threads between rounds), and the latency is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_file", help="PATH.py defining model() and inputs()")
    ap.add_argument("plan")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (the plan records the count it needs)")
    ap.add_argument("--json", help="also write the comparison to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import fxcc
    from fxcc.autotune.plan import read_plan
    from fxcc.cli import load_model_and_inputs
    from fxcc.measure import interleaved
    from fxcc.quality import quality_loss

    plan = read_plan(args.plan)
    tp = plan.parallel.get("tp", 1)
    if tp > 1 and "RANK" not in os.environ:
        print(f"plan {args.plan} runs on {tp} ranks: torchrun --nproc-per-node {tp} {' '.join(sys.argv)}",
              file=sys.stderr)
        return 2
    model, a, kw = load_model_and_inputs(f"{args.model_file}:model", f"{args.model_file}:inputs")
    model.eval()
    with torch.no_grad():
        ref = model(*a, **kw)
    t0 = time.perf_counter()
    cm = fxcc.compile(model, plan=args.plan)
    out = cm(*a, **kw)
    compile_s = time.perf_counter() - t0
    err = quality_loss(ref, out)

    def eager():
        with torch.no_grad():
            return model(*a, **kw)

    if tp > 1:
        import torch.distributed as dist
        from fxcc.tp_bench import rank_timings

        mine, ref_t = rank_timings(lambda: cm(*a, **kw), device=plan.target["kind"], warmup=args.warmup,
                                   reps=args.reps, rounds=min(args.reps, 5), eager=eager,
                                   eager_threads=plan.parallel.get("eager_threads", torch.get_num_threads()))
        ranks = [None] * tp
        dist.all_gather_object(ranks, {"own": mine.own, "median": mine.median, "spread": mine.spread,
                                       "error": err, "eager": ref_t.own if ref_t else None})
        if dist.get_rank() != 0:
            return 0
        ms, eager_ms, err = max(r["own"] for r in ranks), ranks[0]["eager"], max(r["error"] for r in ranks)
        for i, r in enumerate(ranks):
            print(f"rank {i}: {r['own']:.3f} ms (median {r['median']:.3f}, interval ±{50 * r['spread']:.0f}%)")
    else:
        t = interleaved({"plan": lambda: cm(*a, **kw), "eager": eager}, device=plan.target["kind"],
                        warmup=args.warmup, reps=args.reps, rounds=min(args.reps, 5))
        ms, eager_ms = t["plan"].own, t["eager"].own
    row = {"pipeline": plan.pipeline, "compile_s": compile_s,
           "recorded": {"ms": plan.latency_ms, "eager_ms": plan.eager_ms, "speedup": plan.eager_ms / plan.latency_ms,
                        "quality_error": plan.quality_error},
           "reproduced": {"ms": ms, "eager_ms": eager_ms, "speedup": eager_ms / ms, "quality_error": err}}
    print(f"plan {args.plan}: {plan.pipeline}\n"
          f"{'':<11} {'ms':>10} {'eager ms':>10} {'vs eager':>9} {'error':>10}")
    for name, r in (("recorded", row["recorded"]), ("reproduced", row["reproduced"])):
        print(f"{name:<11} {r['ms']:>10.2f} {r['eager_ms']:>10.2f} {r['speedup']:>8.2f}x {r['quality_error']:>10.2e}")
    print(f"reproduced / recorded latency: {ms / plan.latency_ms:.3f}; estimate: the fastest fifth of the calls "
          "(as the search records)")
    print(f"compile with the plan (in this process): {compile_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
