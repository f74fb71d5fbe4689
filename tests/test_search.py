"""`fxcc search` and plan files: the search writes a plan and a Pareto PNG, a new process applies the plan,
mismatched plans are refused naming what differs, and workers sharing one storage finish one study."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import fxcc  # noqa: E402
from fxcc import cli, options  # noqa: E402
from fxcc.autotune import search  # noqa: E402
from fxcc.autotune.plan import PlanError, read_plan  # noqa: E402
from fxcc.pipeline import DEFAULT_PIPELINE, PASSES, Pass, PassResult, parse_pipeline  # noqa: E402
from fxcc.quality import quality_loss  # noqa: E402

# A tiny model and a test-only approximate pass (with its knob), registered when the file is loaded: by the
# CLI in this process, and by the worker and apply processes, as a user's model file would.
TINY = '''
from dataclasses import dataclass

import torch
import torch.nn as nn
from fxcc import options
from fxcc.pipeline import PASSES, Pass, PassResult, register


class Tiny(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


def model():
    torch.manual_seed(0)
    return Tiny().eval()


def inputs():
    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),)


@dataclass(frozen=True)
class Perturb(Pass):
    """Test only: adds `delta` to every output, an approximation that costs quality."""

    name = "test-perturb"
    reads = "tx"
    writes = "tx"
    exact = False
    delta: float = 0.0

    def apply(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = [gm.graph.call_function(torch.ops.aten.add.Tensor, (v, self.delta)) for v in out.args[0]]
        out.args = (tuple(new),)
        return PassResult(True, {"perturbed": len(new)})


if "test-perturb" not in PASSES:
    register(Perturb)
if not any(k.pass_name == "test-perturb" for k in options.KNOBS):
    options.KNOBS.append(options.Knob("test-perturb", {"delta": (0.02, 0.5)}))
'''

FAST = ["--backends", "extern", "--knobs", "test-perturb", "--reps", "2", "--warmup", "1", "--no-progress"]


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search on the tiny model: (directory, model file, plan path, stdout)."""
    d = tmp_path_factory.mktemp("search")
    (d / "tiny.py").write_text(TINY)
    plan = d / "plan.json"
    argv = ["search", f"{d / 'tiny.py'}:model", "--output", str(plan), "--trials", "6", "--seed", "0",
            "--storage", f"sqlite:///{d / 'study.db'}", *FAST]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return d, d / "tiny.py", plan, out.getvalue()


def _tiny(path):
    return cli.load_object(f"{path}:model", "model")(), cli.load_object(f"{path}:inputs", "inputs")()


# ---------------------------------------------------------------------------------------- the search


def test_search_writes_a_valid_plan_table_and_pareto_png(searched):
    d, _, path, out = searched
    plan = read_plan(path)
    assert json.loads(path.read_text())["fxcc_plan"] == 1
    assert plan.fingerprint["module"] == "Tiny"
    assert "fc1.weight: float32[32, 16]" in plan.fingerprint["tensors"]
    assert plan.fingerprint["inputs"] == ["args[0]: float32[4, 16] cpu"]
    assert plan.target["kind"] == "cpu" and f"threads={torch.get_num_threads()}" in plan.target["id"]
    # the approximate knob was searched (two objectives) and the chosen plan is within the default budget
    assert any("test-perturb" in row for row in plan.search["space"])
    assert plan.quality_error is not None and plan.quality_error <= search.DEFAULT_QUALITY_BUDGET
    assert "test-perturb{delta=0.5}" not in plan.pipeline  # costs ~0.7 of quality: never within budget
    assert [p.name for p in parse_pipeline(plan.pipeline)][-2:] == ["fuse", "codegen"]
    assert plan.kernels and all(k["backend"] == "extern" for k in plan.kernels.values())
    assert plan.latency_ms > 0 and plan.eager_ms > 0
    assert "* chosen" in out and plan.pipeline in out and "plan as applied" in out
    png = d / "plan.pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = optuna.load_study(study_name=plan.search["study"], storage=f"sqlite:///{d / 'study.db'}")
    assert len(study.trials) == 6 and len(study.directions) == 2
    assert study.trials[0].user_attrs["pipeline"] == DEFAULT_PIPELINE.replace("codegen", "codegen{backend=extern}")


APPLY = """
import json, sys, torch, fxcc
from fxcc import cli
torch.set_num_threads(int(sys.argv[3]))  # the plan was searched at the test process's thread count
model = cli.load_object(sys.argv[1] + ":model", "model")()
(x,) = cli.load_object(sys.argv[1] + ":inputs", "inputs")()
cm = fxcc.compile(model, plan=sys.argv[2])
out = cm(x)
v = cm.variants[-1]
print(json.dumps({"specs": [r.spec for r in v.records], "out": out.tolist(),
                  "codegen": v.records[-1].result.stats}))
"""


