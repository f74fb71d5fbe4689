"""One thread pool per model (fxcc.autotune.pools): the per-kernel choice checked on the whole model, for
when TVM kernels run on TVM's own pool (the OpenMP launcher of fxcc.codegen.tvm_omp unavailable)."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn.functional as F
from fxcc.capture import flatten_inputs
from fxcc.codegen.executable import BuiltKernel, build_executable
from fxcc.dialects import KERNEL_OPS, Choice, choice_of, set_choice
from fxcc.measure import Decision, Timing, decide

pytest.importorskip("tvm")
from fxcc.autotune import pools  # noqa: E402
from fxcc.codegen import tvm as tvm_backend  # noqa: E402
from fxcc.codegen import tvm_omp  # noqa: E402


@pytest.fixture(autouse=True)
def _tvm_pool(monkeypatch, tmp_path):
    monkeypatch.setattr(tvm_omp, "enabled", lambda: False)
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))  # decisions stored by other tests do not apply


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))) + x


def compiled(model, x):
    """The model compiled without the whole-model check (the tests run it themselves)."""
    real = pools.settle
    pools.settle = lambda *a, **k: False
    try:
        cm = fxcc.compile(model)
        with torch.no_grad():
            cm(x)
    finally:
        pools.settle = real
    return cm


def on_tvm(cm):
    """The compiled model's kernels (by key) with every GEMM kernel put on its generated TVM candidate, as if
    it had won alone, with codegen's timings saying a torch-pool candidate was measured too; and the GEMMs' keys."""
    v = cm.variants[-1]
    kernels = dict(v.kernels)
    gemms = [key for key, k in kernels.items() if k.kind == "gemm"]
    for key in gemms:
        body = kernels[key].body
        cand = next(c for c in tvm_backend.candidates(body, "cpu") if c.backend == "tvm")
        kernels[key] = BuiltKernel(body, Choice("tvm", "tvm", cand.defaults), cand.build(cand.defaults),
                                   {"extern": 1.0, "tvm": 0.9})
    for n in v.gm.graph.nodes:
        if n.op == "call_function" and n.target in KERNEL_OPS:
            set_choice(n, kernels[n.args[1]].choice)
    return v, kernels, gemms


def chosen(v, gemms):
    """The backend each GEMM kernel op of the variant's IR records."""
    return [choice_of(n).backend for n in v.gm.graph.nodes
            if n.op == "call_function" and n.target in KERNEL_OPS and n.args[1] in gemms]


def timed(as_chosen: float, torch_pool: float) -> Decision:
    """The decision for steady timings of the two models (ms)."""
    return decide({"as chosen": Timing([as_chosen] * 6), "torch pool": Timing([torch_pool] * 6)}, "as chosen")


def test_a_faster_single_pool_model_moves_kernels_to_torch_and_the_decision_is_cached(monkeypatch):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(4, 16, 32)
    cm = compiled(model, x)
    with torch.no_grad():
        expected = model(x)
    v, kernels, gemms = on_tvm(cm)
    flat = flatten_inputs((x,), {})[0]
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: timed(2.0, 1.0))
    assert pools.settle(v.gm, flat, "Mlp", kernels)
    assert all(kernels[k].backend == "extern" for k in gemms) and set(chosen(v, gemms)) == {"extern"}
    assert "moved to torch's pool" in kernels[gemms[0]].note
    exe, bound, built = build_executable(v.gm, kernels)
    assert all(built[k].backend == "extern" for k in gemms)
    with torch.no_grad():
        torch.testing.assert_close(exe(*flat, *bound)[0], expected, atol=1e-5, rtol=1e-5)
    # the same choices again (a warm compile): the stored decision applies, nothing is timed
    v, kernels, gemms = on_tvm(cm)
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: pytest.fail("timed again despite a stored decision"))
    assert pools.settle(v.gm, flat, "Mlp", kernels)
    assert all(kernels[k].backend == "extern" for k in gemms) and "from the artifact cache" in kernels[gemms[0]].note


def test_a_model_faster_as_chosen_keeps_its_kernels(monkeypatch):
    torch.manual_seed(1)
    model, x = Mlp().eval(), torch.randn(3, 8, 32)
    cm = compiled(model, x)
    v, kernels, gemms = on_tvm(cm)
    fns = [kernels[k].fn for k in gemms]
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: timed(1.0, 2.0))
    assert not pools.settle(v.gm, flatten_inputs((x,), {})[0], "Mlp", kernels)
    assert [kernels[k].backend for k in gemms] == ["tvm"] * len(gemms) and set(chosen(v, gemms)) == {"tvm"}
    assert [kernels[k].fn for k in gemms] == fns and "kept" in kernels[gemms[0]].note


def test_nothing_to_settle_with_one_pool_already(monkeypatch):
    model, x = Mlp().eval(), torch.randn(2, 4, 32)
    v, kernels, _ = on_tvm(compiled(model, x))
    monkeypatch.setattr(tvm_omp, "enabled", lambda: True)
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: pytest.fail("timed with one pool already"))
    assert not pools.settle(v.gm, [x], "Mlp", kernels)


def test_nothing_to_settle_without_a_torch_pool_alternative():
    model, x = Mlp().eval(), torch.randn(2, 4, 32)
    cm = fxcc.compile(model, passes="canonicalize,raise,fuse,codegen{backend=tvm}")  # forced: nothing timed
    with torch.no_grad():
        cm(x)
    assert not pools.settle(cm.variants[-1].gm, [x], "Mlp", dict(cm.variants[-1].kernels))


def test_a_pool_decision_too_noisy_to_settle_is_timed_again_by_the_next_compile(monkeypatch):
    """Torch's pool once 3x faster among calls mostly preempted: no win, no telling. The model keeps its kernels,
    the decision is stored unsettled, and the next compile times it again (here: settled, torch's pool faster)."""
    monkeypatch.setenv("FXCC_SETTLE_TRIES", "3")
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(4, 16, 32)
    cm = compiled(model, x)
    flat = flatten_inputs((x,), {})[0]
    noisy = decide({"as chosen": Timing([1.0] * 6), "torch pool": Timing([0.3] + [5.0] * 5)}, "as chosen")
    assert not noisy.settled
    v, kernels, gemms = on_tvm(cm)
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: noisy)
    assert not pools.settle(v.gm, flat, "Mlp", kernels)
    assert set(chosen(v, gemms)) == {"tvm"} and "unsettled (try 1 of 3)" in kernels[gemms[0]].note
    v, kernels, gemms = on_tvm(cm)
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: timed(2.0, 1.0))
    assert pools.settle(v.gm, flat, "Mlp", kernels)
    assert "re-measured (was unsettled); settled" in kernels[gemms[0]].note
    v, kernels, gemms = on_tvm(cm)
    monkeypatch.setattr(pools, "_compare", lambda fns, reps: pytest.fail("timed again despite a settled decision"))
    assert pools.settle(v.gm, flat, "Mlp", kernels)
    assert "cached (settled), from the artifact cache" in kernels[gemms[0]].note
