"""The opening SYN's own path (``Engine._syn``) and what it leans on: ``syn_options`` and the
packed ``FlowKey``.

A bare SYN of no known flow is opened and rewritten in one pass, its MSS clamped inside the
same join. Every expectation here comes from scapy (the packet rebuilt with the new addresses,
ports and MSS, checksums recomputed), for both families, every mode and any TCP options.
"""

from __future__ import annotations

import pickle
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from dual_stack import FAMILY, MODES, backend_side, make_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from strategies import PROPS, clients4, clients6, ports, tcp_options

from nfqlb.flows import TcpState, peer_of
from nfqlb.policies import FlowKey
from nfqlb.wire.tcp import syn_options, tcp_mss_offset, tcp_wscale

#: Linux's SYN options (MSS, SACK permitted, timestamps, NOP, window scale 7).
LINUX = [("MSS", 65495), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None),
         ("WScale", 7)]


def _syn(family: int, client: str, sport: int, options: Any, *, flags: str = "S",
         seq: int = 1000, window: int = 64240, payload: bytes = b"", tos: int = 0) -> bytes:
    vip = FAMILY[family]["vip"]
    l3 = IP(src=client, dst=vip, tos=tos, flags="DF") if family == 4 else \
        IPv6(src=client, dst=vip, tc=tos)
    return bytes(l3 / TCP(sport=sport, dport=80, flags=flags, seq=seq, window=window,
                          options=list(options)) / payload)


def _expected(data: bytes, family: int, src: str, sport: int, dst: str, dport: int,
              mss: int | None) -> bytes:
    """``data`` with new ends (and MSS), every checksum recomputed by scapy."""
    pkt = IP(data) if family == 4 else IPv6(data)
    pkt.src, pkt.dst = src, dst
    t = pkt[TCP]
    t.sport, t.dport = sport, dport
    if mss is not None:
        t.options = [("MSS", mss) if o[0] == "MSS" else o for o in t.options]
    if family == 4:
        del pkt.chksum
    del t.chksum
    return bytes(pkt)


def _mss_of(options: Any) -> int | None:
    found = [v for k, v in options if k == "MSS"]
    return found[0] if found else None


def _wscale_of(options: Any) -> int:
    found = [v for k, v in options if k == "WScale"]
    return min(found[0], 14) if found else -1


def _check_open(mode: str, family: int, client: str, sport: int, options: Any,
                **kw: Any) -> None:
    eng = make_engine(mode, "tcp", family)
    data = _syn(family, client, sport, options, **kw)
    out = eng.handle(data, 1.0)
    assert isinstance(out, bytes), out
    bsrc, bsport, bdst, bdport = backend_side(mode, family, client, sport)
    mss = _mss_of(options)
    assert out == _expected(data, family, bsrc, bsport, bdst, bdport,
                            1460 if mss is not None and mss > 1460 else None)
    flow = next(iter(eng.table.flows()))
    assert flow.state is TcpState.SYN_SENT
    assert flow.wscale(False) == _wscale_of(options)
    assert flow.wscale(True) == -1
    off = 20 if family == 4 else 40
    assert flow.peer_c == peer_of(data, off + 8)  # ack, flags, window: what the RST check reads
    assert eng.counters.rewritten == 1 and eng.counters.flows_total == 1


@settings(PROPS, max_examples=600)
@given(st.sampled_from(MODES), st.sampled_from([4, 6]), st.data(), ports, tcp_options(),
       st.sampled_from(["S", "SE", "SEC", "SP", "SU"]), st.integers(0, 2**32 - 1),
       st.integers(0, 65535), st.binary(max_size=64), st.integers(0, 255))
def test_opening_syn_is_rewritten_as_scapy_rebuilds_it(
        mode: str, family: int, data: st.DataObject, sport: int, options: Any, flags: str,
        seq: int, window: int, payload: bytes, tos: int) -> None:
    client = data.draw(clients4 if family == 4 else clients6)
    if client in (FAMILY[family]["vip"], FAMILY[family]["snat"], FAMILY[family]["b1"],
                  FAMILY[family]["b2"]):
        return
    _check_open(mode, family, client, sport, options, flags=flags, seq=seq, window=window,
                payload=payload, tos=tos)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [
    LINUX,
    [("NOP", None), ("MSS", 9000)],  # the MSS at an odd offset: worth 256x in the sum
    [("NOP", None), ("MSS", 1200)],  # below the clamp: kept
    [("MSS", 1461), ("NOP", None), ("WScale", 15), ("SAckOK", b"")],  # a shift above 14
    [],
])
def test_opening_syn_layouts(mode: str, family: int, options: Any) -> None:
    client = "198.18.0.2" if family == 4 else "2001:db8::2"
    _check_open(mode, family, client, 40000, options)


