"""Generation with a KV cache through every entry point: greedy tokens equal eager's, the caller's cache ends in
eager's state, and a generation compiles its prefill and its decode step once each.

Tiny decoders (hidden 32, 2 layers, vocab 100), few tokens and a pipeline without kernel timing keep the file
fast; one test runs the default pipeline.
"""

from __future__ import annotations

import copy
import logging

import fxcc
import pytest
import torch
from fxcc import runtime as fxcc_runtime
from fxcc.state import Unchanged

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, StaticCache  # noqa: E402

VOCAB, NEW = 100, 5
FAST = "canonicalize,raise,horizontal,fuse,codegen{backend=extern}"
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None,
               pad_token_id=0)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER))


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=None,
        pad_token_id=0))


MODELS = [llama, qwen2, mistral, gpt2]


def build(make):
    torch.manual_seed(0)
    return make().eval()


def prompt(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


def greedy(model, ids: torch.Tensor, cache, steps: int = NEW) -> list[int]:
    """A decode loop as users write it: one forward per token, the same cache object throughout."""
    tokens, x = [], ids
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=x, cache=cache, use_cache=True)
            assert out.cache is cache  # eager returns the cache it was given, updated in place
            x = out.logits[:, -1:].argmax(-1)
            tokens.append(x.item())
    return tokens


def make_cache(kind: str, model):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=32)


