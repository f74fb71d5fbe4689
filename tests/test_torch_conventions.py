"""What a torch.compile user relies on: `mode=`, `fullgraph=`, `backend=` and `options=` as torch.compile's;
a compiled module is an nn.Module whose state is the original's; training mode gets eager's gradients, never
outputs silently without them; an FXCC_* variable fxcc does not read gets one warning."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import fxcc
import pytest
import torch
import torch.nn as nn
from fxcc import options, runtime
from fxcc.api import torch_compile_backend

PASSES = "canonicalize,raise,fuse,codegen{backend=extern}"  # one candidate per kernel: no timing at compile


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("shift", torch.ones(8))
        self.label = "net"

    def forward(self, x):
        return torch.relu(self.lin(x)) + self.shift


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # tensor-dependent control flow: DyCL splits the forward here
            return h * 2
        return h - 1


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a Python effect a traced graph would do once
        return x * 2


class Noisy(nn.Module):
    """Random draws among compiled ops: ViTMAE's random masking, VITS's noise, dropout in training."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        keep = torch.argsort(torch.rand(x.shape), dim=1)[:, :4]
        h = torch.relu(self.lin(x)) + 0.1 * torch.randn_like(x)
        h = torch.gather(h, 1, keep)
        return self.drop(h) * torch.bernoulli(torch.sigmoid(h)), torch.randperm(8)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(4, 8)


def compiled(model: nn.Module, **kwargs):
    return fxcc.compile(model, passes=PASSES, **kwargs)


# ----------------------------------------------------------------------------- mode, backend, options


@pytest.mark.parametrize("mode, tune, cuda_graphs", [
    ("default", "cached", True), ("reduce-overhead", "cached", True), ("max-autotune", "search", True),
    ("max-autotune-no-cudagraphs", "search", False),
])
def test_modes_map_onto_tuning_and_cuda_graphs(mode, tune, cuda_graphs):
    cm = fxcc.compile(Net().eval(), mode=mode)
    assert (cm.options.tune, cm.options.cuda_graphs) == (tune, cuda_graphs)


def test_max_autotune_compiles_and_equals_eager(x):
    net = Net().eval()
    cm = compiled(net, mode="max-autotune-no-cudagraphs")
    torch.testing.assert_close(cm(x), net(x))
    assert cm.stats.compiles == 1


def test_torch_compile_passes_its_mode_on(x):
    net = Net().eval()
    gm = torch.fx.symbolic_trace(net)
    run = torch_compile_backend(gm, [x], mode="max-autotune-no-cudagraphs", options={"passes": PASSES})
    assert (run.fxcc.options.tune, run.fxcc.options.cuda_graphs) == ("search", False)
    torch.testing.assert_close(run(x), net(x))
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        torch_compile_backend(gm, [x], mode="fastest")


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="fast"), r"unknown mode 'fast'; use one of 'default', 'reduce-overhead', 'max-autotune', "
                        r"'max-autotune-no-cudagraphs'"),
    (dict(mode="max-autotune", tune="off"), r"mode='max-autotune' means tune='search', which tune='off' contradicts"),
    (dict(backend="inductor"), r"backend='inductor'.*use torch.compile\(model, backend='inductor'\).*codegen\{backend"),
])
def test_bad_torch_compile_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxcc.compile(Net(), **kwargs)


def test_fullgraph_must_be_a_bool():
    with pytest.raises(TypeError, match=r"fullgraph must be True or False, got 'yes'"):
        fxcc.compile(Net(), fullgraph="yes")


def test_backend_fxcc_and_an_options_dict_are_accepted(x):
    net = Net().eval()
    cm = fxcc.compile(net, backend="fxcc", options={"passes": PASSES, "max_variants": 2}, dynamic=False)
    assert cm.options.max_variants == 2 and cm.options.dynamic is False
    torch.testing.assert_close(cm(x), net(x))
    with pytest.raises(TypeError, match="max_variantz"):
        fxcc.compile(net, options={"max_variantz": 2})


