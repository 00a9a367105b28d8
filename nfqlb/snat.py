"""Source-port pool for fullnat: a port is never handed out twice to one backend while its
flow lives.

A fullnat reply is found by ``(backend address, backend port, snat address, snat port)``, so
a port only has to be unique per backend endpoint, as IPVS FNAT keeps it: the same snat port
may serve concurrent flows to different backends, and a pool of 10,000 ports holds 10,000
flows *per backend*. Each backend endpoint that takes a port gets its own record, built
lazily and cheap: a cursor over the ports it never had (``lo`` upwards) and a FIFO of the
ports it gave back. Taking the cursor first, then the oldest returned port, is exactly the
order of one FIFO that starts as ``lo..hi`` and has returned ports appended: a released port
is reused as late as possible (the backend may still hold the old connection in TIME_WAIT),
and an endpoint that took 100 ports costs 100 ints, not 10,000.

When an endpoint has no free port, the engine takes one back from a flow of that same
endpoint (:meth:`PortPool.victim`), in this order:

1. the least recently used flow that is already **closed** (both FINs or a RST: CLOSING,
   CLOSED), which lingers only for retransmissions (``tcp_close``, 10 s): under a
   close-heavy load these are most of the ports held, and without this a rate of
   ``ports / tcp_close`` new connections per second per backend (1,000/s for 10,000 ports)
   would exhaust the pool;
2. else the least recently used **half-open** flow (SYN_SENT, SYN_RECV): a SYN flood cannot
   lock new clients out until its flows time out;
3. else none: the new flow is refused (``snat_exhausted``).

The engine keeps each flow on the list of its endpoint that matches its state
(:meth:`PortPool.reclaim_list`); a flow on neither is never taken back.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping


class _EndpointPorts:
    """The ports of one pool as one backend endpoint sees them."""

    __slots__ = ("next", "free", "skip", "closed", "half_open")

    def __init__(self, lo: int, skip: set[int]) -> None:
        self.next = lo  # the lowest port never handed out to this endpoint (> hi: none left)
        self.free: deque[int] = deque()  # ports given back, oldest first
        self.skip = skip  # held by flows of an earlier pool (a reload): not free until given
        #: flows holding a port of this endpoint, least recently used first (kept by the
        #: engine): closed ones lingering for retransmissions, and half-open ones
        self.closed: OrderedDict[object, None] = OrderedDict()
        self.half_open: OrderedDict[object, None] = OrderedDict()


class PortPool:
    """Ports ``lo``-``hi`` of one snat address and protocol, unique per backend endpoint
    (packed address + 2-byte port, as ``BackendRuntime.endpoint``)."""

    def __init__(self, lo: int, hi: int,
                 in_use: Mapping[bytes, set[int] | frozenset[int]] | None = None) -> None:
        """``in_use``: per endpoint, ports held by live flows of an earlier pool on the same
        address, after a reload; they join the pool when their flows give them."""
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port range {lo}-{hi}")
        self.lo = lo
        self.hi = hi
        self.exhausted = 0  # times a port was asked for and none was free
        self._in_use = {k: set(v) for k, v in (in_use or {}).items() if v}
        self._endpoints: dict[bytes, _EndpointPorts] = {}

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def _ports(self, endpoint: bytes) -> _EndpointPorts:
        ports = self._endpoints.get(endpoint)
        if ports is None:
            ports = _EndpointPorts(self.lo, self._in_use.pop(endpoint, set()))
            self._endpoints[endpoint] = ports
        return ports

    def available(self, endpoint: bytes) -> int:
        """Ports ``endpoint`` could take now without taking one back."""
        ports = self._endpoints.get(endpoint)
        if ports is None:
            return self.size - len(self._in_use.get(endpoint, ()))
        fresh = self.hi + 1 - ports.next
        skipped = sum(1 for p in ports.skip if p >= ports.next)
        return fresh - skipped + len(ports.free)

    def take(self, endpoint: bytes) -> int | None:
        """A port no live flow to ``endpoint`` holds, or None (counted in ``exhausted``)."""
        ports = self._ports(endpoint)
        hi = self.hi
        while ports.next <= hi:
            port = ports.next
            ports.next = port + 1
            if port not in ports.skip:
                return port
        if ports.free:
            return ports.free.popleft()
        self.exhausted += 1
        return None

    def give(self, port: int, endpoint: bytes) -> None:
        """``port`` of a flow to ``endpoint`` is free again."""
        if not self.lo <= port <= self.hi:  # (a port of an earlier range, after a reload)
            return
        ports = self._ports(endpoint)
        if port in ports.skip:
            ports.skip.discard(port)
            if port >= ports.next:
                return  # the cursor hands it out when it gets there
        ports.free.append(port)

    def reclaim_list(self, endpoint: bytes, closed: bool) -> OrderedDict[object, None]:
        """The list a flow of ``endpoint`` holding a port goes on while it is closed
        (``closed``) or half-open: the engine adds it, moves it to the end on each packet and
        removes it when it leaves that state or the table."""
        ports = self._ports(endpoint)
        return ports.closed if closed else ports.half_open

    def victim(self, endpoint: bytes) -> object | None:
        """The flow whose port ``endpoint`` should take back when it has none free: the least
        recently used closed one, else the least recently used half-open one, else None."""
        ports = self._endpoints.get(endpoint)
        if ports is None:
            return None
        for flows in (ports.closed, ports.half_open):
            if flows:
                return next(iter(flows))
        return None
