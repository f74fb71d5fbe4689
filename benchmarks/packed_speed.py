"""What the packed-weight budget costs in speed: the same model compiled with `codegen{packed=0.05}` (each weight held
about once) and with no bound (`codegen{packed=100}`, the default), or any budgets given, timed interleaved with
eager in one process.

    cd benchmarks && python packed_speed.py [--models llama bert gpt2] [--threads 1] [--reps 60] [--fractions 0.05 1 100]
                                            [--copies 2]

Each engine gets its own copy of the model (same weights), so one compile's merged or packed weights never touch
another's. Two compiles of one pipeline, on two copies, can differ by 10-15% in one process, steadily: where their
weights landed in memory, not what was compiled (the same aten::mm calls took 15.9 and 12.9 ms per forward on llama).
So each budget is compiled `--copies` times (default 2), in the order A B B A (then again), and its figures pool
its copies. Prints each budget's median call time with its 10th-90th percentile spread over the rounds (and each
copy's median: how far apart equal compiles are), the ratio of each budget to the last one's, call by call, copy
i against copy i (>1: slower), and the live / parameter bytes of each compile (benchmarks/weight_memory.py's count).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from weight_memory import MODELS, live_bytes

PIPE = "decompose,canonicalize,raise,horizontal,merge-linears,gemv,layout,fuse,codegen{packed=%s}"


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=10)
    return statistics.median(xs), q[0], q[-1]


def run(name: str, reps: int, fractions: list[str], copies: int = 2) -> None:
    import fxcc
    from fxcc.measure import interleaved

    torch.manual_seed(0)
    model, ids, kwargs = MODELS[name]()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opts = fxcc.CompileOptions(time_vs_eager=False)
    engines, held = {"eager": model}, {}
    for i in range(copies):  # A B, B A, A B, ...: no budget always compiled first
        for frac in fractions if i % 2 == 0 else fractions[::-1]:
            label = f"packed={frac} #{i}"
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
    m, lo, hi = quantiles(t["eager"].samples)
    print(f"{name:<6} {'eager':<14} {m:8.3f} ms [{lo:.3f}-{hi:.3f}]")
    for frac in fractions:
        mine = [f"packed={frac} #{i}" for i in range(copies)]
        m, lo, hi = quantiles([x for k in mine for x in t[k].samples])
        each = ", ".join(f"{statistics.median(t[k].samples):.3f}" for k in mine)
        live = "/".join(f"{held[k]:.2f}" for k in mine)
        print(f"{name:<6} {'packed=' + frac:<14} {m:8.3f} ms [{lo:.3f}-{hi:.3f}]   copies {each}   live {live}x parameters")
    last = fractions[-1]
    for frac in fractions[:-1]:
        r = [a / b for i in range(copies) for a, b in zip(t[f"packed={frac} #{i}"].samples, t[f"packed={last} #{i}"].samples)]
        m, lo, hi = quantiles(r)
        print(f"{name:<6} packed={frac} / packed={last}, call by call: {m:.3f} [{lo:.3f}-{hi:.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama"], choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--fractions", nargs="+", default=["0.05", "100"],
                    help="codegen packed= budgets to compile with (the last one is the baseline of the ratios)")
    ap.add_argument("--copies", type=int, default=2, help="compiles of each budget (on copies of the model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU fp32, {args.threads} thread(s), {args.reps} calls per engine")
    for name in args.models:
        run(name, args.reps, args.fractions, args.copies)


if __name__ == "__main__":
    main()
