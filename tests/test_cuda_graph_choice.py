"""Whether a static variant runs as a CUDA graph is decided, not assumed: a graph whose input copies cost more
than the launches it saves is not captured, and a captured graph that replays slower than the executable run
uncaptured is dropped. On the CPU with a stand-in graph and an injected timer."""

from __future__ import annotations

import fxcc
import fxcc.cuda_graphs as cg
import pytest
import torch
from fxcc.measure import using_timer

FAST = "canonicalize,raise,fuse,codegen{backend=extern}"


class FakeGraph:
    """Replays by running the executable, and says it ran (the injected timer prices it)."""

    captured = 0
    ran = False

    def __init__(self, fn, flat):
        self.fn, self.flat = fn, flat

    def __call__(self, flat):
        FakeGraph.ran = True
        return list(self.fn(*flat))


def compiled_variant(monkeypatch):
    def fake_capture(fn, flat, name, inplace=frozenset(), keep=frozenset()):
        FakeGraph.captured += 1
        return FakeGraph(fn, flat)

    monkeypatch.setattr(cg.CudaGraph, "capture", staticmethod(fake_capture))
    monkeypatch.setattr(FakeGraph, "captured", 0)

    def f(x):
        return torch.sigmoid(x) * 2 + 1

    c = fxcc.compile(f, passes=FAST)
    x = torch.randn(64, 64)
    c(x)
    v = c.fxcc.variants[0]
    v.cuda_graph = "pending"  # as compile leaves a static variant on CUDA
    return c, v, x


def timer(graph_ms: float, plain_ms: float):
    def time(fn, device):
        FakeGraph.ran = False
        fn()
        return graph_ms if FakeGraph.ran else plain_ms
    return time


def test_a_graph_replaying_slower_than_uncaptured_is_dropped(monkeypatch):
    c, v, x = compiled_variant(monkeypatch)
    with using_timer(timer(graph_ms=3.0, plain_ms=1.0)):
        torch.testing.assert_close(c(x), torch.sigmoid(x) * 2 + 1)
    assert FakeGraph.captured == 1 and v.cuda_graph is None
    assert "slower than running uncaptured" in v.no_graph
    assert "no CUDA graph: timed slower" in c.fxcc.explain()


def test_a_graph_that_pays_is_kept(monkeypatch):
    c, v, x = compiled_variant(monkeypatch)
    with using_timer(timer(graph_ms=1.0, plain_ms=3.0)):
        torch.testing.assert_close(c(x), torch.sigmoid(x) * 2 + 1)
    assert isinstance(v.cuda_graph, FakeGraph) and v.no_graph is None


def test_inputs_too_large_to_copy_are_not_captured(monkeypatch):
    """The estimate alone: copying the inputs in would take longer than the launches a replay saves (here with a
    copy bandwidth made tiny), so nothing is captured and nothing is timed."""
    c, v, x = compiled_variant(monkeypatch)
    monkeypatch.setattr(cg, "COPY_BYTES_PER_S", 1e3)
    torch.testing.assert_close(c(x), torch.sigmoid(x) * 2 + 1)
    assert FakeGraph.captured == 0 and v.cuda_graph is None
    assert v.no_graph.startswith("copying")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_a_large_elementwise_call_allocates_no_more_than_eager():
    """A memory-bound op on a 1 GiB input: no CUDA graph with a copy of the input, so a compiled call's peak
    allocation is eager's (its output), and the result is eager's."""

    def f(x):
        return torch.nn.functional.selu(x)

    x = torch.randn(2**28, device="cuda")
    c = fxcc.compile(f)
    torch.testing.assert_close(c(x), f(x))
    c(x)

    def peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(x)
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    eager, compiled = peak(f), peak(c)
    assert compiled <= eager + 2**20, (compiled, eager)
    assert all(v.cuda_graph is None for v in c.fxcc.variants)
