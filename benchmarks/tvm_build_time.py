"""TVM build time with and without the stored lets (fxcc.codegen.tvm_lets), and the built kernel's run time.

    python benchmarks/tvm_build_time.py                  # exp nested 1..7 deep, 1024 elements, vectorized by 8
    python benchmarks/tvm_build_time.py --net gru_cells  # also a breadth-suite module's compile, both ways

Per depth: `tvm.compile` (lets bound in expressions; skipped beyond --plain-max, where it takes minutes) against
`tvm_lets.build`, each built once after a warm-up build of depth 1, and the median of 2000 calls of each built
kernel, with whether their outputs are bit-identical. With --net: the seconds of each TVM build (`_build`) during
a cold `fxcc.compile` of that module (fresh artifact cache), 1 thread, with the lets stored and with TVM's own
`tvm.compile` for every build.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def nested_exp(tvm, depth: int):
    from fxcc.codegen import tvm_lower as tl
    from tvm import te, tirx
    a = te.placeholder((1024,), "float32", name="A")

    def f(i):
        x = a[i] + tirx.const(0.0, "float32")
        for _ in range(depth):
            x = tl.fast_exp(x) * tirx.const(0.3, "float32")
        return x
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([a, te.compute((1024,), f, name="B")])}))
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(loop, [None, 8])[1])
    return sch.mod


def run_us(tvm, lib) -> tuple[float, np.ndarray]:
    x = tvm.runtime.tensor(np.random.RandomState(0).randn(1024).astype("float32") * 0.1, tvm.cpu())
    out = tvm.runtime.tensor(np.zeros(1024, "float32"), tvm.cpu())
    fn = lib["main"]
    fn(x, out)
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        fn(x, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, out.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--plain-max", type=int, default=4)
    p.add_argument("--net", default=None)
    args = p.parse_args()
    import tvm
    from fxcc.codegen import tvm_lets
    from fxcc.codegen.tvm import host_target
    target = tvm.target.Target(host_target())
    tvm_lets.build(tvm, nested_exp(tvm, 1), host_target())  # warm-up: LLVM's first use
    print(f"{'depth':>5} {'tvm.compile s':>14} {'stored lets s':>14} {'run us (plain / stored)':>24} {'same bits':>10}")
    for depth in range(1, args.depth + 1):
        mod = nested_exp(tvm, depth)
        t0 = time.perf_counter()
        stored = tvm_lets.build(tvm, mod, host_target())
        stored_s = time.perf_counter() - t0
        stored_us, stored_out = run_us(tvm, stored)
        plain_s = plain_us = same = None
        if depth <= args.plain_max:
            t0 = time.perf_counter()
            plain = tvm.compile(mod, target=target)
            plain_s = time.perf_counter() - t0
            plain_us, plain_out = run_us(tvm, plain)
            same = bool(np.array_equal(plain_out, stored_out))
        print(f"{depth:>5} {'-' if plain_s is None else f'{plain_s:.3f}':>14} {stored_s:>14.3f} "
              f"{'-' if plain_us is None else f'{plain_us:.2f}':>11} / {stored_us:<10.2f} "
              f"{'-' if same is None else same!s:>10}")
    if args.net:
        for stored in (True, False):
            net_builds(args.net, stored)


def net_builds(name: str, stored: bool) -> None:
    """One cold compile of breadth module `name`, its TVM builds timed; `stored`: with the lets stored (else
    each build is TVM's own `tvm.compile`)."""
    import fxcc
    from fxcc.codegen import tvm as ft
    from fxcc.codegen import tvm_lets

    from benchmarks.breadth import CASES
    torch.set_num_threads(1)
    times, lets_build = [], tvm_lets.build

    def timed(tvm, mod):
        t0 = time.perf_counter()
        out = lets_build(tvm, mod, ft.host_target()) if stored else tvm.compile(mod, target=ft.host_target())
        times.append(time.perf_counter() - t0)
        return out
    build, ft._build = ft._build, timed
    os.environ["FXCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxcc-build-time-")
    model, inputs = CASES[name].make("small", "cpu", torch.float32)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fxcc.compile(model)(*inputs)
    ft._build = build
    print(f"\n{name}, {'stored lets' if stored else 'tvm.compile'}: cold compile and first call "
          f"{time.perf_counter() - t0:.2f} s; {len(times)} TVM builds, {sum(times):.2f} s in all, the longest "
          f"{max(times):.3f} s")


if __name__ == "__main__":
    main()
