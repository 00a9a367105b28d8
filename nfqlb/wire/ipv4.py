"""IPv4 header checks and TCP/UDP offsets, by index on ``bytes``.

``parse_ipv4`` validates what the rewrite relies on and raises :class:`PacketError` with the
counter name as its reason; it never lets an ``IndexError`` or ``struct.error`` escape.
"""

from __future__ import annotations

from nfqlb.errors import PacketError

TCP = 6
UDP = 17


def parse_ipv4(data: bytes) -> tuple[int, int] | None:
    """``(transport offset, protocol)`` of a TCP/UDP packet; None for other protocols."""
    n = len(data)
    if n < 20:
        raise PacketError("truncated")
    version = data[0] >> 4
    if version == 6:
        raise PacketError("ipv6_unsupported")
    if version != 4:
        raise PacketError("bad_version")
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
    if proto != TCP and proto != UDP:
        return None
    if data[6] & 0x3F or data[7]:
        raise PacketError("fragment")
    if proto == TCP:
        if n < hl + 20:
            raise PacketError("truncated")
        doff = (data[hl + 12] >> 4) * 4
        if doff < 20 or hl + doff > n:
            raise PacketError("bad_tcp_header")
    else:
        if n < hl + 8:
            raise PacketError("truncated")
        if (data[hl + 4] << 8 | data[hl + 5]) != n - hl:
            raise PacketError("bad_udp_length")
    return hl, proto


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