def assert_same_cache(got, expected):
    assert len(got.layers) == len(expected.layers)
    for a, b in zip(got.layers, expected.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_decode_loop_matches_eager_and_updates_the_callers_cache(make, kind, passes=FAST):
    model = build(make)
    ids = prompt(6)
    eager_cache = make_cache(kind, model)
    expected = greedy(model, ids, eager_cache)
    cm = fxcc.compile(model, passes=passes)
    cache = make_cache(kind, model)
    assert greedy(cm, ids, cache) == expected
    assert_same_cache(cache, eager_cache)
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0  # prefill and decode
    # a new prompt length and a fresh cache: the symbolic variants serve it
    again = make_cache(kind, model)
    assert greedy(cm, prompt(9), again) == greedy(model, prompt(9), make_cache(kind, model))
    assert cm.stats.compiles == 2


def test_decode_loop_with_the_default_pipeline():
    test_decode_loop_matches_eager_and_updates_the_callers_cache(llama, "dynamic", passes=None)


def test_static_cache_is_written_in_place():
    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    cache = make_cache("static", model)
    greedy(cm, prompt(5), cache, steps=1)  # the prefill allocates the cache's tensors
    keys = [layer.keys for layer in cache.layers]
    greedy(cm, prompt(1), cache, steps=2)
    assert all(layer.keys is k for layer, k in zip(cache.layers, keys))  # the same tensors, written at positions
    assert int(cache.layers[0].cumulative_length) == 7


def _count_guards(monkeypatch, cm) -> list:
    """Calls that went through the full guard (pytree flatten and key) rather than the keyword fast path."""
    from fxcc.runtime import CompiledModule

    seen, full = [], CompiledModule._guard

    def guard(self, args, kwargs):
        seen.append(1)
        return full(self, args, kwargs)

    monkeypatch.setattr(CompiledModule, "_guard", guard)
    return seen


def test_static_cache_decode_steps_skip_the_full_guard(monkeypatch):
    """A decode step passes the same static cache, written in place: after the step that keeps its guard's
    verdict, steps neither flatten the cache nor rebuild the guard key, and the tokens and cache equal eager's."""
    model = build(llama)
    eager_cache = make_cache("static", model)
    expected = greedy(model, prompt(6), eager_cache, steps=8)
    cm = fxcc.compile(model, passes=FAST)
    seen = _count_guards(monkeypatch, cm)
    cache = make_cache("static", model)
    assert greedy(cm, prompt(6), cache, steps=8) == expected
    assert_same_cache(cache, eager_cache)
    # prefill (compiles), first decode (compiles), second decode (keeps the verdict): the other 5 skip it
    assert len(seen) == 3


def _clone_tensors(cache) -> None:
    layer = cache.layers[1]
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


def _copy_layer(cache) -> None:  # the write-back's places are in the old layer's attributes: not reused
    cache.layers[1] = copy.deepcopy(cache.layers[1])


@pytest.mark.parametrize("surgery", [_clone_tensors, _copy_layer], ids=["tensors cloned", "layer copied"])
def test_a_cache_changed_between_calls_goes_through_the_full_guard_again(monkeypatch, surgery):
    """The fast path holds only while the cache holds the same objects: a layer's tensors or the layer itself
    replaced between steps (by copies, as a user's cache surgery would) send the next step through the full
    guard, and every step still equals eager."""
    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    seen = _count_guards(monkeypatch, cm)
    caches = {"eager": make_cache("static", model), "fxcc": make_cache("static", model)}
    tokens = {name: [] for name in caches}
    for name, run in (("eager", model), ("fxcc", cm)):
        cache, x = caches[name], prompt(6)
        with torch.no_grad():
            for step in range(6):
                if step == 4:
                    surgery(cache)
                x = run(input_ids=x, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                tokens[name].append(x.item())
    assert tokens["fxcc"] == tokens["eager"]
    assert_same_cache(caches["fxcc"], caches["eager"])
    assert len(seen) == 4  # prefill, first decode, the verdict kept, and the step after the surgery


def test_a_static_caches_snapshot_holds_while_the_cache_holds_the_same_objects():
    """fxcc.state.Unchanged, the fast path's check of a cache: every container by identity, every tensor's
    layout; the dispatch state of a call (inference mode) is no change."""
    model = build(llama)
    cache = make_cache("static", model)
    greedy(model, prompt(5), cache, steps=1)  # the prefill allocates the cache's tensors
    u = Unchanged(cache)
    assert u.ok and u.holds(cache)
    with torch.inference_mode():
        assert u.holds(cache)
    assert u.holds(cache) and not u.holds(make_cache("static", model))
    layer = cache.layers[0]
    cache.layers[0] = copy.deepcopy(layer)
    assert not u.holds(cache)
    cache.layers[0] = layer
    assert u.holds(cache)
    d = vars(layer)
    keys = d.pop("keys")
    d["other"] = keys  # as many attributes, not the same ones
    assert not u.holds(cache)
    del d["other"]
    d["keys"] = keys  # the same attributes in another order: the same objects where the graph reads them
    assert u.holds(cache)
    layer.keys = keys.clone()
    assert not u.holds(cache)
    layer.keys = keys
    with torch.no_grad():
        keys.resize_(keys.shape[0], keys.shape[1], keys.shape[2] - 1, keys.shape[3])  # the same tensor, resized
    assert not u.holds(cache)


def test_the_fast_path_does_not_keep_a_dropped_cache_alive():
    import gc
    import weakref

    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    cache = make_cache("static", model)
    greedy(cm, prompt(6), cache, steps=4)
    assert any(call is not None for call in cm._calls.values())  # the decode step's shape is kept
    keys = weakref.ref(cache.layers[0].keys)
    del cache
    gc.collect()
    assert keys() is None
    assert all(call is None for call in cm._calls.values())


def generate(model, ids, **kwargs):
    return model.generate(ids, **{"max_new_tokens": NEW, "do_sample": False, **kwargs})


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_generate_through_a_compiled_forward(make, cache_implementation):
    """`model.forward = fxcc.compile(model.forward)`, then the model's own generate. The eager tokens come from
    another copy: a static-cache generate leaves the longest cache yet on the model (`_previous_max_cache_length`),
    and a second generate that makes it longer is no change of the model the compiled forward depends on."""
    model = build(make)
    kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
    expected = [generate(build(make), prompt(n), **kw) for n in (6, 9)]
    model.forward = fxcc.compile(model.forward, passes=FAST)
    stats = model.forward.fxcc.stats
    assert torch.equal(generate(model, prompt(6), **kw), expected[0])
    assert stats.compiles <= 2 and stats.eager_calls == 0
    first = stats.compiles
    assert torch.equal(generate(model, prompt(9), **kw), expected[1])
    assert stats.compiles == first  # a new prompt length compiles nothing


@pytest.mark.parametrize("make", [llama, gpt2], ids=lambda m: m.__name__)
def test_generate_of_a_compiled_model_runs_compiled(make):
    model = build(make)
    expected = generate(model, prompt(7))
    cm = fxcc.compile(model, passes=FAST)
    assert torch.equal(generate(cm, prompt(7)), expected)
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    assert "forward" not in model.__dict__  # generate's routing is undone afterwards


@pytest.mark.parametrize("make", [gpt2, llama], ids=lambda m: m.__name__)
def test_generate_of_a_compiled_model_on_a_left_padded_batch(make):
    """generate decides what it passes from the forward's signature: GPT-2 gets `position_ids` from the padding
    mask only if its forward names them, so generate's forward must carry the model's signature (with a
    `*args, **kwargs` one, a left-padded row generated other tokens than eager's)."""
    model = build(make)
    ids = torch.cat([prompt(10, 2), prompt(11, 1)[:, 1:]])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, output_scores=True, return_dict_in_generate=True)
    expected = generate(model, ids, **kw)
    cm = fxcc.compile(model, passes=FAST)
    got = generate(cm, ids, **kw)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences)
    assert cm.stats.eager_calls == 0


