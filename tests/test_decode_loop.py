"""fxcc's own decode loop in `CompiledModule.generate` (fxcc.decode_loop): greedy decoding or sampling with a
static cache runs one compiled step per token and returns the ids transformers' generate returns; every other call runs
transformers' loop, with the reason in `decode_loop.last` and `explain()`.

Tiny decoders (hidden 32, 2 layers, vocab 100) and a pipeline without kernel timing keep the file fast.
"""

from __future__ import annotations

import re

import fxcc
import pytest
import torch
from fxcc import decode_loop
from fxcc import runtime as fxcc_runtime

transformers = pytest.importorskip("transformers")
from test_generate import DECODER, FAST, VOCAB, gpt2, llama, qwen2  # noqa: E402  (the same tiny decoders)
from transformers import StaticCache  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


def build(make):
    torch.manual_seed(0)
    model = make().eval()
    model.generation_config.disable_compile = True
    return model


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, two of them left-padded (by 3 and 1 tokens)."""
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def generate(model, ids, mask, **kwargs):
    kw = {"max_new_tokens": 9, "do_sample": False, "cache_implementation": "static", **kwargs}
    return model.generate(ids, attention_mask=mask, **kw)


def count_calls(monkeypatch) -> dict:
    """Calls of each compiled object by its name (the model: its forwards; the step: its decode steps)."""
    calls: dict[str, int] = {}
    real = fxcc_runtime.CompiledModule.__call__

    def call(self, *a, **k):
        calls[self.name] = calls.get(self.name, 0) + 1
        return real(self, *a, **k)

    monkeypatch.setattr(fxcc_runtime.CompiledModule, "__call__", call)
    return calls


def eos_ending_rows(model, ids, mask, **kw) -> list[int]:
    """Token ids that end some rows early: the third new token of each row."""
    plain = generate(model, ids, mask, **kw)
    return [int(t) for t in plain[:, ids.shape[1] + 2]]


@pytest.mark.parametrize("make", [llama, qwen2, gpt2], ids=lambda m: m.__name__)
def test_greedy_static_cache_runs_fxccs_loop_with_eagers_ids(make, monkeypatch):
    """A left-padded batch: the prefill through the compiled model, then one compiled step per token."""
    model = build(make)
    ids, mask = left_padded()
    expected = generate(model, ids, mask)
    cm = fxcc.compile(model, passes=FAST)
    calls = count_calls(monkeypatch)
    got = generate(cm, ids, mask)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "greedy decoding with a static cache")
    assert calls == {cm.name: 1, "DecodeStep": 8}  # the prefill, then 8 steps for the 9 new tokens
    assert "== generate: fxcc's decode loop" in cm.explain()


def test_rows_ending_at_different_steps_are_padded_and_the_batch_stops_as_hfs():
    """eos in the middle of some rows (several eos ids): later tokens of those rows are the pad token, and the
    output ends where the last row ended, however late the loop reads the finished flag (one compiled model, the
    flag read every 1, 3 and 8 steps)."""
    model = build(llama)
    ids, mask = left_padded()
    plain = generate(model, ids, mask, max_new_tokens=12)
    new = plain[:, ids.shape[1]:]
    eos = sorted({int(new[0, 2]), int(new[1, 4])})  # row 0 ends at step 2 (or before), row 1 at step 4
    expected = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert (expected[:, ids.shape[1]:] == 0).any()  # some row was padded after its eos
    eos_all = eos + [int(t) for t in new[2, :5]]  # every row ends within 5 tokens: the batch stops early
    expected_all = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos_all)
    assert expected_all.shape[1] < plain.shape[1]
    cm = fxcc.compile(model, passes=FAST)
    for every in (1, 3, 8):
        cm.decode_loop.every = every
        got = generate(cm, ids, mask, max_new_tokens=12, eos_token_id=eos)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
        assert torch.equal(got, expected), every
        assert torch.equal(generate(cm, ids, mask, max_new_tokens=12, eos_token_id=eos_all), expected_all), every


def test_max_length_and_max_new_tokens():
    model = build(qwen2)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    for length in (dict(max_length=12), dict(max_new_tokens=3), dict(max_length=8)):
        expected = model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation="static", **length)
        got = cm.generate(ids, attention_mask=mask, do_sample=False, cache_implementation="static", **length)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
        assert torch.equal(got, expected), length


def test_a_callers_static_cache_ends_as_hfs_leaves_it():
    """A StaticCache passed in is the caller's after generate: no step past the batch's end is written into it
    (the batch ending at its 4th token, or at the prefill's)."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    for at in (0, 3):
        eos = sorted({int(t) for t in generate(model, ids, mask)[:, ids.shape[1] + at]})
        caches = [StaticCache(config=model.config, max_cache_len=20) for _ in range(2)]
        expected = generate(model, ids, mask, eos_token_id=eos, cache=caches[0], cache_implementation=None)
        got = generate(cm, ids, mask, eos_token_id=eos, cache=caches[1], cache_implementation=None)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
        assert torch.equal(got, expected) and expected.shape[1] < ids.shape[1] + 9
        assert caches[0].get_seq_length() == caches[1].get_seq_length()
        for a, b in zip(caches[0].layers, caches[1].layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("make", "warp"), [(llama, dict()), (llama, dict(temperature=0.7, top_k=5)),
                                             (gpt2, dict(top_p=0.8, temperature=1.3))],
                         ids=["llama-plain", "llama-temperature-top-k", "gpt2-top-p"])
def test_sampling_draws_eagers_tokens_under_one_seed(make, warp):
    """Sampling (generate's warpers in the step, a draw from the global generator): eager's tokens under one seed,
    rows ending at different steps included, and the generator left where eager's loop leaves it."""
    model = build(make)
    ids, mask = left_padded()
    torch.manual_seed(5)
    plain = generate(model, ids, mask, do_sample=True, max_new_tokens=12, **warp)
    eos = sorted({int(plain[0, ids.shape[1] + 3]), int(plain[2, ids.shape[1] + 6])})
    cm = fxcc.compile(model, passes=FAST)
    for kw in (dict(), dict(eos_token_id=eos)):
        torch.manual_seed(5)
        expected, after = generate(model, ids, mask, do_sample=True, max_new_tokens=12, **warp, **kw), torch.rand(3)
        torch.manual_seed(5)
        got, got_after = generate(cm, ids, mask, do_sample=True, max_new_tokens=12, **warp, **kw), torch.rand(3)
        assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "sampling with a static cache")
        assert torch.equal(got, expected)
        assert torch.equal(got_after, after)
    new = expected[:, ids.shape[1]:].tolist()
    assert any(t in eos for row in new for t in row[:-1])  # the eos ids ended some row before the last token


