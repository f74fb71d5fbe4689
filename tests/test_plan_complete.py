"""A plan pins every choice of a compile: applying one runs no timing and no search anywhere (issue 22).

Each measurement entry point of fxcc (the one timer, the decisions built on it, the mixed-precision search's
timing, quality runs and study, kernel tuning, the whole-graph check against eager, the pool and CUDA-graph
checks, DyCL's compiled-or-Python timing) is wrapped with a counter; a plan-less compile must call them (so the
counters count), and the compile applying its plan must call none and compute the same outputs.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc.autotune.mixed_precision import mixed_precision_report
from fxcc.autotune.plan import Plan, PlanError, model_fingerprint, read_plan, target_info
from fxcc.plan_search import plan_of

PIPELINE = "canonicalize,raise,mixed-precision{policy=auto,reps=2,trials=20,budget=0.05},fuse,codegen"

# module -> the functions in it that time, search or measure quality to make a choice
ENTRY_POINTS = {
    "fxcc.measure": ["time_once", "interleaved", "compare", "decide", "graph_timings", "capture_graph"],
    "fxcc.autotune.mixed_precision": ["_bench", "_bench_graph", "time_once", "interleaved", "graph_timings",
                                      "capture_graph", "quality_loss", "create_study"],
    "fxcc.autotune.select": ["compare", "tune_kernel"],
    "fxcc.autotune.tune": ["compare", "interleaved", "create_study"],
    "fxcc.autotune.pools": ["compare", "_compare"],
    "fxcc.autotune.vs_eager": ["interleaved", "judge"],
    "fxcc.runtime": ["pays", "fit_quality_budget"],
    "fxcc.cuda_graphs": ["compare", "pays"],
    "fxcc.dycl": ["interleaved", "_compare", "_median_us"],
    "fxcc.codegen.triton_gemv": ["time_candidates", "graph_timings"],
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def _count(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of calls to every measurement entry point from now on (module.function -> calls)."""
    seen: Counter = Counter()
    for module, names in ENTRY_POINTS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:  # Triton absent: nothing of it can time
            continue
        for name in names:
            fn = getattr(mod, name)

            def counted(*args, _fn=fn, _where=f"{module}.{name}", **kwargs):
                seen[_where] += 1
                return _fn(*args, **kwargs)

            monkeypatch.setattr(mod, name, counted)
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "1")  # the whole-graph check runs (tests turn it off elsewhere)
    return seen


@pytest.fixture
def calls(monkeypatch):
    return _count(monkeypatch)


@dataclass
class Searched:
    """The plan-less compile of PIPELINE (the search's choices), its outputs and the measurements it made."""

    model: nn.Module
    x: torch.Tensor
    compiled: Any
    outputs: torch.Tensor
    counts: Counter

    def plan(self, path, **changes) -> Plan:
        """The plan of what it chose (as `fxcc search` records it), with `changes` to its fields, saved."""
        plan = plan_of(self.compiled, PIPELINE, model_fingerprint(self.model, (self.x,)), target_info("cpu"))
        for name, value in changes.items():
            setattr(plan, name, value)
        plan.save(path)
        return plan


@pytest.fixture(scope="module")
def searched():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16, 64)
    with pytest.MonkeyPatch.context() as mp:
        counts = _count(mp)
        # compiled kept whatever the whole-graph timing says, so its outputs are the compiled ones
        cm = fxcc.compile(model, passes=PIPELINE, options={"graph_cache": False, "time_vs_eager": False})
        with torch.no_grad():
            out = cm(x)
    return Searched(model, x, cm, out, counts)


