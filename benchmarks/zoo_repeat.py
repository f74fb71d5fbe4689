"""One `fxcc zoo` row run again and again in one process, each time with a fresh artifact cache, for results
that differ between runs (a row equal in one sweep and a mismatch in the next).

    python benchmarks/zoo_repeat.py sam3 --runs 6                      # as the zoo runs it (2 threads)
    python benchmarks/zoo_repeat.py sam3 --runs 6 --choice random      # DyCL's compiled-or-plain choice drawn
    python benchmarks/zoo_repeat.py sam3 --runs 2 --choice compiled    # every DyCL segment compiled

Each run compiles the model as `fxcc zoo` does (fxcc.zoo_models: the shrunk model, its first input recipe; the
environment's FXCC_TIME_VS_EAGER=0), calls it twice on each input shape and compares every call with eager. DyCL
times each segment compiled against plain Python and keeps the faster, so which segments run compiled follows the
machine's load; `--choice random` draws that choice per segment signature instead (seeded by the run), to cover
more of the combinations a loaded machine can produce, and `--choice compiled` compiles every segment. A run whose
result differs is localized: the calls are made again with every compiled segment call compared with its plain
Python, and the segments that differ are printed (the same comparison `check_eager="always"` makes).

A trace, not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from typing import Any

import fxcc
import torch
from fxcc import dycl
from fxcc import zoo_models as zm
from fxcc.capture import register_model_pytrees
from fxcc.outputs import compare


def _eager(model: torch.nn.Module, kwargs: dict) -> Any:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**kwargs)


def _choose(how: str, draw: random.Random) -> None:
    """DyCL's choice between a compiled segment and its plain Python: measured (as it is), drawn, or compiled."""
    dycl.MEASURE_CHOICE = how != "compiled"  # compiled: no timing, every segment with tensors compiled
    if how == "random":
        dycl._median_us = lambda fn, args, reps=5: 1e3  # no segment counts as too small to compile
        dycl._compare = lambda compiled, plain, args, rounds=5: (1.0, 2.0) if draw.random() < 0.5 else (2.0, 1.0)


def _checked(found: list[str]) -> Any:
    """Segment.__call__ comparing each call of a compiled signature with the segment's plain Python."""
    call = dycl.Segment.__call__

    def checking(self: dycl.Segment, *args: Any) -> Any:
        try:
            key = dycl._key(args, exact=False)
        except dycl.Unguarded:
            return call(self, *args)
        run, fn = self.runs.get(key), self.by_key.get(key)
        if run is None or run.variant is None or fn is None or fn is self.eager_call:
            return call(self, *args)
        with torch.no_grad():
            want = self.eager_call(*dycl._clones(args))
        got = call(self, *args)
        c = compare(got, want)
        if not c.equal:
            found.append(f"{self.name} ({self.spec.where}) [{run.signature}]: {c.worst} off by {c.max_rel:.3g}")
        return got
    return checking


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model type of `fxcc zoo` (sam3)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fxcc zoo: CPU cores / jobs)")
    p.add_argument("--choice", choices=("measured", "random", "compiled"), default="measured")
    p.add_argument("--seed", type=int, default=0, help="first seed of --choice random (one per run)")
    a = p.parse_args()
    os.environ.setdefault("FXCC_TIME_VS_EAGER", "0")
    torch.set_num_threads(a.threads)
    model = zm.build(a.model, zm.Shrink(*zm.LEVELS[0]), max_params=None)
    recipe = zm.recipes(model)[0]
    refs = [_eager(model, recipe.make(model, s)) for s in range(len(zm.SHAPES))]
    register_model_pytrees(model)
    plain_call, differs = dycl.Segment.__call__, 0
    for run in range(a.runs):
        _choose(a.choice, random.Random(a.seed + run))
        os.environ["FXCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxcc-zoo-repeat-")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = fxcc.compile(model)
            calls = []
            for s in range(len(zm.SHAPES)):
                for k in range(2):
                    torch.manual_seed(0)
                    calls.append((s, k, compare(cm(**recipe.make(model, s)), refs[s])))
        bad = [f"shape {s + 1} call {k + 1}: {c.worst} off by {c.max_rel:.3g}" for s, k, c in calls if not c.equal]
        differs += bool(bad)
        print(f"run {run + 1}: {'; '.join(bad) or 'equal'} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if not bad:
            continue
        found: list[str] = []
        dycl.Segment.__call__ = _checked(found)
        try:
            for s in range(len(zm.SHAPES)):
                torch.manual_seed(0)
                c = compare(cm(**recipe.make(model, s)), refs[s])
                print(f"  again, shape {s + 1}: {'equal' if c.equal else f'{c.worst} off by {c.max_rel:.3g}'}")
        finally:
            dycl.Segment.__call__ = plain_call
        print("\n".join(f"  differs from plain Python: {f}" for f in dict.fromkeys(found)) or
              "  every compiled segment call agrees with its plain Python")
    print(f"{a.model}: {a.runs - differs} of {a.runs} runs equal ({a.choice} choice, {a.threads} threads)")


if __name__ == "__main__":
    main()
