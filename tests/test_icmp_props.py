"""Engine: ICMP and ICMPv6 errors about live flows, property-tested (beside ``test_icmp.py``).

(hypothesis, derandomized) ICMP and ICMPv6 errors quoting a packet of a live flow as nfqlb
emitted it, from the peer or from a router, quoting drawn lengths: translated exactly as scapy
builds the error about the original packet; then mutated: nothing raises, and any ICMP/ICMPv6
message returned has a right checksum.

An engine bug the property test found: a quote that ends inside the quoted TCP checksum keeps
half of the checksum as nfqlb emitted it (a strict xfail).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from dual_stack import (
    FAMILY,
    MODES,
    VERDICTS,
    checksums_ok,
    ends,
    ext_header,
    ip_header,
    make_engine,
    mutate,
    open_flow,
    upper_layer,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, in6_chksum
from scapy.packet import Packet, Raw
from scapy.utils import checksum
from strategies import PROPS, clients4, clients6, mutations, ports

from nfqlb.verdict import Held


@st.composite
def icmp_case(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from([4, 6]))
    mode = draw(st.sampled_from(MODES))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    client = draw(clients6 if family == 6 else clients4)
    sport = draw(ports)
    from_client = draw(st.booleans())  # which way the quoted packet went
    (src, dst, sp, dp), _ = ends(mode, proto, family, client, sport, from_client)
    payload = draw(st.binary(max_size=600))
    dest = draw(st.none() | st.integers(0, 14)) if family == 6 else None
    if proto == "tcp":
        l4: Packet = TCP(sport=sp, dport=dp, flags=draw(st.sampled_from(["A", "PA", "FA"])),
                         seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)))
    else:
        l4 = UDP(sport=sp, dport=dp)
    if family == 6:
        ip: Packet = IPv6(src=src, dst=dst, hlim=draw(st.integers(1, 255)))
        if dest is not None:
            ip = ip / ext_header(IPv6ExtHdrDestOpt, dest)
        types = [1, 2, 3, 4]
    else:
        ip = IP(src=src, dst=dst, id=draw(st.integers(0, 65535)), ttl=draw(st.integers(1, 255)),
                flags=draw(st.sampled_from(["", "DF"])),
                options=[IPOption_Router_Alert()] if draw(st.integers(0, 4)) == 0 else [])
        types = [3, 11, 12]
    return {"family": family, "mode": mode, "proto": proto, "client": client, "sport": sport,
            "original": bytes(ip / l4 / Raw(payload)), "from_peer": draw(st.booleans()),
            "type": draw(st.sampled_from(types)), "code": draw(st.integers(0, 15)),
            "rest": draw(st.binary(min_size=4, max_size=4)), "quote": draw(st.integers(0, 2000)),
            "outer_ttl": draw(st.integers(1, 255)),
            "outer_ext": draw(st.integers(0, 4)) == 0}  # outer IPv4 options / IPv6 hop-by-hop


def icmp_error(family: int, src: str, dst: str, ttl: int, head: bytes, quote: bytes,
               outer_ext: bool = False) -> bytes:
    """An ICMP/ICMPv6 error (``head``: type, code and the 4 bytes after the checksum) quoting
    ``quote``, its checksum computed by scapy (ICMPv6: with the pseudo-header)."""
    body = head[:2] + b"\0\0" + head[2:] + quote
    if family == 6:
        c = in6_chksum(58, IPv6(src=src, dst=dst), body)
        ip: Packet = IPv6(src=src, dst=dst, hlim=ttl, nh=58)
        if outer_ext:
            ip = IPv6(src=src, dst=dst, hlim=ttl) / IPv6ExtHdrHopByHop(nh=58)
    else:
        ip = IP(src=src, dst=dst, proto=1, ttl=ttl, id=99,
                options=[IPOption_Router_Alert()] if outer_ext else [])
        c = checksum(body)
    return bytes(ip / Raw(body[:2] + struct.pack("!H", c) + body[4:]))


def _addresses(data: bytes) -> tuple[str, str]:
    p = IPv6(data) if data[0] >> 4 == 6 else IP(data)
    return p.src, p.dst


@settings(PROPS, max_examples=700)
@given(icmp_case(), mutations)
def test_icmp_errors_translated_exactly_and_mutations_keep_checksums(
        case: dict[str, Any], muts: list[tuple[list[tuple[str, int, int]], bool, bool]]) -> None:
    family, mode, proto = case["family"], case["mode"], case["proto"]
    eng = make_engine(mode, proto, family)
    open_flow(eng, mode, proto, family, case["client"], case["sport"])
    original = case["original"]
    emitted = eng.handle(original, 1.0)
    assert isinstance(emitted, bytes)
    ul = upper_layer(emitted)
    assert ul is not None
    qlen = ul[1] + 8 + case["quote"] % (len(emitted) - ul[1] - 7)  # at least 8 bytes of L4
    if proto == "tcp" and qlen == ul[1] + 17:  # a quote that cuts the TCP checksum in two:
        qlen -= 1  # see test_quote_cutting_the_tcp_checksum_in_two (xfail)
    qsrc, qdst = _addresses(emitted)
    osrc, odst = _addresses(original)
    router = FAMILY[family]["router"]
    head = bytes((case["type"], case["code"])) + case["rest"]
    error = icmp_error(family, qdst if case["from_peer"] else router, qsrc, case["outer_ttl"],
                       head, emitted[:qlen], case["outer_ext"])
    want = icmp_error(family, odst if case["from_peer"] else router, osrc, case["outer_ttl"],
                      head, original[:qlen], case["outer_ext"])
    event(f"IPv{family} error type {case['type']} from {'peer' if case['from_peer'] else 'router'}"
          f"{', outer options' if case['outer_ext'] else ''}")
    got = eng.handle(error, 2.0)
    assert got == want
    assert checksums_ok(got)
    for steps, fix_len, fix_sum in muts:
        bad = mutate(error, steps, fix_len, fix_sum)
        got = eng.handle(bad, 3.0)
        assert got in VERDICTS or isinstance(got, (bytes, Held))
        event(f"mutant: {'bytes' if isinstance(got, bytes) else got}")
        if not isinstance(got, bytes):
            continue
        ul = upper_layer(got)
        if ul is not None and ul[0] in (1, 58) and ul[2] and (ul[0] == 58) == (family == 6):
            event("mutant translated")
            icmp = got[ul[1]:]
            if family == 4:
                assert checksum(icmp) == 0
                if checksum(bad[:ul[1]]) == 0:
                    assert checksum(got[:ul[1]]) == 0
            else:
                assert in6_chksum(58, IPv6(got), icmp) == 0
        elif checksums_ok(bad, zero_udp_ok=True):
            assert checksums_ok(got)
    assert "internal_error" not in eng.counters.drops, eng.counters.drops


# ---------------------------------------------------------------- engine bugs found here

@pytest.mark.xfail(strict=True, reason=(
    "engine bug (minor): an ICMP error whose quote ends in the middle of the quoted TCP "
    "checksum (one byte of it quoted) keeps that byte as nfqlb emitted it: "
    "icmp.translate_error updates the quoted checksum only when both bytes are in the quote "
    "(co + 2 <= n), so the translated quote does not read as the packet the host sent"))
@pytest.mark.parametrize("family", [4, 6])
def test_quote_cutting_the_tcp_checksum_in_two(family: int) -> None:
    f = FAMILY[family]
    client = "198.18.0.9" if family == 4 else "2001:db8::9"
    eng = make_engine("dnat", "tcp", family)
    open_flow(eng, "dnat", "tcp", family, client, 4000)
    original = bytes(ip_header(family, client, f["vip"]) / TCP(sport=4000, dport=80, flags="PA") /
                     (b"data" * 10))
    emitted = eng.handle(original, 1.0)
    assert isinstance(emitted, bytes)
    qlen = (40 if family == 6 else 20) + 17  # up to the first byte of the TCP checksum
    head = bytes((11, 0) if family == 4 else (3, 0)) + b"\0\0\0\0"  # time exceeded
    # a router between nfqlb and the backend reports it to the source, the client (dnat)
    error = icmp_error(family, f["router"], client, 60, head, emitted[:qlen])
    want = icmp_error(family, f["router"], client, 60, head, original[:qlen])
    got = eng.handle(error, 2.0)
    assert isinstance(got, bytes) and checksums_ok(got)
    ck = 22 if family == 4 else 42  # the ICMP checksum
    assert got[:ck] == want[:ck] and got[ck + 2:-1] == want[ck + 2:-1]  # all else is right
    assert got[-1] == want[-1]  # the half-quoted checksum byte: the one nfqlb emitted
