"""Golden captures for replay: inputs crafted with scapy, expected outputs derived by scapy.

Each case is a config, an input capture and the expected output capture. The expected output
is NOT produced by nfqlb: it is the input with the mode's address/port mapping applied by scapy
and every checksum recomputed by scapy. ``test_replay.py`` checks that (a) the committed files
equal what this script derives, and (b) ``nfqlb replay`` turns each input into its expected
output byte for byte.

    python tests/golden/make_golden.py      # rewrite the files in tests/golden/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

HERE = Path(__file__).parent
CLIENT, VIP, SNAT = "198.18.0.2", "198.18.100.1", "198.18.1.1"
BACKENDS = ("198.18.1.2", "198.18.1.3")
POOL_LO = 20000


@dataclass
class Case:
    name: str
    mode: str
    protocol: str
    link: str  # "raw" or "ether"
    backend_port: int = 8080


CASES = [
    Case("dnat_tcp", "dnat", "tcp", "raw"),
    Case("fullnat_tcp", "fullnat", "tcp", "ether"),
    Case("local_tcp", "local", "tcp", "raw"),
    Case("dnat_udp", "dnat", "udp", "ether"),
    Case("fullnat_udp", "fullnat", "udp", "raw"),
    Case("local_udp", "local", "udp", "ether"),
]


def config_text(case: Case) -> str:
    lines = [
        "[[service]]", f'name = "{case.name}"', f'vip = "{VIP}"', "port = 80",
        f'protocol = "{case.protocol}"', f'mode = "{case.mode}"',
    ]
    if case.mode == "fullnat":
        lines += [f'snat_address = "{SNAT}"', f'snat_ports = "{POOL_LO}-{POOL_LO + 99}"']
    for b in BACKENDS:
        lines += ["  [[service.backend]]"]
        if case.mode != "local":
            lines += [f'  address = "{b}"']
        port = case.backend_port if case.mode != "local" else 8080 + BACKENDS.index(b)
        lines += [f"  port = {port}"]
    return "\n".join(lines) + "\n"


def _l4(case: Case, sport: int, dport: int, flags: str, payload: bytes) -> Packet:
    if case.protocol == "tcp":
        return TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000,
                   options=[("MSS", 1460)] if "S" in flags else []) / Raw(payload)
    return UDP(sport=sport, dport=dport) / Raw(payload)


def _conversation(case: Case) -> list[tuple[str, int, str, bytes]]:
    """(direction, client flow number, tcp flags, payload): two flows, round robin."""
    if case.protocol == "tcp":
        steps = [("S", b""), ("SA", b""), ("A", b""), ("PA", b"GET / HTTP/1.1\r\n\r\n"),
                 ("PA", b"HTTP/1.1 200 OK\r\n\r\nhello"), ("FA", b""), ("FA", b""), ("A", b"")]
        dirs = ["c", "s", "c", "c", "s", "c", "s", "c"]
    else:
        steps = [("", b"query"), ("", b"answer"), ("", b"again"), ("", b"answer2")]
        dirs = ["c", "s", "c", "s"]
    out = []
    for flow in range(2):
        for d, (flags, payload) in zip(dirs, steps, strict=True):
            out.append((d, flow, flags, payload))
    return out


def packets(case: Case) -> tuple[list[Packet], list[Packet]]:
    """(input, expected) packets; round robin gives flow 0 backend 0 and flow 1 backend 1."""
    inp: list[Packet] = []
    exp: list[Packet] = []
    for d, flow, flags, payload in _conversation(case):
        cport = 40000 + flow
        if case.mode == "local":
            baddr, bport = VIP, 8080 + flow
        else:
            baddr, bport = BACKENDS[flow], case.backend_port
        saddr, sport = (SNAT, POOL_LO + flow) if case.mode == "fullnat" else (CLIENT, cport)
        if d == "c":
            before = IP(src=CLIENT, dst=VIP, id=1) / _l4(case, cport, 80, flags, payload)
            after = IP(src=saddr, dst=baddr, id=1) / _l4(case, sport, bport, flags, payload)
        else:
            before = IP(src=baddr, dst=saddr, id=2) / _l4(case, bport, sport, flags, payload)
            after = IP(src=VIP, dst=CLIENT, id=2) / _l4(case, 80, cport, flags, payload)
        if case.link == "ether":
            before = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / before
            after = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / after
        inp.append(before.__class__(bytes(before)))  # scapy fills in every checksum here
        exp.append(after.__class__(bytes(after)))
    for i, (a, b) in enumerate(zip(inp, exp, strict=True)):
        a.time = b.time = 1_700_000_000 + i * 0.01
    return inp, exp


def paths(case: Case) -> tuple[Path, Path, Path]:
    return (HERE / f"{case.name}.toml", HERE / f"{case.name}.in.pcap",
            HERE / f"{case.name}.expected.pcap")


def write(case: Case) -> None:
    cfg, inp_path, exp_path = paths(case)
    inp, exp = packets(case)
    cfg.write_text(config_text(case))
    wrpcap(str(inp_path), inp, linktype=1 if case.link == "ether" else 101)
    wrpcap(str(exp_path), exp, linktype=1 if case.link == "ether" else 101)


if __name__ == "__main__":
    for c in CASES:
        write(c)
        print("wrote", *paths(c))
