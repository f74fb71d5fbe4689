"""What the checks that keep compiled code right after the model changes cost per call, on MiniLM (real weights,
batch 8, seq 128, 2 threads):

    python benchmarks/guard_cost.py [--reps 200] [--clone-weights]
    python benchmarks/guard_cost.py --tiny [--layers 1 4 16] [--calls 200] [--rounds 7] [--new-lengths] [--cpu-time]

Two checks run on every call: the module-state guard (fxcc.guards: identities, layouts, primitive attributes,
the snapshots of the weights folded into constants, and the Python globals the compiled code read, also timed
without that part), before the variant runs; and the packed-weight
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


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.1f} us ({min(xs):.1f}-{max(xs):.1f})"


_INNER = {"s": 0.0}  # seconds spent in compiled executables since reset (Variant._call, wrapped by `measure`)
_CLOCK = [time.perf_counter]  # --cpu-time: time.thread_time (this thread's CPU time, which others' load does not add to)


def _one(fn) -> tuple[float, float]:
    """One call of `fn`: its time and the time its compiled executable took, in microseconds."""
    clock = _CLOCK[0]
    _INNER["s"] = 0.0
    t = clock()
    fn()
    return (clock() - t) * 1e6, _INNER["s"] * 1e6


def measure(name: str, eager_step, fxcc_step, reset, cm, calls: int, rounds: int) -> None:
    """Print per-call eager, fxcc, its executable and its host work (median of rounds of `calls` calls each,
    `reset` before each round and every 32 calls), and the module-state guard alone."""
    from fxcc.runtime import Variant

    run = Variant._call

    clock = _CLOCK[0]

    def timed_call(self, *flat):
        t = clock()
        try:
            return run(self, *flat)
        finally:
            _INNER["s"] += clock() - t

    rows = {"eager": [], "fxcc": [], "executable": [], "host": []}
    Variant._call = timed_call
    try:
        for _ in range(rounds):
            for engine, step in (("eager", eager_step), ("fxcc", fxcc_step)):
                reset()
                got = []
                for i in range(calls):
                    got.append(_one(step))
                    if (i + 1) % 32 == 0:
                        reset()
                rows[engine].append(statistics.median(t for t, _ in got))
                if engine == "fxcc":
                    rows["executable"].append(statistics.median(e for _, e in got))
                    rows["host"].append(statistics.median(t - e for t, e in got))
    finally:
        Variant._call = run
    state = cm._params
    read = state.globals  # the Python globals guard (fxcc.guards.Globals), timed as part of the guard and without
    guard, bare = [], []
    for _ in range(rounds):
        guard.append(per_call_us(state.changed, 2000, 1))
        if read is not None:
            state.globals = None
            bare.append(per_call_us(state.changed, 2000, 1))
            state.globals = read
    print(f"{name}: compiles {cm.stats.compiles}, eager calls {cm.stats.eager_calls}")
    for k, v in rows.items():
        print(f"  {k:<11} {_spread(v)}")
    print(f"  {'guard':<11} {_spread(guard)}  (ModuleState.changed alone: {len(state.counts_of)} dicts, "
          f"{len(state.tensors)} tensors)")
    if read is not None:
        print(f"  {'no globals':<11} {_spread(bare)}  (the same guard without its check of {len(read.dicts)} "
              f"globals dicts, {len(read.names)} names)")


def _mlp(fast: str, opts, calls: int, rounds: int) -> None:
    import fxcc

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    cm = fxcc.compile(mlp, passes=fast, options=opts)
    x = torch.randn(4, 16)
    with torch.no_grad():
        cm(x)
        measure("MLP 16-64-16, x 4x16", lambda: mlp(x), lambda: cm(x), lambda: None, cm, calls, rounds)


def _decode(layers: int, fast: str, opts, calls: int, rounds: int, new_lengths: bool) -> None:
    import fxcc
    import transformers
    from transformers import DynamicCache

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cm = fxcc.compile(model, passes=fast, options=opts)
    prompt, token = torch.randint(1, 128, (1, 8)), torch.tensor([[5]])
    caches = {"eager": DynamicCache(config=cfg), "fxcc": DynamicCache(config=cfg)}

    def reset():
        for c in caches.values():
            if c.get_seq_length() > 8:
                c.crop(8 - c.get_seq_length())  # a negative count: tokens removed from the end
        if new_lengths:
            cm._memo.clear()

    with torch.no_grad():
        model(input_ids=prompt, cache=caches["eager"], use_cache=True)
        cm(input_ids=prompt, cache=caches["fxcc"], use_cache=True)
        for _ in range(2):  # the first decode steps compile (static, then symbolic in the cache's length; a
            for _ in range(4):  # cropped cache's views have other strides)
                cm(input_ids=token, cache=caches["fxcc"], use_cache=True)
            reset()
        measure(f"Llama {layers} layers, decode step (DynamicCache{', new lengths' if new_lengths else ''})",
                lambda: model(input_ids=token, cache=caches["eager"], use_cache=True),
                lambda: cm(input_ids=token, cache=caches["fxcc"], use_cache=True), reset, cm, calls, rounds)


def tiny(layers: list[int], calls: int, rounds: int, new_lengths: bool) -> None:
    """Per-call host work of fxcc on a small MLP and on tiny Llamas' decode steps (see the module's doc)."""
    import fxcc

    torch.set_num_threads(1)
    fast = "canonicalize,raise,fuse,codegen{backend=extern}"
    opts = fxcc.CompileOptions(check_eager=False, time_vs_eager=False)
    _mlp(fast, opts, calls, rounds)
    for n in layers:
        _decode(n, fast, opts, calls, rounds, new_lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clone-weights", action="store_true", help="give every weight an ordinary (copy-on-write "
                                                                  "capable) storage before compiling")
    p.add_argument("--tiny", action="store_true", help="host work per call on a small MLP and tiny Llamas")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--calls", type=int, default=200, help="--tiny: calls per engine and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true", help="--tiny: time with this thread's CPU time")
    p.add_argument("--new-lengths", action="store_true", help="--tiny: every decode step's cache length new to the "
                                                                "variant lookup")
    args = p.parse_args()
    if args.tiny:
        if args.cpu_time:
            _CLOCK[0] = time.thread_time
        tiny(args.layers, args.calls, args.rounds, args.new_lengths)
        return
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
