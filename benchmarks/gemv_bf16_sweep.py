"""GPU: the float-weight GEMV of the `gemv` pass (`codegen/triton_gemv.py`, bf16 weights) over a broad config
space, per decode linear of a Llama layer, against the library linear with the same neighbours as torch ops.

    python benchmarks/gemv_bf16_sweep.py                 # Llama of BENCHMARKING.md (hidden 2048, ffn 8192), M=1
    python benchmarks/gemv_bf16_sweep.py --m 8 --budget-s 200

Per shape (merged q/k/v with the RMSNorm, o + residual, gate/up with the norm and SwiGLU, down + residual, the LM
head): every config checked against fp32 torch (twice, over a poisoned output), then timed in CUDA graphs over
weight copies larger than the L2 (each weight read once per step from memory, as at decode). Prints the library's
time, the default list's best (what a compile would choose from) and the broad space's best, with the weight
bandwidth each reaches. Runs without installing fxcc (PYTHONPATH, as `make bench-mp-gpu` does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch


def broad(M: int, K: int, N: int, glu: bool) -> list[tuple]:
    out = []
    for bn, split, bk, warps, stages in itertools.product((16, 32, 64, 128), (1, 2, 4, 8, 16), (64, 128, 256, 512),
                                                          (2, 4, 8), (2, 3, 4, 5, 6)):
        tile = bn * bk * (2 if glu else 1) * 2
        if K % split or (K // split) % bk or tile * stages > 200 * 1024 or tile < 4096:
            continue
        programs = -(-N // bn) * split
        if not 66 <= programs <= 4096:
            continue
        out.append(("gemv", bn, split, bk, warps, stages, 0))
    import random
    random.Random(0).shuffle(out)  # a budget-cut sweep still samples the whole space
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--kv", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--budget-s", type=float, default=240, help="stop timing the broad space after this long")
    p.add_argument("--json", help="write all timings here")
    args = p.parse_args()
    from fxcc.codegen import triton_gemv as tg
    from fxcc.codegen import triton_quant as tq

    h, f = args.hidden, args.intermediate
    shapes = [("qkv+norm", h + 2 * args.kv, h, False, False, True), ("o+res", h, h, False, True, False),
              ("gate/up+norm+glu", f, h, True, False, True), ("down+res", h, f, False, True, False),
              ("lm_head", args.vocab, h, False, False, False)]
    t0, dump, lines = time.time(), {}, []
    per_shape = args.budget_s / len(shapes)
    for name, n, k, glu, res, norm in shapes:
        torch.manual_seed(0)
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn((2 if glu else 1) * n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        r = torch.randn(args.m, n, device="cuda", dtype=torch.bfloat16) if res else None
        g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5 if norm else None
        eps = 1e-6 if norm else None
        y = torch.empty(args.m, n, device="cuda", dtype=torch.bfloat16)
        default = [("gemv", *c) for c in tg.configs(args.m, k, n, glu, wbytes=2)]
        space = [c for c in broad(args.m, k, n, glu) if c not in default]
        copies = tg.stream_copies(w.numel() * 2)
        wsx = [w] + [w.clone() for _ in range(copies - 1)]

        def call(c, i, x=x, wsx=wsx, y=y, r=r, glu=glu, g=g, eps=eps):
            tq._go_float(c, x, wsx[i], None, y, r, glu, g, eps)

        good_default = tq._float_correct(default, x, w, None, y, r, glu, g, eps)
        times = tg.time_candidates([("library",), *good_default], call, copies, rounds=5)
        started = time.time()
        tried = 0
        for c in space:
            if time.time() - started > per_shape:
                break
            if not tq._float_correct([c], x, w, None, y, r, glu, g, eps):
                continue
            times.update(tg.time_candidates([c], call, copies, rounds=3))
            tried += 1
        best = sorted((c for c in times if c[0] == "gemv"), key=times.get)[:4]
        final = tg.time_candidates([("library",), *best, *(sorted((c for c in good_default if c in times),
                                                                   key=times.get)[:1])], call, copies, rounds=9)
        lib = final[("library",)]
        gb = w.numel() * 2 / 1e6
        bd = min((c for c in final if c in good_default), key=final.get, default=None)
        bb = min((c for c in final if c[0] == "gemv"), key=final.get)
        lines.append(f"{name:18s} N={n:6d} K={k:5d}  library {lib * 1e3:7.1f} us ({gb / lib / 1e3:5.2f} TB/s)  "
                     f"default-list best {final[bd] * 1e3 if bd else float('nan'):7.1f} us {bd}  "
                     f"broad best {final[bb] * 1e3:7.1f} us ({gb / final[bb] / 1e3:5.2f} TB/s) {bb}  "
                     f"[{len(good_default)} default, {tried} broad timed]")
        print(lines[-1], flush=True)
        dump[name] = {str(c): t for c, t in sorted(times.items(), key=lambda kv: kv[1])[:40]}
    print(f"\nmachine: {torch.cuda.get_device_name()} (torch {torch.__version__}); M={args.m}; {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dump, fh, indent=1)


if __name__ == "__main__":
    main()
