"""Threads: a compiled model served from several threads at once (its first requests arrive together).

Captures take turns (fxcc.runtime.COMPILE_LOCK): torch's fake-tensor capture is not thread-safe, and while one
thread captures, export has the module's parameters swapped for fake tensors, so an eager run or a DyCL program
in another thread must wait for it. Every thread's every result must equal eager's, with no exception eager
would not raise, and a signature compiles once however many threads ask for it.
"""

from __future__ import annotations

import threading
import traceback

import fxcc
import pytest
import torch
import torch.nn as nn
from dynamic_nets import NETWORKS

THREADS = 4


def _serve(cm, xs: list[torch.Tensor], refs: list[torch.Tensor], rounds: int) -> tuple[list, list]:
    """Every thread calls `cm` on all of `xs` (each from its own offset), all starting together."""
    bad, errors = [], []
    start = threading.Barrier(THREADS)

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for r in range(rounds * len(xs)):
                    k = (i + r) % len(xs)
                    y = cm(xs[k])
                    if not torch.allclose(y, refs[k], atol=1e-4, rtol=1e-4):
                        bad.append((i, r, (y - refs[k]).abs().max().item()))
        except Exception:  # noqa: BLE001 - collected, the test shows them
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bad, errors


@pytest.mark.parametrize("trial", range(3))
def test_first_calls_from_several_threads_compile_once_and_equal_eager(trial):
    torch.manual_seed(trial)
    m = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64)).eval()
    cm = fxcc.compile(m, options={"time_vs_eager": False})
    xs = [torch.randn(32, 64) for _ in range(4)]
    with torch.no_grad():
        refs = [m(x) for x in xs]
    bad, errors = _serve(cm, xs, refs, rounds=2)
    assert not errors, errors[0]
    assert not bad
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0


@pytest.mark.parametrize("net", ["moe_top1", "early_exit"])
def test_a_dycl_program_served_from_several_threads_equals_eager(net):
    """Its segments compile at their first calls, while other threads run plain-Python parts of the same module."""
    for _ in range(2):
        m, xs = NETWORKS[net](d=64, batch=8)
        cm = fxcc.compile(m)
        with torch.no_grad():
            refs = [m(x) for x in xs]
        bad, errors = _serve(cm, xs, refs, rounds=1)
        assert not errors, errors[0]
        assert not bad
        assert cm.stats.compiles == 1
