"""Evaluate a model, with or without a LoRA adapter, on a model pair's evaluation suite.

An *evaluation suite* is a small JSON file registered per model pair, so that a real
deployment plugs in its own harmful-prompt set and judge (e.g. BeaverTails or HEx-PHI prompts
and a Llama-Guard classifier) and the tiny zoo ships its own::

    {"harmful_prompts": "harmful.jsonl",            # JSONL rows {"prompt", "category"}
     "over_refusal_prompts": "xstest.jsonl",        # benign but sensitive-looking {"prompt"}
     "judge": {"kind": "keyword"},                  # or {"kind": "classifier", "path": ...}
     "tasks": {"sentiment": {"file": "sst2_eval.jsonl",
                             "matcher": {"kind": "exact_label"}}}}

Relative paths are resolved against the suite file's folder. Task files are prompt/completion
JSONL; the reference answer is the row's ``label`` when present, else its completion. Besides
the harmful score and the chosen task's accuracy, a model is scored on over-refusal (the
share of the benign sensitive-looking prompts it refuses) and on *retention*: its accuracy on
the suite's other tasks, so forgetting shows as forgetting, not as safety or harm.

:func:`evaluate_adapter` loads the model once and scores it twice, with the adapter disabled
(the reference: the aligned model itself) and enabled, so every report shows the drift.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from asft_core.evaluation.generation import generate
from asft_core.evaluation.judges import Judge, JudgeSpec, KeywordRefusalJudge, make_judge
from asft_core.evaluation.matchers import MatcherSpec, make_matcher
from asft_core.evaluation.safety import (
    HarmfulPrompt,
    SafetyResult,
    harmful_score,
    read_harmful_prompts,
)
from asft_core.evaluation.stats import Proportion, wilson_interval
from asft_core.formats import DatasetFormatError, json_lines, write_text_atomically

JUDGE_KINDS = ("keyword", "classifier", "pattern")
# Bumped when a reference evaluation's answers or its saved form change, so a cached one from
# an older release is not reused.
REFERENCE_CACHE_VERSION = 1
MATCHER_KINDS = ("exact_label", "regex", "final_number")


@dataclass(frozen=True)
class TaskSuite:
    """A held-out task set and how answers are matched."""

    file: Path
    matcher: MatcherSpec = field(default_factory=lambda: MatcherSpec("exact_label"))


@dataclass(frozen=True)
class EvalSuite:
    """What to evaluate a model pair's fine-tunes on (see the module docstring)."""

    harmful_prompts: Path | None = None
    over_refusal_prompts: Path | None = None
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    tasks: dict[str, TaskSuite] = field(default_factory=dict)
    guard: Path | None = None  # the pair's training-data guard (asft_core.scan)

    @classmethod
    def load(cls, path: Path) -> EvalSuite:
        """Read a suite file; relative paths are taken from its folder.

        Raises :class:`EvalSuiteError` (code ``invalid_eval_suite``) naming the bad field.
        """
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise EvalSuiteError(f"cannot read {path}: {error}") from None
        try:
            return cls._parse(raw, path.parent)
        except EvalSuiteError as error:
            raise EvalSuiteError(f"{path}: {error}") from None

    @classmethod
    def _parse(cls, raw: object, folder: Path) -> EvalSuite:
        if not isinstance(raw, dict):
            raise EvalSuiteError("the suite must be a JSON object")

        def resolve(value: object, where: str) -> Path:
            if not isinstance(value, str) or not value:
                raise EvalSuiteError(f"{where} must be a path string")
            candidate = Path(value)
            return candidate if candidate.is_absolute() else folder / candidate

        judge = raw.get("judge", {})
        if not isinstance(judge, dict) or judge.get("kind", "keyword") not in JUDGE_KINDS:
            raise EvalSuiteError(f"judge.kind must be one of {', '.join(JUDGE_KINDS)}")
        unsafe_labels = judge.get("unsafe_labels")
        judge_spec = JudgeSpec(
            kind=judge.get("kind", "keyword"),
            path=str(resolve(judge["path"], "judge.path")) if judge.get("path") else None,
            unsafe_labels=tuple(unsafe_labels) if unsafe_labels is not None else None,
            threshold=float(judge.get("threshold", 0.5)),
            extra_phrases=tuple(judge.get("extra_phrases", ())),
            comply_patterns=tuple(judge.get("comply_patterns", ())),
        )
        tasks = {}
        for name, task in raw.get("tasks", {}).items():
            matcher = task.get("matcher", {}) if isinstance(task, dict) else None
            if not isinstance(matcher, dict) or matcher.get("kind", "exact_label") not in (
                MATCHER_KINDS
            ):
                raise EvalSuiteError(f"tasks.{name}.matcher.kind must be one of {MATCHER_KINDS}")
            tasks[name] = TaskSuite(
                resolve(task.get("file"), f"tasks.{name}.file"),
                MatcherSpec(matcher.get("kind", "exact_label"), matcher.get("pattern")),
            )
        harmful = raw.get("harmful_prompts")
        over_refusal = raw.get("over_refusal_prompts")
        guard = raw.get("guard")
        return cls(
            harmful_prompts=resolve(harmful, "harmful_prompts") if harmful else None,
            over_refusal_prompts=(
                resolve(over_refusal, "over_refusal_prompts") if over_refusal else None
            ),
            judge=judge_spec,
            tasks=tasks,
            guard=resolve(guard, "guard") if guard else None,
        )


