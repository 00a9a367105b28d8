"""Address and port rewrites of TCP/UDP packets, and the TCP MSS clamp: pure functions on bytes.

A rewrite replaces the packet's ``src addr | dst addr | src port | dst port`` with a header
precomputed for its flow (see :mod:`nfqlb.flows`) and folds the flow's precomputed RFC 1624
deltas into the IPv4 header checksum and the TCP/UDP checksum, which covers the addresses
through the pseudo-header. Nothing is recomputed over the payload, with one exception: an IPv6
UDP datagram that arrives with a zero checksum (allowed for IPv4 only, RFC 8200 8.1) gets its
checksum computed in full, since IPv6 receivers drop a zero one.

A UDP checksum that is 0 in IPv4 means "none" and stays 0; a computed checksum that comes out
as 0 is sent as 0xFFFF (RFC 768). The engine's fast path inlines the same arithmetic for the
common cases (IPv4 without options, IPv6 without extension headers).

:func:`complete_checksum` is for packets the kernel queued with their checksum not yet computed
(``CHECKSUM_PARTIAL``, reported as NFQA_SKB_CSUMNOTREADY; see :mod:`nfqlb.io.netlink`): their
TCP/UDP checksum field holds only the pseudo-header sum, which the kernel (or the NIC) was to
complete over the segment on the way out. Once nfqlb hands such a packet back rewritten, the
kernel marks it ``CHECKSUM_NONE`` (``nfqnl_mangle``) and completes nothing, so the adapter
computes the checksum in full over the packet as rewritten.
"""

from __future__ import annotations

from nfqlb.errors import PacketError
from nfqlb.wire.checksum import U16, apply, delta, fold, full, sum_words
from nfqlb.wire.ip import PACKET_REASONS, TCP, UDP, walk_v6
from nfqlb.wire.tcp import tcp_mss_offset


def rewrite(data: bytes, v6: bool, off: int, proto: int, fragment: bool, header: bytes,
            ip_delta: int, l4_delta: int) -> bytes:
    """``data`` (a TCP/UDP packet, or a first fragment, transport header at ``off``) with
    addresses and ports replaced by ``header``, checksums updated."""
    co = off + (16 if proto == TCP else 6)
    c = data[co] << 8 | data[co + 1]
    zero_udp6 = False
    if proto == TCP:
        c = apply(c, l4_delta)
    elif c:
        c = apply(c, l4_delta) or 0xFFFF
    elif v6:
        zero_udp6 = True  # IPv6 UDP must carry a checksum: compute it below
    if v6:
        out = b"".join((data[:8], header[:32], data[40:off], header[32:], data[off + 4:co],
                        U16[c], data[co + 2:]))
        if zero_udp6:
            if fragment:
                raise PacketError("udp6_zero_checksum_fragment")
            seg = out[off:]
            pseudo = out[8:40] + len(seg).to_bytes(4, "big") + b"\0\0\0" + bytes((UDP,))
            out = out[:co] + U16[full(pseudo + seg) or 0xFFFF] + out[co + 2:]
        return out
    return b"".join((
        data[:10], U16[apply(data[10] << 8 | data[11], ip_delta)], header[:8], data[20:off],
        header[8:], data[off + 4:co], U16[c], data[co + 2:],
    ))


def rewrite_addresses(data: bytes, v6: bool, header: bytes, ip_delta: int) -> bytes:
    """The IP-level part of a rewrite, for later fragments (they carry no transport header;
    the first fragment's transport checksum already covers the new addresses)."""
    if v6:
        return b"".join((data[:8], header[:32], data[40:]))
    return b"".join((data[:10], U16[apply(data[10] << 8 | data[11], ip_delta)], header[:8],
                     data[20:]))


