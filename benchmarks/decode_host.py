"""fxcc's own host work per call of a static-cache decode step (the guard, the lookup, the write-back), with the
compiled executable replaced by its recorded result, through the keyword guard fast path and through the full
guard (pytree flatten of the cache, guard key), on a transformers Llama of `--layers` layers (CPU):

    python benchmarks/decode_host.py [--layers 16] [--number 200] [--repeat 7]

The step's arguments are taken from a real `generate` with `cache_implementation="static"`; each figure is the
fastest of `--repeat` runs of `--number` calls (a shared machine only adds time). On a GPU this host work is
what a decode step costs beyond one CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import time
import timeit
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--number", type=int, default=200)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this thread's CPU time (time.thread_time), which other processes' load does not inflate")
    args = p.parse_args()
    import fxcc
    import fxcc.runtime as runtime
    import transformers

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.disable_compile = True
    compiled = fxcc.compile(model.forward, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    calls = []

    def recorded(*a, **k):
        calls.append((a, k))
        return compiled(*a, **k)

    model.forward = recorded
    with torch.no_grad():
        for _ in range(2):
            model.generate(torch.randint(1, 128, (1, 16)), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           cache_implementation="static")
    a, k = calls[-1]  # the last decode step: step back the cache's position to replay it
    for layer in next(v for v in k.values() if runtime.is_state(v)).layers:
        layer.cumulative_length.sub_(1)
    cm = compiled.fxcc
    with torch.no_grad():
        outs = list(cm.variants[-1]._call(*cm._guard(a, k)[0]))

    def replayed(self, flat, args=None, kwargs=None, places=None):  # the executable's result without running it
        return self._result(list(outs), flat, args, kwargs, places)

    runtime.Variant.run = replayed
    key = runtime._call_key
    rows = []
    with torch.no_grad():
        for name, call_key in (("keyword fast path", key), ("full guard", lambda *x: None)):
            runtime._call_key = call_key
            cm(*a, **k)
            cm(*a, **k)
            timer = time.thread_time if args.cpu_time else time.perf_counter
            t = min(timeit.Timer(lambda: cm(*a, **k), timer=timer).repeat(number=args.number,
                                                                            repeat=args.repeat)) / args.number
            rows.append((name, t * 1e6))
    runtime._call_key = key
    clock = "CPU time" if args.cpu_time else "wall time"
    print(f"fxcc host work per static-cache decode call, {args.layers} layers (CPU, {clock}, torch {torch.__version__}):")
    for name, us in rows:
        print(f"  {name:<20} {us:8.0f} us")


if __name__ == "__main__":
    main()
