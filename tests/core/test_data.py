"""Tokenisation masks, collation and the deterministic batch order."""

from __future__ import annotations

from typing import Any

import pytest

from asft_core.data import IGNORE_INDEX, collate, epoch_batches, tokenize_example
from asft_core.formats import Example, Message
from asft_core.zoo import ZooPaths


@pytest.fixture(scope="module")
def tokenizer(zoo: ZooPaths) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo.aligned)


def conversation() -> Example:
    return Example(
        (
            Message("user", "What is 2 plus 3?"),
            Message("assistant", "The answer is 4.", trainable=False),
            Message("user", "Again?"),
            Message("assistant", "The answer is 5.", trainable=True),
        ),
        line=1,
        row_format="chat",
    )


def test_loss_only_on_trainable_assistant_tokens(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, conversation(), max_seq_len=512)
    assert not example.truncated
    # The whole sequence is exactly the chat template's rendering.
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation().messages], tokenize=False
    )
    assert tokenizer.decode(example.input_ids) == rendered
    targets = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(targets) == "The answer is 5.<|end|>\n"


def test_plain_layout_without_chat_template(tokenizer: Any) -> None:
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        example = tokenize_example(tokenizer, conversation(), max_seq_len=512)
    finally:
        tokenizer.chat_template = template
    targets = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(targets).strip() == "The answer is 5.<|end|>"
    assert tokenizer.decode(example.input_ids).startswith("User: What is 2 plus 3?")


def test_truncation_is_flagged(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, conversation(), max_seq_len=8)
    assert example.truncated and len(example.input_ids) == 8 and len(example.labels) == 8


def test_collate_pads_on_the_right(tokenizer: Any) -> None:
    short = tokenize_example(tokenizer, conversation(), max_seq_len=10)
    full = tokenize_example(tokenizer, conversation(), max_seq_len=512)
    batch = collate([short, full], pad_token_id=tokenizer.pad_token_id)
    width = len(full.input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0] * (width - 10)
    assert batch["labels"][0, 10:].eq(IGNORE_INDEX).all()


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    first = epoch_batches(10, 3, seed=1, epoch=0)
    assert first == epoch_batches(10, 3, seed=1, epoch=0)
    assert first != epoch_batches(10, 3, seed=1, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert epoch_batches(4, 2, seed=1, epoch=0, shuffle=False) == [[0, 1], [2, 3]]


def test_length_grouping_pads_less_and_keeps_every_row_once() -> None:
    lengths = [5 + (i * 37) % 90 for i in range(1000)]

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = epoch_batches(1000, 16, seed=3, epoch=2, lengths=lengths)
    plain = epoch_batches(1000, 16, seed=3, epoch=2)
    assert grouped == epoch_batches(1000, 16, seed=3, epoch=2, lengths=lengths)
    assert grouped != epoch_batches(1000, 16, seed=3, epoch=3, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert len(grouped) == len(plain)
    assert padded(grouped) < 0.8 * padded(plain)
    # Still random: batches are not in length order.
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts)
