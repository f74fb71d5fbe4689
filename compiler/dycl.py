"""DyCL: compile a module whose control flow depends on tensor values, as a host program plus segments.

When capture fails on data-dependent control flow, `compile_dynamic` rewrites `forward` (see
`fxcc.passes.dycl_rewrite`) into a generated host program, plain readable Python that evaluates the
conditions, and condition-free segments. Each segment is captured and compiled through the normal
pipeline (`CompiledModule.compile_for`), once per input signature; a loop calls one compiled body.

The host program is lean on purpose: the CompiledModule's guard (input structure, shapes, parameters)
runs once at the top, and a segment call is a dict lookup on its inputs' shapes followed by a direct
call of the compiled executable (no pytree, no parameter check). Segments whose inputs carry
data-dependent shapes (after `nonzero`, boolean masks) get one compiled variant per shape, up to
`SEGMENT_MAX_VARIANTS`; past that a shape runs that segment eagerly, with a warning.

Per input signature a segment runs the faster of compiled and plain Python, measured on its first
inputs: a segment whose plain Python takes under `SMALL_SEGMENT_US` is not compiled at all (a
comparison, a squeeze: a compiled call's dispatch costs as much), and a compiled one falls back to plain
Python only when that measured faster by more than `PYTHON_MARGIN` (compiled and plain are timed in
alternating rounds, so load on a shared machine hits both alike).
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import logging
import operator
import re
import statistics
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fxcc import ir
from fxcc.capture import CaptureError, flatten_inputs
from fxcc.dycl_rewrite import (
    DynamicCallees,
    RewriteError,
    Rewritten,
    rewrite,
    segment_function,
    unparse,
)
from fxcc.measure import interleaved
from fxcc.runtime import CompiledModule, Variant, explain_variant
from fxcc.store import cache_key, default_cache
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

SEGMENT_MAX_VARIANTS = 64
# a compiled segment is timed against the same statements run as plain Python (the segment function) on
# its first inputs, and the faster one runs: tiny segments (a comparison, a squeeze) gain nothing from
# kernels and pay their call overhead. Segments that mutate tensors in place or draw random numbers are
# not timed (running them again would change the result).
MEASURE_CHOICE = True
# a segment whose plain Python takes less than this (microseconds per call, measured on its first inputs)
# is not compiled: a compiled call's own dispatch costs about as much (`route == e`, a squeeze), and each
# such segment would be captured and compiled once per data-dependent shape for nothing.
SMALL_SEGMENT_US = 10.0
# a compiled segment's kernels were each chosen by measurement against the library call eager makes, so
# it runs unless its plain Python measured faster by more than this fraction (timing noise on a loaded
# machine should not send a segment back to eager)
PYTHON_MARGIN = 0.05
_IMPURE = re.compile(r"\w_\(|rand|dropout|bernoulli|multinomial|normal|exponential|uniform|poisson")


def _sig(a: Any) -> Any:
    """A segment's guard on one input: shape/dtype/device for tensors, the value for Python constants."""
    if isinstance(a, torch.Tensor):
        return (a.shape, a.dtype, a.device)
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(map(_sig, a)))
    try:
        hash(a)
        return (type(a), a)
    except TypeError:
        return (type(a), id(a))


_TENSOR = torch.Tensor


def _key(args: tuple) -> tuple:
    """A segment's guard key: `_sig` of each input, inlined for plain tensors (runs on every segment call)."""
    return tuple([(a.shape, a.dtype, a.device) if type(a) is _TENSOR else _sig(a) for a in args])


