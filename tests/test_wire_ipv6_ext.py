"""The IPv6 extension-header walk (``nfqlb.wire.ip.walk_v6``), shared by ``parse_ip`` and the
ICMPv6 error translation (``nfqlb.icmp``), driven by packets scapy builds.

Expected offsets come from scapy's own layer lengths, expected translations from packets
scapy builds anew around the addresses and ports as the client sent them (checksums by
scapy): nothing expected comes from nfqlb. The walk is one, but each caller raises under its
own counter names (``truncated`` ... for ``parse_ip``, ``icmp_*`` for a quoted packet).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from nfqlb.errors import PacketError
from nfqlb.icmp import translate_error
from nfqlb.wire.ip import PACKET_REASONS, parse_ip, walk_v6

CLIENT, VIP = "2001:db8:1::1", "2001:db8:1::100"
SNAT, BACKEND, ROUTER = "2001:db8:2::1", "2001:db8:2::10", "2001:db8:2::fe"
PROTO = {"tcp": 6, "udp": 17}


def transport(proto: str, sport: int, dport: int) -> Packet:
    if proto == "tcp":
        return TCP(sport=sport, dport=dport, flags="S", seq=1000)
    return UDP(sport=sport, dport=dport) / Raw(b"datagram")


def ah(nh: int, icv: int = 12) -> Packet:
    """An AH header (RFC 4302) with its fields set by hand: scapy leaves nh and length unset."""
    return AH(nh=nh, payloadlen=(12 + icv) // 4 - 2, spi=7, seq=1, icv=b"\x11" * icv)


def with_ah(src: str, dst: str, proto: str, sport: int, dport: int) -> bytes:
    """``src:sport -> dst:dport`` with an AH header before the transport header.

    scapy does not look through AH for the TCP/UDP pseudo-header, so the transport header is
    built (and checksummed) by scapy without AH, then AH is put in front of it."""
    l4 = bytes(IPv6(src=src, dst=dst) / transport(proto, sport, dport))[40:]
    return bytes(IPv6(src=src, dst=dst, nh=51) / ah(PROTO[proto]) / Raw(l4))


def l4_checksum_ok(packet: bytes, l4: int, proto: str) -> bool:
    seg = packet[l4:]
    pseudo = packet[8:40] + struct.pack("!I", len(seg)) + bytes((0, 0, 0, PROTO[proto]))
    return checksum(pseudo + seg) == 0


# ------------------------------------------------------------------ ICMPv6 errors quoting AH


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_icmpv6_error_quoting_ah_is_translated(proto: str) -> None:
    """fullnat: C:c -> VIP:80 left nfqlb as S:p -> B:8080, with AH. A router's "packet too big"
    R -> S quoting it becomes R -> C quoting C:c -> VIP:80 (AH kept as it was)."""
    quoted = with_ah(SNAT, BACKEND, proto, 20000, 8080)
    original = with_ah(CLIENT, VIP, proto, 40000, 80)
    assert l4_checksum_ok(quoted, 64, proto) and l4_checksum_ok(original, 64, proto)
    error_in = bytes(IPv6(src=ROUTER, dst=SNAT) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    expected = bytes(IPv6(src=ROUTER, dst=CLIENT) / ICMPv6PacketTooBig(mtu=1280)
                     / Raw(original))
    asked: list[tuple[int, bytes]] = []

    def lookup(p: int, key: bytes) -> Any:
        """The flow's reply header: swap(client's packet)."""
        asked.append((p, key))
        vip, client = original[24:40], original[8:24]
        return vip + client + struct.pack("!HH", 80, 40000)

    out = translate_error(error_in, 40, lookup)
    reply_key = quoted[24:40] + quoted[8:24] + struct.pack("!HH", 8080, 20000)
    assert asked == [(PROTO[proto], reply_key)]
    assert out == expected


def test_icmpv6_error_quoting_ah_then_destination_options() -> None:
    """AH followed by another extension header: the walk goes on through both."""
    l4 = bytes(IPv6(src=SNAT, dst=BACKEND) / transport("udp", 20000, 8080))[40:]
    quoted = bytes(IPv6(src=SNAT, dst=BACKEND, nh=51) / ah(60) / IPv6ExtHdrDestOpt(nh=17)
                   / Raw(l4))
    l4 = bytes(IPv6(src=CLIENT, dst=VIP) / transport("udp", 40000, 80))[40:]
    original = bytes(IPv6(src=CLIENT, dst=VIP, nh=51) / ah(60) / IPv6ExtHdrDestOpt(nh=17)
                     / Raw(l4))
    error_in = bytes(IPv6(src=BACKEND, dst=SNAT) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    expected = bytes(IPv6(src=VIP, dst=CLIENT) / ICMPv6PacketTooBig(mtu=1280) / Raw(original))
    header = original[24:40] + original[8:24] + struct.pack("!HH", 80, 40000)
    # from the backend itself: the outer source becomes the VIP
    assert translate_error(error_in, 40, lambda p, k: header) == expected


# ------------------------------------------------------------------ the walk, header by header


def chain(*ext: Packet, proto: str = "tcp", start: int = 0) -> tuple[bytes, int, int]:
    """A packet with the extension headers ``ext``; (bytes, transport offset, offset of the
    fragment header or -1), both offsets from scapy's layer lengths."""
    pkt: Packet = IPv6(src=CLIENT, dst=VIP)
    for e in ext:
        pkt = pkt / e
    pkt = pkt / transport(proto, 40000, 80)
    data = bytes(pkt)
    off, frag = 40, -1
    layer = pkt.payload
    for _ in ext:
        if isinstance(layer, IPv6ExtHdrFragment) and (layer.offset or layer.m):
            frag = off
        off += len(bytes(layer)) - len(bytes(layer.payload))
        layer = layer.payload
    return b"\0" * start + data, start + off, start + frag if frag >= 0 else -1


