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
"""

from __future__ import annotations

from nfqlb.errors import PacketError
from nfqlb.wire.checksum import U16, apply, delta, full
from nfqlb.wire.ip import TCP, UDP
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
