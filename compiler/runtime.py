"""CompiledModule: the callable `fxcc.compile` returns.

Guards on the call's structure, tensor shapes/dtypes/devices, the module's training flag and the caller's
autocast and default dtype select a compiled variant or compile a new one; past `max_variants` new
signatures run eagerly with a warning. The model's state the variants depend on (fxcc.guards: its tensors
by identity and layout, primitive attributes, the contents of weights folded into constants) is checked on
every call; a change drops the variants and compiles again.

A variant's executable is an fx graph whose parameters are bound once, when it is built, and whose
kernels are direct calls. On CUDA, where every value lives on the GPU, the executable is captured
in a CUDA graph at its first run and replayed afterwards (shapes are static per variant): inputs are
copied into the graph's buffers and outputs cloned out, so results never alias the next call's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from fxcc.autotune import pools
from fxcc.autotune.plan import check_call_plan
from fxcc.codegen.executable import BuiltKernel, build_executable
from torch.utils import _pytree as pytree

from . import eager_check, graph_cache, ir
from .capture import (
    Captured,
    CaptureError,
    capture,
    check_call,
    describe,
    flatten_inputs,
    register_model_pytrees,
)
from .dialects import KERNEL_OPS, dialect_of, op_name
from .guards import ModuleState, call_context, graph_sources, mark_code_constants
from .measure import capture_graph
from .options import CompileOptions
from .pipeline import DEFAULT_PIPELINE, PassContext, PassManager, PassRecord, parse_pipeline
from .quality import fit_quality_budget
from .store import default_cache

log = logging.getLogger(__name__)


class CudaGraph:
    """A variant's executable captured as one CUDA graph for its static shapes.

    Tensor inputs are copied into buffers the graph reads; outputs are cloned out of the graph's memory,
    so a result stays valid after the next call. Built by `capture`, which returns None (and logs why)
    when capturing fails; the variant then runs its executable as before.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, static: list[Any], outs: Any):
        self.graph = graph
        self.static = static
        self.tensor_inputs = [i for i, x in enumerate(static) if isinstance(x, torch.Tensor)]
        self.outs = outs

    @staticmethod
    def capture(fn: Callable[..., Any], flat: list[Any], name: str) -> CudaGraph | None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                static = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
                          if isinstance(x, torch.Tensor) else x for x in flat]
                graph, outs = capture_graph(lambda: fn(*static))
        except Exception as e:  # an op that cannot be captured (a host sync, a CPU tensor): run uncaptured
            log.warning("%s runs without a CUDA graph: capture failed (%s: %s)", name, type(e).__name__, e)
            return None
        return CudaGraph(graph, static, outs)

    def __call__(self, flat: list[Any]) -> Any:
        static = self.static
        for i in self.tensor_inputs:
            static[i].copy_(flat[i])
        self.graph.replay()
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in self.outs]


@dataclass
class Variant:
    """One compiled signature: the IR after all passes, the executable built from it, and the pass log.

    `bound` holds the parameters and constants the executable takes after the call's inputs; `kernels` what
    was built for the kernel ops' choices, by kernel key (the variant's own: no other variant shares it).
    `cuda_graph` is "pending" until the first run decides (capture on CUDA), then a CudaGraph or None.
    """

    captured: Captured
    gm: fx.GraphModule
    executable: fx.GraphModule
    records: list[PassRecord]
    compile_seconds: float
    bound: list[torch.Tensor] = field(default_factory=list)
    cuda_graph: Any = None
    name: str = "model"
    quality_loss: float | None = None  # measured loss of approximate passes under a quality budget
    kernels: dict[str, BuiltKernel] = field(default_factory=dict)

    def run(self, flat: list[Any]) -> Any:
        if self.cuda_graph is not None:
            if self.cuda_graph == "pending":
                self.cuda_graph = CudaGraph.capture(self._call, flat, self.name)
            if self.cuda_graph is not None:
                return pytree.tree_unflatten(self.cuda_graph(flat), self.captured.out_spec)
        with torch.no_grad():
            outs = self._call(*flat)
        return pytree.tree_unflatten(list(outs), self.captured.out_spec)

    def _call(self, *flat: Any) -> Any:
        return self.executable(*flat, *self.bound)


