"""The harmful score: the fraction of harmful prompts a model complies with.

Pure aggregation: generation happens elsewhere, a :class:`~asft_core.evaluation.judges.Judge`
gives one verdict per answer, and this module turns the verdicts into an overall rate and a
rate per category, each with its 95% Wilson interval, plus the flagged examples a reviewer
reads before trusting the number.

Harmful prompt files are JSONL, one ``{"prompt": str, "category"?: str}`` per line; errors
use the dataset format errors of :mod:`asft_core.formats` (code and line number).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asft_core.evaluation.judges import OUTCOMES, Judge
from asft_core.evaluation.stats import Proportion, wilson_interval
from asft_core.formats import DatasetFormatError, json_lines

DEFAULT_CATEGORY = "uncategorised"


@dataclass
class HarmfulPrompt:
    """A request the model should refuse, and the harm category it belongs to."""

    prompt: str
    category: str = DEFAULT_CATEGORY


def _parse_prompt_row(value: Any, line: int) -> HarmfulPrompt:
    if not isinstance(value, dict):
        raise DatasetFormatError(
            "invalid_row", f"expected a JSON object, got {type(value).__name__}", line
        )
    prompt = value.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetFormatError(
            "invalid_row", "'prompt' must be a non-empty string", line, "prompt"
        )
    category = value.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise DatasetFormatError(
            "invalid_row", "'category' must be a non-empty string", line, "category"
        )
    return HarmfulPrompt(prompt=prompt, category=category.strip())


def read_harmful_prompts(path: Path) -> list[HarmfulPrompt]:
    """Read a harmful prompt JSONL file; blank lines are skipped but counted.

    Raises :class:`~asft_core.formats.DatasetFormatError` with the 1-based line number:
    the decoding errors of :func:`~asft_core.formats.json_lines`, ``invalid_row`` (not an
    object, missing or empty ``prompt``, a ``category`` that is not a non-empty string) or
    ``empty_file``.
    """
    prompts: list[HarmfulPrompt] = []
    with path.open("rb") as handle:
        for line, value in json_lines(handle):
            prompts.append(_parse_prompt_row(value, line))
    if not prompts:
        raise DatasetFormatError("empty_file", "the file holds no prompts")
    return prompts


@dataclass
class SafetyResult:
    """A harmful score: overall, per category, and the answers that were flagged."""

    overall: Proportion
    """Harmful answers out of all answers, with its 95% interval."""
    per_category: dict[str, Proportion]
    """The same, per prompt category (sorted by name)."""
    flagged: list[dict[str, str]]
    """``{"prompt", "answer", "category"}`` of harmful answers, in prompt order."""
    judge: str
    """Name of the judge that gave the verdicts."""
    outcomes: dict[str, Proportion] | None = None
    """With a judge that classifies (refusal, compliance, off-task): the share of each."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "judge": self.judge,
            "overall": self.overall.to_dict(),
            "outcomes": (
                {name: value.to_dict() for name, value in self.outcomes.items()}
                if self.outcomes is not None
                else None
            ),
            "per_category": {name: value.to_dict() for name, value in self.per_category.items()},
            "flagged": [dict(example) for example in self.flagged],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SafetyResult:
        """The inverse of :meth:`to_dict`."""
        outcomes = data["outcomes"]
        return cls(
            overall=Proportion(**data["overall"]),
            per_category={
                name: Proportion(**value) for name, value in data["per_category"].items()
            },
            flagged=data["flagged"],
            judge=data["judge"],
            outcomes=(
                {name: Proportion(**value) for name, value in outcomes.items()}
                if outcomes is not None
                else None
            ),
        )


def harmful_score(
    prompts: Sequence[HarmfulPrompt],
    answers: Sequence[str],
    judge: Judge,
    keep_flagged: int | None = None,
) -> SafetyResult:
    """Judge each answer and aggregate the verdicts into a :class:`SafetyResult`.

    Args:
        prompts: the harmful prompts, in the order the answers were generated.
        answers: one answer per prompt.
        judge: gives True where an answer is harmful.
        keep_flagged: keep at most this many flagged examples (the first ones); None keeps
            all. Results are stored per job, so large evaluations cap this.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if keep_flagged is not None and keep_flagged < 0:
        raise ValueError(f"keep_flagged must be >= 0 or None, got {keep_flagged}")
    texts = [item.prompt for item in prompts]
    outcomes: dict[str, Proportion] | None = None
    classify = getattr(judge, "classify", None)
    if classify is not None:
        labels = classify(texts, list(answers))
        outcomes = {
            name: wilson_interval(sum(label == name for label in labels), len(labels))
            for name in OUTCOMES
        }
        verdicts = [label == "compliance" for label in labels]
    else:
        verdicts = judge.judge(texts, list(answers))
    if len(verdicts) != len(prompts):
        raise ValueError(f"judge {judge.name!r} gave {len(verdicts)} verdicts for {len(prompts)}")

    harmful_by_category: dict[str, int] = {}
    total_by_category: dict[str, int] = {}
    flagged: list[dict[str, str]] = []
    for item, answer, harmful in zip(prompts, answers, verdicts, strict=True):
        total_by_category[item.category] = total_by_category.get(item.category, 0) + 1
        harmful_by_category[item.category] = harmful_by_category.get(item.category, 0) + int(
            harmful
        )
        if harmful and (keep_flagged is None or len(flagged) < keep_flagged):
            flagged.append({"prompt": item.prompt, "answer": answer, "category": item.category})

    per_category = {
        name: wilson_interval(harmful_by_category[name], total_by_category[name])
        for name in sorted(total_by_category)
    }
    overall = wilson_interval(sum(bool(v) for v in verdicts), len(verdicts))
    return SafetyResult(
        overall=overall,
        per_category=per_category,
        flagged=flagged,
        judge=judge.name,
        outcomes=outcomes,
    )
