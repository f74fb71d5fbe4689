"""TP=2 on two GPUs: unfused, fused all-reduce + RMSNorm, fused + token split, against TP=1, in one run.

    python benchmarks/tp_gpu.py --json build/tp-gpu.json          # prefill B=1 T=2048 and decode B=8 T=1

Launches one process per GPU itself (spawn, NCCL), like `torchrun --nproc-per-node 2`. Llama from
transformers.LlamaConfig with random weights (BENCHMARKING.md: hidden 2048, ffn 8192, 16 layers, 16/8
heads), bf16, no KV cache. Every plan is built from one capture (canonicalize, raise) plus its own
tp-shard / fuse-allreduce-rmsnorm passes, runs as a CUDA graph, is checked against TP=1 and timed with
CUDA events in interleaved rounds (median; ranks in lockstep, rank 0 reports). It also measures the
ceilings the cost model needs (matmul rate, HBM copy bandwidth, all-reduce latency/bandwidth for NCCL and
symmetric memory) and prints the model's prediction next to each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

WORKLOADS = {"prefill": (1, 2048), "decode": (8, 1)}
CFG = dict(hidden=2048, intermediate=8192, layers=16, heads=16, kv_heads=8)


def log(msg: str) -> None:
    print(f"[tp_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median_ms(fn, reps: int = 50) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=reps, return_mode="median")


def ceilings(rank: int) -> dict:
    """Matmul FLOP/s, copy bytes/s and all-reduce (latency, bandwidth) fits, measured on this machine."""
    import torch.distributed as dist
    from fxcc.autotune.tp_plan import fit_allreduce
    from fxcc.codegen import allreduce_rmsnorm as arn

    out = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out["matmul_flops"] = 2 * 8192**3 / (_median_ms(lambda: a @ a) * 1e-3)
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    out["copy_bytes_s"] = 2 * src.numel() * 2 / (_median_ms(lambda: dst.copy_(src)) * 1e-3)
    pg = dist.group.WORLD
    samples = {"nccl": [], "symm": []}
    for rows in (8, 2048):
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        r, y = torch.randn_like(x), torch.empty_like(x)
        calls = [0]

        def nccl(x=x, y=y):  # what the unfused graph does: a copy, then the all-reduce
            y.copy_(x)
            dist.all_reduce(y)

        def symm(x=x, r=r, calls=calls):  # two sites in turn, as in a model: one barrier per call
            calls[0] += 1
            arn.all_reduce_rms_norm_impl(x, r, None, 1e-6, "", "symm", 998 + calls[0] % 2, 0)

        for kind, fn in (("nccl", nccl), ("symm", symm)):
            if kind == "symm" and not arn.symm_available(pg):
                continue
            samples[kind].append((x.numel() * 2, _graph_seconds(fn)))
    out["allreduce_samples"] = samples
    out["allreduce_fit"] = {k: fit_allreduce(v) for k, v in samples.items() if len(v) == 2}
    return out


def _graph_seconds(fn, calls: int = 20, reps: int = 15) -> float:
    """Seconds per call of `fn` captured `calls` times in one CUDA graph (ranks replay in lockstep)."""
    import torch.distributed as dist
    from fxcc.measure import capture_graph, graph_timings

    def loop():
        for _ in range(calls):
            fn()
    for _ in range(3):  # warm-up in lockstep on every rank (a collective in fn)
        fn()
    g, _ = capture_graph(loop, warmup=0)
    t = graph_timings({"fn": g}, calls=calls, rounds=reps, before=lambda: (dist.barrier(), torch.cuda.synchronize()))
    return t["fn"].median * 1e-3


def worker(rank: int, world: int, opts: dict) -> dict:
    """One rank: for each workload build every plan from one capture, check and time it."""
    from fxcc.autotune.tp_plan import CostModel, Rates, TPPlan, compare
    from fxcc.tp_bench import measure_plans, plan_graphs
    from transformers import LlamaConfig, LlamaModel

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = opts["device"]
    cpu = dev == "cpu"
    res: dict = {"device": "cpu (smoke test)" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                 "world": world}
    say = log if rank == 0 else (lambda m: None)
    res["ceilings"] = ({"matmul_flops": 1e11, "copy_bytes_s": 1e10, "allreduce_fit": {"nccl": (1e-4, 1e9)}}
                       if cpu else ceilings(rank))
    say(f"ceilings: {json.dumps(res['ceilings'])}")
    c = opts["cfg"]
    cfg = LlamaConfig(hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=opts["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaModel(cfg).eval().to(torch.float32 if cpu else torch.bfloat16)
    plans = [TPPlan(1), TPPlan(2), TPPlan(2, True, impl="nccl"), TPPlan(2, True, impl="auto"),
             TPPlan(2, True, True, 0.5, "nccl"), TPPlan(2, True, True, 0.5, "auto"), TPPlan(2, True, True, 0.25, "auto")]
    if opts["codegen"]:  # the same plans with fxcc's own kernels for everything else (the product)
        plans += [TPPlan(1, rest="fuse,codegen"), TPPlan(2, rest="fuse,codegen"),
                  TPPlan(2, True, impl="auto", rest="fuse,codegen"), TPPlan(2, True, True, 0.5, "auto", rest="fuse,codegen")]
    fit = res["ceilings"]["allreduce_fit"]
    rates = Rates(matmul=res["ceilings"]["matmul_flops"], hbm=res["ceilings"]["copy_bytes_s"],
                  allreduce={k: tuple(v) for k, v in fit.items()})
    cost = CostModel(rates, symm="symm" in fit)
    for wl in opts["workloads"]:
        b, t = WORKLOADS[wl]
        if cpu:
            b, t = b, min(t, 256)
        ids = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
        torch.distributed.broadcast(ids, 0)
        t0 = time.perf_counter()
        meas = measure_plans(model, (ids,), {"use_cache": False}, plans, warmup=opts["warmup"], reps=opts["reps"],
                             device=dev, log=say, cost=cost)
        with torch.inference_mode():
            from fxcc.measure import interleaved
            eager = interleaved({"eager": lambda ids=ids: model(ids, use_cache=False)}, device=dev,
                                warmup=opts["warmup"], reps=opts["reps"])["eager"].median
        # device counts this host does not have: ranked by the model only, from the IR rank 0 would run
        unmeasured = [TPPlan(tp, f, sp, 0.5) for tp in (4, 8) for f, sp in ((False, False), (True, False), (True, True))]
        graphs = plan_graphs(model, (ids,), {"use_cache": False}, unmeasured) if rank == 0 else {}
        pred = {k: v["model_ms"] for k, v in meas.items() if v.get("model_ms") is not None}
        pred |= {k: cost.graph_time(g, int(k[2])) * 1e3 for k, g in graphs.items()}
        # the same model with its per-kernel cost fitted on the TP=1 measurement (one number), checked on the rest
        tp1 = meas.get("tp1", {})
        calibrated = {}
        if tp1.get("model_ms"):
            launch = max(0.0, rates.launch + (tp1["ms"] - tp1["model_ms"]) * 1e-3 / tp1["kernels"])
            cal = CostModel(Rates(rates.matmul, rates.hbm, launch, rates.allreduce), symm=cost.symm)
            calibrated = {k: v["model_ms"] + (launch - rates.launch) * 1e3 * v["kernels"]
                          for k, v in meas.items() if v.get("model_ms") is not None}
            calibrated |= {k: cal.graph_time(g, int(k[2])) * 1e3 for k, g in graphs.items()}
            res.setdefault("calibrated_launch_s", {})[wl] = launch
        measured = {k: v["ms"] for k, v in meas.items() if "ms" in v and v.get("model_ms") is not None}
        res[wl] = {"measured": meas, "eager_tp1_ms": eager, "predicted_ms": pred, "calibrated_ms": calibrated,
                   "model_vs_measured": compare(pred, measured),
                   "calibrated_vs_measured": compare(calibrated, measured) if calibrated else None,
                   "seconds": time.perf_counter() - t0}
        say(f"{wl}: " + ", ".join(f"{k} {v.get('ms', float('nan')):.3f} ms" for k, v in meas.items()))
    return res


def table(res: dict) -> str:
    lines = [f"TP benchmark on {res['world']} x {res['device']} (torch {res['torch']}), Llama hidden 2048, ffn 8192, "
             "16/8 heads, bf16; median ms, CUDA graphs"]
    for wl in WORKLOADS:
        if wl not in res:
            continue
        r = res[wl]
        m = r["measured"]
        lines.append(f"\n{wl} (B,T)={WORKLOADS[wl]}  eager TP=1 {r['eager_tp1_ms']:.3f} ms")
        lines.append(f"{'plan':<44} {'median ms':>9} {'p10-p90':>13} {'vs unfused':>10} {'model':>7} {'calib':>7} "
                     f"{'rel err vs tp1':>14}")
        for k, v in m.items():
            if "failed" in v:
                lines.append(f"{k:<44} FAILED {v['failed'][:120]}")
                continue
            base = m.get("tp2-unfused+fuse+codegen" if k.endswith("codegen") else "tp2-unfused", {}).get("ms")
            spread = f"{v['p10']:.2f}-{v['p90']:.2f}"
            pm, cm = r["predicted_ms"].get(k), r["calibrated_ms"].get(k)
            lines.append(f"{k:<44} {v['ms']:>9.3f} {spread:>13} {(base / v['ms'] if base else float('nan')):>9.3f}x "
                         f"{pm if pm is not None else float('nan'):>7.2f} {cm if cm is not None else float('nan'):>7.2f} "
                         f"{v['rel_err_vs_tp1'] or 0:>14.2e}")
        extra = {k: (v, r["calibrated_ms"].get(k)) for k, v in r["predicted_ms"].items() if k not in m}
        lines.append("model only (raw / calibrated ms): " + ", ".join(
            f"{k} {a:.2f}/{b if b is not None else float('nan'):.2f}" for k, (a, b) in extra.items()))
        for key in ("model_vs_measured", "calibrated_vs_measured"):
            c = r.get(key)
            if c:
                lines.append(f"{key}: median predicted/measured {c['median_ratio']:.2f}, pairwise order agreement "
                             f"{c['pairwise_order_agreement']:.2f}, best by model {c['best_by_model']}, "
                             f"best measured {c['best_measured']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="prefill,decode")
    p.add_argument("--layers", type=int, default=CFG["layers"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json", default=None)
    p.add_argument("--no-codegen", action="store_true", help="skip the plans that also run fuse,codegen")
    p.add_argument("--cpu-smoke", action="store_true", help="2 gloo processes on the CPU, small layers (debugging)")
    a = p.parse_args(argv)
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ[k] = v  # no NVLink multicast, ever (KINDS.md)
    if torch.cuda.device_count() < 2 and not a.cpu_smoke:
        raise SystemExit("benchmarks/tp_gpu.py needs 2 GPUs (device kind nvidia-h200-x2); --cpu-smoke runs it small")
    from fxcc.autotune.tp_plan import launch

    opts = {"workloads": a.workloads.split(","), "layers": a.layers, "warmup": a.warmup, "reps": a.reps,
            "device": "cpu" if a.cpu_smoke else "cuda", "codegen": not a.no_codegen,
            "cfg": dict(CFG, hidden=256, intermediate=512, heads=8, kv_heads=4) if a.cpu_smoke else CFG}
    res = launch(worker, 2, opts, backend="gloo" if a.cpu_smoke else "nccl")[0]
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
