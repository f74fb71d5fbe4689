"""Offline plan search (`fxcc search`): the space of pipeline knobs, the choice among trials, the reports.

The study itself runs in fxcc.plan_search, which compiles the model for every trial (the top layer).

Each trial samples a pipeline from the knobs of the passes registered now (a knob of a pass that is not
registered is left out, with a note in the report), compiles the model with it, checks its outputs
against the uncompiled model (quality error = 1 - min cosine similarity per sample) and times it beside
the uncompiled model (warm-up, interleaved rounds, a low quantile with its spread). With approximate knobs the study has two
objectives (latency or throughput, and quality error); otherwise one. The chosen pipeline is the trial
fastest relative to the uncompiled model (robust to a machine whose speed drifts) within the quality budget,
kept only if, timed again interleaved with the default pipeline, it beats it beyond the noise (else the default
pipeline is the plan); its kernels are then tuned with the per-kernel tuner (results go to the
artifact cache), and the plan is written, applied with `compile(plan=...)` and measured again, so the
plan's numbers are those of the plan as applied.

The study lives in an Optuna storage (default: tuning.db in the artifact cache directory); processes that
name the same storage and study cooperate, each running its own trial budget.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from fxcc import options as fxcc_options
from fxcc.autotune import tp_plan
from fxcc.autotune.plan import Plan
from fxcc.codegen import backend
from fxcc.options import Knob
from fxcc.pipeline import DEFAULT_PIPELINE, pass_class
from fxcc.store import cache_key
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "throughput")
SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_QUALITY_BUDGET = 0.01  # 1 - cosine: used when approximate knobs are searched and no budget is given
EXACT_TOLERANCE = 1e-4  # an all-exact pipeline whose error exceeds this is wrong, not approximate


BACKEND_CHOICES = {"cpu": ("auto", "extern", "tvm"), "cuda": ("auto", "extern", "triton")}


# ---------------------------------------------------------------------------------------- the space


TP_KNOB = "tp"  # --knobs name of the parallel plan (tp-shard and fuse-allreduce-rmsnorm together)
TP_IMPLS = {"cpu": ("auto",), "cuda": ("auto", "nccl")}  # fused all-reduce kernels worth trying per target
TP_RATIOS = (0.25, 0.5, 0.75)  # token split ratios


@dataclass(frozen=True)
class Parallel:
    """The parallel plan's part of the space: TP degree up to `max_tp` (the processes a trial may launch), the
    fused all-reduce impls, the token split ratios; `backend` is the process group's (gloo, nccl)."""

    max_tp: int
    impls: tuple[str, ...]
    ratios: tuple[float, ...]
    backend: str

    def describe(self) -> str:
        return (f"tp: tp in {tp_plan.tp_degrees(self.max_tp)}, allreduce in "
                f"{['unfused', *(f'fused[{i}]' for i in self.impls)]}, split in {['off', *self.ratios]} "
                f"({self.backend}, one process per rank)")


@dataclass
class Space:
    """The knobs searched in this process: present passes with their choices, codegen backends, and notes
    on what was left out (shown in the report and stored in the plan)."""

    knobs: list[tuple[str, bool, dict[str, list]]]  # (pass name, reads aten, option -> choices)
    backends: list[str]
    approximate: list[str]
    notes: list[str] = field(default_factory=list)
    fixed: dict[str, dict] = field(default_factory=dict)  # pass name -> options set whenever it is on
    parallel: Parallel | None = None  # the parallel plan, when searched

    def suggest(self, trial: Any) -> str:
        """The pipeline text of one trial (define-by-run: a knob's options exist only when it is on). The parallel
        plan's passes come first after `raise`: tp-shard finds the projections before other passes rewrite them."""
        before, after = [], []
        for name, at_aten, options in self.knobs:
            spec = self._suggest_knob(trial, name, options, self.fixed.get(name, {}))
            if spec:
                (before if at_aten else after).append(spec)
        if self.parallel:
            p = self.parallel
            tp = tp_plan.suggest(trial, p.max_tp, p.impls, p.ratios).passes()
            after = [tp, *after] if tp else after
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
        if self.parallel:
            params["tp"] = 1
        return params

    def describe(self) -> list[str]:
        rows = [f"{n}: " + ", ".join(f"{o} in {['off', *v] if len(opts) == 1 else v}" for o, v in opts.items())
                + ("" if len(opts) == 1 else " (or off)")
                + "".join(f", {o}={v}" for o, v in self.fixed.get(n, {}).items()) for n, _, opts in self.knobs]
        rows += [self.parallel.describe()] if self.parallel else []
        return rows + [f"codegen: backend in {self.backends}"]


