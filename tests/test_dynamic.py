"""Symbolic shapes and the recompile policy: static first, a changed size recompiles once with that size
symbolic, `dynamic=` and `mark_dynamic` honoured, guards on symbol ranges, a reason for every recompile, and
in-place updates of inputs and buffers written back as eager makes them."""

from __future__ import annotations

import logging

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from fxcc.dynamic import Shapes

transformers = pytest.importorskip("transformers")

FAST = "canonicalize,raise,fuse,codegen{backend=extern}"  # no kernel timing: these tests are about shapes


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return torch.softmax(self.down(torch.relu(self.up(x))), -1) * x.shape[-2]


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def run(cm, model, *args, **kwargs):
    with torch.no_grad():
        expected = model(*args, **kwargs)
    assert_outputs_close(cm(*args, **kwargs), expected)


def test_changed_size_recompiles_once_symbolic(mlp, caplog):
    cm = fxcc.compile(mlp, passes=FAST)
    run(cm, mlp, torch.randn(2, 5, 16))
    assert cm.variants[0].shapes.dims == {}  # the first compile is static
    with caplog.at_level(logging.INFO, logger="fxcc"):
        run(cm, mlp, torch.randn(2, 7, 16))
    assert cm.stats.compiles == 2
    reason = cm.stats.reasons[1]
    assert "input `x` dim 1 is 7 where this variant has 5" in reason and "x dim 1: 5 -> 7" in reason
    assert "symbolic: x dim 1" in reason
    assert reason in caplog.text  # every recompile is logged with its reason
    for t in (9, 3, 40):
        run(cm, mlp, torch.randn(2, t, 16))
    assert cm.stats.compiles == 2
    ir = fxcc.print_graph(cm.variants[1].gm)
    assert "tensor<2xs0x16xf32>" in ir  # the IR prints the symbol
    report = cm.explain()
    assert "== compiles of MLP: 2" in report and reason in report


def test_batch_sizes_one_to_ten_compile_twice():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).eval()
    cm = fxcc.compile(model, passes=FAST)
    for b in range(1, 11):
        run(cm, model, torch.randint(0, 100, (b, 8)))
    # batch 1 static (a size of 1 is special), then one symbolic batch for 2..10
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    # sequence length next: one more compile, symbolic in both, then nothing
    run(cm, model, torch.randint(0, 100, (3, 12)))
    run(cm, model, torch.randint(0, 100, (5, 7)))
    assert cm.stats.compiles == 3
    assert "input_ids dim 1: 8 -> 12" in cm.stats.reasons[2]
    assert cm.variants[-1].shapes.describe() == "input_ids dim 0/1"


def test_bert_with_mask_symbolic_batch_and_length():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)).eval()
    cm = fxcc.compile(model, passes=FAST, dynamic=True)
    for b, t in ((2, 8), (3, 11), (6, 5)):
        ids = torch.randint(0, 100, (b, t))
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t // 2:] = 0
        run(cm, model, ids, attention_mask=mask)
    assert cm.stats.compiles == 1
    assert "symbolic: input_ids dim 0/1, attention_mask dim 0/1" in cm.stats.reasons[0]


def test_dynamic_false_compiles_every_shape(mlp):
    cm = fxcc.compile(mlp, passes=FAST, dynamic=False)
    for t in (5, 6, 7):
        run(cm, mlp, torch.randn(2, t, 16))
    assert cm.stats.compiles == 3 and all(not v.shapes.dims for v in cm.variants)


def test_mark_dynamic_is_honoured(mlp):
    cm = fxcc.compile(mlp, passes=FAST)
    x = torch.randn(4, 5, 16)
    torch._dynamo.mark_dynamic(x, 0)
    run(cm, mlp, x)
    assert cm.variants[0].shapes.dims == {0: (0,)}
    run(cm, mlp, torch.randn(9, 5, 16))
    assert cm.stats.compiles == 1


