"""ICMP/ICMPv6 error translation (``nfqlb.icmp``), driven by bytes.

Inputs and expected outputs are both crafted by scapy in ``golden_icmp/make_golden_icmp.py``
from the mode definitions: the expected error is built anew around the packet as the client or
backend sent it, every checksum computed by scapy. Nothing expected comes from nfqlb.

The flow table is the engine's own, filled by pushing the flow's first packets through a real
``Engine`` (which must emit scapy's expected packets on the way). For a family the engine does
not carry yet (IPv6 today), the entries are built by hand exactly as ``Engine._open`` builds
them; ``test_hand_table_is_the_engines`` checks that construction against the engine on IPv4.
"""

from __future__ import annotations

import io
import ipaddress
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
)
from scapy.packet import Raw
from scapy.utils import checksum

sys.path.insert(0, str(Path(__file__).parent / "golden_icmp"))
import make_golden_icmp as g  # noqa: E402

from nfqlb.config import load_config, parse_config  # noqa: E402
from nfqlb.engine import Engine  # noqa: E402
from nfqlb.errors import PacketError  # noqa: E402
from nfqlb.icmp import is_echo_request, translate_error  # noqa: E402
from nfqlb.replay import replay  # noqa: E402
from nfqlb.wire.checksum import delta  # noqa: E402

Lookup = Callable[[int, bytes], Any]
PROTO = {"tcp": 6, "udp": 17}


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def hand_table(family: int, mode: str, proto: str) -> dict[int, dict[bytes, Any]]:
    """Both entries of the flow, built as ``Engine._open`` builds them (flow object elided)."""
    c, v, cp, vp = g.client_view(family, mode)
    s, b, sp, bp = g.backend_view(family, mode)
    src, dst, saddr, baddr = packed(c), packed(v), packed(s), packed(b)
    sport, dport, snp, bport = (struct.pack("!H", p) for p in (cp, vp, sp, bp))
    key = src + dst + sport + dport
    fwd_hdr = saddr + baddr + snp + bport
    rev_key = baddr + saddr + bport + snp
    rev_hdr = dst + src + dport + sport
    fwd = (None, fwd_hdr, delta(src + dst, saddr + baddr), delta(key, fwd_hdr), False)
    rev = (None, rev_hdr, delta(baddr + saddr, dst + src), delta(rev_key, rev_hdr), True)
    return {6: {}, 17: {}, PROTO[proto]: {key: fwd, rev_key: rev}}


def table_lookup(tables: dict[int, dict[bytes, Any]]) -> Lookup:
    """The header of the hand-built entry of key ``k`` (its second field)."""
    return lambda p, k: None if (e := tables[p].get(k)) is None else e[1]


def engine_lookup(eng: Engine, d: g.Derived) -> Lookup:
    """Open the flow in ``eng`` with its first packets; they must come out as scapy derived."""
    for i, (pkt_in, pkt_out) in enumerate(zip(d.flow_in, d.flow_out, strict=True)):
        got = eng.handle(pkt_in, now=1.0 + i)
        assert got == pkt_out, f"engine rewrote flow packet {i} unlike the mode definition"
    return eng.table.header


def make_engine(config: Any) -> Engine:
    """An engine for ``config`` (it carries both families)."""
    return Engine(config)


def flow_lookup(family: int, mode: str, proto: str, d: g.Derived) -> Lookup:
    eng = make_engine(parse_config({"service": [g.service(family, mode, proto)]}, "test"))
    return engine_lookup(eng, d)


def icmp_offset(data: bytes) -> int:
    return (data[0] & 0x0F) * 4 if data[0] >> 4 == 4 else 40


def icmp_checksum_ok(out: bytes, off: int) -> bool:
    msg = out[off:]
    if out[0] >> 4 == 4:
        return checksum(msg) == 0
    pseudo = out[8:40] + struct.pack("!I", len(msg)) + b"\0\0\0\x3a"
    return checksum(pseudo + msg) == 0


def fix_lengths(data: bytearray) -> None:
    """Make the outer length field agree with the buffer, so parsing reaches the quote."""
    if len(data) >= 40 and data[0] >> 4 == 6:
        data[4:6] = struct.pack("!H", (len(data) - 40) & 0xFFFF)
    elif len(data) >= 4:
        data[2:4] = struct.pack("!H", len(data) & 0xFFFF)


# ------------------------------------------------------------------ the translation table


