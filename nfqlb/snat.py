"""Source-port pool for fullnat: a port is never handed out twice while its flow lives.

Free ports are kept in FIFO order, so a released port is reused as late as possible
(the backend may still hold the old connection in TIME_WAIT). When none is free, a SYN flood
must not lock new clients out until its half-open flows time out: the pool keeps the list of
half-open flows holding its ports, and the engine takes the port of the least recently used
one (as ``max_flows`` evicts the flow nearest its deadline).
"""

from __future__ import annotations

from collections import OrderedDict, deque


class PortPool:
    def __init__(self, lo: int, hi: int, in_use: set[int] | frozenset[int] = frozenset()) -> None:
        """Ports ``lo``-``hi``, except those ``in_use`` (held by live flows of an earlier pool on
        the same address, after a reload: they join the pool when their flows give them)."""
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port range {lo}-{hi}")
        self.lo = lo
        self.hi = hi
        self._free: deque[int] = deque(p for p in range(lo, hi + 1) if p not in in_use)
        self.exhausted = 0  # times a port was asked for and none was free
        #: the half-open flows holding a port of this pool, least recently used first (the
        #: engine keeps it): when no port is free, the first of them gives its port back
        self.half_open: OrderedDict[object, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._free)

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def take(self) -> int | None:
        if self._free:
            return self._free.popleft()
        self.exhausted += 1
        return None

    def give(self, port: int) -> None:
        if self.lo <= port <= self.hi:  # (a port of an earlier range, after a reload: not ours)
            self._free.append(port)
