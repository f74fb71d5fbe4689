"""Tensor-parallel plans measured on the model: each plan's IR built from one capture, run and timed on every rank.

The plan space, cost model and launcher are fxcc.autotune.tp_plan; this module captures and runs models,
so it sits in the top layer with the runtime it builds variants for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from fxcc.autotune.tp_plan import CostModel, TPPlan, is_view
from fxcc.codegen.executable import build_executable

from . import ir, measure
from .capture import capture, flatten_inputs
from .measure import Timing, interleaved
from .options import CompileOptions
from .pipeline import PassContext, PassManager, parse_pipeline
from .runtime import Variant, graphable

log = logging.getLogger(__name__)


def plan_graphs(model: torch.nn.Module, args: tuple, kwargs: dict, plans: list[TPPlan]) -> dict[str, fx.GraphModule]:
    """Each plan's IR as rank 0 would compile it, built in this one process (no devices or ranks needed)."""
    ctx = PassContext(options=CompileOptions(), module=model, example_inputs=(args, kwargs))
    cap = capture(model, args, kwargs)
    base = PassManager(parse_pipeline("canonicalize,raise")).run(cap.gm, ctx)
    out = {}
    for p in plans:
        passes = p.passes().replace(f"tp-shard{{tp={p.tp}}}", f"tp-shard{{tp={p.tp},rank=0}}")
        try:
            out[p.name] = PassManager(parse_pipeline(passes)).run(ir.clone_graph(base), ctx) if passes else base
        except ValueError as e:  # e.g. a tp that does not divide the heads: not a plan for this model
            log.info("plan %s skipped: %s", p.name, e)
    return out



def build_variant(base: fx.GraphModule, captured: Any, passes: str, ctx: Any, name: str,
                  cuda_graphs: bool = True) -> Any:
    """A runnable Variant of `base` (an IR after `raise`) with `passes` (a plan's pipeline part) applied.

    Lets one capture serve every plan of a search: each plan transforms its own copy of the graph.
    """
    gm = ir.clone_graph(base)
    ctx = dataclasses.replace(ctx, kernels={})  # this plan's own kernels
    if passes:
        gm = PassManager(parse_pipeline(passes)).run(gm, ctx)
    exe, bound, kernels = build_executable(gm, ctx.kernels)
    graphs = cuda_graphs and ctx.target == "cuda" and graphable(gm)
    return Variant(captured, gm, exe, [], 0.0, bound, "pending" if graphs else None, name, kernels=kernels)


def rank_timings(call: Callable[[], object], *, device: str, warmup: int, reps: int, rounds: int,
                 gate: Callable[[], None] | None = None, eager: Callable[[], object] | None = None,
                 eager_threads: int = 1) -> tuple[Timing, Timing | None]:
    """Time a call that spans every rank (collectives inside), in lockstep, interleaved round by round with the
    uncompiled model: each round first passes `gate` (every rank waits there while another process times eager:
    the search's), or else times `eager` on rank 0 alone at `eager_threads` threads while the others wait at a
    barrier (under torchrun). Every rank makes the same calls in the same order; the slowest rank's estimate is
    the plan's latency. Returns (this rank's timing of `call`, rank 0's timing of `eager` or None).
    """
    import torch.distributed as dist

    rank, own = dist.get_rank(), torch.get_num_threads()
    lead = gate is None and eager is not None and rank == 0

    def eager_calls(n: int) -> list[float]:
        torch.set_num_threads(eager_threads)
        try:
            return [measure.timed(eager, device) for _ in range(n)]
        finally:
            torch.set_num_threads(own)

    for _ in range(warmup):
        call()
    if lead:
        eager_calls(warmup)
    mine, ref = Timing([]), Timing([])
    per_round = max(1, reps // rounds)
    for _ in range(rounds):
        if gate is not None:
            gate()
        elif eager is not None:
            dist.barrier()
            if lead:
                ref.samples.extend(eager_calls(per_round))
            dist.barrier()
        mine.samples.extend(measure.timed(call, device) for _ in range(per_round))
    return mine, (ref if lead else None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure_plans(model: torch.nn.Module, args: tuple, kwargs: dict, plans: list[TPPlan], *, warmup: int = 5,
                  reps: int = 30, device: str = "cuda", log: Callable[[str], None] = print,
                  cost: CostModel | None = None) -> dict[str, Any]:
    """On every rank, in lockstep: capture once, build each plan, check it against TP=1, time it.

    Returns {plan name: {"ms": median, "p10", "p90", "rel_err_vs_tp1", "pipeline"}}; ranks time the same
    calls in the same order, so collectives line up.
    """
    ctx = PassContext(options=CompileOptions(), module=model, example_inputs=(args, kwargs), target=device)
    cap = capture(model, args, kwargs)
    base = PassManager(parse_pipeline("canonicalize,raise")).run(cap.gm, ctx)
    flat, _ = flatten_inputs(args, kwargs)
    variants, outs = {}, {}
    failed = {}
    for p in plans:
        try:
            v = build_variant(base, cap, p.passes(), ctx, p.name)
            with torch.inference_mode():
                out = v.run(flat)
        except Exception as e:  # noqa: BLE001 - a plan that fails is reported and left out of the search
            failed[p.name] = f"{type(e).__name__}: {e}"
            log(f"plan {p.name} failed: {failed[p.name]}")
            continue
        outs[p.name] = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
        variants[p.name] = v
        log(f"built {p.name}: {p.passes() or '(no tp passes)'}; graph: {v.cuda_graph is not None}")
    ref = outs.get("tp1")

    def call(v=None):
        def run():
            with torch.inference_mode():
                return v.run(flat)
        return run

    timings = interleaved({k: call(v) for k, v in variants.items()}, device=device, warmup=warmup, reps=reps)
    result: dict[str, Any] = {k: {"failed": v} for k, v in failed.items()}
    return result | {p.name: {"ms": timings[p.name].median, "p10": timings[p.name].quantile(0.1),
                     "p90": timings[p.name].quantile(0.9), "pipeline": p.passes(),
                     "rel_err_vs_tp1": rel_err(outs[p.name], ref) if ref is not None else None,
                     "kernels": kernel_count(variants[p.name].gm),
                     "model_ms": cost.graph_time(variants[p.name].gm, p.tp) * 1e3 if cost and not p.rest else None}
                     for p in plans if p.name in variants}


def kernel_count(gm: fx.GraphModule) -> int:
    """Call nodes that launch work (views and getitems do not)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and not is_view(n))
