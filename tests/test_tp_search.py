"""The parallel plan in `fxcc search` (issue 22): TP trials in 2 gloo processes, a failing one pruned with its
reason, and the plan applied in a 2-process launch with no search and no measurement."""

from __future__ import annotations

import fxcc
import pytest
import torch
from fxcc import measure, plan_search
from fxcc.autotune import tp_plan
from fxcc.autotune.plan import PlanError, read_plan
from fxcc.autotune.search import SearchConfig, build_space
from fxcc.autotune.tp_plan import TPPlan, launch
from test_plan_complete import _count
from test_tp import tiny_llama

optuna = pytest.importorskip("optuna")  # the GPU machine has none: these run on the CPU
pytest.importorskip("transformers")


class Llama(torch.nn.Module):
    """The tests' tiny Llama, returning its last hidden state (no KV cache)."""

    def __init__(self):
        super().__init__()
        self.m = tiny_llama(2)

    def forward(self, ids):
        return self.m(ids, use_cache=False).last_hidden_state


IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))


def _by_threads(fn, device):
    """A timer for the search: a call at one thread (a rank's) costs 1 ms, at more (eager, TP=1) 3 ms. The
    ranks inherit it (forked), so the parallel plan wins whatever the shared machine does."""
    fn()
    return 1.0 if torch.get_num_threads() == 1 else 3.0


def _search(tmp_path, trials: int) -> tuple:
    model = Llama().eval()
    cfg = SearchConfig(output=str(tmp_path / "plan.json"), trials=trials, knobs=["tp"], nproc=2, backends=["extern"],
                       reps=2, warmup=1, seed=0, plot="", progress=False,
                       storage=f"sqlite:///{tmp_path / 'study.db'}")
    return model, plan_search.search(model, (IDS,), {}, cfg)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranks of one thread each
    try:
        with measure.using_timer(_by_threads):
            return _search(tmp_path_factory.mktemp("tp-search"), trials=2)
    finally:
        torch.set_num_threads(saved)


def test_tp_knob_needs_processes_and_samples_the_whole_plan():
    assert build_space("cpu", ["extern"], ["tp"]).parallel is None
    assert "tp: not searched (1 process; --nproc 2" in build_space("cpu", ["extern"], ["tp"]).notes[0]
    space = build_space("cpu", ["extern"], ["tp"], nproc=2)
    assert space.parallel.max_tp == 2 and space.baseline() == {"tp": 1}
    for plan in tp_plan.space(2, (0.25, 0.5), ("auto",)):
        assert tp_plan.from_params(tp_plan.trial_params(plan)) == plan
    study = optuna.create_study()
    study.enqueue_trial(tp_plan.trial_params(TPPlan(2, True, True, 0.25)))
    trial = study.ask()
    assert "tp-shard{tp=2},fuse-allreduce-rmsnorm{impl=auto,split=true,ratio=0.25}" in space.suggest(trial)


@pytest.mark.slow
def test_search_with_tp_on_two_processes_records_a_parallel_plan(searched):
    _, result = searched
    plan = read_plan(result.plan_path)
    assert plan.parallel["tp"] == 2 and plan.parallel["backend"] == "gloo"
    assert "tp-shard{tp=2}" in plan.pipeline
    assert plan.target["id"].split(":threads=")[1].startswith("1:")  # each rank's threads
    assert plan.latency_ms == pytest.approx(1.0) and plan.eager_ms == pytest.approx(3.0)
    assert len(plan.search["ranks"]["ms"]) == 2 and plan.kernels
    # the cost model's best parallel plan ran right after the baseline, on two ranks
    study = optuna.load_study(study_name=plan.search["study"], storage=f"sqlite:///{result.plan_path[:-9]}study.db")
    assert [t.params["tp"] for t in study.trials] == [1, 2]
    assert study.trials[1].user_attrs["ranks"]["ms"] == [1.0, 1.0]


def _applied(rank: int, world: int, path: str) -> dict:
    """One rank: apply the plan (the process group is launch's, as under torchrun), counting measurements."""
    with pytest.MonkeyPatch.context() as mp:
        counts = _count(mp)
        for name in ("timed", "time_once"):
            mp.setattr(measure, name, lambda *a, _n=name, **k: counts.update([_n]) or 0.0)
        torch.set_num_threads(1)
        model = Llama().eval()
        got = fxcc.compile(model, plan=path)(IDS)
    with torch.no_grad():
        ref = model(IDS)
    return {"measured": dict(counts), "max_diff": (got - ref).abs().max().item(), "sum": got.double().sum().item()}


@pytest.mark.slow
def test_applying_the_parallel_plan_on_two_ranks_measures_nothing_and_equals_tp1(searched):
    _, result = searched
    ranks = launch(_applied, 2, result.plan_path, backend="gloo", start_method="fork")
    for r in ranks:
        assert r["measured"] == {}, r
        assert r["max_diff"] < 2e-5, r
    assert ranks[0]["sum"] == ranks[1]["sum"]


def test_applying_the_parallel_plan_outside_a_launch_says_how(searched):
    model, result = searched
    with pytest.raises(PlanError, match=r"torchrun --nproc-per-node 2"):
        fxcc.compile(model, plan=result.plan_path)


@pytest.mark.slow
def test_a_failing_parallel_trial_is_pruned_with_its_reason(tmp_path, monkeypatch):
    import torch.distributed as dist

    real = plan_search.compile

    def failing_on_ranks(*args, **kwargs):  # forked ranks inherit the patch; this process is no rank
        if dist.is_initialized():
            raise RuntimeError("injected rank fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_search, "compile", failing_on_ranks)
    _, result = _search(tmp_path, trials=2)
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}")
    failed = study.trials[1]
    assert failed.state == optuna.trial.TrialState.PRUNED and failed.params["tp"] == 2
    assert failed.user_attrs["failure"] == "failed"
    assert "rank 0: RuntimeError: injected rank fault" in failed.user_attrs["error"] \
        or "rank 1: RuntimeError: injected rank fault" in failed.user_attrs["error"]
    assert read_plan(result.plan_path).parallel == {}  # the TP=1 trial is the plan
