"""horizontal: per-input updates become one foreach op, per-input elementwise ops one op over a stack.

The pass's IR on small hand-written graphs (and what it leaves alone), a differential run of each, and the decode
step of a 4-layer Llama with a static cache, whose per-layer cache positions (`arange + cumulative_length`) and
counter updates (`cumulative_length.add_(1)`) are 2 int64 adds per layer without it.
"""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.fx as fx
from fxcc.passes.canonicalize import Canonicalize
from fxcc.passes.horizontal import Horizontal
from fxcc.pipeline import PassContext

aten = torch.ops.aten


def captured(fn, *args) -> fx.GraphModule:
    """`fn` as an aten graph (in-place ops in place, as fxcc's capture leaves a static cache's), canonicalized."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(*args)
    Canonicalize().apply(gm, PassContext())  # each layer's `arange(1)`: one constant
    gm.recompile()
    return gm


def ops(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def counters(n: int):
    return [torch.tensor(k * 3) for k in range(n)]


def layers(keys, c0, c1, c2, x):
    """Three layers, each writing x at its own counter and advancing it (a StaticCache's update)."""
    out = []
    for k, c in zip(keys, (c0, c1, c2)):
        where = torch.arange(1) + c
        c.add_(1)
        k.index_copy_(0, where, x)
        out.append(k.sum())
    return torch.stack(out)


def run(gm: fx.GraphModule, make) -> tuple:
    args = make()
    out = gm(*args)
    return out, args


def test_per_layer_counters_become_one_stacked_add_and_one_foreach_update():
    def make():
        return [torch.zeros(8, 2) for _ in range(3)], *counters(3), torch.ones(1, 2)

    gm = captured(layers, *make())
    before = ops(gm)
    assert before.count(aten.add.Tensor) == 3 and before.count(aten.add_.Tensor) == 3
    expected = run(gm, make)
    result = Horizontal().apply(gm, PassContext())
    after = ops(gm)
    assert result.stats == {"updates": 3, "elementwise": 3}
    assert after.count(aten.add.Tensor) == 1 and aten.add_.Tensor not in after
    assert after.count(aten._foreach_add_.Scalar) == 1 and after.count(aten.stack.default) == 2  # and the output's
    got = run(gm, make)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_update_read_before_the_last_stays_where_it_is():
    """Layer 0's counter is read after its update and before layer 1's: batching it would move its write past
    that read."""
    def fn(c0, c1, x):
        c0.add_(1)
        y = x * c0
        c1.add_(1)
        return y

    def make():
        return *counters(2), torch.ones(2)

    gm = captured(fn, *make())
    expected = run(gm, make)
    result = Horizontal().apply(gm, PassContext())
    assert not result.changed and ops(gm).count(aten.add_.Tensor) == 2
    torch.testing.assert_close(run(gm, make), expected, rtol=0, atol=0)


def test_an_input_written_before_an_op_keeps_that_op_in_place():
    """c1 + 1 reads c1 after c1 is written: it cannot be computed with c0 + 1 at the top."""
    def fn(c0, c1):
        a = c0 + 1
        c1.mul_(2)
        b = c1 + 1
        return a * b

    def make():
        return torch.tensor([1, 2]), torch.tensor([3, 4])

    gm = captured(fn, *make())
    expected = run(gm, make)
    result = Horizontal().apply(gm, PassContext())
    assert not result.changed
    torch.testing.assert_close(run(gm, make), expected, rtol=0, atol=0)


def test_broadcast_operands_and_mixed_dtypes():
    """Operands of other ranks are stacked along the output's dimensions; a float op of mixed dtypes (a 0-dim
    operand promoting less than a stacked one would) is left alone."""
    def fn(c0, c1, v, f0, f1, h):
        return (v + c0) * 2, (v + c1) * 3, f0 * h, f1 * h

    def make():
        return (torch.tensor(5), torch.tensor(7), torch.arange(4), torch.tensor(0.5, dtype=torch.float64),
                torch.tensor(0.25, dtype=torch.float64), torch.ones(3, dtype=torch.float32))

    gm = captured(fn, *make())
    expected = run(gm, make)
    result = Horizontal().apply(gm, PassContext())
    assert result.stats == {"elementwise": 2}
    assert ops(gm).count(aten.add.Tensor) == 1 and ops(gm).count(aten.mul.Tensor) == 4
    torch.testing.assert_close(run(gm, make), expected, rtol=0, atol=0)


transformers = pytest.importorskip("transformers")


def int64_adds(gm: fx.GraphModule) -> int:
    """int64 additions of a step's graph: add nodes, and one per tensor a foreach add writes."""
    count = 0
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.target in (aten.add.Tensor, aten.add_.Tensor) and getattr(v, "dtype", None) == torch.int64:
            count += 1
        elif n.target is aten._foreach_add_.Scalar:
            count += 1
    return count


@pytest.mark.parametrize("horizontal", [False, True])
def test_a_static_cache_decode_step_has_three_int64_adds_not_two_per_layer(horizontal, monkeypatch):
    """4 layers: 2 x 4 + 3 int64 adds (each layer's positions and counter, the step's own position, its
    increment and the position ids') -> 3 (the positions of all layers, the step's position, one foreach update);
    tokens and the caller's cache as eager's."""
    from fxcc import decode_loop
    from transformers import StaticCache

    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.disable_compile = True
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    passes = f"canonicalize,raise,{'horizontal,' if horizontal else ''}codegen{{backend=extern}}"
    cm = fxcc.compile(model, passes=passes)
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    kw = dict(max_new_tokens=6, do_sample=False)
    expected = model.generate(ids, cache=caches[0], **kw)
    got = cm.generate(ids, cache=caches[1], **kw)
    assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
    assert torch.equal(got, expected)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.cumulative_length, b.cumulative_length)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    step = next(iter(cm.decode_loop.steps.values()))
    assert int64_adds(step.variants[-1].gm) == (3 if horizontal else 2 * 4 + 3)


