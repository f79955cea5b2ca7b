"""Tiny Llama-architecture models for tests, demos and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class TinyLlamaShape:
    """Size of a tiny Llama. The defaults train a step in milliseconds on one CPU core."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def tiny_llama_config(
    vocab_size: int, shape: TinyLlamaShape, pad_token_id: int, eos_token_id: int
) -> LlamaConfig:
    """A LlamaConfig of the given shape for a tokenizer of ``vocab_size`` tokens."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attention_bias=False,
    )


def random_tiny_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A randomly initialised model; the same seed always gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
