"""Engine: its state is bounded: the flow table's cap and the fullnat source-port pool.

``daemon.max_flows`` evicts half-open flows before established ones under a SYN flood. A
fullnat pool that runs dry refuses new flows (``snat_exhausted``) while the flows that hold its
ports carry on both ways; ports come back when flows expire, are never shared by two live
flows, and one pool may serve several services.

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

import random
from typing import Any

from dual_stack import C4, VIP4, engine_for
from helpers import B1, B2, CLIENT, SNAT, VIP, Conversation, engine, run_fixtures, service, tcp
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from nfqlb.engine import DROP

# ---------------------------------------------------------------- the flow table's cap

def test_max_flows_evicts_half_open_before_established() -> None:
    eng = engine_for("dnat", daemon={"max_flows": 10})
    for port in range(3000, 3005):  # five established flows
        syn = eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")), 0)
        assert isinstance(syn, bytes)
        b = IP(syn).dst
        eng.handle(bytes(IP(src=b, dst=C4) / TCP(sport=8080, dport=port, flags="SA")), 0)
        eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="A")), 0)
    for i in range(200):  # a SYN flood
        eng.handle(bytes(IP(src=f"198.19.{i // 200}.{i % 200 + 1}", dst=VIP4) /
                         TCP(sport=1024 + i, dport=80, flags="S")), 1.0 + i / 1000)
    assert eng.table.active == 10
    assert eng.counters.events["evicted"] == 195
    for port in range(3000, 3005):  # the established flows are still there
        data = IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="PA") / b"x"
        out = eng.handle(bytes(data), 2.0)
        assert isinstance(out, bytes) and IP(out)[TCP].dport == 8080
    assert eng.stats()["flows_active"] == 10


# ---------------------------------------------------------------- the fullnat port pool

def _fullnat(ports: str = "20000-20002", **kw: Any):  # type: ignore[no-untyped-def]
    return engine(service("fullnat", snat_ports=ports), **kw)


def test_pool_exhaustion_and_reuse_after_expiry() -> None:
    eng = _fullnat(timeouts={"syn": 5.0, "tcp": 50.0})
    convs = [Conversation(eng, sport=40000 + i) for i in range(4)]
    ports = []
    for i, c in enumerate(convs[:3]):
        out = c.client("S", now=float(i))
        assert isinstance(out, bytes)
        ports.append(IP(out)[TCP].sport)
    assert ports == [20000, 20001, 20002]
    convs[1].server("SA", now=3.0)
    convs[1].client("A", now=3.0)  # established: 50 s
    assert convs[3].client("S", now=4.0) == DROP
    assert eng.counters.drops == {"snat_exhausted": 1}
    assert eng.stats()["services"]["fullnat-tcp"]["refused"] == 1
    # existing flows still rewritten, both ways
    run_fixtures(eng, [
        ("flow 0 still rewritten", tcp(CLIENT, VIP, 40000, 80, "S"),
         {"src": SNAT, "sport": 20000, "dst": B1, "dport": 8080}),
        ("flow 1 reply still rewritten", tcp(B2, SNAT, 8080, 20001, "PA", b"x"),
         {"src": VIP, "sport": 80, "dst": CLIENT, "dport": 40001}),
    ], now=4.0)
    eng.handle_timer(4.5)
    assert convs[3].client("S", now=4.5) == DROP  # nothing has expired yet
    eng.handle_timer(9.0)  # flow 0 (last used at 4.0) lives to 9.0; flow 2 died at 7.0
    assert eng.stats()["flows_active"] == 1
    out = convs[3].client("S", now=9.0)
    assert isinstance(out, bytes)
    assert IP(out)[TCP].sport in (20000, 20002)  # a freed port, never flow 1's 20001


def test_pool_ports_unique_among_live_flows() -> None:
    rng = random.Random(7)
    eng = _fullnat("20000-20004", timeouts={"syn": 3.0, "tcp_close": 1.0})
    owner: dict[int, int] = {}  # snat port -> client port holding it
    now, next_sport, exhausted = 0.0, 30000, 0
    for _ in range(300):
        now += rng.choice([0.0, 0.1, 0.5, 2.0])
        eng.handle_timer(now)
        live = {f.snat_port: f for f in eng.table.flows()}
        assert len(live) == eng.table.active  # unique among live flows
        for port in list(owner):
            if port not in live:
                del owner[port]
        if rng.random() < 0.2 and live:
            port = rng.choice(sorted(live))
            eng.handle(tcp(B1 if live[port].backend.name == "b1" else B2, SNAT, 8080, port, "R"),
                       now)
            continue
        out = eng.handle(tcp(CLIENT, VIP, next_sport, 80, "S"), now)
        if len(live) == 5:
            assert out == DROP
            exhausted += 1
        else:
            assert isinstance(out, bytes)
            port = IP(out)[TCP].sport
            assert 20000 <= port <= 20004 and port not in live and port not in owner
            owner[port] = next_sport
        next_sport += 1
    assert exhausted and eng.counters.drops["snat_exhausted"] == exhausted


def test_shared_pool_between_services() -> None:
    eng = engine(service("fullnat", snat_ports="20000-20001"),
                 service("fullnat", name="other", port=81, snat_ports="20000-20001"))
    a = eng.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    b = eng.handle(tcp(CLIENT, VIP, 40000, 81, "S"), 0.0)
    assert {IP(a)[TCP].sport, IP(b)[TCP].sport} == {20000, 20001}  # type: ignore[arg-type]
    assert eng.handle(tcp(CLIENT, VIP, 40001, 80, "S"), 0.0) == DROP
    assert eng.handle(tcp(CLIENT, VIP, 40001, 81, "S"), 0.0) == DROP


def test_pool_exhaustion_refuses_new_flows_and_keeps_old_ones() -> None:
    eng = engine_for("fullnat", proto="udp")  # pool of 100 ports
    for port in range(100):
        assert isinstance(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + port,
                                                                     dport=80)), 0), bytes)
    assert eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=5000, dport=80)), 0) == DROP
    assert eng.counters.drops["snat_exhausted"] == 1
    out = eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000, dport=80) / Raw(b"x")), 1)
    assert isinstance(out, bytes)
    ports = {IP(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + p, dport=80)), 1))
             [UDP].sport for p in range(100)}
    assert len(ports) == 100  # no port shared by two live flows
