"""Time to first token through transformers' generate with a static cache, eager against fxcc, and the CUDA-graph
captures each generate makes (fxcc.cuda_graphs): per round, generate's start to the end of its first forward call
(TTFT), that call alone, the whole generate, and each capture's name and time. The model is `fxcc bench generate`'s
Llama (GPU: hidden 2048, `--layers` layers, bf16).

    python benchmarks/generate_captures.py [--layers 8] [--prompt 512] [--new-tokens 16] [--rounds 5]

Round 0 of fxcc includes its compiles. Without a GPU it runs a tiny fp32 Llama on the CPU (no captures).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=None, help="default 512 on a GPU, 32 on the CPU")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    from fxcc import bench_generate as bg
    from fxcc import cuda_graphs as cg

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (2048, args.layers, 16, 8, 8192, torch.bfloat16) if dev == "cuda" else (128, 2, 4, 2, 256, torch.float32)
    model = bg.llama(*shape, dev)
    prompt = args.prompt or (512 if dev == "cuda" else 32)
    ids = torch.randint(3, 32000, (1, prompt), device=dev)
    captures: list[tuple[str, float, bool]] = []
    capture = cg.CudaGraph.capture

    def timed_capture(fn, flat, name, *a, **k):
        t0 = time.perf_counter()
        graph = capture(fn, flat, name, *a, **k)
        captures.append((name, (time.perf_counter() - t0) * 1e3, graph is not None))
        return graph
    cg.CudaGraph.capture = staticmethod(timed_capture)
    engines = bg.engines(model, ["eager", "fxcc:static"], dev)
    for r in range(args.rounds):
        for e in engines:
            captures.clear()
            _, (t0, first_end, end), first_start = bg.generate(model, e, ids, args.new_tokens, dev)
            made = [(n, round(ms, 1), ok) for n, ms, ok in captures]
            print(f"round {r} {e.name:12} TTFT {(first_end - t0) * 1e3:8.2f} ms  1st forward "
                  f"{(first_end - first_start) * 1e3:8.2f} ms  generate {(end - t0) * 1e3:8.1f} ms  captures {made}",
                  flush=True)
    for o in gc.get_objects():
        if isinstance(o, cg.CudaGraphs):
            print(f"{o.name}: {len(o.graphs)} graphs, {getattr(o, 'evicted', 0)} dropped for room, "
                  f"{getattr(o, 'adoptions', 0)} calls with their cache copied through a graph, keys seen "
                  f"{sorted(o.seen.values())}")


if __name__ == "__main__":
    main()
