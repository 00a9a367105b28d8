"""Fuzzing figure: arbitrary and mutated packets through ``Engine.handle``, every mode.

Engines: every mode (local, dnat, fullnat) x protocol (TCP, UDP) x family (IPv4, IPv6) as
services of one configuration, once per ``unknown_flow`` variant (reset, drop, hash; fullnat
keeps reset under "hash", which it refuses), plus one tight engine (16 flows, 8 fragments, a
fullnat pool of 4 ports, short timeouts) where eviction, pool exhaustion and the fragment
buffer are reached all the time.

Packets: a corpus built once with scapy, both directions of flows of every service (SYN,
SYN/ACK, data, FIN, RST, UDP requests and answers), with TCP options, IPv4 options, IPv6
extension headers (hop-by-hop, destination options, routing with no segments left, fragment),
fragments of both families in every order, ICMP and ICMPv6 errors quoting packets of the flows
(fragmentation needed, packet too big, unreachable, time exceeded, parameter problem), echo
requests, and strangers. Each fuzzed packet is a corpus packet with 1-4 mutations (a byte
flipped, cut, extended, an address or port swapped for an interesting one, TCP flags, IPv4
fragment bits, the next-header byte), then with the lengths and checksums made consistent
again or not; or plain random bytes, with or without an IP-looking first byte. The clock
moves by small random steps with now and then a jump past every timeout; ``handle_timer``
runs whenever ``get_timer`` says so.

Checked for every packet: the engine returns a verdict and never counts ``internal_error``;
every packet it hands back as bytes (rewritten, a RST it built, a held fragment released) is
well-formed (IP lengths agree, headers hold together) and, when the packet it came from had
correct checksums, has correct ones too: the IPv4 header, TCP, UDP, ICMP and ICMPv6 (over the
pseudo-header), computed here by a separate implementation (RFC 1071 over struct words), and
cross-checked against scapy's ``checksum`` on every 50th packet.

    python bench/fuzz_engine.py [--count 200000] [--seed 1]

Exit status 1 if anything failed (the first failures are printed with their bytes in hex).
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import struct
import sys
import time
from typing import Any

from nfqlb.config import parse_config
from nfqlb.engine import ACCEPT, DROP, Engine, Held

# ---------------------------------------------------------------- addresses (test ranges only)

FAM: dict[int, dict[str, Any]] = {
    4: {"client": "198.18.0.2", "client2": "198.18.0.77", "vip": "198.18.100.1",
        "b1": "198.18.1.2", "b2": "198.18.1.3", "snat": "198.18.1.1", "router": "198.18.77.1",
        "other": "198.18.50.9"},
    6: {"client": "2001:db8::2", "client2": "2001:db8::77", "vip": "2001:db8:100::1",
        "b1": "2001:db8:1::2", "b2": "2001:db8:1::3", "snat": "2001:db8:1::1",
        "router": "2001:db8:77::1", "other": "2001:db8:50::9"},
}
MODES = ("local", "dnat", "fullnat")
PROTOS = ("tcp", "udp")
#: service port per (mode, proto); backend ports per mode
VPORT = {(m, p): base + i for i, m in enumerate(MODES) for p, base in (("tcp", 80), ("udp", 53))}
BPORT = {"local": (8070, 8071), "dnat": (8080, 8080), "fullnat": (8090, 8090)}
POOL = {("tcp", False): "20000-20099", ("udp", False): "20100-20199",
        ("tcp", True): "20000-20003", ("udp", True): "20100-20103"}
INTERESTING_PORTS = sorted({*VPORT.values(), 8070, 8071, 8080, 8090, 20000, 20001, 20100,
                            40000, 40001, 0, 65535})


def services(unknown_flow: str, tight: bool) -> list[dict[str, Any]]:
    out = []
    for family, f in FAM.items():
        for mode in MODES:
            for proto in PROTOS:
                svc: dict[str, Any] = {
                    "name": f"{mode}-{proto}-{family}", "vip": f["vip"],
                    "port": VPORT[mode, proto], "protocol": proto, "mode": mode,
                    "backend": [{"address": f["b1"], "port": BPORT[mode][0]},
                                {"address": f["b2"], "port": BPORT[mode][1]}],
                }
                if proto == "tcp":
                    svc["unknown_flow"] = ("reset" if mode == "fullnat" and unknown_flow == "hash"
                                           else unknown_flow)
                if mode == "local":
                    svc["backend"] = [{"port": BPORT[mode][0]}, {"port": BPORT[mode][1]}]
                if mode == "fullnat":
                    svc.update(snat_address=f["snat"], snat_ports=POOL[proto, tight])
                out.append(svc)
    return out


#: The engines' log: warnings at a rate limit (table full, pool empty) are expected here;
#: errors (an internal error's traceback) are not, and are printed.
LOG = logging.getLogger("fuzz")
LOG.setLevel(logging.ERROR)


def engines() -> dict[str, Engine]:
    out = {}
    for uf in ("reset", "drop", "hash"):
        out[f"unknown_flow={uf}"] = Engine(parse_config({"service": services(uf, False)},
                                                        "fuzz"), rng=random.Random(1), log=LOG)
    tight = {"service": services("reset", True),
             "daemon": {"max_flows": 16, "max_fragments": 8},
             "timeouts": {"tcp": 30, "tcp_fin": 10, "tcp_close": 2, "syn": 5, "udp": 10,
                          "frag": 1}}
    out["tight (16 flows, 8 fragments, 4 ports)"] = Engine(parse_config(tight, "fuzz"),
                                                          rng=random.Random(2), log=LOG)
    return out


# ---------------------------------------------------------------- the corpus (scapy, once)

def build_corpus() -> dict[str, list[bytes]]:
    """Seed packets by kind: both directions of flows of every service ("flow"), fragments
    ("fragment"), ICMP errors ("icmp") and packets of nobody's ("stranger")."""
    from scapy.layers.inet import (
        ICMP,
        IP,
        TCP,
        UDP,
        IPOption_NOP,
        IPOption_Router_Alert,
        IPOption_RR,
        fragment,
    )
    from scapy.layers.inet6 import (
        ICMPv6DestUnreach,
        ICMPv6EchoRequest,
        ICMPv6PacketTooBig,
        ICMPv6ParamProblem,
        ICMPv6TimeExceeded,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
        PadN,
        fragment6,
    )

    probe = Engine(parse_config({"service": services("reset", False)}, "fuzz"),
                   rng=random.Random(0))
    corpus: dict[str, list[bytes]] = {"flow": [], "fragment": [], "icmp": [], "stranger": []}

    def ip(family: int, src: str, dst: str, v4opts: bool = False, v6ext: int = 0) -> Any:
        if family == 4:
            opts = [IPOption_NOP(), IPOption_Router_Alert()] if v4opts else []
            if v4opts and random.random() < 0.5:
                opts = [IPOption_RR(routers=["198.18.0.9"])]
            return IP(src=src, dst=dst, id=random.randrange(65536), options=opts)
        p = IPv6(src=src, dst=dst)
        if v6ext == 1:
            p = p / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 4)])
        elif v6ext == 2:
            p = p / IPv6ExtHdrDestOpt()
        elif v6ext == 3:
            p = p / IPv6ExtHdrRouting(addresses=[], segleft=0)
        elif v6ext == 4:
            p = p / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 2)])
        elif v6ext == 5:
            p = p / IPv6ExtHdrFragment(id=random.randrange(2**32), m=0, offset=0)
        return p

    def tcp_opts() -> list[tuple[str, Any]]:
        return random.choice([[], [("MSS", 1460)], [("MSS", 9000), ("NOP", None),
                              ("WScale", 7), ("SAckOK", b"")], [("Timestamp", (1, 2))],
                              [("NOP", None), ("NOP", None), ("SAck", (5, 9))]])

    def quote_error(family: int, about: bytes, sender: str, to: str) -> list[bytes]:
        """ICMP errors from ``sender`` to ``to`` quoting ``about`` (or its start)."""
        q = about[:random.choice([28, 48, 68, len(about)])] if family == 4 else about[:1232]
        if family == 4:
            errs = [ICMP(type=3, code=4, nexthopmtu=1280), ICMP(type=3, code=3),
                    ICMP(type=11, code=0), ICMP(type=12, code=0)]
            return [bytes(IP(src=sender, dst=to) / e / q) for e in errs]
        errs6 = [ICMPv6PacketTooBig(mtu=1280), ICMPv6DestUnreach(code=4),
                 ICMPv6TimeExceeded(), ICMPv6ParamProblem(code=0, ptr=6)]
        return [bytes(IPv6(src=sender, dst=to) / e / q) for e in errs6]

    for family, f in FAM.items():
        for mode in MODES:
            for proto in PROTOS:
                vport = VPORT[mode, proto]
                for k in range(6):
                    sport = 40000 + k
                    v4opts, v6ext = k % 3 == 1, k % 6
                    client = f["client"] if k % 2 else f["client2"]
                    if proto == "tcp":
                        fwd = [ip(family, client, f["vip"], v4opts, v6ext) / TCP(
                            sport=sport, dport=vport, flags="S", options=tcp_opts())]
                    else:
                        fwd = [ip(family, client, f["vip"], v4opts, v6ext) / UDP(
                            sport=sport, dport=vport) / (b"q" * (k * 300))]
                    syn = bytes(fwd[0])
                    out = probe.handle(syn, 0.0)
                    corpus["flow"].append(syn)
                    if not isinstance(out, bytes):
                        continue
                    corpus["stranger"].append(out)  # as the backend sees it
                    back = IP(out) if family == 4 else IPv6(out)
                    l4 = back[TCP] if proto == "tcp" else back[UDP]
                    bsrc, bdst, bsport, bdport = back.dst, back.src, l4.dport, l4.sport
                    if proto == "tcp":
                        replies = [ip(family, bsrc, bdst, v4opts, v6ext) / TCP(
                            sport=bsport, dport=bdport, flags=fl, options=tcp_opts(),
                            seq=7000, ack=1001) / pl for fl, pl in
                            (("SA", b""), ("PA", b"r" * 500), ("FA", b""), ("RA", b""))]
                        forward = [ip(family, client, f["vip"], v4opts, v6ext) / TCP(
                            sport=sport, dport=vport, flags=fl, seq=1001, ack=7001) / pl
                            for fl, pl in (("A", b""), ("PA", b"GET / " * 40), ("FA", b""),
                                           ("R", b""), ("S", b""))]
                    else:
                        replies = [ip(family, bsrc, bdst, v4opts, v6ext) / UDP(
                            sport=bsport, dport=bdport) / (b"a" * (k * 200))]
                        forward = [ip(family, client, f["vip"], v4opts, v6ext) / UDP(
                            sport=sport, dport=vport) / b"again"]
                    for p in replies[:1]:
                        probe.handle(bytes(p), 0.1)
                    for p in replies + forward:
                        corpus["flow"].append(bytes(p))
                    big_fwd = forward[1] if proto == "tcp" else ip(family, client, f["vip"]) / UDP(
                        sport=sport, dport=vport) / (b"F" * 3000)
                    big_rep = replies[1] if proto == "tcp" else replies[0] / (b"R" * 2000)
                    for big in (big_fwd, big_rep):
                        if family == 4:
                            frags = fragment(IP(bytes(big)), fragsize=random.choice([256, 1024]))
                        else:
                            base = IPv6(bytes(big))
                            p6 = IPv6(src=base.src, dst=base.dst) / IPv6ExtHdrFragment(
                                id=random.randrange(2**32)) / base.payload
                            frags = fragment6(p6, random.choice([1280, 600]))
                        fbytes = [bytes(x) for x in frags]
                        random.shuffle(fbytes)
                        corpus["fragment"].extend(fbytes)
                    # ICMP errors about the flow, each way: from the backend / a router about
                    # the rewritten packet, and from a router on the client's side
                    icmp = corpus["icmp"]
                    icmp += quote_error(family, out, f["b1"] if mode != "local" else f["vip"],
                                        back.src)
                    icmp += quote_error(family, out, f["router"], back.src)
                    icmp += quote_error(family, bytes(replies[1] if proto == "tcp"
                                                      else replies[0]), f["router"], bsrc)
                    icmp += quote_error(family, bytes(forward[0]), f["router"], client)
        # strangers and echo
        other = corpus["stranger"]
        if family == 4:
            other.append(bytes(IP(src=f["client"], dst=f["vip"]) / ICMP(type=8) / b"ping"))
            other.append(bytes(IP(src=f["other"], dst=f["client"]) / TCP(dport=22, flags="S")))
            other.append(bytes(IP(src=f["client"], dst=f["vip"], proto=47) / (b"gre!" * 4)))
        else:
            other.append(bytes(IPv6(src=f["client"], dst=f["vip"]) / ICMPv6EchoRequest()))
            other.append(bytes(IPv6(src=f["other"], dst=f["client"]) / TCP(dport=22, flags="S")))
            other.append(bytes(IPv6(src=f["client"], dst=f["vip"], nh=59)))
    return corpus


