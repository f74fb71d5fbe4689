"""The executable a variant runs: aten calls of eager regions made through torch's Python functions and methods."""

import torch
import torch.fx as fx
from fxcc.codegen.executable import build_executable

aten = torch.ops.aten


def _graph() -> fx.GraphModule:
    """A graph of the aten calls an eager region holds (views, arithmetic, a static cache's in-place writes)."""
    g = fx.Graph()
    x, y, cache, idx, w, ids, counter, m3 = (g.placeholder(n) for n in ("x", "y", "cache", "idx", "w", "ids",
                                                                         "counter", "m3"))
    src = g.call_function(aten.mul.Tensor, (x, 0.5))
    outs = [
        g.call_function(aten.reshape.default, (x, [6, 4])),
        g.call_function(aten.transpose.int, (x, 0, 1)),
        g.call_function(aten.unsqueeze.default, (x, -1)),
        g.call_function(aten.squeeze.dim, (g.call_function(aten.unsqueeze.default, (x, 0)), 0)),
        g.call_function(aten.permute.default, (x, [2, 0, 1])),
        g.call_function(aten.select.int, (x, 1, 2)),
        g.call_function(aten.t.default, (g.call_function(aten.reshape.default, (x, [6, 4])),)),
        g.call_function(aten.add.Tensor, (x, y), {"alpha": 2}),
        g.call_function(aten.add.Tensor, (x, 3)),
        g.call_function(aten.sub.Tensor, (x, y), {"alpha": 0.5}),
        g.call_function(aten.div.Tensor, (x, y)),
        g.call_function(aten.neg.default, (x,)),
        g.call_function(aten.rsqrt.default, (g.call_function(aten.mul.Tensor, (y, y)),)),
        g.call_function(aten.bmm.default, (x, g.call_function(aten.transpose.int, (y, 1, 2)))),
        g.call_function(aten.mm.default, (g.call_function(aten.select.int, (x, 0, 0)), m3)),
        g.call_function(aten.cat.default, ([x, y], 1)),
        g.call_function(aten.embedding.default, (w, ids, 0)),
        g.call_function(aten.view.default, (x, [3, 8])),
        g.call_function(aten.index_copy.default, (cache, 1, idx, src)),
        g.call_function(aten.index_copy_.default, (cache, 1, idx, src)),
        g.call_function(aten.add_.Tensor, (counter, 1)),
        g.call_function(aten.copy_.default, (g.call_function(aten.select.int, (cache, 1, 4)),
                                             g.call_function(aten.select.int, (y, 1, 0)))),
    ]
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 3, 4), torch.rand(2, 3, 4) + 0.5, torch.zeros(2, 5, 4), torch.tensor([1, 3, 4]),
            torch.randn(10, 4), torch.tensor([[0, 2, 9], [5, 0, 1]]), torch.tensor(7), torch.randn(4, 5)]


def test_eager_aten_calls_go_through_torch_functions_with_the_same_results():
    gm = _graph()
    executable, bound, _ = build_executable(gm)
    targets = [n.target for n in executable.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload)], executable.code
    assert torch.reshape in targets and "index_copy_" in targets and "add_" in targets
    want_in, got_in = _inputs(), _inputs()
    want, got = gm(*want_in), executable(*got_in, *bound)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(want_in, got_in):  # the in-place writes land in the same inputs
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(got_in[6]) == 8


def test_calls_with_keywords_the_function_lacks_stay_aten():
    g = fx.Graph()
    x = g.placeholder("x")
    e = g.call_function(aten.expand.default, (x, [2, 3]), {"implicit": False})
    m = g.call_function(aten.mul.Tensor, (x, 2))
    g.output((e, m))
    executable, _, _ = build_executable(fx.GraphModule(torch.nn.Module(), g))
    targets = [n.target for n in executable.graph.nodes if n.op in ("call_function", "call_method")]
    assert aten.expand.default in targets and torch.mul in targets
    x = torch.randn(1, 3)
    got = executable(x)
    torch.testing.assert_close(got[0], x.expand(2, 3))
    torch.testing.assert_close(got[1], x * 2)
