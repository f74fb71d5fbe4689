"""`fxcc search`: the plan study run on a model: every trial compiles and times the model (top layer).

The space, the choice among trials and the reports are fxcc.autotune.search; this module drives the
compiles (`fxcc.compile`) that measure each trial, confirms the chosen pipeline against the default one
(interleaved, kept only beyond the noise: `fxcc.measure.compare`), and writes and re-measures the plan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fxcc.autotune import tp_plan
from fxcc.autotune.mixed_precision import mixed_precision_report
from fxcc.autotune.plan import Plan, model_fingerprint, target_info
from fxcc.autotune.search import (
    DEFAULT_QUALITY_BUDGET,
    EXACT_TOLERANCE,
    Measurement,
    Parallel,
    SearchConfig,
    SearchResult,
    Space,
    _complete,
    _sampler,
    batch_size,
    build_space,
    choose,
    knob_spec,
    pareto,
    pipeline_text,
    plot_pareto,
    relative,
    report_table,
    study_name_for,
)
from fxcc.autotune.study import Progress, create_study, optuna_module, quiet, redact
from fxcc.measure import Decision, Timing, compare, interleaved, timed
from fxcc.quality import quality_loss
from fxcc.store import library_versions

from .api import compile
from .logs import held_back
from .tp_bench import plan_graphs, rank_timings

log = logging.getLogger(__name__)


def probe(space: Space, model: nn.Module, args: tuple, kwargs: dict, target: str,
          deadline: Deadline | None = None) -> Space:
    """Drop knobs that would only spend trials, each with a note in the report: a knob whose pass fails on this
    model (layer-skip on a model without repeated blocks, token-merge on an unknown block structure), or one that
    changes nothing even at its strongest choice (nothing to skip in a 2-block model, nothing to merge)."""
    kept = []
    for name, at_aten, options in space.knobs:
        strongest = {o: vs[-1] for o, vs in options.items()}
        spec = knob_spec(name, {**strongest, **space.fixed.get(name, {})})
        pipeline = ",".join(["canonicalize", spec, "raise"] if at_aten else ["canonicalize", "raise", spec])
        try:
            with watchdog(deadline.trials_left() if deadline else None), held_back("torch", logging.CRITICAL):
                cm = compile(model, target=target, passes=pipeline, tune="off")
                cm.warm(*args, **kwargs)
        except TrialTimeout:
            space.notes.append(f"{name}: not searched (no time left to probe it within --timeout)")
            continue
        except Exception as e:
            space.notes.append(f"{name}: not searched (fails on this model: {type(e).__name__}: {str(e)[:200]})")
            continue
        records = [r for v in cm.variants for r in getattr(v, "records", ()) if r.spec.split("{")[0] == name]
        if records and not any(r.result.changed for r in records):
            stats = ", ".join(f"{k}={v}" for k, v in records[0].result.stats.items())
            space.notes.append(f"{name}: not searched (changes nothing on this model even as {spec}"
                               + (f": {stats})" if stats else ")"))
            continue
        kept.append((name, at_aten, options))
    space.knobs = kept
    space.approximate = [n for n in space.approximate if any(n == k for k, _, _ in kept)]
    return space


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
        t0 = time.perf_counter()
        cm = compile(self.model, target=self.target, **compile_kwargs)
        out = cm(*self.args, **self.kwargs)
        compile_s = time.perf_counter() - t0
        err = quality_loss(self.reference, out)
        t = interleaved({"fxcc": lambda: cm(*self.args, **self.kwargs), "eager": self._eager},
                        device=self.target, warmup=self.warmup, reps=self.reps, rounds=min(self.reps, 5))
        return Measurement(t["fxcc"].own, t["eager"].own, err, compile_s, t["fxcc"].spread)

    def measure_ranks(self, tp: int, timeout: float | None, **compile_kwargs: Any) -> Measurement:
        """`measure` for a parallel pipeline or plan: `tp` processes (launched here, gloo on the CPU) compile it,
        check it against the TP=1 reference and time it in lockstep (fxcc.tp_bench.rank_timings); the latency is
        the slowest rank's, eager is timed on rank 0 with this process's threads, the error the worst rank's."""
        ranks = self.on_ranks(tp, timeout, RankJob(self, compile_kwargs, _rank_threads(tp)))
        ms = max(r["ms"] for r in ranks)
        return Measurement(ms, ranks[0]["eager_ms"], max(r["error"] for r in ranks),
                           max(r["compile_s"] for r in ranks), max(r["spread"] for r in ranks),
                           ranks={"median_ms": [r["median"] for r in ranks], "ms": [r["ms"] for r in ranks]})

    def on_ranks(self, tp: int, timeout: float | None, job: RankJob) -> list[dict]:
        """Run `job` on `tp` ranks, forked (the model and inputs handed over as they are). A timing job's rounds
        are gated by this process, which times eager between them at its own threads (a forked rank must not:
        OpenMP's thread team does not survive fork, so ranks run at one thread each unless given more)."""
        if self.target == "cuda":
            raise RuntimeError("parallel trials on CUDA are not supported by fxcc search yet (its ranks fork "
                               "the search process, which CUDA does not survive)")
        wait = None if timeout is None else timeout
        gate = multiprocessing.get_context("fork").Barrier(tp + 1) if job.time else None
        job.gate = gate
        samples: list[float] = []

        def eager_between_rounds() -> None:
            try:
                for _ in range(self.warmup):
                    self._eager()
                rounds = min(self.reps, 5)
                for _ in range(rounds):
                    gate.wait(wait)
                    samples.extend(timed(self._eager, self.target) for _ in range(max(1, self.reps // rounds)))
                    gate.wait(wait)
            except BaseException:
                gate.abort()
                raise

        ranks = tp_plan.launch(_rank_job, tp, job, backend="gloo", start_method="fork", timeout=timeout,
                               parent=eager_between_rounds if gate else None)
        if gate:
            ranks[0]["eager_ms"] = Timing(samples).own
        return ranks

    def confirm(self, pipelines: dict[str, str], incumbent: str) -> Decision:
        """Compile each named pipeline and time them interleaved (twice a trial's calls): a challenger is kept
        only if it beats the incumbent beyond the noise."""
        calls = {}
        for name, pipeline in pipelines.items():
            cm = compile(self.model, target=self.target, passes=pipeline, tune="cached")
            cm(*self.args, **self.kwargs)
            calls[name] = lambda cm=cm: cm(*self.args, **self.kwargs)
        with torch.no_grad():
            return compare(calls, incumbent, device=self.target, warmup=self.warmup, reps=2 * self.reps,
                           rounds=min(2 * self.reps, 8))


def _rank_threads(tp: int) -> int:
    """CPU threads of each of `tp` ranks: this process's threads shared among them (torchrun's default is 1)."""
    return max(1, torch.get_num_threads() // tp)


@dataclass
class RankJob:
    """What each rank of a parallel trial runs: compile with `compile_kwargs` at `threads` threads, check the
    outputs against the TP=1 reference, then time (`time`) or record the plan's parts (`record`: pipeline and
    model fingerprint)."""

    ev: Evaluator
    compile_kwargs: dict
    threads: int
    time: bool = True
    record: tuple[str, dict] | None = None
    gate: Any = None  # a multiprocessing Barrier of the ranks and the launching process (Evaluator.on_ranks)


def _rank_job(rank: int, world: int, job: RankJob) -> dict:
    """One rank of `Evaluator.on_ranks` (module level: `launch` runs it in a new process)."""
    ev = job.ev
    torch.set_num_threads(job.threads)
    try:
        return _rank_work(job, ev)
    except BaseException:
        if job.gate is not None:
            job.gate.abort()  # the launching process and the other ranks stop waiting for this one
        raise


def _rank_work(job: RankJob, ev: Evaluator) -> dict:
    with held_back("torch", logging.CRITICAL):
        t0 = time.perf_counter()
        cm = compile(ev.model, target=ev.target, **job.compile_kwargs)
        out = cm(*ev.args, **ev.kwargs)
        res: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "error": quality_loss(ev.reference, out)}
        if job.record:
            plan = plan_of(cm, job.record[0], job.record[1], target_info(ev.target))
            res["plan"] = {"kernels": plan.kernels, "precision": plan.precision, "target": plan.target}
        if job.time:
            gate = job.gate

            def between_rounds() -> None:
                gate.wait()  # every rank and the launching process here: it times eager
                gate.wait()  # ... until it is done
            mine, _ = rank_timings(lambda: cm(*ev.args, **ev.kwargs), device=ev.target, warmup=ev.warmup,
                                   reps=ev.reps, rounds=min(ev.reps, 5), gate=between_rounds)
            res.update(ms=mine.own, median=mine.median, spread=mine.spread)
    return res


HOPELESS = 2.0  # a parallel trial predicted this many times slower than the best measured one is not launched


class ParallelCosts:
    """The cost model (fxcc.autotune.tp_plan.CostModel) on this model's parallel plans, each IR built here once
    (tp-shard{rank=0}, no ranks needed): every plan's predicted time over TP=1's, at each rank's threads (CPU:
    rates measured here). It orders the first parallel trials and prunes hopeless ones before they launch."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, parallel: Parallel, target: str):
        plans = tp_plan.space(parallel.max_tp, parallel.ratios, parallel.impls)
        graphs = plan_graphs(model, args, kwargs, plans)
        rates = {tp: tp_plan.cpu_rates(_rank_threads(tp)) if target == "cpu" else tp_plan.Rates()
                 for tp in tp_plan.tp_degrees(parallel.max_tp)}
        time_of = {name: tp_plan.CostModel(rates[p.tp], symm=target == "cuda").graph_time(graphs[name], p.tp)
                   for p in plans if (name := p.name) in graphs}
        self.plans = {p.name: p for p in plans if p.name in graphs}
        self.ratio = {name: t / time_of["tp1"] for name, t in time_of.items()}

    def ranked(self) -> list[tp_plan.TPPlan]:
        """Parallel plans (tp > 1), predicted fastest first."""
        return sorted((p for p in self.plans.values() if p.tp > 1), key=lambda p: self.ratio[p.name])

    def hopeless(self, plan: tp_plan.TPPlan, params: dict, done: list) -> str | None:
        """Why a trial of `plan` (Optuna `params`) is not worth launching, or None: its predicted latency, the
        TP=1 trial with the same other knobs scaled by the model's ratio, is over HOPELESS x the best measured."""
        ratio = self.ratio.get(plan.name)
        others = {k: v for k, v in params.items() if not k.startswith("tp")}
        same = [t for t in done if t.params.get("tp", 1) == 1
                and {k: v for k, v in t.params.items() if not k.startswith("tp")} == others]
        if ratio is None or not same or not done:
            return None
        base = min(same, key=relative)
        predicted, best = ratio * relative(base), min(relative(t) for t in done)
        if predicted <= HOPELESS * best:
            return None
        return (f"the cost model predicts {ratio:.2f}x trial {base.number} (TP=1, same other knobs): {predicted:.2f}x "
                f"eager against the best measured {best:.2f}x; not launched")


RESERVE = 0.15  # of --timeout kept at least for what follows the study: confirming, recording, re-measuring


@dataclass
class Deadline:
    """--timeout as a budget from `start`: trials (and probes) end early enough to leave `reserve` seconds for
    what follows the study, which takes a few compiles and timings: at least RESERVE of the timeout, and three
    times the first complete trial's wall time when that is more (at most half the timeout)."""

    timeout: float | None
    start: float = field(default_factory=time.monotonic)
    reserve: float = 0.0
    learned: bool = False

    def __post_init__(self) -> None:
        self.reserve = RESERVE * self.timeout if self.timeout else 0.0

    def learn(self, trial_s: float) -> None:
        if self.timeout and not self.learned:
            self.learned = True
            self.reserve = min(0.5 * self.timeout, max(self.reserve, 3 * trial_s))

    def trials_left(self) -> float | None:
        """Seconds left for trials (None: no --timeout)."""
        return None if self.timeout is None else self.start + self.timeout - self.reserve - time.monotonic()


class TrialTimeout(BaseException):
    """A trial ran past its share of --timeout. A BaseException, like KeyboardInterrupt, so that no handler for
    a failed compile (a backend falling back to another, capture falling back to DyCL) mistakes it for one."""


@contextlib.contextmanager
def watchdog(seconds: float | None) -> Iterator[None]:
    """Raise TrialTimeout in this thread once `seconds` have passed (SIGALRM). No limit off the main thread or
    where there is no SIGALRM: the study's own timeout then only stops new trials from starting."""
    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(_signum: int, _frame: Any) -> None:
        raise TrialTimeout(f"stopped past its share of --timeout ({seconds:.0f} s)")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def search(model: nn.Module, args: tuple, kwargs: dict, cfg: SearchConfig, started: float | None = None) -> SearchResult:
    """Run (or join) the study, choose a plan, tune its kernels, write and re-measure it, report. With
    cfg.timeout (counted from `started`, a time.monotonic() value, default now), trials stop early enough for
    the rest (see Deadline): one still running then is stopped and pruned."""
    optuna = optuna_module()
    deadline = Deadline(cfg.timeout, started if started is not None else time.monotonic())
    model.eval()
    space = probe(build_space(cfg.target, cfg.backends, cfg.knobs, cfg.nproc), model, args, kwargs, cfg.target,
                  deadline)
    costs = None
    if space.parallel:
        try:
            costs = ParallelCosts(model, args, kwargs, space.parallel, cfg.target)
        except Exception as e:  # the IRs do not build: trials still run, unordered and unpruned
            space.notes.append(f"tp: no cost model ({type(e).__name__}: {str(e)[:200]})")
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
    log.info("study %r (%s), %d trials in this process\n  space: %s%s", name,
             'latency and quality error' if multi else cfg.objective, cfg.trials, "\n         ".join(space.describe()),
             "".join(f"\n  note: {n}" for n in space.notes))

    picked = costs.ranked()[:max(1, min(3, cfg.trials // 3))] if costs else []

    def objective(trial: Any) -> Any:
        pipeline = space.suggest(trial)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("worker", worker)
        exact = not any(f"{p}{{" in pipeline or f",{p}," in pipeline for p in space.approximate)
        bar.note(f"trial {trial.number}: compiling and timing {pipeline}")
        t0 = time.monotonic()
        tp = tp_plan.from_params(trial.params) if space.parallel else tp_plan.TPPlan(1)
        if tp.tp > 1:
            trial.set_user_attr("tp", tp.tp)
            why = costs.hopeless(tp, trial.params, _complete(trial.study)) if costs and tp not in picked else None
            if why:
                return _reject(trial, "hopeless", why)
        try:
            with watchdog(deadline.trials_left()), held_back("torch", logging.CRITICAL):
                if tp.tp > 1:
                    m = ev.measure_ranks(tp.tp, _rank_timeout(trial.study, deadline), passes=pipeline,
                                         tune="cached")
                else:
                    m = ev.measure(passes=pipeline, tune="cached")
        except TrialTimeout as e:
            return _reject(trial, "timeout", str(e))
        except Exception as e:  # a pipeline that does not compile or run costs one trial (a rank's too)
            return _reject(trial, "failed", f"{type(e).__name__}: {e}")
        if math.isnan(m.quality_error) or (exact and m.quality_error > EXACT_TOLERANCE):
            return _reject(trial, "wrong", f"quality error {m.quality_error:.3g}"
                           + (" from an exact pipeline" if exact else " (outputs not finite)"))
        deadline.learn(time.monotonic() - t0)
        value = m.latency_ms if cfg.objective == "latency" else samples * 1e3 / m.latency_ms
        trial.set_user_attr("latency_ms", m.latency_ms)
        trial.set_user_attr("eager_ms", m.eager_ms)
        trial.set_user_attr("quality_error", m.quality_error)
        trial.set_user_attr("throughput", samples * 1e3 / m.latency_ms)
        trial.set_user_attr("compile_s", m.compile_s)
        trial.set_user_attr("wall_s", time.monotonic() - t0)
        if m.ranks:
            trial.set_user_attr("ranks", m.ranks)
        return (value, m.quality_error) if multi else value

    def _reject(trial: Any, why: str, message: str) -> Any:
        trial.set_user_attr("failure", why)
        trial.set_user_attr("error", message[:2000])
        log.warning("search: trial %d (%s) %s: %s", trial.number, trial.user_attrs["pipeline"], why,
                    message[:300])
        raise optuna.TrialPruned(f"{why}: {message[:300]}")

    def on_trial(study: Any, _t: Any) -> None:
        left = deadline.trials_left()
        if left is not None and left <= 0:
            study.stop()
        done = _complete(study)
        ok = [t for t in done if budget is None or t.user_attrs["quality_error"] <= budget]
        bar.update(min(ok, key=relative).user_attrs["latency_ms"] if ok else None)

    bar = Progress(cfg.trials, f"search {name}", cfg.progress)
    try:
        with quiet():
            study = create_study(sampler=_sampler(cfg.sampler, cfg.seed), name=name, storage=cfg.storage,
                                 directions=directions)
            if len(study.directions) != len(directions):
                raise ValueError(f"fxcc search: study {name!r} in this storage has {len(study.directions)} objective(s), "
                                 f"this search {len(directions)} (its space changed); name another --study")
            study.set_user_attr("fxcc_space", space.describe())
            study.enqueue_trial(space.baseline(), skip_if_exists=True)
            for p in picked:  # the model's own picks always run: they are what measures it
                study.enqueue_trial({**space.baseline(), **tp_plan.trial_params(p)}, skip_if_exists=True)
            left = deadline.trials_left()
            study.optimize(objective, n_trials=cfg.trials, timeout=None if left is None else max(0.0, left),
                           callbacks=[on_trial])
    finally:
        bar.close()

    done = _complete(study)
    if not done:
        stopped = sum(t.user_attrs.get("failure") == "timeout" for t in study.trials)
        raise RuntimeError(f"fxcc search: no trial of study {name!r} compiled and ran correctly; the trials' "
                           "user attrs (optuna-dashboard, or fxcc -v search) say why"
                           + (f"; {stopped} stopped at --timeout {cfg.timeout:g} s: allow more time" if stopped
                              else ""))
    chosen = choose(done, cfg.objective, budget)
    tp = tp_plan.from_params(chosen.params) if space.parallel else tp_plan.TPPlan(1)
    if tp.tp > 1:
        confirmation = (f"not timed again against the default pipeline: trial {chosen.number} runs on {tp.tp} ranks; "
                        "it was chosen by its latency relative to eager, both timed interleaved on the ranks")
    else:
        chosen, confirmation = _confirm(ev, chosen, done, space)
        tp = tp_plan.from_params(chosen.params) if space.parallel else tp_plan.TPPlan(1)
    front = pareto(done)
    log.info("chosen: trial %d: %s", chosen.number, chosen.user_attrs["pipeline"])

    if tp.tp > 1:
        plan = record_ranks(ev, tp, chosen.user_attrs["pipeline"], cfg, fp)
    else:
        plan = record_plan(model, args, kwargs, chosen.user_attrs["pipeline"], cfg, fp, tgt)
    plan.objective = cfg.objective
    plan.search = {"study": name, "storage": redact(cfg.storage) if cfg.storage else "default (tuning.db in the "
                   "artifact cache)", "trial": chosen.number, "trials_in_study": len(study.trials),
                   "complete": len(done), "quality_budget": budget, "space": space.describe(), "notes": space.notes,
                   "tune_budget": cfg.tune_budget, "search_latency_ms": chosen.user_attrs["latency_ms"],
                   "search_quality_error": chosen.user_attrs["quality_error"], "confirmation": confirmation,
                   "pareto": [{"trial": t.number, "pipeline": t.user_attrs["pipeline"],
                               "latency_ms": round(t.user_attrs["latency_ms"], 4),
                               "quality_error": t.user_attrs["quality_error"]} for t in front]}
    plan.save(cfg.output)
    # the plan's numbers are measured with the plan applied, as `compile(plan=...)` will run it
    if tp.tp > 1:
        m = ev.measure_ranks(tp.tp, None, plan=os.path.abspath(cfg.output))
        plan.search["ranks"] = m.ranks
    else:
        m = ev.measure(plan=os.path.abspath(cfg.output))
    plan.latency_ms, plan.eager_ms, plan.quality_error = m.latency_ms, m.eager_ms, m.quality_error
    plan.search["throughput"] = samples * 1e3 / m.latency_ms
    plan.search["seconds"] = round(time.monotonic() - deadline.start, 1)
    plan.save(cfg.output)
    if cfg.timeout is not None:
        log.info("search took %.0f s of --timeout %g s", plan.search["seconds"], cfg.timeout)

    table = report_table(done, chosen, front, budget, cfg.objective, plan)
    plot = cfg.plot if cfg.plot is not None else os.path.splitext(cfg.output)[0] + ".pareto.png"
    plot_path = plot_pareto(done, front, chosen, budget, plot, title=name) if plot else None
    return SearchResult(plan, cfg.output, plot_path, table, name, len(study.trials))


def _confirm(ev: Evaluator, chosen: Any, done: list, space: Space) -> tuple[Any, str]:
    """The chosen trial if it beats the default pipeline beyond the noise when both are timed again side by
    side, else the default pipeline's trial; and the comparison's account for the plan and the report."""
    default = pipeline_text([], [], space.baseline().get("codegen.backend", space.backends[0]))
    fallback = next((t for t in done if t.user_attrs["pipeline"] == default), None)
    if chosen.user_attrs["pipeline"] == default:
        return chosen, "the default pipeline was the fastest trial"
    if fallback is None:
        return chosen, "the default pipeline's trial did not complete: nothing to confirm against"
    d = ev.confirm({"default": default, "chosen": chosen.user_attrs["pipeline"]}, "default")
    note = f"trial {chosen.number} against the default pipeline, timed again: {d.summary()}"
    log.info("%s", note)
    if d.noisy:
        log.warning("search: noisy timings of %s (the machine is busy); %s kept", ", ".join(d.noisy), d.winner)
    return (chosen if d.winner == "chosen" else fallback), note


def _rank_timeout(study: Any, deadline: Deadline) -> float:
    """How long a parallel trial's ranks may run: ten times the slowest complete trial, at least two minutes, at
    most what --timeout leaves (a rank stuck in a collective is stopped, the trial pruned)."""
    walls = [t.user_attrs.get("wall_s", 0.0) for t in _complete(study)]
    limit = max(120.0, 10 * max(walls, default=0.0))
    left = deadline.trials_left()
    return limit if left is None else max(1.0, min(limit, left))


def record_ranks(ev: Evaluator, tp: tp_plan.TPPlan, pipeline: str, cfg: SearchConfig, fp: dict) -> Plan:
    """`record_plan` for a parallel pipeline: each of `tp.tp` ranks compiles it and reports its kernels; the plan
    takes every rank's kernel choices, rank 0's precision assignment and target (its threads, the ranks')."""
    tune = {"tune": "search", "tune_budget": cfg.tune_budget} if cfg.tune_budget else {"tune": "cached"}
    job = RankJob(ev, {"passes": pipeline, "options": {"graph_cache": False}, **tune}, _rank_threads(tp.tp),
                  time=False, record=(pipeline, fp))
    ranks = ev.on_ranks(tp.tp, None, job)
    kernels = {k: v for r in ranks for k, v in r["plan"]["kernels"].items()}
    first = ranks[0]["plan"]
    plan = Plan(fingerprint=fp, target=first["target"], versions=library_versions(), pipeline=pipeline,
                kernels=kernels, precision=first["precision"])
    plan.parallel = {"tp": tp.tp, "allreduce": f"fused[{tp.impl}]" if tp.fused else "unfused",
                     "split": tp.ratio if tp.split else None, "backend": "gloo",
                     "threads_per_rank": _rank_threads(tp.tp), "eager_threads": torch.get_num_threads(),
                     "latency": "the slowest rank's (each rank's fastest fifth of the calls, in lockstep)"}
    return plan


def record_plan(model: nn.Module, args: tuple, kwargs: dict, pipeline: str, cfg: SearchConfig, fp: dict,
                tgt: dict) -> Plan:
    """Compile the chosen pipeline (tuning its kernels when a budget is given) and record every choice it made.
    Not from the graph cache: a cached graph keeps no mixed-precision report."""
    tune = {"tune": "search", "tune_budget": cfg.tune_budget} if cfg.tune_budget else {"tune": "cached"}
    cm = compile(model, target=cfg.target, passes=pipeline, options={"graph_cache": False}, **tune)
    cm(*args, **kwargs)
    return plan_of(cm, pipeline, fp, tgt)


def plan_of(cm: Any, pipeline: str, fp: dict, tgt: dict) -> Plan:
    """The plan of what compiled module `cm` (compiled with `pipeline` and called once) chose: each kernel's
    backend and parameters, the mixed-precision assignment per linear, whether it replays a CUDA graph."""
    variant = cm.variants[-1]
    kernels = {key: {"backend": k.choice.backend, "module": k.choice.module, "params": k.choice.params,
                     "kind": k.kind}
               for key, k in variant.kernels.items() if k.choice is not None}  # None: no codegen ran
    report = mixed_precision_report(cm) if getattr(variant, "gm", None) is not None else None  # None: DyCL
    if report is None and getattr(variant, "gm", None) is not None and "mixed-precision" in pipeline:
        raise ValueError(f"fxcc search: the compile of {pipeline!r} kept no mixed-precision report (IR from the "
                         "graph cache?); compile it with graph_cache=False to record its assignment")
    precision = {r.node: {"module": r.module, "precision": r.precision, "kernel": r.kernel}
                 for r in (report.layers if report is not None else [])}
    graph = None if tgt.get("kind") != "cuda" or variant.cuda_graph == "pending" else variant.cuda_graph is not None
    return Plan(fingerprint=fp, target=tgt, versions=library_versions(), pipeline=pipeline, kernels=kernels,
                precision=precision, cuda_graph=graph)
