"""mixed-precision: per-layer precision for every linear, searched under an error budget (approximate).

Runs after `raise` and before `fuse`, on `aten.linear` nodes whose weight is a constant of the graph.
1. Calibration: the graph runs on the compile's example inputs at its own precision (the reference); the
   input of every linear is kept.
2. Sensitivity: each linear alone at each candidate precision, the rest unchanged; the error of the
   graph's outputs against the reference (fxcc.quality.quality_loss: 1 - the smallest cosine over output rows).
3. Speed: each linear's candidate kernels (`fxcc.codegen.quant.impls`) timed on its real input;
   the fastest kernel of a precision is that precision's time.
4. Search: the fastest assignment whose predicted error (the sum of the layers' errors) is within the
   budget: Optuna (TPE) for `policy=auto`, greedy for a fixed policy; the winner is run and its measured
   error checked, layers go back to full precision (most sensitive first) while it exceeds the budget.
5. Lowering: weights are quantized once, here, into new graph constants (in the layout of the measured kernel);
   the linear becomes tx.int8_linear / tx.int4_linear / tx.fp8_linear (naming the kernel), or casts around a
   low-precision linear. int4 (W4A16) is asymmetric per group of 128 input channels (64 or 32 where 128 does not
   divide K; a layer whose K no group divides keeps its precision, the reason in the report's notes).
6. Folds (`epilogue=true`) where a Triton weight-only kernel (int8 or int4) runs: residual adds, and at decode
   (<= 16 rows) the SwiGLU of a merged gate/up linear and the RMSNorm feeding a linear, go into the GEMV's
   epilogue; the folded graph is run once more so the reported error is that of what runs.
`mixed_precision_report(compiled)` returns the per-layer table (precision, kernel, errors, times).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.autotune.plan import PlanError, load_plan
from fxcc.autotune.study import create_study, optuna_module, quiet
from fxcc.codegen import quant
from fxcc.measure import capture_graph, graph_timings, interleaved, time_once
from fxcc.passes.gemv import residual_add, swiglu
from fxcc.pipeline import Pass, PassContext, PassResult
from fxcc.quality import quality_loss

log = logging.getLogger(__name__)
aten = torch.ops.aten

POLICIES = ("auto", "bf16", "fp16", "int8-weight", "int8", "fp8", "int4")
KEEP = "keep"  # the graph's own precision
# what each policy may use besides KEEP ("int8-tensor": W8A8 with a per-tensor activation scale, CPU)
FAMILY = {"bf16": ["bf16"], "fp16": ["fp16"], "int8-weight": ["int8-weight"], "int8": ["int8", "int8-tensor"],
          "fp8": ["fp8"], "int4": ["int4"]}
CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LayerReport:
    """One linear: shape, chosen precision and kernel, its error alone, and times per precision (ms)."""

    node: str
    module: str
    shape: tuple[int, int, int]  # M, K, N
    precision: str = KEEP
    kernel: str = "library"
    error_alone: dict[str, float] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)
    kernel_of: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # precision -> why this layer cannot take it


@dataclass
class Report:
    """What the pass decided: per-layer rows, budget, predicted and measured error, predicted time."""

    policy: str
    budget: float
    layers: list[LayerReport]
    predicted_error: float = 0.0
    measured_error: float = 0.0
    predicted_ms: float = 0.0
    baseline_ms: float = 0.0
    search: str = ""

    def text(self) -> str:
        rows = [f"mixed-precision policy={self.policy} budget={self.budget:g} search={self.search}: "
                f"predicted error {self.predicted_error:.2e}, measured {self.measured_error:.2e}; "
                f"linears {self.baseline_ms:.2f} -> {self.predicted_ms:.2f} ms (predicted)",
                f"  {'layer':<44} {'M x K x N':<18} {'precision':<12} {'kernel':<9} {'error alone':>11} "
                f"{'ms':>8} {'ms keep':>8}  errors alone of the others; notes"]
        for r in self.layers:
            m, k, n = r.shape
            err = r.error_alone.get(r.precision, 0.0)
            others = [f"{p} {e:.1e}" for p, e in r.error_alone.items() if p not in (KEEP, r.precision)]
            notes = [f"no {p}: {why}" for p, why in r.notes.items()]
            rows.append(f"  {r.module or r.node:<44} {f'{m}x{k}x{n}':<18} {r.precision:<12} {r.kernel:<9} "
                        f"{err:>11.2e} {r.ms.get(r.precision, float('nan')):>8.3f} {r.ms.get(KEEP, 0):>8.3f}  "
                        f"{', '.join(others + notes)}".rstrip())
        return "\n".join(rows)


def mixed_precision_report(compiled: Any) -> Report | None:
    """The mixed-precision report of a compiled module's last variant (None when the pass did not run)."""
    return compiled.variants[-1].gm.meta.get("fxcc_mixed_precision")