@pytest.mark.parametrize("cut", [None, 8], ids=["whole_packet", "transport_cut_at_8"])
@pytest.mark.parametrize("scenario", g.SCENARIOS, ids=lambda s: s.name)
@pytest.mark.parametrize("proto", g.PROTOS)
@pytest.mark.parametrize("mode", g.MODES)
@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_translates_error(family: int, mode: str, proto: str, scenario: g.Scenario,
                          cut: int | None) -> None:
    d = g.derive(family, mode, proto, scenario, cut)
    lookup = flow_lookup(family, mode, proto, d)
    got = translate_error(d.error_in, icmp_offset(d.error_in), lookup)
    assert got == d.error_out


@pytest.mark.parametrize("proto", g.PROTOS)
@pytest.mark.parametrize("mode", g.MODES)
@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_hand_table_is_the_engines(family: int, mode: str, proto: str) -> None:
    eng = make_engine(parse_config({"service": [g.service(family, mode, proto)]}, "test"))
    engine_lookup(eng, g.derive(family, mode, proto, g.SCENARIOS[0]))
    hand = hand_table(family, mode, proto)

    def view(entries: dict[bytes, Any]) -> dict[bytes, Any]:
        # key, new header, L4 delta, direction; not the IP header delta (no such checksum in
        # IPv6, and translate_error computes its own)
        return {k: (v[1], v[3], v[4]) for k, v in entries.items()}

    def engine_view(flows: dict[bytes, Any]) -> dict[bytes, Any]:
        out = {}
        for k, flow in flows.items():
            reply = k != flow.fwd_key
            header, _, l4_delta = flow.side(reply)
            out[k] = (header, l4_delta, reply)
        return out

    for p in (6, 17):
        assert engine_view(eng.table.by_proto[p]) == view(hand[p])


def expected_at(d: g.Derived, family: int, proto: str, scenario: g.Scenario, n: int) -> bytes:
    """The translated error when the quote holds the first ``n`` bytes of the packet.

    When the quote ends inside the TCP/UDP checksum, its one visible byte cannot be updated
    (the other half is unknown) and stays as quoted.
    """
    l4 = g.transport_offset(family, d.quoted)
    co = l4 + (16 if proto == "tcp" else 6)
    quote = d.original[:n]
    if n == co + 1:
        quote = quote[:co] + d.quoted[co:co + 1]
    outer = IP(d.error_out) if family == 4 else IPv6(d.error_out)
    return g.error(family, scenario.kind, outer.src, outer.dst, quote)


@pytest.mark.parametrize("scenario", [g.SCENARIO["frag_needed_from_router"],
                                      g.SCENARIO["port_unreach_from_client"]],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("proto", g.PROTOS)
@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_every_quote_length(family: int, proto: str, scenario: g.Scenario) -> None:
    """Quotes of every length, each a well-formed error built by scapy: below the first 8
    transport bytes a clean PacketError, from there on scapy's translation byte for byte
    (including the quoted checksum: absent, half there, there)."""
    d = g.derive(family, "fullnat", proto, scenario)
    lookup = flow_lookup(family, "fullnat", proto, d)
    l4 = g.transport_offset(family, d.quoted)
    outer = IP(d.error_in) if family == 4 else IPv6(d.error_in)
    for n in range(len(d.quoted) + 1):
        err = g.error(family, scenario.kind, outer.src, outer.dst, d.quoted[:n])
        if n < l4 + 8:
            with pytest.raises(PacketError) as exc:
                translate_error(err, icmp_offset(err), lookup)
            assert exc.value.reason.startswith("icmp_")
        else:
            want = expected_at(d, family, proto, scenario, n)
            assert translate_error(err, icmp_offset(err), lookup) == want, f"quote of {n} bytes"


def test_quoted_tcp_checksum_is_that_of_the_original_full_packet() -> None:
    """Scapy's checksum of the whole original segment, though only 40 bytes of it are quoted."""

    def segment(t: g.Tuple4) -> bytes:  # a data segment: its checksum covers 600 unquoted bytes
        return bytes(IP(src=t[0], dst=t[1], id=9, flags="DF", ttl=63)
                     / TCP(sport=t[2], dport=t[3], flags="PA", seq=1001, ack=5001)
                     / Raw(b"x" * 600))

    q, q0 = segment(g.backend_view(4, "fullnat")), segment(g.client_view(4, "fullnat"))
    assert len(q) == 640
    d = g.derive(4, "fullnat", "tcp", g.SCENARIO["frag_needed_from_router"])
    lookup = flow_lookup(4, "fullnat", "tcp", d)
    router, snat, client = (g.addr(h, 4) for h in ("router_b", "snat", "client"))
    err = g.error(4, "too_big", router, snat, q[:40])
    assert translate_error(err, 20, lookup) == g.error(4, "too_big", router, client, q0[:40])


# ------------------------------------------------------------------ headers and options


def test_outer_ipv4_options() -> None:
    d = g.derive(4, "dnat", "udp", g.SCENARIO["port_unreach_from_backend"],
                 outer_options=[IPOption_RR(routers=["198.18.1.254"])])
    assert icmp_offset(d.error_in) > 20
    lookup = flow_lookup(4, "dnat", "udp", d)
    assert translate_error(d.error_in, icmp_offset(d.error_in), lookup) == d.error_out


@pytest.mark.parametrize("proto", g.PROTOS)
def test_quoted_ipv4_options(proto: str) -> None:
    d = g.derive(4, "fullnat", proto, g.SCENARIO["frag_needed_from_router"],
                 ip_options=[IPOption_Router_Alert()])
    assert IP(d.quoted).ihl == 6
    lookup = flow_lookup(4, "fullnat", proto, d)
    assert translate_error(d.error_in, 20, lookup) == d.error_out


@pytest.mark.parametrize("ext", [[IPv6ExtHdrDestOpt()],
                                 [IPv6ExtHdrFragment(offset=0, m=0, id=5)],
                                 [IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=1, id=5)]],
                         ids=["destopt", "atomic_fragment", "destopt_first_fragment"])
