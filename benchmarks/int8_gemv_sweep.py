"""GPU: decode-shaped int8 weight-only GEMV configs of `codegen/triton_gemv.py` against the bf16 library GEMM.

    python benchmarks/int8_gemv_sweep.py                 # Llama of BENCHMARKING.md, M=8, bf16
    python benchmarks/int8_gemv_sweep.py --broad --budget-s 240

Per linear shape of one decoder layer (merged q/k/v, o + residual, gate/up with the SwiGLU epilogue, down +
residual): correctness against the plain-torch reference (twice, poisoned output: split-K's workspace must
be left empty), then every config timed in CUDA graphs over weight copies larger than the L2 (as at decode,
where each weight is read once per step from memory), next to the library bf16 GEMM (and, for gate/up, the
library GEMM + silu * up) and the older split-K / tiled int8 kernels. Prints the best configs per shape with
the weight bandwidth they reach. Runs without installing fxcc (PYTHONPATH, as `make bench-mp-gpu` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _shape(name: str, n: int, k: int, rows: int, glu: bool, res: bool, norm: bool, args, t_start: float,
           summary: list, dump: dict) -> None:
    """Check and time one linear shape (see the module docstring); appends to `summary` and `dump`."""
    from fxcc.codegen import quant
    from fxcc.codegen import triton_gemv as tg
    from fxcc.codegen import triton_quant as tq
    from fxcc.dialects import int8_linear_reference

    dev, dt, m = "cuda", torch.bfloat16, args.m
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(rows, k, device=dev, dtype=dt) / k**0.5
    b = None
    r = torch.randn(m, n, device=dev, dtype=dt) if res else None
    qw, ws = quant.quantize_weight(w, "int8")
    # RMSNorm in the GEMV as the pass folds it: its weight in the int8 weight, 1 / rms in the kernel
    gam, rms = None, (1e-5 if norm else None)
    xin = torch.ops.fxcc_tx.rms_norm(x, None, 1e-5) if norm else x
    full = int8_linear_reference(xin.float(), qw, ws, None, "none")
    want = torch.nn.functional.silu(full[:, :n]) * full[:, n:] if glu else full
    if res:
        want = want + r.float()
    copies = tg.stream_copies(qw.numel())
    qws = [qw] + [qw.clone() for _ in range(copies - 1)]
    wbs = [w] + [w.clone() for _ in range(copies - 1)]
    y = torch.empty(m, n, device=dev, dtype=dt)
    cands = tg.configs(m, k, n, glu, (0, 2) if args.broad else (0,))
    # correctness of every config (twice: split-K must leave its workspace empty), poisoned output
    bad = []
    for c in cands:
        for _ in range(2):
            y.fill_(float("nan"))
            try:
                tg.gemv(x, qw, ws, b, y, c, r, glu, gam, rms)
                err = ((y.float() - want).norm() / want.norm()).item()
            except Exception as e:  # noqa: BLE001 - report and go on with the other configs
                err = f"{type(e).__name__}: {str(e)[:300]}"
            if not (isinstance(err, float) and err < 1e-2):
                bad.append((c, err))
                break
    if bad:
        print(f"{name}: WRONG configs {bad}", flush=True)
    cands = [c for c in cands if c not in {c for c, _ in bad}]

    def lib(i):
        out = torch.nn.functional.linear(torch.ops.fxcc_tx.rms_norm(x, gam, 1e-5) if norm else x, wbs[i])
        if glu:
            g_, u_ = out.split(n, dim=-1)
            return torch.nn.functional.silu(g_) * u_
        return out if r is None else out + r

    t_lib = tg.time_candidates(["lib"], lambda c, i: lib(i), copies)["lib"]
    lib_plain = tg.time_candidates(["gemm"], lambda c, i: torch.nn.functional.linear(x, wbs[i]), copies)["gemm"]
    times = {}
    if time.perf_counter() - t_start < args.budget_s:
        times = tg.time_candidates(cands, lambda c, i: tg.gemv(x, qws[i], ws, b, y, c, r, glu, gam, rms), copies)
    if args.broad and times and time.perf_counter() - t_start < args.budget_s:
        top = sorted(times, key=times.get)[:4]
        more = sorted({(c[0], c[1], c[2], wp, st, c[5]) for c in top for wp in (2, 4, 8) for st in (2, 3, 5)}
                      - set(times))
        times.update(tg.time_candidates(more, lambda c, i: tg.gemv(x, qws[i], ws, b, y, c, r, glu, gam, rms), copies))
    old = {}
    if not glu and not norm:
        olds = [("splitk", *c) for c in tq._splitk_configs(m, k, n)] + list(tq._configs(m, k, n))
        old = tg.time_candidates(olds, lambda c, i: tq._go(0, x, qws[i], ws, b, y, c, None, r), copies)
    wbytes = rows * k
    # the same kernel on bf16 weights (no conversion, twice the bytes): where the conversion costs
    ceil = {}
    if times:
        for c in sorted(times, key=times.get)[:2]:
            cb = (*c[:5], 1)
            ceil[cb] = tg.time_candidates([cb], lambda c_, i: tg.gemv(x, wbs[i], ws, b, y, c_, r, glu, gam, rms),
                                          copies).get(cb, float("nan"))
    best = sorted(times, key=times.get)[:5]
    line = (f"{name:<13} M={m} N={n} K={k}: bf16 lib {t_lib * 1e3:6.1f} us (GEMM alone {lib_plain * 1e3:6.1f},"
            f" {2 * wbytes / lib_plain / 1e6:5.0f} GB/s)")
    if old:
        ob = min(old, key=old.get)
        line += f" | old int8 best {old[ob] * 1e3:6.1f} us {ob}"
    print(line, flush=True)
    for c in best:
        print(f"    gemv {c}: {times[c] * 1e3:6.1f} us, {wbytes / times[c] / 1e6:5.0f} GB/s of int8 weight, "
              f"{t_lib / times[c]:4.2f}x of bf16", flush=True)
    best_cvt = {cv: min((t for c, t in times.items() if c[5] == cv), default=float("nan")) for cv in (0, 2)}
    print(f"    best by conversion: fp32 route {best_cvt[0] * 1e3:6.1f} us, bit trick {best_cvt[2] * 1e3:6.1f} us",
          flush=True)
    for c, t in ceil.items():
        print(f"    same kernel on bf16 weights {c}: {t * 1e3:6.1f} us, {2 * wbytes / t / 1e6:5.0f} GB/s", flush=True)
    if best:
        summary.append(f"{name:<13} bf16 {t_lib * 1e3:6.1f} us | gemv {times[best[0]] * 1e3:6.1f} us "
                       f"({wbytes / times[best[0]] / 1e6:4.0f} GB/s) {t_lib / times[best[0]]:4.2f}x {best[0]}"
                       + (f" | old {min(old.values()) * 1e3:6.1f} us" if old else ""))
    dump[name] = {"bf16_us": t_lib * 1e3, "gemm_us": lib_plain * 1e3,
                  "gemv_us": {str(c): t * 1e3 for c, t in sorted(times.items(), key=lambda kv: kv[1])},
                  "bf16_weight_same_kernel_us": {str(c): t * 1e3 for c, t in ceil.items()}, "old_us": {str(c): t * 1e3 for c, t in sorted(old.items(), key=lambda kv: kv[1])},
                  "wrong": [str(c) for c, _ in bad]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--kv", type=int, default=1024, help="k/v projection width (kv_heads * head_dim)")
    p.add_argument("--broad", action="store_true", help="also warps / stages / conversion variants of the best 4")
    p.add_argument("--budget-s", type=float, default=300, help="stop timing new configs after this long")
    p.add_argument("--json", help="write all timings here")
    args = p.parse_args(argv)
    h, f = args.hidden, args.intermediate
    # name: (N outputs, K, weight rows, glu, residual)
    shapes = {"norm+qkv": (h + 2 * args.kv, h, h + 2 * args.kv, False, False, True),
              "o+res": (h, h, h, False, True, False),
              "norm+gate/up+silu": (f, h, 2 * f, True, False, True), "down+res": (h, f, h, False, True, False)}
    t_start = time.perf_counter()
    summary, dump = [], {}
    print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, (n, k, rows, glu, res, norm) in shapes.items():
        _shape(name, n, k, rows, glu, res, norm, args, t_start, summary, dump)
        torch.cuda.empty_cache()
    print("\n== int8 GEMV sweep (CUDA graphs, weights streamed from memory)\n" + "\n".join(summary))
    print(f"sweep took {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dump, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