class SegmentModule(nn.Module):
    """One segment as a module: its owner is a submodule, so export lifts the owner's parameters.

    Inputs that are modules (a host loop `for block in self.blocks`) are bound here as submodules, at
    their positions `fixed`, so each module gets its own compiled variant and the call passes only values.
    """

    def __init__(self, owner: Any, fn: Any, source: str, fixed: dict[int, Any], n_args: int):
        super().__init__()
        self.owner = owner if isinstance(owner, nn.Module) else None
        modules = {i: m for i, m in fixed.items() if isinstance(m, nn.Module)}
        self.bound_modules = nn.ModuleList(modules.values())
        self._module_positions = tuple(modules)
        # the graph cache keys modules by their primitive attributes: the source and the constants count
        self._source = source
        self._constants = tuple((i, c) for i, c in fixed.items() if i not in modules)
        self._fn = fn
        self._n_args = n_args

    def forward(self, *args: Any) -> Any:
        fixed = dict(self._constants) | dict(zip(self._module_positions, self.bound_modules))
        rest = iter(args)
        return self._fn(*[fixed[i] if i in fixed else next(rest) for i in range(self._n_args)])


@dataclass
class SegmentRun:
    """How one input signature of a segment runs: compiled (with its Variant) or eagerly (with why)."""

    signature: str
    call: Any
    variant: Variant | None = None
    eager: str | None = None
    timing: str = ""  # the measured choice between the compiled variant and the plain Python segment


class Segment:
    """A compiled segment: per input signature, a direct call of its executable."""

    def __init__(self, spec: Any, owner: Any, name: str, options: Any):
        self.spec = spec
        self.source = ""
        self.name = name
        self.owner = owner
        self.options = options.replace(dycl=False, max_variants=SEGMENT_MAX_VARIANTS)
        self.eager_call: Any = None  # the generated segment function (bound to the owner), set by Program
        self.runs: dict[Any, SegmentRun] = {}
        self.by_key: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        call = self.by_key.get(_key(args))
        if call is None:
            call = self._build(args)
        return call(*args)

    def _build(self, args: tuple) -> Any:
        key = _key(args)
        flat, _ = flatten_inputs(args, {})
        sig = ", ".join(ir.type_str(x) if isinstance(x, torch.Tensor) else type(x).__name__
                        if isinstance(x, nn.Module) else repr(x)[:20] for x in flat)
        compiled = [r for r in self.runs.values() if r.variant is not None]
        has_tensor = any(isinstance(x, torch.Tensor) for x in flat)
        measure = MEASURE_CHOICE and not _IMPURE.search(self.source)
        t_py = _median_us(self.eager_call, args) if measure and has_tensor else None
        if not has_tensor:
            run = SegmentRun(sig, self.eager_call, eager="plain Python (no tensor inputs)")
        elif t_py is not None and t_py < SMALL_SEGMENT_US:
            why = (f"plain Python, not compiled: {t_py:.1f} us per call, less than a compiled call saves "
                   f"(SMALL_SEGMENT_US={SMALL_SEGMENT_US})")
            run = SegmentRun(sig, self.eager_call, eager=why)
        elif len(compiled) >= SEGMENT_MAX_VARIANTS:
            why = (f"{len(compiled)} signatures are compiled already (SEGMENT_MAX_VARIANTS="
                   f"{SEGMENT_MAX_VARIANTS}); this one runs eagerly")
            warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}): {why}", stacklevel=4)
            run = SegmentRun(sig, self.eager_call, eager=why)
        else:
            fixed = {i: a for i, a in enumerate(args) if _baked(a)}
            values = tuple(a for i, a in enumerate(args) if i not in fixed)
            try:
                cm = CompiledModule(SegmentModule(self.owner, self.eager_call, self.source, fixed, len(args)),
                                    self.options)
                cm.name, cm.echo_ir = self.name, False
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    variant = cm.compile_for(values, {})
            except Exception as e:  # noqa: BLE001 - a segment fxcc cannot capture runs eagerly, reported
                first = (str(e).strip().splitlines() or [""])[0][:200]
                why = f"capture/compile failed: {type(e).__name__}: {first}"
                warnings.warn(f"fxcc DyCL: segment {self.name} ({self.spec.where}) runs eagerly: {why}",
                              stacklevel=4)
                run = SegmentRun(sig, self.eager_call, eager=why)
            else:
                call = _direct_call(variant, values, len(self.spec.outputs), tuple(fixed))
                run = SegmentRun(sig, call, variant)
                if measure:
                    t_fx, t_py = _compare(call, self.eager_call, args)
                    run.timing = f"compiled {t_fx:.1f} us, plain Python {t_py:.1f} us per call"
                    if t_py < t_fx * (1 - PYTHON_MARGIN):
                        run.call, run.eager = self.eager_call, f"plain Python: measured faster ({run.timing})"
        self.runs[key] = run
        self.by_key[key] = run.call
        return run.call


