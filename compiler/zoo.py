"""`fxcc zoo`: every architecture of transformers' AutoModel mapping, shrunk, eager vs fxcc on two shapes.

Each model runs in a worker process (several models per worker, a fresh worker after a crash or a
timeout), so one hang or crash costs that model only. The result is a table, markdown and JSON, with one
status per model: equal, mismatch (worst error relative to the output's scale), fxcc error (its
message), eager fails, or cannot build.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import math
import os
import selectors
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EQUAL, MISMATCH, FXCC_ERROR, FALLBACK = "equal", "mismatch", "fxcc error", "runs eagerly"
EAGER_FAILS, CANNOT_BUILD = "eager fails", "cannot build"
STATUSES = (EQUAL, MISMATCH, FXCC_ERROR, FALLBACK, EAGER_FAILS, CANNOT_BUILD)
RUNNABLE = (EQUAL, MISMATCH, FXCC_ERROR, FALLBACK)  # eager runs: the architectures the share counts
RECYCLE = 20  # models per worker process
MAX_PARAMS = 30_000_000  # a shrunk model larger than this was not shrunk by the rules: reported, not run
# how the model reaches fxcc: fxcc.compile(model), or torch.compile(model, backend="fxcc"[, dynamic=True]), where a
# graph break is fine (dynamo runs the code between graphs) but fxcc failing on one of its graphs is an fxcc error
ENTRIES = ("fxcc", "torch", "torch-dynamic")
BACKEND_FAILED = "fxcc: torch.compile's graph runs eagerly"  # torch_compile_backend's warning when fxcc failed
MEMORY_GB = 4.0  # a worker's heap: a model whose build asks for more fails with a row, not the machine's OOM killer


@dataclass
class Result:
    """One model's row of the table."""

    model: str
    status: str = CANNOT_BUILD
    message: str = ""
    max_rel: float | None = None  # worst leaf error relative to its scale, over both shapes
    worst: str = ""  # the leaf it was found in
    leaves: int = 0
    params: int = 0
    level: int = -1  # index into zoo_models.LEVELS of the shrink that built and ran
    recipe: str = ""
    eager_ops: int = 0  # ops the compiled variants left to eager (fxcc explain names them)
    notes: list[str] = field(default_factory=list)  # fxcc's warnings, how it compiled
    seconds: float = 0.0


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def _message(e: BaseException) -> str:
    """`Type: first lines of the message`, and where in fxcc or the model it was raised."""
    text = " ".join(str(e).strip().splitlines()[:3])[:400]
    frames = traceback.extract_tb(e.__traceback__)
    where = next((f for f in reversed(frames) if "/fxcc/" in f.filename or "/compiler/" in f.filename
                  or "/passes/" in f.filename or "/codegen/" in f.filename), frames[-1] if frames else None)
    at = f" [{Path(where.filename).name}:{where.lineno}]" if where is not None else ""
    return f"{type(e).__name__}: {text}{at}"


def _eager(model: Any, kwargs: dict) -> Any:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        return model(**kwargs)


