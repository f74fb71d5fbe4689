"""The `fxcc` command: explain, bench, passes, cache, zoo."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
from fxcc.autotune import search
from fxcc.autotune.plan import PlanError

from . import __version__, bench, logs, plan_search, zoo
from .api import compile, explained
from .capture import CaptureError
from .options import settings
from .pipeline import DEFAULT_PIPELINE, PipelineError, all_passes
from .store import ArtifactCache, CacheError, default_cache


class UsageError(Exception):
    """Bad command-line input; printed without a traceback, exit status 2."""


def load_object(spec: str, what: str) -> Any:
    """Load `PATH.py:NAME` -> the object NAME defined in that file."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"{what} must be written PATH.py:NAME, got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no file {path!r}")
    mod_name = f"fxcc_user_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(mod_name)
    if module is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except SyntaxError as e:
            del sys.modules[mod_name]
            raise UsageError(f"{what}: {path} is not valid Python: {e.msg} (line {e.lineno})") from None
        except BaseException:
            del sys.modules[mod_name]  # a failed import is not kept half-run
            raise
    if not hasattr(module, name):
        defined = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise UsageError(f"{what}: {path} defines no {name!r} (it defines: {', '.join(defined) or 'nothing callable'})")
    return getattr(module, name)


def load_model_and_inputs(model_spec: str, inputs_spec: str | None) -> tuple[Any, tuple, dict]:
    """`PATH.py:FACTORY` and `PATH.py:FUNC` (default: `inputs` in the model's file) -> model, args, kwargs."""
    factory = load_object(model_spec, "model")
    model = factory if isinstance(factory, nn.Module) else _called(factory, model_spec, "model")
    if not callable(model):
        raise UsageError(f"model {model_spec} returned a value of type {type(model).__name__}: name an nn.Module, "
                         "or a function that takes no arguments and returns the model (or the function to compile)")
    if inputs_spec is None:
        inputs_spec = f"{model_spec.rpartition(':')[0]}:inputs"
    inputs = _called(load_object(inputs_spec, "--inputs"), inputs_spec, "--inputs")
    if isinstance(inputs, dict):
        return model, (), inputs
    if not isinstance(inputs, tuple):
        raise UsageError(f"--inputs {inputs_spec} must return a tuple of example inputs, got {type(inputs).__name__}")
    return model, inputs, {}


def _called(factory: Any, spec: str, what: str) -> Any:
    """`factory()`, where the command line names a factory: one that is not callable, or takes arguments, is a
    usage error (an error raised inside it is the user's code's own, with its traceback)."""
    if not callable(factory):
        raise UsageError(f"{what} {spec} holds a value of type {type(factory).__name__}, not a function that takes "
                         "no arguments")
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise UsageError(f"{what} {spec} must take no arguments ({e})") from None
    except ValueError:  # no signature to read (a builtin): called as it is
        pass
    return factory()


