"""Tune results are kept: a tuned kernel choice supersedes an untuned one in the artifact cache, `fxcc tune` says
what it stored and where, and the next process loads the tuned choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import fxcc
import pytest
from fxcc import cli, store
from fxcc.store import ArtifactCache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    store._default.clear()
    yield tmp_path / "cache"
    store._default.clear()


TUNED_MODEL = """
import torch

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU()).eval()

def inputs():
    return (torch.randn(4, 16),)
"""

LOAD = """
import json, sys, fxcc, torch
sys.path.insert(0, sys.argv[1])
from m import model, inputs
cm = fxcc.compile(model(), passes="canonicalize,raise,fuse,codegen")
cm(*inputs())
print(json.dumps([[k.key, k.backend, k.choice.params, k.cached] for k in cm.variants[-1].kernels.values()]))
"""


def test_a_tuned_choice_supersedes_an_untuned_one_and_is_what_the_next_process_loads(cache_dir, tmp_path, capsys):
    pytest.importorskip("tvm")
    pytest.importorskip("optuna")
    (tmp_path / "m.py").write_text(TUNED_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        from m import inputs, model
    finally:
        sys.path.remove(str(tmp_path))
    cm = fxcc.compile(model(), passes="canonicalize,raise,fuse,codegen")
    cm(*inputs())
    (k,) = cm.variants[-1].kernels.values()
    assert ArtifactCache(cache_dir).get(k.choice.key).meta["tuned"] == 0 and "stored in" in k.stored
    assert cli.main(["tune", f"{tmp_path / 'm.py'}:model", "--budget", "2", "--passes",
                     "canonicalize,raise,fuse,codegen"]) == 0
    out = capsys.readouterr().out
    entry = ArtifactCache(cache_dir).get(k.choice.key)
    assert entry.meta["tuned"] == 2  # the untuned entry was replaced
    assert f"{k.key} -> {entry.meta['backend']}" in out and f"stored in {entry.dir}" in out
    assert f"1 tuned choices stored in the artifact cache {cache_dir}" in out
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD), str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "FXCC_CACHE_DIR": str(cache_dir)}, timeout=600)
    assert p.returncode == 0, p.stderr
    ((key, backend, params, cached),) = json.loads(p.stdout.strip().splitlines()[-1])
    assert (key, backend, params, cached) == (k.key, entry.meta["backend"], entry.meta["params"], True)
    cm = fxcc.compile(model(), passes="canonicalize,raise,fuse,codegen", tune="search", tune_budget=1)
    cm(*inputs())  # fewer trials than the stored choice: the stored one is kept, and the report says so
    (k1,) = cm.variants[-1].kernels.values()
    assert k1.stored.startswith("kept the entry already in") and "tuned with 2 trials" in k1.stored
    assert ArtifactCache(cache_dir).get(k.choice.key).meta["tuned"] == 2
