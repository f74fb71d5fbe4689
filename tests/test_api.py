"""fxcc.compile in all its forms, the calling conventions it keeps, and the errors it gives for bad input."""

from __future__ import annotations

import fxcc
import pytest
import torch
import torch.nn as nn
from conftest import assert_outputs_close
from transformers.modeling_outputs import BaseModelOutput


class TwoLayer(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x, bias=None, *, scale: float = 1.0):
        h = torch.relu(self.a(x)) * scale
        if bias is not None:
            h = h + bias
        return self.b(h)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 8)


def test_decorator_on_function(x):
    @fxcc.compile
    def f(a, b):
        return torch.tanh(a) * b + 1

    y = f(x, x)
    torch.testing.assert_close(y, torch.tanh(x) * x + 1)
    assert f.__name__ == "f"  # functools.wraps keeps the function's identity
    assert f.fxcc.stats.compiles == 1


def test_decorator_with_passes_on_function(x):
    @fxcc.compile(passes="canonicalize,fuse")
    def f(a):
        return torch.sigmoid(a) + a

    torch.testing.assert_close(f(x), torch.sigmoid(x) + x)
    assert [r.spec for r in f.fxcc.variants[-1].records] == ["canonicalize", "fuse"]


def test_decorator_on_module_class(x):
    @fxcc.compile
    class Net(TwoLayer):
        pass

    torch.manual_seed(1)
    net = Net().eval()
    assert isinstance(net, TwoLayer) and type(net).__name__ == "Net"
    expected = nn.Module.__call__(net, x)  # the original forward, not compiled
    assert "_fxcc_compiled" not in net.__dict__
    got = net(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    compiled = net.__dict__["_fxcc_compiled"]
    assert isinstance(compiled, fxcc.CompiledModule)
    assert compiled.stats.compiles == 1 and len(compiled.variants) == 1
    net(x)
    assert compiled.stats.compiles == 1
    # every instance compiles on its own, with its own weights
    other = Net().eval()
    torch.testing.assert_close(other(x), nn.Module.__call__(other, x), atol=1e-5, rtol=1e-5)
    assert other.__dict__["_fxcc_compiled"] is not compiled
    assert list(net.state_dict()) == list(TwoLayer().state_dict())


def test_decorator_with_options_on_module_class(x):
    @fxcc.compile(passes="canonicalize,fuse,codegen")
    class Net(TwoLayer):
        pass

    net = Net().eval()
    torch.testing.assert_close(net(x), nn.Module.__call__(net, x), atol=1e-5, rtol=1e-5)
    records = net.__dict__["_fxcc_compiled"].variants[-1].records
    assert [r.spec for r in records] == ["canonicalize", "fuse", "codegen"]


def test_compiled_class_inside_a_compiled_model(x):
    @fxcc.compile
    class Block(TwoLayer):
        pass

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) + 1

    outer = Outer().eval()
    expected = nn.Module.__call__(outer.block, x) + 1
    cm = fxcc.compile(outer)
    torch.testing.assert_close(cm(x), expected, atol=1e-5, rtol=1e-5)
    # the block was traced into the outer graph, not compiled on its own
    state = outer.block.__dict__.get("_fxcc_compiled")
    assert state is None or not state.variants
    torch.testing.assert_close(outer(x), expected, atol=1e-5, rtol=1e-5)  # the block alone still runs compiled
    assert len(outer.block.__dict__["_fxcc_compiled"].variants) == 1


def test_compile_instance_and_plain_call(x):
    m = TwoLayer().eval()
    cm = fxcc.compile(m)
    assert isinstance(cm, fxcc.CompiledModule)
    torch.testing.assert_close(cm(x), m(x), atol=1e-5, rtol=1e-5)
    assert fxcc.compile(cm) is cm  # compiling a compiled module is a no-op
    cm2 = fxcc.compile()(m)  # @fxcc.compile() with no arguments
    torch.testing.assert_close(cm2(x), m(x), atol=1e-5, rtol=1e-5)