def knob_spec(name: str, options: dict) -> str:
    return name + "{" + ",".join(f"{o}={v}" for o, v in options.items()) + "}"


def pipeline_text(before_raise: list[str], after_raise: list[str], backend: str) -> str:
    """The default pipeline with knob passes just before and just after `raise`, and the codegen backend set."""
    out = []
    for name in (p.strip() for p in DEFAULT_PIPELINE.split(",")):
        if name == "raise":
            out += [*before_raise, name, *after_raise]
        elif name == "codegen" and backend != "auto":
            out.append(f"codegen{{backend={backend}}}")
        else:
            out.append(name)
    return ",".join(out)


def build_space(target: str, backends: list[str] | None = None, only: list[str] | None = None,
                nproc: int | None = None) -> Space:
    """The search space from the passes registered now; a knob whose pass is absent is noted, not searched.

    only: pass names whose knobs to search (None: every knob; []: none, only the codegen backend); `tp` (or
    tp-shard) names the parallel plan. nproc: processes a trial may launch (default: the CUDA devices on cuda,
    1 on the CPU); the parallel plan is searched when it is above 1.
    """
    devices = nproc if nproc is not None else (torch.cuda.device_count() if target == "cuda" else 1)
    present, notes, approximate = [], [], []
    fixed: dict[str, dict] = {}
    if only is not None:
        only = [TP_KNOB if n == "tp-shard" else n for n in only]
        names = [k.pass_name for k in fxcc_options.KNOBS] + [TP_KNOB]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"fxcc search: --knobs {','.join(unknown)}: no such knob; knobs: {', '.join(names)}")
    parallel = None
    if only is None or TP_KNOB in only:
        if devices < 2:
            notes.append(f"tp: not searched ({devices} {'process' if target == 'cpu' else target + ' device'}; "
                         "--nproc 2 or more launches a process per rank" + (", gloo)" if target == "cpu" else ")"))
        elif pass_class("tp-shard") is None or pass_class("fuse-allreduce-rmsnorm") is None:
            notes.append("tp: not searched (tp-shard or fuse-allreduce-rmsnorm is not registered in this fxcc)")
        else:
            parallel = Parallel(devices, TP_IMPLS[target], TP_RATIOS, "nccl" if target == "cuda" else "gloo")
    for knob in fxcc_options.KNOBS:
        if only is not None and knob.pass_name not in only:
            continue
        cls = pass_class(knob.pass_name)
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
    return Space(present, _available_backends(wanted, target, notes), approximate, notes, fixed, parallel)


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
    return ()


def _available_backends(wanted: list[str], target: str, notes: list[str]) -> list[str]:
    out = []
    for b in wanted:
        if b in ("auto", "extern"):
            out.append(b)
            continue
        try:
            why = backend(b).available(target)
        except ImportError as e:
            why = str(e)
        if why is None:
            out.append(b)
        else:
            notes.append(f"codegen backend {b}: not searched ({why})")
    return out or ["extern"]


# ---------------------------------------------------------------------------------------- measuring


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
    spread: float = 0.0  # the fxcc timing's noise (fxcc.measure.Timing.spread)
    ranks: dict | None = None  # a parallel trial's per-rank estimates and medians (ms)

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.latency_ms


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
    nproc: int | None = None  # processes a trial may launch for the parallel plan (see build_space)
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
        if self.nproc is not None and self.nproc < 1:
            raise ValueError(f"fxcc search: --nproc must be at least 1, got {self.nproc}")
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
    key = cache_key("search", weights=fp["weights_sha256"], inputs=";".join(fp["inputs"]), machine=target["id"],
                    space=repr(space.describe()))
    return f"search:{fp['module'].rsplit('.', 1)[-1]}:{objective}:{key[:12]}"


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
    if plan.search.get("confirmation"):
        lines.append(f"confirmed: {plan.search['confirmation']}")
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
