"""Scapy crafting helpers shared by the byte-level tests.

Inputs are built with scapy; expected outputs are built with scapy too, from the input with
the rewritten fields set and the checksums deleted, so scapy recomputes them from scratch.
Nothing here uses nfqlb's own checksum code. ``run_fixtures`` drives a fixture table
(description, input packet, expected verdict or field changes) through an engine.
"""

from __future__ import annotations

import struct
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import checksum

from nfqlb.config import parse_config
from nfqlb.engine import Engine

CLIENT = "198.18.0.2"
VIP = "198.18.100.1"
B1, B2 = "198.18.1.2", "198.18.1.3"
SNAT = "198.18.1.1"
OTHER = "198.18.50.9"  # neither a VIP nor a backend


def service(mode: str, proto: str = "tcp", **extra: Any) -> dict[str, Any]:
    """A service on VIP port 80 (tcp) or 53 (udp) over backends B1 and B2, port 8080."""
    svc: dict[str, Any] = {
        "name": f"{mode}-{proto}", "vip": VIP, "port": 80 if proto == "tcp" else 53,
        "protocol": proto, "mode": mode,
        "unknown_flow": "drop",  # a TCP non-SYN with no flow is dropped (counted no_flow)
        "backend": [{"name": "b1", "address": B1, "port": 8080},
                    {"name": "b2", "address": B2, "port": 8080}],
    }
    if mode == "fullnat":
        svc.update(snat_address=SNAT, snat_ports="20000-20009")
    if mode == "local":  # backends are processes on this host: keep the destination address
        svc["backend"] = [{"name": "b1", "port": 8080}, {"name": "b2", "port": 8081}]
    svc.update(extra)
    return svc


def engine(*services: dict[str, Any], **top: Any) -> Engine:
    return Engine(parse_config({"service": list(services), **top}, "test"))


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "A", payload: bytes = b"",
        options: Any = (), ip_options: Any = (), seq: int = 1000, ack: int = 0) -> bytes:
    pkt = IP(src=src, dst=dst, id=7, flags="DF", options=list(ip_options)) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192,
        options=list(options)) / payload
    return bytes(pkt)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x",
        ip_options: Any = (), zero_checksum: bool = False) -> bytes:
    pkt = IP(src=src, dst=dst, id=7, options=list(ip_options)) / UDP(sport=sport, dport=dport)
    if zero_checksum:
        pkt[UDP].chksum = 0
    return bytes(pkt / payload)


def rewritten(data: bytes, src: str | None = None, dst: str | None = None,
              sport: int | None = None, dport: int | None = None,
              mss: int | None = None) -> bytes:
    """``data`` with the given fields replaced and every checksum recomputed by scapy.

    A UDP checksum of 0 (none) stays 0, as RFC 768 wants of a rewriter.
    """
    pkt = IP(data)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    for obj, name, value in ((pkt, "src", src), (pkt, "dst", dst), (l4, "sport", sport),
                             (l4, "dport", dport)):
        if value is not None:
            setattr(obj, name, value)
    if mss is not None:
        l4.options = [("MSS", mss) if o[0] == "MSS" else o for o in l4.options]
    del pkt.chksum
    if isinstance(l4, UDP) and l4.chksum == 0:
        return bytes(pkt)
    del l4.chksum
    return bytes(pkt)


def reverse_of(out: bytes) -> tuple[str, str, int, int]:
    """(src, dst, sport, dport) of a reply to the packet ``out``."""
    pkt = IP(out)
    return pkt.dst, pkt.src, pkt.payload.dport, pkt.payload.sport