def test_symbol_range_guard_rejects_a_size_of_one(mlp):
    cm = fxcc.compile(mlp, passes=FAST, dynamic=True)
    run(cm, mlp, torch.randn(3, 5, 16))
    run(cm, mlp, torch.randn(3, 1, 16))  # export keeps sizes 0 and 1 static: the guard says >= 2
    assert cm.stats.compiles == 2
    assert "shape guard `2 <= x.size()[1]` fails" in cm.stats.reasons[1]


class ChunkOfPadded(nn.Module):
    """tests/graph_fuzz.py seed 48 (shrunk): export's constraint solver fails on the symbolic batch size
    ("Eq((216*s77 + 1)//(72*s77 + 1), 2) is inconsistent") of a chunk of a padded flattened tensor."""

    def forward(self, x):
        return nn.functional.pad(x.flatten(0), (0, 1)).chunk(2, 0)[0]


def test_a_size_export_cannot_make_symbolic_recompiles_static():
    m = ChunkOfPadded()
    cm = fxcc.compile(m, passes=FAST)
    for b in (4, 7, 7):
        run(cm, m, torch.randn(b, 3, 6, 16)[..., ::2])
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    v = cm.variants[1]
    assert v.captured.method.startswith("export (static: symbolic sizes failed") and not v.shapes.dims


def test_past_max_variants_the_warning_names_the_reasons(mlp):
    cm = fxcc.compile(mlp, passes=FAST, options=fxcc.CompileOptions(max_variants=1, dynamic=False))
    run(cm, mlp, torch.randn(2, 5, 16))
    with pytest.warns(UserWarning, match=r"it would recompile: input `x` dim 1 is 6 where this variant has 5"):
        run(cm, mlp, torch.randn(2, 6, 16))
    assert cm.stats.eager_calls == 1


def test_bad_dynamic_option_is_an_error():
    with pytest.raises(ValueError, match="dynamic must be None, True or False"):
        fxcc.CompileOptions(dynamic="yes")


