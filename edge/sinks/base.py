"""The interface of every sink: something that receives label records."""

from __future__ import annotations

import abc
from typing import Any

from edgelabel.edge.frame import Frame
from edgelabel.edge.records import LabelRecord


class SinkRefused(RuntimeError):
    """A sink could not take a record (refused while stopping, storage failed).

    The pipeline then does not mark the frame done, so a storage job labels it
    again on the next start instead of losing it.
    """


class Sink(abc.ABC):
    """Receives every record in order from the single sink worker thread."""

    name: str = "sink"

    def open(self) -> None:
        """Connect or create files; must not block on an absent broker."""

    def prepare(self, record: LabelRecord, frame: Frame) -> None:
        """Called before ``write`` on every sink, in order: a sink may fill
        ``record.frame_path``/``frame_sha256`` here (the dataset stores the pixels)."""

    @abc.abstractmethod
    def write(self, record: LabelRecord, frame: Frame) -> None:
        """Deliver one record; failures are reported in ``status``.

        Raises SinkRefused when the record was not taken (the frame is then not marked done).
        """

    def source_status(self, source: str, status: str) -> None:
        """A source changed state (online, reconnecting, offline, finished, disabled)."""

    def waiting(self) -> bool:
        """True while ``write`` blocks on purpose (back-pressure), so the watchdog does not call it stuck."""
        return False

    def stuck(self) -> str | None:
        """Why a thread of this sink cannot go on without a restart (the watchdog is then withheld), else None."""
        return None

    def interrupt(self) -> None:
        """The daemon is stopping: release a ``write`` blocked on back-pressure (it raises SinkRefused)."""

    def events(self, events: list[dict[str, Any]]) -> None:
        """Track events (new / update / end) produced while handling the last record."""

    def stats(self, snapshot: dict[str, Any]) -> None:
        """The daemon's status snapshot, every ``mqtt.stats_interval`` seconds."""

    def flush(self) -> None:
        """Make everything written so far durable/delivered as far as possible."""

    def close(self) -> None:
        """Flush and release; called once at shutdown."""

    def status(self) -> dict[str, Any]:
        """A small JSON-able snapshot for status pages."""
        return {}
