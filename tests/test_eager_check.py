"""The first call of each compiled signature is compared with eager; where they differ, fxcc runs eagerly
and says so (fxcc.eager_check)."""

from __future__ import annotations

import logging
import traceback
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import dycl, eager_check, runtime
from fxcc.codegen.executable import KernelCall


class TracesDifferently(nn.Module):
    """Computes something else under tracing, as transformers' mask helpers do (an explicit causal mask when
    tracing, none for an all-ones mask in eager)."""

    def forward(self, x):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return x * 2
        return x * 3


class BumpsState(nn.Module):
    def forward(self, x, state):
        state.add_(1)
        return x + state


def test_a_model_that_traces_differently_runs_eagerly_with_a_warning():
    cm = fxcc.compile(TracesDifferently())
    x = torch.ones(2, 3)
    with pytest.warns(UserWarning, match=r"fxcc: TracesDifferently: the compiled call differs from eager on this "
                                         r"call's inputs \(out differs by 0.333 of its scale\); this input "
                                         r"signature runs eagerly"):
        first = cm(x)
    torch.testing.assert_close(first, x * 3)
    torch.testing.assert_close(cm(x), x * 3)
    assert cm.eager_signatures == ["the compiled call differs from eager on this call's inputs (out differs by "
                                   "0.333 of its scale)"]
    assert cm.stats.eager_calls == 1


def test_an_agreeing_first_call_returns_the_compiled_result_and_mutates_inputs_once():
    cm = fxcc.compile(BumpsState())
    x, state = torch.zeros(3), torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cm(x, state), torch.ones(3))
    torch.testing.assert_close(state, torch.ones(3))  # eager ran on a copy
    assert cm.eager_signatures == [] and len(cm.variants) == 1


@pytest.mark.parametrize("how", ["option", "env"])
def test_the_check_can_be_turned_off(how, monkeypatch):
    if how == "env":
        monkeypatch.setenv("FXCC_CHECK_EAGER", "0")
        cm = fxcc.compile(TracesDifferently())
    else:
        cm = fxcc.compile(TracesDifferently(), options=fxcc.CompileOptions(check_eager=False))
    x = torch.ones(2)
    torch.testing.assert_close(cm(x), x * 2)  # what was traced, unchecked
    assert cm.eager_signatures == []


def test_approximate_passes_and_written_module_state_are_not_checked():
    assert eager_check.applies(None, exact=False) == "approximate passes"

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * self.calls

    cm = fxcc.compile(Counter(), options=fxcc.CompileOptions(check_eager=True))
    x = torch.ones(2)
    torch.testing.assert_close(cm(x), x)  # the buffer counts one call, not two
    assert eager_check.applies(cm.variants[0].gm, exact=True) == "writes module state"


class PlusOne(nn.Module):
    def forward(self, x):
        return x + 1


def test_a_compiled_call_that_raises_where_eager_does_not_runs_eagerly_with_a_warning():
    """A graph that fails when run (as a vmap traced out of its transform does: Nemotron ASR's masks)."""
    x = torch.ones(2, 3)
    first_call = eager_check.first_call(lambda flat: torch.mm(flat[0], flat[0]), PlusOne(),  # [2, 3] @ [2, 3]
                                        lambda a, k: list(a), (x,), {}, "PlusOne")
    torch.testing.assert_close(first_call.result, x + 1)
    assert first_call.reason.startswith("the compiled call differs from eager: it raised RuntimeError: ")
    assert first_call.reason.endswith("(eager did not)")


class WritesStateDifferently(nn.Module):
    """Writes into the tensor it is given otherwise under tracing (a compiled KV cache update gone wrong)."""

    def forward(self, x, state):
        k = 2 if torch.compiler.is_compiling() or torch.compiler.is_exporting() else 3
        state.add_(x * k)
        return x + state, state


def test_a_differing_first_call_leaves_the_callers_state_as_eager_does():
    cm = fxcc.compile(WritesStateDifferently())
    x, state = torch.ones(3), torch.zeros(3)
    with pytest.warns(UserWarning, match="the compiled call differs from eager"):
        out, returned = cm(x, state)
    torch.testing.assert_close(state, torch.full((3,), 3.0))  # eager's write once, not the compiled one's
    torch.testing.assert_close(out, torch.full((3,), 4.0))
    assert returned is state  # eager returns the caller's tensor, not the copy it ran on
    cm(x, state)  # the signature now runs eagerly, from the caller's state
    torch.testing.assert_close(state, torch.full((3,), 6.0))


def test_a_first_call_that_raises_leaves_the_callers_state_as_eager_does():
    x, state = torch.ones(3), torch.zeros(3)

    def compiled(flat):
        flat[1].add_(100)  # wrote before it failed
        raise RuntimeError("kernel failed")

    checked = eager_check.first_call(compiled, WritesStateDifferently(), lambda a, k: list(a), (x, state), {}, "W")
    torch.testing.assert_close(state, torch.full((3,), 3.0))
    assert checked.result[1] is state