@pytest.mark.parametrize("proto", g.PROTOS)
def test_quoted_ipv6_extension_headers(proto: str, ext: list[Any]) -> None:
    d = g.derive(6, "fullnat", proto, g.SCENARIO["frag_needed_from_router"], v6_ext=ext)
    lookup = table_lookup(hand_table(6, "fullnat", proto))
    assert translate_error(d.error_in, 40, lookup) == d.error_out


@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_quoted_udp_without_checksum_keeps_none(family: int) -> None:
    d = g.derive(family, "fullnat", "udp", g.SCENARIO["port_unreach_from_backend"],
                 zero_udp=True)
    l4 = g.transport_offset(family, d.quoted)
    assert d.quoted[l4 + 6:l4 + 8] == b"\0\0"
    lookup = table_lookup(hand_table(family, "fullnat", "udp"))
    assert translate_error(d.error_in, icmp_offset(d.error_in), lookup) == d.error_out


@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_quoted_udp_checksum_of_zero_is_sent_as_ffff(family: int) -> None:
    """A UDP checksum that computes to 0 is sent as 0xFFFF (0 would mean "none")."""

    def datagram(t: g.Tuple4, filler: int) -> bytes:
        ip: Any = (IP(src=t[0], dst=t[1], id=7, flags="DF", ttl=63) if family == 4
                   else IPv6(src=t[0], dst=t[1], hlim=63))
        return bytes(ip / UDP(sport=t[2], dport=t[3]) / Raw(b"quer" + struct.pack("!H", filler)))

    cv, bv = g.client_view(family, "fullnat"), g.backend_view(family, "fullnat")
    l4 = 20 if family == 4 else 40
    # with a zero filler the checksum is c, so the sum is ~c; the filler word c makes it 0xFFFF
    c = struct.unpack("!H", datagram(cv, 0)[l4 + 6:l4 + 8])[0]
    q0 = datagram(cv, c)
    assert q0[l4 + 6:l4 + 8] == b"\xff\xff"
    q = datagram(bv, c)
    router, snat, client = (g.addr(h, family) for h in ("router_b", "snat", "client"))
    err = g.error(family, "too_big", router, snat, q)
    lookup = table_lookup(hand_table(family, "fullnat", "udp"))
    assert translate_error(err, l4, lookup) == g.error(family, "too_big", router, client, q0)


# ------------------------------------------------------------------ not ours: None


FULLNAT_TCP = {f: g.derive(f, "fullnat", "tcp", g.SCENARIO["port_unreach_from_backend"])
               for f in g.FAMILIES}


def fullnat_lookup(family: int) -> Lookup:
    return table_lookup(hand_table(family, "fullnat", "tcp"))


