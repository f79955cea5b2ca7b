"""Two torch processes on the same cores: how much slower each gets, spinning or sleeping.

Runs the same training loop of a zoo-sized Llama (full weights, AdamW) alone and then two
copies at once, every process with as many threads as the machine has cores, under three
OpenMP waits: libgomp's default (idle threads spin for a while, ``OMP_WAIT_POLICY`` unset),
a short spin (``GOMP_SPINCOUNT=10000``) and sleeping at once (``OMP_WAIT_POLICY=PASSIVE``).
Prints each median and the slowdown of a pair over one alone. Target: a pair takes about
2x, not 4x, at little cost to a process alone.

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


# Name -> the OpenMP variables of that wait.
WAITS: dict[str, dict[str, str]] = {
    "default": {},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def run(wait: str, copies: int, steps: int) -> float:
    """Seconds of the slowest of ``copies`` processes started together under ``wait``."""
    cores = str(len(os.sched_getaffinity(0)))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env = {**clean, **WAITS[wait], "OMP_NUM_THREADS": cores}
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
        for wait in WAITS:
            for copies in (1, 2):
                times.setdefault((wait, copies), []).append(run(wait, copies, args.steps))
    print(f"cores={len(os.sched_getaffinity(0))} steps={args.steps} repeats={args.repeats}")
    alone_default = statistics.median(times[("default", 1)])
    for wait in WAITS:
        alone, pair = (statistics.median(times[(wait, n)]) for n in (1, 2))
        print(
            f"{wait:<10} alone {alone:.2f}s, two at once {pair:.2f}s: slowdown "
            f"{pair / alone:.1f}x (target about 2x); alone vs default {alone / alone_default:.2f}x"
        )
    print(f"{time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
