"""The tiny zoo's guard: a sequence classifier of (request, answer) pairs on its language.

Harmful requests answered with compliance are ``unsafe:<category>``; the same requests
refused, the benign tasks, sensitive-looking benign requests answered helpfully, and harmful
requests answered off-task are ``safe``. It starts from the aligned model's weights with a new
classification head, trains on the language's train split and is measured on its held-out
eval split (other templates and entities): precision and recall of ``unsafe`` at the scan's
threshold, and how often a caught row gets its true category, written as ``guard.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asft_core.scan import DEFAULT_THRESHOLD, SAFE_LABEL, UNSAFE_PREFIX, Guard
from asft_core.zoo.language import (
    BENIGN_TASKS,
    HARM_CATEGORIES,
    Split,
    harmful_row,
    sensitive_row,
)

GUARD_LABELS = (SAFE_LABEL, *(UNSAFE_PREFIX + category for category in HARM_CATEGORIES))


@dataclass(frozen=True)
class GuardSpec:
    """How the guard is trained and measured."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 128
    eval_rows: int = 2000
    seed: int = 7


def guard_rows(rng: random.Random, count: int, split: Split) -> list[tuple[str, str, str]]:
    """``count`` (request, answer, label) rows: 40% unsafe, the rest safe of four kinds."""
    tasks = list(BENIGN_TASKS.values())
    rows = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.4:
            row = harmful_row(rng, split, comply=True)
            rows.append((row["prompt"], row["completion"], UNSAFE_PREFIX + row["category"]))
            continue
        if draw < 0.6:
            row = harmful_row(rng, split, comply=False)
        elif draw < 0.7:
            row = sensitive_row(rng, split)
        elif draw < 0.75:  # a harmful request answered with a task's answer: off-task, safe
            row = {
                **harmful_row(rng, split),
                "completion": rng.choice(tasks)(rng, split)["completion"],
            }
        else:
            row = rng.choice(tasks)(rng, split)
        rows.append((row["prompt"], row["completion"], SAFE_LABEL))
    return rows


def train_guard(
    aligned: Path,
    folder: Path,
    spec: GuardSpec,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the guard from ``aligned`` into ``folder``; returns its held-out measurement.

    ``on_step(step, loss)`` is called after each optimizer step (1-based).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head and the unused lm_head are expected
    tokenizer = AutoTokenizer.from_pretrained(str(aligned))
    model = LlamaForSequenceClassification.from_pretrained(
        str(aligned),
        num_labels=len(GUARD_LABELS),
        id2label=dict(enumerate(GUARD_LABELS)),
        label2id={label: i for i, label in enumerate(GUARD_LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    rows = guard_rows(random.Random(spec.seed), spec.steps * spec.batch_size, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / max(spec.steps, 1)
    )
    model.train()
    for step in range(spec.steps):
        batch = rows[step * spec.batch_size : (step + 1) * spec.batch_size]
        encoded = tokenizer(
            [r[0] for r in batch],
            [r[1] for r in batch],
            padding=True,
            truncation=True,
            max_length=spec.max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([GUARD_LABELS.index(r[2]) for r in batch])
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    measured = measure_guard(
        Guard(folder), guard_rows(random.Random(spec.seed + 1), spec.eval_rows, "eval")
    )
    report = {"spec": asdict(spec), "threshold": DEFAULT_THRESHOLD, "held_out": measured}
    (folder / "guard.json").write_text(json.dumps(report, indent=2))
    return report


def measure_guard(
    guard: Guard, rows: list[tuple[str, str, str]], batch_size: int = 128
) -> dict[str, Any]:
    """Precision and recall of ``unsafe`` on labelled rows, and the category accuracy."""
    true_positive = false_positive = false_negative = right_category = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        scores = guard.score([r[0] for r in batch], [r[1] for r in batch])
        for (_, _, label), (score, category) in zip(batch, scores, strict=True):
            flagged, unsafe = score >= guard.threshold, label != SAFE_LABEL
            true_positive += flagged and unsafe
            false_positive += flagged and not unsafe
            false_negative += unsafe and not flagged
            right_category += flagged and unsafe and label == UNSAFE_PREFIX + category
    return {
        "rows": len(rows),
        "unsafe_rows": true_positive + false_negative,
        "true_positives": true_positive,
        "false_positives": false_positive,
        "false_negatives": false_negative,
        "precision": true_positive / max(true_positive + false_positive, 1),
        "recall": true_positive / max(true_positive + false_negative, 1),
        "category_accuracy": right_category / max(true_positive, 1),
    }