def test_plan_applied_in_a_new_process_reproduces_pipeline_and_outputs(searched):
    _, tiny, path, _ = searched
    plan = read_plan(path)
    p = subprocess.run([sys.executable, "-c", APPLY, str(tiny), str(path), str(torch.get_num_threads())],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["specs"] == [q.spec() for q in parse_pipeline(plan.pipeline)]
    assert got["codegen"].get("plan") == len(plan.kernels)  # every kernel from the plan, none chosen anew
    model, (x,) = _tiny(tiny)
    perturbed = fxcc.compile(model, passes=plan.pipeline, tune="off")(x)
    torch.testing.assert_close(torch.tensor(got["out"]), perturbed, atol=1e-5, rtol=1e-5)
    assert quality_loss(model(x), torch.tensor(got["out"])) == pytest.approx(plan.quality_error, abs=1e-6)


# ---------------------------------------------------------------------------------------- validation


def _edited(src, dst, **changes):
    data = json.loads(src.read_text())
    for k, v in changes.items():
        data[k] = v
    dst.write_text(json.dumps(data))
    return str(dst)


def test_plan_for_other_weights_shapes_or_class_is_refused(searched):
    _, tiny, path, _ = searched
    model, (x,) = _tiny(tiny)
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1
    with pytest.raises(PlanError, match="weight values differ"):
        fxcc.compile(model, plan=str(path))(x)
    wider = type(model)(hidden=48).eval()
    with pytest.raises(PlanError, match=r"'fc1.weight' is float32\[48, 16\] here, float32\[32, 16\]"):
        fxcc.compile(wider, plan=str(path))(x)
    with pytest.raises(PlanError, match="made for 'Tiny', this model is 'Linear'"):
        fxcc.compile(torch.nn.Linear(16, 8).eval(), plan=str(path))(x)


def test_plan_for_other_inputs_warns_and_still_applies(searched):
    _, tiny, path, _ = searched
    model, _ = _tiny(tiny)
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match=r"searched with inputs \['args\[0\]: float32\[4, 16\] cpu'\]"):
        out = fxcc.compile(model, plan=str(path))(x)
    assert out.shape == (2, 8)


def test_plan_for_another_target_is_refused(searched, tmp_path):
    d, tiny, path, _ = searched
    model, (x,) = _tiny(tiny)
    plan = json.loads(path.read_text())
    other = _edited(path, tmp_path / "threads.json", target={**plan["target"], "id": plan["target"]["id"].replace(
        f"threads={torch.get_num_threads()}", "threads=64")})
    with pytest.raises(PlanError, match=r"Only the thread count differs: call torch.set_num_threads\(64\)"):
        fxcc.compile(model, plan=other)(x)
    cuda = _edited(path, tmp_path / "cuda.json", target={**plan["target"], "kind": "cuda"})
    with pytest.raises(PlanError, match="searched for target 'cuda', but this compile targets 'cpu'"):
        fxcc.compile(model, plan=cuda)(x)
    with pytest.raises(PlanError, match="searched for target 'cpu', but this compile targets 'cuda'"):
        fxcc.compile(model, plan=str(path), target="cuda")  # an explicit target is checked at compile()


def test_plan_from_other_library_versions_is_refused(searched, tmp_path):
    _, tiny, path, _ = searched
    versions = json.loads(path.read_text())["versions"]
    old = _edited(path, tmp_path / "v.json", versions=versions.replace("torch=", "torch=1.0.0;was="))
    with pytest.raises(PlanError, match=r"other library versions \(torch 1\.0\.0 in the plan, 2\..* here"):
        fxcc.compile(_tiny(tiny)[0], plan=old)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"pipeline": "raise"}', "is not an fxcc plan"),
    ('{"fxcc_plan": 2, "pipeline": "raise"}', "format version 2; this fxcc reads version 1"),
    ('{"fxcc_plan": 1, "pipeline": "raise"}', "lacks fingerprint, target, versions, kernels"),
])
def test_malformed_plan_files_are_refused(tmp_path, text, message):
    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(PlanError, match=message):
        fxcc.compile(torch.nn.Linear(2, 2), plan=str(f))


