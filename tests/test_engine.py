"""The engine, driven by bytes: fixture tables of (description, input, expected verdict/output).

Expected packets are the input rebuilt by scapy with the rewritten fields set and every
checksum deleted, so scapy recomputes them; outputs must match byte for byte. The expected
addresses and ports are written here from the mode definitions, never taken from the engine.

IPv4 conversations in every mode, round robin, UDP checksums, MSS clamping, reply keys shared
by two services, expiry, counters, a failing policy and malformed input. Other engine concerns
have their own files: ``test_ipv6``, ``test_fragments``, ``test_unknown_flow``,
``test_bounded_state`` (flow cap, fullnat pool), ``test_icmp``/``test_icmp_props``, and the
IPv4 property tests ``test_engine_props``.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from helpers import (
    B1,
    B2,
    CLIENT,
    OTHER,
    SNAT,
    VIP,
    Conversation,
    Fixture,
    checksums_ok,
    engine,
    rewritten,
    run_fixtures,
    service,
    tcp,
    udp,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.utils import checksum

from nfqlb.engine import ACCEPT, DROP, backend_of
from nfqlb.flows import TcpState

MODES = ["local", "dnat", "fullnat"]
RR = IPOption_RR(routers=["198.18.0.1", "198.18.0.3"])
RA = IPOption_Router_Alert()


def backend_side(mode: str, i: int, k: int, sport: int) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of a client packet as the backend gets it.

    ``i`` is the backend (round robin order), ``k`` the number of fullnat ports taken before.
    local: only the port changes (backends 8080, 8081 on this host, the VIP address kept);
    dnat: destination to the backend; fullnat: also source to SNAT:20000+k//2 (the flows
    alternate between the two backends, and pool ports are per backend).
    """
    if mode == "local":
        return CLIENT, sport, VIP, 8080 + i
    if mode == "dnat":
        return CLIENT, sport, (B1, B2)[i], 8080
    return SNAT, 20000 + k // 2, (B1, B2)[i], 8080


def to_backend(mode: str, i: int, k: int, sport: int) -> dict[str, Any]:
    src, sp, dst, dp = backend_side(mode, i, k, sport)
    return {"src": src, "sport": sp, "dst": dst, "dport": dp}


def from_backend(mode: str, i: int, k: int, sport: int, vport: int = 80, flags: str = "A",
                 payload: bytes = b"", proto: str = "tcp", **kw: Any) -> Fixture:
    """A reply from backend ``i`` to the client's flow, and what the client must get."""
    src, sp, dst, dp = backend_side(mode, i, k, sport)
    pkt = (tcp(dst, src, dp, sp, flags, payload, **kw) if proto == "tcp"
           else udp(dst, src, dp, sp, payload or b"answer", **kw))
    return (f"reply from backend {i}", pkt,
            {"src": VIP, "sport": vport, "dst": CLIENT, "dport": sport})


