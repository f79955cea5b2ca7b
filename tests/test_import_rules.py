"""The architecture's import rules, enforced.

asft_core never imports web, queue or database code; the API never loads torch; the shared
``service`` package never imports FastAPI, the API or the worker (so it raises no HTTP
errors); the worker never imports the API; the API never imports the client (the ``asft``
command sits above both); and ``asft_core/__init__.py`` stays light so
``asft_core.formats`` can be shared.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORE = {
    "fastapi",
    "starlette",
    "celery",
    "sqlalchemy",
    "alembic",
    "api",
    "service",
    "worker",
    "asft",
}
# Package -> the top-level packages its files may not import.
LAYER_RULES = {
    "service": {"fastapi", "starlette", "api", "worker", "asft", "asft_client"},
    "worker": {"fastapi", "starlette", "api", "asft", "asft_client"},
    "api": {"worker", "asft", "asft_client", "torch", "transformers", "peft"},
    "asft_client": {"api", "service", "worker", "asft", "torch"},
    "inference": {"api", "service", "worker", "asft", "asft_client", "sqlalchemy", "celery"},
}
HEAVY = ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy")


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a Python file imports (absolute imports only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_no_web_queue_or_db_code() -> None:
    files = sorted((REPO_ROOT / "asft_core").rglob("*.py"))
    assert files, "asft_core has no Python files"
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_roots(path) & FORBIDDEN_IN_CORE)
        for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_each_layer_imports_only_what_it_may(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"{package} has no Python files"
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_roots(path) & LAYER_RULES[package])
        for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def _loaded_modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return {line.split(".")[0] for line in result.stdout.splitlines()}


@pytest.mark.parametrize(
    "statement",
    [
        "import api",
        "import api.main; api.main.create_app()",
        "import service.settings",
        "import asft_core",
        "import asft_core.formats",
        "import asft_core.spec",
        "import asft_core.zoo",
        "import asft.cli",
        "import asft_client.demo",
        "import asft_client.cli",
    ],
)
def test_light_imports_do_not_load_the_ml_stack(statement: str) -> None:
    loaded = _loaded_modules_after(statement)
    assert {"asft_core", "api", "service", "asft", "asft_client"} & loaded
    assert sorted(loaded & set(HEAVY)) == []
