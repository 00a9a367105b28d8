"""ICMP and ICMPv6 errors about balanced flows: find the flow by the quoted header, translate.

An error (destination unreachable, fragmentation needed / packet too big, time exceeded,
parameter problem) quotes the start of a packet that nfqlb *emitted*, already rewritten, and is
sent back to that packet's source. For the host that sent the original packet to act on it (a
TCP socket lowering its path MTU, a UDP socket reporting ECONNREFUSED), the error must read as
if nfqlb were not there: it must quote the packet as that host sent it, and come to that host.

Derivation, with Q the quoted packet and ``swap`` exchanging source and destination (addresses
and ports): packets travelling opposite to Q arrive at nfqlb with the header swap(Q), so
``lookup(proto, swap(Q))`` finds the header the flow rewrites such a packet with (what nfqlb
makes of it), which is swap(Q0), Q0 being the packet before nfqlb rewrote it into Q. Then

- the quote becomes Q0: quoted addresses and ports; the quoted IPv4 header checksum and the
  quoted TCP/UDP checksum (when the quote reaches it) are updated incrementally, since they
  cover the original full packet and not just the quoted bytes;
- the outer destination (Q's source) becomes Q0's source;
- the outer source becomes Q0's destination when the error comes from Q's destination itself
  (a backend saying "port unreachable"), and stays as is when a router on the way reports it;
- the outer IPv4 header checksum is updated incrementally; the ICMP checksum is recomputed over
  the whole message (for ICMPv6, with the pseudo-header of the new outer addresses).

Example, fullnat: client C:c -> VIP:80 leaves nfqlb as S:p -> B:8080. B's "port unreachable"
B -> S quoting (S:p -> B:8080) becomes VIP -> C quoting (C:c -> VIP:80); a router R's "frag
needed" R -> S about the same packet becomes R -> C. An error about a reply (R -> VIP quoting
VIP:80 -> C:c) goes to B, quoting (B:8080 -> S:p).

Limits: the rewrite restores addresses and ports only. A quoted SYN whose MSS nfqlb clamped
keeps the clamped value (its checksum is then that of Q0 with the clamped MSS; receivers do not
verify quoted checksums). The ICMPv6 pseudo-header uses the outer destination field: an outer
routing header is not looked into. A fragmented error is not translated (its checksum covers
bytes that are not in this packet). The outer TTL / hop limit is left as it is.

Nothing here imports the engine: it sees bytes, an ICMP offset and a lookup function.
"""

from __future__ import annotations

from collections.abc import Callable

from nfqlb.errors import PacketError
from nfqlb.wire.checksum import U16, apply, delta, full, sum16
from nfqlb.wire.ip import ICMP, ICMPV6, TCP, UDP, V6Reasons, walk_v6

#: ``lookup(protocol, key) -> header | None``: the header the flow table rewrites packets with
#: that key with (``FlowTable.header``).
Lookup = Callable[[int, bytes], "bytes | None"]

#: Error types that quote the offending packet: RFC 792 / RFC 1812 and RFC 4443.
ERRORS_V4 = frozenset({3, 11, 12})  # destination unreachable, time exceeded, parameter problem
ERRORS_V6 = frozenset({1, 2, 3, 4})  # destination unreachable, packet too big, time exceeded,
#                                      parameter problem
ECHO_REQUEST_V4 = 8
ECHO_REQUEST_V6 = 128

_PSEUDO_NEXT_ICMPV6 = bytes((0, 0, 0, ICMPV6))  # the ICMPv6 pseudo-header's last word

#: The quoted packet's extension headers are walked as ``parse_ip`` walks a packet's, under
#: this module's counter names; a quoted routing header is walked like any other.
_QUOTE_REASONS = V6Reasons("icmp_truncated_quote", "icmp_bad_quote", None)


