"""Serving-style calls of small vision and post-processing programs: batch and resolution change from call to
call, and each program compiles static once, then once symbolic per newly changing size, with eager's outputs."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_outputs_close

FAST = "canonicalize,raise,fuse,codegen{backend=extern}"  # no kernel timing: these tests are about shapes


class UpsampleDecoder(nn.Module):
    """A UNet decoder step: a raised activation, a nearest upsample by a scale factor, a skip concat."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x):
        up = F.interpolate(F.silu(self.down(x)), scale_factor=2.0, mode="nearest")
        return torch.cat([up, x], 1)


def test_upsample_by_scale_factor_keeps_the_batch_symbolic():
    # re-propagating the graph after a pass ran upsample_nearest2d.vec's C++ decomposition, which reads each size
    # as an int: the batch became 2 again and every new batch compiled anew, reported as export's specialization
    torch.manual_seed(0)
    model = UpsampleDecoder().eval()
    cm = fxcc.compile(model, passes=FAST)
    with torch.no_grad():
        for batch in (1, 2, 3, 5):
            x = torch.randn(batch, 4, 8, 8)
            assert_outputs_close(cm(x), model(x))
    assert cm.stats.compiles == 2, cm.stats.reasons
    assert cm.stats.reasons[1].endswith("symbolic: x dim 0"), cm.stats.reasons[1]


def test_a_function_called_with_and_without_a_default_keyword_is_one_input_structure():
    # an omitted keyword argument left the call a structure of its own: `f(x)` after `f(x, alpha=0.5)` compiled
    # static again ("new input structure") instead of finding the float and the batch symbolic
    def scale(x, y=None, *, alpha=1.0):
        return x * alpha + (0 if y is None else y)

    compiled = fxcc.compile(scale, passes=FAST)
    calls = [((torch.randn(2, 3),), {}), ((torch.randn(4, 3),), {"alpha": 0.5}), ((torch.randn(5, 3),), {"alpha": 2.0}),
             ((torch.randn(3, 3),), {})]
    for args, kwargs in calls:
        assert_outputs_close(compiled(*args, **kwargs), scale(*args, **kwargs))
    stats = compiled.fxcc.stats
    assert stats.compiles == 2, stats.reasons
    assert "new input structure" not in stats.reasons[1] and "alpha" in stats.reasons[1], stats.reasons[1]


class Recurrent(nn.Module):
    """An LSTM over a GRU: nn.RNNBase keeps its weights a second time, in `_flat_weights` (and weak references)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 4, batch_first=True)

    def forward(self, x):
        return self.gru(self.lstm(x)[0])[0]


def test_an_rnn_compiles_quietly_and_its_weights_changed_are_seen(monkeypatch, caplog):
    # every compile of an LSTM warned (torch: "self.lstm._flat_weights[0] ... were assigned during export"; fxcc:
    # "attribute lstm._flat_weights (a list) is watched by identity only") about RNNBase's copy of its own weights
    import logging
    import warnings

    from fxcc import guards

    monkeypatch.setattr(guards, "_UNWATCHED", set())  # said once per process: not yet, for this test
    torch.manual_seed(0)
    model = Recurrent().eval()
    cm = fxcc.compile(model, passes=FAST)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "fxcc"):
        warnings.simplefilter("always")
        for batch in (2, 3):  # a static compile, then a symbolic one
            x = torch.randn(batch, 5, 6)
            assert_outputs_close(cm(x), model(x))
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not said, said
    with torch.no_grad():
        model.lstm.weight_hh_l0.mul_(2)  # in place: the compiled program reads the parameter as it is now
        assert_outputs_close(cm(x), model(x))
        model.lstm.weight_ih_l1 = nn.Parameter(torch.randn_like(model.lstm.weight_ih_l1))  # RNNBase lists it too
        assert_outputs_close(cm(x), model(x))
    assert "parameter lstm.weight_ih_l1 was replaced" in cm.stats.reasons[-1], cm.stats.reasons


class Conv(nn.Module):
    def __init__(self, norm=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.norm = nn.BatchNorm2d(4) if norm else nn.Identity()

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("norm", [False, True], ids=["conv", "conv-bn-folded"])
def test_a_conv_net_serves_batch_16_with_the_symbolic_variant(norm):
    # fake propagation after a pass (and decompose's conv with a BN folded in) asked torch which conv backend eager
    # takes (oneDNN from batch 16), only for the output's memory format, and kept the comparison as a guard: batch
    # 16 compiled a third variant
    torch.manual_seed(0)
    model = Conv(norm).eval()
    cm = fxcc.compile(model, passes=f"decompose,{FAST}" if norm else FAST)
    with torch.no_grad():
        for batch in (1, 2, 8, 16, 32):
            x = torch.randn(batch, 3, 8, 8)
            out = cm(x)
            assert_outputs_close(out, model(x))
            assert out.stride() == model(x).stride()
    assert cm.stats.compiles == 2, cm.stats.reasons


def test_a_symbol_a_pass_specialized_is_said_to_be_the_pass(scratch_registry):
    # the reason said "export specialized it" where a pass had; the pass's name was only in an INFO log
    from dataclasses import dataclass

    from fxcc.pipeline import Pass, PassResult

    @fxcc.register
    @dataclass(frozen=True)
    class PinBatch(Pass):
        name = "test-pin-batch"

        def apply(self, gm, ctx):
            x = next(n for n in gm.graph.nodes if n.op == "placeholder")
            int(x.meta["val"].shape[0])  # the batch read as a number: a guard that makes it one
            return PassResult(changed=False)

    model = Conv().eval()
    cm = fxcc.compile(model, passes=f"test-pin-batch,{FAST}")
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, 3, 8, 8)
            assert_outputs_close(cm(x), model(x))
    assert cm.stats.compiles == 2, cm.stats.reasons
    assert "(pass test-pin-batch specialized it)" in cm.stats.reasons[1], cm.stats.reasons[1]
