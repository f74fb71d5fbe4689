"""GPU: the Llama workload of BENCHMARKING.md with fxcc's quantized linears against fxcc's own bf16 build.

    python benchmarks/mixed_precision_gpu.py            # decode B=8 T=1 int8 weight-only, prefill B=1 T=2048 fp8
    python benchmarks/mixed_precision_gpu.py --workloads decode --budget 0.02
    python benchmarks/mixed_precision_gpu.py --workloads decode1,decode --policies int8-weight,int4  # W4A16 vs int8

Per workload, in one process with interleaved timing (CUDA events, median): eager bf16, fxcc bf16 (the
default pipeline) and fxcc with `mixed-precision{policy=P,budget=B}` between raise and fuse (P = int8-weight
for decode, fp8 for prefill; fixed policies: no Optuna needed on the GPU machine; `--policies` puts several side
by side, e.g. int8-weight,int4). Error of every engine against eager bf16: ||out - eager|| / ||eager|| and
1 - min cosine over output rows. First, per linear shape, the kernels alone: the library bf16 GEMM against fxcc's
Triton int8/fp8 GEMMs (`codegen/triton_quant.py`) and, at decode, the int4 (W4A16) GEMV (`codegen/triton_int4.py`).
Runs without installing fxcc: put a copy on PYTHONPATH as the Makefile's bench-gpu target does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

WORKLOADS = {"decode1": (1, 1, "int8-weight"), "decode": (8, 1, "int8-weight"), "prefill": (1, 2048, "fp8")}


def log(msg: str) -> None:
    print(f"[mixed_precision_gpu] {msg}", file=sys.stderr, flush=True)


def _rotating(make, copies: int):
    """ms per call of `make(i)()` over enough copies of the operands that none stays in the 60 MB L2,
    all calls captured in one CUDA graph (as fxcc's runtime replays a step)."""
    import itertools

    from fxcc.autotune.mixed_precision import _bench_graph

    fns = [make(i) for i in range(copies)]
    it = itertools.cycle(fns)
    return _bench_graph(lambda: next(it)(), copies)


def kernels_alone(cfg: dict, device: str, tokens: dict[str, int]) -> list[str]:
    """Each distinct linear shape: bf16 library GEMM vs the Triton quantized GEMM for that workload."""
    from fxcc.codegen import quant
    from fxcc.codegen import triton_int4 as t4
    from fxcc.codegen import triton_quant as tq

    h, f, kv = cfg["hidden"], cfg["intermediate"], cfg["kv_heads"] * (cfg["hidden"] // cfg["heads"])
    shapes = {"q/o": (h, h), "k/v": (kv, h), "gate/up": (f, h), "down": (h, f)}
    lines = []
    for wl, m in tokens.items():
        prec = WORKLOADS[wl][2]
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            copies = max(2, -(-256 * 2**20 // (2 * n * k)))
            ws_ = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            qs = [quant.quantize_weight(w, "int8" if prec == "int8-weight" else "fp8") for w in ws_]
            fns = {"int8-weight": [tq.int8_weight_linear], "fp8": [tq.fp8_linear, quant._fp8_scaled_mm]}[prec]
            ref = torch.nn.functional.linear(x, ws_[0])
            t_lib = _rotating(lambda i, x=x, ws_=ws_: (lambda: torch.nn.functional.linear(x, ws_[i])), copies)
            row = f"{wl:<8} {name:<8} M={m:<5} N={n:<5} K={k:<5} bf16 {t_lib * 1e3:7.1f} us"
            for fn in fns:
                err = ((fn(x, *qs[0], None).float() - ref.float()).norm() / ref.float().norm()).item()
                t_q = _rotating(lambda i, fn=fn, x=x, qs=qs: (lambda: fn(x, *qs[i], None)), copies)
                label = f"{prec}/{'triton' if fn.__module__.endswith('triton_quant') else 'scaled_mm'}"
                row += (f" | {label} {t_q * 1e3:7.1f} us {t_lib / t_q:5.2f}x, weight {n * k / (t_q * 1e-3) / 1e9:5.0f}"
                        f" GB/s, rel err {err:.1e}")
            if prec == "int8-weight":  # decode: the int4 GEMV too (weight bytes n * k / 2 plus scales)
                q4 = [quant.quantize_weight_int4(w, torch.bfloat16) for w in ws_]
                err = ((t4.int4_linear(x, *q4[0], None, 128).float() - ref.float()).norm() / ref.float().norm()).item()
                t_q = _rotating(lambda i, x=x, q4=q4: (lambda: t4.int4_linear(x, *q4[i], None, 128)), copies)
                row += (f" | int4/triton {t_q * 1e3:7.1f} us {t_lib / t_q:5.2f}x, weight "
                        f"{n * k / 2 / (t_q * 1e-3) / 1e9:5.0f} GB/s, rel err {err:.1e}")
                del q4
            lines.append(row)
            del ws_, qs
    lines.append("block sizes chosen: " + json.dumps({k: list(v) for k, v in tq.chosen_configs().items()}))
    lines.append("int4 configs chosen: " + json.dumps({k: list(v) for k, v in t4.chosen_configs().items()}))
    return lines


def profile(engine: str, call, median_ms: float, calls: int = 10) -> list[str]:
    """GPU kernel time per call (sum over kernels) against the median wall time, and the largest kernels:
    where a step's time goes (the gap is launch gaps and host work)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    call()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    rows = [(ev.key, ev.count / calls, ev.device_time_total / calls) for ev in p.key_averages()
            if ev.device_time_total > 0]
    total = sum(r[2] for r in rows)
    out = [f"-- {engine}: GPU kernels {total / 1e3:.3f} ms per call of {median_ms:.3f} ms median "
           f"({len(rows)} kinds, {sum(r[1] for r in rows):.0f} launches per call)"]
    for key, n, us in sorted(rows, key=lambda r: -r[2])[:10]:
        out.append(f"   {us:8.1f} us  {n:5.0f}x  {key[:90]}")
    return out


def _caller(fn, args: tuple, kwargs: dict):
    def run():
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="decode,prefill")
    p.add_argument("--budget", type=float, default=0.02, help="error budget of the pass (1 - min cosine over rows)")
    p.add_argument("--policies", default=None,
                   help="comma-separated mixed-precision policies, each an engine beside fxcc bf16 (default: the "
                        "workload's own, int8-weight at decode and fp8 at prefill); e.g. int8-weight,int4")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    p.add_argument("--seq", type=int, default=None, help="override T of prefill (smoke tests)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernels-alone table")
    p.add_argument("--profile", action="store_true",
                   help="per fxcc engine: GPU kernel time per call and its largest kernels (torch.profiler)")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    import fxcc
    from fxcc import bench
    from fxcc.autotune.mixed_precision import mixed_precision_report
    from fxcc.measure import interleaved
    from fxcc.quality import quality_loss

    dev = args.device
    cfg = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
           "kv_heads": args.kv_heads}
    names = args.workloads.split(",")
    out_lines = [f"machine: {bench.machine(dev)}"]
    report: dict = {"machine": out_lines[0], "workloads": {}}
    if dev == "cuda" and not args.no_kernels:
        toks = {n: WORKLOADS[n][0] * (args.seq or WORKLOADS[n][1]) if n == "prefill" else WORKLOADS[n][0]
                for n in names}
        out_lines += ["", "== kernels alone (do_bench median)"] + kernels_alone(cfg, dev, toks)
        print("\n".join(out_lines[-len(toks) * 4 - 3:]), flush=True)
    for name in names:
        batch, seq, policy = WORKLOADS[name]
        if name == "prefill" and args.seq:
            seq = args.seq
        policies = args.policies.split(",") if args.policies else [policy]
        fp8 = dev == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
        policies = [("int8" if p == "fp8" and not fp8 else p) for p in policies]  # smoke test without fp8
        w = bench.llama(batch=batch, seq=seq, dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                        device=dev, **cfg)
        log(f"{name}: {w.description}; fxcc {', '.join(policies)}")
        with torch.inference_mode():
            ref = w.model(*w.args, **w.kwargs)
        engines = {"eager": w.model, "fxcc bf16": fxcc.compile(w.model)}
        for pol in policies:
            pipeline = f"canonicalize,raise,mixed-precision{{policy={pol},budget={args.budget}}},fuse,codegen"
            engines[f"fxcc {pol}"] = fxcc.compile(w.model, passes=pipeline)
        compile_s = {}
        for e, fn in engines.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn(*w.args, **w.kwargs)
            if dev == "cuda":
                torch.cuda.synchronize()
            compile_s[e] = time.perf_counter() - t0
            log(f"{e}: first call {compile_s[e]:.1f} s")

        calls = {e: _caller(fn, w.args, w.kwargs) for e, fn in engines.items()}
        t = interleaved(calls, device=dev, warmup=5, reps=args.reps)
        lines = [f"\n== {name}: {w.description}; median of {args.reps} calls, interleaved",
                 f"{'engine':<22} {'first call s':>12} {'median ms':>10} {'vs eager':>9} {'vs fxcc bf16':>13} "
                 f"{'rel err':>9} {'1-min cos':>10}"]
        base = t["fxcc bf16"].median
        res = {}
        for e, c in calls.items():
            with torch.inference_mode():
                out = c()
            a, b = ref.last_hidden_state.float(), out.last_hidden_state.float()
            rel = ((b - a).norm() / a.norm()).item()
            err = quality_loss([a], [b])
            res[e] = {"median_ms": t[e].median, "first_call_s": compile_s[e], "rel_err": rel, "one_minus_min_cos": err}
            lines.append(f"{e:<22} {compile_s[e]:>12.1f} {t[e].median:>10.3f} {t['eager'].median / t[e].median:>8.2f}x "
                         f"{base / t[e].median:>12.2f}x {rel:>9.2e} {err:>10.2e}")
        if args.profile and dev == "cuda":
            for e in ("fxcc bf16", *(f"fxcc {pol}" for pol in policies)):
                lines += profile(e, calls[e], t[e].median)
        for pol in policies:
            rep = mixed_precision_report(engines[f"fxcc {pol}"])
            if rep is None:
                continue
            chosen: dict[str, int] = {}
            for r in rep.layers:
                chosen[f"{r.precision}/{r.kernel}"] = chosen.get(f"{r.precision}/{r.kernel}", 0) + 1
            lines.append(f"mixed-precision {pol}: {chosen}; predicted error {rep.predicted_error:.2e}, measured "
                         f"{rep.measured_error:.2e} (budget {rep.budget:g}); linears alone {rep.baseline_ms:.3f} -> "
                         f"{rep.predicted_ms:.3f} ms (sum of per-layer times)")
            res[f"report {pol}"] = rep.text()
        if len(policies) > 1:
            a, b = f"fxcc {policies[0]}", f"fxcc {policies[-1]}"
            lines.append(f"{b} vs {a}: {t[a].median / t[b].median:.2f}x")
        print("\n".join(lines), flush=True)
        out_lines += lines
        report["workloads"][name] = res
        del engines, w
        if dev == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    print("\n== summary\n" + "\n".join(out_lines))
    print("command: python benchmarks/mixed_precision_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