@pytest.mark.parametrize("family", g.FAMILIES, ids=["v4", "v6"])
def test_unknown_flow(family: int) -> None:
    d = FULLNAT_TCP[family]
    assert translate_error(d.error_in, icmp_offset(d.error_in), lambda p, k: None) is None
    # a flow of another protocol between the same hosts and ports
    other = g.derive(family, "fullnat", "udp", g.SCENARIO["port_unreach_from_backend"])
    assert translate_error(other.error_in, icmp_offset(other.error_in),
                           fullnat_lookup(family)) is None


def test_error_sent_elsewhere_than_the_quoted_source() -> None:
    d = FULLNAT_TCP[4]
    err = IP(d.error_in)
    err.dst = "198.18.50.9"
    del err.chksum, err[ICMP].chksum
    assert translate_error(bytes(err), 20, fullnat_lookup(4)) is None


@pytest.mark.parametrize("msg", [
    ICMP(type=8, id=1, seq=1) / Raw(b"ping"),
    ICMP(type=0, id=1, seq=1) / Raw(b"pong"),
    ICMP(type=5, code=1, gw="198.18.1.254"),
    ICMP(type=4),  # source quench: deprecated, not translated
], ids=["echo_request", "echo_reply", "redirect", "source_quench"])
def test_not_an_error_v4(msg: Any) -> None:
    quote = FULLNAT_TCP[4].quoted  # even with a quote of a known flow behind it
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.1.1") / msg / Raw(quote))
    assert translate_error(pkt, 20, fullnat_lookup(4)) is None


@pytest.mark.parametrize("msg", [ICMPv6EchoRequest(id=1, seq=1), ICMPv6EchoReply(id=1, seq=1),
                                 ICMPv6ND_NS(tgt="2001:db8:1::1")],
                         ids=["echo_request", "echo_reply", "neighbor_solicitation"])
def test_not_an_error_v6(msg: Any) -> None:
    pkt = bytes(IPv6(src="2001:db8:1::2", dst="2001:db8:1::1") / msg
                / Raw(FULLNAT_TCP[6].quoted))
    assert translate_error(pkt, 40, fullnat_lookup(6)) is None


def test_quoted_icmp_is_not_ours() -> None:
    ping = bytes(IP(src="198.18.1.1", dst="198.18.1.2") / ICMP(type=8) / Raw(b"ping"))
    err = bytes(IP(src="198.18.1.2", dst="198.18.1.1") / ICMP(type=3, code=3) / Raw(ping))
    assert translate_error(err, 20, fullnat_lookup(4)) is None


def test_quoted_non_first_fragment_is_not_ours() -> None:
    q = IP(FULLNAT_TCP[4].quoted)
    q.frag = 100
    del q.chksum
    err = bytes(IP(src="198.18.1.254", dst="198.18.1.1") / ICMP(type=11, code=1)
                / Raw(bytes(q)))
    assert translate_error(err, 20, fullnat_lookup(4)) is None
    d6 = g.derive(6, "fullnat", "tcp", g.SCENARIO["time_exceeded_from_router"],
                  v6_ext=[IPv6ExtHdrFragment(offset=3, m=0, id=5)])
    assert translate_error(d6.error_in, 40, fullnat_lookup(6)) is None


def test_fragmented_error_is_not_translated() -> None:
    err = IP(FULLNAT_TCP[4].error_in)
    err.flags = "MF"
    del err.chksum
    assert translate_error(bytes(err), 20, fullnat_lookup(4)) is None


# ------------------------------------------------------------------ malformed: PacketError


def reason(data: bytes, off: int, lookup: Lookup) -> str:
    with pytest.raises(PacketError) as exc:
        translate_error(data, off, lookup)
    return exc.value.reason


