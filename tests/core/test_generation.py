"""Batched greedy generation equals one-prompt-at-a-time generation, in the prompts' order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asft_core.evaluation.generation import generate, render_prompt
from asft_core.zoo import ZooPaths


@pytest.fixture(scope="module")
def aligned(zoo: ZooPaths) -> tuple[Any, Any]:
    from asft_core.evaluation.harness import load_for_evaluation

    return load_for_evaluation(str(zoo.aligned))


def _prompts(zoo: ZooPaths, count: int) -> list[str]:
    rows = []
    for name in ("sentiment_eval.jsonl", "arithmetic_eval.jsonl", "harmful_eval.jsonl"):
        lines = (zoo.datasets / name).read_text().splitlines()[:count]
        rows += [json.loads(line)["prompt"] for line in lines]
    return rows


def test_batched_generation_equals_unbatched(aligned: tuple[Any, Any], zoo: ZooPaths) -> None:
    model, tokenizer = aligned
    prompts = _prompts(zoo, 6)
    assert len({len(p) for p in prompts}) > 5  # lengths differ, so left padding is exercised
    batched = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=64)
    one_by_one = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=1)
    assert batched == one_by_one
    assert all(answer for answer in batched)


def test_answers_come_back_in_prompt_order(aligned: tuple[Any, Any], zoo: ZooPaths) -> None:
    model, tokenizer = aligned
    prompts = _prompts(zoo, 3)
    forward = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    backward = generate(model, tokenizer, prompts[::-1], max_new_tokens=12, batch_size=4)
    assert forward == backward[::-1]
    assert generate(model, tokenizer, [], max_new_tokens=4) == []


def test_prompts_are_rendered_with_the_chat_template(aligned: tuple[Any, Any]) -> None:
    _, tokenizer = aligned
    assert render_prompt(tokenizer, "hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
