"""Adapter folders appear whole or not at all."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from asft_core.checkpoints import save_adapter


class DiskFillsUp:
    """A model whose save writes part of its files, then meets a full disk."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_config.json").write_text("{}")
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")


class Saves:
    """A model whose save writes a config and weights."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_config.json").write_text('{"base_model_name_or_path": "/tmp/x"}')
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"weights")


def test_a_failed_save_leaves_the_previous_adapter_and_no_partial_files(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    save_adapter(Saves(), folder, base_model_id="tiny-chat")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OSError, match="No space"):
        save_adapter(DiskFillsUp(), folder, base_model_id="tiny-chat")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_saved_config_names_the_base_model_id(tmp_path: Path) -> None:
    folder = save_adapter(Saves(), tmp_path / "adapter", base_model_id="org/base-7b")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base-7b"
    kept = save_adapter(Saves(), tmp_path / "kept")
    assert (
        json.loads((kept / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "/tmp/x"
    )