def test_malformed_reasons() -> None:
    v4, v6 = FULLNAT_TCP[4].error_in, FULLNAT_TCP[6].error_in
    lk4, lk6 = fullnat_lookup(4), fullnat_lookup(6)
    assert reason(v4, 24, lk4) == "icmp_bad_offset"
    assert reason(v6, 20, lk6) == "icmp_bad_offset"
    assert reason(v4 + b"\0", 20, lk4) == "icmp_bad_length"
    assert reason(v6 + b"\0", 40, lk6) == "icmp_bad_length"
    assert reason(b"\x50" + v4[1:], 20, lk4) == "icmp_bad_version"
    assert reason(b"", 20, lk4) == "icmp_truncated"
    # a v4 error quoting a v6 packet; a quoted header length under 20
    inner6 = bytes(IP(src="198.18.1.2", dst="198.18.1.1") / ICMP(type=3, code=3)
                   / Raw(FULLNAT_TCP[6].quoted))
    assert reason(inner6, 20, lk4) == "icmp_bad_quote"
    bad_ihl = bytearray(v4)
    bad_ihl[28] = 0x44
    assert reason(bytes(bad_ihl), 20, lk4) == "icmp_bad_quote"
    inner4 = bytes(IPv6(src="2001:db8:1::2", dst="2001:db8:1::1") / ICMPv6DestUnreach(code=4)
                   / Raw(FULLNAT_TCP[4].quoted + b"\0" * 40))
    assert reason(inner4, 40, lk6) == "icmp_bad_quote"


def test_endless_ipv6_extension_chain_is_refused() -> None:
    d = g.derive(6, "fullnat", "udp", g.SCENARIO["frag_needed_from_router"],
                 v6_ext=[IPv6ExtHdrDestOpt() for _ in range(9)])
    assert reason(d.error_in, 40, table_lookup(hand_table(6, "fullnat", "udp"))) == \
        "icmp_bad_quote"


def errors_to_cut() -> list[tuple[str, bytes]]:
    cases = []
    for family in g.FAMILIES:
        for proto in g.PROTOS:
            d = g.derive(family, "fullnat", proto, g.SCENARIO["frag_needed_about_reply"])
            cases.append((f"v{family}_{proto}", d.error_in))
    d = g.derive(4, "dnat", "tcp", g.SCENARIO["time_exceeded_from_router"],
                 ip_options=[IPOption_Router_Alert()],
                 outer_options=[IPOption_RR(routers=["198.18.1.254"])])
    cases.append(("v4_options", d.error_in))
    d = g.derive(6, "dnat", "udp", g.SCENARIO["port_unreach_from_backend"],
                 v6_ext=[IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=1, id=5)])
    cases.append(("v6_extension_headers", d.error_in))
    return cases


@pytest.mark.parametrize("data", [c[1] for c in errors_to_cut()],
                         ids=[c[0] for c in errors_to_cut()])
def test_truncated_at_every_offset(data: bytes) -> None:
    """A packet cut anywhere no longer matches its own length fields: a clean PacketError."""
    lookup: Lookup = lambda p, k: bytes(len(k))  # noqa: E731
    off = icmp_offset(data)
    assert isinstance(translate_error(data, off, lookup), bytes)
    for i in range(len(data)):
        with pytest.raises(PacketError) as exc:
            translate_error(data[:i], off, lookup)
        assert exc.value.reason.startswith("icmp_")


@pytest.mark.parametrize("data", [c[1] for c in errors_to_cut()],
                         ids=[c[0] for c in errors_to_cut()])
def test_truncated_at_every_offset_with_matching_lengths(data: bytes) -> None:
    """Cut anywhere, the outer length field made to agree: parsing reaches the cut wherever it
    is; a clean PacketError or None, or (once 8 transport bytes are quoted) a translation."""
    lookup: Lookup = lambda p, k: bytes(len(k))  # noqa: E731
    off = icmp_offset(data)
    outcomes = set()
    for i in range(len(data) + 1):
        cut = bytearray(data[:i])
        fix_lengths(cut)
        try:
            out = translate_error(bytes(cut), off, lookup)
        except PacketError as exc:
            assert exc.reason.startswith("icmp_")
            outcomes.add(exc.reason)
            continue
        assert i >= off + 8 + 28, f"cut at {i}: translated a quote too short to hold ports"
        assert out is not None and icmp_checksum_ok(out, off)
        outcomes.add("translated")
    assert {"icmp_truncated", "icmp_truncated_quote", "translated"} <= outcomes


# ------------------------------------------------------------------ never another exception


BASES = [c[1] for c in errors_to_cut()]


@st.composite
def mutated_errors(draw: st.DrawFn) -> bytes:
    """A well-formed error, cut anywhere, a few bytes overwritten, lengths maybe made to agree."""
    base = draw(st.sampled_from(BASES))
    data = bytearray(base[:draw(st.integers(0, len(base)))])
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        fix_lengths(data)
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=mutated_errors(), hdr=st.binary(min_size=36, max_size=36), found=st.booleans(),
       off=st.sampled_from([None, None, None, 0, 19, 20, 24, 40, 48]))
