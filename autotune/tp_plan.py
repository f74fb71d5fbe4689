"""Tensor-parallel plan search: TP degree, fused all-reduce + RMSNorm, token split and its ratio.

A plan is a pipeline suffix (tp-shard, fuse-allreduce-rmsnorm options). Plans for device counts present
are chosen by measurement (fxcc.tp_bench.measure_plans, one process per device, `launch`); an analytical cost model
(`CostModel`: GEMM FLOPs and bytes per op against measured matmul rate and HBM bandwidth, all-reduce
volume against a measured latency + bandwidth fit) ranks the rest, e.g. TP=4 and TP=8 on a 2-GPU host.
`compare` reports how the model's predictions relate to what was measured.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from fxcc.codegen.allreduce_rmsnorm import split_rows
from fxcc.measure import Timing, time_once

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class TPPlan:
    """One point of the search space. fused=False means NCCL all-reduce, add and RMSNorm as separate ops."""

    tp: int = 1
    fused: bool = False
    split: bool = False
    ratio: float = 0.5
    impl: str = "auto"
    rest: str = ""  # passes after the TP ones, e.g. "fuse,codegen" (fxcc's kernels for everything else)

    @property
    def name(self) -> str:
        s = "tp1" if self.tp == 1 else f"tp{self.tp}" + (f"-fused[{self.impl}]" if self.fused else "-unfused")
        s += f"-split{self.ratio:g}" if self.split and self.tp > 1 else ""
        return s + (f"+{self.rest.replace(',', '+')}" if self.rest else "")

    def passes(self) -> str:
        """The pipeline part after `raise` that realises this plan."""
        out = []
        if self.tp > 1:
            out.append(f"tp-shard{{tp={self.tp}}}")
            if self.fused:
                opts = [f"impl={self.impl}"] + ([f"split=true,ratio={self.ratio:g}"] if self.split else [])
                out.append("fuse-allreduce-rmsnorm{" + ",".join(opts) + "}")
        return ",".join(out + ([self.rest] if self.rest else []))


def tp_degrees(max_tp: int) -> list[int]:
    """1 and the powers of two up to `max_tp`."""
    return [1] + [2 ** i for i in range(1, max(max_tp, 1).bit_length()) if 2 ** i <= max_tp]


def space(max_tp: int, ratios: tuple[float, ...] = (0.5,), impls: tuple[str, ...] = ("auto",)) -> list[TPPlan]:
    """Every plan up to `max_tp` ranks (powers of two): unfused, fused per impl, fused + split per ratio."""
    plans = [TPPlan(1)]
    tp = 2
    while tp <= max_tp:
        plans.append(TPPlan(tp))
        for impl in impls:
            plans.append(TPPlan(tp, True, impl=impl))
            plans.extend(TPPlan(tp, True, True, r, impl) for r in ratios)
        tp *= 2
    return plans


def suggest(trial: Any, max_tp: int, impls: tuple[str, ...], ratios: tuple[float, ...]) -> TPPlan:
    """One plan sampled by an Optuna trial, define-by-run: `tp`; then `tp.allreduce` (unfused, or fused with an
    impl); then, when fused, `tp.split` (off or a ratio)."""
    tp = trial.suggest_categorical("tp", tp_degrees(max_tp))
    if tp == 1:
        return TPPlan(1)
    ar = trial.suggest_categorical("tp.allreduce", ["unfused", *(f"fused[{i}]" for i in impls)])
    if ar == "unfused":
        return TPPlan(tp)
    split = trial.suggest_categorical("tp.split", ["off", *ratios])
    impl = ar[len("fused["):-1]
    return TPPlan(tp, True, split != "off", 0.5 if split == "off" else float(split), impl)


def trial_params(plan: TPPlan) -> dict[str, Any]:
    """The Optuna parameters `suggest` draws for `plan` (to enqueue it)."""
    if plan.tp == 1:
        return {"tp": 1}
    if not plan.fused:
        return {"tp": plan.tp, "tp.allreduce": "unfused"}
    return {"tp": plan.tp, "tp.allreduce": f"fused[{plan.impl}]", "tp.split": plan.ratio if plan.split else "off"}


def from_params(params: dict[str, Any]) -> TPPlan:
    """The plan an Optuna trial's parameters name (`suggest`'s inverse; no `tp`: TP=1)."""
    tp = int(params.get("tp", 1))
    ar = params.get("tp.allreduce", "unfused")
    if tp == 1 or ar == "unfused":
        return TPPlan(tp)
    split = params.get("tp.split", "off")
    return TPPlan(tp, True, split != "off", 0.5 if split == "off" else float(split), ar[len("fused["):-1])


# ------------------------------------------------------------------------------------ cost model


@dataclass
class Rates:
    """Measured ceilings: bf16 matmul FLOP/s, HBM bytes/s, the cost of one small kernel inside a CUDA graph,
    and per all-reduce kind (nccl, symm) a latency (s) and bandwidth (bytes/s) fit."""

    matmul: float = 7.0e14
    hbm: float = 4.0e12
    launch: float = 2.5e-6
    allreduce: dict[str, tuple[float, float]] = field(default_factory=lambda: {"nccl": (1.5e-5, 1.5e11),
                                                                               "symm": (8e-6, 1.5e11)})

    def ar(self, kind: str, nbytes: float, tp: int) -> float:
        """All-reduce time: latency + the bytes each rank moves, (tp-1)/tp of the message twice (ring)."""
        lat, bw = self.allreduce.get(kind, self.allreduce["nccl"])
        return lat + 2 * (tp - 1) / tp * nbytes / bw


def cpu_rates(threads: int) -> Rates:
    """Rates of this CPU at `threads` threads, measured (a 256^3 matmul, a 16 MB copy, a tiny op for the per-op
    cost) in a fraction of a second; the all-reduce fit is an assumed one for gloo over loopback TCP (80 us,
    1 GB/s), not measured here. What the search's cost model ranks CPU plans with."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b, big, tiny = torch.randn(256, 256), torch.randn(256, 256), torch.empty(1 << 22), torch.ones(8)

        def best(fn: Callable[[], object], n: int) -> float:
            fn()
            return Timing([time_once(fn, "cpu") for _ in range(n)]).quantile(0.2) * 1e-3
        mm = best(lambda: a @ b, 20)
        copy = best(big.clone, 10)
        op = best(lambda: tiny + 1, 50)
    finally:
        torch.set_num_threads(saved)
    gloo = (8e-5, 1e9)
    return Rates(matmul=2 * 256 ** 3 / mm, hbm=2 * big.numel() * 4 / copy, launch=op,
                 allreduce={"nccl": gloo, "symm": gloo})


