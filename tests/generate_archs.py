"""Greedy generation through `model.forward = fxcc.compile(model.forward)` on causal LMs of many families, each
built from a shrunk config: tokens equal eager's for two prompt lengths, with transformers' default (growing)
cache and with a static one, and how many compiles and eager calls that took.

    python tests/generate_archs.py [--only gemma2,phi3] [--passes default] [--tokens 8]

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
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.5)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5)),
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated, of " + ", ".join(ARCHS))
    ap.add_argument("--passes", default=EXTERN, help="pipeline ('default' for fxcc's own; default: extern kernels)")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per generate")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(ARCHS)
    passes = None if args.passes == "default" else args.passes
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
