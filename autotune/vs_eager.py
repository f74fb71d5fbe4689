"""Never slower than eager: a compiled graph timed against the same module run eagerly, on the compile's example
inputs, with the one timer (fxcc.measure); the runtime keeps whichever is faster.

Kernel selection already keeps the library where generated code loses, kernel by kernel; this check covers what
kernel timings cannot see (launches between kernels, layout copies, the CUDA-graph wrapper, thread-pool
switches): the whole call, as the user makes it. Eager is the incumbent: the compiled graph is kept when it
measures faster beyond the noise (fxcc.measure.decide, without a least gain), and a settled tie runs eagerly
(compiling bought nothing there, and a tie on the compile's timing is a coin toss at every later call). A
verdict whose timings were too noisy to settle it (fxcc.measure.Decision.doubt) keeps the compiled graph unless
eager beat it beyond the noise; it is stored as unsettled, and the next compiles time it again, up to
FXCC_SETTLE_TRIES in all, before it is final. A graph that calls ops kept eager (custom ops: they may have
side effects) or ops that write their inputs is not run the extra times the timing needs, except a call that
carries a KV cache: its inputs are given their values back before each timed call, so the cache a prefill
writes in place (a static cache) is timed too; a write into the module's own state never is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxcc import ir
from fxcc.ir import is_view
from fxcc.measure import decide, interleaved, measure_again, settle_record, settle_text, until_settled
from fxcc.store import cache_key

log = logging.getLogger(__name__)

BUDGET_S = 1.0  # timing per decision, about, once both are warm (fewer repetitions for slow models)
MIN_REPS, MAX_REPS = 3, 20


@dataclass(frozen=True)
class Verdict:
    """Per-call ms of the compiled graph and of eager (the fastest fifth of the timed calls)."""

    compiled_ms: float
    eager_ms: float
    cached: bool = False  # measured by an earlier compile on this machine, read from the artifact cache
    plan: str | None = None  # taken from this plan file (its latency_ms and eager_ms), not timed here
    eager_wins: bool | None = None  # eager beat the compiled graph beyond the noise (None: by the two estimates)
    record: dict | None = None  # how settled the measurement was (fxcc.measure.settle_record); None: not timed here
    again: bool = False  # timed again because the verdict stored before was unsettled

    @property
    def keep_compiled(self) -> bool:
        if self.eager_wins is not None:
            return not self.eager_wins
        return self.compiled_ms <= self.eager_ms

    @property
    def remeasure(self) -> bool:
        """A stored verdict to time again: unsettled with tries left, or stored by an fxcc that kept no record."""
        return self.cached and (self.record is None or measure_again(self.record))

    def text(self) -> str:
        choice = "compiled kept" if self.keep_compiled else (
            "runs eagerly" if self.compiled_ms > self.eager_ms else "runs eagerly (no faster beyond the noise)")
        head = f"whole graph {self.compiled_ms:.3f} ms compiled, {self.eager_ms:.3f} ms eager: {choice}"
        if self.plan:
            return f"{head} (as plan {self.plan} recorded them)"
        said = settle_text(self.record, cached=self.cached, again=self.again)
        if self.cached:
            return f"{head} ({said}: measured by an earlier compile here, from the artifact cache)"
        if self.again or (self.record is not None and not self.record["settled"]):
            return f"{head} ({said})"
        return head


def unrepeatable(gm: fx.GraphModule, inputs_restored: bool = False) -> str | None:
    """Why running the graph extra times could change what the caller sees (None when it cannot).
    `inputs_restored`: the timing gives the call's inputs their values back before each call (a KV cache), so
    writes into the inputs (or into memory the graph allocated) are repeatable; writes into the module's own
    parameters and buffers never are."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return (f"one of {dist.get_world_size()} ranks: each rank timing alone could choose otherwise and leave the "
                "others waiting in a collective")
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        mutable = n.op == "call_function" and schema is not None and schema.is_mutable
        eager = n.meta.get("fxcc_eager")
        if inputs_restored and (eager == ir.EAGER_WRITTEN and not mutable or mutable and _writes_no_module_state(n)):
            continue
        if eager:
            return f"{n.name} runs eagerly ({eager})"
        if mutable:
            return f"{n.name} ({n.target}) writes its inputs"
    return None