def test_applying_a_plan_measures_nothing_and_reproduces_the_outputs(searched, calls, tmp_path):
    # the counters count: the search timed each layer's precisions (what else it timed depends on those timings
    # and on what the artifact cache holds: kernel choices settled there by an earlier test are not timed again)
    assert searched.counts["fxcc.autotune.mixed_precision._bench"]
    plan = searched.plan(tmp_path / "plan.json", latency_ms=1.0, eager_ms=2.0)
    report = mixed_precision_report(searched.compiled)
    assert plan.precision == {r.node: {"module": r.module, "precision": r.precision, "kernel": r.kernel}
                              for r in report.layers}
    assert sorted(e["module"] for e in plan.precision.values()) == ["down", "head", "up"]
    assert read_plan(tmp_path / "plan.json").precision == plan.precision

    applied = fxcc.compile(searched.model, plan=str(tmp_path / "plan.json"))
    with torch.no_grad():
        got = applied(searched.x)
    assert dict(calls) == {}
    assert torch.equal(got, searched.outputs)
    again = mixed_precision_report(applied)
    assert [(r.node, r.precision, r.kernel) for r in again.layers] == \
        [(r.node, r.precision, r.kernel) for r in report.layers]
    assert again.search == "plan"
    variant = applied.variants[-1]
    assert {k: b.choice.backend for k, b in variant.kernels.items()} == \
        {k: e["backend"] for k, e in plan.kernels.items()}
    assert "as plan" in variant.vs_eager and "compiled kept" in variant.vs_eager


def test_the_plans_assignment_is_applied_as_written(searched, calls, tmp_path):
    model, x = searched.model, searched.x
    plan = searched.plan(tmp_path / "plan.json")
    by_module = {e["module"]: node for node, e in plan.precision.items()}
    plan.precision[by_module["up"]].update(precision="int8-weight", kernel="dequant")
    plan.precision[by_module["down"]].update(precision="keep", kernel="library")
    plan.precision[by_module["head"]].update(precision="int4", kernel="dequant")
    plan.latency_ms, plan.eager_ms = 3.0, 1.0  # the plan measured it slower than eager: it runs eagerly
    plan.save(tmp_path / "plan.json")

    calls.clear()
    applied = fxcc.compile(model, plan=str(tmp_path / "plan.json"))
    with pytest.warns(UserWarning, match="runs eagerly"), torch.no_grad():
        got = applied(x)
    assert dict(calls) == {}
    assert torch.equal(got, model(x))  # eager, as the plan's timings said
    rows = {r.module: (r.precision, r.kernel) for r in mixed_precision_report(applied).layers}
    assert rows == {"up": ("int8-weight", "dequant"), "down": ("keep", "library"), "head": ("int4", "dequant")}
    record = next(r for r in applied.variants[-1].records if r.spec.startswith("mixed-precision"))
    assert record.result.stats == {"keep": 1, "int8-weight": 1, "int4": 1}


def test_a_plan_naming_a_missing_linear_is_refused(searched, tmp_path):
    model, x = searched.model, searched.x
    plan = searched.plan(tmp_path / "plan.json")
    plan.precision["linear_99"] = {"module": "gone", "precision": "int8-weight", "kernel": "dequant"}
    plan.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match=r"linear 'linear_99' \(gone\), which this graph does not have.*fxcc search"):
        fxcc.compile(model, plan=str(tmp_path / "plan.json"))(x)

    first = next(iter(plan.precision))
    del plan.precision["linear_99"], plan.precision[first]
    plan.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match=f"assigns no precision to linear '{first}'"):
        fxcc.compile(model, plan=str(tmp_path / "plan.json"))(x)


def test_a_plan_with_a_malformed_or_missing_assignment_is_refused(searched, tmp_path):
    model, x = searched.model, searched.x
    plan = searched.plan(tmp_path / "plan.json")
    body = json.loads(plan.to_json())
    body["precision"] = {"linear": "int8"}
    (tmp_path / "bad.json").write_text(json.dumps(body))
    with pytest.raises(PlanError, match=r"precision\['linear'\] must be an object"):
        read_plan(tmp_path / "bad.json")
    plan.precision = {}  # a plan written before plans recorded the assignment
    plan.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="records no per-linear assignment"):
        fxcc.compile(model, plan=str(tmp_path / "plan.json"))(x)
