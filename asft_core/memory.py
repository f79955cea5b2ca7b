"""A job's peak device memory, planned from the model's config before any GPU time.

The model is built on PyTorch's ``meta`` device (shapes, no data: a 7B model costs well
under a second and no memory), LoRA is attached as training attaches it, and one forward pass
of the job's batch is run under a saved-tensors hook: what autograd keeps for the backward
pass is counted tensor by tensor, for whatever architecture the config names. Attention is
counted as the fused kernels training uses keep it (queries, keys, values, output and a
log-sum-exp per head and token), not as the meta device's unfused fallback would.

The plan: weights (the frozen base, in its dtype), the alignment direction V on the device
(for the methods whose penalty reads it during training: fp32, bf16, or one module's fp32
copy at a time when V stays on the host; with a low-rank penalty its top-k basis), the
adapter (LoRA weights, gradients and AdamW's two moments, fp32), activations (the saved
tensors; with gradient checkpointing, each layer's input plus one layer recomputed) and the
loss over the logits (the fp32 log-softmax and its gradients at the start of the backward
pass).

``asft plan`` runs this module in a subprocess (the API side never imports torch)::

    python -m asft_core.memory MODEL_FOLDER [--method asft] [--hyperparameter batch_size=4]
        [--precision bf16|fp32] [--device-memory-gb 24] [--direction-storage fp32|bf16|host]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from asft_core.spec import DIRECTION_STORAGES, DirectionStorage, JobSpec, SpecError

GIB = 1024**3
# AdamW keeps two fp32 moments per trainable weight, beside the weight and its gradient.
ADAPTER_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class MemoryPlan:
    """Peak device memory of one training job, by part, in bytes."""

    weights: int
    alignment: int
    adapter: int
    activations: int
    logits: int
    gradient_checkpointing: bool
    direction_storage: DirectionStorage = "fp32"

    @property
    def total(self) -> int:
        """The planned peak."""
        return self.weights + self.alignment + self.adapter + self.activations + self.logits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the total."""
        return {**asdict(self), "total": self.total}

    def settings_text(self) -> str:
        """The memory-saving settings the plan assumes, in words ("" for none)."""
        parts = ["gradient checkpointing"] if self.gradient_checkpointing else []
        if self.direction_storage != "fp32":
            parts.append("V on the host" if self.direction_storage == "host" else "V in bf16")
        return ", ".join(parts)

    def describe(self) -> str:
        """One line: the total, then each part, then the settings assumed."""
        parts = ("weights", "alignment", "adapter", "activations", "logits")
        detail = ", ".join(f"{name} {size_text(getattr(self, name))}" for name in parts)
        settings = self.settings_text()
        return f"{size_text(self.total)} ({detail})" + (f", with {settings}" if settings else "")


def size_text(size: float) -> str:
    """``size`` bytes in GiB, or in MiB below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


class PlanError(ValueError):
    """The job cannot fit the device; the message names settings that would."""

    code = "insufficient_device_memory"


def plan_memory(
    model: str | Path,
    job: JobSpec,
    dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = False,
    direction_storage: DirectionStorage = "fp32",
) -> MemoryPlan:
    """Plan the peak device memory of training ``job`` on the model in folder ``model``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return plan_for_config(config, job, dtype, gradient_checkpointing, direction_storage)


def plan_for_config(
    config: Any,
    job: JobSpec,
    dtype: torch.dtype,
    gradient_checkpointing: bool = False,
    direction_storage: DirectionStorage = "fp32",
) -> MemoryPlan:
    """:func:`plan_memory` for a ``transformers`` config object."""
    from transformers import AutoModelForCausalLM

    from asft_core.training import with_lora

    hyper = job.hyperparameters
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * element
    targets = _target_shapes(model, hyper.target_modules)
    model = with_lora(model, hyper)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch, length = hyper.batch_size, hyper.max_seq_len
    vocab = int(config.get_text_config().vocab_size)
    return MemoryPlan(
        weights=weights,
        alignment=_alignment_bytes(job, targets, direction_storage),
        adapter=trainable * ADAPTER_BYTES_PER_PARAMETER,
        activations=_activation_bytes(model, config, batch, length, gradient_checkpointing),
        # The fp32 log-softmax kept for backward, its gradient and the logits' gradient.
        logits=batch * length * vocab * (4 + 4 + element),
        gradient_checkpointing=gradient_checkpointing,
        direction_storage=direction_storage,
    )


def _target_shapes(model: Any, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer LoRA will wrap, by module name."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def _alignment_bytes(
    job: JobSpec, targets: dict[str, tuple[int, int]], storage: DirectionStorage
) -> int:
    """V on the device through training, every target module, as ``storage`` keeps it (bf16
    and host storage add one module's fp32 copy); with a low-rank penalty only its top-k
    basis and eigenvalues (V itself is never read)."""
    if not job.uses_asft or not targets:
        return 0
    rank = job.hyperparameters.penalty_rank
    if rank:
        return 4 * sum(min(rank, out, inp) * (out + 1) for out, inp in targets.values())
    sizes = [out * inp for out, inp in targets.values()]
    if storage == "bf16":
        return 2 * sum(sizes) + 4 * max(sizes)
    if storage == "host":
        return 4 * max(sizes)
    return 4 * sum(sizes)