def tcp_fixtures(mode: str) -> list[Fixture]:
    c = CLIENT
    return [
        ("SYN to the VIP: first backend", tcp(c, VIP, 40000, 80, "S"),
         to_backend(mode, 0, 0, 40000)),
        ("retransmitted SYN: same backend", tcp(c, VIP, 40000, 80, "S"),
         to_backend(mode, 0, 0, 40000)),
        from_backend(mode, 0, 0, 40000, flags="SA"),
        ("ACK completes the handshake", tcp(c, VIP, 40000, 80, "A"), to_backend(mode, 0, 0, 40000)),
        ("data to the backend (fast path)", tcp(c, VIP, 40000, 80, "PA", b"GET / HTTP/1.0\r\n\r\n"),
         to_backend(mode, 0, 0, 40000)),
        from_backend(mode, 0, 0, 40000, flags="PA", payload=b"HTTP/1.0 200 OK\r\n\r\nhello"),
        ("odd-sized data", tcp(c, VIP, 40000, 80, "PA", b"abc"), to_backend(mode, 0, 0, 40000)),
        ("second flow: second backend", tcp(c, VIP, 40001, 80, "S"), to_backend(mode, 1, 1, 40001)),
        from_backend(mode, 1, 1, 40001, flags="SA"),
        ("third flow: first backend again", tcp(c, VIP, 40002, 80, "S"),
         to_backend(mode, 0, 2, 40002)),
        ("ACK with no flow: dropped", tcp(c, VIP, 40003, 80, "A"), DROP),
        ("SYN/ACK with no flow: dropped", tcp(c, VIP, 40003, 80, "SA"), DROP),
        ("FIN with no flow: dropped", tcp(c, VIP, 40003, 80, "FA"), DROP),
        ("not to a VIP: accepted unchanged", tcp(c, OTHER, 40000, 80, "S"), ACCEPT),
        ("VIP, another port: accepted unchanged", tcp(c, VIP, 40000, 81, "S"), ACCEPT),
        ("UDP to a TCP service: accepted unchanged", udp(c, VIP, 40000, 80), ACCEPT),
        ("ICMP to the VIP: accepted unchanged",
         bytes(IP(src=c, dst=VIP) / ICMP(type=8) / b"ping"), ACCEPT),
        ("FIN from the client", tcp(c, VIP, 40000, 80, "FA"), to_backend(mode, 0, 0, 40000)),
        from_backend(mode, 0, 0, 40000, flags="FA"),
        ("last ACK", tcp(c, VIP, 40000, 80, "A"), to_backend(mode, 0, 0, 40000)),
        ("port reused after FIN/FIN: a new choice", tcp(c, VIP, 40000, 80, "S"),
         to_backend(mode, 1, 3, 40000)),
        from_backend(mode, 1, 3, 40000, flags="SA"),
        ("RST from the client", tcp(c, VIP, 40001, 80, "R"), to_backend(mode, 1, 1, 40001)),
        ("retransmitted RST still rewritten", tcp(c, VIP, 40001, 80, "R"),
         to_backend(mode, 1, 1, 40001)),
        ("port reused after RST: a new choice", tcp(c, VIP, 40001, 80, "S"),
         to_backend(mode, 0, 4, 40001)),
        from_backend(mode, 0, 4, 40001, flags="RA"),
        ("port reused after a backend RST", tcp(c, VIP, 40001, 80, "S"),
         to_backend(mode, 1, 5, 40001)),
        ("ECN setup SYN (ECE|CWR) opens a flow", tcp(c, VIP, 40004, 80, "SEC"),
         to_backend(mode, 0, 6, 40004)),
        ("SYN+FIN opens nothing", tcp(c, VIP, 40005, 80, "SF"), DROP),
        ("SYN+RST opens nothing", tcp(c, VIP, 40005, 80, "SR"), DROP),
    ]