def test_generate_of_a_compiled_class():
    Compiled = fxcc.compile(transformers.LlamaForCausalLM, passes=FAST)
    torch.manual_seed(0)
    model = Compiled(transformers.LlamaConfig(**DECODER)).eval()
    torch.manual_seed(0)
    expected = generate(build(llama), prompt(6))
    assert torch.equal(generate(model, prompt(6)), expected)
    assert model.__dict__["_fxcc_compiled"].stats.compiles == 2


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# graphs dynamo hands to fxcc in a first generate and in a second one with a new prompt length: with
# dynamic=None dynamo's own automatic dynamic compiles prefill and decode static, then decode symbolic,
# then (new prompt length) the prefill symbolic; with dynamic=True prefill and decode once each
@pytest.mark.parametrize("dynamic, cache_implementation, graphs", [(None, None, (3, 1)), (True, "static", (2, 0))])
def test_generate_through_torch_compile(dynamic, cache_implementation, graphs, dynamo_reset, caplog):
    from torch._dynamo.utils import counters

    model = build(llama)
    kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
    expected = [generate(model, prompt(n), **kw) for n in (6, 9)]
    model.forward = torch.compile(model.forward, backend="fxcc", dynamic=dynamic, options={"passes": FAST})
    counters.clear()
    seen = []
    with caplog.at_level(logging.INFO, logger="fxcc.runtime"):
        for n, want in zip((6, 9), expected):
            assert torch.equal(generate(model, prompt(n), **kw), want)
            seen.append(counters["stats"]["unique_graphs"] - sum(seen))
    assert tuple(seen) == graphs
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling ")]
    assert len(compiles) == sum(graphs)  # fxcc compiles each graph dynamo hands over once, and nothing else



def test_decode_loop_through_torch_compile_of_the_module(dynamo_reset):
    """`torch.compile(model, backend="fxcc", dynamic=True)`: dynamo passes sizes (and a float attribute) as
    symbolic scalars; the decode loop equals eager's and updates the caller's cache; prefill and decode are
    one graph each."""
    from torch._dynamo.utils import counters

    model = build(llama)
    eager_cache = make_cache("dynamic", model)
    expected = greedy(model, prompt(6), eager_cache)
    compiled = torch.compile(model, backend="fxcc", dynamic=True, options={"passes": FAST})
    counters.clear()
    cache = make_cache("dynamic", model)
    assert greedy(compiled, prompt(6), cache) == expected
    assert_same_cache(cache, eager_cache)
    assert counters["stats"]["unique_graphs"] == 2


class FakeGraph:
    """CUDA graph stand-in for the CPU: capture records the call, replay runs it again into the captured
    outputs (a real replay writes the same memory)."""

    current = None
    replays = 0

    def replay(self):
        FakeGraph.replays += 1
        for o, n in zip(self.outs, self.fn(*self.args)):
            if isinstance(o, torch.Tensor) and o is not n:
                o.copy_(n)


class FakeCapture:
    def __init__(self, graph, capture_error_mode="global"):
        self.graph = graph

    def __enter__(self):
        FakeGraph.current = self.graph

    def __exit__(self, *exc):
        FakeGraph.current = None


class FakeStream:
    def wait_stream(self, other):
        pass