CHAINS = {
    "none": (),
    "hop_by_hop": (IPv6ExtHdrHopByHop(),),
    "destination_options": (IPv6ExtHdrDestOpt(),),
    "routing_done": (IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0),),
    "atomic_fragment": (IPv6ExtHdrFragment(offset=0, m=0, id=5),),
    "first_fragment": (IPv6ExtHdrFragment(offset=0, m=1, id=5),),
    "later_fragment": (IPv6ExtHdrFragment(offset=3, m=0, id=5),),
    "ah": (ah(6),),
    "ah_long_icv": (ah(6, icv=20),),
    "hop_dest_fragment": (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                          IPv6ExtHdrFragment(offset=0, m=1, id=5)),
    "seven": tuple(IPv6ExtHdrDestOpt() for _ in range(7)),
}


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("start", [0, 48])
def test_walk_finds_the_transport_header(name: str, start: int) -> None:
    data, off, frag = chain(*CHAINS[name], start=start)
    assert walk_v6(data, start, PACKET_REASONS) == (6, off, frag)


@pytest.mark.parametrize("name", [n for n in CHAINS if n != "later_fragment"])
def test_parse_ip_agrees_with_the_walk(name: str) -> None:
    data, off, frag = chain(*CHAINS[name])
    p = parse_ip(data)
    assert p is not None and (p.proto, p.off, p.first) == (6, off, True)
    assert (p.frag_key is not None) == (frag >= 0)


def test_later_fragment() -> None:
    data, off, frag = chain(*CHAINS["later_fragment"])
    p = parse_ip(data)
    assert p is not None and (p.proto, p.off, p.first) == (6, off, False)
    assert p.frag_key == data[8:40] + bytes((6,)) + struct.pack("!I", 5)


# ------------------------------------------------------------------ each caller's reasons


def parse_reason(data: bytes) -> str:
    with pytest.raises(PacketError) as exc:
        parse_ip(data)
    return exc.value.reason


def quote_reason(quoted: bytes) -> str:
    error_in = bytes(IPv6(src=ROUTER, dst=SNAT) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    with pytest.raises(PacketError) as exc:
        translate_error(error_in, 40, lambda p, k: None)
    return exc.value.reason


def test_routing_header_with_segments_left() -> None:
    """Refused in a packet (its pseudo-header would change on the way), walked in a quote."""
    data, off, _ = chain(IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=1))
    assert parse_reason(data) == "ipv6_routing_header"
    assert walk_v6(data, 0, PACKET_REASONS._replace(routing=None)) == (6, off, -1)


def test_too_many_headers() -> None:
    data, _, _ = chain(*(IPv6ExtHdrDestOpt() for _ in range(8)))
    assert parse_reason(data) == "ipv6_too_many_headers"
    assert quote_reason(data) == "icmp_bad_quote"


@pytest.mark.parametrize("name", ["hop_by_hop", "ah", "hop_dest_fragment"])
def test_cut_inside_the_chain(name: str) -> None:
    data, off, _ = chain(*CHAINS[name])
    for cut in range(41, off):
        short = bytearray(data[:cut])
        short[4:6] = struct.pack("!H", cut - 40)  # the length agrees: the walk meets the cut
        assert parse_reason(bytes(short)) == "truncated"
        assert quote_reason(bytes(short)) == "icmp_truncated_quote"