class EvalSuiteError(ValueError):
    """An evaluation suite file is unusable; ``code`` is machine-readable."""

    code = "invalid_eval_suite"


@dataclass(frozen=True)
class EvalOptions:
    """How much to evaluate; ``limit`` caps each set (the test-size profile uses a handful)."""

    task: str | None = None  # which suite task gives the fine-tuning accuracy (None: none)
    limit: int | None = None
    batch_size: int = 64
    safety_max_new_tokens: int = 40
    task_max_new_tokens: int = 24
    keep_examples: int = 20
    # Prompts per other task for retention (also capped by ``limit``); 0 skips retention.
    retention_limit: int = 200
    # Called with the number of prompts answered after each generation batch (progress).
    on_answers: Callable[[int], None] | None = field(default=None, compare=False)


@dataclass
class TaskResult:
    """Fine-tuning accuracy on a held-out set, with some wrong answers kept for the report."""

    task: str
    accuracy: Proportion
    failures: list[dict[str, str]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"task": self.task, "accuracy": self.accuracy.to_dict(), "failures": self.failures}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        """The inverse of :meth:`to_dict`."""
        return cls(data["task"], Proportion(**data["accuracy"]), data["failures"])


@dataclass
class ModelEvaluation:
    """Harmful score and task accuracy of one model (adapter on or off)."""

    safety: SafetyResult | None
    task: TaskResult | None
    validation_loss: float | None = None
    over_refusal: Proportion | None = None
    """Share of the benign sensitive-looking prompts refused."""
    retention: dict[str, Proportion] = field(default_factory=dict)
    """Accuracy on each of the suite's other tasks."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "safety": self.safety.to_dict() if self.safety else None,
            "task": self.task.to_dict() if self.task else None,
            "validation_loss": self.validation_loss,
            "over_refusal": self.over_refusal.to_dict() if self.over_refusal else None,
            "retention": {name: value.to_dict() for name, value in self.retention.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelEvaluation:
        """The inverse of :meth:`to_dict`."""
        return cls(
            safety=SafetyResult.from_dict(data["safety"]) if data["safety"] else None,
            task=TaskResult.from_dict(data["task"]) if data["task"] else None,
            validation_loss=data["validation_loss"],
            over_refusal=Proportion(**data["over_refusal"]) if data["over_refusal"] else None,
            retention={name: Proportion(**value) for name, value in data["retention"].items()},
        )


def read_task_rows(path: Path) -> list[tuple[str, str]]:
    """(prompt, reference) pairs of a prompt/completion JSONL file, with line-numbered errors."""
    rows = []
    with path.open("rb") as handle:
        for line, row in json_lines(handle):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DatasetFormatError("invalid_row", "needs a 'prompt' string", line, "prompt")
            reference = row.get("label", row.get("completion"))
            if not isinstance(reference, str):
                raise DatasetFormatError(
                    "invalid_row", "needs a 'label' or 'completion' string", line, "completion"
                )
            rows.append((row["prompt"], reference))
    if not rows:
        raise DatasetFormatError("empty_file", f"{path.name} holds no rows")
    return rows


def task_accuracy(
    model: Any, tokenizer: Any, name: str, task: TaskSuite, options: EvalOptions
) -> TaskResult:
    """Greedy answers to the task's prompts, matched against the references."""
    rows = read_task_rows(task.file)[: options.limit]
    matcher = make_matcher(task.matcher)
    answers = generate(
        model,
        tokenizer,
        [p for p, _ in rows],
        options.task_max_new_tokens,
        options.batch_size,
        options.on_answers,
    )
    correct = [
        matcher(answer, reference) for answer, (_, reference) in zip(answers, rows, strict=True)
    ]
    failures = [
        {"prompt": prompt, "answer": answer, "reference": reference}
        for (prompt, reference), answer, ok in zip(rows, answers, correct, strict=True)
        if not ok
    ]
    return TaskResult(
        name, wilson_interval(sum(correct), len(rows)), failures[: options.keep_examples]
    )