# ---------------------------------------------------------------- checksums, separately

def csum(data: bytes) -> int:
    """RFC 1071 one's complement sum, complemented (0 when a packet with its sum verifies)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def layout(data: bytes) -> tuple[int, int, bool] | None:
    """(protocol, transport offset, whole) if the IP headers hold together, else None.

    ``whole`` is False for a fragment (its transport checksum covers bytes it lacks)."""
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
            field = data[off + 2] << 8 | data[off + 3]
            if field & 0xFFF9:
                whole = False
            nh, off = data[off], off + 8
            if field & 0xFFF8:  # a later fragment: what follows is data, not headers
                break
        else:
            break
    if off > n:
        return None
    return nh, off, whole


_MIN_L4 = {6: 20, 17: 8, 1: 8, 58: 8}


def well_formed(data: bytes) -> bool:
    lay = layout(data)
    if lay is None:
        return False
    proto, off, whole = lay
    if whole and proto in _MIN_L4 and len(data) - off < _MIN_L4[proto]:
        return False
    if whole and proto == 6 and not 20 <= (data[off + 12] >> 4) * 4 <= len(data) - off:
        return False
    if whole and proto == 17 and (data[off + 4] << 8 | data[off + 5]) != len(data) - off:
        return False
    return True


def checksums_ok(data: bytes, summer: Any = csum) -> bool:
    """IPv4 header and TCP/UDP/ICMP/ICMPv6 checksums verify (a UDP 0 only under IPv4)."""
    lay = layout(data)
    if lay is None:
        return False
    proto, off, whole = lay
    v6 = data[0] >> 4 == 6
    if not v6 and summer(data[:off]) != 0:
        return False
    if not whole or proto not in (6, 17, 1, 58) or (proto == 1 and v6) or (proto == 58
                                                                          and not v6):
        return True
    l4 = data[off:]
    if len(l4) < _MIN_L4[proto]:
        return False
    if proto == 17 and l4[6:8] == b"\0\0":
        return not v6
    if proto == 1:
        return summer(l4) == 0
    if v6:
        pseudo = data[8:40] + struct.pack("!I3xB", len(l4), proto)
    else:
        pseudo = data[12:20] + struct.pack("!xBH", proto, len(l4))
    return summer(pseudo + l4) == 0


def fix(data: bytearray, lengths: bool, sums: bool) -> bytes:
    """Make the IP length and (best effort) the checksums agree with the bytes again."""
    if lengths:
        if len(data) >= 6 and data[0] >> 4 == 6:
            data[4:6] = struct.pack("!H", (len(data) - 40) & 0xFFFF)
        elif len(data) >= 4:
            data[2:4] = struct.pack("!H", len(data) & 0xFFFF)
    if not sums:
        return bytes(data)
    lay = layout(bytes(data))
    if lay is None:
        return bytes(data)
    proto, off, whole = lay
    v6 = data[0] >> 4 == 6
    if not v6:
        data[10:12] = b"\0\0"
        data[10:12] = struct.pack("!H", csum(bytes(data[:off])))
    co = off + {6: 16, 17: 6, 1: 2, 58: 2}.get(proto, -off - 1)
    if not whole or co <= off or len(data) < co + 2 or (proto == 17 and data[co:co + 2] == b"\0\0"
                                                        and not v6):
        return bytes(data)
    if proto == 17 and len(data) - off >= 6:
        data[off + 4:off + 6] = struct.pack("!H", (len(data) - off) & 0xFFFF)
    data[co:co + 2] = b"\0\0"
    l4 = bytes(data[off:])
    if proto == 1:
        c = csum(l4)
    elif v6:
        c = csum(bytes(data[8:40]) + struct.pack("!I3xB", len(l4), proto) + l4)
    else:
        c = csum(bytes(data[12:20]) + struct.pack("!xBH", proto, len(l4)) + l4)
    data[co:co + 2] = struct.pack("!H", (c or 0xFFFF) if proto == 17 else c)
    return bytes(data)


# ---------------------------------------------------------------- mutations

def _addrs(family: int) -> list[bytes]:
    import ipaddress
    return [ipaddress.ip_address(a).packed for a in FAM[family].values()]


ADDRS = {4: _addrs(4), 6: _addrs(6)}


def mutate(rng: random.Random, data: bytes) -> bytearray:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        lay = layout(bytes(b))
        if kind < 0.25 and b:  # flip a byte
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        elif kind < 0.32:  # cut
            del b[rng.randrange(len(b) + 1):]
        elif kind < 0.38:  # extend
            b += bytes([rng.randrange(256)]) * rng.randint(1, 64)
        elif kind < 0.55 and lay is not None:  # an address swapped for an interesting one
            v6 = b[0] >> 4 == 6
            at = (8 if v6 else 12) + rng.choice((0, 16 if v6 else 4))
            new = rng.choice(ADDRS[6 if v6 else 4])
            b[at:at + len(new)] = new
        elif kind < 0.75 and lay is not None and lay[0] in (6, 17) and len(b) >= lay[1] + 4:
            at = lay[1] + rng.choice((0, 2))  # a port
            port = rng.choice(INTERESTING_PORTS) if rng.random() < 0.6 else rng.randrange(65536)
            b[at:at + 2] = struct.pack("!H", port)
        elif kind < 0.85 and lay is not None and lay[0] == 6 and len(b) >= lay[1] + 14:
            b[lay[1] + 13] = rng.choice((0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x01,
                                         rng.randrange(256)))
        elif kind < 0.92 and b and b[0] >> 4 == 4 and len(b) >= 20:  # fragment bits
            b[6] = rng.choice((0x20, 0x00, 0x40, 0x20 | rng.randrange(32), rng.randrange(256)))
            b[7] = rng.randrange(256)
        elif len(b) >= 40 and b[0] >> 4 == 6:  # the next-header byte
            b[6] = rng.choice((0, 6, 17, 43, 44, 51, 58, 59, 60, rng.randrange(256)))
        elif len(b) >= 20:
            b[9] = rng.choice((1, 6, 17, 58, rng.randrange(256)))
    return b


def reverse(rng: random.Random, out: bytes) -> bytes | None:
    """An answer to ``out`` (a packet nfqlb let through): addresses and ports swapped, TCP
    flags of an answer, checksums made right (what the backend or the client sends back)."""
    lay = layout(out)
    if lay is None or not lay[2] or lay[0] not in (6, 17) or len(out) < lay[1] + 8:
        return None
    proto, off, _ = lay
    b = bytearray(out)
    a, n = (8, 16) if b[0] >> 4 == 6 else (12, 4)
    b[a:a + n], b[a + n:a + 2 * n] = out[a + n:a + 2 * n], out[a:a + n]
    b[off:off + 2], b[off + 2:off + 4] = out[off + 2:off + 4], out[off:off + 2]
    if proto == 6 and len(b) >= off + 20:
        b[off + 13] = rng.choice((0x12, 0x10, 0x18, 0x11, 0x14, 0x04, 0x12, 0x18))
    return fix(b, False, True)


def icmp_about(rng: random.Random, out: bytes) -> bytes | None:
    """An ICMP(v6) error about ``out`` back to its sender, from its destination or a router."""
    lay = layout(out)
    if lay is None:
        return None
    v6 = out[0] >> 4 == 6
    src = rng.choice((out[24:40] if v6 else out[16:20], *ADDRS[6 if v6 else 4]))
    dst = out[8:24] if v6 else out[12:16]
    if v6:
        kind = rng.choice((b"\x02\x00", b"\x01\x04", b"\x03\x00", b"\x04\x00"))
        body = kind + b"\0\0" + struct.pack("!I", 1280) + out[:rng.choice((48, 60, 1232))]
        b = bytearray(struct.pack("!IHBB", 0x60000000, len(body), 58, 64) + src + dst + body)
    else:
        kind = rng.choice((b"\x03\x04", b"\x03\x03", b"\x0b\x00", b"\x0c\x00"))
        body = kind + b"\0\0" + struct.pack("!HH", 0, 1280) + out[:rng.choice((28, 48, 576))]
        b = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(body), 7, 0, 64, 1, 0)
                      + src + dst + body)
    return fix(b, False, True)


class Source:
    """Where each engine's next packet comes from: the corpus by kind, mutated or not, random
    bytes, or an answer or ICMP error to something this engine let through lately."""

    KINDS = (("flow", 0.42), ("fragment", 0.08), ("icmp", 0.08), ("stranger", 0.02),
             ("answer", 0.22), ("error", 0.08), ("random", 0.05), ("ip-random", 0.05))

    def __init__(self, rng: random.Random, corpus: dict[str, list[bytes]]) -> None:
        self.rng = rng
        self.corpus = corpus
        self.recent: list[bytes] = []  # outputs of this engine, a ring of 64
        self.kinds = [k for k, _ in self.KINDS]
        self.weights = [w for _, w in self.KINDS]

    def saw(self, out: bytes) -> None:
        if len(self.recent) < 64:
            self.recent.append(out)
        else:
            self.recent[self.rng.randrange(64)] = out

    def next(self) -> bytes:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "random":
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        if kind == "ip-random":
            head = rng.choice((0x45, 0x46, 0x4F, 0x60, 0x40, 0x6F))
            return bytes([head]) + bytes(rng.randrange(256) for _ in range(rng.randrange(19, 100)))
        base: bytes | None = None
        if kind in ("answer", "error") and self.recent:
            out = rng.choice(self.recent)
            base = reverse(rng, out) if kind == "answer" else icmp_about(rng, out)
        if base is None:
            base = rng.choice(self.corpus[kind if kind in self.corpus else "flow"])
        if rng.random() < 0.45:
            return base  # unchanged: flows open, live and close
        return fix(mutate(rng, base), rng.random() < 0.6, rng.random() < 0.7)


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self) -> None:
        self.verdicts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.checked = 0  # outputs whose checksums were checked
        self.cross_checked = 0  # of which also by scapy's checksum

    def fail(self, what: str, data: bytes, out: Any) -> None:
        shown = out.hex() if isinstance(out, bytes) else repr(out)
        self.failures.append(f"{what}: in={data.hex()} out={shown}")

    def check_output(self, data: bytes, out: bytes, n: int, scapy_sum: Any) -> None:
        if not well_formed(out):
            self.fail("malformed output", data, out)
            return
        if checksums_ok(data):
            self.checked += 1
            if not checksums_ok(out):
                self.fail("bad checksum on output", data, out)
            elif n % 50 == 0:
                self.cross_checked += 1
                if not checksums_ok(out, scapy_sum):
                    self.fail("scapy disagrees on output", data, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="packets in all (default 200000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    from scapy.utils import checksum as scapy_sum

    random.seed(args.seed)  # the corpus's own choices
    t0 = time.perf_counter()
    corpus = build_corpus()
    t_corpus = time.perf_counter() - t0
    engs = engines()
    rng = random.Random(args.seed)
    sources = {name: Source(rng, corpus) for name in engs}
    run = Run()
    per_engine: dict[str, collections.Counter[str]] = {name: collections.Counter()
                                                       for name in engs}
    pending: dict[tuple[str, int], bytes] = {}
    now = {name: 0.0 for name in engs}
    names = list(engs)
    t0 = time.perf_counter()
    for n in range(args.count):
        name = names[n % len(names)]
        eng = engs[name]
        step = rng.random()
        now[name] += 0.01 if step < 0.99 else (rng.uniform(1, 20) if step < 0.999 else 1000.0)
        t = now[name]
        deadline = eng.get_timer()
        if deadline is not None and deadline <= t:
            eng.handle_timer(t)
        data = sources[name].next()
        out = eng.handle(data, t)
        if isinstance(out, bytes):
            kind = "rewritten/built" if out != data else "bytes, unchanged"
            run.check_output(data, out, n, scapy_sum)
            sources[name].saw(out)
        elif isinstance(out, Held):
            kind = "held"
            pending[name, out.hold_id] = data
        elif out is ACCEPT:
            kind = "accept"
        elif out is DROP:
            kind = "drop"
        else:
            kind = "NOT A VERDICT"
            run.fail("not a verdict", data, out)
        per_engine[name][kind] += 1
        for hold_id, final in eng.released_verdicts():
            src = pending.pop((name, hold_id), None)
            if src is None:
                run.fail("released a packet never held", b"", hold_id)
                continue
            per_engine[name]["released " + ("bytes" if isinstance(final, bytes)
                                           else final.name.lower())] += 1
            if isinstance(final, bytes):
                run.check_output(src, final, n, scapy_sum)
                sources[name].saw(final)
    elapsed = time.perf_counter() - t0
    internal = {name: eng.counters.drops.get("internal_error", 0) for name, eng in engs.items()}
    if any(internal.values()):
        run.failures.append(f"internal errors: {internal}")

    seeds = sum(map(len, corpus.values()))
    print(f"corpus: {seeds} seed packets (scapy, {t_corpus:.1f} s); seed {args.seed}")
    print(f"fuzzed: {args.count} packets in {elapsed:.1f} s ({args.count / elapsed:,.0f}/s) "
          f"through {len(engs)} engines, {sum(now.values()) / len(now):.0f} s of engine "
          "clock each")
    total: collections.Counter[str] = collections.Counter()
    for c in per_engine.values():
        total.update(c)
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    for name, eng in engs.items():
        c = per_engine[name]
        drops = eng.counters.drops
        top = ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:6])
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        print(f"    drops {sum(drops.values())} ({top}); internal_error "
              f"{drops.get('internal_error', 0)}; flows {eng.counters.flows_total} installed; "
              f"events " + ", ".join(f"{k} {v}" for k, v in sorted(eng.counters.events.items())))
    print(f"outputs with correct checksums checked: {run.checked} "
          f"(cross-checked with scapy: {run.cross_checked})")
    if run.failures:
        print(f"FAILED: {len(run.failures)} problems; the first ones:")
        for f in run.failures[:10]:
            print("  " + f)
        return 1
    print("OK: 0 internal errors, every output well-formed, every checked checksum correct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