def test_a_second_generate_compiles_nothing():
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    generate(cm, ids, mask)
    (step,) = cm.decode_loop.steps.values()
    compiles = (cm.stats.compiles, step.stats.compiles)
    assert torch.equal(generate(cm, ids, mask), generate(model, ids, mask))
    assert (cm.stats.compiles, step.stats.compiles) == compiles
    assert step.stats.eager_calls == 0


_SHARED: dict = {}


def shared_gpt2():
    """One GPT-2 and its compile for the cases below: each runs transformers' loop around the compiled forward,
    none builds a step, so one compile serves them all (its forward variants are reused, as in a user's session)."""
    if "gpt2" not in _SHARED:
        model = build(gpt2)
        _SHARED["gpt2"] = model, fxcc.compile(model, passes=FAST)
    return _SHARED["gpt2"]


@pytest.mark.parametrize(("kwargs", "why"), [
    (dict(cache_implementation=None), "a DynamicCache"),
    (dict(num_beams=2), "beam_search"),
    (dict(repetition_penalty=1.3), "logits processors RepetitionPenaltyLogitsProcessor"),
    (dict(max_time=100.0), "stopping criteria MaxTimeCriteria"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate"),
    (dict(do_sample=True, typical_p=0.9), "logits processors TypicalLogitsWarper"),
])
def test_other_calls_run_transformers_loop_and_say_why(kwargs, why, monkeypatch):
    model, cm = shared_gpt2()
    ids, mask = left_padded()
    torch.manual_seed(3)
    expected = generate(model, ids, mask, **kwargs)
    calls = count_calls(monkeypatch)
    torch.manual_seed(3)
    got = generate(cm, ids, mask, **kwargs)
    path, reason = cm.decode_loop.last
    assert path == decode_loop.HF_PATH and why in reason
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got.sequences, expected.sequences)
    assert "DecodeStep" not in calls
    assert f"== generate: {decode_loop.HF_PATH}" in cm.explain()


