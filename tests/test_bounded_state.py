"""Engine: its state is bounded: the flow table's cap and the fullnat source-port pool.

``daemon.max_flows`` evicts exactly the flows nearest their idle deadline (half-open ones
before established ones under a SYN flood). A fullnat backend whose pool ports all run out
takes the port of its least recently used closed, else half-open flow (a SYN flood cannot lock
clients out); with none, it refuses
new flows (``snat_exhausted``) while the flows that hold its ports carry on both ways. Ports
come back when flows expire, are never shared by two live flows to one backend (they are per
backend, as in IPVS FNAT), a dry backend takes the port of a closed flow before a half-open
one's, and one pool may serve several services.

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from typing import Any

import pytest
from dual_stack import C4, VIP4, engine_for
from helpers import B1, B2, CLIENT, SNAT, VIP, Conversation, engine, run_fixtures, service, tcp
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from nfqlb.engine import DROP
from nfqlb.flows import HALF_OPEN, Flow, TcpState


def _raw_tcp(src: str, sport: int, dst: str, dport: int, flags: int) -> bytes:
    """An IPv4/TCP segment without options, by struct (scapy is too slow for 20,000 flows;
    the engine updates checksums incrementally, so zero ones are fine here)."""
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, s, d)
            + struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0))


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

def _fullnat(ports: str = "20000-20002", backends: int = 1, **kw: Any):  # type: ignore[no-untyped-def]
    svc = service("fullnat", snat_ports=ports)
    svc["backend"] = svc["backend"][:backends]
    return engine(svc, **kw)


def test_pool_exhaustion_and_reuse_after_expiry() -> None:
    eng = _fullnat(timeouts={"syn": 5.0, "tcp": 50.0})
    convs = [Conversation(eng, sport=40000 + i) for i in range(6)]
    ports = []
    for i, c in enumerate(convs[:3]):
        out = c.client("S", now=float(i))
        assert isinstance(out, bytes)
        ports.append(IP(out)[TCP].sport)
    assert ports == [20000, 20001, 20002]
    convs[1].server("SA", now=3.0)
    convs[1].client("A", now=3.0)  # established: 50 s
    # the backend has no port left: the least recently used half-open flow (0) gives its own
    out = convs[3].client("S", now=4.0)
    assert isinstance(out, bytes) and IP(out)[TCP].sport == 20000
    assert eng.counters.events["reclaimed"] == 1 and eng.counters.drops == {}
    for c in convs[3:4]:  # the new flow completes its handshake: it keeps its port
        c.server("SA", now=4.0)
        c.client("A", now=4.0)
    out = convs[4].client("S", now=4.1)  # then flow 2 (the last half-open one) gives its port
    assert isinstance(out, bytes) and IP(out)[TCP].sport == 20002
    convs[4].server("SA", now=4.1)
    convs[4].client("A", now=4.1)
    # every port held by an established flow: refused
    assert convs[5].client("S", now=4.2) == DROP
    assert eng.counters.drops == {"snat_exhausted": 1}
    assert eng.counters.events["reclaimed"] == 2
    assert eng.stats()["services"]["fullnat-tcp"]["refused"] == 1
    # existing flows still rewritten, both ways
    run_fixtures(eng, [
        ("flow 1 still rewritten", tcp(CLIENT, VIP, 40001, 80, "PA", b"x"),
         {"src": SNAT, "sport": 20001, "dst": B1, "dport": 8080}),
        ("flow 1 reply still rewritten", tcp(B1, SNAT, 8080, 20001, "PA", b"x"),
         {"src": VIP, "sport": 80, "dst": CLIENT, "dport": 40001}),
    ], now=4.2)
    eng.handle_timer(53.0)
    assert convs[5].client("S", now=53.0) == DROP  # nothing has expired yet
    eng.handle_timer(54.2)  # flow 1 (last used at 4.2) lives to 54.2; flows 3, 4 died before
    assert eng.stats()["flows_active"] == 0
    out = convs[5].client("S", now=54.2)
    assert isinstance(out, bytes)
    assert IP(out)[TCP].sport in (20000, 20001, 20002)


def test_ports_are_unique_per_backend_not_per_snat_address() -> None:
    """The reply key is (backend, snat address, backend port, snat port), as in IPVS FNAT: a
    pool of 3 ports serves 3 live flows to each backend, the same ports to both, and each
    backend's replies reach their own client."""
    eng = _fullnat(backends=2, timeouts={"tcp": 50.0})
    seen: dict[tuple[str, int], int] = {}  # (backend, snat port) -> client port
    for i in range(6):
        c = Conversation(eng, sport=41000 + i)
        out = c.client("S", now=0.0)
        assert isinstance(out, bytes)
        key = (IP(out).dst, IP(out)[TCP].sport)
        assert key not in seen
        seen[key] = 41000 + i
        c.server("SA", now=0.0)
        c.client("A", now=0.0)
    assert sorted(seen) == [(b, p) for b in (B1, B2) for p in (20000, 20001, 20002)]
    assert "reclaimed" not in eng.counters.events and eng.counters.drops == {}
    for (b, port), client_port in seen.items():  # each reply to its own client
        out = eng.handle(tcp(b, SNAT, 8080, port, "PA", b"x"), 1.0)
        assert isinstance(out, bytes) and IP(out)[TCP].dport == client_port
    assert Conversation(eng, sport=41100).client("S", now=1.0) == DROP  # 3 per backend
    assert eng.counters.drops == {"snat_exhausted": 1}


