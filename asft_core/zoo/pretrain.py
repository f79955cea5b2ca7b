"""Full-parameter training of the tiny zoo models (the base, then its alignment).

Not the service's trainer (that one is LoRA only): the zoo needs every weight trained, from
random initialisation for the base model and from the base for the aligned one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from asft_core.data import collate, epoch_batches, tokenize_dataset
from asft_core.formats import parse_row
from asft_core.training import batch_loss_sum
from asft_core.zoo.language import Row


def train_full(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    steps: int,
    learning_rate: float,
    batch_size: int = 32,
    seed: int = 0,
    warmup_steps: int = 50,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train every weight of ``model`` on ``rows`` (prompt/completion) for ``steps`` steps.

    AdamW with linear warmup then cosine decay; loss on the answer tokens only. Returns the
    mean task loss of the last 20 steps.
    """
    examples = [parse_row(row, line) for line, row in enumerate(rows, start=1)]
    dataset = tokenize_dataset(tokenizer, examples, max_seq_len=128).examples
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    model.train()
    recent: list[float] = []
    step, epoch = 0, 0
    while step < steps:
        for indices in epoch_batches(len(dataset), batch_size, seed, epoch):
            if step >= steps:
                break
            batch = collate([dataset[i] for i in indices], tokenizer.pad_token_id)
            loss_sum, targets = batch_loss_sum(model, batch, device)
            loss = loss_sum / max(targets, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent = [*recent[-19:], loss.item()]
            step += 1
            if on_step is not None:
                on_step(step, recent[-1])
        epoch += 1
    model.eval()
    return sum(recent) / max(len(recent), 1)
