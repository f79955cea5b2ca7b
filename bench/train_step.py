"""Step time of ``asft`` vs plain ``lora``, and of a worker's step vs the trainer's, as ratios.

All variants share one PEFT model, one batch and one optimizer. ``asft`` adds the penalty's
forward and backward (target: asft / lora <= 1.05). ``worker`` is an asft step plus what the
worker does per step with a real database (SQLite, a running job row): buffer the metrics for
its ``JobSync`` thread, which writes them every ``ASFT_METRICS_INTERVAL_S`` (target: worker /
asft <= 1.02). ``sync write`` writes each step's metrics in the step instead, for contrast.
Steps are interleaved so machine noise hits all alike, and the medians are compared.

    python bench/train_step.py [--steps 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from asft_core.penalty import AsftRegularizer
from asft_core.spec import JobSpec
from asft_core.training import (
    StepMetrics,
    batch_loss_sum,
    lora_weight_pairs,
    quiet_peft_warnings,
)
from asft_core.zoo.models import TinyLlamaShape, random_tiny_llama, tiny_llama_config
from service.db.migrate import upgrade_head
from service.db.models import Job, ModelPair, Team, new_id
from service.db.session import make_engine, transaction
from service.settings import Settings
from service.storage import ArtifactStore
from worker.persistence import JobContext, JobSync, sync_job

VARIANTS = ("lora", "asft", "worker", "sync write")


@dataclass(frozen=True)
class Case:
    """One model size and batch shape to measure."""

    name: str
    shape: TinyLlamaShape
    vocab_size: int
    batch_size: int
    seq_len: int


CASES = (
    Case("zoo-tiny (h=64, 2 layers)", TinyLlamaShape(), 512, 8, 64),
    Case(
        "small (h=512, 4 layers)",
        TinyLlamaShape(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
        ),
        4096,
        8,
        256,
    ),
)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def running_job(folder: Path) -> Iterator[tuple[JobContext, str]]:
    """A migrated SQLite database holding one running job, and the worker's context for it."""
    url = f"sqlite:///{folder / 'bench.db'}"
    upgrade_head(url, folder)
    engine = make_engine(url)
    settings = Settings(_env_file=None, data_dir=folder)
    with transaction(engine) as session:
        team = Team(id=new_id("team"), name="bench")
        session.add(team)
        session.add(ModelPair(id="bench", aligned_model="-", base_model="-"))
        session.flush()
        job = Job(
            id=new_id("ftjob"),
            team_id=team.id,
            model="bench",
            training_file="file-bench",
            status="running",
            method=JobSpec().to_json(),
            seed=0,
        )
        session.add(job)
    try:
        yield JobContext(settings, engine, ArtifactStore(folder / "artifacts")), job.id
    finally:
        engine.dispose()


def step_metrics(step: int) -> StepMetrics:
    """What the trainer hands its hooks after a step (values do not matter to the write)."""
    return StepMetrics(step, 10_000, 0, 1.0, 0.1, 1.1, 1e-4, 512, 512 * step, 1e4, 1.0, 60.0)


def measure(
    case: Case, steps: int, device: torch.device, context: JobContext, job_id: str
) -> dict[str, float]:
    """Median step time (s) of each variant, interleaved on the same model and batch."""
    config = tiny_llama_config(case.vocab_size, case.shape, pad_token_id=0, eos_token_id=1)
    model: Any = random_tiny_llama(config, seed=0).to(device)
    with quiet_peft_warnings():
        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
        )
    model.train()
    pairs = lora_weight_pairs(model)
    generator = torch.Generator().manual_seed(0)
    directions = {
        name: torch.randn(b.shape[0], a.shape[1], generator=generator).to(device) * 1e-2
        for name, (a, b) in pairs.items()
    }
    regularizer = AsftRegularizer(directions, lambda_=1.0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    input_ids = torch.randint(2, case.vocab_size, (case.batch_size, case.seq_len))
    batch = {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
    }

    counter = iter(range(1, 1_000_000))
    sync = JobSync(context, job_id, context.settings.metrics_interval_s)

    def step(variant: str) -> float:
        synchronize(device)
        started = time.perf_counter()
        loss_sum, tokens = batch_loss_sum(model, batch, device)
        loss = loss_sum / tokens
        if variant != "lora":
            loss = loss + regularizer(pairs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if variant == "worker":
            sync.add(step_metrics(next(counter)))
            sync.cancel_requested  # noqa: B018 - the cancel check the trainer makes per step
        elif variant == "sync write":
            sync_job(context, job_id, [step_metrics(next(counter))])
        return time.perf_counter() - started

    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with sync:
        for variant in VARIANTS * 3:
            step(variant)
        for index in range(steps):
            # Rotate which goes first, so none always runs on a warmer cache.
            shift = index % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                times[variant].append(step(variant))
    return {variant: statistics.median(values) for variant, values in times.items()}


def main() -> None:
    """Print a table of step times and the asft / lora ratio per case."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        f"{'case':<28} {'batch x seq':>12} {'lora ms':>9} {'asft ms':>9} {'worker ms':>10} "
        f"{'write ms':>9} {'asft/lora':>10} {'worker/asft':>12} {'write/asft':>11}"
    )
    with tempfile.TemporaryDirectory() as folder, running_job(Path(folder)) as (context, job_id):
        for case in CASES:
            ms = {k: v * 1e3 for k, v in measure(case, args.steps, device, context, job_id).items()}
            print(
                f"{case.name:<28} {f'{case.batch_size}x{case.seq_len}':>12} "
                f"{ms['lora']:>9.2f} {ms['asft']:>9.2f} {ms['worker']:>10.2f} "
                f"{ms['sync write']:>9.2f} {ms['asft'] / ms['lora']:>10.3f} "
                f"{ms['worker'] / ms['asft']:>12.3f} {ms['sync write'] / ms['asft']:>11.3f}"
            )
    print("targets: asft / lora <= 1.05; worker / asft <= 1.02")


if __name__ == "__main__":
    main()
