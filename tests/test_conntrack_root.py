"""Offload's removal of a backend's flows from the kernel's connection table
(``nfqlb.io.conntrack.reset``, ``on_backend_down = "reset"``) against real conntrack entries,
in a fresh network namespace (this thread enters it with setns for pyroute2's socket).

A removal runs on a worker thread, behind a count or another removal; under load a dump takes
a second. A backend that came back up meanwhile keeps its entries: they are its new flows
too by then (conntrack keeps no age that would tell them apart)."""

from __future__ import annotations

import socket

import test_netlink_root
from helpers import B1, B2, VIP, engine, service
from test_netlink_root import inside

from nfqlb.io import conntrack

ns = test_netlink_root.ns  # (the fixture: a fresh namespace)
CLIENT = "198.18.0.9"


def add_entry(client_port: int, backend: str) -> None:
    """An established-looking entry: the client to the VIP, DNATed to ``backend``:8080."""
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    with NFCTSocket(nfgen_family=socket.AF_INET) as ct:
        ct.entry("add", timeout=300,
                 tuple_orig=NFCTAttrTuple(saddr=CLIENT, daddr=VIP, proto=6, sport=client_port,
                                          dport=80),
                 tuple_reply=NFCTAttrTuple(saddr=backend, daddr=CLIENT, proto=6, sport=8080,
                                           dport=client_port))


def entries_to(backend: str) -> int:
    from pyroute2 import NFCTSocket

    with NFCTSocket(nfgen_family=socket.AF_INET) as ct:
        return sum(1 for e in ct.dump() if e.get_attr("CTA_TUPLE_REPLY").get_attr(
            "CTA_TUPLE_IP").get_attr("CTA_IP_V4_SRC") == backend)


def test_a_down_backends_entries_are_removed_unless_it_is_back_when_the_removal_runs(
        ns: str) -> None:
    eng = engine(service("offload"))
    svc = eng.services.named("offload-tcp")
    b1 = svc.backends["b1"]
    with inside(ns):
        for port in (40001, 40002):
            add_entry(port, B1)
        add_entry(40003, B2)
        assert (entries_to(B1), entries_to(B2)) == (2, 1)
        # down, and up again before the removal asked for at "down" ran: nothing removed
        eng.set_health(svc.name, "b1", False, 0.0)
        eng.set_health(svc.name, "b1", True, 0.0)
        assert conntrack.reset(svc, b1) is None
        assert (entries_to(B1), entries_to(B2)) == (2, 1)
        # down and still down: its entries go, the other backend's stay
        eng.set_health(svc.name, "b1", False, 0.0)
        assert conntrack.reset(svc, b1) == 2
        assert (entries_to(B1), entries_to(B2)) == (0, 1)
        # drained (not down): the same
        add_entry(40004, B1)
        eng.drain(svc.name, "b1", 0.0, None)
        eng.set_health(svc.name, "b1", True, 0.0)
        assert conntrack.reset(svc, b1) == 1
        assert entries_to(B1) == 0
