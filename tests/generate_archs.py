"""Greedy generation through `model.forward = fxcc.compile(model.forward)` on causal LMs of many families, each
built from a shrunk config: tokens equal eager's for two prompt lengths, with transformers' default (growing)
cache and with a static one, and how many compiles and eager calls that took.

    python tests/generate_archs.py [--only gemma2,phi3] [--passes default] [--tokens 8] [--loop]

--loop runs `fxcc.compile(model).generate` with a static cache instead (fxcc's own decode loop, fxcc.decode_loop):
a caller's StaticCache, greedy from prompts of 7 and 5 tokens, a batch of 2 left-padded prompts, a seeded sampling
call and the caller's cache again, each against eager's generate, with the loop that ran and the compiles of the
model and of its decode steps after each call.

tests/test_generate_archs.py runs a CI-sized share of these rows; this script runs them all and prints a table.
The families differ where a decode step does: rotary variants (partial, interleaved), ALiBi, sliding windows,
logit soft-capping, parallel attention/MLP blocks, mixture-of-experts routing, grouped-query attention.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

EXTERN = "canonicalize,raise,merge-linears,fuse,codegen{backend=extern}"
VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=256)

# name -> (config class, model class, config fields over SMALL)
ARCHS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM", dict(alibi=True)),  # transformers raises on a static cache
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.5)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # families tests/generate_breadth.py added (issue 19)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(sliding_window=8)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                            attention_multiplier=0.25, logits_scaling=2.0)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(sliding_window=8)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(sliding_window=8)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(head_dim=16)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(head_dim=16)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", {}),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(head_dim=16)),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", {}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                          sliding_window=8)),
}


def build(name: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, extra = ARCHS[name]
    cfg = getattr(transformers, config_cls)(**{**SMALL, **extra})
    cfg.pad_token_id, cfg.eos_token_id = 0, None
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).eval()


def check(name: str, cache: str | None, passes: str | None = EXTERN, tokens: int = 8) -> dict:
    """Eager and fxcc generate from prompts of 7 and 5 tokens; the row of the table."""
    model, compiled = build(name), build(name)
    compiled.forward = __import__("fxcc").compile(compiled.forward, passes=passes)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if cache:
        kw["cache_implementation"] = cache
    prompts = [torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 5)]
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        same = all(torch.equal(compiled.generate(p, **kw), model.generate(p, **kw)) for p in prompts)
    stats = compiled.forward.fxcc.stats
    return dict(arch=name, cache=cache or "default", same=same, compiles=stats.compiles,
                eager_calls=stats.eager_calls, seconds=time.perf_counter() - t0,
                warnings=[str(w.message) for w in caught if "fxcc" in str(w.message)])


def left_padded(batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` prompts of `length` tokens, row 0 left-padded by 2 (its mask 0 there, its ids the pad token 0)."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length + batch))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


LOOP_CALLS = ("callers", "greedy7", "greedy5", "padded", "sample", "callers2")
CALLERS = 24  # max_cache_len of a caller's StaticCache (generate's own holds prompt and new tokens)


def loop_calls() -> list[tuple[str, torch.Tensor, dict]]:
    """The generate calls of `check_loop`: (name, input ids, generate's arguments over a static greedy call)."""
    ids, mask = left_padded()
    prompts = [torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 5)]
    # a caller's StaticCache first, generate's own (cache_implementation="static") after it, then the caller's again,
    # which the variants compiled for the first serve
    return [("callers", prompts[0], dict(cache=CALLERS)), ("greedy7", prompts[0], {}), ("greedy5", prompts[1], {}),
            ("padded", ids, dict(attention_mask=mask)), ("sample", prompts[0], dict(do_sample=True, temperature=0.8,
                                                                                     top_k=5)),
            ("callers2", prompts[0], dict(cache=CALLERS))]


