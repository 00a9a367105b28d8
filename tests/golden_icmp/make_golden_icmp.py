"""Golden captures for ICMP/ICMPv6 error translation, and the scapy derivation behind them.

Every packet here is crafted by scapy from the mode definitions (DESIGN.md), never by nfqlb:

- the client's packet and the backend's reply as sent, and as nfqlb must emit them;
- an error quoting one of the emitted packets (Q), as a backend, a client or a router sends it;
- the translated error: the same error built anew by scapy around the packet before nfqlb
  rewrote it (Q0), cut at the same length, with the outer addresses the client or backend must
  see. No checksum is ever set by hand: scapy computes all of them (the quoted ones over the
  full original packet, before the cut).

``tests/test_icmp.py`` imports this module for its unit cases and checks that (a) the committed
files equal what this script derives, and (b) each input capture, replayed (the flow's packets
through the engine, the error through ``nfqlb.icmp.translate_error``), gives the expected
capture byte for byte. Each case is a config, ``<name>.in.pcap`` and ``<name>.expected.pcap``
(raw IP link type): the last packet is the error, the ones before it open the flow.

    python tests/golden_icmp/make_golden_icmp.py      # rewrite the files in tests/golden_icmp/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.packet import Packet, Raw

HERE = Path(__file__).parent

# host -> (IPv4, IPv6); only 198.18.0.0/15 and 2001:db8::/32
HOSTS = {
    "client": ("198.18.0.2", "2001:db8::2"),
    "vip": ("198.18.100.1", "2001:db8:100::1"),
    "snat": ("198.18.1.1", "2001:db8:1::1"),
    "backend": ("198.18.1.2", "2001:db8:1::2"),
    "router_b": ("198.18.1.254", "2001:db8:1::fe"),  # between nfqlb and the backend
    "router_c": ("198.18.0.254", "2001:db8::fe"),  # between the client and nfqlb
}
CPORT, VPORT, BPORT, SNAT_PORT = 40000, 80, 8080, 20000
MODES = ("fullnat", "dnat", "local")
PROTOS = ("tcp", "udp")
FAMILIES = (4, 6)

Tuple4 = tuple[str, str, int, int]  # src, dst, sport, dport


def addr(host: str, family: int) -> str:
    return HOSTS[host][0 if family == 4 else 1]


def client_view(family: int, mode: str) -> Tuple4:
    """The client's packets as the client sends them: client:40000 -> VIP:80."""
    return addr("client", family), addr("vip", family), CPORT, VPORT


def backend_view(family: int, mode: str) -> Tuple4:
    """The client's packets as the backend gets them, per mode."""
    if mode == "local":  # a process on the balancer: only the port changes
        return addr("client", family), addr("vip", family), CPORT, BPORT
    if mode == "dnat":
        return addr("client", family), addr("backend", family), CPORT, BPORT
    return addr("snat", family), addr("backend", family), SNAT_PORT, BPORT


def swap(t: Tuple4) -> Tuple4:
    return t[1], t[0], t[3], t[2]


@dataclass(frozen=True)
class Scenario:
    """Who reports what about which packet of the flow."""

    name: str
    about: str  # "request": a packet client -> backend; "reply": backend -> client
    reporter: str  # "peer": the quoted packet's destination itself; "router": one on the way
    kind: str  # "unreach", "too_big", "time_exceeded", "param_problem"


SCENARIOS = [
    Scenario("port_unreach_from_backend", "request", "peer", "unreach"),
    Scenario("frag_needed_from_router", "request", "router", "too_big"),
    Scenario("time_exceeded_from_router", "request", "router", "time_exceeded"),
    Scenario("param_problem_from_backend", "request", "peer", "param_problem"),
    Scenario("frag_needed_about_reply", "reply", "router", "too_big"),
    Scenario("port_unreach_from_client", "reply", "peer", "unreach"),
]
SCENARIO = {s.name: s for s in SCENARIOS}


def transport(proto: str, t: Tuple4, reply: bool) -> Packet:
    if proto == "tcp":
        if reply:
            return TCP(sport=t[2], dport=t[3], flags="SA", seq=5000, ack=1001, window=8192)
        return TCP(sport=t[2], dport=t[3], flags="S", seq=1000, window=8192)
    return UDP(sport=t[2], dport=t[3]) / Raw(b"answer: 42" if reply else b"query, please")


