"""Helpers for the engine tests that run on both IPv4 and IPv6 (scapy, and raw-byte checks).

Two engine factories, because the tests were written against two service layouts:
- ``engine_for(mode, v6=..., proto=...)``: service "s" on port 80 for TCP and UDP alike, the
  default ``unknown_flow`` (reset), a fullnat pool of 100 ports; expectations are rebuilt by
  scapy with ``rebuilt``.
- ``make_engine(mode, proto, family)``: port 80 (TCP) or 53 (UDP), ``unknown_flow`` drop, a
  fullnat pool of 10 ports; ``open_flow`` establishes the first flow (to b1), ``ends`` says
  how its packets look before and after the rewrite.

``checksums_ok`` here reads IPv4 and IPv6 with TCP, UDP, ICMP and ICMPv6 from the raw bytes
(``helpers.checksums_ok`` is the IPv4 TCP/UDP one); ``fix_checksums`` likewise.
Nothing expected comes from nfqlb: sums are scapy's ``checksum`` over the raw bytes.
"""

from __future__ import annotations

import struct
from typing import Any

from helpers import B1, B2, CLIENT, SNAT, VIP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, PadN
from scapy.packet import Packet
from scapy.utils import checksum
from strategies import apply_mutations

from nfqlb.config import parse_config
from nfqlb.engine import ACCEPT, DROP, Engine

C4, VIP4, SNAT4, B4 = CLIENT, VIP, SNAT, (B1, B2)
C6, VIP6, SNAT6, B6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::1", ("2001:db8:1::2",
                                                                          "2001:db8:1::3")
FAMILY = {
    4: {"vip": VIP4, "snat": SNAT4, "b1": B4[0], "b2": B4[1], "router": "198.18.77.1"},
    6: {"vip": VIP6, "snat": SNAT6, "b1": B6[0], "b2": B6[1], "router": "2001:db8:77::1"},
}
MODES = ["local", "dnat", "fullnat"]
VERDICTS = {ACCEPT, DROP}  # and Held(...) values, for fragments kept for later


# ---------------------------------------------------------------- service "s" on port 80

def engine_for(mode: str, v6: bool = False, proto: str = "tcp", **extra: Any) -> Engine:
    """One service on port 80 of the family's VIP; ``daemon=``, ``timeouts=`` and service keys
    in ``extra``."""
    vip, snat, backends = (VIP6, SNAT6, B6) if v6 else (VIP4, SNAT4, B4)
    svc: dict[str, Any] = {"name": "s", "vip": vip, "port": 80, "protocol": proto, "mode": mode,
                           "backend": [{"address": b, "port": 8080} for b in backends]}
    if mode == "local":
        svc["backend"] = [{"port": 8080}, {"port": 8081}]
    if mode == "fullnat":
        svc.update(snat_address=snat, snat_ports="20000-20099")
    daemon = extra.pop("daemon", {})
    timeouts = extra.pop("timeouts", {})
    svc.update(extra)
    return Engine(parse_config({"service": [svc], "daemon": daemon, "timeouts": timeouts}))


def rebuilt(pkt: Any) -> bytes:
    """scapy's own bytes for ``pkt`` with every checksum recomputed."""
    p = pkt.copy()
    for layer in (IP, TCP, UDP):
        if p.haslayer(layer) and hasattr(p[layer], "chksum"):
            p[layer].chksum = None
    return bytes(p)


# ---------------------------------------------------------------- one flow per family and mode

def make_engine(mode: str, proto: str, family: int, unknown_flow: str = "drop") -> Engine:
    f = FAMILY[family]
    svc: dict[str, Any] = {
        "name": "s", "vip": f["vip"], "port": 80 if proto == "tcp" else 53, "protocol": proto,
        "mode": mode, "unknown_flow": unknown_flow,
        "backend": [{"name": "b1", "address": f["b1"], "port": 8080},
                    {"name": "b2", "address": f["b2"], "port": 8080}],
    }
    if mode == "fullnat":
        svc.update(snat_address=f["snat"], snat_ports="20000-20009")
    if mode == "local":
        svc["backend"] = [{"name": "b1", "port": 8080}, {"name": "b2", "port": 8081}]
    return Engine(parse_config({"service": [svc]}, "test"))


def vport(proto: str) -> int:
    return 80 if proto == "tcp" else 53


def backend_side(mode: str, family: int, client: str, sport: int) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of the client's packets as backend b1 gets them (first flow)."""
    f = FAMILY[family]
    if mode == "local":
        return client, sport, f["vip"], 8080
    if mode == "dnat":
        return client, sport, f["b1"], 8080
    return f["snat"], 20000, f["b1"], 8080


def ends(mode: str, proto: str, family: int, client: str, sport: int,
         from_client: bool) -> tuple[tuple[str, str, int, int], tuple[str, str, int, int]]:
    """((src, dst, sport, dport) as it reaches nfqlb, the same after the rewrite)."""
    vip = FAMILY[family]["vip"]
    bsrc, bsport, bdst, bdport = backend_side(mode, family, client, sport)
    if from_client:
        return (client, vip, sport, vport(proto)), (bsrc, bdst, bsport, bdport)
    return (bdst, bsrc, bdport, bsport), (vip, client, vport(proto), sport)


def ip_header(family: int, src: str, dst: str) -> Packet:
    return IPv6(src=src, dst=dst) if family == 6 else IP(src=src, dst=dst, id=7, flags="DF")


def ext_header(kind: type[Packet], pad: int) -> Packet:
    """An IPv6 options extension header (hop-by-hop, destination) padded by ``pad`` bytes."""
    return kind(options=[PadN(optdata=b"\0" * pad)]) if pad else kind()


