"""Offline plan search (`fxcc search`): one Optuna study over a model's pipeline knobs, then kernel tuning.

Each trial samples a pipeline from the knobs of the passes registered now (a knob of a pass that is not
registered is left out, with a note in the report), compiles the model with it, checks its outputs
against the uncompiled model (quality error = 1 - min cosine similarity per sample) and times it beside
the uncompiled model (warm-up, interleaved rounds, median). With approximate knobs the study has two
objectives (latency or throughput, and quality error); otherwise one. The chosen pipeline is the trial
fastest relative to the uncompiled model (robust to a machine whose speed drifts) within the quality budget; its kernels are then tuned with the per-kernel tuner (results go to the
artifact cache), and the plan is written, applied with `compile(plan=...)` and measured again, so the
plan's numbers are those of the plan as applied.

The study lives in an Optuna storage (default: tuning.db in the artifact cache directory); processes that
name the same storage and study cooperate, each running its own trial budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fxcc.autotune.plan import Plan, model_fingerprint, target_info
from torch.utils import _pytree as pytree

log = logging.getLogger("fxcc")

OBJECTIVES = ("latency", "throughput")
SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_QUALITY_BUDGET = 0.01  # 1 - cosine: used when approximate knobs are searched and no budget is given
EXACT_TOLERANCE = 1e-4  # an all-exact pipeline whose error exceeds this is wrong, not approximate


@dataclass(frozen=True)
class Knob:
    """Options of one pass that join the search when the pass is registered.

    choices: option -> values to try; an empty tuple takes the option's Literal values, True/False for a
    bool, or powers of two up to the device count for `tp`. With `alternatives`, only the first option the
    registered pass has is searched (layer-skip takes speedup= or skip=, not both). Every knob can also be
    "off" (the pass is left out). Where the pass goes follows its `reads`: aten -> before raise, else after.
    """

    pass_name: str
    choices: dict[str, tuple]
    alternatives: bool = False
    min_devices: int = 1
    fixed: dict = field(default_factory=dict)  # options set whenever the knob is on (when the pass has them)


KNOBS: list[Knob] = [
    Knob("layer-skip", {"speedup": (1.2, 1.5, 2.0), "skip": (1, 2, 3)}, alternatives=True),
    Knob("token-merge", {"r": (4, 8, 16, 32)}),
    # policy=auto chooses each layer's precision inside the pass; its own search is kept small per trial
    Knob("mixed-precision", {"budget": (0.001, 0.01, 0.05)}, fixed={"trials": 24}),
    Knob("tp-shard", {"tp": ()}, min_devices=2),
]

BACKEND_CHOICES = {"cpu": ("auto", "extern", "tvm"), "cuda": ("auto", "extern", "triton")}


# ---------------------------------------------------------------------------------------- the space


@dataclass
class Space:
    """The knobs searched in this process: present passes with their choices, codegen backends, and notes
    on what was left out (shown in the report and stored in the plan)."""

    knobs: list[tuple[str, bool, dict[str, list]]]  # (pass name, reads aten, option -> choices)
    backends: list[str]
    approximate: list[str]
    notes: list[str] = field(default_factory=list)
    fixed: dict[str, dict] = field(default_factory=dict)  # pass name -> options set whenever it is on

    def suggest(self, trial: Any) -> str:
        """The pipeline text of one trial (define-by-run: a knob's options exist only when it is on)."""
        before, after = [], []
        for name, at_aten, options in self.knobs:
            spec = self._suggest_knob(trial, name, options, self.fixed.get(name, {}))
            if spec:
                (before if at_aten else after).append(spec)
        backend = trial.suggest_categorical("codegen.backend", self.backends) if len(self.backends) > 1 \
            else self.backends[0]
        return pipeline_text(before, after, backend)

    @staticmethod
    def _suggest_knob(trial: Any, name: str, options: dict[str, list], fixed: dict) -> str | None:
        if len(options) == 1:  # one option: "off" is one more choice of it
            (opt, values), = options.items()
            v = trial.suggest_categorical(f"{name}.{opt}", ["off", *values])
            chosen = None if v == "off" else {opt: v}
        elif trial.suggest_categorical(name, ["off", "on"]) == "off":
            chosen = None
        else:
            chosen = {o: trial.suggest_categorical(f"{name}.{o}", vs) for o, vs in options.items()}
        return None if chosen is None else knob_spec(name, {**chosen, **fixed})

    def baseline(self) -> dict:
        """Optuna parameters of the exact default pipeline (every knob off, backend auto): the first trial."""
        params: dict[str, Any] = {}
        for name, _, options in self.knobs:
            params[f"{name}.{next(iter(options))}" if len(options) == 1 else name] = "off"
        if len(self.backends) > 1:
            params["codegen.backend"] = "auto" if "auto" in self.backends else self.backends[0]
        return params

    def describe(self) -> list[str]:
        rows = [f"{n}: " + ", ".join(f"{o} in {['off', *v] if len(opts) == 1 else v}" for o, v in opts.items())
                + ("" if len(opts) == 1 else " (or off)")
                + "".join(f", {o}={v}" for o, v in self.fixed.get(n, {}).items()) for n, _, opts in self.knobs]
        return rows + [f"codegen: backend in {self.backends}"]


def knob_spec(name: str, options: dict) -> str:
    return name + "{" + ",".join(f"{o}={v}" for o, v in options.items()) + "}"


def pipeline_text(before_raise: list[str], after_raise: list[str], backend: str) -> str:
    """The default pipeline with knob passes just before and just after `raise`, and the codegen backend set."""
    from fxcc.pipeline import DEFAULT_PIPELINE

    out = []
    for name in (p.strip() for p in DEFAULT_PIPELINE.split(",")):
        if name == "raise":
            out += [*before_raise, name, *after_raise]
        elif name == "codegen" and backend != "auto":
            out.append(f"codegen{{backend={backend}}}")
        else:
            out.append(name)
    return ",".join(out)


def build_space(target: str, backends: list[str] | None = None, only: list[str] | None = None) -> Space:
    """The search space from the passes registered now; a knob whose pass is absent is noted, not searched.

    only: pass names whose knobs to search (None: every knob; []: none, only the codegen backend).
    """
    from fxcc.pipeline import PASSES, _load_passes

    _load_passes()
    devices = torch.cuda.device_count() if target == "cuda" else 1
    present, notes, approximate = [], [], []
    fixed: dict[str, dict] = {}
    if only is not None:
        unknown = [n for n in only if n not in {k.pass_name for k in KNOBS}]
        if unknown:
            raise ValueError(f"fxcc search: --knobs {','.join(unknown)}: no such knob; knobs: "
                             f"{', '.join(k.pass_name for k in KNOBS)}")
    for knob in KNOBS:
        if only is not None and knob.pass_name not in only:
            continue
        cls = PASSES.get(knob.pass_name)
        if cls is None:
            notes.append(f"{knob.pass_name}: not searched (the pass is not registered in this fxcc)")
            continue
        if devices < knob.min_devices:
            notes.append(f"{knob.pass_name}: not searched ({devices} {target} device(s); needs {knob.min_devices})")
            continue
        options = _options(knob, cls, devices)
        if not options:
            notes.append(f"{knob.pass_name}: not searched (the pass has none of the options {list(knob.choices)})")
            continue
        present.append((knob.pass_name, cls.reads == "aten", options))
        fixed[knob.pass_name] = {o: v for o, v in knob.fixed.items() if o.replace("-", "_") in
                                 {f.name for f in dataclasses.fields(cls)}}
        if not cls.exact:
            approximate.append(knob.pass_name)
    wanted = list(backends) if backends else list(BACKEND_CHOICES[target])
    unknown = [b for b in wanted if b not in BACKEND_CHOICES[target]]
    if unknown:
        raise ValueError(f"fxcc search: backend(s) {unknown} do not build for target {target!r}; "
                         f"choose from {', '.join(BACKEND_CHOICES[target])}")
    return Space(present, _available_backends(wanted, target, notes), approximate, notes, fixed)


def probe(space: Space, model: nn.Module, args: tuple, kwargs: dict, target: str) -> Space:
    """Drop knobs whose pass fails on this model with its first choice (layer-skip on a model without repeated
    blocks, token-merge on an unknown block structure): they would only spend trials. Noted in the report."""
    import fxcc

    kept = []
    for name, at_aten, options in space.knobs:
        spec = knob_spec(name, {**{o: vs[0] for o, vs in options.items()}, **space.fixed.get(name, {})})
        pipeline = ",".join(["canonicalize", spec, "raise"] if at_aten else ["canonicalize", "raise", spec])
        try:
            fxcc.compile(model, target=target, passes=pipeline, tune="off").warm(*args, **kwargs)
        except Exception as e:
            space.notes.append(f"{name}: not searched (fails on this model: {type(e).__name__}: {str(e)[:200]})")
            continue
        kept.append((name, at_aten, options))
    space.knobs = kept
    space.approximate = [n for n in space.approximate if any(n == k for k, _, _ in kept)]
    return space


def _options(knob: Knob, cls: type, devices: int) -> dict[str, list]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, list] = {}
    for opt, values in knob.choices.items():
        fname = opt.replace("-", "_")
        if fname not in fields:
            continue
        if not values:
            values = _implied_choices(opt, hints[fname], devices)
        if values:
            out[opt] = list(values)
            if knob.alternatives:
                break
    return out


