"""`fxcc bench breadth`: every module of the suite under eager, torch.compile and fxcc, side by side.

Per module: outputs checked against eager (fp32 within 1e-3 of the output's scale; bf16/fp16 within 3e-2),
cold compile time of each compiler (first call; an empty fxcc artifact cache, empty inductor and Triton caches), the engines timed
interleaved in one process (fxcc.measure.interleaved: warm-up, then alternating rounds; each compiler on its own
copy of the module, as a user runs it: torch.compile's CPU kernels take writable pointers to the weights at every
call, which on a shared module made fxcc compare its watched weights' values at every call), and the
ratios eager/fxcc and torch.compile/fxcc of the medians with their spread (the ratio of the quartiles,
slow/fast ends crossed). Geomeans per category and overall are over the modules every engine ran
correctly. fxcc's warm compile time (a new process reading the same artifact cache) follows unless
--no-warm. See BENCHMARKING.md for the protocol.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import CASES, Case, select

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


@dataclass
class Result:
    """One module's outcome; times in ms, compile times in s; `ratios[engine]` = engine median / fxcc median."""

    name: str
    category: str
    status: str = "ok"  # ok | wrong | error (fxcc) ; other engines' problems go to `notes`
    median_ms: dict[str, float] = field(default_factory=dict)
    quartiles_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    warm_s: float | None = None
    error: dict[str, float] = field(default_factory=dict)  # max |out - eager| / max(1, max |eager|)
    eager_regions: int = 0  # ops fxcc left to run eagerly
    kernels: dict[str, int] = field(default_factory=dict)  # fxcc kernels by chosen backend
    kept_eager: bool = False  # fxcc measured its compiled graph slower than eager and runs eagerly
    notes: list[str] = field(default_factory=list)