@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Per-layer precision for linears within an error budget: casts or quantized linears (approximate).

    policy: the precision to use wherever the budget allows (auto: the search chooses per layer).
    budget: largest output error, 1 - min cosine over output rows vs the unchanged graph (default 0.01,
    or the compile's quality_budget). trials: Optuna trials (policy=auto). horizontal: quantized linears
    reading the same input with the same precision become one GEMM over their concatenated weights.
    epilogue: a residual add after a weight-only int8 / int4 linear moves into it (the Triton kernels add it in
    their epilogue), and at decode (<= 16 rows) silu(gate) * up of a merged gate/up linear becomes
    tx.int8_gated_linear / tx.int4_gated_linear and an RMSNorm feeding only such a linear moves into it (the
    Triton GEMVs compute both).
    """

    name = "mixed-precision"
    reads = "tx"
    writes = "tx"
    exact = False
    measures = True
    policy: str = "auto"
    budget: float | None = None
    trials: int = 200
    seed: int = 0
    reps: int = 10
    horizontal: bool = True
    epilogue: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"budget={self.budget} must be a positive error (e.g. 0.01: cosine >= 0.99)")

    def backoff(self, result: PassResult) -> Pass | None:
        b = self.budget if self.budget is not None else 0.01
        return replace(self, budget=b / 4) if b > 1e-5 else None

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        budget = self.budget if self.budget is not None else (getattr(ctx.options, "quality_budget", None) or 0.01)
        device = ctx.target
        linears = [n for n in gm.graph.nodes if _quantizable(gm, n)]
        if not linears:
            return PassResult(False, {})
        precs = _available(self.policy, device, _weight(gm, linears[0]).dtype)
        plan = getattr(ctx.options, "plan", None)
        if plan is not None:  # the plan's assignment: no timing, no quality runs
            layers, weights, choice = self._planned(gm, linears, precs, device, plan)
            return self._rewrite(gm, linears, layers, weights, choice, precs, budget, "plan", None)
        flat = [x for x in ir.flatten_inputs(*ctx.example_inputs)[0]] if ctx.example_inputs else []
        run = _Runner(gm, linears)
        t0 = time.perf_counter()
        ref, acts = run.reference(flat)
        layers = [LayerReport(n.name, _module_name(n), (acts[n].numel() // acts[n].shape[-1],
                                                         acts[n].shape[-1], _weight(gm, n).shape[0]))
                  for n in linears]
        weights = {}  # (node, precision) -> prepared weights (quantized once)
        timed: dict[tuple, tuple[float, str] | None] = {}  # layers of one shape share their timings
        for n, row in zip(linears, layers):
            for p in precs:
                weights[n, p] = _prepare(gm, n, p)
                if isinstance(weights[n, p], str):  # this layer cannot take p: the reason goes in the report
                    row.notes[p] = weights[n, p]
                    continue
                key = (row.shape, p, weights[n, p][2] is not None)
                if key not in timed:
                    timed[key] = self._time(n, p, acts[n], weights[n, p], device, row.ms.get(KEEP))
                if timed[key] is not None:
                    row.ms[p], row.kernel_of[p] = timed[key]
        for n, row in zip(linears, layers):
            row.error_alone[KEEP] = 0.0
            for p in precs[1:]:
                # policy=auto chooses by speed: a precision slower than the layer's own is never taken
                if p in row.ms and (self.policy != "auto" or row.ms[p] < row.ms[KEEP]):
                    row.error_alone[p] = quality_loss(ref, run.outputs(flat, {n: (p, row.kernel_of[p], weights[n, p])}))
        log.info("mixed-precision analysed %d linears x %d precisions in %.1f s", len(linears), len(precs),
                 time.perf_counter() - t0)
        choice, how = self._search(layers, precs, budget)
        # measure the winner; give layers back to full precision, most sensitive first, while over budget
        while True:
            assign = {n: (p, row.kernel_of[p], weights[n, p]) for n, row in zip(linears, layers)
                      if (p := choice[row.node]) != KEEP}
            measured = quality_loss(ref, run.outputs(flat, assign)) if assign else 0.0
            if measured <= budget or not assign:
                break
            worst = max((r for r in layers if choice[r.node] != KEEP), key=lambda r: r.error_alone[choice[r.node]])
            log.info("mixed-precision error %.2e > budget %.2e: %s back to %s", measured, budget, worst.node, KEEP)
            choice[worst.node] = KEEP
            how += "+backoff"
        return self._rewrite(gm, linears, layers, weights, choice, precs, budget, how, (ref, flat, measured))

    def _rewrite(self, gm: fx.GraphModule, linears: list[fx.Node], layers: list[LayerReport], weights: dict,
                 choice: dict[str, str], precs: list[str], budget: float, how: str,
                 measured: tuple | None) -> PassResult:
        """Lower each linear to its chosen precision (merging and folding as the options say) and report.
        `measured`: (reference outputs, inputs, measured error) of the search; None under a plan, which
        runs nothing."""
        groups: dict[tuple, list[fx.Node]] = {}  # quantized linears of one input, precision and bias-ness
        for n, row in zip(linears, layers):
            row.precision = choice[row.node]
            row.kernel = row.kernel_of.get(row.precision, "library")
            if row.precision in ACT or row.precision in ("fp8", "int4"):
                key = (n.args[0], row.precision, weights[n, row.precision][2] is not None)
                groups.setdefault(key if self.horizontal else (n,), []).append(n)
            elif row.precision != KEEP:
                _lower(gm, n, row.precision, row.kernel, weights[n, row.precision])
        merged = 0
        for ns in groups.values():
            p, k = choice[ns[0].name], layers[linears.index(ns[0])].kernel
            # int4: torch's CPU kernel takes only some shapes (N a multiple of 16): merged only where every
            # member measured the same kernel, so the merged weight is one that kernel was seen to take
            apart = p == "int4" and any(layers[linears.index(n)].kernel != k for n in ns)
            if len(ns) == 1 or apart:
                for n in ns:
                    _lower(gm, n, p, layers[linears.index(n)].kernel, weights[n, p])
            else:  # one GEMM over the concatenated weights (q/k/v, gate/up): fewer launches, more programs
                _lower_group(gm, ns, p, k, [weights[n, p] for n in ns])  # the first one's kernel for all
                for n in ns[1:]:
                    layers[linears.index(n)].kernel = k
                merged += len(ns)
        folded = _fold_residuals(gm) if self.epilogue else 0
        gated = _fold_gated(gm) if self.epilogue else 0
        normed = _fold_norms(gm) if self.epilogue else 0
        for n in gm.graph.nodes:
            n.meta.pop(SOURCE, None)
        stats_extra = {k: v for k, v in (("residual", folded), ("gated", gated), ("norm", normed)) if v}
        error = measured[2] if measured is not None else float("nan")
        if stats_extra and measured is not None and measured[1]:
            # the folded graph is what runs (the norm fold quantizes W * g afresh): measure it
            ref, flat = measured[0], measured[1]
            gm.recompile()
            error = quality_loss(ref, _Runner(gm, []).reference(flat)[0])
            how += "+folds"
            if error > budget:
                log.warning("mixed-precision: error %.2e after folding norms/gates/residuals into the int8 "
                            "kernels is over the budget %.2e; compile with mixed-precision{...,epilogue=false} to "
                            "keep them apart", error, budget)
        if self.policy == "int4" and all("int4" in r.notes for r in layers):
            log.warning("mixed-precision policy=int4: no linear can be int4 (%s); the model keeps its precision",
                        layers[0].notes["int4"])
        nan = float("nan")
        timed = measured is not None
        report = Report(self.policy, budget, layers,
                        sum(r.error_alone.get(r.precision, 0) for r in layers) if timed else nan, error,
                        sum(r.ms[r.precision] for r in layers) if timed else nan,
                        sum(r.ms[KEEP] for r in layers) if timed else nan, how)
        gm.meta["fxcc_mixed_precision"] = report
        log.info("%s", report.text())
        stats = {p: sum(r.precision == p for r in layers) for p in [KEEP, *precs] if any(r.precision == p for r in layers)}
        if merged:
            stats["merged"] = merged
        stats.update(stats_extra)
        return PassResult(any(r.precision != KEEP for r in layers), stats)

    def _planned(self, gm: fx.GraphModule, linears: list[fx.Node], precs: list[str], device: str,
                 path: str) -> tuple[list[LayerReport], dict, dict[str, str]]:
        """The plan's assignment (fxcc.autotune.plan): each linear's precision and kernel as recorded, and the
        weights they compute with. PlanError when the plan names a linear this graph lacks, lacks one it has,
        or names a precision or kernel that layer cannot take here."""
        wanted = load_plan(path).precision
        where = repr(path)
        again = "The model or pipeline changed since the search: run `fxcc search` again."
        nodes = {n.name: n for n in linears}
        if not wanted:
            raise PlanError(f"fxcc: plan {where} runs mixed-precision but records no per-linear assignment (a plan "
                            "written before plans recorded it); write it again with `fxcc search`")
        for name, entry in wanted.items():
            if name not in nodes:
                raise PlanError(f"fxcc: plan {where} assigns {entry['precision']} to linear {name!r} "
                                f"({entry.get('module') or 'no module path'}), which this graph does not have (its "
                                f"linears: {', '.join(nodes)[:300]}). {again}")
        layers, weights, choice = [], {}, {}
        for n in linears:
            module = _module_name(n) or "no module path"
            if n.name not in wanted:
                raise PlanError(f"fxcc: plan {where} assigns no precision to linear {n.name!r} ({module}) of this "
                                f"graph. {again}")
            p, k = wanted[n.name]["precision"], wanted[n.name]["kernel"]
            kernels = ["library"] if p in (KEEP, *CAST) else quant.impls(p, device)
            w = _prepare(gm, n, p) if p in precs else f"policy={self.policy} on {device} offers {', '.join(precs)}"
            if isinstance(w, str) or k not in kernels:
                why = w if isinstance(w, str) else f"its kernels here are {', '.join(kernels)}"
                raise PlanError(f"fxcc: plan {where} assigns {p} with kernel {k!r} to linear {n.name!r} ({module}), "
                                f"which it cannot take here: {why}. {again}")
            x, wt = n.args[0].meta.get("val"), _weight(gm, n)
            rows = math.prod(ir.hints(x.shape[:-1])) if isinstance(x, torch.Tensor) else 0
            row = LayerReport(n.name, _module_name(n), (rows, wt.shape[1], wt.shape[0]), kernel_of={p: k})
            weights[n, p], choice[n.name] = w, p
            layers.append(row)
        return layers, weights, choice

    def _time(self, n: fx.Node, p: str, x: torch.Tensor, w: tuple, device: str,
              keep_ms: float | None) -> tuple[float, str] | None:
        """(ms, kernel) of the fastest kernel of precision `p` on this layer's input; None if none works."""
        best = None
        for k in (["library"] if p in (KEEP, *CAST) else quant.impls(p, device)):
            fn = _linear_fn(p, k, w)
            try:
                # give up early on the CPU only: on CUDA a single call's host time says nothing of a graph replay
                give_up = None if keep_ms is None or device == "cuda" else 20 * keep_ms
                ms = _bench(lambda fn=fn: fn(x), device, self.reps, give_up=give_up)
            except Exception as e:  # a kernel that does not support this shape or device
                log.debug("mixed-precision: %s kernel %s failed on %s: %s", p, k, n.name, e)
                continue
            if best is None or ms < best[0]:
                best = (ms, k)
        return best

    def _search(self, layers: list[LayerReport], precs: list[str], budget: float) -> tuple[dict[str, str], str]:
        options = {r.node: [p for p in precs if p in r.ms and r.error_alone.get(p, budget + 1) <= budget]
                   for r in layers}
        if self.policy != "auto":
            # a fixed policy: its precision wherever the budget allows (the fastest of its family)
            for r in layers:
                fam = [p for p in options[r.node] if p != KEEP]
                options[r.node] = [KEEP] + ([min(fam, key=lambda p: r.ms[p])] if fam else [])
            return _greedy(layers, options, budget, prefer_low=True), "greedy"
        greedy = _greedy(layers, options, budget, prefer_low=False)
        try:
            optuna = optuna_module()
        except ImportError:
            log.warning("mixed-precision policy=auto searches with Optuna, which is not installed "
                        "(pip install optuna); using the greedy assignment")
            return greedy, "greedy"
        rows = {r.node: r for r in layers}
        base = sum(r.ms[KEEP] for r in layers)

        def cost(assign: dict[str, str]) -> float:
            err = sum(rows[k].error_alone.get(p, 0.0) for k, p in assign.items())
            ms = sum(rows[k].ms[p] for k, p in assign.items())
            return ms if err <= budget else base * (1 + err / budget)  # infeasible: worse than all-keep

        with quiet():
            study = create_study(sampler=optuna.samplers.TPESampler(seed=self.seed), persist=False)
            study.enqueue_trial(greedy)
            study.enqueue_trial({r.node: KEEP for r in layers})
            study.optimize(lambda t: cost({k: t.suggest_categorical(k, v) for k, v in options.items()}),
                           n_trials=self.trials)
        best = dict(study.best_params)
        return (best if cost(best) <= cost(greedy) else greedy), f"optuna({self.trials})"


def _greedy(layers: list[LayerReport], options: dict[str, list[str]], budget: float, *, prefer_low: bool) -> dict[str, str]:
    """Layers take their fastest allowed precision (a fixed policy: its own) by least error per ms saved
    until the predicted error would pass the budget."""
    moves = []
    for r in layers:
        cands = [p for p in options[r.node] if p != KEEP and (prefer_low or r.ms[p] < r.ms[KEEP])]
        if cands:
            p = min(cands, key=lambda q: r.ms[q])
            saved = max(r.ms[KEEP] - r.ms[p], 1e-9)
            moves.append((r.error_alone[p] / saved if not prefer_low else r.error_alone[p], r.node, p))
    choice = {r.node: KEEP for r in layers}
    spent = 0.0
    errs = {r.node: r.error_alone for r in layers}
    for _, node, p in sorted(moves):
        if spent + errs[node][p] <= budget:
            choice[node] = p
            spent += errs[node][p]
    return choice


# ------------------------------------------------------------------------------------------ helpers


def _available(policy: str, device: str, dtype: torch.dtype) -> list[str]:
    """Candidate precisions on this device: KEEP first."""
    fp8 = device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    fbgemm = device == "cpu" and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))
    ok = {"bf16": dtype == torch.float32, "fp16": dtype == torch.float32, "int8-weight": True,
          "int8": True, "int8-tensor": fbgemm, "fp8": fp8, "int4": True}
    if policy == "fp8" and not fp8:
        raise ValueError(f"mixed-precision policy=fp8 needs a GPU with fp8 tensor cores (compute capability 8.9+, "
                         f"e.g. H100); the target here is {device!r}. Use policy=int8 or policy=bf16.")
    if policy in ("bf16", "fp16") and dtype != torch.float32:
        raise ValueError(f"mixed-precision policy={policy}: the model's linears are already "
                         f"{str(dtype).replace('torch.', '')}; use policy=int8-weight, int8, int4 or fp8")
    wanted = [p for fam in FAMILY.values() for p in fam] if policy == "auto" else FAMILY[policy]
    return [KEEP] + [p for p in wanted if ok[p]]


