"""Failed authentication, counted per client address, across all addresses and per user name.

Why this shape (web/auth.py uses these; docs/web.md has the numbers):

* ``FailureThrottle`` counts failures per address and across all addresses.  One address over its limit
  waits until its oldest failure ages out; a spray from many addresses triggers a short global penalty that
  spares the addresses that authenticated within the hour, so a spray cannot lock out every operator.
* ``CredentialThrottle`` counts wrong passwords per user name whatever the address, for a guesser who
  spreads over many addresses.  A name over its limit is refused for the rest of the window, except from
  the addresses where it logged in successfully lately: an attacker can slow down guessing of a name, not
  lock its owner out of the desk they use.
* Both summarize in the log: the first failure of an address or name in a window, the start of a block and
  the start of a global penalty each log one line; after ``MAX_LINES`` first-failure lines in a window the
  rest are counted and reported as one line when the next window starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque

log = logging.getLogger("edgelabel.web")

#: failed logins allowed per address and window before that address is refused for the window
MAX_FAILURES = 5
FAILURE_WINDOW = 300.0
#: failed logins from all addresses together per window before new addresses wait GLOBAL_LOGIN_PENALTY s
GLOBAL_LOGIN_FAILURES = 30
GLOBAL_LOGIN_PENALTY = 30.0
#: wrong bearer tokens per address and window; across all addresses; and the global penalty
BEARER_FAILURES = 20
BEARER_WINDOW = 60.0
GLOBAL_BEARER_FAILURES = 200
GLOBAL_BEARER_PENALTY = 10.0
#: wrong passwords per user name (from any address) and window; how long a good login exempts its address
NAME_FAILURES = 10
NAME_WINDOW = 900.0
NAME_TRUST = 30 * 86400.0
#: first-failure lines per window before the rest are only counted
MAX_LINES = 10


def _make_room(table: OrderedDict[str, deque[float]], now: float, window: float, max_failures: int) -> None:
    """Drop one entry from a full table: one whose failures have aged out, else the oldest that is not blocked,
    else the oldest.  Evicting the oldest blindly would let failures under throwaway names or addresses push a
    blocked entry out and hand its guesser a fresh allowance."""
    victim = None
    for key, q in table.items():
        if not q or now - q[-1] > window:
            victim = key
            break
        if victim is None and len(q) < max_failures:
            victim = key
    if victim is None:
        table.popitem(last=False)
    else:
        del table[victim]


class _Lines:
    """At most MAX_LINES first-failure lines per window; the rest counted and reported once."""

    def __init__(self, window: float, what: str) -> None:
        self.window, self.what = window, what
        self._start = -1e18
        self._lines = 0
        self._unlogged = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(whether to log this first failure, failures left unlogged in the window that just ended)."""
        ended = 0
        if now - self._start > self.window:
            ended, self._start, self._lines, self._unlogged = self._unlogged, now, 0, 0
        if self._lines < MAX_LINES:
            self._lines += 1
            return True, ended
        self._unlogged += 1
        return False, ended

    def report(self, ended: int) -> None:
        if ended:
            log.warning("web: %d more wrong %s tries from further sources in the previous %.0f s were counted, "
                        "not logged", ended, self.what, self.window)


