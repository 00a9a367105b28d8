"""Mode "offload": the first packet of a flow is decided here, the kernel carries the rest.

The rules (``rules/offload*.rules``) queue only the packets conntrack calls NEW to a VIP and
port of an offload service, on a queue of their own (daemon.offload_queue). For each one
:meth:`OffloadDecider.handle` answers with the chosen backend's packet mark (an ``int``); the
adapter accepts the packet with that mark, and a DNAT rule per mark in the nat table (SNAT
too, with a snat_address) sets the translation that conntrack then keeps for the whole flow,
replies included. Nothing is kept here per flow: the kernel holds the flow.

The choice is the engine's own: the same :class:`~nfqlb.services.ServiceRuntime` (policy,
fallback, containment of a failing plugin, backends up/down/draining/weight, figures), so
health checks, ``nfqlb ctl`` and reloads act on offload services as on the others. A packet
that opens no flow gets what the engine gives it in the other modes: a TCP segment that is
not a bare SYN (a flow conntrack picked up in the middle: after a restart, or after nfqlb
removed its entry) is an unknown flow (``unknown_flow``: a RST back to the client, a drop, or
adoption on the backend a consistent policy chose, else on the rendezvous hash, marked like
any new flow), and a flow no backend may take is refused the same way (``no_backend_up``).

Verdicts: an ``int`` (accept with this mark), ``ACCEPT`` (not an offload service's: passed
unmarked), ``DROP``, or ``bytes`` (the packet turned into its RST answer). Counting, per
backend: flows placed (``flows``, new flows per second); what is open now comes from
conntrack (:mod:`nfqlb.io.conntrack`), not from here.

Each packet is parsed by offsets only as far as the decision needs (addresses, ports, TCP
flags): conntrack has already reassembled fragments (its defragmentation runs before it), and
the adapter asks the kernel for the first bytes of each packet only.
"""

from __future__ import annotations

from typing import Any, Final

from nfqlb.config import Config, OnBackendDown, UnknownFlow, offload_marks
from nfqlb.counters import Counters
from nfqlb.services import BackendRuntime, ServiceRuntime, Services
from nfqlb.values import Mode
from nfqlb.verdict import ACCEPT, Action
from nfqlb.wire.ip import TCP, UDP
from nfqlb.wire.tcp import build_rst

#: What :meth:`OffloadDecider.handle` returns: a mark, or a verdict of :mod:`nfqlb.verdict`.
OffloadVerdict = int | bytes | Action

#: Bytes of each packet the adapter asks for: IPv6 (40) with a few extension headers and a
#: TCP header with options (60) fit; a packet whose headers do not is parsed in full.
COPY_RANGE: Final = 256

_EXTENSIONS: Final = (0, 43, 60)  # IPv6 hop-by-hop, routing, destination options (8-byte units)


def _v4_key(proto: int, vip_port: bytes) -> int:
    """The key of :attr:`OffloadDecider._v4`: protocol, IPv4 VIP and port (6 bytes) in one
    int, as :meth:`OffloadDecider.handle` reads them from a packet."""
    return proto << 48 | int.from_bytes(vip_port, "big")


