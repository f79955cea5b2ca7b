"""Tokenisation with answer masks, and deterministic batching.

Rows arrive as chat messages (see :mod:`asft_core.formats`). They are rendered with the
tokenizer's chat template when it has one, and the loss is put only on the tokens of the
assistant turns that are marked trainable. Truncation is reported, never silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asft_core.formats import DatasetFormatError, Example, Message

IGNORE_INDEX = -100
# Batches per length-sorted window: wide enough that a batch pads little, narrow enough
# that consecutive steps still see different lengths.
LENGTH_GROUP_BATCHES = 32


@dataclass(frozen=True)
class TokenizedExample:
    """One row as token ids; ``labels`` is IGNORE_INDEX wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    line: int
    truncated: bool

    @property
    def num_target_tokens(self) -> int:
        """How many tokens carry the loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TokenizedDataset:
    """Tokenised rows plus what happened on the way (for events and reports)."""

    examples: list[TokenizedExample]
    truncated_lines: list[int] = field(default_factory=list)
    dropped_lines: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens in one pass over the data (padding excluded)."""
        return sum(self.lengths)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each row, in order."""
        return [len(example.input_ids) for example in self.examples]


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_segments(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Split a conversation into text segments, each marked with whether it carries loss.

    With a chat template, each assistant turn's text is found as the difference between
    rendering the conversation up to it with a generation prompt and rendering it with the
    turn included; this needs the template to render a conversation as a prefix of any
    longer one, which is checked. Without a template, a plain "User:/Assistant:" layout is
    used and the EOS token ends each answer.
    """
    if getattr(tokenizer, "chat_template", None):
        segments: list[tuple[str, bool]] = []
        rendered = ""
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            head = tokenizer.apply_chat_template(
                _as_dicts(messages[:index]), tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(
                _as_dicts(messages[: index + 1]), tokenize=False, add_generation_prompt=False
            )
            if not head.startswith(rendered) or not full.startswith(head):
                raise DatasetFormatError(
                    "unsupported_chat_template",
                    "the model's chat template does not render conversations as prefixes "
                    "of each other, so answer tokens cannot be located",
                )
            segments.append((head[len(rendered) :], False))
            segments.append((full[len(head) :], message.trainable))
            rendered = full
        return segments
    eos = tokenizer.eos_token or ""
    segments = []
    for message in messages:
        if message.role == "assistant":
            segments.append(("Assistant: ", False))
            segments.append((message.content + eos + "\n", message.trainable))
        else:
            segments.append((f"{message.role.capitalize()}: {message.content}\n", False))
    return segments


def generation_prompt(
    tokenizer: Any, messages: Sequence[Message], chat_template: str | None = None
) -> str:
    """The text a model answers after ``messages``, rendered exactly as training renders them.

    With a chat template (``chat_template``, else the tokenizer's): the template with a
    generation prompt. Without one: the plain layout of :func:`render_segments` followed by
    ``"Assistant: "``.
    """
    if chat_template or getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            _as_dicts(messages),
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return text
    body = "".join(text for text, _ in render_segments(tokenizer, messages))
    return body + "Assistant: "


def tokenize_example(tokenizer: Any, example: Example, max_seq_len: int) -> TokenizedExample:
    """Token ids and labels for one row, truncated on the right to ``max_seq_len``."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in render_segments(tokenizer, example.messages):
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trainable else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_seq_len
    return TokenizedExample(input_ids[:max_seq_len], labels[:max_seq_len], example.line, truncated)


def tokenize_dataset(
    tokenizer: Any, examples: Sequence[Example], max_seq_len: int
) -> TokenizedDataset:
    """Tokenise every row; rows left without any target token after truncation are dropped."""
    dataset = TokenizedDataset(examples=[])
    for example in examples:
        tokenized = tokenize_example(tokenizer, example, max_seq_len)
        if tokenized.truncated:
            dataset.truncated_lines.append(example.line)
        if tokenized.num_target_tokens == 0:
            dataset.dropped_lines.append(example.line)
            continue
        dataset.examples.append(tokenized)
    return dataset


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training.

    Returns ``input_ids``, ``labels`` and ``attention_mask``, each (batch, longest_row).
    """
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def epoch_batches(
    num_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """Row indices of each batch of one epoch.

    The order depends only on (seed, epoch), never on global RNG state, so a run resumed
    mid-epoch sees exactly the batches the uninterrupted run would have seen. With
    ``lengths`` (tokens per row) and ``shuffle``, rows are grouped by length: the shuffled
    order is cut into windows of ``LENGTH_GROUP_BATCHES`` batches, each window sorted by
    length, and the batches shuffled again, so a batch pads little but stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if shuffle:
        order = torch.randperm(num_examples, generator=generator).tolist()
    else:
        order = list(range(num_examples))
    if not shuffle or lengths is None:
        return [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, num_examples, window):
        rows = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def steps_per_epoch(num_examples: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch (a last, smaller accumulation group still counts)."""
    return math.ceil(math.ceil(num_examples / batch_size) / gradient_accumulation_steps)
