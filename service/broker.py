"""The embedded default's broker: Kombu's filesystem transport, safe between processes.

Kombu's own channel creates a message file and only then writes it, and a consumer polling
the folder can take the file in between: it reads an empty message, and the Celery worker
stops with an unrecoverable JSON error, leaving every queued job without a worker. Here a
message is written whole under a name no consumer takes and renamed into place, and a
consumer that still meets a file it cannot decode (one written by another program) leaves
it a few seconds to be finished, then sets it aside in ``rejected/`` and goes on.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from service.storage import write_atomically

logger = logging.getLogger("asft.broker")
# The transport as Celery's ``broker_transport`` setting names it.
TRANSPORT = "service.broker:Transport"
# A message file this recent that cannot be decoded may still be being written by a program
# that does not write atomically; it is only rejected once older.
STILL_WRITTEN_S = 5.0
# The longest a worker's wait for a message lasts before it looks for a stop request again.
DRAIN_WAIT_S = 0.2


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear whole, or not at all."""

    # Kombu's two base classes name the second parameter differently; callers pass it by
    # position.
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # The same names as Kombu's (creation order, then the queue), so both can share a
        # folder during an upgrade.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        write_atomically(Path(self.data_folder_out) / name, str_to_bytes(dumps(message)))

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        wanted = f"{queue}.msg"
        inbox = Path(self.data_folder_in)
        taken_folder = Path(self.processed_folder)
        for name in sorted(os.listdir(inbox)):
            if name.partition(".")[2] != wanted:
                continue
            taken = taken_folder / name
            try:
                # A rename in one filesystem: of several consumers exactly one wins.
                os.rename(inbox / name, taken)
            except OSError:  # taken by another consumer (or unreadable): next one
                continue
            try:
                message = loads(bytes_to_str(taken.read_bytes()))
            except (OSError, ValueError):
                message = None
            if not isinstance(message, dict):
                self._set_aside(taken, inbox / name)
                continue
            if not self.store_processed:
                taken.unlink()
            return message
        raise Empty()

    def _set_aside(self, taken: Path, original: Path) -> None:
        """Move an unreadable message to ``rejected/``; a young one goes back to the inbox, as
        another program (Kombu's own channel) may still be writing it."""
        if time.time() - taken.stat().st_mtime < STILL_WRITTEN_S:
            os.replace(taken, original)
            return
        rejected = taken.parent.parent / "rejected"
        rejected.mkdir(exist_ok=True)
        os.replace(taken, rejected / taken.name)
        logger.error("broker message %s is not a message; moved to %s", taken.name, rejected)


class Transport(filesystem.Transport):
    """Kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        """Wait at most ``DRAIN_WAIT_S`` per call: Celery's blocking loop asks for 2 s and only
        looks for a stop request between calls, so an idle worker took seconds to stop."""
        if timeout is not None:
            timeout = min(timeout, DRAIN_WAIT_S)
        return super().drain_events(connection, timeout=timeout, **kwargs)