def _compare(compiled: Any, plain: Any, args: tuple, rounds: int = 5) -> tuple[float, float]:
    """Per-call microseconds of the compiled segment and of its plain Python, timed in alternating
    rounds (the median of the rounds' medians), so that load drifting on a shared machine hits both."""
    t_fx, t_py = [], []
    for _ in range(rounds):
        t_fx.append(_median_us(compiled, args))
        t_py.append(_median_us(plain, args))
    return statistics.median(t_fx), statistics.median(t_py)


def _median_us(fn: Any, args: tuple, reps: int = 5) -> float:
    with torch.no_grad():
        return interleaved({"fn": lambda: fn(*args)}, device="cpu", warmup=1, reps=reps, rounds=1)["fn"].median * 1e3


def _baked(a: Any) -> bool:
    """Inputs bound into a segment's variant instead of passed: modules and Python constants (both are part
    of the segment's guard key already, so a variant only ever sees one value)."""
    return isinstance(a, nn.Module) or a is None or type(a) in (bool, int, float, str)


def _direct_call(variant: Variant, values: tuple, n_out: int, fixed: tuple[int, ...]) -> Any:
    """The leanest call of a variant: its executable's code with the bound parameters appended.

    `fixed` are the positions of baked inputs (modules, constants), dropped from the call.
    """
    cap = variant.captured
    flat_in = all(not isinstance(a, (list, tuple, dict)) for a in values)
    flat_out = cap.out_spec == pytree.tree_structure(tuple(range(n_out)))
    if flat_in and flat_out and variant.cuda_graph is None:
        ex, bound = variant.executable.forward, tuple(variant.bound)
        if not fixed:
            def call(*a: Any) -> Any:
                return ex(*a, *bound)
            return call
        keep = [i for i in range(len(values) + len(fixed)) if i not in fixed]
        if len(keep) == 1:
            k = keep[0]

            def call_one(*a: Any) -> Any:
                return ex(a[k], *bound)
            return call_one
        pick = operator.itemgetter(*keep)

        def call_picking(*a: Any) -> Any:
            return ex(*pick(a), *bound)
        return call_picking

    def call_general(*a: Any) -> Any:
        kept = tuple(x for i, x in enumerate(a) if i not in fixed)
        return tuple(variant.run(flatten_inputs(kept, {})[0]))
    return call_general


class Program:
    """One function rewritten by DyCL: the generated host program, its segments and sub-programs."""

    def __init__(self, owner: Any, fn: Any, name: str, options: Any, cache: dict, callees: DynamicCallees,
                 static_names: set[str] | None = None, method: bool = True):
        cache[(id(owner), fn)] = self  # before the callees: recursion finds this program
        self.name = name
        self.rw: Rewritten = rewrite(fn, owner, callees, static_names, method)
        rw = self.rw
        self.segments = [Segment(s, owner if method else None, f"{name}.seg{s.index}", options)
                         for s in rw.segments]
        self.subprograms: dict[str, Program] = {}
        for pname, obj in rw.callees.items():
            sub_owner, sub_fn = (obj, type(obj).forward) if isinstance(obj, nn.Module) else (obj.__self__,
                                                                                             obj.__func__)
            prog = cache.get((id(sub_owner), sub_fn))
            if prog is None:
                prog = Program(sub_owner, sub_fn, f"{type(sub_owner).__name__}.{sub_fn.__name__}", options, cache,
                               callees)
            self.subprograms[pname] = prog
        self.host_source = unparse(rw.host)
        seg_defs = [segment_function(rw, s, rw.selfname) for s in rw.segments]
        for seg, fdef in zip(self.segments, seg_defs):
            seg.source = unparse(fdef)
        free = list(fn.__code__.co_freevars)
        cells = [c.cell_contents for c in (fn.__closure__ or ())]
        seg_fns = _make_functions(seg_defs, fn.__globals__, free, cells, {})
        for seg, f in zip(self.segments, seg_fns):
            seg.eager_call = f if not method else types.MethodType(f, owner)
        host = _make_functions([rw.host], fn.__globals__, free, cells,
                               {f"_seg{s.spec.index}": s for s in self.segments} | self.subprograms)[0]
        self.call = types.MethodType(host, owner) if method else host
        for note in rw.eager:
            warnings.warn(f"fxcc DyCL: {note}", stacklevel=2)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def all_programs(self, seen: set[int] | None = None) -> list[Program]:
        seen = set() if seen is None else seen
        if id(self) in seen:
            return []
        seen.add(id(self))
        return [self] + [p for sub in self.subprograms.values() for p in sub.all_programs(seen)]


