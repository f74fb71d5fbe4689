"""Timing, the one timer: warm-up, then many repetitions in interleaved rounds (CUDA events on the GPU,
perf_counter on the CPU), and CUDA-graph capture and replay timing (what the runtime replays).

Every measurement of fxcc goes through here: kernel selection and tuning (fxcc.autotune), the
mixed-precision search, DyCL's compiled-or-Python choice, the int8 GEMV's config choice and the benchmarks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
        return self.quantile(0.2)


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


def interleaved(fns: dict[str, Callable[[], object]], *, device: str, warmup: int, reps: int,
                rounds: int = 5, progress: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Time several callables in alternating rounds, so drift on a shared machine hits all alike."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if progress:
            progress(f"warmed up {name}")
    out = {name: Timing([]) for name in fns}
    per_round = max(1, reps // rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            out[name].samples.extend(time_once(fn, device) for _ in range(per_round))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return out


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
    with torch.cuda.graph(graph):
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