class FailureThrottle:
    """Counts failures per client address and across all addresses; says for how long a client must wait.

    * ``max_failures`` in ``window`` s from one address: that address waits until its oldest failure is out
      of the window.
    * ``global_failures`` in ``window`` s from all addresses together: every address that has not
      authenticated in the last hour waits ``global_penalty`` s (shorter: a spray must not lock everyone out).
    * Logging is summarized (see the module docstring).
    """

    def __init__(self, what: str = "login", max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 global_failures: int = GLOBAL_LOGIN_FAILURES, global_penalty: float = GLOBAL_LOGIN_PENALTY,
                 max_addresses: int = 1000) -> None:
        self.what = what
        self.max_failures = max_failures
        self.window = window
        self.global_failures = global_failures
        self.global_penalty = global_penalty
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()
        self._global_until = 0.0
        self._good: OrderedDict[str, float] = OrderedDict()
        self._lines = _Lines(window, what)
        self._lock = threading.Lock()

    def _recent(self, addr: str, now: float) -> deque[float]:
        q = self._failures.get(addr)
        if q is None:
            if len(self._failures) >= self.max_addresses:  # bounded memory; a blocked address stays
                _make_room(self._failures, now, self.window, self.max_failures)
            q = self._failures[addr] = deque()
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, addr: str) -> float:
        """Seconds this address must wait before its next try; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(addr, now) if addr in self._failures else deque()  # reading adds no entry
            wait = self.window - (now - q[0]) if len(q) >= self.max_failures else 0.0
            if now < self._global_until and not self._trusted(addr, now):
                wait = max(wait, self._global_until - now)
            return max(0.0, wait)

    def blocked(self, addr: str) -> bool:
        """Whether this address must wait now."""
        return self.retry_after(addr) > 0

    def _trusted(self, addr: str, now: float) -> bool:
        seen = self._good.get(addr)
        return seen is not None and now - seen < 3600.0

    def failed(self, addr: str) -> None:
        """Count one failure (and log it when it is the first of its kind in the window)."""
        now = time.monotonic()
        ended = 0
        with self._lock:
            q = self._recent(addr, now)
            q.append(now)
            self._all.append(now)
            while self._all and now - self._all[0] > self.window:
                self._all.popleft()
            first, blocking = len(q) == 1, len(q) == self.max_failures
            if first:
                first, ended = self._lines.allow(now)
            global_start = len(self._all) >= self.global_failures and now >= self._global_until
            if global_start:
                self._global_until = now + self.global_penalty
                self._all.clear()
        self._lines.report(ended)
        if first:
            log.warning("web: wrong %s from %s (further failures from it within %.0f s are counted, not logged)",
                        self.what, addr, self.window)
        if blocking:
            log.warning("web: %d wrong %s tries from %s within %.0f s; it is refused until they age out",
                        self.max_failures, self.what, addr, self.window)
        if global_start:
            log.warning("web: %d wrong %s tries from all addresses within %.0f s; addresses that have not "
                        "logged in lately wait %.0f s", self.global_failures, self.what, self.window,
                        self.global_penalty)

    def succeeded(self, addr: str) -> None:
        """Forget the address's failures and exempt it from the global penalty for an hour."""
        with self._lock:
            self._failures.pop(addr, None)
            self._good[addr] = time.monotonic()
            self._good.move_to_end(addr)
            while len(self._good) > self.max_addresses:
                self._good.popitem(last=False)


class CredentialThrottle:
    """Wrong passwords per user name, from any address; addresses the name logged in from lately are spared."""

    def __init__(self, what: str = "password", max_failures: int = NAME_FAILURES, window: float = NAME_WINDOW,
                 trust_for: float = NAME_TRUST, max_keys: int = 1000) -> None:
        self.what = what
        self.max_failures = max_failures
        self.window = window
        self.trust_for = trust_for
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._good: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lines = _Lines(window, what)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float, create: bool) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            if not create:
                return deque()
            if len(self._failures) >= self.max_keys:  # bounded memory; a blocked name stays
                _make_room(self._failures, now, self.window, self.max_failures)
            q = self._failures[key] = deque()
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, key: str, addr: str) -> float:
        """Seconds a login as ``key`` from ``addr`` must wait; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            q = self._recent(key, now, create=False)
            if len(q) < self.max_failures:
                return 0.0
            seen = self._good.get((key, addr))
            if seen is not None and now - seen < self.trust_for:
                return 0.0
            return max(0.0, self.window - (now - q[-self.max_failures]))

    def failed(self, key: str, shown: str) -> None:
        """Count a wrong password for ``key``; ``shown`` is how the log names it (never a typed unknown name,
        which may be a password typed into the wrong field)."""
        now = time.monotonic()
        ended = 0
        with self._lock:
            q = self._recent(key, now, create=True)
            q.append(now)
            first, blocking = len(q) == 1, len(q) == self.max_failures
            if first:
                first, ended = self._lines.allow(now)
        self._lines.report(ended)
        if first:
            log.warning("web: wrong %s for %s (further failures for it within %.0f s are counted, not logged)",
                        self.what, shown, self.window)
        if blocking:
            log.warning("web: %d wrong %s tries for %s within %.0f s; it is refused until they age out, except "
                        "from addresses it logged in from lately", self.max_failures, self.what, shown, self.window)

    def succeeded(self, key: str, addr: str) -> None:
        """Remember that ``key`` logged in from ``addr`` (that address is spared a block of the name)."""
        with self._lock:
            self._good[(key, addr)] = time.monotonic()
            self._good.move_to_end((key, addr))
            while len(self._good) > self.max_keys * 4:
                self._good.popitem(last=False)