# ---------------------------------------------------------------------------------------- fullgraph


def test_fullgraph_makes_a_dycl_split_an_error(x, monkeypatch):
    net = Branchy().eval()
    cm = compiled(net)  # without fullgraph: the split program, equal to eager
    torch.testing.assert_close(cm(x), net(x))

    def capture(*args, **kwargs):  # the capture failure DyCL splits at, whatever torch.export makes of Branchy
        raise fxcc.CaptureError("fxcc cannot capture Branchy: control flow depends on tensor values")

    monkeypatch.setattr(runtime, "capture", capture)
    with pytest.raises(fxcc.FullGraphError, match=r"Branchy cannot be captured as one graph.*DyCL.*fullgraph=True"
                                                  r".*control flow depends on tensor values"):
        compiled(net, fullgraph=True)(x)


def test_fullgraph_makes_a_python_effect_an_error(x):
    with pytest.raises(fxcc.FullGraphError, match=r"Counting's forward has .*calls.*fullgraph=True"):
        compiled(Counting().eval(), fullgraph=True)(x)


def test_fullgraph_makes_each_eager_signature_an_error_at_every_call(x):
    net = Net().eval()
    cm = compiled(net, fullgraph=True, options={"max_variants": 1}, dynamic=False)
    torch.testing.assert_close(cm(x), net(x))
    for _ in range(2):
        with pytest.raises(fxcc.FullGraphError, match=r"already has 1 compiled variants.*fullgraph=True"):
            cm(x[:2])
    assert cm.stats.eager_calls == 0
    cm = compiled(net, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(fxcc.FullGraphError, match=r"torch.autocast.*fullgraph=True makes this an error"):
            cm(x)


def test_without_fullgraph_the_same_signature_warns_and_runs_eagerly(x):
    net = Net().eval()
    cm = compiled(net, options={"max_variants": 1}, dynamic=False)
    cm(x)
    with pytest.warns(UserWarning, match=r"already has 1 compiled variants"):
        y = cm(x[:2])
    torch.testing.assert_close(y, net(x[:2]))
    assert cm.stats.eager_calls == 1


# -------------------------------------------------------------------------- the compiled object is a module


def test_a_compiled_module_is_an_nn_module_with_the_originals_state(x):
    net = Net().eval()
    cm = compiled(net)
    assert isinstance(cm, nn.Module)
    assert list(cm.state_dict()) == list(net.state_dict()) and set(net.state_dict()) == {"lin.weight", "lin.bias", "shift"}
    assert [p for p in cm.parameters()] == [net.lin.weight, net.lin.bias]
    assert dict(cm.named_buffers())["shift"] is net.shift
    assert cm.lin is net.lin and cm.label == "net"  # attributes still come from the original
    assert cm.get_submodule("lin") is net.lin
    assert cm.train() is cm and net.training and cm.training
    assert cm.eval() is cm and not net.training and not cm.training
    torch.testing.assert_close(cm.forward(x), net(x))  # forward runs compiled, as torch.compile's
    assert cm.stats.compiles == 1


def test_load_state_dict_and_to_act_on_the_original(x):
    net = Net().eval()
    cm = compiled(net)
    cm(x)
    other = Net()
    assert cm.load_state_dict(other.state_dict()).missing_keys == []
    torch.testing.assert_close(net.lin.weight, other.lin.weight)
    torch.testing.assert_close(cm(x), other.eval()(x))  # the weights changed: compiled again
    assert cm.to(torch.float64) is cm and net.lin.weight.dtype == torch.float64
    torch.testing.assert_close(cm(x.double()), net(x.double()))


def test_a_compiled_module_as_a_submodule_keeps_unprefixed_keys(x):
    net = Net().eval()
    outer = nn.Sequential()
    outer.add_module("body", compiled(net))
    assert list(outer.state_dict()) == [f"body.{k}" for k in net.state_dict()]
    assert len(list(outer.parameters())) == 2
    outer.train()
    assert net.training


# ------------------------------------------------------------------------------------------- training


def test_training_mode_with_gradients_runs_eagerly_with_one_warning(x):
    torch.manual_seed(0)
    net = Net()  # training mode, as a freshly built module
    cm = compiled(net)
    with pytest.warns(UserWarning, match=r"Net is called in training mode with gradients enabled.*runs eagerly"
                                         r".*model.eval\(\)") as record:
        y = cm(x)
        y2 = cm(x)
    assert len([w for w in record if "training mode" in str(w.message)]) == 1
    assert y.requires_grad and y2.requires_grad
    torch.testing.assert_close(y, net(x))
    y.sum().backward()
    assert net.lin.weight.grad is not None
    assert cm.stats.compiles == 0 and cm.stats.eager_calls == 2


def test_training_mode_without_gradients_and_frozen_models_run_compiled(x):
    net = Net()
    cm = compiled(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback, no warning
        with torch.no_grad():
            torch.testing.assert_close(cm(x), net(x))
        net.requires_grad_(False)  # nothing to differentiate: eager records no gradients either
        y = cm(x)
    assert not y.requires_grad
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0


def test_training_mode_under_fullgraph_is_an_error(x):
    cm = compiled(Net(), fullgraph=True)
    with pytest.raises(fxcc.FullGraphError, match=r"training mode with gradients enabled.*fullgraph=True"):
        cm(x)


def test_an_input_that_requires_gradients_runs_eagerly_in_eval_mode(x):
    """model.eval() and x.requires_grad_() (a saliency map): eager's output carries gradients back to x, so the
    call runs eagerly with one warning; the same input under no_grad, or detached, runs compiled."""
    net = Net().eval()
    cm = compiled(net)
    xg = x.clone().requires_grad_()
    with pytest.warns(UserWarning, match=r"Net is given an input that requires gradients with gradients enabled"
                                         r".*runs eagerly.*x.detach\(\)") as record:
        y = cm(xg)
        cm(xg)
    assert len([w for w in record if "requires gradients" in str(w.message)]) == 1
    assert y.requires_grad
    y.sum().backward()
    ref = xg.grad.clone()
    xg.grad = None
    net(xg).sum().backward()
    torch.testing.assert_close(ref, xg.grad)
    assert cm.stats.compiles == 0 and cm.stats.eager_calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.testing.assert_close(cm(xg), net(xg))
        torch.testing.assert_close(cm(xg.detach()), net(xg).detach())
    assert cm.stats.compiles == 1


def test_a_parameter_passed_as_an_argument_keeps_its_gradients(x):
    """An nn.Parameter is a tensor subclass: as an argument with gradients enabled it runs eagerly as a tensor that
    requires gradients does; torch.compile hands a training module's parameters to its backend so."""
    w = torch.nn.Parameter(torch.randn(8, 8))

    def f(a, weight):
        return torch.relu(a @ weight)

    with pytest.warns(UserWarning, match="requires gradients"):
        y = fxcc.compile(f, passes=PASSES)(x, w)
    assert y.requires_grad
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.autograd.grad(f(x, w).sum(), w)[0])
    net = Net()  # training mode, through torch.compile's backend
    with pytest.warns(UserWarning, match="requires gradients"):
        out = torch.compile(net, backend="fxcc")(x)
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_an_input_that_requires_gradients_under_fullgraph_is_an_error(x):
    cm = compiled(Net().eval(), fullgraph=True)
    with pytest.raises(fxcc.FullGraphError, match=r"requires gradients with gradients enabled.*fullgraph=True"):
        cm(x.clone().requires_grad_())


def test_a_compiled_function_is_not_in_training_mode(x):
    @fxcc.compile(passes=PASSES)
    def f(a):
        return torch.tanh(a) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(f(x), torch.tanh(x) + 1)
    assert f.fxcc.stats.compiles == 1


# -------------------------------------------------------------------------------- environment variables


def test_an_unknown_fxcc_variable_gets_one_warning_naming_it(monkeypatch):
    monkeypatch.setattr(options, "_warned_names", set())
    monkeypatch.setenv("FXCC_PRINT_IR_AFTR", "raise")
    monkeypatch.setenv("FXCC_UPDATE_GOLDEN", "0")  # read by fxcc's own tests: no warning
    with pytest.warns(UserWarning) as record:
        fxcc.compile(Net())
        fxcc.compile(Net())
    messages = [str(w.message) for w in record if "environment variable" in str(w.message)]
    assert len(messages) == 1
    assert "FXCC_PRINT_IR_AFTR; did you mean FXCC_PRINT_IR_AFTER?" in messages[0]
    assert "FXCC_LOGS" in messages[0] and "FXCC_CACHE_DIR" in messages[0]


def _count_compiled_calls(cm):
    calls = []
    run = cm._run
    cm._run = lambda *a, **k: calls.append(1) or run(*a, **k)
    return calls


@pytest.mark.parametrize("how", ["module", "function", "class"])
def test_inside_torch_compile_the_compiled_module_runs_its_own_code(x, how):
    """torch.compile around code that calls an fxcc-compiled model (transformers' generate does so with a static
    cache on a GPU): Dynamo breaks its graph at the call instead of tracing fxcc's runtime, and fxcc's compiled
    variant runs."""
    net = Net().eval()
    expected = net(x) * 2 + 1
    if how == "module":
        model = cm = fxcc.compile(net, passes=PASSES)
    elif how == "function":
        model = fxcc.compile(lambda t: net(t), passes=PASSES)
        cm = model.fxcc
    else:
        model = fxcc.compile(Net, passes=PASSES)().eval()
        model.load_state_dict(net.state_dict())
        model(x)
        cm = model.__dict__["_fxcc_compiled"]
    calls = _count_compiled_calls(cm)
    outer = torch.compile(lambda t: model(t) * 2 + 1, backend="eager")
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(outer(x), expected)
    assert cm.stats.compiles == 1 and len(calls) >= 3


def test_a_compiled_child_is_captured_with_its_parent(x):
    """An enclosing capture (fxcc compiling the parent) takes a compiled child's own ops."""
    parent = nn.Sequential(Net(), nn.Linear(8, 4)).eval()
    expected = parent(x)
    parent[0] = fxcc.compile(parent[0], passes=PASSES)
    cm = fxcc.compile(parent, passes=PASSES)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected)
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0
    assert parent[0].stats.compiles == 0  # the parent's graph holds the child's ops