def _implied_choices(opt: str, hint: Any, devices: int) -> tuple:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return tuple(typing.get_args(hint))
    for a in [hint, *args]:
        if typing.get_origin(a) is typing.Literal:
            return tuple(typing.get_args(a))
    if hint is bool:
        return (True, False)
    if opt == "tp":
        return tuple(2 ** i for i in range(1, int(math.log2(max(devices, 1))) + 1))
    return ()


def _available_backends(wanted: list[str], target: str, notes: list[str]) -> list[str]:
    from fxcc.passes.codegen import backend_module

    out = []
    for b in wanted:
        if b in ("auto", "extern"):
            out.append(b)
            continue
        try:
            why = backend_module(b).available(target)
        except ImportError as e:
            why = str(e)
        if why is None:
            out.append(b)
        else:
            notes.append(f"codegen backend {b}: not searched ({why})")
    return out or ["extern"]


# ---------------------------------------------------------------------------------------- measuring


def quality_error(out: Any, ref: Any) -> float:
    """1 - the smallest cosine similarity, per sample (first dimension), over every floating output tensor.

    0 means exact up to rounding; 1.0 is returned for a different output structure, shapes, or a non-float
    output that differs; NaN when an output is not finite (the caller rejects it).
    """
    a = [t.detach() for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    b = [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return 1.0
    worst = 1.0
    for x, y in zip(a, b):
        if not x.dtype.is_floating_point:
            if not torch.equal(x, y):
                return 1.0
            continue
        if not torch.isfinite(y).all():
            return float("nan")
        rows = (x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)).double()
        got = (y.reshape(y.shape[0], -1) if y.dim() >= 2 else y.reshape(1, -1)).double()
        if rows.numel() == 0:
            continue
        cos = torch.nn.functional.cosine_similarity(rows, got, dim=1, eps=1e-30)
        same = (rows == got).all(dim=1)  # zero rows that stay zero are exact
        cos = torch.where(same, torch.ones_like(cos), cos)
        worst = min(worst, float(cos.min()))
    return max(0.0, 1.0 - worst)


def batch_size(args: tuple, kwargs: dict) -> int:
    """Samples per call, for throughput: the first dimension of the first tensor input (1 if none)."""
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


@dataclass
class Measurement:
    latency_ms: float
    eager_ms: float
    quality_error: float
    compile_s: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.latency_ms


class Evaluator:
    """Compiles a pipeline (or a plan) for the model and measures it beside the uncompiled model."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, target: str, warmup: int, reps: int):
        self.model, self.args, self.kwargs, self.target = model, args, kwargs, target
        self.warmup, self.reps = warmup, reps
        with torch.no_grad():
            self.reference = model(*args, **kwargs)

    def _eager(self) -> Any:
        with torch.no_grad():
            return self.model(*self.args, **self.kwargs)

    def measure(self, **compile_kwargs: Any) -> Measurement:
        import fxcc
        from fxcc.autotune.measure import interleaved

        t0 = time.perf_counter()
        cm = fxcc.compile(self.model, target=self.target, **compile_kwargs)
        out = cm(*self.args, **self.kwargs)
        compile_s = time.perf_counter() - t0
        err = quality_error(out, self.reference)
        t = interleaved({"fxcc": lambda: cm(*self.args, **self.kwargs), "eager": self._eager},
                        device=self.target, warmup=self.warmup, reps=self.reps, rounds=min(self.reps, 5))
        return Measurement(t["fxcc"].median, t["eager"].median, err, compile_s)


# ---------------------------------------------------------------------------------------- the search


@dataclass
class SearchConfig:
    """What `fxcc search` was asked for (see `fxcc search --help`)."""

    output: str
    target: str = "cpu"
    trials: int = 12
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    quality_budget: float | None = None
    objective: str = "latency"
    tune_budget: int = 0
    warmup: int = 2
    reps: int = 10
    backends: list[str] | None = None
    knobs: list[str] | None = None
    sampler: str = "tpe"
    seed: int | None = None
    plot: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"fxcc search: --objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"fxcc search: --sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.trials < 1:
            raise ValueError(f"fxcc search: --trials must be at least 1, got {self.trials}")
        if self.quality_budget is not None and not self.quality_budget >= 0:
            raise ValueError(f"fxcc search: --quality-budget must be >= 0 (1 - cosine), got {self.quality_budget}")
        if self.tune_budget < 0 or self.reps < 1 or self.warmup < 0:
            raise ValueError("fxcc search: --tune-budget and --warmup must be >= 0, --reps >= 1")


@dataclass
class SearchResult:
    plan: Plan
    plan_path: str
    plot_path: str | None
    table: str
    study_name: str
    trials_in_study: int


def study_name_for(fp: dict, target: dict, objective: str, space: Space) -> str:
    """Trials are comparable only for the same model, inputs, target, objective and space: all in the name."""
    from fxcc.autotune.cache import cache_key

    key = cache_key(weights=fp["weights_sha256"], inputs=";".join(fp["inputs"]), target=target["id"],
                    space=repr(space.describe()))
    return f"search:{fp['module'].rsplit('.', 1)[-1]}:{objective}:{key[:12]}"


def search(model: nn.Module, args: tuple, kwargs: dict, cfg: SearchConfig) -> SearchResult:
    """Run (or join) the study, choose a plan, tune its kernels, write and re-measure it, report."""
    import optuna
    from fxcc.autotune.tune import _Progress, _redact, open_storage

    model.eval()
    space = probe(build_space(cfg.target, cfg.backends, cfg.knobs), model, args, kwargs, cfg.target)
    fp = model_fingerprint(model, args, kwargs)
    tgt = target_info(cfg.target)
    name = cfg.study_name or study_name_for(fp, tgt, cfg.objective, space)
    multi = bool(space.approximate)
    budget = cfg.quality_budget if cfg.quality_budget is not None else (DEFAULT_QUALITY_BUDGET if multi else None)
    primary = "minimize" if cfg.objective == "latency" else "maximize"
    directions = [primary, "minimize"] if multi else [primary]
    samples = batch_size(args, kwargs)
    ev = Evaluator(model, args, kwargs, cfg.target, cfg.warmup, cfg.reps)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    print(f"fxcc search: study {name!r} ({'latency and quality error' if multi else cfg.objective}), "
          f"{cfg.trials} trials in this process\n  space: " + "\n         ".join(space.describe())
          + "".join(f"\n  note: {n}" for n in space.notes), file=sys.stderr)

    def objective(trial: Any) -> Any:
        pipeline = space.suggest(trial)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("worker", worker)
        exact = not any(f"{p}{{" in pipeline or f",{p}," in pipeline for p in space.approximate)
        try:
            m = ev.measure(passes=pipeline, tune="cached")
        except Exception as e:  # a pipeline that does not compile or run costs one trial
            return _reject(trial, "failed", f"{type(e).__name__}: {e}")
        if math.isnan(m.quality_error) or (exact and m.quality_error > EXACT_TOLERANCE):
            return _reject(trial, "wrong", f"quality error {m.quality_error:.3g}"
                           + (" from an exact pipeline" if exact else " (outputs not finite)"))
        value = m.latency_ms if cfg.objective == "latency" else samples * 1e3 / m.latency_ms
        trial.set_user_attr("latency_ms", m.latency_ms)
        trial.set_user_attr("eager_ms", m.eager_ms)
        trial.set_user_attr("quality_error", m.quality_error)
        trial.set_user_attr("throughput", samples * 1e3 / m.latency_ms)
        trial.set_user_attr("compile_s", m.compile_s)
        return (value, m.quality_error) if multi else value

    def _reject(trial: Any, why: str, message: str) -> Any:
        trial.set_user_attr("failure", why)
        trial.set_user_attr("error", message[:2000])
        log.warning("search: trial %d (%s) %s: %s", trial.number, trial.user_attrs["pipeline"], why,
                    message[:300])
        raise optuna.TrialPruned(f"{why}: {message[:300]}")

    def on_trial(study: Any, _t: Any) -> None:
        done = _complete(study)
        ok = [t for t in done if budget is None or t.user_attrs["quality_error"] <= budget]
        bar.update(min(ok, key=relative).user_attrs["latency_ms"] if ok else None)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bar = _Progress(cfg.trials, f"search {name}", cfg.progress)
    try:
        study = optuna.create_study(storage=open_storage(cfg.storage), study_name=name, directions=directions,
                                    sampler=_sampler(cfg.sampler, cfg.seed), load_if_exists=True)
        if len(study.directions) != len(directions):
            raise ValueError(f"fxcc search: study {name!r} in this storage has {len(study.directions)} objective(s), "
                             f"this search {len(directions)} (its space changed); name another --study")
        study.set_user_attr("fxcc_space", space.describe())
        study.enqueue_trial(space.baseline(), skip_if_exists=True)
        study.optimize(objective, n_trials=cfg.trials, timeout=cfg.timeout, callbacks=[on_trial])
    finally:
        bar.close()
        optuna.logging.set_verbosity(verbosity)

    done = _complete(study)
    if not done:
        raise RuntimeError(f"fxcc search: no trial of study {name!r} compiled and ran correctly; the trials' "
                           "user attrs (optuna-dashboard, or fxcc -v search) say why")
    chosen = choose(done, cfg.objective, budget)
    front = pareto(done)
    print(f"chosen: trial {chosen.number}: {chosen.user_attrs['pipeline']}", file=sys.stderr)

    plan = record_plan(model, args, kwargs, chosen.user_attrs["pipeline"], cfg, fp, tgt)
    plan.objective = cfg.objective
    plan.search = {"study": name, "storage": _redact(cfg.storage) if cfg.storage else "default (tuning.db in the "
                   "artifact cache)", "trial": chosen.number, "trials_in_study": len(study.trials),
                   "complete": len(done), "quality_budget": budget, "space": space.describe(), "notes": space.notes,
                   "tune_budget": cfg.tune_budget, "search_latency_ms": chosen.user_attrs["latency_ms"],
                   "search_quality_error": chosen.user_attrs["quality_error"],
                   "pareto": [{"trial": t.number, "pipeline": t.user_attrs["pipeline"],
                               "latency_ms": round(t.user_attrs["latency_ms"], 4),
                               "quality_error": t.user_attrs["quality_error"]} for t in front]}
    plan.save(cfg.output)
    # the plan's numbers are measured with the plan applied, as `compile(plan=...)` will run it
    m = ev.measure(plan=os.path.abspath(cfg.output))
    plan.latency_ms, plan.eager_ms, plan.quality_error = m.latency_ms, m.eager_ms, m.quality_error
    plan.search["throughput"] = samples * 1e3 / m.latency_ms
    plan.save(cfg.output)

    table = report_table(done, chosen, front, budget, cfg.objective, plan)
    plot = cfg.plot if cfg.plot is not None else os.path.splitext(cfg.output)[0] + ".pareto.png"
    plot_path = plot_pareto(done, front, chosen, budget, plot, title=name) if plot else None
    return SearchResult(plan, cfg.output, plot_path, table, name, len(study.trials))


def _sampler(name: str, seed: int | None) -> Any:
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def _complete(study: Any) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "latency_ms" in t.user_attrs]


def relative(t: Any) -> float:
    """A trial's latency over the uncompiled model's, timed interleaved with it: on a shared machine whose speed
    drifts between trials this ratio compares trials; absolute milliseconds do not."""
    return t.user_attrs["latency_ms"] / t.user_attrs["eager_ms"]


def choose(trials: list, objective: str, budget: float | None) -> Any:
    """The fastest trial relative to eager (highest throughput: the same order) whose error is within budget."""
    ok = [t for t in trials if budget is None or t.user_attrs["quality_error"] <= budget]
    if not ok:
        best = min(trials, key=lambda t: t.user_attrs["quality_error"])
        raise RuntimeError(f"fxcc search: no trial is within --quality-budget {budget:g}; the smallest quality "
                           f"error was {best.user_attrs['quality_error']:.3g} (trial {best.number}: "
                           f"{best.user_attrs['pipeline']}). Raise the budget or search longer.")
    return min(ok, key=lambda t: (relative(t), t.user_attrs["quality_error"]))


def pareto(trials: list) -> list:
    """Trials no other trial beats in both relative latency and quality error, fastest first."""
    pts = [(relative(t), t.user_attrs["quality_error"], t) for t in trials]
    front = [t for lat, err, t in pts
             if not any((lo <= lat and eo <= err) and (lo < lat or eo < err) for lo, eo, _ in pts)]
    return sorted(front, key=relative)


def record_plan(model: nn.Module, args: tuple, kwargs: dict, pipeline: str, cfg: SearchConfig, fp: dict,
                tgt: dict) -> Plan:
    """Compile the chosen pipeline (tuning its kernels when a budget is given) and record each kernel's choice."""
    import fxcc
    from fxcc.autotune.cache import library_versions
    from fxcc.dialects import KERNEL_OPS, KERNELS

    tune = {"tune": "search", "tune_budget": cfg.tune_budget} if cfg.tune_budget else {"tune": "cached"}
    cm = fxcc.compile(model, target=cfg.target, passes=pipeline, **tune)
    cm(*args, **kwargs)
    gm = cm.variants[-1].gm
    kernels = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in KERNEL_OPS and n.args[1] not in kernels:
            kb = KERNELS[n.args[1]]
            if kb.backend == "reference":  # not built (no codegen pass): nothing to record
                continue
            kernels[kb.key] = {"backend": kb.backend, "module": kb.info.get("module") or kb.backend.split("+")[0],
                               "params": kb.info.get("params") or {}, "kind": kb.kind}
    return Plan(fingerprint=fp, target=tgt, versions=library_versions(), pipeline=pipeline, kernels=kernels)


# ---------------------------------------------------------------------------------------- reports


def report_table(trials: list, chosen: Any, front: list, budget: float | None, objective: str, plan: Plan) -> str:
    """The best trials (by latency relative to eager), every Pareto trial, and the plan as applied."""
    rows = sorted(trials, key=relative)
    shown = list({t.number: t for t in [*rows[:12], *front]}.values())
    ids = {t.number for t in front}
    unit = "items/s" if objective == "throughput" else ""
    lines = [f"{'trial':>5}  {'ms':>9}  {'vs eager':>8}  {'error':>9}  {'':<2} pipeline"]
    for t in sorted(shown, key=relative):
        a = t.user_attrs
        mark = ("*" if t.number == chosen.number else " ") + ("P" if t.number in ids else " ")
        over = budget is not None and a["quality_error"] > budget
        lines.append(f"{t.number:>5}  {a['latency_ms']:>9.3f}  {a['eager_ms'] / a['latency_ms']:>7.2f}x  "
                     f"{a['quality_error']:>9.2e}  {mark} {a['pipeline']}" + ("  (over budget)" if over else ""))
    lines.append("* chosen, P Pareto front; error = 1 - min cosine vs the uncompiled model"
                 + (f"; quality budget {budget:g}" if budget is not None else ""))
    tp = f", {plan.search.get('throughput', 0):.1f} {unit}" if unit else ""
    lines.append(f"plan as applied: {plan.latency_ms:.3f} ms{tp} (eager {plan.eager_ms:.3f} ms, "
                 f"{plan.eager_ms / plan.latency_ms:.2f}x), error {plan.quality_error:.2e}, "
                 f"{len(plan.kernels)} kernels")
    return "\n".join(lines)


def plot_pareto(trials: list, front: list, chosen: Any, budget: float | None, path: str, title: str) -> str:
    """Latency relative to eager vs quality error of every complete trial, the Pareto front, the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-9  # exact trials (error 0) sit on the floor of the log axis
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        lat = [relative(t) for t in trials]
        err = [max(t.user_attrs["quality_error"], floor) for t in trials]
        ax.scatter(lat, err, s=18, c="0.6", label=f"trials ({len(trials)})")
        fl = [relative(t) for t in front]
        fe = [max(t.user_attrs["quality_error"], floor) for t in front]
        ax.plot(fl, fe, "-o", c="tab:red", ms=5, drawstyle="steps-post", label="Pareto front")
        ax.scatter([relative(chosen)], [max(chosen.user_attrs["quality_error"], floor)], s=160,
                   marker="*", c="tab:blue", zorder=5, label=f"chosen (trial {chosen.number})")
        eager = sorted(t.user_attrs["eager_ms"] for t in trials)[len(trials) // 2]
        ax.axvline(1.0, ls=":", c="k", lw=1, label=f"eager (median {eager:.1f} ms)")
        if budget is not None and budget > 0:
            ax.axhline(budget, ls="--", c="tab:green", lw=1, label=f"quality budget {budget:g}")
        ax.set_yscale("log")
        ax.set_xlabel("latency / eager latency, medians timed interleaved (lower is better)")
        ax.set_ylabel("quality error, 1 - min cosine (log)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def to_device(tree: Any, device: str) -> Any:
    """Move every tensor of an input tree to `device`."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)
