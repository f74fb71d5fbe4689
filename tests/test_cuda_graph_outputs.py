"""A replayed CUDA graph copies only inputs that moved and clones no output: a call returns tensors over the
graph's own memory, and a result the caller holds (or a view of it) never changes under it. A second capture
serves calls made while the first one's outputs are held; while both are held, the call runs uncaptured. On the
CPU with a stand-in for a captured graph, and on a GPU."""

from __future__ import annotations

import fxcc
import fxcc.cuda_graphs as cg
import pytest
import torch
from fxcc.measure import using_timer
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

FAST = "canonicalize,raise,fuse,codegen{backend=extern}"


def f(x):
    return torch.sigmoid(x) * 2 + 1


class StandIn:
    """A captured graph on the CPU: a replay runs the captured call again (reading the graph's input buffers)
    and writes its results into the captured outputs, the memory a real replay writes."""

    def __init__(self, fn, outs):
        self.fn, self.outs = fn, outs
        self.inference = torch.is_inference_mode_enabled()  # a replay runs what was captured, in any mode

    def replay(self):
        with _disable_current_modes(), torch.inference_mode(self.inference):
            for o, n in zip(self.outs, self.fn()):
                o.copy_(n)


def stand_in_capture(fn, warmup=2):
    for _ in range(warmup):
        fn()
    outs = fn()
    return StandIn(fn, outs), outs


class Copies(TorchDispatchMode):
    """Counts the copies and clones a call makes."""

    def __init__(self):
        super().__init__()
        self.copies = self.clones = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten.copy_.default
        self.clones += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


@pytest.fixture
def graphed(monkeypatch):
    """A compiled `f` whose static variant is captured with the stand-in at its next call (timed as paying)."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    c = fxcc.compile(f, passes=FAST)
    c(torch.randn(64, 64))
    v = c.fxcc.variants[0]
    v.cuda_graph = "pending"  # as compile leaves a static variant on CUDA
    with using_timer(lambda fn, device: (fn(), 1.0)[1]):  # graph and uncaptured alike: the graph is kept
        c(torch.randn(64, 64))
    assert isinstance(v.cuda_graph, cg.CudaGraph)
    return c, v.cuda_graph


def inputs(n):
    return [torch.randn(64, 64) for _ in range(n)]


def test_released_outputs_are_replayed_into_again_without_clones(graphed):
    """A caller that drops each result before the next call: one capture serves every call, its outputs handed
    out over the graph's memory (no clone), one copy per call (the input, which moved)."""
    c, g = graphed
    for x in inputs(4):
        with Copies() as m:
            y = c(x)
        torch.testing.assert_close(y, f(x))
        assert (m.clones, m.copies) == (0, 1)
        assert cg._address(y) == cg._address(g.captures[0].outs[0])
        del y
    assert len(g.captures) == 1 and g.overlapped == 0


def test_an_input_already_in_the_graphs_buffer_is_not_copied(graphed):
    c, g = graphed
    x = g.captures[0].static[0]
    x.copy_(torch.randn(64, 64))
    with Copies() as m:
        y = c(x)
    torch.testing.assert_close(y, f(x))
    assert m.copies == 0
    del y
    elsewhere = x.clone()  # the same values elsewhere: copied
    with Copies() as m:
        y = c(elsewhere)
    torch.testing.assert_close(y, f(x))
    assert m.copies == 1


def test_a_held_output_keeps_its_values_the_next_call_replays_a_second_capture(graphed):
    """`y = f(x)` in a loop holds the last result while calling: the calls alternate between two captures
    (the second taken at the first such call), none clones, and a result never changes while held."""
    c, g = graphed
    xs = inputs(5)
    y = c(xs[0])
    for prev, x in zip(xs, xs[1:]):
        want = y.clone()
        with Copies() as m:
            nxt = c(x)
        torch.testing.assert_close(y, want)  # the held result is what it was
        torch.testing.assert_close(y, f(prev))
        torch.testing.assert_close(nxt, f(x))
        assert m.clones == 0
        y = nxt
    assert len(g.captures) == 2 and g.overlapped == 0


def test_a_view_of_a_held_output_keeps_its_values(graphed):
    c, g = graphed
    x0, x1 = inputs(2)
    row = c(x0)[3]  # the result itself is dropped, its view is held
    c(x1)
    torch.testing.assert_close(row, f(x0)[3])
    assert len(g.captures) == 2  # the view held the first capture's memory


