"""Layout copies on the GPU (issue 20): torch's NCHW <-> NHWC copies against fxcc's generated kernels, the 1-D one
and the 2-D tiled one (`codegen/triton.py`, `tiled_plan`), and torch.compile; then a relu epilogue reading NHWC and
writing NCHW, and conv2d_bias_relu end to end with the layout pass's decision.

    python benchmarks/layout_copy.py [--shape 64,128,128,128] [--dtype bf16] [--sweep]

Each row: the median of triton.testing.do_bench (CUDA events) per engine, and the bandwidth it reaches (bytes read
and written / time), next to a same-layout clone (the copy's floor on this GPU). Every fxcc kernel is checked equal to
torch's result first. `--sweep`: the tiled kernel's BLOCK_A x BLOCK_B x warps grid too (its best point). Without a GPU
it runs a small shape in Triton's interpreter (a check that the script works; its times mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CL = torch.channels_last
EXTERN = "decompose,canonicalize,raise,fuse,codegen{backend=extern}"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="64,128,128,128", help="N,C,H,W")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sweep", action="store_true", help="also sweep the tiled kernel's parameters")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("FXCC_TRITON_INTERPRET", "1")
    import fxcc
    import triton.testing
    from fxcc.codegen import triton as backend
    from fxcc.dialects import KERNEL_OPS, kernel_body

    dev = "cuda" if gpu else "cpu"
    shape = tuple(int(s) for s in args.shape.split(",")) if gpu else (2, 5, 7, 9)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    def bench(fn) -> float:
        if not gpu:
            fn()
            return float("nan")
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def kernel(fn, x, kind: str = "pointwise"):
        cm = fxcc.compile(fn, passes=EXTERN, options=fxcc.CompileOptions(time_vs_eager=False))
        with torch.no_grad():
            cm(x)
        gm = (cm.fxcc if hasattr(cm, "fxcc") else cm).variants[-1].gm
        keys = dict.fromkeys(n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
        return next(kb for kb in map(kernel_body, keys) if kb.kind == kind)

    def built(kb, label: str, params: dict | None = None):
        c = next(c for c in backend.candidates(kb, dev) if c.backend == label)
        fn = c.build({**c.defaults, **(params or {})}).fn
        return fn, c.defaults

    def row(title: str, fn, x: torch.Tensor) -> None:
        nbytes = 2 * x.numel() * x.element_size()
        want = fn(x)
        kb = kernel(fn, x)
        inputs = [x]
        compiled = torch.compile(fn)
        engines = {"eager": lambda: fn(x), "torch.compile": lambda: compiled(x)}
        for label in ("triton", "triton-tiled"):
            k, defaults = built(kb, label)
            got = k(inputs)[0]
            assert got.stride() == want.stride() and torch.equal(got, want), f"{title}: {label} differs from torch"
            engines[f"fxcc {label}" + (f" {defaults}" if label == "triton-tiled" else "")] = lambda k=k: k(inputs)
        if args.sweep:
            best = None
            for a, b, w in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (2, 4, 8)):
                if a * b > 128 * 64:
                    continue
                params = {"BLOCK_A": a, "BLOCK_B": b, "num_warps": w}
                k, _ = built(kb, "triton-tiled", params)
                assert torch.equal(k(inputs)[0], want)
                t = bench(lambda k=k: k(inputs))
                best = min(best or (t, params), (t, params), key=lambda r: r[0])
            engines[f"fxcc triton-tiled best {best[1]}"] = None
        floor = bench(lambda: x.clone())
        print(f"\n{title}  ({tuple(x.shape)} {args.dtype}, {nbytes / 1e6:.0f} MB moved)")
        print(f"  {'same-layout clone (floor)':66s} {floor:8.4f} ms  {nbytes / floor / 1e9:6.2f} TB/s")
        for name, f in engines.items():
            t = best[0] if f is None else bench(f)
            print(f"  {name:66s} {t:8.4f} ms  {nbytes / t / 1e9:6.2f} TB/s  {t / floor:5.2f}x floor")

    x = torch.randn(shape, device=dev).to(dtype)
    with torch.no_grad():
        row("NCHW -> NHWC copy", lambda x: x.contiguous(memory_format=CL), x)
        row("NHWC -> NCHW copy", lambda x: x.contiguous(), x.contiguous(memory_format=CL))
        row("relu reading NHWC, writing NCHW", lambda x: torch.relu(x).contiguous(), x.contiguous(memory_format=CL))
        conv_chain(fxcc, bench, shape, dtype, dev)


class ConvBiasReLU(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def conv_chain(fxcc, bench, shape: tuple, dtype: torch.dtype, dev: str) -> None:
    """conv2d_bias_relu end to end: eager, torch.compile, fxcc (the default pipeline: the layout pass times its
    candidates with the copies as the compile runs them) and what the layout pass and the kernel choices decided."""
    model = ConvBiasReLU(shape[1]).eval().to(dev, dtype)
    x = torch.randn(shape, device=dev).to(dtype)
    from fxcc.pipeline import DEFAULT_PIPELINE

    engines = {"eager": model, "torch.compile": torch.compile(model)}
    print(f"\nconv2d_bias_relu ({shape}, {dtype})")
    for name, passes in (("fxcc", None), ("fxcc, channels-last untimed", DEFAULT_PIPELINE.replace(
            "layout", "layout{measure=false}"))):
        cm = fxcc.compile(model, passes=passes) if passes else fxcc.compile(model)
        torch.testing.assert_close(cm(x), model(x), atol=2e-2, rtol=2e-2)
        v = cm.variants[-1]
        layout = [r for r in v.records if r.spec.startswith("layout")]
        print(f"  {name}: layout changed the graph {[r.result.changed for r in layout]} "
              f"{[r.result.stats for r in layout]}; kernels "
              + ", ".join(f"{k.kind}:{k.backend}" for k in v.kernels.values())
              + f"; vs eager: {getattr(v, 'vs_eager', None)}")
        engines[name] = cm
    for name, f in engines.items():
        print(f"  {name:66s} {bench(lambda f=f: f(x)):8.4f} ms")


if __name__ == "__main__":
    main()
