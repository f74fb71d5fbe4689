"""The graph cache: a second compile of the same model takes its pre-codegen IR from the artifact cache.

Each test uses its own cache directory, so hits and misses come from what the test does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import fxcc
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_outputs_close
from fxcc import capture, graph_cache
from fxcc.store import ArtifactCache


class Block(nn.Module):
    def __init__(self, d: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x + self.down(F.gelu(self.up(self.norm(x)))) * self.scale
        return {"h": h, "mean": h.mean(-1)}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compile(model: nn.Module, x: torch.Tensor, **kw):
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=extern}", **kw)
    out = cm(x)
    return cm, out


def _graph_entries(cache_dir) -> list:
    return [e for e in ArtifactCache(cache_dir).entries() if e.meta.get("kind") == "graph"]


def test_second_compile_takes_the_ir_from_the_cache_and_gives_the_same_outputs(cache_dir):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    first, out1 = _compile(model, x)
    second, out2 = _compile(model, x)
    assert "graph cache" not in first.variants[-1].captured.method
    assert "graph cache" in second.variants[-1].captured.method
    assert len(_graph_entries(cache_dir)) == 1
    assert_outputs_close(out2, out1, atol=0, rtol=0)
    assert_outputs_close(out2, model(x))
    # the pass log of the first compile is carried over, and explain still shows the final IR
    assert [r.spec for r in second.variants[-1].records] == [r.spec for r in first.variants[-1].records]
    assert "== final IR" in second.explain() and "graph cache" in second.explain()


def test_other_weights_other_attributes_or_other_shapes_miss(cache_dir):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    _compile(model, x)
    other = Block().eval()  # same structure, other weights
    cm, out = _compile(other, x)
    assert "graph cache" not in cm.variants[-1].captured.method
    assert_outputs_close(out, other(x))
    eps = Block(eps=1e-3).eval()
    eps.load_state_dict(model.state_dict())
    cm, out = _compile(eps, x)
    assert "graph cache" not in cm.variants[-1].captured.method
    assert_outputs_close(out, eps(x))
    cm, out = _compile(model, torch.randn(2, 8, 32))
    assert "graph cache" not in cm.variants[-1].captured.method
    with torch.no_grad():
        model.up.weight.mul_(2)  # weights changed in place: the folded constants could depend on them
    cm, out = _compile(model, x)
    assert "graph cache" not in cm.variants[-1].captured.method
    assert_outputs_close(out, model(x))
    assert len(_graph_entries(cache_dir)) == 5


def test_a_damaged_graph_entry_is_evicted_with_a_warning_and_rebuilt(cache_dir):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    _compile(model, x)
    (entry,) = _graph_entries(cache_dir)
    path = entry.files["graph.json"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="damaged"):
        cm, out = _compile(model, x)
    assert "graph cache" not in cm.variants[-1].captured.method
    assert_outputs_close(out, model(x))
    assert len(_graph_entries(cache_dir)) == 1  # written again


def test_an_entry_that_does_not_load_falls_back_to_capture(cache_dir, caplog):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    _compile(model, x)
    (entry,) = _graph_entries(cache_dir)
    doc = json.loads(entry.files["graph.json"].read_bytes())
    for node in doc["graph"]:
        if node.get("target", "").startswith("op:"):
            node["target"] = "op:aten::no_such_op"
    # rewrite through the cache so checksums hold: the entry is intact but names an op this torch lacks
    ArtifactCache(cache_dir).remove(entry.key)
    ArtifactCache(cache_dir).put(entry.key, {"graph.json": json.dumps(doc).encode()}, entry.meta)
    with caplog.at_level("WARNING", logger="fxcc"):
        cm, out = _compile(model, x)
    assert "did not load" in caplog.text
    assert "graph cache" not in cm.variants[-1].captured.method
    assert_outputs_close(out, model(x))


def test_hooks_functions_and_the_option_turn_the_graph_cache_off(cache_dir):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    hooked = Block().eval()
    hooked.up.register_forward_hook(lambda m, i, o: o * 2)
    cm, out = _compile(hooked, x)
    assert_outputs_close(out, hooked(x))
    _compile(lambda t: t * 2 + 1, x)
    _compile(Block().eval(), x, options=fxcc.CompileOptions(graph_cache=False))
    assert _graph_entries(cache_dir) == []


def test_a_key_covers_the_pipeline_and_the_target():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    flat, spec = torch.utils._pytree.tree_flatten(((x,), {}))
    keys = {graph_cache.graph_key(model, flat, spec, p, t, calibrates=False)
            for p in ("canonicalize,raise,fuse", "canonicalize,fuse") for t in ("cpu", "cuda")}
    assert len(keys) == 4 and all(k and k.startswith("g") for k in keys)


WARM = """
import json, sys, torch
{extra}
sys.path.insert(0, {here!r})
from test_graph_cache import Block
import fxcc
torch.manual_seed(0)
model, x = Block().eval(), torch.randn(4, 8, 32)
cm = fxcc.compile(model)
out = cm(x)
v = cm.variants[-1]
codegen = next(r for r in v.records if r.spec.startswith("codegen"))
print(json.dumps({{"method": v.captured.method, "stats": codegen.result.stats,
                  "sum": float(out["h"].double().sum())}}))
