"""Python numbers as arguments: an int whose value changes recompiles once with it symbolic (torch.compile's
automatic dynamic), where torch.export's symbolic int computes what eager does; it stays a constant where the
program needs its value (a `range`, `math`), reads its type or text, or where it is negative; a bool always
specializes; `dynamic=False` compiles each value. A float argument that changes recompiles once with it a symbolic
float (the graph takes the Python float: eager's double-precision scalar arithmetic and dtype promotion); it stays a
constant where the program needs its value (a branch, a size, `math`) or reads its type."""

from __future__ import annotations

import logging
import math

import fxcc
import pytest
import torch
import torch.nn.functional as F

FAST = "canonicalize,raise,fuse,codegen{backend=extern}"  # no kernel timing: these tests are about recompiles


def compiled(fn, **kw):
    return fxcc.compile(fn, passes=FAST, **kw).fxcc


def check(cm, fn, *args, **kwargs):
    with torch.no_grad():
        got, want = cm(*args, **kwargs), fn(*args, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def scale_shift(x, s: float, n: int):
    return x * s + n


def test_int_argument_recompiles_once_symbolic(caplog):
    cm, x = compiled(scale_shift), torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="fxcc.recompiles"):
        for n in range(1, 11):
            check(cm, scale_shift, x, 2.0, n)
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    reason = cm.stats.reasons[1]
    assert reason.startswith("argument `n` changed 1 -> 2; recompiling with it symbolic") and "symbolic: n" in reason
    assert reason in caplog.text  # FXCC_LOGS=recompiles shows it
    for n in (0, 1000, 3):  # any value the guard accepts reuses the symbolic variant
        check(cm, scale_shift, x, 2.0, n)
    assert cm.stats.compiles == 2
    assert cm.variants[1].shapes.describe() == "n"


def test_keyword_int_argument():
    cm, x = compiled(scale_shift), torch.randn(4, 8)
    for n in range(5):
        check(cm, scale_shift, x, s=0.5, n=n)
    assert cm.stats.compiles == 2 and "argument `n` changed 0 -> 1" in cm.stats.reasons[1]


def test_negative_int_stays_a_constant():
    """export takes a symbolic int to be 0 or more: a negative value compiles as a constant, never the symbolic
    variant (its guard `0 <= n` sends it elsewhere)."""
    cm, x = compiled(scale_shift), torch.randn(4, 8)
    for n in (1, 2, 3, -1, -2, 4):
        check(cm, scale_shift, x, 2.0, n)
    assert cm.stats.compiles == 4
    assert "`n` stays a constant (-1: a symbolic int is taken to be 0 or more)" in cm.stats.reasons[2]


def slice_to(x, n: int):
    return x[:, :n] * 2


def arange_plus(x, n: int):
    return torch.arange(n) + x.sum()


def reshape_to(x, n: int):
    return x.reshape(n, -1) + 1


def sum_range(x, n: int):
    return sum((x * i for i in range(n)), torch.zeros_like(x))


def sqrt_scale(x, n: int):
    return x * math.sqrt(n)


def branch(x, n: int):
    return x + 1 if n > 3 else x - 1


@pytest.mark.parametrize("fn, values, most", [
    (slice_to, [0, 1, 2, 3, 5, 8, 12, 1, 0], 5),  # 0, 1 and the full width 8 specialize; 2..7 and 9.. symbolic
    (arange_plus, [0, 1, 2, 3, 7, 1, 0], 4),
    (reshape_to, [1, 2, 4, 8, 16, 32, 2], 7),
    (branch, [0, 1, 2, 3, 4, 5, 9, 2], 4),  # the guard keeps each side of the branch
])
def test_int_as_size_slice_or_branch_stays_exact(fn, values, most):
    cm, x = compiled(fn), torch.randn(4, 8) if fn is not arange_plus else torch.randn(())
    for n in values:
        check(cm, fn, x, n)
    assert cm.stats.compiles <= most and cm.stats.eager_calls == 0
    assert any("symbolic: n" in r for r in cm.stats.reasons)  # some values share a symbolic variant


