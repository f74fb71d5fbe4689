"""The graph cache and closures: values a model reads through a closure (a factory's arguments, a helper a factory
made, an object a closure holds, a bound method's object) are keyed by value, in this process and in another one,
and a graph taken from the cache guards them as a captured one does.

Each test uses its own cache directory, so hits and misses come from what the test does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import fxcc
import pytest
import torch
import torch.nn as nn

PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"
OPTS = fxcc.CompileOptions(check_eager=False)  # the first call's check against eager would hide a stale graph


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compiled(model):
    return fxcc.compile(model, passes=PASSES, options=OPTS)


def _from_cache(cm) -> bool:
    return "graph cache" in cm.variants[-1].captured.method


# one model per way a value reaches the graph through a closure; the process takes the value and the passes from
# its arguments
MODELS = '''
import json, sys, types
import fxcc
import torch
import torch.nn as nn

V = float(sys.argv[1])


def make_block(scale, shift, bias, cfg):  # a class a factory defines reads the factory's arguments
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * scale + shift + bias + cfg.offset

    return Block


def make_helper(t):
    def helper(x):
        return x + t

    return helper


class Scaler:
    def __init__(self, k):
        self.k = k

    def apply(self, x):
        return x * self.k


HELPER = make_helper(torch.full((4,), V))  # a global whose closure holds a tensor
SCALE = Scaler(V).apply  # a global bound method, whose object holds the value


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = make_block(V, 0, torch.zeros(4), types.SimpleNamespace(offset=0.0))()  # a factory's submodule

    def forward(self, x):
        return SCALE(HELPER(self.inner(self.lin(x))))


torch.manual_seed(0)
x = torch.randn(2, 4)
models = {
    "float": make_block(V, 0, torch.zeros(4), types.SimpleNamespace(offset=0.0)),
    "int": make_block(1.0, int(V), torch.zeros(4), types.SimpleNamespace(offset=0.0)),
    "tensor": make_block(1.0, 0, torch.full((4,), V), types.SimpleNamespace(offset=0.0)),
    "object": make_block(1.0, 0, torch.zeros(4), types.SimpleNamespace(offset=V)),
    "globals": Outer,
}
out = {}
for name, cls in models.items():
    torch.manual_seed(0)
    model = cls().eval()
    cm = fxcc.compile(model, passes=sys.argv[2], options=fxcc.CompileOptions(check_eager=False))
    with torch.no_grad():
        got, want = cm(x), model(x)
    out[name] = ["graph cache" in cm.variants[-1].captured.method, bool(torch.allclose(got, want))]
print(json.dumps(out))
'''


def test_a_new_process_whose_closures_hold_other_values_does_not_take_the_stored_graph(cache_dir, tmp_path):
    """Two processes run the same file with another value in each closure (a float, an int, a tensor, an object's
    attribute, a factory's submodule, a global helper's tensor, a global bound method's object): the second one's
    graphs are its own, not the first one's with the old value folded in; a third with the first's values hits."""
    script = tmp_path / "closure_models.py"
    script.write_text(MODELS)
    env = {**os.environ, "FXCC_CACHE_DIR": str(cache_dir)}

    def run(value: str) -> dict:
        p = subprocess.run([sys.executable, str(script), value, PASSES], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, other, again = run("2.0"), run("3.0"), run("2.0")
    assert all(not hit and ok for hit, ok in first.values()), first
    assert all(not hit and ok for hit, ok in other.values()), other  # a hit here gave the 2.0 graph
    assert all(hit and ok for hit, ok in again.values()), again


def _make_sub(scale):
    class Sub(nn.Module):
        def forward(self, x):
            return x * scale

    return Sub


class Top(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sub = _make_sub(scale)()

    def forward(self, x):
        return self.sub(self.lin(x))


def test_a_submodule_class_a_factory_made_with_another_value_misses(cache_dir):
    """The same source, the same weights: only the factory's argument differs (the key has the submodule's
    closure)."""
    x = torch.randn(2, 4)
    for scale in (2.0, 3.0):
        torch.manual_seed(0)
        model = Top(scale).eval()
        cm = _compiled(model)
        torch.testing.assert_close(cm(x), model(x))
        assert not _from_cache(cm)
    torch.manual_seed(0)
    cm = _compiled(Top(2.0).eval())
    cm(x)
    assert _from_cache(cm)


class TwoMethods(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * 2

    def encode(self, x):
        return self.lin(x) + 100


def test_another_method_of_the_same_module_is_another_entry(cache_dir):
    model, x = TwoMethods().eval(), torch.randn(2, 4)
    torch.testing.assert_close(fxcc.compile(model.forward, passes=PASSES, options=OPTS)(x), model(x))
    encode = fxcc.compile(model.encode, passes=PASSES, options=OPTS)
    torch.testing.assert_close(encode(x), model.encode(x))
    assert not _from_cache(encode.fxcc)


def _make_helper(shift):
    def helper(x):
        return x + shift

    def set_shift(v):
        nonlocal shift
        shift = v

    return helper, set_shift


HELPER, SET_SHIFT = _make_helper(1.0)


class CallsHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return HELPER(self.lin(x))


def _make_offset_block(cfg):
    class OffsetBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) + cfg.offset

    return OffsetBlock


@pytest.mark.parametrize("how", ["a global helper's closure variable", "an attribute of an object a closure holds"])
def test_a_graph_from_the_cache_guards_the_closures_as_a_captured_one(cache_dir, how):
    """A hit records no capture: the closure variables and the attributes of closure-held objects its code reads
    are guarded all the same (a change recompiles, it never runs the stored graph with the old value)."""
    x = torch.randn(2, 4)
    cfg = types.SimpleNamespace(offset=1.0)
    make = CallsHelper if how.startswith("a global") else _make_offset_block(cfg)
    try:
        for _ in range(2):  # the second compile takes the first one's graph
            torch.manual_seed(0)
            model = make().eval()
            cm = _compiled(model)
            torch.testing.assert_close(cm(x), model(x))
        assert _from_cache(cm)
        if how.startswith("a global"):
            SET_SHIFT(5.0)
        else:
            cfg.offset = 5.0
        torch.testing.assert_close(cm(x), model(x))
        assert cm.stats.compiles == 2, cm.stats.reasons
    finally:
        SET_SHIFT(1.0)
