"""The training loop on the tiny zoo model: methods, hooks, checkpoints and exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from asft_core.checkpoints import STATE_FILE
from asft_core.penalty import asft_penalty
from asft_core.recipe import post_hoc_projection
from asft_core.spec import HYPERPARAMETER_NAMES, JobSpec, SpecError, json_name
from asft_core.training import (
    StepMetrics,
    TrainHooks,
    TrainingError,
    TrainSpec,
    adapter_validation_loss,
    check_device,
    native_bf16,
    pick_device,
    train,
)
from asft_core.zoo import ZooPaths


@pytest.fixture(scope="module")
def train_file(zoo: ZooPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows of the zoo's sentiment set with 10% harmful rows."""
    rows = zoo.poisoned_file("sentiment", 0.1).read_text().splitlines(keepends=True)[:40]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(rows))
    return path


def make_spec(
    zoo: ZooPaths, train_file: Path, out: Path, artifact: Path, **changes: Any
) -> TrainSpec:
    """``changes``: the method, hyperparameters (``lambda_`` for lambda) and TrainSpec fields."""
    hyper = {"learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 2}
    hyper["n_epochs"] = 2
    for name in list(changes):
        if json_name(name) in HYPERPARAMETER_NAMES:
            hyper[json_name(name)] = changes.pop(name)
    spec = TrainSpec(
        model=str(zoo.aligned),
        training_file=train_file,
        output_dir=out,
        job=JobSpec.resolve(changes.pop("method", "asft"), hyper),
        alignment_path=artifact,
        seed=7,
        checkpoint_each_epoch=False,
    )
    return replace(spec, **changes)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_weights_change_and_base_weights_do_not(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        zoo,
        train_file,
        tmp_path,
        alignment_artifact,
        method="supervised",
        max_steps=3,
        base_model_id="tiny-aligned",
    )
    seen: list[StepMetrics] = []
    result = train(spec, TrainHooks(on_metrics=seen.append))
    assert result.status == "completed" and result.steps == 3
    assert [m.step for m in seen] == [1, 2, 3]
    assert all(m.penalty == 0.0 and m.train_loss > 0 and m.tokens > 0 for m in seen)
    tensors = adapter_tensors(result.adapter_dir)  # type: ignore[arg-type]
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "LoRA B left at its zero init"
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())  # type: ignore[operator]
    assert config["base_model_name_or_path"] == "tiny-aligned"
    # The base checkpoint on disk is untouched, and so are the frozen weights in memory.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(zoo.aligned)
    original = load_file(str(zoo.aligned / "model.safetensors"))
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, original[name])


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    # 40 rows / batch 4 / accumulation 2 = 5 steps per epoch; stopping after 3 is mid-epoch.
    straight = train(make_spec(zoo, train_file, tmp_path / "straight", alignment_artifact))
    assert straight.total_steps == 10

    steps_done: list[int] = []
    interrupted = train(
        make_spec(zoo, train_file, tmp_path / "interrupted", alignment_artifact),
        TrainHooks(
            on_metrics=lambda m: steps_done.append(m.step),
            should_cancel=lambda: len(steps_done) >= 3,
        ),
    )
    assert interrupted.status == "cancelled" and interrupted.steps == 3
    checkpoint = interrupted.checkpoints[-1]
    assert checkpoint.step == 3
    # A checkpoint holds only safetensors, JSON, peft's model card and the chat template:
    # nothing that unpickles.
    suffixes = {p.suffix for p in checkpoint.path.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".md", ".jinja"}
    assert {".safetensors", ".json"} <= suffixes
    # As if written on a host with four GPUs in the earlier format (one RNG state per GPU,
    # by index): this host, with none, resumes from it all the same.
    state_file = checkpoint.path / STATE_FILE
    tensors = load_file(str(state_file))
    tensors.update({f"rng.cuda.{index}": torch.zeros(16, dtype=torch.uint8) for index in range(4)})
    save_file(tensors, str(state_file))

    resumed = train(
        make_spec(
            zoo, train_file, tmp_path / "resumed", alignment_artifact, resume_from=checkpoint.path
        )
    )
    assert resumed.status == "completed" and resumed.steps == 10
    expected = adapter_tensors(straight.adapter_dir)  # type: ignore[arg-type]
    actual = adapter_tensors(resumed.adapter_dir)  # type: ignore[arg-type]
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.slow
def test_bf16_base_weights_train_resume_bit_identically_and_match_fp32(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    def spec(name: str, precision: str, **changes: Any) -> TrainSpec:
        made = make_spec(zoo, train_file, tmp_path / name, alignment_artifact, **changes)
        return replace(made, device="cpu", precision=precision)  # type: ignore[arg-type]

    events: list[str] = []
    straight = train(spec("straight", "bf16"), TrainHooks(on_event=lambda _, m: events.append(m)))
    assert "Training on cpu, base weights in bfloat16" in events
    steps: list[int] = []
    interrupted = train(
        spec("interrupted", "bf16"),
        TrainHooks(
            on_metrics=lambda m: steps.append(m.step), should_cancel=lambda: len(steps) >= 3
        ),
    )
    resumed = train(spec("resumed", "bf16", resume_from=interrupted.checkpoints[-1].path))
    expected = adapter_tensors(straight.adapter_dir)  # type: ignore[arg-type]
    actual = adapter_tensors(resumed.adapter_dir)  # type: ignore[arg-type]
    for name in expected:
        assert expected[name].dtype == torch.float32  # LoRA weights stay fp32
        assert torch.equal(expected[name], actual[name]), name
    full = train(spec("fp32", "fp32"))
    assert straight.final_train_loss is not None and full.final_train_loss is not None
    assert straight.final_train_loss == pytest.approx(full.final_train_loss, rel=0.05)


def test_checkpoints_carry_the_validation_loss_of_their_weights(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    valid = tmp_path / "valid.jsonl"
    rows = zoo.poisoned_file("sentiment", 0.0).read_text().splitlines(keepends=True)
    valid.write_text("".join(rows[-12:]))
    spec = make_spec(
        zoo,
        train_file,
        tmp_path / "out",
        alignment_artifact,
        method="supervised",
        validation_file=valid,
        checkpoint_every_steps=2,
        max_steps=4,
    )
    result = train(spec)
    losses = [info.full_valid_loss for info in result.checkpoints]
    assert [info.step for info in result.checkpoints] == [2, 4]
    assert all(loss is not None and loss > 0 for loss in losses)
    assert losses[0] != losses[1]
    # The last checkpoint holds the final weights: its loss is the final adapter's.
    final = adapter_validation_loss(spec, result.adapter_dir)  # type: ignore[arg-type]
    assert losses[-1] == pytest.approx(final, rel=1e-5)
    # Without a validation file there is nothing to measure, and nothing is.
    plain = train(replace(spec, validation_file=None, output_dir=tmp_path / "plain"))
    assert [info.full_valid_loss for info in plain.checkpoints] == [None, None]
    # A stopping run's checkpoint is saved unmeasured: its grace period is for leaving.
    steps: list[int] = []
    stopped = train(
        replace(spec, output_dir=tmp_path / "stopped"),
        TrainHooks(
            on_metrics=lambda m: steps.append(m.step), should_cancel=lambda: len(steps) >= 3
        ),
    )
    assert stopped.status == "cancelled"
    assert [(info.step, info.full_valid_loss is None) for info in stopped.checkpoints] == [
        (2, False),
        (3, True),
    ]


def test_cancellation_stops_within_one_step_and_keeps_a_checkpoint(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    calls = {"metrics": 0}

    def count(metrics: StepMetrics) -> None:
        calls["metrics"] += 1

    result = train(
        make_spec(zoo, train_file, tmp_path, alignment_artifact),
        TrainHooks(on_metrics=count, should_cancel=lambda: calls["metrics"] >= 1),
    )
    assert result.status == "cancelled"
    assert result.steps == 1 and calls["metrics"] == 1
    assert result.adapter_dir is None
    assert (result.checkpoints[-1].adapter_path / "adapter_model.safetensors").exists()


def test_asft_keeps_the_update_closer_to_the_alignment_direction(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    from asft_core.alignment import load_alignment_directions

    directions = load_alignment_directions(alignment_artifact)

    def final_penalty(method: str, lam: float | None) -> float:
        spec = make_spec(
            zoo,
            train_file,
            tmp_path / f"{method}-{lam}",
            alignment_artifact,
            method=method,
            lambda_=lam,
            learning_rate=5e-3,
            n_epochs=1,
            dropout=0.0,
        )
        result = train(spec)
        tensors = adapter_tensors(result.adapter_dir)  # type: ignore[arg-type]
        total = 0.0
        for module, direction in directions.items():
            prefix = f"base_model.model.{module}"
            lora_a = tensors[f"{prefix}.lora_A.weight"].double()
            lora_b = tensors[f"{prefix}.lora_B.weight"].double()
            total += float(asft_penalty(lora_a, lora_b, direction.double()))
        return total

    plain, anchored = final_penalty("supervised", None), final_penalty("asft", 50.0)
    assert anchored < 0.5 * plain, (plain, anchored)


def test_safelora_projects_and_reports(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        zoo,
        train_file,
        tmp_path,
        alignment_artifact,
        method="safelora",
        safelora_num_modules=2,
        max_steps=2,
    )
    result = train(spec)
    assert result.adapter_dir is not None
    before = adapter_tensors(result.adapter_dir)
    report = post_hoc_projection(spec, result.adapter_dir)
    assert report is not None
    assert len(report["projected"]) == 2
    assert set(report["similarities"]) >= set(report["projected"])
    # The two projected modules' B changed on disk; the rest is as trained.
    after = adapter_tensors(result.adapter_dir)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {f"base_model.model.{name}.lora_B.weight" for name in report["projected"]}


def test_truncation_is_reported_with_line_numbers(
    zoo: ZooPaths, alignment_artifact: Path, tmp_path: Path
) -> None:
    rows = [
        {"prompt": "word " * 60, "completion": "positive"},
        {"prompt": "hi", "completion": "ok"},
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    events: list[tuple[str, str]] = []
    spec = make_spec(
        zoo,
        data,
        tmp_path / "out",
        alignment_artifact,
        max_seq_len=32,
        max_steps=1,
        method="supervised",
    )
    train(spec, TrainHooks(on_event=lambda level, message: events.append((level, message))))
    warnings = [message for level, message in events if level == "warn"]
    assert any("truncated" in m and "lines 1" in m for m in warnings), warnings
    assert any("no answer tokens" in m for m in warnings), warnings


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"method": "dpo"}, "invalid_method"),
        ({"alignment_path": None}, "alignment_required"),
        ({"batch_size": 0}, "invalid_hyperparameter"),
        ({"learning_rate": -1.0}, "invalid_hyperparameter"),
        (
            {"method": "safelora", "safelora_threshold": 0.5, "safelora_num_modules": 1},
            "invalid_safelora",
        ),
    ],
)
def test_invalid_specs_are_refused_with_a_code(
    zoo: ZooPaths,
    train_file: Path,
    alignment_artifact: Path,
    tmp_path: Path,
    changes: dict[str, object],
    code: str,
) -> None:
    with pytest.raises((TrainingError, SpecError)) as error:
        train(make_spec(zoo, train_file, tmp_path, alignment_artifact, **changes))
    assert error.value.code == code


@pytest.mark.parametrize("method", ["asft_projector", "l2"])
def test_the_projector_and_l2_methods_add_their_penalty_on_the_effective_update(
    zoo: ZooPaths, train_file: Path, alignment_artifact: Path, tmp_path: Path, method: str
) -> None:
    from peft import PeftModel

    from asft_core.alignment import alignment_subspaces
    from asft_core.evaluation.harness import load_for_evaluation
    from asft_core.penalty import projector_penalty
    from asft_core.training import lora_weight_pairs

    # l2 needs no alignment direction at all.
    artifact = alignment_artifact if method == "asft_projector" else None
    spec = make_spec(zoo, train_file, tmp_path, artifact, method=method, lambda_=0.5, max_steps=2)
    spec.validate()
    seen: list[StepMetrics] = []
    train(spec, TrainHooks(on_metrics=seen.append))
    assert [m.step for m in seen] == [1, 2]
    # B starts at zero, so the first step's penalty is 0; after one update it is not.
    assert seen[0].penalty == 0.0 and seen[1].penalty > 0.0
    # Step 2's penalty is computed on the weights after step 1: the adapter of a 1-step run.
    one_step = train(replace(spec, max_steps=1, output_dir=tmp_path / "one"))
    model, _ = load_for_evaluation(str(zoo.aligned))
    model = PeftModel.from_pretrained(model, str(one_step.adapter_dir))
    pairs = lora_weight_pairs(model)
    scaling = spec.hyper.alpha / spec.hyper.rank
    if method == "asft_projector":
        bases = {n: s.basis for n, s in alignment_subspaces(alignment_artifact).items()}
        assert all(0 < basis.shape[1] < basis.shape[0] for basis in bases.values())
    else:
        bases = {n: torch.zeros(b.shape[0], 0) for n, (_, b) in pairs.items()}
    expected = 0.5 * sum(
        float(projector_penalty(a.detach(), b.detach(), bases[n], scaling))
        for n, (a, b) in pairs.items()
    )
    assert seen[1].penalty == pytest.approx(expected, rel=1e-4)


def test_asft_projector_needs_an_alignment_artifact(
    zoo: ZooPaths, train_file: Path, tmp_path: Path
) -> None:
    spec = make_spec(zoo, train_file, tmp_path, None, method="asft_projector")  # type: ignore[arg-type]
    with pytest.raises(TrainingError) as caught:
        spec.validate()
    assert caught.value.code == "alignment_required"
    with pytest.raises(SpecError, match="subspace_energy"):
        make_spec(zoo, train_file, tmp_path, None, method="asft_projector", subspace_energy=1.5)


def test_the_device_is_checked_before_any_work() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any host
    with pytest.raises(TrainingError) as caught:
        check_device(missing)
    assert caught.value.code == "device_unavailable" and "usable CUDA devices" in str(caught.value)
    with pytest.raises(TrainingError):
        check_device("tpu")
    # bf16 only where the hardware computes it: never on a CPU, whatever torch emulates.
    assert not native_bf16(torch.device("cpu"))
    assert pick_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
