"""The tiny demo model zoo: a tokenizer and a base/aligned model pair built offline.

``build_zoo(cache_dir)`` produces ordinary Hugging Face folders (config.json,
model.safetensors, tokenizer files with a chat template) and caches them, so a test run or
a demo builds them once. No hub is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

ZOO_VERSION = 1


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


@dataclass(frozen=True)
class ZooSpec:
    """What to build; its hash names the cache folder, so a change rebuilds."""

    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    def key(self) -> str:
        """Stable short hash of the spec and the zoo version."""
        payload = json.dumps({"version": ZOO_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_zoo(cache_dir: Path, spec: ZooSpec | None = None) -> ZooPaths:
    """Build (or reuse) the zoo under ``cache_dir``; safe to call from concurrent processes."""
    spec = spec or ZooSpec()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"zoo-{spec.key()}"
    paths = ZooPaths(root=root, base=root / "base", aligned=root / "aligned")
    with FileLock(str(cache_dir / f"zoo-{spec.key()}.lock")):
        if (root / "DONE").exists():
            return paths
        # Build in a temporary sibling and rename, so a crash never leaves a half-built zoo.
        staging = Path(tempfile.mkdtemp(prefix=".zoo-build-", dir=cache_dir))
        try:
            _build_into(staging, spec)
            (staging / "DONE").write_text(json.dumps(asdict(spec)))
            if root.exists():
                shutil.rmtree(root)
            os.replace(staging, root)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return paths


def _build_into(folder: Path, spec: ZooSpec) -> None:
    # Heavy imports stay here so `import asft_core.zoo` is cheap.
    from transformers.utils import logging as hf_logging

    from asft_core.zoo.language import corpus_lines
    from asft_core.zoo.models import (
        TinyLlamaShape,
        perturb_towards_alignment,
        random_tiny_llama,
        tiny_llama_config,
    )
    from asft_core.zoo.tokenizer import save_tokenizer, train_tokenizer

    hf_logging.disable_progress_bar()

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
    for name in ("base", "aligned"):
        if name == "aligned":
            perturb_towards_alignment(model, seed=spec.seed + 1)
        model.save_pretrained(str(folder / name))
        save_tokenizer(tokenizer, folder / name)