def test_a_held_storage_of_an_output_keeps_its_values(graphed):
    c, g = graphed
    x0, x1 = inputs(2)
    storage = c(x0).untyped_storage()  # only the storage object is held
    c(x1)
    torch.testing.assert_close(torch.empty(0).set_(storage).view(64, 64), f(x0))
    assert len(g.captures) == 2


def test_every_output_held_runs_uncaptured_and_is_counted(graphed, caplog):
    """A caller keeping every result: past the two captures, a call runs uncaptured (never a replay over a
    held result), logged once and shown by `fxcc explain`."""
    c, g = graphed
    xs = inputs(6)
    with caplog.at_level("INFO", logger="fxcc.cuda_graphs"):
        ys = [c(x) for x in xs]
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, f(x))
    assert len(g.captures) == 2 and g.overlapped == 4
    assert len([r for r in caplog.records if "runs uncaptured" in r.message]) == 1
    assert "4 calls ran uncaptured" in c.fxcc.explain()
    del ys[2:]  # the later results were not the graphs': the first two still are, and held
    c(xs[0])
    assert g.overlapped == 5
    del ys[0]
    y = c(xs[5])
    torch.testing.assert_close(y, f(xs[5]))
    torch.testing.assert_close(ys[0], f(xs[1]))
    assert g.overlapped == 5


def test_a_variant_with_symbolic_sizes_counts_both_captures_against_max_graphs(monkeypatch):
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    monkeypatch.setattr(cg, "MAX_GRAPHS", 3)
    graphs = cg.CudaGraphs(lambda x: (f(x),), "f", frozenset(), frozenset())  # an executable: a tuple
    a, b = torch.randn(4), torch.randn(8)
    assert graphs([a]) is None  # seen once
    ya = graphs([a])[0]
    yb = graphs([b]) or graphs([b])  # the second key: seen, then captured
    held = graphs([a])[0]  # ya is held: the second capture of the first key (the third capture)
    assert sum(len(g.captures) for g in graphs.graphs.values()) == 3
    assert graphs([b]) is None  # yb held, no room for another capture
    for y, x in [(ya, a), (yb[0], b), (held, a)]:
        torch.testing.assert_close(y, f(x))


