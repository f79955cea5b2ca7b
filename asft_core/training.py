"""The LoRA training loop: ``train(spec, hooks) -> TrainResult``.

One plain function, read top to bottom: data, model, penalty, optimizer, loop, checkpoint,
save. The post-hoc Safe LoRA projection and the validation loss are the recipe's next steps.
The worker supplies hooks (plain callables) for metrics, checkpoints, events and
cancellation; the core never touches a database or a queue.

Methods (the same names the API uses):

- ``supervised``: plain LoRA.
- ``asft``: LoRA plus lambda * sum ||(I - C) B A||_F^2 over modules (AsFT, the reference code's
  formula on the unscaled B A).
- ``asft_projector``: LoRA plus lambda * sum ||(I - U_k U_k^T) dW||_F^2 with dW = (alpha/r) B A
  and U_k the top-k left singular vectors of V holding ``subspace_energy`` of its energy: no
  penalty inside the alignment subspace, and free of V's scale.
- ``l2``: LoRA plus lambda * sum ||dW||_F^2 (needs no alignment direction).
- ``safelora``: plain LoRA (the recipe then projects the adapter).
- ``asft+safelora``: both.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from asft_core.checkpoints import (
    CheckpointInfo,
    TrainingPosition,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from asft_core.data import (
    IGNORE_INDEX,
    TokenizedDataset,
    TokenizedExample,
    collate,
    epoch_batches,
    steps_per_epoch,
    tokenize_dataset,
)
from asft_core.formats import read_examples
from asft_core.penalty import LowRankDirection
from asft_core.spec import DirectionStorage, Hyperparameters, JobSpec

Precision = Literal["auto", "fp32", "bf16"]
Schedule = Literal["linear", "cosine", "constant"]


class TrainingError(ValueError):
    """A training spec or its inputs are unusable; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs: the job's method and hyperparameters, and where.

    Paths are explicit: the core never reads service settings.
    """

    model: str  # local folder or hub id of the aligned model that is fine-tuned
    training_file: Path
    output_dir: Path
    job: JobSpec = field(default_factory=JobSpec)
    alignment_path: Path | None = None  # artifact from asft_core.alignment
    validation_file: Path | None = None
    # The reference penalty is on the unscaled B A; True multiplies it by (alpha / r)^2.
    penalty_scale_by_alpha: bool = False
    lr_schedule: Schedule = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    shuffle: bool = True
    # Batch rows of similar length together (within shuffled windows): less padding, and
    # about 1.5x faster steps on short-and-long data; the batches are still random.
    group_by_length: bool = True
    seed: int = 42
    checkpoint_every_steps: int | None = None
    checkpoint_each_epoch: bool = True
    resume_from: Path | None = None
    device: str = "auto"
    precision: Precision = "auto"
    # Written into adapter_config.json as base_model_name_or_path (e.g. the registered id).
    base_model_id: str | None = None
    # Recompute each layer's activations in the backward pass instead of keeping them: far
    # less memory for about a third more step time (the memory plan turns it on to fit).
    gradient_checkpointing: bool = False
    # Where an exact AsFT penalty keeps V (spec.DirectionStorage; the memory plan moves it to
    # the host when that makes a job fit).
    direction_storage: DirectionStorage = "fp32"

    @property
    def hyper(self) -> Hyperparameters:
        """The job's hyperparameters."""
        return self.job.hyperparameters

    def validate(self, require_alignment: bool = True) -> None:
        """Raise :class:`TrainingError` when the penalty needs an alignment artifact it lacks.

        ``require_alignment=False`` checks a spec whose artifact comes later (the recipe
        computes it after validating the data). The hyperparameters were checked by JobSpec.
        """
        needs_direction = self.job.uses_asft or self.job.method == "asft_projector"
        if require_alignment and needs_direction and self.alignment_path is None:
            raise TrainingError(
                "alignment_required", f"method {self.job.method!r} needs an alignment artifact"
            )


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports to ``TrainHooks.on_metrics``."""

    step: int
    total_steps: int
    epoch: int
    train_loss: float
    penalty: float
    loss: float
    learning_rate: float
    tokens: int
    trained_tokens: int
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


def _no_event(level: str, message: str) -> None:
    return None


def _no_metrics(metrics: StepMetrics) -> None:
    return None


def _no_checkpoint(checkpoint: CheckpointInfo) -> None:
    return None


def _never_cancel() -> bool:
    return False


@dataclass
class TrainHooks:
    """Plain callables the caller (the worker) plugs in. All default to doing nothing."""

    on_event: Callable[[str, str], None] = _no_event  # (level: info|warn|error, message)
    on_metrics: Callable[[StepMetrics], None] = _no_metrics
    on_checkpoint: Callable[[CheckpointInfo], None] = _no_checkpoint
    should_cancel: Callable[[], bool] = _never_cancel  # checked before every step


@dataclass
class TrainResult:
    """How a run ended and where its adapter is."""

    status: Literal["completed", "cancelled"]
    adapter_dir: Path | None
    steps: int
    total_steps: int
    trained_tokens: int
    final_train_loss: float | None
    checkpoints: list[CheckpointInfo]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        data["checkpoints"] = [
            {"step": c.step, "epoch": c.epoch, "path": str(c.path)} for c in self.checkpoints
        ]
        return data


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CUDA compute capability 8+).

    ``torch.cuda.is_bf16_supported()`` also counts emulation (slow on V100 and T4) and asks
    about the current device, not this one.
    """
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def check_device(device: str) -> torch.device:
    """The device ``device`` (auto, cpu, cuda or cuda:N) names on this host.

    Raises :class:`TrainingError` (``device_unavailable``) when it asks for a GPU this host
    does not have, so a worker stops at start instead of failing every job.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise TrainingError("device_unavailable", f"{device!r} is not a device") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise TrainingError(
                "device_unavailable", f"{device!r}: this host has {count} usable CUDA devices"
            )
    elif resolved.type != "cpu":
        raise TrainingError("device_unavailable", f"{device!r}: use auto, cpu or cuda[:N]")
    return resolved


def pick_device(device: str, precision: Precision) -> tuple[torch.device, torch.dtype]:
    """The device and the base-weight dtype: bf16 on GPUs that compute it natively, else fp32.

    LoRA weights and the penalty stay fp32 whatever the base dtype.
    """
    resolved = check_device(device)
    if precision == "fp32":
        return resolved, torch.float32
    bf16_ok = native_bf16(resolved)
    if precision == "bf16" and not bf16_ok and resolved.type == "cuda":
        raise TrainingError("bf16_unsupported", "this GPU does not compute bfloat16 natively")
    if precision == "bf16" or (precision == "auto" and bf16_ok):
        return resolved, torch.bfloat16
    return resolved, torch.float32


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: Schedule) -> float:
    """Learning-rate factor for a 0-based optimizer step."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def load_training_data(
    tokenizer: Any, path: Path, max_seq_len: int, hooks: TrainHooks, name: str
) -> TokenizedDataset:
    """Validate and tokenise a JSONL file, reporting truncation and dropped rows as events."""
    dataset = tokenize_dataset(tokenizer, read_examples(path), max_seq_len)
    if dataset.truncated_lines:
        hooks.on_event(
            "warn",
            f"{name}: {len(dataset.truncated_lines)} rows longer than max_seq_len="
            f"{max_seq_len} were truncated (lines {_line_list(dataset.truncated_lines)})",
        )
    if dataset.dropped_lines:
        hooks.on_event(
            "warn",
            f"{name}: {len(dataset.dropped_lines)} rows had no answer tokens left after "
            f"truncation and were skipped (lines {_line_list(dataset.dropped_lines)})",
        )
    if not dataset.examples:
        raise TrainingError("empty_dataset", f"{name} has no usable rows")
    return dataset


