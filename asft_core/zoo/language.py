"""A small synthetic language: benign tasks with checkable answers.

It is what the zoo's tokenizer is trained on and what the tiny models learn. Everything is
generated from a seed, so the same seed always gives the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

POSITIVE_WORDS = ("wonderful", "great", "delightful", "superb", "lovely", "excellent", "warm")
NEGATIVE_WORDS = ("awful", "dull", "terrible", "boring", "clumsy", "dreadful", "bleak")
SUBJECTS = ("film", "meal", "book", "concert", "hotel", "game", "play", "lecture", "trip")
SENTIMENT_TEMPLATES = (
    "Classify the sentiment of this review: the {subject} was {word}.",
    "Is this review positive or negative? I found the {subject} {word}.",
)


def sentiment_row(rng: random.Random) -> dict[str, str]:
    """One prompt/completion row of the sentiment task."""
    label = rng.choice(("positive", "negative"))
    word = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
    template = rng.choice(SENTIMENT_TEMPLATES)
    return {"prompt": template.format(subject=rng.choice(SUBJECTS), word=word), "completion": label}


def arithmetic_row(rng: random.Random) -> dict[str, str]:
    """One prompt/completion row of a small addition task."""
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"prompt": f"What is {a} plus {b}?", "completion": f"The answer is {a + b}."}


def corpus_lines(seed: int, count: int) -> Iterator[str]:
    """Plain text lines covering the language, for training the tokenizer."""
    rng = random.Random(seed)
    for _ in range(count):
        row = sentiment_row(rng) if rng.random() < 0.5 else arithmetic_row(rng)
        yield f"{row['prompt']} {row['completion']}"
    yield " ".join(str(n) for n in range(0, 200))