def run_one(model_type: str, passes: str | None = None, phase: Any = lambda p: None, entry: str = "fxcc") -> Result:
    """Build `model_type` shrunk, run eager and fxcc (compiled through `entry`, one of ENTRIES) on both input shapes,
    and compare every output leaf."""
    from fxcc import zoo_models as zm
    from fxcc.capture import register_model_pytrees
    from fxcc.outputs import compare

    t0 = time.perf_counter()
    res = Result(model_type)
    build_errors, eager_errors = [], []
    model = recipe = None
    refs: list[Any] = []
    for level, shrink in enumerate(zm.LEVELS):
        phase("build")
        try:
            candidate = zm.build(model_type, zm.Shrink(*shrink), max_params=MAX_PARAMS)
        except ImportError as e:  # a library the model needs is not installed: no level helps
            build_errors.append(_message(e))
            break
        except Exception as e:  # noqa: BLE001 - any failure is a row of the table
            build_errors.append(_message(e))
            continue
        n = sum(p.numel() for p in candidate.parameters())
        options = zm.recipes(candidate)
        if isinstance(options, str):
            build_errors.append(f"no input recipe for the required forward argument {options!r}")
            break
        phase("eager")
        for r in options:
            try:
                refs = [_eager(candidate, r.make(candidate, s)) for s in range(len(zm.SHAPES))]
            except Exception as e:  # noqa: BLE001
                eager_errors.append(f"{r}: {_message(e)}")
                continue
            model, recipe = candidate, r
            res.level, res.recipe, res.params = level, str(r), n
            break
        if model is not None:
            break
    if model is None:
        res.status = EAGER_FAILS if eager_errors else CANNOT_BUILD
        errors = eager_errors or build_errors or ["no model"]
        res.message, res.notes = errors[0], list(dict.fromkeys(errors[1:]))[:4]
        res.seconds = time.perf_counter() - t0
        return res
    register_model_pytrees(model)
    again = _eager(model, recipe.make(model, 0))
    if not compare(again, refs[0], tol=0.0).equal:
        res.status, res.message = EAGER_FAILS, "eager gives different outputs for two identical calls"
        res.seconds = time.perf_counter() - t0
        return res
    phase("fxcc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cms, outs = _compiled_calls(model, recipe, passes, entry)
        except Exception as e:  # noqa: BLE001
            res.status, res.message = FXCC_ERROR, _message(e)
            res.notes = _fxcc_notes(caught)
            res.seconds = time.perf_counter() - t0
            return res
    notes = _fxcc_notes(caught)
    res.notes = notes + [n for cm in cms for n in _how_compiled(cm)]
    if entry != "fxcc":  # more than one: dynamo broke the model's graph, or compiled it again for the second shape
        res.notes.append(f"{len(cms)} dynamo graphs (breaks, recompiles) compiled by fxcc")
    res.eager_ops = max((_eager_ops(cm) for cm in cms), default=0)
    worst = None
    for s, out in outs:
        c = compare(out, refs[s])
        if worst is None or c.max_rel > worst[0].max_rel or not c.equal:
            worst = (c, s)
        if not c.equal:
            break
    c, s = worst
    res.max_rel, res.worst, res.leaves = c.max_rel, c.worst, c.leaves
    failed = [n for n in notes if n.startswith(BACKEND_FAILED)]
    if c.equal and failed:  # fxcc failed on a graph dynamo gave it, which then ran as dynamo traced it
        res.status, res.message = FXCC_ERROR, failed[0]
    elif c.equal and (signatures := [sig for cm in cms for sig in cm.eager_signatures]):
        res.status, res.message = FALLBACK, signatures[0]  # fxcc saw its result differ from eager's, ran eagerly
    elif c.equal and not cms:
        res.status, res.message = FALLBACK, "torch.compile gave fxcc no graph: dynamo ran the whole model eagerly"
    elif c.equal and all(why := [_nothing_compiled(cm) for cm in cms]):  # equal, because it all ran eagerly
        res.status, res.message = FALLBACK, why[0]
    elif c.equal:
        res.status = EQUAL
    else:
        res.status = MISMATCH
        res.message = c.detail or f"shape {s + 1}: {c.worst} differs by {c.max_rel:.3g} of its scale"
        if entry != "fxcc" and _dynamo_alone_differs(model, recipe, refs):
            res.message = ('torch.compile differs without fxcc too (backend="eager", dynamo\'s graphs as traced): '
                           + res.message)
    res.seconds = time.perf_counter() - t0
    return res


def _compiled_calls(model: Any, recipe: Any, passes: str | None, entry: str) -> tuple[list[Any], list[Any]]:
    """`model` compiled through `entry` and called twice on each shape (the first call checked against eager, the
    second the compiled variant): the compiled modules fxcc built, and (shape, output) per call."""
    import torch
    from fxcc import zoo_models as zm

    if entry == "fxcc":
        import fxcc

        cm = fxcc.compile(model, passes=passes)
        fn, cms = cm, [cm]
    else:  # torch.compile(model, backend="fxcc"): one fxcc build per graph dynamo hands over
        import torch._dynamo
        from fxcc.api import torch_compile_backend

        cms = []

        def backend(gm: Any, example_inputs: list, **kwargs: Any) -> Any:
            run = torch_compile_backend(gm, example_inputs, **kwargs)
            if hasattr(run, "fxcc"):
                cms.append(run.fxcc)
            return run

        torch._dynamo.reset()  # a fresh dynamo per model: no guards or cache entries of the model before
        fn = torch.compile(model, backend=backend, dynamic=entry == "torch-dynamic" or None,
                           options={"passes": passes} if passes else None)
    outs = []
    # eager ran without gradients; fxcc.compile's module compiles for inference whatever the grad mode
    with torch.no_grad() if entry != "fxcc" else contextlib.nullcontext():
        for s in range(len(zm.SHAPES)):
            for _ in range(2):
                torch.manual_seed(0)
                outs.append((s, fn(**recipe.make(model, s))))
    return cms, outs


def _dynamo_alone_differs(model: Any, recipe: Any, refs: list[Any]) -> bool:
    """Whether torch.compile with no compiler (backend="eager") differs from eager on some shape as well: the
    model's code traced by dynamo takes another path (transformers builds masks it skips in eager, say), which
    no backend's graph can undo."""
    import torch
    import torch._dynamo
    from fxcc import zoo_models as zm
    from fxcc.outputs import compare

    torch._dynamo.reset()
    fn = torch.compile(model, backend="eager")
    with torch.no_grad():
        for s in range(len(zm.SHAPES)):
            torch.manual_seed(0)
            if not compare(fn(**recipe.make(model, s)), refs[s]).equal:
                return True
    return False


def _fxcc_notes(caught: list) -> list[str]:
    notes = [str(w.message).splitlines()[0][:300] for w in caught if str(w.message).startswith("fxcc")]
    return list(dict.fromkeys(notes))[:4]


def _how_compiled(cm: Any) -> list[str]:
    notes = []
    if cm.stats.eager_calls:
        notes.append(f"{cm.stats.eager_calls} calls ran eagerly")
    for v in cm.variants:
        if v.gm is None:
            notes.append("DyCL host program")
        elif v.captured.method != "export":
            notes.append(f"captured with {v.captured.method}")
    return list(dict.fromkeys(notes))


def _nothing_compiled(cm: Any) -> str:
    """Why fxcc compiled nothing of `cm`'s calls ("" when it did): every variant is a DyCL host program whose
    functions ran as written, or whose segments all failed to compile (a segment fxcc chose to run as plain
    Python, being faster so, counts as compiled: that was a decision, not a failure)."""
    variants = cm.variants
    if not variants or any(v.gm is not None for v in variants):
        return ""
    reasons = []
    for v in variants:
        for prog in v.program.all_programs():
            if prog.rw is None:
                reasons.append(f"DyCL: {prog.name} runs eagerly, as written: {prog.eager_reason}")
                continue
            runs = [run for seg in prog.segments for run in seg.runs.values()]
            failed = [run.eager for run in runs if run.variant is None and run.eager.startswith("capture/compile")]
            if len(failed) < len(runs):
                return ""
            reasons += [f"DyCL: segment of {prog.name}: {why}" for why in failed]
    return reasons[0] if reasons else ""


def _eager_ops(cm: Any) -> int:
    from fxcc.runtime import placement

    return max((sum(1 for r in placement(v.gm, v.kernels) if r[2].startswith("eager")) for v in cm.variants
                if v.gm is not None), default=0)


# ------------------------------------------------------------------------------------------ the workers


def limit_memory(gb: float) -> None:
    """Cap this process's heap (RLIMIT_DATA: private writable memory) at `gb`: a build that asks for more
    (a config the meta-device measure could not check) raises an allocation error in this process."""
    import resource

    limit = int(gb * 2**30)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def worker(passes: str | None, threads: int, memory_gb: float = MEMORY_GB, entry: str = "fxcc") -> None:
    """Read model types from stdin, one per line; write JSON lines: phases, then each model's result."""
    import torch
    import transformers

    limit_memory(memory_gb)
    # the sweep compares compiled outputs with eager: a variant kept eager for measuring slower would compare
    # eager with eager (FXCC_TIME_VS_EAGER=1 in the environment times them all the same)
    os.environ.setdefault("FXCC_TIME_VS_EAGER", "0")
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.ERROR)
    out = sys.stdout
    sys.stdout = sys.stderr  # models and libraries that print must not break the protocol

    def say(**msg: Any) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    for line in sys.stdin:
        mt = line.strip()
        if not mt:
            continue
        try:
            res = run_one(mt, passes, lambda p, mt=mt: say(model=mt, phase=p), entry)
        except BaseException as e:  # noqa: BLE001 - a row, whatever happened
            res = Result(mt, FXCC_ERROR, f"sweep error: {_message(e)}")
        say(model=mt, result=asdict(res))