def test_static_cache_decode_replays_one_graph_writing_the_cache_in_place(monkeypatch):
    """The GPU decode path on the CPU with a stand-in for CUDA graphs: the static cache is read and written
    where it is (no copy), the step's inputs are copied, one graph serves every decode step."""
    import contextlib

    from fxcc.cuda_graphs import CudaGraphs
    from fxcc.runtime import in_place_inputs

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    cache, eager_cache = make_cache("static", model), make_cache("static", model)
    ids = prompt(6)
    with torch.no_grad():
        x = cm(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(input_ids=ids, cache=eager_cache, use_cache=True)
        model(input_ids=x, cache=eager_cache, use_cache=True)
        cm(input_ids=x, cache=cache, use_cache=True)  # compiles the decode step
        v = cm.variants[-1]
        kw = dict(input_ids=x, cache=cache, use_cache=True)

        def record(*a):
            out = v._call(*a)
            if FakeGraph.current is not None:
                FakeGraph.current.fn, FakeGraph.current.args, FakeGraph.current.outs = v._call, a, out
            return out

        v.cuda_graph = CudaGraphs(record, v.name, in_place_inputs(v.gm, (), kw), frozenset(j for j, _ in
                                                                                          v.captured.aliasing.leaves))
        keys = [layer.keys for layer in cache.layers]
        for _ in range(4):
            want = model(input_ids=x, cache=eager_cache, use_cache=True).logits
            got = cm(input_ids=x, cache=cache, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            x = want[:, -1:].argmax(-1)
    assert_same_cache(cache, eager_cache)
    assert all(layer.keys is k for layer, k in zip(cache.layers, keys))
    assert len(v.cuda_graph.graphs) == 1 and FakeGraph.replays == 3  # seen once, captured, replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_gpu_static_cache_generate_replays_one_cuda_graph_per_decode(mode):
    """On a GPU: generate with a static cache equals eager's tokens; the decode step runs as one CUDA graph
    captured at its second step and replayed after, the cache read and written where it is. Under
    inference mode too, where the cache's tensors are inference tensors (written only in that mode)."""
    from fxcc.cuda_graphs import CudaGraphs

    model = build(llama).cuda()
    ids = prompt(6).cuda()
    model.generation_config.disable_compile = True  # eager's tokens, not torch.compile's (as fxcc.compile sets)
    with mode():
        expected = generate(model, ids, cache_implementation="static", max_new_tokens=12)
        model.forward = fxcc.compile(model.forward, passes=FAST)
        assert torch.equal(generate(model, ids, cache_implementation="static", max_new_tokens=12), expected)
    cm = model.forward.fxcc
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0
    decode = cm.variants[-1]
    assert decode.no_graph is None and isinstance(decode.cuda_graph, CudaGraphs)
    assert len([g for g in decode.cuda_graph.graphs.values() if g is not None]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_generate_after_generate_keeps_replaying_and_frees_each_cache(monkeypatch):
    """On a GPU, generates each with a new static cache while the earlier ones are kept: eager's tokens every
    time; past MAX_GRAPHS captures the decode steps still replay (the graph replayed least recently makes room),
    and no graph keeps the caller's cache tensors alive."""
    import gc
    import weakref

    import fxcc.cuda_graphs as cg

    monkeypatch.setattr(cg, "MAX_GRAPHS", 2)
    replays = []
    real = cg._Capture.replay
    monkeypatch.setattr(cg._Capture, "replay", lambda self, flat: replays.append(1) or real(self, flat))
    model = build(llama).cuda()
    model.generation_config.disable_compile = True
    ids = prompt(6).cuda()
    held, gone = [], []
    with torch.no_grad():
        expected = generate(model, ids, cache_implementation="static", max_new_tokens=12)
        model.forward = fxcc.compile(model.forward, passes=FAST)
        for _ in range(5):  # each cache kept alive while the next is made: at new addresses every time
            held.append(StaticCache(config=model.config, max_cache_len=32))
            replays.clear()
            assert torch.equal(generate(model, ids, past_key_values=held[-1], max_new_tokens=12), expected)
            assert len(replays) >= 9  # 11 decode steps: seen once, captured, replayed
        gone = [weakref.ref(c.layers[0].keys) for c in held]
        held.clear()
    gc.collect()
    assert all(r() is None for r in gone)
    decode = model.forward.fxcc.variants[-1]
    assert decode.cuda_graph.evicted >= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_generates_with_a_new_cache_each_replay_the_first_decode_graph():
    """On a GPU, generate after generate, each making a new static cache at other addresses: after the first,
    every decode step replays the first generate's graph with its cache copied in and back (no capture per
    generate), with eager's tokens."""
    model = build(llama).cuda()
    model.generation_config.disable_compile = True
    ids = prompt(6).cuda()
    with torch.no_grad():
        expected = generate(model, ids, cache_implementation="static", max_new_tokens=12)
        model.forward = fxcc.compile(model.forward, passes=FAST)
        for _ in range(4):
            assert torch.equal(generate(model, ids, cache_implementation="static", max_new_tokens=12), expected)
    graphs = model.forward.fxcc.variants[-1].cuda_graph
    assert len([g for g in graphs.graphs.values() if g is not None]) == 1
    assert graphs.adoptions >= 3 * 10  # 11 decode steps in each of the last three generates


def test_an_int_input_reaches_torch_calls_as_an_int_not_through_a_device_tensor():
    """Fusion hands an int input (a cache length) to a kernel as a 0-d tensor that the kernel reads back with
    `item`. Where the kernel runs as torch calls, that read would copy device to host on every call: a host
    sync per step, and on a GPU an op a CUDA graph cannot capture (a 16-layer decode ran without its graph).
    The executable passes the int itself."""
    model = build(llama)
    ids = prompt(6)
    with torch.no_grad():
        expected = generate(model, ids, cache_implementation="static", max_new_tokens=8)
        model.forward = fxcc.compile(model.forward, passes=FAST)
        assert torch.equal(generate(model, ids, cache_implementation="static", max_new_tokens=8), expected)
    variants = model.forward.fxcc.variants
    assert len(variants) == 2
    for v in variants:
        reads = [n for n in v.executable.graph.nodes if n.target is torch.ops.aten.item.default]
        assert not [n for n in reads if n.args[0].target is torch.ops.aten.scalar_tensor.default], v.executable.code


def test_a_first_call_unlike_eager_leaves_the_callers_cache_as_eager_does(monkeypatch):
    """A compiled decode step that writes wrong values into the caller's cache (as a compiler bug would) is
    found by the first-call check: the caller's cache ends as eager leaves it, and generation goes on eagerly
    with eager's tokens."""
    from fxcc.runtime import CompiledModule

    run = CompiledModule._run

    def wrong(self, variant, flat, args, kwargs):
        out = run(self, variant, flat, args, kwargs)
        for layer in kwargs["cache"].layers:
            layer.keys.add_(1.0)
        out.logits.add_(1.0)
        return out

    model = build(llama)
    eager_cache = make_cache("dynamic", model)
    expected = greedy(model, prompt(6), eager_cache, steps=3)
    cm = fxcc.compile(model, passes=FAST)
    monkeypatch.setattr(CompiledModule, "_run", wrong)
    cache = make_cache("dynamic", model)
    with pytest.warns(UserWarning, match="the compiled call differs from eager"):
        assert greedy(cm, prompt(6), cache, steps=3) == expected
    assert_same_cache(cache, eager_cache)


def test_decode_steps_write_the_cache_back_in_place_of_rebuilding_it():
    """A decode step keeps the cache's structure: its write-back sets the caller's layers' tensors by path (a
    prefill, which fills an empty cache, rebuilds and adopts)."""
    model = build(llama)
    eager_cache = make_cache("dynamic", model)
    expected = greedy(model, prompt(5), eager_cache, steps=3)
    cm = fxcc.compile(model, passes=FAST)
    cache = make_cache("dynamic", model)
    layers = list(cache.layers)
    assert greedy(cm, prompt(5), cache, steps=3) == expected
    assert_same_cache(cache, eager_cache)
    assert all(a is b for a, b in zip(cache.layers, layers))  # the caller's layer objects, as in eager
    prefill, decode = (v.captured.aliasing.plan for v in cm.variants)
    assert all(p is None for p in prefill.paths) and all(p is not None for p in decode.paths)


def gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**DECODER, head_dim=8, sliding_window=8))


def gemma3():  # a window of 16: the prompts and new tokens below stay inside it
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=16))


