"""CPU only: the decode GEMVs' main loops as ptxas compiles them for an H100/H200 (sm_90), counted in SASS
instructions per weight, with no GPU (Triton's bundled ptxas and nvdisasm).

    python benchmarks/gemv_sass.py                                   # int4 defaults at M=1 and 8, the new loops
                                                                     #   (LOOP 1, 2), the int8 GEMV
    python benchmarks/gemv_sass.py --int4 32,2,1,2,2,3,2 --glu --m 8 # one int4 config (BLOCK_N,SPLIT,BLOCK_M,GPB,
                                                                     #   warps,stages,CVT[,LOOP])
A proxy, not a timing: where a GEMV is bound by issuing instructions rather than by memory, fewer per byte of
weight is faster; it shows what a change to a kernel did to its loop (vectorized loads, conversions, smem
round trips, register spills) before a GPU run. Shapes are given as Triton specializes them at run time
(pointers and sizes divisible by 16, unit strides and M=1 as constants).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def _compile(fn, ptrs: dict[str, str], const: dict, m1: bool, warps: int, stages: int):
    """fn for sm_90, its int arguments divisible by 16 where Llama's decode sizes are, unit strides constant."""
    names = fn.arg_names
    const = dict(const, **{n: 1 for n in ("sxk", "swk", "srn", "syn") if n in names}, **({"M": 1} if m1 else {}))
    sixteen = {"N", "NT", "K", "K_PER", "swn", "sxm", "srm", "sym"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (sig[n].startswith("*") or n in sixteen)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _sass(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


def _loop(sass: str) -> collections.Counter:
    """Opcodes of the longest loop (a label and the furthest backward branch to it)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", ln))}
    span = (0, -1)
    for i, ln in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > span[1] - span[0]:
            span = (labels[m.group(1)], i)
    return collections.Counter(m.group(1) for ln in lines[span[0]:span[1] + 1] if (m := _OP.match(ln)))


def _line(what: str, kernel, weights_per_thread: float) -> str:
    sass = _sass(kernel)
    ops = _loop(sass)
    n = sum(v for op, v in ops.items() if op != "NOP")
    spills = len(re.findall(r"\b(STL|LDL)\b", sass))
    top = ", ".join(f"{op} {v}" for op, v in ops.most_common(8))
    # LDG: global loads the loop issues and waits for itself (the pipeliner's prefetches are LDGSTS); BAR: barriers
    return (f"{what}: {n / weights_per_thread:5.2f} instructions a weight ({n} a step for {weights_per_thread:.0f} "
            f"weights a thread), spills {spills}, smem {kernel.metadata.shared} B, LDG {ops['LDG']} BAR {ops['BAR']}; "
            f"{top}")


def int4(cfg, glu: bool, m1: bool, dtype: str = "bf16") -> str:
    from fxcc.codegen import triton_int4 as t4

    bn, split, bm, gpb, warps, stages, cvt = cfg[:7]
    loop = cfg[7] if len(cfg) > 7 else 0
    ptrs = {n: f"*{dtype}" for n in ("x_ptr", "sz_ptr", "b_ptr", "r_ptr", "y_ptr", "g_ptr")}
    ptrs |= {"w_ptr": "*u8", "acc_ptr": "*fp32", "cnt_ptr": "*i32", "ss_ptr": "*fp32", "eps": "fp32"}
    off = {"bf16": 136.0, "fp16": 1032.0}.get(dtype, 0.0) if cvt else 0.0
    const = dict(HAS_BIAS=False, HAS_RES=False, GLU=glu, NORM=False, GAMMA=False, EVEN_N=True, CVT=cvt, SPLIT=split,
                 GROUP=128, GPB=gpb, BLOCK_M=bm, BLOCK_N=bn)
    if loop == 2:  # the CUDA-core loop: its stages are tl.range's
        k = _compile(t4._w4_fma, ptrs, dict(const, STAGES=stages, EVEN_M=m1 or bm == 1), m1, warps, 1)
    else:
        k = _compile(t4._w4, ptrs, dict(const, IEEE=dtype == "fp32", OFF=off, DEQUANT=loop == 1), m1, warps, stages)
    return _line(f"int4 {list(cfg)}{' glu' if glu else ''} M={'1' if m1 else 'n'}", k,
                 bn * gpb * 128 * (2 if glu else 1) / (32 * warps))


def int8(cfg, m1: bool, bm: int = 16) -> str:
    from fxcc.codegen import triton_gemv as tg

    bn, split, bk, warps, stages, cvt = cfg
    ptrs = {n: "*bf16" for n in ("x_ptr", "b_ptr", "r_ptr", "y_ptr", "g_ptr")}
    ptrs |= {"w_ptr": "*i8", "ws_ptr": "*fp32", "acc_ptr": "*fp32", "cnt_ptr": "*i32", "ss_ptr": "*fp32", "eps": "fp32"}
    const = dict(HAS_BIAS=False, HAS_RES=False, GLU=False, NORM=False, GAMMA=False, EVEN=True, IEEE=False, CVT=cvt,
                 SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    k = _compile(tg._gemv, ptrs, const, m1, warps, stages)
    return _line(f"int8 {list(cfg)} BLOCK_M={bm} M={'1' if m1 else 'n'}", k, bn * bk / (32 * warps))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--int4", help="one int4 config: BLOCK_N,SPLIT,BLOCK_M,GPB,warps,stages,CVT[,LOOP]")
    p.add_argument("--glu", action="store_true")
    p.add_argument("--m", type=int, default=1, help="rows of x (1: specialized to the constant, as at run time)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = p.parse_args()
    if args.int4:
        print(int4(tuple(int(v) for v in args.int4.split(",")), args.glu, args.m == 1, args.dtype))
        return 0
    from fxcc.codegen import triton_int4 as t4

    for m in (1, 8):
        bm = min(16, triton.next_power_of_2(m))
        for cfg in dict.fromkeys(c[:1] + (1,) + c[2:] for c in t4.configs(m, 2048, 8192, 128, cvts=(2,))):
            print(int4(cfg, False, m == 1), flush=True)
        for cvt in (0, 1):  # the other conversions, and 16-row blocks, at the first default block shape
            print(int4((32, 1, bm, 2, 2, 3, cvt), False, m == 1), flush=True)
        print(int4((32, 1, 16, 2, 2, 3, 2), False, m == 1), flush=True)
        print(int4((32, 1, 8, 2, 2, 3, 2, 1), False, m == 1), flush=True)  # loop 1: the MMA on dequantized weights
    for cfg in ((32, 1, 1, 2, 2, 1, 1, 2), (64, 1, 1, 2, 2, 1, 1, 2)):  # loop 2, the CUDA cores, at M=1
        print(int4(cfg, False, True), flush=True)
    print(int8((32, 4, 256, 2, 3, 0), True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