def _weight(gm: fx.GraphModule, n: fx.Node) -> torch.Tensor:
    return ir.fetch_attr(gm, n.args[1].target)


def _float_params(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[torch.Tensor]:
    """The weights and biases of these linears: what their quantized or cast constants are computed from."""
    out = []
    for n in nodes:
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        out += [_weight(gm, n)] + ([ir.fetch_attr(gm, b.target)] if isinstance(b, fx.Node) and b.op == "get_attr" else [])
    return out


def _quantizable(gm: fx.GraphModule, n: fx.Node) -> bool:
    """An aten.linear whose weight (and bias) are constants of the graph: its weight can be quantized now."""
    if n.op != "call_function" or n.target is not aten.linear.default or len(n.args) < 2:
        return False
    w, b = n.args[1], (n.args[2] if len(n.args) > 2 else n.kwargs.get("bias"))
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, fx.Node)
                                                                                       and b.op == "get_attr")):
        return False
    t = ir.fetch_attr(gm, w.target)
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _bias(gm: fx.GraphModule, n: fx.Node) -> torch.Tensor | None:
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return None if b is None else ir.fetch_attr(gm, b.target)


def _module_name(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _prepare(gm: fx.GraphModule, n: fx.Node, p: str) -> tuple | str:
    """The weights precision `p` computes with, made once: (weight, scale or None, bias); int4: (packed weight in
    fxcc's layout, scale_zero in the weight's dtype, bias). A string: why this layer cannot take `p`."""
    w, b = _weight(gm, n).detach(), _bias(gm, n)
    if p == KEEP:
        return w, None, b
    if p in CAST:
        return w.to(CAST[p]), None, None if b is None else b.to(CAST[p])
    if p == "int4":
        q = quant.quantize_weight_int4(w, w.dtype)
        return q if isinstance(q, str) else (*q, None if b is None else b.detach())
    qw, ws = quant.quantize_weight(w, "fp8" if p == "fp8" else "int8")
    return qw, ws, None if b is None else b.detach()


ACT = {"int8-weight": "none", "int8": "token", "int8-tensor": "tensor"}
SOURCE = "fxcc_mp_source_weights"  # node meta while the pass runs: the float weights a quantized linear holds


def _linear_fn(p: str, kernel: str, w: tuple):
    """A callable x -> y computing the linear at precision `p` with `kernel` (what the lowered graph runs)."""
    wt, ws, b = w
    if p == KEEP:
        return lambda x: torch.nn.functional.linear(x, wt, b)
    if p in CAST:
        return lambda x: torch.nn.functional.linear(x.to(CAST[p]), wt, b).to(x.dtype)
    if p == "fp8":
        return lambda x: torch.ops.fxcc_tx.fp8_linear(x, wt, ws, b, kernel)
    if p == "int4":
        group = quant.int4_group_of(wt, ws)
        qk = quant.int4_weight(wt, group, kernel)
        return lambda x: torch.ops.fxcc_tx.int4_linear(x, qk, ws, b, group, kernel)
    return lambda x: torch.ops.fxcc_tx.int8_linear(x, wt, ws, b, ACT[p], kernel)


def _bench(fn, device: str, reps: int, give_up: float | None = None) -> float:
    """ms per call: on CUDA as `_bench_graph`; on the CPU the fastest single call (this machine is shared:
    the scheduler adds hiccups of whole time slices). A kernel whose second call takes over `give_up` ms is
    not timed further: it cannot win."""
    with torch.no_grad():
        fn()  # warm-up (also picks a Triton kernel's block sizes)
        first = time_once(fn, device)
        if give_up is not None and first > give_up:
            return first
        if device == "cuda":
            return _bench_graph(fn, reps)
        rest = interleaved({"kernel": fn}, device=device, warmup=0, reps=reps - 1, rounds=1)["kernel"].samples
    return min([first, *rest])


def _bench_graph(fn, reps: int) -> float:
    """ms per call on the GPU, `reps` calls captured in one CUDA graph (as the runtime replays a variant),
    so host-side launch costs, which the graph removes, do not decide between kernels."""
    def calls():
        for _ in range(reps):
            fn()
    try:
        graph, _ = capture_graph(calls, warmup=1)
        return min(graph_timings({"kernel": graph}, calls=reps, rounds=3)["kernel"].samples)
    except RuntimeError as e:  # a kernel that cannot be captured: time it launched from Python
        log.debug("mixed-precision: timing without a CUDA graph (%s)", e)
        return time_once(calls, "cuda") / reps


class _Runner(fx.Interpreter):
    """Runs the graph with some linears replaced by low-precision callables; records linear inputs."""

    def __init__(self, gm: fx.GraphModule, linears: list[fx.Node]):
        super().__init__(gm)
        self.linears = set(linears)
        self.swap: dict[fx.Node, Any] = {}
        self.record: dict[fx.Node, torch.Tensor] | None = None

    def run_node(self, n: fx.Node) -> Any:
        if n in self.linears and (n in self.swap or self.record is not None):
            x = self.env[n.args[0]]
            if self.record is not None:
                self.record[n] = x
            if n in self.swap:
                return self.swap[n](x)
        return super().run_node(n)

    def reference(self, flat: list) -> tuple[list, dict[fx.Node, torch.Tensor]]:
        self.record, self.swap = {}, {}
        try:
            with torch.no_grad():
                return list(self.run(*flat)), self.record
        finally:
            self.record = None

    def outputs(self, flat: list, assign: dict[fx.Node, tuple]) -> list:
        self.swap = {n: _linear_fn(p, k, w) for n, (p, k, w) in assign.items()}
        try:
            with torch.no_grad():
                return list(self.run(*flat))
        finally:
            self.swap = {}


def _lower(gm: fx.GraphModule, n: fx.Node, p: str, kernel: str, w: tuple) -> None:
    """Rewrite one linear: new constants for the prepared weights, then casts or a quantized linear."""
    wt, ws, b = w
    g = gm.graph
    sources = _float_params(gm, [n])

    def const(suffix: str, t: torch.Tensor) -> fx.Node:
        name = f"_mp_{n.name}_{suffix}"
        gm.register_buffer(name, ir.computed_from(t.contiguous(), *sources), persistent=False)
        return g.get_attr(name)

    x = n.args[0]
    meta = {"nn_module_stack": n.meta.get("nn_module_stack", {})}
    group = quant.int4_group_of(wt, ws) if p == "int4" else 0
    with g.inserting_before(n):
        wn = const("w", quant.int4_weight(wt, group, kernel) if p == "int4" else wt)
        sn = const("scale", ws) if ws is not None else None
        bn = const("b", b) if b is not None and p in CAST else (n.args[2] if len(n.args) > 2 else None)
        if p in CAST:
            xc = g.call_function(aten._to_copy.default, (x,), {"dtype": CAST[p]})
            y = g.call_function(aten.linear.default, (xc, wn, bn))
            new = g.call_function(aten._to_copy.default, (y,), {"dtype": n.meta["val"].dtype})
            for m in (xc, y):
                m.meta.update(meta)
        elif p == "fp8":
            new = g.call_function(torch.ops.fxcc_tx.fp8_linear.default, (x, wn, sn, bn, kernel))
        elif p == "int4":
            new = g.call_function(torch.ops.fxcc_tx.int4_linear.default, (x, wn, sn, bn, group, kernel))
        else:
            new = g.call_function(torch.ops.fxcc_tx.int8_linear.default, (x, wn, sn, bn, ACT[p], kernel))
    new.meta.update(meta)
    new.meta["val"] = n.meta.get("val")
    if p in ACT or p == "int4":
        new.meta[SOURCE] = [_weight(gm, n)]  # the float weight, for folds that re-quantize it (_fold_norms)
    n.replace_all_uses_with(new)
    g.erase_node(n)


def _lower_group(gm: fx.GraphModule, nodes: list[fx.Node], p: str, kernel: str, ws: list[tuple]) -> None:
    """Rewrite linears of one input as one quantized linear over their concatenated weights, then a
    slice of its output per linear (numerically the same: each output channel has its own scale, and the
    activation scales depend on the shared input only)."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(nodes, key=order.__getitem__)
    wt = torch.cat([w[0] for w in ws])
    sc = torch.cat([w[1] for w in ws], dim=1 if p == "int4" else 0)  # int4: scale_zero [K / group, N, 2]
    group = quant.int4_group_of(wt, sc) if p == "int4" else 0
    if p == "int4":
        wt = quant.int4_weight(wt, group, kernel)
    b = torch.cat([w[2] for w in ws]) if ws[0][2] is not None else None

    sources = _float_params(gm, nodes)

    def const(suffix: str, t: torch.Tensor) -> fx.Node:
        name = f"_mp_{first.name}_merged_{suffix}"
        gm.register_buffer(name, ir.computed_from(t.contiguous(), *sources), persistent=False)
        return g.get_attr(name)

    with g.inserting_before(first):
        wn, sn = const("w", wt), const("scale", sc)
        bn = const("b", b) if b is not None else None
        x = first.args[0]
        if p == "fp8":
            op = g.call_function(torch.ops.fxcc_tx.fp8_linear.default, (x, wn, sn, bn, kernel))
        elif p == "int4":
            op = g.call_function(torch.ops.fxcc_tx.int4_linear.default, (x, wn, sn, bn, group, kernel))
        else:
            op = g.call_function(torch.ops.fxcc_tx.int8_linear.default, (x, wn, sn, bn, ACT[p], kernel))
        op.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        if p in ACT or p == "int4":
            op.meta[SOURCE] = [_weight(gm, n) for n in nodes]
        start = 0
        for n, w in zip(nodes, ws):
            size = w[1].shape[1] if p == "int4" else w[0].shape[0]
            sl = g.call_function(aten.slice.Tensor, (op, -1, start, start + size))
            sl.meta["nn_module_stack"] = n.meta.get("nn_module_stack", {})
            start += size
            n.replace_all_uses_with(sl)
    for n in nodes:
        g.erase_node(n)


_GATED = {torch.ops.fxcc_tx.int8_linear.default: torch.ops.fxcc_tx.int8_gated_linear.default,
          torch.ops.fxcc_tx.int4_linear.default: torch.ops.fxcc_tx.int4_gated_linear.default}


def _triton_weight_only(node: fx.Node, most: int = 6) -> bool:
    """A tx.int8_linear (weight-only) or tx.int4_linear run by the Triton kernel with at most `most` arguments (6:
    no fold in it yet; 7: perhaps a residual): its epilogue can take a residual, a gate or a norm."""
    if node.op != "call_function" or node.target not in _GATED or not 6 <= len(node.args) <= most or node.kwargs:
        return False
    return node.args[5] == "triton" and (node.target is torch.ops.fxcc_tx.int4_linear.default or node.args[4] == "none")


def _head(node: fx.Node) -> tuple:
    """The arguments of a quantized linear that its gated form takes before `impl`: int8 drops `act`."""
    return node.args[:5] if node.target is torch.ops.fxcc_tx.int4_linear.default else node.args[:4]


def _fold_residuals(gm: fx.GraphModule) -> int:
    """`add(int8_linear(..), r)` -> `int8_linear(.., residual=r)` (int4_linear too) where the kernel adds r in its
    epilogue (the Triton weight-only GEMMs) and shapes and dtypes agree; elsewhere the add stays free for `fuse`.
    Returns how many."""
    g = gm.graph
    folded = 0
    for node in list(g.nodes):
        found = residual_add(node) if _triton_weight_only(node) else None
        if found is None:
            continue
        add, other = found
        with g.inserting_before(add):
            new = g.call_function(node.target, (*node.args, other))
        new.meta.update(node.meta)
        add.replace_all_uses_with(new)
        g.erase_node(add)
        g.erase_node(node)
        folded += 1
    return folded


def _fold_gated(gm: fx.GraphModule) -> int:
    """`gated_act(slice(y, 0, F), slice(y, F, 2F), "silu")` of a merged gate/up `y = int8_linear(..)` (weight-only,
    Triton, at most 16 rows of x: decode) -> `tx.int8_gated_linear(..)` (int4 likewise), whose GEMV applies the
    gate in its epilogue: one kernel instead of two and no [M, 2F] intermediate. Returns how many were folded."""
    g = gm.graph
    folded = 0
    for node in list(g.nodes):
        if not _triton_weight_only(node):
            continue
        x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        rows = x.numel() // x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] else None
        found = swiglu(node, ir.fetch_attr(gm, node.args[1].target).shape[0]) if rows is not None and rows <= 16 \
            else None
        if found is None:
            continue
        gate, up, act = found
        with g.inserting_before(act):
            new = g.call_function(_GATED[node.target], (*_head(node), "triton"))
        new.meta.update(act.meta)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        if SOURCE in node.meta:
            new.meta[SOURCE] = node.meta[SOURCE]
        act.replace_all_uses_with(new)
        for dead in (act, gate, up, node):
            g.erase_node(dead)
        folded += 1
    return folded


def _fold_norms(gm: fx.GraphModule) -> int:
    """`int8_linear(rms_norm(h, g, eps), ..)` (and int8_gated_linear, and their int4 forms) -> `int8_linear(h, ..,
    rms_eps=eps)` where the Triton GEMV runs (weight-only, at most 16 rows: decode) and the norm's only user is this
    linear. The norm's weight g, a constant, multiplies the linear's input channels (W g, quantized again from the
    float weight), and the GEMV scales its accumulator by each row's 1 / rms, summed as it streams x: the norm's
    kernel goes, at no cost per weight element. Returns how many were folded."""
    g = gm.graph
    rms = torch.ops.fxcc_tx.rms_norm.default
    int4 = (torch.ops.fxcc_tx.int4_linear.default, torch.ops.fxcc_tx.int4_gated_linear.default)
    folded = 0
    for node in list(g.nodes):
        if node.op != "call_function" or SOURCE not in node.meta or node.kwargs:
            continue
        plain = node.target in _GATED
        is4 = node.target in int4
        if plain and not _triton_weight_only(node, most=7):
            continue
        if not plain and (node.target not in _GATED.values() or len(node.args) != (6 if is4 else 5)
                          or node.args[-1] != "triton"):
            continue
        norm = node.args[0]
        if not (isinstance(norm, fx.Node) and norm.target is rms and len(norm.users) == 1 and len(norm.args) == 3):
            continue
        h, weight, eps = norm.args
        x = h.meta.get("val") if isinstance(h, fx.Node) else None
        gamma = ir.fetch_attr(gm, weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        if not (isinstance(x, torch.Tensor) and isinstance(gamma, torch.Tensor) and x.dim()
                and gamma.shape == x.shape[-1:] and x.numel() // x.shape[-1] <= 16):
            continue
        with torch.no_grad():
            w = torch.cat([t.detach().float() for t in node.meta[SOURCE]]) * gamma.detach().float()
            if is4:  # same group and scale dtype as before (quantize_weight_int4 cannot fail on a K it took)
                old_sz = ir.fetch_attr(gm, node.args[2].target)
                qw, ws = quant.quantize_weight_int4(w.to(old_sz.dtype), old_sz.dtype, node.args[4])
            else:
                qw, ws = quant.quantize_weight(w, "int8")
        old_w, old_s = node.args[1], node.args[2]
        with g.inserting_before(node):
            consts = []
            for suffix, t in (("w", qw), ("scale", ws)):
                name = f"_mp_{node.name}_normed_{suffix}"
                gm.register_buffer(name, ir.computed_from(t.contiguous(), *node.meta[SOURCE], gamma), persistent=False)
                consts.append(g.get_attr(name))
            rest = node.args[3:6] if plain or is4 else node.args[3:5]
            args = (h, *consts, *rest, *((node.args[6] if len(node.args) > 6 else None,) if plain else ()), None,
                    float(eps))
            new = g.call_function(node.target, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        g.erase_node(norm)
        if not weight.users:
            g.erase_node(weight)
        for old in (old_w, old_s):  # the quantized weight without the norm's scale: drop it
            if isinstance(old, fx.Node) and not old.users:
                target = old.target
                g.erase_node(old)
                if not any(n.op == "get_attr" and n.target == target for n in g.nodes) and hasattr(gm, target):
                    delattr(gm, target)
        folded += 1
    return folded
