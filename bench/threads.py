"""Two torch processes on the same cores: how much slower each gets, spinning or sleeping.

Runs the same LoRA-free training loop of a zoo-sized Llama (full weights, AdamW) alone and
then two copies at once, under OpenMP's spinning wait policy (``ACTIVE``: libgomp's threads
busy-wait between parallel regions) and the sleeping one ``asft_core`` sets by default
(``PASSIVE``), every process with as many threads as the machine has cores. Prints each
median and the slowdown of a pair over one alone. Target: a pair takes about 2x, not 4x.

    python bench/threads.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
batch = torch.randint(0, 512, (32, 64))
def step():
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(3):
    step()
started = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(time.perf_counter() - started)
"""


def run(policy: str, copies: int, steps: int) -> float:
    """Seconds of the slowest of ``copies`` processes started together under ``policy``."""
    cores = str(len(os.sched_getaffinity(0)))
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": cores}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(steps)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(copies)
    ]
    return max(float(p.communicate()[0]) for p in processes)


def main() -> None:
    """Measure and print the slowdowns."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for policy in ("ACTIVE", "PASSIVE"):
            for copies in (1, 2):
                times.setdefault((policy, copies), []).append(run(policy, copies, args.steps))
    print(f"cores={len(os.sched_getaffinity(0))} steps={args.steps} repeats={args.repeats}")
    alone_active = statistics.median(times[("ACTIVE", 1)])
    for policy in ("ACTIVE", "PASSIVE"):
        alone, pair = (statistics.median(times[(policy, n)]) for n in (1, 2))
        print(
            f"{policy:<7} alone {alone:.2f}s, two at once {pair:.2f}s: "
            f"slowdown {pair / alone:.1f}x (target about 2x); alone vs ACTIVE alone "
            f"{alone / alone_active:.2f}x"
        )
    print(f"{time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
