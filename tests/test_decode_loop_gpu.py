"""fxcc's decode loop on a CUDA device (skipped without one): the step is one CUDA-graph replay that writes its
inputs in place and may draw from the device's generator, so greedy ids, sampled ids under one seed, the generator
left after the call and a caller's static cache must all be eager's, with the default pipeline (Triton kernels)."""

from __future__ import annotations

import fxcc
import pytest
import torch
from fxcc import decode_loop

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
transformers = pytest.importorskip("transformers")
from test_decode_loop import Recorder, generate, left_padded  # noqa: E402
from test_generate import gpt2, llama  # noqa: E402
from transformers import StaticCache  # noqa: E402


def build(make):
    torch.manual_seed(0)
    model = make().eval().cuda()
    model.generation_config.disable_compile = True
    return model


def cuda_batch():
    ids, mask = left_padded()
    return ids.cuda(), mask.cuda()


@pytest.fixture
def loop_on_cuda(monkeypatch):
    monkeypatch.setenv("FXCC_DECODE_LOOP", "all")


@pytest.mark.parametrize("every", [1, 8])
def test_greedy_ids_and_early_ending_rows_are_eagers(every, loop_on_cuda):
    model = build(llama)
    ids, mask = cuda_batch()
    plain = generate(model, ids, mask, max_new_tokens=12)
    new = plain[:, ids.shape[1]:]
    eos = sorted({int(new[0, 2]), int(new[1, 4])})
    cm = fxcc.compile(model)
    cm.decode_loop.every = every
    for kw in (dict(), dict(eos_token_id=eos)):
        expected = generate(model, ids, mask, max_new_tokens=12, **kw)
        got = generate(cm, ids, mask, max_new_tokens=12, **kw)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH, cm.decode_loop.last
        assert torch.equal(got, expected)
    steps = list(cm.decode_loop.steps.values())  # one step without a stop token, one with
    compiles = [s.stats.compiles for s in steps]
    assert torch.equal(generate(cm, ids, mask, max_new_tokens=12), plain)
    assert list(cm.decode_loop.steps.values()) == steps
    assert [s.stats.compiles for s in steps] == compiles and all(s.stats.eager_calls == 0 for s in steps)


@pytest.mark.parametrize(("make", "warp"), [(llama, dict(temperature=0.7, top_k=5)),
                                             (gpt2, dict(top_p=0.8, temperature=1.3))], ids=["llama", "gpt2"])
def test_sampling_draws_eagers_tokens_and_leaves_the_generator_where_eager_does(make, warp, loop_on_cuda):
    model = build(make)
    ids, mask = cuda_batch()
    cm = fxcc.compile(model)
    for temperature in (warp["temperature"], 0.9):  # a second setting reuses the step
        kw = {**warp, "temperature": temperature}
        torch.manual_seed(5)
        expected = generate(model, ids, mask, do_sample=True, max_new_tokens=12, **kw)
        after = torch.rand(3, device="cuda")
        torch.manual_seed(5)
        got = generate(cm, ids, mask, do_sample=True, max_new_tokens=12, **kw)
        got_after = torch.rand(3, device="cuda")
        assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "sampling with a static cache")
        assert torch.equal(got, expected), kw
        assert torch.equal(got_after, after)
    assert len(cm.decode_loop.steps) == 1


def test_a_callers_static_cache_ends_as_eagers(loop_on_cuda):
    model = build(llama)
    ids, mask = cuda_batch()
    eos = sorted({int(t) for t in generate(model, ids, mask)[:, ids.shape[1] + 3]})
    caches = [StaticCache(config=model.config, max_cache_len=20) for _ in range(2)]
    expected = generate(model, ids, mask, eos_token_id=eos, cache=caches[0], cache_implementation=None)
    cm = fxcc.compile(model)
    got = generate(cm, ids, mask, eos_token_id=eos, cache=caches[1], cache_implementation=None)
    assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
    assert torch.equal(got, expected)
    assert caches[0].get_seq_length() == caches[1].get_seq_length()
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)


def test_a_streamer_is_handed_eagers_tokens(loop_on_cuda):
    """Greedy (the flag otherwise read every 8 steps) and sampling, rows ending at different steps: the streamer gets
    eager's puts, each a CPU tensor, none past the batch's end, then one `end()`."""
    model = build(llama)
    ids, mask = cuda_batch()
    plain = generate(model, ids, mask, max_new_tokens=12)
    eos = sorted({int(t) for t in (plain[0, ids.shape[1] + 2], plain[1, ids.shape[1] + 4], plain[2, ids.shape[1] + 5])})
    cm = fxcc.compile(model)
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=eos, do_sample=True, top_k=5)):
        runs = []
        for m in (model, cm):
            streamer = Recorder()
            torch.manual_seed(5)
            runs.append((generate(m, ids, mask, max_new_tokens=12, streamer=streamer, **kw), streamer.events))
        (expected, want), (got, have) = runs
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH, cm.decode_loop.last
        assert torch.equal(got, expected)
        assert len(have) == len(want) == expected.shape[1] - ids.shape[1] + 2 and have[-1] == want[-1] == "end"
        for a, b in zip(have[:-1], want[:-1]):
            assert a.device.type == "cpu" and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if "do_sample" not in kw:
            assert expected.shape[1] < plain.shape[1]  # the batch ended before max_new_tokens


def test_later_generates_replay_the_steps_graph_without_a_capture_or_a_copy(loop_on_cuda, monkeypatch):
    """Each generate makes a new StaticCache; its state takes the last generate's memory, so from the second
    generate on the step's graph replays as captured: no capture, no cache copied in and back."""
    from fxcc import cuda_graphs as cg

    model = build(llama)
    ids, mask = cuda_batch()
    cm = fxcc.compile(model)
    captures = []
    capture = cg.CudaGraph.capture

    def counted(*args, **kwargs):
        captures.append(args[2] if len(args) > 2 else kwargs.get("name"))
        return capture(*args, **kwargs)

    monkeypatch.setattr(cg.CudaGraph, "capture", staticmethod(counted))
    for prompt in (ids, ids.flip(1)):
        generate(cm, prompt, mask, max_new_tokens=40)
    steps = list(cm.decode_loop.steps.values())
    graphs = [v.cuda_graph for s in steps for v in s.variants if isinstance(v.cuda_graph, cg.CudaGraphs)]
    adoptions = sum(g.adoptions for g in graphs)
    captures.clear()
    for prompt in (ids.roll(1, 1), ids):
        expected = generate(model, prompt, mask, max_new_tokens=40)
        assert torch.equal(generate(cm, prompt, mask, max_new_tokens=40), expected)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
    assert graphs and sum(g.adoptions for g in graphs) == adoptions
    assert not [c for c in captures if c in {g.name for g in graphs}]

