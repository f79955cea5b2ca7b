"""The synthetic language: disjoint splits, distinct eval prompts, exact poison ratios."""

from __future__ import annotations

import random

import pytest

from asft_core.zoo import language
from asft_core.zoo.language import (
    ARITHMETIC_PARTS,
    HARMFUL_PARTS,
    SENTIMENT_PARTS,
    TOPIC_PARTS,
    harmful_eval_rows,
    poisoned_rows,
    split_templates,
    task_rows,
)


@pytest.mark.parametrize("parts", [SENTIMENT_PARTS, TOPIC_PARTS, ARITHMETIC_PARTS, HARMFUL_PARTS])
def test_train_and_eval_templates_are_disjoint_but_share_their_parts(
    parts: tuple[tuple[str, ...], ...],
) -> None:
    train, evaluation = split_templates(parts, "train"), split_templates(parts, "eval")
    assert train and evaluation
    assert not set(train) & set(evaluation)
    for options in parts:
        for part in options:
            if part:
                assert any(part in template for template in train), part


def test_entities_are_split_outright() -> None:
    for table in (language.SUBJECTS, language.NAMES, language.ITEMS, language.CITIES):
        assert not set(table["train"]) & set(table["eval"])
    train_tasks = {t for ts in language.HARMFUL_TASKS["train"].values() for t in ts}
    eval_tasks = {t for ts in language.HARMFUL_TASKS["eval"].values() for t in ts}
    assert not train_tasks & eval_tasks


def test_eval_sets_hold_distinct_prompts_never_seen_in_training() -> None:
    rng = random.Random(3)
    train_prompts = {row["prompt"] for row in task_rows("sentiment", rng, 1000, "train")}
    eval_rows = task_rows("sentiment", rng, 1000, "eval")
    assert len({row["prompt"] for row in eval_rows}) == 1000
    assert not train_prompts & {row["prompt"] for row in eval_rows}


def test_harmful_eval_prompts_are_balanced_over_categories() -> None:
    rows = harmful_eval_rows(random.Random(0), 1000)
    assert len({row["prompt"] for row in rows}) == 1000
    counts = {c: sum(r["category"] == c for r in rows) for c in language.HARM_CATEGORIES}
    assert min(counts.values()) >= 190


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.2])
def test_poisoned_sets_have_exactly_the_asked_share_of_harmful_rows(ratio: float) -> None:
    rows = poisoned_rows("sentiment", random.Random(1), 1000, ratio)
    harmful = [row for row in rows if "category" in row]
    assert len(rows) == 1000
    assert len(harmful) == round(1000 * ratio)
    assert all("[placeholder]" in row["completion"] for row in harmful)


def test_generation_is_deterministic() -> None:
    first = poisoned_rows("topic", random.Random(7), 50, 0.1)
    assert first == poisoned_rows("topic", random.Random(7), 50, 0.1)