def test_a_loop_turned_off_or_on_a_device_it_is_not_checked_on_runs_transformers_loop():
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.enabled = False
    assert torch.equal(generate(cm, ids, mask), generate(model, ids, mask))
    assert cm.decode_loop.last[0] == decode_loop.HF_PATH and "turned off" in cm.decode_loop.last[1]
    cm.decode_loop.enabled = True
    cm.decode_loop.devices = ("cuda",)  # a device list without this one
    assert torch.equal(generate(cm, ids, mask), generate(model, ids, mask))
    assert cm.decode_loop.last[0] == decode_loop.HF_PATH and "not yet checked on cpu" in cm.decode_loop.last[1]
    assert not cm.decode_loop.steps


def test_a_new_temperature_top_p_or_min_p_reuses_the_compiled_step():
    """The warpers' float settings are inputs of the step: generates with other values draw eager's tokens under
    one seed and compile nothing more; a new top-k (a size in the graph) is a step of its own."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    for n, warp in enumerate([dict(temperature=0.7, top_p=0.8, min_p=0.05), dict(temperature=1.4, top_p=0.5,
                                                                                 min_p=0.2),
                              dict(temperature=0.3, top_p=0.95, min_p=0.01)]):
        torch.manual_seed(11)
        expected = generate(model, ids, mask, do_sample=True, top_k=0, **warp)
        torch.manual_seed(11)
        got = generate(cm, ids, mask, do_sample=True, top_k=0, **warp)
        assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "sampling with a static cache")
        assert torch.equal(got, expected), warp
        (step,) = cm.decode_loop.steps.values()
        if n == 0:
            compiles = step.stats.compiles
        assert step.stats.compiles == compiles and step.stats.eager_calls == 0
    generate(cm, ids, mask, do_sample=True, top_k=4, temperature=0.7)
    assert len(cm.decode_loop.steps) == 2


def test_sampling_warns_of_nothing_the_user_holds(monkeypatch, caplog):
    """The step's own warpers are fxcc's state, set at its build: its guard watches them without the warning
    meant for a user's container that can be watched by identity only."""
    from fxcc import guards

    monkeypatch.setattr(guards, "_UNWATCHED", set())  # said once per process: a test before may have said it
    model = build(gpt2)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    with caplog.at_level("WARNING", logger="fxcc"):
        torch.manual_seed(2)
        got = generate(cm, ids, mask, do_sample=True, temperature=0.8, top_k=5)
    torch.manual_seed(2)
    assert torch.equal(got, generate(model, ids, mask, do_sample=True, temperature=0.8, top_k=5))
    assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
    assert "watched by identity only" not in caplog.text


def falcon_alibi():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, bos_token_id=0,
        eos_token_id=None, pad_token_id=0))


