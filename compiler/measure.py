"""Timing, the one timer: warm-up, then many repetitions in interleaved rounds (CUDA events on the GPU,
perf_counter on the CPU), robust estimates with their confidence interval, the one rule for keeping a
choice (`compare`: a challenger must beat the incumbent by more than the measured noise), and CUDA-graph
capture and replay timing (what the runtime replays).

Every measurement of fxcc goes through here: kernel selection and tuning (fxcc.autotune), the
mixed-precision search, DyCL's compiled-or-Python choice, the int8 GEMV's config choice and the benchmarks.
While a plan is applied (`pinned`), choices come from it: code that would time to choose asks `pinned_by()`
and takes the plan's choice, or its deterministic default, instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .options import settings

CONFIDENCE = 0.95  # of every interval a timing states, and so of every "faster" decision
ESTIMATE_Q = 0.2  # the quantile a timing is ranked by (see Timing.own)
NOISY = 0.5  # a timing whose interval is wider than this fraction of its estimate is too noisy to rank by
# the least a challenger must gain on the incumbent's estimate, besides beating it beyond the noise: a timing's
# interval covers the noise within one process, not what differs from one process to the next (where the
# memory lands, which thread pool is warm); re-timed in a new process, wins of 1-2% came out as losses
MIN_GAIN = 0.03
# a decision is settled when no candidate it did not keep could be more than this fraction faster than the one it
# kept: no other timing's interval reaches further than this below the kept one's estimate (see Decision.doubt)
SETTLE_GAIN = 0.10


@dataclass
class Timing:
    """Per-call times in milliseconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(q * len(s)))]

    @property
    def own(self) -> float:
        """The time to rank candidates by: the fastest fifth of the calls. On a shared machine a preemption
        adds a scheduler slice (milliseconds) to some calls only; a median then ranks kernels by when they
        were interrupted, a low quantile by their own cost."""
        return self.quantile(ESTIMATE_Q)

    @property
    def interval(self) -> tuple[float, float]:
        """A distribution-free CONFIDENCE interval of `own` (the ESTIMATE_Q quantile), from the samples' order
        statistics: no assumption about the shape of the noise. With few samples it widens to their extremes."""
        s = sorted(self.samples)
        lo, hi = _order_ranks(len(s), ESTIMATE_Q, CONFIDENCE)
        return s[lo], s[hi]

    @property
    def spread(self) -> float:
        """The interval's width over the estimate: the measured noise, as a fraction."""
        lo, hi = self.interval
        return (hi - lo) / self.own if self.own > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY

    def __str__(self) -> str:
        return f"{self.own:.4g} ms ±{50 * self.spread:.0f}%"


def _order_ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """0-based ranks (lo, hi) of sorted samples that bracket the q-quantile with probability >= `confidence`
    (the count of samples below it is Binomial(n, q)); clipped to the extremes when n is too small."""
    alpha = (1 - confidence) / 2
    cdf, acc = [], 0.0
    for k in range(n + 1):
        acc += math.comb(n, k) * q ** k * (1 - q) ** (n - k)
        cdf.append(acc)
    lo = max([k for k in range(n) if cdf[k] <= alpha], default=0)  # P(at most lo samples below it) <= alpha
    hi = min([k for k in range(n) if 1 - cdf[k] <= alpha], default=n - 1)  # P(more than hi below) <= alpha
    return min(lo, n - 1), max(hi, lo)


def beats(challenger: Timing, incumbent: Timing, min_gain: float = 0.0) -> bool:
    """Whether `challenger` is faster than `incumbent` by more than the measured noise: its interval lies wholly
    below the incumbent's (so the difference holds at CONFIDENCE, not only on these samples), and its estimate
    is at least `min_gain` (a fraction) below the incumbent's."""
    return (challenger.interval[1] < incumbent.interval[0]
            and challenger.own <= (1.0 - min_gain) * incumbent.own)


