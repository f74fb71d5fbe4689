"""Per-kernel tuning: an Optuna study over a candidate's parameter space.

A trial builds the candidate with the sampled parameters, checks its outputs against the reference,
then times it (warm-up, a low quantile of repeats: fxcc.measure). The study's best trials are then timed
again, interleaved with the defaults (`fxcc.measure.compare`), and a point is kept only if it beats the
defaults by more than the measured noise: one trial's timing on a shared machine decides nothing. A candidate that fails to build, raises, crashes, hangs or
gives wrong results is pruned with the reason in the trial's user attrs, and the search goes on; the
kernel's defaults are always the first trial. With `isolate=True` (the default on CUDA) each trial runs
in a worker process under a timeout, so a crash or a hang costs one trial, not the tuner.

Studies are created through fxcc.autotune.study (storage, sharing between processes and machines).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import multiprocessing
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fxcc.autotune.study import Progress, create_study, optuna_module, quiet
from fxcc.codegen import Candidate, check
from fxcc.measure import Decision, compare, interleaved
from fxcc.store import cache_key
from torch import Tensor

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid", "cmaes")
DEFAULT_TRIALS = 30
DEVICES = ("cpu", "cuda")
STARTUP_S = 120.0  # a worker process's start (imports, kernel set-up) is not counted in timeout_s
FAILED = ("build", "crash", "timeout")  # trial outcomes counted as `failed`; "wrong" counts as `pruned`
_REASONS = {"build": "failed to build", "crash": "raised or crashed", "timeout": "timed out",
            "wrong": "gave wrong results"}


@dataclass
class TuneResult:
    """The best parameters found and what the search cost.

    ms: the kept point's time; defaults_ms: the defaults' (None if they failed or were not run), both from the
    final interleaved comparison when it ran. trials: trials run by this call; of those, pruned: ran but gave
    wrong results; failed: did not build, raised, crashed or timed out. A resumed study's best can come from an
    earlier run. decision: the final comparison's one-line account (times with their noise, what was kept).
    """

    params: dict
    ms: float
    trials: int
    pruned: int
    failed: int
    seconds: float
    study_name: str
    defaults_ms: float | None = None
    decision: str = ""

    def summary(self) -> str:
        """Two lines for a terminal: counts, then best vs defaults."""
        ok = self.trials - self.pruned - self.failed
        head = (f"tuned {self.study_name} in {self.seconds:.1f} s: {self.trials} trials ({ok} ok, "
                f"{self.pruned} wrong results, {self.failed} failed to build/crashed/timed out)")
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"
        if self.defaults_ms is None:
            vs = "defaults not measured"
        else:
            vs = f"defaults {self.defaults_ms:.4g} ms ({self.defaults_ms / self.ms:.2f}x)"
        return f"{head}\n  kept {self.ms:.4g} ms with {params}; {vs}" + (f"\n  {self.decision}" if self.decision else "")


def tune_kernel(kernel: Candidate, inputs: list[Tensor], reference: list[Tensor], *, trials: int = DEFAULT_TRIALS,
                seconds: float | None = None, sampler: str = "tpe", storage: str | None = None,
                study_name: str | None = None, device: str = "cpu", isolate: bool | None = None,
                timeout_s: float = 60.0, progress: bool = True, seed: int | None = 0, key: str | None = None,
                kernel_factory: Callable[[], Candidate] | None = None, warmup: int = 3,
                reps: int = 20, retime: int = 3) -> TuneResult:
    """Search `kernel.space` for the fastest parameters whose outputs match `reference` on `inputs`.

    Budgets: at most `trials` trials and, when given, `seconds` of wall time (checked between trials).
    sampler: "tpe" (default), "random", "grid" (every point once) or "cmaes" (needs the cmaes package).
    storage: None (the cache's tuning.db), an Optuna RDB URL, or "journal:PATH". study_name defaults to
    "<backend>:<key>" (key: the caller's kernel key; else one derived from the space and input shapes).
    isolate (default: device == "cuda") runs every trial in a worker process with a `timeout_s` limit;
    the kernel travels there by pickle, or `kernel_factory` (a picklable, e.g. module-level, function)
    makes it there. Without isolation a hanging candidate cannot be stopped. Raises RuntimeError when no
    candidate passed at all.
    retime: the best `retime` distinct parameter sets are timed again with the defaults, interleaved (in the
    worker when isolated), and one is kept only if it beats the defaults beyond the measured noise, else the
    defaults stay: the single best trial of a noisy machine is often a lucky one.
    """
    optuna = optuna_module()
    label = study_name or f"{kernel.backend}:{key or _default_key(kernel, inputs)}"
    _check_args(label, trials, seconds, sampler, device, timeout_s, warmup, reps, retime)
    space = _space(kernel, label)
    defaults = dict(kernel.defaults)
    isolate = device == "cuda" if isolate is None else isolate
    n = trials if space else 1
    if sampler == "grid":
        n = min(n, math.prod(len(c) for c in space.values()))
    runner = (_Isolated(label, kernel, kernel_factory, inputs, reference, device, warmup, reps, timeout_s)
              if isolate else _InProcess(kernel, inputs, reference, device, warmup, reps))

    counts: Counter[str] = Counter()
    first_error: dict[str, str] = {}

    def objective(trial: Any) -> float:
        params = {**defaults, **_suggest(trial, space, sampler)}
        trial.set_user_attr("params", params)
        status, value = runner(params)
        counts[status] += 1
        if status == "ok":
            return value
        first_error.setdefault(status, value)
        trial.set_user_attr("failure", status)
        trial.set_user_attr("error", value[:2000])
        log.debug("%s trial %d %s %s: %s", label, trial.number, params, _REASONS[status], value)
        raise optuna.TrialPruned(f"{_REASONS[status]}: {value}")

    def on_trial(study: Any, _trial: Any) -> None:
        try:
            bar.update(study.best_value)
        except ValueError:  # no trial completed yet
            bar.update(None)

    t0 = time.perf_counter()
    bar = None
    try:
        with quiet():  # Optuna's line per trial is the progress bar's job
            study = create_study(sampler=_sampler(sampler, space, seed), name=label, storage=storage)
            encoded = _encode(defaults, space, sampler)
            if encoded is None:
                log.warning("tuning %s: the kernel's defaults %s are not a point of its space %s; the search "
                            "starts without them", label, defaults, space)
            elif sampler != "grid":  # grid visits the defaults' point anyway
                study.enqueue_trial(encoded, user_attrs={"defaults": True}, skip_if_exists=True)
            bar = Progress(n, f"tune {label}", progress)
            study.optimize(objective, n_trials=n, timeout=seconds, callbacks=[on_trial])
    finally:
        if bar is not None:
            bar.close()
        runner.close()
    elapsed = time.perf_counter() - t0

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        why = ", ".join(f"{counts[s]} {_REASONS[s]}" for s in (*FAILED, "wrong") if counts[s])
        first = "; ".join(f"{_REASONS[s]}: {e[:300]}" for s, e in first_error.items())
        raise RuntimeError(f"fxcc: tuning {label}: no candidate passed ({why}). First errors: {first}. "
                           "The kernel cannot be tuned; build it with another backend.")
    best = min(complete, key=lambda t: t.value)
    defaults_ms = min((t.value for t in complete if t.user_attrs.get("params") == defaults), default=None)
    best_params, best_ms, note = best.user_attrs.get("params", {**defaults, **best.params}), best.value, ""
    contenders, incumbent = _contenders(complete, defaults, retime)
    if len(contenders) > 1:
        try:
            decision = runner.compare(contenders, incumbent)
        except Exception as e:  # a rebuild that fails now: nothing is kept that was not confirmed
            log.warning("tuning %s: re-timing the best points failed (%s: %s); keeping %s", label,
                        type(e).__name__, e, incumbent)
            best_params, best_ms = contenders[incumbent], min(t.value for t in complete
                                                              if t.user_attrs.get("params") == contenders[incumbent])
        else:
            best_params, best_ms = contenders[decision.winner], decision.timings[decision.winner].own
            defaults_ms = decision.timings["defaults"].own if "defaults" in decision.timings else defaults_ms
            note = decision.summary()
            if decision.noisy:
                log.warning("tuning %s: noisy timings of %s (the machine is busy); %s kept", label,
                            ", ".join(decision.noisy), decision.winner)
    result = TuneResult(params=best_params, ms=best_ms,
                        trials=sum(counts.values()), pruned=counts["wrong"], failed=sum(counts[s] for s in FAILED),
                        seconds=elapsed, study_name=label, defaults_ms=defaults_ms, decision=note)
    log.info("%s", result.summary())
    return result


def _contenders(complete: list, defaults: dict, k: int) -> tuple[dict[str, dict], str]:
    """The points of the final comparison: the defaults (the incumbent, when a trial of them passed) and the
    study's `k` best other distinct points, named "defaults" and "trial N"."""
    out: dict[str, dict] = {}
    seen: set[str] = set()
    if any(t.user_attrs.get("params") == defaults for t in complete):
        out["defaults"] = defaults
        seen.add(json.dumps(defaults, sort_keys=True, default=str))
    others = 0
    for t in sorted(complete, key=lambda t: t.value):
        params = t.user_attrs.get("params", {**defaults, **t.params})
        name = json.dumps(params, sort_keys=True, default=str)
        if name in seen:
            continue
        seen.add(name)
        out[f"trial {t.number}"] = params
        others += 1
        if others == k:
            break
    return out, next(iter(out))


def compare_points(kernel: Candidate, points: dict[str, dict], incumbent: str, inputs: list[Tensor], device: str,
                   warmup: int, reps: int) -> Decision:
    """Build each named point and time them interleaved: a challenger is kept only beyond the noise."""
    fns = {name: kernel.build(params).fn for name, params in points.items()}
    with torch.no_grad():
        return compare({name: (lambda f=f: f(inputs)) for name, f in fns.items()}, incumbent, device=device,
                       warmup=max(warmup, 1), reps=2 * reps, rounds=min(2 * reps, 8))


# ---------------------------------------------------------------------------------------- search space


def _check_args(label: str, trials: int, seconds: float | None, sampler: str, device: str, timeout_s: float,
                warmup: int, reps: int, retime: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"fxcc: tuning {label}: unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ImportError(f"fxcc: tuning {label}: sampler 'cmaes' needs the cmaes package: pip install cmaes")
    if device not in DEVICES:
        raise ValueError(f"fxcc: tuning {label}: unknown device {device!r}; use one of {', '.join(DEVICES)}")
    for name, value, least in (("trials", trials, 1), ("warmup", warmup, 0), ("reps", reps, 1), ("retime", retime, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"fxcc: tuning {label}: {name} must be an integer >= {least}, got {value!r}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"fxcc: tuning {label}: seconds must be > 0 (or None for no time budget), got {seconds!r}")
    if not timeout_s > 0:
        raise ValueError(f"fxcc: tuning {label}: timeout_s must be > 0, got {timeout_s!r}")


def _space(kernel: Candidate, label: str) -> dict[str, list]:
    """The kernel's space, checked: Optuna stores only None, bool, int, float and str choices."""
    space = {}
    for name, choices in kernel.space.items():
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"fxcc: tuning {label}: space[{name!r}] must be a non-empty list of choices, "
                             f"got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ValueError(f"fxcc: tuning {label}: space[{name!r}] holds {bad[0]!r}; choices must be None, "
                             "bool, int, float or str (encode others, e.g. '64x32' for a tile)")
        space[name] = list(choices)
    return space


def _ordinal(choices: list) -> bool:
    """Numeric choices: CMA-ES searches their sorted index as an integer instead of a category."""
    return all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)


def _suggest(trial: Any, space: dict[str, list], sampler: str) -> dict:
    params = {}
    for name, choices in space.items():
        if sampler == "cmaes" and _ordinal(choices):
            ordered = sorted(choices)
            params[name] = ordered[trial.suggest_int(f"{name}.index", 0, len(ordered) - 1)]
        else:
            params[name] = trial.suggest_categorical(name, choices)
    return params


def _encode(params: dict, space: dict[str, list], sampler: str) -> dict | None:
    """The Optuna parameters that `_suggest` turns into `params`; None when a value is outside the space."""
    out = {}
    for name, choices in space.items():
        if name not in params or params[name] not in choices:
            return None
        if sampler == "cmaes" and _ordinal(choices):
            out[f"{name}.index"] = sorted(choices).index(params[name])
        else:
            out[name] = params[name]
    return out


def _sampler(name: str, space: dict[str, list], seed: int | None) -> Any:
    samplers = optuna_module().samplers
    if name == "tpe":
        return samplers.TPESampler(seed=seed)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "grid":
        return samplers.GridSampler(space, seed=seed)
    return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _default_key(kernel: Candidate, inputs: list[Tensor]) -> str:
    shapes = ";".join(f"{x.dtype}{list(x.shape)}" for x in inputs)
    return cache_key("tuning", space=json.dumps(kernel.space, sort_keys=True, default=str),
                     defaults=json.dumps(kernel.defaults, sort_keys=True, default=str), inputs=shapes)


# ---------------------------------------------------------------------------------------- one trial


def evaluate(kernel: Candidate, params: dict, inputs: list[Tensor], reference: list[Tensor], device: str,
             warmup: int, reps: int) -> tuple[str, Any]:
    """Build, check, time: ("ok", median ms) or (reason, message) with reason in build/crash/wrong."""
    try:
        built = kernel.build(params)
    except Exception as e:
        return "build", f"{type(e).__name__}: {e}"
    with torch.no_grad():
        try:
            got = built.fn(inputs)
        except Exception as e:
            return "crash", f"{type(e).__name__}: {e}"
        try:
            check(kernel.backend, got, reference)
        except Exception as e:
            return "wrong", f"{type(e).__name__}: {e}"
        try:
            t = interleaved({"candidate": lambda: built.fn(inputs)}, device=device, warmup=warmup, reps=reps,
                            rounds=min(reps, 5))
        except Exception as e:
            return "crash", f"{type(e).__name__} while timing: {e}"
    return "ok", t["candidate"].own


class _InProcess:
    """Trials in this process: cheapest; a hang cannot be stopped."""

    def __init__(self, kernel: Candidate, inputs: list[Tensor], reference: list[Tensor], device: str,
                 warmup: int, reps: int) -> None:
        self.kernel, self.device, self.warmup, self.reps = kernel, device, warmup, reps
        self.inputs = [x.to(device) for x in inputs]
        self.reference = [r.to(device) for r in reference]

    def __call__(self, params: dict) -> tuple[str, Any]:
        return evaluate(self.kernel, params, self.inputs, self.reference, self.device, self.warmup, self.reps)

    def compare(self, points: dict[str, dict], incumbent: str) -> Decision:
        return compare_points(self.kernel, points, incumbent, self.inputs, self.device, self.warmup, self.reps)

    def close(self) -> None:
        pass


class _Isolated:
    """Trials in a spawned worker process; one past `timeout_s`, or one that kills the worker, is failed and
    the next trial starts a fresh worker. Starting a worker is not counted in `timeout_s`."""

    def __init__(self, label: str, kernel: Candidate, factory: Callable[[], Candidate] | None, inputs: list[Tensor],
                 reference: list[Tensor], device: str, warmup: int, reps: int, timeout_s: float) -> None:
        make = factory or functools.partial(_same, kernel)
        try:
            pickle.dumps(make)
        except Exception as e:
            what = "kernel_factory" if factory else f"the kernel ({type(kernel).__name__})"
            raise TypeError(f"fxcc: tuning {label} in a worker process (isolate=True) needs {what} to be "
                            f"picklable, and it is not ({type(e).__name__}: {e}); pass kernel_factory=, a "
                            "module-level function returning the kernel, or isolate=False") from None
        self.label, self.timeout_s = label, timeout_s
        self.args = (make, [x.detach().cpu() for x in inputs], [r.detach().cpu() for r in reference], device,
                     warmup, reps, torch.get_num_threads())
        self.ctx = _worker_context()
        self.proc: Any = None
        self.conn: Any = None

    def __call__(self, params: dict) -> tuple[str, Any]:
        return self._ask(params, self.timeout_s)

    def _ask(self, params: Any, timeout_s: float) -> tuple[str, Any]:
        if self.proc is None:
            self._start()
        try:
            self.conn.send(params)
        except OSError:  # the worker died after its last answer
            self._kill()
            self._start()
            self.conn.send(params)
        if not self.conn.poll(timeout_s):
            self._kill()
            return "timeout", f"no result after {timeout_s:g} s; the worker process was killed"
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self._kill()
            return "crash", f"the worker process died (exit code {code})"

    def compare(self, points: dict[str, dict], incumbent: str) -> Decision:
        """The final comparison, in the worker (where the kernel runs safely); a failure there is raised."""
        status, value = self._ask((incumbent, points), 6 * len(points) * self.timeout_s)
        if status != "compared":
            raise RuntimeError(f"{_REASONS.get(status, status)}: {value}")
        return value

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True, name="fxcc-tune")
        self.proc.start()
        child.close()
        self.conn = parent
        limit = max(STARTUP_S, self.timeout_s)
        if not parent.poll(limit):
            self._kill()
            raise RuntimeError(f"fxcc: tuning {self.label}: the worker process did not start within {limit:g} s")
        try:
            status, message = parent.recv()
        except (EOFError, OSError):
            status, message = "died", f"exit code {self._kill()}"
        if status != "ready":
            self._kill()
            raise RuntimeError(f"fxcc: tuning {self.label}: the worker process could not set up the kernel "
                               f"({message}); check kernel_factory, or tune with isolate=False to debug")

    def _kill(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.kill()
        proc.join(10)
        self.conn.close()
        return proc.exitcode

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except OSError:
                pass
            self._kill()


def _worker_context() -> Any:
    """Workers fork from a clean server process that imported torch once (fast restarts after a crash or a
    hang); never from this process, whose CUDA state and held locks a fork would copy. Spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fxcc.autotune.tune"])
    return ctx


def _same(kernel: Candidate) -> Candidate:
    return kernel


def _worker(conn: Any, make: Callable[[], Candidate], inputs: list[Tensor], reference: list[Tensor], device: str,
            warmup: int, reps: int, threads: int) -> None:
    """The worker process: set up once, then evaluate the parameters it is sent until it is sent None."""
    torch.set_num_threads(threads)
    try:
        kernel = make()
        inputs = [x.to(device) for x in inputs]
        reference = [r.to(device) for r in reference]
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            params = conn.recv()
        except EOFError:  # the tuner went away
            return
        if params is None:
            return
        if isinstance(params, tuple):  # (incumbent, {name: params}): the final comparison
            try:
                conn.send(("compared", compare_points(kernel, params[1], params[0], inputs, device, warmup, reps)))
            except Exception as e:
                conn.send(("crash", f"{type(e).__name__}: {e}"))
            continue
        conn.send(evaluate(kernel, params, inputs, reference, device, warmup, reps))
