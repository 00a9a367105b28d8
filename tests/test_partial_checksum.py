"""Packets the kernel queues with their checksum partial (NFQA_SKB_CSUMNOTREADY), and GSO.

A ``CHECKSUM_PARTIAL`` packet's TCP/UDP checksum field holds the pseudo-header sum (not
complemented); whoever completes it sums the segment from the transport header on, field
included, and stores the complement. The tests build such packets the way the kernel's stack
does (``partial_field`` below, from the definition, not from nfqlb's code), run them through
the engine and the netlink adapter's verdict path, and check what comes out against scapy's
own checksum of the rewritten packet:

- left partial (a TCP GSO packet to another host, segmented on the way out): completing the
  field as the kernel does gives scapy's checksum, so the field is the new addresses'
  pseudo-header sum (a port rewrite leaves it as it was, an address rewrite moves it);
- computed in full (everything else: nothing completes a rewritten packet's checksum, since
  nfqnl_mangle marks it CHECKSUM_NONE): the field is scapy's checksum.

Plus ``sum_words`` (the fast sum those use) against the plain one, and the adapter's parse of
NFQA_SKB_INFO and its counters.
"""

from __future__ import annotations

import logging
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from helpers import B1, B2, CLIENT, SNAT, VIP, engine, service
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import checksum as scapy_checksum

from nfqlb import native
from nfqlb.io import netlink
from nfqlb.io.netlink import NetlinkQueueAdapter
from nfqlb.wire import checksum
from nfqlb.wire.checksum import sum16, sum_words, sum_words_int, sum_words_vector
from nfqlb.wire.rewrite import complete_checksum, partial_checksum

FAST = settings(max_examples=300, deadline=None, derandomize=True)
PARTIAL = netlink.NFQA_SKB_CSUMNOTREADY
GSO = netlink.NFQA_SKB_GSO
CLIENT6, VIP6, B1_6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::2"


# -- the definitions, written out here (nothing from nfqlb) -------------------------------------

def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def word_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def l4_offset(data: bytes) -> tuple[int, int]:
    """(transport offset, checksum field offset) of a plain IPv4/IPv6 TCP/UDP packet."""
    if data[0] >> 4 == 4:
        off, proto = (data[0] & 0x0F) * 4, data[9]
    else:
        off, proto = 40, data[6]
    return off, off + (16 if proto == 6 else 6)


def pseudo_sum(data: bytes) -> int:
    """The pseudo-header's sum: addresses, protocol, transport length (RFC 793, RFC 8200)."""
    off, _ = l4_offset(data)
    if data[0] >> 4 == 4:
        addresses, proto = data[12:20], data[9]
    else:
        addresses, proto = data[8:40], data[6]
    return fold(word_sum(addresses) + proto + len(data) - off)


def partial_field(data: bytes) -> bytes:
    """``data`` as the sender's stack leaves it for checksum offload: the field holds the
    pseudo-header sum, not complemented (``~tcp_v4_check(len, saddr, daddr, 0)``)."""
    _, co = l4_offset(data)
    return data[:co] + struct.pack("!H", pseudo_sum(data)) + data[co + 2:]


def kernel_completes(data: bytes) -> int:
    """What the NIC or ``skb_checksum_help`` stores: the complement of the sum from the
    transport header on, the field (holding the pseudo-header sum) included."""
    off, _ = l4_offset(data)
    return ~word_sum(data[off:]) & 0xFFFF


def field(data: bytes) -> int:
    _, co = l4_offset(data)
    return int.from_bytes(data[co:co + 2], "big")


def scapy_l4_checksum(data: bytes) -> int:
    """scapy's own checksum of ``data`` as it stands (field deleted and recomputed)."""
    pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    layer = TCP if TCP in pkt else UDP
    del pkt[layer].chksum
    return int(type(pkt)(bytes(pkt))[layer].chksum)


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def tcp4(src: str, dst: str, sport: int, dport: int, n: int, flags: str = "A") -> bytes:
    return bytes(IP(src=src, dst=dst, flags="DF") / TCP(sport=sport, dport=dport, flags=flags,
                                                        seq=1, ack=1) / payload(n))


