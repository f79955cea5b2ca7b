"""No pickle is ever loaded from a user-supplied or downloaded file.

Weights are safetensors (tensors only, no code); a pickle (``pytorch_model.bin``, ``.pkl``,
``.npy`` with objects) can run code when loaded. A scan of the service's source (ast, not
grep) refuses pickle-family imports, ``torch.load`` without ``weights_only=True``, model loads
that allow pickles or remote code, and ``numpy.load(allow_pickle=True)``; then a model folder
holding only a booby-trapped ``pytorch_model.bin`` is shown to be refused without being
unpickled; and the queue accepts JSON messages only.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from service.queue import make_celery
from service.settings import Settings
from tests.conftest import REPO_ROOT

PACKAGES = ("asft_core", "api", "worker", "asft_client")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
# transformers classes that load weights (tokenizers and configs are JSON and text files).
MODEL_LOADERS = ("AutoModel", "PreTrainedModel")


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _call_offences(call: ast.Call, owner: str, method: str) -> list[str]:
    """Why ``owner.method(...)`` could load a pickle or run downloaded code (empty: it cannot)."""
    why: list[str] = []
    if (owner, method) == ("torch", "load") and not _is_constant(
        _keyword(call, "weights_only"), True
    ):
        why.append("torch.load without weights_only=True")
    if method in ("read_pickle", "loads") and owner in ("pandas", "pd", "pickle"):
        why.append(f"{owner}.{method}")
    allow_pickle = _keyword(call, "allow_pickle")
    numpy_load = owner in ("numpy", "np") and method == "load"
    if numpy_load and allow_pickle is not None and not _is_constant(allow_pickle, False):
        why.append("numpy.load with allow_pickle")
    if method == "from_pretrained":
        remote = _keyword(call, "trust_remote_code")
        if remote is not None and not _is_constant(remote, False):
            why.append(f"{owner}.from_pretrained with trust_remote_code")
        safetensors = _keyword(call, "use_safetensors")
        if owner.startswith(MODEL_LOADERS) and not _is_constant(safetensors, True):
            why.append(f"{owner}.from_pretrained without use_safetensors=True")
    return why


def offences(source: str, filename: str = "<source>") -> list[str]:
    """What in ``source`` could load a pickle or run downloaded code, as 'file:line: why'."""
    found: list[str] = []

    def report(node: ast.AST, why: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {why}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    report(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                report(node, f"imports from {node.module}")
            if module == "torch" and any(alias.name == "load" for alias in node.names):
                report(node, "imports torch.load by name (the scan checks torch.load calls)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            for why in _call_offences(node, ast.unparse(node.func.value), node.func.attr):
                report(node, why)
    return found


def test_the_scan_finds_each_kind_of_offence() -> None:
    # The scan must be able to fail: each line below is one offence.
    source = "\n".join(
        [
            "import pickle",
            "import joblib.numpy_pickle",
            "from dill import loads",
            "from torch import load",
            "torch.load(path)",
            "torch.load(path, weights_only=False)",
            "torch.load(path, weights_only=flag)",
            "np.load(path, allow_pickle=True)",
            "pd.read_pickle(path)",
            "AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
            "AutoModelForCausalLM.from_pretrained(path)",
            "AutoModelForCausalLM.from_pretrained(path, use_safetensors=False)",
        ]
    )
    found = offences(source)
    assert [int(line.split(":")[1]) for line in found] == list(range(1, 13)), found
    harmless = "\n".join(
        [
            "import json",
            "torch.load(path, weights_only=True)",
            "np.load(path)",
            "np.load(path, allow_pickle=False)",
            "AutoTokenizer.from_pretrained(path)",
            "AutoModelForCausalLM.from_pretrained(path, dtype=d, use_safetensors=True)",
            "PeftModel.from_pretrained(model, folder)",
        ]
    )
    assert offences(harmless) == []


def test_the_service_never_loads_a_pickle() -> None:
    sources = sorted(path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))
    assert len(sources) > 40  # the scan saw the packages, not an empty folder
    found = [
        offence
        for path in sources
        for offence in offences(path.read_text(), str(path.relative_to(REPO_ROOT)))
    ]
    assert found == []


class _Trap:
    """Unpickling this creates its marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def trapped_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder (config, tokenizer) whose only weights are a booby-trapped pickle."""
    from transformers import LlamaConfig

    from asft_core.zoo.tokenizer import save_tokenizer, train_tokenizer

    folder, marker = tmp_path / "model", tmp_path / "unpickled"
    save_tokenizer(train_tokenizer(["hello world"] * 10, vocab_size=300), folder)
    LlamaConfig(
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    ).save_pretrained(str(folder))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Trap(marker)}))
    return folder, marker


def test_a_pickled_model_is_refused_unread(trapped_model: tuple[Path, Path]) -> None:
    import torch

    from asft_core.training import load_model_and_tokenizer

    folder, marker = trapped_model
    with pytest.raises(OSError, match="safetensors"):
        load_model_and_tokenizer(str(folder), torch.float32, torch.device("cpu"))
    assert not marker.exists()


@pytest.mark.parametrize("broker_url", [None, "redis://127.0.0.1:6379/0"])
def test_the_queue_accepts_json_only(tmp_path: Path, broker_url: str | None) -> None:
    # A pickled message on the broker would be code run by the worker; Celery refuses
    # content types outside accept_content before decoding them.
    conf = make_celery(Settings(_env_file=None, data_dir=tmp_path, broker_url=broker_url)).conf
    assert conf.task_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.result_serializer == "json"
    assert conf.result_accept_content is None or list(conf.result_accept_content) == ["json"]
    assert conf.event_serializer == "json"