def open_flow(eng: Engine, mode: str, proto: str, family: int, client: str,
              sport: int) -> None:
    """Open and establish one flow (it goes to b1, round robin's first choice)."""
    vip = FAMILY[family]["vip"]
    bsrc, bsport, bdst, bdport = backend_side(mode, family, client, sport)
    if proto == "tcp":
        steps = [ip_header(family, client, vip) / TCP(sport=sport, dport=80, flags="S"),
                 ip_header(family, bdst, bsrc) / TCP(sport=bdport, dport=bsport, flags="SA"),
                 ip_header(family, client, vip) / TCP(sport=sport, dport=80, flags="A")]
    else:
        steps = [ip_header(family, client, vip) / UDP(sport=sport, dport=53) / b"open"]
    for p in steps:
        assert isinstance(eng.handle(bytes(p), 0.0), bytes)


# ---------------------------------------------------------------- checksums, from raw bytes

def upper_layer(data: bytes) -> tuple[int, int, bool] | None:
    """(protocol, offset, whole) of the transport header of an IPv4/IPv6 packet; ``whole`` is
    False for a fragment (its transport checksum covers bytes it does not carry). None if the
    headers do not hold together."""
    n = len(data)
    if n < 20:
        return None
    if data[0] >> 4 == 4:
        hl = (data[0] & 0x0F) * 4
        if hl < 20 or n < hl or (data[2] << 8 | data[3]) != n:
            return None
        return data[9], hl, not (data[6] & 0x3F or data[7])
    if data[0] >> 4 != 6 or n < 40 or (data[4] << 8 | data[5]) + 40 != n:
        return None
    nh, off, whole = data[6], 40, True
    for _ in range(10):
        if nh in (0, 43, 60, 51):
            if n < off + 8:
                return None
            size = (data[off + 1] + 2) * 4 if nh == 51 else (data[off + 1] + 1) * 8
            nh, off = data[off], off + size
        elif nh == 44:
            if n < off + 8:
                return None
            if (data[off + 2] << 8 | data[off + 3]) & 0xFFF9:  # an offset, or more fragments
                whole = False
            nh, off = data[off], off + 8
        else:
            break
    if off > n:
        return None
    return nh, off, whole


def checksums_ok(data: bytes, zero_udp_ok: bool = False) -> bool:
    """IPv4 header, TCP, UDP, ICMP and ICMPv6 checksums verify: scapy's ``checksum`` over the
    raw bytes, the upper layers with their pseudo-header (RFC 793/768 and RFC 8200 8.1). A UDP
    checksum of 0 passes under IPv4 (none) and, with ``zero_udp_ok``, under IPv6."""
    ul = upper_layer(data)
    if ul is None:
        return False
    proto, off, whole = ul
    v6 = data[0] >> 4 == 6
    if not v6 and checksum(data[:off]) != 0:
        return False
    if not whole or proto not in (6, 17, 1, 58) or (proto == 1) == v6 and proto in (1, 58):
        return True
    l4 = data[off:]
    if len(l4) < {6: 20, 17: 8, 1: 8, 58: 4}[proto]:
        return False
    if proto == 17 and l4[6:8] == b"\0\0":
        return zero_udp_ok or not v6
    if proto == 1:
        return checksum(l4) == 0
    if v6:
        pseudo = data[8:40] + struct.pack("!I3xB", len(l4), proto)
    else:
        pseudo = data[12:20] + struct.pack("!xBH", proto, len(l4))
    return checksum(pseudo + l4) == 0


# ---------------------------------------------------------------- mutations made consistent

def fix_lengths(data: bytearray) -> None:
    if len(data) >= 6 and data[0] >> 4 == 6:
        data[4:6] = struct.pack("!H", (len(data) - 40) & 0xFFFF)
    elif len(data) >= 4:
        data[2:4] = struct.pack("!H", len(data) & 0xFFFF)


def fix_checksums(data: bytes) -> bytes:
    """Best effort: recompute the IPv4 header and the TCP/UDP/ICMP(v6) checksums of ``data``
    (a UDP checksum of 0 stays 0)."""
    ul = upper_layer(data)
    if ul is None:
        return data
    proto, off, whole = ul
    b = bytearray(data)
    v6 = b[0] >> 4 == 6
    if not v6:
        b[10:12] = b"\0\0"
        b[10:12] = struct.pack("!H", checksum(bytes(b[:off])))
    co = off + {6: 16, 17: 6, 1: 2, 58: 2}.get(proto, -off - 1)
    if not whole or co <= off or len(b) < co + 2 or (proto == 17 and b[co:co + 2] == b"\0\0"):
        return bytes(b)
    b[co:co + 2] = b"\0\0"
    l4 = bytes(b[off:])
    if proto == 1:
        c = checksum(l4)
    elif v6:
        c = checksum(bytes(b[8:40]) + struct.pack("!I3xB", len(l4), proto) + l4)
    else:
        c = checksum(bytes(b[12:20]) + struct.pack("!xBH", proto, len(l4)) + l4)
    b[co:co + 2] = struct.pack("!H", (c or 0xFFFF) if proto == 17 else c)
    return bytes(b)


def mutate(data: bytes, muts: list[tuple[str, int, int]], fix_len: bool,
           fix_sum: bool) -> bytes:
    b = apply_mutations(data, muts)
    if fix_len:
        fix_lengths(b)
    return fix_checksums(bytes(b)) if fix_sum else bytes(b)
