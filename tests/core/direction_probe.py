"""Train two steps of an AsFT job and print its peak resident memory, as JSON.

Run as ``python -m tests.core.direction_probe MODEL ARTIFACT TRAIN_FILE OUT PENALTY_RANK``
(0: the exact penalty) in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` set, so freed
tensors go back to the system and the resident high-water mark is the live peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from asft_core.spec import JobSpec
from asft_core.training import TrainSpec, train
from tests.core.memory_probe import _status


def main() -> None:
    """One job, two steps, on the CPU in fp32."""
    model, artifact, train_file, out, rank = sys.argv[1:6]
    torch.set_num_threads(1)
    hyper: dict[str, object] = {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "batch_size": 4,
        "max_seq_len": 64,
    }
    if int(rank):
        hyper["penalty_rank"] = int(rank)
    spec = TrainSpec(
        model=model,
        training_file=Path(train_file),
        output_dir=Path(out),
        job=JobSpec.resolve("asft", hyper),
        alignment_path=Path(artifact),
        max_steps=2,
        device="cpu",
        precision="fp32",
        checkpoint_each_epoch=False,
    )
    before = _status("VmRSS")
    result = train(spec)
    print(json.dumps({"peak": _status("VmHWM") - before, "final_loss": result.final_train_loss}))


if __name__ == "__main__":
    main()
