"""TCP by index on ``bytes``: finding the MSS option, and the segments nfqlb writes itself (the
RST answering a packet of a flow it does not know)."""

from __future__ import annotations

import struct
from typing import Final

from nfqlb.wire.checksum import full
from nfqlb.wire.ip import TCP

_TCP: Final = struct.Struct("!HHIIBBHHH")
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10


MSS: Final = 2  # option kinds (RFC 9293, RFC 7323)
WSCALE: Final = 3
TIMESTAMP: Final = 8


def tcp_option(data: bytes, off: int, kind: int, length: int) -> int:
    """Offset of the value of option ``kind`` (total ``length`` bytes) in the TCP header at
    ``off``, or -1 (well-formed input: the header's data offset is checked by the caller)."""
    end = off + (data[off + 12] >> 4) * 4
    i = off + 20
    while i < end:
        k = data[i]
        if k == 0:
            break
        if k == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        size = data[i + 1]
        if size < 2 or i + size > end:
            break
        if k == kind and size == length:
            return i + 2
        i += size
    return -1


def tcp_mss_offset(data: bytes, off: int) -> int:
    """Offset of the 2-byte MSS value in the TCP options at ``off``, or -1."""
    return tcp_option(data, off, MSS, 4)


def tcp_wscale(data: bytes, off: int) -> int:
    """The window scale shift the TCP options at ``off`` announce (capped at 14, RFC 7323
    2.3), or -1 when there is none."""
    pos = tcp_option(data, off, WSCALE, 3)
    return -1 if pos < 0 else min(data[pos], 14)


#: Linux's options on a SYN and SYN-ACK when every one is on: MSS, SACK permitted, timestamps,
#: NOP, window scale (40-byte header); what ``syn_options`` recognises without a scan.
_LINUX_SACK_TS: Final = b"\x04\x02\x08\x0a"
_LINUX_NOP_WS: Final = b"\x01\x03\x03"


def syn_options(data: bytes, off: int) -> tuple[int, int]:
    """(window scale shift as ``tcp_wscale``, offset of the MSS value or -1) of the SYN or
    SYN-ACK whose TCP header is at ``off``: Linux's usual layout is read in place, any other
    is scanned (``tcp_option``)."""
    if (data[off + 12] >> 4 == 10 and data[off + 20] == 2 and data[off + 21] == 4
            and data[off + 24:off + 28] == _LINUX_SACK_TS
            and data[off + 36:off + 39] == _LINUX_NOP_WS):
        ws = data[off + 39]
        return (ws if ws < 14 else 14), off + 22
    return tcp_wscale(data, off), tcp_mss_offset(data, off)


def tcp_tsval(data: bytes, off: int) -> int:
    """The TSval of the timestamp option (RFC 7323) in the TCP header at ``off``, or -1 when
    there is none."""
    head = data[off + 20:off + 24]
    if head == b"\x01\x01\x08\x0a" and (data[off + 12] >> 4) >= 8:
        pos = off + 24  # (NOP, NOP, timestamps: where Linux puts it after the handshake)
    elif head[:2] == b"\x02\x04" and data[off + 24:off + 28] == b"\x04\x02\x08\x0a" \
            and (data[off + 12] >> 4) >= 10:
        pos = off + 28  # (MSS, SACK permitted, timestamps: a Linux SYN's)
    else:
        pos = tcp_option(data, off, TIMESTAMP, 10)
        if pos < 0:
            return -1
    return data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]


def build_rst(data: bytes, off: int, v6: bool) -> bytes:
    """A RST from the packet's destination back to its source (RFC 9293 3.10.7.1)."""
    sport, dport, seq, ack, doff_byte, flags = struct.unpack_from("!HHIIBB", data, off)
    payload = len(data) - off - (doff_byte >> 4) * 4
    if flags & _ACK:
        rseq, rack, rflags = ack, 0, _RST
    else:
        length = payload + (1 if flags & _SYN else 0) + (1 if flags & _FIN else 0)
        rseq, rack, rflags = 0, (seq + length) & 0xFFFFFFFF, _RST | _ACK
    if v6:
        src, dst = data[24:40], data[8:24]
    else:
        src, dst = data[16:20], data[12:16]
    return _segment(src, dst, dport, sport, rseq, rack, rflags)


def build_rst_to(header: bytes, seq: int) -> bytes:
    """A RST with sequence number ``seq`` from ``header``'s source to its destination
    (``header``: ``src addr | dst addr | src port | dst port``, 12 bytes for IPv4, 36 for
    IPv6: a flow entry's header). With ``seq`` the receiver's next expected byte, the
    receiver takes it (RFC 5961 3.2): how nfqlb ends both sides of a flow it gives up."""
    alen = (len(header) - 4) // 2
    src, dst = header[:alen], header[alen:2 * alen]
    sport, dport = struct.unpack_from("!HH", header, 2 * alen)
    return _segment(src, dst, sport, dport, seq, 0, _RST)


def _segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
             flags: int) -> bytes:
    """An IP packet of one TCP segment without options or payload, checksums computed."""
    tcp = _TCP.pack(sport, dport, seq, ack, 5 << 4, flags, 0, 0, 0)
    if len(src) == 16:
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), TCP)
        ip = struct.pack("!IHBB", 0x60000000, len(tcp), TCP, 64) + src + dst
    else:
        pseudo = src + dst + struct.pack("!xBH", TCP, len(tcp))
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", full(ip)) + ip[12:]
    return ip + tcp[:16] + struct.pack("!H", full(pseudo + tcp)) + tcp[18:]
