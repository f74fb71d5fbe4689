"""Serving-style calls of small vision and post-processing programs: batch and resolution change from call to
call, and each program compiles static once, then once symbolic per newly changing size, with eager's outputs."""

from __future__ import annotations

import fxcc
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