def test_generate_past_a_sliding_window_equals_eager():
    """Gemma-2's cache keeps a sliding window on every other layer: once the window fills, the cache's sizes
    stop growing there (a shape guard with a clause of its own `and`; kernels whose sizes come from ints).

    Two prompts meet the window's cases (a prompt shorter than the window or as long; a decode step that grows the
    window's cache, fills it, or slides it); prompts of other lengths compile nothing, those as long as the model has
    heads (4) or key/value heads (2) too."""
    model, compiled = build(gemma2), build(gemma2)
    compiled.forward = fxcc.compile(compiled.forward, passes=FAST)
    stats = compiled.forward.fxcc.stats
    for length in (7, 5):  # prompt + new tokens pass the window of 8
        ids = prompt(length)
        assert torch.equal(generate(compiled, ids), generate(model, ids))
    seen = stats.compiles
    for length in (4, 2, 3):
        ids = prompt(length)
        assert torch.equal(generate(compiled, ids), generate(model, ids))
    assert stats.compiles == seen < fxcc.CompileOptions().max_variants, stats.reasons
    assert stats.eager_calls == 0


def gemma3_window8():  # both layers sliding: no full-attention layer, the window's mask alone (fxcc.mask_skip)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=8))


@pytest.mark.parametrize("make", [gemma2, gemma3_window8], ids=lambda m: m.__name__)
def test_a_sliding_window_cache_compiles_prefill_and_decode_once_for_any_prompt_length(make):
    """Issue 19: transformers' DynamicSlidingWindowLayer branches in Python on its lengths (a prompt shorter than the
    window or not; a decode step that grows the window, fills it or slides it, its kept keys then a view with gaps,
    another layout class), and so does its SDPA mask skip (keys fewer than the window); export guarded each branch:
    a generate compiled 3 times, a new prompt length up to 3 again. Captured without branching (fxcc.sliding_window,
    fxcc.mask_skip), one prefill and one decode step serve every length, and the caller's cache holds eager's keys
    and values at every step."""
    model, cm = build(make), fxcc.compile(build(make), passes=FAST)
    for length in (7, 5, 9):  # as long as the window less one, shorter, longer; 10 tokens pass the window of 8
        eager_cache, cache = make_cache("dynamic", model), make_cache("dynamic", model)
        assert greedy(cm, prompt(length), cache, steps=10) == greedy(model, prompt(length), eager_cache, steps=10)
        assert_same_cache(cache, eager_cache)
        assert all(a.cumulative_length == b.cumulative_length for a, b in zip(cache.layers, eager_cache.layers)
                   if hasattr(b, "cumulative_length"))
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0, cm.stats.reasons


