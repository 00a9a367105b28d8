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

TCP states follow the table below (h11 style: one table, documented here; an event is a
packet's flags and direction, ``tcp_event``):

  state            event                          -> new state
  SYN_SENT         SYN+ACK from the backend       -> SYN_RECV
  SYN_RECV         ACK from either side           -> ESTABLISHED
  ADOPTED          a packet from the backend      -> ESTABLISHED
  ADOPTED_REPLY    a packet from the client       -> ESTABLISHED
  any open         FIN from one side              -> FIN_CLIENT / FIN_SERVER
  FIN_CLIENT       FIN from the backend           -> CLOSING   (and FIN_SERVER + client FIN)
  any              RST (in the window)            -> CLOSED

ADOPTED and ADOPTED_REPLY are flows taken up without a SYN (``unknown_flow = "hash"``), from a
packet of the client or of the backend; they keep the short ``syn`` timeout until the other
side answers, so spoofed packets cannot fill the table with long-lived flows. A RST moves a
flow only if it is in the window (the engine checks, with ``Flow.peer``), as conntrack does.

A SYN from the client on a SYN_SENT/SYN_RECV flow is a retransmission (same backend); on a flow
that is closing in any way (one FIN, both, RST) it is a reused client port and starts a new
flow (a new choice), as in conntrack and IPVS.

Expiry and eviction are exact: the flows of each state are kept in one least-recently-used
list (an ``OrderedDict``; every packet moves its flow to the end, ``touch``), so within a state
the first flow is the one with the earliest idle deadline (``last + timeout[state]``), and the
earliest of the ten first flows is the earliest of the table. ``next_deadline`` and ``expire``
(in bounded slices) are the engine's get_timer/handle_timer; ``evict_for_new`` makes room at
``max_flows`` by removing exactly the flows nearest their deadline.

The table installs flows (``install``: keys and precomputed rewrites of both directions). What
a flow held elsewhere (a pool port, a policy's count, its backend's totals) is given back by
whoever owns it: the table returns the flows it removed, and the engine retires them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

from nfqlb.config import Timeouts
from nfqlb.wire.checksum import delta
from nfqlb.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from nfqlb.policies import FlowKey, Policy
    from nfqlb.services import BackendRuntime, Direction, ServiceRuntime
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
    ADOPTED = 8  # taken up from a client's packet (no SYN seen): waits for the backend
    ADOPTED_REPLY = 9  # taken up from the backend's packet: waits for the client


class TcpEvent(enum.IntEnum):
    SYN = 0  # SYN without ACK, from the client
    SYNACK = 1  # from the backend
    ACK = 2  # from the client, without SYN/FIN/RST
    FIN_CLIENT = 3
    FIN_SERVER = 4
    RST = 5
    REPLY = 6  # from the backend, without SYN/FIN/RST


S, E = TcpState, TcpEvent
_OPEN = (S.SYN_SENT, S.SYN_RECV, S.ESTABLISHED, S.ADOPTED, S.ADOPTED_REPLY)

#: (state, event) -> new state; pairs not listed keep their state.
TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.SYN_SENT, E.SYNACK): S.SYN_RECV,
    (S.SYN_RECV, E.ACK): S.ESTABLISHED,
    (S.SYN_RECV, E.REPLY): S.ESTABLISHED,
    (S.ADOPTED, E.REPLY): S.ESTABLISHED,
    (S.ADOPTED_REPLY, E.ACK): S.ESTABLISHED,
    **{(s, E.FIN_CLIENT): S.FIN_CLIENT for s in _OPEN},
    **{(s, E.FIN_SERVER): S.FIN_SERVER for s in _OPEN},
    (S.FIN_CLIENT, E.FIN_SERVER): S.CLOSING,
    (S.FIN_SERVER, E.FIN_CLIENT): S.CLOSING,
    **{(s, E.RST): S.CLOSED for s in TcpState if s is not S.UDP},
}

#: States in which a client SYN starts a new flow instead of being a retransmission: the
#: flow is closing in some way (one FIN, both, a RST).
REUSABLE = frozenset({S.FIN_CLIENT, S.FIN_SERVER, S.CLOSING, S.CLOSED})

