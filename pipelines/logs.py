"""Logging set-up shared by the long-running commands: one line per kind of library complaint, not hundreds.

While the broker is down, kafka-python logs each failed connection, fetch, heartbeat and metadata refresh at
ERROR or WARNING: a walk-through counted dozens of lines a second for the whole outage, which buried the
consumer's own lines (what it stored, what it removed, that it resumed). :class:`Repeats` lets the first line
of each kind through, holds back the same line for ``every_s`` seconds, and says on the next one let through
how many it held back. Lines are of one kind when they differ only in numbers (ports, node ids, offsets).
"""

from __future__ import annotations

import logging
import re
import threading
import time

_NUMBER = re.compile(r"\d+")


class Repeats(logging.Filter):
    """A handler filter: of the records of loggers under ``prefixes``, one per kind every ``every_s`` seconds."""

    def __init__(self, prefixes: tuple[str, ...] = ("kafka",), every_s: float = 30.0, max_kinds: int = 1000):
        super().__init__()
        self.prefixes = prefixes
        self.every_s = every_s
        self.max_kinds = max_kinds
        self._seen: dict[tuple, tuple[float, int]] = {}  # kind -> (when last let through, held back since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        kind = (record.name, record.levelno, _NUMBER.sub("#", record.getMessage()))
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(kind, (None, 0))
            if last is not None and now - last < self.every_s:
                self._seen[kind] = (last, held + 1)
                return False
            if len(self._seen) >= self.max_kinds:
                self._seen.clear()
            self._seen[kind] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {now - last:.0f} s, not shown)"
            record.args = None
        return True


def setup(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``); kafka-python at WARNING, its repeats held back."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # kafka-python's event loop times each of its own tasks and warns past 0.1 s ("It is blocking the event
    # loop"): on two cores shared with training, a thread that waits for the CPU that long is common, and the
    # line reads like a fault of ours; its other warnings (wakeup socket, stray events) still show
    logging.getLogger("kafka.net.selector").addFilter(lambda r: "blocking the event loop" not in r.getMessage())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, Repeats) for f in handler.filters):
                handler.addFilter(Repeats())
