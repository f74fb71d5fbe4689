"""DyCL reads the functions a compiled forward calls, library code included, and keeps their effects exact:
an attribute stored on an object a callee returns reaches the caller's real object, in program order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from fxcc import dycl
from test_dycl_semantics import B, D, Lin, check, inputs
from torch.utils import _pytree as pytree
from transformers import DynamicCache, EncoderDecoderCache


@pytest.fixture(autouse=True)
def _compile_every_segment(monkeypatch):
    """Tiny segments are compiled too (not timed against their plain Python): the compiled path is tested."""
    monkeypatch.setattr(dycl, "SMALL_SEGMENT_US", 0.0)
    monkeypatch.setattr(dycl, "MEASURE_CHOICE", False)


@dataclass
class Features:
    """A model output as transformers' ModelOutput is one: a pytree of its fields, so a captured segment can
    return it, and rebuilds it from them (an attribute set later is no field: the rebuilt object lacks it)."""

    hidden: torch.Tensor


torch.export.register_dataclass(Features, serialized_type_name="test_dycl_callees.Features")


class Encoder(Lin):
    def forward(self, x):
        return Features(self.a(x))


class Pooling(Lin):
    """SAM-3's `get_text_features`: the encoder's output gets a `pooler` attribute, then is returned."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def features(self, x):
        out = self.encoder(x)
        out.pooler = self.b(out.hidden)  # a store on the object this function returns
        return out

    def forward(self, x):
        feats = self.features(x)
        if x.sum() > 0:  # a split after the call: the object crosses a segment boundary
            x = x * 2
        return feats.pooler + x


def test_attribute_stored_on_a_returned_object_reaches_the_caller():
    """The store ran inside a traced segment, on an object the segment's graph rebuilt from its fields: the
    caller's `feats.pooler` raised AttributeError, which eager does not."""
    compiled = check(Pooling(), inputs())
    names = {p.name for p in compiled.variants[0].program.all_programs()}
    assert "Pooling.features" in names  # its own program: the store is the host's, on the real object


def switch_mlp() -> nn.Module:
    """transformers' Switch-Transformers MLP, tiny: its experts loop over `nonzero()` of the routing mask."""
    from transformers import SwitchTransformersConfig, SwitchTransformersSparseMLP

    cfg = SwitchTransformersConfig(d_model=D, d_ff=2 * D, num_experts=4, expert_capacity=4)
    torch.manual_seed(0)
    return SwitchTransformersSparseMLP(cfg)


class Routed(Lin):
    """A forward without control flow of its own, calling a library module that has some."""

    def __init__(self):
        super().__init__()
        self.mlp = switch_mlp()

    def forward(self, x):
        h = self.a(x).unsqueeze(0)
        return self.b(self.mlp(h) + h)


def test_library_callee_with_tensor_dependent_control_flow_gets_its_own_program():
    """transformers' modules were not read: the segment calling the MLP failed to capture and ran eagerly,
    with a warning; now the experts' loop is the MLP's host program and the rest compiles."""
    compiled = check(Routed(), inputs())
    names = {p.name for p in compiled.variants[0].program.all_programs()}
    assert "SwitchTransformersExperts.forward" in names
    runs = [r for p in compiled.variants[0].program.all_programs() for s in p.segments for r in s.runs.values()]
    assert any(r.variant is not None for r in runs)
    assert not [r.eager for r in runs if "failed" in (r.eager or "")]


def scaler(h):
    """transformers' `and_masks` shape: a callee with a host decision that returns a function defined inside."""
    k = 2.0 if h.sum() > 0 else 0.5

    def scale(t):
        return t * k
    return scale


class MakesFunctions(Lin):
    def forward(self, x):
        h = self.a(x)
        return scaler(h)(self.b(h))


def test_returning_a_function_defined_inside_needs_no_warning():
    """`return scale` ran as written with a warning that a statement ran eagerly; the host returns it as is."""
    check(MakesFunctions(), inputs())


class MakesCache(Lin):
    """BART's decoder: a cache made in a segment with a tensor input, used after a split, call after call."""

    def forward(self, x):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if x is not None else None
        if x.sum() > 0:
            x = x * 2
        h = self.a(x).view(1, 1, B, D)
        keys, _ = cache.self_attention_cache.update(h, h, 0)
        return keys


def test_a_cache_made_in_a_segment_is_a_new_object_at_every_call():
    """The segment making the cache compiled, and its graph handed the cache it built at capture to every call:
    the second call's keys held the first call's too."""
    from fxcc.capture import register_model_pytrees
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, vocab_size=8)
    register_model_pytrees(LlamaModel(cfg))  # as compiling a transformers model does: its caches are state
    check(MakesCache(), inputs())


def _chunked(fn, x):
    """transformers' `apply_chunking_to_forward` pattern: a function called with a layer's method, whose body
    DyCL splits (a tensor-dependent branch), so `fn(x)` is a segment with the method bound into its variant."""
    if x.abs().sum() > 1e6:
        return x
    return fn(x)


class FFLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def ff(self, x):
        return torch.relu(self.lin(x)) + x

    def forward(self, x):
        return _chunked(self.ff, x)


class FFStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(FFLayer() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("graph_cache", [False, True])
def test_a_method_handed_to_a_function_runs_each_layers_own_weights(graph_cache, tmp_path, monkeypatch):
    """Each layer's `self.ff` is a new bound-method object whose id the next layer's reuses, and the graph cache
    keyed a method by its code alone: both handed layer 0's compiled segment (its weights) to the layers after
    it, silently (Longformer's feed-forward through apply_chunking_to_forward)."""
    import fxcc

    monkeypatch.setenv("FXCC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = FFStack().eval()
    passes = "fuse,codegen{backend=extern}"
    cm = fxcc.compile(model, passes=passes, options=fxcc.CompileOptions(graph_cache=graph_cache, passes=passes))
    for x in inputs(3):
        with torch.no_grad():
            torch.testing.assert_close(cm(x), model(x))


def test_a_segment_whose_compiled_result_differs_runs_as_plain_python_and_says_so(monkeypatch):
    """A DyCL program is not checked against eager as a whole: each segment's compiled run of a new signature is
    compared with the segment as plain Python, and a difference (here a compiler bug, simulated) runs that
    signature as plain Python with a warning, so the result stays eager's."""
    import fxcc

    real = dycl._direct_call

    def wrong(*a, **k):
        call = real(*a, **k)

        def off(*args):
            return pytree.tree_map(lambda t: t + 1.0 if isinstance(t, torch.Tensor) and t.is_floating_point()
                                   else t, call(*args))
        return off

    monkeypatch.setattr(dycl, "_direct_call", wrong)
    torch.manual_seed(0)
    model = FFStack().eval()
    passes = "fuse,codegen{backend=extern}"
    cm = fxcc.compile(model, passes=passes, options=fxcc.CompileOptions(graph_cache=False, passes=passes))
    x = inputs(1)[0]
    with pytest.warns(UserWarning, match="differs from plain Python's"):
        with torch.no_grad():
            got = cm(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))