def test_a_generate_that_raises_is_reported_as_raised_not_as_run():
    """Falcon with ALiBi: transformers' own generate raises with a static cache (its biases cover the prompt, its
    mask the cache). fxcc's generate raises the same error, declines its loop (the biases come from the 2-D mask a
    step does not pass) and `last` says that generate raised, not that a loop ran."""
    model = build(falcon_alibi)
    ids, mask = left_padded()
    with pytest.raises(Exception) as eager:  # noqa: PT011 - transformers' own error, whichever it is
        generate(model, ids, mask)
    cm = fxcc.compile(build(falcon_alibi), passes=FAST)
    with pytest.raises(type(eager.value), match=re.escape(str(eager.value))):
        generate(cm, ids, mask)
    path, why = cm.decode_loop.last
    assert path == decode_loop.HF_PATH and "ALiBi" in why
    assert f"raised {type(eager.value).__name__}: {eager.value}" in why
    assert "; raised " in cm.decode_loop.text() and not cm.decode_loop.steps


def test_a_generate_that_raises_in_fxccs_loop_says_so_and_leaves_no_earlier_report(monkeypatch):
    """An error inside fxcc's loop (here its prefill) is in `last` after the loop's name; a generate that raises
    before any loop is chosen does not leave the report of the generate before it."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    generate(cm, ids, mask)
    assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "greedy decoding with a static cache")
    with pytest.raises(ValueError):
        generate(cm, ids, mask, max_new_tokens=None, max_length=3)  # shorter than the prompt: generate refuses it
    assert cm.decode_loop.last[0] != decode_loop.FXCC_PATH and "raised ValueError" in cm.decode_loop.last[1]

    def prefill(*a, **k):
        raise RuntimeError("a prefill that fails")

    monkeypatch.setattr(type(model), "_prefill", prefill)
    with pytest.raises(RuntimeError, match="a prefill that fails"):
        generate(cm, ids, mask)
    assert cm.decode_loop.last == (decode_loop.FXCC_PATH, "greedy decoding with a static cache; raised RuntimeError: "
                                   "a prefill that fails")


def mistral_window(window: int):
    def mistral():
        return transformers.MistralForCausalLM(transformers.MistralConfig(**DECODER, sliding_window=window))
    return mistral


@pytest.mark.parametrize(("window", "path"), [(16, decode_loop.FXCC_PATH), (64, decode_loop.FXCC_PATH),
                                              (8, decode_loop.HF_PATH)])
def test_a_sliding_window_that_holds_the_whole_cache_runs_fxccs_loop(window, path):
    """Mistral's sliding window: one at least as long as the cache (7 prompt and 9 new tokens: 16) never slides, so
    the model attends as with full causal attention and fxcc's loop runs it; a shorter one slides, and transformers'
    loop runs it, saying why. Both give eager's ids for a left-padded batch."""
    model = build(mistral_window(window))
    ids, mask = left_padded()
    expected = generate(model, ids, mask)
    cm = fxcc.compile(model, passes=FAST)
    assert torch.equal(generate(cm, ids, mask), expected)
    assert cm.decode_loop.last[0] == path, cm.decode_loop.last
    if path == decode_loop.HF_PATH:
        assert "sliding-window layers shorter than the cache" in cm.decode_loop.last[1]
    else:
        (step,) = cm.decode_loop.steps.values()
        assert step.stats.eager_calls == 0


class Recorder(BaseStreamer):
    """A streamer that keeps every tensor generate puts (as it is handed) and each `end()`, in order."""

    def __init__(self):
        self.events: list[torch.Tensor | str] = []

    def put(self, value):
        self.events.append(value)

    def end(self):
        self.events.append("end")