#: Half-open flows: when a fullnat port pool runs dry, those holding its ports go first.
HALF_OPEN = frozenset({S.SYN_SENT, S.SYN_RECV})


def tcp_event(flags: int, is_reply: bool) -> TcpEvent:
    """Classify a TCP packet by its flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) and
    direction."""
    if flags & 0x04:
        return E.RST
    if flags & 0x02:
        return E.SYNACK if flags & 0x10 else E.SYN
    if flags & 0x01:
        return E.FIN_SERVER if is_reply else E.FIN_CLIENT
    return E.REPLY if is_reply else E.ACK


def timeouts_by_state(t: Timeouts) -> tuple[float, ...]:
    """Idle timeout of each state, indexed by TcpState."""
    by = {
        S.SYN_SENT: t.syn, S.SYN_RECV: t.syn, S.ESTABLISHED: t.tcp,
        S.FIN_CLIENT: t.tcp_fin, S.FIN_SERVER: t.tcp_fin,
        S.CLOSING: t.tcp_close, S.CLOSED: t.tcp_close, S.UDP: t.udp,
        S.ADOPTED: t.syn, S.ADOPTED_REPLY: t.syn,
    }
    return tuple(by[s] for s in TcpState)


class Flow:
    """One balanced connection. Per-flow, never per-packet."""

    __slots__ = (
        "service", "backend", "proto", "state", "last", "fwd_key", "rev_key",
        "snat_port", "placed", "lru", "reclaim", "peer", "ws",
    )

    def __init__(self, service: ServiceRuntime, backend: BackendRuntime, proto: int,
                 state: TcpState, now: float, fwd_key: bytes, rev_key: bytes,
                 snat_port: int = 0) -> None:
        self.service = service
        self.backend = backend  # its backend at run time (figures, state)
        self.proto = proto
        self.state = state
        self.last = now
        self.fwd_key = fwd_key
        self.rev_key = rev_key
        self.snat_port = snat_port  # fullnat: the pool port it holds (0: none)
        #: (the policy that placed it, the flow key it was asked about, the backend value it
        #: returned), to tell it when the flow ends; None for flows no policy placed
        self.placed: tuple[Policy, FlowKey, Backend] | None = None
        #: the least-recently-used list of its state, while it is in the table
        self.lru: OrderedDict[Flow, None] | None = None
        #: the port pool's list of reclaimable half-open flows, while it is on it
        self.reclaim: OrderedDict[Flow, None] | None = None
        #: TCP: per direction (client 0, backend 1) the bytes ack..window (8) of its last
        #: segment: what the RST window check needs
        self.peer: list[bytes] = [b"", b""]
        #: TCP: the window scale shift each side's SYN announced (client, backend), -1 for
        #: none; scaling is in use when both did (RFC 7323 2.2)
        self.ws: list[int] = [-1, -1]