def clamp_mss(data: bytes, off: int, mss: int) -> bytes:
    """``data`` (a TCP segment, header at ``off``) with its MSS option lowered to ``mss`` if
    it is higher; the TCP checksum is updated incrementally.

    On loopback (MTU 64 KiB) a flow would otherwise send segments of up to 64 KiB, which the
    NetfilterQueue binding cannot carry: they would all take the large-packet queue.
    """
    pos = tcp_mss_offset(data, off)
    if pos < 0 or (data[pos] << 8 | data[pos + 1]) <= mss:
        return data
    odd = (pos - off) & 1  # checksum words are aligned to the TCP header start
    a, b = pos - odd, pos + 2 + odd
    buf = bytearray(data)
    buf[pos:pos + 2] = U16[mss]
    d = delta(data[a:b], bytes(buf[a:b]))
    co = off + 16
    buf[co:co + 2] = U16[apply(data[co] << 8 | data[co + 1], d)]
    return bytes(buf)


def complete_checksum(data: bytes) -> bytes:
    """``data`` (an IPv4 or IPv6 TCP/UDP packet, not a fragment) with its transport checksum
    computed in full over the pseudo-header and the whole segment, whatever the field held.

    Anything else (another protocol, a fragment, a header that does not fit) comes back
    unchanged: the kernel leaves only TCP and UDP checksums partial, and never a fragment's.
    A UDP checksum that comes out as 0 is sent as 0xFFFF (RFC 768).
    """
    return patch_u16(data, checksum_fix(data, True))


def partial_checksum(data: bytes) -> bytes:
    """``data`` (an IPv4 or IPv6 TCP/UDP packet, not a fragment) with its transport checksum
    field set to what ``CHECKSUM_PARTIAL`` wants there: the sum of the pseudo-header alone
    (addresses, protocol, segment length), not complemented, as the sender's stack wrote it
    (``~tcp_v4_check(len, saddr, daddr, 0)``). Completing it over the segment, field
    included, gives the full checksum. Only the addresses enter it, so a port rewrite leaves
    it as it was and an address rewrite changes it by the addresses' difference.

    Anything else comes back unchanged, as in :func:`complete_checksum`.
    """
    return patch_u16(data, checksum_fix(data, False))


def checksum_fix(data: bytes, complete: bool) -> int:
    """Where the transport checksum of ``data`` goes and what it becomes, as
    ``offset << 16 | value``: the full checksum if ``complete`` (as
    :func:`complete_checksum`), else the pseudo-header's partial sum (as
    :func:`partial_checksum`); -1 for a packet that is not TCP or UDP, or a fragment.

    Apart so that a caller can send a 64 KiB packet with its two bytes changed as three
    pieces (before, the new field, a view of the rest), not as a copy of the packet.
    """
    found = _l4(data)
    if found is None:
        return -1
    addresses, off, proto = found
    co = off + (16 if proto == TCP else 6)
    length = len(data) - off
    s = sum_words(addresses) + (length >> 16) + (length & 0xFFFF) + proto
    if not complete:
        return co << 16 | fold(s)
    old = data[co] << 8 | data[co + 1]
    # the segment's sum with its checksum field taken out (one's complement: add ~field)
    c = ~fold(s + sum_words(memoryview(data)[off:]) + (~old & 0xFFFF)) & 0xFFFF
    if proto == UDP and not c:
        c = 0xFFFF
    return co << 16 | c


def patch_u16(data: bytes, fix: int) -> bytes:
    """``data`` with the 16-bit field ``fix`` names (``offset << 16 | value``, as from
    :func:`checksum_fix`) set; unchanged for -1. One copy of the packet."""
    if fix < 0:
        return data
    co = fix >> 16
    view = memoryview(data)
    return b"".join((view[:co], U16[fix & 0xFFFF], view[co + 2:]))


def _l4(data: bytes) -> tuple[bytes, int, int] | None:
    """(pseudo-header addresses, transport offset, protocol) of an IPv4/IPv6 TCP or UDP packet
    that is not a fragment; None for anything else."""
    n = len(data)
    if n < 20:
        return None
    version = data[0] >> 4
    if version == 4:
        off = (data[0] & 0x0F) * 4
        if off < 20 or data[6] & 0x3F or data[7]:
            return None
        addresses, proto = data[12:20], data[9]
    elif version == 6 and n >= 40:
        try:
            proto, off, frag = walk_v6(data, 0, PACKET_REASONS)
        except PacketError:
            return None
        if frag >= 0:
            return None
        addresses = data[8:40]
    else:
        return None
    if proto not in (TCP, UDP) or off + (18 if proto == TCP else 8) > n:
        return None
    return addresses, off, proto
