"""The `fxcc` command: explain, bench and passes, and its errors on bad input."""

from __future__ import annotations

import json
import os

import pytest
from fxcc import cli

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "llama_tiny.py")


def test_explain_shows_tx_ops_for_every_llama_layer(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model"]) == 0
    out = capsys.readouterr().out
    after_raise = out.split("IR after raise")[1].split("IR after")[0]
    layers = 2
    assert after_raise.count("= tx.rms_norm(") == 2 * layers + 1
    assert after_raise.count("= tx.attention(") == layers
    assert "== where ops run" in out and "kernel.fused[reduction]" in out


def test_explain_kernels_prints_bodies(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model", "--final-only", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "== kernels" in out and "func @reduction(" in out
    assert "IR after raise" not in out


@pytest.mark.parametrize("spec, message", [
    ("examples/missing.py:model", "no file"),
    (f"{EXAMPLE}:modle", "defines no 'modle'"),
    (f"{EXAMPLE}", "PATH.py:NAME"),
])
def test_explain_bad_model_spec(capsys, spec, message):
    assert cli.main(["explain", spec]) == 2
    assert message in capsys.readouterr().err


def test_explain_bad_pipeline_is_reported_with_a_caret(capsys):
    assert cli.main(["explain", f"{EXAMPLE}:model", "--passes", "canonicalize,rase"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'rase'" in err and "did you mean 'raise'" in err
    assert "\n  " + " " * len("canonicalize,") + "^" in err


def test_inputs_must_return_a_tuple(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("import torch\n\ndef model():\n    return torch.nn.Linear(2, 2)\n\n"
                 "def inputs():\n    return torch.randn(1, 2)\n")
    assert cli.main(["explain", f"{f}:model"]) == 2
    assert "must return a tuple" in capsys.readouterr().err


def test_bench_llama_prints_the_side_by_side_table(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    argv = ["bench", "llama", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "64", "--seq", "8", "--reps", "2", "--warmup", "1", "--threads", "1",
            "--engines", "eager,fxcc", "--json", str(out_json)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.startswith(("eager", "fxcc"))}
    assert rows == {"eager", "fxcc"}
    data = json.loads(out_json.read_text())
    fx = next(r for r in data["results"] if r["engine"] == "fxcc")
    assert fx["max_abs_err"] <= 1e-5 and fx["compile_s"] > 0


def test_passes_lists_the_registry(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("canonicalize", "raise", "fuse", "codegen"):
        assert f"\n{name} " in out
