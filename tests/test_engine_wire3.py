"""Engine: IPv6, fragments, packets of unknown flows, the flow cap.

Expected packets are built by scapy with the rewritten fields and every checksum recomputed by
scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Raw

from nfqlb.config import parse_config
from nfqlb.engine import ACCEPT, DROP, HOLD, Engine

C4, VIP4, SNAT4, B4 = "198.18.0.2", "198.18.100.1", "198.18.1.1", ("198.18.1.2", "198.18.1.3")
C6, VIP6, SNAT6, B6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::1", ("2001:db8:1::2",
                                                                          "2001:db8:1::3")


def engine(mode: str, v6: bool = False, proto: str = "tcp", **extra: Any) -> Engine:
    vip, snat, backends = (VIP6, SNAT6, B6) if v6 else (VIP4, SNAT4, B4)
    svc: dict[str, Any] = {"name": "s", "vip": vip, "port": 80, "protocol": proto, "mode": mode,
                           "backend": [{"address": b, "port": 8080} for b in backends]}
    if mode == "local":
        svc["backend"] = [{"port": 8080}, {"port": 8081}]
    if mode == "fullnat":
        svc.update(snat_address=snat, snat_ports="20000-20099")
    daemon = extra.pop("daemon", {})
    svc.update(extra)
    return Engine(parse_config({"service": [svc], "daemon": daemon}))


def rebuilt(pkt: Any) -> bytes:
    """scapy's own bytes for ``pkt`` with every checksum recomputed."""
    p = pkt.copy()
    for layer in (IP, TCP, UDP):
        if p.haslayer(layer) and hasattr(p[layer], "chksum"):
            p[layer].chksum = None
    return bytes(p)


# ------------------------------------------------------------------------------ IPv6

@pytest.mark.parametrize("mode", ["dnat", "fullnat", "local"])
def test_ipv6_tcp_both_directions(mode: str) -> None:
    eng = engine(mode, v6=True)
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
    before = eng.rewritten
    data = IPv6(src=C6, dst=VIP6) / TCP(sport=4000, dport=80, flags="PA", seq=2, ack=10) / (
        b"x" * 1000)
    out = eng.handle(bytes(data), 0.3)
    assert out == rebuilt(IPv6(src=want_src, dst=want_dst) / TCP(
        sport=got[TCP].sport, dport=8080, flags="PA", seq=2, ack=10) / (b"x" * 1000))
    assert eng.rewritten == before + 1


def test_ipv6_udp_zero_checksum_is_computed() -> None:
    eng = engine("dnat", v6=True, proto="udp")
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

    eng = engine("dnat", v6=True)
    pkt = IPv6(src=C6, dst=VIP6) / IPv6ExtHdrDestOpt() / TCP(sport=4001, dport=80, flags="S")
    out = eng.handle(bytes(pkt), 0.0)
    assert out == rebuilt(IPv6(src=C6, dst=B6[0]) / IPv6ExtHdrDestOpt() / TCP(
        sport=4001, dport=8080, flags="S"))


# ------------------------------------------------------------------------------ fragments

def _v4_fragments(size: int, sport: int = 5000) -> list[bytes]:
    from scapy.layers.inet import fragment

    dgram = IP(src=C4, dst=VIP4, id=777) / UDP(sport=sport, dport=80) / (bytes(range(256)) * 40)[
        :size]
    return [bytes(f) for f in fragment(IP(bytes(dgram)), fragsize=1480)]


def _reassemble_v4(frags: list[bytes]) -> Any:
    from scapy.layers.inet import defragment

    whole = defragment([IP(f) for f in frags])
    assert len(whole) == 1
    return IP(bytes(whole[0]))


