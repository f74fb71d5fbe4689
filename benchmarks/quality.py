"""Speed vs quality of fxcc's approximate passes on MiniLM-L6 with its real trained weights.

For each setting of `layer-skip{skip=k}` (and `token-merge{r=...}` when that pass is registered), the
model is compiled by fxcc with the default pipeline plus that pass right after `canonicalize`, and
compared with fxcc's own exact build (the default pipeline):
  - speedup: median latency of the exact build / the approximate one (batch 8, seq 128, interleaved);
  - cosine of mean-pooled sentence embeddings vs the exact (eager) model, mean and min over 80 sentences;
  - ranking agreement: the 40 sentence pairs of benchmarks/sentence_pairs.py scored by cosine similarity,
    Spearman rho and Kendall tau of the scores vs the exact model's scores.
Then the acceptance check: `layer-skip{speedup=s}` for s = 1.25 and 1.5, requested vs achieved speedup
over the exact build, and whether it lands within +-10%.

Writes a markdown table and a PNG plot of the trade-off to --out (default benchmarks/results/).

    python benchmarks/quality.py [--threads 2] [--reps 40] [--skips 1,2,3,4] [--merge-r 8,16,32] [--speedups 1.25,1.5] [--budgets 0.02,0.2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sentence_pairs import PAIRS  # noqa: E402


@dataclass
class Row:
    label: str
    spec: str | None  # the approximate pass, None for the exact build
    compile_s: float = 0.0
    median_ms: float = 0.0
    speedup: float = 1.0
    cos_mean: float = 1.0
    cos_min: float = 1.0
    spearman: float = 1.0
    kendall: float = 1.0
    note: str = ""
    stats: dict = field(default_factory=dict)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (scores are continuous: no ties)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall tau: (concordant - discordant) / pairs."""
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    n = a.numel()
    return float((da * db).sum() / (n * (n - 1)))


def pipeline(spec: str | None) -> str:
    from fxcc.pipeline import DEFAULT_PIPELINE
    return DEFAULT_PIPELINE if spec is None else DEFAULT_PIPELINE.replace("canonicalize,", f"canonicalize,{spec},", 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=40, help="timed calls per build (interleaved in 5 rounds)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skips", default="1,2,3,4", help="layer-skip{skip=k} settings")
    ap.add_argument("--merge-r", default="8,16,32", help="token-merge{r=...} settings (if token-merge is registered)")
    ap.add_argument("--speedups", default="1.25,1.5", help="layer-skip{speedup=s} acceptance targets")
    ap.add_argument("--budgets", default="0.02,0.2",
                    help="also compile layer-skip{skip=4} with each quality_budget and report what it backs off to")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import fxcc
    from fxcc.bench import machine, minilm_dir
    from fxcc.measure import interleaved
    from fxcc.pipeline import PASSES, all_passes
    from transformers import AutoModel, AutoTokenizer

    def log(msg: str) -> None:
        print(f"[quality] {msg}", file=sys.stderr, flush=True)

    all_passes()
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = [a for a, _, _ in PAIRS] + [b for _, b, _ in PAIRS]
    if len(sentences) % args.batch:
        raise SystemExit(f"{len(sentences)} sentences do not split into batches of {args.batch}")
    batches = [tok(sentences[i:i + args.batch], padding="max_length", truncation=True, max_length=args.seq,
                   return_tensors="pt") for i in range(0, len(sentences), args.batch)]
    batches = [dict(b) for b in batches]

    def embed(fn) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for kw in batches:
                h = fn(**kw).last_hidden_state
                mask = kw["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(outs).double()

    def pair_scores(e: torch.Tensor) -> torch.Tensor:
        n = len(PAIRS)
        return torch.nn.functional.cosine_similarity(e[:n], e[n:], dim=-1)

    ref = embed(model)
    ref_scores = pair_scores(ref)

    rows = [Row("fxcc exact", None)]
    rows += [Row(f"layer-skip{{skip={k}}}", f"layer-skip{{skip={k}}}") for k in args.skips.split(",") if k]
    if "token-merge" in PASSES:
        rows += [Row(f"token-merge{{r={r}}}", f"token-merge{{r={r}}}") for r in args.merge_r.split(",") if r]
    else:
        log("token-merge is not registered: sweeping layer-skip only")
    targets = [float(s) for s in args.speedups.split(",") if s]
    rows += [Row(f"layer-skip{{speedup={s}}}", f"layer-skip{{speedup={s}}}") for s in targets]

    calls = {}
    for row in rows:
        log(f"compiling {pipeline(row.spec)} ...")
        try:
            t0 = time.perf_counter()
            cm = fxcc.compile(model, passes=pipeline(row.spec))
            with torch.inference_mode():
                cm(**batches[0])
            row.compile_s = time.perf_counter() - t0
            emb = embed(cm)
        except Exception as e:  # noqa: BLE001 - a failing setting is reported in the table, the sweep goes on
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(row.note)
            continue
        rec = next((r for r in cm.variants[-1].records if row.spec and r.spec == row.spec), None)
        row.stats = dict(rec.result.stats) if rec else {}
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
        row.cos_mean, row.cos_min = float(cos.mean()), float(cos.min())
        scores = pair_scores(emb)
        row.spearman, row.kendall = spearman(scores, ref_scores), kendall(scores, ref_scores)

        def call(cm=cm):
            with torch.inference_mode():
                return cm(**batches[0])

        calls[row.label] = call
    timings = interleaved(calls, device="cpu", warmup=args.warmup, reps=args.reps, progress=log)
    base = timings["fxcc exact"].median
    for row in rows:
        if row.label in timings:
            row.median_ms = timings[row.label].median
            row.speedup = base / row.median_ms

    header = (f"MiniLM-L6 (real weights), batch {args.batch}, seq {args.seq}, {machine('cpu')}; "
              f"median of {args.reps} interleaved calls; quality over {len(sentences)} sentences / {len(PAIRS)} pairs")
    md = [header, "",
          "| build | blocks removed | median ms | speedup vs fxcc exact | cos mean | cos min | Spearman | Kendall |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row.note:
            md.append(f"| `{row.label}` | {row.note} | | | | | | |")
            continue
        removed = ", ".join(k.rsplit(".", 1)[-1] for k in row.stats if k.startswith("skipped.")) or "-"
        md.append(f"| `{row.label}` | {removed} | {row.median_ms:.1f} | {row.speedup:.2f}x | {row.cos_mean:.4f} | "
                  f"{row.cos_min:.4f} | {row.spearman:.3f} | {row.kendall:.3f} |")
    md += ["", "Acceptance: `layer-skip{speedup=s}` vs fxcc's exact build (within +-10% of the request)", "",
           "| requested | blocks skipped | achieved | within +-10% |", "| ---: | ---: | ---: | --- |"]
    ok_all = True
    for s, row in zip(targets, rows[-len(targets):]):
        if row.note:
            md.append(f"| {s:.2f}x | {row.note} | | no |")
            ok_all = False
            continue
        ok = abs(row.speedup - s) <= 0.10 * s
        ok_all &= ok
        md.append(f"| {s:.2f}x | {row.stats.get('skipped', 0)} | {row.speedup:.2f}x | {'yes' if ok else 'NO'} |")
    md += ["", block_share_line(model, batches[0], rows)]
    for budget in (float(b) for b in args.budgets.split(",") if b):
        md += ["", budget_line(model, batches[0], budget)]
    text = "\n".join(md)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality_minilm.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "quality_minilm.png"), header)
    log(f"wrote {args.out}/quality_minilm.md and quality_minilm.png; acceptance "
        f"{'not run (no --speedups)' if not targets else 'passed' if ok_all else 'FAILED'}")


