"""IPv4/TCP/UDP offsets: round trips against scapy, every cut point, every malformation.

``parse_ipv4`` below is ``parse_ip`` seen as the IPv4-only, unfragmented parser these tables
were written for (it was a function of nfqlb's until nothing but these tests used it).
"""

from __future__ import annotations

import struct

import pytest
from helpers import CLIENT, VIP, tcp, udp
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert, IPOption_RR

from nfqlb.errors import PacketError
from nfqlb.wire.ip import ICMP, parse_ip
from nfqlb.wire.tcp import tcp_mss_offset


def parse_ipv4(data: bytes) -> tuple[int, int] | None:
    """``(transport offset, protocol)`` of a whole IPv4 TCP/UDP packet; None for others."""
    if data and data[0] >> 4 == 6:
        raise PacketError("ipv6_unsupported")
    parsed = parse_ip(data)
    if parsed is None or parsed.proto == ICMP:
        return None
    if parsed.frag_key is not None:
        raise PacketError("fragment")
    return parsed.off, parsed.proto


RR = IPOption_RR(routers=["198.18.0.1", "198.18.0.3"])  # 12 bytes: ihl 8
RA = IPOption_Router_Alert()  # 4 bytes: ihl 6

ROUND_TRIPS = [
    ("tcp syn", tcp(CLIENT, VIP, 1234, 80, "S", options=[("MSS", 1460)])),
    ("tcp data", tcp(CLIENT, VIP, 1234, 80, "PA", b"hello")),
    ("tcp odd payload", tcp(CLIENT, VIP, 1234, 80, "PA", b"abc")),
    ("tcp many options", tcp(CLIENT, VIP, 1, 2, "S", options=[
        ("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("WScale", 7)])),
    ("tcp ip options", tcp(CLIENT, VIP, 1234, 80, "A", b"x", ip_options=[RR])),
    ("udp", udp(CLIENT, VIP, 5000, 53, b"query")),
    ("udp empty", udp(CLIENT, VIP, 5000, 53, b"")),
    ("udp ip options", udp(CLIENT, VIP, 5000, 53, b"q", ip_options=[RA])),
]


@pytest.mark.parametrize("name, data", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_offsets_match_scapy(name: str, data: bytes) -> None:
    pkt = IP(data)
    off, proto = parse_ipv4(data)  # type: ignore[misc]
    assert off == pkt.ihl * 4 == len(data) - len(bytes(pkt.payload))
    assert proto == pkt.proto
    l4 = pkt.payload
    # the transport header at ``off`` is the one scapy sees, and rebuilds byte for byte
    assert struct.unpack_from("!HH", data, off) == (l4.sport, l4.dport)
    assert bytes(IP(data[:off] + data[off:])) == data


def _cut_all(data: bytes) -> list[bytes]:
    return [data[:k] for k in range(len(data))]


@pytest.mark.parametrize("name, data", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_every_cut_is_a_clean_packet_error(name: str, data: bytes) -> None:
    for cut in _cut_all(data):
        with pytest.raises(PacketError) as info:
            parse_ipv4(cut)
        assert info.value.reason == "truncated", len(cut)


def _with_total_length(data: bytes) -> bytes:
    """``data`` (a cut packet) with the IP total length claiming exactly its length."""
    if len(data) < 4:
        return data
    return data[:2] + struct.pack("!H", len(data)) + data[4:]


@pytest.mark.parametrize("name, data", ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_every_consistent_cut_is_a_clean_packet_error(name: str, data: bytes) -> None:
    """Cut, then fix the total length, so the transport checks are what must catch it."""
    hl = (data[0] & 0x0F) * 4
    proto = data[9]
    l4_min = 20 if proto == 6 else 8
    doff = (data[hl + 12] >> 4) * 4 if proto == 6 else 8
    for k in range(len(data)):
        cut = _with_total_length(data[:k])
        if proto == 6 and k >= hl + doff:
            assert parse_ipv4(cut) == (hl, 6)  # only payload was cut: still a valid segment
            continue
        with pytest.raises(PacketError) as info:
            parse_ipv4(cut)
        if k < hl or k < hl + l4_min:
            assert info.value.reason == "truncated", k
        elif proto == 6:
            assert info.value.reason == "bad_tcp_header", k
        else:
            assert info.value.reason == "bad_udp_length", k


BAD = [
    ("ihl 4", lambda b: bytes([0x44]) + b[1:], "bad_header_length"),
    ("ihl 0", lambda b: bytes([0x40]) + b[1:], "bad_header_length"),
    ("ihl beyond the packet", lambda b: bytes([0x4F]) + b[1:24], "truncated"),
    ("version 6", lambda b: bytes([0x65]) + b[1:], "ipv6_unsupported"),
    ("version 5", lambda b: bytes([0x55]) + b[1:], "bad_version"),
    ("total length short", lambda b: b[:2] + struct.pack("!H", len(b) - 1) + b[4:],
     "bad_total_length"),
    ("total length below header", lambda b: b[:2] + struct.pack("!H", 12) + b[4:],
     "bad_total_length"),
    ("total length long", lambda b: b[:2] + struct.pack("!H", len(b) + 1) + b[4:], "truncated"),
    ("trailing bytes", lambda b: b + b"\0\0", "bad_total_length"),
    ("more fragments", lambda b: b[:6] + b"\x20\x00" + b[8:], "fragment"),
    ("fragment offset", lambda b: b[:6] + b"\x00\x01" + b[8:], "fragment"),
    ("fragment offset high bits", lambda b: b[:6] + b"\x1f\x00" + b[8:], "fragment"),
]


@pytest.mark.parametrize("name, mutate, reason", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("base", [
    tcp(CLIENT, VIP, 1234, 80, "PA", b"payload!"),
    udp(CLIENT, VIP, 5000, 53, b"payload!"),
], ids=["tcp", "udp"])
def test_malformed_header(name: str, mutate, reason: str, base: bytes) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PacketError) as info:
        parse_ipv4(mutate(base))
    assert info.value.reason == reason


def test_df_flag_is_not_a_fragment() -> None:
    data = tcp(CLIENT, VIP, 1234, 80)
    assert data[6] & 0x40
    assert parse_ipv4(data) == (20, 6)


@pytest.mark.parametrize("udp_len", [0, 7, 8, 12, 14, 1000])
def test_bad_udp_length(udp_len: int) -> None:
    data = udp(CLIENT, VIP, 5000, 53, b"12345")  # UDP length 13
    bad = data[:24] + struct.pack("!H", udp_len) + data[26:]
    with pytest.raises(PacketError) as info:
        parse_ipv4(bad)
    assert info.value.reason == "bad_udp_length"


@pytest.mark.parametrize("doff", [0, 1, 4, 6, 15])
def test_bad_tcp_data_offset(doff: int) -> None:
    data = tcp(CLIENT, VIP, 1234, 80, "A", b"")  # 40 bytes: any doff above 5 overruns
    bad = data[:32] + bytes([doff << 4 | (data[32] & 0x0F)]) + data[33:]
    with pytest.raises(PacketError) as info:
        parse_ipv4(bad)
    assert info.value.reason == "bad_tcp_header"


@pytest.mark.parametrize("proto", [1, 47, 50, 132, 0, 255])
def test_other_protocols_are_none(proto: int) -> None:
    data = bytes(IP(src=CLIENT, dst=VIP, proto=proto) / b"whatever-payload")
    assert parse_ipv4(data) is None


def test_other_protocol_fragment_is_none() -> None:
    """Non-TCP/UDP packets are not ours: not even their fragmentation is examined."""
    data = bytes(IP(src=CLIENT, dst=VIP, proto=1, flags="MF") / b"icmp-ish")
    assert parse_ipv4(data) is None


def test_other_protocol_still_needs_a_sane_header() -> None:
    data = bytes(IP(src=CLIENT, dst=VIP, proto=1) / b"icmp-ish")
    with pytest.raises(PacketError):
        parse_ipv4(data[:-1])


# ---------------------------------------------------------------- MSS option

def _mss_at(data: bytes) -> int:
    off, _ = parse_ipv4(data)  # type: ignore[misc]
    return tcp_mss_offset(data, off)


@pytest.mark.parametrize("options, mss_index", [
    ([("MSS", 1460)], 2),
    ([("NOP", None), ("MSS", 1460)], 3),  # odd alignment
    ([("NOP", None), ("NOP", None), ("MSS", 1460)], 4),
    ([("NOP", None), ("NOP", None), ("NOP", None), ("MSS", 1460)], 5),  # odd again
    ([("WScale", 7), ("MSS", 1460)], 5),
    ([("SAckOK", b""), ("Timestamp", (1, 2)), ("MSS", 1460)], 14),
    ([("Timestamp", (1, 2)), ("NOP", None), ("MSS", 1460)], 13),
])
@pytest.mark.parametrize("ip_options", [[], [RA], [RR]], ids=["ihl5", "ihl6", "ihl8"])
def test_mss_offset(options, mss_index: int, ip_options) -> None:  # type: ignore[no-untyped-def]
    data = tcp(CLIENT, VIP, 1234, 80, "S", options=options, ip_options=ip_options)
    off = (data[0] & 0x0F) * 4
    pos = _mss_at(data)
    assert pos == off + 20 + mss_index
    assert struct.unpack_from("!H", data, pos)[0] == IP(data)[TCP].options[
        [o[0] for o in IP(data)[TCP].options].index("MSS")][1]


@pytest.mark.parametrize("options", [
    [],
    [("NOP", None)],
    [("WScale", 7), ("SAckOK", b"")],
    [("Timestamp", (5, 6))],
])
def test_no_mss(options) -> None:  # type: ignore[no-untyped-def]
    assert _mss_at(tcp(CLIENT, VIP, 1234, 80, "S", options=options)) == -1


def _rebuild_with_options(opts: bytes) -> bytes:
    """A SYN with exactly these option bytes (checksums left zero: parse does not read them)."""
    hdr = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, (5 + len(opts) // 4) << 4, 0x02, 8192, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(hdr) + len(opts), 1, 0, 64, 6, 0,
                     bytes([198, 18, 0, 2]), bytes([198, 18, 100, 1]))
    return ip + hdr + opts


@pytest.mark.parametrize("opts, expected", [
    (b"\x02\x04\x05\xb4", 2),
    (b"\x00\x02\x04\x05\xb4", -1),  # after End of options: not an option any more
    (b"\x00\x02\x02\x04\x05\xb4", -1),  # ditto, even where the bytes would parse as TLVs
    (b"\x02\x03\x05\xb4", -1),  # wrong length for MSS
    (b"\x08\x01\x02\x04\x05\xb4", -1),  # option length 1 is malformed: stop
    (b"\x08\x00\x02\x04\x05\xb4", -1),  # option length 0 would loop forever: stop
    (b"\x03\x0c\x02\x04\x05\xb4", -1),  # option runs past the header: stop
    (b"\x01\x01\x01\x01\x01\x01\x01", -1),  # only NOPs
    (b"\x01\x01\x01\x02\x04\x05\xb4", 5),  # odd alignment
    (b"\x01\x01\x01\x01\x01\x01\x01\x02", -1),  # kind with no room for its length
])
def test_mss_offset_raw(opts: bytes, expected: int) -> None:
    data = _rebuild_with_options(opts + b"\0" * (-len(opts) % 4))
    assert parse_ipv4(data) == (20, 6)
    assert tcp_mss_offset(data, 20) == (40 + expected if expected >= 0 else -1)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.one_of(
    st.binary(max_size=80),
    st.tuples(st.sampled_from([r[1] for r in ROUND_TRIPS]), st.integers(0, 79),
              st.integers(0, 255)).map(lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
))
def test_parse_never_raises_anything_but_packet_error(data: bytes) -> None:
    try:
        parsed = parse_ipv4(data)
    except PacketError:
        return
    if parsed is not None:
        off, proto = parsed
        assert proto in (6, 17) and 20 <= off <= len(data)
        if proto == 6:
            tcp_mss_offset(data, off)  # must not raise on anything parse_ipv4 accepted