def _bytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_bytes(x) for x in v)
    return 0


def is_view(node: fx.Node) -> bool:
    t = node.target
    if t is operator.getitem or not isinstance(t, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in t._schema.returns) or t is torch.ops.aten.reshape.default


class CostModel:
    """Analytical time of a plan's IR (after tp-shard / fuse-allreduce-rmsnorm) on one rank.

    Per node: GEMMs and attention at max(FLOPs / matmul rate, bytes / HBM bandwidth); every other op reads
    its inputs and writes its outputs once at HBM bandwidth; views are free; each kernel adds `launch`.
    Collectives: tx.all_reduce (NCCL, plus its copy), the fused ops (symm or NCCL, one pass over
    x, residual, y, s), and a token split hides min(part 1's all-reduce + norm, part 2's GEMM).
    The IR for any tp can be built without the devices (tp-shard{rank=0}), so plans for 4 or 8 GPUs are
    ranked from the same graph the 2-GPU plans run.
    """

    def __init__(self, rates: Rates, symm: bool = True):
        self.r, self.symm = rates, symm

    def _mm(self, m: int, n: int, k: int, nbytes: float) -> float:
        return max(2 * m * n * k / self.r.matmul, nbytes / self.r.hbm) + self.r.launch

    def _kind(self, impl: str) -> str:
        return "symm" if self.symm and impl in ("auto", "symm") else "nccl"

    def node_time(self, node: fx.Node, tp: int) -> float:
        """Seconds one call_function node costs on one rank."""
        t, r = node.target, self.r
        tx, aten = torch.ops.fxcc_tx, torch.ops.aten
        out = node.meta.get("val")
        ins = [a.meta.get("val") for a in node.all_input_nodes]
        io = sum(_bytes(v) for v in ins) + _bytes(out)
        if t in (aten.linear.default, aten.mm.default, aten.matmul.default):
            a, w = ins[0], ins[1]
            n = w.shape[0] if t is aten.linear.default else w.shape[-1]
            return self._mm(a.numel() // a.shape[-1], n, a.shape[-1], io)
        if t is tx.attention.default:
            q, k = ins[0], ins[1]
            flops = 4 * q.numel() * k.shape[-2] * (0.5 if node.args[5] else 1.0)
            return max(flops / r.matmul, io / r.hbm) + r.launch
        if t is tx.all_reduce.default:
            return r.ar("nccl", _bytes(out), tp) + 2 * _bytes(out) / r.hbm + r.launch
        if t is tx.all_reduce_rms_norm.default:
            nbytes = _bytes(ins[0])
            return r.ar(self._kind(node.args[5]), nbytes, tp) + 5 * nbytes / r.hbm + 2 * r.launch
        if t is tx.linear_all_reduce_rms_norm.default:
            a, w, res = ins[0], ins[1], ins[2]
            rows, h, k = res.numel() // res.shape[-1], res.shape[-1], a.shape[-1]
            kind, e = self._kind(node.args[6]), res.element_size()

            def part(n: int) -> tuple[float, float]:
                gemm = self._mm(n, h, k, (n * k + w.numel() + n * h) * e)
                return gemm, r.ar(kind, n * h * e, tp) + 4 * n * h * e / r.hbm + 2 * r.launch

            m = split_rows(rows, node.args[8])
            if m == 0:
                return sum(part(rows))
            (g1, c1), (g2, c2) = part(m), part(rows - m)
            return g1 + max(g2, c1) + c2
        if is_view(node):
            return 0.0
        return io / r.hbm + r.launch

    def graph_time(self, gm: fx.GraphModule, tp: int) -> float:
        """Seconds for one call of `gm` on one of `tp` ranks."""
        return sum(self.node_time(n, tp) for n in gm.graph.nodes if n.op == "call_function")


def fit_allreduce(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of a ring-volume model through two or more (bytes, seconds) points."""
    (b0, t0), (b1, t1) = min(samples), max(samples)
    slope = max((t1 - t0) / max(b1 - b0, 1), 1e-15)
    return max(t0 - slope * b0, 0.0), 1.0 / slope


def compare(predicted: dict[str, float], measured: dict[str, float]) -> dict[str, Any]:
    """How the model did on the plans that were measured: per plan ratio, and whether it ranks them alike."""
    names = [k for k in measured if k in predicted]
    ratio = {k: predicted[k] / measured[k] for k in names}
    by_model = sorted(names, key=predicted.__getitem__)
    by_meas = sorted(names, key=measured.__getitem__)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    agree = sum((predicted[a] < predicted[b]) == (measured[a] < measured[b]) for a, b in pairs)
    return {"predicted_over_measured": ratio, "pairwise_order_agreement": agree / len(pairs) if pairs else 1.0,
            "best_by_model": by_model[0] if by_model else None, "best_measured": by_meas[0] if by_meas else None,
            "median_ratio": statistics.median(ratio.values()) if ratio else None}


# ---------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank) if backend == "nccl" else None)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


class LaunchError(RuntimeError):
    """A rank of `launch` raised, died or ran past the timeout; the message says which rank and why."""


def launch(fn: Callable[..., Any], world: int, *args: Any, backend: str | None = None,
           start_method: str = "spawn", timeout: float | None = None,
           parent: Callable[[], None] | None = None) -> list[Any]:
    """Run fn(rank, world, *args) in `world` fresh processes (torchrun-style, one per device); JSON results.

    `fn` must be importable (a module-level function). gloo on the CPU, nccl where there is a GPU per rank.
    start_method="fork" skips re-importing torch in every process (CPU only, before CUDA is initialised), and
    hands `args` over as they are (no pickling). A rank that raises or dies, or ranks still running after
    `timeout` seconds (a collective that never completes), end every rank: LaunchError with the reason.
    `parent` runs in this process while the ranks run (e.g. timing eager between their rounds); an error it
    raises ends the ranks too.
    """
    import torch.multiprocessing as mp

    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo")
    with tempfile.TemporaryDirectory(prefix="fxcc-tp-") as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), backend, out_dir, fn, args), nprocs=world,
                                 join=False, start_method=start_method)
        end = None if timeout is None else time.monotonic() + timeout
        failed = None
        try:
            if parent is not None:
                try:
                    parent()
                except Exception as e:  # a rank's own error, when one raised first, says more: joined below
                    failed = f"{type(e).__name__}: {e}"
            while not ctx.join(timeout=1.0 if end is None else max(0.0, min(1.0, end - time.monotonic()))):
                if end is not None and time.monotonic() >= end:
                    raise LaunchError(f"{world} ranks still running after {timeout:.0f} s (a collective that "
                                      "never completes, or a rank far slower than the others)")
            if failed:
                raise LaunchError(f"the launching process: {failed}")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else str(e)
            raise LaunchError(f"rank {e.error_index}: {last}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results