def test_a_static_sliding_window_generate_compiles_prefill_and_decode_once_for_any_prompt_length():
    """Issue 19: transformers' StaticSlidingWindowLayer branches in Python on its counter `cumulative_length_int` (a
    cache that fills, becomes full or is full) in its update and its mask sizes; export guarded each branch: the first
    static-cache generate compiled its decode step once while the window filled and once when full (3 compiles), and a
    prompt longer than the window its prefill again. Captured without branching (fxcc.sliding_window), one prefill and
    one decode step serve every prompt length, with eager's tokens and no eager call."""
    model, cm = build(gemma2), fxcc.compile(build(gemma2), passes=FAST)
    kw = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")  # 10 tokens pass the window of 8
    counts = []
    for length in (7, 5, 9):  # as long as the window less one, shorter, longer
        before = cm.stats.compiles + sum(s.stats.compiles for s in cm.decode_loop.steps.values())
        with torch.no_grad():
            assert torch.equal(cm.generate(prompt(length), **kw), model.generate(prompt(length), **kw))
        counts.append(cm.stats.compiles + sum(s.stats.compiles for s in cm.decode_loop.steps.values()) - before)
    assert counts == [2, 0, 0] and cm.stats.eager_calls == 0, cm.stats.reasons


def test_a_static_sliding_window_cache_ends_in_eagers_state():
    """The branch-free StaticSlidingWindowLayer leaves eager's keys and values in the caller's cache, and both of
    eager's counters (the int, and the tensor eager advances only while the window fills), for prompts on both sides
    of the window: one prefill and one decode step."""
    model, cm = build(gemma2), fxcc.compile(build(gemma2), passes=FAST)
    for length in (7, 9):
        eager_cache, cache = make_cache("static", model), make_cache("static", model)  # 32 long: the window slides
        assert greedy(cm, prompt(length), cache, steps=10) == greedy(model, prompt(length), eager_cache, steps=10)
        assert_same_cache(cache, eager_cache)
        for a, b in zip(cache.layers, eager_cache.layers):
            assert int(a.cumulative_length) == int(b.cumulative_length)
            assert getattr(a, "cumulative_length_int", None) == getattr(b, "cumulative_length_int", None)
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0, cm.stats.reasons


def mistral_window8():  # a DynamicCache gives every layer of it a sliding window (Mistral's default is 4096)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER, sliding_window=8))


@pytest.mark.parametrize("make", [mistral_window8, gemma3_window8], ids=lambda m: m.__name__)
def test_a_sliding_window_decode_step_copies_no_window_and_reads_no_mask(make):
    """Issue 19: eager keeps a sliding layer's window as a view of its step's concatenation, and attends one query
    without a mask below the window (past it, with a mask whose window part is all True: the layer keeps no older key).
    The compiled step does as much on both sides of the window: the kept keys and values are views of the
    concatenation, not a copy of the window each step, and no attention over one query reads a mask. A gathered
    window and a mask built at every step made Mistral's decode (window 4096) slower than eager."""
    model, cm = build(make), fxcc.compile(build(make), passes="canonicalize")
    for length in (7, 5):  # 10 tokens pass the window of 8
        eager_cache, cache = make_cache("dynamic", model), make_cache("dynamic", model)
        assert greedy(cm, prompt(length), cache, steps=10) == greedy(model, prompt(length), eager_cache, steps=10)
        assert_same_cache(cache, eager_cache)
        for layer in cache.layers:
            if hasattr(layer, "cumulative_length"):  # a sliding layer: its window a view of a longer buffer
                for t in (layer.keys, layer.values):
                    assert t.untyped_storage().nbytes() > t.numel() * t.element_size()
    assert cm.stats.compiles == 2 and cm.stats.eager_calls == 0, cm.stats.reasons
    one_query = [n for v in cm.variants for n in v.captured.gm.graph.nodes
                 if n.target == torch.ops.aten.scaled_dot_product_attention.default
                 and n.args[0].meta["val"].shape[-2] == 1]
    assert one_query and all(len(n.args) < 4 or n.args[3] is None for n in one_query)


