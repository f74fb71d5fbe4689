"""Python numbers as arguments: an int whose value changes recompiles once with it symbolic (torch.compile's
automatic dynamic), where torch.export's symbolic int computes what eager does; it stays a constant where the
program needs its value (a `range`, `math`), reads its type or text, or where it is negative; a bool always
specializes; `dynamic=False` compiles each value; a float argument compiles each value and says so once."""

from __future__ import annotations

import logging
import math

import fxcc
import pytest
import torch

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


def scale(x, s: float):
    return x * s


def test_float_argument_compiles_each_value_and_says_so_once():
    """torch.export takes a float input as a constant: each value compiles (up to max_variants, then eager),
    exactly; one warning says why and how to avoid it."""
    cm, x = compiled(scale), torch.randn(4, 8)
    with pytest.warns(UserWarning) as record:
        for i in range(4):
            check(cm, scale, x, 0.5 + i)
    said = [str(w.message) for w in record if "a float argument stays a constant" in str(w.message)]
    assert len(said) == 1 and "argument `s` changed 0.5 -> 1.5" in said[0]
    assert cm.stats.compiles == 4 and "a float argument stays a constant" in cm.stats.reasons[3]
