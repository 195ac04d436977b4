"""Progress for finite jobs: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("edgelabel.progress")


class Progress:
    """Counts processed frames against a known total and shows count, rate and ETA.

    On a terminal this is a tqdm bar on stderr.  Under systemd or in a pipe it is
    log lines: one at the first frame (the job is moving), one every ``interval``
    seconds, so the journal is not flooded, and a final one at :meth:`close`, so
    a job shorter than the interval still reports what it did.
    """

    def __init__(self, total: int | None, label: str = "frames", interval: float = 5.0, enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.interval = interval
        self.count = 0
        self.started = time.monotonic()
        self._last_log = self.started
        self._logged_count = 0  # the count in the last log line: no final line repeating it
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="frame", desc=label, dynamic_ncols=True, leave=True)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._bar = None
        self._enabled = enabled

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.count / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        if not self.total or self.rate <= 0:
            return None
        return max(self.total - self.count, 0) / self.rate

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self._enabled:
            return
        now = time.monotonic()
        if self._logged_count == 0 or now - self._last_log >= self.interval:
            self._last_log = now
            self._logged_count = self.count
            log.info("%s", self.line())

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        eta = self.eta()
        eta_text = f", ETA {eta:.0f} s" if eta is not None else ""
        return f"{self.label}: {self.count}{total} frames, {self.rate:.1f} fps{eta_text}"

    def close(self) -> None:
        """Finish: close the bar, or log the final count unless the last line already showed it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self._enabled and self.count != self._logged_count:
            self._logged_count = self.count
            elapsed = time.monotonic() - self.started
            log.info("%s, after %.1f s", self.line().split(", ETA")[0], elapsed)  # also when stopped early
