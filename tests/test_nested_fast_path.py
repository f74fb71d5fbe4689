"""nn.TransformerEncoder's nested-tensor fast path (fxcc.nested_fast_path): compiled output equals eager's for
every padding mask, padded rows exactly zero where eager's are, whichever mask the first call had."""

from __future__ import annotations

import warnings

import fxcc
import pytest
import torch
import torch.nn as nn

PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: no timing at compile
B, S, D = 2, 4, 8
NONE = torch.zeros(B, S, dtype=torch.bool)
END = torch.tensor([[False, False, True, True], [False, False, False, False]])  # padding at the end: fast path
MIDDLE = torch.tensor([[False, True, False, True], [False, False, False, False]])  # not left-aligned: no fast path
ALL = torch.tensor([[True] * S, [False] * S])  # a row with nothing but padding


def encoder(batch_first: bool = True, norm: bool = False, **kwargs) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 16, batch_first=batch_first, dropout=0.0)
    with warnings.catch_warnings():  # torch says when enable_nested_tensor cannot apply (batch_first=False)
        warnings.simplefilter("ignore")
        return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if norm else None, **kwargs).eval()


def compiled(model: nn.Module):
    return fxcc.compile(model, passes=PASSES, options=fxcc.CompileOptions(graph_cache=False, passes=PASSES))


def check(model: nn.Module, masks: list[torch.Tensor], batch_first: bool = True, grad: bool = False):
    """Each mask's call compiled vs eager, in order: equal outputs, rows eager zeroes exactly zero, and every call
    compiled (no eager fallback, no warning)."""
    cm = compiled(model)
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
        warnings.simplefilter("always")
        for mask in masks:
            want, got = model(x, src_key_padding_mask=mask), cm(x, src_key_padding_mask=mask)
            torch.testing.assert_close(got, want, equal_nan=True)
            zero = want == 0
            assert torch.equal(got[zero], want[zero]), "rows eager zeroes are not exactly zero"
    messages = [str(w.message) for w in caught if "fxcc" in str(w.message)]
    assert not messages and cm.stats.eager_calls == 0, (messages, cm.stats.reasons)
    return cm


@pytest.mark.parametrize("norm", [False, True])
def test_first_call_without_padding_then_with_padding(norm):
    """The first call's mask has no padding (its check against eager passes either way); later calls' masks pad
    at the end (eager's fast path: padded rows zero, before the final norm), in the middle (no fast path) and a
    whole row."""
    model = encoder(norm=norm)
    with torch.no_grad():
        eager = model(torch.randn(B, S, D), src_key_padding_mask=END)
    assert norm or eager[0, 2:].abs().sum() == 0  # the behaviour this follows: eager's padded rows are zero
    check(model, [NONE, END, MIDDLE, ALL, NONE])


def test_first_call_with_padding():
    check(encoder(), [END, NONE, MIDDLE])


def test_float_padding_mask():
    """A float mask: the nested tensor drops every key whose entry is not zero (a finite bias too)."""
    bias = torch.zeros(B, S).masked_fill(END, -1.5)
    check(encoder(), [torch.zeros(B, S), bias, torch.zeros(B, S).masked_fill(MIDDLE, -1.5)])


def test_mask_check_off_takes_the_fast_path_for_any_mask():
    check(encoder(mask_check=False), [NONE, END, MIDDLE])


@pytest.mark.parametrize("kwargs", [{"batch_first": False}, {"enable_nested_tensor": False}],
                         ids=["batch_first_false", "nested_off"])
def test_no_fast_path_no_zeroing(kwargs):
    """Without the fast path (seq-first layers, enable_nested_tensor=False) eager does not zero padded rows, nor
    does the compiled graph."""
    model = encoder(**kwargs)
    x = torch.randn(S, B, D) if kwargs.get("batch_first") is False else torch.randn(B, S, D)
    with torch.no_grad():
        out = model(x, src_key_padding_mask=END)
    padded = out.transpose(0, 1)[0, 2:] if kwargs.get("batch_first") is False else out[0, 2:]
    assert padded.abs().sum() > 0
    check(model, [NONE, END, MIDDLE], batch_first=kwargs.get("batch_first", True))


def test_training_mode_takes_no_fast_path():
    check(encoder().train(), [NONE, END])  # dropout 0: training mode, under no_grad, is deterministic


def test_a_call_with_gradients_enabled_runs_eagerly_with_one_warning():
    """With gradients enabled and weights that require them, eager skips the fast path, which the graph cannot
    see: such calls run eagerly, with one warning; calls under no_grad stay compiled."""
    model = encoder()
    cm = compiled(model)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        torch.testing.assert_close(cm(x, src_key_padding_mask=END), model(x, src_key_padding_mask=END))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(cm(x, src_key_padding_mask=END), model(x, src_key_padding_mask=END))
    assert len([w for w in caught if "fast path" in str(w.message)]) == 1
    assert cm.stats.eager_calls == 2
    model.requires_grad_(False)  # now eager takes the fast path with gradients enabled too
    torch.testing.assert_close(cm(x, src_key_padding_mask=END), model(x, src_key_padding_mask=END))
    assert cm.stats.eager_calls == 2


def test_encoder_layer_alone():
    """A bare TransformerEncoderLayer's own fast path does not zero padded rows: compiled equals eager."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 16, batch_first=True, dropout=0.0).eval()
    check(layer, [NONE, END, MIDDLE])
