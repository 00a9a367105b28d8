"""Engine: IPv4 and IPv6 fragments.

Worked examples: fragments in order follow the first fragment's rewrite; later fragments that
come first are held and released when the first arrives; held fragments time out and their
buffer is bounded. Then a property test (hypothesis, derandomized): fragmented datagrams
(IPv4 and IPv6, UDP and TCP, fragmented by scapy), the fragments shuffled, some dropped, some
duplicated: nothing raises; every held id is released at most once, as bytes or DROP, and all
of them after ``handle_timer(now + frag timeout + 1)``; every fragment that comes out is
exactly scapy's fragment of the rewritten datagram; when every fragment arrived, scapy's
reassembly of the output is the rewritten datagram, with a right checksum. Last, a regression
the property test found: fragments of a datagram nfqlb does not balance used to be held and
dropped.

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

from typing import Any

import pytest
from dual_stack import (
    B4,
    B6,
    C4,
    C6,
    FAMILY,
    MODES,
    SNAT4,
    SNAT6,
    VIP4,
    VIP6,
    checksums_ok,
    ends,
    engine_for,
    make_engine,
    open_flow,
    rebuilt,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6, fragment6
from scapy.packet import Packet, Raw
from strategies import PROPS, clients4, clients6, ports

from nfqlb.engine import ACCEPT, DROP, Held

FRAG_TIMEOUT = 5.0  # the default timeouts.frag


# ---------------------------------------------------------------- examples

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
    eng = engine_for(mode, proto="udp")
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
    eng = engine_for("dnat", proto="udp")
    frags = _v4_fragments(8000)
    later = frags[1:]
    verdicts = [eng.handle(f, 0.0) for f in later]
    assert all(isinstance(v, Held) for v in verdicts) and len(verdicts) == len(later)
    held_ids = {v.hold_id for v in verdicts}  # type: ignore[union-attr]
    assert len(held_ids) == len(later)
    first = eng.handle(frags[0], 0.1)
    assert isinstance(first, bytes)
    released = dict(eng.released_verdicts())
    assert set(released) == held_ids and eng.released_verdicts() == []
    whole = _reassemble_v4([first, *released.values()])  # type: ignore[list-item]
    assert whole.dst == B4[0] and bytes(whole) == rebuilt(whole)
    assert eng.stats()["fragments_held"] == 0


def test_held_fragments_time_out_and_the_buffer_is_bounded() -> None:
    eng = engine_for("dnat", proto="udp", daemon={"max_fragments": 3})
    frags = _v4_fragments(8000)[1:]  # 5 later fragments, no first
    verdicts = [eng.handle(f, 0.0) for f in frags]
    assert [isinstance(v, Held) for v in verdicts] == [True, True, True, False, False]
    assert verdicts[3:] == [DROP, DROP]
    assert eng.counters.drops["fragment_buffer_full"] == 2
    deadline = eng.get_timer()
    assert deadline is not None and deadline <= 5.0
    eng.handle_timer(5.0)
    assert sorted(v for _, v in eng.released_verdicts()) == [DROP] * 3
    assert eng.counters.drops["fragment_timeout"] == 3
    assert eng.stats()["fragments_held"] == 0


def test_ipv6_fragments() -> None:
    eng = engine_for("fullnat", v6=True, proto="udp")
    dgram = IPv6(src=C6, dst=VIP6) / IPv6ExtHdrFragment(id=99) / UDP(sport=5000, dport=80) / (
        b"y" * 3000)
    frags = [bytes(f) for f in fragment6(dgram, 1280)]
    assert len(frags) >= 3
    outs = [eng.handle(f, 0.0) for f in [*frags[1:], frags[0]]]
    assert all(isinstance(o, Held) for o in outs[:-1])
    released = [v for _, v in eng.released_verdicts()]
    for o in [outs[-1], *released]:
        assert isinstance(o, bytes)
        p = IPv6(o)
        assert (p.src, p.dst) == (SNAT6, B6[0])
    from scapy.layers.inet6 import defragment6

    whole = defragment6([IPv6(o) for o in [outs[-1], *released]])
    whole = IPv6(bytes(whole))
    assert whole[UDP].dport == 8080
    assert bytes(whole) == rebuilt(whole)


# ---------------------------------------------------------------- shuffled, dropped, duplicated

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
        for hold_id, verdict in eng.released_verdicts():
            assert hold_id in held and hold_id not in released, (hold_id, held, released)
            released.add(hold_id)
            if isinstance(verdict, bytes):
                outputs.append((held[hold_id], verdict))
            else:
                assert verdict == DROP
                drops += 1

    now = 1.0
    for i in order:
        now += 0.001
        got = eng.handle(fin[i], now)
        if isinstance(got, Held):
            assert got.hold_id not in held
            held[got.hold_id] = i
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
    assert "internal_error" not in eng.counters.drops, eng.counters.drops
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


# ---------------------------------------------------------------- regressions

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
    released = [v for _, v in eng.released_verdicts()]
    assert verdicts[0] == ACCEPT  # the first fragment: not ours
    # every later fragment passes too (unchanged): at once, or released unchanged
    assert DROP not in released and not any(isinstance(v, Held) for v in verdicts), \
        (verdicts, released)



def test_a_malformed_first_fragment_takes_its_datagram_with_it() -> None:
    """A first fragment too short for its transport header (hping3 -f) is dropped; its later
    fragments are dropped at once, held or not, instead of waiting timeouts.frag in the
    kernel queue."""
    eng = engine_for("dnat")
    payload = b"z" * 64
    later = IP(src=C4, dst=VIP4, id=77, flags=0, frag=2, proto=6) / Raw(payload)
    first = IP(src=C4, dst=VIP4, id=77, flags="MF", frag=0, proto=6) / Raw(b"\x13\x88\x00\x50"
                                                                          b"\x00\x00\x00\x01")
    held = eng.handle(bytes(later), 0.0)  # came first: held
    assert isinstance(held, Held)
    assert eng.handle(bytes(first), 0.1) == DROP
    assert eng.counters.drops["truncated"] == 1
    assert eng.released_verdicts() == [(held.hold_id, DROP)]
    assert eng.handle(bytes(later), 0.2) == DROP  # later ones: at once
    assert eng.counters.drops["fragment_of_dropped"] == 2
    assert eng.stats()["fragments_held"] == 0


def test_held_fragments_are_bounded_per_source() -> None:
    eng = engine_for("dnat", proto="udp",
                     daemon={"max_fragments": 100, "max_fragments_per_source": 4})
    verdicts = [eng.handle(bytes(IP(src="198.19.0.1", dst=VIP4, id=i, frag=10, proto=17)
                                 / Raw(b"x" * 16)), 0.0) for i in range(10)]
    assert sum(isinstance(v, Held) for v in verdicts) == 4
    assert eng.counters.drops["fragment_source_full"] == 6
    # another source still gets its share
    other = eng.handle(bytes(IP(src="198.19.0.2", dst=VIP4, id=1, frag=10, proto=17)
                             / Raw(b"x" * 16)), 0.0)
    assert isinstance(other, Held)
    eng.handle_timer(10.0)  # timed out: the source may hold again
    again = eng.handle(bytes(IP(src="198.19.0.1", dst=VIP4, id=99, frag=10, proto=17)
                             / Raw(b"x" * 16)), 10.0)
    assert isinstance(again, Held)


def test_a_later_ipv6_fragment_is_not_read_as_headers() -> None:
    """After the fragment header of a later fragment comes data, not extension headers: a
    fragmentable part that starts with destination options (next header 60) is followed by
    the first fragment's decision, whatever its data bytes look like."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt

    eng = engine_for("dnat", v6=True, proto="udp")
    dgram = (IPv6(src=C6, dst=VIP6) / IPv6ExtHdrFragment(id=5) / IPv6ExtHdrDestOpt()
             / UDP(sport=5000, dport=80) / (b"\x2c" * 3000))  # data that looks like headers
    frags = [bytes(f) for f in fragment6(dgram, 1280)]
    outs = [eng.handle(f, 0.0) for f in frags]
    assert all(isinstance(o, bytes) for o in outs), outs
    assert all(IPv6(o).dst == B6[0] for o in outs)  # type: ignore[arg-type]
