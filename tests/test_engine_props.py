"""Property tests of the engine (hypothesis).

(a) Any bytes at all: ``handle`` never raises, never hits its internal-error net, and answers
    bytes (of the same length), ACCEPT or DROP.
(b) Valid packets of established flows, drawn field by field and built by scapy, in every mode
    and both directions: the rewrite is exactly scapy's rebuild with the new addresses/ports and
    recomputed checksums. Then mutations of them (byte flips, truncations, extensions, with the
    checksums and lengths sometimes made consistent again): whenever the input's checksums were
    correct, any rewritten output's checksums are correct too, by scapy's full recomputation.
"""

from __future__ import annotations

import ipaddress
import struct
from functools import lru_cache
from typing import Any

from dual_stack import MODES, backend_side
from helpers import (
    B1,
    B2,
    SNAT,
    VIP,
    checksums_ok,
    engine,
    fix_checksums,
    rewritten,
    scapy_recomputed,
    service,
    tcp,
    udp,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR
from strategies import PROPS, TCP_FLAGS, apply_mutations, mutation, ports, tcp_options

from nfqlb.engine import ACCEPT, DROP, Held

#: The verdicts that are neither bytes nor Held (fragments kept for later).
VERDICTS = {ACCEPT, DROP}

SPECIAL = {VIP, B1, B2, SNAT}


# ---------------------------------------------------------------- (a) arbitrary bytes

def _all_modes_services() -> list[dict[str, Any]]:
    out = []
    for n, mode in enumerate(MODES):
        for proto, port in (("tcp", 80 + n), ("udp", 53 + n)):
            extra: dict[str, Any] = {"port": port}
            if mode == "fullnat":
                extra["snat_ports"] = "20000-20009" if proto == "tcp" else "20010-20019"
            if mode == "local":
                extra["backend"] = [{"name": "b1", "port": 8080}, {"name": "b2", "port": 8081}]
            out.append(service(mode, proto, **extra))
    return out


@lru_cache(maxsize=1)
def _setup_packets() -> tuple[bytes, ...]:
    """Packets that open and establish one flow per service (scapy, built once)."""
    probe = engine(*_all_modes_services())
    pkts: list[bytes] = []
    for svc in _all_modes_services():
        if svc["protocol"] == "tcp":
            syn = tcp("198.18.0.2", VIP, 40000, svc["port"], "S")
            out = probe.handle(syn, 0.0)
            assert isinstance(out, bytes)
            back = IP(out)
            synack = tcp(back.dst, back.src, back[TCP].dport, back[TCP].sport, "SA")
            pkts += [syn, synack, tcp("198.18.0.2", VIP, 40000, svc["port"], "A")]
            probe.handle(synack, 0.0)
        else:
            pkts.append(udp("198.18.0.2", VIP, 40000, svc["port"], b"hello"))
            probe.handle(pkts[-1], 0.0)
    return tuple(pkts)


def _busy_engine():  # type: ignore[no-untyped-def]
    eng = engine(*_all_modes_services(), timeouts={"tcp_close": 1.0})
    for p in _setup_packets():
        assert isinstance(eng.handle(p, 0.0), bytes)
    return eng


def _header_shaped(draw: st.DrawFn) -> bytes:
    """Bytes that look like IPv4 to the flows above: often enough to reach deep paths."""
    base = draw(st.sampled_from(_setup_packets()))
    body = bytearray(base)
    n_edits = draw(st.integers(0, 6))
    for _ in range(n_edits):
        pos = draw(st.integers(0, len(body) - 1))
        body[pos] = draw(st.integers(0, 255))
    tail = draw(st.binary(max_size=64))
    cut = draw(st.integers(0, len(body)))
    data = bytes(body[:cut]) + tail if draw(st.booleans()) else bytes(body) + tail
    if draw(st.booleans()) and len(data) >= 4:  # consistent total length
        data = data[:2] + struct.pack("!H", len(data) & 0xFFFF) + data[4:]
    if draw(st.booleans()):
        data = fix_checksums(data)
    return data


arbitrary = st.one_of(st.binary(max_size=120), st.composite(_header_shaped)())


@settings(PROPS, max_examples=1500)
@given(st.lists(arbitrary, min_size=1, max_size=6), st.floats(0, 2.0))
def test_arbitrary_bytes_never_raise(packets: list[bytes], step: float) -> None:
    eng = _busy_engine()
    now = 0.0
    for data in packets:
        now += step
        eng.handle_timer(now)
        out = eng.handle(data, now)
        event(f"verdict {'bytes' if isinstance(out, bytes) else out}")
        assert out in VERDICTS or isinstance(out, (bytes, Held))
        if isinstance(out, bytes):
            assert len(out) == len(data)
            if checksums_ok(data):
                assert checksums_ok(out)
    assert "internal_error" not in eng.counters.drops, eng.counters.drops


# ---------------------------------------------------------------- (b) valid packets, mutated

def _client_address(i: int) -> str:
    """The ``i``-th address of 198.18.0.0/15."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + i))


clients = st.integers(1, 2**17 - 2).map(_client_address).filter(lambda a: a not in SPECIAL)
ip_options = st.one_of(
    st.just([]),
    st.just([IPOption_Router_Alert()]),
    st.lists(st.sampled_from(["198.18.0.1", "198.18.9.9"]), min_size=1, max_size=8).map(
        lambda r: [IPOption_RR(routers=r)]),
    st.just([IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()]),
)

@st.composite
def established_packet(draw: st.DrawFn) -> tuple[str, str, str, int, bool, bytes, dict[str, Any]]:
    """(mode, proto, client, sport, from_client, packet, expected field changes)."""
    mode = draw(st.sampled_from(MODES))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    client, sport = draw(clients), draw(ports)
    vport = 80 if proto == "tcp" else 53
    bsrc, bsport, bdst, bdport = backend_side(mode, 4, client, sport)
    from_client = draw(st.booleans())
    if from_client:
        src, dst, sp, dp = client, VIP, sport, vport
        want: dict[str, Any] = {"src": bsrc, "sport": bsport, "dst": bdst, "dport": bdport}
    else:
        src, dst, sp, dp = bdst, bsrc, bdport, bsport
        want = {"src": VIP, "sport": vport, "dst": client, "dport": sport}
    iph = IP(src=src, dst=dst, tos=draw(st.integers(0, 255)), id=draw(st.integers(0, 65535)),
             ttl=draw(st.integers(1, 255)), flags=draw(st.sampled_from(["", "DF"])),
             options=draw(ip_options))
    payload = draw(st.binary(max_size=1400))
    if proto == "tcp":
        flags = draw(st.sampled_from(TCP_FLAGS))
        opts = draw(tcp_options())
        l4 = TCP(sport=sp, dport=dp, flags=flags, seq=draw(st.integers(0, 2**32 - 1)),
                 ack=draw(st.integers(0, 2**32 - 1)), window=draw(st.integers(0, 65535)),
                 urgptr=draw(st.integers(0, 65535)), options=opts)
        mss = [v for k, v in opts if k == "MSS"]
        if "S" in flags and mss and mss[0] > 1460:
            want["mss"] = 1460
    else:
        l4 = UDP(sport=sp, dport=dp)
        if draw(st.integers(0, 9)) == 0:
            l4.chksum = 0
    return mode, proto, client, sport, from_client, bytes(iph / l4 / payload), want


def _engine_with_flow(mode: str, proto: str, client: str, sport: int):  # type: ignore[no-untyped-def]
    eng = engine(service(mode, proto))
    vport = 80 if proto == "tcp" else 53
    bsrc, bsport, bdst, bdport = backend_side(mode, 4, client, sport)
    if proto == "tcp":
        steps = [tcp(client, VIP, sport, vport, "S"), tcp(bdst, bsrc, bdport, bsport, "SA"),
                 tcp(client, VIP, sport, vport, "A")]
    else:
        steps = [udp(client, VIP, sport, vport, b"open")]
    for p in steps:
        assert isinstance(eng.handle(p, 0.0), bytes)
    return eng


def _mutate(data: bytes, muts: list[tuple[str, int, int]], fix_len: bool, fix_sum: bool) -> bytes:
    b = apply_mutations(data, muts)
    if fix_len and len(b) >= 4:
        b[2:4] = struct.pack("!H", len(b) & 0xFFFF)
    out = bytes(b)
    return fix_checksums(out) if fix_sum else out


def _looks_source_routed(data: bytes) -> bool:
    end, i = (data[0] & 0x0F) * 4, 20
    while i < end:
        kind = data[i]
        if kind == 0:
            return False
        if kind & 0x1F in (3, 9):
            return True
        if kind == 1 or i + 1 >= end:
            i += 1
            continue
        i += max(data[i + 1], 2)
    return False


def _assert_checksums_recomputed(out: bytes) -> None:
    """IP(out) with its checksums deleted and rebuilt by scapy is ``out`` itself.

    Scapy re-encodes every field once one is deleted; for bytes it cannot re-encode as they
    were (say a malformed TCP option after a mutation) the sums are checked on the raw bytes.
    So they are when a mutation made an IP option look like source routing (option number 3
    or 9, whatever the copy bit): scapy then takes the route's last address for the
    pseudo-header (RFC 791's final destination), which a packet that is not really source
    routed does not have (checked by hand on one such packet: the raw sums are right).
    """
    assert checksums_ok(out)
    if _looks_source_routed(out):
        return
    pkt = IP(out)
    pkt.chksum = pkt.chksum  # forces the same full re-encoding, checksums kept as they are
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    if l4 is not None:
        l4.chksum = l4.chksum
    if bytes(pkt) == out:
        assert scapy_recomputed(out) == out


@settings(PROPS, max_examples=800)
@given(established_packet(),
       st.lists(st.tuples(st.lists(mutation, min_size=1, max_size=3), st.booleans(),
                          st.booleans()), max_size=6))
def test_established_rewrite_is_exact_and_mutations_keep_checksums(
        case: tuple[str, str, str, int, bool, bytes, dict[str, Any]],
        mutations: list[tuple[list[tuple[str, int, int]], bool, bool]]) -> None:
    mode, proto, client, sport, from_client, data, want = case
    eng = _engine_with_flow(mode, proto, client, sport)
    assert checksums_ok(data)
    out = eng.handle(data, 1.0)
    assert isinstance(out, bytes)
    assert out == rewritten(data, **want)
    _assert_checksums_recomputed(out)
    for muts, fix_len, fix_sum in mutations:
        bad = _mutate(data, muts, fix_len, fix_sum)
        got = eng.handle(bad, 2.0)
        assert got in VERDICTS or isinstance(got, (bytes, Held))
        event(f"mutant: {'rewritten' if isinstance(got, bytes) else got}, "
              f"checksums {'ok' if checksums_ok(bad) else 'bad'}")
        if isinstance(got, bytes):
            assert len(got) == len(bad)
            if checksums_ok(bad):
                _assert_checksums_recomputed(got)
    assert "internal_error" not in eng.counters.drops, eng.counters.drops


@settings(PROPS, max_examples=100)
@given(st.lists(st.tuples(clients, ports), min_size=1, max_size=8, unique=True),
       st.sampled_from(MODES))
def test_many_flows_each_reply_maps_back(flows: list[tuple[str, int]], mode: str) -> None:
    """Several flows at once in fullnat/dnat/local: each reply maps back to its own client."""
    eng = engine(service(mode))
    backs = []
    for client, sport in flows:
        out = eng.handle(tcp(client, VIP, sport, 80, "S"), 0.0)
        assert isinstance(out, bytes)
        p = IP(out)
        backs.append((p.dst, p.src, p[TCP].dport, p[TCP].sport))
    if mode == "fullnat":
        # one snat port per flow and backend (ports are unique per backend, as in IPVS FNAT)
        assert len({(b[0], b[3]) for b in backs}) == len(flows)
    for (client, sport), (bsrc, bdst, bsp, bdp) in zip(flows, backs, strict=True):
        reply = tcp(bsrc, bdst, bsp, bdp, "SA", options=[("MSS", 1400)])
        got = eng.handle(reply, 0.0)
        assert got == rewritten(reply, src=VIP, sport=80, dst=client, dport=sport)
