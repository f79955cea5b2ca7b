"""The CLI's pure parts: request bodies, progress lines, summaries, exit codes, key lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from asft.cli import build_parser
from asft_client.cli import (
    CliError,
    ExitCode,
    api_key_from_environment,
    default_model_id,
    evaluation_text,
    exit_code_for,
    job_request,
    progress_text,
    summary_lines,
)
from asft_core.spec import DEFAULT_METHOD


def parse(*argv: str) -> object:
    return build_parser().parse_args(list(argv))


def test_job_request_carries_every_option_under_the_method() -> None:
    args = parse(
        "jobs",
        "create",
        "--model",
        "m",
        "--training-file",
        "file-1",
        "--method",
        "asft",
        "--lambda",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-4",
        "--rank",
        "16",
        "--hyperparameter",
        "alpha=64",
        "--hyperparameter",
        'target_modules=["q_proj"]',
        "--hyperparameter",
        "note=text",
        "--suffix",
        "s",
        "--seed",
        "7",
        "--matcher",
        "regex",
        "--pattern",
        "^a",
    )
    body = job_request(args, "file-1", "file-2")  # type: ignore[arg-type]
    assert body == {
        "model": "m",
        "training_file": "file-1",
        "validation_file": "file-2",
        "suffix": "s",
        "seed": 7,
        "method": {
            "type": "asft",
            "asft": {
                "hyperparameters": {
                    "lambda": 2.0,
                    "n_epochs": 3,
                    "batch_size": 4,
                    "learning_rate": 1e-4,
                    "rank": 16,
                    "alpha": 64,
                    "target_modules": ["q_proj"],
                    "note": "text",
                }
            },
        },
        "evaluation": {"matcher": "regex", "pattern": "^a"},
    }


def test_job_request_defaults_are_the_servers() -> None:
    args = parse("jobs", "create", "--model", "m", "--training-file", "f")
    body = job_request(args, "f", None)  # type: ignore[arg-type]
    assert body == {
        "model": "m",
        "training_file": "f",
        "method": {"type": DEFAULT_METHOD, DEFAULT_METHOD: {"hyperparameters": {}}},
    }


def test_a_malformed_hyperparameter_is_a_cli_error() -> None:
    args = parse("jobs", "create", "--model", "m", "--training-file", "f", "--hyperparameter", "x")
    with pytest.raises(CliError, match="NAME=VALUE"):
        job_request(args, "f", None)  # type: ignore[arg-type]


def test_progress_text_shows_steps_loss_penalty_and_eta() -> None:
    metrics = {"step": 30, "total_steps": 120, "train_loss": 0.5, "penalty": 0.002}
    text = progress_text(metrics, started=(100.0, 10), now=110.0)
    # 20 steps in 10 s: 90 steps left take 45 s.
    assert text == "[######..................] 30/120 loss 0.5000 penalty 2.000e-03 eta 45s"
    assert "eta" not in progress_text(metrics, started=None, now=110.0)
    assert "penalty" not in progress_text({**metrics, "penalty": 0.0}, None, 0.0)


def test_summary_and_exit_codes_follow_the_outcome() -> None:
    cell = {"value": 0.25, "low": 0.1, "high": 0.4}
    report = {
        "approved": False,
        "report": {
            "evaluation": {
                "reference": {"safety": {"overall": {**cell, "value": 0.0}}},
                "fine_tuned": {"safety": {"overall": cell}, "task": {"accuracy": cell}},
            }
        },
    }
    gated = {
        "id": "ftjob-1",
        "status": "failed",
        "error": {"code": "safety_gate_failed", "message": "the adapter failed the gate"},
        "fine_tuned_model": "ft:m:t:x",
    }
    lines = summary_lines(gated, report)
    assert lines[0] == "ftjob-1: failed"
    assert "(safety_gate_failed)" in lines[1]
    assert any("harmful score 25.0% [10.0, 40.0]" in line for line in lines)
    assert "  safety gate: FAILED" in lines
    assert exit_code_for(gated) == ExitCode.GATE_FAILED
    assert exit_code_for({**gated, "error": {"code": "out_of_memory"}}) == ExitCode.JOB_FAILED
    assert exit_code_for({"status": "cancelled", "error": None}) == ExitCode.JOB_FAILED
    assert exit_code_for({"status": "succeeded", "error": None}) == ExitCode.OK


def test_the_key_comes_from_the_environment_then_the_embedded_key_file(tmp_path: Path) -> None:
    assert api_key_from_environment({"ASFT_API_KEY": " sk-1 \n"}) == "sk-1"
    (tmp_path / "api-key").write_text("sk-embedded\n")
    assert api_key_from_environment({"ASFT_DATA_DIR": str(tmp_path)}) == "sk-embedded"
    with pytest.raises(CliError, match="ASFT_API_KEY"):
        api_key_from_environment({"ASFT_DATA_DIR": str(tmp_path / "none")})


@pytest.mark.parametrize(
    ("aligned", "expected"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7b-chat-hf"),
        ("/models/tiny chat/", "tiny-chat"),
        ("..", "model"),
    ],
)
def test_default_model_id(aligned: str, expected: str) -> None:
    assert default_model_id(aligned) == expected


def test_evaluation_text_shows_prompts_and_the_jobs_finish() -> None:
    data = {"prompts_done": 1200, "prompts_total": 2600}
    assert evaluation_text(data, {"estimated_finish": 1040}, 1000.0) == "1200/2600 prompts eta 40s"
    # A finish time already passed reads 0s, never a negative wait.
    assert evaluation_text(data, {"estimated_finish": 990}, 1000.0).endswith("eta 0s")
    assert evaluation_text(data, {"estimated_finish": None}, 1000.0) == "1200/2600 prompts"
