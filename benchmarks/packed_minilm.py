"""MiniLM (batch 8, sequence 128, the trained weights of `fxcc bench minilm`) compiled with the default pipeline
(packed weight copies unbounded) and with `codegen{packed=0.05}` (the copies bounded to 0.05 of the parameter
bytes), against eager, in one process: what holding each weight about once costs in speed on the CPU.

    OMP_NUM_THREADS=2 python benchmarks/packed_minilm.py [--rounds 25] [--threads 2]

Each round calls every engine three times in turn and keeps its fastest call (a shared machine only adds time);
medians over the rounds, and the per-round ratio of the bounded to the unbounded build with its quartiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import fxcc
    from fxcc.bench import minilm
    from fxcc.pipeline import DEFAULT_PIPELINE

    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    w = minilm(8, 128)
    engines = {"eager": w.model, "fxcc (unbounded)": fxcc.compile(w.model),
               "fxcc packed=0.05": fxcc.compile(w.model, passes=DEFAULT_PIPELINE.replace("codegen", "codegen{packed=0.05}"))}
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for f in engines.values():
            for _ in range(3):
                f(*w.args, **w.kwargs)
        for _ in range(a.rounds):
            for name, f in engines.items():
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    f(*w.args, **w.kwargs)
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best * 1e3)
    eager = statistics.median(times["eager"])
    for name, ts in times.items():
        print(f"{name:18s} {statistics.median(ts):8.2f} ms  {eager / statistics.median(ts):5.2f}x eager")
    ratio = [b / u for b, u in zip(times["fxcc packed=0.05"], times["fxcc (unbounded)"])]
    q = statistics.quantiles(ratio)
    print(f"packed=0.05 / unbounded, per round: median {statistics.median(ratio):.2f}, quartiles {q[0]:.2f}-{q[2]:.2f}")


if __name__ == "__main__":
    main()
