"""The connection table: flows keyed in both directions, TCP/UDP states, timeouts, expiry.

Keys are the raw 12 bytes ``src addr | dst addr | src port | dst port`` of an IPv4 packet as
it arrives (36 bytes for IPv6), one dict per transport protocol. A flow is stored twice: under
the key of the client's packets (``fwd``) and under the key of the replies as they reach us
(``rev``). Each dict value is an :class:`Entry` ``(flow, header, ip_delta, l4_delta, is_reply)``:
everything the per-packet path needs, precomputed when the flow is installed. ``header`` is
the new ``src addr | dst addr`` (IPv4: 8 bytes; IPv6: 32) followed by the new
``src port | dst port``; the deltas are RFC 1624 differences from the old key to ``header``
for the IPv4 header checksum (0 for IPv6, which has none) and the TCP/UDP checksum (the
pseudo-header's addresses and the ports).

TCP states follow the table below (h11 style: one table, documented here):

  state        event                      -> new state
  SYN_SENT     SYN+ACK from the backend   -> SYN_RECV
  SYN_RECV     ACK from the client        -> ESTABLISHED
  any open     FIN from one side          -> FIN_CLIENT / FIN_SERVER
  FIN_CLIENT   FIN from the backend       -> CLOSING   (and FIN_SERVER + client FIN)
  any          RST                        -> CLOSED

A SYN from the client on a SYN_SENT/SYN_RECV flow is a retransmission (same backend); on a
CLOSING/CLOSED flow it is a reused client port and starts a new flow (a new choice).

Expiry is lazy: every packet only stores ``flow.last = now``. Each flow has at most one live
entry in a deadline heap; when it comes due the real deadline (``last + timeout[state]``) is
checked and the entry re-armed if the flow was used since. State changes to a shorter timeout
push an earlier entry. ``next_deadline``/``expire`` are the engine's get_timer/handle_timer.

The table installs flows (``install``: keys and precomputed rewrites of both directions) and
makes room at ``max_flows`` (``evict_for_new``: the flows nearest their idle timeout go). What a
flow held elsewhere (a pool port, a policy's count) is given back by whoever owns it: the
table returns the flows it removed, and the engine retires them.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import TYPE_CHECKING, NamedTuple

from nfqlb.config import Timeouts
from nfqlb.wire.checksum import delta
from nfqlb.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from nfqlb.policies import FlowKey, Policy
    from nfqlb.services import ServiceRuntime
    from nfqlb.values import Backend


class TcpState(enum.IntEnum):
    SYN_SENT = 0
    SYN_RECV = 1
    ESTABLISHED = 2
    FIN_CLIENT = 3
    FIN_SERVER = 4
    CLOSING = 5
    CLOSED = 6
    UDP = 7  # the one state of a UDP flow


class TcpEvent(enum.IntEnum):
    SYN = 0  # SYN without ACK, from the client
    SYNACK = 1  # from the backend
    ACK = 2  # anything else without SYN/FIN/RST
    FIN_CLIENT = 3
    FIN_SERVER = 4
    RST = 5


S, E = TcpState, TcpEvent
_OPEN = (S.SYN_SENT, S.SYN_RECV, S.ESTABLISHED)

#: (state, event) -> new state; pairs not listed keep their state.
TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.SYN_SENT, E.SYNACK): S.SYN_RECV,
    (S.SYN_RECV, E.ACK): S.ESTABLISHED,
    **{(s, E.FIN_CLIENT): S.FIN_CLIENT for s in _OPEN},
    **{(s, E.FIN_SERVER): S.FIN_SERVER for s in _OPEN},
    (S.FIN_CLIENT, E.FIN_SERVER): S.CLOSING,
    (S.FIN_SERVER, E.FIN_CLIENT): S.CLOSING,
    **{(s, E.RST): S.CLOSED for s in TcpState if s is not S.UDP},
}

#: States in which a client SYN starts a new flow instead of being a retransmission.
REUSABLE = frozenset({S.CLOSING, S.CLOSED})


def tcp_event(flags: int, is_reply: bool) -> TcpEvent:
    """Classify a TCP packet by its flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10)."""
    if flags & 0x04:
        return E.RST
    if flags & 0x02:
        return E.SYNACK if flags & 0x10 else E.SYN
    if flags & 0x01:
        return E.FIN_SERVER if is_reply else E.FIN_CLIENT
    return E.ACK


def timeouts_by_state(t: Timeouts) -> tuple[float, ...]:
    """Idle timeout of each state, indexed by TcpState."""
    by = {
        S.SYN_SENT: t.syn, S.SYN_RECV: t.syn, S.ESTABLISHED: t.tcp,
        S.FIN_CLIENT: t.tcp_fin, S.FIN_SERVER: t.tcp_fin,
        S.CLOSING: t.tcp_close, S.CLOSED: t.tcp_close, S.UDP: t.udp,
    }
    return tuple(by[s] for s in TcpState)


class Flow:
    """One balanced connection. Per-flow, never per-packet."""

    __slots__ = (
        "service", "backend", "proto", "state", "last", "created", "timer_at",
        "fwd_key", "rev_key", "snat_port", "packets", "bytes", "placed",
    )

    def __init__(self, service: ServiceRuntime, backend: Backend, proto: int, state: TcpState,
                 now: float, fwd_key: bytes, rev_key: bytes, snat_port: int = 0) -> None:
        self.service = service
        self.backend = backend
        self.proto = proto
        self.state = state
        self.last = now
        self.created = now
        self.timer_at = 0.0
        self.fwd_key = fwd_key
        self.rev_key = rev_key
        self.snat_port = snat_port  # fullnat: the pool port it holds (0: none)
        self.packets = 0
        self.bytes = 0
        #: (the policy that placed it, the flow key it was asked about), to tell it when the
        #: flow ends; None for flows no policy placed (adopted by hash)
        self.placed: tuple[Policy, FlowKey] | None = None


class Entry(NamedTuple):
    """One direction of a flow, as the per-packet path needs it (see the module docstring)."""

    flow: Flow
    header: bytes
    ip_delta: int
    l4_delta: int
    is_reply: bool


#: ``_entry(Entry, (...))`` builds an Entry without the Python-level ``__new__`` NamedTuple
#: generates (two per new flow: it is 7 times the cost of a plain tuple).
_entry = tuple.__new__


def reply_key(dest: bytes, src: bytes, sport: bytes) -> bytes:
    """The key of a flow's replies, once its packets leave from ``src``:``sport`` to
    ``dest`` (the backend's packed address and 2-byte port)."""
    return dest[:-2] + src + dest[-2:] + sport


class FlowTable:
    def __init__(self, timeouts: Timeouts, max_flows: int = 1 << 62) -> None:
        self.timeout = timeouts_by_state(timeouts)
        self.max_flows = max_flows
        self.by_proto: dict[int, dict[bytes, Entry]] = {TCP: {}, UDP: {}}
        self._heap: list[tuple[float, int, Flow]] = []
        self._seq = itertools.count()
        self.active = 0

    def __len__(self) -> int:
        return self.active


    def install(self, service: ServiceRuntime, backend: Backend, proto: int, state: TcpState,
                key: bytes, rev_key: bytes, src: bytes, sport: bytes, baddr: bytes,
                snat_port: int, now: float) -> Entry:
        """Add the flow ``key`` (as the client sends it) on ``backend`` (address ``baddr``),
        its packets leaving from ``src``:``sport``, its replies arriving as ``rev_key``
        (``reply_key``); returns its forward entry. The caller has made room
        (``evict_for_new``) and checked that ``rev_key`` is free."""
        alen = len(baddr)
        client, vip = key[:alen], key[alen:2 * alen]
        fwd_hdr = src + rev_key[:alen] + sport + rev_key[-4:-2]
        rev_hdr = vip + client + key[-2:] + key[-4:-2]
        flow = Flow(service, backend, proto, state, now, key, rev_key, snat_port)
        v4 = alen == 4
        fwd = _entry(Entry, (flow, fwd_hdr, delta(client + vip, src + baddr) if v4 else 0,
                             delta(key, fwd_hdr), False))
        rev = _entry(Entry, (flow, rev_hdr, delta(baddr + src, vip + client) if v4 else 0,
                             delta(rev_key, rev_hdr), True))
        self.add(flow, fwd, rev)
        return fwd

    def evict_for_new(self) -> list[Flow]:
        """Make room for one more flow at ``max_flows`` (call it when at the cap): remove and
        return the flows nearest their idle timeout, as many as it takes (usually one)."""
        gone: list[Flow] = []
        while self.active >= self.max_flows:
            victim = self.evict_one()
            if victim is None:
                break
            gone.append(victim)
        return gone

    def add(self, flow: Flow, fwd: Entry, rev: Entry) -> None:
        table = self.by_proto[flow.proto]
        table[flow.fwd_key] = fwd
        table[flow.rev_key] = rev
        self.active += 1
        self.arm(flow)

    def remove(self, flow: Flow) -> None:
        table = self.by_proto[flow.proto]
        if table.get(flow.fwd_key, (None,))[0] is flow:
            del table[flow.fwd_key]
        if table.get(flow.rev_key, (None,))[0] is flow:
            del table[flow.rev_key]
        flow.timer_at = -1.0  # marks it gone: its heap entries are now stale
        self.active -= 1

    def deadline(self, flow: Flow) -> float:
        return flow.last + self.timeout[flow.state]

    def arm(self, flow: Flow) -> None:
        """Make sure the heap wakes up no later than the flow's current deadline."""
        due = self.deadline(flow)
        if flow.timer_at <= 0.0 or due < flow.timer_at:
            flow.timer_at = due
            heapq.heappush(self._heap, (due, next(self._seq), flow))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].timer_at != heap[0][0]:
            heapq.heappop(heap)  # stale: flow gone or re-armed earlier
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows whose idle timeout has passed at ``now``."""
        heap = self._heap
        gone: list[Flow] = []
        while heap and heap[0][0] <= now:
            due, _, flow = heapq.heappop(heap)
            if flow.timer_at != due:
                continue  # stale entry
            real = self.deadline(flow)
            if real <= now:
                self.remove(flow)
                gone.append(flow)
            else:
                flow.timer_at = real
                heapq.heappush(heap, (real, next(self._seq), flow))
        return gone

    def evict_one(self) -> Flow | None:
        """Remove the flow nearest its idle timeout (among flows in one state: the least
        recently used), to make room at the cap. Half-open flows (60 s) go before established
        ones (900 s), which is what a SYN flood needs."""
        heap = self._heap
        for _ in range(64):  # re-arm stale entries a bounded number of times
            if not heap:
                return None
            due, _, flow = heap[0]
            if flow.timer_at != due:
                heapq.heappop(heap)
                continue
            real = self.deadline(flow)
            if real > due:
                heapq.heappop(heap)
                flow.timer_at = real
                heapq.heappush(heap, (real, next(self._seq), flow))
                continue
            break
        while heap and heap[0][2].timer_at != heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            return None
        flow = heapq.heappop(heap)[2]
        self.remove(flow)
        return flow

    def flows(self) -> list[Flow]:
        seen: dict[int, Flow] = {}
        for table in self.by_proto.values():
            for entry in table.values():
                seen[id(entry[0])] = entry[0]
        return list(seen.values())
