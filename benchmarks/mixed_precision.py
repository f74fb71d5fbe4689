"""MiniLM (real weights) on the CPU: eager, torch.compile, fxcc fp32 and fxcc mixed precision in one run.

    python benchmarks/mixed_precision.py                      # batch 8, seq 128, 2 threads, budget 0.01
    python benchmarks/mixed_precision.py --policy int8 --budget 0.005 --reps 40
    python benchmarks/mixed_precision.py --policy int8,int4 --engines eager,fxcc-mp   # int4 beside int8

fxcc mixed precision compiles with `canonicalize,raise,mixed-precision{policy=...,budget=...},fuse,codegen`.
Its calibration inputs (the first call's) are 8 sentences that are NOT the 8 it is then measured on, so the
reported cosine is on inputs the search never saw. Quality: min over the batch of the cosine similarity
between mean-pooled (with the attention mask) embeddings of each engine and of fp32 eager.
Engines are timed interleaved (BENCHMARKING.md); the per-layer report of the pass is printed at the end.
Several policies (`--policy int8,int4`): `fxcc-mp` becomes one engine per policy, `fxcc-<policy>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

CALIBRATION = [
    "Quantization stores each weight in eight bits and a scale per output channel.",
    "The river rose after three days of rain and flooded the lower fields.",
    "He forgot his umbrella at the station and walked home in the storm.",
    "Attention lets every token look at every other token in the sentence.",
    "Our team meets on Tuesdays to review the roadmap and open issues.",
    "A good espresso needs finely ground beans and water just below boiling.",
    "Benchmarks on shared machines are noisy, so compare ratios, not times.",
    "The museum opens at nine and the new exhibition is on the second floor.",
]


def log(msg: str) -> None:
    print(f"[mixed_precision] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="auto",
                   help="mixed-precision policy (auto, int8, int8-weight, int4, bf16, fp16), or several, comma-separated")
    p.add_argument("--budget", type=float, default=0.01, help="error budget of the pass (1 - min cosine)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--engines", default="eager,torch.compile,fxcc,fxcc-mp")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FXCC_CACHE_DIR", tempfile.mkdtemp(prefix="fxcc-mp-cache-"))

    import fxcc
    from fxcc.autotune.mixed_precision import mixed_precision_report
    from fxcc.bench import minilm
    from fxcc.measure import interleaved
    from transformers import AutoTokenizer

    w = minilm(args.batch, args.seq, "cpu")
    tok = AutoTokenizer.from_pretrained(fxcc.bench.minilm_dir())
    calib = tok([CALIBRATION[i % len(CALIBRATION)] for i in range(args.batch)], padding="max_length",
                truncation=True, max_length=args.seq, return_tensors="pt")
    calib = {k: v for k, v in calib.items()}
    policies = args.policy.split(",")

    def pipeline(policy: str) -> str:
        return f"canonicalize,raise,mixed-precision{{policy={policy},budget={args.budget}}},fuse,codegen"

    mp = {"fxcc-mp": policies[0]} if len(policies) == 1 else {f"fxcc-{q}": q for q in policies}
    log(f"{w.description}; {args.threads} threads; " + "; ".join(f"{e} = {pipeline(q)}" for e, q in mp.items()))
    engines = [e for engine in args.engines.split(",") for e in (mp if engine == "fxcc-mp" else [engine])]
    with torch.inference_mode():
        ref = w.model(**w.kwargs)
    calls, compile_s, mods = {}, {}, {}
    for engine in engines:
        if engine == "eager":
            fn = w.model
        elif engine == "torch.compile":
            fn = torch.compile(w.model)
        elif engine == "fxcc":
            fn = fxcc.compile(w.model)
        elif engine in mp:
            fn = fxcc.compile(w.model, passes=pipeline(mp[engine]))
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        log(f"compiling {engine} ...")
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(**(calib if engine in mp else w.kwargs))  # fxcc-mp calibrates on other sentences
        compile_s[engine] = None if engine == "eager" else time.perf_counter() - t0
        mods[engine] = fn
        calls[engine] = lambda fn=fn: fn(**w.kwargs)
    with torch.inference_mode():
        t = interleaved(calls, device="cpu", warmup=3, reps=args.reps, progress=log)
        outs = {e: c() for e, c in calls.items()}
    pooled = w.pooled(ref, w.kwargs).float()
    eager_ms = t["eager"].median if "eager" in t else None
    print(f"MiniLM-L6 real weights, batch {args.batch}, seq {args.seq}, {args.threads} threads, "
          f"torch {torch.__version__}; median of {args.reps} interleaved calls")
    print(f"{'engine':<16} {'compile s':>9} {'median ms':>10} {'vs eager':>9} {'min cos(pooled)':>16} {'max |err|':>10}")
    for e, out in outs.items():
        cos = torch.nn.functional.cosine_similarity(pooled, w.pooled(out, w.kwargs).float(), dim=-1).min().item()
        err = (out.last_hidden_state - ref.last_hidden_state).abs().max().item()
        comp = "-" if compile_s[e] is None else f"{compile_s[e]:.1f}"
        ratio = f"{eager_ms / t[e].median:.2f}x" if eager_ms else "-"
        print(f"{e:<16} {comp:>9} {t[e].median:>10.2f} {ratio:>9} {cos:>16.6f} {err:>10.2e}")
    for e in (e for e in mp if e in t):
        if "fxcc" in t:
            print(f"{e} vs fxcc fp32: {t['fxcc'].median / t[e].median:.2f}x")
        if "torch.compile" in t:
            print(f"{e} vs torch.compile: {t['torch.compile'].median / t[e].median:.2f}x")
    for e in (e for e in mp if e in mods):
        rep = mixed_precision_report(mods[e])
        print(f"\n{e}: " + (rep.text() if rep else "mixed-precision did not run"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