def tcp6(src: str, dst: str, sport: int, dport: int, n: int, flags: str = "A") -> bytes:
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1,
                                              ack=1) / payload(n))


# -- sum_words -----------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=3000))
def test_sum_words_is_the_plain_sum(data: bytes) -> None:
    assert sum_words(data) == sum16(data) == word_sum(data)


EDGES = [b"", b"\0" * 9, b"\xff\xff", b"\xff\xff" * 4000, b"\xff\xfe\x00\x01",
         bytes(range(256)) * 256, b"\0" * 4096, b"\xff" * 65531, b"\xff\xff" * 2047 + b"\0\x01",
         b"\xfe" + b"\xff" * 4094 + b"\x01"]


@pytest.mark.parametrize("data", EDGES)
def test_sum_words_edges(data: bytes) -> None:
    assert sum_words(data) == sum_words_int(data) == word_sum(data)


@pytest.mark.parametrize("data", EDGES)
def test_sum_words_vector_edges(data: bytes) -> None:
    # numpy's sum (little-endian 32-bit words, swapped back) and the 0-3 bytes after them
    assert sum_words_vector(data) == word_sum(data)


@FAST
@given(st.binary(max_size=9000), st.integers(0, 7))
def test_sum_words_vector_is_the_plain_sum(data: bytes, start: int) -> None:
    # also from an offset into a buffer, as the adapter sums a segment (a memoryview that
    # starts at the transport header, at any alignment)
    view = memoryview(bytes(start) + data)[start:]
    assert sum_words_vector(view) == word_sum(data)


def test_sum_words_of_a_gso_packet_is_the_vector_sum_when_numpy_is_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 255 + b"\x07"  # 65281 bytes: an odd tail after the words
    calls: list[int] = []

    def counted(d: bytes | memoryview) -> int:
        calls.append(len(d))
        return sum_words_vector(d)

    monkeypatch.setattr(checksum, "sum_words_vector", counted)
    assert sum_words(data) == word_sum(data)
    assert sum_words(data[:checksum.VECTOR_FROM - 1]) == word_sum(data[:checksum.VECTOR_FROM - 1])
    # (compiled, the module calls its own function directly: the patch does not see it)
    assert calls == ([] if native.NATIVE else [len(data)])  # the long one only
    monkeypatch.setattr(checksum, "numpy", None)  # without numpy: the big-integer sum
    assert sum_words(data) == word_sum(data)
    assert calls == ([] if native.NATIVE else [len(data)])


# -- the two rewrites of the field -----------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 1460, 64_000])
@pytest.mark.parametrize("build", [tcp4, tcp6])
def test_complete_checksum_is_scapys_whatever_the_field_held(n: int, build) -> None:  # type: ignore[no-untyped-def]
    v6 = build is tcp6
    data = partial_field(build(CLIENT6 if v6 else CLIENT, VIP6 if v6 else VIP, 40000, 80, n))
    assert field(complete_checksum(data)) == scapy_l4_checksum(data)
    _, co = l4_offset(data)
    garbage = data[:co] + b"\x12\x34" + data[co + 2:]
    assert complete_checksum(garbage) == complete_checksum(data)


