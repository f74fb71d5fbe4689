"""nn.TransformerEncoder's nested-tensor fast path and each encoder layer's own (fxcc.nested_fast_path): compiled
output equals eager's for every padding mask, padded rows exactly zero where eager's are, whichever mask the first
call had; a float mask read as bool where eager's fast path reads it so."""

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


def layer_alone(**kwargs) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(D, 2, 16, batch_first=True, dropout=0.0, **kwargs).eval()


def test_encoder_layer_alone():
    """A bare TransformerEncoderLayer's own fast path does not zero padded rows: compiled equals eager."""
    check(layer_alone(), [NONE, END, MIDDLE])


FLOAT_MASKS = [torch.zeros(B, S), torch.zeros(B, S).masked_fill(END, -1.5),  # a finite bias: the key is dropped
               torch.zeros(B, S).masked_fill(MIDDLE, 2.0), torch.zeros(B, S).masked_fill(END, float("-inf")),
               torch.randn(B, S, generator=torch.Generator().manual_seed(2))]  # every key dropped: NaN rows


@pytest.mark.parametrize("kwargs", [{}, {"norm_first": True, "activation": "gelu"}], ids=["post_norm", "pre_norm"])
def test_encoder_layer_alone_reads_a_float_padding_mask_as_its_fast_path_does(kwargs):
    """The layer's own fast path (`torch._transformer_encoder_layer_fwd`) reads a float mask as bool: a key whose
    entry is not zero is dropped, whatever the value (not added as a bias, as the ordinary path and export do)."""
    model = layer_alone(**kwargs)
    x = torch.randn(B, S, D)
    with torch.no_grad():  # the behaviour this follows
        bias = FLOAT_MASKS[1]
        torch.testing.assert_close(model(x, src_key_padding_mask=bias), model(x, src_key_padding_mask=END))
    check(model, FLOAT_MASKS)


def test_encoder_layer_alone_gives_nan_where_a_row_has_no_key_left():
    """With every key of a row padded, the fast path's softmax has nothing to weigh: eager gives NaN in every
    position of that row (the ordinary path a finite one); so does the compiled graph, bool mask or float."""
    model = layer_alone()
    with torch.no_grad():
        assert model(torch.randn(B, S, D), src_key_padding_mask=ALL)[0].isnan().all()
    check(model, [ALL, torch.zeros(B, S).masked_fill(ALL, float("-inf")), END])


def test_encoder_layer_alone_merges_a_float_src_mask_with_the_padding_mask_as_bool():
    """With src_mask too, the fast path adds the two masks (`merge_masks`) and drops a key where the sum is not
    zero: a query row of src_mask with every key dropped is NaN."""
    model, cm = layer_alone(), None
    src_mask = torch.zeros(S, S).masked_fill(torch.eye(S, dtype=torch.bool).roll(1, 0), -2.0)
    src_mask[1] = float("-inf")
    x = torch.randn(B, S, D)
    cm = compiled(model)
    with torch.no_grad():
        for padding in (FLOAT_MASKS[1], END, None):
            kwargs = {} if padding is None else {"src_key_padding_mask": padding}
            want, got = model(x, src_mask=src_mask, **kwargs), cm(x, src_mask=src_mask, **kwargs)
            assert want[:, 1].isnan().all()
            torch.testing.assert_close(got, want, equal_nan=True)
    assert cm.stats.eager_calls == 0, cm.stats.reasons


def test_encoder_layer_alone_ignores_is_causal_as_its_fast_path_does():
    """The fast path takes no `is_causal` hint (the ordinary path raises without a mask): compiled equals eager."""
    model, x = layer_alone(), torch.randn(B, S, D)
    cm = compiled(model)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": END}):
            torch.testing.assert_close(cm(x, is_causal=True, **kwargs), model(x, is_causal=True, **kwargs))
    assert cm.stats.eager_calls == 0, cm.stats.reasons


def test_encoder_without_nested_tensors_takes_each_layers_fast_path():
    """enable_nested_tensor=False: each layer takes its own fast path, which reads a float mask as bool."""
    check(encoder(enable_nested_tensor=False), [NONE, FLOAT_MASKS[1], FLOAT_MASKS[2], ALL])


def test_nested_encoder_with_a_mask_that_is_not_left_aligned_takes_each_layers_fast_path():
    """mask_check refuses the nested tensor for a mask padding in the middle: each layer then takes its own fast
    path (a float mask as bool, NaN in a row with no key left)."""
    check(encoder(), [FLOAT_MASKS[2], torch.tensor([[True] * S, [False, True, False, True]])])


@pytest.mark.parametrize("kwargs", [{"batch_first": False}, {"nhead": 1}], ids=["seq_first", "odd_heads"])
def test_a_layer_without_its_fast_path_adds_a_float_mask(kwargs):
    """Where the layer's configuration rules its fast path out, eager adds a float mask as a bias: so does the
    compiled graph, and calls with gradients stay compiled."""
    torch.manual_seed(0)
    batch_first = kwargs.get("batch_first", True)
    model = nn.TransformerEncoderLayer(D, kwargs.get("nhead", 2), 16, dropout=0.0, batch_first=batch_first).eval()
    check(model, FLOAT_MASKS[:2], batch_first=batch_first, grad=True)


def test_a_layer_called_with_gradients_enabled_runs_eagerly_with_one_warning():
    """With gradients enabled and weights that require them, eager skips the layer's fast path (a float mask is a
    bias then), which the graph cannot see: such calls run eagerly, with one warning."""
    model, x, bias = layer_alone(), torch.randn(B, S, D), FLOAT_MASKS[1]
    cm = compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(cm(x, src_key_padding_mask=bias), model(x, src_key_padding_mask=bias))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(cm(x, src_key_padding_mask=bias), model(x, src_key_padding_mask=bias))
    assert len([w for w in caught if "fast path" in str(w.message)]) == 1
    assert cm.stats.eager_calls == 2