class OffloadDecider:
    """The offload services of an engine's :class:`Services`, indexed for the NEW packet."""

    def __init__(self, config: Config, services: Services, counters: Counters) -> None:
        self.services = services
        self.counters = counters
        self.packets = 0  # NEW packets handled
        self.passed = 0  # of no offload service (accepted unmarked)
        self.marks: dict[BackendRuntime, int] = {}
        self._owner: dict[BackendRuntime, ServiceRuntime] = {}
        self.by_vip: dict[int, dict[bytes, ServiceRuntime]] = {TCP: {}, UDP: {}}
        self._v4: dict[int, ServiceRuntime] = {}  # by_vip's IPv4 services by _v4_key
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> list[tuple[ServiceRuntime, BackendRuntime]]:
        """Take the engine's services again (after ``Engine.reconfigure``): the index and the
        marks, as the rules number them (:func:`nfqlb.config.offload_marks`). Returns the
        backends a kept service lost whose flows are to end (its on_backend_down is
        "reset"): the kernel holds them and the engine kept no runtime for them. A removed
        service's backends come from ``Engine.reconfigure`` (``kernel_flows_to_reset``)."""
        old_owner = self._owner
        numbered = offload_marks(config.daemon, config.services, config.offload_numbers)
        marks: dict[BackendRuntime, int] = {}
        by_vip: dict[int, dict[bytes, ServiceRuntime]] = {TCP: {}, UDP: {}}
        for svc in self.services:
            if svc.service.mode is not Mode.OFFLOAD:
                continue
            by_vip[svc.service.protocol][svc.vip_endpoint] = svc
            for rt in svc.backends.values():
                mark = numbered.get((svc.name, rt.name))
                if mark is not None and not rt.removed:
                    marks[rt] = mark
        self.marks = marks
        self.by_vip = by_vip
        self._v4 = {_v4_key(proto, vip_port): svc for proto, index in by_vip.items()
                    for vip_port, svc in index.items() if len(vip_port) == 6}
        self._owner = {rt: svc for svc in self.offload_services() for rt in svc.backends.values()
                       if rt in marks}
        kept = set(self.offload_services())  # (a removed service's flows: Engine.reconfigure)
        return [(svc, rt) for rt, svc in old_owner.items() if rt not in marks and svc in kept
                and svc.service.on_backend_down is OnBackendDown.RESET]

    def offload_services(self) -> list[ServiceRuntime]:
        return [svc for index in self.by_vip.values() for svc in index.values()]

    # ---------------------------------------------------------------- per NEW packet

    def handle(self, data: bytes, now: float) -> OffloadVerdict:
        """The verdict for a packet conntrack calls NEW. Never raises."""
        self.packets += 1
        try:
            b0 = data[0]
            if b0 >> 4 == 4:  # (IPv4: the service by one int, nothing built)
                off = (b0 & 0x0F) * 4
                proto = data[9]
                a, alen, v6 = 12, 4, False
                svc = self._v4.get(proto << 48 | data[16] << 40 | data[17] << 32 | data[18] << 24
                                   | data[19] << 16 | data[off + 2] << 8 | data[off + 3])
            else:
                proto = data[6]
                a, alen, v6, off = 8, 16, True, 40
                for _ in range(8):  # extension headers (hop-by-hop, routing, options)
                    if proto not in _EXTENSIONS:
                        break
                    proto, off = data[off], off + (data[off + 1] + 1) * 8
                index = self.by_vip.get(proto)
                svc = None if index is None else index.get(data[24:40] + data[off + 2:off + 4])
            if svc is None:
                return self._pass()
            if proto == TCP:
                flags = data[off + 13]
                if flags & 0x17 != 0x02:  # only a bare SYN opens a TCP flow
                    return self._unknown_flow(svc, data, a, alen, off, v6, flags, now)
            if not svc.any_live:
                return self._no_backend_up(svc, data, off, v6, proto)
            backend, _placer, _chosen, reason = svc.choose(svc.flow_key_of(data, a, alen, off),
                                                           now)
            if backend is None:
                svc.refused += 1
                return self.counters.drop(reason)
            return self._placed(backend)
        except Exception:  # a bug, or a header cut short: one packet, never the worker
            return self.counters.drop("internal_error")

    def _pass(self) -> Action:
        self.passed += 1
        return ACCEPT

    def _placed(self, backend: BackendRuntime) -> int:
        backend.flows_total += 1
        self.counters.flows_total += 1
        return self.marks[backend]

    def _unknown_flow(self, svc: ServiceRuntime, data: bytes, a: int, alen: int, off: int,
                      v6: bool, flags: int, now: float) -> OffloadVerdict:
        how = svc.service.unknown_flow
        if how is UnknownFlow.RESET:
            if flags & 0x04:
                return self.counters.drop("no_flow")  # never answer a RST with a RST
            self.counters.event("reset_sent")
            return build_rst(data[:off + (data[off + 12] >> 4) * 4], off, v6)
        if how is UnknownFlow.HASH:
            backend = svc.adopt_choice(svc.flow_key_of(data, a, alen, off), now)
            if backend is not None:
                self.counters.event("flow_adopted")
                return self._placed(backend)
        return self.counters.drop("no_flow")

    def _no_backend_up(self, svc: ServiceRuntime, data: bytes, off: int, v6: bool,
                       proto: int) -> OffloadVerdict:
        svc.refused += 1
        svc.no_backend_up += 1
        self.counters.event("no_backend_up")
        if proto == TCP and svc.service.unknown_flow is UnknownFlow.RESET:
            self.counters.event("reset_sent")
            return build_rst(data[:off + (data[off + 12] >> 4) * 4], off, v6)
        return self.counters.drop("no_backend")

    # ---------------------------------------------------------------- what the kernel holds

    def endpoints(self) -> list[tuple[ServiceRuntime, dict[tuple[Any, int], BackendRuntime]]]:
        """Per offload service, its backends by (address, port): how a conntrack entry's
        reply tuple names the backend that serves it."""
        return [(svc, {(rt.address, rt.port): rt for rt in svc.backends.values()})
                for svc in self.offload_services()]