def scaled_error(ref: Any, out: Any) -> float:
    """Largest |out - ref| over all output tensors, relative to the output's scale (inf if shapes differ)."""
    a, b = (pytree.tree_leaves(x) for x in (ref, out))
    a, b = [t for t in a if isinstance(t, torch.Tensor)], [t for t in b if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    err = 0.0
    for x, y in zip(a, b):
        if not x.dtype.is_floating_point:
            err = max(err, 0.0 if torch.equal(x, y) else math.inf)
            continue
        if x.numel() == 0:
            continue
        # in chunks of 2**24 elements: a double copy of a multi-GB output would not fit beside the model
        dmax, xmax = 0.0, None
        for xc, yc in zip(x.reshape(-1).split(1 << 24), y.reshape(-1).split(1 << 24)):
            xc, yc = xc.double(), yc.double()
            both_nan = torch.isnan(xc) & torch.isnan(yc)
            d = torch.where(both_nan | (xc == yc), 0.0, (xc - yc).abs()).nan_to_num(nan=math.inf)  # NaN on one side
            dmax = max(dmax, float(d.max()))
            fin = xc[torch.isfinite(xc)]
            if fin.numel():
                xmax = max(xmax or 0.0, float(fin.abs().max()))
        err = max(err, dmax / max(1.0, xmax if xmax is not None else 1.0))
    return err


def _engine(name: str, model: torch.nn.Module) -> Callable:
    if name == "eager":
        return model
    if name.startswith("torch.compile"):
        torch._dynamo.reset()
        return torch.compile(model, mode=name.partition(":")[2] or None)
    if name == "fxcc":
        import fxcc
        return fxcc.compile(model)
    if name == "fxcc:no-layout":  # the default pipeline without the layout pass (channels-last per kernel only)
        import fxcc
        return fxcc.compile(model, passes=fxcc.DEFAULT_PIPELINE.replace(",layout,", ","))
    if name == "fxcc:two-pass":  # looped Triton reductions without the one-pass mean and variance
        import fxcc
        from fxcc.options import settings
        # a cache of its own: the graph's key is fxcc's, so its measured choices (compiled or eager) would be reused
        return _compiled_under(fxcc.compile(model), FXCC_TRITON_WELFORD="0",
                               FXCC_CACHE_DIR=os.path.join(settings().cache_dir, "two-pass"))
    raise ValueError(f"unknown engine {name!r}; use eager, torch.compile[:MODE], fxcc, fxcc:no-layout or "
                     "fxcc:two-pass")


@contextlib.contextmanager
def environment(**values: str):
    """Environment variables set for the block, restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compiled_under(fn: Callable, **values: str) -> Callable:
    """`fn` whose first call, the one that compiles, runs with the environment `values` (fxcc reads its settings
    there); later calls run as they are, so the timed ones pay nothing for it."""
    first = [True]

    def call(*args: Any, **kwargs: Any) -> Any:
        if not first[0]:
            return fn(*args, **kwargs)
        with environment(**values):
            out = fn(*args, **kwargs)
        first[0] = False
        return out
    return call


def _fxcc_report(fn: Any, res: Result) -> None:
    from fxcc.dialects import KERNEL_OPS
    from fxcc.runtime import placement

    variants = getattr(fn, "variants", None)
    if not variants or not hasattr(variants[-1], "kernels"):
        return
    v = variants[-1]
    res.kept_eager = v.slower_than_eager
    if v.vs_eager:
        res.notes.append(f"fxcc: {v.vs_eager}")
    res.eager_regions = sum(1 for r in placement(v.gm, v.kernels) if r[2].startswith("eager"))
    for n in v.gm.graph.nodes:
        if n.op == "call_function" and n.target in KERNEL_OPS:
            b = v.kernels[n.args[1]].backend
            res.kernels[b] = res.kernels.get(b, 0) + 1


def run_case(case: Case, *, size: str, device: str, dtype: torch.dtype, engines: list[str], warmup: int,
             reps: int, log: Callable[[str], None]) -> Result:
    """Check and time one module under every engine (see the module docstring)."""
    from fxcc.measure import interleaved

    res = Result(case.name, case.category)
    model, inputs = case.make(size, device, dtype)
    with torch.inference_mode():
        ref = model(*inputs)
    tol = TOLERANCE.get(dtype, 3e-2)
    calls: dict[str, Callable[[], Any]] = {}
    for name in engines:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn = _engine(name, model if name == "eager" else copy.deepcopy(model))
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = fn(*inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
            if name != "eager":
                res.compile_s[name] = time.perf_counter() - t0
        except Exception as e:  # a failing engine is a result, not the end of the run
            msg = f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            res.notes.append(msg)
            log(f"{case.name}: {msg}")
            if name == "fxcc":
                res.status = "error"
            continue
        if name == "fxcc":
            _fxcc_report(fn, res)
            if res.kept_eager:  # fxcc runs eagerly: the compiled graph is checked all the same
                with torch.inference_mode():
                    out = fn.variants[-1].run(list(inputs))
            res.notes += [f"fxcc warned: {str(w.message)[:200]}" for w in caught if "fxcc" in str(w.message)]
        res.error[name] = scaled_error(ref, out)
        if res.error[name] > tol:
            res.notes.append(f"{name} differs from eager by {res.error[name]:.3g} of the output's scale")
            if name == "fxcc":
                res.status = "wrong"
            continue
        del out

        def call(fn=fn, inputs=inputs):
            with torch.inference_mode():
                return fn(*inputs)
        calls[name] = call
    if len(calls) > 1:
        t = interleaved(calls, device=device, warmup=warmup, reps=reps, rounds=min(5, reps))
        for name, x in t.items():
            res.median_ms[name] = x.median
            res.quartiles_ms[name] = (x.quantile(0.25), x.quantile(0.75))
        if "fxcc" in t:
            fx = t["fxcc"]
            for name, x in t.items():
                if name != "fxcc":
                    res.ratios[name] = x.median / fx.median
                    res.spread[name] = (x.quantile(0.25) / fx.quantile(0.75), x.quantile(0.75) / fx.quantile(0.25))
    del calls, model, inputs, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def geomeans(results: list[Result], engines: list[str]) -> dict[str, dict[str, float]]:
    """Per category and overall: geomean of each engine's time over fxcc's, on modules where all ran."""
    out: dict[str, dict[str, float]] = {}
    others = [e for e in engines if e != "fxcc"]
    groups = {cat: [r for r in results if r.category == cat] for cat in dict.fromkeys(r.category for r in results)}
    groups["overall"] = results
    for cat, rs in groups.items():
        full = [r for r in rs if all(e in r.ratios for e in others)]
        if full:
            out[cat] = {e: math.exp(sum(math.log(r.ratios[e]) for r in full) / len(full)) for e in others}
            out[cat]["modules"] = len(full)
    return out


def table(results: list[Result], engines: list[str], gm: dict) -> str:
    others = [e for e in engines if e != "fxcc"]
    head = f"{'module':<36} {'cat':<6} " + " ".join(f"{_short(e) + ' ms':>11}" for e in engines)
    head += "".join(f" {_short(e) + '/fxcc':>20}" for e in others) + f" {'cold s (tc/fxcc)':>17} {'warm s':>7}  status"
    lines = [head]
    for r in results:
        row = f"{r.name:<36} {r.category:<6} " + " ".join(
            f"{r.median_ms[e]:>11.3f}" if e in r.median_ms else f"{'-':>11}" for e in engines)
        for e in others:
            if e in r.ratios:
                lo, hi = r.spread[e]
                row += f" {r.ratios[e]:>6.2f}x [{lo:.2f}-{hi:.2f}]".rjust(21)
            else:
                row += f" {'-':>20}"
        tc, fx = r.compile_s.get("torch.compile"), r.compile_s.get("fxcc")
        row += f" {_num(tc):>8}/{_num(fx):<8} {_num(r.warm_s):>7}  {r.status}"
        if r.eager_regions:
            row += f" ({r.eager_regions} eager ops)"
        if r.kept_eager:
            row += " (runs eagerly: compiled measured slower)"
        lines.append(row)
        lines += [f"    {n}" for n in r.notes]
    lines.append("")
    for cat, g in gm.items():
        parts = ", ".join(f"{_short(e)}/fxcc {v:.3f}x" for e, v in g.items() if e != "modules")
        lines.append(f"geomean {cat:<8} ({g['modules']} modules): {parts}")
    return "\n".join(lines)


def _short(engine: str) -> str:
    return engine.replace("torch.compile", "tc").replace(":reduce-overhead", ":ro").replace(
        ":max-autotune-no-cudagraphs", ":ma")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def warm_compiles(names: list[str], size: str, device: str, dtype: torch.dtype, cache_dir: str,
                  log: Callable[[str], None]) -> dict[str, float]:
    """fxcc's compile + first call per module in one new process reading `cache_dir` (the warm path)."""
    log("warm compiles in a new process ...")
    spec = {"names": names, "size": size, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {here!r}); from breadth.runner import _warm_child; _warm_child({spec!r})"
    env = {**os.environ, "FXCC_CACHE_DIR": cache_dir}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        log(f"warm compiles failed: {p.stderr.strip().splitlines()[-1:]}")
        return {}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _warm_child(spec: dict) -> None:
    import fxcc
    # fxcc's API (torch._dynamo behind its guards: seconds) is imported once per process, before any timing, as
    # `fxcc bench minilm` does; timed, it went to the first module's warm compile alone
    compile_ = fxcc.compile
    torch.set_num_threads(spec["threads"])
    out = {}
    for name in spec["names"]:
        model, inputs = CASES[name].make(spec["size"], spec["device"], getattr(torch, spec["dtype"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    compile_(model)(*inputs)
            except Exception:  # reported by the cold run already
                continue
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
        out[name] = time.perf_counter() - t0
    print(json.dumps(out))


def main(args: Any) -> int:
    """Entry point of `fxcc bench breadth` (arguments: see fxcc.cli)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    try:
        cases = select(args.only, args.category)
    except ValueError as e:
        from fxcc.cli import UsageError
        raise UsageError(str(e)) from None
    if args.list:
        for c in cases:
            print(f"{c.category:<7} {c.name}")
        return 0
    engines = ["eager", "torch.compile", "fxcc"]
    if device == "cuda":
        engines.insert(2, "torch.compile:reduce-overhead")
    if args.engines:
        engines = args.engines.split(",")
    size = args.size or "full"

    def log(msg: str) -> None:
        print(f"[fxcc bench breadth] {msg}", file=sys.stderr, flush=True)

    from fxcc.bench import machine
    log(f"{len(cases)} modules, size {size}, {str(dtype).removeprefix('torch.')} on {machine(device)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="fxcc-breadth-cache-") as cache_dir:
        # fxcc compiles cold, into an empty artifact cache; torch.compile too: its FX-graph and kernel caches persist
        # across processes, so a module run before would compile warm; fresh directories make both compile times cold
        with environment(FXCC_CACHE_DIR=cache_dir, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
                         TRITON_CACHE_DIR=os.path.join(cache_dir, "triton")):
            for i, c in enumerate(cases):
                log(f"[{i + 1}/{len(cases)}] {c.name}")
                try:
                    results.append(run_case(c, size=size, device=device, dtype=dtype, engines=engines,
                                            warmup=args.warmup, reps=args.reps, log=log))
                except Exception as e:  # one module that fails outside its engines (its inputs, memory) is a result
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    log(f"{c.name}: {msg}")
                    results.append(Result(c.name, c.category, status="error", notes=[msg]))
                if device == "cuda":
                    torch.cuda.empty_cache()
                if args.json:  # written after every module: a run stopped part-way keeps what it measured
                    write_json(args.json, results, engines, size, dtype, device, args.reps)
            if "fxcc" in engines and not args.no_warm:
                warm = warm_compiles([r.name for r in results if r.status == "ok"], size, device, dtype, cache_dir,
                                     log)
                for r in results:
                    r.warm_s = warm.get(r.name)
    gm = geomeans(results, engines)
    print(f"fxcc bench breadth: {len(results)} modules, size {size}, {str(dtype).removeprefix('torch.')}\n"
          f"machine: {machine(device)}; median of {args.reps} calls per engine, interleaved; "
          f"ratios > 1: fxcc faster (spread: interquartile ends crossed)\n")
    print(table(results, engines, gm))
    bad = [r.name for r in results if r.status != "ok"]
    if bad:
        print(f"\nfxcc wrong or failing on {len(bad)}: {', '.join(bad)}")
    if args.json:
        write_json(args.json, results, engines, size, dtype, device, args.reps)
    return 1 if bad else 0


def write_json(path: str, results: list, engines: list[str], size: str, dtype: torch.dtype, device: str,
               reps: int) -> None:
    """The suite's results so far, with their geomeans, written whole to `path` (a temporary file renamed)."""
    from fxcc.bench import machine
    doc = {"suite": "breadth", "size": size, "dtype": str(dtype), "machine": machine(device), "engines": engines,
           "reps": reps, "results": [asdict(r) for r in results], "geomeans": geomeans(results, engines)}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