@pytest.mark.parametrize("fn", [sum_range, sqrt_scale])
def test_int_the_program_needs_stays_a_constant(fn):
    """A `range(n)` or `math.sqrt(n)` takes the int's value: export specializes it, each value compiles."""
    cm, x = compiled(fn), torch.randn(4, 8)
    for n in (1, 2, 3, 4):
        check(cm, fn, x, n)
    assert cm.stats.compiles == 4
    assert "`n` stays a constant: the program needs its value" in cm.stats.reasons[1]


def type_tested(x, n):
    return x + (1 if isinstance(n, int) else 100)


def type_is(x, n):
    return x + (1 if type(n) is int else 100)


def as_text(x, n):
    return x + len(f"{n}")


def formatted(x, n):
    return x + len("%s" % n)  # noqa: UP031 - the %-formatting of a symbolic int is what is tested


def type_tested_inside(x, n):
    return _helper(x, n)


def _helper(x, n):
    return x * 2 if isinstance(n, (int, float)) else x


@pytest.mark.parametrize("fn", [type_tested, type_is, as_text, formatted, type_tested_inside])
def test_int_whose_type_or_text_is_read_stays_a_constant(fn):
    """A symbolic int fails isinstance(n, int) and prints as its symbol: where the code may read either, the int
    stays a constant (each value compiles) and the reason says where."""
    cm, x = compiled(fn), torch.randn(4, 8)
    for n in (1, 2, 10, 3):
        check(cm, fn, x, n)
    assert cm.stats.compiles == 4
    assert "`n` stays a constant: the model's code may read its type or text" in cm.stats.reasons[1]
    assert "it stays a constant" in cm.stats.reasons[2]


def keyed_by_layer(x, w: dict, n: int):
    for i in range(2):
        x = x + w[f"w{i}"][:n].sum()  # the f-string formats the layer index, not `n`
    return x


def keyed_by_n(x, w: dict, n: int):
    return x + w[f"w{n % 2}"].sum()  # the key's text is `n`'s: a symbolic `n` would find no key


@pytest.mark.parametrize("fn, most", [(keyed_by_layer, 2), (keyed_by_n, 4)])
def test_int_beside_an_f_string_is_symbolic_unless_its_own_text_is_made(fn, most):
    """An f-string in the code holding `n` reads `n`'s text only where it formats `n` (or a value computed from
    it); one of another value leaves `n` symbolic."""
    x, w = torch.randn(4, 8), {"w0": torch.randn(6), "w1": torch.randn(6)}
    cm = compiled(fn)
    for n in (1, 2, 3, 5):
        torch.testing.assert_close(cm(x, w, n), fn(x, w, n))
    assert cm.stats.compiles == most and cm.stats.eager_calls == 0
    if fn is keyed_by_n:
        assert "`n` stays a constant: the model's code may read its type or text" in cm.stats.reasons[1]


def test_bool_argument_specializes():
    def f(x, flag: bool):
        return x + 1 if flag else x - 1
    cm, x = compiled(f), torch.randn(4, 8)
    for flag in (True, False, True, False):
        check(cm, f, x, flag)
    assert cm.stats.compiles == 2 and all(v.shapes.dims == {} for v in cm.variants)


def test_dynamic_false_compiles_each_value():
    cm, x = compiled(scale_shift, dynamic=False), torch.randn(4, 8)
    for n in range(1, 5):
        check(cm, scale_shift, x, 2.0, n)
    assert cm.stats.compiles == 4 and all(v.shapes.dims == {} for v in cm.variants)


def test_dynamic_true_int_symbolic_from_the_first_compile():
    cm, x = compiled(scale_shift, dynamic=True), torch.randn(4, 8)
    for n in range(2, 8):
        check(cm, scale_shift, x, 2.0, n)
    assert cm.stats.compiles == 1 and "n" in cm.variants[0].shapes.describe()