def test_a_dry_backend_takes_a_closed_flows_port_before_a_half_open_one() -> None:
    """Flows that closed linger tcp_close seconds for retransmissions only: their ports go
    first (least recently used closed flow), before any half-open flow's."""
    eng = _fullnat()
    half_open, closed, established = (Conversation(eng, sport=42000 + i) for i in range(3))
    half_open.client("S", now=0.0)  # the least recently used of all
    closed.handshake(now=1.0)
    closed.client("FA", now=1.0)
    closed.server("FA", now=1.1)  # both FINs: CLOSING
    established.handshake(now=2.0)
    ports = {f.state: f.snat_port for f in eng.table.flows()}
    assert ports.keys() == {TcpState.SYN_SENT, TcpState.CLOSING, TcpState.ESTABLISHED}
    out = Conversation(eng, sport=42100).client("S", now=3.0)
    assert isinstance(out, bytes) and IP(out)[TCP].sport == ports[TcpState.CLOSING]
    states = sorted(f.state for f in eng.table.flows())
    assert states == [TcpState.SYN_SENT, TcpState.SYN_SENT, TcpState.ESTABLISHED]
    # then the half-open one, the oldest left; the established flow keeps its port
    out = Conversation(eng, sport=42101).client("S", now=3.1)
    assert isinstance(out, bytes) and IP(out)[TCP].sport == ports[TcpState.SYN_SENT]
    assert eng.counters.events["reclaimed"] == 2
    assert isinstance(established.client("PA", b"x", now=3.2), bytes)


def test_reclaim_never_takes_another_backends_flow() -> None:
    """A port is unique per backend: a backend with none free takes one back from its own
    flows, never from another backend's (which may hold the same port)."""
    eng = _fullnat("20000-20000", backends=2)  # round robin: b1, b2, b1
    a = eng.handle(tcp(CLIENT, VIP, 43000, 80, "S"), 0.0)
    b = eng.handle(tcp(CLIENT, VIP, 43001, 80, "S"), 0.1)
    assert (IP(a).dst, IP(b).dst) == (B1, B2)  # type: ignore[arg-type]
    assert IP(a)[TCP].sport == IP(b)[TCP].sport == 20000  # type: ignore[arg-type]
    c = eng.handle(tcp(CLIENT, VIP, 43002, 80, "S"), 0.2)
    assert IP(c).dst == B1 and IP(c)[TCP].sport == 20000  # type: ignore[arg-type]
    assert eng.counters.events["reclaimed"] == 1
    assert eng.handle(tcp(CLIENT, VIP, 43000, 80, "A"), 0.3) == DROP  # a gave its port
    assert eng.handle(tcp(CLIENT, VIP, 43001, 80, "A"), 0.3) != DROP  # b (on b2) did not