@pytest.mark.parametrize("v6", [False, True])
def test_complete_checksum_of_udp_never_sends_zero(v6: bool) -> None:
    ip = IPv6(src=CLIENT6, dst=VIP6) if v6 else IP(src=CLIENT, dst=VIP)
    data = partial_field(bytes(ip / UDP(sport=1, dport=2) / payload(300)))
    out = complete_checksum(data)
    assert field(out) == scapy_l4_checksum(data) and field(out) != 0
    # a datagram whose checksum comes out as 0 is sent as 0xFFFF (RFC 768): its last word
    # chosen so that the segment, field (pseudo-header sum) included, sums to 0xFFFF
    probe = partial_field(bytes(ip / UDP(sport=1, dport=2) / (payload(298) + b"\0\0")))
    off, _ = l4_offset(probe)
    probe = probe[:-2] + struct.pack("!H", 0xFFFF - word_sum(probe[off:]))
    assert kernel_completes(probe) == 0 and scapy_l4_checksum(probe) == 0xFFFF
    assert field(complete_checksum(partial_field(probe))) == 0xFFFF


@pytest.mark.parametrize("build", [tcp4, tcp6])
def test_partial_checksum_completes_to_scapys(build) -> None:  # type: ignore[no-untyped-def]
    v6 = build is tcp6
    data = build(CLIENT6 if v6 else CLIENT, VIP6 if v6 else VIP, 40000, 80, 30_000)
    out = partial_checksum(data)  # from a full checksum too: only the addresses matter
    assert out == partial_field(data)
    assert kernel_completes(out) == scapy_l4_checksum(data)


def test_partial_checksum_ignores_ports_and_follows_addresses() -> None:
    data = partial_field(tcp4(CLIENT, VIP, 40000, 80, 5000))
    ports = tcp4(CLIENT, VIP, 41000, 8080, 5000)  # same addresses, other ports
    assert field(partial_checksum(ports)) == field(data)
    moved = tcp4(CLIENT, B1, 40000, 80, 5000)
    old, new = (struct.unpack("!HH", bytes(map(int, a.split(".")))) for a in (VIP, B1))
    by_difference = fold(field(data) + sum(~w & 0xFFFF for w in old) + sum(new))
    assert field(partial_checksum(moved)) == by_difference


@pytest.mark.parametrize("fn", [complete_checksum, partial_checksum])
def test_what_is_not_tcp_or_udp_comes_back_unchanged(fn) -> None:  # type: ignore[no-untyped-def]
    first_fragment = bytes(IP(src=CLIENT, dst=VIP, flags="MF") / UDP() / payload(100))
    for data in (b"", b"\x45" + bytes(10), bytes(IP(src=CLIENT, dst=VIP, proto=47) / b"xx"),
                 first_fragment, bytes(IP(src=CLIENT, dst=VIP) / TCP())[:30]):
        assert fn(data) is data


# -- through the engine and the adapter's verdict path --------------------------------------

def packet_message(packet_id: int, data: bytes, info: int) -> bytes:
    attrs = netlink.build_attr(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x800, 0))
    if info:
        attrs += netlink.build_attr(netlink.NFQA_SKB_INFO, struct.pack("!I", info))
    attrs += netlink.build_attr(netlink.NFQA_PAYLOAD, data)
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 9, attrs)


def verdict_payload(adapter: NetlinkQueueAdapter, data: bytes, info: int) -> bytes | None:
    """Feed one packet message to the adapter as if the kernel sent it; the payload of the
    verdict it queued (None: a verdict without payload)."""
    msg = packet_message(1, data, info)
    adapter._buf[:len(msg)] = msg
    adapter._on_packet(0, len(msg))
    parts, adapter._pending = adapter._pending, []
    verdict = b"".join(parts)
    if len(verdict) == 32:
        return None
    return verdict[36:36 + struct.unpack_from("=H", verdict, 32)[0] - 4]


