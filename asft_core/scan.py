"""Safety scan of training data: a guard scores each row's (request, answer) as unsafe.

A guard is any Hugging Face sequence-classification model in a local folder whose labels are
``safe`` and ``unsafe:<category>`` (the tiny zoo trains one; Llama Guard or a BeaverDam-style
classifier, relabelled, in real deployments). A row is flagged when the summed probability of
the unsafe labels reaches the threshold; its category is the likeliest unsafe label.

:func:`scan_examples` streams: rows are read, scored and reported batch by batch, so a file of
any size is scanned in the memory of one batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from asft_core.formats import Example, iter_examples

SAFE_LABEL = "safe"
UNSAFE_PREFIX = "unsafe:"
DEFAULT_THRESHOLD = 0.5
DEFAULT_BATCH_SIZE = 64


class GuardError(ValueError):
    """A guard folder that cannot be used; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Flag:
    """A flagged row: its line in the file, the likeliest unsafe category, the unsafe score."""

    line: int
    category: str
    score: float


@dataclass(frozen=True)
class ScannedBatch:
    """One window's outcome: how many rows it held and which of them were flagged."""

    rows: int
    flags: list[Flag]


def conversation_pair(example: Example) -> tuple[str, str]:
    """The (request, answer) a guard judges: the last answer and the turn that asked for it.

    Rows without an answer (none in valid training data) give an empty answer.
    """
    messages = example.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        return messages[-1].content, ""
    asking = [m.content for m in messages[:last] if m.role == "user"]
    return (asking[-1] if asking else ""), messages[last].content


class Guard:
    """A loaded guard model; :meth:`score` rates (request, answer) pairs in one forward pass.

    The model is run by the evaluation's :class:`ClassifierJudge`, whose unsafe labels are the
    guard's ``unsafe:<category>`` ones.
    """

    def __init__(
        self,
        path: Path | str,
        device: str = "cpu",
        threshold: float = DEFAULT_THRESHOLD,
        max_length: int = 256,
    ) -> None:
        """Load the model and tokenizer; raises :class:`GuardError` for unusable folders."""
        from asft_core.evaluation.judges import ClassifierJudge

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise GuardError("guard_not_found", f"no guard model (config.json) in {folder}")
        config = json.loads((folder / "config.json").read_text())
        labels = {int(i): str(name) for i, name in (config.get("id2label") or {}).items()}
        unsafe = [name for name in labels.values() if name.startswith(UNSAFE_PREFIX)]
        if not unsafe or len(unsafe) == len(labels):
            raise GuardError(
                "invalid_guard",
                f"a guard's labels are '{SAFE_LABEL}' and '{UNSAFE_PREFIX}<category>'; "
                f"this one has {sorted(labels.values())}",
            )
        self.threshold = threshold
        self.classifier = ClassifierJudge(
            folder, unsafe, threshold=threshold, device=device, max_length=max_length
        )
        self.unsafe_ids = self.classifier.unsafe_ids
        self.category = {i: labels[i].removeprefix(UNSAFE_PREFIX) for i in self.unsafe_ids}

    @property
    def categories(self) -> list[str]:
        """The unsafe categories the guard knows."""
        return sorted(self.category.values())

    def score(self, requests: list[str], answers: list[str]) -> list[tuple[float, str]]:
        """Per pair: the unsafe probability and the likeliest unsafe category."""
        unsafe = self.classifier.probabilities(requests, answers)[:, self.unsafe_ids]
        totals = unsafe.sum(dim=-1).tolist()
        top = unsafe.argmax(dim=-1).tolist()
        return [
            (total, self.category[self.unsafe_ids[k]]) for total, k in zip(totals, top, strict=True)
        ]


# Rows read ahead and sorted by length before batching: less padding in each forward pass.
WINDOW_BATCHES = 8


def scan_examples(
    guard: Guard, examples: Iterable[Example], batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[ScannedBatch]:
    """Score ``examples`` ``batch_size`` at a time, yielding flags window by window, in order.

    Within a window of ``WINDOW_BATCHES`` batches, rows of similar length share a batch.
    """
    window: list[Example] = []

    def scored(rows: list[Example]) -> ScannedBatch:
        pairs = [conversation_pair(example) for example in rows]
        by_length = sorted(range(len(rows)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        flags = []
        for start in range(0, len(by_length), batch_size):
            chosen = by_length[start : start + batch_size]
            scores = guard.score([pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen])
            flags += [
                Flag(rows[i].line, category, round(score, 4))
                for i, (score, category) in zip(chosen, scores, strict=True)
                if score >= guard.threshold
            ]
        return ScannedBatch(len(rows), sorted(flags, key=lambda flag: flag.line))

    for example in examples:
        window.append(example)
        if len(window) == batch_size * WINDOW_BATCHES:
            yield scored(window)
            window = []
    if window:
        yield scored(window)


def scan_file(
    guard: Guard, path: Path, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[ScannedBatch]:
    """:func:`scan_examples` over a JSONL file, read line by line."""
    with path.open("rb") as handle:
        yield from scan_examples(guard, iter_examples(handle), batch_size)