def _close_heavy(eng, rate: float, seconds: float) -> int:  # type: ignore[no-untyped-def]
    """Short connections (handshake, request, both FINs, last ACK) at ``rate`` per second
    from many clients, with the timer run as the daemon runs it; the number opened."""
    n = int(rate * seconds)
    for i in range(n):
        now = i / rate
        if i % 100 == 0:
            eng.handle_timer(now)
        src, sport = f"198.19.{i // 250 % 250}.{i % 250 + 1}", 1024 + i % 60000
        out = eng.handle(_raw_tcp(src, sport, VIP, 80, 0x02), now)
        assert isinstance(out, bytes), f"connection {i} refused"
        port = out[20] << 8 | out[21]
        eng.handle(_raw_tcp(B1, 8080, SNAT, port, 0x12), now)
        eng.handle(_raw_tcp(src, sport, VIP, 80, 0x10), now)
        eng.handle(_raw_tcp(B1, 8080, SNAT, port, 0x11), now)  # the server closes first
        eng.handle(_raw_tcp(src, sport, VIP, 80, 0x11), now)
        eng.handle(_raw_tcp(B1, 8080, SNAT, port, 0x10), now)
    return n


def test_close_heavy_load_does_not_exhaust_the_pool() -> None:
    """2,000 short connections a second to one backend for 12 s with the 10 s close linger:
    about 20,000 closed flows hold ports at once, twice a 10,000-port pool. Closed flows give
    their ports to new ones, so no connection is refused (the old pool refused from the
    sixth second on)."""
    eng = _fullnat("20000-29999")
    n = _close_heavy(eng, 2000.0, 12.0)
    assert eng.counters.drops.get("snat_exhausted", 0) == 0
    # every port was taken once, then each new connection took a closed flow's (none had
    # expired yet: the oldest closed flow is 5 s old when it gives its port)
    assert eng.counters.events["reclaimed"] == n - 10_000
    assert eng.table.active == 10_000


def test_syn_flood_does_not_lock_fullnat_out() -> None:
    """About 167 spoofed SYNs a second used to keep a 10,000-port pool empty for a minute
    after the flood; now each new client takes the port of the oldest half-open flow."""
    eng = _fullnat("20000-29999", backends=2)
    now = 0.0
    for i in range(24_000):  # a minute and more of spoofed SYNs that never complete
        now = i / 334
        src = f"198.19.{i // 250 % 250}.{i % 250 + 1}"
        eng.handle(_raw_tcp(src, 1024 + i % 60000, VIP, 80, 0x02), now)
    assert eng.table.active == 20_000  # 10,000 ports for each backend
    for k in range(20):  # legitimate clients right after: every one gets a port
        c = Conversation(eng, sport=50000 + k)
        c.handshake(now=now + k / 100)
        assert isinstance(c.client("PA", b"GET /", now=now + 1), bytes)
    assert eng.counters.drops.get("snat_exhausted", 0) == 0
    assert eng.counters.events["reclaimed"] >= 4_000 + 20