@dataclass
class _Worker:
    proc: subprocess.Popen
    log: Path
    model: str | None = None
    phase: str = ""
    started: float = 0.0
    buf: str = ""
    count: int = 0


def _spawn(passes: str | None, threads: int, logdir: Path, i: int, memory_gb: float, entry: str) -> _Worker:
    cmd = [sys.executable, "-m", "fxcc.zoo", "--worker", "--threads", str(threads), "--memory-gb", str(memory_gb),
           "--entry", entry]
    if passes:
        cmd += ["--passes", passes]
    path = logdir / f"worker{i}.log"
    with open(path, "ab") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                bufsize=1, start_new_session=True)
    return _Worker(proc, path)


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def sweep(types: list[str], jobs: int, timeout: float, passes: str | None, threads: int, logdir: Path,
          done: Any = lambda r, i, n: None, memory_gb: float = MEMORY_GB, entry: str = "fxcc") -> list[Result]:
    """Run every model type in worker processes, compiled through `entry`; `done(result, index, total)` after
    each."""
    logdir.mkdir(parents=True, exist_ok=True)
    todo, results = list(types), []
    workers: list[_Worker] = []
    sel = selectors.DefaultSelector()
    spawned = 0

    def start(w: _Worker) -> None:
        w.model, w.phase, w.started = todo.pop(0), "start", time.monotonic()
        w.proc.stdin.write(w.model + "\n")
        w.proc.stdin.flush()

    def finish(w: _Worker, res: Result) -> None:
        results.append(res)
        done(res, len(results), len(types))
        w.model = None

    def replace(w: _Worker) -> None:
        nonlocal spawned
        sel.unregister(w.proc.stdout)
        _kill(w.proc)
        workers.remove(w)
        if todo or any(x.model for x in workers):
            spawned += 1
            add(_spawn(passes, threads, logdir, spawned, memory_gb, entry))

    def add(w: _Worker) -> None:
        workers.append(w)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        if todo:
            start(w)

    for _ in range(min(jobs, len(todo))):
        spawned += 1
        add(_spawn(passes, threads, logdir, spawned, memory_gb, entry))
    while any(w.model for w in workers):
        for key, _ in sel.select(timeout=1.0):
            w = key.data
            chunk = os.read(w.proc.stdout.fileno(), 1 << 16).decode(errors="replace")
            if not chunk:  # the worker died
                if w.model:
                    code = w.proc.wait()
                    finish(w, Result(w.model, FXCC_ERROR if w.phase == "fxcc" else CANNOT_BUILD if w.phase in (
                        "build", "start") else EAGER_FAILS,
                        f"process died in {w.phase} (exit {code}): {_tail(w.log)}"))
                replace(w)
                break
            w.buf += chunk
            while "\n" in w.buf:
                line, w.buf = w.buf.split("\n", 1)
                msg = json.loads(line)
                if "phase" in msg:
                    w.phase = msg["phase"]
                elif "result" in msg:
                    finish(w, Result(**msg["result"]))
                    w.count += 1
                    if w.count >= RECYCLE:  # a fresh process: bounded memory, and the current fxcc code
                        replace(w)
                        break
                    if todo:
                        start(w)
        now = time.monotonic()
        for w in list(workers):
            if w.model and now - w.started > timeout:
                status = {"fxcc": FXCC_ERROR, "eager": EAGER_FAILS}.get(w.phase, CANNOT_BUILD)
                finish(w, Result(w.model, status, f"timed out after {timeout:.0f} s in {w.phase}"))
                replace(w)
        for w in list(workers):
            if w.model is None and not todo:
                sel.unregister(w.proc.stdout)
                _kill(w.proc)
                workers.remove(w)
    return results


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()


