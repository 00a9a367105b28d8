"""IPv4 and IPv6 header checks, extension headers and fragments, by index on ``bytes``.

``parse_ip`` validates what the rewrite relies on and raises :class:`PacketError` with the
counter name as its reason; it never lets an ``IndexError`` or ``struct.error`` escape. It is
the general path only: established flows never get here.

``walk_v6`` is the one walk over an IPv6 extension-header chain: ``parse_ip`` walks the packet,
``icmp`` the packet an ICMPv6 error quotes, each raising under its own counter names.
Hop-by-hop, routing and destination options are ``(len + 1) * 8`` bytes long, AH
``(len + 2) * 4`` (RFC 4302: its length is in 32-bit words, less 2), a fragment header 8.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from nfqlb.errors import PacketError

# IANA protocol numbers: the one definition in nfqlb (``values.Protocol`` and the rest use these)
TCP: Final = 6
UDP: Final = 17
ICMP: Final = 1
ICMPV6: Final = 58

# IPv6 extension headers (IANA protocol numbers too)
HOPOPT: Final = 0
IPV6_ROUTE: Final = 43
IPV6_FRAG: Final = 44
AH: Final = 51
IPV6_OPTS: Final = 60
_V6_EXT: Final = frozenset({HOPOPT, IPV6_ROUTE, IPV6_OPTS})  # (len + 1) * 8 bytes
_V6_MAX_HEADERS: Final = 7  # a longer chain is refused: the walk is bounded


class V6Reasons(NamedTuple):
    """The counter names ``walk_v6`` raises under: each caller keeps its own."""

    truncated: str  # the chain runs past the end of the data
    too_many: str  # more than _V6_MAX_HEADERS extension headers
    routing: str | None  # a routing header with segments left; None: walked like the others


#: What ``parse_ip`` raises: a routing header with segments left is refused, since the final
#: destination (and with it the TCP/UDP pseudo-header) would change on the way.
PACKET_REASONS: Final = V6Reasons("truncated", "ipv6_too_many_headers", "ipv6_routing_header")


class Parsed(NamedTuple):
    v6: bool
    off: int  # transport header offset (for a non-first fragment: where its data starts)
    proto: int  # transport protocol (the upper-layer header for IPv6)
    frag_key: bytes | None  # for fragments: src|dst|proto|id, the same in every fragment
    first: bool  # not a fragment, or the first one (it carries the transport header)


def _check_transport(data: bytes, off: int, proto: int, whole: bool) -> None:
    n = len(data)
    if proto == TCP:
        if n < off + 20:
            raise PacketError("truncated")
        doff = (data[off + 12] >> 4) * 4
        if doff < 20 or off + doff > n:
            raise PacketError("bad_tcp_header")
    elif proto == UDP:
        if n < off + 8:
            raise PacketError("truncated")
        if whole and (data[off + 4] << 8 | data[off + 5]) != n - off:
            raise PacketError("bad_udp_length")
    elif proto in (ICMP, ICMPV6):
        if n < off + 8:
            raise PacketError("truncated")


def parse_ip(data: bytes) -> Parsed | None:
    """Offsets of a TCP, UDP or ICMP packet (or fragment); None for other protocols."""
    n = len(data)
    if n < 1:
        raise PacketError("truncated")
    version = data[0] >> 4
    if version == 4:
        return _parse_v4(data, n)
    if version == 6:
        return _parse_v6(data, n)
    raise PacketError("bad_version")


def _parse_v4(data: bytes, n: int) -> Parsed | None:
    if n < 20:
        raise PacketError("truncated")
    hl = (data[0] & 0x0F) * 4
    if hl < 20:
        raise PacketError("bad_header_length")
    if n < hl:
        raise PacketError("truncated")
    total = data[2] << 8 | data[3]
    if total > n:
        raise PacketError("truncated")
    if total != n or total < hl:
        raise PacketError("bad_total_length")
    proto = data[9]
    if proto not in (TCP, UDP, ICMP):
        return None
    offset = (data[6] & 0x1F) << 8 | data[7]
    more = data[6] & 0x20
    if offset or more:
        key = data[12:20] + data[9:10] + data[4:6]
        if offset or proto == ICMP:  # ICMP fragments: the engine passes them on unread
            return Parsed(False, hl, proto, key, offset == 0)
        try:
            _check_transport(data, hl, proto, whole=False)
        except PacketError as exc:  # the later fragments of this datagram go with it
            raise PacketError(exc.reason, key) from None
        return Parsed(False, hl, proto, key, True)
    _check_transport(data, hl, proto, whole=True)
    return Parsed(False, hl, proto, None, True)


def _parse_v6(data: bytes, n: int) -> Parsed | None:
    if n < 40:
        raise PacketError("truncated")
    if (data[4] << 8 | data[5]) != n - 40:
        raise PacketError("truncated" if (data[4] << 8 | data[5]) > n - 40
                          else "bad_total_length")
    nh, off, frag = walk_v6(data, 0, PACKET_REASONS)
    frag_key: bytes | None = None
    first = True
    if frag >= 0:
        frag_key = data[8:40] + data[frag:frag + 1] + data[frag + 4:frag + 8]
        first = (data[frag + 2] << 8 | data[frag + 3]) < 8  # fragment offset 0
    if not first and (nh in _V6_EXT or nh == AH):
        # a later fragment whose fragmentable part starts with extension headers: they are in
        # the first fragment only, which tells the protocol; this one follows it
        return Parsed(True, off, nh, frag_key, False)
    if nh not in (TCP, UDP, ICMPV6):
        return None
    if first and not (frag_key is not None and nh == ICMPV6):
        try:
            _check_transport(data, off, nh, whole=frag_key is None)
        except PacketError as exc:  # a first fragment: the later ones go with it
            raise PacketError(exc.reason, frag_key, True) from None
    return Parsed(True, off, nh, frag_key, first)


def walk_v6(data: bytes, start: int, reasons: V6Reasons) -> tuple[int, int, int]:
    """The extension headers of the IPv6 packet at ``start`` (its fixed 40-byte header must be
    in ``data``): ``(proto, off, frag)``, the first header that is not an extension header
    (TCP, UDP, ICMPv6, ESP, ...) and its offset, and the offset of the last fragment header
    that has a fragment offset or the M flag (-1 if none: not a fragment).

    Each extension header must be whole in ``data`` (else ``reasons.truncated``); the walk stops
    at the first header that is not an extension header, after the fragment header of a later
    fragment (what follows it is the datagram's data, not headers), or refuses the chain after
    _V6_MAX_HEADERS of them.
    """
    n = len(data)
    nh = data[start + 6]
    off = start + 40
    frag = -1
    for _ in range(_V6_MAX_HEADERS + 1):
        if nh in _V6_EXT or nh == AH:
            if n < off + 8:
                raise PacketError(reasons.truncated)
            if nh == IPV6_ROUTE and data[off + 3] and reasons.routing is not None:
                raise PacketError(reasons.routing)  # segments left: not the final destination
            size = (data[off + 1] + 2) * 4 if nh == AH else (data[off + 1] + 1) * 8
            nh = data[off]
            off += size
            if off > n:
                raise PacketError(reasons.truncated)
        elif nh == IPV6_FRAG:
            if n < off + 8:
                raise PacketError(reasons.truncated)
            field = data[off + 2] << 8 | data[off + 3]
            if field & 0xFFF9:  # fragment offset, or M
                frag = off
            nh = data[off]
            off += 8
            if field & 0xFFF8:  # a later fragment: what follows is data, not headers
                return nh, off, frag
        else:
            return nh, off, frag
    raise PacketError(reasons.too_many)
