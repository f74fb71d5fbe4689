"""The cache-key audit: every input to a compile that changes its result changes the key of what is cached,
or keeps the cache out of it (or, for how compiled code runs, never reaches a cache entry at all)."""

from __future__ import annotations

import dataclasses

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import graph_cache, store
from fxcc.autotune import select
from fxcc.dialects import KERNEL_OPS, kernel_body
from fxcc.options import CompileOptions, Settings
from fxcc.runtime import split_at_codegen
from torch.utils import _pytree as pytree


@pytest.fixture(scope="module")
def kb():
    """A kernel body of a small compiled model."""
    cm = fxcc.compile(nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval(), passes="canonicalize,raise,fuse")
    cm(torch.randn(2, 8))
    node = next(n for n in cm.variants[-1].gm.graph.nodes if n.op == "call_function" and n.target in KERNEL_OPS)
    return kernel_body(node.args[1])


def _versions(monkeypatch, digest: str) -> None:
    store.library_versions.cache_clear()
    monkeypatch.setattr(store, "fxcc_source_digest", lambda: digest)


KERNEL_PARTS = {
    "library versions": lambda mp: mp.setattr(store, "library_versions", lambda: "torch=0.0"),
    "fxcc's own source": lambda mp: _versions(mp, "f" * 64),
    "threads": lambda mp: torch.set_num_threads(torch.get_num_threads() + 1),
    "CPU features": lambda mp: mp.setattr(store, "_cpu", lambda: "same model:other flags"),
    "fp32 matmul precision": lambda mp: torch.set_float32_matmul_precision("medium"),
    "library environment": lambda mp: mp.setenv("ONEDNN_MAX_CPU_ISA", "AVX2"),
    "FXCC_TVM_POOL": lambda mp: mp.setenv("FXCC_TVM_POOL", "tvm"),
    "FXCC_TRITON_INTERPRET": lambda mp: (mp.setenv("TRITON_INTERPRET", "1"), mp.setenv("FXCC_TRITON_INTERPRET", "1")),
    "FXCC_TRITON_WELFORD": lambda mp: mp.setenv("FXCC_TRITON_WELFORD", "0"),
    "candidate set": lambda mp: mp.setattr(select, "CANDIDATES", "999"),
}


@pytest.mark.parametrize("part", list(KERNEL_PARTS))
def test_each_part_of_a_kernel_key_changes_it(kb, monkeypatch, part):
    monkeypatch.delenv("FXCC_TRITON_INTERPRET", raising=False)
    before = select.kernel_key(kb, "cpu", None)
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    try:
        KERNEL_PARTS[part](monkeypatch)
        assert select.kernel_key(kb, "cpu", None) != before
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        monkeypatch.undo()
        store.library_versions.cache_clear()
    assert select.kernel_key(kb, "cpu", None) == before


def test_the_preferred_backend_is_part_of_a_kernel_key(kb):
    assert select.kernel_key(kb, "cpu", "tvm") != select.kernel_key(kb, "cpu", None)


@dataclasses.dataclass
class Config:
    eps: float = 1e-5


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.LeakyReLU(0.1)
        self.register_buffer("shift", torch.ones(4))
        self.scale = torch.tensor(2.0)
        self.config = Config()

    def forward(self, x):
        return self.act(self.lin(x)) * self.scale + self.shift + self.config.eps


def _key(m: nn.Module, x: torch.Tensor, pipeline: str = "canonicalize,raise", target: str = "cpu",
          machine: bool = False) -> str:
    from fxcc.guards import call_context
    flat, spec = pytree.tree_flatten(((x,), {}))
    return graph_cache.graph_key(m, flat, spec, pipeline, target, calibrates=False, context=repr(call_context()),
                                 machine=machine)


GRAPH_PARTS = {
    "a weight's values": lambda m, mp: m.lin.weight.data.add_(1),
    "a buffer's values": lambda m, mp: m.shift.data.add_(1),
    "a tensor attribute's values": lambda m, mp: m.scale.data.add_(1),
    "a primitive attribute": lambda m, mp: setattr(m.act, "negative_slope", 0.2),
    "a config field": lambda m, mp: setattr(m.config, "eps", 1.0),
    "the distributed world": lambda m, mp: mp.setattr(graph_cache, "_distributed_fingerprint", lambda: "(1, 2, 'gloo')"),
    "the default dtype": lambda m, mp: torch.set_default_dtype(torch.float64),
    "library versions": lambda m, mp: mp.setattr(store, "library_versions", lambda: "torch=0.0"),
}