def test_int_and_shape_change_together():
    cm = compiled(scale_shift)
    for b, n in ((2, 1), (3, 2), (4, 3), (5, 4), (6, 5)):
        check(cm, scale_shift, torch.randn(b, 8), 2.0, n)
    assert cm.stats.compiles <= 3


def sample_probs(logits, temperature: float):
    return torch.softmax(logits / temperature, dim=-1)


def test_float_argument_recompiles_once_symbolic(caplog):
    """A sampling loop with a changing temperature: one static compile, one with the temperature symbolic, and
    every call equals eager exactly (the same aten ops with the same double scalar)."""
    cm, x = compiled(sample_probs), torch.randn(4, 32)
    with caplog.at_level(logging.INFO, logger="fxcc.recompiles"):
        for i in range(10):
            t = 0.3 + 0.17 * i
            with torch.no_grad():
                assert torch.equal(cm(x, t), sample_probs(x, t))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    reason = cm.stats.reasons[1]
    assert reason.startswith("argument `temperature` changed 0.3 -> 0.47; recompiling with it symbolic")
    assert reason.endswith("symbolic: temperature") and reason in caplog.text
    assert "argument `temperature` changed" in cm.explain()
    ph = [n for n in cm.variants[1].gm.graph.nodes if n.op == "placeholder"][1]
    assert isinstance(ph.meta["val"], torch.SymFloat)  # the graph takes the number itself


def blend(a, b, w: float, eps: float):
    return torch.lerp(a, b, w) * (1 - w) + torch.clamp(a, min=eps) + a.pow(w) * eps


def test_floats_of_common_ops():
    """lerp's weight, clamp's bound, pow's exponent, Python arithmetic on the float: two compiles for any number
    of values, results equal eager's exactly; a keyword float too."""
    cm, a, b = compiled(blend), torch.rand(8, 16), torch.rand(8, 16)
    for i in range(8):
        w, eps = 0.05 + 0.11 * i, 1e-3 * (i + 1)
        with torch.no_grad():
            got, want = cm(a, b, w, eps=eps), blend(a, b, w, eps=eps)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert cm.stats.compiles == 2 and "symbolic: w, eps" in cm.stats.reasons[1]


def times(x, s: float):
    return x * s + s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
def test_float_keeps_python_scalar_promotion(dtype):
    """A Python float with a tensor promotes as a scalar (an int or bool tensor gives the default dtype, a float
    tensor keeps its dtype), and a symbolic float does the same: never as the 0-d float64 tensor it could be
    passed as, which would give float64 with an int tensor."""
    cm, x = compiled(times), (torch.randn(4, 8) * 5).to(dtype)
    for s in (0.1, 1 / 3, 2.5, 1e-3):
        with torch.no_grad():
            got, want = cm(x, s), times(x, s)
        assert got.dtype == want.dtype == (torch.get_default_dtype() if not dtype.is_floating_point else dtype)
        if s != 0.1:  # the symbolic variant: eager's very ops
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want)
    assert cm.stats.compiles == 2


def test_float_under_another_default_dtype():
    """The default dtype is part of the call's context: an int tensor times a float gives float64 there."""
    cm, x = compiled(times), torch.arange(6)
    for s in (0.5, 0.25):
        check(cm, times, x, s)
    with torch.no_grad(), _default_dtype(torch.float64):
        for s in (0.5, 0.75, 0.1):
            got, want = cm(x, s), times(x, s)
            assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)


class _default_dtype:
    def __init__(self, dtype):
        self.dtype, self.old = dtype, torch.get_default_dtype()

    def __enter__(self):
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def tensor_scale(x, s):
    return x * s


def test_float_tensor_argument_promotes_as_a_tensor():
    """A 0-d float64 tensor argument is a tensor, as it was: with an int tensor it gives float64."""
    cm, x = compiled(tensor_scale), torch.arange(6)
    for v in (0.5, 0.25, 0.125):
        check(cm, tensor_scale, x, torch.tensor(v, dtype=torch.float64))
    assert cm(x, torch.tensor(0.5, dtype=torch.float64)).dtype == torch.float64
    assert cm.stats.compiles == 1