def check_loop(name: str, passes: str | None = EXTERN, tokens: int = 8, calls: tuple[str, ...] = LOOP_CALLS) -> dict:
    """`fxcc.compile(model).generate` against eager's with a static cache, per call of `loop_calls`: the loop that
    ran, equal tokens, and (model, steps') compiles after it; the row of the `--loop` table."""
    import fxcc
    from transformers import StaticCache

    model, other = build(name), build(name)
    for m in (model, other):
        m.generation_config.disable_compile = True  # eager is eager: no torch.compile of a static-cache forward
    cm = fxcc.compile(other, passes=passes)
    rows = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for call, ids, extra in loop_calls():
            if call not in calls:
                continue
            kw = {"max_new_tokens": tokens, "do_sample": False, "cache_implementation": "static", **extra}
            if "cache" in kw:  # a caller's StaticCache, one for each model
                kw["cache_implementation"] = None
                length = kw.pop("cache")
                mine = {m: StaticCache(config=m.config, max_cache_len=length) for m in (model, other)}
            results = []
            for m, generate in ((model, model.generate), (other, cm.generate)):
                torch.manual_seed(5)
                try:
                    results.append(generate(ids, **kw, **({"cache": mine[m]} if "cache" in extra else {})))
                except Exception as e:  # noqa: BLE001 - a cell of the table
                    results.append(f"{type(e).__name__}: {str(e)[:300]}")
            expected, got = results
            if isinstance(got, str):  # fxcc's generate raised: as eager's did (`eager`), or where eager's did not
                rows.append(dict(call=call, error=got, eager=expected if isinstance(expected, str) else None,
                                 loop=cm.decode_loop.last))
                break
            same = not isinstance(expected, str) and got.shape == expected.shape and torch.equal(got, expected)
            steps = cm.decode_loop.steps.values()
            rows.append(dict(call=call, loop=cm.decode_loop.last, same=same, compiles=cm.stats.compiles,
                             step_compiles=[s.stats.compiles for s in steps],
                             eager_calls=cm.stats.eager_calls + sum(s.stats.eager_calls for s in steps)))
    return dict(arch=name, calls=rows, seconds=time.perf_counter() - t0,
                warnings=[str(w.message) for w in caught if "fxcc" in str(w.message)])


def loop_table(names: list[str], passes: str | None, tokens: int) -> int:
    """Print the `--loop` table; the number of families with an error, different tokens, more than a compile of the
    model and one of its step for a second prompt length, or any for a caller's cache again."""
    bad = 0
    print(f"{'arch':10s} {'call':8s} {'loop':5s} {'tokens':7s} {'compiles':>8s} {'steps':10s} {'eager':>5s}  why")
    for name in names:
        try:
            r = check_loop(name, passes, tokens)
        except Exception as e:  # noqa: BLE001 - a row of the table
            bad += 1
            print(f"{name:10s} ERROR   {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        wrong = False
        for c in r["calls"]:
            if "error" in c:  # raising as eager does is eager's behaviour; the report must say it raised
                path, why = c["loop"] or ("", "no report")
                wrong |= c["error"] != c["eager"] or "raised" not in why
                said = "raised as eager" if c["error"] == c["eager"] else "ERROR"
                print(f"{name:10s} {c['call']:8s} {said} {c['error'][:80]}\n{'':10s} {'':8s} report: {path} ({why[:150]})",
                      flush=True)
                continue
            path, why = c["loop"]
            loop = "fxcc" if path.startswith("fxcc") else "hf"
            wrong |= not c["same"]
            print(f"{name:10s} {c['call']:8s} {loop:5s} {'same' if c['same'] else 'DIFF':7s} {c['compiles']:8d} "
                  f"{str(c['step_compiles']):10s} {c['eager_calls']:5d}  {why[:90]}", flush=True)
        calls = {c["call"]: c for c in r["calls"] if "error" not in c}
        if "greedy7" in calls and "greedy5" in calls:  # a second prompt length: at most a prefill and a step more
            a, b = calls["greedy7"], calls["greedy5"]
            wrong |= b["compiles"] - a["compiles"] > 1 or sum(b["step_compiles"]) - sum(a["step_compiles"]) > 1
        if "sample" in calls and "callers2" in calls:  # a caller's cache again: nothing compiled again
            a, b = calls["sample"], calls["callers2"]
            wrong |= (a["compiles"], a["step_compiles"]) != (b["compiles"], b["step_compiles"])
        bad += wrong
        print(f"{name:10s} {'':8s} {r['seconds']:.1f} s  {'; '.join(w[:100] for w in r['warnings'][:2])}", flush=True)
    return bad


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated, of " + ", ".join(ARCHS))
    ap.add_argument("--passes", default=EXTERN, help="pipeline ('default' for fxcc's own; default: extern kernels)")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per generate")
    ap.add_argument("--loop", action="store_true", help="fxcc's decode loop (static cache) against eager's generate")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(ARCHS)
    passes = None if args.passes == "default" else args.passes
    if args.loop:
        return 1 if loop_table(names, passes, args.tokens) else 0
    bad = 0
    print(f"{'arch':10s} {'cache':8s} {'tokens':7s} {'compiles':>8s} {'eager':>6s} {'s':>6s}  warnings")
    for name in names:
        for cache in (None, "static"):
            try:
                r = check(name, cache, passes, args.tokens)
            except Exception as e:  # noqa: BLE001 - a row of the table
                bad += 1
                print(f"{name:10s} {cache or 'default':8s} ERROR   {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            bad += not r["same"]
            print(f"{name:10s} {r['cache']:8s} {'same' if r['same'] else 'DIFF':7s} {r['compiles']:8d} "
                  f"{r['eager_calls']:6d} {r['seconds']:6.1f}  {'; '.join(w[:100] for w in r['warnings'][:2])}",
                  flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