def test_generate_past_a_sliding_window_at_batch_1_then_2_compiles_each():
    """Export keeps a batch of 1 static, so a batch of 2 needs the window's variants again (its prefill and decode
    steps, symbolic in the batch). They were counted against one max_variants with batch 1's: the batch of 2 ran
    eagerly from its first decode step. The bound is per input structure, and a prefill (an empty cache) is one, its
    decode steps another."""
    model, compiled = build(gemma2), build(gemma2)
    compiled.forward = fxcc.compile(compiled.forward, passes=FAST)
    ids, mask = prompt(6, 2), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    ids[mask == 0] = 0
    for args in ((prompt(7),), (prompt(5),), (ids, mask)):
        kwargs = {"attention_mask": args[1]} if len(args) > 1 else {}
        assert torch.equal(generate(compiled, args[0], **kwargs), generate(model, args[0], **kwargs))
    assert compiled.forward.fxcc.stats.eager_calls == 0, compiled.forward.fxcc.stats.reasons


# prompts as long as the model has heads (4) or key/value heads (2): the fuse pass compared a symbolic size with a
# head count (`s0 != 4`), which guarded the variant on the answer, and such a prompt compiled again (under
# dynamic=True that was the prefill's third compile)
@pytest.mark.parametrize("make, dynamic", [(llama, None), (llama, True), (gemma3, None)],
                         ids=lambda x: getattr(x, "__name__", f"dynamic={x}"))
def test_generate_compiles_prefill_and_decode_once_for_any_prompt_length(make, dynamic):
    model = build(make)
    lengths = (6, 4, 2, 9)
    expected = [generate(build(make), prompt(n), max_new_tokens=3) for n in lengths]
    model.forward = fxcc.compile(model.forward, passes=FAST, dynamic=dynamic)
    stats = model.forward.fxcc.stats
    for n, want in zip(lengths, expected):
        assert torch.equal(generate(model, prompt(n), max_new_tokens=3), want)
    assert stats.compiles == 2 and stats.eager_calls == 0, stats.reasons
    guarded = [(r.spec, r.guards) for v in model.forward.fxcc.variants for r in v.records if r.guards]
    assert not guarded  # no pass narrowed the sizes a variant serves


def test_guard_clauses_split_at_the_top_level_only():
    from fxcc.dynamic import conjuncts

    code = "L['t0'].size()[0] == 1 and not (1 + ((-1)*L['t2']) < 0 and L['t3'] > 2) and 2 <= L['t1'].size()[2]"
    assert conjuncts(code) == ["L['t0'].size()[0] == 1", "not (1 + ((-1)*L['t2']) < 0 and L['t3'] > 2)",
                               "2 <= L['t1'].size()[2]"]


@pytest.mark.parametrize("make", [llama, qwen2, mistral], ids=lambda m: m.__name__)
def test_a_grouped_query_decode_step_attends_over_the_cache_itself_not_a_repeated_copy(make):
    """repeat_kv (`kv[:, :, None, :, :].expand(...).reshape(...)`) copies the whole KV cache of a layer at every
    decode step; the slice that `:` records over a symbolic cache length hid the pattern. Attention reads the
    cache with its fewer heads (as SDPA's enable_gqa does), and stays a kernel."""
    model = build(make)
    ids = prompt(6)
    with torch.no_grad():
        expected = generate(model, ids, cache_implementation="static", max_new_tokens=6)
        model.forward = fxcc.compile(model.forward, passes=FAST)
        assert torch.equal(generate(model, ids, cache_implementation="static", max_new_tokens=6), expected)
    decode = model.forward.fxcc.variants[-1].gm
    assert not [n for n in decode.graph.nodes if n.target is torch.ops.aten.expand.default], decode.code
    attention = [n for n in decode.graph.nodes if n.target is torch.ops.fxcc_tx.attention.default]
    assert not attention, "attention ran outside a kernel: " + str([n.meta.get("fxcc_eager") for n in attention])


# ------------------------------------------ attributes generate adds to the model: no recompile of compiled code