def udp_fixtures(mode: str) -> list[Fixture]:
    c = CLIENT
    return [
        ("datagram to the VIP: first backend", udp(c, VIP, 5000, 53, b"query"),
         to_backend(mode, 0, 0, 5000)),
        from_backend(mode, 0, 0, 5000, vport=53, proto="udp"),
        ("second datagram, same flow (fast path)", udp(c, VIP, 5000, 53, b"query2"),
         to_backend(mode, 0, 0, 5000)),
        from_backend(mode, 0, 0, 5000, vport=53, proto="udp", payload=b"odd"),
        ("new client port: second backend", udp(c, VIP, 5001, 53, b"q"),
         to_backend(mode, 1, 1, 5001)),
        ("zero checksum (none) stays zero, new flow", udp(c, VIP, 5002, 53, b"z",
                                                          zero_checksum=True),
         to_backend(mode, 0, 2, 5002)),
        ("zero checksum stays zero, fast path", udp(c, VIP, 5002, 53, b"zz", zero_checksum=True),
         to_backend(mode, 0, 2, 5002)),
        from_backend(mode, 0, 2, 5002, vport=53, proto="udp", zero_checksum=True),
        ("empty datagram", udp(c, VIP, 5001, 53, b""), to_backend(mode, 1, 1, 5001)),
        ("not to a VIP: accepted unchanged", udp(c, OTHER, 5000, 53), ACCEPT),
        ("TCP to a UDP service: accepted unchanged", tcp(c, VIP, 5000, 53, "S"), ACCEPT),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_tcp_fixtures(mode: str) -> None:
    eng = engine(service(mode))
    run_fixtures(eng, tcp_fixtures(mode))
    assert eng.counters.drops == {"no_flow": 5}
    assert eng.stats()["passed_unknown"] == 4


@pytest.mark.parametrize("mode", MODES)
def test_udp_fixtures(mode: str) -> None:
    eng = engine(service(mode, "udp"))
    run_fixtures(eng, udp_fixtures(mode))
    assert eng.counters.drops == {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_fixtures_with_ip_options(mode: str, proto: str) -> None:
    """The same conversations with IP options on every packet: the general path's rewrite."""
    eng = engine(service(mode, proto))
    fixtures = tcp_fixtures(mode) if proto == "tcp" else udp_fixtures(mode)
    with_options = []
    for n, (desc, data, want) in enumerate(fixtures):
        pkt = IP(data)
        pkt.options = [RR if n % 2 else RA]
        del pkt.ihl, pkt.len, pkt.chksum
        if pkt.haslayer(TCP):
            del pkt[TCP].chksum
        elif pkt.haslayer(UDP) and pkt[UDP].chksum != 0:
            del pkt[UDP].chksum
        with_options.append((desc + " (IP options)", bytes(pkt), want))
    run_fixtures(eng, with_options)


def test_seed_example_local_mode() -> None:
    """The seed notes' example: 192.168.1.2 | 1234 | 80 | 10.0.0.2 -> ... | 8080 | 10.0.0.2."""
    eng = engine({"name": "seed", "vip": "10.0.0.2", "port": 80, "mode": "local",
                  "backend": [{"port": 8080}]})
    run_fixtures(eng, [
        ("SYN", tcp("192.168.1.2", "10.0.0.2", 1234, 80, "S"), {"dport": 8080}),
        ("SYN/ACK gets port 80 back", tcp("10.0.0.2", "192.168.1.2", 8080, 1234, "SA"),
         {"sport": 80}),
        ("ACK", tcp("192.168.1.2", "10.0.0.2", 1234, 80, "A"), {"dport": 8080}),
        ("data", tcp("192.168.1.2", "10.0.0.2", 1234, 80, "PA", b"x" * 100), {"dport": 8080}),
        ("reply data", tcp("10.0.0.2", "192.168.1.2", 8080, 1234, "PA", b"y" * 101),
         {"sport": 80}),
    ])


@pytest.mark.parametrize("mode", MODES)
def test_handshake_reaches_established(mode: str) -> None:
    eng = engine(service(mode))
    c = Conversation(eng)
    c.handshake()
    (flow,) = eng.table.flows()
    assert flow.state is TcpState.ESTABLISHED
    assert backend_of(eng, c.sent).name == "b1"  # type: ignore[union-attr]


def test_round_robin_alternates_over_new_flows() -> None:
    eng = engine(service("dnat"))
    seen = []
    for sport in range(41000, 41010):
        out = eng.handle(tcp(CLIENT, VIP, sport, 80, "S"), 0.0)
        assert isinstance(out, bytes)
        seen.append(IP(out).dst)
        eng.handle(tcp(CLIENT, VIP, sport, 80, "S"), 0.0)  # retransmissions do not advance it
    assert seen == [B1, B2] * 5


def test_round_robin_skips_zero_weight() -> None:
    svc = service("dnat")
    svc["backend"].append({"name": "b3", "address": "198.18.1.4", "port": 8080, "weight": 0})
    eng = engine(svc)
    dsts = [IP(eng.handle(tcp(CLIENT, VIP, p, 80, "S"), 0.0)).dst for p in range(6)]  # type: ignore[arg-type]
    assert dsts == [B1, B2] * 3


# ---------------------------------------------------------------- UDP checksum 0 -> 0xFFFF

def _zero_sum_payload(mode: str, sport: int, reply: bool) -> bytes:
    """A payload whose rewritten datagram sums to 0xFFFF: its checksum must go out as 0xFFFF.

    Found by construction: with a zero filler word first, the filler that makes the
    one's-complement sum 0xFFFF is exactly the checksum scapy computes for the zero filler.
    """
    for tail in (b"data", b"more", b"other"):
        payload = b"\0\0" + tail
        src, sp, dst, dp = backend_side(mode, 0, 0, sport)
        if reply:
            out0 = rewritten(udp(dst, src, dp, sp, payload), src=VIP, sport=53, dst=CLIENT,
                             dport=sport)
        else:
            out0 = rewritten(udp(CLIENT, VIP, sport, 53, payload), src=src, sport=sp, dst=dst,
                             dport=dp)
        c = struct.unpack_from("!H", out0, 26)[0]
        if c != 0xFFFF:
            return struct.pack("!H", c) + tail
    raise AssertionError("no payload found")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ip_options", [False, True])
def test_udp_checksum_that_would_be_zero_is_ffff(mode: str, ip_options: bool) -> None:
    eng = engine(service(mode, "udp"))
    opts = [RA] if ip_options else []
    fwd = _zero_sum_payload(mode, 5000, reply=False)
    back = _zero_sum_payload(mode, 5000, reply=True)
    fixtures = [
        ("new flow, general path", udp(CLIENT, VIP, 5000, 53, fwd, ip_options=opts),
         to_backend(mode, 0, 0, 5000)),
        ("known flow, fast path unless options", udp(CLIENT, VIP, 5000, 53, fwd, ip_options=opts),
         to_backend(mode, 0, 0, 5000)),
        from_backend(mode, 0, 0, 5000, vport=53, proto="udp", payload=back, ip_options=opts),
    ]
    for _, data, want in fixtures:
        expected = rewritten(data, **want)
        hl = (expected[0] & 0x0F) * 4
        assert expected[hl + 6:hl + 8] == b"\xff\xff"  # scapy's own rule (RFC 768)
        assert data[hl + 6:hl + 8] not in (b"\0\0", b"\xff\xff")
    run_fixtures(eng, fixtures)


# ---------------------------------------------------------------- MSS clamping

def _mss(data: bytes) -> int:
    return dict((k, v) for k, v in IP(data)[TCP].options)["MSS"]


MSS_CASES = [
    ("MSS 9000 first", [("MSS", 9000), ("SAckOK", b""), ("Timestamp", (1, 0))], 1460),
    ("MSS 65495 after a NOP (odd)", [("NOP", None), ("MSS", 65495), ("WScale", 7)], 1460),
    ("MSS 1461 after WScale (odd)", [("WScale", 7), ("MSS", 1461)], 1460),
    ("MSS 1461 after timestamps", [("Timestamp", (1, 2)), ("NOP", None), ("NOP", None),
                                   ("MSS", 1461)], 1460),
    ("MSS 1460 kept", [("MSS", 1460)], 1460),
    ("MSS 536 not raised", [("NOP", None), ("MSS", 536)], 536),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("desc, options, want", MSS_CASES, ids=[c[0] for c in MSS_CASES])
@pytest.mark.parametrize("ip_options", [[], [RA]], ids=["ihl5", "ihl6"])
def test_mss_clamped_on_syn_and_synack(mode: str, desc: str, options: Any, want: int,
                                       ip_options: Any) -> None:
    eng = engine(service(mode))
    syn = tcp(CLIENT, VIP, 40000, 80, "S", options=options, ip_options=ip_options)
    syn_out = {**to_backend(mode, 0, 0, 40000), "mss": want}
    _, synack, synack_out = from_backend(mode, 0, 0, 40000, flags="SA", options=options,
                                         ip_options=ip_options)
    run_fixtures(eng, [
        ("SYN " + desc, syn, syn_out),
        ("retransmitted SYN " + desc, syn, syn_out),
        ("SYN/ACK " + desc, synack, {**synack_out, "mss": want}),
        ("ACK carrying an MSS option: not a SYN, left alone",
         tcp(CLIENT, VIP, 40000, 80, "A", options=options, ip_options=ip_options),
         to_backend(mode, 0, 0, 40000)),
    ])


def test_mss_clamp_configurable() -> None:
    eng = engine(service("dnat"), daemon={"mss_clamp": 1200})
    out = eng.handle(tcp(CLIENT, VIP, 40000, 80, "S", options=[("MSS", 1460)]), 0.0)
    assert isinstance(out, bytes) and _mss(out) == 1200 and checksums_ok(out)


# ---------------------------------------------------------------- two services, one reply key

def test_reply_collision_is_refused() -> None:
    """Two dnat services on one backend: the same client port would share one reply key."""
    eng = engine(service("dnat", backend=[{"address": B1, "port": 8080}]),
                 service("dnat", name="other", port=81, backend=[{"address": B1, "port": 8080}]))
    assert isinstance(eng.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0), bytes)
    assert eng.handle(tcp(CLIENT, VIP, 40000, 81, "S"), 0.0) == DROP
    assert eng.counters.drops == {"reply_collision": 1}


def test_reply_key_of_a_closed_flow_is_taken_over() -> None:
    """Same as above, but the first flow is closed (RST): the new one replaces it entirely."""
    eng = engine(service("dnat", backend=[{"address": B1, "port": 8080}]),
                 service("dnat", name="other", port=81, backend=[{"address": B1, "port": 8080}]))
    first = Conversation(eng, dport=80)
    first.handshake()
    first.client("R")
    run_fixtures(eng, [
        ("SYN to the other service, same client port", tcp(CLIENT, VIP, 40000, 81, "S"),
         {"dst": B1, "dport": 8080}),
        ("the reply now belongs to the new flow", tcp(B1, CLIENT, 8080, 40000, "SA"),
         {"src": VIP, "sport": 81}),
    ])
    assert eng.table.active == 1 and eng.counters.drops == {}
    assert first.client("A") == DROP  # the old flow left the table, both keys


# ---------------------------------------------------------------- expiry frees flows

@pytest.mark.parametrize("mode", MODES)
def test_flows_freed_on_expiry(mode: str) -> None:
    eng = engine(service(mode), service(mode, "udp"))
    for i in range(3):
        Conversation(eng, sport=40000 + i).handshake(now=0.0)
        Conversation(eng, sport=50000 + i, proto="udp").client(now=0.0)
    Conversation(eng, sport=40010).client("S", now=0.0)
    assert eng.stats()["flows_active"] == 7
    eng.handle_timer(59.0)
    assert eng.stats()["flows_active"] == 7
    t = eng.get_timer()
    assert t is not None and t <= 60.0
    eng.handle_timer(60.0)  # the half-open one (syn timeout)
    assert eng.stats()["flows_active"] == 6
    eng.handle_timer(300.0)  # udp
    assert eng.stats()["flows_active"] == 3
    eng.handle_timer(900.0)  # established tcp
    assert eng.stats()["flows_active"] == 0
    assert eng.get_timer() is None
    assert eng.table.by_proto[6] == {} and eng.table.by_proto[17] == {}
    stats = eng.stats()
    assert stats["flows_total"] == 7
    assert sum(b["flows"] for b in stats["services"][f"{mode}-tcp"]["backends"].values()) == 4
    if mode == "fullnat":  # every port back in the pool
        assert all(s.pool.available(b.endpoint) == 10
                   for s in eng.services for b in s.backends.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("close", ["rst-client", "rst-server", "fin-fin", "fin-fin-server-first"])
def test_flows_freed_after_close_linger(mode: str, close: str) -> None:
    eng = engine(service(mode))
    c = Conversation(eng)
    c.handshake(now=0.0)
    steps = {
        "rst-client": [c.client], "rst-server": [c.server],
        "fin-fin": [c.client, c.server], "fin-fin-server-first": [c.server, c.client],
    }[close]
    flags = "R" if close.startswith("rst") else "FA"
    for side in steps:
        assert isinstance(side(flags, now=5.0), bytes)
    assert eng.table.flows()[0].state in (TcpState.CLOSED, TcpState.CLOSING)
    eng.handle_timer(14.9)
    assert isinstance(c.client("A", now=14.9), bytes)  # still rewritten while it lingers
    eng.handle_timer(24.89)
    assert eng.stats()["flows_active"] == 1
    eng.handle_timer(24.9)  # tcp_close (10 s) after the last packet
    assert eng.stats()["flows_active"] == 0
    assert c.client("A", now=25.0) == DROP
    assert eng.counters.drops == {"no_flow": 1}


# ---------------------------------------------------------------- counters

def test_per_backend_stats_tcp() -> None:
    eng = engine(service("dnat"))
    a, b, c = (Conversation(eng, sport=40000 + i) for i in range(3))
    sizes = {"b1": 0, "b2": 0}
    counts = {"b1": 0, "b2": 0}
    for conv, name, steps in ((a, "b1", 5), (b, "b2", 2), (c, "b1", 1)):
        script = [("client", "S"), ("server", "SA"), ("client", "A"), ("client", "PA"),
                  ("server", "PA")][:steps]
        for side, flags in script:
            assert isinstance(getattr(conv, side)(flags, b"p" * 10 if "P" in flags else b""),
                              bytes)
            sizes[name] += len(conv.sent)
            counts[name] += 1
    eng.handle(tcp(CLIENT, VIP, 1, 80, "A"), 0.0)  # no flow: counted nowhere per backend
    keys = ("flows", "active", "inactive", "packets", "bytes")
    backends = eng.stats()["services"]["dnat-tcp"]["backends"]
    # active: established (ipvsadm's ActiveConn), inactive: any other (InActConn)
    assert {n: {k: b[k] for k in keys} for n, b in backends.items()} == {
        "b1": {"flows": 2, "active": 1, "inactive": 1, "packets": counts["b1"],
               "bytes": sizes["b1"]},
        "b2": {"flows": 1, "active": 0, "inactive": 1, "packets": counts["b2"],
               "bytes": sizes["b2"]},
    }
    b1 = backends["b1"]
    assert b1["packets_in"] + b1["packets_out"] == b1["packets"] and b1["packets_out"] == 2
    eng.handle_timer(1000.0)
    after = eng.stats()
    backends = after["services"]["dnat-tcp"]["backends"]
    assert {k: backends["b1"][k] for k in keys} == {
        "flows": 2, "active": 0, "inactive": 0, "packets": counts["b1"], "bytes": sizes["b1"]}
    assert after["packets"] == 9 and after["rewritten"] == 8 and after["flows_total"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_per_backend_stats_udp(mode: str) -> None:
    eng = engine(service(mode, "udp"))
    c = Conversation(eng, proto="udp")
    assert isinstance(c.client(payload=b"one"), bytes)
    first = len(c.sent)
    backends = eng.stats()["services"][f"{mode}-udp"]["backends"]
    assert {k: backends["b1"][k] for k in ("flows", "active", "inactive", "packets", "bytes")} \
        == {"flows": 1, "active": 0, "inactive": 1, "packets": 1, "bytes": first}  # as IPVS
    assert isinstance(c.client(payload=b"two!"), bytes)
    assert isinstance(c.server(payload=b"reply"), bytes)
    backends = eng.stats()["services"][f"{mode}-udp"]["backends"]
    assert backends["b1"]["packets"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_udp_flow_packet_count_after_first(mode: str) -> None:
    """Apart from the first datagram, each packet counts once (the fast and general paths)."""
    eng = engine(service(mode, "udp"))
    c = Conversation(eng, proto="udp")
    c.client(payload=b"one")
    (flow,) = eng.table.flows()
    backend = eng.stats()["services"][f"{mode}-udp"]["backends"][flow.backend.name]
    c.client(payload=b"two")  # fast path
    c.client(payload=b"three", ip_options=[RA])  # general path, known flow
    c.server(payload=b"four")
    after = eng.stats()["services"][f"{mode}-udp"]["backends"][flow.backend.name]
    assert after["packets"] == backend["packets"] + 3 == 4


class _FailingPolicy:
    def set_backends(self, backends: Any) -> None:
        pass

    def choose(self, flow: Any, now: float) -> Any:
        raise RuntimeError("policy bug")


def _with_failing_policy():  # type: ignore[no-untyped-def]
    eng = engine(service("dnat", policy_fallback="drop"))  # (test_policies*: other fallbacks)
    (state,) = eng.services
    state.policy = _FailingPolicy()
    return eng


def test_failing_policy_is_contained() -> None:
    eng = _with_failing_policy()
    for sport in (1, 2):
        assert eng.handle(tcp(CLIENT, VIP, sport, 80, "S"), 0.0) == DROP
    assert eng.table.active == 0
    assert eng.stats()["services"]["dnat-tcp"]["refused"] == 2
    assert eng.counters.drops == {"policy_error": 2}


def test_failing_policy_counts_one_drop_per_packet() -> None:
    """Regression: it was counted under policy_error and no_backend (two drops, one packet)."""
    eng = _with_failing_policy()
    assert eng.handle(tcp(CLIENT, VIP, 1, 80, "S"), 0.0) == DROP
    assert sum(eng.stats()["dropped"].values()) == 1


# ---------------------------------------------------------------- malformed input

def _established_dnat():  # type: ignore[no-untyped-def]
    eng = engine(service("dnat"), service("dnat", "udp"))
    Conversation(eng).handshake()
    Conversation(eng, proto="udp", sport=5000).client()
    return eng


GOOD_TCP = tcp(CLIENT, VIP, 40000, 80, "PA", b"payload")  # of the established flow
GOOD_UDP = udp(CLIENT, VIP, 5000, 53, b"payload")

MALFORMED = [
    ("empty", b"", "truncated"),
    ("19 bytes", GOOD_TCP[:19], "truncated"),
    ("tcp cut in the tcp header", GOOD_TCP[:30], "truncated"),
    ("tcp cut in the payload", GOOD_TCP[:-1], "truncated"),
    ("udp cut", GOOD_UDP[:-3], "truncated"),
    ("ihl 4", b"\x44" + GOOD_TCP[1:], "bad_header_length"),
    ("ihl 15 on a short packet", b"\x4f" + GOOD_TCP[1:], "truncated"),
    ("total length too small", GOOD_TCP[:2] + struct.pack("!H", len(GOOD_TCP) - 4)
     + GOOD_TCP[4:], "bad_total_length"),
    ("total length too big", GOOD_TCP[:2] + struct.pack("!H", len(GOOD_TCP) + 4)
     + GOOD_TCP[4:], "truncated"),
    ("trailing garbage", GOOD_UDP + b"\0", "bad_total_length"),
    ("tcp data offset 4", GOOD_TCP[:32] + b"\x40" + GOOD_TCP[33:], "bad_tcp_header"),
    ("tcp data offset 15", GOOD_TCP[:32] + b"\xf0" + GOOD_TCP[33:], "bad_tcp_header"),
    ("udp length wrong", GOOD_UDP[:24] + b"\x00\x09" + GOOD_UDP[26:], "bad_udp_length"),
    ("version 0", b"\0" * 40, "bad_version"),
]


@pytest.mark.parametrize("desc, data, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_dropped_and_counted(desc: str, data: bytes, reason: str) -> None:
    eng = _established_dnat()
    assert eng.handle(data, 1.0) == DROP
    assert eng.counters.drops == {reason: 1}
    assert eng.stats()["dropped"] == {reason: 1}


def test_good_packets_of_the_malformed_table_pass() -> None:
    eng = _established_dnat()
    assert isinstance(eng.handle(GOOD_TCP, 1.0), bytes)
    assert isinstance(eng.handle(GOOD_UDP, 1.0), bytes)


def test_scapy_checksum_of_outputs_is_canonical() -> None:
    """A sanity check of the helpers: a rewritten packet's IP header sums to zero."""
    eng = engine(service("dnat"))
    out = eng.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    assert isinstance(out, bytes) and checksum(out[:20]) == 0