def test_mutated_errors_never_raise_anything_else(pkt: bytes, hdr: bytes, found: bool,
                                                  off: int | None) -> None:
    at = icmp_offset(pkt) if off is None and pkt else (off or 0)
    lookup: Lookup = lambda p, k: hdr[:len(k)] if found else None  # noqa: E731
    try:
        out = translate_error(pkt, at, lookup)
    except PacketError as exc:
        assert exc.reason.startswith("icmp_")
        return
    if out is not None:
        assert len(out) == len(pkt)
        assert icmp_checksum_ok(out, at)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), off=st.integers(0, 130), v6=st.booleans())
def test_random_bytes_never_raise_anything_else(data: bytes, off: int, v6: bool) -> None:
    buf = bytearray((b"\x60" if v6 else b"\x45") + data)
    fix_lengths(buf)
    for pkt in (data, bytes(buf)):
        try:
            translate_error(pkt, off, lambda p, k: bytes(len(k)))
        except PacketError as exc:
            assert exc.reason.startswith("icmp_")


# ------------------------------------------------------------------ echo


def test_is_echo_request() -> None:
    v4 = bytes(IP(src="198.18.0.2", dst="198.18.100.1") / ICMP(type=8) / Raw(b"ping"))
    v4_reply = bytes(IP(src="198.18.100.1", dst="198.18.0.2") / ICMP(type=0) / Raw(b"pong"))
    v6 = bytes(IPv6(src="2001:db8::2", dst="2001:db8:100::1") / ICMPv6EchoRequest())
    v6_reply = bytes(IPv6(src="2001:db8:100::1", dst="2001:db8::2") / ICMPv6EchoReply())
    assert is_echo_request(v4, 20) and is_echo_request(v6, 40)
    assert not is_echo_request(v4_reply, 20) and not is_echo_request(v6_reply, 40)
    assert not is_echo_request(FULLNAT_TCP[4].error_in, 20)
    assert not is_echo_request(FULLNAT_TCP[6].error_in, 40)
    udp_8 = bytes(IP(src="198.18.0.2", dst="198.18.100.1") / UDP(sport=8, dport=9))
    assert not is_echo_request(udp_8, 20)  # an 8 at the offset, but not ICMP
    assert not is_echo_request(v4[:20], 20) and not is_echo_request(b"", 0)


# ------------------------------------------------------------------ golden captures


def frames(path: Path) -> list[bytes]:
    with path.open("rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == 101
        return [bytes(buf) for _, buf in reader]


@pytest.mark.parametrize("case", g.CASES, ids=lambda c: c.name)
def test_committed_golden_is_what_scapy_derives(case: g.Case) -> None:
    cfg, inp_path, exp_path = g.paths(case)
    inp, exp = g.packets(case)
    assert cfg.read_text() == g.config_text(case)
    assert frames(inp_path) == inp
    assert frames(exp_path) == exp


@pytest.mark.parametrize("case", g.CASES, ids=lambda c: c.name)
def test_golden_replay(case: g.Case) -> None:
    """The flow's packets through the engine, the error through ``translate_error``."""
    cfg, inp_path, exp_path = g.paths(case)
    inp, exp = frames(inp_path), frames(exp_path)
    eng = make_engine(load_config(cfg))
    if eng is None:  # the engine does not carry this family yet
        lookup = table_lookup(hand_table(case.family, case.mode, case.proto))
    else:
        for i, (a, b) in enumerate(zip(inp[:-1], exp[:-1], strict=True)):
            assert eng.handle(a, now=1.0 + i) == b, f"packet {i} differs"
        lookup = eng.table.header
    err = inp[-1]
    assert translate_error(err, icmp_offset(err), lookup) == exp[-1]


@pytest.mark.parametrize("case", g.CASES, ids=lambda c: c.name)
def test_golden_through_replay(case: g.Case) -> None:
    """The whole capture through ``nfqlb replay``: the engine hands ICMP errors here."""
    cfg, inp_path, exp_path = g.paths(case)
    out = io.BytesIO()
    with inp_path.open("rb") as src:
        replay(load_config(cfg), src, out)
    out.seek(0)
    got = [bytes(buf) for _, buf in dpkt.pcap.Reader(out)]
    inp, want = frames(inp_path), frames(exp_path)
    assert got[-1] != inp[-1]
    assert got == want
