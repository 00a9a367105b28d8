"""The core: ``Engine.handle(data, now)`` takes an IP packet and returns its verdict.

The engine is the packet's dispatcher and the flow's life cycle, nothing else. It never
touches a socket, the kernel or a clock: ``now`` is given, expiry runs through
``get_timer()`` / ``handle_timer(now)``, and its outputs are explicit: the verdict
``handle`` returns (:mod:`nfqlb.verdict`: rewritten ``bytes``, ``ACCEPT``, ``DROP``, or
``Held(id)`` for a fragment kept until its first fragment comes), and the verdicts of held
packets that became final, taken with ``released_verdicts()``.

Who does what around it:

- :mod:`nfqlb.wire` parses (``parse_ip``) and rewrites (``rewrite``, ``clamp_mss``) bytes;
- :mod:`nfqlb.flows` keeps the table: keys of both directions, states, deadlines, install,
  eviction at ``max_flows``;
- :mod:`nfqlb.services` answers for a service: which backend (policy, fallback, containment),
  which source port (fullnat pool), what a flow that ended gives back;
- :mod:`nfqlb.frags` remembers what became of first fragments and holds early ones;
- :mod:`nfqlb.counters` counts, under the registry's names.

The way of a packet: the fast path first, for an IPv4 packet without options or an IPv6
packet without extension headers, not a fragment, whose flow is known: one dict lookup (the
flow itself; its key says the direction), incremental checksum updates with the flow's
precomputed deltas, one ``bytes.join``. An established TCP flow's segment without SYN, FIN or
RST is rewritten at once; any other segment of a known flow (the handshake, the teardown)
goes through the TCP state table first (``_known_tcp``), and a segment or datagram of no flow
goes straight to the transport step below, both with the offsets the fast path checked: such
packets are never parsed twice. Anything else takes the general path: ``parse_ip``, then
ICMP errors (translated by :mod:`nfqlb.icmp`), later fragments (they follow their first), or
the transport: a known flow moves through the TCP state table and is rewritten; a SYN (or any
UDP datagram) to a VIP opens a flow; any other packet to a VIP is an unknown flow
(``unknown_flow``), and a packet neither to a VIP nor of a flow may be a backend's reply to a
flow adopted by hash, else it is not ours and passes.
"""

from __future__ import annotations

import logging
import random
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nfqlb import icmp
from nfqlb.config import Config, OnBackendDown, UnknownFlow, bulk_marks, bulk_whole
from nfqlb.counters import Counters, format_stats
from nfqlb.errors import PacketError
from nfqlb.flows import (
    HALF_OPEN,
    REUSABLE,
    TRANSITIONS,
    WSCALE_UNSEEN,
    Flow,
    FlowTable,
    TcpEvent,
    TcpState,
    peer_of,
    reply_key,
    tcp_event,
    timeouts_by_state,
)
from nfqlb.frags import FragmentTracker
from nfqlb.policies import Policy
from nfqlb.ratelog import RateLimitedLog
from nfqlb.services import BackendRuntime, ServiceRuntime, Services
from nfqlb.snat import TimeWait, timewait_of
from nfqlb.values import Backend, Mode
from nfqlb.verdict import ACCEPT, DROP, Final, Held, Verdict
from nfqlb.wire.checksum import U16
from nfqlb.wire.ip import ICMP, ICMPV6, TCP, UDP, Parsed, parse_ip
from nfqlb.wire.rewrite import clamp_mss, rewrite, rewrite_addresses
from nfqlb.wire.tcp import build_rst, build_rst_to, syn_options, tcp_wscale

if TYPE_CHECKING:
    from nfqlb.frags import Outcome

__all__ = ["ACCEPT", "DROP", "Engine", "Held", "Verdict", "backend_of"]

_ESTABLISHED: typing.Final = TcpState.ESTABLISHED

#: What ``parse_ip`` says of a TCP segment or UDP datagram the fast path checked (IPv4
#: without options, IPv6 without extension headers, not a fragment).
_TCP4: typing.Final = Parsed(False, 20, TCP, None, True)
_TCP6: typing.Final = Parsed(True, 40, TCP, None, True)
_UDP4: typing.Final = Parsed(False, 20, UDP, None, True)
_UDP6: typing.Final = Parsed(True, 40, UDP, None, True)

#: ``TRANSITIONS`` as the packet path reads it: ``_NEXT[state][event]``, the new state (the
#: same state where the table lists none).
_NEXT: typing.Final[tuple[tuple[TcpState, ...], ...]] = tuple(
    tuple(TRANSITIONS.get((s, e), s) for e in TcpEvent) for s in TcpState)

#: ``tcp_event`` as the packet path reads it: ``_EVENT[flags & 0x17 | is_reply << 5]``.
_EVENT: typing.Final[tuple[TcpEvent, ...]] = tuple(
    tcp_event(i & 0x17, bool(i >> 5)) for i in range(64))

#: Flows expired per handle_timer call at most: a million flows coming due at once are
#: expired a slice per event-loop turn, with the queue read in between (get_timer says when
#: more are due: at once).
EXPIRE_SLICE: typing.Final = 1000

#: States whose flows give their fullnat port first when their backend's ports run out: the
#: connection is over, the flow only lingers for retransmissions (see nfqlb.snat).
CLOSED_STATES: typing.Final = frozenset({TcpState.CLOSING, TcpState.CLOSED})

#: States whose fullnat flows are on one of their backend's reclaim lists (``_track_port``).
_RECLAIMABLE: typing.Final = CLOSED_STATES | HALF_OPEN

#: ``_LIST_OF[state]``: the reclaim list (0: half-open, 1: closed) a fullnat flow holding a
#: port is on in ``state``, None for none.
_LIST_OF: typing.Final[tuple[int | None, ...]] = tuple(
    (1 if s in CLOSED_STATES else 0) if s in _RECLAIMABLE else None for s in TcpState)

#: ``_MOVES_LIST[old][new]``: whether a fullnat flow changes reclaim list (or goes on or off
#: one) when it moves from state ``old`` to ``new``.
_MOVES_LIST: typing.Final[tuple[tuple[bool, ...], ...]] = tuple(
    tuple((a in _RECLAIMABLE, a in CLOSED_STATES) != (b in _RECLAIMABLE, b in CLOSED_STATES)
          for b in TcpState) for a in TcpState)


#: The headers route of a fullnat flow (``Engine.handle_headers``): its large packets go
#: whole until this many have come, then its map elements are added (``bulk_ops``), and once
#: they are in its large packets are marked. Short flows (a page of a few GSO packets) never
#: cost an nftables transaction.
BULK_AFTER: typing.Final = 4
BULK_PENDING: typing.Final = -1  # its elements are being added
BULK_READY: typing.Final = -2  # they are in: its packets are marked
BULK_FAILED: typing.Final = -3  # the kernel refused them: its packets go whole


#: From this length on, a fast path's join takes the rest of the packet through a view: a
#: 64 KiB GSO packet is copied once, not twice (a slice, then the join). Below it, the slice
#: costs less than making the view.
_VIEW_FROM: typing.Final = 4096


