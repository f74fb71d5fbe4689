"""fxcc's own decode loop against transformers' generate loop, both around the same compiled model: greedy
generation with a static cache on a small Llama (`fxcc bench generate`'s model), where host work dominates a step.

    python benchmarks/decode_loop.py                                  # CPU: hidden 128, 2 layers, vocab 1024, 1 thread
    python benchmarks/decode_loop.py --device cuda --hidden 2048 --layers 16 --vocab 32000 --dtype bfloat16 --prompt 512

`fxcc.compile(model).generate(ids, cache_implementation="static")` runs fxcc's loop (`loop`); with
`compiled.decode_loop.enabled = False` the same call runs transformers' loop around the compiled forward (`hf`).
The time per decode token is the difference of two generates, `--new-tokens` and a quarter of it, over the
difference in tokens (prefill and set-up cancel); each round times both paths back to back, in alternating order.
Reported: medians over the rounds and the range, wall time and this thread's CPU time (which other processes' load
does not inflate on the CPU; on the GPU it is the host's work), whether the ids equal eager's and, on the GPU, the
step's share of the memory roofline (`fxcc bench generate`'s floor: weights and the static cache read once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxcc  # noqa: E402
from fxcc.bench_generate import roofline_ms  # noqa: E402


def llama(args: argparse.Namespace, heads: int) -> torch.nn.Module:
    """`fxcc bench generate`'s Llama with a vocabulary of `--vocab`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), vocab_size=args.vocab,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device=args.device, dtype=getattr(torch, args.dtype))
    model.generation_config.disable_compile = True  # transformers would compile static-cache decoding itself
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024, help="a small vocabulary keeps the LM head from dominating")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", default=None, help="fxcc pipeline (default: fxcc's)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    heads = max(args.hidden // 64, 2)
    model = llama(args, heads)
    ids = torch.randint(2, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    compiled = fxcc.compile(model, **({"passes": args.passes} if args.passes else {}))
    long, short = args.new_tokens, max(args.new_tokens // 4, 2)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def generate(loop: bool, new: int) -> tuple[torch.Tensor, float, float]:
        compiled.decode_loop.enabled = loop
        sync()
        w, c = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            out = compiled.generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static")
        sync()
        return out, time.perf_counter() - w, time.thread_time() - c

    with torch.inference_mode():
        eager = model.generate(ids, max_new_tokens=long, do_sample=False, cache_implementation="static")
    same = {}
    for loop in (True, False):  # compiles, and the ids against eager's
        for new in (short, long):
            out, _, _ = generate(loop, new)
        same[loop] = torch.equal(out, eager)
        path = compiled.decode_loop.last[0]
        assert path == ("fxcc's decode loop" if loop else "transformers' generate loop"), compiled.decode_loop.last
    per = {True: ([], []), False: ([], [])}
    for r in range(args.reps):
        for loop in ((True, False) if r % 2 == 0 else (False, True)):
            _, w1, c1 = generate(loop, short)
            _, w2, c2 = generate(loop, long)
            per[loop][0].append((w2 - w1) / (long - short) * 1e3)
            per[loop][1].append((c2 - c1) / (long - short) * 1e3)
    load = os.getloadavg()[0]
    print(f"decode loop, Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt}, {short} and {long} new tokens, {args.device}, {args.threads} thread(s), torch "
          f"{torch.__version__}; {args.reps} rounds, load average {load:.1f}")
    print(f"{'path':<6} {'ms/token':>9} {'[range]':>15} {'tok/s':>8} {'CPU ms/token':>13} {'[range]':>15} {'ids':>5}")
    for loop, name in ((True, "loop"), (False, "hf")):
        wall, cpu = per[loop]
        print(f"{name:<6} {statistics.median(wall):>9.3f} {f'[{min(wall):.3f}-{max(wall):.3f}]':>15} "
              f"{args.batch * 1e3 / statistics.median(wall):>8.0f} {statistics.median(cpu):>13.3f} "
              f"{f'[{min(cpu):.3f}-{max(cpu):.3f}]':>15} {'same' if same[loop] else 'DIFF':>5}")
    if args.device == "cuda":  # the decode step's share of the memory roofline (fxcc bench generate's floor)
        floor = roofline_ms(model, args.batch, args.prompt, long, args.prompt + long)
        print("memory roofline: " + ", ".join(f"{name} {floor / statistics.median(per[loop][0]):.0%}"
                                              for loop, name in ((True, "loop"), (False, "hf"))))
    ratios = [b / a for a, b in zip(per[True][0], per[False][0])]
    print(f"hf / loop per token (wall), per round: median {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
