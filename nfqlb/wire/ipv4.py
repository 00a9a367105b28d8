"""IPv4 header checks and TCP/UDP offsets, by index on ``bytes``.

``parse_ipv4`` validates what the rewrite relies on and raises :class:`PacketError` with the
counter name as its reason; it never lets an ``IndexError`` or ``struct.error`` escape.
"""

from __future__ import annotations

from nfqlb.errors import PacketError
from nfqlb.wire.ip import ICMP, TCP, UDP, parse_ip

__all__ = ["TCP", "UDP", "parse_ipv4", "tcp_mss_offset"]


def parse_ipv4(data: bytes) -> tuple[int, int] | None:
    """``(transport offset, protocol)`` of a whole IPv4 TCP/UDP packet; None for others.

    A stricter view of :func:`nfqlb.wire.ip.parse_ip` for callers that handle neither IPv6
    nor fragments.
    """
    if data and data[0] >> 4 == 6:
        raise PacketError("ipv6_unsupported")
    parsed = parse_ip(data)
    if parsed is None or parsed.proto == ICMP:
        return None
    if parsed.frag_key is not None:
        raise PacketError("fragment")
    return parsed.off, parsed.proto


def tcp_mss_offset(data: bytes, off: int) -> int:
    """Offset of the 2-byte MSS value in the TCP options at ``off``, or -1 (well-formed input)."""
    end = off + (data[off + 12] >> 4) * 4
    i = off + 20
    while i < end:
        kind = data[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = data[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == 2 and length == 4:
            return i + 2
        i += length
    return -1
