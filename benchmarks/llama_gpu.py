"""GPU benchmark of the Llama workload (BENCHMARKING.md): eager, torch.compile modes and fxcc in one run.

    python benchmarks/llama_gpu.py                       # prefill B=1 T=2048 and decode-shaped B=8 T=1
    python benchmarks/llama_gpu.py --workloads decode --engines eager,torch.compile:reduce-overhead,fxcc

Llama from transformers.LlamaConfig with random weights (hidden 2048, ffn 8192, 16 layers, 16/8 heads),
bf16, no KV cache. Per workload: cold compile time, median latency (CUDA events, interleaved rounds),
output error against eager (max |err| and ||err|| / ||eager||), fxcc's ratio against each engine, and
the roofline floor: max(FLOPs / measured bf16 matmul rate, minimal bytes / measured copy bandwidth),
with the fraction of it fxcc reaches. `--json` also writes every number and fxcc's per-kernel choices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

ENGINES = ["eager", "torch.compile", "torch.compile:max-autotune-no-cudagraphs", "torch.compile:reduce-overhead",
           "fxcc"]
WORKLOADS = {"prefill": (1, 2048), "decode": (8, 1)}


def log(msg: str) -> None:
    print(f"[llama_gpu] {msg}", file=sys.stderr, flush=True)


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured here on random data."""
    from triton.testing import do_bench

    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * (1 << 30) / (copy_ms * 1e-3), 2 * 8192**3 / (mm_ms * 1e-3)


def work(cfg: dict, batch: int, seq: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one forward: every weight read once, activations of the edges only."""
    h, f, layers, heads, kv = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["heads"], cfg["kv_heads"]
    d = h // heads
    linear = layers * (h * h * 2 + 2 * h * kv * d + 3 * h * f)  # q, o; k, v; gate, up, down
    tokens = batch * seq
    causal_pairs = batch * seq * (seq + 1) / 2
    flops = 2 * tokens * linear + layers * heads * causal_pairs * d * 4  # q k^T and p v
    weights = 2 * (linear + layers * 2 * h + h)  # bf16 linear and norm weights
    edges = 2 * tokens * h * 2 + 8 * tokens  # embedding rows read, output written, ids
    return flops, weights + edges


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="prefill,decode", help="comma-separated: prefill, decode")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines (fxcc bench's names)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--reps", type=int, default=50, help="timed calls per engine (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/llama_gpu.py needs a CUDA GPU")

    from fxcc import bench

    cfg = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
           "kv_heads": args.kv_heads}
    engines = args.engines.split(",")
    bw, rate = ceilings()
    torch.cuda.empty_cache()
    machine = bench.machine("cuda")
    log(f"{machine}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    report: dict = {"machine": machine, "copy_bytes_per_s": bw, "matmul_flops_per_s": rate, "workloads": {}}
    summary = []
    for name in args.workloads.split(","):
        batch, seq = WORKLOADS[name]
        w = bench.llama(batch=batch, seq=seq, dtype=torch.bfloat16, device="cuda", **cfg)
        log(f"{name}: {w.description}")
        t0 = time.perf_counter()
        results = bench.run(w, engines=engines, warmup=args.warmup, reps=args.reps, log=log)
        flops, nbytes = work(cfg, batch, seq)
        floor_ms = max(flops / rate, nbytes / bw) * 1e3
        print(bench.table(w, results, f"\n== {name}: {w.description}\n{machine}; median of {args.reps} calls"))
        by = {r.engine: r for r in results}
        fx_ = by.get("fxcc")
        lines = ["rel err (||out - eager|| / ||eager||): " +
                 ", ".join(f"{r.engine} {r.rel_err:.2e}" for r in results if r.engine != "eager")]
        if fx_:
            for r in results:
                if r.engine != "fxcc":
                    lines.append(f"fxcc vs {r.engine}: {r.median_ms / fx_.median_ms:.2f}x")
            bound = "FLOPs" if flops / rate > nbytes / bw else "bytes"
            lines.append(f"roofline floor {floor_ms:.3f} ms ({bound}: {flops / 1e12:.2f} TFLOP, "
                         f"{nbytes / 1e9:.2f} GB); fxcc reaches {floor_ms / fx_.median_ms:.0%} of it")
        print("\n".join(lines))
        summary.extend(f"{name}: {x}" for x in lines[1:])
        entry = {"description": w.description, "flops": flops, "bytes": nbytes, "floor_ms": floor_ms,
                 "seconds": time.perf_counter() - t0, "results": [vars(r) for r in results]}
        if fx_:
            for k in fx_.extra.get("kernels", []):
                times = ", ".join(f"{b} {t:.4f}" for b, t in k["timings_ms"].items())
                log(f"  {k['kind']:<9} x{k['uses']:<3} {k['backend']:<10} {' '.join(o.split('.')[-2] for o in k['ops'])}"
                    f"{'  [' + times + ' ms]' if times else ''}")
        report["workloads"][name] = entry
        del w
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print("\n== summary\n" + "\n".join(summary))
    print("command: python benchmarks/llama_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
