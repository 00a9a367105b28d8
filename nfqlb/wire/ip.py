"""IPv4 and IPv6 header checks, extension headers and fragments, by index on ``bytes``.

``parse_ip`` validates what the rewrite relies on and raises :class:`PacketError` with the
counter name as its reason; it never lets an ``IndexError`` or ``struct.error`` escape. It is
the general path only: established flows never get here.
"""

from __future__ import annotations

from typing import NamedTuple

from nfqlb.errors import PacketError

# IANA protocol numbers: the one definition in nfqlb (``values.Protocol`` and the rest use these)
TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58

_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
_V6_FRAG = 44
_V6_AH = 51
_V6_NONE = 59


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
        _check_transport(data, hl, proto, whole=False)
        return Parsed(False, hl, proto, key, True)
    _check_transport(data, hl, proto, whole=True)
    return Parsed(False, hl, proto, None, True)


def _parse_v6(data: bytes, n: int) -> Parsed | None:
    if n < 40:
        raise PacketError("truncated")
    if (data[4] << 8 | data[5]) != n - 40:
        raise PacketError("truncated" if (data[4] << 8 | data[5]) > n - 40
                          else "bad_total_length")
    nh = data[6]
    off = 40
    frag_key: bytes | None = None
    first = True
    for _ in range(8):  # a bounded walk of the extension headers
        if nh in _V6_EXT or nh == _V6_AH:
            if n < off + 8:
                raise PacketError("truncated")
            if nh == 43 and data[off + 3]:
                raise PacketError("ipv6_routing_header")  # the pseudo-header would change
            size = (data[off + 1] + 2) * 4 if nh == _V6_AH else (data[off + 1] + 1) * 8
            nh = data[off]
            off += size
            if off > n:
                raise PacketError("truncated")
        elif nh == _V6_FRAG:
            if n < off + 8:
                raise PacketError("truncated")
            offset = (data[off + 2] << 8 | data[off + 3]) >> 3
            more = data[off + 3] & 1
            ident = data[off + 4:off + 8]
            nh = data[off]
            off += 8
            if offset or more:
                frag_key = data[8:40] + bytes((nh,)) + ident
                first = offset == 0
        else:
            break
    else:
        raise PacketError("ipv6_too_many_headers")
    if nh not in (TCP, UDP, ICMPV6):
        return None
    if first and not (frag_key is not None and nh == ICMPV6):
        _check_transport(data, off, nh, whole=frag_key is None)
    return Parsed(True, off, nh, frag_key, first)