def test_generate_does_not_wrap_the_compiled_forward_in_torch_compile():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    assert not model.generation_config.disable_compile
    model.forward = fxcc.compile(model.forward, passes=PASSES)
    assert model.generation_config.disable_compile is True


# ----------------------------------------------------------------------------------------- random numbers


@pytest.mark.parametrize("passes", [PASSES, None])
def test_random_ops_draw_what_eager_draws_under_one_seed(x, passes):
    """As torch.compile: under one seed the compiled call draws eager's numbers, at its first call (after a
    compile, kernel timings and the check against eager, which must not move the generator) and later ones,
    and leaves the generator where eager leaves it."""
    model = Noisy().train()  # dropout draws too
    cm = fxcc.compile(model, passes=passes, options={"time_vs_eager": True})
    for seed in (0, 1, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            want, want_next = model(x), torch.rand(3)
        torch.manual_seed(seed)
        with torch.no_grad():
            got, got_next = cm(x), torch.rand(3)
        torch.testing.assert_close(got, want)
        assert torch.equal(got_next, want_next)
    assert cm.stats.eager_calls == 0 and not cm.eager_signatures


def test_compile_work_that_draws_leaves_the_generator_as_the_call_found_it(x, monkeypatch):
    """Whatever fxcc runs before the user's call (capture, example-input runs, timings) may draw: the call
    itself starts from the generator state eager would."""
    compile_for = runtime.CompiledModule.compile_for

    def drawing(self, *args, **kwargs):
        torch.rand(100)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.rand(100, device="cuda")
        return compile_for(self, *args, **kwargs)

    monkeypatch.setattr(runtime.CompiledModule, "compile_for", drawing)
    model = Noisy().eval()
    cm = compiled(model)
    torch.manual_seed(3)
    with torch.no_grad():
        want = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(cm(x), want)


class DrawsMoreWhenTraced(nn.Module):
    """Traces differently (the check against eager finds it) and draws more when traced than in eager."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            return x + torch.rand(x.shape) + torch.rand(x.shape)
        return x + torch.rand(x.shape)


def test_a_first_call_unlike_eager_leaves_the_generator_where_eager_leaves_it(x):
    cm = compiled(DrawsMoreWhenTraced())
    torch.manual_seed(4)
    want, want_next = DrawsMoreWhenTraced()(x), torch.rand(3)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="differs from eager"):
        got = cm(x)
    torch.testing.assert_close(got, want)
    assert torch.equal(torch.rand(3), want_next)


class OwnGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.gen = torch.Generator().manual_seed(5)

    def forward(self, x):
        return x + torch.rand(x.shape, generator=self.gen)


def test_a_generator_of_the_models_own_runs_eagerly_with_a_warning_naming_it(x):
    """A graph holds a copy of the model's generator, so it could not draw eager's numbers: fxcc says so and runs
    eagerly, and the model's generator advances as in eager."""
    model, reference = OwnGenerator(), OwnGenerator()
    cm = compiled(model)
    with pytest.warns(UserWarning, match=r"OwnGenerator runs eagerly: rand \(aten.rand.generator\) draws from a "
                                         r"torch.Generator of its own"):
        first = cm(x)
    for got in (first, cm(x), cm(x)):
        torch.testing.assert_close(got, reference(x))
    with pytest.raises(fxcc.FullGraphError, match="torch.Generator of its own"):
        compiled(OwnGenerator(), fullgraph=True)(x)


def test_disable_returns_the_model_itself(x):
    net = Net().eval()
    assert fxcc.compile(net, disable=True) is net

    @fxcc.compile(disable=True)
    def f(a):
        return a + 1

    assert not isinstance(f, fxcc.CompiledModule) and f.__name__ == "f"
    torch.testing.assert_close(f(x), x + 1)
    with pytest.raises(ValueError, match=r"disable=True, state_dict"):
        fxcc.compile(net, disable=True, state_dict={})


# ------------------------------------------------------------------------------------------- copies


def _roundtrips(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return [copy.deepcopy(obj), pickle.loads(pickle.dumps(obj)), torch.load(buf, weights_only=False)]


def test_a_compiled_module_copies_and_pickles_as_its_module_compiled_anew(x):
    net = Net().eval()
    cm = compiled(net)
    with torch.no_grad():
        want = cm(x)
        for c in _roundtrips(cm):
            assert isinstance(c, fxcc.CompiledModule) and c.module is not net
            torch.testing.assert_close(c(x), want)
            c.module.lin.weight.add_(1.0)  # a copy's weights are its own
            torch.testing.assert_close(c(x), c.module(x))
            assert c.stats.compiles == 1
        torch.testing.assert_close(cm(x), want)


def test_a_compiled_forward_installed_on_a_module_follows_its_copies(x):
    """`m.forward = fxcc.compile(m.forward)`, then the model is copied: the copy's forward computes with the
    copy's weights (a plain wrapper function would be shared and compute with the original's)."""
    net = Net().eval()
    net.forward = fxcc.compile(net.forward, passes=PASSES)
    with torch.no_grad():
        want = net(x)
        for c in _roundtrips(net):
            torch.testing.assert_close(c(x), want)
            c.lin.weight.add_(1.0)
            torch.testing.assert_close(c(x), type(c).forward(c, x))
            assert c.forward.fxcc.stats.compiles == 1 and c.forward.fxcc.module is c
        torch.testing.assert_close(net(x), want)


def test_a_compiled_class_instance_copies(x):
    """deepcopy (a class made by fxcc.compile is not importable by name, so pickle cannot find it, as for any
    class made at run time)."""
    Compiled = fxcc.compile(Net, passes=PASSES)
    a = Compiled().eval()
    with torch.no_grad():
        want = a(x)
        for c in [copy.deepcopy(a), copy.deepcopy(a)]:
            torch.testing.assert_close(c(x), want)
            c.lin.weight.add_(1.0)
            torch.testing.assert_close(c(x), Net.forward(c, x))


# ------------------------------------------------------------------------------------------- decorated forward


class Decorated(nn.Module):
    """`@fxcc.compile` on forward in the class body, as `@torch.compile` is often used."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    @fxcc.compile(passes=PASSES, options={"time_vs_eager": False})
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # tensor-dependent: a DyCL program over this instance
            return self.b(h).relu()
        return h * 2


class DecoratedPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    @fxcc.compile(options={"time_vs_eager": False})  # the default pipeline
    def forward(me, x):  # noqa: N805 - any name for the instance
        return torch.tanh(me.lin(x)) * 2


@pytest.mark.parametrize("cls", [DecoratedPlain, Decorated])
def test_a_forward_decorated_in_the_class_body_runs_compiled_per_instance(cls):
    torch.manual_seed(0)
    first, second = cls().eval(), cls().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # compiled: no eager fallback, no warning
        for i in range(4):
            x = torch.randn(4, 8) * (1 if i % 2 else -1)
            for m in (first, second):  # each instance computes with its own weights
                torch.testing.assert_close(m(x), cls.forward.__wrapped__(m, x))
        first.eval()
        for p in first.parameters():
            p.add_(0.5)
        x = torch.randn(4, 8)
        torch.testing.assert_close(first(x), cls.forward.__wrapped__(first, x))
    # each instance is compiled as itself with the method bound (its state guarded as a module's), not as a
    # function taking the module as an argument
    assert cls.forward.fxcc.stats.compiles == 0


class Median(nn.Module):
    def forward(self, x):
        return x.median(dim=1)


class TakesMax(nn.Module):
    def forward(self, x, mx):
        return mx.values + x.sum()


def test_torch_return_types_in_and_out(tmp_path, monkeypatch):
    """A module returning (or taking) a torch.return_types value (median, max, sort, topk along a dim): the graph
    cache cannot name its structure, so the graph is not cached, and the call returns eager's type and values
    (the first call raised NotImplementedError from the cache's pytree serializer)."""
    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))
    x = torch.randn(3, 4)
    out = fxcc.compile(Median())(x)
    want = Median()(x)
    assert type(out) is type(want)
    torch.testing.assert_close(out.values, want.values)
    torch.testing.assert_close(out.indices, want.indices)
    mx = x.max(dim=1)
    torch.testing.assert_close(fxcc.compile(TakesMax())(x, mx), TakesMax()(x, mx))


class Counted(nn.Module):
    """A Python int attribute the forward increments (the README's example of a Python side effect)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


def test_an_int_attribute_the_forward_increments_compiles_once():
    """The forward's own store into `self.calls` is no change of the model (it recompiled at every call and ran
    eagerly for good after eight); each call's result and the counter follow eager's."""
    torch.manual_seed(0)
    m, ref = Counted().eval(), Counted().eval()
    ref.load_state_dict(m.state_dict())
    cm = fxcc.compile(m, passes=PASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            x = torch.randn(4, 8)
            torch.testing.assert_close(cm(x), ref(x))
    assert m.calls == ref.calls == 12
    assert cm.stats.compiles == 1 and cm.stats.eager_calls == 0, cm.stats.reasons
    m.calls = 100  # a change from outside is still seen
    x = torch.randn(4, 8)
    ref.calls = 100
    torch.testing.assert_close(cm(x), ref(x))