def _check_synack(mode: str, family: int, options: Any, **kw: Any) -> None:
    client = "198.18.0.2" if family == 4 else "2001:db8::2"
    eng = make_engine(mode, "tcp", family)
    assert isinstance(eng.handle(_syn(family, client, 40000, LINUX), 1.0), bytes)
    bsrc, bsport, bdst, bdport = backend_side(mode, family, client, 40000)
    l3 = IP(src=bdst, dst=bsrc) if family == 4 else IPv6(src=bdst, dst=bsrc)
    data = bytes(l3 / TCP(sport=bdport, dport=bsport, flags="SA", options=list(options),
                          **kw))
    out = eng.handle(data, 1.5)
    assert isinstance(out, bytes), out
    mss = _mss_of(options)
    vip = FAMILY[family]["vip"]
    assert out == _expected(data, family, vip, 80, client, 40000,
                            1460 if mss is not None and mss > 1460 else None)
    flow = next(iter(eng.table.flows()))
    assert flow.state is TcpState.SYN_RECV
    assert flow.wscale(True) == _wscale_of(options)
    assert flow.wscale(False) == 7


@settings(PROPS, max_examples=300)
@given(st.sampled_from(MODES), st.sampled_from([4, 6]), tcp_options(),
       st.integers(0, 2**32 - 1), st.integers(0, 65535))
def test_a_backends_syn_ack_is_rewritten_as_scapy_rebuilds_it(
        mode: str, family: int, options: Any, seq: int, window: int) -> None:
    _check_synack(mode, family, options, seq=seq, ack=1001, window=window)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [LINUX, [("NOP", None), ("MSS", 65495)], []])
def test_syn_ack_layouts(mode: str, family: int, options: Any) -> None:
    _check_synack(mode, family, options, ack=1001)


def test_a_syn_that_is_not_bare_takes_the_general_path() -> None:
    """SYN+FIN opens nothing (only a bare SYN does), on either path."""
    eng = make_engine("dnat", "tcp", 4)
    out = eng.handle(_syn(4, "198.18.0.2", 40000, LINUX, flags="SF"), 1.0)
    assert not isinstance(out, bytes)
    assert eng.counters.flows_total == 0


# ---------------------------------------------------------------- syn_options

def _tcp_header(options: Any) -> bytes:
    return bytes(TCP(sport=1, dport=2, flags="S", options=list(options)))


@pytest.mark.parametrize("options", [
    LINUX,
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("WScale", 15)],
    # Windows' order; its timestamp values put 3, 3 where Linux's window scale would be
    [("MSS", 1460), ("NOP", None), ("WScale", 8), ("SAckOK", b""),
     ("Timestamp", (0x03030303, 0x03030303))],
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (0x01030303, 0x03030303)), ("NOP", None),
     ("NOP", None), ("NOP", None)],
    [("NOP", None), ("MSS", 536)],
    [("WScale", 2)],
    [],
])
def test_syn_options_agree_with_the_scan(options: Any) -> None:
    hdr = _tcp_header(options)
    assert syn_options(hdr, 0) == (tcp_wscale(hdr, 0), tcp_mss_offset(hdr, 0))
    assert syn_options(hdr, 0)[0] == _wscale_of(options)


def test_syn_options_reads_linux_layout_in_place() -> None:
    hdr = _tcp_header(LINUX)
    assert len(hdr) == 40
    assert syn_options(hdr, 0) == (7, 22)
    assert struct.unpack_from("!H", hdr, 22)[0] == 65495


# ---------------------------------------------------------------- FlowKey

def test_flowkey_keeps_the_client_packed_and_builds_its_address() -> None:
    vip = ip_address("198.18.100.1")
    made = FlowKey(6, IPv4Address("198.18.0.2"), 40000, vip, 80)
    packed = FlowKey(6, IPv4Address("198.18.0.2").packed, 40000, vip, 80)
    assert made == packed and hash(made) == hash(packed)
    assert made.src == IPv4Address("198.18.0.2") and made.src_packed == bytes([198, 18, 0, 2])
    assert (made.protocol, made.sport, made.dst, made.dport) == (6, 40000, vip, 80)
    assert made != FlowKey(6, IPv4Address("198.18.0.3"), 40000, vip, 80)
    six = FlowKey(17, IPv6Address("2001:db8::2"), 53, ip_address("2001:db8:100::1"), 53)
    assert six.src == IPv6Address("2001:db8::2")
    assert "src=IPv4Address('198.18.0.2')" in repr(made)
    assert pickle.loads(pickle.dumps(made)) == made
    with pytest.raises(AttributeError):
        made.sport = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        made.extra = 1  # type: ignore[attr-defined]


def test_the_engine_asks_policies_with_the_same_flowkey() -> None:
    eng = make_engine("dnat", "tcp", 4)
    svc = next(iter(eng.services))
    key = bytes([198, 18, 0, 2]) + bytes([198, 18, 100, 1]) + struct.pack("!HH", 40000, 80)
    got = svc.flow_key(key)
    assert got == FlowKey(6, IPv4Address("198.18.0.2"), 40000, svc.service.vip, 80)
    assert isinstance(got.src, IPv4Address)