def adapter_for(*services: dict[str, object]) -> tuple[NetlinkQueueAdapter, object]:
    eng = engine(*services)
    return NetlinkQueueAdapter(eng.handle, 1, logging.getLogger("test")), eng


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_a_forwarded_tcp_gso_packet_keeps_a_partial_checksum_that_completes_right(
        mode: str) -> None:
    """SYN first (a flow), then a 64 KB GSO data packet with the field partial: the verdict's
    field completes, as the kernel's segmentation would, to scapy's checksum of the output."""
    adapter, _ = adapter_for(service(mode))
    syn = partial_field(tcp4(CLIENT, VIP, 40000, 80, 0, flags="S"))
    assert verdict_payload(adapter, syn, PARTIAL) is not None
    data = partial_field(tcp4(CLIENT, VIP, 40000, 80, 64_000))
    out = verdict_payload(adapter, data, PARTIAL | GSO)
    assert out is not None and IP(out).dst in (B1, B2)
    if mode == "fullnat":
        assert IP(out).src == SNAT
    assert kernel_completes(out) == scapy_l4_checksum(out)
    assert out == partial_field(out)  # the pseudo-header sum of the new addresses
    assert (adapter.gso_packets, adapter.csum_partial, adapter.csum_completed) == (1, 1, 1)


def test_a_tcp_gso_packet_to_a_local_address_gets_its_checksum_in_full() -> None:
    """Local mode: the packet is delivered whole to a socket here, which checks the field as
    a full checksum (the kernel marked the rewritten packet CHECKSUM_NONE)."""
    local = service("local", vip="127.0.0.1")
    adapter, _ = adapter_for(local)
    syn = partial_field(tcp4(CLIENT, "127.0.0.1", 40000, 80, 0, flags="S"))
    verdict_payload(adapter, syn, PARTIAL)
    data = partial_field(tcp4(CLIENT, "127.0.0.1", 40000, 80, 64_000))
    out = verdict_payload(adapter, data, PARTIAL | GSO)
    assert out is not None and TCP in IP(out) and IP(out)[TCP].dport in (8080, 8081)
    assert field(out) == scapy_l4_checksum(out)
    assert (adapter.gso_packets, adapter.csum_partial, adapter.csum_completed) == (1, 0, 2)


@pytest.mark.parametrize("mode", ["dnat", "local"])
def test_a_partial_packet_that_is_not_gso_gets_its_checksum_in_full(mode: str) -> None:
    adapter, _ = adapter_for(service(mode))
    syn = partial_field(tcp4(CLIENT, VIP, 40000, 80, 0, flags="S"))
    out = verdict_payload(adapter, syn, PARTIAL)
    assert out is not None and field(out) == scapy_l4_checksum(out)
    data = partial_field(tcp4(CLIENT, VIP, 40000, 80, 1400))
    out = verdict_payload(adapter, data, PARTIAL)
    assert out is not None and field(out) == scapy_l4_checksum(out)
    assert (adapter.gso_packets, adapter.csum_partial, adapter.csum_completed) == (0, 0, 2)


def test_ipv6_forwarded_gso_and_plain_partial() -> None:
    svc = service("dnat", vip=VIP6, backend=[{"address": B1_6, "port": 8080}])
    adapter, _ = adapter_for(svc)
    out = verdict_payload(adapter, partial_field(tcp6(CLIENT6, VIP6, 40000, 80, 0, "S")),
                          PARTIAL)
    assert out is not None and field(out) == scapy_l4_checksum(out)
    out = verdict_payload(adapter, partial_field(tcp6(CLIENT6, VIP6, 40000, 80, 60_000)),
                          PARTIAL | GSO)
    assert out is not None and IPv6(out).dst == B1_6
    assert kernel_completes(out) == scapy_l4_checksum(out)


def test_a_full_checksum_packet_is_rewritten_incrementally_as_before() -> None:
    """No NFQA_SKB_INFO (or only CSUM_NOTVERIFIED): the engine's incremental update stands,
    a wrong checksum stays wrong (the receiver drops it, as it would have)."""
    adapter, _ = adapter_for(service("dnat"))
    syn = tcp4(CLIENT, VIP, 40000, 80, 0, flags="S")
    out = verdict_payload(adapter, syn, netlink.NFQA_SKB_CSUM_NOTVERIFIED)
    assert out is not None and field(out) == scapy_l4_checksum(out)
    data = tcp4(CLIENT, VIP, 40000, 80, 1000)
    _, co = l4_offset(data)
    bad = data[:co] + struct.pack("!H", field(data) ^ 0x0101) + data[co + 2:]
    out = verdict_payload(adapter, bad, netlink.NFQA_SKB_CSUM_NOTVERIFIED)
    assert out is not None and field(out) != scapy_l4_checksum(out)
    assert (adapter.gso_packets, adapter.csum_partial, adapter.csum_completed) == (0, 0, 0)


