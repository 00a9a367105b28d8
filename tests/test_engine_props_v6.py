"""Property tests of the engine: IPv6, fragments, ICMP errors (hypothesis, derandomized).

(a) IPv6 TCP/UDP packets of established flows, drawn field by field (ports, traffic class,
    flow label, hop limit, payload, TCP flags and options, sometimes hop-by-hop and destination
    options headers or an atomic fragment header, sometimes a UDP checksum of 0), in every mode
    and both directions: the rewrite is exactly scapy's build of the same packet with the new
    addresses and ports (and the clamped MSS of a SYN), every checksum computed by scapy. Then
    mutations of them (byte flips, truncations, extensions, with the payload length and
    checksums sometimes made consistent again): ``handle`` never raises (nor hits its
    internal-error net), and any bytes it returns for an input whose checksums were right (or
    a UDP checksum of 0, which the engine computes) have right checksums too, by the
    pseudo-header sum and by scapy's full recomputation.
(b) Fragmented datagrams (IPv4 and IPv6, UDP and TCP, fragmented by scapy), the fragments
    shuffled, some dropped, some duplicated: nothing raises; every HOLD id is released at most
    once, as bytes or DROP, and all of them after ``handle_timer(now + frag timeout + 1)``;
    every fragment that comes out is exactly scapy's fragment of the rewritten datagram; when
    every fragment arrived, scapy's reassembly of the output is the rewritten datagram, with a
    right checksum.
(c) ICMP and ICMPv6 errors quoting a packet of a live flow as nfqlb emitted it, from the peer
    or from a router, quoting drawn lengths: translated exactly as scapy builds the error about
    the original packet; then mutated: nothing raises, and any ICMP/ICMPv6 message returned has
    a right checksum.
(d) Engine bugs these found: fragments of a datagram that is not balanced were held and
    dropped (fixed; now a regression test); a quote that ends inside the quoted TCP checksum
    keeps half of the checksum as nfqlb emitted it (a strict xfail).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, defragment, fragment
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    PadN,
    defragment6,
    fragment6,
    in6_chksum,
)
from scapy.packet import Packet, Raw
from scapy.utils import checksum

from nfqlb.config import parse_config
from nfqlb.engine import ACCEPT, DROP, HOLD, Engine

PROPS = settings(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODES = ["local", "dnat", "fullnat"]
FAMILY = {
    4: {"vip": "198.18.100.1", "snat": "198.18.1.1", "b1": "198.18.1.2", "b2": "198.18.1.3",
        "router": "198.18.77.1"},
    6: {"vip": "2001:db8:100::1", "snat": "2001:db8:1::1", "b1": "2001:db8:1::2",
        "b2": "2001:db8:1::3", "router": "2001:db8:77::1"},
}
MSS_CLAMP = 1460  # the default daemon.mss_clamp
FRAG_TIMEOUT = 5.0  # the default timeouts.frag


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


def _ip(family: int, src: str, dst: str) -> Packet:
    return IPv6(src=src, dst=dst) if family == 6 else IP(src=src, dst=dst, id=7, flags="DF")


def open_flow(eng: Engine, mode: str, proto: str, family: int, client: str,
              sport: int) -> None:
    """Open and establish one flow (it goes to b1, round robin's first choice)."""
    vip = FAMILY[family]["vip"]
    bsrc, bsport, bdst, bdport = backend_side(mode, family, client, sport)
    if proto == "tcp":
        steps = [_ip(family, client, vip) / TCP(sport=sport, dport=80, flags="S"),
                 _ip(family, bdst, bsrc) / TCP(sport=bdport, dport=bsport, flags="SA"),
                 _ip(family, client, vip) / TCP(sport=sport, dport=80, flags="A")]
    else:
        steps = [_ip(family, client, vip) / UDP(sport=sport, dport=53) / b"open"]
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


def _top_layer(pkt: Packet) -> Packet | None:
    """The first TCP, UDP or ICMP(v6) layer scapy found (not the ones quoted inside ICMP)."""
    for layer in pkt.iterpayloads():
        if type(layer) in (TCP, UDP, ICMP) or layer.__class__.__name__.startswith("ICMPv6"):
            return layer if hasattr(layer, "chksum") else None
    return None


def assert_scapy_recomputes(out: bytes) -> None:
    """``out`` with its checksums deleted and recomputed by scapy is ``out`` itself, whenever
    scapy re-encodes ``out`` as it is (a mutated option or header may not survive scapy's
    dissection and rebuild; those are checked by ``checksums_ok`` alone)."""
    cls = IPv6 if out[0] >> 4 == 6 else IP
    pkt = cls(out)
    top = _top_layer(pkt)
    if cls is IP:
        pkt.chksum = pkt.chksum  # force a rebuild with the sums kept as they are
    if top is not None:
        top.chksum = top.chksum
    if bytes(pkt) != out:
        return
    if cls is IP:
        del pkt.chksum
    if top is not None and not (isinstance(top, UDP) and top.chksum == 0 and cls is IP):
        del top.chksum
    assert bytes(pkt) == out


# ---------------------------------------------------------------- (a) IPv6 rewrite, mutated

clients6 = st.integers(1, 2**64 - 1).map(
    lambda i: str(ipaddress.IPv6Address("2001:db8::") + i))
clients4 = st.integers(2, 2**16 - 1).map(
    lambda i: str(ipaddress.IPv4Address("198.18.0.0") + i))
ports = st.integers(1, 65535)

tcp_option = st.one_of(
    st.tuples(st.just("NOP"), st.none()),
    st.tuples(st.just("WScale"), st.integers(0, 14)),
    st.tuples(st.just("SAckOK"), st.just(b"")),
    st.tuples(st.just("Timestamp"), st.tuples(st.integers(0, 2**32 - 1),
                                               st.integers(0, 2**32 - 1))),
    st.tuples(st.just("SAck"), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
)
_OPT_LEN = {"NOP": 1, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "SAck": 10, "MSS": 4}
TCP_FLAGS = ["A", "PA", "FA", "R", "RA", "S", "SA", "UA", "PAU", "AE", "AC", "FPA", ""]


@st.composite
def tcp_options(draw: st.DrawFn) -> list[tuple[str, Any]]:
    opts = draw(st.lists(tcp_option, max_size=5))
    if draw(st.booleans()):
        opts.insert(draw(st.integers(0, len(opts))), ("MSS", draw(st.integers(0, 65535))))
    while sum(_OPT_LEN[o[0]] for o in opts) > 40:
        opts.pop()
    return opts


def _ext(kind: type[Packet], pad: int) -> Packet:
    return kind(options=[PadN(optdata=b"\0" * pad)]) if pad else kind()


@st.composite
def v6_established(draw: st.DrawFn) -> tuple[str, str, str, int, bytes, bytes]:
    """(mode, proto, client, sport, packet, expected rewrite): both built by scapy from the
    same drawn fields, the expected one with the new addresses/ports and checksums computed."""
    mode = draw(st.sampled_from(MODES))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    client, sport = draw(clients6), draw(ports)
    from_client = draw(st.booleans())
    (src, dst, sp, dp), (nsrc, ndst, nsp, ndp) = ends(mode, proto, 6, client, sport,
                                                      from_client)
    tc, fl, hlim = draw(st.integers(0, 255)), draw(st.integers(0, 2**20 - 1)), draw(
        st.integers(1, 255))
    hbh = draw(st.none() | st.integers(0, 12))
    dest = draw(st.none() | st.integers(0, 30))
    atomic = draw(st.none() | st.integers(0, 2**32 - 1)) if draw(st.integers(0, 5)) == 0 \
        else None  # an atomic fragment: a fragment header with offset 0 and M 0 (RFC 6946)
    event(f"extension headers: hbh {hbh is not None}, dest {dest is not None}, "
          f"atomic fragment {atomic is not None}")
    payload = draw(st.binary(max_size=1200))
    fields: dict[str, Any]
    if proto == "tcp":
        flags = draw(st.sampled_from(TCP_FLAGS))
        opts = draw(tcp_options())
        fields = {"flags": flags, "seq": draw(st.integers(0, 2**32 - 1)),
                  "ack": draw(st.integers(0, 2**32 - 1)), "window": draw(st.integers(0, 65535)),
                  "urgptr": draw(st.integers(0, 65535)), "options": opts}
        new_opts = opts
        if "S" in flags:
            new_opts = [("MSS", min(v, MSS_CLAMP)) if k == "MSS" else (k, v) for k, v in opts]
    else:
        zero = draw(st.integers(0, 7)) == 0
        event(f"udp checksum 0: {zero}")

    def build(s: str, d: str, spt: int, dpt: int, expected: bool) -> bytes:
        p: Packet = IPv6(src=s, dst=d, tc=tc, fl=fl, hlim=hlim)
        if hbh is not None:
            p = p / _ext(IPv6ExtHdrHopByHop, hbh)
        if dest is not None:
            p = p / _ext(IPv6ExtHdrDestOpt, dest)
        if atomic is not None:
            p = p / IPv6ExtHdrFragment(id=atomic, m=0, offset=0)
        if proto == "tcp":
            f = dict(fields, options=new_opts) if expected else fields
            p = p / TCP(sport=spt, dport=dpt, **f)
        else:  # the expected one always has scapy's checksum: IPv6 UDP must carry one
            p = p / UDP(sport=spt, dport=dpt, chksum=0 if zero and not expected else None)
        return bytes(p / Raw(payload))

    return (mode, proto, client, sport, build(src, dst, sp, dp, False),
            build(nsrc, ndst, nsp, ndp, True))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
)
mutations = st.lists(st.tuples(st.lists(mutation, min_size=1, max_size=3), st.booleans(),
                               st.booleans()), max_size=6)


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
    b = bytearray(data)
    for kind, a, v in muts:
        if kind == "flip" and b:
            b[a % len(b)] ^= v
        elif kind == "cut":
            del b[a % (len(b) + 1):]
        elif kind == "extend":
            b += bytes([v]) * a
    if fix_len:
        fix_lengths(b)
    return fix_checksums(bytes(b)) if fix_sum else bytes(b)


VERDICTS = {ACCEPT, DROP, HOLD}


@settings(PROPS, max_examples=800)
@given(v6_established(), mutations, st.sampled_from(["drop", "reset", "hash"]))
def test_ipv6_rewrite_is_exact_and_mutations_keep_checksums(
        case: tuple[str, str, str, int, bytes, bytes],
        muts: list[tuple[list[tuple[str, int, int]], bool, bool]], unknown: str) -> None:
    mode, proto, client, sport, data, want = case
    if mode == "fullnat" and unknown == "hash":
        unknown = "reset"  # hash cannot work in fullnat (refused by the configuration)
    eng = make_engine(mode, proto, 6, unknown)
    open_flow(eng, mode, proto, 6, client, sport)
    assert checksums_ok(data, zero_udp_ok=True)
    out = eng.handle(data, 1.0)
    assert isinstance(out, bytes)
    assert out == want
    assert checksums_ok(out)
    for steps, fix_len, fix_sum in muts:
        bad = mutate(data, steps, fix_len, fix_sum)
        got = eng.handle(bad, 2.0)
        assert got in VERDICTS or isinstance(got, bytes)
        ok_in = checksums_ok(bad, zero_udp_ok=True)
        event(f"mutant: {'bytes' if isinstance(got, bytes) else got}, "
              f"checksums {'ok' if ok_in else 'bad'}")
        if isinstance(got, bytes) and ok_in:
            assert checksums_ok(got), (bad.hex(), got.hex())
            assert_scapy_recomputes(got)
    assert "internal_error" not in eng.drops, eng.drops


# ---------------------------------------------------------------- (b) fragments

@st.composite
def fragment_case(draw: st.DrawFn) -> dict[str, Any]:
    """The drawn parameters; the packets are built by ``build_fragments`` in the test itself
    (scapy's fragment6 calls ``random``, which hypothesis forbids inside strategies)."""
    family = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(["udp", "udp", "tcp"]))
    from_client = draw(st.booleans())
    if family == 6:
        size = draw(st.integers(56, 1500))  # the largest fragment (scapy's fragment6)
        per = (size - 48) // 8 * 8
    else:
        size = draw(st.integers(1, 185)) * 8  # fragment data size, a multiple of 8
        per = size
    # two to eight fragments, at most ~8 KB
    n = draw(st.integers(2, 8))
    length = draw(st.integers((n - 1) * per + 1, max((n - 1) * per + 1, min(n * per, 8000))))
    pattern = draw(st.binary(min_size=1, max_size=32))
    n_frags = -(-(length + (20 if proto == "tcp" else 8)) // per)
    complete = draw(st.booleans())
    counts = [draw(st.sampled_from([1, 1, 2] if complete else [0, 1, 1, 2]))
              for _ in range(n_frags + 1)]  # (scapy may cut one more than this estimate)
    return {
        "family": family, "mode": draw(st.sampled_from(MODES)), "proto": proto,
        "client": draw(clients6 if family == 6 else clients4), "sport": draw(ports),
        "from_client": from_client,
        # a UDP flow from the client may start with the datagram; the rest needs a flow
        "existing": proto == "tcp" or not from_client or draw(st.booleans()),
        "payload": (pattern * (length // len(pattern) + 1))[:length],
        "ident": draw(st.integers(0, 2**32 - 1 if family == 6 else 2**16 - 1)),
        "zero": proto == "udp" and draw(st.integers(0, 5)) == 0,
        "size": size, "counts": counts,
        "order": draw(st.permutations([i for i, c in enumerate(counts) for _ in range(c)])),
    }


def build_fragments(case: dict[str, Any]) -> tuple[list[bytes], list[bytes], bytes]:
    """(fragments in, the expected fragments out, the expected datagram reassembled): scapy's
    fragments of the datagram and of the rewritten datagram, cut at the same places."""
    family, proto, payload, zero = case["family"], case["proto"], case["payload"], case["zero"]
    (src, dst, sp, dp), (nsrc, ndst, nsp, ndp) = ends(
        case["mode"], proto, family, case["client"], case["sport"], case["from_client"])

    def datagram(s: str, d: str, spt: int, dpt: int, expected: bool, frag: bool) -> Packet:
        if proto == "tcp":
            l4: Packet = TCP(sport=spt, dport=dpt, flags="PA", seq=1000, ack=2000)
        else:  # IPv4 keeps a checksum of 0; IPv6 gets one computed (or the datagram dropped)
            l4 = UDP(sport=spt, dport=dpt,
                     chksum=0 if zero and (family == 4 or not expected) else None)
        if family == 6:
            ip: Packet = IPv6(src=s, dst=d)
            if frag:
                ip = ip / IPv6ExtHdrFragment(id=case["ident"])
        else:
            ip = IP(src=s, dst=d, id=case["ident"])
        p = ip / l4 / Raw(payload)
        return p.__class__(bytes(p))

    def frags(p: Packet) -> list[bytes]:
        if family == 6:
            return [bytes(f) for f in fragment6(p, case["size"])]
        return [bytes(f) for f in fragment(p, fragsize=case["size"])]

    return (frags(datagram(src, dst, sp, dp, False, True)),
            frags(datagram(nsrc, ndst, nsp, ndp, True, True)),
            bytes(datagram(nsrc, ndst, nsp, ndp, True, False)))


@settings(PROPS, max_examples=600)
@given(fragment_case())
def test_fragments_shuffled_dropped_duplicated(case: dict[str, Any]) -> None:
    family, mode, proto = case["family"], case["mode"], case["proto"]
    fin, fout, whole_want = build_fragments(case)
    assert len(fin) == len(fout) > 1
    counts = case["counts"][:len(fin)]
    order = [i for i in case["order"] if i < len(fin)]
    eng = make_engine(mode, proto, family)
    if case["existing"]:
        open_flow(eng, mode, proto, family, case["client"], case["sport"])
    held: dict[int, int] = {}  # hold id -> fragment index
    released: set[int] = set()
    outputs: list[tuple[int, bytes]] = []  # (fragment index, bytes)
    drops = 0

    def collect() -> None:
        nonlocal drops
        for hold_id, verdict in eng.released:
            assert hold_id in held and hold_id not in released, (hold_id, held, released)
            released.add(hold_id)
            if isinstance(verdict, bytes):
                outputs.append((held[hold_id], verdict))
            else:
                assert verdict == DROP
                drops += 1
        eng.released.clear()

    now = 1.0
    for i in order:
        now += 0.001
        got = eng.handle(fin[i], now)
        if got == HOLD:
            assert eng.last_hold_id not in held
            held[eng.last_hold_id] = i
        elif isinstance(got, bytes):
            outputs.append((i, got))
        else:
            assert got == DROP, got  # a fragment is never ACCEPTed unchanged here
            drops += 1
        collect()
    eng.handle_timer(now + FRAG_TIMEOUT + 1)
    collect()
    assert released == set(held), "held fragments never released"
    assert eng.stats()["fragments_held"] == 0
    assert "internal_error" not in eng.drops, eng.drops
    complete = all(counts)
    event(f"{len(fin)} fragments, held {len(held)}, dropped {drops}, complete {complete}")
    # every fragment out is scapy's fragment of the rewritten datagram
    for i, out in outputs:
        assert out == fout[i], f"fragment {i} of {len(fin)}"
    tiny = len(IP(fin[0]).payload if family == 4 else fin[0][48:]) < (
        20 if proto == "tcp" else 8)
    event(f"first fragment too short for the transport header: {tiny}")
    if family == 6 and case["zero"]:  # no checksum can be computed without reassembly:
        assert outputs == []  # the datagram is dropped
    elif tiny:  # no ports in the first fragment (RFC 1858, RFC 7112): all dropped
        assert outputs == []
    elif complete:
        assert {i for i, _ in outputs} == set(range(len(fin)))
        unique = sorted({i: out for i, out in outputs}.items())  # by offset
        if family == 6:
            whole = bytes(defragment6([IPv6(o) for _, o in unique]))
        else:
            parts = defragment([IP(o) for _, o in unique])
            assert len(parts) == 1
            whole = bytes(parts[0])
        assert whole == whole_want
        assert checksums_ok(whole)


# ---------------------------------------------------------------- (c) ICMP errors

@st.composite
def icmp_case(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from([4, 6]))
    mode = draw(st.sampled_from(MODES))
    proto = draw(st.sampled_from(["tcp", "udp"]))
    client = draw(clients6 if family == 6 else clients4)
    sport = draw(ports)
    from_client = draw(st.booleans())  # which way the quoted packet went
    (src, dst, sp, dp), _ = ends(mode, proto, family, client, sport, from_client)
    payload = draw(st.binary(max_size=600))
    dest = draw(st.none() | st.integers(0, 14)) if family == 6 else None
    if proto == "tcp":
        l4: Packet = TCP(sport=sp, dport=dp, flags=draw(st.sampled_from(["A", "PA", "FA"])),
                         seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)))
    else:
        l4 = UDP(sport=sp, dport=dp)
    if family == 6:
        ip: Packet = IPv6(src=src, dst=dst, hlim=draw(st.integers(1, 255)))
        if dest is not None:
            ip = ip / _ext(IPv6ExtHdrDestOpt, dest)
        types = [1, 2, 3, 4]
    else:
        ip = IP(src=src, dst=dst, id=draw(st.integers(0, 65535)), ttl=draw(st.integers(1, 255)),
                flags=draw(st.sampled_from(["", "DF"])),
                options=[IPOption_Router_Alert()] if draw(st.integers(0, 4)) == 0 else [])
        types = [3, 11, 12]
    return {"family": family, "mode": mode, "proto": proto, "client": client, "sport": sport,
            "original": bytes(ip / l4 / Raw(payload)), "from_peer": draw(st.booleans()),
            "type": draw(st.sampled_from(types)), "code": draw(st.integers(0, 15)),
            "rest": draw(st.binary(min_size=4, max_size=4)), "quote": draw(st.integers(0, 2000)),
            "outer_ttl": draw(st.integers(1, 255)),
            "outer_ext": draw(st.integers(0, 4)) == 0}  # outer IPv4 options / IPv6 hop-by-hop


def icmp_error(family: int, src: str, dst: str, ttl: int, head: bytes, quote: bytes,
               outer_ext: bool = False) -> bytes:
    """An ICMP/ICMPv6 error (``head``: type, code and the 4 bytes after the checksum) quoting
    ``quote``, its checksum computed by scapy (ICMPv6: with the pseudo-header)."""
    body = head[:2] + b"\0\0" + head[2:] + quote
    if family == 6:
        c = in6_chksum(58, IPv6(src=src, dst=dst), body)
        ip: Packet = IPv6(src=src, dst=dst, hlim=ttl, nh=58)
        if outer_ext:
            ip = IPv6(src=src, dst=dst, hlim=ttl) / IPv6ExtHdrHopByHop(nh=58)
    else:
        ip = IP(src=src, dst=dst, proto=1, ttl=ttl, id=99,
                options=[IPOption_Router_Alert()] if outer_ext else [])
        c = checksum(body)
    return bytes(ip / Raw(body[:2] + struct.pack("!H", c) + body[4:]))


def _addresses(data: bytes) -> tuple[str, str]:
    p = IPv6(data) if data[0] >> 4 == 6 else IP(data)
    return p.src, p.dst


@settings(PROPS, max_examples=700)
@given(icmp_case(), mutations)
def test_icmp_errors_translated_exactly_and_mutations_keep_checksums(
        case: dict[str, Any], muts: list[tuple[list[tuple[str, int, int]], bool, bool]]) -> None:
    family, mode, proto = case["family"], case["mode"], case["proto"]
    eng = make_engine(mode, proto, family)
    open_flow(eng, mode, proto, family, case["client"], case["sport"])
    original = case["original"]
    emitted = eng.handle(original, 1.0)
    assert isinstance(emitted, bytes)
    ul = upper_layer(emitted)
    assert ul is not None
    qlen = ul[1] + 8 + case["quote"] % (len(emitted) - ul[1] - 7)  # at least 8 bytes of L4
    if proto == "tcp" and qlen == ul[1] + 17:  # a quote that cuts the TCP checksum in two:
        qlen -= 1  # see test_quote_cutting_the_tcp_checksum_in_two (xfail)
    qsrc, qdst = _addresses(emitted)
    osrc, odst = _addresses(original)
    router = FAMILY[family]["router"]
    head = bytes((case["type"], case["code"])) + case["rest"]
    error = icmp_error(family, qdst if case["from_peer"] else router, qsrc, case["outer_ttl"],
                       head, emitted[:qlen], case["outer_ext"])
    want = icmp_error(family, odst if case["from_peer"] else router, osrc, case["outer_ttl"],
                      head, original[:qlen], case["outer_ext"])
    event(f"IPv{family} error type {case['type']} from {'peer' if case['from_peer'] else 'router'}"
          f"{', outer options' if case['outer_ext'] else ''}")
    got = eng.handle(error, 2.0)
    assert got == want
    assert checksums_ok(got)
    for steps, fix_len, fix_sum in muts:
        bad = mutate(error, steps, fix_len, fix_sum)
        got = eng.handle(bad, 3.0)
        assert got in VERDICTS or isinstance(got, bytes)
        event(f"mutant: {'bytes' if isinstance(got, bytes) else got}")
        if not isinstance(got, bytes):
            continue
        ul = upper_layer(got)
        if ul is not None and ul[0] in (1, 58) and ul[2] and (ul[0] == 58) == (family == 6):
            event("mutant translated")
            icmp = got[ul[1]:]
            if family == 4:
                assert checksum(icmp) == 0
                if checksum(bad[:ul[1]]) == 0:
                    assert checksum(got[:ul[1]]) == 0
            else:
                assert in6_chksum(58, IPv6(got), icmp) == 0
        elif checksums_ok(bad, zero_udp_ok=True):
            assert checksums_ok(got)
    assert "internal_error" not in eng.drops, eng.drops


# ---------------------------------------------------------------- engine bugs found here

@pytest.mark.parametrize("family", [4, 6])
def test_fragments_of_an_unbalanced_datagram_pass(family: int) -> None:
    """A fragmented datagram nfqlb does not balance passes whole (found by this file: the
    later fragments used to be held until the fragment timeout, then dropped)."""
    f = FAMILY[family]
    eng = make_engine("dnat", "udp", family)
    # backend b1 sends a large datagram of its own (not from its service port) to some host
    other = "198.18.50.9" if family == 4 else "2001:db8:50::9"
    dgram: Packet
    if family == 6:
        dgram = IPv6(src=f["b1"], dst=other) / IPv6ExtHdrFragment(id=7) / UDP(
            sport=5353, dport=5353) / (b"z" * 3000)
        frags = [bytes(p) for p in fragment6(IPv6(bytes(dgram)), 1280)]
    else:
        dgram = IP(src=f["b1"], dst=other, id=7) / UDP(sport=5353, dport=5353) / (b"z" * 3000)
        frags = [bytes(p) for p in fragment(IP(bytes(dgram)), fragsize=1480)]
    verdicts = [eng.handle(p, 1.0) for p in frags]
    eng.handle_timer(1.0 + FRAG_TIMEOUT + 1)
    released = [v for _, v in eng.released]
    assert verdicts[0] == ACCEPT  # the first fragment: not ours
    # every later fragment passes too (unchanged): at once, or released unchanged
    assert DROP not in released and HOLD not in verdicts, (verdicts, released)


@pytest.mark.xfail(strict=True, reason=(
    "engine bug (minor): an ICMP error whose quote ends in the middle of the quoted TCP "
    "checksum (one byte of it quoted) keeps that byte as nfqlb emitted it: "
    "icmp.translate_error updates the quoted checksum only when both bytes are in the quote "
    "(co + 2 <= n), so the translated quote does not read as the packet the host sent"))
@pytest.mark.parametrize("family", [4, 6])
def test_quote_cutting_the_tcp_checksum_in_two(family: int) -> None:
    f = FAMILY[family]
    client = "198.18.0.9" if family == 4 else "2001:db8::9"
    eng = make_engine("dnat", "tcp", family)
    open_flow(eng, "dnat", "tcp", family, client, 4000)
    original = bytes(_ip(family, client, f["vip"]) / TCP(sport=4000, dport=80, flags="PA") /
                     (b"data" * 10))
    emitted = eng.handle(original, 1.0)
    assert isinstance(emitted, bytes)
    qlen = (40 if family == 6 else 20) + 17  # up to the first byte of the TCP checksum
    head = bytes((11, 0) if family == 4 else (3, 0)) + b"\0\0\0\0"  # time exceeded
    # a router between nfqlb and the backend reports it to the source, the client (dnat)
    error = icmp_error(family, f["router"], client, 60, head, emitted[:qlen])
    want = icmp_error(family, f["router"], client, 60, head, original[:qlen])
    got = eng.handle(error, 2.0)
    assert isinstance(got, bytes) and checksums_ok(got)
    ck = 22 if family == 4 else 42  # the ICMP checksum
    assert got[:ck] == want[:ck] and got[ck + 2:-1] == want[ck + 2:-1]  # all else is right
    assert got[-1] == want[-1]  # the half-quoted checksum byte: the one nfqlb emitted
