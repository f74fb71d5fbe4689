"""Generation the ways users run it, through `fxcc.compile(model).generate(...)` and through
`model.forward = fxcc.compile(model.forward)`: greedy, beam search, sampling, left-padded batches, static caches,
repetition penalties, prompt lookup, assisted decoding, `inputs_embeds`, and encoder-decoder models. Each row
compares the token ids with eager's generate (same seed for sampling) and counts compiles and eager calls.

    python tests/generate_modes.py [--only llama,bart] [--modes greedy,beams4] [--passes default]

tests/test_generate.py and tests/test_seq2seq.py hold CI-sized cases of these rows.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

EXTERN = "canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"
NEW = 6


def _t():
    import transformers
    return transformers


def llama():
    t = _t()
    return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                            pad_token_id=0, eos_token_id=None, bos_token_id=1))


def gpt2():
    t = _t()
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                          pad_token_id=0, eos_token_id=None, bos_token_id=1))


def _seq2seq(cfg_cls: str, model_cls: str, **extra):
    t = _t()
    small = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128)
    return getattr(t, model_cls)(getattr(t, cfg_cls)(**{**small, **extra}))


def bart():
    return _seq2seq("BartConfig", "BartForConditionalGeneration", max_position_embeddings=64)


def t5():
    t = _t()
    return t.T5ForConditionalGeneration(t.T5Config(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2,
                                                   num_heads=4, d_kv=16, vocab_size=128, decoder_start_token_id=0,
                                                   pad_token_id=0, eos_token_id=1))


def whisper():
    return _seq2seq("WhisperConfig", "WhisperForConditionalGeneration", num_mel_bins=16, max_source_positions=32,
                    max_target_positions=64, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
                    begin_suppress_tokens=None, suppress_tokens=None)


MODELS = {"llama": llama, "gpt2": gpt2, "bart": bart, "t5": t5, "whisper": whisper}
DECODERS = {"llama", "gpt2"}


def inputs(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "whisper":
        return {"input_features": torch.randn(3, 16, 64, generator=g)}
    return {"inputs": torch.randint(3, 20 if name in DECODERS else 128, (3, 10), generator=g)}


def modes(name: str, model) -> dict:
    """mode -> generate keywords (over `inputs(name)`); some only for decoder-only models."""
    x = inputs(name)
    pad = None
    if "inputs" in x:
        pad = torch.ones_like(x["inputs"])
        pad[0, :4] = 0
        pad[1, :2] = 0
    out = {"greedy": {}, "beams4": dict(num_beams=4), "sample": dict(do_sample=True, top_k=20, top_p=0.9,
                                                                       temperature=0.8),
           "penalty": dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
           "static": dict(cache_implementation="static"), "beams_static": dict(num_beams=2,
                                                                               cache_implementation="static")}
    if pad is not None:
        out["leftpad"] = dict(attention_mask=pad)
    if name in DECODERS:
        out["leftpad_static"] = dict(attention_mask=pad, cache_implementation="static")
        out["prompt_lookup"] = dict(prompt_lookup_num_tokens=3)
        out["assisted"] = "assisted"
        out["embeds"] = "embeds"
    return out


def row(name: str, mode: str, how: str, passes: str | None) -> dict:
    import fxcc

    def build():
        torch.manual_seed(0)
        return MODELS[name]().eval()

    model = build()
    kw = modes(name, model)[mode]
    args = dict(inputs(name))
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    if mode in ("assisted", "prompt_lookup"):  # transformers runs these for one sequence at a time
        args["inputs"] = args["inputs"][:1]
    if kw == "assisted":
        gen["assistant_model"] = build()
    elif kw == "embeds":
        gen["inputs_embeds"] = model.get_input_embeddings()(args.pop("inputs"))
    else:
        gen.update(kw)
    torch.manual_seed(5)
    want = model.generate(**args, **gen)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "module":
            compiled = fxcc.compile(model, passes=passes)
            torch.manual_seed(5)
            got = compiled.generate(**args, **gen)
            stats = compiled.stats
        else:
            model.forward = fxcc.compile(model.forward, passes=passes)
            torch.manual_seed(5)
            got = model.generate(**args, **gen)
            stats = model.forward.fxcc.stats
    return dict(model=name, mode=mode, how=how, same=torch.equal(got, want), compiles=stats.compiles,
                eager=stats.eager_calls, seconds=time.perf_counter() - t0,
                warnings=[str(w.message).splitlines()[0][:120] for w in caught if "fxcc" in str(w.message)])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated, of " + ", ".join(MODELS))
    ap.add_argument("--modes", help="comma-separated modes (default: all that apply)")
    ap.add_argument("--how", default="module,forward", help="module (fxcc.compile(model).generate), forward "
                                                            "(model.forward = fxcc.compile(model.forward))")
    ap.add_argument("--passes", default=EXTERN, help="pipeline ('default' for fxcc's own; default: extern kernels)")
    args = ap.parse_args(argv)
    passes = None if args.passes == "default" else args.passes
    bad = 0
    print(f"{'model':8s} {'mode':15s} {'how':8s} {'tokens':7s} {'compiles':>8s} {'eager':>6s} {'s':>6s}  warnings")
    for name in (args.only.split(",") if args.only else MODELS):
        torch.manual_seed(0)
        for mode in modes(name, MODELS[name]()):
            if args.modes and mode not in args.modes.split(","):
                continue
            for how in args.how.split(","):
                try:
                    r = row(name, mode, how, passes)
                except Exception as e:  # noqa: BLE001 - a row that raises is reported, the table goes on
                    bad += 1
                    print(f"{name:8s} {mode:15s} {how:8s} ERROR   {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                bad += not r["same"]
                print(f"{name:8s} {mode:15s} {how:8s} {'same' if r['same'] else 'DIFF':7s} {r['compiles']:8d} "
                      f"{r['eager']:6d} {r['seconds']:6.1f}  {'; '.join(r['warnings'][:2])}", flush=True)
    print(f"{bad} rows differ from eager or raised")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