def test_the_skb_info_attribute_is_parsed() -> None:
    msg = packet_message(5, b"\x45" + bytes(19), PARTIAL | GSO)
    assert netlink.parse_packet(msg, 0, len(msg)) == (b"\0\0\0\5", b"\x45" + bytes(19), None, 3)


def test_bind_asks_for_gso_only_when_told() -> None:
    mask_and_flags = b"\x08\x00\x04\x00\x00\x00\x00\x05" + b"\x08\x00\x05\x00"
    assert netlink.build_bind(1, 1, max_len=8).endswith(mask_and_flags + b"\0\0\0\0")
    assert netlink.build_bind(1, 1, max_len=8, gso=True).endswith(mask_and_flags
                                                                  + b"\0\0\0\x04")


def test_scapy_agrees_with_the_definitions_used_here() -> None:
    data = tcp4(CLIENT, VIP, 1, 2, 999)
    off, _ = l4_offset(data)
    zeroed = partial_field(data)[:off + 16] + b"\0\0" + data[off + 18:]
    assert scapy_checksum(struct.pack("!4s4sBBH", data[12:16], data[16:20], 0, 6,
                                      len(data) - off) + zeroed[off:]) == field(data)
    assert kernel_completes(partial_field(data)) == field(data)


def test_a_forwarded_udp_gso_packet_keeps_a_partial_checksum() -> None:
    """UDP segmentation derives each datagram's checksum from the field as a pseudo-header
    sum: it must stay one, for the new addresses (a full checksum there corrupts them all)."""
    adapter, _ = adapter_for(service("dnat", proto="udp"))
    data = partial_field(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=40000, dport=53)
                               / payload(24_000)))
    out = verdict_payload(adapter, data, PARTIAL | GSO)
    assert out is not None and IP(out).dst in (B1, B2)
    assert out == partial_field(out) and kernel_completes(out) == scapy_l4_checksum(out)
    assert (adapter.gso_packets, adapter.csum_partial, adapter.csum_completed) == (1, 1, 0)


# -- copies of a GSO packet ------------------------------------------------------------------

def _established(adapter: NetlinkQueueAdapter) -> None:
    """A dnat flow through the adapter, SYN, SYN-ACK and ACK: the next packets take the
    engine's fast path."""
    out = verdict_payload(adapter, tcp4(CLIENT, VIP, 40000, 80, 0, flags="S"), 0)
    assert out is not None
    backend, port = IP(out).dst, IP(out)[TCP].dport
    assert verdict_payload(adapter, tcp4(backend, CLIENT, port, 40000, 0, flags="SA"), 0)
    assert verdict_payload(adapter, tcp4(CLIENT, VIP, 40000, 80, 0), 0)


