"""The connection table: flows keyed in both directions, TCP/UDP states, timeouts, expiry.

Keys are the raw 12 bytes ``src addr | dst addr | src port | dst port`` of an IPv4 packet as
it arrives (36 bytes for IPv6), one dict per transport protocol. A flow is stored twice: under
the key of the client's packets (``fwd_key``) and under the key of the replies as they reach
us (``rev_key``); both entries' value is the :class:`Flow` itself, and a packet is a reply when
its key is not ``fwd_key``. Each direction's new ``src addr | dst addr | src port | dst port``
is the other direction's key turned around (a packet's answer swaps source and destination:
the client's packets leave as the replies will come back, turned; the replies leave as the
client's packets came, turned), so the flow keeps its two keys (the dict's own objects) and
no header; the packet path joins four slices of the key. The flow also holds the RFC 1624
differences from the client's key to its packets' new header, for the IPv4 header checksum
(0 for IPv6, which has none) and the TCP/UDP checksum (the pseudo-header's addresses and the
ports), computed when it is installed by integer arithmetic (``_res``), not word sums, as
shared int objects; the replies' are their negation (``rev_delta``: the reply rewrite undoes
the forward one), applied in one step (``checksum.apply_sub`` / ``apply_neg``). What follows
from the keys and the state is not stored either: a fullnat flow's pool port (the reply
key's destination port when it is not the client's port), its service (its backend's,
``BackendRuntime.owner``), the reclaim list it is on; and its backend keeps no set of its
flows (the rare operations that need them walk the table: ``of_backend``).

What an established IPv4 TCP flow costs at 1,000,000 flows (bench/flow_memory_bench.py,
tracemalloc, CPython 3.11): its two keys (2 x 45 bytes) and their two entries in the dict
(about 84 with the dict's slack) and its object (136 bytes as plain Python: 13 slots and the
object and GC headers; a few more compiled, :mod:`nfqlb.native`). What it keeps of each
side's last segment for the RST window check is one integer each (``peer_of``: ack, flags,
window in 56 bits), a C integer in the compiled object and no object of its own (a bytes
object of the segment's 8 bytes, as before, was 48 bytes each). As plain Python, its
last-use time costs nothing of its own either: ``last`` is the ``now`` it was given, and the
daemon's clock (:mod:`nfqlb.io.clock`) hands out one float object per 10 ms tick, shared by
every flow touched in that tick (compiled, it is a C double in the object).

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
flow only if it is in the window (the engine checks, with ``Flow.peer_c``/``peer_b``), as
conntrack does.

A SYN from the client on a SYN_SENT/SYN_RECV flow is a retransmission (same backend); on a flow
that is closing in any way (one FIN, both, RST) it is a reused client port and starts a new
flow (a new choice), as in conntrack and IPVS.

Expiry and eviction are exact: the flows of each state are kept in one least-recently-used
list (a ring linked through the flows' own ``prev``/``next`` slots; every packet moves its
flow to the end, ``touch``), so within a state the first flow is the one with the earliest
idle deadline (``last + timeout[state]``), and the earliest of the ten first flows is the
earliest of the table. ``next_deadline`` and ``expire`` (in bounded slices) are the engine's
get_timer/handle_timer; ``evict_for_new`` makes room at ``max_flows`` by removing exactly the
flows nearest their deadline.

The table installs flows (``install``: keys and precomputed rewrites of both directions). What
a flow held elsewhere (a pool port, a policy's count, its backend's totals) is given back by
whoever owns it: the table returns the flows it removed, and the engine retires them.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from nfqlb.config import Timeouts
from nfqlb.values import Backend
from nfqlb.wire.ip import TCP, UDP

if TYPE_CHECKING:

    from nfqlb.policies import FlowKey, Policy
    from nfqlb.services import BackendRuntime, ServiceRuntime


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
_OPEN: Final = (S.SYN_SENT, S.SYN_RECV, S.ESTABLISHED, S.ADOPTED, S.ADOPTED_REPLY)

#: (state, event) -> new state; pairs not listed keep their state.
TRANSITIONS: Final[dict[tuple[TcpState, TcpEvent], TcpState]] = {
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
REUSABLE: Final = frozenset({S.FIN_CLIENT, S.FIN_SERVER, S.CLOSING, S.CLOSED})

#: Half-open flows: when a fullnat port pool runs dry, those holding its ports go first.
HALF_OPEN: Final = frozenset({S.SYN_SENT, S.SYN_RECV})


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


@mypyc_attr(acyclic=True)
class Flow:
    """One balanced connection, both directions in its own slots (per flow, never per
    packet). It is the value of both of its keys in the table.

    What a direction's packets need and the other direction's can be worked out from
    (``rev_key``, the reverse deltas, the fullnat port) is not stored: see the module's
    docstring for what a flow costs.

    Compiled, a flow is no object of the cyclic garbage collector (``acyclic``): a full
    collection, which comes every time the objects that outlived the young ones have grown
    by a quarter, would otherwise walk every flow of the table, in one pause of the worker
    (about 200 ms at a million flows; ``bench/stall_bench.py``). The only cycles among
    flows are their rings' links, which the table undoes as flows leave it and when it is
    dropped (``FlowTable.__del__``); nothing a flow refers to refers back to it."""

    __slots__ = (
        "backend", "state", "last", "fwd_key", "rev_key", "ipd", "l4d", "peer_c", "peer_b", "ws",
        "prev", "next", "placed",
    )

    backend: BackendRuntime  # its backend at run time (figures, state; its service: owner)
    state: TcpState
    last: float  # the `now` of its last packet, the object given (the daemon shares one a tick)
    #: its keys (the dict's own objects): the client's packets' and the replies'; each
    #: direction's new header is the other's key turned around (``fwd_hdr``, ``rev_hdr``)
    fwd_key: bytes
    rev_key: bytes
    #: the client's packets' RFC 1624 deltas: IPv4 header checksum (0 for IPv6), TCP/UDP
    #: checksum; the replies' are their negation (``rev_delta``)
    ipd: int
    l4d: int
    #: TCP: ack, flags and window of the last segment of the client (``peer_c``) and of the
    #: backend (``peer_b``) as ``peer_of`` packs them, -1 until seen: what the RST window
    #: check and a reset's sequence numbers need
    peer_c: int
    peer_b: int
    #: TCP: the window scale shifts both SYNs announced, ``(client + 1) | (backend + 1) << 4``
    #: (0: neither announced one); see ``wscale``
    ws: int
    #: its neighbours in the least-recently-used list of its state; ``prev`` is None once it
    #: has left the table
    prev: Flow | None
    next: Flow
    #: (the policy that placed it, the flow key it was asked about, the backend value it
    #: returned), to tell it when the flow ends; None when no policy placed it or the policy
    #: does not ask (it has no ``on_flow_closed``)
    placed: tuple[Policy, FlowKey, Backend] | None

    def __init__(self, backend: BackendRuntime, proto: int, state: TcpState, now: float,
                 fwd_key: bytes, rev_key: bytes, snat_port: int = 0, ipd: int = 0,
                 l4d: int = 0) -> None:
        """A flow with deltas ``ipd``, ``l4d`` (zero: its headers are its keys turned around;
        ``FlowTable.build`` makes flows with their rewrite), not in the table. Its protocol
        is in its state (UDP flows are in state UDP); its service is its backend's
        (``BackendRuntime.owner``); ``snat_port`` follows from its keys."""
        assert (proto == UDP) is (state is TcpState.UDP), "a UDP flow is in state UDP"
        self.backend = backend
        self.state = state
        self.last = now
        self.fwd_key = fwd_key
        self.rev_key = rev_key
        self.ipd = ipd
        self.l4d = l4d
        self.peer_c = self.peer_b = -1
        self.ws = 0
        self.prev = None
        self.placed = None

    @property
    def proto(self) -> int:
        return UDP if self.state is TcpState.UDP else TCP

    @property
    def service(self) -> ServiceRuntime:
        return self.backend.owner

    @property
    def in_table(self) -> bool:
        return self.prev is not None

    @property
    def fwd_hdr(self) -> bytes:
        """The new ``src addr | dst addr | src port | dst port`` of the client's packets: the
        key of the replies turned around (a packet's answer swaps source and destination)."""
        k = self.rev_key
        return _turned(k, len(k) - 4 >> 1)

    @property
    def rev_hdr(self) -> bytes:
        """The replies' new header: the client's key turned around."""
        k = self.fwd_key
        return _turned(k, len(k) - 4 >> 1)

    @property
    def fwd_ipd(self) -> int:
        return self.ipd

    @property
    def fwd_l4d(self) -> int:
        return self.l4d

    @property
    def rev_ipd(self) -> int:
        return rev_delta(self.ipd) if self.ipd else 0

    @property
    def rev_l4d(self) -> int:
        return rev_delta(self.l4d)

    @property
    def snat_port(self) -> int:
        """fullnat: the pool port it holds, the source port of its packets to the backend
        (0: none, they leave from the client's address and port)."""
        fk, rk = self.fwd_key, self.rev_key  # (the new source: the reply's destination)
        n = len(fk) - 4 >> 1
        if rk[-2:] == fk[-4:-2] and rk[n:2 * n] == fk[:n]:
            return 0
        return rk[-2] << 8 | rk[-1]

    def wscale(self, backend: bool) -> int:
        """The window scale shift the backend's (else the client's) SYN announced, -1 for
        none."""
        return (self.ws >> 4 if backend else self.ws & 15) - 1

    def set_wscale(self, backend: bool, shift: int) -> None:
        if backend:
            self.ws = (self.ws & 15) | (shift + 1) << 4
        else:
            self.ws = (self.ws & 0xF0) | (shift + 1)

    def side(self, reply: bool) -> tuple[bytes, int, int]:
        """(header, IPv4 header delta, TCP/UDP delta) of one direction (the general path's
        and tools'; the fast path reads the slots)."""
        if reply:
            ipd = self.ipd
            return self.rev_hdr, _INT[0xFFFF - ipd or 0xFFFF] if ipd else 0, _INT[
                0xFFFF - self.l4d or 0xFFFF]
        return self.fwd_hdr, self.ipd, self.l4d


def peer_of(data: bytes, i: int) -> int:
    """The TCP header's ack (32 bits), flags (8) and window (16) at ``data[i:i + 8]`` (its
    bytes 8-15: ack, data offset, flags, window) as one integer, ``ack << 24 | flags << 16 |
    window``: 56 bits, a C integer in a compiled flow (Flow.peer_c, peer_b)."""
    return (data[i] << 48 | data[i + 1] << 40 | data[i + 2] << 32 | data[i + 3] << 24
            | data[i + 5] << 16 | data[i + 6] << 8 | data[i + 7])


def _turned(key: bytes, n: int) -> bytes:
    """``src addr | dst addr | src port | dst port`` (addresses of ``n`` bytes) with source
    and destination swapped: a packet's key as its answer carries it."""
    return key[n:2 * n] + key[:n] + key[-2:] + key[-4:-2]


def rev_delta(d: int) -> int:
    """The delta that undoes the delta ``d`` (in 1..0xFFFF, ``res_delta``): its negation,
    ``res_delta(-diff)`` for ``d = res_delta(diff)``, in 1..0xFFFF too."""
    return _INT[0xFFFF - d or 0xFFFF]


#: Both SYNs unseen, taken as the widest scale (14, RFC 7323): how adopted flows judge RSTs.
WSCALE_UNSEEN: Final = 15 | 15 << 4


def _ring() -> Flow:
    """The sentinel of a least-recently-used list: an empty ring (no flow: its backend, of no
    service, is never read; compiled, a flow's backend must be one)."""
    from nfqlb.services import BackendRuntime

    nobody = BackendRuntime(Backend("(ring)", None, 0, 0), ipaddress.IPv4Address(0), 0)
    head = Flow(nobody, TCP, TcpState.CLOSED, 0.0, b"", b"")
    head.prev = head.next = head
    return head


#: Where a dropped table's ring sentinels point (``FlowTable.__del__``): an empty ring.
_UNLINKED: Final = _ring()

#: Every 16-bit value as one shared int object: a flow's four deltas cost no memory of their
#: own (an int above 256 is a 28-byte object in CPython).
_INT: Final[tuple[int, ...]] = tuple(range(0x10000))


def res_delta(diff: int) -> int:
    """``checksum.delta(old, new)`` from ``diff = W(new) - W(old)``, ``W`` the bytes read as
    one big-endian integer: 2**16 = 1 (mod 0xFFFF), so ``W`` is the sum of the 16-bit words
    modulo 0xFFFF, and ``delta`` is the representative in 1..0xFFFF of the difference of the
    sums whenever ``new`` is not all zeros (it never is here: it holds a backend's, a VIP's
    or a client's address). tests/test_checksum.py checks the two agree."""
    return _INT[diff % 0xFFFF or 0xFFFF]


def reply_key(dest: bytes, src: bytes, sport: bytes) -> bytes:
    """The key of a flow's replies, once its packets leave from ``src``:``sport`` to
    ``dest`` (the backend's packed address and 2-byte port)."""
    return dest[:-2] + src + dest[-2:] + sport


class FlowTable:
    def __init__(self, timeouts: Timeouts, max_flows: int = 1 << 62) -> None:
        self.timeout = timeouts_by_state(timeouts)
        self.max_flows = max_flows
        self.by_proto: dict[int, dict[bytes, Flow]] = {TCP: {}, UDP: {}}
        #: per state, the ring of its flows, least recently used first (``head.next``)
        self.rings: tuple[Flow, ...] = tuple(_ring() for _ in TcpState)
        self.active = 0

    def __len__(self) -> int:
        return self.active

    def __del__(self) -> None:
        """Undo every ring: compiled, flows are not tracked by the garbage collector (see
        ``Flow``), so the cycles of a ring's links would keep a dropped table's flows alive
        for good. Each flow is left pointing at its ring's sentinel only, so freeing them
        is no chain of a million nested deallocations either."""
        for head in self.rings:
            flow = head.next
            while flow is not head:
                nxt = flow.next
                flow.prev = None
                flow.next = head
                flow = nxt
            head.prev = None
            head.next = _UNLINKED

    @staticmethod
    def build(service: ServiceRuntime, backend: BackendRuntime, proto: int, state: TcpState,
              key: bytes, rev_key: bytes, src: bytes, sport: bytes, baddr: bytes,
              snat_port: int, now: float) -> Flow:
        """A flow ``key`` (as the client sends it) on ``backend`` (address ``baddr``), its
        packets leaving from ``src``:``sport``, its replies arriving as ``rev_key``
        (``reply_key``), with both directions' rewrites; not in the table (see ``add``)."""
        alen = len(baddr)
        fwd_hdr = src + rev_key[:alen] + sport + rev_key[-4:-2]
        # (see res_delta) the TCP/UDP delta covers all twelve bytes, the IPv4 header's the
        # addresses, its first eight; the reverse rewrite undoes the forward one (its old and
        # new words swapped), so its deltas are the forward ones negated (``rev_delta``)
        new, old = int.from_bytes(fwd_hdr, "big"), int.from_bytes(key, "big")
        diff = new - old
        l4d = _INT[diff % 0xFFFF or 0xFFFF]
        if alen == 4:
            diff = (new >> 32) - (old >> 32)
            ipd = _INT[diff % 0xFFFF or 0xFFFF]
        else:
            ipd = 0
        return Flow(backend, proto, state, now, key, rev_key, snat_port, ipd, l4d)

    def install(self, service: ServiceRuntime, backend: BackendRuntime, proto: int,
                state: TcpState, key: bytes, rev_key: bytes, src: bytes, sport: bytes,
                baddr: bytes, snat_port: int, now: float) -> Flow:
        """``build`` the flow and ``add`` it. The caller has made room (``evict_for_new``)
        and checked that ``rev_key`` is free."""
        flow = self.build(service, backend, proto, state, key, rev_key, src, sport, baddr,
                          snat_port, now)
        table = self.by_proto[proto]  # (add, inline: the protocol is known here)
        table[key] = flow
        table[rev_key] = flow
        self.active += 1
        head = self.rings[state]
        tail = head.prev
        assert tail is not None
        tail.next = flow
        flow.prev = tail
        flow.next = head
        head.prev = flow
        return flow

    def add(self, flow: Flow) -> None:
        table = self.by_proto[flow.proto]
        table[flow.fwd_key] = flow
        table[flow.rev_key] = flow
        self.active += 1
        head = self.rings[flow.state]
        tail = head.prev
        assert tail is not None
        tail.next = flow
        flow.prev = tail
        flow.next = head
        head.prev = flow

    def remove(self, flow: Flow) -> None:
        table = self.by_proto[flow.proto]
        if table.get(flow.fwd_key) is flow:
            del table[flow.fwd_key]
        if table.get(flow.rev_key) is flow:
            del table[flow.rev_key]
        prev = flow.prev
        if prev is not None:
            nxt = flow.next
            prev.next = nxt
            nxt.prev = prev
            flow.prev = None  # marks it gone
            # and holds no neighbour: a flow gone but still referred to (a fragment's
            # outcome, a held packet) keeps no chain of other gone flows alive behind it
            flow.next = _UNLINKED
            self.active -= 1

    def touch(self, flow: Flow, now: float) -> None:
        """A packet of ``flow`` at ``now`` (the fast path does the same inline): to the end
        of its state's list."""
        flow.last = now
        prev = flow.prev
        if prev is not None:
            head = self.rings[flow.state]
            nxt = flow.next
            if nxt is not head:
                prev.next = nxt
                nxt.prev = prev
                tail = head.prev
                assert tail is not None
                tail.next = flow
                flow.prev = tail
                flow.next = head
                head.prev = flow

    def set_state(self, flow: Flow, state: TcpState) -> None:
        """Move ``flow`` to ``state`` (and to the end of that state's list: the caller
        touches it at the same ``now``)."""
        prev = flow.prev
        flow.state = state
        if prev is not None:
            nxt = flow.next
            prev.next = nxt
            nxt.prev = prev
            head = self.rings[state]
            tail = head.prev
            assert tail is not None
            tail.next = flow
            flow.prev = tail
            flow.next = head
            head.prev = flow

    def deadline(self, flow: Flow) -> float:
        return flow.last + self.timeout[flow.state]

    def _earliest(self) -> Flow | None:
        """The flow with the earliest deadline: the earliest of each state's first flow."""
        best: Flow | None = None
        due = 0.0
        for head, timeout in zip(self.rings, self.timeout, strict=True):
            flow = head.next
            if flow is not head:
                d = flow.last + timeout
                if best is None or d < due:
                    best, due = flow, d
        return best

    def next_deadline(self) -> float | None:
        due = None
        for head, timeout in zip(self.rings, self.timeout, strict=True):
            flow = head.next
            if flow is not head:
                d = flow.last + timeout
                if due is None or d < due:
                    due = d
        return due

    def expire(self, now: float, limit: int = 1 << 62) -> list[Flow]:
        """Remove and return the flows whose idle timeout has passed at ``now``, at most
        ``limit`` of them (``next_deadline`` then says ``now`` or earlier: call again)."""
        gone: list[Flow] = []
        for head, timeout in zip(self.rings, self.timeout, strict=True):
            while len(gone) < limit:
                flow = head.next
                if flow is head or flow.last + timeout > now:
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
        out = []
        for head in self.rings:
            flow = head.next
            while flow is not head:
                out.append(flow)
                flow = flow.next
        return out

    def header(self, proto: int, key: bytes) -> bytes | None:
        """The header the packets with ``key`` are rewritten with, None if no flow has it
        (ICMP errors are translated with it)."""
        flow = self.by_proto[proto].get(key) if proto in self.by_proto else None
        if flow is None:
            return None
        return flow.fwd_hdr if key == flow.fwd_key else flow.rev_hdr

    def of_backend(self, backend: BackendRuntime) -> list[Flow]:
        """The flows of ``backend`` (a walk of the table, as ``flows``: the rare events that
        need them, a backend's reset, a reload, a tool's listing; no flow carries a place
        in a per-backend set)."""
        return [flow for flow in self.flows() if flow.backend is backend]
