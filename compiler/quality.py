"""`compile(quality_budget=...)`: measure what approximate passes cost and back their knobs off to fit.

Quality loss = 1 - the smallest cosine similarity between the approximate graph's outputs and the exact
graph's (the captured graph before any pass; exact passes keep outputs within fp tolerance of it), taken
over the rows (last dimension: a token's hidden state, a sample's logits) of every floating-point output
tensor, on the call's inputs (the calibration inputs). `quality_loss` is fxcc's one quality metric: the
quality budget, the plan search and the mixed-precision pass all measure with it.

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
    """1 - the smallest cosine similarity between matching rows (over the last dimension) of every
    floating-point output tensor of `approx` and `reference` (any pytrees of tensors).

    Rows that equal the reference exactly (zero padding) count as exact; integer and bool outputs are not
    compared (an approximation may change an argmax). NaN when an output is not finite; ValueError when the
    outputs differ in number or shape (not an approximation of the same thing).
    """
    ref = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    got = [t for t in pytree.tree_leaves(approx) if isinstance(t, torch.Tensor)]
    if len(ref) != len(got):
        raise ValueError(f"the outputs hold {len(got)} tensors, the reference's {len(ref)}")
    worst = 1.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            raise ValueError(f"an output's shape changed: {tuple(b.shape)} vs {tuple(a.shape)}")
        if not a.is_floating_point() or a.numel() == 0:
            continue
        x = a.detach().double().reshape(-1, a.shape[-1]) if a.dim() else a.detach().double().reshape(1, 1)
        y = b.detach().double().reshape(x.shape)
        if not torch.isfinite(y).all():
            return float("nan")
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30)
        same = (x == y).all(dim=-1)  # rows that agree exactly (zero padding) are not a loss
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