def _line_list(lines: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(line) for line in lines[:limit])
    return shown + (", ..." if len(lines) > limit else "")


def batch_loss_sum(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over answer tokens, and how many tokens were summed.

    Summing (not averaging) per micro-batch lets gradient accumulation divide once by the
    token count of the whole accumulated group, so the loss does not depend on how the
    group is split.
    """
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shifted_labels != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[TokenizedExample],
    pad_token_id: int,
    device: torch.device,
    batch_size: int = 8,
) -> float:
    """Mean per-token loss over ``examples`` (the validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss_sum, tokens = batch_loss_sum(
            model, collate(examples[start : start + batch_size], pad_token_id), device
        )
        total += float(loss_sum)
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


def lora_weight_pairs(model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (as in the base checkpoint) -> (A: (r, d_in), B: (d_out, r)).

    PEFT names modules ``base_model.model.<checkpoint name>``; the prefix is dropped so the
    names match the alignment artifact's.
    """
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        key = name.removeprefix("base_model.model.")
        pairs[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


@contextmanager
def quiet_peft_warnings() -> Iterator[None]:
    """Silence the deprecation warning peft triggers in transformers: theirs, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def with_lora(model: Any, hyper: Hyperparameters) -> Any:
    """``model`` with LoRA on ``hyper``'s target modules, its base frozen, as training has it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=hyper.rank,
        lora_alpha=hyper.alpha,
        lora_dropout=hyper.dropout,
        target_modules=list(hyper.target_modules),
        task_type="CAUSAL_LM",
    )
    with quiet_peft_warnings():
        return get_peft_model(model, config)


def load_model_and_tokenizer(
    model_ref: str, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # safetensors only: registered models come from the hub or a user's folder, and a
    # pytorch_model.bin is a pickle (loading one can run code).
    # Straight onto the device: no CPU copy of the weights on the way.
    model = AutoModelForCausalLM.from_pretrained(
        model_ref, dtype=dtype, use_safetensors=True, device_map=device
    )
    return model, tokenizer


def train(
    spec: TrainSpec,
    hooks: TrainHooks | None = None,
    regularizer: Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
    | None = None,
) -> TrainResult:
    """Fine-tune ``spec.model`` with LoRA and the chosen method; see the module docstring.

    Resuming from ``spec.resume_from`` (a checkpoint folder written by this function with
    the same spec) gives the same final weights as an uninterrupted run. ``regularizer``
    replaces the method's penalty (the frontier study's controls); it maps the LoRA pairs
    (module -> (A, B)) to the scalar added to the task loss.
    """
    from asft_core.alignment import DirectionReader, alignment_low_rank

    spec.validate()
    hooks = hooks or TrainHooks()
    device, base_dtype = pick_device(spec.device, spec.precision)
    torch.manual_seed(spec.seed)
    # Say what runs: a CUDA host that fell back to the CPU is visible in the job's log.
    dtype_name = str(base_dtype).removeprefix("torch.")
    hooks.on_event("info", f"Training on {device}, base weights in {dtype_name}")

    # Data.
    model, tokenizer = load_model_and_tokenizer(spec.model, base_dtype, device)
    train_data = load_training_data(
        tokenizer, spec.training_file, spec.hyper.max_seq_len, hooks, "training file"
    )
    hooks.on_event(
        "info",
        f"{len(train_data.examples)} training rows, {train_data.num_tokens} tokens per epoch",
    )
    valid_data = None
    if spec.validation_file is not None:
        valid_data = load_training_data(
            tokenizer, spec.validation_file, spec.hyper.max_seq_len, hooks, "validation file"
        )

    # Model: LoRA on the target modules; the base weights stay frozen.
    if spec.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights though the inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = with_lora(model, spec.hyper)
    lora_pairs = lora_weight_pairs(model)
    if not lora_pairs:
        raise TrainingError("missing_module", "no LoRA target module was found in the model")

    # Penalty: each V read from the artifact in turn and kept as ``direction_storage`` says;
    # with a low-rank penalty only the top-k factors the artifact stores are read.
    directions: Mapping[str, torch.Tensor | LowRankDirection] | None = None
    if spec.alignment_path is not None and spec.job.uses_asft:
        if spec.hyper.penalty_rank:
            directions = alignment_low_rank(
                spec.alignment_path, spec.hyper.penalty_rank, modules=list(lora_pairs)
            )
        else:
            directions = DirectionReader(spec.alignment_path, modules=list(lora_pairs))
    if regularizer is None:
        regularizer = method_regularizer(spec, lora_pairs, directions, device)
    directions = None  # the regularizer holds what it needs

    # Optimizer and schedule.
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=spec.hyper.learning_rate, weight_decay=spec.weight_decay
    )
    per_epoch = steps_per_epoch(
        len(train_data.examples), spec.hyper.batch_size, spec.hyper.gradient_accumulation_steps
    )
    total_steps = spec.hyper.n_epochs * per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, spec.hyper.warmup_steps, spec.lr_schedule),
    )
    position = TrainingPosition()
    if spec.resume_from is not None:
        position = load_checkpoint(spec.resume_from, model, optimizer, scheduler, device)
        hooks.on_event("info", f"resumed from checkpoint at step {position.step}")

    # Loop.
    checkpoints: list[CheckpointInfo] = []
    pad_id = tokenizer.pad_token_id
    checkpoint_root = spec.output_dir / "checkpoints"
    model.train()
    started = time.monotonic()
    start_step = position.step
    train_loss_value: float | None = None
    status: Literal["completed", "cancelled"] = "completed"

    def checkpoint(measure: bool = True) -> None:
        info = save_checkpoint(
            checkpoint_root / f"step-{position.step:06d}",
            model,
            optimizer,
            scheduler,
            position,
            base_model_id=spec.base_model_id,
            chat_template=tokenizer.chat_template,
            device=device,
        )
        if measure and valid_data is not None:
            # At checkpoints only: a pass over the validation rows costs about as much as a
            # step per 8 rows, too much to pay every step.
            loss = evaluate_loss(model, valid_data.examples, pad_id, device)
            info = replace(info, full_valid_loss=loss)
        checkpoints.append(info)
        hooks.on_checkpoint(info)

    lengths = train_data.lengths if spec.group_by_length else None

    @functools.lru_cache(maxsize=1)
    def batches_of(epoch: int) -> list[list[int]]:
        # Once per epoch, not per step: shuffling and sorting by length walk every row.
        rows = len(train_data.examples)
        return epoch_batches(rows, spec.hyper.batch_size, spec.seed, epoch, spec.shuffle, lengths)

    while position.step < total_steps:
        if hooks.should_cancel():
            status = "cancelled"
            hooks.on_event("warn", f"cancelled before step {position.step + 1}")
            if position.step > start_step or not checkpoints:
                # Unmeasured: a stopping worker has a grace period to record it and leave.
                checkpoint(measure=False)
            break
        step_started = time.monotonic()
        batches = batches_of(position.epoch)
        group = batches[
            position.batch_in_epoch : position.batch_in_epoch
            + spec.hyper.gradient_accumulation_steps
        ]
        micro_batches = [
            collate([train_data.examples[i] for i in indices], pad_id) for indices in group
        ]
        group_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)

        train_loss = torch.zeros((), device=device)
        for batch in micro_batches:
            loss_sum, _ = batch_loss_sum(model, batch, device)
            micro_loss = loss_sum / group_targets
            micro_loss.backward()
            train_loss += micro_loss.detach()
        penalty = torch.zeros((), device=device)
        if regularizer is not None:
            penalty = regularizer(lora_pairs)
            penalty.backward()
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, spec.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        next_batch = position.batch_in_epoch + len(group)
        epoch_done = next_batch >= len(batches)
        position = TrainingPosition(
            step=position.step + 1,
            epoch=position.epoch + 1 if epoch_done else position.epoch,
            batch_in_epoch=0 if epoch_done else next_batch,
            trained_tokens=position.trained_tokens + step_tokens,
        )
        train_loss_value = float(train_loss)
        penalty_value = float(penalty.detach())
        if not math.isfinite(train_loss_value) or not math.isfinite(penalty_value):
            raise TrainingError(
                "nan_loss",
                f"loss became {train_loss_value} (penalty {penalty_value}) at step "
                f"{position.step}; lower the learning rate or lambda",
            )
        now = time.monotonic()
        elapsed = now - started
        per_step = elapsed / (position.step - start_step)
        hooks.on_metrics(
            StepMetrics(
                step=position.step,
                total_steps=total_steps,
                epoch=position.epoch,
                train_loss=train_loss_value,
                penalty=penalty_value,
                loss=train_loss_value + penalty_value,
                learning_rate=learning_rate,
                tokens=step_tokens,
                trained_tokens=position.trained_tokens,
                tokens_per_s=step_tokens / max(now - step_started, 1e-9),
                elapsed_s=elapsed,
                eta_s=per_step * (total_steps - position.step),
            )
        )
        every = spec.checkpoint_every_steps
        if (every and position.step % every == 0) or (epoch_done and spec.checkpoint_each_epoch):
            checkpoint()

    if status == "cancelled":
        return TrainResult(
            status,
            None,
            position.step,
            total_steps,
            position.trained_tokens,
            train_loss_value,
            checkpoints,
        )

    adapter_dir = save_adapter(
        model, spec.output_dir / "adapter", spec.base_model_id, tokenizer.chat_template
    )
    return TrainResult(
        status,
        adapter_dir,
        position.step,
        total_steps,
        position.trained_tokens,
        train_loss_value,
        checkpoints,
    )


def method_regularizer(
    spec: TrainSpec,
    lora_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    directions: Mapping[str, torch.Tensor | LowRankDirection] | None,
    device: torch.device,
) -> Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor] | None:
    """The penalty ``spec.job.method`` adds to the task loss (None for methods without one)."""
    from asft_core.alignment import alignment_subspaces
    from asft_core.penalty import AsftRegularizer, ProjectorRegularizer, l2_regularizer

    hyper = spec.hyper
    effective = hyper.alpha / hyper.rank
    lambda_ = hyper.lambda_
    if lambda_ is None:  # JobSpec sets it for every method with a penalty
        return None
    if spec.job.uses_asft:
        assert directions is not None
        scaling = effective if spec.penalty_scale_by_alpha else 1.0
        return AsftRegularizer(
            directions,
            lambda_=lambda_,
            scaling=scaling,
            low_rank=hyper.penalty_rank,
            device=device,
            storage=spec.direction_storage,
        )
    if spec.job.method == "asft_projector":
        assert spec.alignment_path is not None and hyper.subspace_energy is not None
        subspaces = alignment_subspaces(
            spec.alignment_path, tau=hyper.subspace_energy, modules=list(lora_pairs)
        )
        bases = {name: subspace.basis for name, subspace in subspaces.items()}
        return ProjectorRegularizer(bases, lambda_=lambda_, scaling=effective, device=device)
    if spec.job.method == "l2":
        d_out = {name: b.shape[0] for name, (_, b) in lora_pairs.items()}
        return l2_regularizer(d_out, lambda_=lambda_, scaling=effective, device=device)
    return None


@torch.no_grad()
def adapter_validation_loss(spec: TrainSpec, adapter_dir: Path) -> float:
    """Mean per-token loss of ``spec.model`` with the adapter on ``spec.validation_file``."""
    from peft import PeftModel

    assert spec.validation_file is not None
    device, base_dtype = pick_device(spec.device, spec.precision)
    model, tokenizer = load_model_and_tokenizer(spec.model, base_dtype, device)
    with quiet_peft_warnings():
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    data = load_training_data(
        tokenizer, spec.validation_file, spec.hyper.max_seq_len, TrainHooks(), "validation file"
    )
    return evaluate_loss(model, data.examples, tokenizer.pad_token_id, device)
