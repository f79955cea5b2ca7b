"""Batched greedy generation with left padding and a KV cache.

Prompts are rendered with the tokenizer's chat template (a generation prompt appended), sorted
by length so each batch pads little, left-padded so every row's next token sits in the last
column, and decoded greedily with the model's key/value cache. Outputs come back in the order
of the prompts and equal one-prompt-at-a-time generation (a test checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees for a user ``prompt``: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text
    return prompt


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    on_answers: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, decoded without special tokens and stripped.

    Args:
        model: a causal LM (a PEFT model too), already on its device.
        tokenizer: its tokenizer; a pad token is needed (eos stands in when missing).
        prompts: user messages.
        max_new_tokens: answer length cap.
        batch_size: prompts per forward pass; 1 gives the unbatched reference.
        on_answers: called with the number of prompts answered after each batch (progress).
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    encoded = [
        tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, index in enumerate(rows):
            answers[index] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
        if on_answers is not None:
            on_answers(len(rows))
    model.train(was_training)
    return answers
