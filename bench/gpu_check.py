"""The GPU path in one script (a few minutes on one GPU): run it whenever a GPU is available.

1. *Train and resume*: a tiny Llama (random weights, the zoo's language) trains with the
   ``asft`` penalty on the device in bf16, is cancelled after 3 steps and resumed from its
   checkpoint; the resumed adapter is compared with an uninterrupted run's (bit-identical
   with deterministic algorithms, else the largest difference is reported).
2. *7B shapes*: a randomly initialised model with Llama-2-7B's layer shapes (``--layers`` of
   them, 4096 hidden, 11008 intermediate, 32000 tokens) trains LoRA on q_proj and v_proj in
   bf16, with and without the AsFT penalty on 4096 x 4096 directions, interleaved; prints
   the penalty's share of step time (target <= 2%).
3. *Memory plan*: the peak ``torch.cuda.max_memory_allocated`` of those steps against
   ``asft_core.memory``'s plan for the same model and job; prints the plan's error.

    python bench/gpu_check.py [--device cuda] [--layers 2] [--steps 10] [--json out.json]

``--device cpu --hidden 256`` runs the same code on a CPU at small shapes (the test suite does,
so the script cannot rot); its figures are then not GPU figures and the plan's error is not
measured (no allocator statistics on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from asft_core.alignment import get_or_compute_alignment
from asft_core.memory import plan_for_config
from asft_core.penalty import AsftRegularizer
from asft_core.spec import JobSpec
from asft_core.training import (
    TrainHooks,
    TrainSpec,
    batch_loss_sum,
    lora_weight_pairs,
    train,
    with_lora,
)
from asft_core.zoo.language import corpus_lines, task_rows
from asft_core.zoo.models import TinyLlamaShape, random_tiny_llama, tiny_llama_config
from asft_core.zoo.tokenizer import save_tokenizer, train_tokenizer


def train_and_resume(device: str, folder: Path) -> dict[str, Any]:
    """Part 1: an uninterrupted run against one cancelled after 3 steps and resumed."""
    tokenizer = train_tokenizer(corpus_lines(1, 3000))
    config = tiny_llama_config(
        len(tokenizer), TinyLlamaShape(), tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    model_dir = folder / "model"
    random_tiny_llama(config, seed=1).save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    data = folder / "train.jsonl"
    rows = task_rows("sentiment", random.Random(2), 48, "train")
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = JobSpec.resolve("asft", {"batch_size": 4, "n_epochs": 1, "learning_rate": 1e-3})
    # A second random model stands in for the base: V is their difference, as for a pair.
    base_dir = folder / "base"
    random_tiny_llama(config, seed=2).save_pretrained(base_dir)
    save_tokenizer(tokenizer, base_dir)
    artifact = get_or_compute_alignment(
        str(base_dir), str(model_dir), folder / "alignment", job.hyperparameters.target_modules
    ).path
    spec = TrainSpec(
        model=str(model_dir),
        training_file=data,
        output_dir=folder / "straight",
        job=job,
        alignment_path=artifact,
        device=device,
        precision="bf16",
        checkpoint_each_epoch=False,
    )
    events: list[str] = []
    straight = train(spec, TrainHooks(on_event=lambda _, message: events.append(message)))
    steps: list[int] = []
    stop = TrainHooks(
        on_metrics=lambda m: steps.append(m.step), should_cancel=lambda: len(steps) >= 3
    )
    cut = train(replace(spec, output_dir=folder / "cut"), stop)
    resumed = train(
        replace(spec, output_dir=folder / "resumed", resume_from=cut.checkpoints[-1].path)
    )
    assert straight.adapter_dir is not None and resumed.adapter_dir is not None
    expected = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    actual = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    difference = max(float((expected[k] - actual[k]).abs().max()) for k in expected)
    return {
        "device_event": next((e for e in events if e.startswith("Training on")), None),
        "steps": straight.steps,
        "resumed_at": 3,
        "max_abs_difference": difference,
        "bit_identical": difference == 0.0,
    }


def seven_b_shapes(device: torch.device, layers: int, hidden: int, steps: int) -> dict[str, Any]:
    """Parts 2 and 3: penalty share of step time and the memory plan's error."""
    intermediate = 11008 * hidden // 4096
    heads = max(hidden // 128, 1)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
    )
    job = JobSpec.resolve("asft", {"batch_size": 4, "max_seq_len": 512})
    hyper = job.hyperparameters
    dtype = torch.bfloat16
    plan = plan_for_config(config, job, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model = with_lora(model, hyper)
    model.train()
    pairs = lora_weight_pairs(model)
    directions = {
        name: torch.randn(b.shape[0], a.shape[1], device=device) for name, (a, b) in pairs.items()
    }
    penalty = AsftRegularizer(directions, lambda_=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (hyper.batch_size, hyper.max_seq_len))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step(with_penalty: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss, tokens = batch_loss_sum(model, batch, device)
        total = loss / tokens + (penalty(pairs) if with_penalty else 0.0)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    step(True)  # warm-up: kernels chosen, optimizer state made
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for with_penalty in (False, True):
            times[with_penalty].append(step(with_penalty))
    plain, penalised = statistics.median(times[False]), statistics.median(times[True])
    figures: dict[str, Any] = {
        "layers": layers,
        "hidden": hidden,
        "step_s_lora": plain,
        "step_s_asft": penalised,
        "penalty_share": (penalised - plain) / penalised,
        "plan_bytes": plan.total,
        "plan": plan.to_dict(),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
        figures.update(peak_bytes=peak, plan_error=(plan.total - peak) / peak)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the three parts; print the figures (and write them with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; GPU figures not measured", file=sys.stderr)
        return 2
    if device.type == "cuda":
        # Exact resume on CUDA needs deterministic kernels (cuBLAS wants this workspace).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    figures: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory() as folder:
        figures["train_and_resume"] = train_and_resume(args.device, Path(folder))
    figures["seven_b_shapes"] = seven_b_shapes(device, args.layers, args.hidden, args.steps)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