# ------------------------------------------------------------------ check_eager="always": every call

PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: nothing timed


def _always(model: nn.Module, **options) -> fxcc.CompiledModule:
    return fxcc.compile(model, check_eager="always", passes=options.pop("passes", PASSES),
                        options=fxcc.CompileOptions(time_vs_eager=False, **options))


def _kernel_calls(variant) -> list:
    return [n.target for n in variant.executable.graph.nodes if isinstance(n.target, KernelCall)]


def _corrupt(holder, attr: str, after: int) -> None:
    """`holder.attr` (a kernel's or a segment's compiled call) adds 1 to its first output from call `after` + 1 on."""
    inner, calls = getattr(holder, attr), [0]

    def wrong(*a):
        calls[0] += 1
        out = list(inner(*a))
        if calls[0] > after:
            out[0] = out[0] + 1
        return out
    setattr(holder, attr, wrong)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return torch.softmax(self.down(torch.relu(self.up(x))), -1)


def test_always_catches_a_kernel_gone_wrong_on_a_later_call_and_names_it():
    model = Mlp().eval()
    cm = _always(model, passes="canonicalize,raise,fuse,codegen{backend=tvm}")  # kernels called, not spliced in
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            torch.testing.assert_close(cm(x), model(x))
    (variant,) = cm.variants
    kernel = _kernel_calls(variant)[0]
    _corrupt(kernel, "impl", after=0)
    with pytest.warns(UserWarning, match=rf"fxcc: Mlp: variant 1 \(tensor<4x16xf32>\), call 3: the compiled call "
                                         rf"differs from eager on this call's inputs \(out differs by .*located: "
                                         rf"kernel {kernel.key} \(.*\) differs from its reference .* runs eagerly "
                                         r"from now on"):
        out = cm(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))  # eager's result
        torch.testing.assert_close(cm(x), model(x))  # the variant now runs eagerly
    assert cm.stats.eager_calls == 1 and cm.stats.checked_calls == 3
    assert "call 3: the compiled call differs" in cm.explain() and f"kernel {kernel.key}" in cm.explain()


def test_always_on_agreeing_calls_returns_compiled_results_and_mutates_inputs_once():
    cm = _always(BumpsState())
    x, state = torch.zeros(3), torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(1, 4):
            torch.testing.assert_close(cm(x, state), torch.full((3,), float(i)))
    torch.testing.assert_close(state, torch.full((3,), 3.0))  # one write per call: eager ran on copies
    assert cm.stats.checked_calls == 3 and cm.eager_signatures == []