def block_share_line(model, batch: dict, rows: list[Row]) -> str:
    """The blocks' share of the work as layer-skip{speedup=...} estimates it (FLOPs) and as timed here."""
    from fxcc.capture import capture
    from fxcc.passes.layer_skip import block_share, find_blocks

    gm = capture(model, (), batch).gm
    blocks = find_blocks(gm)
    flops = block_share(gm, blocks)
    # time(k) = time(0) * (1 - k * share / n): least squares through the layer-skip{skip=k} rows
    pts = [(r.stats.get("skipped", 0), 1.0 / r.speedup) for r in rows
           if r.label.startswith("layer-skip{skip") and not r.note]
    num = sum(k * (1.0 - t) for k, t in pts)
    den = sum(k * k for k, _ in pts)
    timed = f"{len(blocks) * num / den:.1%}" if den else "n/a"
    return (f"Block share of the work: {flops:.1%} estimated from FLOPs (what layer-skip{{speedup=...}} uses), "
            f"{timed} from the measured layer-skip{{skip=k}} times ({len(blocks)} blocks `{blocks.prefix}.N`).")


def budget_line(model, batch: dict, budget: float) -> str:
    """compile(quality_budget=...) on MiniLM: what layer-skip{skip=4} backs off to on one calibration batch."""
    import fxcc
    from fxcc.quality import QualityBudgetError

    cm = fxcc.compile(model, passes=pipeline("layer-skip{skip=4}"), quality_budget=budget)
    try:
        with torch.inference_mode():
            cm(**batch)
    except QualityBudgetError as e:
        return f"quality_budget={budget:g} with `layer-skip{{skip=4}}`: refused: {e}"
    v = cm.variants[-1]
    chosen = next(r.spec for r in v.records if r.spec.startswith("layer-skip"))
    return (f"quality_budget={budget:g} with `layer-skip{{skip=4}}` (calibration: the first batch of 8 sentences): "
            f"backed off to `{chosen}`, measured loss {v.quality_loss:.4f} (1 - min cosine of the outputs).")


def plot(rows: list[Row], path: str, title: str) -> None:
    """Speedup (x) against min pooled cosine and Spearman rho (y), one marker per build."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "cos_min", "min cosine of pooled embeddings vs exact"),
                             (axes[1], "spearman", "Spearman rho of pair scores vs exact")):
        for family, marker in (("layer-skip{skip", "o"), ("token-merge", "s"), ("layer-skip{speedup", "^"),
                               ("fxcc exact", "*")):
            pts = [r for r in rows if r.label.startswith(family) and not r.note]
            if pts:
                ax.plot([r.speedup for r in pts], [getattr(r, metric) for r in pts], marker, ms=8,
                        ls="-" if family in ("layer-skip{skip", "token-merge") else "", label=family.rstrip("{"))
                for r in pts if family in ("layer-skip{skip", "token-merge") else []:
                    ax.annotate(r.label.replace("layer-skip", "ls").replace("token-merge", "tm"),
                                (r.speedup, getattr(r, metric)), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("speedup vs fxcc exact build")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