@pytest.mark.parametrize("mode", ["dnat", "fullnat", "local"])
@pytest.mark.parametrize("size", [3000, 8000])
def test_ipv4_fragments_in_order_follow_the_first(mode: str, size: int) -> None:
    eng = engine(mode, proto="udp")
    frags = _v4_fragments(size)
    assert len(frags) > 1
    outs = [eng.handle(f, 0.0) for f in frags]
    assert all(isinstance(o, bytes) for o in outs)
    whole = _reassemble_v4(outs)  # type: ignore[arg-type]
    want_dst = VIP4 if mode == "local" else B4[0]
    assert whole.dst == want_dst and whole[UDP].dport == 8080
    if mode == "fullnat":
        assert whole.src == SNAT4
    # the reassembled datagram's UDP checksum is right (scapy recomputes and compares)
    assert bytes(whole) == rebuilt(whole)
    for o in outs:  # and each fragment's own IP header checksum
        hdr = IP(o)
        hdr.chksum = None
        assert bytes(hdr)[:20] == o[:20]


def test_ipv4_fragments_out_of_order_are_held_then_released() -> None:
    eng = engine("dnat", proto="udp")
    frags = _v4_fragments(8000)
    later = frags[1:]
    verdicts = [eng.handle(f, 0.0) for f in later]
    assert verdicts == [HOLD] * len(later)
    held_ids = []
    for _ in later:
        held_ids.append(eng.last_hold_id)  # noqa: PERF401  (ids are taken one at a time)
    first = eng.handle(frags[0], 0.1)
    assert isinstance(first, bytes)
    released = dict(eng.released)
    assert len(released) == len(later)
    whole = _reassemble_v4([first, *released.values()])  # type: ignore[list-item]
    assert whole.dst == B4[0] and bytes(whole) == rebuilt(whole)
    assert eng.stats()["fragments_held"] == 0


def test_held_fragments_time_out_and_the_buffer_is_bounded() -> None:
    eng = engine("dnat", proto="udp", daemon={"max_fragments": 3})
    frags = _v4_fragments(8000)[1:]  # 5 later fragments, no first
    verdicts = [eng.handle(f, 0.0) for f in frags]
    assert verdicts == [HOLD, HOLD, HOLD, DROP, DROP]
    assert eng.drops["fragment_buffer_full"] == 2
    deadline = eng.get_timer()
    assert deadline is not None and deadline <= 5.0
    eng.handle_timer(5.0)
    assert sorted(v for _, v in eng.released) == [DROP] * 3
    assert eng.drops["fragment_timeout"] == 3
    assert eng.stats()["fragments_held"] == 0


def test_ipv6_fragments() -> None:
    eng = engine("fullnat", v6=True, proto="udp")
    dgram = IPv6(src=C6, dst=VIP6) / IPv6ExtHdrFragment(id=99) / UDP(sport=5000, dport=80) / (
        b"y" * 3000)
    frags = [bytes(f) for f in fragment6(dgram, 1280)]
    assert len(frags) >= 3
    outs = [eng.handle(f, 0.0) for f in [*frags[1:], frags[0]]]
    assert outs[:-1] == [HOLD] * (len(frags) - 1)
    released = [v for _, v in eng.released]
    for o in [outs[-1], *released]:
        assert isinstance(o, bytes)
        p = IPv6(o)
        assert (p.src, p.dst) == (SNAT6, B6[0])
    from scapy.layers.inet6 import defragment6

    whole = defragment6([IPv6(o) for o in [outs[-1], *released]])
    whole = IPv6(bytes(whole))
    assert whole[UDP].dport == 8080
    assert bytes(whole) == rebuilt(whole)


# ------------------------------------------------------------------------------ unknown flows

def test_unknown_flow_reset_answers_the_client() -> None:
    eng = engine("dnat")  # default unknown_flow = "reset"
    ack = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="PA", seq=100, ack=5000) / b"hi"
    out = eng.handle(bytes(ack), 0.0)
    assert isinstance(out, bytes)
    rst = IP(out)
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport) == (VIP4, C4, 80, 4000)
    assert rst[TCP].flags == "R" and rst[TCP].seq == 5000
    assert out == rebuilt(rst)
    assert eng.events["reset_sent"] == 1
    # a RST is never answered with a RST
    assert eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="R")),
                      0.0) == DROP


