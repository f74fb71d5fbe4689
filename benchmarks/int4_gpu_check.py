"""Quick H200 check of the int4 Triton kernel: every decode config against the dequantized reference (three times,
poisoned output), then the config the kernel measures for Llama-2048 decode shapes against the bf16 library GEMM,
both timed in CUDA graphs over weight copies larger than the L2.

    python benchmarks/int4_gpu_check.py [--quick]
"""

from __future__ import annotations

import sys
import time

import torch


def _rotate(bench, call, copies: int) -> float:
    """ms per call of call(i), i cycling over the weight copies, `copies` calls in one CUDA graph."""
    it = iter(range(10**9))
    return bench(lambda: call(next(it) % copies), copies)


def main() -> int:
    from fxcc.autotune.mixed_precision import _bench_graph
    from fxcc.codegen import quant
    from fxcc.codegen import triton_int4 as t4
    from fxcc.codegen.triton_gemv import stream_copies

    torch.manual_seed(0)
    t0 = time.perf_counter()
    for m, glu, norm in ((8, False, False), (8, True, True), (1, False, True)):
        w = torch.randn((2 if glu else 1) * 512, 2048, device="cuda")
        qw, sz = quant.quantize_weight_int4(w, torch.bfloat16)
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        b, r = torch.randn(w.shape[0], device="cuda"), torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        eps = 1e-5 if norm else None
        want = t4._reference(x, qw, sz, b, 128, r, glu, None, eps)
        bad = []
        cfgs = t4.configs(m, 2048, 512, 128, glu)
        for cfg in cfgs:
            for _ in range(3):
                y = torch.full((m, 512), float("nan"), device="cuda", dtype=torch.bfloat16)
                t4.w4_gemm(x, qw, sz, b, y, 128, cfg, r, glu, None, eps)
                e = ((y.float() - want).norm() / want.norm()).item()
                if not e < 1e-2:
                    bad.append((cfg, e))
        print(f"M={m} glu={glu} norm={norm}: {len(cfgs)} configs, wrong: {bad} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    for m in (1, 8):
        for n, k in ((2048, 2048), (2048, 8192), (8192, 2048)):
            copies = stream_copies(n * k * 2)
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            q4 = [quant.quantize_weight_int4(w, torch.bfloat16) for w in ws]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0])
            got = t4.int4_linear(x, *q4[0], None, 128)  # measures its configs at this shape
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            t_lib = _rotate(_bench_graph, lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i]), copies)
            t_4 = _rotate(_bench_graph, lambda i, x=x, q4=q4: t4.int4_linear(x, *q4[i], None, 128), copies)
            gbs = n * k / 2 / (t_4 * 1e-3) / 1e9
            print(f"M={m} N={n} K={k}: bf16 {t_lib * 1e3:6.1f} us, int4 {t_4 * 1e3:6.1f} us ({t_lib / t_4:4.2f}x, "
                  f"{gbs:5.0f} GB/s of int4 weight), rel err vs bf16 {err:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            del ws, q4
    print("configs:", t4.chosen_configs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