def test_always_leaves_a_kv_cache_in_eagers_state_when_a_call_differs():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = transformers.LlamaModel(config).eval()
    cm = _always(model)
    ids = torch.randint(0, 64, (1, 4))
    cache, ref_cache = transformers.DynamicCache(config=config), transformers.DynamicCache(config=config)
    steps = [torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 1)), torch.randint(0, 64, (1, 1))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for ids in steps[:2]:  # the prompt, then a decode step: a variant of its own (a non-empty cache)
            cm(ids, cache=cache, use_cache=True)
            model(ids, cache=ref_cache, use_cache=True)
    _corrupt(cm.variants[-1], "_call", after=0)  # the graph's first output (its kernels are spliced-in torch code)
    with torch.no_grad(), pytest.warns(UserWarning, match="variant 2 .*call 2: the compiled call differs from eager"):
        out = cm(steps[2], cache=cache, use_cache=True)
    with torch.no_grad():
        ref = model(steps[2], cache=ref_cache, use_cache=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert out.past_key_values is cache  # the caller's cache object, holding one step, as eager's
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 6
    torch.testing.assert_close(cache.layers[0].keys, ref_cache.layers[0].keys)
    torch.testing.assert_close(cache.layers[0].values, ref_cache.layers[0].values)


class Branchy(nn.Module):
    """Tensor-dependent control flow: a DyCL host program over compiled segments."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = self.b(h) * 2
        return h + 1


def _corrupt_last_segment(variant: dycl.DyclVariant) -> dycl.Segment:
    """Make the program's last compiled segment (`h + 1`) add 1 to its first output from now on; return it."""
    seg = [s for s in variant.program.segments for r in s.runs.values() if r.variant is not None][-1]
    (key,) = seg.by_key
    inner = seg.by_key[key]
    seg.by_key[key] = lambda *a: tuple(o + 1 if i == 0 else o for i, o in enumerate(inner(*a)))
    return seg


def test_always_names_the_dycl_segment_that_goes_wrong(monkeypatch):
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)
    model = Branchy().eval()
    cm = _always(model)
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            torch.testing.assert_close(cm(x), model(x))
    (variant,) = cm.variants
    assert isinstance(variant, dycl.DyclVariant)
    seg = _corrupt_last_segment(variant)
    with pytest.warns(UserWarning, match=rf"call 3: the compiled call differs from eager .*located: segment "
                                         rf"{seg.name} \(.*\) .* differs from its plain Python on the inputs it saw"):
        out = cm(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
        torch.testing.assert_close(cm(x), model(x))
    assert cm.stats.eager_calls == 1
    assert f"segment {seg.name}" in cm.explain()


@pytest.mark.parametrize("value, want", [("always", "always"), ("0", False), ("1", True)])
def test_the_environment_sets_the_check(value, want, monkeypatch):
    monkeypatch.setenv("FXCC_CHECK_EAGER", value)
    assert fxcc.CompileOptions.from_env().check_eager == want
    assert fxcc.CompileOptions.from_env(fxcc.CompileOptions(check_eager=False)).check_eager is False
    with pytest.raises(TypeError, match="check_eager must be True"):
        fxcc.CompileOptions(check_eager="sometimes")


CALLS = [0]


class CountsCalls(Branchy):
    """A forward with a Python effect (a global rebound): a DyCL host program that eager cannot run beside it
    (the count would go up twice), so "always" checks each compiled segment call against its plain Python."""

    def forward(self, x):
        global CALLS
        CALLS = [CALLS[0] + 1]
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = self.b(h) * 2
        return h + 1


def test_always_checks_the_segments_of_a_program_with_python_effects(monkeypatch):
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)
    model = CountsCalls().eval()
    cm = _always(model)
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="not checked against eager .*each compiled segment call is checked"):
        cm(x)
    cm(x)
    assert CALLS == [2]  # the forward's Python ran once per call
    (variant,) = cm.variants
    seg = _corrupt_last_segment(variant)
    with pytest.warns(UserWarning, match=rf"call 3: segment {seg.name} \(.*\) .*differs from its plain Python .*"
                                         r"that part runs eagerly from now on"):
        out = cm(x)
    with torch.no_grad():
        torch.testing.assert_close(out, Branchy.forward(model, x))  # plain Python's result for that segment
    assert CALLS == [3] and cm.stats.checked_parts >= 1
    assert f"segment {seg.name}" in cm.explain()


def _raised(call, *args) -> tuple[type, str, str]:
    """The type, message and innermost frame's file of what `call(*args)` raises."""
    with pytest.raises(Exception) as info:
        call(*args)
    return type(info.value), str(info.value), traceback.extract_tb(info.value.__traceback__)[-1].filename


@pytest.mark.parametrize("dtype", [torch.long, torch.float64])
def test_an_input_of_a_dtype_eager_rejects_raises_eagers_error_before_any_kernel_is_built(dtype, monkeypatch):
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "1")  # as a user's compile has it
    model = nn.Linear(4, 4).eval()
    cm = fxcc.compile(model)
    bad = torch.arange(8, dtype=dtype).view(2, 4)
    built = []
    build = runtime.build_executable
    monkeypatch.setattr(runtime, "build_executable", lambda *a, **k: built.append(1) or build(*a, **k))
    assert _raised(cm, bad) == _raised(model, bad)  # from nn.Linear's forward, not from a kernel of fxcc's
    assert not built and cm.stats.compiles == 0
    x = torch.randn(2, 4)
    torch.testing.assert_close(cm(x), model(x))
    assert built and cm.stats.compiles == 1 and len(cm.variants) == 1


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, ids):
        return self.proj(self.emb(ids)).relu()


def test_a_compiled_call_that_raises_where_eager_raises_too_raises_eagers_error(monkeypatch):
    monkeypatch.setenv("FXCC_TIME_VS_EAGER", "1")  # the timing against eager is the compiled code's first run
    model = Lookup().eval()
    cm = fxcc.compile(model)
    bad = torch.tensor([[1, 12]])  # out of the embedding's range: only a real run finds it
    assert _raised(cm, bad) == _raised(model, bad)
    ids = torch.tensor([[1, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiled or eager, as it measures
        torch.testing.assert_close(cm(ids), model(ids))


def test_an_input_whose_shapes_the_model_rejects_raises_eagers_error_without_torchs_error_log(caplog):
    """A feature size the Linear does not take fails in capture's meta kernel, which logs its traceback at ERROR
    ("failed while attempting to run meta") before raising: the user gets eager's error, and no error log beside it."""
    model = nn.Linear(32, 16).eval()
    cm = fxcc.compile(model)
    cm(torch.randn(4, 32))
    bad = torch.randn(4, 31)
    with caplog.at_level(logging.ERROR):
        assert _raised(cm, bad)[:2] == _raised(model, bad)[:2]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()[:80]}" for r in errors]