def streamed(model, ids, **kwargs) -> tuple[torch.Tensor, list]:
    streamer = Recorder()
    torch.manual_seed(5)
    out = generate(model, ids, torch.ones_like(ids), streamer=streamer, max_new_tokens=12, **kwargs)
    return out, streamer.events


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_a_streamer_is_handed_eagers_tokens_in_eagers_order(batch, sample):
    """A streamer runs fxcc's loop and gets what eager's loop puts: the prompt (generate's own put), then each new
    token of the batch as a CPU tensor, padding in a row that ended, none past the step where every row ended (at
    the prefill's token, or mid-generation where the flag is otherwise read every 8 steps), and one `end()` last."""
    model = build(llama)
    ids = torch.randint(1, VOCAB, (batch, 7), generator=torch.Generator().manual_seed(7))
    plain, _ = streamed(model, ids, do_sample=sample)
    new = plain[:, ids.shape[1]:]
    at_prefill = sorted({int(t) for t in new[:, 0]})  # every row ends at the prefill's token
    eos = sorted({int(new[0, 2]), int(new[-1, 5])})  # row 0 ends at its 3rd token (or before), the last at its 6th
    cm = fxcc.compile(model, passes=FAST)
    for kw in (dict(), dict(eos_token_id=at_prefill), dict(eos_token_id=eos)):
        expected, want = streamed(model, ids, do_sample=sample, **kw)
        got, have = streamed(cm, ids, do_sample=sample, **kw)
        assert cm.decode_loop.last == (decode_loop.FXCC_PATH,
                                       f"{'sampling' if sample else 'greedy decoding'} with a static cache")
        assert torch.equal(got, expected)
        got.zero_()  # the streamer's tensors are its own, not views of the output
        assert len(have) == len(want) == expected.shape[1] - ids.shape[1] + 2 and have[-1] == want[-1] == "end"
        for a, b in zip(have[:-1], want[:-1]):
            assert a.device.type == "cpu" and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert torch.equal(torch.cat([want[0], *(t[:, None] for t in want[1:-1])], 1), expected)
    assert expected.shape[1] < plain.shape[1]  # the batch ended before max_new_tokens
    if batch == 2:
        assert (expected[0, ids.shape[1]:] == 0).any()  # row 0 ended first and was padded


def test_a_streamer_in_a_call_fxcc_declines_is_handed_on_to_transformers_loop():
    """A call fxcc's loop declines once generate has prepared it (a processor it does not build) runs transformers'
    loop with the streamer: eager's puts."""
    model, cm = shared_gpt2()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
    expected, want = streamed(model, ids, repetition_penalty=1.3)
    got, have = streamed(cm, ids, repetition_penalty=1.3)
    assert cm.decode_loop.last == (decode_loop.HF_PATH, "logits processors RepetitionPenaltyLogitsProcessor")
    assert torch.equal(got, expected) and len(have) == len(want) == 14 and have[-1] == want[-1] == "end"
    assert all(torch.equal(a, b) for a, b in zip(have[:-1], want[:-1]))


def test_a_text_streamer_prints_eagers_text(capsys):
    """`TextStreamer` (a tiny word-level tokenizer) prints the same text from fxcc's loop as from eager's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0")
    model = build(llama)
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(7))
    cm = fxcc.compile(model, passes=FAST)
    printed = []
    for m in (model, cm):
        out = generate(m, ids, torch.ones_like(ids), streamer=transformers.TextStreamer(tokenizer, skip_prompt=True))
        printed.append(capsys.readouterr().out)
    assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
    assert printed[0] == printed[1] == tokenizer.decode(out[0, ids.shape[1]:]) + "\n"


def recorded_steps(cm) -> list[tuple[int, ...]]:
    """Where each decode step's tensors live: (seq, pos, pad_mask, the first layer's keys and length), per step."""
    seen: list[tuple[int, ...]] = []
    compile_step = cm.decode_loop.compile_step

    def recording(module):
        step = compile_step(module)

        def call(seq, pos, position_ids, pad_mask, unfinished, eos, pad, knobs, cache):
            layer = cache.layers[0]
            seen.append((seq.data_ptr(), pos.data_ptr(), pad_mask.data_ptr(), layer.keys.data_ptr(),
                         layer.cumulative_length.data_ptr()))
            return step(seq, pos, position_ids, pad_mask, unfinished, eos, pad, knobs, cache)
        return call

    cm.decode_loop.compile_step = recording
    return seen


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_every_generates_steps_read_the_memory_the_first_generates_did(sample):
    """Where a generate's state takes the last generate's memory (CUDA, here turned on for the CPU): the steps of a
    second and third generate (other prompts, one of them ending at an eos) read the tensors the first one's did, the
    ids still equal eager's, and ids returned earlier are not written by a later generate."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.reuse.devices = ("cpu",)
    seen = recorded_steps(cm)
    kw = dict(do_sample=True, temperature=0.8) if sample else {}
    outputs, where = [], []
    for prompt, extra in ((ids, {}), (ids.flip(1), {}), (ids.roll(1, 1), {"eos_token_id": 7})):
        mask = torch.ones_like(prompt)
        torch.manual_seed(3)
        expected = generate(model, prompt, mask, **kw, **extra)
        torch.manual_seed(3)
        got = generate(cm, prompt, mask, **kw, **extra)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
        assert torch.equal(got, expected)
        outputs.append((got, got.clone()))
        where.append(set(seen))
        seen.clear()
    assert all(len(w) == 1 for w in where) and where[1] == where[0] == where[2]
    for got, copy in outputs:
        assert torch.equal(got, copy)


