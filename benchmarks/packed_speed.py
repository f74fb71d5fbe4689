"""What the packed-weight budget costs in speed: the same model compiled with codegen's default `packed` budget and
with no bound (`codegen{packed=100}`), or any budgets given, timed interleaved with eager in one process.

    cd benchmarks && python packed_speed.py [--models llama bert gpt2] [--threads 1] [--reps 60] [--fractions 0.08 1 100]

Each engine gets its own copy of the model (same weights), so one compile's merged or packed weights never touch
another's. Prints each engine's median call time with its 10th-90th percentile spread over the rounds, the ratio of
each compile to the last one's, call by call (>1: slower), and the live / parameter bytes of each compile
(benchmarks/weight_memory.py's count).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from weight_memory import MODELS, live_bytes

PIPE = "decompose,canonicalize,raise,merge-linears,gemv,layout,fuse,codegen{packed=%s}"


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=10)
    return statistics.median(xs), q[0], q[-1]


def run(name: str, reps: int, fractions: list[str]) -> None:
    import fxcc
    from fxcc.measure import interleaved

    torch.manual_seed(0)
    model, ids, kwargs = MODELS[name]()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opts = fxcc.CompileOptions(time_vs_eager=False)
    engines, held = {"eager": model}, {}
    for frac in fractions:
        label = f"packed={frac}"
        base = live_bytes()
        engines[label] = fxcc.compile(copy.deepcopy(model), passes=PIPE % frac, options=opts)
        with torch.no_grad():
            out = engines[label](ids, **kwargs)
        del out
        held[label] = (live_bytes() - base) / params
    with torch.no_grad():
        ref = engines["eager"](ids, **kwargs).last_hidden_state
        for label in held:
            got = engines[label](ids, **kwargs).last_hidden_state
            print(f"{name} {label}: max |compiled - eager| = {(got - ref).abs().max().item():.2e}")
        t = interleaved({k: (lambda m=m: m(ids, **kwargs)) for k, m in engines.items()}, device="cpu", warmup=3,
                        reps=reps, rounds=max(1, reps // 3))
    med = {k: quantiles(v.samples) for k, v in t.items()}
    for k, (m, lo, hi) in med.items():
        mem = f"   live {held[k]:.2f}x parameters" if k in held else ""
        print(f"{name:<6} {k:<14} {m:8.3f} ms [{lo:.3f}-{hi:.3f}]{mem}")
    last = f"packed={fractions[-1]}"
    for label in list(held)[:-1]:
        m, lo, hi = quantiles([a / b for a, b in zip(t[label].samples, t[last].samples)])
        print(f"{name:<6} {label} / {last}, call by call: {m:.3f} [{lo:.3f}-{hi:.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama"], choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--fractions", nargs="+", default=["0.08", "100"],
                    help="codegen packed= budgets to compile with (the last one is the baseline of the ratios)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU fp32, {args.threads} thread(s), {args.reps} calls per engine")
    for name in args.models:
        run(name, args.reps, args.fractions)


if __name__ == "__main__":
    main()