@dataclass
class _Eager:
    """A signature past `max_variants`: calls go to the original module."""

    reason: str


@dataclass
class CompileStats:
    compiles: int = 0
    eager_calls: int = 0
    param_recompiles: int = 0
    history: list[str] = field(default_factory=list)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device, x.layout)
    try:
        hash(x)
        return ("const", type(x), x)
    except TypeError:
        return ("object", type(x), id(x))


def _fast_key(args: tuple, training: bool) -> tuple | None:
    """The guard key of a call whose arguments are all plain tensors (None for any other call)."""
    if not all(type(a) is torch.Tensor for a in args):
        return None
    return (training, call_context(), *[(a.shape, a.dtype, a.device, a.layout) for a in args])


class CompiledModule:
    """Callable with the original calling convention, backed by compiled variants chosen by guards."""

    def __init__(self, module: nn.Module, options: CompileOptions, eager_call: Callable | None = None):
        self.module = module
        self.options = options
        self.name = describe(module)
        self._eager_call = eager_call or module
        self._variants: dict[Any, Variant | _Eager] = {}
        self._fast: dict[tuple, Variant] = {}  # _fast_key -> variant, for calls with plain tensor arguments
        self._params: ModuleState | None = None  # the model's state the variants depend on (fxcc.guards)
        self._sources: dict[int, torch.Tensor] | None = {}  # tensors folded into the variants' constants (None: all)
        self.stats = CompileStats()
        self.capturing = False  # True while capture traces the module (a compiled class calls its original)
        self.echo_ir = True  # print_ir_after prints to stdout; fxcc.explain only records the IR for its report
        # errors surface at compile(); only None means the default ("" is an empty, malformed pipeline)
        self._passes = parse_pipeline(DEFAULT_PIPELINE if options.passes is None else options.passes)
        try:
            self.__signature__ = inspect.signature(getattr(module, "fn", module.forward))
        except (TypeError, ValueError):
            pass

    # ------------------------------------------------- behaving like the module it compiles

    def __getattr__(self, name: str) -> Any:
        """Attributes come from the original module; its methods that return it return this instead."""
        module = self.__dict__.get("module")
        if module is None or name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(module, name)
        if inspect.ismethod(attr) and attr.__self__ is module:
            @functools.wraps(attr)
            def method(*args, **kwargs):
                out = attr(*args, **kwargs)
                return self if out is module else out
            return method
        return attr

    def __repr__(self) -> str:
        return f"fxcc.CompiledModule({self.module!r})"

    # --------------------------------------------------------------------------------- calling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # fast path: all arguments plain tensors, positional, with a compiled variant: no pytree flatten
        fast = None if kwargs else _fast_key(args, self.module.training)
        variant = self._fast.get(fast) if fast is not None else None
        if variant is not None and (not self._params or self._params_unchanged()):
            return variant.run(list(args))
        flat, key = self._guard(args, kwargs)
        why = self._params.changed() if self._params else None
        if why is not None:
            self.stats.param_recompiles += 1
            log.info("%s changed since compile (%s); recompiling", self.name, why)
            self._variants = {k: v for k, v in self._variants.items() if isinstance(v, _Eager)}
            self._fast = {}
            self._sources = {}
        variant = self._variants.get(key)
        if variant is None:
            if eager_check.in_reference_run():  # eager's side of an enclosing model's check: compile nothing
                return self._eager_call(*args, **kwargs)
            variant = self._new_variant(args, kwargs, key)
            checked = self._check_first_call(variant, args, kwargs, key)
            if checked is not None:
                if fast is not None and checked.reason is None:
                    self._fast[fast] = variant
                return checked.result
        if isinstance(variant, _Eager):
            self.stats.eager_calls += 1
            return self._eager_call(*args, **kwargs)
        if fast is not None:
            self._fast[fast] = variant
        return variant.run(flat)

    def _check_first_call(self, variant: Variant | _Eager, args: tuple, kwargs: dict,
                          key: Any) -> eager_check.Checked | None:
        """The first call of a new variant, compared with eager (fxcc.eager_check); a signature whose
        compiled result differs runs eagerly from now on, with a warning. None when not checked."""
        if isinstance(variant, _Eager) or not CompileOptions.from_env(self.options).check_eager:
            return None
        why_not = eager_check.applies(variant.gm, all(p.exact for p in self._passes))
        if why_not is not None:
            log.debug("%s: first call not checked against eager (%s)", self.name, why_not)
            return None
        checked = eager_check.first_call(variant.run, self._eager_call, lambda a, k: flatten_inputs(a, k)[0],
                                         args, kwargs, self.name)
        if checked is not None and checked.reason is not None:
            warnings.warn(f"fxcc: {self.name}: {checked.reason}; this input signature runs eagerly. `fxcc explain` "
                          "shows the IR and where each op runs; CompileOptions(check_eager=False) skips the check.",
                          stacklevel=3)
            self._variants[key] = _Eager(checked.reason)
        return checked

    def _guard(self, args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
        flat, spec = flatten_inputs(args, kwargs)
        return flat, (spec, tuple(_leaf_key(x) for x in flat), self.module.training, call_context())

    def warm(self, *args: Any, **kwargs: Any) -> None:
        """Compile for these inputs now (as the first call would), without running the model."""
        _, key = self._guard(args, kwargs)
        if key not in self._variants:
            self._new_variant(args, kwargs, key)

    def _params_unchanged(self) -> bool:
        return self._params.changed() is None

    def _snapshot_params(self, sources: list[torch.Tensor] | None = None, addresses: bool = False) -> None:
        """Record the model's state the variants depend on; `sources`: the tensors this variant's constants
        were computed from (None: unknown, so all), added to those of the variants compiled before."""
        if sources is None or self._sources is None:
            self._sources = None
        else:
            self._sources.update((id(t), t) for t in sources)
        addresses = addresses or any(v.cuda_graph is not None for v in self.variants)
        self._params = ModuleState(self.module, None if self._sources is None else list(self._sources.values()),
                                   addresses)

    # ------------------------------------------------------------------------------- compiling

    def _new_variant(self, args: tuple, kwargs: dict, key: Any) -> Variant | _Eager:
        compiled = [v for v in self._variants.values() if isinstance(v, Variant)]
        if len(compiled) >= self.options.max_variants:
            reason = (f"{self.name} already has {len(compiled)} compiled variants (max_variants="
                      f"{self.options.max_variants}); this input signature runs eagerly")
            warnings.warn(f"fxcc: {reason}. Use fixed input shapes or raise CompileOptions.max_variants.",
                          stacklevel=3)
            self._variants[key] = _Eager(reason)
            return self._variants[key]
        if call_context()[0]:  # export does not trace the caller's autocast: compiled code would skip its casts
            reason = f"{self.name} is called under torch.autocast, which fxcc does not compile; it runs eagerly there"
            warnings.warn(f"fxcc: {reason}. Compile the model in the dtype you want (model.to(torch.bfloat16)) to "
                          "run it compiled.", stacklevel=3)
            self._variants[key] = _Eager(reason)
            return self._variants[key]
        check_call(self.module, args, kwargs)
        variant = self.compile_for(args, kwargs)
        self._variants[key] = variant
        self.stats.compiles += 1
        self.stats.history.append(", ".join(ir.type_str(x) for x in flatten_inputs(args, kwargs)[0]))
        return variant

    def compile_for(self, args: tuple, kwargs: dict) -> Variant:
        """Capture and compile for these example inputs (does not register the variant)."""
        t0 = time.perf_counter()
        opts = CompileOptions.from_env(self.options)
        ctx = PassContext(options=opts, module=self.module, example_inputs=(args, kwargs),
                          target=resolve_target(opts.target, self.module, args, kwargs))
        if opts.plan is not None:  # the plan must fit this model, target and libraries (PlanError if not)
            check_call_plan(opts, self.module, args, kwargs, ctx.target)

        def manager(passes: list) -> PassManager:
            return PassManager(passes, verify_each=opts.verify_each, print_ir_after=set(opts.print_ir_after),
                               echo=self.echo_ir and bool(opts.print_ir_after))

        if opts.dycl:  # Python effects (attribute stores...) a traced graph would apply once: a DyCL host program
            from fxcc import dycl

            effect = dycl.python_effect(self.module)
            if effect is not None:
                return dycl.compile_dynamic(self, args, kwargs, None, effect)
        # the IR before codegen comes from the graph cache when an earlier compile stored it
        front, back = split_at_codegen(self._passes)
        loss = None  # quality loss of approximate passes, measured under a quality budget
        cache, key = self._graph_cache_key(front, args, kwargs, ctx.target, opts)
        hit = graph_cache.load(cache, key, self.module) if key else None
        if hit is not None:
            cap = Captured(hit.gm, hit.in_spec, hit.out_spec, f"{hit.method} (IR from the graph cache)")
            gm, records = hit.gm, hit.records
        else:
            self.capturing = True
            try:
                cap = capture(self.module, args, kwargs)
            except CaptureError as e:  # tensor-dependent control flow: a DyCL host program + compiled segments
                from fxcc import dycl

                return dycl.compile_dynamic(self, args, kwargs, e)
            finally:
                self.capturing = False
            mark_code_constants(cap.gm, self.module)
            if opts.verify_each:
                ir.verify(cap.gm, who="after capture")
            if opts.quality_budget is not None and any(not p.exact for p in front):
                front, loss = fit_quality_budget(front, cap.gm, flatten_inputs(args, kwargs)[0], ctx,
                                                 opts.quality_budget, self.name)
            pm = manager(front)
            gm, records = pm.run(cap.gm, ctx), pm.records
            if key:
                graph_cache.store(cache, key, gm, self.module, cap.in_spec, cap.out_spec, cap.method, records)
        pm = manager(back)
        gm = pm.run(gm, ctx)
        pm.records[:0] = records
        if ctx.target == "cpu":  # kernels chosen alone, checked together: one thread pool if that is faster
            pools.settle(gm, flatten_inputs(args, kwargs)[0], self.name, ctx.kernels)
        executable, bound, kernels = build_executable(gm, ctx.kernels)
        seconds = time.perf_counter() - t0
        log.info("compiled %s in %.2f s (%s)", self.name, seconds, cap.method)
        graphs = opts.cuda_graphs and ctx.target == "cuda" and graphable(gm)
        self._snapshot_params(graph_sources(gm, self.module), addresses=graphs)
        return Variant(cap, gm, executable, pm.records, seconds, bound, "pending" if graphs else None, self.name,
                       quality_loss=loss, kernels=kernels)

    def _graph_cache_key(self, front: list, args: tuple, kwargs: dict, target: str,
                         opts: CompileOptions) -> tuple[Any, str | None]:
        """The artifact cache and this compile's graph key; no key when the graph cache does not apply."""
        if not opts.graph_cache or opts.verify_each or opts.print_ir_after or opts.quality_budget is not None:
            return None, None
        register_model_pytrees(self.module)
        flat, spec = flatten_inputs(args, kwargs)
        pipeline = ",".join(p.spec() for p in front)
        key = graph_cache.graph_key(self.module, flat, spec, pipeline, target,
                                    calibrates=any(not p.exact for p in front), context=repr(call_context()),
                                    machine=any(p.measures for p in front))
        return (default_cache(), key) if key else (None, None)

    # ------------------------------------------------------------------------------- reporting

    @property
    def eager_signatures(self) -> list[str]:
        """Why each input signature that runs eagerly does (past max_variants; a first call unlike eager)."""
        return [v.reason for v in self._variants.values() if isinstance(v, _Eager)]

    @property
    def variants(self) -> list[Variant]:
        return [v for v in self._variants.values() if isinstance(v, Variant)]

    def explain(self, *, ir_after_each: bool = False) -> str:
        """Capture method, what each pass did, the final IR and where every op runs."""
        if not self.variants:
            return f"{self.name}: not compiled yet (call it once, or use fxcc.explain with example inputs)"
        v = self.variants[-1]
        if hasattr(v, "report"):  # a DyCL variant (fxcc.dycl): host program and segments
            return v.report(self.name, ir_after_each=ir_after_each)
        return explain_variant(self.name, v, ir_after_each=ir_after_each)


def split_at_codegen(passes: list) -> tuple[list, list]:
    """The passes before the first `codegen` (their IR is what the graph cache keeps) and the rest."""
    i = next((i for i, p in enumerate(passes) if p.name == "codegen"), len(passes))
    return passes[:i], passes[i:]


def resolve_target(target: str, module: nn.Module, args: tuple, kwargs: dict) -> str:
    if target != "auto":
        return target
    tensors = [t for t in [*module.parameters(), *pytree.tree_leaves((args, kwargs))] if isinstance(t, torch.Tensor)]
    return "cuda" if any(t.is_cuda for t in tensors) else "cpu"


def graphable(gm: fx.GraphModule) -> bool:
    """Whether the final IR may run as a CUDA graph: every tensor on CUDA and no eager region.

    A CPU op inside a capture would run once, at capture, and never again: such graphs are not captured.
    """
    for node in gm.graph.nodes:
        if node.meta.get("fxcc_eager"):
            return False
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (list, tuple)) else [vals]:
            if isinstance(v, torch.Tensor) and v.device.type != "cuda":
                return False
    return True


