"""What ``asft serve`` tells the API about the processes it supervises.

``asft serve`` runs the API, a worker and the inference engine as children and restarts any
that dies; it writes their state to ``<data_dir>/run/supervisor.json`` (atomically) on every
change, and ``/readyz`` reports a child that is down. Without ``asft serve`` (scale-out) there
is no file and nothing to report.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any


def status_path(data_dir: Path) -> Path:
    """Where ``asft serve`` keeps its children's state."""
    return data_dir / "run" / "supervisor.json"


def write_status(path: Path, children: dict[str, dict[str, Any]]) -> None:
    """Replace the status file with ``children`` (name -> up, pid, restarts, last exit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"supervisor_pid": os.getpid(), "children": children})
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".supervisor-")
    with os.fdopen(handle, "w") as out:
        out.write(body)
    os.replace(temporary, path)


def children_down(path: Path) -> dict[str, dict[str, Any]]:
    """The supervised children that are down now (empty without a live ``asft serve``)."""
    try:
        status = json.loads(path.read_text())
        # A file left by a serve that is gone says nothing about the processes now.
        os.kill(int(status["supervisor_pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: child for name, child in status["children"].items() if not child.get("up")}


def describe_exit(code: int) -> str:
    """``exit 1``, or ``killed by SIGKILL`` (the out-of-memory killer sends that)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
