"""The core: ``Engine.handle(data, now)`` takes an IP packet and returns its verdict.

A verdict is ``bytes`` (accept this rewritten packet), ``ACCEPT`` (accept unchanged), ``DROP``,
or ``HOLD`` (a fragment that came before its first fragment: the caller keeps the packet under
``engine.last_hold_id``, and its final verdict appears later in ``engine.released`` as
``(hold_id, verdict)``). The engine owns the connection table, the services, their policies
and fullnat port pools, fragment tracking and the counters. It never touches a socket, the
kernel or a clock: ``now`` is given, and expiry runs through ``get_timer()`` /
``handle_timer(now)``.

The per-packet path for an IPv4 packet without options, or an IPv6 packet without extension
headers, whose flow is known and established is one dict lookup, incremental checksum updates
and one ``bytes.join``; anything else (handshake, FIN/RST, new flows, options, fragments, ICMP
errors, malformed input) takes the general path.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass, field
from typing import Any, cast

from nfqlb import icmp
from nfqlb.config import Backend, Config, Mode, Service, UnknownFlow
from nfqlb.errors import PacketError
from nfqlb.flows import REUSABLE, TRANSITIONS, Entry, Flow, FlowTable, TcpState, tcp_event
from nfqlb.frags import FragmentTracker
from nfqlb.policies import DROP as POLICY_DROP
from nfqlb.policies import FlowKey, Policy, make_policy
from nfqlb.policies.hashing import flow_bytes, rendezvous
from nfqlb.policies.plugins import where
from nfqlb.snat import PortPool
from nfqlb.wire.checksum import U16, apply, delta, full
from nfqlb.wire.ip import parse_ip
from nfqlb.wire.ipv4 import tcp_mss_offset
from nfqlb.wire.tcp import build_rst

ACCEPT = 0  # accept unchanged
DROP = 1  # drop
HOLD = 2  # keep the packet: its verdict comes later through ``released``

Verdict = bytes | int

_ESTABLISHED = TcpState.ESTABLISHED
_RATE_LIMIT_S = 10.0


@dataclass(slots=True)
class _BackendCount:
    flows: int = 0
    packets: int = 0
    bytes: int = 0


@dataclass(slots=True)
class ServiceState:
    """A service at run time: its policy (and the fallback for when the policy fails), its
    port pool and its closed-flow totals."""

    service: Service
    policy: Policy
    pool: PortPool | None
    closed: dict[str, _BackendCount] = field(default_factory=dict)
    refused: int = 0
    fallback: Policy | None = None  # None: a flow the policy fails on is dropped
    policy_errors: int = 0  # choose/on_flow_closed raised, or choose returned a stranger
    backend_set: frozenset[Backend] = frozenset()  # what choose may return


class Engine:
    def __init__(self, config: Config, rng: random.Random | None = None,
                 log: logging.Logger | None = None) -> None:
        self.config = config
        self.log = log or logging.getLogger("nfqlb.engine")
        self.rng = rng or random.Random(0)
        self.table = FlowTable(config.timeouts)
        self.max_flows = config.daemon.max_flows
        self.mss_clamp = config.daemon.mss_clamp
        self.frags = FragmentTracker(config.daemon.max_fragments, config.timeouts.frag)
        self._tcp = self.table.by_proto[6]
        self._udp = self.table.by_proto[17]
        # protocol -> {vip packed + port (2 bytes) -> ServiceState}
        self.services: dict[int, dict[bytes, ServiceState]] = {6: {}, 17: {}}
        # protocol -> {backend address + port -> services adopting its packets by hash}
        self._hash_replies: dict[int, dict[bytes, list[ServiceState]]] = {6: {}, 17: {}}
        pools: dict[tuple[Any, ...], PortPool] = {}
        for svc in config.services:
            pool = None
            if svc.mode is Mode.FULLNAT:
                assert svc.snat_address is not None and svc.snat_ports is not None
                pkey = (svc.protocol, svc.snat_address, svc.snat_ports)
                pool = pools.get(pkey) or pools.setdefault(pkey, PortPool(*svc.snat_ports))
            state = self._service_state(svc, pool)
            for b in svc.backends:
                state.closed[b.name] = _BackendCount()
                if svc.unknown_flow is UnknownFlow.HASH:
                    addr = (b.address or svc.vip).packed + U16[b.port]
                    self._hash_replies[svc.protocol].setdefault(addr, []).append(state)
            self.services[svc.protocol][svc.vip.packed + U16[svc.port]] = state
        # counters: plain ints on the hot path, a dict for the rarer outcomes
        self.packets = 0
        self.rewritten = 0
        self.flows_total = 0
        self.passed_unknown = 0  # not to a VIP and no flow: not ours, accepted unchanged
        self.events: dict[str, int] = {}  # things that happened that are not drops
        self.drops: dict[str, int] = {}
        self.released: list[tuple[int, Verdict]] = []
        self.last_hold_id = 0
        self._entry_used: Entry | None = None
        self._last_log: dict[str, float] = {}

    def _service_state(self, svc: Service, pool: PortPool | None) -> ServiceState:
        """Build the service's policy and fallback, each with its own RNG seeded from the
        engine's (so a service's choices do not depend on other services' traffic)."""
        policy = make_policy(svc.policy, svc.backends, svc.policy_options,
                             random.Random(self.rng.getrandbits(64)))
        fallback = None
        if svc.policy_fallback != POLICY_DROP:
            fallback = make_policy(svc.policy_fallback, svc.backends,
                                   rng=random.Random(self.rng.getrandbits(64)))
        return ServiceState(svc, policy, pool, fallback=fallback,
                            backend_set=frozenset(svc.backends))

    # ---------------------------------------------------------------- per packet

    def handle(self, data: bytes, now: float) -> Verdict:
        """Verdict for one IP packet. Never raises."""
        self.packets += 1
        try:
            n = len(data)
            b0 = data[0] if n >= 48 else 0
            if b0 == 0x45 and (data[2] << 8 | data[3]) == n and not (data[6] & 0x3F or data[7]):
                proto = data[9]
                if proto == 6:
                    ent = self._tcp.get(data[12:24])
                    if ent is not None and not data[33] & 0x07 \
                            and 20 <= (data[32] >> 4) * 4 <= n - 20:
                        flow, hdr, ipd, l4d, reply = ent
                        if flow.state is _ESTABLISHED:
                            flow.last = now
                            flow.packets += 1
                            flow.bytes += n
                            self.rewritten += 1
                            return b"".join((
                                data[:10], U16[apply(data[10] << 8 | data[11], ipd)], hdr,
                                data[24:36], U16[apply(data[36] << 8 | data[37], l4d)],
                                data[38:],
                            ))
                elif proto == 17:
                    ent = self._udp.get(data[12:24])
                    if ent is not None and (data[24] << 8 | data[25]) == n - 20:
                        flow, hdr, ipd, l4d, reply = ent
                        flow.last = now
                        flow.packets += 1
                        flow.bytes += n
                        self.rewritten += 1
                        c = data[26] << 8 | data[27]
                        if c:
                            c = apply(c, l4d) or 0xFFFF
                        return b"".join((
                            data[:10], U16[apply(data[10] << 8 | data[11], ipd)], hdr,
                            data[24:26], U16[c], data[28:],
                        ))
            elif b0 & 0xF0 == 0x60 and (data[4] << 8 | data[5]) == n - 40:
                proto = data[6]
                if proto == 6:
                    ent = self._tcp.get(data[8:44])
                    if ent is not None and n >= 60 and not data[53] & 0x07 \
                            and 20 <= (data[52] >> 4) * 4 <= n - 40:
                        flow, hdr, ipd, l4d, reply = ent
                        if flow.state is _ESTABLISHED:
                            flow.last = now
                            flow.packets += 1
                            flow.bytes += n
                            self.rewritten += 1
                            return b"".join((
                                data[:8], hdr, data[44:56],
                                U16[apply(data[56] << 8 | data[57], l4d)], data[58:],
                            ))
                elif proto == 17:
                    ent = self._udp.get(data[8:44])
                    c = data[46] << 8 | data[47]
                    if ent is not None and c and (data[44] << 8 | data[45]) == n - 40:
                        flow, hdr, ipd, l4d, reply = ent
                        flow.last = now
                        flow.packets += 1
                        flow.bytes += n
                        self.rewritten += 1
                        return b"".join((
                            data[:8], hdr, data[44:46], U16[apply(c, l4d) or 0xFFFF], data[48:],
                        ))
            return self._general(data, now)
        except PacketError as exc:
            return self._drop(exc.reason, now)
        except Exception:  # a bug must cost one packet, never the worker
            self.log.exception("internal error handling a packet; dropped")
            return self._drop("internal_error", now)

    def _general(self, data: bytes, now: float) -> Verdict:
        """Everything the fast path does not take: parse fully, then decide."""
        p = parse_ip(data)
        if p is None:
            self.passed_unknown += 1
            return ACCEPT  # not TCP/UDP/ICMP: not balanced here
        if p.proto == 1 or p.proto == 58:
            return self._icmp(data, p, now)
        if not p.first:
            return self._later_fragment(data, p, now)
        self._entry_used = None
        verdict = self._transport(data, p, now)
        if p.frag_key is not None:  # a first fragment: the later ones will follow it
            ent = self._entry_used
            self._remember_fragment(p, ent if ent is not None and isinstance(verdict, bytes)
                                    else ACCEPT if verdict == ACCEPT else DROP, now)
        return verdict

    def _transport(self, data: bytes, p: Any, now: float) -> Verdict:
        """A TCP/UDP packet with its transport header. A rewrite by a flow's entry records
        the entry in ``_entry_used`` (fragments of the same datagram will need it)."""
        v6, off, proto = p.v6, p.off, p.proto
        a, alen = (8, 16) if v6 else (12, 4)
        key = data[a:a + 2 * alen] + data[off:off + 4]
        table = self._tcp if proto == 6 else self._udp
        ent = table.get(key)
        if proto == 6:
            flags = data[off + 13]
            if ent is not None and flags & 0x12 == 0x02 and ent[0].state in REUSABLE:
                self._close(ent[0], now)  # client port reused after close: a new choice
                ent = None
            if ent is None:
                vip = data[a + alen:a + 2 * alen] + data[off + 2:off + 4]
                svc = self.services[6].get(vip)
                if svc is None:
                    return self._unknown_reply(data, p, key, now)
                if flags & 0x17 != 0x02:  # only a bare SYN opens a TCP flow
                    return self._unknown_flow(svc, data, p, key, now)
                ent = self._open(svc, data, p, key, TcpState.SYN_SENT, None, now)
                if ent is None:
                    return DROP
                flow = ent[0]
                flow.packets, flow.bytes = 1, len(data)
                self._entry_used = ent
                return self._clamp_mss(self._rewrite(data, p, ent), off)
            flow, _, _, _, reply = ent
            new = TRANSITIONS.get((flow.state, tcp_event(flags, reply)))
            if new is not None and new is not flow.state:
                flow.state = new
                self.table.arm(flow)
            out = self._rewrite(data, p, ent)
            if flags & 0x02:
                out = self._clamp_mss(out, off)
        else:
            if ent is None:
                vip = data[a + alen:a + 2 * alen] + data[off + 2:off + 4]
                svc = self.services[17].get(vip)
                if svc is None:
                    return self._unknown_reply(data, p, key, now)
                ent = self._open(svc, data, p, key, TcpState.UDP, None, now)
                if ent is None:
                    return DROP
            out = self._rewrite(data, p, ent)
        flow = ent[0]
        flow.last = now
        flow.packets += 1
        flow.bytes += len(data)
        self._entry_used = ent
        return out

    def _rewrite(self, data: bytes, p: Any, ent: Entry) -> bytes:
        """Rewrite addresses and ports of any TCP/UDP packet, checksums incrementally."""
        _, hdr, ipd, l4d, _ = ent
        off, proto = p.off, p.proto
        co = off + (16 if proto == 6 else 6)
        c = data[co] << 8 | data[co + 1]
        zero_udp6 = False
        if proto == 6:
            c = apply(c, l4d)
        elif c:
            c = apply(c, l4d) or 0xFFFF
        elif p.v6:
            zero_udp6 = True  # IPv6 UDP must carry a checksum: compute it below
        self.rewritten += 1
        if p.v6:
            out = b"".join((data[:8], hdr[:32], data[40:off], hdr[32:], data[off + 4:co],
                            U16[c], data[co + 2:]))
            if zero_udp6:
                if p.frag_key is not None:
                    raise PacketError("udp6_zero_checksum_fragment")
                seg = out[off:]
                pseudo = out[8:40] + len(seg).to_bytes(4, "big") + b"\0\0\0\x11"
                out = out[:co] + U16[full(pseudo + seg) or 0xFFFF] + out[co + 2:]
            return out
        return b"".join((
            data[:10], U16[apply(data[10] << 8 | data[11], ipd)], hdr[:8], data[20:off],
            hdr[8:], data[off + 4:co], U16[c], data[co + 2:],
        ))

    def _clamp_mss(self, out: bytes, off: int) -> bytes:
        """Lower the MSS option of a SYN to ``mss_clamp``.

        On loopback (MTU 64 KiB) a flow would otherwise send segments of up to 64 KiB, which
        the NetfilterQueue binding cannot carry: they would all take the large-packet queue.
        """
        pos = tcp_mss_offset(out, off)
        if pos < 0:
            return out
        mss = out[pos] << 8 | out[pos + 1]
        if mss <= self.mss_clamp:
            return out
        odd = (pos - off) & 1  # checksum words are aligned to the TCP header start
        a, b = pos - odd, pos + 2 + odd
        buf = bytearray(out)
        buf[pos:pos + 2] = U16[self.mss_clamp]
        d = delta(out[a:b], bytes(buf[a:b]))
        co = off + 16
        buf[co:co + 2] = U16[apply(out[co] << 8 | out[co + 1], d)]
        return bytes(buf)

    # ---------------------------------------------------------------- fragments, ICMP

    def _remember_fragment(self, p: Any, what: Entry | int, now: float) -> None:
        """Record what became of a first fragment (the flow entry that rewrote it, or the
        ACCEPT/DROP it got) and give the same to the fragments waiting for it."""
        for hold_id, data in self.frags.remember(p.frag_key, what, now):
            self.released.append((hold_id, self._follow(data, p.v6, what)))

    def _follow(self, data: bytes, v6: bool, what: Entry | int) -> Verdict:
        if isinstance(what, int):
            if what == ACCEPT:
                self.passed_unknown += 1
            else:
                self._drop("fragment_of_dropped", 0.0)
            return what
        return self._rewrite_addresses(data, v6, what)

    def _later_fragment(self, data: bytes, p: Any, now: float) -> Verdict:
        what = self.frags.entry_for(p.frag_key)
        if what is not None:
            return self._follow(data, p.v6, what)
        hold_id = self.frags.hold(p.frag_key, data, now)
        if hold_id is None:
            return self._drop("fragment_buffer_full", now)
        self.last_hold_id = hold_id
        self._count("fragment_held")
        return HOLD

    def _rewrite_addresses(self, data: bytes, v6: bool, ent: Entry) -> bytes:
        """The IP-level part of a rewrite, for fragments that carry no transport header."""
        _, hdr, ipd, _, _ = ent
        flow = ent[0]
        flow.packets += 1
        flow.bytes += len(data)
        self.rewritten += 1
        if v6:
            return b"".join((data[:8], hdr[:32], data[40:]))
        return b"".join((data[:10], U16[apply(data[10] << 8 | data[11], ipd)], hdr[:8],
                         data[20:]))

    def _icmp(self, data: bytes, p: Any, now: float) -> Verdict:
        if p.frag_key is not None:
            self.passed_unknown += 1
            return ACCEPT
        out = icmp.translate_error(data, p.off, self._lookup)
        if out is None:
            self.passed_unknown += 1
            return ACCEPT
        self._count("icmp_error_translated")
        self.rewritten += 1
        return out

    def _lookup(self, proto: int, key: bytes) -> Entry | None:
        table = self.table.by_proto.get(proto)
        return table.get(key) if table is not None else None

    # ---------------------------------------------------------------- packets without a flow

    def _unknown_flow(self, svc: ServiceState, data: bytes, p: Any, key: bytes,
                      now: float) -> Verdict:
        """A TCP packet to a VIP that is not a SYN and matches no flow (say, after a restart)."""
        how = svc.service.unknown_flow
        if how is UnknownFlow.RESET:
            if data[p.off + 13] & 0x04:
                return self._drop("no_flow", now)  # never answer a RST with a RST
            self._count("reset_sent")
            return build_rst(data, p.off, p.v6)  # the packet turns into its own answer
        if how is UnknownFlow.HASH and p.frag_key is None:
            backend = self._hash_choice(svc, self._flow_key(data, p))
            if backend is not None:
                ent = self._open(svc, data, p, key, _ESTABLISHED, backend, now)
                if ent is not None:
                    self._count("flow_adopted")
                    ent[0].packets, ent[0].bytes = 1, len(data)
                    self._entry_used = ent
                    return self._rewrite(data, p, ent)
        return self._drop("no_flow", now)

    def _unknown_reply(self, data: bytes, p: Any, key: bytes, now: float) -> Verdict:
        """A packet that is not to a VIP and matches no flow: a backend's reply to a flow
        nfqlb lost (adopted by hash where configured), or simply not ours (accepted)."""
        a, alen = (8, 16) if p.v6 else (12, 4)
        candidates = self._hash_replies[p.proto].get(data[a:a + alen] + data[p.off:p.off + 2])
        for svc in candidates or ():
            s = svc.service
            client = data[a + alen:a + 2 * alen] + data[p.off + 2:p.off + 4]
            fkey = FlowKey(p.proto, ipaddress.ip_address(client[:-2]),
                           client[-2] << 8 | client[-1], s.vip, s.port)
            backend = self._hash_choice(svc, fkey)
            if backend is None or (backend.address or s.vip).packed != data[a:a + alen] \
                    or backend.port != (data[p.off] << 8 | data[p.off + 1]):
                continue
            fwd_key = client[:-2] + s.vip.packed + client[-2:] + U16[s.port]
            state = _ESTABLISHED if p.proto == 6 else TcpState.UDP
            fwd = self._install(svc, fwd_key, p.proto, state, backend, now)
            if fwd is None:
                break
            self._count("flow_adopted")
            rev = self.table.by_proto[p.proto][key]
            rev[0].packets, rev[0].bytes = 1, len(data)
            self._entry_used = rev
            return self._rewrite(data, p, rev)
        self.passed_unknown += 1
        return ACCEPT

    def _hash_choice(self, svc: ServiceState, fkey: FlowKey) -> Backend | None:
        return rendezvous(flow_bytes(fkey), svc.service.backends)

    # ---------------------------------------------------------------- flows

    def _flow_key(self, data: bytes, p: Any) -> FlowKey:
        a, alen = (8, 16) if p.v6 else (12, 4)
        ip = ipaddress.ip_address
        off = p.off
        return FlowKey(p.proto, ip(data[a:a + alen]), data[off] << 8 | data[off + 1],
                       ip(data[a + alen:a + 2 * alen]), data[off + 2] << 8 | data[off + 3])

    def _open(self, svc: ServiceState, data: bytes, p: Any, key: bytes, state: TcpState,
              backend: Backend | None, now: float) -> Entry | None:
        """Choose a backend for a new flow (unless given) and install it; None if refused."""
        placer: Policy | None = None
        if backend is None:
            fkey = self._flow_key(data, p)
            backend, placer, reason = self._choose(svc, fkey, now)
            if backend is None:
                svc.refused += 1
                self._drop(reason, now)
                return None
        ent = self._install(svc, key, p.proto, state, backend, now)
        if placer is not None:
            if ent is None:  # refused after all: the policy hears at once that it ended
                self._flow_closed(svc, placer, fkey, backend, now)
            else:
                ent[0].policy_key = (placer, fkey)
        return ent

    def _choose(self, svc: ServiceState, fkey: FlowKey,
                now: float) -> tuple[Backend | None, Policy | None, str]:
        """(backend, the policy that chose it, drop reason if none). A failing policy is
        contained: counted, logged at a rate limit, and the fallback (if any) chooses."""
        try:
            backend = svc.policy.choose(fkey, now)
        except Exception as exc:
            problem = f"raised {where(exc)} in choose()"
        else:
            try:
                valid = backend is None or backend in svc.backend_set
            except TypeError:  # unhashable
                valid = False
            if valid:
                return backend, svc.policy, "no_backend"
            problem = f"returned {backend!r:.80}, not one of the service's backends"
        svc.policy_errors += 1
        self._count("policy_failure")
        fallback = svc.fallback
        s = svc.service
        self._warn(f"policy:{s.name}", now, "service %s: policy %s %s; flow %s:%d -> %s "
                   "(%d failures so far)", s.name, s.policy, problem, fkey.src, fkey.sport,
                   f"fallback {s.policy_fallback}" if fallback else "dropped", svc.policy_errors)
        if fallback is None:
            return None, None, "policy_error"
        self._count("policy_fallback")
        return fallback.choose(fkey, now), fallback, "no_backend"

    def _flow_closed(self, svc: ServiceState, policy: Policy, fkey: FlowKey, backend: Backend,
                     now: float) -> None:
        hook = getattr(policy, "on_flow_closed", None)
        if hook is not None:
            try:
                hook(fkey, backend, now)
            except Exception as exc:
                svc.policy_errors += 1
                self._count("policy_failure")
                self._warn(f"policy:{svc.service.name}", now, "service %s: policy %s raised %s "
                           "in on_flow_closed()", svc.service.name, svc.service.policy,
                           where(exc))

    def _install(self, svc: ServiceState, key: bytes, proto: int, state: TcpState,
                 backend: Backend, now: float) -> Entry | None:
        """Put a flow on ``backend`` in the table, both directions; None if refused."""
        service = svc.service
        alen = len(key) // 2 - 2
        src, dst, sport, dport = key[:alen], key[alen:2 * alen], key[-4:-2], key[-2:]
        baddr = backend.address.packed if backend.address is not None else dst
        bport = U16[backend.port]
        port = 0
        if svc.pool is not None:
            assert service.snat_address is not None
            got = svc.pool.take()
            if got is None:
                svc.refused += 1
                self._warn("snat_exhausted", now, "service %s: snat port pool %d-%d exhausted",
                           service.name, svc.pool.lo, svc.pool.hi)
                self._drop("snat_exhausted", now)
                return None
            port = got
            saddr, sp = service.snat_address.packed, U16[port]
        else:
            saddr, sp = src, sport
        fwd_hdr = saddr + baddr + sp + bport
        rev_key = baddr + saddr + bport + sp
        rev_hdr = dst + src + dport + sport
        table = self.table.by_proto[proto]
        clash = table.get(rev_key)
        if clash is not None:
            if clash[0].state in REUSABLE:
                self._close(clash[0], now)
            else:
                if svc.pool is not None:
                    svc.pool.give(port)
                self._drop("reply_collision", now)
                return None
        while self.table.active >= self.max_flows:
            victim = self.table.evict_one()
            if victim is None:
                break
            self._retire(victim, now)
            self._count("evicted")
            self._warn("evicted", now, "flow table full (max_flows %d): evicting the flows "
                       "nearest their idle timeout", self.max_flows)
        flow = Flow(service, backend, proto, state, now, key, rev_key)
        if svc.pool is not None:
            flow.pool, flow.snat_port = svc.pool, port
        v4 = alen == 4
        fwd: Entry = (flow, fwd_hdr, delta(src + dst, saddr + baddr) if v4 else 0,
                      delta(key, fwd_hdr), False)
        rev: Entry = (flow, rev_hdr, delta(baddr + saddr, dst + src) if v4 else 0,
                      delta(rev_key, rev_hdr), True)
        self.table.add(flow, fwd, rev)
        self.flows_total += 1
        return fwd

    def _close(self, flow: Flow, now: float) -> None:
        self.table.remove(flow)
        self._retire(flow, now)

    def _retire(self, flow: Flow, now: float) -> None:
        """Account a flow that left the table and give back what it held."""
        if flow.pool is not None:
            flow.pool.give(flow.snat_port)
        svc = self._state_of(flow.service)
        count = svc.closed.setdefault(flow.backend.name, _BackendCount())
        count.flows += 1
        count.packets += flow.packets
        count.bytes += flow.bytes
        if flow.policy_key is not None:  # (the policy that placed it, its flow key)
            placer, fkey = cast(tuple[Policy, FlowKey], flow.policy_key)
            self._flow_closed(svc, placer, fkey, flow.backend, now)

    def policy(self, service: str) -> Policy:
        """The policy object of the service named ``service``, for whatever feeds it (a policy
        may expose methods of its own, such as examples/policies/least_latency.py's
        ``observe``). Call it from the thread that calls ``handle``."""
        for by_key in self.services.values():
            for svc in by_key.values():
                if svc.service.name == service:
                    return svc.policy
        raise KeyError(service)

    def _state_of(self, service: Service) -> ServiceState:
        return self.services[service.protocol][service.vip.packed + U16[service.port]]

    # ---------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next run (same clock as ``now``), or None."""
        a, b = self.table.next_deadline(), self.frags.next_deadline()
        if a is None or b is None:
            return a if b is None else b
        return min(a, b)

    def handle_timer(self, now: float) -> None:
        """Expire idle flows and fragments that waited too long."""
        for flow in self.table.expire(now):
            self._retire(flow, now)
        for hold_id in self.frags.expire(now):
            self._drop("fragment_timeout", now)
            self.released.append((hold_id, DROP))

    # ---------------------------------------------------------------- counters

    def _drop(self, reason: str, now: float) -> int:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return DROP

    def _count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def _warn(self, what: str, now: float, msg: str, *args: object) -> None:
        last = self._last_log.get(what)
        if last is None or now - last >= _RATE_LIMIT_S or now < last:
            self._last_log[what] = now
            self.log.warning(msg + " (logged at most every %ds)", *args, int(_RATE_LIMIT_S))

    def stats(self) -> dict[str, Any]:
        """Counters and per-backend totals (closed flows plus the ones still open)."""
        live: dict[tuple[str, str], _BackendCount] = {}
        for flow in self.table.flows():
            c = live.setdefault((flow.service.name, flow.backend.name), _BackendCount())
            c.flows += 1
            c.packets += flow.packets
            c.bytes += flow.bytes
        services: dict[str, Any] = {}
        for by_key in self.services.values():
            for svc in by_key.values():
                backends = {}
                for b in svc.service.backends:
                    closed = svc.closed.get(b.name, _BackendCount())
                    open_ = live.get((svc.service.name, b.name), _BackendCount())
                    backends[b.name] = {
                        "flows": closed.flows + open_.flows,
                        "active": open_.flows,
                        "packets": closed.packets + open_.packets,
                        "bytes": closed.bytes + open_.bytes,
                    }
                services[svc.service.name] = {"backends": backends, "refused": svc.refused,
                                              "policy_errors": svc.policy_errors}
        return {
            "packets": self.packets,
            "rewritten": self.rewritten,
            "passed_unknown": self.passed_unknown,
            "dropped": dict(sorted(self.drops.items())),
            "events": dict(sorted(self.events.items())),
            "fragments_held": self.frags.held,
            "flows_total": self.flows_total,
            "flows_active": self.table.active,
            "services": services,
        }

    def format_stats(self) -> str:
        s = self.stats()
        dropped = sum(s["dropped"].values())
        lines = [
            f"packets {s['packets']}  rewritten {s['rewritten']}  "
            f"passed (not ours) {s['passed_unknown']}  dropped {dropped}",
            f"flows {s['flows_total']} total, {s['flows_active']} active",
        ]
        for name, svc in s["services"].items():
            lines.append(f"service {name}:" + (f" ({svc['refused']} flows refused)"
                                                if svc["refused"] else "")
                         + (f" ({svc['policy_errors']} policy errors)"
                            if svc["policy_errors"] else ""))
            for bname, b in svc["backends"].items():
                lines.append(f"  {bname:<24} flows {b['flows']:>7}  active {b['active']:>6}  "
                             f"packets {b['packets']:>9}  bytes {b['bytes']:>11}")
        if s["dropped"]:
            lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()))
        if s["events"]:
            lines.append("events: " + ", ".join(f"{k} {v}" for k, v in s["events"].items()))
        return "\n".join(lines)


def backend_of(engine: Engine, data: bytes) -> Backend | None:
    """The backend of the flow ``data`` belongs to (tests and tools), or None."""
    p = parse_ip(data)
    if p is None or p.proto not in (6, 17) or not p.first:
        return None
    a, alen = (8, 16) if p.v6 else (12, 4)
    ent = engine.table.by_proto[p.proto].get(data[a:a + 2 * alen] + data[p.off:p.off + 4])
    return ent[0].backend if ent else None