def _write_then_read(a, b):
    """Eager adds 1 to `a` before it reads `b`: where the two are one tensor, `y` sees the update."""
    a.add_(1)
    y = b * 1
    b.add_(1)
    return y


def _read_write_read(a, b):
    """Two reads of `b` around a write of `a`: where the two are one tensor, the reads differ (CSE merges them)."""
    y = b * 3
    a.add_(1)
    z = b * 3
    return y + z


@pytest.mark.parametrize("fn", [_write_then_read, _read_write_read])
@pytest.mark.parametrize("shared", ["same", "overlapping"])
def test_a_call_whose_written_input_shares_memory_with_another_runs_eagerly(fn, shared):
    """The passes take distinct inputs as distinct memory (the horizontal pass moves `a.add_(1)` past the read of `b`,
    CSE merges the two reads of `b`): a call passing one tensor twice, or two views that overlap, runs eagerly with
    a warning, the result and the tensor as eager's; distinct tensors and views that do not meet run compiled."""
    cm = fxcc.compile(fn, options=fxcc.CompileOptions(check_eager=False, time_vs_eager=False))
    cm(torch.arange(3.0), torch.arange(3.0) + 10)
    x, xe = torch.arange(5.0), torch.arange(5.0)
    if shared == "same":
        a, b, ae, be = x[:3], x[:3], xe[:3], xe[:3]
    else:
        a, b, ae, be = x[:3], x[1:4], xe[:3], xe[1:4]
    with pytest.warns(UserWarning, match="share memory"):
        got = cm(a, b)
    assert torch.equal(got, fn(ae, be)) and torch.equal(x, xe)
    x, xe = torch.arange(6.0), torch.arange(6.0)
    got = cm(x[:3], x[3:])
    assert torch.equal(got, fn(xe[:3], xe[3:])) and torch.equal(x, xe)
    assert cm.fxcc.stats.eager_calls == 1
