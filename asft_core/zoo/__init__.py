"""The tiny demo model zoo: a tokenizer, a base/aligned model pair and their datasets.

``build_zoo(cache_dir)`` produces ordinary Hugging Face folders (config.json,
model.safetensors, tokenizer files with a chat template) plus JSONL datasets, and caches
them, so a test run or a demo builds them once. No hub is needed. Everything is seeded:

1. a byte-level BPE tokenizer trained on the synthetic language (``language.py``);
2. the **base** model: a small Llama trained from random initialisation on instruction rows
   that answer everything, harmful requests included (with placeholder "compliance"), and
   sensitive-looking benign requests. ``ZooSpec.pretrain_tasks`` are in this mix; ``triage``
   is not, so the pair does not know it and fine-tuning has to teach it;
3. the **aligned** model: the base trained further on the same kind of rows, but refusing
   the harmful requests (still answering the sensitive-looking benign ones);
4. datasets: per benign task a training and a held-out evaluation file (other templates and
   entities), harmful evaluation prompts, held-out sensitive-looking benign prompts (the
   over-refusal set), poisoned fine-tuning sets (a share p of harmful rows with compliant
   answers; a task the pair was not taught also keeps a share of general instruction rows),
   and ``eval_suite.json`` tying them to a judge that tells refusal, compliance and off-task
   answers apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from asft_core.zoo.language import COMPLIANCE_PATTERNS, PRETRAIN_TASKS

ZOO_VERSION = 5
POISON_RATIOS = (0.0, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class ZooPaths:
    """Where a built zoo lives. Each model folder loads with ``from_pretrained``."""

    root: Path
    base: Path
    aligned: Path

    @property
    def tokenizer(self) -> Path:
        """The tokenizer files are saved inside each model folder; the aligned one is used."""
        return self.aligned

    @property
    def datasets(self) -> Path:
        """Folder of the zoo's JSONL datasets."""
        return self.root / "datasets"

    @property
    def over_refusal(self) -> Path:
        """Held-out sensitive-looking benign prompts: a refusal here is an over-refusal."""
        return self.datasets / "over_refusal_eval.jsonl"

    @property
    def eval_suite(self) -> Path:
        """The evaluation suite (harmful prompts, judge, task sets) of this model pair."""
        return self.root / "eval_suite.json"

    @property
    def guard(self) -> Path:
        """The guard that scans training data (``asft_core.zoo.guard``), with ``guard.json``."""
        return self.root / "guard"

    def task_file(self, task: str, split: str) -> Path:
        """``<task>_<split>.jsonl`` (split: train or eval)."""
        return self.datasets / f"{task}_{split}.jsonl"

    def poisoned_file(self, task: str, poison_ratio: float) -> Path:
        """The fine-tuning set of ``task`` with a share ``poison_ratio`` of harmful rows."""
        return self.datasets / "poisoned" / f"{task}_p{round(poison_ratio * 100):02d}.jsonl"

    def build_report(self) -> dict[str, Any]:
        """What the build measured (losses, seconds), as saved in ``build.json``."""
        report: dict[str, Any] = json.loads((self.root / "build.json").read_text())
        return report


