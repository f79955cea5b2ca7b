"""The memory plan: against measured peak memory, at 7B shapes, and in a job's flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from asft_core.memory import GIB, PlanError, fitting_hyperparameters, plan_for_config
from asft_core.spec import JobSpec
from asft_core.training import TrainSpec, train
from asft_core.zoo import ZooPaths
from tests.conftest import REPO_ROOT

LLAMA_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        (256, 688, 4, 4, 2000, 4, 256),
        (512, 1376, 4, 8, 4000, 4, 256),
        (768, 2048, 6, 12, 8000, 2, 512),
    ],
    ids=["small", "medium", "large"],
)
def test_the_plan_is_within_20_percent_of_the_measured_peak(shape: tuple[int, ...]) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    probe = subprocess.run(
        [sys.executable, "-m", "tests.core.memory_probe", *map(str, shape)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    ratio = figures["measured"] / figures["planned"]
    print(f"{shape}: planned {figures['planned'] / 2**20:.0f} MiB, measured ratio {ratio:.3f}")
    assert 0.8 <= ratio <= 1.2, figures


def test_a_7b_job_plans_as_its_shapes_say() -> None:
    job = JobSpec.resolve("asft", {})  # q_proj and v_proj, batch 8 x 512 tokens
    plan = plan_for_config(LLAMA_7B, job, torch.bfloat16)
    # V: 32 layers x 2 modules x 4096 x 4096 in fp32, exactly 4 GiB; bf16 weights of 6.7B.
    assert plan.alignment == 32 * 2 * 4096 * 4096 * 4
    assert 6.7e9 * 2 < plan.weights < 6.8e9 * 2
    assert 30 * GIB < plan.total < 50 * GIB  # about 45 GB: an 80 GB card, not a 24 GB one
    checkpointed = plan_for_config(LLAMA_7B, job, torch.bfloat16, gradient_checkpointing=True)
    assert checkpointed.activations < plan.activations / 8
    assert checkpointed.total < 24 * GIB
    supervised = plan_for_config(LLAMA_7B, JobSpec.resolve("supervised", {}), torch.bfloat16)
    assert supervised.alignment == 0
    # A low-rank penalty keeps only V's top-k basis (and eigenvalues) on the device.
    low_rank = plan_for_config(
        LLAMA_7B, JobSpec.resolve("asft", {"penalty_rank": 64}), torch.bfloat16
    )
    assert low_rank.alignment == 32 * 2 * 64 * (4096 + 1) * 4


def test_a_job_that_fits_only_with_gradient_checkpointing_gets_it(tmp_path: Path) -> None:
    LLAMA_7B.save_pretrained(tmp_path)
    job = JobSpec.resolve("asft", {})
    plan, changes = fitting_hyperparameters(tmp_path, job, torch.bfloat16, 80 * GIB)
    assert changes == [] and not plan.gradient_checkpointing
    plan, changes = fitting_hyperparameters(tmp_path, job, torch.bfloat16, 24 * GIB)
    assert changes == ["gradient checkpointing on"] and plan.gradient_checkpointing
    # 17 GiB fits with V on the host too (tests/core/test_direction_storage.py); 15 does not.
    with pytest.raises(PlanError, match=r"Would fit: batch_size \d+.*V on the host\)") as refused:
        fitting_hyperparameters(tmp_path, job, torch.bfloat16, 15 * GIB)
    assert refused.value.code == "insufficient_device_memory"
    with pytest.raises(PlanError, match="use a device with more memory"):
        fitting_hyperparameters(tmp_path, job, torch.bfloat16, 12 * GIB)  # not the weights


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapter(zoo: ZooPaths, tmp_path: Path) -> None:
    rows = zoo.task_file("sentiment", "train").read_text().splitlines(keepends=True)[:16]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(rows))
    spec = TrainSpec(
        model=str(zoo.aligned),
        training_file=data,
        output_dir=tmp_path / "plain",
        job=JobSpec.resolve("supervised", {"batch_size": 4, "n_epochs": 1}),
        seed=3,
        checkpoint_each_epoch=False,
        device="cpu",
    )
    plain = train(spec)
    checkpointed = train(
        replace(spec, output_dir=tmp_path / "checkpointed", gradient_checkpointing=True)
    )
    assert plain.final_train_loss is not None
    assert checkpointed.final_train_loss == pytest.approx(plain.final_train_loss, rel=1e-5)


def test_the_plan_command_prints_the_plan_and_what_makes_a_job_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asft_core.memory import main

    LLAMA_7B.save_pretrained(tmp_path)
    assert main([str(tmp_path), "--precision", "bf16"]) == 0
    assert "GiB (weights 12.55 GiB, alignment 4.00 GiB" in capsys.readouterr().out
    assert main([str(tmp_path), "--device-memory-gb", "24", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["changes"] == ["gradient checkpointing on"] and planned["total"] < 24 * GIB
    small = ["--hyperparameter", "batch_size=2", "--hyperparameter", "max_seq_len=256"]
    assert main([str(tmp_path), *small, "--device-memory-gb", "18"]) == 0
    assert main([str(tmp_path), "--device-memory-gb", "12"]) == 1
    assert "insufficient_device_memory" in capsys.readouterr().err
    assert main([str(tmp_path), "--hyperparameter", "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_a_model_the_planner_cannot_build_still_trains_with_a_warning(
    zoo: ZooPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asft_core.memory
    from asft_core.recipe import plan_device_memory
    from asft_core.training import TrainHooks

    def unbuildable(*_: object, **__: object) -> None:
        raise NotImplementedError("custom code the meta device cannot run")

    monkeypatch.setattr(asft_core.memory, "plan_memory", unbuildable)
    events: list[tuple[str, str]] = []
    spec = TrainSpec(
        model=str(zoo.aligned), training_file=tmp_path / "t.jsonl", output_dir=tmp_path
    )
    planned = plan_device_memory(spec, None, TrainHooks(on_event=lambda *e: events.append(e)))
    assert planned == spec
    assert events == [
        (
            "warn",
            "No memory plan for this model (NotImplementedError: custom code the meta "
            "device cannot run)",
        )
    ]
