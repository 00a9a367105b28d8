"""The connection table: flows keyed in both directions, TCP/UDP states, timeouts, expiry.

Keys are the raw 12 bytes ``src addr | dst addr | src port | dst port`` of an IPv4 packet as
it arrives (36 bytes for IPv6), one dict per transport protocol. A flow is stored twice: under
the key of the client's packets (``fwd``) and under the key of the replies as they reach us
(``rev``). Each dict value is a tuple ``(flow, new_header, ip_delta, l4_delta, is_reply)``:
everything the per-packet path needs, precomputed when the flow is created.

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
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import TYPE_CHECKING

from nfqlb.config import Timeouts

if TYPE_CHECKING:
    from nfqlb.config import Backend, Service
    from nfqlb.snat import PortPool


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
        "fwd_key", "rev_key", "pool", "snat_port", "packets", "bytes", "policy_key",
    )

    def __init__(self, service: Service, backend: Backend, proto: int, state: TcpState,
                 now: float, fwd_key: bytes, rev_key: bytes) -> None:
        self.service = service
        self.backend = backend
        self.proto = proto
        self.state = state
        self.last = now
        self.created = now
        self.timer_at = 0.0
        self.fwd_key = fwd_key
        self.rev_key = rev_key
        self.pool: PortPool | None = None
        self.snat_port = 0
        self.packets = 0
        self.bytes = 0
        self.policy_key: object = None


Entry = tuple[Flow, bytes, int, int, bool]


class FlowTable:
    def __init__(self, timeouts: Timeouts) -> None:
        self.timeout = timeouts_by_state(timeouts)
        self.by_proto: dict[int, dict[bytes, Entry]] = {6: {}, 17: {}}
        self._heap: list[tuple[float, int, Flow]] = []
        self._seq = itertools.count()
        self.active = 0

    def __len__(self) -> int:
        return self.active

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