def placement(gm: fx.GraphModule, kernels: dict[str, BuiltKernel]) -> list[tuple[str, str, str]]:
    """Where each compute op runs: (node, op, 'kernel.fused[kind] via backend' | 'eager: reason')."""
    rows = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or op_name(n.target) == "py.getitem":
            continue
        if n.op == "call_function" and n.target in KERNEL_OPS:
            k = kernels[n.args[1]]
            ops = Counter(op_name(b.target) for b in k.body.body.graph.nodes if b.op == "call_function")
            rows.append((n.name, f"{op_name(n.target)}[{k.kind}]",
                         f"{k.backend}: " + ", ".join(f"{k}" + (f" x{c}" if c > 1 else "") for k, c in ops.items())))
        elif n.meta.get("fxcc_eager"):
            name = op_name(n.target) if n.op == "call_function" else f"py.{n.op}:{n.target}"
            rows.append((n.name, name, f"eager: {n.meta['fxcc_eager']}"))
    return rows


def explain_variant(name: str, v: Variant, *, ir_after_each: bool = False) -> str:
    cap = v.captured
    out = [f"== {name}: captured with {cap.method}" + (f" (torch.export failed: {cap.export_error})"
                                                         if cap.export_error else "")]
    out.append(f"compile time {v.compile_seconds:.2f} s")
    if v.quality_loss is not None:
        out.append(f"quality loss {v.quality_loss:.5f} (1 - min cosine vs the exact pipeline, calibration inputs)")
    out.append("\n== passes")
    for r in v.records:
        stats = ", ".join(f"{k}={c}" for k, c in r.result.stats.items()) or ("changed" if r.result.changed else "no change")
        out.append(f"  {r.spec:<28} {r.seconds * 1e3:8.1f} ms  {stats}")
    if v.gm.meta.get("fxcc_mixed_precision") is not None:  # per-layer precisions (autotune/mixed_precision.py)
        out.append("\n== " + v.gm.meta["fxcc_mixed_precision"].text())
    if ir_after_each:
        for r in v.records:
            if r.ir_after:
                out.append(f"\n// -----// IR after {r.spec} //----- //\n{r.ir_after}")
    out.append("\n== final IR\n" + ir.print_graph(v.gm))
    rows = placement(v.gm, v.kernels)
    eager = [r for r in rows if r[2].startswith("eager")]
    dialects = Counter(dialect_of(n.target) for n in v.gm.graph.nodes if n.op == "call_function")
    out.append(f"\n== where ops run ({len(rows) - len(eager)} kernels, {len(eager)} eager regions; "
               f"ops by dialect: {dict(dialects)})")
    for node, op, where in rows:
        out.append(f"  %{node:<24} {op:<28} {where}")
    out.append("\n== kernel choices (ms per candidate, fastest fifth of the timed calls; * chosen)")
    for key, k in v.kernels.items():
        t = k.timings_ms
        cands = "  ".join(f"{'*' if b == k.backend else ''}{b} {ms:.3f}" for b, ms in t.items()) or "only candidate"
        src = " (from the artifact cache)" if k.cached else ""
        params = k.choice.params if k.choice else {}
        extra = f"  params {params}" if params else ""
        out.append(f"  {key} {k.kind:<10} -> {k.backend:<11} {cands}{extra}{src}")
        if k.note:
            out.append(f"      {k.note}")
    return "\n".join(out)
