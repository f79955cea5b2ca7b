"""Measure a LoRA training step's peak memory on the CPU, beside its memory plan.

Run as ``python -m tests.core.memory_probe HIDDEN INTERMEDIATE LAYERS HEADS VOCAB BATCH
LENGTH`` in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` set, so that freed tensors go
back to the system and the resident high-water mark is the live peak; prints JSON.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from asft_core.memory import plan_for_config
from asft_core.spec import JobSpec
from asft_core.training import batch_loss_sum, with_lora


def _status(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    """Two training steps of a randomly initialised Llama-shaped model, as train() runs them."""
    hidden, intermediate, layers, heads, vocab, batch, length = map(int, sys.argv[1:8])
    torch.set_num_threads(1)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=length,
    )
    job = JobSpec.resolve("supervised", {"batch_size": batch, "max_seq_len": length})
    plan = plan_for_config(config, job, torch.float32)
    hyper = job.hyperparameters
    ids = torch.randint(0, vocab, (batch, length))
    rows = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    gc.collect()
    before = _status("VmRSS")
    model = with_lora(LlamaForCausalLM(config), hyper)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        loss, tokens = batch_loss_sum(model, rows, torch.device("cpu"))
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = _status("VmHWM") - before
    print(json.dumps({"planned": plan.total, "measured": measured, "plan": plan.to_dict()}))


if __name__ == "__main__":
    main()