# ------------------------------------------------------------------------------------------------ table


def counts(results: list[Result]) -> dict[str, int]:
    c = Counter(r.status for r in results)
    return {s: c.get(s, 0) for s in STATUSES}


def summary(results: list[Result]) -> str:
    c = counts(results)
    runnable = sum(c[s] for s in RUNNABLE)
    share = f"{100 * c[EQUAL] / runnable:.1f}%" if runnable else "-"
    return (f"{len(results)} model types: " + ", ".join(f"{c[s]} {s}" for s in STATUSES)
            + f"; compiled and equal to eager: {c[EQUAL]}/{runnable} ({share}) of those eager runs")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def markdown(results: list[Result], command: str) -> str:
    lines = [f"# fxcc zoo\n\n`{command}`\n\n{summary(results)}\n",
             "| model type | status | max err / scale | params | recipe | eager ops | message / notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    order = {s: i for i, s in enumerate(STATUSES)}
    for r in sorted(results, key=lambda r: (order.get(r.status, 9), r.model)):
        err = "" if r.max_rel is None else ("inf" if math.isinf(r.max_rel) else f"{r.max_rel:.2g}")
        text = r.message or "; ".join(r.notes)
        lines.append(f"| {r.model} | {r.status} | {err} | {r.params or ''} | {_cell(r.recipe)} | "
                     f"{r.eager_ops or ''} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def write(results: list[Result], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(results, key=lambda r: r.model)
    data = {"command": command, "counts": counts(rows), "results": [asdict(r) for r in rows]}
    (out / "zoo.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "zoo.md").write_text(markdown(rows, command))


def load(out: Path) -> list[Result]:
    path = out / "zoo.json"
    if not path.exists():
        return []
    return [Result(**r) for r in json.loads(path.read_text())["results"]]


def select(types: list[str], only: str | None) -> list[str]:
    """`--only bert,gpt*,@file`: model types by name or glob; @file reads one per line."""
    if not only:
        return types
    wanted: list[str] = []
    for item in only.split(","):
        item = item.strip()
        if item.startswith("@"):
            wanted += [x.strip() for x in Path(item[1:]).read_text().splitlines() if x.strip()]
        elif item:
            wanted.append(item)
    picked = [t for t in types if any(fnmatch.fnmatchcase(t, w) for w in wanted)]
    unknown = [w for w in wanted if not any(fnmatch.fnmatchcase(t, w) for t in types)]
    if unknown:
        raise ValueError(f"--only: no model type in transformers' AutoModel mapping matches {', '.join(unknown)} "
                         "(the names are MODEL_MAPPING_NAMES keys, e.g. bert, gpt2, deberta-v2)")
    return picked


def main(args: argparse.Namespace) -> int:
    """`fxcc zoo`: run the sweep, print progress and the counts, write zoo.md and zoo.json."""
    out = Path(args.output)
    try:
        types = select(model_types(), args.only)
    except ValueError as e:
        print(f"fxcc zoo: {e}", file=sys.stderr)
        return 2
    previous = {r.model: r for r in load(out)} if args.retry or args.resume else {}
    if args.retry:
        types = [t for t in types if t not in previous or previous[t].status != EQUAL]
    elif args.resume:
        types = [t for t in types if t not in previous]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    command = "fxcc zoo " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "fxcc zoo"
    print(f"fxcc zoo: {len(types)} model types through {args.entry}, {args.jobs} jobs, {threads} threads each, "
          f"timeout {args.timeout:.0f} s", file=sys.stderr)
    t0 = time.monotonic()
    width = max((len(t) for t in types), default=10)
    results = dict(previous)

    def done(r: Result, i: int, n: int) -> None:
        results[r.model] = r
        err = "" if r.max_rel is None else f" {r.max_rel:.2g}"
        msg = (r.message or "; ".join(r.notes))[:110]
        print(f"[{i:>4}/{n}] {r.model:<{width}} {r.status:<12}{err:<9} {r.seconds:6.1f}s  {msg}", file=sys.stderr,
              flush=True)
        if i % 10 == 0:
            write(list(results.values()), out, command)

    sweep(types, args.jobs, args.timeout, args.passes, threads, out / "logs", done, args.memory_gb, args.entry)
    rows = list(results.values())
    write(rows, out, command)
    print(f"\n{summary(rows)}\n{out / 'zoo.md'} and {out / 'zoo.json'} written in "
          f"{(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    z = sub.add_parser("zoo", help="every transformers AutoModel architecture, shrunk: eager vs fxcc on two shapes")
    z.add_argument("--only", help="model types by name or glob, comma-separated (bert,gpt*,@file)")
    z.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    z.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    z.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / jobs)")
    z.add_argument("--passes", help="pipeline to compile with (default: the default pipeline)")
    z.add_argument("--entry", choices=ENTRIES, default="fxcc",
                   help='how the model is compiled: fxcc.compile(model) (fxcc, the default), torch.compile(model, '
                   'backend="fxcc") (torch), or that with dynamic=True (torch-dynamic)')
    z.add_argument("--memory-gb", type=float, default=MEMORY_GB,
                   help=f"heap limit of each worker process in GiB (default {MEMORY_GB:g})")
    z.add_argument("--output", default="build/zoo", help="directory for zoo.md, zoo.json and logs (default build/zoo)")
    z.add_argument("--retry", action="store_true", help="run again only the models not equal in the existing table")
    z.add_argument("--resume", action="store_true", help="run only the models the existing table lacks")
    z.set_defaults(fn=main)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m fxcc.zoo")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--passes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-gb", type=float, default=MEMORY_GB)
    p.add_argument("--entry", choices=ENTRIES, default="fxcc")
    a = p.parse_args()
    if a.worker:
        worker(a.passes, a.threads, a.memory_gb, a.entry)