def float_branch(x, s: float):
    return x + 1 if s > 0.5 else x - 1


def keep_ratio(x, ratio: float):
    return x[:, :int(x.shape[1] * ratio)] * 2


def sqrt_float(x, s: float):
    return x * math.sqrt(s)


def float_type(x, s):
    return x * (2 if isinstance(s, float) else 3)


@pytest.mark.parametrize("fn, why", [
    (float_branch, "the program needs its value"),
    (keep_ratio, "the program needs its value"),
    (sqrt_float, "the program needs its value"),
    (float_type, "the model's code may read its type or text"),
])
def test_float_the_program_needs_stays_a_constant(fn, why):
    """A float in a branch, a size or `math` (or whose type is read) stays a constant: each value compiles, each
    exactly as eager computes it, and the reason says why."""
    cm, x = compiled(fn), torch.randn(4, 8)
    values = (0.25, 0.75, 0.5, 0.9)
    for s in values:
        check(cm, fn, x, s)
    assert cm.stats.compiles == len(values) and cm.stats.eager_calls == 0
    assert f"`s` stays a constant: {why}" in cm.stats.reasons[1] if fn is not keep_ratio else \
        f"`ratio` stays a constant: {why}" in cm.stats.reasons[1]
    assert "it stays a constant" in cm.stats.reasons[2]


def test_float_dynamic_true_compiles_once():
    cm, x = compiled(sample_probs, dynamic=True), torch.randn(4, 32)
    for i in range(6):
        check(cm, sample_probs, x, 0.5 + 0.25 * i)
    assert cm.stats.compiles == 1 and "temperature" in cm.variants[0].shapes.describe()


def test_float_dynamic_false_compiles_each_value():
    cm, x = compiled(sample_probs, dynamic=False), torch.randn(4, 32)
    for i in range(4):
        check(cm, sample_probs, x, 0.5 + 0.25 * i)
    assert cm.stats.compiles == 4 and all(v.shapes.dims == {} for v in cm.variants)


def denoise_step(x, sigma: float, step: int):
    return x - x * (sigma / (sigma ** 2 + 1) ** 0.5) + step


def test_float_and_int_change_together():
    """A scheduler's loop: sigma (a float) and the step (an int) change at every call; one recompile makes both
    symbolic."""
    cm, x = compiled(denoise_step), torch.randn(2, 4, 8, 8)
    for step, sigma in enumerate(torch.linspace(14.6, 0.03, 12).tolist()):
        check(cm, denoise_step, x, sigma, step)
    assert cm.stats.compiles == 2 and "symbolic: sigma, step" in cm.stats.reasons[1]


def test_torch_compile_backend_takes_symbolic_floats():
    """torch.compile(backend="fxcc"): dynamo passes a float it made dynamic as a 0-d tensor read with .item();
    fxcc compiles that graph once, with the float symbolic."""
    torch._dynamo.reset()
    fn = torch.compile(sample_probs, backend="fxcc", dynamic=True,
                       options={"passes": FAST})
    x = torch.randn(4, 32)
    with torch.no_grad():
        for i in range(5):
            torch.testing.assert_close(fn(x, 0.5 + 0.2 * i), sample_probs(x, 0.5 + 0.2 * i), rtol=0, atol=0)
    torch._dynamo.reset()


class Dropped(torch.nn.Module):
    """A float attribute dynamo passes as a 0-d tensor (dynamic=True), whose value dropout's `p < 0` check needs."""

    def __init__(self):
        super().__init__()
        self.lin, self.p = torch.nn.Linear(8, 8), 0.1

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(x), self.p, False, False) * 2


def test_torch_compile_backend_prints_no_graph_for_a_float_that_stays_a_constant(capfd):
    """The symbolic-float capture fails on the check (the float then stays a constant): torch's partial graph and
    its "Unable to find user code" warning are not printed at each compile."""
    torch._dynamo.reset()
    model = Dropped().eval()
    fn = torch.compile(model, backend="fxcc", dynamic=True, options={"passes": FAST})
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(fn(x), model(x))
    torch._dynamo.reset()
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err


