"""GPU sweep of the int4 (W4A16) GEMV's inner loops (issue 22) on Llama-1B decode shapes, next to int4_linear's
current choice, the int8 GEMV and bf16.

    python benchmarks/int4_sweep.py                        # o, qkv, gate/up, down at M = 1 and 8 (aimed at < 4 min)
    python benchmarks/int4_sweep.py --shapes qkv2560 --m 1 --jobs 4 --json build/int4-sweep.json
    TRITON_INTERPRET=1 python benchmarks/int4_sweep.py --smoke   # CPU: every engine once on a tiny shape, untimed

Per shape and M, the engines: bf16 (torch's F.linear; for gate/up the GEMM alone, no SwiGLU), int8 (the int8 GEMV
of codegen/triton_gemv.py through int8_weight_linear / int8_gated_linear: the config its first call measures fastest
from its list), int4 default (int4_linear: likewise, its list as it is today) and every candidate of the new inner
loops, `triton_int4.configs(..., loops=(1, 2))`: 1 the MMA on weights dequantized in registers, 2 the CUDA cores.
Each output is checked against that engine's own fp32 reference (int4: int4_dequantize then a matmul) twice over a
poisoned output (split-K leaves its workspace empty), then timed as the repository's checks do: each engine's calls
over weight copies larger than the L2 captured in one CUDA graph, median of interleaved rounds. Triton kernels are
compiled first by --jobs processes into Triton's disk cache, so the timed process only loads them. Prints a row per
engine and config (us, GB/s of that engine's weight bytes, max |error| / max |reference|), then per M the best of
each engine per shape and per layer (o + qkv + gate/up + down): the goal is int4 at 1.4x the int8 GEMV's speed.
Runs without installing fxcc (PYTHONPATH, as the Makefile's bench targets do).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

# name -> (N outputs, K, GLU: a merged gate/up weight of 2N rows with the SwiGLU epilogue)
SHAPES = {"o": (2048, 2048, False), "qkv": (3072, 2048, False), "qkv2560": (2560, 2048, False),
          "gate/up": (8192, 2048, True), "down": (2048, 8192, False)}
LAYER = ("o", "qkv", "gate/up", "down")
GROUP = 128


def _case(name: str, m: int, device: str, copies: int = 1, seed: int = 0):
    """x, the bf16 weight, its int8 (qw, ws) and int4 (qw, sz) forms, `copies` of each weight form."""
    import torch
    from fxcc.codegen import quant

    n, k, glu = SHAPES[name]
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=dt)
    ws = [torch.randn((2 if glu else 1) * n, k, device=device, dtype=dt) / k**0.5 for _ in range(copies)]
    q8 = [quant.quantize_weight(w, "int8") for w in ws]
    q4 = [quant.quantize_weight_int4(w, dt, GROUP) for w in ws]
    return x, ws, q8, q4


def _engines(name: str, m: int, x) -> list[tuple[str, tuple | None]]:
    """(engine, config) pairs of one shape: bf16, the int8 GEMV and int4_linear as they choose (config None), and
    every candidate of the new int4 loops."""
    from fxcc.codegen import triton_int4 as t4

    n, k, glu = SHAPES[name]
    loops = t4.configs(m, k, n, GROUP, glu, t4.default_cvts(x), loops=(1, 2))
    return [("bf16", ()), ("int8", None), ("int4-default", None)] + [(f"int4-{t4.LOOPS[c[7]]}", c) for c in loops]


def _run(engine: str, cfg: tuple | None, name: str, x, w, q8, q4, y):
    """One call of an engine; its output (y, where the engine writes into it)."""
    import torch
    from fxcc.codegen import triton_int4 as t4
    from fxcc.codegen import triton_quant as tq

    glu = SHAPES[name][2]
    if engine == "bf16":
        return torch.nn.functional.linear(x, w)
    if engine == "int8":
        return tq.int8_gated_linear(x, *q8) if glu else tq.int8_weight_linear(x, *q8)
    if engine == "int4-default":
        return t4.int4_linear(x, *q4, None, GROUP, glu=glu)
    t4.w4_gemm(x, *q4, None, y, GROUP, cfg, None, glu)
    return y


def _chosen(engine: str, name: str, m: int) -> tuple | None:
    """The config the int8 GEMV's or int4_linear's first call measured fastest at this shape."""
    from fxcc.codegen import triton_int4 as t4
    from fxcc.codegen import triton_quant as tq

    n, k, glu = SHAPES[name]
    if engine == "int8":
        return next((v for key, v in tq._BEST.items() if key[:4] == (0, m, n, k) and key[8] == glu), None)
    return next((v for key, v in t4._BEST.items() if key[:3] == (m, n, k) and key[8] == glu), None)


def _reference(engine: str, name: str, x, w, q8, q4):
    """The engine's own exact output in fp32: bf16, x @ w^T (the GEMM alone, for gate/up too); int8 and int4, x times
    their dequantized weights, then the SwiGLU of gate/up."""
    import torch
    from fxcc.dialects import int4_dequantize

    n, _, glu = SHAPES[name]
    if engine == "bf16":
        return x.float() @ w.float().t()
    if engine == "int8":
        full = x.float() @ (q8[0].float() * q8[1].float()[:, None]).t()
    else:
        full = x.float() @ int4_dequantize(*q4, GROUP).t()
    return torch.nn.functional.silu(full[:, :n]) * full[:, n:] if glu else full


_CASES: dict = {}  # a compile worker's operands, by (shape, M)


def _compile_task(task: tuple[str, int, str, tuple | None]) -> str:
    """Runs one (shape, M, engine, config) on the GPU, so that Triton compiles it into its disk cache (the int8
    GEMV and int4_linear: every config of their lists, which their first call measures); an error, or ''."""
    import torch

    name, m, engine, cfg = task
    if (name, m) not in _CASES:
        x, ws, q8, q4 = _case(name, m, "cuda")
        _CASES[name, m] = (x, ws[0], q8[0], q4[0], torch.empty(m, SHAPES[name][0], device="cuda", dtype=x.dtype))
    try:
        _run(engine, cfg, name, *_CASES[name, m])
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported; the timed process drops the config
        return f"{name} M={m} {engine} {cfg}: {type(e).__name__}: {str(e)[:200]}"
    return ""


def _precompile(todo: list[tuple[str, int]], jobs: int, t0: float) -> None:
    """Every Triton kernel of the sweep compiled by `jobs` processes: the lists the int8 GEMV and int4_linear
    measure (one task a shape, the longest, first), then each new config."""
    import torch

    lists, configs = [], []
    for name, m in todo:
        x = torch.empty(m, SHAPES[name][1], device="cuda", dtype=torch.bfloat16)
        lists += [(name, m, e, c) for e, c in _engines(name, m, x) if c is None]
        configs += [(name, m, e, c) for e, c in _engines(name, m, x) if c and e != "bf16"]
    tasks = lists + configs
    print(f"compiling: {len(lists)} lists the int8 GEMV and int4_linear measure, {len(configs)} new int4 configs, "
          f"on {jobs} processes ({time.perf_counter() - t0:.0f} s)", flush=True)
    with mp.get_context("spawn").Pool(jobs) as pool:
        for i, err in enumerate(pool.imap_unordered(_compile_task, tasks)):
            if err:
                print(f"  failed: {err}", flush=True)
            if (i + 1) % 25 == 0 or i + 1 == len(tasks):
                print(f"  {i + 1}/{len(tasks)} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _sweep(name: str, m: int, rounds: int, t0: float, rows: list[dict]) -> None:
    """Check and time every engine at one shape and M; appends a dict a row to `rows` and prints it."""
    import torch
    from fxcc.codegen import triton_gemv as tg

    n, k, glu = SHAPES[name]
    nt = (2 if glu else 1) * n
    nbytes = {"bf16": 2 * nt * k, "int8": nt * k, "int4": nt * k // 2}
    copies = {f: tg.stream_copies(b) for f, b in nbytes.items()}
    x, ws, q8, q4 = _case(name, m, "cuda", max(copies.values()))
    y = torch.empty(m, n, device="cuda", dtype=x.dtype)
    engines = _engines(name, m, x)
    errs = {}
    for e, c in engines:  # int8's and int4-default's first call measures their lists
        ref = _reference(e, name, x, ws[0], q8[0], q4[0])
        try:  # twice over a poisoned output: split-K leaves its workspace empty
            errs[e, c] = max(_max_err(_run(e, c, name, x, ws[0], q8[0], q4[0], y.fill_(float("nan"))), ref)
                             for _ in range(2))
        except Exception as ex:  # noqa: BLE001 - reported, not timed
            errs[e, c] = f"{type(ex).__name__}: {str(ex)[:150]}"
    for fam in ("bf16", "int8", "int4"):
        mine = [(e, c) for e, c in engines if e.startswith(fam)]
        ok = [ec for ec in mine if isinstance(errs[ec], float) and errs[ec] < 2e-2]
        times = tg.time_candidates(ok, lambda ec, i: _run(*ec, name, x, ws[i], q8[i], q4[i], y), copies[fam],
                                   rounds)
        for e, c in mine:
            t = times.get((e, c))
            row = dict(shape=name, m=m, n=n, k=k, glu=glu, engine=e, err=errs[e, c],
                       config=list(c if c is not None else _chosen(e, name, m) or ()),
                       us=None if t is None else round(t * 1e3, 2),
                       gbs=None if t is None else round(nbytes[fam] / (t * 1e-3) / 1e9))
            rows.append(row)
            print(_line(row), flush=True)
    print(f"{name} M={m} done ({time.perf_counter() - t0:.0f} s)", flush=True)


def _max_err(y, ref) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _line(r: dict) -> str:
    err = f"{r['err']:.1e}" if isinstance(r["err"], float) else f"FAILED {r['err']}"
    us = "-" if r["us"] is None else f"{r['us']:7.1f}"
    gbs = "-" if r["gbs"] is None else f"{r['gbs']:5d}"
    return f"{r['shape']:<8} M={r['m']:<2} {r['engine']:<17} {str(r['config']):<34} {us:>7} us {gbs:>5} GB/s err {err}"


def _summary(rows: list[dict], ms: tuple[int, ...], shapes: list[str]) -> None:
    """Per M: the best time of each engine family per shape and per layer, and int8 / int4 ratios."""
    fams = ("bf16", "int8", "int4-default", "int4-mma-dequant", "int4-fma", "int4-new")
    new = ("int4-mma-dequant", "int4-fma")  # int4-new: the faster of the two at each shape
    print("\nbest per shape (us (GB/s of that engine's weight bytes, x: int8 time / that time))")
    for m in ms:
        layer = dict.fromkeys(fams, 0.0)
        for name in shapes:
            best = {}
            for f in fams:
                ts = [r for r in rows if r["shape"] == name and r["m"] == m and r["us"]
                      and (r["engine"] == f or f == "int4-new" and r["engine"] in new)]
                best[f] = min(ts, key=lambda r: r["us"]) if ts else None
            if best["int8"] is None:
                continue
            parts = []
            for f in fams:
                b = best[f]
                if b is None:
                    parts.append(f"{f} -")
                    continue
                parts.append(f"{f} {b['us']:.1f} ({b['gbs']} GB/s, {best['int8']['us'] / b['us']:.2f}x)")
                if name in LAYER:
                    layer[f] += b["us"]
            print(f"M={m:<2} {name:<8} " + " | ".join(parts), flush=True)
            for f in new:
                if best[f]:
                    print(f"         {f} best: {best[f]['config']}", flush=True)
        if all(s in shapes for s in LAYER) and layer["int8"]:
            print(f"M={m:<2} layer    " + " | ".join(f"{f} {t:.1f} us ({layer['int8'] / t:.2f}x int8)"
                                                  for f, t in layer.items() if t), flush=True)


def _smoke() -> int:
    """CPU under TRITON_INTERPRET=1: every engine once on a tiny shape (N=48, K=256, M 1 and 3, plain and
    SwiGLU), checked against its reference; no timing."""
    import torch

    SHAPES.update({"tiny": (48, 256, False), "tiny-glu": (48, 256, True)})
    bad = 0
    for name in ("tiny", "tiny-glu"):
        for m in (1, 3):
            x, ws, q8, q4 = _case(name, m, "cpu")
            y = torch.empty(m, SHAPES[name][0])
            for e, c in _engines(name, m, x):
                err = _max_err(_run(e, c, name, x, ws[0], q8[0], q4[0], y.fill_(float("nan"))),
                               _reference(e, name, x, ws[0], q8[0], q4[0]))
                bad += not err < 1e-4
                cfg = list(c if c is not None else _chosen(e, name, m) or ())
                print(_line(dict(shape=name, m=m, engine=e, config=cfg, err=err, us=None, gbs=None)), flush=True)
    print(f"smoke: {bad} wrong")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(LAYER), choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=[1, 8])
    p.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                   help="processes compiling the kernels first (0: compile while timing, one at a time)")
    p.add_argument("--rounds", type=int, default=5, help="timed replays of each graph, interleaved (median)")
    p.add_argument("--json", help="write every row here")
    p.add_argument("--smoke", action="store_true", help="CPU: run every engine once under the Triton interpreter")
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
        return _smoke()
    import torch

    if not torch.cuda.is_available():
        print("int4_sweep: no CUDA GPU; on a CPU run it with --smoke (Triton's interpreter, no timing)")
        return 2
    t0 = time.perf_counter()
    todo = [(s, m) for m in args.m for s in args.shapes]
    if args.jobs > 0:
        _precompile(todo, args.jobs, t0)
    rows: list[dict] = []
    for name, m in todo:
        _sweep(name, m, args.rounds, t0, rows)
    _summary(rows, tuple(args.m), args.shapes)
    print(f"total {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