def checksums_ok(data: bytes) -> bool:
    """IP header and TCP/UDP checksums verify (scapy's ``checksum`` over the raw bytes)."""
    if len(data) < 20:
        return False
    hl = (data[0] & 0x0F) * 4
    if hl < 20 or len(data) < hl or checksum(data[:hl]) != 0:
        return False
    proto, l4 = data[9], data[hl:]
    if proto not in (6, 17):
        return True
    pseudo = data[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    if proto == 17 and len(l4) >= 8 and l4[6:8] == b"\0\0":
        return True
    return len(l4) >= (20 if proto == 6 else 8) and checksum(pseudo + l4) == 0


def fix_checksums(data: bytes) -> bytes:
    """Best effort: recompute the IP and L4 checksums of raw, possibly odd, bytes."""
    b = bytearray(data)
    if len(b) < 20:
        return data
    hl = (b[0] & 0x0F) * 4
    if hl < 20 or len(b) < hl:
        return data
    b[10:12] = b"\0\0"
    b[10:12] = struct.pack("!H", checksum(bytes(b[:hl])))
    proto, co = b[9], hl + (16 if b[9] == 6 else 6)
    if proto in (6, 17) and len(b) >= co + 2:
        zero_udp = proto == 17 and b[co:co + 2] == b"\0\0"
        b[co:co + 2] = b"\0\0"
        pseudo = bytes(b[12:20]) + struct.pack("!BBH", 0, proto, len(b) - hl)
        c = checksum(pseudo + bytes(b[hl:]))
        if proto == 17:
            c = 0 if zero_udp else (c or 0xFFFF)
        b[co:co + 2] = struct.pack("!H", c)
    return bytes(b)


def scapy_recomputed(out: bytes) -> bytes:
    """``out`` as scapy rebuilds it with the IP and TCP/UDP checksums deleted."""
    pkt = IP(out)
    del pkt.chksum
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    if l4 is not None and not (isinstance(l4, UDP) and l4.chksum == 0):
        del l4.chksum
    return bytes(pkt)


Fixture = tuple[str, bytes, Any]  # description, input packet, ACCEPT | DROP | field changes


def run_fixtures(eng, fixtures: list[Fixture], now: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    """Each input through ``eng`` in turn: the expected verdict, or exactly
    ``rewritten(input, **changes)`` with right checksums."""
    for desc, data, want in fixtures:
        expected = rewritten(data, **want) if isinstance(want, dict) else want
        got = eng.handle(data, now)
        if isinstance(expected, bytes):
            assert isinstance(got, bytes), f"{desc}: verdict {got}, not rewritten"
            assert IP(got).show2(dump=True) == IP(expected).show2(dump=True), desc
            assert got == expected, desc
            assert checksums_ok(got), desc
        else:
            assert got == expected, desc
    assert "internal_error" not in eng.counters.drops


class Conversation:
    """One client connection through ``eng``; replies are addressed as the backend saw it."""

    def __init__(self, eng: Engine, sport: int = 40000, proto: str = "tcp", src: str = CLIENT,
                 dst: str = VIP, dport: int | None = None) -> None:
        self.eng = eng
        self.proto = proto
        self.fwd = (src, dst, sport, dport if dport is not None else (80 if proto == "tcp" else 53))
        self.back: tuple[str, str, int, int] | None = None  # learned from the first rewrite
        self.sent: bytes = b""  # the last input packet

    def _build(self, addr: tuple[str, str, int, int], flags: str, payload: bytes,
               **kw: Any) -> bytes:
        if self.proto == "tcp":
            return tcp(*addr, flags=flags, payload=payload, **kw)
        return udp(*addr, payload=payload or b"x", **kw)

    def client(self, flags: str = "A", payload: bytes = b"", now: float = 0.0,
               **kw: Any) -> bytes | int:
        self.sent = self._build(self.fwd, flags, payload, **kw)
        out = self.eng.handle(self.sent, now)
        if isinstance(out, bytes):
            self.back = reverse_of(out)
        return out

    def server(self, flags: str = "A", payload: bytes = b"", now: float = 0.0,
               **kw: Any) -> bytes | int:
        assert self.back is not None, "no forward packet was rewritten yet"
        self.sent = self._build(self.back, flags, payload, **kw)
        return self.eng.handle(self.sent, now)

    def handshake(self, now: float = 0.0) -> None:
        for side, flags in ((self.client, "S"), (self.server, "SA"), (self.client, "A")):
            assert isinstance(side(flags, now=now), bytes)