def test_positional_and_keyword_arguments(x):
    m = TwoLayer().eval()
    cm = fxcc.compile(m)
    bias = torch.randn(8)
    torch.testing.assert_close(cm(x, bias), m(x, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cm(x, bias=bias), m(x, bias=bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cm(x, bias=bias, scale=2.0), m(x, bias=bias, scale=2.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cm(x=x), m(x=x), atol=1e-5, rtol=1e-5)


def test_keyword_order_does_not_matter():
    class K(nn.Module):
        def forward(self, x, z=None, y=None):
            return x.sum() + 2 * z.sum() + 3 * y.mean()

    m = K()
    cm = fxcc.compile(m)
    x, y, z = torch.randn(2), torch.randn(3), torch.randn(4)
    torch.testing.assert_close(cm(x, y=y, z=z), m(x, y=y, z=z))
    torch.testing.assert_close(cm(x, z=z, y=y), m(x, z=z, y=y))
    assert cm.stats.compiles == 1


def test_nested_outputs_keep_their_structure(x):
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            return {"h": h, "pair": (h.relu(), [h.sum(-1), h * 2]), "none": None, "n": 3}

    m = Nested().eval()
    out = fxcc.compile(m)(x)
    ref = m(x)
    assert set(out) == {"h", "pair", "none", "n"}
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert out["none"] is None and out["n"] == 3
    assert_outputs_close(out, ref)


def test_tuple_output_from_function(x):
    @fxcc.compile
    def f(a):
        return a + 1, (a * 2, a.mean())

    out = f(x)
    assert_outputs_close(out, (x + 1, (x * 2, x.mean())))


@pytest.mark.parametrize("fn", [lambda a: a.shape, lambda a: (a * 2, a.shape[1:]),
                                lambda a: {"y": a.relu(), "size": a.size(), "in": a.add_(1).shape}],
                         ids=["alone", "tuple", "dict_in_place"])
def test_a_returned_shape_is_a_torch_size_as_eager_returns_it(fn):
    # torch's pytree node for torch.Size unflattens to a plain tuple, on which `.numel()` fails
    def sizes(out):
        parts = [out] if isinstance(out, torch.Size) else out.values() if isinstance(out, dict) else out
        return [v for v in parts if not isinstance(v, torch.Tensor)]

    c = fxcc.compile(fn, check_eager=False)
    for n in (2, 3, 4):  # static, then symbolic sizes
        shapes, refs = sizes(c(torch.ones(n, 3))), sizes(fn(torch.ones(n, 3)))
        assert [type(s) for s in shapes] == [torch.Size] * len(refs) and shapes == refs, (n, shapes)


def test_model_output_type_and_fields_preserved(x):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            states = [x]
            for layer in self.layers:
                states.append(torch.tanh(layer(states[-1])))
            return BaseModelOutput(last_hidden_state=states[-1], hidden_states=tuple(states))

    m = Encoder().eval()
    out = fxcc.compile(m)(x)
    ref = m(x)
    assert type(out) is BaseModelOutput
    assert list(out.keys()) == ["last_hidden_state", "hidden_states"]
    assert out.attentions is None
    assert len(out.hidden_states) == 3
    assert_outputs_close(out, ref)
    torch.testing.assert_close(out[0], ref.last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_compile_backend(x, dynamo_reset):
    m = TwoLayer().eval()
    opt = torch.compile(m, backend="fxcc")
    torch.testing.assert_close(opt(x), m(x), atol=1e-5, rtol=1e-5)
    x2 = torch.randn(5, 8)
    torch.testing.assert_close(opt(x2), m(x2), atol=1e-5, rtol=1e-5)


def test_torch_compile_backend_with_options(x, dynamo_reset):
    m = TwoLayer().eval()
    opt = torch.compile(m, backend="fxcc", options={"passes": "canonicalize,fuse,codegen"})
    torch.testing.assert_close(opt(x), m(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_of_a_compiled_class(x, dynamo_reset):
    @fxcc.compile
    class Net(TwoLayer):
        pass

    net = Net().eval()
    opt = torch.compile(net, backend="fxcc")
    torch.testing.assert_close(opt(x), nn.Module.__call__(net, x), atol=1e-5, rtol=1e-5)


class InferenceCache(nn.Module):
    """A forward decorated `@torch.inference_mode()` writing a cache at an int position (as llama's reference)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(8, eps=1e-5)
        self.cache = torch.zeros(2, 16, 8)

    @torch.inference_mode()
    def forward(self, x, pos: int):
        b, t, _ = x.shape
        self.cache[:b, pos:pos + t] = self.norm(x)
        return self.cache[:b, :pos + t].sum(1)


def test_torch_compile_dynamic_of_an_inference_mode_forward_compiles_and_equals_eager(dynamo_reset, recwarn):
    """Dynamo's graph enters inference mode at its first op: run inside fxcc's export, that failed and left the
    trace's dispatch keys set in the program ("PythonDispatcherTLS was not set" at its next tensor op)."""
    torch.manual_seed(0)
    mine, eager = InferenceCache(), InferenceCache()
    eager.load_state_dict(mine.state_dict())
    opt = torch.compile(mine, backend="fxcc", dynamic=True, options={"time_vs_eager": False, "check_eager": False})
    with torch.no_grad():
        for pos, t in [(0, 3), (3, 1), (4, 1), (5, 1)]:
            x = torch.randn(2, t, 8)
            got = opt(x, pos)
            torch.testing.assert_close(got, eager(x, pos))
            assert got.is_inference()  # as the decorated forward's
    torch.testing.assert_close(mine.cache, eager.cache)
    assert not [w for w in recwarn if "fxcc" in str(w.message)]  # compiled, not run eagerly


def test_torch_compile_runs_dynamo_graph_eagerly_where_fxcc_fails(x, dynamo_reset, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(fxcc.runtime.CompiledModule, "warm", failing)
    m = TwoLayer().eval()
    opt = torch.compile(m, backend="fxcc")
    with pytest.warns(UserWarning, match=r"graph runs eagerly .*RuntimeError: an internal failure"):
        got = opt(x)
    torch.testing.assert_close(got, m(x))


def test_torch_compile_of_inference_mode_over_part_of_a_forward_runs_eagerly(x, dynamo_reset):
    class Part(TwoLayer):
        def forward(self, x):
            h = self.a(x)
            with torch.inference_mode():
                return self.b(h) + 1

    m = Part().eval()
    opt = torch.compile(m, backend="fxcc")
    with pytest.warns(UserWarning, match=r"graph runs eagerly .*inference_mode inside it"), torch.no_grad():
        got = opt(x)
    torch.testing.assert_close(got, m(x))


def test_register_torch_backend_is_idempotent():
    from torch._dynamo import list_backends

    fxcc.register_torch_backend()
    fxcc.register_torch_backend()
    assert "fxcc" in list_backends(exclude_tags=())


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [42, "model", [1, 2]])
def test_compile_of_non_model_is_type_error(bad):
    with pytest.raises(TypeError, match=r"fxcc.compile expects an nn.Module") as e:
        fxcc.compile(bad)
    assert f"got {type(bad).__name__} ({bad!r})" in str(e.value)


def test_compile_of_non_module_class_is_type_error():
    with pytest.raises(TypeError, match=r"got type \(<class 'dict'>\)"):
        fxcc.compile(dict)


def test_wrong_number_of_arguments_names_model_and_forward(x):
    cm = fxcc.compile(TwoLayer().eval())
    with pytest.raises(TypeError, match=r"TwoLayer called with arguments that do not fit forward\(") as e:
        cm(x, x, x)
    assert "too many positional arguments" in str(e.value)
    with pytest.raises(TypeError, match=r"TwoLayer.*missing a required argument: 'x'"):
        cm()
    assert cm.stats.compiles == 0


def test_wrong_arguments_to_function_name_the_function(x):
    @fxcc.compile
    def add_pair(a, b):
        return a + b

    with pytest.raises(TypeError, match=r"add_pair called with arguments that do not fit add_pair\(a, b\)"):
        add_pair(x)
    with pytest.raises(TypeError, match=r"add_pair.*unexpected keyword argument 'c'"):
        add_pair(x, x, c=x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="tpu"), r"unknown target 'tpu'; use one of auto, cpu, cuda"),
    (dict(tune="fast"), r"unknown tune mode 'fast'; use one of off, cached, search"),
    (dict(quality_budget=-1.0), r"quality_budget is the largest quality loss .* in \[0, 1\)"),
])
def test_bad_compile_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxcc.compile(TwoLayer(), **kwargs)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match=r"unknown target 'gpu'"):
        fxcc.CompileOptions(target="gpu")
    with pytest.raises(ValueError, match=r"max_variants must be a positive integer, got 0"):
        fxcc.CompileOptions(max_variants=0)
    with pytest.raises(TypeError, match=r"passes must be a pipeline string, got list"):
        fxcc.compile(TwoLayer(), passes=["fuse"])


def test_bad_pipeline_fails_at_compile_not_first_call():
    with pytest.raises(fxcc.PipelineError, match=r"unknown pass 'fuze' \(did you mean 'fuse'\?\)"):
        fxcc.compile(TwoLayer(), passes="canonicalize,fuze")

    with pytest.raises(fxcc.PipelineError):
        @fxcc.compile(passes="canonicalize{fold=maybe}")
        def f(a):
            return a


def test_empty_pipeline_is_an_error_not_the_default():
    with pytest.raises(fxcc.PipelineError, match="expected a pass name, found end of text"):
        fxcc.compile(TwoLayer(), passes="")


def test_options_argument_and_keywords_combine(x):
    opts = fxcc.CompileOptions(passes="canonicalize,fuse", max_variants=3)
    cm = fxcc.compile(TwoLayer().eval(), options=opts, target="cpu")
    assert cm.options.passes == "canonicalize,fuse" and cm.options.max_variants == 3
    assert cm.options.target == "cpu"
    cm(x)
    assert [r.spec for r in cm.variants[-1].records] == ["canonicalize", "fuse"]