def test_missing_plan_conflicting_passes_and_quality_budget(searched, tmp_path):
    _, tiny, path, _ = searched
    with pytest.raises(PlanError, match="cannot read plan"):
        fxcc.compile(torch.nn.Linear(2, 2), plan=str(tmp_path / "absent.json"))
    with pytest.raises(PlanError, match="Give either passes= or plan="):
        fxcc.compile(torch.nn.Linear(2, 2), plan=str(path), passes="canonicalize,raise")
    lossy = _edited(path, tmp_path / "lossy.json", quality_error=0.3)
    with pytest.raises(PlanError, match="quality error of 0.3, over quality_budget=0.1"):
        fxcc.compile(torch.nn.Linear(2, 2), plan=lossy, quality_budget=0.1)


def test_cli_reports_bad_arguments_without_a_traceback(searched, capsys):
    _, tiny, _, _ = searched
    assert cli.main(["search", f"{tiny}:model", "--trials", "0"]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    assert cli.main(["search", f"{tiny}:model", "--knobs", "nope"]) == 2
    assert "--knobs nope: no such knob" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- cooperation


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_on_one_storage_finish_one_study_without_lost_trials(searched, tmp_path, storage):
    _, tiny, _, _ = searched
    url = f"sqlite:///{tmp_path / 'shared.db'}" if storage == "sqlite" else f"journal:{tmp_path / 'shared.log'}"
    argv = [sys.executable, "-m", "fxcc.cli", "search", f"{tiny}:model", "--storage", url, "--study", "shared",
            "--trials", "2", *FAST]
    procs = [subprocess.Popen([*argv, "--output", str(tmp_path / f"plan{i}.json")], env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    from fxcc.autotune.study import open_storage

    trials = optuna.load_study(study_name="shared", storage=open_storage(url)).trials
    assert len(trials) == 4  # 2 + 2: every trial of both workers is in the study
    assert sorted(t.number for t in trials) == list(range(4))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    for i in range(2):  # each worker chose from the whole study
        assert read_plan(tmp_path / f"plan{i}.json").search["trials_in_study"] >= 2


_CLAIMER = """
import os, sys, time
import optuna
from fxcc.autotune.study import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="q", storage=open_storage(sys.argv[1]))
while not os.path.exists(sys.argv[2]):  # all workers start claiming at once
    time.sleep(0.005)
study.optimize(lambda t: t.suggest_float("x", 0, 100), n_trials=10)
"""


def test_workers_on_one_sqlite_storage_never_claim_the_same_queued_trial(tmp_path):
    # SQLite has no row locks: without fxcc's BEGIN IMMEDIATE, two workers both claim one queued trial and the
    # second to finish it fails ("Cannot tell a COMPLETE trial"); this failed 3 runs in 3 without it
    from fxcc.autotune.study import open_storage

    url, go = f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "go"
    study = optuna.create_study(study_name="q", storage=open_storage(url))
    for k in range(40):
        study.enqueue_trial({"x": float(k)})
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, url, str(go)], env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    trials = optuna.load_study(study_name="q", storage=open_storage(url)).trials
    assert len(trials) == 40 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["x"] for t in trials) == [float(k) for k in range(40)]  # each queued point ran once


# ---------------------------------------------------------------------------------------- pieces


def test_quality_error_is_one_minus_the_worst_row_cosine():
    ref = torch.randn(4, 8)
    assert quality_loss(ref, ref.clone()) == 0.0
    off = ref.clone()
    off[2] = -off[2]  # one row pointing the other way: cosine -1
    assert quality_loss(ref, off) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):  # not an approximation of the same output: the trial fails
        quality_loss(ref, torch.randn(4, 9))
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert math.isnan(quality_loss(ref, nan))  # NaN: rejected by the caller


def _trial(number, ms, err):
    return optuna.trial.create_trial(values=[ms, err], user_attrs={"latency_ms": ms, "quality_error": err,
                                                                  "pipeline": f"p{number}", "eager_ms": 10.0})


def test_pareto_front_and_choice_within_the_budget():
    ts = [_trial(0, 10.0, 0.0), _trial(1, 8.0, 0.001), _trial(2, 9.0, 0.002), _trial(3, 5.0, 0.3)]
    for i, t in enumerate(ts):
        t.number = i
    assert [t.number for t in search.pareto(ts)] == [3, 1, 0]
    assert search.choose(ts, "latency", 0.01).number == 1
    assert search.choose(ts, "latency", None).number == 3
    # trials are compared by latency relative to eager (timed interleaved), not by milliseconds: the machine's
    # speed may drift between trials
    slow_phase, fast_phase = _trial(5, 10.0, 0.0), _trial(6, 8.0, 0.0)
    slow_phase.user_attrs["eager_ms"], fast_phase.user_attrs["eager_ms"] = 20.0, 10.0
    slow_phase.number, fast_phase.number = 5, 6
    assert search.choose([fast_phase, slow_phase], "latency", None).number == 5
    assert [t.number for t in search.pareto([fast_phase, slow_phase])] == [5]
    lossy = _trial(9, 4.0, 0.2)
    lossy.number = 9
    with pytest.raises(RuntimeError, match=r"within --quality-budget 0.01; the smallest quality error was 0.2 "
                                           r"\(trial 9: p9\)"):
        search.choose([ts[3], lossy], "latency", 0.01)


