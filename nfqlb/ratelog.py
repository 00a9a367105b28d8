"""Logging at a rate limit: at most one message per key every ``every`` seconds.

Things that can happen per packet (a policy failing, a full port pool, a refused verdict)
must not turn into a log line per packet. Each kind of message has a key; a message is
written when its key was last written ``every`` seconds ago or more (or never), and the line
says that it is rate limited. The clock is the caller's ``now`` (the engine's injected clock
or the adapter's), so the core stays free of ``time``; a clock that went backwards writes.
"""

from __future__ import annotations

import logging

EVERY_S = 10.0


class RateLimitedLog:
    __slots__ = ("log", "every", "_last")

    def __init__(self, log: logging.Logger, every: float = EVERY_S) -> None:
        self.log = log
        self.every = every
        self._last: dict[str, float] = {}

    def log_at(self, level: int, key: str, now: float, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged less than ``every``
        seconds before ``now``; True if it was written."""
        last = self._last.get(key)
        if last is not None and 0.0 <= now - last < self.every:
            return False
        self._last[key] = now
        self.log.log(level, msg + " (logged at most every %gs)", *args, self.every)
        return True

    def warning(self, key: str, now: float, msg: str, *args: object) -> bool:
        return self.log_at(logging.WARNING, key, now, msg, *args)

    def error(self, key: str, now: float, msg: str, *args: object) -> bool:
        return self.log_at(logging.ERROR, key, now, msg, *args)