@pytest.mark.parametrize("part", list(GRAPH_PARTS))
def test_each_part_of_a_graph_key_changes_it(monkeypatch, part):
    torch.manual_seed(0)
    m, x = Model().eval(), torch.randn(2, 4)
    before = _key(m, x)
    try:
        GRAPH_PARTS[part](m, monkeypatch)
        assert _key(m, x) != before
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_call_the_pipeline_the_device_and_a_measuring_pass_change_a_graph_key(monkeypatch):
    m, x = Model().eval(), torch.randn(2, 4)
    k = _key(m, x)
    assert k != _key(m, torch.randn(3, 4)) and k != _key(m, x.double()) and k != _key(m, x.t().contiguous().t())
    assert k != _key(m, x, pipeline="canonicalize") and k != _key(m, x, target="cuda")
    machine = _key(m, x, machine=True)  # a pass that chooses by timing: the machine is part of the key
    torch.set_num_threads(torch.get_num_threads() + 1)
    assert _key(m, x, machine=True) != machine and _key(m, x) == k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _key(m, x) != k


def test_a_module_under_autocast_runs_eagerly_with_one_warning():
    m, x = Model().eval(), torch.randn(2, 4)
    cm = fxcc.compile(m)
    cm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="Model is called under torch.autocast, which fxcc does not compile"):
            y = cm(x)
        assert y.dtype == m(x).dtype
        torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(cm(x), m(x))
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 1


def test_a_symbolic_variant_does_not_serve_a_call_under_autocast():
    """A size its symbolic variant accepts, called under an autocast: eager's result (its linear in bf16), not the
    graph traced without the autocast's casts."""
    m = Model().eval()
    cm = fxcc.compile(m, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    with torch.no_grad():
        cm(torch.randn(2, 4))
        cm(torch.randn(3, 4))  # symbolic in the batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.randn(5, 4)
            with pytest.warns(UserWarning, match="called under torch.autocast"):
                y = cm(x)
            torch.testing.assert_close(y, m(x))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 1


# How every option reaches what is cached. "key": part of a cache key (checked above or below); "off": setting
# it keeps the graph cache out of the compile (checked below); "entry": recorded in the entry it writes, which
# a better one supersedes (tests/test_cache_faults.py); "run": changes only how compiled code runs or what is
# reported, never what an entry holds. A new option must be added here, with its reason.
OPTIONS = {
    "target": "key", "passes": "key", "tune": "entry", "tune_budget": "entry", "cuda_graphs": "run",
    "graph_cache": "off", "plan": "entry", "quality_budget": "off", "verify_each": "off", "print_ir_after": "off",
    "max_variants": "run", "dycl": "run", "check_eager": "run",
    "time_vs_eager": "run",
    "dynamic": "run",  # a compile with symbolic sizes never reads nor writes the graph cache (runtime: `plain`)
    "fullgraph": "run",  # turns an eager fallback into an error; what is compiled and cached is the same
}
SETTINGS = {
    "cache_dir": "run", "cache_shared": "run", "cache_trust": "run", "tvm_pool": "key", "triton_interpret": "key",
    "triton_welford": "key",
    "verify_each": "off", "print_ir_after": "off", "check_eager": "run", "logs": "run",
    "time_vs_eager": "run",
    # how many compiles measure an unsettled decision again: each entry records its tries, and a new measurement
    # supersedes an unsettled one (tests/test_tune_settled.py)
    "settle_tries": "entry",
    # the int4 loops whose configs int4_linear's first call measures: a choice made at run time, kept per process
    "int4_loops": "run",
}
OFF = {"graph_cache": False, "quality_budget": 0.01, "verify_each": True, "print_ir_after": ("raise",)}


def test_every_option_and_setting_is_audited():
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(CompileOptions)}
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("option", list(OFF))
def test_options_that_change_the_graph_keep_the_graph_cache_out(option):
    m, x = Model().eval(), torch.randn(2, 4)
    cm = fxcc.compile(m, options=CompileOptions(**{option: OFF[option]}))
    front, _ = split_at_codegen(cm._passes)
    assert cm._graph_cache_key(front, (x,), {}, "cpu", cm.options) == (None, None)
    plain = fxcc.compile(m)
    assert plain._graph_cache_key(front, (x,), {}, "cpu", plain.options)[1] is not None