def _rest(data: bytes, off: int, n: int) -> bytes | memoryview:
    """``data[off:]`` for the join that ends a rewrite, by view when the packet is long."""
    if n >= _VIEW_FROM:
        return memoryview(data)[off:]
    return data[off:]


def _clamped(data: bytes, off: int, mss: int, clamp: int, l4c: int) -> tuple[int, bytes]:
    """(the TCP checksum ``l4c`` updated, the bytes of ``data`` from its TCP checksum's end on)
    with the MSS value at ``mss`` lowered to ``clamp`` (``clamp_mss``, inside the caller's
    join). The checksum's words start at the TCP header: an MSS at an odd offset counts 256
    times its value in the sum."""
    old = data[mss] << 8 | data[mss + 1]
    l4c = (l4c - ((clamp - old) << ((mss - off & 1) << 3))) % 0xFFFF
    return l4c, b"".join((data[off + 18:mss], U16[clamp], data[mss + 2:]))


def _shortest_timeout(config: Config) -> float:
    return min(min(timeouts_by_state(config.timeouts)), config.timeouts.frag)


class Engine:
    def __init__(self, config: Config, rng: random.Random | None = None,
                 log: logging.Logger | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.log = log or logging.getLogger("nfqlb.engine")
        self.counters = Counters()
        self._ratelog = RateLimitedLog(self.log)
        self.table = FlowTable(config.timeouts, config.daemon.max_flows)
        # clock: a real one (the daemon's time.perf_counter) to time policy hooks; None: untimed
        self.services = Services(config, rng or random.Random(0), self.counters, self._ratelog,
                                 clock)
        self.frags = FragmentTracker(config.daemon.max_fragments, config.timeouts.frag,
                                     config.daemon.max_fragments_per_source)
        self.mss_clamp = config.daemon.mss_clamp
        self.services.table_flows = self.table.flows  # (reloads, listings: a walk)
        self._tcp = self.table.by_proto[TCP]
        self._udp = self.table.by_proto[UDP]
        self._rings = self.table.rings
        self._established = self.table.rings[TcpState.ESTABLISHED]
        self._udp_ring = self.table.rings[TcpState.UDP]
        self._released: list[tuple[int, Final]] = []
        self._outbound: list[bytes] = []  # packets of nfqlb's own to send (see packets_to_send)
        #: offload backends whose flows are to end (see kernel_flows_to_reset)
        self._kernel_resets: list[tuple[ServiceRuntime, BackendRuntime, str]] = []
        self._sampled = float("-inf")  # when the backends last noted their flows placed
        #: the shortest idle timeout of flows and fragments: no packet makes ``get_timer``
        #: sooner than the packet's ``now`` plus this
        self.shortest_timeout = _shortest_timeout(config)
        #: the headers route's mark for a packet to send on whole (see handle_headers)
        self.bulk_whole = bulk_whole(config.daemon)
        #: fullnat flows on the headers route: large packets seen so far (from 1), or
        #: BULK_PENDING, BULK_READY, BULK_FAILED
        self._bulk: dict[Flow, int] = {}
        #: the nftables map elements to change, in order, for nfqlb.io.bulk: (True, flow) adds
        #: a fullnat flow's, (False, flow) removes a retired one's
        self.bulk_ops: list[tuple[bool, Flow]] = []
        self._number_bulk(config, [])

    def _number_bulk(self, config: Config, gone: list[BackendRuntime]) -> None:
        """Give each backend its headers-route marks as the rules number them (gone ones:
        none, their rewrite is no longer in the nftables table)."""
        marks = bulk_marks(config.daemon, config.services, config.bulk_numbers)
        self.bulk_whole = bulk_whole(config.daemon)
        for rt in gone:
            rt.bulk_in = rt.bulk_out = 0
        for svc in config.services:
            for rt in self.services.named(svc.name).backends.values():
                rt.bulk_in, rt.bulk_out = marks.get((svc.name, rt.name), (0, 0))
                rt.bulk_flow = svc.mode is Mode.FULLNAT

    def bulk_done(self, flows: list[Flow], ok: bool) -> None:
        """The map elements of ``flows`` (``bulk_ops`` adds) are in the kernel (``ok``), or
        were refused: their large packets are marked from now on, or go whole for good."""
        state = BULK_READY if ok else BULK_FAILED
        for flow in flows:
            if self._bulk.get(flow) == BULK_PENDING:
                self._bulk[flow] = state

    def bulk_readd(self) -> int:
        """The map elements of every flow whose are in (the table was made anew without
        them): asked for again (``bulk_ops``), its large packets whole until they are back.
        Returns how many flows."""
        again = [flow for flow, state in self._bulk.items() if state == BULK_READY]
        for flow in again:
            self._bulk[flow] = BULK_PENDING
            self.bulk_ops.append((True, flow))
        return len(again)

    # ---------------------------------------------------------------- per packet

    def handle_headers(self, data: bytes, n: int, now: float) -> int:
        """The headers route (daemon.bulk = "headers"): ``data`` is the start of a TCP packet
        of ``n`` bytes (a GSO packet, a jumbo frame); the answer is a packet mark. A segment
        of an established flow without SYN, FIN or RST gets its backend's mark for its
        direction (the nftables table rewrites by it as the fast path would; the flow is
        touched and counted as there); anything else, ``bulk_whole``: the packet comes back
        whole on the large-packet queue, to ``handle``. A fullnat flow's own addresses and
        ports are map elements in the kernel: its packets are marked only once they are in
        (``bulk_ops``, ``bulk_done``), after BULK_AFTER large packets. Never raises."""
        whole = self.bulk_whole
        try:
            m = len(data)
            b0 = data[0] if m >= 40 else 0
            if b0 == 0x45:
                if data[9] != TCP or data[6] & 0x3F or data[7] or (data[32] >> 4) * 4 > m - 20:
                    return whole
                k = data[12:24]
                flags = data[33]
                ack = 28
            elif b0 & 0xF0 == 0x60 and m >= 60:
                if data[6] != TCP or (data[52] >> 4) * 4 > m - 40:
                    return whole
                k = data[8:44]
                flags = data[53]
                ack = 48
            else:
                return whole
            flow = self._tcp.get(k)
            if flow is None or flow.state is not _ESTABLISHED or flags & 0x07:
                return whole
            backend = flow.backend
            if not backend.bulk_in:  # (no marks: not on the route, or removed by a reload)
                return whole
            if backend.bulk_flow:
                seen = self._bulk.get(flow, 0)
                if seen != BULK_READY:
                    if seen >= 0:
                        seen += 1
                        if seen >= BULK_AFTER:
                            seen = BULK_PENDING
                            self.bulk_ops.append((True, flow))
                        self._bulk[flow] = seen
                    return whole
            if k == flow.fwd_key:
                mark = backend.bulk_in
                flow.peer_c = peer_of(data, ack)
                t = backend.inbound
            else:
                mark = backend.bulk_out
                flow.peer_b = peer_of(data, ack)
                t = backend.outbound
            self.table.touch(flow, now)
            t.packets += 1
            t.bytes += n
            self.counters.fast += 1  # rewritten: by the kernel, as the engine would
            return mark
        except Exception:  # a bug must cost the route, never the packet nor the worker
            self.log.exception("internal error reading a packet's headers; sent on whole")
            return whole

    def handle(self, data: bytes, now: float) -> Verdict:
        """Verdict for one IP packet. Never raises."""
        try:
            n = len(data)
            b0 = data[0] if n >= 28 else 0  # (IPv4 + UDP headers: 28 bytes; + TCP's: 40)
            if b0 == 0x45 and (data[2] << 8 | data[3]) == n and not (data[6] & 0x3F or data[7]):
                proto = data[9]
                if proto == TCP:
                    k = data[12:24]
                    flow = self._tcp.get(k)
                    if n >= 40 and 20 <= (data[32] >> 4) * 4 <= n - 20:
                        if flow is None:  # a new flow, or not ours: no need to parse again
                            self.counters.packets += 1
                            if data[33] & 0x17 == 0x02:  # a bare SYN
                                return self._syn(data, k, False, now)
                            return self._transport(data, _TCP4, now)[0]
                        if flow.state is not _ESTABLISHED or data[33] & 0x07:
                            return self._known_tcp(data, flow, k != flow.fwd_key, False, now)
                        flow.last = now
                        head = self._established
                        nxt = flow.next
                        if nxt is not head:  # to the end of its least-recently-used list
                            prev = flow.prev
                            prev.next = nxt  # type: ignore[union-attr]
                            nxt.prev = prev
                            tail = head.prev
                            tail.next = flow  # type: ignore[union-attr]
                            flow.prev = tail
                            flow.next = head
                            head.prev = flow
                        if k == flow.fwd_key:
                            flow.peer_c = peer_of(data, 28)
                            h = flow.rev_key  # (the new header: the reply key turned)
                            # checksum.apply_sub; a reply's (its deltas negated): apply_neg
                            ipc = ((data[10] << 8 | data[11]) - flow.ipd) % 0xFFFF
                            l4c = ((data[36] << 8 | data[37]) - flow.l4d) % 0xFFFF
                            t = flow.backend.inbound
                        else:
                            flow.peer_b = peer_of(data, 28)
                            h = flow.fwd_key
                            ipc = ((data[10] << 8 | data[11]) + flow.ipd) % 0xFFFF
                            l4c = ((data[36] << 8 | data[37]) + flow.l4d) % 0xFFFF
                            t = flow.backend.outbound
                        t.packets += 1
                        t.bytes += n
                        self.counters.fast += 1
                        return b"".join((
                            data[:10], U16[ipc], h[4:8], h[:4], h[10:], h[8:10], data[24:36],
                            U16[l4c], _rest(data, 38, n),
                        ))
                elif proto == UDP:
                    k = data[12:24]
                    flow = self._udp.get(k)
                    if flow is None and (data[24] << 8 | data[25]) == n - 20:
                        self.counters.packets += 1
                        return self._transport(data, _UDP4, now)[0]
                    if flow is not None and (data[24] << 8 | data[25]) == n - 20:
                        flow.last = now
                        head = self._udp_ring
                        nxt = flow.next
                        if nxt is not head:
                            prev = flow.prev
                            prev.next = nxt  # type: ignore[union-attr]
                            nxt.prev = prev
                            tail = head.prev
                            tail.next = flow  # type: ignore[union-attr]
                            flow.prev = tail
                            flow.next = head
                            head.prev = flow
                        c = data[26] << 8 | data[27]  # (0: no checksum, kept)
                        if k == flow.fwd_key:
                            h = flow.rev_key
                            ipc = ((data[10] << 8 | data[11]) - flow.ipd) % 0xFFFF
                            if c:
                                c = (c - flow.l4d) % 0xFFFF or 0xFFFF
                            t = flow.backend.inbound
                        else:
                            h = flow.fwd_key
                            ipc = ((data[10] << 8 | data[11]) + flow.ipd) % 0xFFFF
                            if c:
                                c = (c + flow.l4d) % 0xFFFF or 0xFFFF
                            t = flow.backend.outbound
                        t.packets += 1
                        t.bytes += n
                        self.counters.fast += 1
                        return b"".join((
                            data[:10], U16[ipc], h[4:8], h[:4], h[10:], h[8:10], data[24:26],
                            U16[c], _rest(data, 28, n),
                        ))
            elif b0 & 0xF0 == 0x60 and (data[4] << 8 | data[5]) == n - 40:
                proto = data[6]
                if proto == TCP:
                    k = data[8:44]
                    flow = self._tcp.get(k)
                    if n >= 60 and 20 <= (data[52] >> 4) * 4 <= n - 40:
                        if flow is None:
                            self.counters.packets += 1
                            if data[53] & 0x17 == 0x02:
                                return self._syn(data, k, True, now)
                            return self._transport(data, _TCP6, now)[0]
                        if flow.state is not _ESTABLISHED or data[53] & 0x07:
                            return self._known_tcp(data, flow, k != flow.fwd_key, True, now)
                        flow.last = now
                        head = self._established
                        nxt = flow.next
                        if nxt is not head:
                            prev = flow.prev
                            prev.next = nxt  # type: ignore[union-attr]
                            nxt.prev = prev
                            tail = head.prev
                            tail.next = flow  # type: ignore[union-attr]
                            flow.prev = tail
                            flow.next = head
                            head.prev = flow
                        if k == flow.fwd_key:
                            flow.peer_c = peer_of(data, 48)
                            h = flow.rev_key
                            l4c = ((data[56] << 8 | data[57]) - flow.l4d) % 0xFFFF
                            t = flow.backend.inbound
                        else:
                            flow.peer_b = peer_of(data, 48)
                            h = flow.fwd_key
                            l4c = ((data[56] << 8 | data[57]) + flow.l4d) % 0xFFFF
                            t = flow.backend.outbound
                        t.packets += 1
                        t.bytes += n
                        self.counters.fast += 1
                        return b"".join((
                            data[:8], h[16:32], h[:16], h[34:], h[32:34], data[44:56], U16[l4c],
                            _rest(data, 58, n),
                        ))
                elif proto == UDP:
                    k = data[8:44]
                    flow = self._udp.get(k)
                    if flow is None and n >= 48 and (data[44] << 8 | data[45]) == n - 40:
                        self.counters.packets += 1
                        return self._transport(data, _UDP6, now)[0]
                    c = data[46] << 8 | data[47] if n >= 48 else 0
                    if flow is not None and c and (data[44] << 8 | data[45]) == n - 40:
                        flow.last = now
                        head = self._udp_ring
                        nxt = flow.next
                        if nxt is not head:
                            prev = flow.prev
                            prev.next = nxt  # type: ignore[union-attr]
                            nxt.prev = prev
                            tail = head.prev
                            tail.next = flow  # type: ignore[union-attr]
                            flow.prev = tail
                            flow.next = head
                            head.prev = flow
                        if k == flow.fwd_key:
                            h = flow.rev_key
                            c = (c - flow.l4d) % 0xFFFF or 0xFFFF
                            t = flow.backend.inbound
                        else:
                            h = flow.fwd_key
                            c = (c + flow.l4d) % 0xFFFF or 0xFFFF
                            t = flow.backend.outbound
                        t.packets += 1
                        t.bytes += n
                        self.counters.fast += 1
                        return b"".join((
                            data[:8], h[16:32], h[:16], h[34:], h[32:34], data[44:46], U16[c],
                            _rest(data, 48, n),
                        ))
            self.counters.packets += 1
            return self._general(data, now)
        except PacketError as exc:
            if exc.frag_key is not None:  # a malformed first fragment: the rest go with it
                self._remember_fragment(exc.frag_key, exc.v6, DROP, now)
            return self.counters.drop(exc.reason)
        except Exception:  # a bug must cost one packet, never the worker
            self.log.exception("internal error handling a packet; dropped")
            return self.counters.drop("internal_error")

    def _syn(self, data: bytes, key: bytes, v6: bool, now: float) -> Verdict:
        """A bare SYN (no ACK, FIN or RST) of no known flow, its IP and TCP headers checked as
        the fast path checks them: to a service with a backend up, the flow is opened and the
        SYN rewritten in one pass (its MSS clamped in the same join); anything else takes
        ``_transport``."""
        if v6:
            off, p = 40, _TCP6
            svc = self.services.by_vip[TCP].get(data[24:40] + data[42:44])
        else:
            off, p = 20, _TCP4
            svc = self.services.by_vip[TCP].get(data[16:20] + data[22:24])
        if svc is None or not svc.any_live:
            return self._transport(data, p, now)[0]
        flow = self._open(svc, data, p, key, TcpState.SYN_SENT, now)
        if flow is None:
            return DROP
        ws, mss = syn_options(data, off)
        flow.ws = ws + 1  # the client's; the backend's is unseen
        flow.peer_c = peer_of(data, off + 8)
        l4c = ((data[off + 16] << 8 | data[off + 17]) - flow.l4d) % 0xFFFF  # (apply_sub)
        if mss >= 0 and (data[mss] << 8 | data[mss + 1]) > self.mss_clamp:
            l4c, rest = _clamped(data, off, mss, self.mss_clamp, l4c)
        else:
            rest = data[off + 18:]
        h = flow.rev_key  # (the new header: the reply key turned, as in handle)
        t = flow.backend.inbound
        t.packets += 1
        t.bytes += len(data)
        self.counters.rewritten += 1
        if v6:
            return b"".join((data[:8], h[16:32], h[:16], h[34:], h[32:34], data[44:56],
                             U16[l4c], rest))
        ipc = ((data[10] << 8 | data[11]) - flow.ipd) % 0xFFFF
        return b"".join((data[:10], U16[ipc], h[4:8], h[:4], h[10:], h[8:10], data[24:36],
                         U16[l4c], rest))

    def _known_tcp(self, data: bytes, flow: Flow, reply: bool, v6: bool,
                   now: float) -> Verdict:
        """A segment of a known TCP flow that is not the plain established case (the
        handshake, FINs, RSTs, anything of a flow not established), its IP and TCP headers
        checked as the fast path checks them (no IPv4 options, no IPv6 extension headers,
        not a fragment): the state table and the rewrite, without parsing again. A client's
        SYN (a retransmission, or a port reused while the flow closes) takes the general
        path."""
        off = 40 if v6 else 20
        flags = data[off + 13]
        if flags & 0x12 == 0x02:
            self.counters.packets += 1
            return self._transport(data, _TCP6 if v6 else _TCP4, now)[0]
        if flags & 0x04 and not rst_in_window(flow, data, off, reply):
            # endpoints ignore it (RFC 5961): so does the flow; the packet goes on, rewritten
            self.counters.event("rst_out_of_window")
        else:
            state = flow.state
            new = _NEXT[state][_EVENT[flags & 0x17 | reply << 5]]
            if new is not state:
                self._set_state(flow, new)
        backend = flow.backend
        l4c = data[off + 16] << 8 | data[off + 17]
        ipc = data[10] << 8 | data[11]  # (IPv6: not a checksum, unused)
        if reply:  # (checksum.apply_neg; the client's packets: apply_sub)
            h = flow.fwd_key  # (the new header: the other key turned, as in handle)
            l4c = (l4c + flow.l4d) % 0xFFFF
            ipc = (ipc + flow.ipd) % 0xFFFF
            flow.peer_b = peer_of(data, off + 8)
            t = backend.outbound
        else:
            h = flow.rev_key
            l4c = (l4c - flow.l4d) % 0xFFFF
            ipc = (ipc - flow.ipd) % 0xFFFF
            flow.peer_c = peer_of(data, off + 8)
            t = backend.inbound
        flow.last = now  # (FlowTable.touch, inline)
        prev = flow.prev
        if prev is not None:
            head = self._rings[flow.state]
            nxt = flow.next
            if nxt is not head:
                prev.next = nxt
                nxt.prev = prev
                tail = head.prev
                tail.next = flow  # type: ignore[union-attr]
                flow.prev = tail
                flow.next = head
                head.prev = flow
        lists = backend.reclaim
        if lists is not None:  # fullnat: to the end of its reclaim list, if on one
            i = _LIST_OF[flow.state]
            if i is not None and flow in lists[i]:
                lists[i].move_to_end(flow)
                if i and flags & 0x01 and not reply:  # the client's FIN, the backend's first
                    lists[1][flow] = timewait_of(data, off, now)
        t.packets += 1
        t.bytes += len(data)
        self.counters.fast += 1
        rest = data[off + 18:]
        if flags & 0x02:  # a SYN-ACK (a client's SYN took _transport above)
            ws, mss = syn_options(data, off)
            if reply:
                flow.set_wscale(True, ws)
            if mss >= 0 and (data[mss] << 8 | data[mss + 1]) > self.mss_clamp:
                l4c, rest = _clamped(data, off, mss, self.mss_clamp, l4c)
        if v6:
            return b"".join((data[:8], h[16:32], h[:16], h[34:], h[32:34], data[44:56],
                             U16[l4c], rest))
        return b"".join((data[:10], U16[ipc], h[4:8], h[:4], h[10:], h[8:10], data[24:36],
                         U16[l4c], rest))

    def output_pending(self) -> bool:
        """Whether ``released_verdicts``, ``packets_to_send`` or ``kernel_flows_to_reset``
        have anything (one cheap test the daemon makes after each wakeup)."""
        return bool(self._released or self._outbound or self._kernel_resets)

    def packets_to_send(self) -> list[bytes]:
        """IP packets nfqlb sends of its own accord since the last call: the RSTs that end
        both sides of flows it gives up (``on_backend_down = "reset"``, ``drain_timeout``).
        The daemon sends them on a raw socket."""
        out, self._outbound = self._outbound, []
        return out

    def kernel_flows_to_reset(self) -> list[tuple[ServiceRuntime, BackendRuntime, str]]:
        """The offload backends whose flows are to end since the last call (service, backend,
        why): the kernel holds those flows, so the daemon removes them from conntrack."""
        out, self._kernel_resets = self._kernel_resets, []
        return out

    def released_verdicts(self) -> list[tuple[int, Final]]:
        """The final verdicts of held packets decided since the last call, as
        ``(hold_id, verdict)``; each held packet appears exactly once (after ``handle`` or
        ``handle_timer``)."""
        out, self._released = self._released, []
        return out

    def _general(self, data: bytes, now: float) -> Verdict:
        """Everything the fast path does not take: parse fully, then decide."""
        p = parse_ip(data)
        if p is None:
            self.counters.passed_unknown += 1
            return ACCEPT  # not TCP/UDP/ICMP: not balanced here
        if p.proto == ICMP or p.proto == ICMPV6:
            return self._icmp(data, p)
        if not p.first:
            return self._later_fragment(data, p, now)
        verdict, flow, reply = self._transport(data, p, now)
        if p.frag_key is not None:  # a first fragment: the later ones will follow it
            self._remember_fragment(p.frag_key, p.v6, (flow, reply) if flow is not None
                                    and verdict.__class__ is bytes
                                    else ACCEPT if verdict is ACCEPT else DROP, now)
        return verdict

    def _transport(self, data: bytes, p: Parsed, now: float
                   ) -> tuple[Verdict, Flow | None, bool]:
        """A TCP/UDP packet with its transport header: its verdict, and the flow that
        rewrote it and whether as a reply (fragments of the same datagram will need them)."""
        v6, off, proto = p.v6, p.off, p.proto
        a, alen = (8, 16) if v6 else (12, 4)
        key = data[a:a + 2 * alen] + data[off:off + 4]
        flow = (self._tcp if proto == TCP else self._udp).get(key)
        if proto != TCP:
            if flow is None:
                svc = self.services.by_vip[UDP].get(data[a + alen:a + 2 * alen]
                                                     + data[off + 2:off + 4])
                if svc is None:
                    return self._unknown_reply(data, p, key, now)
                if not svc.any_live:
                    return self._no_backend_up(svc, data, p), None, False
                flow = self._open(svc, data, p, key, TcpState.UDP, now)
                if flow is None:
                    return DROP, None, False
                return self._rewrite(data, p, flow, False, now), flow, False
            reply = key != flow.fwd_key
            return self._rewrite(data, p, flow, reply, now), flow, reply
        flags = data[off + 13]
        if flow is not None and flags & 0x12 == 0x02 and flow.state in REUSABLE:
            self._close(flow, now)  # client port reused while closing: a new choice
            flow = None
        if flow is None:
            svc = self.services.by_vip[TCP].get(data[a + alen:a + 2 * alen]
                                                 + data[off + 2:off + 4])
            if svc is None:
                return self._unknown_reply(data, p, key, now)
            if flags & 0x17 != 0x02:  # only a bare SYN opens a TCP flow
                return self._unknown_flow(svc, data, p, key, now)
            if not svc.any_live:
                return self._no_backend_up(svc, data, p), None, False
            flow = self._open(svc, data, p, key, TcpState.SYN_SENT, now)
            if flow is None:
                return DROP, None, False
            flow.ws = tcp_wscale(data, off) + 1  # the client's; the backend's is unseen
            out = self._rewrite(data, p, flow, False, now)
            return clamp_mss(out, off, self.mss_clamp), flow, False
        reply = key != flow.fwd_key
        if flags & 0x04 and not rst_in_window(flow, data, off, reply):
            # endpoints ignore it (RFC 5961): so does the flow; the packet goes on, rewritten
            self.counters.event("rst_out_of_window")
        else:
            new = TRANSITIONS.get((flow.state, tcp_event(flags, reply)))
            if new is not None and new is not flow.state:
                self._set_state(flow, new)
        out = self._rewrite(data, p, flow, reply, now)
        if flags & 0x02:
            if reply and flags & 0x10:
                flow.set_wscale(True, tcp_wscale(data, off))
            out = clamp_mss(out, off, self.mss_clamp)
        return out, flow, reply

    def _rewrite(self, data: bytes, p: Parsed, flow: Flow, reply: bool, now: float) -> bytes:
        """Rewrite a TCP/UDP packet (or first fragment) of ``flow`` and account it."""
        off = p.off
        ipd, l4d = flow.ipd, flow.l4d
        if reply:
            out = rewrite(data, p.v6, off, p.proto, p.frag_key is not None,
                          flow.rev_hdr, 0xFFFF - ipd or 0xFFFF if ipd else 0,
                          0xFFFF - l4d or 0xFFFF)
            t = flow.backend.outbound
            if p.proto == TCP:
                flow.peer_b = peer_of(data, off + 8)
        else:
            out = rewrite(data, p.v6, off, p.proto, p.frag_key is not None,
                          flow.fwd_hdr, ipd, l4d)
            t = flow.backend.inbound
            if p.proto == TCP:
                flow.peer_c = peer_of(data, off + 8)
        flow.last = now  # (FlowTable.touch, inline)
        prev = flow.prev
        if prev is not None:
            head = self._rings[flow.state]
            nxt = flow.next
            if nxt is not head:
                prev.next = nxt
                nxt.prev = prev
                tail = head.prev
                tail.next = flow  # type: ignore[union-attr]
                flow.prev = tail
                flow.next = head
                head.prev = flow
        lists = flow.backend.reclaim
        if lists is not None:  # fullnat: to the end of its reclaim list, if on one
            i = _LIST_OF[flow.state]
            if i is not None and flow in lists[i]:
                lists[i].move_to_end(flow)
                if i and data[off + 13] & 0x01 and not reply:  # as in _known_tcp
                    lists[1][flow] = timewait_of(data, off, now)
        t.packets += 1
        t.bytes += len(data)
        self.counters.rewritten += 1
        return out

    # ---------------------------------------------------------------- fragments, ICMP

    def _remember_fragment(self, frag_key: bytes, v6: bool, what: Outcome, now: float) -> None:
        """Record what became of a first fragment (the flow and direction that rewrote it,
        or the ACCEPT/DROP it got) and settle the fragments that were waiting for it."""
        for hold_id, data in self.frags.remember(frag_key, what, now):
            self._released.append((hold_id, self._follow(data, v6, what)))

    def _follow(self, data: bytes, v6: bool, what: Outcome) -> Final:
        """A later fragment gets what its first fragment got."""
        if what is ACCEPT:
            self.counters.passed_unknown += 1
            return ACCEPT
        if what is DROP:
            return self.counters.drop("fragment_of_dropped")
        assert isinstance(what, tuple)
        flow, reply = what
        t = flow.backend.outbound if reply else flow.backend.inbound
        t.packets += 1
        t.bytes += len(data)
        self.counters.rewritten += 1
        header, ip_delta, _ = flow.side(reply)
        return rewrite_addresses(data, v6, header, ip_delta)

    def _later_fragment(self, data: bytes, p: Parsed, now: float) -> Verdict:
        assert p.frag_key is not None
        what = self.frags.entry_for(p.frag_key)
        if what is not None:
            return self._follow(data, p.v6, what)
        hold_id, refused = self.frags.hold(p.frag_key, data, now)
        if refused:
            return self.counters.drop(refused)
        self.counters.event("fragment_held")
        return Held(hold_id)

    def _icmp(self, data: bytes, p: Parsed) -> Verdict:
        if p.frag_key is not None:
            self.counters.passed_unknown += 1
            return ACCEPT
        out = icmp.translate_error(data, p.off, self.table.header)
        if out is None:
            self.counters.passed_unknown += 1
            return ACCEPT
        self.counters.event("icmp_error_translated")
        self.counters.rewritten += 1
        return out

    # ---------------------------------------------------------------- packets without a flow

    def _unknown_flow(self, svc: ServiceRuntime, data: bytes, p: Parsed, key: bytes,
                      now: float) -> tuple[Verdict, Flow | None, bool]:
        """A TCP packet to a VIP that is not a SYN and matches no flow (say, after a restart)."""
        how = svc.service.unknown_flow
        flags = data[p.off + 13]
        if how is UnknownFlow.RESET:
            if flags & 0x04:
                return self.counters.drop("no_flow"), None, False  # never a RST for a RST
            self.counters.event("reset_sent")
            if svc.local:
                # The VIP is this host's own address: the host's stack answers a segment of no
                # connection with a RST, as for any closed port. A RST forged here would have
                # a local source and, for a remote client, need forwarding (off in local mode)
                return ACCEPT, None, False
            return build_rst(data, p.off, p.v6), None, False  # the packet, turned around
        if how is UnknownFlow.HASH and p.frag_key is None:
            backend = svc.adopt_choice(svc.flow_key(key), now)
            if backend is not None:
                if flags & 0x05:  # FIN or RST: passed on by the hash, never a flow
                    return self._pass_unadopted(svc, data, p, key, backend, False), None, False
                flow = self._install(svc, key, p.proto, TcpState.ADOPTED, backend, now)
                if flow is not None:
                    flow.ws = WSCALE_UNSEEN  # not seen: the widest window, to judge RSTs
                    self.counters.event("flow_adopted")
                    return self._rewrite(data, p, flow, False, now), flow, False
        return self.counters.drop("no_flow"), None, False

    def _unknown_reply(self, data: bytes, p: Parsed, key: bytes,
                       now: float) -> tuple[Verdict, Flow | None, bool]:
        """A packet that is not to a VIP and matches no flow: a backend's reply to a flow
        nfqlb lost or never saw (its request went through another node), adopted where
        ``unknown_flow = "hash"`` when the service's adoption choice for the flow is this
        backend (``ServiceRuntime.adopt_choice``), or simply not ours (accepted).

        A packet from a backend to a client port that has a live flow on another backend is
        not adopted: it would take the flow over (the client's next packets would go to the
        other backend). It is not ours: it passes unchanged."""
        a, alen = (8, 16) if p.v6 else (12, 4)
        source = data[a:a + alen] + data[p.off:p.off + 2]
        client = data[a + alen:a + 2 * alen] + data[p.off + 2:p.off + 4]
        table = self.table.by_proto[p.proto]
        for svc in self.services.by_backend[p.proto].get(source, ()):
            vip = svc.vip_endpoint
            fwd_key = client[:-2] + vip[:-2] + client[-2:] + vip[-2:]
            if fwd_key in table:
                break  # the client port has a live flow, on another backend: a stray
            backend = svc.adopt_choice(svc.flow_key(fwd_key), now)
            if backend is None or backend.endpoint != source:
                continue
            if p.proto == TCP:
                if data[p.off + 13] & 0x05:  # FIN or RST: passed on by the hash, never a flow
                    return self._pass_unadopted(svc, data, p, fwd_key, backend, True), None, \
                        False
                state = TcpState.ADOPTED_REPLY
            else:
                state = TcpState.UDP
            flow = self._install(svc, fwd_key, p.proto, state, backend, now)
            if flow is None:
                break
            flow.ws = WSCALE_UNSEEN
            self.counters.event("flow_adopted")
            reply = key != flow.fwd_key
            return self._rewrite(data, p, flow, reply, now), flow, reply
        self.counters.passed_unknown += 1
        return ACCEPT, None, False

    def _pass_unadopted(self, svc: ServiceRuntime, data: bytes, p: Parsed, key: bytes,
                        backend: BackendRuntime, reply: bool) -> bytes:
        """Rewrite a packet of no flow as the flow ``key`` on ``backend`` would be, without
        installing it (a FIN or RST that ``unknown_flow = "hash"`` passes on)."""
        src, sport, dest, rev_key = self._addresses(svc, key, backend, 0)
        flow = self.table.build(svc, backend, p.proto, TcpState.CLOSED, key, rev_key, src,
                                sport, dest[:-2], 0, 0.0)
        self.counters.event("hash_passed")
        self.counters.rewritten += 1
        return rewrite(data, p.v6, p.off, p.proto, False, *flow.side(reply))

    # ---------------------------------------------------------------- the flow's life

    def _open(self, svc: ServiceRuntime, data: bytes, p: Parsed, key: bytes, state: TcpState,
              now: float) -> Flow | None:
        """Choose a backend for a new flow and install it; None if refused (counted). The
        flow keeps what it must tell its policy when it ends only if the policy asks
        (``on_flow_closed``)."""
        fkey = svc.flow_key(key)
        backend, placer, chosen, reason = svc.choose(fkey, now)
        if backend is None:
            svc.refused += 1
            self.counters.drop(reason)
            return None
        assert placer is not None and chosen is not None
        flow = self._install(svc, key, p.proto, state, backend, now,
                             (data, p.off) if state is TcpState.SYN_SENT else None)
        if flow is None:  # refused after all: the policy hears at once that it ended
            svc.tell_closed(placer, fkey, chosen, now)
        elif getattr(placer, "on_flow_closed", None) is not None:
            flow.placed = (placer, fkey, chosen)
        return flow

    def _no_backend_up(self, svc: ServiceRuntime, data: bytes, p: Parsed) -> Verdict:
        """A new flow to a service none of whose backends may take it (all down, drained or
        weight 0): refused, and counted; TCP gets ``unknown_flow``'s answer."""
        svc.refused += 1
        svc.no_backend_up += 1
        self.counters.event("no_backend_up")
        if p.proto == TCP and svc.service.unknown_flow is UnknownFlow.RESET:
            self.counters.event("reset_sent")
            return ACCEPT if svc.local else build_rst(data, p.off, p.v6)
        return self.counters.drop("no_backend")

    @staticmethod
    def _addresses(svc: ServiceRuntime, key: bytes, backend: BackendRuntime,
                   port: int) -> tuple[bytes, bytes, bytes, bytes]:
        """(source address, source port, backend address + port, reply key) of the flow
        ``key`` on ``backend``, its source the pool ``port`` (fullnat) or the client's."""
        if port:
            src, sport = svc.snat_address, U16[port]
        else:
            alen = len(key) // 2 - 2
            src, sport = key[:alen], key[-4:-2]
        dest = backend.endpoint
        return src, sport, dest, reply_key(dest, src, sport)

    def _take_port(self, svc: ServiceRuntime, backend: BackendRuntime, now: float,
                   syn: tuple[bytes, int] | None) -> int | None:
        """A pool port for a new fullnat flow to ``backend`` (unique per backend), chosen so
        that the backend's TIME_WAIT of the port's last connection, if any, lets ``syn``
        in; when none is free, a flow of that backend holding one gives it back: a closed
        one, else the least recently used half-open one (nfqlb.snat)."""
        pool = svc.pool
        assert pool is not None
        while True:
            port, victim, clash = pool.choose(backend.endpoint, now, syn)
            if victim is None:
                break
            assert isinstance(victim, Flow)
            self.table.remove(victim)
            self.counters.event("reclaimed")
            vport = victim.snat_port
            if pool.lo <= vport <= pool.hi:  # its port passes straight to the new flow
                self._retire(victim, now, keep_port=True)
                port = vport
                break
            # (a port of an earlier range, after a reload: not this pool's, gone with it)
            self._retire(victim, now)
        if not port:
            svc.refuse_no_port(now)
            return None
        if clash:
            self.counters.event("timewait_reused")
        return port

    def _install(self, svc: ServiceRuntime, key: bytes, proto: int, state: TcpState,
                 backend: BackendRuntime, now: float,
                 syn: tuple[bytes, int] | None = None) -> Flow | None:
        """Put a flow on ``backend`` in the table, both directions; None if refused (counted):
        no pool port, or the reply key belongs to another live flow. ``syn``: the SYN that
        opens it and its TCP header's offset (a fullnat port's TIME_WAIT is judged by it)."""
        port = 0 if svc.pool is None else self._take_port(svc, backend, now, syn)
        if port is None:
            self.counters.drop("snat_exhausted")
            return None
        if port:  # (_addresses, inline)
            src, sport = svc.snat_address, U16[port]
        else:
            alen = len(key) // 2 - 2
            src, sport = key[:alen], key[-4:-2]
        dest = backend.endpoint
        rev_key = dest[:-2] + src + dest[-2:] + sport  # (reply_key)
        table = self.table
        clash = table.by_proto[proto].get(rev_key)
        if clash is not None:
            if clash.state in REUSABLE:
                self._close(clash, now)
            else:
                if svc.pool is not None:
                    svc.pool.give(port, backend.endpoint)
                self.counters.drop("reply_collision")
                return None
        if table.active >= table.max_flows:
            for victim in table.evict_for_new():
                self._retire(victim, now)
                self.counters.event("evicted")
            self._ratelog.warning("evicted", now, "flow table full (max_flows %d): evicting "
                                  "the flows nearest their idle timeout", table.max_flows)
        self.counters.flows_total += 1
        flow = table.install(svc, backend, proto, state, key, rev_key, src, sport, dest[:-2],
                             port, now)
        backend.started(flow)
        if port:
            _track_port(flow, None, state, True)
        return flow

    def _set_state(self, flow: Flow, state: TcpState) -> None:
        old = flow.state
        was = old is _ESTABLISHED
        if was is not (state is _ESTABLISHED):  # established <-> inactive, as ipvsadm counts
            rt = flow.backend
            d = -1 if was else 1
            rt.established += d
            rt.inactive -= d
        flow.state = state  # (FlowTable.set_state, inline: to the end of that state's list)
        prev = flow.prev
        if prev is not None:
            nxt = flow.next
            prev.next = nxt
            nxt.prev = prev
            head = self._rings[state]
            tail = head.prev
            tail.next = flow  # type: ignore[union-attr]
            flow.prev = tail
            flow.next = head
            head.prev = flow
        if flow.backend.reclaim is not None and _MOVES_LIST[old][state]:
            _track_port(flow, old, state)

    def _close(self, flow: Flow, now: float) -> None:
        self.table.remove(flow)
        self._retire(flow, now)

    def _retire(self, flow: Flow, now: float, keep_port: bool = False) -> None:
        """A flow left the table: its service takes back what it held (a fullnat port with
        the TIME_WAIT its backend holds for it, unless ``keep_port``: the caller hands the
        port to a new flow) and accounts it."""
        if self._bulk:
            seen = self._bulk.pop(flow, 0)
            if seen < 0:  # its map elements were (or are being) added: removed after
                self.bulk_ops.append((False, flow))
        timewait = None
        if flow.backend.reclaim is not None and flow.state in _RECLAIMABLE:
            timewait = _track_port(flow, flow.state, None)
        flow.backend.owner.flow_ended(flow, now, flow.state is _ESTABLISHED, timewait,
                                      give_port=not keep_port)

    def policy(self, service: str) -> Policy:
        """The policy object of the service named ``service``, for whatever feeds it (a policy
        may expose methods of its own, such as examples/policies/least_latency.py's
        ``observe``). Call it from the thread that calls ``handle``."""
        return self.services.named(service).policy

    def _reset_flows(self, rt: BackendRuntime, now: float, why: str,
                     owner: ServiceRuntime | None = None) -> int:
        """End every flow of ``rt``: a RST to both ends of each TCP flow whose sequence numbers
        are known (``packets_to_send``), and the flow leaves the table. ``owner``: its
        service, when a reload removed that service (it is no longer among the services)."""
        owner = owner or self.services.owner(rt)
        if owner.service.mode is Mode.OFFLOAD:  # its flows are the kernel's, not in the table
            self._kernel_resets.append((owner, rt, why))
            return 0
        service = owner.name  # (a removed backend leaves with its last flow)
        n = 0
        for flow in self.table.of_backend(rt):
            if flow.proto == TCP:
                table = self.table.by_proto[TCP]
                client_seen, backend_seen = flow.peer_c, flow.peer_b  # what each expects next
                if table.get(flow.rev_key) is flow and client_seen >= 0:
                    # to the client, as the VIP
                    self._outbound.append(build_rst_to(flow.rev_hdr, client_seen >> 24))
                if table.get(flow.fwd_key) is flow and backend_seen >= 0:
                    # to the backend, as the client
                    self._outbound.append(build_rst_to(flow.fwd_hdr, backend_seen >> 24))
            self._close(flow, now)
            n += 1
        if n:
            self.counters.event("flows_reset", n)
            self.log.info("service %s: backend %s %s: %d flows reset", service, rt.name, why,
                          n)
        return n

    # ---------------------------------------------------------------- operations

    def set_health(self, service: str, backend: str, up: bool, now: float, reason: str = "",
                   latency: float | None = None) -> None:
        """A health check's result: up (takes new flows) or down (none; its flows follow the
        service's ``on_backend_down``). KeyError names an unknown service or backend."""
        svc, rt = self.services.backend(service, backend)
        if svc.set_health(rt, up, reason, latency, now) and \
                svc.service.on_backend_down is OnBackendDown.RESET:
            self._reset_flows(rt, now, "down")

    def drain(self, service: str, backend: str, now: float,
              timeout: float | None = None) -> None:
        """No new flows to the backend; its flows carry on until they end, or until
        ``timeout`` (default: the service's ``drain_timeout``; 0: no limit), then are reset
        (``handle_timer``)."""
        svc, rt = self.services.backend(service, backend)
        svc.drain(rt, now, timeout)

    def enable(self, service: str, backend: str, now: float) -> None:
        """Undo ``drain``."""
        svc, rt = self.services.backend(service, backend)
        svc.enable(rt, now)

    def set_weight(self, service: str, backend: str, weight: int, now: float) -> None:
        """The backend's weight from now on (0: no new flows), until a reload with a changed
        weight in the file. ValueError for a weight out of 0-1000000."""
        svc, rt = self.services.backend(service, backend)
        svc.set_weight(rt, weight, now)

    def reconfigure(self, config: Config, now: float) -> None:
        """Take a changed configuration while the flow table is kept: services and backends
        added or removed (a removed backend's flows follow its service's ``on_backend_down``;
        a removed service's flows end with its rules), weights, policies, timeouts (for every
        flow from now on), limits. Backends that stay keep their state (down, draining)."""
        gone_services, gone_backends = self.services.reconfigure(config)
        self.config = config
        self._number_bulk(config, gone_backends + [rt for svc in gone_services
                                                   for rt in svc.backends.values()])
        self.table.timeout = timeouts_by_state(config.timeouts)
        self.table.max_flows = config.daemon.max_flows
        self.mss_clamp = config.daemon.mss_clamp
        self.frags.max_held = config.daemon.max_fragments
        self.frags.max_per_source = config.daemon.max_fragments_per_source
        self.frags.timeout = config.timeouts.frag
        self.shortest_timeout = _shortest_timeout(config)
        for rt in gone_backends:
            if self.services.owner(rt).service.on_backend_down is OnBackendDown.RESET:
                self._reset_flows(rt, now, "removed")
        for svc in gone_services:
            if svc.service.on_backend_down is OnBackendDown.RESET:
                for rt in list(svc.backends.values()):
                    self._reset_flows(rt, now, "removed with its service", svc)

    def lingering(self) -> dict[str, tuple[Backend, ...]]:
        """Per service, the backends a reload removed that still have flows (their replies
        must still reach nfqlb: the daemon keeps their rules until these end)."""
        return self.services.lingering()

    def status(self, now: float) -> dict[str, Any]:
        """``stats()`` with every backend's state, weight, check and rates as of ``now``."""
        return {**self.stats(), "services": self.services.stats(now)}

    def flow_list(self, now: float, service: str | None = None, backend: str | None = None,
                  limit: int = 10_000) -> list[dict[str, Any]]:
        """The connection table as ``ipvsadm -Lnc`` shows it (see ``Services.flow_list``)."""
        return self.services.flow_list(now, self.table.deadline, service, backend, limit)

    # ---------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next run (same clock as ``now``), or None."""
        # (the daemon asks after every read from the queue: no lists built here)
        due = self.table.next_deadline()
        t = self.frags.next_deadline()
        if t is not None and (due is None or t < due):
            due = t
        for svc in self.services:
            for rt in svc.backends.values():
                t = rt.drain_deadline
                if t is not None and (due is None or t < due):
                    due = t
        return due

    def handle_timer(self, now: float) -> None:
        """Expire idle flows (at most EXPIRE_SLICE: ``get_timer`` then says ``now``), and
        fragments that waited too long (their DROP verdicts are then in
        ``released_verdicts()``)."""
        for flow in self.table.expire(now, EXPIRE_SLICE):
            self._retire(flow, now)
        if not now - 1.0 < self._sampled <= now:  # about once a second (or a clock jump)
            self._sampled = now
            self.services.sample(now)
        for svc in self.services:
            for rt in svc.backends.values():
                if rt.drain_deadline is not None and rt.drain_deadline <= now:
                    rt.drain_deadline = None
                    self._reset_flows(rt, now, "drain_timeout")
        for hold_id in self.frags.expire(now):
            self._released.append((hold_id, self.counters.drop("fragment_timeout")))

    # ---------------------------------------------------------------- counters

    def stats(self) -> dict[str, Any]:
        """Counters, and per service and backend the flows, packets and bytes. The names are
        those of :mod:`nfqlb.counters`; nothing here walks the table."""
        return {
            **self.counters.totals(),
            "fragments_held": self.frags.held,
            "flows_active": self.table.active,
            "services": self.services.stats(),
        }

    def format_stats(self) -> str:
        return format_stats(self.stats())


def _track_port(flow: Flow, old: TcpState | None, new: TcpState | None,
                held: bool = False) -> TimeWait | None:
    """A flow of a fullnat service moves from state ``old`` to ``new`` (None: into, out of
    the table): from its backend's reclaim list for ``old`` to that for ``new`` (closed,
    half-open; none for any other state), if it holds a port (``held``: the caller knows it
    does). A flow knows no list of its own: its state says which. Returns the TIME_WAIT
    noted for it on the closed list it leaves, if any."""
    lists = flow.backend.reclaim
    if lists is None:
        return None
    was = lists[old in CLOSED_STATES] if old in _RECLAIMABLE else None
    want = lists[new in CLOSED_STATES] if new in _RECLAIMABLE else None
    if was is want:
        return None
    noted = None
    if was is not None:
        noted = was.pop(flow, _NOT_ON)
        held = noted is not _NOT_ON
    # (Flow.snat_port, its first test: the source port toward the backend is not the client's)
    if want is not None and (held or flow.rev_key[-2:] != flow.fwd_key[-4:-2]
                             or flow.snat_port):
        want[flow] = None
    return noted if noted.__class__ is tuple else None


#: (``_track_port``: what popping a flow that is not on a reclaim list gives)
_NOT_ON: typing.Final = object()


def rst_in_window(flow: Flow, data: bytes, off: int, reply: bool) -> bool:
    """Whether the RST at ``off`` (from the backend if ``reply``) is in the receiver's window,
    as the receiver's last segment announced it: ``0 <= seq - ack <= window`` (mod 2**32),
    the window scaled when both SYNs carried a scale. With nothing seen from the receiver
    (or no ACK in it), the RST is taken as it is."""
    # ack, flags, window of the receiver's last segment (peer_of)
    seen = flow.peer_c if reply else flow.peer_b
    if seen < 0 or not seen >> 16 & 0x10:
        return True
    ack = seen >> 24
    window = seen & 0xFFFF
    ws = flow.ws
    if ws & 15 and ws >> 4 and not seen >> 16 & 0x02:  # a SYN's window is never scaled
        window <<= flow.wscale(not reply)
    seq = data[off + 4] << 24 | data[off + 5] << 16 | data[off + 6] << 8 | data[off + 7]
    return (seq - ack) & 0xFFFFFFFF <= max(window, 1)


def backend_of(engine: Engine, data: bytes) -> Backend | None:
    """The backend of the flow ``data`` belongs to (tests and tools), or None."""
    p = parse_ip(data)
    if p is None or p.proto not in (TCP, UDP) or not p.first:
        return None
    a, alen = (8, 16) if p.v6 else (12, 4)
    flow = engine.table.by_proto[p.proto].get(data[a:a + 2 * alen] + data[p.off:p.off + 4])
    return flow.backend.backend if flow else None
