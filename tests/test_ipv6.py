"""Engine: IPv6 rewrites in every mode, both directions.

Worked examples (TCP both ways, UDP with a checksum of 0, an extension header before TCP), then
a property test (hypothesis, derandomized): IPv6 TCP/UDP packets of established flows, drawn
field by field (ports, traffic class, flow label, hop limit, payload, TCP flags and options,
sometimes hop-by-hop and destination options headers or an atomic fragment header, sometimes a
UDP checksum of 0), in every mode and both directions: the rewrite is exactly scapy's build of
the same packet with the new addresses and ports (and the clamped MSS of a SYN), every checksum
computed by scapy. Then mutations of them (byte flips, truncations, extensions, with the payload
length and checksums sometimes made consistent again): ``handle`` never raises (nor hits its
internal-error net), and any bytes it returns for an input whose checksums were right (or a UDP
checksum of 0, which the engine computes) have right checksums too, by the pseudo-header sum
and by scapy's full recomputation.

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

from typing import Any

import pytest
from dual_stack import (
    B6,
    C6,
    MODES,
    SNAT6,
    VERDICTS,
    VIP6,
    checksums_ok,
    ends,
    engine_for,
    ext_header,
    make_engine,
    mutate,
    open_flow,
    rebuilt,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Packet, Raw
from strategies import PROPS, TCP_FLAGS, clients6, mutations, ports, tcp_options

from nfqlb.verdict import Held

MSS_CLAMP = 1460  # the default daemon.mss_clamp


# ---------------------------------------------------------------- examples

@pytest.mark.parametrize("mode", ["dnat", "fullnat", "local"])
def test_ipv6_tcp_both_directions(mode: str) -> None:
    eng = engine_for(mode, v6=True)
    syn = IPv6(src=C6, dst=VIP6) / TCP(sport=4000, dport=80, flags="S", seq=1)
    out = eng.handle(bytes(syn), 0.0)
    assert isinstance(out, bytes)
    got = IPv6(out)
    want_dst = VIP6 if mode == "local" else B6[0]
    want_src = SNAT6 if mode == "fullnat" else C6
    assert (got.src, got.dst, got[TCP].dport) == (want_src, want_dst, 8080)
    expect = IPv6(src=want_src, dst=want_dst) / TCP(sport=got[TCP].sport, dport=8080,
                                                    flags="S", seq=1)
    assert out == rebuilt(expect)
    # the reply, then established data both ways on the fast path
    synack = IPv6(src=want_dst, dst=want_src) / TCP(sport=8080, dport=got[TCP].sport,
                                                    flags="SA", seq=9, ack=2)
    back = eng.handle(bytes(synack), 0.1)
    assert back == rebuilt(IPv6(src=VIP6, dst=C6) / TCP(sport=80, dport=4000, flags="SA",
                                                         seq=9, ack=2))
    ack = IPv6(src=C6, dst=VIP6) / TCP(sport=4000, dport=80, flags="A", seq=2, ack=10)
    eng.handle(bytes(ack), 0.2)
    before = eng.stats()["rewritten"]
    data = IPv6(src=C6, dst=VIP6) / TCP(sport=4000, dport=80, flags="PA", seq=2, ack=10) / (
        b"x" * 1000)
    out = eng.handle(bytes(data), 0.3)
    assert out == rebuilt(IPv6(src=want_src, dst=want_dst) / TCP(
        sport=got[TCP].sport, dport=8080, flags="PA", seq=2, ack=10) / (b"x" * 1000))
    assert eng.stats()["rewritten"] == before + 1


def test_ipv6_udp_zero_checksum_is_computed() -> None:
    eng = engine_for("dnat", v6=True, proto="udp")
    pkt = IPv6(src=C6, dst=VIP6) / UDP(sport=5000, dport=80, chksum=0) / b"q"
    raw = bytes(pkt)
    assert raw[46:48] == b"\0\0"
    for _ in range(2):  # new flow, then known flow: both compute it
        out = eng.handle(raw, 0.0)
        assert isinstance(out, bytes)
        assert out[46:48] != b"\0\0"
        assert out == rebuilt(IPv6(src=C6, dst=B6[0]) / UDP(sport=5000, dport=8080) / b"q")


def test_ipv6_extension_header_before_tcp() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt

    eng = engine_for("dnat", v6=True)
    pkt = IPv6(src=C6, dst=VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=4001, dport=80, flags="S")
    out = eng.handle(bytes(pkt), 0.0)
    assert out == rebuilt(IPv6(src=C6, dst=B6[0]) / IPv6ExtHdrDestOpt() / TCP(
        sport=4001, dport=8080, flags="S"))


# ---------------------------------------------------------------- established flows, mutated

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
            p = p / ext_header(IPv6ExtHdrHopByHop, hbh)
        if dest is not None:
            p = p / ext_header(IPv6ExtHdrDestOpt, dest)
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
        assert got in VERDICTS or isinstance(got, (bytes, Held))
        ok_in = checksums_ok(bad, zero_udp_ok=True)
        event(f"mutant: {'bytes' if isinstance(got, bytes) else got}, "
              f"checksums {'ok' if ok_in else 'bad'}")
        if isinstance(got, bytes) and ok_in:
            assert checksums_ok(got), (bad.hex(), got.hex())
            assert_scapy_recomputes(got)
    assert "internal_error" not in eng.counters.drops, eng.counters.drops