class Accumulate(nn.Module):
    """Writes into its input and its buffer in place, as eager code with state does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, total):
        self.calls.add_(1)
        total.add_(x.sum(0))
        return total * 2


def test_inputs_and_buffers_written_in_place_as_in_eager():
    eager, model = Accumulate(), Accumulate()
    cm = fxcc.compile(model, passes=FAST)
    t_eager, t_cm = torch.zeros(4), torch.zeros(4)
    for n in (3, 3, 5):
        x = torch.randn(n, 4)
        expected = eager(x, t_eager)
        torch.testing.assert_close(cm(x, t_cm), expected)
        torch.testing.assert_close(t_cm, t_eager)  # the caller's tensor is updated
    assert float(model.calls) == 3.0
    assert cm.stats.param_recompiles == 0  # the graph's own write to its buffer is no parameter change


class CountsWithMergedLinears(nn.Module):
    """A buffer the forward writes, beside two linears merge-linears merges into one weight (their storage) and
    a buffer folded into a constant (`scale.exp()`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scale", torch.linspace(-1, 1, 4))

    def forward(self, x):
        self.calls.add_(1)
        return self.a(x) * self.b(x) * self.scale.exp() + self.calls


def test_a_weight_changed_between_calls_of_a_variant_writing_state_recompiles(caplog):
    """The variant's own writes to its buffer are taken as no change; a write to a weight folded into its
    constants still is one (the guard re-reads only what the compiled code wrote)."""
    torch.manual_seed(0)
    model, eager = CountsWithMergedLinears().eval(), CountsWithMergedLinears().eval()
    eager.load_state_dict(model.state_dict())
    cm = fxcc.compile(model, passes="canonicalize,raise,merge-linears,fuse,codegen{backend=extern}")
    x = torch.randn(3, 4)
    for _ in range(2):
        torch.testing.assert_close(cm(x), eager(x))
    assert cm.stats.param_recompiles == 0
    for i, name in enumerate(["a.weight", "scale"], 1):
        with torch.no_grad():
            model.get_parameter(name).mul_(2) if "." in name else model.get_buffer(name).mul_(2)
            eager.get_parameter(name).mul_(2) if "." in name else eager.get_buffer(name).mul_(2)
        with caplog.at_level(logging.INFO, logger="fxcc"):
            torch.testing.assert_close(cm(x), eager(x))
        assert cm.stats.param_recompiles == i
        assert f"the contents of {name} changed" in caplog.text


def test_output_that_is_an_input_is_the_callers_tensor():
    def f(x, out):
        out.copy_(x * 3)
        return out

    g = fxcc.compile(f, passes=FAST)
    x, out = torch.randn(5), torch.zeros(5)
    assert g(x, out) is out
    torch.testing.assert_close(out, x * 3)


class NormGate(nn.Module):
    """An RMSNorm as Llama writes it with its gated epilogue (a reduction kernel), and a pointwise kernel."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16))

    def forward(self, x, y):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return torch.nn.functional.silu(h) * y + 1, torch.tanh(y) * 2

def test_symbolic_triton_kernels_take_sizes_as_arguments(monkeypatch):
    """One Triton build of each symbolic pointwise / reduction kernel serves every size (interpreter on CPU)."""
    pytest.importorskip("triton")
    from fxcc.codegen import triton as backend
    from fxcc.dialects import KERNEL_OPS, kernel_body

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = NormGate().eval()
    cm = fxcc.compile(model, passes=FAST, dynamic=True)
    run(cm, model, torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    gm = cm.variants[-1].gm
    kbs = [kernel_body(k) for k in dict.fromkeys(n.args[1] for n in gm.graph.nodes if n.target in KERNEL_OPS)]
    built = 0
    for kb in kbs:
        for cand in backend.candidates(kb, "cpu"):
            fn = cand.build(cand.defaults).fn
            assert "sym0" in cand.plan.source  # the size is an argument of the kernel, not a constant
            for b, t in ((2, 5), (3, 11)):
                inputs = [torch.randn(b, t, 16) if p.meta["val"].dim() == 3 else torch.randn(p.meta["val"].shape)
                          for p in kb.body.graph.nodes if p.op == "placeholder"]
                for got, want in zip(fn(inputs), kb.body(*inputs)):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            built += 1
    assert {kb.kind for kb in kbs} >= {"reduction", "pointwise"} and built >= 2


class DecodeAttention(nn.Module):
    """One query token against a cache, grouped-query heads (Llama's repeat_kv), then heads merged."""

    def forward(self, q, k, v, mask):
        b, hk, n, d = k.shape
        k = k[:, :, None].expand(b, hk, 2, n, d).reshape(b, 2 * hk, n, d)
        v = v[:, :, None].expand(b, hk, 2, n, d).reshape(b, 2 * hk, n, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, 1, -1)


def decode_inputs(b: int, n: int, mask_kind: str) -> tuple:
    """A decode step's (q, k, v, mask): one query token, a cache of `n` keys (the first always kept)."""
    mask = torch.rand(b, 1, 1, n) > 0.3
    mask[..., 0] = True
    if mask_kind == "additive":
        mask = torch.zeros(b, 1, 1, n).masked_fill(~mask, float("-inf"))
    return (torch.randn(b, 4, 1, 16), torch.randn(b, 2, n, 16), torch.randn(b, 2, n, 16),
            None if mask_kind == "none" else mask)


def decode_kernel(monkeypatch, mask_kind: str):
    """DecodeAttention compiled with batch and cache length symbolic: its attention kernel's call node, body and
    the flash-decoding Triton candidate built with its defaults."""
    pytest.importorskip("triton")
    from fxcc.codegen import triton as backend
    from fxcc.dialects import KERNEL_OPS, kernel_body

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = DecodeAttention()
    cm = fxcc.compile(model, passes=FAST)
    first = decode_inputs(2, 37, mask_kind)
    for t, dims in zip(first, ((0,), (0, 2), (0, 2), (0, 3))):  # batch and cache length symbolic
        if t is not None:
            torch._dynamo.mark_dynamic(t, list(dims))
    run(cm, model, *first)
    node = next(n for n in cm.variants[-1].gm.graph.nodes if n.target in KERNEL_OPS
                and "tx.attention" in kernel_body(n.args[1]).text)
    kb = kernel_body(node.args[1])
    cand = next(c for c in backend.candidates(kb, "cpu") if c.backend == "triton-decode")
    return node, kb, cand.build(cand.defaults).fn


def _source(x):  # the model input a kernel input is (through full slices)
    return x.name if x.op == "placeholder" else _source(x.args[0])


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_split_kv_decode_attention_serves_every_cache_length(monkeypatch, mask_kind):
    """The flash-decoding Triton kernel (interpreter on CPU): one build, cache lengths 37 and 70, equal to the
    reference attention, with a padding mask of either kind or none."""
    node, kb, fn = decode_kernel(monkeypatch, mask_kind)
    for b, n in ((2, 37), (3, 70)):
        given = dict(zip(("q", "k", "v", "mask"), decode_inputs(b, n, mask_kind)))
        feed = [given[_source(x)] for x in node.args[0]]
        for got, want in zip(fn(feed), kb.body(*feed)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_split_kv_decode_attention_gives_zeros_for_a_row_without_keys(monkeypatch):
    """A sequence whose boolean mask keeps no key (the all-False row codegen checks every candidate on): eager gives
    zeros, and so must the kernel; its combine divided 0 by a zero sum into NaN, so the kernel was refused for every
    decode step and the step ran the library attention."""
    node, kb, fn = decode_kernel(monkeypatch, "bool")
    given = dict(zip(("q", "k", "v", "mask"), decode_inputs(2, 37, "bool")))
    given["mask"][0] = False
    feed = [given[_source(x)] for x in node.args[0]]
    for got, want in zip(fn(feed), kb.body(*feed)):
        assert not want.isnan().any() and not want[0].any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_symbolic_variants_static_sizes_are_all_compared():
    """Shapes.matches compares each input's static sizes (its getters of them, built once) as the loop over every
    dimension would: a size that differs anywhere rejects the call, symbolic sizes and non-size inputs never do,
    and an input of another rank is compared over the dimensions both have."""
    shapes = Shapes(dims={0: (0,), 3: (1,)}, static=[(None, 4), None, (2,), (3, None, 5)], example=[], names=[])

    def by_loop(flat):
        return not any(st is not None and any(s is not None and s != n for s, n in
                                              zip(st, tuple(x.shape) if isinstance(x, torch.Tensor) else (x,)))
                       for st, x in zip(shapes.static, flat))

    t = torch.empty
    calls = [[t(7, 4), "any", 2, t(3, 9, 5)], [t(7, 5), "any", 2, t(3, 9, 5)], [t(7, 4), "any", 3, t(3, 9, 5)],
             [t(7, 4), None, 2, t(3, 1, 6)], [t(7, 4), 1.5, 2, t(4, 9, 5)], [t(1, 4), "any", 2, t(3, 9)],
             [t(7, 4), "any", 2, t(2, 9)], [t(7), "any", 2, t(3, 0, 5)]]
    assert [shapes.matches(c) for c in calls] == [by_loop(c) for c in calls] == [True, False, False, False, False,
                                                                                True, False, True]


def test_a_symbolic_upsample_compiles_without_torch_printing_meta_failures(capfd, caplog):
    """A bilinear upsample's `_unsafe_index` has no meta function for symbolic sizes: fxcc keeps the node's recorded
    value, and torch's own log of the failure (a traceback per node) stays off stderr."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
            self.down = nn.Conv2d(4, 4, 3, groups=2, padding=1, stride=2)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            return nn.functional.interpolate(self.norm(self.down(self.conv(x))).relu(), scale_factor=2,
                                             mode="bilinear", align_corners=False)

    torch.manual_seed(0)
    model = Up().eval()
    cm = fxcc.compile(model)
    for shape in [(2, 3, 9, 9), (1, 3, 12, 7), (3, 3, 5, 5)]:
        run(cm, model, torch.randn(shape))
    printed = capfd.readouterr().err + "".join(r.getMessage() for r in caplog.records)
    assert "failed while attempting to run meta" not in printed