@dataclass(frozen=True)
class _Policy(Pass):
    """Test only: a pass with a Literal option."""

    name = "test-policy"
    exact = False
    policy: Literal["fast", "safe"] = "safe"

    def apply(self, gm, ctx):
        return PassResult(False)


@dataclass(frozen=True)
class Idle(Pass):
    """Test only: a knob's pass that finds nothing to do on any model."""

    name = "test-idle"
    reads = "tx"
    writes = "tx"
    level: int = 0

    def apply(self, gm, ctx):
        return PassResult(False, {"found": 0})


def test_a_knob_that_changes_nothing_is_left_out_with_a_note(searched, monkeypatch):
    from fxcc.plan_search import probe

    monkeypatch.setitem(PASSES, "test-idle", Idle)
    model, args = _tiny(searched[1])
    space = search.Space([("test-idle", False, {"level": [1, 2]}), ("test-perturb", False, {"delta": [0.02, 0.5]})],
                         ["extern"], ["test-perturb"])
    kept = probe(space, model, args, {}, "cpu")
    assert [k[0] for k in kept.knobs] == ["test-perturb"] and kept.approximate == ["test-perturb"]
    assert "test-idle: not searched (changes nothing on this model even as test-idle{level=2}: found=0)" in kept.notes


def test_the_watchdog_stops_what_runs_past_its_time():
    from fxcc.plan_search import TrialTimeout, watchdog

    with pytest.raises(TrialTimeout, match="past its share of --timeout"), watchdog(0.05):
        time.sleep(30)
    with watchdog(None):  # no limit: nothing fires
        time.sleep(0.01)


def test_a_trial_past_the_timeout_is_stopped_and_pruned(searched, monkeypatch, tmp_path):
    from fxcc import plan_search

    monkeypatch.setattr(plan_search.Evaluator, "measure", lambda self, **kw: time.sleep(60))
    model, args = _tiny(searched[1])
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # --timeout counts from the search's start: leave the set-up before the first trial room on a loaded machine
    cfg = search.SearchConfig(output=str(tmp_path / "plan.json"), trials=3, timeout=6.0, storage=storage,
                              study_name="slow", backends=["extern"], knobs=[], progress=False)
    with pytest.raises(RuntimeError, match="1 stopped at --timeout 6 s: allow more time"):
        plan_search.search(model, args, {}, cfg)
    trials = optuna.load_study(study_name="slow", storage=storage).trials
    assert [t.user_attrs.get("failure") for t in trials] == ["timeout"]  # no trial started after it


def test_space_takes_present_knobs_and_notes_absent_ones(monkeypatch):
    monkeypatch.setitem(PASSES, "test-policy", _Policy)
    monkeypatch.setattr(options, "KNOBS", [options.Knob("test-policy", {"policy": ()}),
                                           options.Knob("no-such-pass", {"r": (1, 2)}),
                                           options.Knob("tp-shard", {"tp": ()}, min_devices=2)])
    space = search.build_space("cpu", ["auto", "extern"])
    assert [n for n, _, _ in space.knobs] == ["test-policy"]
    assert space.knobs[0][1] is True and space.knobs[0][2] == {"policy": ["fast", "safe"]}
    assert space.approximate == ["test-policy"]
    assert any(n.startswith("no-such-pass: not searched") for n in space.notes)
    assert any(n.startswith("tp-shard: not searched") for n in space.notes)
    study = optuna.create_study()
    study.enqueue_trial(space.baseline())
    assert space.suggest(study.ask()) == DEFAULT_PIPELINE
    assert search.pipeline_text(["a{x=1}"], ["b{y=2}"], "tvm") == DEFAULT_PIPELINE.replace(
        "raise", "a{x=1},raise,b{y=2}").replace("codegen", "codegen{backend=tvm}")
    with pytest.raises(ValueError, match="--knobs nope: no such knob"):
        search.build_space("cpu", None, ["nope"])


def test_search_command_line_help_names_the_issue_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    out = capsys.readouterr().out
    for opt in ("--inputs", "--output", "--target", "--trials", "--timeout", "--storage", "--quality-budget",
                "--objective"):
        assert opt in out