def test_generate_of_a_compiled_model_then_plain_calls_compile_nothing_again(caplog):
    """generate installs fxcc's compiled forward on the model while it runs: no attribute of the model the
    compiled code reads, so the calls after it (and a second generate) recompile nothing."""
    model = build(llama)
    cm = fxcc.compile(model, passes=FAST)
    ids = prompt(6)
    with torch.no_grad():
        expected, logits = generate(model, ids), model(ids).logits
        with caplog.at_level("INFO", logger="fxcc.recompiles"):
            assert torch.equal(generate(cm, ids), expected)
            torch.testing.assert_close(cm(ids).logits, logits)
            assert torch.equal(generate(cm, ids), expected)
            torch.testing.assert_close(cm(ids).logits, logits)
    assert "added or deleted" not in caplog.text and "was added" not in caplog.text
    assert cm.stats.param_recompiles == 0 and cm.stats.compiles == 3  # prefill, decode step, the plain call


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_compiled_forward_called_after_generate_compiles_nothing_again(cache_implementation):
    """`model.forward = fxcc.compile(model.forward)`; a call, generate, then calls of the model outside it."""
    model = build(llama)
    ids = prompt(6)
    kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
    with torch.no_grad():
        expected, logits = generate(build(llama), ids, **kw), model(ids).logits  # another model: this one unchanged
        model.forward = fxcc.compile(model.forward, passes=FAST)
        stats = model.forward.fxcc.stats
        torch.testing.assert_close(model(ids).logits, logits)
        assert torch.equal(generate(model, ids, **kw), expected)
        compiles = stats.compiles
        torch.testing.assert_close(model(ids).logits, logits)
        torch.testing.assert_close(model.forward(ids).logits, logits)
    assert stats.param_recompiles == 0 and stats.compiles == compiles


def test_a_static_cache_generate_does_not_recompile_other_compiles_of_the_model():
    """A static-cache generate sets `_previous_max_cache_length` on the model, which no forward reads: another
    fxcc compile of the same model keeps its variants."""
    model = build(llama)
    ids = prompt(6)
    with torch.no_grad():
        expected, logits = generate(build(llama), ids, cache_implementation="static"), model(ids).logits
        plain = fxcc.compile(model, passes=FAST)
        torch.testing.assert_close(plain(ids).logits, logits)
        gen = fxcc.compile(model, passes=FAST)
        assert "_previous_max_cache_length" not in vars(model)
        assert torch.equal(generate(gen, ids, cache_implementation="static"), expected)
        assert "_previous_max_cache_length" in vars(model)
        torch.testing.assert_close(plain(ids).logits, logits)
    assert plain.stats.compiles == 1 and plain.stats.param_recompiles == 0
    assert gen.stats.param_recompiles == 0


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_with_the_stop_check_one_step_late_keeps_eagers_tokens(monkeypatch, cache_implementation):
    """`CompiledModule.generate` reads the stop flag one step late on CUDA (transformers' DeferredStopCheck, which
    transformers applies on mps only), so the host queues a step while the device runs one. Here it is turned on
    for the CPU: rows that meet the end-of-sequence token at different steps, so the batch finishes early and the
    one step run past it must be taken back."""
    from transformers.generation.utils import DeferredStopCheck

    model = build(llama)
    ids = prompt(6, 2)
    kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
    plain = generate(model, ids, max_new_tokens=12, **kw)
    row0, row1 = plain[0, 6:].tolist(), plain[1, 6:].tolist()
    eos = next(t for t in row0[2:] if t in row1[2:] and t != model.config.pad_token_id)  # ends both rows early
    expected = generate(model, ids, max_new_tokens=12, eos_token_id=eos, **kw)
    assert expected.shape[1] < plain.shape[1]  # the batch finished before max_new_tokens

    made = []
    real_init = DeferredStopCheck.__init__

    def init(self, *a, **k):
        made.append(self)
        real_init(self, *a, **k)

    monkeypatch.setattr(DeferredStopCheck, "__init__", init)

    class Event:  # the CPU has no events; its work is done when the call returns
        def __init__(self, *a, **k):
            pass

        def record(self, *a):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch, "Event", Event)
    monkeypatch.setattr(fxcc_runtime, "DEFERRED_STOP_DEVICES", ("cpu",))
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.enabled = False  # transformers' loop: fxcc's own reads its flag itself (tests/test_decode_loop.py)
    got = generate(cm, ids, max_new_tokens=12, eos_token_id=eos, **kw)
    assert made, "generate did not defer its stop check"
    assert torch.equal(got, expected)
    assert cm.stats.eager_calls == 0
    assert DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False) is False  # undone after generate
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=eos, **kw), expected)