def translate_error(data: bytes, off: int, lookup: Lookup) -> bytes | None:
    """The error ``data`` (ICMP header at ``off``) translated for the flow it is about.

    Returns None when ``data`` is not an error this module translates: another ICMP type, a
    quoted packet that is not TCP/UDP or not a first fragment, no flow for the quoted header,
    an outer destination that is not the quoted packet's source, a fragmented error. Raises
    :class:`PacketError` (reason ``icmp_*``) on malformed input.
    """
    n = len(data)
    if n < 1:
        raise PacketError("icmp_truncated")
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            raise PacketError("icmp_truncated")
        if off != (data[0] & 0x0F) * 4 or off < 20:
            raise PacketError("icmp_bad_offset")
        if (data[2] << 8 | data[3]) != n:
            raise PacketError("icmp_bad_length")
        if data[9] != ICMP or data[6] & 0x3F or data[7]:
            return None  # not ICMP, or a fragment
        alen, aoff, errors = 4, 12, ERRORS_V4
    elif version == 6:
        if n < 40:
            raise PacketError("icmp_truncated")
        if off < 40:
            raise PacketError("icmp_bad_offset")
        if (data[4] << 8 | data[5]) + 40 != n:
            raise PacketError("icmp_bad_length")
        alen, aoff, errors = 16, 8, ERRORS_V6
    else:
        raise PacketError("icmp_bad_version")
    if n < off + 8:
        raise PacketError("icmp_truncated")
    if data[off] not in errors:
        return None

    q = off + 8  # the quoted packet
    quoted = _quoted_transport(data, q, version)
    if quoted is None:
        return None
    proto, l4 = quoted
    qaddr = q + (12 if version == 4 else 8)
    qsrc, qdst = data[qaddr:qaddr + alen], data[qaddr + alen:qaddr + 2 * alen]
    sport, dport = data[l4:l4 + 2], data[l4 + 2:l4 + 4]

    hdr = lookup(proto, qdst + qsrc + dport + sport)  # swap(Q0)
    if hdr is None:
        return None
    osrc = data[aoff:aoff + alen]
    odst = data[aoff + alen:aoff + 2 * alen]
    if odst != qsrc:
        return None  # errors go to the source of the packet they quote: this one does not
    new_qsrc, new_qdst = hdr[alen:2 * alen], hdr[:alen]
    new_sport, new_dport = hdr[2 * alen + 2:2 * alen + 4], hdr[2 * alen:2 * alen + 2]
    new_osrc = new_qdst if osrc == qdst else osrc
    new_odst = new_qsrc

    buf = bytearray(data)
    buf[qaddr:qaddr + 2 * alen] = new_qsrc + new_qdst
    buf[l4:l4 + 4] = new_sport + new_dport
    if version == 4:
        c = q + 10
        buf[c:c + 2] = U16[apply(data[c] << 8 | data[c + 1], delta(qsrc + qdst,
                                                                   new_qsrc + new_qdst))]
    co = l4 + (16 if proto == TCP else 6)
    if co + 2 <= n:  # the quoted TCP/UDP checksum is in the quote: it covers the full packet
        c = data[co] << 8 | data[co + 1]
        d = delta(qsrc + qdst + sport + dport, new_qsrc + new_qdst + new_sport + new_dport)
        if proto == TCP:
            c = apply(c, d)
        elif c:  # UDP: 0 means "no checksum" and stays so
            c = apply(c, d) or 0xFFFF
        buf[co:co + 2] = U16[c]

    buf[aoff:aoff + 2 * alen] = new_osrc + new_odst
    buf[off + 2:off + 4] = b"\0\0"
    if version == 4:
        buf[10:12] = U16[apply(data[10] << 8 | data[11], delta(osrc + odst, new_osrc + new_odst))]
        csum = full(buf[off:])
    else:
        length = n - off
        pseudo = (new_osrc + new_odst + U16[length >> 16] + U16[length & 0xFFFF]
                  + _PSEUDO_NEXT_ICMPV6)
        csum = full(buf[off:], sum16(pseudo))
    buf[off + 2:off + 4] = U16[csum]
    return bytes(buf)


def _quoted_transport(data: bytes, q: int, version: int) -> tuple[int, int] | None:
    """``(protocol, TCP/UDP header offset)`` of the packet quoted at ``q``; None if not TCP/UDP.

    The quote must hold at least 8 bytes of the transport header (RFC 792 guarantees them;
    ICMPv6 quotes as much as fits in 1280 bytes). A non-first fragment quotes no ports: None.
    """
    n = len(data)
    if version == 4:
        if n < q + 20:
            raise PacketError("icmp_truncated_quote")
        hl = (data[q] & 0x0F) * 4
        if data[q] >> 4 != 4 or hl < 20:
            raise PacketError("icmp_bad_quote")
        proto = data[q + 9]
        if proto != TCP and proto != UDP:
            return None
        if data[q + 6] & 0x1F or data[q + 7]:
            return None  # fragment offset > 0: no transport header in it
        l4 = q + hl
    else:
        if n < q + 40:
            raise PacketError("icmp_truncated_quote")
        if data[q] >> 4 != 6:
            raise PacketError("icmp_bad_quote")
        proto, l4, frag = walk_v6(data, q, _QUOTE_REASONS)
        if frag >= 0 and (data[frag + 2] << 8 | data[frag + 3]) & 0xFFF8:
            return None  # fragment offset > 0: no transport header in it
        if proto != TCP and proto != UDP:
            return None  # ICMPv6, ESP, no next header, ...: not a balanced protocol
    if n < l4 + 8:
        raise PacketError("icmp_truncated_quote")
    return proto, l4


def is_echo_request(data: bytes, off: int) -> bool:
    """Whether ``data``, an ICMP (IPv4) or ICMPv6 message at ``off``, is an echo request."""
    if len(data) < 20 or off >= len(data):
        return False
    version = data[0] >> 4
    if version == 4:
        return data[9] == ICMP and data[off] == ECHO_REQUEST_V4
    if version == 6:
        return data[off] == ECHO_REQUEST_V6
    return False
