"""Acceptance check of issue 21: is what `fxcc tune` and `fxcc search` keep ever slower than the defaults?

    python benchmarks/tune_regret.py [--models llama,minilm] [--budget 8] [--trials 6] [--timeout 150]
                                     [--threads 2] [--runs 3] [--json regret.json]

For each model file (examples/llama_tiny.py, examples/minilm.py) and run: `fxcc tune` and `fxcc search
--timeout` run as commands, on a fresh artifact cache; then a separate process (this script with --retime)
loads what they stored and times each stored choice against its default, interleaved (fxcc.measure.compare):
- every kernel: the stored point against the same backend's defaults, and a non-extern choice against
  extern (torch's kernels, the incumbent of the compile-time choice), on what the model feeds the kernel
  (its masks and indices, its parameters as parameters), as the compile-time choice timed it;
- the plan: the model compiled with it against the default pipeline.
A stored choice slower than its default beyond the noise is a regret. Also reported: whether `fxcc search`
ended within 10% of --timeout, and the noise of each comparison. Exit status 1 on any regret or overrun.
Timings depend on the machine's load: run it on a quiet machine and say under which load it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"llama": ROOT / "examples" / "llama_tiny.py", "minilm": ROOT / "examples" / "minilm.py"}


def fxcc_command(argv: list[str], env: dict) -> tuple[int, float, str]:
    """Run `fxcc ARGV` (this interpreter's fxcc.cli); exit status, wall seconds, the end of its stderr."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fxcc.cli", *argv], env=env, capture_output=True, text=True)
    return proc.returncode, time.monotonic() - t0, proc.stderr[-2000:]


def run_one(name: str, args: argparse.Namespace, run: int) -> dict:
    """tune, search, then the re-timing process, for one model on a fresh cache."""
    model = MODELS[name]
    work = Path(tempfile.mkdtemp(prefix=f"fxcc-regret-{name}-{run}-"))
    env = {**os.environ, "FXCC_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    row: dict = {"model": name, "run": run, "work": str(work)}
    code, secs, err = fxcc_command(["tune", f"{model}:model", "--budget", str(args.budget)], env)
    row["tune"] = {"exit": code, "seconds": round(secs, 1), **({"stderr": err} if code else {})}
    plan = work / "plan.json"
    code, secs, err = fxcc_command(["search", f"{model}:model", "--trials", str(args.trials), "--timeout",
                                    str(args.timeout), "--threads", str(args.threads), "--output", str(plan),
                                    "--plot", "", "--no-progress"], env)
    row["search"] = {"exit": code, "seconds": round(secs, 1), "timeout": args.timeout,
                     "held": secs <= 1.1 * args.timeout, **({"stderr": err} if code else {})}
    retime = [sys.executable, __file__, "--retime", name, "--plan", str(plan), "--threads", str(args.threads)]
    proc = subprocess.run(retime, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        row["retime"] = {"error": proc.stderr[-2000:]}
    else:
        row["retime"] = json.loads(proc.stdout)
    return row


# ------------------------------------------------------------------------------ the re-timing process


def retime(name: str, plan: str | None, threads: int) -> dict:
    """In a fresh process: each stored choice against its default, interleaved; what was kept vs the defaults."""
    import torch

    torch.set_num_threads(threads)
    import fxcc
    from fxcc.autotune.select import Probe, example_inputs
    from fxcc.cli import load_model_and_inputs
    from fxcc.codegen import backend as backend_module
    from fxcc.codegen import extern
    from fxcc.measure import compare

    model, a, kw = load_model_and_inputs(f"{MODELS[name]}:model", None)
    model.eval()
    cm = fxcc.compile(model, tune="cached")  # every kernel as stored by tune (loaded, not chosen again)
    with torch.no_grad():
        cm(*a, **kw)
    kernels = []
    probe = Probe(cm.variants[-1].gm, (a, kw))  # what the model feeds each kernel, as selection timed it
    for k in cm.variants[-1].kernels.values():
        if k.choice is None:
            continue
        inputs = example_inputs(k.body, "cpu", probe(k.body), probe.params(k.body))
        fns = {"stored": k.built.fn}
        if k.choice.backend != "extern":
            fns["extern"] = extern.Extern(k.body).build({}).fn
            cand = next((c for c in backend_module(k.choice.module).candidates(k.body, "cpu")
                         if c.backend == k.choice.backend), None)
            if cand is not None and dict(cand.defaults) != dict(k.choice.params):
                fns["defaults"] = cand.build(dict(cand.defaults)).fn
        if len(fns) == 1:
            continue
        with torch.no_grad():
            d = compare({n: (lambda f=f, x=inputs: f(x)) for n, f in fns.items()}, "stored", device="cpu", reps=30,
                        min_gain=0.0)
        kernels.append({"kernel": k.key, "kind": k.kind, "stored": f"{k.choice.backend} {k.choice.params}",
                        "timings": {n: str(t) for n, t in d.timings.items()},
                        "regret": d.winner != "stored", "summary": d.summary()})
    out: dict = {"kernels": kernels}
    if plan and os.path.isfile(plan):
        with_plan = fxcc.compile(model, plan=plan)
        default = fxcc.compile(model, tune="cached")
        with torch.no_grad():
            with_plan(*a, **kw)
            default(*a, **kw)
            d = compare({"plan": lambda: with_plan(*a, **kw), "default": lambda: default(*a, **kw)}, "plan",
                        device="cpu", reps=20, min_gain=0.0)
        out["plan"] = {"pipeline": json.loads(Path(plan).read_text()).get("pipeline"),
                       "timings": {n: str(t) for n, t in d.timings.items()}, "regret": d.winner != "plan",
                       "summary": d.summary()}
    return out


def report(rows: list[dict]) -> tuple[str, bool]:
    """A text report and whether everything held (no regret, --timeout within 10%, every command ran)."""
    lines, ok = [], True
    for r in rows:
        s, t = r["search"], r["tune"]
        lines.append(f"== {r['model']} run {r['run']}: tune {t['seconds']} s (exit {t['exit']}), search "
                     f"{s['seconds']} s of --timeout {s['timeout']} s (exit {s['exit']}): "
                     + ("timeout held" if s["held"] else "TIMEOUT OVERRUN"))
        ok &= s["held"] and s["exit"] == 0 and t["exit"] == 0
        rt = r["retime"]
        if "error" in rt:
            lines.append(f"  re-timing failed: {rt['error']}")
            ok = False
            continue
        regrets = [k for k in rt["kernels"] if k["regret"]]
        lines.append(f"  kernels re-timed: {len(rt['kernels'])}, slower than a default beyond the noise: {len(regrets)}")
        lines += [f"  REGRET {k['kernel']} ({k['kind']}, {k['stored']}): {k['summary']}" for k in regrets]
        if "plan" in rt:
            lines.append(f"  plan {rt['plan']['pipeline']}: {rt['plan']['summary']}"
                         + ("  REGRET" if rt["plan"]["regret"] else ""))
        ok &= not regrets and not rt.get("plan", {}).get("regret", False)
    return "\n".join(lines), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama,minilm", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--budget", type=int, default=8, help="fxcc tune --budget: trials per kernel candidate")
    ap.add_argument("--trials", type=int, default=6, help="fxcc search --trials")
    ap.add_argument("--timeout", type=float, default=150.0, help="fxcc search --timeout, seconds")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every process")
    ap.add_argument("--runs", type=int, default=1, help="repetitions, each on a fresh artifact cache")
    ap.add_argument("--json", help="also write every row to this file")
    ap.add_argument("--retime", choices=list(MODELS), help=argparse.SUPPRESS)  # the separate re-timing process
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.retime:
        print(json.dumps(retime(args.retime, args.plan, args.threads)))
        return 0
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; use {', '.join(MODELS)}")
    rows = []
    for run in range(args.runs):
        for name in names:
            rows.append(run_one(name, args, run))
            print(report(rows[-1:])[0], flush=True)
    text, ok = report(rows)
    print(f"\n{text}\n\n{'all held' if ok else 'NOT all held'} (load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs at the end)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
