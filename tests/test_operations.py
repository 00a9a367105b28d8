"""Engine: backends taken out and put back at run time, and reload with the table kept.

Health results (``set_health``), ``drain`` / ``enable`` / ``set_weight`` and ``reconfigure``
change which backends take new flows; the flows in the table carry on, or end with a RST to
both ends (``on_backend_down = "reset"``, ``drain_timeout``), built by nfqlb and handed out by
``packets_to_send``. Expected RSTs are checked with scapy.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import B1, B2, CLIENT, SNAT, VIP, Conversation, engine, service, tcp
from scapy.layers.inet import IP, TCP

from nfqlb.config import parse_config
from nfqlb.engine import DROP

B3 = "198.18.1.4"


def _conv_on(eng: Any, backend: str, first_port: int = 41000) -> Conversation:
    """A connection (handshake and some data) that the policy put on ``backend``."""
    for port in range(first_port, first_port + 20):
        c = Conversation(eng, sport=port)
        c.client("S", seq=1000)
        if c.back is not None and c.back[0] == backend:
            c.server("SA", seq=5000, ack=1001)
            c.client("A", seq=1001, ack=5001)
            c.client("PA", b"GET", seq=1001, ack=5001)
            c.server("PA", b"OK", seq=5001, ack=1004)
            c.client("A", seq=1004, ack=5003)
            return c
        c.client("R", seq=1001)
    raise AssertionError(f"no flow on {backend}")


def _new_backends(eng: Any, n: int = 20, port: int = 30000) -> set[str]:
    got = set()
    for p in range(port, port + n):
        out = eng.handle(tcp(CLIENT, VIP, p, 80, "S"), 1.0)
        if isinstance(out, bytes):
            got.add(IP(out).dst)
    return got


def test_a_backend_down_gets_no_new_flows_and_keeps_its_flows() -> None:
    eng = engine(service("dnat"))
    c = _conv_on(eng, B1)
    eng.set_health("dnat-tcp", "b1", False, 1.0, "timeout")
    assert _new_backends(eng) == {B2}
    assert isinstance(c.client("PA", b"more", seq=1004, ack=5003, now=2.0), bytes)  # keep
    fig = eng.status(2.0)["services"]["dnat-tcp"]["backends"]["b1"]
    assert (fig["state"], fig["check"], fig["active"]) == ("down", "timeout", 1)
    eng.set_health("dnat-tcp", "b1", True, 3.0, "ok", latency=0.002)
    assert _new_backends(eng, port=31000) == {B1, B2}
    assert eng.status(3.0)["services"]["dnat-tcp"]["backends"]["b1"]["latency_ms"] == 2.0


def test_on_backend_down_reset_ends_both_sides_with_rsts() -> None:
    eng = engine(service("dnat", on_backend_down="reset"))
    c = _conv_on(eng, B1)
    eng.set_health("dnat-tcp", "b1", False, 1.0, "refused")
    rsts = [IP(p) for p in eng.packets_to_send()]
    assert eng.packets_to_send() == []  # handed out once
    to_client = [r for r in rsts if r.dst == CLIENT]
    to_backend = [r for r in rsts if r.dst == B1]
    assert len(to_client) == len(to_backend) == 1
    rc, rb = to_client[0], to_backend[0]
    # the client expects the server's next byte 5003, the backend the client's 1004
    port = c.fwd[2]
    assert (rc.src, rc[TCP].sport, rc[TCP].dport, rc[TCP].flags, rc[TCP].seq) == \
        (VIP, 80, port, "R", 5003)
    assert (rb.src, rb[TCP].sport, rb[TCP].dport, rb[TCP].flags, rb[TCP].seq) == \
        (CLIENT, port, 8080, "R", 1004)
    for r in rsts:  # checksums as scapy computes them
        r2 = r.copy()
        del r2[IP].chksum, r2[TCP].chksum
        assert bytes(r2.__class__(bytes(r2))) == bytes(r)
    assert eng.table.active == 0 and eng.counters.events["flows_reset"] == 1


def test_no_backend_up_refuses_with_unknown_flows_answer() -> None:
    eng = engine(service("dnat", unknown_flow="reset"), service("dnat", "udp"))
    for name in ("b1", "b2"):
        eng.set_health("dnat-tcp", name, False, 1.0, "status 503")
        eng.set_health("dnat-udp", name, False, 1.0, "timeout")
    out = eng.handle(tcp(CLIENT, VIP, 5000, 80, "S", seq=77), 2.0)
    assert isinstance(out, bytes) and IP(out)[TCP].flags == "RA" and IP(out).dst == CLIENT
    assert Conversation(eng, proto="udp").client(now=2.0) == DROP
    st = eng.status(2.0)
    assert st["services"]["dnat-tcp"]["no_backend_up"] == 1
    assert st["services"]["dnat-udp"]["no_backend_up"] == 1
    assert st["events"]["no_backend_up"] == 2 and st["dropped"] == {"no_backend": 1}


def test_drain_keeps_the_flows_and_takes_no_new_ones_then_enable() -> None:
    eng = engine(service("dnat"))
    c = _conv_on(eng, B1)
    eng.drain("dnat-tcp", "b1", 1.0)
    assert _new_backends(eng) == {B2}
    assert isinstance(c.client("PA", b"more", seq=1004, ack=5003, now=50.0), bytes)
    fig = eng.status(50.0)["services"]["dnat-tcp"]["backends"]["b1"]
    assert (fig["state"], fig["active"]) == ("draining", 1)
    eng.enable("dnat-tcp", "b1", 60.0)
    assert _new_backends(eng, port=31000) == {B1, B2}


def test_drain_timeout_resets_what_is_left() -> None:
    eng = engine(service("dnat", drain_timeout=30))
    _conv_on(eng, B1)
    eng.drain("dnat-tcp", "b1", 10.0)
    assert eng.get_timer() is not None and eng.get_timer() <= 40.0
    eng.handle_timer(39.0)
    assert eng.table.active == 1
    eng.handle_timer(40.0)
    assert eng.table.active == 0 and len(eng.packets_to_send()) == 2


def test_weight_zero_takes_no_new_flows_and_errors_name_what_is_wrong() -> None:
    eng = engine(service("dnat"))
    eng.set_weight("dnat-tcp", "b2", 0, 1.0)
    assert _new_backends(eng) == {B1}
    with pytest.raises(KeyError, match="no backend 'b9'"):
        eng.drain("dnat-tcp", "b9", 1.0)
    with pytest.raises(KeyError, match="no service 'web'"):
        eng.enable("web", "b1", 1.0)
    with pytest.raises(ValueError, match="weight"):
        eng.set_weight("dnat-tcp", "b1", -1, 1.0)


def _config(backends: list[str], mode: str = "dnat", **extra: Any) -> Any:
    svc = service(mode, **extra)
    names = {B1: "b1", B2: "b2", B3: "b3"}
    svc["backend"] = [{"name": names[a], "address": a, "port": 8080} for a in backends]
    return parse_config({"service": [svc]})


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_reload_keeps_flows_adds_and_removes_backends(mode: str) -> None:
    from nfqlb.engine import Engine

    eng = Engine(_config([B1, B2], mode))
    convs = [Conversation(eng, sport=42000 + i) for i in range(6)]
    for c in convs:
        c.handshake(now=1.0)
    on_b2 = [c for c in convs if c.back is not None and c.back[0] == B2]
    on_b1 = [c for c in convs if c.back is not None and c.back[0] == B1]
    assert on_b1 and on_b2
    eng.reconfigure(_config([B1, B3], mode), 2.0)  # b2 removed, b3 added
    for c in on_b1 + on_b2:  # every flow carries on, both ways (on_backend_down = keep)
        assert isinstance(c.client("PA", b"x", now=3.0), bytes)
        assert isinstance(c.server("PA", b"y", now=3.0), bytes)
    assert _new_backends(eng, port=33000) == {B1, B3}
    figs = eng.status(3.0)["services"][f"{mode}-tcp"]["backends"]
    assert figs["b2 (removed)"]["state"] == "removed"
    assert figs["b2 (removed)"]["active"] == len(on_b2)
    if mode == "fullnat":  # no port handed out twice to one backend across the reload
        ports = [(f.backend.name, f.snat_port) for f in eng.table.flows()]
        assert len(ports) == len(set(ports))
    for c in on_b2:  # when they end, the removed backend is gone from the status
        c.client("R", now=4.0)
    eng.handle_timer(100.0)
    assert "b2 (removed)" not in eng.status(100.0)["services"][f"{mode}-tcp"]["backends"]


def test_reload_with_a_new_pool_range_never_hands_a_live_port_out() -> None:
    from nfqlb.engine import Engine

    eng = Engine(_config([B1], "fullnat", snat_ports="20000-20003"))
    convs = [Conversation(eng, sport=43000 + i) for i in range(4)]
    for c in convs:
        c.handshake(now=1.0)
    held = {f.snat_port for f in eng.table.flows()}
    assert held == {20000, 20001, 20002, 20003}
    eng.reconfigure(_config([B1, B2], "fullnat", snat_ports="20002-20009"), 2.0)
    new = set()
    for p in range(44000, 44012):  # round robin: six to b1, six to b2
        out = eng.handle(tcp(CLIENT, VIP, p, 80, "S"), 3.0)
        assert isinstance(out, bytes)
        new.add((IP(out).dst, IP(out)[TCP].sport))
    # toward b1, 20002 and 20003 are still held; b2 holds none (ports are per backend)
    assert new == {(B1, p) for p in range(20004, 20010)} | {(B2, p) for p in range(20002, 20008)}
    assert SNAT


def test_a_closed_flow_of_an_earlier_pool_range_is_reclaimed_for_no_port_of_it() -> None:
    """After a reload to another range, a closed flow holding a port of the old range can be
    the one taken back when the new pool runs out: it ends, and the new flow gets a port of
    the new range (the next closed flow's), never the old port nor an error."""
    from nfqlb.engine import Engine

    eng = Engine(_config([B1], "fullnat", snat_ports="20000-20001"))
    old = [Conversation(eng, sport=46000 + i) for i in range(2)]
    for c in old:
        c.handshake(now=1.0)
    assert {f.snat_port for f in eng.table.flows()} == {20000, 20001}
    eng.reconfigure(_config([B1], "fullnat", snat_ports="30000-30000"), 2.0)
    for c in old:  # closed after the reload: on the new pool's list of closed flows
        c.server("FA", now=2.5)
        c.client("FA", now=2.5)
    first = Conversation(eng, sport=47000)
    first.handshake(now=3.0)  # the new range's one port
    first.server("FA", now=3.0)
    first.client("FA", now=3.0)  # closed: the one flow of the new range to take back
    out = eng.handle(tcp(CLIENT, VIP, 47001, 80, "S"), 4.0)
    assert isinstance(out, bytes), out
    assert IP(out)[TCP].sport == 30000
    assert not eng.stats()["dropped"]
    # both old flows went before the closed new one was reached (least recently used first)
    assert {f.snat_port for f in eng.table.flows()} == {30000}


def test_a_flow_from_before_fullnat_holds_no_port_of_the_new_pool() -> None:
    """A reload that turns a dnat service into fullnat keeps its flows: they hold no port of
    the new pool (their headers say so), so they never go on its reclaim lists and give none
    back when they end."""
    from nfqlb.engine import Engine
    from nfqlb.flows import TcpState

    eng = Engine(_config([B1], "dnat"))
    c = Conversation(eng, sport=45000)
    c.handshake(now=1.0)
    eng.reconfigure(_config([B1], "fullnat", snat_ports="20000-20001"), 2.0)
    (flow,) = eng.table.flows()
    assert flow.snat_port == 0
    for side in (c.client, c.server):
        assert isinstance(side("FA", now=3.0), bytes)
    assert flow.state is TcpState.CLOSING
    assert flow.backend.reclaim is not None
    half_open, closed = flow.backend.reclaim
    assert not half_open and not closed
    pool = eng.services.named("fullnat-tcp").pool
    assert pool is not None and pool.available(flow.backend.endpoint) == 2
    eng.handle_timer(1000.0)
    assert eng.table.active == 0 and pool.available(flow.backend.endpoint) == 2


def test_reload_reset_ends_a_removed_backends_flows() -> None:
    from nfqlb.engine import Engine

    eng = Engine(_config([B1, B2], on_backend_down="reset"))
    c = _conv_on(eng, B2)
    eng.reconfigure(_config([B1], on_backend_down="reset"), 2.0)
    assert len(eng.packets_to_send()) == 2
    assert all(f.backend.name == "b1" for f in eng.table.flows())
    assert c.client("PA", b"x", seq=1004, now=3.0) == DROP  # gone (unknown_flow drop)


def test_flow_list_is_the_connection_table() -> None:
    eng = engine(service("dnat"), service("dnat", "udp"))
    _conv_on(eng, B1)
    Conversation(eng, proto="udp", sport=5300).client(now=1.0)
    rows = eng.flow_list(2.0)
    assert {(r["service"], r["protocol"], r["state"]) for r in rows} == {
        ("dnat-tcp", "tcp", "ESTABLISHED"), ("dnat-udp", "udp", "UDP")}
    assert all(r["client"] == CLIENT for r in rows)
    assert [r["backend"] for r in eng.flow_list(2.0, service="dnat-tcp", backend="b1")] == ["b1"]
    assert eng.flow_list(2.0, service="dnat-tcp", backend="b2") == []


def test_new_flows_per_second_come_from_the_timers_samples() -> None:
    eng = engine(service("dnat"))
    eng.handle_timer(10.0)  # the first sample: nothing placed yet
    for p in range(20):
        eng.handle(tcp(CLIENT, VIP, 45000 + p, 80, "S"), 10.5)
    eng.handle_timer(12.0)
    figs = eng.status(12.0)["services"]["dnat-tcp"]["backends"]
    assert figs["b1"]["new_per_s"] == figs["b2"]["new_per_s"] == 5.0  # 10 each in 2 s
    assert eng.status(30.0)["services"]["dnat-tcp"]["backends"]["b1"]["new_per_s"] < 5.0
