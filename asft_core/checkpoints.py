"""Training checkpoints: safetensors files plus a JSON sidecar, never pickle.

A checkpoint folder holds

- ``adapter/``: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
  servable as is;
- ``training_state.safetensors``: optimizer moments and RNG states, as tensors;
- ``trainer_state.json``: step, data position, optimizer param groups, scheduler state.

Nothing here can execute code when loaded, so checkpoints are safe to serve and to resume
from. Folders appear atomically (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "training_state.safetensors"
SIDECAR_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
# Beside an adapter: the chat template its conversations were rendered with in training.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainingPosition:
    """Where training stands: optimizer steps done and the next batch of the current epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    trained_tokens: int = 0


@dataclass(frozen=True)
class CheckpointInfo:
    """A saved checkpoint, as reported to hooks."""

    step: int
    epoch: int
    path: Path
    adapter_path: Path
    # Mean per-token loss on the whole validation file at this step (None without one);
    # OpenAI's name for it in checkpoint metrics.
    full_valid_loss: float | None = None


def _rng_tensors(device: torch.device | None) -> dict[str, torch.Tensor]:
    """The CPU generator, and the training GPU's alone: a resume may land on another host."""
    states = {"rng.cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        states["rng.device"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng(tensors: dict[str, torch.Tensor], device: torch.device | None) -> None:
    """Restore onto the training device, whatever GPUs this host has.

    Checkpoints from before kept one state per visible GPU (``rng.cuda.<index>``); the
    training device's index is used when present, else the first.
    """
    torch.set_rng_state(tensors["rng.cpu"])
    if device is None or device.type != "cuda":
        return  # a CPU run draws nothing from a GPU generator
    state = tensors.get("rng.device")
    if state is None:
        legacy = sorted(key for key in tensors if key.startswith("rng.cuda."))
        state = tensors.get(f"rng.cuda.{device.index or 0}", tensors[legacy[0]] if legacy else None)
    if state is not None:
        torch.cuda.set_rng_state(state, device)


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _save_adapter_files(
    model: Any, folder: Path, base_model_id: str | None, chat_template: str | None = None
) -> None:
    """The PEFT files of ``model`` in ``folder``, naming ``base_model_id`` as their base.

    peft records the path the model was loaded from; a served adapter names the model id
    users know instead, so ``PeftModel.from_pretrained`` finds it on their machines. The
    chat template training rendered conversations with goes beside it, so it serves the same.
    """
    model.save_pretrained(str(folder))
    if chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(chat_template)
    if base_model_id is None:
        return
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_id
    config_path.write_text(json.dumps(config, indent=2))


def _replace_folder(staging: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)


def save_adapter(
    model: Any, folder: Path, base_model_id: str | None = None, chat_template: str | None = None
) -> Path:
    """Write the adapter of PEFT ``model`` into ``folder`` atomically; returns ``folder``.

    A full disk or a killed process leaves the previous folder (or none), never a partial one.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _save_adapter_files(model, staging, base_model_id, chat_template)
        _replace_folder(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def save_checkpoint(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: TrainingPosition,
    extra: dict[str, Any] | None = None,
    base_model_id: str | None = None,
    chat_template: str | None = None,
    device: torch.device | None = None,
) -> CheckpointInfo:
    """Write a complete checkpoint into ``folder`` atomically and return its description.

    ``model`` is a PEFT model; only its adapter is saved, since the base weights never change.
    ``device`` is the training device, whose RNG state is kept (None: the CPU's only).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _save_adapter_files(model, staging / ADAPTER_DIR, base_model_id, chat_template)
        optimizer_state = optimizer.state_dict()
        tensors = _rng_tensors(device)
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(staging / STATE_FILE))
        sidecar = {
            "format_version": FORMAT_VERSION,
            "position": asdict(position),
            "optimizer_param_groups": _json_safe(optimizer_state["param_groups"]),
            "scheduler": _json_safe(scheduler.state_dict()),
            "extra": extra or {},
        }
        (staging / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2))
        _replace_folder(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return CheckpointInfo(position.step, position.epoch, folder, folder / ADAPTER_DIR)


def load_checkpoint(
    folder: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device | None = None,
) -> TrainingPosition:
    """Restore adapter weights, optimizer, scheduler and RNG states; return the position.

    Call it after the model, optimizer and scheduler are built, since building them draws
    from the RNG that this restores. ``device`` is the training device now (its generator
    gets the saved one, whichever GPU index the checkpoint was written on).
    """
    from peft import set_peft_model_state_dict

    sidecar = json.loads((folder / SIDECAR_FILE).read_text())
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format in {folder}")
    adapter_weights = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter_weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint adapter does not fit the model: {result.unexpected_keys}")
    tensors = load_file(str(folder / STATE_FILE))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": sidecar["optimizer_param_groups"]})
    scheduler.load_state_dict(sidecar["scheduler"])
    _restore_rng(tensors, device)
    return TrainingPosition(**sidecar["position"])
