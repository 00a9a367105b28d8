"""The packets' clock: coarse, as the kernel's jiffies, so that flows share their last-use time.

The engine is given ``now`` with every packet and keeps it in the flow it touched
(``Flow.last``). A float is an object of its own (24 bytes): were ``now`` a new float every
wakeup of the queue, which under light load is about one packet, nearly every flow would hold
a float of its own, 24 of its bytes (see nfqlb/flows.py). :class:`CoarseClock` hands out the
very same float object for as long as its source has advanced less than ``resolution``
(``RESOLUTION_S``, 10 ms) since that object was taken: every flow touched within one tick
holds the one object, and at most one float per tick stays alive (100 a second, whatever the
number of flows: at most ``100 x`` the longest idle timeout, 900 s for established TCP, which
is 90,000 floats at worst, 2 bytes a flow at 1,000,000 flows). A tick's value is the source's
reading when the tick began, so ``now`` lags the source by less than ``resolution``; idle
timeouts are seconds.

What reads this clock must not wait for it to move within a tick: two calls 1 ms apart give
the same value. The daemon's timer therefore waits at least one tick for a deadline that is
not yet due (``nfqlb.io.daemon.Server._arm_timer``: a shorter wait would find the same
``now`` and the deadline still ahead, again and again until the tick ends), and health
checks time their probes on a precise clock of their own (``nfqlb.io.health``). A source that
goes backwards starts a new tick at once.

``MONOTONIC`` is the process's one coarse clock over ``time.monotonic``: every queue adapter
takes it by default, so the daemon's queues (main, large packets, offload) and its timer read
the same ticks, and a flow's ``last`` never goes back when its packets come from two queues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["MONOTONIC", "RESOLUTION_S", "CoarseClock"]

RESOLUTION_S = 0.01  # a tick: 10 ms (the kernel's jiffy at HZ=100)


class CoarseClock:
    """``clock()`` returns the same float object while ``source`` has advanced less than
    ``resolution`` seconds since that object was taken; then the source's new reading."""

    __slots__ = ("source", "resolution", "_now")

    def __init__(self, source: Callable[[], float] = time.monotonic,
                 resolution: float = RESOLUTION_S) -> None:
        self.source = source
        self.resolution = resolution
        # (Any, here and below: compiled, a float-typed value is unboxed and a new object
        # made at every return; Any keeps the one object)
        self._now: Any = source()

    def __call__(self) -> Any:
        t: Any = self.source()
        now: Any = self._now
        if 0.0 <= t - now < self.resolution:
            return now
        self._now = t
        return t


MONOTONIC = CoarseClock()