"""


def test_a_new_process_compiles_without_capture_or_code_generation(cache_dir):
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "FXCC_CACHE_DIR": str(cache_dir)}

    def run(extra: str):
        code = WARM.format(here=here, extra=extra)
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    with warnings.catch_warnings():  # the warm process has imported other modules: the key does not care
        cold, warm = run(""), run("import fxcc.cli, fxcc.bench, email.mime.text")
    assert "graph cache" not in cold["method"] and "graph cache" in warm["method"]
    assert not warm["stats"].get("built") and warm["stats"].get("cached") == cold["stats"].get("built")
    assert warm["sum"] == cold["sum"]


def test_training_mode_is_part_of_the_key(cache_dir):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).eval(), torch.randn(16, 8)
    y_eval = fxcc.compile(model)(x)
    model.train()
    torch.manual_seed(1)
    cm = fxcc.compile(model)
    with torch.no_grad():  # with gradients enabled, training mode runs eagerly
        y_train = cm(x)
    assert "graph cache" not in cm.variants[-1].captured.method
    kept = y_train != 0
    assert not kept.all()  # dropout ran
    torch.testing.assert_close(y_train[kept], 2 * y_eval[kept])


def test_running_the_model_through_torch_compile_too_keeps_its_key():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 8, 32)
    flat, spec = torch.utils._pytree.tree_flatten(((x,), {}))
    before = graph_cache.graph_key(model, flat, spec, "p", "cpu", calibrates=False)
    torch.compile(model)(x)  # leaves a marker attribute on the module
    assert graph_cache.graph_key(model, flat, spec, "p", "cpu", calibrates=False) == before


KEY = """
import sys, torch
sys.path.insert(0, {here!r})
from test_graph_cache import Block
from fxcc import graph_cache
torch.manual_seed(0)
model, x = Block().eval(), torch.randn(4, 8, 32)
model.names = {{"alpha", "beta", "gamma", "delta", "epsilon"}}  # printed in hash-seed order
flat, spec = torch.utils._pytree.tree_flatten(((x,), {{}}))
print(graph_cache.graph_key(model, flat, spec, "p", "cpu", calibrates=False))
"""


def test_the_key_does_not_depend_on_the_process_hash_seed():
    here = os.path.dirname(os.path.abspath(__file__))
    keys = set()
    for seed in ("1", "2", "3"):
        p = subprocess.run([sys.executable, "-c", KEY.format(here=here)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
        assert p.returncode == 0, p.stderr
        keys.add(p.stdout.strip().splitlines()[-1])
    assert len(keys) == 1 and next(iter(keys)).startswith("g")


def test_libraries_of_another_site_packages_on_the_path_are_keyed_by_version(tmp_path, monkeypatch):
    """A venv whose .pth adds another installation's site-packages (a worktree's sharing main's): files there
    are libraries, not the project's, so importing one more of them does not change a model's code key."""
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    capture.install_roots.cache_clear()
    capture.in_project.cache_clear()
    try:
        assert not capture.in_project(str(site / "somelib" / "mod.py"))
        assert capture.in_project(str(tmp_path / "model.py"))
    finally:
        capture.install_roots.cache_clear()
        capture.in_project.cache_clear()


class _Scaled(nn.Module):
    scale = 1.0  # a class attribute, set at run time below

    def __init__(self, v: float):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.consts = [torch.full((8,), v)]  # a tensor inside a list attribute
        self.table = {"s": torch.tensor(v)}  # and inside a dict
        arr = np.ones(2000, dtype=np.float32)
        arr[1000] = v
        self.arr = arr  # a numpy array (its repr elides the middle)
        self.cfg = _Opaque(v)  # a plain object whose repr leaves its value out

    def forward(self, x):
        s = self.consts[0] * self.table["s"] * float(self.arr[1000]) * self.cfg.s * self.scale
        return self.lin(x) * s


class _Opaque:
    def __init__(self, s: float):
        self.s = s

    def __repr__(self) -> str:
        return "_Opaque()"


@pytest.mark.parametrize("change", ["class", "list", "dict", "numpy", "object"])
def test_state_out_of_the_weights_is_keyed(cache_dir, monkeypatch, change):
    """A class attribute set at run time, a tensor in a list or dict attribute, a numpy array and a plain object
    whose repr leaves its values out are part of the key: another value misses (a hit served the first value's
    graph, silently wrong where the first-call check against eager is off) and the same value hits."""
    monkeypatch.setenv("FXCC_CHECK_EAGER", "0")
    x = torch.randn(4, 8)
    _Scaled.scale = 2.0
    _compile(_Scaled(2.0).eval(), x)
    again, _ = _compile(_Scaled(2.0).eval(), x)
    assert "graph cache" in again.variants[-1].captured.method
    other = _Scaled(2.0).eval()
    if change == "class":
        _Scaled.scale = 3.0
    elif change == "list":
        other.consts = [torch.full((8,), 3.0)]
    elif change == "dict":
        other.table = {"s": torch.tensor(3.0)}
    elif change == "numpy":
        other.arr[1000] = 3.0
    else:
        other.cfg = _Opaque(3.0)
    try:
        cm, out = _compile(other, x)
        assert "graph cache" not in cm.variants[-1].captured.method
        assert_outputs_close(out, other(x))
    finally:
        _Scaled.scale = 1.0


def test_a_transformers_output_class_defined_after_the_compile_does_not_miss_the_stored_graph(cache_dir):
    """Importing another transformers model defines its output classes, which transformers registers in a set its
    ModelOutput reads: a graph keyed on that set was missed by a process that had imported another model."""
    pytest.importorskip("transformers")
    from dataclasses import dataclass

    from fxcc.bench import llama
    from transformers.utils import ModelOutput

    torch.manual_seed(0)
    w = llama(batch=1, seq=8, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, dtype=torch.float32,
              device="cpu")
    first = fxcc.compile(w.model)
    out1 = first(*w.args, **w.kwargs)

    @dataclass
    class OtherModelsOutput(ModelOutput):  # what importing another model's module does
        logits: torch.Tensor | None = None

    OtherModelsOutput(logits=torch.zeros(1))
    second = fxcc.compile(w.model)
    out2 = second(*w.args, **w.kwargs)
    assert "graph cache" not in first.variants[-1].captured.method
    assert "graph cache" in second.variants[-1].captured.method
    assert_outputs_close(out2, out1, atol=0, rtol=0)