def test_unknown_flow_drop() -> None:
    eng = engine("dnat", unknown_flow="drop")
    ack = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="A")
    assert eng.handle(bytes(ack), 0.0) == DROP
    assert eng.drops["no_flow"] == 1


def test_unknown_flow_hash_survives_a_restart() -> None:
    """Flows placed by flow_hash are adopted by a fresh engine on the same backend."""
    before = engine("dnat", policy="flow_hash", unknown_flow="hash")
    choices = {}
    for port in range(4000, 4040):
        out = before.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")), 0)
        assert isinstance(out, bytes)
        choices[port] = IP(out).dst
    assert set(choices.values()) == set(B4)  # both backends used
    after = engine("dnat", policy="flow_hash", unknown_flow="hash")  # "restarted"
    for port, dst in choices.items():
        if port % 2:  # client speaks first
            out = after.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80,
                                                                 flags="A")), 1)
            assert isinstance(out, bytes) and IP(out).dst == dst
        else:  # the backend speaks first (server push): adopted from the reply
            reply = IP(src=dst, dst=C4) / TCP(sport=8080, dport=port, flags="PA") / b"data"
            out = after.handle(bytes(reply), 1)
            assert out == rebuilt(IP(src=VIP4, dst=C4) / TCP(sport=80, dport=port, flags="PA")
                                  / b"data")
    assert after.events["flow_adopted"] == len(choices)
    # a reply from the backend the hash would NOT pick is not ours: passed unchanged
    for port, dst in choices.items():
        other = B4[1] if dst == B4[0] else B4[0]
        stray = IP(src=other, dst=C4) / TCP(sport=8080, dport=port + 1000, flags="A")
        if engine("dnat", policy="flow_hash", unknown_flow="hash").handle(bytes(stray), 0) \
                == ACCEPT:
            break
    else:
        pytest.fail("every stray reply was adopted")


def test_hash_is_refused_in_fullnat() -> None:
    from nfqlb.errors import ConfigError

    with pytest.raises(ConfigError, match=r"service\[0\]\.unknown_flow"):
        engine("fullnat", unknown_flow="hash")


# ------------------------------------------------------------------------------ flow cap

def test_max_flows_evicts_half_open_before_established() -> None:
    eng = engine("dnat", daemon={"max_flows": 10})
    for port in range(3000, 3005):  # five established flows
        syn = eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")), 0)
        assert isinstance(syn, bytes)
        b = IP(syn).dst
        eng.handle(bytes(IP(src=b, dst=C4) / TCP(sport=8080, dport=port, flags="SA")), 0)
        eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="A")), 0)
    for i in range(200):  # a SYN flood
        eng.handle(bytes(IP(src=f"198.19.{i // 200}.{i % 200 + 1}", dst=VIP4) /
                         TCP(sport=1024 + i, dport=80, flags="S")), 1.0 + i / 1000)
    assert eng.table.active == 10
    assert eng.events["evicted"] == 195
    for port in range(3000, 3005):  # the established flows are still there
        data = IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="PA") / b"x"
        out = eng.handle(bytes(data), 2.0)
        assert isinstance(out, bytes) and IP(out)[TCP].dport == 8080
    assert eng.stats()["flows_active"] == 10


def test_pool_exhaustion_refuses_new_flows_and_keeps_old_ones() -> None:
    eng = engine("fullnat", proto="udp")  # pool of 100 ports
    for port in range(100):
        assert isinstance(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + port,
                                                                     dport=80)), 0), bytes)
    assert eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=5000, dport=80)), 0) == DROP
    assert eng.drops["snat_exhausted"] == 1
    out = eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000, dport=80) / Raw(b"x")), 1)
    assert isinstance(out, bytes)
    ports = {IP(eng.handle(bytes(IP(src=C4, dst=VIP4) / UDP(sport=1000 + p, dport=80)), 1))
             [UDP].sport for p in range(100)}
    assert len(ports) == 100  # no port shared by two live flows
