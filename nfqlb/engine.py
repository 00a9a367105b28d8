"""The core: ``Engine.handle(data, now)`` takes an IP packet and returns its verdict.

A verdict is ``bytes`` (accept this rewritten packet), ``ACCEPT`` (accept unchanged) or
``DROP``. The engine owns the connection table, the services, their policies and fullnat port
pools, and the counters. It never touches a socket, the kernel or a clock: ``now`` is given,
and expiry runs through ``get_timer()`` / ``handle_timer(now)``.

The per-packet path for an IPv4 packet without options whose flow is known is one dict
lookup, two incremental checksum updates and one ``bytes.join``; anything else (handshake,
FIN/RST, new flows, options, malformed input) takes the slower general path.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from nfqlb.config import Backend, Config, Mode, Service
from nfqlb.errors import ConfigError, PacketError
from nfqlb.flows import REUSABLE, TRANSITIONS, Entry, Flow, FlowTable, TcpState, tcp_event
from nfqlb.policies import FlowKey, Policy, make_policy
from nfqlb.snat import PortPool
from nfqlb.wire.checksum import U16, apply, delta
from nfqlb.wire.ipv4 import parse_ipv4, tcp_mss_offset

ACCEPT = 0  # accept unchanged
DROP = 1  # drop

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
    """A service at run time: its policy, its port pool and its closed-flow totals."""

    service: Service
    policy: Policy
    pool: PortPool | None
    closed: dict[str, _BackendCount] = field(default_factory=dict)
    refused: int = 0


def check_supported(config: Config) -> None:
    """Refuse what the configuration allows but this engine cannot carry yet."""
    for i, svc in enumerate(config.services):
        if svc.vip.version == 6:
            raise ConfigError(config.source, f"service[{i}].vip",
                              f"{svc.vip}: IPv6 services are not supported by the engine yet")


class Engine:
    def __init__(self, config: Config, rng: random.Random | None = None,
                 log: logging.Logger | None = None) -> None:
        check_supported(config)
        self.config = config
        self.log = log or logging.getLogger("nfqlb.engine")
        self.rng = rng or random.Random(0)
        self.table = FlowTable(config.timeouts)
        self.mss_clamp = config.daemon.mss_clamp
        self._tcp = self.table.by_proto[6]
        self._udp = self.table.by_proto[17]
        # (protocol) -> {vip packed + port 2 bytes -> ServiceState}
        self.services: dict[int, dict[bytes, ServiceState]] = {6: {}, 17: {}}
        pools: dict[tuple[Any, ...], PortPool] = {}
        for svc in config.services:
            pool = None
            if svc.mode is Mode.FULLNAT:
                assert svc.snat_address is not None and svc.snat_ports is not None
                pkey = (svc.protocol, svc.snat_address, svc.snat_ports)
                pool = pools.get(pkey) or pools.setdefault(pkey, PortPool(*svc.snat_ports))
            state = ServiceState(svc, make_policy(svc.policy, svc.backends, rng=self.rng), pool)
            for b in svc.backends:
                state.closed[b.name] = _BackendCount()
            self.services[svc.protocol][svc.vip.packed + U16[svc.port]] = state
        # counters: plain ints on the hot path, a dict for the rarer outcomes
        self.packets = 0
        self.rewritten = 0
        self.flows_total = 0
        self.passed_unknown = 0  # not to a VIP and no flow: not ours, accepted unchanged
        self.drops: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    # ---------------------------------------------------------------- per packet

    def handle(self, data: bytes, now: float) -> Verdict:
        """Verdict for one IP packet. Never raises."""
        self.packets += 1
        try:
            n = len(data)
            if n >= 28 and data[0] == 0x45 and (data[2] << 8 | data[3]) == n \
                    and not (data[6] & 0x3F or data[7]):
                proto = data[9]
                if proto == 6:
                    ent = self._tcp.get(data[12:24])
                    if ent is not None and n >= 40 and not data[33] & 0x07 \
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
            return self._general(data, now)
        except PacketError as exc:
            return self._drop(exc.reason, now)
        except Exception:  # a bug must cost one packet, never the worker
            self.log.exception("internal error handling a packet; dropped")
            return self._drop("internal_error", now)

    def _general(self, data: bytes, now: float) -> Verdict:
        """Everything the fast path does not take: parse fully, then decide."""
        parsed = parse_ipv4(data)
        if parsed is None:
            self.passed_unknown += 1
            return ACCEPT  # not TCP/UDP: not balanced here
        off, proto = parsed
        key = data[12:20] + data[off:off + 4]
        table = self._tcp if proto == 6 else self._udp
        ent = table.get(key)
        if proto == 6:
            flags = data[off + 13]
            if ent is not None:
                flow = ent[0]
                if flags & 0x12 == 0x02 and flow.state in REUSABLE:
                    self._close(flow, now)  # client port reused after close: a new choice
                    ent = None
                else:
                    return self._tcp_known(data, off, ent, flags, now)
            svc = self.services[6].get(data[16:20] + data[off + 2:off + 4])
            if svc is None:
                self.passed_unknown += 1
                return ACCEPT
            if flags & 0x17 != 0x02:  # only a bare SYN opens a TCP flow
                return self._drop("no_flow", now)
            ent = self._open(svc, data, off, proto, key, now)
            if ent is None:
                return DROP
            flow = ent[0]
            flow.packets, flow.bytes = 1, len(data)
            return self._clamp_mss(self._rewrite(data, off, proto, ent), off)
        if ent is None:
            svc = self.services[17].get(data[16:20] + data[off + 2:off + 4])
            if svc is None:
                self.passed_unknown += 1
                return ACCEPT
            ent = self._open(svc, data, off, proto, key, now)
            if ent is None:
                return DROP
        flow = ent[0]
        flow.last = now
        flow.packets += 1
        flow.bytes += len(data)
        return self._rewrite(data, off, proto, ent)

    def _tcp_known(self, data: bytes, off: int, ent: Entry, flags: int, now: float) -> Verdict:
        flow, _, _, _, reply = ent
        new = TRANSITIONS.get((flow.state, tcp_event(flags, reply)))
        flow.last = now
        flow.packets += 1
        flow.bytes += len(data)
        if new is not None and new is not flow.state:
            flow.state = new
            self.table.arm(flow)
        out = self._rewrite(data, off, 6, ent)
        return self._clamp_mss(out, off) if flags & 0x02 else out

    def _rewrite(self, data: bytes, off: int, proto: int, ent: Entry) -> bytes:
        """Rewrite addresses and ports of any IPv4 TCP/UDP packet, checksums incrementally."""
        _, hdr, ipd, l4d, _ = ent
        co = off + (16 if proto == 6 else 6)
        c = data[co] << 8 | data[co + 1]
        if proto == 6:
            c = apply(c, l4d)
        elif c:
            c = apply(c, l4d) or 0xFFFF
        self.rewritten += 1
        return b"".join((
            data[:10], U16[apply(data[10] << 8 | data[11], ipd)], hdr[:8], data[20:off],
            hdr[8:], data[off + 4:co], U16[c], data[co + 2:],
        ))

    def _clamp_mss(self, out: bytes, off: int) -> bytes:
        """Lower the MSS option of a SYN to ``mss_clamp``.

        The queue binding carries packets of at most 4016 bytes; on loopback (MTU 64 KiB) a
        flow would otherwise send segments that never reach us.
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

    # ---------------------------------------------------------------- flows

    def _open(self, svc: ServiceState, data: bytes, off: int, proto: int, key: bytes,
              now: float) -> Entry | None:
        """Choose a backend for a new flow and install both directions; None if refused."""
        src, dst = data[12:16], data[16:20]
        sport, dport = data[off:off + 2], data[off + 2:off + 4]
        fkey = FlowKey(proto, ipaddress.IPv4Address(src), sport[0] << 8 | sport[1],
                       ipaddress.IPv4Address(dst), dport[0] << 8 | dport[1])
        try:
            backend = svc.policy.choose(fkey, now)
            reason = "no_backend"
        except Exception as exc:  # a policy bug is contained: counted, logged, flow refused
            self._warn("policy_error", now, "policy %s failed: %r", svc.service.policy, exc)
            backend, reason = None, "policy_error"
        if backend is None:
            svc.refused += 1
            self._drop(reason, now)
            return None
        service = svc.service
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
        state = TcpState.SYN_SENT if proto == 6 else TcpState.UDP
        flow = Flow(service, backend, proto, state, now, key, rev_key)
        if svc.pool is not None:
            flow.pool, flow.snat_port = svc.pool, port
        fwd: Entry = (flow, fwd_hdr, delta(src + dst, saddr + baddr), delta(key, fwd_hdr), False)
        rev: Entry = (flow, rev_hdr, delta(baddr + saddr, dst + src), delta(rev_key, rev_hdr),
                      True)
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
        hook = getattr(svc.policy, "on_flow_closed", None)
        if hook is not None:
            try:
                hook(flow, flow.backend, now)
            except Exception as exc:
                self._warn("policy_error", now, "policy on_flow_closed failed: %r", exc)

    def _state_of(self, service: Service) -> ServiceState:
        return self.services[service.protocol][service.vip.packed + U16[service.port]]

    # ---------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next run (same clock as ``now``), or None."""
        return self.table.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Expire idle flows."""
        for flow in self.table.expire(now):
            self._retire(flow, now)

    # ---------------------------------------------------------------- counters

    def _drop(self, reason: str, now: float) -> int:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return DROP

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
                services[svc.service.name] = {"backends": backends, "refused": svc.refused}
        return {
            "packets": self.packets,
            "rewritten": self.rewritten,
            "passed_unknown": self.passed_unknown,
            "dropped": dict(sorted(self.drops.items())),
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
                                                if svc["refused"] else ""))
            for bname, b in svc["backends"].items():
                lines.append(f"  {bname:<24} flows {b['flows']:>7}  active {b['active']:>6}  "
                             f"packets {b['packets']:>9}  bytes {b['bytes']:>11}")
        if s["dropped"]:
            lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()))
        return "\n".join(lines)


def backend_of(engine: Engine, data: bytes) -> Backend | None:
    """The backend of the flow ``data`` belongs to (tests and tools), or None."""
    parsed = parse_ipv4(data)
    if parsed is None:
        return None
    off, proto = parsed
    ent = engine.table.by_proto[proto].get(data[12:20] + data[off:off + 4])
    return ent[0].backend if ent else None
