"""The job recipe: alignment -> train -> evaluate -> gate, and the validation step before it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from asft_core.checkpoints import CHAT_TEMPLATE_FILE
from asft_core.recipe import (
    JobLimitExceeded,
    Limits,
    RecipeHooks,
    RecipeSpec,
    TaskEvaluation,
    judge,
    run,
    validate,
)
from asft_core.spec import Gate, JobSpec, Report
from asft_core.training import TrainHooks, TrainSpec
from asft_core.zoo import ZooPaths


def _spec(zoo: ZooPaths, tmp_path: Path, **changes: object) -> RecipeSpec:
    train = TrainSpec(
        model=str(zoo.aligned),
        training_file=zoo.poisoned_file("sentiment", 0.1),
        output_dir=tmp_path / "run",
        job=JobSpec.resolve("asft", {"learning_rate": 1e-3, "batch_size": 8}),
        max_steps=3,
        checkpoint_each_epoch=False,
        device="cpu",
    )
    spec = RecipeSpec(
        train=train,
        base_model=str(zoo.base),
        cache_dir=tmp_path / "cache",
        eval_suite=zoo.eval_suite,
        task=TaskEvaluation(zoo.task_file("sentiment", "eval")),
        eval_limit=8,
    )
    return RecipeSpec(**{**spec.__dict__, **changes})  # type: ignore[arg-type]


def test_validate_counts_tokens_with_the_model_tokenizer(zoo: ZooPaths, tmp_path: Path) -> None:
    checked = validate(_spec(zoo, tmp_path).train)
    assert checked.training_examples == 1000
    assert checked.training_tokens > 10_000
    assert checked.total_steps == 3
    assert checked.truncated_lines == []


def test_run_trains_evaluates_and_gates(zoo: ZooPaths, tmp_path: Path) -> None:
    stages: list[str] = []
    events: list[tuple[str, str]] = []
    hooks = RecipeHooks(
        train=TrainHooks(on_event=lambda level, message: events.append((level, message))),
        on_stage=stages.append,
    )
    result = run(_spec(zoo, tmp_path), hooks)
    assert stages == ["alignment", "training", "evaluation"]
    assert result.status == "completed"
    assert result.train is not None and result.train.steps == 3
    assert result.report is not None and result.alignment is not None
    evaluation = result.report.evaluation
    for side in ("reference", "fine_tuned"):
        assert evaluation[side]["safety"]["overall"]["total"] == 8
        assert evaluation[side]["task"]["accuracy"]["total"] == 8
    verdict = result.report.gate
    assert verdict.approved == (verdict.failures == ())
    assert result.train.adapter_dir is not None
    saved = json.loads((result.train.adapter_dir / "report.json").read_text())
    assert Report.from_json(saved) == result.report
    # The serving check: a q/v LoRA on a Llama passes vLLM's rules, and the chat template
    # training used sits beside the adapter, as the served adapter reads it.
    assert result.report.serving is not None
    assert result.report.serving["vllm_loadable"] is True, result.report.serving
    assert result.report.serving["chat_template"] is True
    template = (result.train.adapter_dir / CHAT_TEMPLATE_FILE).read_text()
    assert template == AutoTokenizer.from_pretrained(str(zoo.aligned)).chat_template


def test_the_caller_can_stop_the_recipe_after_validation(zoo: ZooPaths, tmp_path: Path) -> None:
    seen: list[object] = []

    def start(validation: object) -> None:
        seen.append(validation)
        return None

    result = run(_spec(zoo, tmp_path), RecipeHooks(start=start))
    assert result.status == "stopped" and result.train is None
    assert getattr(seen[0], "total_steps", None) == 3
    assert not (tmp_path / "run").exists()
    # A job validated earlier skips validation (and gets None).
    seen.clear()
    assert run(_spec(zoo, tmp_path), RecipeHooks(start=start), validated=True).status == "stopped"
    assert seen == [None]


def test_limits_refuse_a_job_before_it_trains(zoo: ZooPaths, tmp_path: Path) -> None:
    with pytest.raises(JobLimitExceeded, match="3 steps"):
        run(_spec(zoo, tmp_path, limits=Limits(max_steps=2)))
    assert not (tmp_path / "run").exists()


def test_safelora_jobs_are_projected_after_training(zoo: ZooPaths, tmp_path: Path) -> None:
    spec = _spec(zoo, tmp_path, task=None)
    job = JobSpec.resolve("safelora", {"learning_rate": 1e-3, "safelora_num_modules": 1})
    spec = replace(spec, train=replace(spec.train, job=job))
    events: list[str] = []
    hooks = RecipeHooks(train=TrainHooks(on_event=lambda level, message: events.append(message)))
    result = run(spec, hooks)
    assert result.report is not None and result.report.safelora is not None
    assert len(result.report.safelora["projected"]) == 1
    assert any(message.startswith("Safe LoRA projected 1 of") for message in events)


def test_supervised_jobs_need_no_alignment_direction(zoo: ZooPaths, tmp_path: Path) -> None:
    spec = _spec(zoo, tmp_path)
    stages: list[str] = []
    supervised = JobSpec.resolve("supervised", {"learning_rate": 1e-3})
    spec = replace(spec, train=replace(spec.train, job=supervised), task=None)
    result = run(spec, RecipeHooks(on_stage=stages.append))
    assert stages == ["training", "evaluation"]
    assert result.alignment is None
    assert not (tmp_path / "cache").exists()


def _evaluation(before: float, after: float, categories: dict[str, float]) -> dict[str, object]:
    def cell(value: float) -> dict[str, float]:
        return {"value": value, "low": value, "high": value}

    return {
        "reference": {
            "safety": {
                "overall": cell(before),
                "per_category": {c: cell(before) for c in categories},
            }
        },
        "fine_tuned": {
            "safety": {
                "overall": cell(after),
                "per_category": {c: cell(v) for c, v in categories.items()},
            }
        },
    }


@pytest.mark.parametrize(
    ("before", "after", "categories", "failing"),
    [
        (0.0, 0.05, {"fraud": 0.05}, []),
        (0.0, 0.3, {"fraud": 0.5, "hate": 0.1}, ["overall", "fraud"]),
        (0.05, 0.18, {"fraud": 0.18}, ["overall", "fraud"]),  # under 20% but rose 13 points
    ],
)
def test_the_gate_names_failing_categories(
    before: float, after: float, categories: dict[str, float], failing: list[str]
) -> None:
    verdict = judge(_evaluation(before, after, categories), Gate(0.2, 0.1))
    failures = verdict.failures
    assert [f.split(":")[0] for f in failures] == failing
    assert verdict.approved == (not failing)
    assert all("%" in failure for failure in failures)


def test_no_safety_evaluation_means_no_gate_failure() -> None:
    verdict = judge({"reference": {"safety": None}, "fine_tuned": {"safety": None}}, Gate())
    assert verdict.approved and verdict.failures == ()