def packet(family: int, proto: str, t: Tuple4, reply: bool, ip_options: Any = (),
           v6_ext: Any = (), zero_udp: bool = False) -> bytes:
    """One packet of the flow, every checksum computed by scapy over the whole packet."""
    l4 = transport(proto, t, reply)
    if zero_udp:
        l4[UDP].chksum = 0
    if family == 4:
        ip: Packet = IP(src=t[0], dst=t[1], id=8 if reply else 7, flags="DF", ttl=63,
                        options=list(ip_options))
    else:
        ip = IPv6(src=t[0], dst=t[1], hlim=63, fl=0x12345 if not reply else 0)
        for ext in v6_ext:
            ip = ip / ext.copy()
    return bytes(ip / l4)


def transport_offset(family: int, quoted: bytes) -> int:
    """Where the TCP/UDP header starts in a packet built by ``packet``."""
    pkt = IP(quoted) if family == 4 else IPv6(quoted)
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    return len(quoted) - len(bytes(l4))


def error(family: int, kind: str, src: str, dst: str, quote: bytes,
          ip_options: Any = ()) -> bytes:
    """An ICMP/ICMPv6 error from ``src`` to ``dst`` quoting ``quote``; scapy's checksums."""
    if family == 4:
        icmp = {
            "unreach": ICMP(type=3, code=3),
            "too_big": ICMP(type=3, code=4, nexthopmtu=1400),
            "time_exceeded": ICMP(type=11, code=0),
            "param_problem": ICMP(type=12, code=0, ptr=1),
        }[kind]
        return bytes(IP(src=src, dst=dst, id=99, ttl=61, options=list(ip_options))
                     / icmp / Raw(quote))
    icmp6 = {
        "unreach": ICMPv6DestUnreach(code=4),
        "too_big": ICMPv6PacketTooBig(mtu=1280),
        "time_exceeded": ICMPv6TimeExceeded(code=0),
        "param_problem": ICMPv6ParamProblem(code=0, ptr=7),
    }[kind]
    return bytes(IPv6(src=src, dst=dst, hlim=61) / icmp6 / Raw(quote))


@dataclass
class Derived:
    """One error case: the flow's packets in and out, the error in and its translation."""

    flow_in: list[bytes]  # the client's first packet, then the backend's reply (as sent)
    flow_out: list[bytes]  # the same as nfqlb must emit them
    quoted: bytes  # Q: the emitted packet the error is about
    original: bytes  # Q0: the same packet before nfqlb rewrote it
    error_in: bytes
    error_out: bytes
    quote_len: int  # bytes of Q inside the error


def derive(family: int, mode: str, proto: str, scenario: Scenario, cut: int | None = None,
           ip_options: Any = (), v6_ext: Any = (), outer_options: Any = (),
           zero_udp: bool = False) -> Derived:
    """The case ``scenario`` for a flow, quoting ``cut`` bytes of the transport header
    (None: the whole packet). Built from the mode definitions only."""
    cv, bv = client_view(family, mode), backend_view(family, mode)
    opts = {"ip_options": ip_options, "v6_ext": v6_ext, "zero_udp": zero_udp}
    req_in, req_out = (packet(family, proto, cv, False, **opts),
                       packet(family, proto, bv, False, **opts))
    rep_in, rep_out = (packet(family, proto, swap(bv), True, **opts),
                       packet(family, proto, swap(cv), True, **opts))
    if scenario.about == "request":
        q, q0, qt, q0t = req_out, req_in, bv, cv
    else:
        q, q0, qt, q0t = rep_out, rep_in, swap(cv), swap(bv)
    n = len(q) if cut is None else transport_offset(family, q) + cut
    router = addr("router_b" if scenario.about == "request" else "router_c", family)
    if scenario.reporter == "peer":
        src_in, src_out = qt[1], q0t[1]
    else:
        src_in = src_out = router
    return Derived(
        flow_in=[req_in, rep_in], flow_out=[req_out, rep_out], quoted=q, original=q0,
        error_in=error(family, scenario.kind, src_in, qt[0], q[:n], outer_options),
        error_out=error(family, scenario.kind, src_out, q0t[0], q0[:n], outer_options),
        quote_len=n,
    )