def _writes_no_module_state(n: fx.Node) -> bool:
    """Whether every operand op `n` writes is (a view of) a call input or of memory the graph made, not of a
    parameter or buffer (a get_attr)."""
    for i, a in enumerate(n.target._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
        for x in v if isinstance(v, (list, tuple)) else (v,):  # a foreach op writes a list
            while isinstance(x, fx.Node) and is_view(x) and x.args and isinstance(x.args[0], fx.Node):
                x = x.args[0]
            if not isinstance(x, fx.Node) or x.op == "get_attr":
                return False
    return True


def judge(compiled: Callable[[], object], eager: Callable[[], object], device: str,
          was: Verdict | None = None, setup: dict[str, Callable[[], None]] | None = None) -> Verdict:
    """Time both calls interleaved (after one warm-up call each, which also sets the repetitions), more rounds while
    the decision is unsettled (up to 3x the repetitions); `was`: the unsettled stored verdict timed again;
    `setup`: untimed work before each call of "compiled" / "eager" (fxcc.measure.interleaved)."""
    setup = setup or {}
    with torch.no_grad():
        t0 = time.perf_counter()
        for name, fn in (("compiled", compiled), ("eager", eager)):
            if name in setup:
                setup[name]()
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        per_pair = max(time.perf_counter() - t0, 1e-6)
        reps = max(MIN_REPS, min(MAX_REPS, int(BUDGET_S / per_pair)))
        fns = {"compiled": compiled, "eager": eager}
        t = interleaved(fns, device=device, warmup=1, reps=reps, rounds=min(reps, 3), setup=setup)
        d = until_settled(t, lambda: interleaved(fns, device=device, warmup=0, reps=reps, rounds=min(reps, 3),
                                                 setup=setup),
                          "eager", 3 * reps, min_gain=0.0)
    timings = d.timings
    if d.winner == "eager" and (not d.settled or d.noisy):
        # too noisy to tell: the compiled graph unless eager beat it beyond the noise (its doubt is this decision's,
        # so the next compile times it again)
        d = decide(timings, "compiled", min_gain=0.0)
    # else compiled beat eager beyond the noise, or measured no faster and could not be much faster: eager
    return Verdict(timings["compiled"].own, timings["eager"].own, eager_wins=d.winner == "eager",
                   record=settle_record(d, was.record if was is not None else None), again=was is not None)


def planned(latency_ms: float | None, eager_ms: float | None, plan: str) -> Verdict | None:
    """The decision a plan recorded (the latency it measured applied, and eager's beside it), or None
    when it has no such numbers (a plan being written): then the compiled graph is kept, untimed."""
    if latency_ms is None or eager_ms is None:
        return None
    return Verdict(float(latency_ms), float(eager_ms), plan=plan)


def verdict_key(graph_key: str, program: str, device: str) -> str:
    """Where a verdict is kept: the graph (its key covers the model's code, weights, inputs and pipeline), the
    program built from it (final IR and kernel choices) and the machine (device, CPU features, threads)."""
    return "v" + cache_key("vs-eager", target=device, graph=graph_key, program=program)


def remembered(cache: Any, key: str) -> Verdict | None:
    """The verdict an earlier compile measured for `key`, or None: a warm compile does not time again."""
    entry = cache.get(key)
    if entry is None or "verdict.json" not in entry.files:
        return None
    try:
        doc = json.loads(entry.files["verdict.json"].read_bytes())
        wins = doc.get("eager_wins")
        return Verdict(float(doc["compiled_ms"]), float(doc["eager_ms"]), cached=True,
                       eager_wins=wins if isinstance(wins, bool) else None,
                       record=doc["record"] if isinstance(doc.get("record"), dict) else None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("verdict %s unreadable (%s): timing again", key, e)
        return None


def remember(cache: Any, key: str, verdict: Verdict, model: str) -> None:
    """Store `verdict` under `key`, with how settled it was; it replaces a stored one that was to be timed again."""
    doc = {"compiled_ms": verdict.compiled_ms, "eager_ms": verdict.eager_ms, "eager_wins": verdict.eager_wins,
           "record": verdict.record}
    settled = {"settled": verdict.record["settled"], "tries": verdict.record["tries"]} if verdict.record else {}
    try:
        cache.put(key, {"verdict.json": json.dumps(doc).encode()}, {"kind": "vs-eager", "model": model, **settled},
                  supersedes=lambda old: "settled" not in old or measure_again(old))
    except OSError as e:
        log.debug("verdict %s not stored: %s", key, e)
