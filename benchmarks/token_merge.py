"""token-merge on MiniLM with its real weights: speedup over fxcc's exact build against embedding quality.

    python benchmarks/token_merge.py --r 4 8 16 32 [--batch 8 --seq 128 --threads 2 --reps 60]

Every build is fxcc (`canonicalize,raise,fuse,codegen`, with `token-merge{r=R}` inserted after
canonicalize); all builds are timed interleaved in one process (fxcc.measure.interleaved). Quality is
the cosine similarity of the mean-pooled (attention-masked) sentence embeddings to eager's exact ones:
the minimum and the mean over the batch, on two inputs of the same shape: "padded" is fxcc.bench.SENTENCES
padded to --seq tokens (short sentences: merging removes padding first, nearly free), "full" is the same
sentences run together so every row holds --seq real tokens (merging must combine real tokens). Timing does
not depend on the values, so it is taken once, on the padded batch.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, nargs="+", default=[4, 8, 16, 32], help="tokens merged per block")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    import fxcc
    from fxcc.bench import minilm
    from fxcc.measure import interleaved

    w = minilm(args.batch, args.seq)
    full = _full_rows(args.batch, args.seq)
    with torch.inference_mode():
        ref = w.pooled(w.model(**w.kwargs), w.kwargs).float()
        ref_full = w.pooled(w.model(**full), full).float()
    real = int(w.kwargs["attention_mask"].sum(1).max())
    print(f"MiniLM-L6 real weights, batch {args.batch}, seq {args.seq} (longest sentence {real} tokens), "
          f"{args.threads} threads, torch {torch.__version__}")

    calls, quality = {}, {}
    for r in [0, *args.r]:
        passes = "canonicalize,raise,fuse,codegen" if r == 0 else f"canonicalize,token-merge{{r={r}}},raise,fuse,codegen"
        print(f"compiling {passes} ...", file=sys.stderr, flush=True)
        cm = fxcc.compile(w.model, passes=passes)

        def call(cm=cm):
            with torch.inference_mode():
                return cm(**w.kwargs)

        cos = F.cosine_similarity(ref, w.pooled(call(), w.kwargs).float(), dim=-1)
        with torch.inference_mode():
            cos_full = F.cosine_similarity(ref_full, w.pooled(cm(**full), full).float(), dim=-1)
        quality[r] = (cos.min().item(), cos.mean().item(), cos_full.min().item(), cos_full.mean().item())
        calls[r] = call
    timings = interleaved(calls, device="cpu", warmup=args.warmup, reps=args.reps)
    base = timings[0].median
    print("| r per block | tokens after 6 blocks | median ms | speedup vs fxcc exact | cosine min / mean (padded) "
          "| cosine min / mean (full rows) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r, t in timings.items():
        tokens = args.seq
        for _ in range(6):
            tokens -= max(0, min(r, (tokens + 1) // 2 - 1))
        q = quality[r]
        print(f"| {r} | {tokens} | {t.median:.1f} | {base / t.median:.2f}x | {q[0]:.4f} / {q[1]:.4f} | "
              f"{q[2]:.4f} / {q[3]:.4f} |")


def _full_rows(batch: int, seq: int) -> dict:
    """Rows of `seq` real tokens: the benchmark sentences run together, each row starting at another one."""
    from fxcc.bench import SENTENCES, minilm_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    text = [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(4 * len(SENTENCES))) for i in range(batch)]
    return dict(tok(text, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


if __name__ == "__main__":
    main()
