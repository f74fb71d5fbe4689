"""The hot path of a compiled module's call (the signature served last, checked by one C++ tensor guard over
its arguments and the model's tensors): taken on repeated calls, and every change the full guard sees is seen
through it too."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
        self.scale = 2.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


def _pair():
    torch.manual_seed(0)
    m = Net().eval()
    return m, fxcc.compile(m)


def _same(c, m, x):
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)


def test_repeated_calls_take_it():
    m, c = _pair()
    x = torch.randn(4, 16)
    for _ in range(3):
        _same(c, m, x)
    assert c._hot is not None and c._hot.variant in c._compiled
    assert c.stats.compiles == 1


def test_changes_of_the_model_are_seen_through_it():
    m, c = _pair()
    x = torch.randn(4, 16)
    for _ in range(3):
        _same(c, m, x)
    with torch.no_grad():
        m.fc1.weight.mul_(0.5)  # in place
    _same(c, m, x)
    m.fc2.weight = nn.Parameter(torch.randn(8, 32))  # rebound
    _same(c, m, x)
    with torch.no_grad():
        m.fc2.bias.data = torch.randn(8)  # new memory behind the same parameter
    _same(c, m, x)
    m.scale = 3.0  # an attribute the graph read
    _same(c, m, x)
    m.fc1.weight.data = m.fc1.weight.data.t().contiguous().t()  # same values, other strides
    _same(c, m, x)


def test_other_arguments_miss_it():
    m, c = _pair()
    x, y = torch.randn(4, 16), torch.randn(6, 16)
    for _ in range(2):
        _same(c, m, x)
    _same(c, m, y)  # another shape
    _same(c, m, x.t().contiguous().t())  # another layout
    _same(c, m, x.double().float())
    _same(c, m, x[:, :16])
    for _ in range(40):  # alternating: both served, the hot one given up and taken again
        _same(c, m, x)
        _same(c, m, y)
    m.double()  # the model's tensors and the argument in another dtype
    _same(c, m, x.double())
    m.float()
    _same(c, m, x)


def test_modes_and_contexts_miss_it():
    m, c = _pair()
    x = torch.randn(4, 16)
    for _ in range(2):
        _same(c, m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            got, want = c(x), m(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn(4, 16, requires_grad=True)
    out = c(g)  # gradients enabled and asked for: eager's outputs, with their graph
    out.sum().backward()
    assert g.grad is not None
    m.train()
    _same(c, m, x)
    m.eval()
    _same(c, m, x)


def test_generate_installing_its_forward_is_not_counted_as_a_change_of_the_model(monkeypatch):
    """`generate` puts fxcc's forward on the model and takes it away: the module-state guard takes that one dict's
    tag again, so a served model's generates do not use up the changes it tolerates before comparing every entry
    of every module dict at every call (fxcc.guards._REARMS)."""
    from fxcc import guards
    from fxcc.bench_generate import llama

    monkeypatch.setattr(guards, "_REARMS", 2)
    m = llama(64, 2, 4, 2, 128, torch.float32, "cpu")
    c = fxcc.compile(m)
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = m.generate(ids, **kw)
        for _ in range(5):
            torch.testing.assert_close(c.generate(ids, **kw), want, rtol=0, atol=0)
        assert c._params.versions is not None  # still checked by the tags
        m.model.norm.eps = 0.5  # a change the graph depends on, after the generates: still seen
        assert torch.equal(c.generate(ids, **kw), m.generate(ids, **kw))
        m.my_flag = True  # a new root attribute nothing reads: not a change of what compiled code computes
        torch.testing.assert_close(c.generate(ids, **kw), m.generate(ids, **kw), rtol=0, atol=0)



def test_a_signature_that_runs_eagerly_takes_it_and_reads_the_model_live():
    """Past max_variants a signature runs eagerly; its repeated calls take the hot path without the model's state
    (eager reads it live: a weight changed in place shows at once, with no recompile); a forward hook and
    another shape still go the full way."""
    torch.manual_seed(0)
    m = Net().eval()
    c = fxcc.compile(m, dynamic=False, options={"max_variants": 1})
    a, b = torch.randn(4, 16), torch.randn(3, 16)
    with torch.no_grad():
        _same(c, m, a)  # compiled
        for _ in range(3):
            _same(c, m, b)  # past max_variants: eagerly
        assert c._hot is not None and c._hot.eager and c.stats.compiles == 1
        eager = c.stats.eager_calls
        m.fc2.weight.mul_(3)
        _same(c, m, b)
        assert c.stats.eager_calls == eager + 1 and c.stats.compiles == 1
        seen = []
        handle = m.fc1.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
        _same(c, m, b)
        assert seen == [(3, 32), (3, 32)]  # the compiled module's call (eagerly) and the reference call each ran it
        handle.remove()
        _same(c, m, a)  # the compiled signature again (recompiled for the changed weight)


def _slower_than_eager(monkeypatch):
    """The compile-time timing's verdict forced to "eager wins": the variant is kept for explain, its signature runs
    eagerly."""
    from fxcc.autotune import vs_eager

    monkeypatch.delenv("FXCC_TIME_VS_EAGER", raising=False)  # the suite's default turns the timing off
    monkeypatch.setattr(vs_eager, "judge", lambda *a, **k: vs_eager.Verdict(compiled_ms=2.0, eager_ms=1.0,
                                                                             eager_wins=True))
    monkeypatch.setattr(vs_eager, "remembered", lambda cache, key: None)


def _eager_signature(monkeypatch):
    """A model, its compile and an input whose signature the timing against eager sent to eager (warned once)."""
    _slower_than_eager(monkeypatch)
    torch.manual_seed(0)
    m = Net().eval()
    c = fxcc.compile(m, options={"time_vs_eager": True})
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="runs eagerly"):
        _same(c, m, x)
    return m, c, x


def test_a_signature_measured_slower_than_eager_takes_it_and_reads_the_model_live(monkeypatch):
    """A signature the timing against eager sent to eager: its repeated calls run the model directly from the hot
    path, and still see a weight changed in place or rebound, an attribute, the training flag and the caller's
    default dtype and autocast as eager does."""
    m, c, x = _eager_signature(monkeypatch)
    assert c.variants[-1].slower_than_eager
    for _ in range(2):
        _same(c, m, x)
    # no hook on the model: its forward itself, without nn.Module.__call__'s own work
    assert c._hot is not None and c._hot.eager and c._hot.call == m.forward
    calls = c.stats.eager_calls
    with torch.no_grad():
        m.fc1.weight.mul_(0.5)
    _same(c, m, x)
    m.fc2.weight = nn.Parameter(torch.randn(8, 32))
    _same(c, m, x)
    m.scale = -1.0
    _same(c, m, x)
    assert c.stats.eager_calls == calls + 3 and c.stats.compiles == 1
    m.train()  # another signature (training mode), without gradients: its own verdict
    with pytest.warns(UserWarning, match="runs eagerly"):
        _same(c, m, x)
    m.eval()
    _same(c, m, x)
    with torch.no_grad():
        torch.set_default_dtype(torch.float64)
        try:
            assert c(x).dtype == m(x).dtype == torch.float32
            assert c._hot is None or not c._hot.context_holds()
        finally:
            torch.set_default_dtype(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert c(x).dtype == m(x).dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["module", "global", "backward"])
def test_a_hook_registered_after_the_eager_hot_path_was_taken_runs(monkeypatch, where):
    """The eager hot path calls the model's forward directly while no hook would run around it; a hook on the
    model itself, a global one or a backward hook registered later sends the next call through nn.Module.__call__
    again, as eager does."""
    m, c, x = _eager_signature(monkeypatch)
    _same(c, m, x)
    assert c._hot is not None and c._hot.eager and c._hot.call == m.forward
    seen = []

    def hook(mod, inputs, out=None):
        seen.append(type(mod).__name__)

    if where == "module":
        handle = m.register_forward_hook(hook)
    elif where == "global":
        handle = nn.modules.module.register_module_forward_pre_hook(hook)
    else:
        handle = m.register_full_backward_hook(lambda mod, gin, gout: seen.append("backward"))
    try:
        with torch.no_grad():
            c(x)
        _same(c, m, x)
        assert c._hot is None or c._hot.call is m
    finally:
        handle.remove()
    if where == "module":
        assert seen == ["Net"] * 3  # the compiled module's two eager calls and the reference call
    elif where == "global":
        assert seen.count("Net") == 3 and seen.count("Linear") == 6
    with torch.no_grad():
        c(x)
        c(x)
    assert c._hot is not None and c._hot.call == m.forward  # with the hook gone, directly again


def test_the_eager_hot_path_steps_around_fxccs_own_forward(monkeypatch):
    """While fxcc's forward is installed on the model (generate puts it there), a call that runs eagerly runs the
    model's own forward, not fxcc's again."""
    m, c, x = _eager_signature(monkeypatch)
    _same(c, m, x)
    assert c._hot is not None and c._hot.eager

    def forward(*a, **k):
        raise AssertionError("fxcc's forward ran where the model's own should")

    forward.fxcc = c
    m.forward = forward
    try:
        with torch.no_grad():
            got = c(x)
    finally:
        del m.forward
    _same(c, m, x)
    with torch.no_grad():
        torch.testing.assert_close(got, m(x))


def test_a_plain_variant_runs_its_executable_directly_and_still_sees_changes():
    """A variant whose run is its executable alone is run by the hot path directly: with gradients enabled its
    outputs carry none (an eval model's weights require them), and changes of the model are still seen."""
    m, c = _pair()
    x = torch.randn(4, 16)
    for _ in range(3):
        _same(c, m, x)
    assert c._hot is not None and c._hot.direct is not None and c._hot.leaf
    out = c(x)  # gradients enabled, the weights require them, the input does not
    assert not out.requires_grad
    torch.testing.assert_close(out, m(x).detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.fc2.bias.add_(1.0)
    _same(c, m, x)
    m.scale = 5.0
    _same(c, m, x)
    assert c.stats.eager_calls == 0


def test_check_eager_always_checks_the_hot_signature_too(monkeypatch):
    """A module whose calls are all checked against eager (check_eager="always") serves no signature by its
    executable directly: the check is the variant's run."""
    monkeypatch.setenv("FXCC_CHECK_EAGER", "always")
    m, c = _pair()
    x = torch.randn(4, 16)
    for _ in range(3):
        _same(c, m, x)
    assert c._hot is not None and c._hot.direct is None
    assert c.stats.checked_calls >= 3