def time_once(fn: Callable[[], object], device: str) -> float:
    """One call's wall time in ms; on CUDA measured with events around the call."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


_timer: Callable[[Callable[[], object], str], float] = time_once


def timed(fn: Callable[[], object], device: str) -> float:
    """One call's time in ms by the timer in use (the clock, or a test's `using_timer`)."""
    return _timer(fn, device)


@contextlib.contextmanager
def using_timer(timer: Callable[[Callable[[], object], str], float]) -> Iterator[None]:
    """Every timing in this process taken by `timer(fn, device) -> ms` instead of the clock (tests inject
    a timer with known costs and noise, so decisions made by measurement can be checked exactly)."""
    global _timer
    saved, _timer = _timer, timer
    try:
        yield
    finally:
        _timer = saved


_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("fxcc_pinned", default=None)


@contextlib.contextmanager
def pinned(plan: str | None) -> Iterator[None]:
    """Within: the choices of a compile and its calls come from plan file `plan` (None: as before), and
    nothing is timed to make one (a Triton GEMM's config at its first call takes its default)."""
    token = _pinned.set(plan) if plan is not None else None
    try:
        yield
    finally:
        if token is not None:
            _pinned.reset(token)


def pinned_by() -> str | None:
    """The plan file the current compile or call applies (see `pinned`), or None."""
    return _pinned.get()


def interleaved(fns: dict[str, Callable[[], object]], *, device: str, warmup: int, reps: int,
                rounds: int = 5, progress: Callable[[str], None] | None = None,
                setup: dict[str, Callable[[], None]] | None = None) -> dict[str, Timing]:
    """Time several callables in alternating rounds, so drift on a shared machine hits all alike. `setup`: per
    name, what runs before each of its calls, untimed (a call that changes its inputs gets them back)."""
    setup = setup or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            if name in setup:
                setup[name]()
            fn()
        if progress:
            progress(f"warmed up {name}")
    out = {name: Timing([]) for name in fns}
    per_round = max(1, reps // rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            if name in setup:
                for _ in range(per_round):
                    setup[name]()
                    out[name].samples.append(_timer(fn, device))
                continue
            out[name].samples.extend(_timer(fn, device) for _ in range(per_round))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return out


@dataclass
class Decision:
    """The outcome of `compare`: every timing, the incumbent, and the winner (the incumbent unless a
    challenger beats it by more than the noise)."""

    timings: dict[str, Timing]
    incumbent: str
    winner: str

    @property
    def noisy(self) -> list[str]:
        return [name for name, t in self.timings.items() if t.noisy]

    @property
    def doubt(self) -> str | None:
        """Why this decision is not settled, or None when it is.

        Settled: no other candidate's CONFIDENCE interval reaches more than SETTLE_GAIN below the kept one's
        estimate, so none could be much faster than what is kept. A challenger kept for beating the incumbent beyond
        the noise leaves the incumbent's interval above its own, so a two-way win is always settled; an incumbent
        that stays is settled only when every challenger's lower bound lies near or above the incumbent's
        estimate. Timings taken while the machine was busy (a sample ten times the median among them) widen the
        intervals until that fails: such a decision is used, but not taken as final (see `settle_tries`)."""
        kept = self.timings[self.winner].own
        for name, t in self.timings.items():
            low = t.interval[0]
            if name != self.winner and low < (1.0 - SETTLE_GAIN) * kept:
                could = f"{kept / low:.1f}x" if low > 0 else "far"
                return (f"{name}'s interval reaches {low:.4g} ms, so it could be {could} faster than {self.winner} "
                        f"({kept:.4g} ms): the noise is too wide to tell")
        return None

    @property
    def settled(self) -> bool:
        return self.doubt is None

    @property
    def speedup(self) -> float:
        """The incumbent's estimate over the winner's (1.0 when the incumbent stays)."""
        return self.timings[self.incumbent].own / self.timings[self.winner].own

    def summary(self) -> str:
        """One line: each timing with its noise, and what was kept and why."""
        times = ", ".join(f"{name} {t}" for name, t in self.timings.items())
        if self.winner != self.incumbent:
            verdict = f"{self.winner} kept ({self.speedup:.2f}x {self.incumbent}, beyond the noise)"
        else:
            verdict = f"{self.incumbent} stays (no other beats it beyond the noise and the least gain asked)"
        if self.noisy:
            verdict += (f"; too noisy to rank: {', '.join(self.noisy)} (interval over {NOISY:.0%} of the "
                        "estimate: the machine is busy)")
        if (doubt := self.doubt) is not None:
            verdict += f"; unsettled: {doubt}"
        return f"{times}: {verdict}"


def decide(timings: dict[str, Timing], incumbent: str, min_gain: float = MIN_GAIN) -> Decision:
    """The fastest timing that beats the incumbent's beyond the noise and by `min_gain`, else the incumbent."""
    rivals = [n for n, t in timings.items() if n != incumbent and beats(t, timings[incumbent], min_gain)]
    return Decision(timings, incumbent, min(rivals, key=lambda n: timings[n].own) if rivals else incumbent)


def compare(fns: dict[str, Callable[[], object]], incumbent: str, *, device: str, warmup: int = 3, reps: int = 20,
            rounds: int = 5, max_reps: int | None = None, min_gain: float = MIN_GAIN) -> Decision:
    """Time `fns` interleaved and keep a challenger only if it beats `incumbent` beyond the noise and by
    `min_gain`. While a timing is too noisy to rank (see NOISY), more rounds are taken, up to `max_reps` calls
    each (default 3x)."""
    if incumbent not in fns:
        raise ValueError(f"compare: the incumbent {incumbent!r} is not among the timed callables {list(fns)}")
    rounds = max(1, min(rounds, reps))
    timings = interleaved(fns, device=device, warmup=warmup, reps=reps, rounds=rounds)
    return until_settled(timings, lambda: interleaved(fns, device=device, warmup=0, reps=reps, rounds=rounds),
                         incumbent, max_reps if max_reps is not None else 3 * reps, min_gain)


def until_settled(timings: dict[str, Timing], more: Callable[[], dict[str, Timing]], incumbent: str, limit: int,
                  min_gain: float = MIN_GAIN) -> Decision:
    """The decision on `timings`, after adding `more()` interleaved rounds to them while one is too noisy to rank or
    the decision is not settled (Decision.doubt), as long as each callable stays within `limit` timed calls."""
    d = decide(timings, incumbent, min_gain)
    step = len(timings[incumbent].samples)  # the calls of one batch, as the first one took
    while (d.noisy or not d.settled) and step and len(timings[incumbent].samples) + step <= limit:
        for name, t in more().items():
            timings[name].samples.extend(t.samples)
        d = decide(timings, incumbent, min_gain)
    return d


def settle_tries() -> int:
    """How many compiles measure a decision that stays unsettled before its last outcome is kept as final
    (FXCC_SETTLE_TRIES, default 3; 1: the first measurement is final, settled or not)."""
    return settings().settle_tries


def settle_record(decision: Decision | None, was: dict | None = None) -> dict | None:
    """What a cache keeps of a measured decision besides its outcome: whether it was settled (Decision.doubt) and
    why not, each timing's noise (its interval's width over its estimate) and interval, and how many compiles have
    measured it (one more than the stored record `was` of the unsettled decision this one measured again). None
    when nothing was timed."""
    if decision is None:
        return None
    return {"settled": decision.settled, "doubt": decision.doubt or "", "tries": (was or {}).get("tries", 0) + 1,
            "noise": {name: round(t.spread, 4) for name, t in decision.timings.items()},
            "interval_ms": {name: [round(x, 4) for x in t.interval] for name, t in decision.timings.items()}}


def measure_again(record: dict) -> bool:
    """Whether a stored decision (its `settle_record`) is to be measured again rather than applied: it was not
    settled and fewer than `settle_tries()` compiles have measured it."""
    return not record.get("settled", True) and record.get("tries", 1) < settle_tries()


def settle_text(record: dict | None, *, cached: bool = False, again: bool = False) -> str:
    """How a decision stands, for `explain` and logs: "cached (settled)", "re-measured (was unsettled)", still
    unsettled and measured again by the next compile, or unsettled after the last try and kept as final."""
    if record is None or "settled" not in record:
        return "re-measured (was unsettled)" if again else "cached" if cached else ""
    tries, limit = record.get("tries", 1), settle_tries()
    if cached:
        if record["settled"]:
            return "cached (settled)" if tries else "cached"
        return f"cached (unsettled after {tries} measurement(s), kept as final: {record.get('doubt', '')})"
    head = "re-measured (was unsettled)" if again else "measured"
    if record["settled"]:
        return f"{head}; settled"
    if tries >= limit:
        return f"{head}; unsettled after {tries} measurement(s), kept as final: {record['doubt']}"
    return f"{head}; unsettled (try {tries} of {limit}), measured again by the next compile: {record['doubt']}"


def capture_graph(fn: Callable[[], object], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured as one CUDA graph, after `warmup` calls on a side stream (lazy initialisation and
    autotuning must not happen inside the capture); returns the graph and what the captured call returned.
    Raises what capturing raises (an op that cannot be captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # "thread_local" (as Inductor's CUDA-graph trees capture): unsafe calls of other threads (a library's
    # worker loading a module) do not end this thread's capture; this thread's own still do
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def graph_timings(graphs: dict[str, torch.cuda.CUDAGraph], *, calls: int = 1, rounds: int = 3,
                  before: Callable[[], object] | None = None) -> dict[str, Timing]:
    """ms per call of each captured graph (holding `calls` calls), replayed in interleaved rounds; each timed
    replay follows an untimed one. `before` runs ahead of every timed replay (a barrier between ranks)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = {name: Timing([]) for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            g.replay()
            if before is not None:
                before()
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            out[name].samples.append(start.elapsed_time(end) / calls)
    return out
