"""One thread pool per model on the CPU, where TVM kernels cannot join torch's: the choice checked on the model.

Normally TVM kernels run on torch's OpenMP threads (fxcc.codegen.tvm_omp) and there is one pool. When
that launcher is unavailable (no C compiler), they run on TVM's own pool, and this module applies.

Generated TVM code runs its parallel loops on TVM's thread pool; torch's ops, MKL and oneDNN run on
torch's OpenMP pool. Codegen times each kernel's candidates alone, where either pool has the cores to
itself. In the model they alternate: after a torch op, OpenMP's workers spin for a while, and a TVM
kernel that starts then shares a core with a spinning thread until the spin ends; TVM's sleeping
workers are woken for every kernel. Each switch costs up to a few hundred microseconds, a cost no
isolated timing sees, and a model whose kernels switch pools dozens of times per call can lose more
than the generated kernels won.

`settle` therefore times the model as chosen against the same model with every kernel that involves
TVM's pool on its fastest torch-pool candidate (measured alongside it by codegen), interleaved, on the
compile's example inputs, and moves to torch's pool only if that beats the choice beyond the noise. The outcome is stored in the artifact cache under the
set of kernels and choices it judged, so a warm compile applies it without timing again, unless its timings were
too noisy to settle it (fxcc.measure.Decision.doubt): then the next compiles time it again, up to
FXCC_SETTLE_TRIES in all. A graph that
calls ops outside fxcc's kernels (custom ops kept eager) is not run for this: they may have side effects.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from fxcc.codegen import extern, tvm_omp
from fxcc.codegen.executable import BuiltKernel, build_executable
from fxcc.dialects import KERNEL_OPS, Choice, set_choice
from fxcc.measure import Decision, compare, measure_again, settle_record, settle_text
from fxcc.store import cache_key, default_cache

log = logging.getLogger(__name__)

TORCH_POOL = ("extern", "onednn", "mkl", "trim")  # candidate labels whose code runs on torch's pool only


def on_tvm_pool(label: str) -> bool:
    """Whether a candidate runs code on TVM's pool (`tvm+extern`/`tvm+onednn` run on both pools)."""
    return label.split("+")[0] == "tvm"


def settle(gm: fx.GraphModule, flat: list, name: str, kernels: dict[str, BuiltKernel], reps: int = 6) -> bool:
    """Keep the faster of the model as chosen and the model on torch's pool alone (see the module doc).
    `kernels` are what the codegen decision built (by kernel key); a switch rewrites the kernel ops'
    choices and replaces their entries. Returns whether kernels were switched."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS]
    ks = [kernels[key] for key in dict.fromkeys(n.args[1] for n in nodes) if key in kernels]
    movable = {k.key: alt for k in ks if on_tvm_pool(k.backend) and (alt := _torch_pool_choice(k)) is not None}
    if not movable:
        return False
    if tvm_omp.enabled() or any(n.op == "call_function" and n.target not in KERNEL_OPS
                                and n.target is not operator.getitem for n in gm.graph.nodes):
        return False
    cache, key = _decision_key(ks)
    entry = cache.get(key) if cache else None
    chosen = {k: kernels[k] for k in movable}
    moved = {k: BuiltKernel(kernels[k].body, Choice(label, "extern"), extern.load(kernels[k].body, label, {}, {}),
                            kernels[k].timings_ms) for k, label in movable.items()}
    if entry is not None and "settled" in entry.meta and not measure_again(entry.meta):
        keep = bool(entry.meta.get("torch_pool"))
        note = f"{entry.meta.get('note', '')} ({settle_text(entry.meta, cached=True)}, from the artifact cache)"
    else:  # not decided yet, or decided on timings too noisy to settle it (or by an fxcc that kept no record)
        was = entry.meta if entry is not None else None
        exe_a, bound_a, _ = build_executable(gm, kernels)
        _apply(nodes, kernels, moved)
        exe_b, bound_b, _ = build_executable(gm, kernels)
        d = _compare({"as chosen": lambda: exe_a(*flat, *bound_a), "torch pool": lambda: exe_b(*flat, *bound_b)}, reps)
        keep = d.winner == "torch pool"
        note = (f"whole model {d.timings['as chosen']} as chosen, {d.timings['torch pool']} with TVM's pool left "
                "out: " + ("moved to torch's pool" if keep else "kept"))
        record = settle_record(d, was)
        said = settle_text(record, again=was is not None)
        if cache:
            try:
                cache.put(key, {}, {"kind": "pool-plan", "torch_pool": keep, "note": note, **record},
                          supersedes=lambda old: "settled" not in old or measure_again(old))
            except OSError as e:  # the next compile times again
                log.warning("could not store the pool decision for %s: %s", name, e)
        note = f"{note} ({said})"
    _apply(nodes, kernels, moved if keep else chosen)
    for k in movable:
        kernels[k].note = note
    log.info("%s: %s (%d kernels)", name, note, len(movable))
    return keep


def _apply(nodes: list[fx.Node], kernels: dict[str, BuiltKernel], new: dict[str, BuiltKernel]) -> None:
    """Make `new` the kernels of their keys: in the table, and as the choices their ops record."""
    kernels.update(new)
    for n in nodes:
        if n.args[1] in new:
            set_choice(n, new[n.args[1]].choice)


def _torch_pool_choice(k: BuiltKernel) -> str | None:
    """The fastest torch-pool candidate codegen timed for kernel `k`, if any."""
    t = {label: ms for label, ms in k.timings_ms.items() if label in TORCH_POOL}
    return min(t, key=t.get) if t else None


def _compare(fns: dict[str, Callable[[], Any]], reps: int) -> Decision:
    """The model as chosen (the incumbent) against it on torch's pool alone, interleaved."""
    with torch.no_grad():
        return compare(fns, "as chosen", device="cpu", warmup=2, reps=reps, rounds=min(reps, 3))


def _decision_key(ks: list[BuiltKernel]) -> tuple[Any, str]:
    """The artifact cache and the key of a decision: the kernels, their choices, the target, the libraries."""
    try:
        cache = default_cache()
    except Exception as e:  # no usable cache: decide in this process only
        log.debug("pool decision not cached: %s", e)
        cache = None
    plan = ";".join(sorted(f"{k.key}={k.backend}" for k in ks))
    return cache, cache_key("pool-plan", target="cpu", plan=plan)
