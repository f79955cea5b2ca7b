"""Peak memory of computing an alignment direction, relative to the largest tensor pair.

Builds a synthetic base/aligned pair of a few GB on disk (sharded, bf16, 4096-wide layers
with large MLP weights so each model is far bigger than any target tensor), then computes
the direction in a fresh subprocess and reads that process's peak resident set (VmHWM).
A second subprocess that only imports the same modules gives the baseline (torch alone is
a few hundred MB). Prints peak / largest pair, raw and above the baseline.

    python bench/alignment_memory.py [--layers 10] [--hidden 4096] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD_BASELINE = """
import json, torch, asft_core.alignment
print(json.dumps({"peak_kib": int([l for l in open('/proc/self/status')
                                   if l.startswith('VmHWM')][0].split()[1])}))
"""
CHILD_COMPUTE = """
import json, sys, time
from pathlib import Path
from asft_core.alignment import compute_alignment_direction
started = time.monotonic()
artifact = compute_alignment_direction(sys.argv[1], sys.argv[2], Path(sys.argv[3]),
                                       dtype="bfloat16")
peak = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
print(json.dumps({"peak_kib": peak, "seconds": time.monotonic() - started,
                  "modules": len(artifact.modules)}))
"""


def write_model(
    folder: Path, layers: int, hidden: int, intermediate: int, seed: int, shards: int
) -> int:
    """Write a sharded bf16 Llama-shaped checkpoint; returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
    }
    (folder / "config.json").write_text(json.dumps(config))
    weight_map: dict[str, str] = {}
    total = 0
    per_shard = -(-layers // shards)
    for shard in range(shards):
        generator = torch.Generator().manual_seed(seed * 1000 + shard)
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            prefix = f"model.layers.{layer}"
            # Targets differ between the two models; the big MLP weights are filler.
            for module in ("q_proj", "v_proj"):
                base = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(layer))
                noise = torch.randn(hidden, hidden, generator=generator) * 1e-3 * seed
                tensors[f"{prefix}.self_attn.{module}.weight"] = (base + noise).bfloat16()
            tensors[f"{prefix}.self_attn.q_proj.bias"] = torch.zeros(hidden, dtype=torch.bfloat16)
            for module in ("up_proj", "gate_proj"):
                tensors[f"{prefix}.mlp.{module}.weight"] = torch.ones(
                    intermediate, hidden, dtype=torch.bfloat16
                )
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / name))
        total += (folder / name).stat().st_size
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def run_child(code: str, *args: str) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter and parse the JSON line it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Build the pair, measure, print, clean up."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="asft-align-bench-", dir=args.workdir))
    try:
        started = time.monotonic()
        sizes = [
            write_model(
                workdir / name, args.layers, args.hidden, args.intermediate, seed, args.shards
            )
            for seed, name in ((1, "base"), (2, "aligned"))
        ]
        build_s = time.monotonic() - started
        pair_bytes = 2 * args.hidden * args.hidden * 2  # base + aligned target tensor, bf16
        baseline = run_child(CHILD_BASELINE)
        measured = run_child(
            CHILD_COMPUTE,
            str(workdir / "base"),
            str(workdir / "aligned"),
            str(workdir / "direction.safetensors"),
        )
        peak = measured["peak_kib"] * 1024
        above = peak - baseline["peak_kib"] * 1024
        mib = 2**20
        print(
            f"synthetic pair: 2 x {sizes[0] / 2**30:.2f} GiB on disk (built in {build_s:.0f}s), "
            f"{args.layers} layers, hidden {args.hidden}, bf16"
        )
        print(
            f"largest target tensor pair: {pair_bytes / mib:.0f} MiB "
            f"(one V in fp32: {pair_bytes / mib:.0f} MiB)"
        )
        print(
            f"direction computed: {int(measured['modules'])} modules in {measured['seconds']:.1f}s"
        )
        print(
            f"peak RSS: {peak / mib:.0f} MiB; baseline (imports only): "
            f"{baseline['peak_kib'] / 1024:.0f} MiB"
        )
        print(f"ratio peak RSS / largest pair: {peak / pair_bytes:.2f}")
        print(f"ratio (peak - baseline) / largest pair: {above / pair_bytes:.2f}")
        print(f"ratio peak RSS / one model on disk: {peak / sizes[0]:.3f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
