"""What the checks that keep compiled code right after the model changes cost per call, on MiniLM (real weights,
batch 8, seq 128, 2 threads):

    python benchmarks/guard_cost.py [--reps 200] [--clone-weights]

Two checks run on every call: the module-state guard (fxcc.guards: identities, layouts, primitive attributes,
and the snapshots of the weights folded into constants), before the variant runs; and the packed-weight
caches' test (fxcc.codegen.derived, one snapshot check per packed weight use), inside kernels. A snapshot is
copy-on-write where torch can make one (one address compare); weights loaded by `from_pretrained` live in
storages it cannot (mmapped safetensors), and then each check compares the weight's bytes. `--clone-weights`
gives every weight an ordinary storage first (as a model built or trained in the process has), to show the
copy-on-write cost. Each check is timed on an unchanged model and set against the median compiled call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def per_call_us(fn, reps: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of `reps` calls, in microseconds."""
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t) / reps * 1e6)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clone-weights", action="store_true", help="give every weight an ordinary (copy-on-write "
                                                                  "capable) storage before compiling")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import fxcc
    from fxcc import watch
    from fxcc.bench import minilm

    w = minilm(8, 128)
    if args.clone_weights:
        with torch.no_grad():
            for t in w.model.parameters():
                t.data = t.data.clone()
    cm = fxcc.compile(w.model)
    with torch.inference_mode():
        cm(**w.kwargs)
        cm(**w.kwargs)  # packing a weight may take a writable pointer once: snapshots are retaken after it
        state = cm._params
        assert state.changed() is None
        guard = per_call_us(state.changed, args.reps)

        checks = {"n": 0, "s": 0.0, "copies": 0}
        same = watch.Snapshot.same

        def timed(self, t):
            t0 = time.perf_counter()
            try:
                return same(self, t)
            finally:
                checks["n"] += 1
                checks["s"] += time.perf_counter() - t0
                checks["copies"] += not self.cow
        calls = []
        watch.Snapshot.same = timed
        try:
            for _ in range(10):
                t = time.perf_counter()
                cm(**w.kwargs)
                calls.append((time.perf_counter() - t) * 1e3)
        finally:
            watch.Snapshot.same = same
    call_ms = statistics.median(calls)
    n, snap_us = checks["n"] / len(calls), checks["s"] / len(calls) * 1e6
    cow = sum(s.cow for _, s in state.watched)
    print(f"MiniLM, batch 8, seq 128, {args.threads} threads, weights {'cloned' if args.clone_weights else 'as loaded'};"
          f" compiled call median {call_ms:.2f} ms")
    print(f"guard: {guard:.1f} us per call ({len(state.tensors)} tensors by identity and layout, "
          f"{len(state.values)} primitive attributes, {len(state.watched)} folded-from weights by snapshot, {cow} "
          f"copy-on-write) = {guard / call_ms / 10:.2f}% of a call")
    print(f"all snapshot checks in a call (the guard's and the packed-weight caches'): {n:.0f} checks, "
          f"{checks['copies'] / len(calls):.0f} by byte comparison, {snap_us:.1f} us = {snap_us / call_ms / 10:.2f}% "
          "of a call")


if __name__ == "__main__":
    main()
