"""Dataset format rules for fine-tuning files (stdlib only).

The API validates uploads with these rules, the CLI validates before uploading, and the
trainer reads rows through them, so all three agree on what a valid file is and report the
same line numbers. Nothing here imports torch.

Accepted JSONL rows (one JSON object per line; blank lines are skipped):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str,
  "weight"?: 0|1}, ...]}`` (OpenAI's format). Loss is taken on assistant messages whose
  ``weight`` is not 0; at least one such message is required.
- prompt/completion: ``{"prompt": str, "completion": str}``.
- instruction: ``{"instruction": str, "input"?: str, "output": str}`` (Alpaca style).

Every row is normalised to a list of :class:`Message`, so the rest of the system only knows
chat messages. A file must use one format throughout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RowFormat = Literal["chat", "prompt_completion", "instruction"]
ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 1_000_000


class DatasetFormatError(ValueError):
    """A fine-tuning file broke a format rule.

    Attributes:
        code: machine-readable reason (``invalid_json``, ``invalid_row``, ...).
        line: 1-based line number in the file, or None for whole-file problems.
        param: the offending field, when there is one.
    """

    def __init__(
        self, code: str, message: str, line: int | None = None, param: str | None = None
    ) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{message}")
        self.code = code
        self.line = line
        self.param = param
        self.detail = message


@dataclass(frozen=True)
class Message:
    """One chat turn. ``trainable`` marks assistant turns whose tokens carry the loss."""

    role: str
    content: str
    trainable: bool = False


@dataclass(frozen=True)
class Example:
    """A normalised training row: chat messages plus where it came from."""

    messages: tuple[Message, ...]
    line: int
    row_format: RowFormat


@dataclass
class DatasetSummary:
    """What validating a whole file found."""

    row_format: RowFormat | None = None
    num_examples: int = 0
    num_trainable_messages: int = 0
    characters: int = 0
    warnings: list[str] = field(default_factory=list)


def detect_format(row: dict[str, Any], line: int) -> RowFormat:
    """Return the row's format from its keys, or raise ``unknown_format``."""
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "instruction" in row or "output" in row:
        return "instruction"
    keys = ", ".join(sorted(row)) or "none"
    raise DatasetFormatError(
        "unknown_format",
        "row has none of the keys 'messages', 'prompt'/'completion' or "
        f"'instruction'/'output' (keys: {keys})",
        line,
    )


def _require_str(row: dict[str, Any], key: str, line: int, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        kind = "missing" if key not in row else f"a {type(value).__name__}, not a string"
        raise DatasetFormatError("invalid_row", f"'{key}' is {kind}", line, key)
    if not allow_empty and not value.strip():
        raise DatasetFormatError("empty_content", f"'{key}' is empty", line, key)
    return value


def _chat_messages(row: dict[str, Any], line: int) -> tuple[Message, ...]:
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise DatasetFormatError(
            "invalid_row", "'messages' must be a non-empty list", line, "messages"
        )
    messages: list[Message] = []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise DatasetFormatError("invalid_row", f"{param} is not an object", line, param)
        role = item.get("role")
        if role not in ROLES:
            raise DatasetFormatError(
                "invalid_role",
                f"{param}.role is {role!r}; expected one of {', '.join(ROLES)}",
                line,
                f"{param}.role",
            )
        content = item.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DatasetFormatError(
                "empty_content", f"{param}.content must be a non-empty string", line, param
            )
        weight = item.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DatasetFormatError(
                "invalid_row", f"{param}.weight must be 0 or 1", line, f"{param}.weight"
            )
        messages.append(Message(role, content, trainable=role == "assistant" and weight == 1))
    if not any(m.trainable for m in messages):
        raise DatasetFormatError(
            "missing_assistant",
            "no assistant message to train on (all are absent or have weight 0)",
            line,
            "messages",
        )
    if messages[-1].role != "assistant":
        raise DatasetFormatError(
            "invalid_row", "the last message must be the assistant's", line, "messages"
        )
    return tuple(messages)


def parse_row(row: Any, line: int) -> Example:
    """Validate one decoded JSON value and normalise it to chat messages."""
    if not isinstance(row, dict):
        raise DatasetFormatError(
            "invalid_row", f"expected a JSON object, got {type(row).__name__}", line
        )
    row_format = detect_format(row, line)
    if row_format == "chat":
        messages = _chat_messages(row, line)
    elif row_format == "prompt_completion":
        prompt = _require_str(row, "prompt", line)
        completion = _require_str(row, "completion", line)
        messages = (Message("user", prompt), Message("assistant", completion, True))
    else:
        instruction = _require_str(row, "instruction", line)
        extra = row.get("input", "")
        if not isinstance(extra, str):
            raise DatasetFormatError("invalid_row", "'input' must be a string", line, "input")
        output = _require_str(row, "output", line)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = (Message("user", user), Message("assistant", output, True))
    return Example(messages, line, row_format)


def json_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) for each non-blank JSONL line.

    The one decoder of every JSONL file the service reads (training rows, harmful prompts,
    task sets). Raises :class:`DatasetFormatError` with the line: ``line_too_long``,
    ``invalid_encoding``, ``invalid_json``.
    """
    for number, text in enumerate(lines, start=1):
        if number == 1:
            # Editors on Windows often start UTF-8 files with a byte-order mark.
            if isinstance(text, bytes):
                text = text.removeprefix(b"\xef\xbb\xbf")
            else:
                text = text.removeprefix("\ufeff")
        if isinstance(text, bytes):
            if len(text) > MAX_LINE_BYTES:
                raise DatasetFormatError(
                    "line_too_long", f"line is longer than {MAX_LINE_BYTES} bytes", number
                )
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DatasetFormatError(
                    "invalid_encoding", f"not UTF-8: {error}", number
                ) from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetFormatError("invalid_json", f"invalid JSON: {error.msg}", number) from None
        except RecursionError:
            raise DatasetFormatError(
                "invalid_json", "invalid JSON: nested too deeply", number
            ) from None
        yield number, value


def iter_examples(lines: Iterable[str | bytes]) -> Iterator[Example]:
    """Yield normalised examples from JSONL lines, enforcing one format per file."""
    first_format: RowFormat | None = None
    for number, value in json_lines(lines):
        example = parse_row(value, number)
        if first_format is None:
            first_format = example.row_format
        elif example.row_format != first_format:
            raise DatasetFormatError(
                "mixed_formats",
                f"row is {example.row_format} but the file started as {first_format}",
                number,
            )
        yield example


def read_examples(path: Path) -> list[Example]:
    """Read and validate a whole JSONL file; raises on the first bad line or an empty file."""
    with path.open("rb") as handle:
        examples = list(iter_examples(handle))
    if not examples:
        raise DatasetFormatError("empty_file", "the file holds no examples")
    return examples


def validate_file(path: Path) -> DatasetSummary:
    """Validate a JSONL file without keeping its rows; returns counts for reporting."""
    summary = DatasetSummary()
    with path.open("rb") as handle:
        for example in iter_examples(handle):
            summary.row_format = example.row_format
            summary.num_examples += 1
            summary.num_trainable_messages += sum(m.trainable for m in example.messages)
            summary.characters += sum(len(m.content) for m in example.messages)
    if summary.num_examples == 0:
        raise DatasetFormatError("empty_file", "the file holds no examples")
    return summary


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file beside it, renamed over
    it; each writer its own), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
