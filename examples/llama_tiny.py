"""A small Llama-style decoder for `fxcc explain examples/llama_tiny.py:model`."""

import torch
from transformers import LlamaConfig, LlamaModel


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaModel(cfg).eval()


def inputs():
    return (torch.randint(0, 256, (1, 16)),)