def test_changing_float_takes_the_fast_path(monkeypatch):
    """Once the symbolic variant serves a call shape, a new value of the float is no new guard lookup: the call
    goes straight to that variant (the value is no part of the remembered call's key)."""
    cm, x = compiled(sample_probs), torch.randn(4, 32)
    for t in (0.5, 0.7, 0.9):
        check(cm, sample_probs, x, t)
    slow = []
    full = cm._slow_call
    monkeypatch.setattr(cm, "_slow_call", lambda *a: slow.append(a) or full(*a))
    for i in range(5):
        check(cm, sample_probs, x, 1.1 + i)
    assert not slow and cm.stats.compiles == 2


def gated_shift(x, s: float, n: int):
    return (x + n) * (2 if s > 0.5 else 3)


def test_a_float_the_program_needs_leaves_the_ints_symbolic():
    """Under dynamic=True a float that decides a branch stays a constant by itself: the int beside it is still
    symbolic (one compile for every n), and the reason names the float."""
    cm, x = compiled(gated_shift, dynamic=True), torch.randn(4, 8)
    for n in range(1, 6):
        check(cm, gated_shift, x, 0.7, n)
    assert cm.stats.compiles == 1 and cm.variants[0].shapes.describe() == "x dim 0/1, n"  # not s
    assert "`s` stays a constant: the program needs its value" in cm.stats.reasons[0]
    check(cm, gated_shift, x, 0.2, 3)  # the other side of the branch: its own compile
    assert cm.stats.compiles == 2


def affine(x, s: float):
    return (x * s + 1) * s - (x > s).float()


@pytest.mark.parametrize("dtype, backend", [(torch.float32, "tvm"), (torch.int64, "extern")])
def test_generated_kernel_takes_the_float_as_an_argument(dtype, backend):
    """A TVM kernel reads a symbolic float from its 0-d float64 input, cast to the op's computation type as eager
    casts a Python scalar: one build serves every value, within fp tolerance of eager (TVM contracts a*b+c). An
    int tensor compared with the float (eager compares as floats) stays with torch."""
    cm = fxcc.compile(affine, passes="canonicalize,raise,fuse,codegen{backend=tvm}", dynamic=True).fxcc
    x = (torch.randn(16, 64) * 10).to(dtype)
    for s in (0.1, 1 / 3, -5.5, 3.0, 1e-3):
        with torch.no_grad():
            got, want = cm(x, s), affine(x, s)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    assert cm.stats.compiles == 1
    assert [k.backend for k in cm.variants[0].kernels.values()] == [backend]


def unused_float(x, s: float):
    return x + 1


def returns_float(x, s: float):
    return x * 2, s * 3


@pytest.mark.parametrize("fn", [unused_float, returns_float])
def test_float_the_graph_does_not_compute_with(fn):
    """A float the graph never reads (any value computes the same) or only returns (Python arithmetic on it, a
    float out, as eager's) is symbolic too: two compiles for any number of values."""
    cm, x = compiled(fn), torch.randn(4, 8)
    for i in range(6):
        with torch.no_grad():
            got, want = cm(x, 0.1 * i), fn(x, 0.1 * i)
        if fn is returns_float:
            assert type(got[1]) is float and got[1] == want[1]
            got, want = got[0], want[0]
        assert torch.equal(got, want)
    assert cm.stats.compiles == 2 and cm.stats.reasons[1].endswith("symbolic: s")


@pytest.mark.parametrize("fn", [
    lambda x, s: torch.nn.functional.silu(x) * s + s,  # raise's gated-act pattern took `s` for the up projection
    lambda x, s: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * s,  # rms-norm weight pattern: `s.shape`
], ids=["silu_times_float", "rms_norm_times_float"])
def test_a_symbolic_float_is_no_tensor_to_the_raising_patterns(fn):
    cm = compiled(fn)
    for s in (0.5, 2.0, 0.75, -1.0):  # the second value recompiles with `s` symbolic
        check(cm, fn, torch.randn(4, 16), s)
    assert cm.stats.eager_calls == 0 and cm.stats.compiles == 2