def _make_functions(defs: list[ast.FunctionDef], globals_: dict, free: list[str], cells: list[Any],
                    names: dict[str, Any]) -> list[Any]:
    """Define the generated functions in the user's globals (so `global` works), closing over segments."""
    params = list(names) + free
    maker = ast.FunctionDef("_dycl_make", ast.arguments([], [ast.arg(p) for p in params], None, [], [], None, []),
                            [*defs, ast.Return(ast.Tuple([ast.Name(d.name, ast.Load()) for d in defs], ast.Load()))],
                            [], None, lineno=1)
    if "type_params" in ast.FunctionDef._fields:
        maker.type_params = []
    text = ast.unparse(ast.Module([maker], []))
    filename = f"<fxcc-dycl-{hashlib.sha1(text.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)  # tracebacks show the lines
    scope: dict[str, Any] = {}
    exec(compile(text, filename, "exec"), globals_, scope)  # noqa: S102 - our own generated code
    return list(scope["_dycl_make"](*names.values(), *cells))


@dataclass
class DyclVariant(Variant):
    """A compiled signature of a dynamic module: calls run the generated host program."""

    program: Program | None = None
    in_spec: Any = None
    flat_args: bool = False
    reason: str = ""
    host_cache_key: str | None = None
    eager_notes: list[str] = field(default_factory=list)

    def run(self, flat: list[Any]) -> Any:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._call(flat)
        return self._call(flat)

    def _call(self, flat: list[Any]) -> Any:
        if self.flat_args:
            return self.program.call(*flat)
        args, kwargs = pytree.tree_unflatten(flat, self.in_spec)
        return self.program.call(*args, **kwargs)

    def report(self, name: str, *, ir_after_each: bool = False) -> str:
        """What `fxcc explain` prints: the host program(s), then every segment's source, IR and placement."""
        out = [f"== {name}: DyCL host program + compiled segments (capture failed: {self.reason})",
               f"compile time {self.compile_seconds:.2f} s (segments compile at their first call)"]
        if self.host_cache_key:
            out.append(f"host program stored in the artifact cache: {self.host_cache_key}")
        for prog in self.program.all_programs():
            src = prog.rw.source
            out.append(f"\n== host program for {prog.name} (generated from {src.filename}:{src.first_line})")
            out.append(prog.host_source.rstrip())
            for seg in prog.segments:
                out.append(f"\n== segment {seg.name} ({seg.spec.where}): inputs ({', '.join(seg.spec.inputs)}) "
                           f"-> outputs ({', '.join(seg.spec.outputs)})")
                out.append(seg.source.rstrip())
                if not seg.runs:
                    out.append("  (not called yet: compiled at its first call)")
                for run in seg.runs.values():
                    if run.variant is None:
                        out.append(f"  [{run.signature}] eager: {run.eager}")
                        continue
                    kernels = sum(1 for n in run.variant.gm.graph.nodes if n.op == "call_function"
                                  and str(n.target).startswith("fxcc_kernel"))
                    timing = f"; {run.timing}" if run.timing else ""
                    if run.eager:
                        out.append(f"  [{run.signature}] compiled, but runs as {run.eager}")
                    else:
                        out.append(f"  [{run.signature}] compiled: {kernels} kernel calls{timing}")
                    text = explain_variant(seg.name, run.variant, ir_after_each=ir_after_each)
                    out.append("    " + text.replace("\n", "\n    "))
        notes = [n for p in self.program.all_programs() for n in p.rw.eager]
        out.append("\n== statements that run eagerly" + ("" if notes else ": none"))
        out += [f"  {n}" for n in notes]
        return "\n".join(out)


