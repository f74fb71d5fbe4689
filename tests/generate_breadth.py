"""Generation on decoder families as a new user runs it: `fxcc.compile(model).generate` against eager's generate,
greedy, with transformers' default (growing) cache and with cache_implementation="static", each for a batch of one
(prompts of 7, then 5 tokens) and a batch of two left-padded prompts (6, then 9 tokens), then a batch of one again.

Per generate: tokens equal eager's, compiles it took (the model's and its decode steps'), the loop that ran
(`compiled.decode_loop.last`) and the eager calls and warnings fxcc gave. The budget (issue 19): at most 2
compiles in the first generate of a cache and batch class (a prefill and a decode step), at most 1 in its second
(the prefill recompiled with its length symbolic), none in a batch of one again.

    python tests/generate_breadth.py [--only gemma2,phi3] [--tokens 10] [--caches default,static]

The families and their shrunk configs are tests/generate_archs.py's ARCHS.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from generate_archs import ARCHS, EXTERN, VOCAB, build

CALLS = (("b1-7", 1, 7), ("b1-5", 1, 5), ("b2-6", 2, 6), ("b2-9", 2, 9), ("b1-8", 1, 8))
# most compiles a generate may take: the first of its cache and batch class, its second (a new prompt length)
BUDGET = {"b1-7": 2, "b1-5": 1, "b2-6": 2, "b2-9": 1, "b1-8": 0}


def prompt(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` prompts of `length` tokens; in a batch, row 0 left-padded by 2 (mask 0, the pad token 0)."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length * 10 + batch))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :2] = 0
        ids[mask == 0] = 0
    return ids, mask


def compiles(cm) -> int:
    return cm.stats.compiles + sum(s.stats.compiles for s in cm.decode_loop.steps.values())


def eager_calls(cm) -> int:
    return cm.stats.eager_calls + sum(s.stats.eager_calls for s in cm.decode_loop.steps.values())


def _generate(generate, ids: torch.Tensor, kw: dict) -> torch.Tensor | str:
    """The ids, or what generate raised (transformers raises for some families and caches: falcon's ALiBi with a
    static cache)."""
    try:
        return generate(ids, **kw)
    except Exception as e:  # noqa: BLE001 - a cell of the table
        return f"{type(e).__name__}: {str(e)[:300]}"


def check(name: str, cache: str | None, passes: str | None = EXTERN, tokens: int = 10) -> list[dict]:
    """One row per generate of CALLS, on one compiled model."""
    import fxcc

    model, other = build(name), build(name)
    for m in (model, other):
        m.generation_config.disable_compile = True  # eager is eager: no torch.compile of a static-cache forward
    cm = fxcc.compile(other, passes=passes)
    rows = []
    for call, batch, length in CALLS:
        ids, mask = prompt(batch, length)
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, attention_mask=mask)
        if cache:
            kw["cache_implementation"] = cache
        before, eager_before = compiles(cm), eager_calls(cm)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            want, got = (_generate(g, ids, kw) for g in (model.generate, cm.generate))
        if torch.is_tensor(got) and torch.is_tensor(want):
            same = got.shape == want.shape and torch.equal(got, want)
        else:  # raising is right where eager raises the same
            same = got == want
        n = compiles(cm) - before
        rows.append(dict(arch=name, cache=cache or "default", call=call, same=same, compiles=n,
                         over=n > BUDGET[call], eager=eager_calls(cm) - eager_before,
                         loop=cm.decode_loop.last, error=got if isinstance(got, str) else None,
                         seconds=time.perf_counter() - t0,
                         warnings=[str(w.message) for w in caught if "fxcc" in str(w.message)]))
        if isinstance(got, str):
            break
    return rows


def outcome(r: dict) -> str:
    if r["error"]:
        return "raised-as-eager" if r["same"] else "CRASH"
    if not r["same"]:
        return "MISMATCH"
    if r["eager"] and not r["warnings"]:
        return "SILENT-EAGER"
    if r["eager"]:
        return "eager-fallback"
    return "EXTRA-COMPILES" if r["over"] else "equal"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated, of " + ", ".join(ARCHS))
    ap.add_argument("--passes", default=EXTERN, help="pipeline ('default' for fxcc's own; default: extern kernels)")
    ap.add_argument("--tokens", type=int, default=10, help="new tokens per generate")
    ap.add_argument("--caches", default="default,static")
    ap.add_argument("--verbose", action="store_true", help="the loop's reason and fxcc's warnings in full")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(ARCHS)
    passes = None if args.passes == "default" else args.passes
    bad = 0
    print(f"{'arch':12s} {'cache':8s} {'call':5s} {'outcome':14s} {'compiles':>8s} {'eager':>5s} {'s':>5s}  loop / why")
    for name in names:
        for cache in args.caches.split(","):
            try:
                rows = check(name, None if cache == "default" else cache, passes, args.tokens)
            except Exception as e:  # noqa: BLE001 - a row of the table
                bad += 1
                print(f"{name:12s} {cache:8s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            for r in rows:
                what = outcome(r)
                bad += what not in ("equal", "eager-fallback", "raised-as-eager")
                path, why = r["loop"] or ("", "")
                loop = "fxcc" if path.startswith("fxcc") else "hf"
                width = None if args.verbose else 90
                note = r["error"] or f"{loop}: {why}"
                print(f"{name:12s} {r['cache']:8s} {r['call']:5s} {what:14s} {r['compiles']:8d} {r['eager']:5d} "
                      f"{r['seconds']:5.1f}  {note[:width]}", flush=True)
                for w in r["warnings"][: None if args.verbose else 1]:
                    print(f"{'':42s} warning: {w[:width]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
