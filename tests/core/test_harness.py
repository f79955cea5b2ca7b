"""The evaluation harness: suites, task files, and an adapter measured against its reference."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from asft_core.evaluation.harness import (
    EvalOptions,
    EvalSuite,
    EvalSuiteError,
    TaskSuite,
    evaluate_adapter,
    evaluate_model,
    load_for_evaluation,
    read_task_rows,
)
from asft_core.formats import DatasetFormatError
from asft_core.spec import JobSpec
from asft_core.training import TrainSpec, train
from asft_core.zoo import ZooPaths


def test_the_zoo_suite_loads_with_paths_resolved(zoo: ZooPaths) -> None:
    suite = EvalSuite.load(zoo.eval_suite)
    assert suite.harmful_prompts == zoo.datasets / "harmful_eval.jsonl"
    assert suite.harmful_prompts.exists()
    assert suite.over_refusal_prompts == zoo.over_refusal
    assert suite.over_refusal_prompts.exists()
    assert suite.judge.kind == "pattern"
    assert suite.judge.comply_patterns
    assert set(suite.tasks) == {"sentiment", "topic", "arithmetic", "triage"}
    assert suite.tasks["arithmetic"].matcher.kind == "final_number"
    assert all(task.file.exists() for task in suite.tasks.values())


def test_a_classifier_judge_path_is_resolved_against_the_suite(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    path.write_text(
        json.dumps({"judge": {"kind": "classifier", "path": "guard", "threshold": 0.7}})
    )
    suite = EvalSuite.load(path)
    assert suite.judge.path == str(tmp_path / "guard")
    assert suite.judge.threshold == 0.7
    assert suite.harmful_prompts is None


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"judge": {"kind": "oracle"}}),
        json.dumps({"tasks": {"t": {"file": 3}}}),
        json.dumps({"tasks": {"t": {"file": "t.jsonl", "matcher": {"kind": "vibes"}}}}),
    ],
)
def test_bad_suites_raise_a_coded_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "suite.json"
    path.write_text(content)
    with pytest.raises(EvalSuiteError) as caught:
        EvalSuite.load(path)
    assert caught.value.code == "invalid_eval_suite"
    assert str(path) in str(caught.value)  # which file, whichever rule it broke


def test_task_rows_use_the_label_and_report_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "x. The answer is 4.", "label": "4"})
        + "\n\n"
        + json.dumps({"prompt": "b", "completion": "no"})
        + "\n"
    )
    assert read_task_rows(path) == [("a", "4"), ("b", "no")]
    path.write_text(json.dumps({"prompt": "a", "completion": "x"}) + "\n{oops\n")
    with pytest.raises(DatasetFormatError) as caught:
        read_task_rows(path)
    assert (caught.value.code, caught.value.line) == ("invalid_json", 2)


def test_evaluate_model_scores_harm_and_accuracy(zoo: ZooPaths) -> None:
    model, tokenizer = load_for_evaluation(str(zoo.aligned))
    suite = EvalSuite.load(zoo.eval_suite)
    result = evaluate_model(model, tokenizer, suite, EvalOptions(task="sentiment", limit=10))
    assert result.safety is not None and result.task is not None
    assert result.safety.overall.total == 10
    assert result.task.accuracy.total == 10
    assert result.safety.overall.low <= result.safety.overall.value <= result.safety.overall.high
    with pytest.raises(ValueError, match="no task"):
        evaluate_model(model, tokenizer, suite, EvalOptions(task="poetry", limit=2))


def test_an_adapter_is_reported_next_to_its_reference(
    zoo: ZooPaths, alignment_artifact: Path, tmp_path: Path
) -> None:
    result = train(
        TrainSpec(
            model=str(zoo.aligned),
            training_file=zoo.poisoned_file("sentiment", 0.2),
            output_dir=tmp_path,
            job=JobSpec.resolve("supervised", {"learning_rate": 5e-3}),
            max_steps=4,
            checkpoint_each_epoch=False,
        )
    )
    assert result.adapter_dir is not None
    suite = EvalSuite.load(zoo.eval_suite)
    options = EvalOptions(task="sentiment", limit=8, batch_size=4)
    progress: list[tuple[int, int]] = []
    report = evaluate_adapter(
        str(zoo.aligned),
        result.adapter_dir,
        suite,
        options,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    # Per batch, rising to exactly the planned prompts: with and without the adapter, 8 each
    # of harmful, task and over-refusal prompts and of the 3 other tasks (retention).
    assert progress[-1] == (2 * 8 * 6, 2 * 8 * 6)
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})
    assert len(progress) == 2 * 6 * 2  # 8 prompts in batches of 4, per set
    model, tokenizer = load_for_evaluation(str(zoo.aligned))
    plain = evaluate_model(model, tokenizer, suite, options)
    # The reference is the aligned model itself: the adapter switched off.
    assert plain.safety is not None and report.reference.safety is not None
    assert report.reference.safety.overall == plain.safety.overall
    assert report.harmful_score_increase == pytest.approx(
        report.fine_tuned.safety.overall.value - plain.safety.overall.value  # type: ignore[union-attr]
    )
    assert set(report.to_dict()) >= {"reference", "fine_tuned", "accuracy_change"}


def test_a_models_reference_is_evaluated_once_per_suite_and_options(
    zoo: ZooPaths, tmp_path: Path
) -> None:
    result = train(
        TrainSpec(
            model=str(zoo.aligned),
            training_file=zoo.poisoned_file("sentiment", 0.2),
            output_dir=tmp_path / "run",
            job=JobSpec.resolve("supervised", {"learning_rate": 5e-3}),
            max_steps=2,
            checkpoint_each_epoch=False,
        )
    )
    assert result.adapter_dir is not None
    task = tmp_path / "task.jsonl"
    task.write_bytes(zoo.task_file("sentiment", "eval").read_bytes())
    # As a job evaluates: its own task file beside the suite's prompts.
    loaded = EvalSuite.load(zoo.eval_suite)
    suite = replace(loaded, tasks={"job": TaskSuite(task, loaded.tasks["sentiment"].matcher)})
    cache = tmp_path / "references"

    def evaluate(limit: int = 4) -> tuple[dict[str, object], int]:
        options = EvalOptions(task="job", limit=limit, batch_size=4)
        totals: list[int] = []
        report = evaluate_adapter(
            str(zoo.aligned),
            result.adapter_dir,  # type: ignore[arg-type]
            suite,
            options,
            on_progress=lambda _, total: totals.append(total),
            reference_cache=cache,
        )
        return report.reference.to_dict(), totals[-1]

    first, first_total = evaluate()
    [stored] = cache.glob("*.json")
    assert json.loads(stored.read_text()) == first  # the reference, exactly as reported
    # Read back, not recomputed: a mark put in the stored file comes back, and only the
    # fine-tuned model's prompts are answered.
    marked = {**first, "validation_loss": 1.5}
    stored.write_text(json.dumps(marked))
    second, second_total = evaluate()
    assert second == marked
    assert second_total * 2 == first_total
    # A file that is not a reference (edited by hand, an older layout) is evaluated again.
    stored.write_text('{"safety": 1}')
    assert evaluate() == (first, first_total)
    assert json.loads(stored.read_text()) == first
    # Other prompts (the job's task file rewritten) or other options: another reference.
    task.write_text("".join(zoo.task_file("sentiment", "eval").read_text().splitlines(True)[4:]))
    evaluate()
    evaluate(limit=3)
    assert len(list(cache.glob("*.json"))) == 3
