"""`compile(quality_budget=...)`: measure what approximate passes cost and back their knobs off to fit.

Quality loss = 1 - the smallest cosine similarity between the approximate graph's outputs and the exact
graph's (the captured graph before any pass; exact passes keep outputs within fp tolerance of it), taken
per batch item over every floating-point output tensor, on the call's inputs (the calibration inputs).

While the loss exceeds the budget, one approximate pass at a time (in pipeline order, round robin) is
replaced by `pass.backoff(result)`, a weaker instance (layer-skip: one block fewer; token-merge: smaller r).
When no approximate pass can back off further, the compile is refused with a QualityBudgetError.
Each trial runs only the pipeline up to the last approximate pass, on a copy of the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import ir
from .pipeline import Pass, PassContext, PassManager, PassRecord

log = logging.getLogger(__name__)


class QualityBudgetError(RuntimeError):
    """Approximate passes lose more quality than `quality_budget` allows even at their weakest setting."""


def quality_loss(reference: Any, approx: Any) -> float:
    """1 - min cosine similarity of each floating output tensor vs the reference, per batch item (dim 0)."""
    ref = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    got = [t for t in pytree.tree_leaves(approx) if isinstance(t, torch.Tensor)]
    if len(ref) != len(got):
        raise ValueError(f"approximate graph returns {len(got)} tensors, the exact one {len(ref)}")
    worst = 1.0
    for a, b in zip(ref, got):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        if a.shape != b.shape:
            raise ValueError(f"approximate graph changed an output's shape: {tuple(b.shape)} vs {tuple(a.shape)}")
        rows = a.shape[0] if a.dim() > 1 else 1
        x, y = a.detach().double().reshape(rows, -1), b.detach().double().reshape(rows, -1)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
        same = (x == y).all(dim=-1)  # zero rows that agree exactly (padding) are not a loss
        worst = min(worst, float(torch.where(same, torch.ones_like(cos), cos).min()))
    return max(0.0, 1.0 - worst)


def _trial(passes: Sequence[Pass], gm: fx.GraphModule, flat: list[Any], ctx: PassContext
           ) -> tuple[list[PassRecord], Any]:
    pm = PassManager(list(passes))
    out = pm.run(ir.clone_graph(gm), ctx)
    with torch.no_grad():
        return pm.records, out(*flat)


def fit_quality_budget(passes: list[Pass], gm: fx.GraphModule, flat: list[Any], ctx: PassContext,
                       budget: float, model_name: str = "the model") -> tuple[list[Pass], float]:
    """The pipeline with approximate passes backed off until their quality loss is within `budget`.

    `gm` is the captured (exact) graph, left unchanged; `flat` its inputs. Returns the passes to compile
    with and their measured loss. Raises QualityBudgetError when the weakest settings still exceed it.
    """
    approx = [i for i, p in enumerate(passes) if not p.exact]
    if not approx:
        return passes, 0.0
    with torch.no_grad():
        reference = ir.clone_graph(gm)(*flat)
    current = list(passes)
    turn = 0
    while True:
        prefix = current[: approx[-1] + 1]
        records, out = _trial(prefix, gm, flat, ctx)
        loss = quality_loss(reference, out)
        specs = ", ".join(current[i].spec() for i in approx)
        log.info("quality of %s: loss %.5f (1 - min cosine vs exact), budget %g", specs, loss, budget)
        if loss <= budget:
            return current, loss
        for j in range(len(approx)):
            i = approx[(turn + j) % len(approx)]
            weaker = current[i].backoff(records[i].result)
            if weaker is not None:
                log.info("%s loses %.5f > quality_budget=%g on %s; backing off to %s",
                         current[i].spec(), loss, budget, model_name, weaker.spec())
                current[i] = weaker
                turn = (turn + j + 1) % len(approx)
                break
        else:
            raise QualityBudgetError(
                f"fxcc: {specs} on {model_name} loses {loss:.5f} (1 - min cosine similarity of the outputs vs the "
                f"exact pipeline, on the calibration inputs), over quality_budget={budget:g}, and no approximate "
                f"pass can back off further. Raise quality_budget, or remove "
                f"{' and '.join(current[i].name for i in approx)} from the pipeline.")
