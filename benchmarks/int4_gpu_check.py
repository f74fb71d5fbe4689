"""H200 check and sweep of the int4 (W4A16) Triton GEMV of `codegen/triton_int4.py`.

    python benchmarks/int4_gpu_check.py                  # check, default lists, then the broad sweep (~10 min)
    python benchmarks/int4_gpu_check.py --quick          # check and default lists only
    python benchmarks/int4_gpu_check.py --budget-s 200   # start no broad sweep past 200 s

1. Correctness: every config of the default list (both bit conversions) with the epilogues (bias, residual,
   SwiGLU, RMSNorm), three times over a poisoned output (split-K leaves its workspace empty).
2. Per Llama-1B decode shape (gate/up and down at M = 1, 8, then q/o): the bf16 library GEMM, the int8 weight-only
   GEMV and int4_linear, each with the config it measures for itself, then the default int4 list with every
   conversion (0: Triton's, 1: bits in Triton, 2: bits in PTX).
3. Per shape, in that order while within the budget: the rest of the broad space (`configs(..., broad=True)`:
   more block shapes, warps and stages, 16-row blocks) with the PTX conversion.
Each int4 config is checked once against the reference before it is timed; all timings in CUDA graphs over weight
copies larger than the L2. Prints GB/s of weight (int8: N*K bytes, int4: N*K/2) next to each, the best config
per conversion, BLOCK_M, (BLOCK_N, GPB) and (warps, stages), and the fastest: what the default list should hold.
Runs without installing fxcc (PYTHONPATH, as the Makefile's bench targets do).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# (M, (name, N, K)), the most telling first: the broad sweep stops at the time budget
SHAPES = tuple((m, s) for s in (("gate/up", 8192, 2048), ("down", 2048, 8192)) for m in (1, 8)) + tuple(
    (m, ("q/o", 2048, 2048)) for m in (1, 8))


def _check(t4, quant, t0: float) -> None:
    """Every default config (conversions 1 and 2) with the epilogues, three times over a poisoned output."""
    for m, glu, norm in ((8, False, False), (8, True, True), (1, False, True), (1, True, False)):
        w = torch.randn((2 if glu else 1) * 512, 2048, device="cuda")
        qw, sz = quant.quantize_weight_int4(w, torch.bfloat16)
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        b, r = torch.randn(w.shape[0], device="cuda"), torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        eps = 1e-5 if norm else None
        want = t4._reference(x, qw, sz, b, 128, r, glu, None, eps)
        bad = []
        cfgs = list(dict.fromkeys(t4.configs(m, 2048, 512, 128, glu, cvts=(1, 2)) +
                                  t4._candidates(x, m, 2048, 512, 128, glu)))  # the latter's first: 16 rows
        for cfg in cfgs:
            for _ in range(3):
                y = torch.full((m, 512), float("nan"), device="cuda", dtype=torch.bfloat16)
                try:
                    t4.w4_gemm(x, qw, sz, b, y, 128, cfg, r, glu, None, eps)
                    e = ((y.float() - want).norm() / want.norm()).item()
                except Exception as ex:  # noqa: BLE001 - report and go on
                    e = f"{type(ex).__name__}: {str(ex)[:300]}"
                if not (isinstance(e, float) and e < 1e-2):
                    bad.append((cfg, e))
                    break
        print(f"check M={m} glu={glu} norm={norm}: {len(cfgs)} configs, wrong: {bad} ({time.perf_counter() - t0:.0f} s)",
              flush=True)


def _shape(name: str, m: int, n: int, k: int, broad: bool, t0: float) -> None:
    """At one shape: the library bf16 GEMM, the int8 GEMV and int4_linear (each with the config it measures for
    itself), then the default int4 list with every conversion; `broad`: the broad int4 space instead (PTX
    conversion), without the int8 GEMV and int4_linear."""
    from fxcc.codegen import quant
    from fxcc.codegen import triton_gemv as tg
    from fxcc.codegen import triton_int4 as t4
    from fxcc.codegen import triton_quant as tq

    torch.manual_seed(0)
    c16, c8, c4 = tg.stream_copies(n * k * 2), tg.stream_copies(n * k), tg.stream_copies(n * k // 2)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(max(c16, c4))]
    q4 = [quant.quantize_weight_int4(w, torch.bfloat16) for w in ws[:c4]]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    F = torch.nn.functional
    t16 = tg.time_candidates(["bf16"], lambda c, i: F.linear(x, ws[i]), c16)["bf16"]
    gb8, gb4 = n * k / 1e9, n * k / 2 / 1e9
    head = f"{name:<8} M={m:<2} N={n:<5} K={k:<5}"
    if not broad:
        q8 = [quant.quantize_weight(w, "int8") for w in ws[:c8]]
        tq.int8_weight_linear(x, *q8[0], None)  # each measures its own configs at this shape at the first call
        t4.int4_linear(x, *q4[0], None, 128)
        t8 = tg.time_candidates(["int8"], lambda c, i: tq.int8_weight_linear(x, *q8[i], None), c8)["int8"]
        tl4 = tg.time_candidates(["int4"], lambda c, i: t4.int4_linear(x, *q4[i], None, 128), c4)["int4"]
        pick = next((v for key, v in t4._BEST.items() if key[:3] == (m, n, k)), None)
        print(f"{head} bf16 {t16 * 1e3:6.1f} us | int8-weight {t8 * 1e3:6.1f} us {t16 / t8:4.2f}x "
              f"{gb8 / (t8 * 1e-3):5.0f} GB/s | int4 {tl4 * 1e3:6.1f} us {t16 / tl4:4.2f}x {gb4 / (tl4 * 1e-3):5.0f} "
              f"GB/s (int4_linear's choice {list(pick) if pick else '?'}) ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        cands = t4.configs(m, k, n, 128, cvts=(0, 1, 2))
    else:
        cands = [c for c in t4.configs(m, k, n, 128, cvts=(2,), broad=True)
                 if c not in t4.configs(m, k, n, 128, cvts=(2,))]
    want = t4._reference(x, *q4[0], None, 128, None, False, None, None)
    good, bad = [], []
    for c in cands:
        y.fill_(float("nan"))
        try:
            t4.w4_gemm(x, *q4[0], None, y, 128, c)
            e = ((y.float() - want).norm() / want.norm()).item()
        except Exception as ex:  # noqa: BLE001 - report and go on
            e = f"{type(ex).__name__}: {str(ex)[:200]}"
        if isinstance(e, float) and e < 1e-2:
            good.append(c)
        else:
            bad.append(c)
            print(f"{head} WRONG {list(c)}: {e}", flush=True)
    times = tg.time_candidates(good, lambda c, i: t4.w4_gemm(x, *q4[i], None, y, 128, c), c4)

    def row(c) -> str:
        t = times[c]
        return f"{list(c)} {t * 1e3:6.1f} us {t16 / t:4.2f}x {gb4 / (t * 1e-3):5.0f} GB/s"

    order = sorted(times, key=times.get)
    print(f"{head} int4 {'broad' if broad else 'default list, every conversion'}: {len(cands)} configs "
          f"[BLOCK_N, SPLIT, BLOCK_M, GPB, warps, stages, CVT], {len(bad)} wrong (bf16 {t16 * 1e3:.1f} us) "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for what, key in (("CVT", lambda c: c[6]), ("BLOCK_M", lambda c: c[2]), ("BLOCK_N, GPB", lambda c: (c[0], c[3])),
                      ("warps, stages", lambda c: (c[4], c[5]))):
        for v in sorted({key(c) for c in order}):
            print(f"{head}   best {what}={v}: {row(next(c for c in order if key(c) == v))}", flush=True)
    for c in order[:8]:
        print(f"{head}   top: {row(c)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sweep the default config list only (every conversion)")
    p.add_argument("--budget-s", type=float, default=360.0, help="start no broad sweep past this many seconds")
    p.add_argument("--no-check", action="store_true", help="skip the epilogue correctness check")
    args = p.parse_args()
    from fxcc.codegen import quant
    from fxcc.codegen import triton_int4 as t4

    t0 = time.perf_counter()
    if not args.no_check:
        _check(t4, quant, t0)
    for m, (name, n, k) in SHAPES:
        _shape(name, m, n, k, False, t0)
    for m, (name, n, k) in SHAPES if not args.quick else ():
        if time.perf_counter() - t0 > args.budget_s:
            print(f"broad sweep of {name} M={m} and after skipped: past the {args.budget_s:.0f} s budget")
            break
        _shape(name, m, n, k, True, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