def attend_at(q, kc, pos: int, t: int):
    keys = kc[:, :pos + t]  # `pos` computes as a size
    return F.scaled_dot_product_attention(q, keys, keys).sum(1, keepdim=t > 1)  # `t > 1`: a SymBool no op takes


def test_one_int_export_cannot_take_symbolic_keeps_only_itself_a_constant():
    """Where the capture with every int symbolic fails, each int is tried a constant in turn: `t` (whose
    comparison is passed as a bool argument) stays a constant, and the decode position `pos` stays symbolic."""
    cm, kc = compiled(attend_at), torch.randn(1, 16, 8)
    calls = [(0, 4), (4, 2), (6, 2), (8, 2), (10, 2)]  # a prefill of 4 tokens, then steps of 2
    for pos, t in calls:
        q = torch.randn(1, t, 8)
        torch.testing.assert_close(cm(q, kc, pos, t), attend_at(q, kc, pos, t))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    assert "`t` stays a constant" in cm.stats.reasons[1] and "`pos` stays a constant" not in cm.stats.reasons[1]


def test_an_int_made_a_constant_later_leaves_the_variants_that_had_it_a_size():
    """Decode steps of length 1 (export specializes `t` at 1: the variant keeps it a size whose guard holds 1), then
    a second prefill whose `t` export cannot take symbolic (a constant from then on): the decode variant still serves
    the second loop's steps at positions it never saw, as in the first loop."""
    cm, kc = compiled(attend_at), torch.randn(1, 40, 8)
    calls = [(0, 5), (5, 1), (6, 1), (0, 9), (9, 1), (10, 1), (11, 1)]
    for k, (pos, t) in enumerate(calls):
        q = torch.randn(1, t, 8)
        torch.testing.assert_close(cm(q, kc, pos, t), attend_at(q, kc, pos, t))
        if k == 3:
            compiles = cm.stats.compiles
    assert cm.stats.compiles == compiles == 3 and cm.stats.eager_calls == 0


def window(x, pos: int):
    return x[:, pos:pos + 2] * 2


def test_torch_compile_backend_takes_an_int_dynamo_made_dynamic_symbolic_from_its_first_compile(caplog):
    """An int argument whose value changed is a SymInt of dynamo's next graph (automatic dynamic), which serves every
    later value: fxcc compiles that graph once, with the int symbolic (not static, then again at the next value)."""
    torch._dynamo.reset()
    fn = torch.compile(window, backend="fxcc", options={"passes": FAST})
    x = torch.randn(3, 16)
    with caplog.at_level(logging.INFO, logger="fxcc"), torch.no_grad():
        for pos in range(2, 9):
            torch.testing.assert_close(fn(x, pos), window(x, pos))
    torch._dynamo.reset()
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("compiling ", "recompiling "))]
    assert len(compiles) == 2, compiles


def causal_at(q, kc, pos: int, t: int):
    keys = kc[:, :pos + t]
    return F.scaled_dot_product_attention(q, keys, keys, is_causal=t > 1)


def test_a_symbolic_is_causal_is_decided_by_a_guard():
    """`is_causal=t > 1` with `t` symbolic: the flag is decided as dynamo decides it (a guard t >= 2), not a failed
    capture that keeps `t` a constant: one prefill variant serves every prompt length, one decode variant every
    step, and a step of 1 after prefills of several lengths compiles nothing."""
    cm, kc = compiled(causal_at), torch.randn(1, 2, 40, 8)
    calls = [(0, 5), (5, 1), (6, 1), (0, 9), (9, 1), (10, 1), (0, 7), (7, 1)]
    for pos, t in calls:
        q = torch.randn(1, 2, t, 8)
        torch.testing.assert_close(cm(q, kc, pos, t), causal_at(q, kc, pos, t))
    assert cm.stats.compiles == 3 and cm.stats.eager_calls == 0
    assert "stays a constant" not in cm.stats.reasons[2]