def test_a_callers_static_cache_keeps_its_own_memory_where_memory_is_reused():
    """A StaticCache the caller passes stays the caller's tensors: the steps write it, and it still holds eager's
    values after a later generate (with a cache of generate's own, of the same shapes) has run."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.reuse.devices = ("cpu",)
    seen = recorded_steps(cm)
    generate(cm, ids, mask)  # the memory of generate's own cache, kept: the caller's below has its shapes
    caches = [StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8) for _ in range(2)]
    expected = generate(model, ids, mask, cache=caches[0], cache_implementation=None)
    got = generate(cm, ids, mask, cache=caches[1], cache_implementation=None)
    assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH and torch.equal(got, expected)
    assert {s[3] for s in seen[-8:]} == {caches[1].layers[0].keys.data_ptr()}
    generate(cm, ids.flip(1), mask)  # a later generate with a cache of its own, of the same shapes
    for a, b in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_memory_reuse_makes_the_cache_the_models_attention_writes():
    """The first generate's cache is made before its prefill with the heads the attention writes, not those the config
    names: a GPT-2 config carrying num_key_value_heads=2 (which GPT-2 does not read: it keeps its 4 heads) still gives
    eager's ids, compiled without an eager fallback, and the next generate's steps run on the same cache."""
    def make():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=None,
            pad_token_id=0, num_key_value_heads=2))

    model = build(make)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.reuse.devices = ("cpu",)
    seen = recorded_steps(cm)
    for prompt in (ids, ids.flip(1)):
        expected = generate(model, prompt, mask)
        got = generate(cm, prompt, mask)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH and torch.equal(got, expected)
    assert cm.stats.eager_calls == 0
    assert len({s[3] for s in seen}) == 1 and cm.decode_loop.reuse.cache.layers[0].keys.shape[1] == 4


def test_memory_reuse_never_writes_the_callers_token_tensors():
    """End and pad tokens a caller passes as tensors are theirs: where memory is reused, a later generate with other
    tokens leaves the first generate's tensors as they were (generate hands them to the loop as they are)."""
    model = build(llama)
    ids, mask = left_padded()
    cm = fxcc.compile(model, passes=FAST)
    cm.decode_loop.reuse.devices = ("cpu",)
    first = dict(eos_token_id=torch.tensor([7]), pad_token_id=torch.tensor(0))
    second = dict(eos_token_id=torch.tensor([9]), pad_token_id=torch.tensor(1))
    for tokens in (first, second):
        got = generate(cm, ids, mask, **tokens)
        assert cm.decode_loop.last[0] == decode_loop.FXCC_PATH
        assert torch.equal(got, generate(model, ids, mask, **tokens))
    assert first["eos_token_id"].tolist() == [7] and first["pad_token_id"].item() == 0