def test_pool_ports_unique_per_backend_among_live_flows() -> None:
    """Random opens, handshakes, resets and closes through a 5-port pool per backend. Every
    segment here has sequence number 1000 and no timestamps, so a backend that closed first
    (FIN, then the client's FIN) holds a TIME_WAIT that refuses the next SYN on that port for
    60 s (its rcv_nxt is 1001; tests/test_fullnat_timewait.py has the rule): a new flow takes
    a port without one if there is any (free, or a closed flow's), else the oldest."""
    rng = random.Random(7)
    eng = _fullnat("20000-20004", backends=2, timeouts={"syn": 3.0, "tcp_close": 1.0})
    convs: dict[int, Conversation] = {}  # client port -> its conversation
    timewait: dict[tuple[str, int], float] = {}  # (backend, port) -> when the backend closed
    now, next_sport, exhausted, reclaimed, clashes = 0.0, 30000, 0, 0, 0

    def refuses(b: str, port: int) -> bool:
        return now - timewait.get((b, port), -100.0) < 60

    for _ in range(400):
        now += rng.choice([0.0, 0.1, 0.5, 2.0])
        eng.handle_timer(now)
        flows = list(eng.table.flows())
        live = {(str(f.backend.address), f.snat_port): f for f in flows}
        assert len(live) == eng.table.active  # unique per backend among live flows
        roll = rng.random()
        if roll < 0.15 and live:  # the backend resets, or both sides close
            (b, port), flow = rng.choice(sorted(live.items(), key=lambda kv: kv[0]))
            if flow.state in HALF_OPEN or rng.random() < 0.5:
                eng.handle(tcp(b, SNAT, 8080, port, "R"), now)
            else:
                c = convs[_client_port(flow)]
                c.server("FA", now=now)
                c.client("FA", now=now)
                timewait[(b, port)] = now
            continue
        half_open = [f for f in flows if f.state in HALF_OPEN]
        if roll < 0.6 and half_open:  # complete a half-open flow's handshake
            c = convs[_client_port(rng.choice(half_open))]
            c.server("SA", now=now)
            c.client("A", now=now)
            continue
        c = convs[next_sport] = Conversation(eng, sport=next_sport)
        next_sport += 1
        out = c.client("S", now=now)
        if out == DROP:
            exhausted += 1
            continue
        assert isinstance(out, bytes)
        to, port = IP(out).dst, IP(out)[TCP].sport
        assert 20000 <= port <= 20004
        mine = [f for f in flows if str(f.backend.address) == to]
        closed = [f for f in mine if f.state in (TcpState.CLOSING, TcpState.CLOSED)]
        taking = [f for f in closed if not refuses(to, f.snat_port)]
        free = {p for p in range(20000, 20005)} - {f.snat_port for f in mine}
        if (to, port) in live:  # taken back: a closed flow the backend takes the SYN for
            victim = live[(to, port)]
            if not taking:  # none: the backend had no port free at all
                assert len(mine) == 5
            pool = taking or closed or [f for f in mine if f.state in HALF_OPEN]
            assert victim in pool and victim.last == min(f.last for f in pool)
            reclaimed += 1
        elif refuses(to, port):  # a free port the backend refuses: there was no better one
            assert not taking and all(refuses(to, p) for p in free)
            clashes += 1
        timewait.pop((to, port), None)
    assert exhausted and eng.counters.drops["snat_exhausted"] == exhausted
    assert reclaimed and eng.counters.events["reclaimed"] == reclaimed
    assert eng.counters.events.get("timewait_reused", 0) >= clashes


def _client_port(flow: Any) -> int:
    """The client's source port of a flow (the forward key's source port)."""
    key = flow.fwd_key
    return int(key[-4] << 8 | key[-3])


def test_shared_pool_between_services() -> None:
    """Two services on one snat address and range share one pool: a backend behind both has
    one set of ports between them."""
    eng = engine(service("fullnat", snat_ports="20000-20000"),
                 service("fullnat", name="other", port=81, snat_ports="20000-20000"))
    a = eng.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)  # b1
    b = eng.handle(tcp(CLIENT, VIP, 40000, 81, "S"), 0.1)  # b1 too: takes a's port back
    assert IP(a).dst == IP(b).dst == B1  # type: ignore[arg-type]
    assert IP(a)[TCP].sport == IP(b)[TCP].sport == 20000  # type: ignore[arg-type]
    assert eng.counters.events["reclaimed"] == 1
    assert eng.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 0.2) == DROP  # flow a is gone (no_flow)