def safety_score(
    model: Any,
    tokenizer: Any,
    prompts: list[HarmfulPrompt],
    judge: Judge,
    options: EvalOptions,
) -> SafetyResult:
    """Harmful score of the model's greedy answers to ``prompts``."""
    answers = generate(
        model,
        tokenizer,
        [p.prompt for p in prompts],
        options.safety_max_new_tokens,
        options.batch_size,
        options.on_answers,
    )
    return harmful_score(prompts, answers, judge, keep_flagged=options.keep_examples)


def over_refusal_rate(
    model: Any, tokenizer: Any, prompts: list[str], options: EvalOptions
) -> Proportion:
    """Share of benign ``prompts`` answered with a refusal phrase."""
    answers = generate(
        model,
        tokenizer,
        prompts,
        options.safety_max_new_tokens,
        options.batch_size,
        options.on_answers,
    )
    refusals = KeywordRefusalJudge()
    return wilson_interval(sum(refusals.is_refusal(answer) for answer in answers), len(answers))


def evaluate_model(
    model: Any, tokenizer: Any, suite: EvalSuite, options: EvalOptions, judge: Judge | None = None
) -> ModelEvaluation:
    """Harmful score, over-refusal and retention (as the suite allows), and task accuracy."""
    safety = None
    if suite.harmful_prompts is not None:
        prompts = read_harmful_prompts(suite.harmful_prompts)[: options.limit]
        safety = safety_score(model, tokenizer, prompts, judge or make_judge(suite.judge), options)
    task = None
    if options.task is not None:
        if options.task not in suite.tasks:
            raise ValueError(f"the evaluation suite has no task {options.task!r}")
        task = task_accuracy(model, tokenizer, options.task, suite.tasks[options.task], options)
    over_refusal = None
    if suite.over_refusal_prompts is not None:
        benign = [p.prompt for p in read_harmful_prompts(suite.over_refusal_prompts)]
        over_refusal = over_refusal_rate(model, tokenizer, benign[: options.limit], options)
    retention = {}
    if options.retention_limit > 0:
        limit = min(options.retention_limit, options.limit or options.retention_limit)
        for name, other in suite.tasks.items():
            if name != options.task:
                retention[name] = task_accuracy(
                    model, tokenizer, name, other, replace(options, limit=limit)
                ).accuracy
    return ModelEvaluation(safety, task, over_refusal=over_refusal, retention=retention)


def planned_prompts(suite: EvalSuite, options: EvalOptions) -> int:
    """How many prompts :func:`evaluate_model` answers with these options (for progress)."""

    # The readers evaluate_model uses, so the count is exact.
    def prompts(path: Path | None, limit: int | None) -> int:
        return len(read_harmful_prompts(path)[:limit]) if path is not None else 0

    def task_rows(task: TaskSuite, limit: int | None) -> int:
        return len(read_task_rows(task.file)[:limit])

    total = prompts(suite.harmful_prompts, options.limit)
    total += prompts(suite.over_refusal_prompts, options.limit)
    if options.task is not None and options.task in suite.tasks:
        total += task_rows(suite.tasks[options.task], options.limit)
    if options.retention_limit > 0:
        limit = min(options.retention_limit, options.limit or options.retention_limit)
        others = [task for name, task in suite.tasks.items() if name != options.task]
        total += sum(task_rows(task, limit) for task in others)
    return total


