"""Step time of ``asft`` vs plain ``lora`` on the same model and batch, as a ratio.

Both variants share one PEFT model, one batch and one optimizer; the only difference is the
AsFT penalty's forward and backward. Steps are interleaved (lora, asft, lora, asft, ...) so
machine noise hits both alike, and the medians are compared. Target: ratio <= 1.05.

    python bench/train_step.py [--steps 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from asft_core.penalty import AsftRegularizer
from asft_core.training import batch_loss_sum, lora_weight_pairs, quiet_peft_warnings
from asft_core.zoo.models import TinyLlamaShape, random_tiny_llama, tiny_llama_config


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


def measure(case: Case, steps: int, device: torch.device) -> tuple[float, float]:
    """Median step time (s) of lora and asft, interleaved on the same model and batch."""
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
    regularizer = AsftRegularizer(directions, lam=1.0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    input_ids = torch.randint(2, case.vocab_size, (case.batch_size, case.seq_len))
    batch = {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
    }

    def step(with_penalty: bool) -> float:
        synchronize(device)
        started = time.perf_counter()
        loss_sum, tokens = batch_loss_sum(model, batch, device)
        loss = loss_sum / tokens
        if with_penalty:
            loss = loss + regularizer(pairs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - started

    for _ in range(3):
        step(False)
        step(True)
    lora_times: list[float] = []
    asft_times: list[float] = []
    for index in range(steps):
        # Alternate which goes first, so neither always runs on a warmer cache.
        order = (False, True) if index % 2 == 0 else (True, False)
        for with_penalty in order:
            (asft_times if with_penalty else lora_times).append(step(with_penalty))
    return statistics.median(lora_times), statistics.median(asft_times)


def main() -> None:
    """Print a table of step times and the asft / lora ratio per case."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'case':<28} {'batch x seq':>12} {'lora ms':>9} {'asft ms':>9} {'ratio':>7}")
    for case in CASES:
        lora_s, asft_s = measure(case, args.steps, device)
        print(
            f"{case.name:<28} {f'{case.batch_size}x{case.seq_len}':>12} "
            f"{lora_s * 1e3:>9.2f} {asft_s * 1e3:>9.2f} {asft_s / lora_s:>7.3f}"
        )
    print("target: asft / lora <= 1.05")


if __name__ == "__main__":
    main()
