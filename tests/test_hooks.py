"""Forward hooks: a compiled graph would run them once, at capture, on fake tensors, and never at its calls.

A module with forward (pre-)hooks on itself or any submodule, or with global ones, runs eagerly with a warning
naming them; registering or removing a hook later recompiles (fxcc.hooks counts registrations, so the check per
call is one integer compare); transformers' output-capturing hooks, which act only inside the model's own call,
keep a transformers model compiled.
"""

from __future__ import annotations

import warnings

import fxcc
import pytest
import torch
import torch.nn as nn

EXTERN = "canonicalize,raise,fuse,codegen{backend=extern}"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def compiled(m: nn.Module, **kw):
    return fxcc.compile(m, passes=EXTERN, options={"time_vs_eager": False}, **kw)


@pytest.fixture
def x():
    return torch.randn(2, 8)


def test_a_hook_registered_before_the_compile_runs_at_every_call(x):
    m = net()
    seen = []
    m[1].register_forward_hook(lambda mod, args, out: seen.append(out))
    cm = compiled(m)
    with pytest.warns(UserWarning, match=r"runs eagerly while forward hooks are registered \(a forward hook "
                                         r"\S*<lambda> on `1` \(ReLU\)\)"), torch.no_grad():
        ys = [cm(x) for _ in range(3)]
    assert len(seen) == 3 and all(type(t) is torch.Tensor for t in seen)  # no fake tensor from a capture
    with torch.no_grad():
        torch.testing.assert_close(ys[-1], m(x))
    assert cm.stats.compiles == 0


def test_a_hook_registered_or_removed_after_the_compile_is_seen(x):
    m = net()
    cm = compiled(m)
    with torch.no_grad():
        cm(x)
        assert cm.stats.compiles == 1
        handle = m[2].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        with pytest.warns(UserWarning, match=r"forward pre-hook \S*<lambda> on `2` \(Linear\)"):
            got = cm(x)
        torch.testing.assert_close(got, m(x))  # the hook doubles the last layer's input, as in eager
        handle.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = cm(x)
            torch.testing.assert_close(got, m(x))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 1


def test_a_global_hook_keeps_it_eager(x):
    m = net()
    cm = compiled(m)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    try:
        with pytest.warns(UserWarning, match=r"a global forward hook"), torch.no_grad():
            cm(x)
        assert "Linear" in calls
    finally:
        handle.remove()


def test_hooks_on_the_module_whose_forward_is_compiled_run_around_it(x):
    """`m.forward = fxcc.compile(m.forward)`: nn.Module.__call__ runs m's own hooks around the compiled forward."""
    m = net()
    seen = []
    m.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    m.forward = fxcc.compile(m.forward, passes=EXTERN, options={"time_vs_eager": False})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        m(x)
        m(x)
    assert seen == [torch.Size([2, 4])] * 2
    assert m.forward.fxcc.stats.compiles == 1 and m.forward.fxcc.stats.eager_calls == 0


def test_transformers_output_capturing_hooks_keep_the_model_compiled():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    m = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        want = m(ids, output_hidden_states=True)  # installs transformers' hooks on the layers
    assert any(sub._forward_hooks for sub in m.modules())
    cm = compiled(m)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        got = cm(ids, output_hidden_states=True)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b)