def _activation_bytes(
    model: Any, config: Any, batch: int, length: int, gradient_checkpointing: bool
) -> int:
    """What autograd keeps from one forward pass of a full batch (see the module docstring)."""
    from transformers import AttentionInterface

    AttentionInterface.register("asft_planned", _fused_attention)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "asft_planned"
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            kept[storage._cdata] = storage.nbytes()
        return tensor

    model.train()
    with torch.device("meta"):
        ids = torch.zeros(batch, length, dtype=torch.long)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(input_ids=ids)
    finally:
        model.config._attn_implementation = previous
    saved = sum(kept.values())
    if not gradient_checkpointing:
        return saved
    # Each layer keeps only its input; one layer at a time is recomputed in full.
    text = config.get_text_config()
    layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    element = output.logits.element_size()
    return layers * batch * length * hidden * element + saved // max(layers, 1)


class _FusedAttention(torch.autograd.Function):
    """Attention's output shape, keeping for backward what fused kernels keep."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Any:
        output = torch.empty_like(query)
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - planning never steps
        raise NotImplementedError


def _fused_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any
) -> tuple[torch.Tensor, None]:
    """An attention implementation for ``transformers`` that only counts (meta tensors)."""
    output = _FusedAttention.apply(query, key, value)
    return output.transpose(1, 2).contiguous(), None


def fitting_hyperparameters(
    model: str | Path,
    job: JobSpec,
    dtype: torch.dtype,
    available: int,
    direction_storage: DirectionStorage = "fp32",
) -> tuple[MemoryPlan, list[str]]:
    """The plan ``job`` runs under on a device with ``available`` bytes, and its settings.

    Returns (plan, changes): no change when it fits as asked; gradient checkpointing when that
    makes it fit; then, for an exact AsFT penalty, V kept on the host as well (same numbers,
    slower steps). Raises :class:`PlanError` naming the batch sizes or sequence lengths that
    would fit otherwise.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    plan = plan_for_config(config, job, dtype, False, direction_storage)
    if plan.total <= available:
        return plan, []
    least = plan_for_config(config, job, dtype, True, direction_storage)
    if least.total <= available:
        return least, ["gradient checkpointing on"]
    hyper = job.hyperparameters
    if job.uses_asft and not hyper.penalty_rank and direction_storage != "host":
        least = plan_for_config(config, job, dtype, True, "host")
        if least.total <= available:
            return least, ["gradient checkpointing on", "V kept on the host"]
    options = []
    for name in ("batch_size", "max_seq_len"):
        value = getattr(hyper, name)
        while value > 1:
            value //= 2
            try:
                smaller = replace(job, hyperparameters=replace(hyper, **{name: value}))
            except SpecError:  # below the setting's range
                break
            if plan_for_config(config, smaller, dtype, True, least.direction_storage).total <= (
                available
            ):
                options.append(f"{name} {value}")
                break
    hint = (
        f"{' or '.join(options)} (with {least.settings_text()})"
        if options
        else ("no smaller batch_size or max_seq_len fits: use a device with more memory")
    )
    raise PlanError(
        f"the job needs {least.describe()}; the device has {size_text(available)}. "
        f"Would fit: {hint}"
    )


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """Print the plan of a job on a model folder; with a device size, what makes it fit."""
    parser = argparse.ArgumentParser(prog="python -m asft_core.memory", description=__doc__)
    parser.add_argument("model", help="the (aligned) model's folder")
    parser.add_argument("--method", default="asft")
    parser.add_argument(
        "--hyperparameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="as in a job's request (batch_size=4, max_seq_len=1024, target_modules=a,b)",
    )
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--device-memory-gb", type=float, help="say whether and how it fits")
    parser.add_argument(
        "--direction-storage",
        choices=DIRECTION_STORAGES,
        default="fp32",
        help="where an exact AsFT penalty keeps V (fp32 or bf16 on the device, or the host)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    given: dict[str, Any] = {}
    for item in args.hyperparameter:
        name, _, value = item.partition("=")
        given[name] = value.split(",") if name == "target_modules" else json.loads(value)
    try:
        job = JobSpec.resolve(args.method, given)
    except (SpecError, ValueError) as error:
        print(f"asft plan: {error}", file=sys.stderr)
        return 2
    dtype = PRECISIONS[args.precision]
    changes: list[str] = []
    try:
        if args.device_memory_gb is None:
            plan = plan_memory(args.model, job, dtype, False, args.direction_storage)
        else:
            available = int(args.device_memory_gb * GIB)
            plan, changes = fitting_hyperparameters(
                args.model, job, dtype, available, args.direction_storage
            )
    except PlanError as error:
        print(f"asft plan: does not fit ({error.code}): {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"asft plan: cannot read the model's config: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**plan.to_dict(), "changes": changes}, indent=2))
        return 0
    print(f"{args.method} on {args.model} ({args.precision}): {plan.describe()}")
    if changes:
        print(f"fits with {', '.join(changes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