def _static_names(fn: Any, method: bool, args: tuple, kwargs: dict) -> set[str]:
    """Parameters bound to plain Python values in this call: conditions on them are decided at capture."""
    import inspect

    try:
        bound = inspect.signature(fn).bind(*((None,) if method else ()), *args, **kwargs)
    except (TypeError, ValueError):
        return set()
    return {k for k, v in bound.arguments.items()
            if isinstance(v, (bool, int, float, str, type(None))) and not (method and k == next(iter(bound.arguments)))}


def compile_dynamic(cm: Any, args: tuple, kwargs: dict, error: CaptureError) -> DyclVariant:
    """Build a DyCL variant for `cm`'s module after capture failed with `error`; re-raise it when DyCL
    finds no tensor-dependent control flow to split at, or cannot read the source."""
    if not getattr(cm.options, "dycl", True):
        raise error
    t0 = time.perf_counter()
    module = cm.module
    inner = getattr(module, "fn", None)
    method = not (type(module).__name__ == "FunctionModule" and inner is not None)
    owner, fn = (module, type(module).forward) if method else (None, inner)
    reason = str(error).splitlines()[0]
    programs = cm.__dict__.setdefault("_dycl_programs", {})
    if cm._params and not cm._params_unchanged():  # segments bind parameters: changed ones need new programs
        programs.clear()
    try:
        program = programs.get((id(owner), fn))
        if program is None:
            program = Program(owner, fn, cm.name if method else getattr(fn, "__qualname__", "fn"), cm.options,
                              programs, DynamicCallees(), _static_names(fn, method, args, kwargs), method)
    except RewriteError as e:
        programs.clear()
        raise CaptureError(f"{error}\n  DyCL could not rewrite it either: {e}") from error
    if not any(p.rw.splits for p in program.all_programs()):
        programs.clear()
        raise error
    cm._snapshot_params()
    flat, in_spec = flatten_inputs(args, kwargs)
    flat_args = not kwargs and len(flat) == len(args) and all(not isinstance(a, (list, tuple, dict)) for a in args)
    key = _store_host(cm.name, program)
    log.info("%s compiled with DyCL: %d host programs, %d segments", cm.name, len(program.all_programs()),
             sum(len(p.segments) for p in program.all_programs()))
    return DyclVariant(captured=None, gm=None, executable=None, records=[],
                       compile_seconds=time.perf_counter() - t0, name=cm.name, program=program, in_spec=in_spec,
                       flat_args=flat_args, reason=reason, host_cache_key=key)


def _store_host(name: str, program: Program) -> str | None:
    """Keep the generated host programs and segment sources with the artifacts (content-addressed)."""
    try:
        files = {}
        for i, prog in enumerate(program.all_programs()):
            files[f"host{i}.py"] = prog.host_source.encode()
            for seg in prog.segments:
                files[f"host{i}_seg{seg.spec.index}.py"] = seg.source.encode()
        digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()
        key = cache_key("dycl-host", source=digest)
        default_cache().put(key, files, {"kind": "dycl-host", "model": name})
        return key
    except Exception as e:  # noqa: BLE001 - storing the program is a convenience; the compile goes on
        log.warning("could not store the DyCL host program of %s in the artifact cache: %s", name, e)
        return None