def test_pool_exhaustion_refuses_new_flows_and_keeps_old_ones() -> None:
    eng = engine_for("fullnat", proto="udp")  # pool of 100 ports, two backends
    for port in range(200):  # 100 ports for each backend
        assert isinstance(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + port,
                                                                     dport=80)), 0), bytes)
    assert eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=5000, dport=80)), 0) == DROP
    assert eng.counters.drops["snat_exhausted"] == 1
    out = eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000, dport=80) / Raw(b"x")), 1)
    assert isinstance(out, bytes)
    seen = set()
    for p in range(200):
        out = IP(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + p, dport=80)), 1))
        seen.add((out.dst, out[UDP].sport))
    assert len(seen) == 200  # no port shared by two live flows to one backend


# ---------------------------------------------------------------- exact eviction, bounded work

def test_eviction_at_the_cap_is_exact_at_scale() -> None:
    """20,000 established flows, each active within the last 100 s, then a burst of 2,000
    SYNs at the cap: the flood evicts itself, not one established flow (the old lazy heap
    gave up after 64 stale entries and evicted whatever was on top)."""
    n = 20_000
    eng = engine(service("dnat"), daemon={"max_flows": n + 1})
    clients = [(f"198.18.{10 + i // 250}.{i % 250 + 1}", 1024 + i) for i in range(n)]
    for i, (src, sport) in enumerate(clients):  # handshakes spread over 20 s
        syn = eng.handle(_raw_tcp(src, sport, VIP, 80, 0x02), i * 0.001)
        assert isinstance(syn, bytes)
        backend = ".".join(map(str, syn[16:20]))
        eng.handle(_raw_tcp(backend, 8080, src, sport, 0x12), i * 0.001)
        eng.handle(_raw_tcp(src, sport, VIP, 80, 0x10), i * 0.001)
    for i, (src, sport) in enumerate(clients):  # each active within 100 s before the flood
        out = eng.handle(_raw_tcp(src, sport, VIP, 80, 0x18), 1000.0 + (i * 7919 % n) * 0.005)
        assert isinstance(out, bytes)
    for k in range(2_000):
        eng.handle(_raw_tcp(f"198.19.{k // 250}.{k % 250 + 1}", 2000 + k, VIP, 80, 0x02),
                   1100.0 + k * 0.0001)
    assert eng.table.active == n + 1
    assert eng.counters.events["evicted"] == 1_999  # the first SYN fills the last place
    table = eng.table.by_proto[6]
    lost = [c for c in clients if _raw_tcp(*c, VIP, 80, 0x10)[12:24] not in table]
    assert lost == []
    states = Counter(f.state for f in eng.table.flows())
    assert states == {TcpState.ESTABLISHED: n, TcpState.SYN_SENT: 1}


def test_expiry_runs_in_bounded_slices() -> None:
    from nfqlb.engine import EXPIRE_SLICE

    eng = engine(service("dnat", "udp"), timeouts={"udp": 10.0})
    n = EXPIRE_SLICE * 3 + 7
    for i in range(n):
        Conversation(eng, proto="udp", sport=1024 + i).client(now=0.0)
    assert eng.table.active == n
    calls = 0
    while (t := eng.get_timer()) is not None and t <= 20.0:
        before = eng.table.active
        eng.handle_timer(20.0)
        assert before - eng.table.active <= EXPIRE_SLICE
        calls += 1
    assert eng.table.active == 0 and calls == 4


def test_stats_never_walk_the_table() -> None:
    eng = engine(service("dnat"))
    for k in range(50):
        Conversation(eng, sport=1000 + k).handshake()
    # a flow whose `next` was never set, first on every ring: a walk of any ring raises
    # (a compiled FlowTable takes no patched methods)
    stub = Flow(eng.table.rings[0].backend, 6, TcpState.CLOSED, 0.0, b"", b"")
    heads = eng.table.rings
    firsts = [head.next for head in heads]
    for head in heads:
        head.next = stub
    with pytest.raises(AttributeError):
        eng.table.flows()
    stats = eng.stats()
    for head, first in zip(heads, firsts, strict=True):
        head.next = first
    assert len(eng.table.flows()) == 50
    backends = stats["services"]["dnat-tcp"]["backends"]
    assert sum(b["active"] for b in backends.values()) == 50 == stats["flows_active"]
    assert sum(b["packets"] for b in backends.values()) == 150