def test_a_new_key_past_max_graphs_replaces_the_graph_replayed_least_recently(monkeypatch):
    """Past MAX_GRAPHS captures a new key still gets a graph: the one replayed least recently is dropped (a
    server's generate after generate, each with a new cache, keeps replaying its decode steps)."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    monkeypatch.setattr(cg, "MAX_GRAPHS", 2)
    graphs = cg.CudaGraphs(lambda x: (f(x),), "f", frozenset(), frozenset())
    a, b, c = torch.randn(4), torch.randn(8), torch.randn(16)
    for x in (a, a, b, b, a):  # a and b captured at their second call; a replayed after b
        graphs([x])
    assert graphs([c]) is None  # seen once
    torch.testing.assert_close(graphs([c])[0], f(c))  # captured in b's place
    assert graphs.evicted == 1 and len(graphs.graphs) == 2
    torch.testing.assert_close(graphs([a])[0], f(a))  # still replayed
    assert graphs([b]) is None  # b starts over: seen once


def test_keys_taking_turns_beyond_max_graphs_stop_replacing_graphs(monkeypatch):
    """Keys that take turns beyond MAX_GRAPHS would capture at every turn: after MAX_GRAPHS graphs dropped
    with few replays, the graphs stay and other keys run uncaptured (with eager's values)."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    monkeypatch.setattr(cg, "MAX_GRAPHS", 2)
    captures = []
    monkeypatch.setattr(cg, "_capture", lambda *a, real=cg._capture: captures.append(1) or real(*a))
    graphs = cg.CudaGraphs(lambda x: (f(x),), "f", frozenset(), frozenset())
    xs = [torch.randn(n) for n in (2, 3, 4)]
    for _ in range(12):
        for x in xs:
            y = graphs([x])
            if y is not None:
                torch.testing.assert_close(y[0], f(x))
    assert graphs.wasted > 2 and len(captures) < 12
    before = len(captures)
    for x in xs * 3:
        graphs([x])
    assert len(captures) == before


def test_a_capture_does_not_hold_the_callers_in_place_tensors(monkeypatch):
    """A graph reads and writes an in-place input (a cache) where the caller's tensor is; it keeps only its
    address, so a cache the caller drops is freed (its memory is there for the next cache). An output that is
    the in-place input is the call's own tensor."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)

    def step(x, cache):
        cache.add_(x)
        return (cache * 2, cache)

    graphs, x = cg.CudaGraphs(step, "step", frozenset({1}), frozenset({1})), torch.ones(4)
    cache = torch.zeros(4)
    assert graphs([x, cache]) is None  # seen once (the caller runs it uncaptured)
    graphs([x, cache])  # captured, replayed once (a stand-in's warm-up runs are undone)
    y, same = graphs([x, cache])
    assert same is cache and torch.equal(cache, torch.full((4,), 2.0)) and torch.equal(y, 2 * cache)
    (g,) = graphs.graphs.values()
    assert all(s is None for s in g.captures[0].static[1:]) and g.captures[0].outs[1] is None


class OnMemory:
    """A captured graph on the CPU that, as a real one, holds no tensor over the memory it writes in place: a
    replay runs the step on tensors made over that memory for the replay alone (and on the capture's buffers
    for the other inputs), writing its results into the captured outputs."""

    def __init__(self, fn, places):
        self.fn, self.places, self.capture = fn, places, None

    def replay(self):
        args = list(self.capture.static)
        for i, st, off, shape, stride, dtype in self.places:
            args[i] = torch.empty(0, dtype=dtype).set_(st, off, shape, stride)
        for o, n in zip(self.capture.outs, self.fn(*args)):
            if o is not None:
                o.copy_(n)


def on_memory_capture(fn, flat, name, inplace, keep):
    static = [x if i in inplace else x.clone() for i, x in enumerate(flat)]
    saved = {i: flat[i].clone() for i in inplace}
    outs = list(fn(*static))  # what a capture records; its writes undone, as a capture's warm-up runs are
    for i, t in saved.items():
        flat[i].copy_(t)
    graph = OnMemory(fn, [(i, flat[i].untyped_storage(), flat[i].storage_offset(), flat[i].shape, flat[i].stride(),
                           flat[i].dtype) for i in inplace])
    graph.capture = cg._Capture(graph, static, outs, inplace, keep)
    return graph.capture


def _step(x, cache):
    cache.add_(x)
    return (cache * 3,)


def test_a_new_cache_of_the_captured_shapes_is_copied_through_the_graph_once_the_old_one_is_dropped(monkeypatch):
    """A server's next generate brings a new cache at other addresses. While the caller holds the cache a graph
    was captured on, a new one runs uncaptured (then gets its own capture); once it is dropped, the graph keeps
    its memory and serves the new cache copied in and back, with eager's values in the caller's cache, until the
    copies' estimated time reaches the capture's: then the new cache's addresses are captured."""
    monkeypatch.setattr(cg, "_capture", on_memory_capture)
    graphs, x = cg.CudaGraphs(_step, "step", frozenset({1}), frozenset()), torch.ones(4)
    old = torch.zeros(4)
    for _ in range(3):
        out = graphs([x, old]) or _step(x, old)
    (g,) = graphs.graphs.values()
    assert graphs.adopters and torch.equal(old, torch.full((4,), 3.0))
    held = torch.zeros(4)
    assert graphs([x, held]) is None and graphs.adoptions == 0  # `old` is still the caller's
    del old, out
    g.capture_s = 1.0  # a capture's cost; each call's copies estimated at 0.4 s
    monkeypatch.setattr(cg, "COPY_BYTES_PER_S", 4 * 16 / 0.4)
    new = torch.full((4,), 10.0)
    (y,) = graphs([x, new])
    assert graphs.adoptions == 1 and len(graphs.graphs) == 1
    assert torch.equal(new, torch.full((4,), 11.0)) and torch.equal(y, new * 3)
    del y  # (a result held would keep the graph from writing its outputs again: the call would run uncaptured)
    for _ in range(3):  # copies of 0.8 s, then 1.2 s spent: the fourth call captures the new addresses
        torch.testing.assert_close(graphs([x, new])[0], new * 3)
    assert torch.equal(new, torch.full((4,), 14.0)) and graphs.adoptions == 3 and len(graphs.graphs) == 2
    assert g.captures[0].memory is None  # the new capture adopts now: the old memory is let go


def test_an_adopter_whose_output_is_a_view_of_its_cache_does_not_adopt(monkeypatch):
    """A graph handing out a view of the memory it writes in place cannot serve another cache through copies
    (the caller would get a view of the graph's memory, not of its own cache)."""
    monkeypatch.setattr(cg, "_capture", on_memory_capture)

    def view_step(x, cache):
        cache.add_(x)
        return (cache[1:],)

    graphs, x = cg.CudaGraphs(view_step, "step", frozenset({1}), frozenset()), torch.ones(4)
    old = torch.zeros(4)
    for _ in range(2):
        graphs([x, old])
    del old
    assert graphs([x, torch.zeros(4)]) is None and graphs.adoptions == 0


def test_a_float_input_selects_its_own_graph(monkeypatch):
    """A symbolic float is an input of the graph (a temperature): a graph captured with one value replays only
    for that value; another runs uncaptured (or gets its own capture when it repeats)."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    graphs, a = cg.CudaGraphs(lambda x, s: (x * s,), "scale", frozenset(), frozenset()), torch.randn(4)
    assert graphs([a, 0.5]) is None  # seen once
    torch.testing.assert_close(graphs([a, 0.5])[0], a * 0.5)  # captured
    assert graphs([a, 0.7]) is None  # not the 0.5 graph's replay
    torch.testing.assert_close(graphs([a, 0.7])[0], a * 0.7)
    torch.testing.assert_close(graphs([a, 0.5])[0], a * 0.5)


def test_outputs_captured_in_inference_mode_are_copies_outside_it(monkeypatch):
    """A graph writing a cache made under inference mode is captured there, so its outputs are inference tensors:
    a call outside inference mode gets normal tensors, as eager's (copies); inside it, the graph's memory."""
    monkeypatch.setattr(cg, "capture_graph", stand_in_capture)
    with torch.inference_mode():
        cache = torch.zeros(4)

    def step(x, cache):
        cache.add_(x)
        return (cache * 2,)

    graphs, x = cg.CudaGraphs(step, "step", frozenset({1}), frozenset()), torch.ones(4)
    assert graphs([x, cache]) is None  # seen once
    with torch.no_grad():
        y = graphs([x, cache])[0]
    (g,) = graphs.graphs.values()
    assert not y.is_inference() and cg._address(y) != cg._address(g.captures[0].outs[0])
    with torch.inference_mode():
        z = graphs([x, cache])[0]
    assert z.is_inference() and torch.equal(cache, torch.full((4,), 2.0)) and torch.equal(z, 2 * cache)
    torch.testing.assert_close(y, torch.full((4,), 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kept_outputs_equal_eager_and_a_steady_loop_clones_nothing():
    """On a GPU: a small matmul and elementwise chain replayed as a CUDA graph. A loop that keeps every third
    result gets eager's values in all of them; a loop `y = f(x)` copies only its input, clones no output and
    never runs uncaptured."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 128, device="cuda"), torch.randn(128, 64, device="cuda")

    def chain(x):
        return torch.sigmoid(torch.relu(x @ w1) @ w2) * 2 + x

    c = fxcc.compile(chain, options=fxcc.CompileOptions(time_vs_eager=False))  # compiled, whatever eager's time
    xs = [torch.randn(32, 64, device="cuda") for _ in range(12)]
    kept = []
    for i, x in enumerate(xs):
        y = c(x)
        if i % 3 == 0:
            kept.append((i, y))
    g = c.fxcc.variants[0].cuda_graph
    assert isinstance(g, cg.CudaGraph), c.fxcc.explain()
    for i, y in kept:
        torch.testing.assert_close(y, chain(xs[i]), atol=1e-4, rtol=1e-4)
    kept.clear()
    overlapped, y = g.overlapped, c(xs[0])
    for x in xs[1:]:
        with Copies() as m:
            y = c(x)
        assert (m.clones, m.copies) == (0, 1)
        torch.testing.assert_close(y, chain(x), atol=1e-4, rtol=1e-4)
    assert g.overlapped == overlapped and len(g.captures) == 2