class Entry(NamedTuple):
    """One direction of a flow, as the per-packet path needs it (see the module docstring);
    ``counts`` is its backend's packets and bytes in this direction."""

    flow: Flow
    header: bytes
    ip_delta: int
    l4_delta: int
    is_reply: bool
    counts: Direction


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
        #: per state, its flows, least recently used first
        self._lru: tuple[OrderedDict[Flow, None], ...] = tuple(OrderedDict() for _ in TcpState)
        self.active = 0

    def __len__(self) -> int:
        return self.active

    def build(self, service: ServiceRuntime, backend: BackendRuntime, proto: int,
              state: TcpState, key: bytes, rev_key: bytes, src: bytes, sport: bytes,
              baddr: bytes, snat_port: int, now: float) -> tuple[Flow, Entry, Entry]:
        """A flow ``key`` (as the client sends it) on ``backend`` (address ``baddr``), its
        packets leaving from ``src``:``sport``, its replies arriving as ``rev_key``
        (``reply_key``), and its two entries; not in the table (see ``add``)."""
        alen = len(baddr)
        client, vip = key[:alen], key[alen:2 * alen]
        fwd_hdr = src + rev_key[:alen] + sport + rev_key[-4:-2]
        rev_hdr = vip + client + key[-2:] + key[-4:-2]
        flow = Flow(service, backend, proto, state, now, key, rev_key, snat_port)
        v4 = alen == 4
        fwd = _entry(Entry, (flow, fwd_hdr, delta(client + vip, src + baddr) if v4 else 0,
                             delta(key, fwd_hdr), False, backend.inbound))
        rev = _entry(Entry, (flow, rev_hdr, delta(baddr + src, vip + client) if v4 else 0,
                             delta(rev_key, rev_hdr), True, backend.outbound))
        return flow, fwd, rev

    def install(self, service: ServiceRuntime, backend: BackendRuntime, proto: int,
                state: TcpState, key: bytes, rev_key: bytes, src: bytes, sport: bytes,
                baddr: bytes, snat_port: int, now: float) -> Entry:
        """``build`` the flow and ``add`` it; returns its forward entry. The caller has made
        room (``evict_for_new``) and checked that ``rev_key`` is free."""
        flow, fwd, rev = self.build(service, backend, proto, state, key, rev_key, src, sport,
                                    baddr, snat_port, now)
        self.add(flow, fwd, rev)
        return fwd

    def add(self, flow: Flow, fwd: Entry, rev: Entry) -> None:
        table = self.by_proto[flow.proto]
        table[flow.fwd_key] = fwd
        table[flow.rev_key] = rev
        self.active += 1
        lru = flow.lru = self._lru[flow.state]
        lru[flow] = None

    def remove(self, flow: Flow) -> None:
        table = self.by_proto[flow.proto]
        if table.get(flow.fwd_key, (None,))[0] is flow:
            del table[flow.fwd_key]
        if table.get(flow.rev_key, (None,))[0] is flow:
            del table[flow.rev_key]
        if flow.lru is not None:
            del flow.lru[flow]
            flow.lru = None  # marks it gone
            self.active -= 1

    def touch(self, flow: Flow, now: float) -> None:
        """A packet of ``flow`` at ``now`` (the fast path does the same inline)."""
        flow.last = now
        if flow.lru is not None:
            flow.lru.move_to_end(flow)

    def set_state(self, flow: Flow, state: TcpState) -> None:
        """Move ``flow`` to ``state`` (and to the end of that state's list: the caller
        touches it at the same ``now``)."""
        flow.state = state
        if flow.lru is not None:
            del flow.lru[flow]
            lru = flow.lru = self._lru[state]
            lru[flow] = None

    def deadline(self, flow: Flow) -> float:
        return flow.last + self.timeout[flow.state]

    def _earliest(self) -> Flow | None:
        """The flow with the earliest deadline: the earliest of each state's first flow."""
        best: Flow | None = None
        due = 0.0
        for lru, timeout in zip(self._lru, self.timeout, strict=True):
            if lru:
                flow = next(iter(lru))
                d = flow.last + timeout
                if best is None or d < due:
                    best, due = flow, d
        return best

    def next_deadline(self) -> float | None:
        flow = self._earliest()
        return None if flow is None else self.deadline(flow)

    def expire(self, now: float, limit: int = 1 << 62) -> list[Flow]:
        """Remove and return the flows whose idle timeout has passed at ``now``, at most
        ``limit`` of them (``next_deadline`` then says ``now`` or earlier: call again)."""
        gone: list[Flow] = []
        for lru, timeout in zip(self._lru, self.timeout, strict=True):
            while lru and len(gone) < limit:
                flow = next(iter(lru))
                if flow.last + timeout > now:
                    break
                self.remove(flow)
                gone.append(flow)
        return gone

    def evict_one(self) -> Flow | None:
        """Remove the flow nearest its idle timeout (within a state, the least recently used):
        half-open flows (60 s) go before established ones (900 s), which is what a SYN flood
        needs."""
        flow = self._earliest()
        if flow is not None:
            self.remove(flow)
        return flow

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

    def flows(self) -> list[Flow]:
        """Every flow in the table (a walk: for tools and tests, not the packet path)."""
        return [flow for lru in self._lru for flow in lru]