def _peak(fn: Callable[[], object]) -> int:
    """The most memory Python held at once while ``fn`` ran, over what it held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_the_fast_path_copies_a_gso_packet_once() -> None:
    """The rewrite of a 64 KB packet of an established flow is one new packet: the rest of
    the packet joins the new header through a view, not as a slice copied again."""
    adapter, eng = adapter_for(service("dnat"))
    _established(adapter)
    data = tcp4(CLIENT, VIP, 40000, 80, 64_000)
    fast = eng.counters.fast  # type: ignore[attr-defined]
    out: list[object] = []
    peak = _peak(lambda: out.append(eng.handle(data, 0.0)))  # type: ignore[attr-defined]
    assert eng.counters.fast == fast + 1  # type: ignore[attr-defined]
    assert isinstance(out[0], bytes) and out[0][38:] == data[38:]
    assert len(data) <= peak < 1.5 * len(data)


def test_a_partial_gso_packet_is_sent_back_without_another_copy() -> None:
    """Its checksum field set, the packet goes to the socket as pieces: the part after the
    field is a view of the engine's output. At most two copies are held at once (the
    payload read from the socket and the rewritten packet), not four."""
    adapter, _ = adapter_for(service("dnat"))
    _established(adapter)
    data = partial_field(tcp4(CLIENT, VIP, 40000, 80, 64_000))
    msg = packet_message(1, data, PARTIAL | GSO)
    adapter._buf[:len(msg)] = msg
    peak = _peak(lambda: adapter._on_packet(0, len(msg)))
    parts, adapter._pending = adapter._pending, []
    assert any(isinstance(p, memoryview) and len(p) > 60_000 for p in parts)
    assert peak < 2.5 * len(data)
    verdict = b"".join(parts)
    out = verdict[36:36 + struct.unpack_from("=H", verdict, 32)[0] - 4]
    assert IP(out).dst in (B1, B2) and kernel_completes(out) == scapy_l4_checksum(out)
    assert out[40:] == data[40:]


def _ip(data: bytes) -> IP | IPv6:
    return IP(data) if data[0] >> 4 == 4 else IPv6(data)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("n", [100, 20_000])
def test_the_fast_path_rewrites_short_and_long_packets_alike(v6: bool, proto: str,
                                                             n: int) -> None:
    """Each fast path (IPv4 and IPv6, TCP and UDP) on a short packet and on a long one (whose
    rest is joined through a view): the addresses and ports of the flow, the payload as it
    came, the checksum scapy computes for the output."""
    client, vip = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    backends = [{"address": B1_6, "port": 8080}] if v6 else None
    svc = service("dnat", proto=proto, vip=vip, **({"backend": backends} if v6 else {}))
    eng = engine(svc)
    port = 80 if proto == "tcp" else 53
    layer = TCP if proto == "tcp" else UDP

    def packet(src: str, dst: str, sport: int, dport: int, size: int,
               flags: str = "A") -> bytes:
        l4 = (TCP(sport=sport, dport=dport, flags=flags, seq=1, ack=1) if proto == "tcp"
              else UDP(sport=sport, dport=dport))
        return bytes((IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)) / l4
                     / payload(size))

    first = eng.handle(packet(client, vip, 40000, port, 0, "S"), 0.0)
    assert isinstance(first, bytes)
    backend, bport = _ip(first).dst, _ip(first)[layer].dport
    if proto == "tcp":
        assert isinstance(eng.handle(packet(backend, client, bport, 40000, 0, "SA"), 0.0), bytes)
        assert isinstance(eng.handle(packet(client, vip, 40000, port, 0), 0.0), bytes)
    fast = eng.counters.fast
    data = packet(client, vip, 40000, port, n)
    out = eng.handle(data, 0.0)
    assert eng.counters.fast == fast + 1
    assert isinstance(out, bytes) and len(out) == len(data)
    pkt = _ip(out)
    assert (pkt.src, pkt.dst, pkt[layer].sport, pkt[layer].dport) == (client, backend, 40000,
                                                                     bport)
    assert bytes(pkt[layer].payload) == payload(n)
    assert field(out) == scapy_l4_checksum(out)
    back = eng.handle(packet(backend, client, bport, 40000, n), 0.0)
    assert isinstance(back, bytes) and eng.counters.fast == fast + 2
    pkt = _ip(back)
    assert (pkt.src, pkt.dst, pkt[layer].sport, pkt[layer].dport) == (vip, client, port, 40000)
    assert bytes(pkt[layer].payload) == payload(n) and field(back) == scapy_l4_checksum(back)
