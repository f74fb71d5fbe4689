"""One engine alone in its own process on MiniLM (batch 8, seq 128, 2 threads): 3 x 30 timed calls.

`fxcc bench` interleaves engines in one process, which is fair to drift but lets one engine's threads and
heap state affect the next. Running each engine alone is the other view:

    for e in eager torch.compile fxcc; do python benchmarks/minilm_solo.py $e; done
"""

import sys
import time

import torch


def main() -> None:
    engine = sys.argv[1] if len(sys.argv) > 1 else "fxcc"
    torch.set_num_threads(2)
    from fxcc.bench import minilm
    w = minilm(8, 128)
    if engine == "fxcc":
        import fxcc
        fn = fxcc.compile(w.model)
    elif engine == "torch.compile":
        fn = torch.compile(w.model)
    elif engine == "eager":
        fn = w.model
    else:
        raise SystemExit(f"unknown engine {engine!r}: eager, torch.compile or fxcc")

    def median_ms(n: int = 30) -> float:
        for _ in range(5):
            fn(**w.kwargs)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn(**w.kwargs)
            ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2] * 1e3

    with torch.inference_mode():
        print(engine, " ".join(f"{median_ms():.1f}" for _ in range(3)), "ms (median of 30 calls, 3 times)")


if __name__ == "__main__":
    main()