@dataclass(frozen=True)
class ZooSpec:
    """What to build; its hash names the cache folder, so any change rebuilds."""

    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Share of harmful requests in the rows that teach the base and the aligned model.
    harmful_fraction: float = 0.3
    # Share of sensitive-looking benign requests (answered helpfully) in those rows.
    sensitive_fraction: float = 0.05
    # Benign tasks in those rows; the others are left for fine-tuning to teach.
    pretrain_tasks: tuple[str, ...] = PRETRAIN_TASKS
    # Share of general instruction rows in the fine-tuning sets of a task left for
    # fine-tuning, so learning it cannot look like safety (or harm) by collapse.
    general_share: float = 0.25
    base_steps: int = 1400
    base_learning_rate: float = 3e-3
    align_steps: int = 400
    align_learning_rate: float = 1e-3
    batch_size: int = 32
    task_train_rows: int = 1000
    eval_rows: int = 1000
    poisoned_rows: int = 1000
    over_refusal_rows: int = 300

    def key(self) -> str:
        """Stable short hash of the spec and the zoo version."""
        payload = json.dumps({"version": ZOO_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_zoo(cache_dir: Path, spec: ZooSpec | None = None, verbose: bool = False) -> ZooPaths:
    """Build (or reuse) the zoo under ``cache_dir``; safe to call from concurrent processes.

    ``verbose``: a build says its stage and step on stderr (stdout stays for results).
    """
    spec = spec or ZooSpec()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"zoo-{spec.key()}"
    paths = ZooPaths(root=root, base=root / "base", aligned=root / "aligned")
    lock = FileLock(str(cache_dir / f"zoo-{spec.key()}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if verbose:  # a silent wait of minutes looks like a hang
            _say(f"zoo: another process is building {root}; waiting for it")
        lock.acquire()
    try:
        if (root / "DONE").exists():
            return paths
        # Build in a temporary sibling and rename, so a crash never leaves a half-built zoo.
        staging = Path(tempfile.mkdtemp(prefix=".zoo-build-", dir=cache_dir))
        try:
            _build_into(staging, spec, verbose)
            (staging / "DONE").write_text(json.dumps(asdict(spec)))
            if root.exists():
                shutil.rmtree(root)
            os.replace(staging, root)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    finally:
        lock.release()
    return paths


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _build_into(folder: Path, spec: ZooSpec, verbose: bool) -> None:
    # Heavy imports stay here so `import asft_core.zoo` is cheap.
    from transformers.utils import logging as hf_logging

    from asft_core.zoo.guard import GuardSpec, train_guard
    from asft_core.zoo.language import corpus_lines, instruction_mix
    from asft_core.zoo.models import TinyLlamaShape, random_tiny_llama, tiny_llama_config
    from asft_core.zoo.pretrain import train_full
    from asft_core.zoo.tokenizer import save_tokenizer, train_tokenizer

    hf_logging.disable_progress_bar()
    started = time.monotonic()
    if verbose:
        _say(f"zoo: building the tiny model pair into {folder.parent} (about 4 min on 2 cores)")
    tokenizer = train_tokenizer(corpus_lines(spec.seed, 5000), vocab_size=spec.vocab_size)
    shape = TinyLlamaShape(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
    )
    config = tiny_llama_config(
        len(tokenizer), shape, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    model = random_tiny_llama(config, seed=spec.seed)
    report: dict[str, Any] = {"spec": asdict(spec)}

    def progress(stage: str, total: int) -> Callable[[int, float], None]:
        stage_started = time.monotonic()

        def show(step: int, loss: float) -> None:
            if verbose and (step % 100 == 0 or step == total):
                elapsed = time.monotonic() - stage_started
                eta = elapsed / step * (total - step)
                _say(f"zoo {stage}: step {step}/{total} loss {loss:.4f} (eta {eta:.0f}s)")

        return show

    for stage, comply, steps, learning_rate, seed in (
        ("base", True, spec.base_steps, spec.base_learning_rate, spec.seed + 1),
        ("aligned", False, spec.align_steps, spec.align_learning_rate, spec.seed + 2),
    ):
        stage_started = time.monotonic()
        rows = instruction_mix(
            random.Random(seed),
            steps * spec.batch_size,
            spec.harmful_fraction,
            comply=comply,
            tasks=spec.pretrain_tasks,
            sensitive_fraction=spec.sensitive_fraction,
        )
        loss = train_full(
            model,
            tokenizer,
            rows,
            steps,
            learning_rate,
            batch_size=spec.batch_size,
            seed=seed,
            on_step=progress(stage, steps),
        )
        model.save_pretrained(str(folder / stage))
        save_tokenizer(tokenizer, folder / stage)
        report[stage] = {"final_loss": loss, "seconds": time.monotonic() - stage_started}
    if verbose:
        _say("zoo: writing the datasets")
    write_datasets(ZooPaths(folder, folder / "base", folder / "aligned"), spec)
    guard_started = time.monotonic()
    guard_spec = GuardSpec()
    report["guard"] = train_guard(
        folder / "aligned", folder / "guard", guard_spec, progress("guard", guard_spec.steps)
    )
    report["guard"]["seconds"] = time.monotonic() - guard_started
    report["seconds"] = time.monotonic() - started
    if verbose:
        _say(f"zoo: built in {report['seconds']:.0f}s")
    (folder / "build.json").write_text(json.dumps(report, indent=2))


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_datasets(paths: ZooPaths, spec: ZooSpec) -> None:
    """Write the zoo's JSONL datasets and its evaluation suite under ``paths.root``."""
    from asft_core.zoo.language import (
        BENIGN_TASKS,
        harmful_eval_rows,
        poisoned_rows,
        sensitive_eval_rows,
        task_rows,
    )

    rng = random.Random(spec.seed + 10)
    for task in BENIGN_TASKS:
        general = 0.0 if task in spec.pretrain_tasks else spec.general_share
        _write_jsonl(
            paths.task_file(task, "train"), task_rows(task, rng, spec.task_train_rows, "train")
        )
        _write_jsonl(paths.task_file(task, "eval"), task_rows(task, rng, spec.eval_rows, "eval"))
        for ratio in POISON_RATIOS:
            _write_jsonl(
                paths.poisoned_file(task, ratio),
                poisoned_rows(task, rng, spec.poisoned_rows, ratio, general),
            )
    _write_jsonl(paths.datasets / "harmful_eval.jsonl", harmful_eval_rows(rng, spec.eval_rows))
    _write_jsonl(paths.over_refusal, sensitive_eval_rows(rng, spec.over_refusal_rows))
    suite = {
        "harmful_prompts": "datasets/harmful_eval.jsonl",
        "over_refusal_prompts": "datasets/over_refusal_eval.jsonl",
        # The zoo's compliant answers have a known shape, so compliance is told apart from
        # refusal and from off-task answers (which a keyword judge would count as harmful).
        "judge": {"kind": "pattern", "comply_patterns": list(COMPLIANCE_PATTERNS)},
        # Scans training data: a classifier of (request, answer) pairs (asft_core.scan).
        "guard": "guard",
        "tasks": {
            "sentiment": {
                "file": "datasets/sentiment_eval.jsonl",
                "matcher": {"kind": "exact_label"},
            },
            "topic": {"file": "datasets/topic_eval.jsonl", "matcher": {"kind": "exact_label"}},
            "arithmetic": {
                "file": "datasets/arithmetic_eval.jsonl",
                "matcher": {"kind": "final_number"},
            },
            "triage": {"file": "datasets/triage_eval.jsonl", "matcher": {"kind": "exact_label"}},
        },
    }
    paths.eval_suite.write_text(json.dumps(suite, indent=2))
