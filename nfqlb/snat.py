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

**TIME_WAIT at the backend.** A backend that closed first (an HTTP server with
``Connection: close``) keeps the connection in TIME_WAIT for 60 s (Linux's
``TCP_TIMEWAIT_LEN``), while the pool may give the port to a new flow to that backend a few
seconds later (a pool of 10,000 ports at 2,000 connections per second per backend comes
round in 5 s; no pool of 65,535 ports at 1,100/s lasts a minute). The backend then judges
the new SYN against the old connection (``tcp_timewait_state_process``): with timestamps on
both it takes the SYN only if its TSval is newer than the last one the old connection sent
(PAWS; equal: if its sequence number is past the old ``rcv_nxt``), without them only if the
sequence number is past. Otherwise it answers with an ACK of the old connection, the client
answers that with a RST and sends its SYN again, and the connection starts a second or more
late. The kernel's SNAT meets the same question for its own TIME_WAIT entries
(``nf_nat_used_tuple_harder`` reuses one only if the new connection's sequence number has
advanced past it) and, since Linux 6.15 derives each connection's TSval offset from its
ports as well as its addresses (``secure_tcp_seq_and_ts_off``), two clients' connections
put on one 4-tuple compare as two random numbers: half of such SYNs fail.

So the pool remembers, per port given back, what the backend's TIME_WAIT will compare
(:class:`TimeWait`: when the backend closed, the client's last TSval and the sequence
number after its FIN; the engine notes it from the client's FIN, and only when the backend
sent its FIN first: otherwise the backend holds no TIME_WAIT), and a new flow with the SYN
at hand takes, in the order above, the first port among the next :data:`CANDIDATES` that the
backend will take from this SYN (:func:`timewait_allows`; a record older than
:data:`TIME_WAIT` is gone): from the ports given back, else from the closed flows (whose
records wait on their reclaim list). With random offsets each candidate passes with even
odds, so the first or second usually does; but the ones passed over stay first and
resemble each other (they all refused the same SYNs), so the search must go deeper than
independent odds suggest: simulated with 60,000 connections at 2,000/s through 1,000 ports
(tests/test_fullnat_timewait.py's clients), 8 candidates left 568 SYNs to the retry, 16
left 5, 32 none. Only when none passes does it take the oldest as before (counted
``timewait_reused``: the backend will refuse that SYN once).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from itertools import islice
from typing import Final

from nfqlb.wire.tcp import tcp_tsval

#: How long a backend keeps a connection it closed first in TIME_WAIT (Linux's
#: TCP_TIMEWAIT_LEN, seconds): a record older than that guards nothing.
TIME_WAIT: Final = 60.0

#: Ports (then closed flows) looked at for one that the backend's TIME_WAIT lets a new SYN
#: take, before taking the oldest anyway.
CANDIDATES: Final = 32


#: What a backend in TIME_WAIT compares a new SYN on the same 4-tuple with: ``(since,
#: ts_recent, rcv_nxt)``, when it entered TIME_WAIT (nfqlb's clock), the last TSval the
#: client sent (-1: the connection had no timestamps) and the sequence number after the
#: client's FIN. (A plain tuple: one is made per connection the backend closes.)
TimeWait = tuple[float, int, int]


def timewait_allows(tw: TimeWait, tsval: int, seq: int) -> bool:
    """Whether a Linux backend holding ``tw`` takes a SYN with ``tsval`` (-1: none) and
    sequence number ``seq`` as a new connection (``tcp_timewait_state_process``): with
    timestamps on both, an older TSval is refused (PAWS), a newer one taken, an equal one
    taken if ``seq`` is past ``rcv_nxt``; without them (the old connection's or the SYN's),
    only ``seq`` past ``rcv_nxt`` is taken. (mod 2**32: ``d`` below 2**31 is "ahead".)"""
    _, ts_recent, rcv_nxt = tw
    if ts_recent >= 0 and tsval >= 0:
        d = (tsval - ts_recent) & 0xFFFFFFFF
        if 0 < d < 0x8000_0000:  # newer
            return True
        if d and ts_recent:  # older: PAWS (which never rejects against a ts_recent of 0)
            return False
    return 0 < (seq - rcv_nxt) & 0xFFFFFFFF < 0x8000_0000


def timewait_of(data: bytes, off: int, now: float) -> TimeWait:
    """The TIME_WAIT a backend enters on the client's FIN at ``off`` (its last TSval, the
    sequence number after the FIN and its data)."""
    end = int.from_bytes(data[off + 4:off + 8], "big") + len(data) - off \
        - (data[off + 12] >> 4) * 4 + 1
    return (now, tcp_tsval(data, off), end & 0xFFFFFFFF)


class _EndpointPorts:
    """The ports of one pool as one backend endpoint sees them."""

    __slots__ = ("next", "free", "skip", "closed", "half_open", "timewait")

    def __init__(self, lo: int, skip: set[int]) -> None:
        self.next = lo  # the lowest port never handed out to this endpoint (> hi: none left)
        self.free: deque[int] = deque()  # ports given back, oldest first
        self.skip = skip  # held by flows of an earlier pool (a reload): not free until given
        #: flows holding a port of this endpoint, least recently used first (kept by the
        #: engine): closed ones lingering for retransmissions (each with the TIME_WAIT the
        #: backend holds for it, or None), and half-open ones
        self.closed: OrderedDict[object, TimeWait | None] = OrderedDict()
        self.half_open: OrderedDict[object, TimeWait | None] = OrderedDict()
        #: the ports of ``free`` whose last connection left the backend in TIME_WAIT
        self.timewait: dict[int, TimeWait] = {}


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
        """A port no live flow to ``endpoint`` holds (the oldest free: no SYN to judge the
        backend's TIME_WAIT by, see :meth:`choose`), or None (counted in ``exhausted``)."""
        ports = self._ports(endpoint)
        hi = self.hi
        while ports.next <= hi:
            port = ports.next
            ports.next = port + 1
            if port not in ports.skip:
                return port
        if ports.free:
            port = ports.free.popleft()
            ports.timewait.pop(port, None)
            return port
        self.exhausted += 1
        return None

    def give(self, port: int, endpoint: bytes, timewait: TimeWait | None = None) -> None:
        """``port`` of a flow to ``endpoint`` is free again; ``timewait``: the TIME_WAIT the
        backend holds for its connection, if any."""
        if not self.lo <= port <= self.hi:  # (a port of an earlier range, after a reload)
            return
        ports = self._ports(endpoint)
        if port in ports.skip:
            ports.skip.discard(port)
            if port >= ports.next:
                return  # the cursor hands it out when it gets there
        ports.free.append(port)
        if timewait is not None:
            ports.timewait[port] = timewait

    def reclaim_list(self, endpoint: bytes,
                     closed: bool) -> OrderedDict[object, TimeWait | None]:
        """The list a flow of ``endpoint`` holding a port goes on while it is closed
        (``closed``) or half-open: the engine adds it, moves it to the end on each packet and
        removes it when it leaves that state or the table. A closed flow's value is the
        TIME_WAIT its backend holds (:func:`timewait_of`), or None."""
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

    def choose(self, endpoint: bytes, now: float,
               syn: tuple[bytes, int] | None) -> tuple[int, object | None, bool]:
        """Where a new flow to ``endpoint`` gets its port, ``syn`` its SYN and the offset of
        its TCP header (None: not a SYN, no TIME_WAIT to judge): ``(port, None, clash)`` a
        port, or ``(0, flow, clash)`` a flow to take back (the caller ends it and hands its
        port to the new flow), or ``(0, None, False)`` none (counted in ``exhausted``).

        In order: a port never handed out; one given back, or a closed flow, whose backend's
        TIME_WAIT lets ``syn`` in (the first of the oldest :data:`CANDIDATES` of each); the
        oldest port given back; the least recently used closed flow; the least recently
        used half-open one. ``clash``: what it hands out is one whose TIME_WAIT the backend
        is expected to refuse ``syn`` on (the client's retry gets through)."""
        ports = self._ports(endpoint)
        hi = self.hi
        while ports.next <= hi:
            port = ports.next
            ports.next = port + 1
            if port not in ports.skip:
                return port, None, False
        free, timewait, closed = ports.free, ports.timewait, ports.closed
        if not free:
            self.exhausted += 1
        if syn is None or not (timewait or closed):  # no TIME_WAIT to judge
            if free:
                port = free.popleft()
                timewait.pop(port, None)
                return port, None, False
            return 0, self.victim(endpoint), False
        data, off = syn
        tsval, seq = tcp_tsval(data, off), int.from_bytes(data[off + 4:off + 8], "big")
        horizon = now - TIME_WAIT
        if free:
            for i, port in enumerate(islice(free, CANDIDATES)):
                tw = timewait.get(port)
                if tw is None or tw[0] <= horizon or timewait_allows(tw, tsval, seq):
                    del free[i]
                    if tw is not None:
                        del timewait[port]
                    return port, None, False
        for flow, tw in islice(closed.items(), CANDIDATES):
            if tw is None or tw[0] <= horizon or timewait_allows(tw, tsval, seq):
                return 0, flow, False
        if free:  # each one's TIME_WAIT refuses this SYN: the oldest
            port = free.popleft()
            timewait.pop(port, None)
            return port, None, True
        victim = self.victim(endpoint)
        return 0, victim, victim is not None and victim in closed

