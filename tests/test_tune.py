"""tune_kernel: defaults first, failing candidates pruned, crashes and hangs survived, studies persisted, and a
point kept only when it beats the defaults beyond the noise.

In-process timings come from an injected timer (`fxcc.measure.using_timer`): each test kernel states what a
call costs, so which point wins is decided by the test, never by the machine's load."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import pytest
import torch

optuna = pytest.importorskip("optuna")

from fxcc.autotune.study import open_storage  # noqa: E402
from fxcc.autotune.tune import TuneResult, tune_kernel  # noqa: E402
from fxcc.codegen import Built  # noqa: E402
from fxcc.measure import using_timer  # noqa: E402

X = torch.arange(12, dtype=torch.float32).reshape(3, 4)
REF = [X * 2]
COST: list[float] = []  # what each call of a test kernel costs in ms, appended by the call, read by the timer
BLOCK_MS = {1: 1.0, 2: 0.8, 4: 0.5, 5: 0.1}  # Doubler's cost per block (5 is fastest, and wrong)


def fake_timer(noise: float = 0.0, seed: int = 0):
    """A timer that calls fn and returns its stated cost times (1 + noise * U[0, 1))."""
    rng = random.Random(seed)

    def timer(fn, device):
        fn()
        return COST.pop() * (1 + noise * rng.random())
    return timer


@pytest.fixture(autouse=True)
def deterministic_timer():
    COST.clear()
    with using_timer(fake_timer()):
        yield


@dataclass
class Doubler:
    """A tiny kernel: out = 2 * x computed in `block`-sized column chunks; some choices misbehave.

    block 3: fails to build; 5: wrong results; "raise": raises when called; "crash": kills its process;
    "hang": never returns.
    """

    space: dict = field(default_factory=lambda: {"block": [1, 2, 3, 4, 5]})
    defaults: dict = field(default_factory=lambda: {"block": 2})
    backend: str = "test"

    def build(self, params: dict) -> Built:
        block = params["block"]
        if block == 3:
            raise RuntimeError("block 3 does not divide the tile")

        def fn(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            if block == "raise":
                raise IndexError("out of bounds")
            if block == "crash":
                os._exit(3)
            if block == "hang":
                time.sleep(3600)
            COST.append(BLOCK_MS.get(block, 1.0))
            x = inputs[0]
            out = torch.cat([c * 2 for c in x.split(block, dim=1)], dim=1)
            return [out + 1 if block == 5 else out]

        return Built(fn, source=f"# block={block}")

    def load(self, files, params):
        return self.build(params)


def misbehaving() -> Doubler:
    return Doubler(space={"block": [1, "crash", "hang"]}, defaults={"block": 1})


def tune(kernel=None, **kw) -> TuneResult:
    kw = {"trials": 10, "progress": False, "warmup": 0, "reps": 2, "study_name": "t", **kw}
    return tune_kernel(kernel or Doubler(), [X], REF, **kw)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_failing_candidates_are_pruned_and_the_search_completes(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    r = tune(sampler="grid", storage=storage)
    assert r.trials == 5 and r.pruned == 1 and r.failed == 1  # 5 gives wrong results, 3 does not build
    assert r.params["block"] in (1, 2, 4) and r.ms > 0 and r.defaults_ms is not None
    study = optuna.load_study(study_name="t", storage=storage)
    states = {t.user_attrs["params"]["block"]: t.state for t in study.trials}
    assert states[3] == states[5] == optuna.trial.TrialState.PRUNED
    reasons = {t.user_attrs["params"]["block"]: t.user_attrs.get("failure") for t in study.trials}
    assert reasons[3] == "build" and reasons[5] == "wrong" and reasons[1] is None


def test_a_candidate_that_raises_is_pruned():
    kernel = Doubler(space={"block": [2, "raise"]})
    r = tune(kernel, sampler="grid")
    assert r.params == {"block": 2} and r.failed == 1 and r.trials == 2


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_defaults_are_the_first_trial(sampler, tmp_path):
    storage = f"journal:{tmp_path}/j.log"
    r = tune(sampler=sampler, trials=4, storage=storage)
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    assert study.trials[0].user_attrs["params"] == {"block": 2}
    assert r.trials == 4 and r.ms <= r.defaults_ms


def test_isolated_crash_and_hang_are_failed_and_the_study_completes():
    r = tune(misbehaving(), sampler="grid", isolate=True, timeout_s=2.0)
    assert r.params == {"block": 1} and r.trials == 3 and r.failed == 2
    study = optuna.load_study(study_name="t", storage=open_storage(None))
    reasons = {t.user_attrs["params"]["block"]: t.user_attrs.get("failure") for t in study.trials}
    assert reasons == {1: None, "crash": "crash", "hang": "timeout"}


def test_isolated_trials_can_make_the_kernel_in_the_worker():
    r = tune(Doubler(space={"block": [1]}, defaults={"block": 1}), isolate=True, kernel_factory=misbehaving)
    assert r.params == {"block": 1} and r.failed == 0


def test_an_unpicklable_kernel_asks_for_a_factory():
    kernel = Doubler()
    kernel.hook = lambda: None  # lambdas do not pickle
    with pytest.raises(TypeError, match="kernel_factory="):
        tune(kernel, isolate=True)


def test_no_candidate_passing_is_an_error_naming_the_reasons():
    kernel = Doubler(space={"block": [3, 5]}, defaults={"block": 3})
    with pytest.raises(RuntimeError, match=r"tuning t: no candidate passed \(1 failed to build, 1 gave wrong"):
        tune(kernel, sampler="grid")


def test_the_study_persists_in_the_cache_dir_and_resumes(cache_dir):
    first = tune(sampler="random", trials=3)
    assert (cache_dir / "tuning.db").is_file()
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    second = tune(sampler="random", trials=2)
    assert second.trials == 2
    study = optuna.load_study(study_name="t", storage=open_storage(None))
    assert len(study.trials) == 5  # the defaults were not enqueued twice
    assert second.ms <= first.ms


def test_the_default_study_name_is_backend_and_key():
    assert tune(study_name=None, key="k123", trials=1).study_name == "test:k123"
    assert tune(study_name=None, trials=1).study_name.startswith("test:")


def test_the_time_budget_stops_the_search():
    r = tune(sampler="random", trials=1000, seconds=0.5)
    assert r.trials < 1000


def test_summary_names_best_and_defaults():
    text = tune(sampler="grid").summary()
    assert "5 trials (3 ok, 1 wrong results, 1 failed" in text and "defaults" in text and "block=" in text


def test_cmaes_searches_numeric_choices_by_index():
    pytest.importorskip("cmaes")
    kernel = Doubler(space={"block": [1, 2, 4], "unroll": [1, 2]}, defaults={"block": 2, "unroll": 1})
    r = tune(kernel, sampler="cmaes", trials=4)
    assert r.params["block"] in (1, 2, 4) and r.trials == 4 and r.defaults_ms is not None


def test_defaults_outside_the_space_are_reported(caplog):
    r = tune(Doubler(defaults={"block": 7}), sampler="random", trials=2)
    assert "defaults {'block': 7} are not a point of its space" in caplog.text and r.defaults_ms is None


@pytest.mark.parametrize("kw, message", [
    ({"sampler": "annealing"}, "unknown sampler 'annealing'"),
    ({"storage": "tuning.db"}, "neither an Optuna RDB URL"),
    ({"trials": 0}, "trials must be an integer >= 1"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_bad_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        tune(**kw)


def test_choices_optuna_cannot_store_are_rejected():
    with pytest.raises(ValueError, match=r"space\['tile'\] holds \(64, 32\)"):
        tune(Doubler(space={"tile": [(64, 32)]}))


def test_compile_takes_a_tune_budget():
    import fxcc

    assert fxcc.compile(torch.nn.Linear(2, 2), tune_budget=12).options.tune_budget == 12
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="tune_budget must be a positive number of trials"):
            fxcc.CompileOptions(tune_budget=bad)


@dataclass
class Costed:
    """Choices "a" (the defaults) and "b" with stated costs; `lucky`: "b" is fast for its first calls only."""

    costs: dict = field(default_factory=lambda: {"a": 1.0, "b": 0.5})
    lucky: bool = False
    space: dict = field(default_factory=lambda: {"mode": ["a", "b"]})
    defaults: dict = field(default_factory=lambda: {"mode": "a"})
    backend: str = "test"
    calls: dict = field(default_factory=dict)

    def build(self, params: dict) -> Built:
        mode = params["mode"]

        def fn(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            n = self.calls[mode] = self.calls.get(mode, 0) + 1
            slow = self.lucky and mode == "b" and n > 3
            COST.append(8.0 if slow else self.costs[mode])
            return [inputs[0] * 2]

        return Built(fn, source=f"# {mode}")


def test_a_lucky_single_timing_does_not_win():
    kernel = Costed(lucky=True, costs={"a": 1.0, "b": 0.1})
    r = tune(kernel, sampler="grid", reps=3)
    study = optuna.load_study(study_name="t", storage=open_storage(None))
    trial = {t.user_attrs["params"]["mode"]: t.value for t in study.trials}
    assert trial["b"] < trial["a"]  # its one trial was fast ...
    assert r.params == {"mode": "a"} and "defaults stays" in r.decision  # ... its re-timing was not


def test_a_point_that_wins_by_noise_only_is_not_kept():
    with using_timer(fake_timer(noise=0.4, seed=1)):  # "b" 3% faster, under 40% noise
        r = tune(Costed(costs={"a": 1.0, "b": 0.97}), sampler="grid")
    assert r.params == {"mode": "a"} and r.ms == r.defaults_ms
    assert "defaults stays" in r.decision and "±" in r.decision


def test_a_point_that_wins_beyond_the_noise_is_kept():
    with using_timer(fake_timer(noise=0.05, seed=1)):  # "b" twice as fast, under 5% noise
        r = tune(Costed(costs={"a": 1.0, "b": 0.5}), sampler="grid")
    assert r.params == {"mode": "b"} and r.ms < r.defaults_ms / 1.8
    assert "kept (2." in r.decision


def test_isolated_tuning_confirms_its_choice_in_the_worker():
    r = tune(Doubler(space={"block": [1, 2]}, defaults={"block": 1}), sampler="grid", isolate=True)
    assert r.params["block"] in (1, 2) and "defaults" in r.decision


def test_a_point_that_wins_beyond_the_noise_by_less_than_the_least_gain_is_not_kept():
    """Noise-free timings 2% apart: beyond any interval, but under MIN_GAIN (what a new process may not repeat)."""
    from fxcc.measure import MIN_GAIN, Timing, decide

    assert MIN_GAIN > 0.02
    with using_timer(fake_timer(noise=0.0, seed=1)):
        r = tune(Costed(costs={"a": 1.0, "b": 0.98}), sampler="grid")
    assert r.params == {"mode": "a"} and "defaults stays" in r.decision
    timings = {"a": Timing([1.0] * 20), "b": Timing([0.98] * 20)}
    assert decide(timings, "a").winner == "a" and decide(timings, "a", min_gain=0.0).winner == "b"