def set_threads(args: argparse.Namespace) -> None:
    """--threads: torch's CPU threads; kernel timings and their cache keys depend on the count."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def cmd_explain(args: argparse.Namespace) -> int:
    set_threads(args)
    model, a, kw = load_model_and_inputs(args.model, args.inputs)
    cm = explained(model, *a, passes=args.passes, ir_after_each=args.ir, **kw)
    print(cm.explain(ir_after_each=args.ir))
    kernels = cm.variants[-1].kernels
    if args.kernels:
        print("\n== kernels")
        for k in kernels.values():
            print(f"// {k.key} [{k.kind}] backend={k.backend}\n{k.body.text}\n")
    if args.source:
        print("\n== kernel source (what each kernel's chosen backend built)")
        for k in kernels.values():
            source = k.built.source if k.choice else "(not built: the codegen pass did not run)"
            print(f"// {k.key} [{k.kind}] backend={k.backend}\n{source.rstrip()}\n")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    if args.budget < 1:
        raise UsageError(f"--budget must be at least 1 trial per kernel, got {args.budget}")
    set_threads(args)
    model, a, kw = load_model_and_inputs(args.model, args.inputs)
    cm = compile(model, passes=args.passes, tune="search", tune_budget=args.budget)
    cm(*a, **kw)
    text = cm.explain()
    print(text[text.index("== kernel choices"):])
    kernels = cm.variants[-1].kernels.values()
    print("\n== what was stored")
    for k in kernels:
        params = f" {json.dumps(k.choice.params, sort_keys=True)}" if k.choice and k.choice.params else ""
        print(f"  {k.key} -> {k.backend}{params}: {k.stored or 'not stored'}")
    stored = sum(k.stored.startswith("stored in") for k in kernels)
    root = default_cache().root
    if not stored and any(k.stored.startswith("not stored") for k in kernels):
        print(f"\nNothing was stored: the artifact cache {root} cannot be written (see above).", file=sys.stderr)
        return 1
    print(f"\n{stored} tuned choices stored in the artifact cache {root}; `fxcc.compile(..., tune=\"cached\")` "
          "(the default) loads them in any process.")
    return 0


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; 0 elsewhere), so that a budget counts the imports."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def cmd_search(args: argparse.Namespace) -> int:
    """`fxcc search`: an Optuna study over pass knobs and kernel choices; writes a plan and a Pareto plot."""
    started = time.monotonic() - process_age()  # --timeout counts the start-up and loading the model too
    set_threads(args)
    _counts(args)
    try:
        cfg = search.SearchConfig(
            output=args.output, target=args.target, trials=args.trials, timeout=args.timeout, storage=args.storage,
            study_name=args.study, quality_budget=args.quality_budget, objective=args.objective,
            tune_budget=args.tune_budget, warmup=args.warmup, reps=args.reps,
            backends=args.backends.split(",") if args.backends else None, sampler=args.sampler, seed=args.seed,
            knobs=None if args.knobs is None else [k for k in args.knobs.split(",") if k and k != "none"],
            nproc=args.nproc,
            plot=args.plot, progress=not args.no_progress)
    except ValueError as e:
        raise UsageError(str(e).removeprefix("fxcc search: ")) from None
    out_dir = os.path.dirname(os.path.abspath(args.output)) if args.output else None
    if out_dir and not os.path.isdir(out_dir):  # said before the search runs, not after
        raise UsageError(f"--output {args.output}: no directory {out_dir!r}")
    model, a, kw = load_model_and_inputs(args.model, args.inputs)
    if args.target == "cuda":
        model, a, kw = model.to("cuda"), search.to_device(a, "cuda"), search.to_device(kw, "cuda")
    try:
        result = plan_search.search(model, a, kw, cfg, started)
    except ValueError as e:  # bad --knobs/--backends/--study for this storage, or a --storage that cannot open
        if not str(e).startswith(("fxcc search:", "fxcc: cannot open tuning storage")):
            raise
        raise UsageError(str(e).removeprefix("fxcc search: ").removeprefix("fxcc: ")) from None
    except RuntimeError as e:  # no trial ran correctly, or none is within the quality budget
        if not str(e).startswith("fxcc search:"):
            raise
        print(e, file=sys.stderr)
        return 1
    print(result.table)
    print(f"\nplan: {result.plan_path}" + (f"\nPareto plot: {result.plot_path}" if result.plot_path else "")
          + f"\nstudy: {result.study_name} ({result.trials_in_study} trials so far; browse with optuna-dashboard)"
          + f"\napply: fxcc.compile(model, plan={result.plan_path!r})")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    print(f"default pipeline: {DEFAULT_PIPELINE}\n")
    for name, cls in sorted(all_passes().items()):
        opts = ", ".join(f"{f.name.replace('_', '-')}={f.default}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14} {cls.reads}->{cls.writes:<7} {'exact' if cls.exact else 'approximate':<11} {doc}")
        if opts:
            print(f"{'':<14} options: {opts}")
    return 0


def _counts(args: argparse.Namespace) -> None:
    """--reps at least 1, --warmup at least 0."""
    if getattr(args, "reps", None) is not None and args.reps < 1:
        raise UsageError(f"--reps must be at least 1, got {args.reps}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")


def cmd_bench(args: argparse.Namespace) -> int:
    _counts(args)
    return bench.main(args)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`500M`, `2G`, `1.5GiB`, `4096` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-size {text!r}: write a size like 500M, 2G or 1.5GiB (or a number of bytes)")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def human_size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cmd_cache(args: argparse.Namespace) -> int:
    """`fxcc cache ls | show KEY | verify | prune --max-size SIZE | clear` on FXCC_CACHE_DIR (~/.cache/fxcc)."""
    cache = ArtifactCache()
    try:
        return _cache_action(cache, args)
    except CacheError as e:
        print(f"fxcc: {e}", file=sys.stderr)
        return 1


def _cache_action(cache: ArtifactCache, args: argparse.Namespace) -> int:
    if args.action == "ls":
        entries = cache.entries()
        if entries:
            print(f"{'KEY':<26} {'KERNEL':<18} {'SIZE':>10}  {'LAST USED':<16}  BACKEND  TARGET")
        for e in entries:
            print(f"{e.key:<26} {e.meta.get('kernel', '-'):<18} {human_size(e.size):>10}  {_when(e.last_used):<16}  "
                  f"{e.meta.get('backend', '-'):<7}  {e.meta.get('target', '-')}")
        print(f"{len(entries)} entries, {human_size(sum(e.size for e in entries))} in {cache.root}")
        _print_swept(cache)
    elif args.action == "show":
        entries = cache.entries()
        keys = [e.key for e in entries if e.key.startswith(args.key)]
        if not keys:  # a kernel id as `fxcc explain` prints it: every entry of that kernel (targets, threads)
            keys = [e.key for e in entries if str(e.meta.get("kernel", "")).startswith(args.key)]
        one_kernel = len({e.meta.get("kernel") for e in entries if e.key in keys}) == 1 and args.key.startswith("k")
        if not keys or (len(keys) > 1 and not one_kernel):
            what = ("no cache entry or kernel matches" if not keys else
                    f"{len(keys)} cache entries ({', '.join(keys[:3])}, ...) match")
            raise UsageError(f"{what} {args.key!r} in {cache.root}; `fxcc cache ls` lists entry keys and kernels")
        status = 0
        for i, key in enumerate(keys):
            with warnings.catch_warnings(record=True) as damage:
                warnings.simplefilter("always")
                e = cache.get(key)
            if e is None:  # damaged: evicted
                print("\n".join(str(w.message) for w in damage), file=sys.stderr)
                status = 1
                continue
            print(("\n" if i else "") + f"key        {e.key}\ndirectory  {e.dir}\nsize       {human_size(e.size)}\n"
                  f"last used  {_when(e.last_used)}\nfiles")
            for name, path in e.files.items():
                print(f"  {name:<20} {human_size(path.stat().st_size):>10}")
            print("meta\n" + json.dumps(e.meta, indent=2, sort_keys=True))
        return status
    elif args.action == "verify":
        problems = cache.verify(evict=args.evict)
        for p in problems:
            done = "" if not args.evict else " (evicted)" if p.evicted else f" (NOT evicted: {p.not_evicted})"
            print(f"{p.key}: {p.problem}{done}")
        stuck = [p for p in problems if not p.evicted]
        if stuck:
            hint = (f"remove them by hand (rm -r {cache.root}/entries/KEY) or make the cache writable"
                    if args.evict else "they are evicted and rebuilt at their next use, or now with "
                                        "`fxcc cache verify --evict`")
            print(f"{len(stuck)} damaged entries {'could not be evicted from' if args.evict else 'in'} "
                  f"{cache.root}; {hint}")
            return 1
        print(f"{len(cache.entries())} entries in {cache.root} are sound (signed with {cache.root}/key)")
    elif args.action == "prune":
        limit = parse_size(args.max_size)
        _print_swept(cache)
        removed = cache.prune(limit)
        print(f"evicted {len(removed)} least recently used entries; {human_size(cache.size())} left "
              f"(limit {human_size(limit)}) in {cache.root}")
    elif args.action == "clear":
        print(f"evicted {cache.clear()} entries from {cache.root} (tuning studies in tuning.db are kept)")
    return 0


def _print_swept(cache: ArtifactCache) -> None:
    """What sweeping the temporary directories found: dead writers' (removed) and writes in progress."""
    swept, removed = cache.sweep(), cache.removed
    if removed.removed:
        print(f"removed {removed.removed} temporary directories of writers that died "
              f"({human_size(removed.removed_bytes)})")
    if swept.in_progress:
        print(f"{swept.in_progress} writes in progress ({human_size(swept.in_progress_bytes)})")


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cache", help="the artifact cache (FXCC_CACHE_DIR, default ~/.cache/fxcc)")
    actions = c.add_subparsers(dest="action", required=True)
    actions.add_parser("ls", help="entries, most recently used first")
    actions.add_parser("show", help="an entry's files and metadata").add_argument(
        "key", help="an entry key or its prefix, or a kernel id as `fxcc explain` prints it (all of its entries)")
    v = actions.add_parser("verify", help="check every entry's signature and checksums; exit status 1 when one is "
                                          "damaged (with --evict: when one could not be evicted)")
    v.add_argument("--evict", action="store_true", help="also evict the damaged entries")
    p = actions.add_parser("prune", help="evict least recently used entries down to a size")
    p.add_argument("--max-size", required=True, help="e.g. 500M or 2G (binary units)")
    actions.add_parser("clear", help="evict every entry (tuning studies are kept)")
    c.set_defaults(fn=cmd_cache)


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("search", help="search pass knobs and kernel choices with Optuna; write a plan file")
    r.add_argument("model", help="PATH.py:FACTORY (a function returning the nn.Module, or the module itself)")
    r.add_argument("--inputs", help="PATH.py:FUNC returning a tuple of example inputs (default: `inputs` in the "
                                    "model file)")
    r.add_argument("--output", default="plan.json", help="the plan file to write (default plan.json)")
    r.add_argument("--target", choices=["cpu", "cuda"], default="cpu", help="device to search for (default cpu)")
    r.add_argument("--trials", type=int, default=12, help="trials this process runs (default 12)")
    r.add_argument("--timeout", type=float, help="seconds the whole search may take (from loading the model to the "
                                                 "plan written): trials end early enough for the rest, and one still "
                                                 "running then is stopped and pruned")
    r.add_argument("--storage", help="Optuna storage: an RDB URL (sqlite:///PATH, postgresql+psycopg2://...) or "
                                     "journal:PATH (default: tuning.db in the artifact cache directory)")
    r.add_argument("--study", help="study name (default: derived from the model, inputs, target and space)")
    r.add_argument("--quality-budget", type=float, help="largest quality error (1 - min cosine) of the chosen "
                                                        f"plan (default {0.01:g} when approximate passes are searched)")
    r.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                   help="what the plan minimizes: latency per call or maximizes: items per second (default latency)")
    r.add_argument("--tune-budget", type=int, default=0,
                   help="Optuna trials per kernel candidate of the chosen pipeline (default 0: cached/default tiles)")
    r.add_argument("--backends", help="codegen backends to search, e.g. auto,extern,tvm (default: all for the target)")
    r.add_argument("--knobs", help="passes whose knobs to search, e.g. layer-skip,token-merge,tp ('none': only the "
                                   "codegen backend; default: every registered one)")
    r.add_argument("--nproc", type=int, help="processes a trial may launch, one per rank, for the parallel plan "
                                             "(knob tp: TP degree, fused all-reduce, token split; gloo on the CPU). "
                                             "Default: the CUDA devices with --target cuda, else 1 (tp not searched)")
    r.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default="tpe", help="Optuna sampler (default tpe)")
    r.add_argument("--seed", type=int, help="sampler seed (leave unset when several workers share a study)")
    r.add_argument("--warmup", type=int, default=2, help="untimed calls before timing a trial (default 2)")
    r.add_argument("--reps", type=int, default=10, help="timed calls per trial (default 10)")
    r.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); plans record the count")
    r.add_argument("--plot", help="Pareto PNG path (default: the plan's name with .pareto.png; '' for none)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_search)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcc", description="MLIR-style compiler and autotuner for PyTorch inference",
                                epilog=f"FXCC_LOGS=topic,+topic,-topic logs by topic on stderr; topics: "
                                       f"{', '.join(logs.TOPICS)}")
    p.add_argument("--version", action="version", version=f"fxcc {__version__} (torch {torch.__version__})")
    p.add_argument("-v", "--verbose", action="store_true", help="log everything fxcc does (as FXCC_LOGS=+all)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("explain", help="IR after each pass and where each op runs")
    e.add_argument("model", help="PATH.py:FACTORY (a function returning the nn.Module, or the module itself)")
    e.add_argument("--inputs", help="PATH.py:FUNC returning a tuple of example inputs (default: `inputs` in the model file)")
    e.add_argument("--passes", help="pipeline, e.g. 'canonicalize,raise,fuse,codegen' (default: the default pipeline)")
    e.add_argument("--ir", action="store_true", help="also print the IR after each pass (default: the final IR, "
                                                   "where ops run and the kernel choices)")
    e.add_argument("--final-only", action="store_true", help=argparse.SUPPRESS)  # the default now; still accepted
    e.add_argument("--kernels", action="store_true", help="also print every kernel body")
    e.add_argument("--source", action="store_true",
                   help="also print each kernel's built source (generated Triton code, or the extern body)")
    e.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's); kernel "
                   "choices are measured and cached per thread count")
    e.set_defaults(fn=cmd_explain)

    b = sub.add_parser("bench", help="eager, torch.compile and fxcc side by side (ratios, compile times, error)")
    b.add_argument("workload", choices=["minilm", "llama", "generate", "breadth"],
                   help="MiniLM-L6 (real weights), a Llama-style decoder, generate: greedy generation with a KV "
                        "cache (Llama from LlamaConfig), or breadth: the suite of 100 non-transformer modules in "
                        "benchmarks/breadth/")
    b.add_argument("--batch", type=int, help="batch size (default: the workload's)")
    b.add_argument("--seq", type=int, help="sequence length (default: the workload's)")
    b.add_argument("--prompt", type=int, help="generate: prompt length (default 128 on CPU, 512 on GPU)")
    b.add_argument("--new-tokens", type=int, default=64, help="generate: tokens to generate (default 64)")
    b.add_argument("--no-padding", action="store_true",
                   help="minilm: every row holds --seq real tokens (default: short sentences padded to --seq)")
    b.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads); default 2")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the workload's for the device")
    b.add_argument("--hidden", type=int, help="llama, generate: hidden size")
    b.add_argument("--layers", type=int, help="llama, generate: decoder layers")
    b.add_argument("--heads", type=int, help="llama, generate: attention heads")
    b.add_argument("--kv-heads", type=int, help="llama, generate: key/value heads (grouped-query attention)")
    b.add_argument("--intermediate", type=int, help="llama, generate: MLP intermediate size")
    b.add_argument("--warmup", type=int, help="untimed calls per engine before timing (default 3; generate: "
                   "untimed generates per engine after the two that compile, default 1)")
    b.add_argument("--reps", type=int, default=20,
                   help="timed calls per engine, interleaved (default 20; generate: generates per engine)")
    b.add_argument("--engines", help="comma-separated subset, e.g. eager,fxcc (generate: eager, torch.compile[:MODE], "
                   "fxcc, fxcc:static, fxcc:loop: fxcc.compile(model).generate with fxcc's own decode loop)")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--only", help="breadth: comma-separated module names (NAME* matches a prefix)")
    b.add_argument("--category", help="breadth: comma-separated categories (ops, chains, nets)")
    b.add_argument("--size", choices=["small", "full"], help="breadth: module sizes (default full)")
    b.add_argument("--list", action="store_true", help="breadth: list the selected modules and exit")
    b.add_argument("--no-warm", action="store_true", help="breadth: skip the warm compiles in a new process")
    b.add_argument("--defer", choices=["fxcc", "all", "none"], default="fxcc",
                   help="generate: engines whose generate reads the stop flag one step late, so the host queues the "
                        "next step while the device runs this one (default fxcc: as fxcc.compile(model).generate runs)")
    b.add_argument("--no-prefill-alone", dest="prefill_alone", action="store_false",
                   help="generate: skip compiling and timing each fxcc engine's prefill alone (TTFT / prefill alone)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("tune", help="search each kernel's parameters with Optuna; results go to the artifact cache")
    t.add_argument("model", help="PATH.py:FACTORY (a function returning the nn.Module, or the module itself)")
    t.add_argument("--inputs", help="PATH.py:FUNC returning a tuple of example inputs (default: `inputs` in the "
                                    "model file)")
    t.add_argument("--passes", help="pipeline (default: the default pipeline)")
    t.add_argument("--budget", type=int, default=20, help="trials per kernel candidate (default 20)")
    t.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's); kernel "
                   "choices are measured and cached per thread count")
    t.set_defaults(fn=cmd_tune)

    add_search_parser(sub)
    s = sub.add_parser("passes", help="list the registered passes and their options")
    s.set_defaults(fn=cmd_passes)
    add_cache_parser(sub)
    zoo.add_parser(sub)
    return p


# log topics a command shows by default (FXCC_LOGS, or -v, replaces them): its progress and its summaries
COMMAND_TOPICS = {"tune": "tuning", "search": "tuning"}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        env = settings()
    except ValueError as e:  # an FXCC_* variable fxcc does not understand
        print(f"fxcc: {e}", file=sys.stderr)
        return 2
    logs.configure(logs.parse("+all") if args.verbose else env.logs or logs.parse(COMMAND_TOPICS.get(args.command, "")))
    logging.basicConfig(level=logging.WARNING, format=logs.FORMAT)  # warnings of other libraries and untopical ones
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that left shows here, inside this handler, not at interpreter exit
        return code
    except (UsageError, PipelineError, CaptureError, PlanError) as e:
        print(f"fxcc: {str(e).removeprefix('fxcc: ')}", file=sys.stderr)  # one prefix, whoever raised it
        return 2
    except BrokenPipeError:  # `fxcc cache ls | head`: the reader left; end quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:  # main() called in a process that goes on (tests, notebooks): its log topics end with it
        logs.configure(())


if __name__ == "__main__":
    sys.exit(main())
