"""Tensor-parallel Llama with fxcc: one process per device, each compiling its own shard.

    torchrun --nproc-per-node 2 examples/tp_llama.py            # CPU: gloo
    torchrun --nproc-per-node 2 examples/tp_llama.py --cuda     # GPUs: NCCL, symmetric-memory kernels

Every rank builds the same model (same seed, or load the same checkpoint), compiles it with tp-shard
(which slices this rank's weight shards once) and the fused all-reduce + RMSNorm, and gets the full,
replicated output. Rank 0 checks it against the uncompiled model.
"""

from __future__ import annotations

import os
import sys

import fxcc
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaModel


def main() -> int:
    cuda = "--cuda" in sys.argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    model = LlamaModel(cfg).eval().to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=device)
    passes = (f"canonicalize,raise,tp-shard{{tp={world}}},fuse-allreduce-rmsnorm{{split=true}},fuse,codegen")
    tp_model = fxcc.compile(model, passes=passes)
    with torch.no_grad():
        out = tp_model(ids, use_cache=False).last_hidden_state
        ref = model(ids, use_cache=False).last_hidden_state
    err = (out - ref).abs().max().item()
    if rank == 0:
        print(f"tp={world}: max |compiled - eager| = {err:.2e}")
        print(tp_model.explain().split("== final IR")[0])
    dist.destroy_process_group()
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