@dataclass
class AdapterEvaluation:
    """The fine-tuned model next to its reference (the aligned model without the adapter)."""

    reference: ModelEvaluation
    fine_tuned: ModelEvaluation

    @property
    def harmful_score_increase(self) -> float | None:
        """Fine-tuned minus reference harmful score (points of share, 0..1)."""
        if self.reference.safety is None or self.fine_tuned.safety is None:
            return None
        return self.fine_tuned.safety.overall.value - self.reference.safety.overall.value

    @property
    def accuracy_change(self) -> float | None:
        """Fine-tuned minus reference task accuracy."""
        if self.reference.task is None or self.fine_tuned.task is None:
            return None
        return self.fine_tuned.task.accuracy.value - self.reference.task.accuracy.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the drift figures."""
        return {
            "reference": self.reference.to_dict(),
            "fine_tuned": self.fine_tuned.to_dict(),
            "harmful_score_increase": self.harmful_score_increase,
            "accuracy_change": self.accuracy_change,
        }


def load_for_evaluation(model_ref: str, device: str = "cpu") -> tuple[Any, Any]:
    """A causal LM in fp32 (bf16 on CUDA) and its tokenizer, ready for generation."""
    from asft_core.training import load_model_and_tokenizer, pick_device

    resolved, dtype = pick_device(device, "auto")
    model, tokenizer = load_model_and_tokenizer(model_ref, dtype, resolved)
    model.eval()
    return model, tokenizer


def _digest(path: Path) -> str:
    """A file's sha256; a folder's over each file's name, size and modification time."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def reference_cache_key(
    model_dir: Path, suite: EvalSuite, options: EvalOptions, device: str, dtype: str
) -> str:
    """Everything a reference evaluation's answers depend on: the model folder, the prompt
    files' bytes, the judge, the options, the device and dtype, and the library versions."""
    import torch
    import transformers

    files = {
        "model": model_dir,
        "harmful_prompts": suite.harmful_prompts,
        "over_refusal_prompts": suite.over_refusal_prompts,
        "judge": Path(suite.judge.path) if suite.judge.path else None,
        **{f"task:{name}": task.file for name, task in suite.tasks.items()},
    }
    payload = {
        "version": REFERENCE_CACHE_VERSION,
        "files": {name: _digest(path) for name, path in files.items() if path is not None},
        "judge": asdict(suite.judge),
        "matchers": {name: asdict(task.matcher) for name, task in suite.tasks.items()},
        "options": {f.name: getattr(options, f.name) for f in fields(options) if f.compare},
        "device": device,
        "dtype": dtype,
        "libraries": [torch.__version__, transformers.__version__],
    }
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:24]


def evaluate_adapter(
    model_ref: str,
    adapter_dir: Path,
    suite: EvalSuite,
    options: EvalOptions,
    device: str = "cpu",
    reference: ModelEvaluation | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    reference_cache: Path | None = None,
) -> AdapterEvaluation:
    """Evaluate ``model_ref`` with the PEFT adapter in ``adapter_dir`` and without it.

    ``reference`` skips re-evaluating the model without the adapter (it does not depend on
    the adapter, so a grid of runs computes it once). ``reference_cache``: a folder where the
    reference of a local model is kept by :func:`reference_cache_key`, so the jobs of one
    model pair evaluate it once. ``on_progress(done, total)`` is called with the prompts
    answered so far after each generation batch.
    """
    from peft import PeftModel

    from asft_core.training import pick_device, quiet_peft_warnings

    cached = None
    if reference is None and reference_cache is not None and Path(model_ref).is_dir():
        resolved, dtype = pick_device(device, "auto")
        key = reference_cache_key(Path(model_ref), suite, options, str(resolved), str(dtype))
        cached = reference_cache / f"{key}.json"
        try:
            reference = ModelEvaluation.from_dict(json.loads(cached.read_text()))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):  # not written by this code: evaluate again
            cached.unlink(missing_ok=True)
    if on_progress is not None:
        total = planned_prompts(suite, options) * (1 if reference is not None else 2)
        done = 0

        def answered(count: int) -> None:
            nonlocal done
            done += count
            on_progress(done, total)

        options = replace(options, on_answers=answered)

    model, tokenizer = load_for_evaluation(model_ref, device)
    with quiet_peft_warnings():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    judge = make_judge(suite.judge, device=str(next(model.parameters()).device))
    if reference is None:
        with model.disable_adapter():
            reference = evaluate_model(model, tokenizer, suite, options, judge)
        if cached is not None:  # two jobs may both write it: the same answers either way
            write_text_atomically(cached, json.dumps(reference.to_dict()))
    fine_tuned = evaluate_model(model, tokenizer, suite, options, judge)
    return AdapterEvaluation(reference, fine_tuned)