def service(family: int, mode: str, proto: str, name: str = "svc") -> dict[str, Any]:
    """The one-backend service the cases assume, as a config table."""
    svc: dict[str, Any] = {"name": name, "vip": addr("vip", family), "port": VPORT,
                           "protocol": proto, "mode": mode}
    if mode == "fullnat":
        svc["snat_address"] = addr("snat", family)
        svc["snat_ports"] = f"{SNAT_PORT}-{SNAT_PORT + 9}"
    backend: dict[str, Any] = {"name": "b1", "port": BPORT}
    if mode != "local":
        backend["address"] = addr("backend", family)
    svc["backend"] = [backend]
    return svc


# ------------------------------------------------------------------ golden captures


@dataclass(frozen=True)
class Case:
    name: str
    family: int
    mode: str
    proto: str
    scenario: str
    cut: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("v4_fullnat_tcp_port_unreach_from_backend", 4, "fullnat", "tcp",
         "port_unreach_from_backend"),
    Case("v4_fullnat_tcp_frag_needed_from_router", 4, "fullnat", "tcp", "frag_needed_from_router"),
    Case("v4_fullnat_tcp_frag_needed_about_reply", 4, "fullnat", "tcp", "frag_needed_about_reply"),
    Case("v4_dnat_tcp_time_exceeded_quote8", 4, "dnat", "tcp", "time_exceeded_from_router", cut=8),
    Case("v4_dnat_udp_port_unreach_from_backend", 4, "dnat", "udp", "port_unreach_from_backend"),
    Case("v4_local_udp_port_unreach_from_client", 4, "local", "udp", "port_unreach_from_client"),
    Case("v4_local_tcp_param_problem", 4, "local", "tcp", "param_problem_from_backend"),
    Case("v6_fullnat_tcp_packet_too_big", 6, "fullnat", "tcp", "frag_needed_from_router"),
    Case("v6_fullnat_udp_port_unreach_from_client", 6, "fullnat", "udp",
         "port_unreach_from_client"),
    Case("v6_dnat_udp_port_unreach_from_backend", 6, "dnat", "udp", "port_unreach_from_backend"),
    Case("v6_local_tcp_time_exceeded_quote8", 6, "local", "tcp", "time_exceeded_from_router",
         cut=8),
]


def derive_case(case: Case) -> Derived:
    return derive(case.family, case.mode, case.proto, SCENARIO[case.scenario], case.cut,
                  **case.extra)


def config_text(case: Case) -> str:
    svc = service(case.family, case.mode, case.proto, case.name)
    lines = ["[[service]]"]
    for k, v in svc.items():
        if k != "backend":
            lines.append(f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"')
    for b in svc["backend"]:
        lines.append("  [[service.backend]]")
        lines += [f"  {k} = {v}" if isinstance(v, int) else f'  {k} = "{v}"'
                  for k, v in b.items()]
    return "\n".join(lines) + "\n"


def packets(case: Case) -> tuple[list[bytes], list[bytes]]:
    """(input, expected) raw IP packets: the flow's packets, then the error."""
    d = derive_case(case)
    return d.flow_in + [d.error_in], d.flow_out + [d.error_out]


def paths(case: Case) -> tuple[Path, Path, Path]:
    return (HERE / f"{case.name}.toml", HERE / f"{case.name}.in.pcap",
            HERE / f"{case.name}.expected.pcap")


def _write_pcap(path: Path, raw: list[bytes]) -> None:
    """Raw IP link type (101), one packet every 10 ms."""
    with path.open("wb") as f:
        writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=101)
        for i, b in enumerate(raw):
            writer.writepkt(b, ts=1_700_000_000 + i * 0.01)


def write(case: Case) -> None:
    cfg, inp_path, exp_path = paths(case)
    inp, exp = packets(case)
    cfg.write_text(config_text(case))
    _write_pcap(inp_path, inp)
    _write_pcap(exp_path, exp)


if __name__ == "__main__":
    for c in CASES:
        write(c)
        print("wrote", *paths(c))
