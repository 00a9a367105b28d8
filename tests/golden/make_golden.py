"""Golden captures for replay: inputs crafted with scapy, expected outputs derived by scapy.

Each case is a config, an input capture and the expected output capture. The expected output
is NOT produced by nfqlb: it is the input with the mode's address/port mapping applied by scapy
and every checksum recomputed by scapy (fragments: the rewritten datagram, fragmented again by
scapy; resets: built by scapy from RFC 9293's rule). ``test_replay.py`` checks that (a) the
committed files equal what this script derives, and (b) ``nfqlb replay`` turns each input into
its expected output byte for byte, with the expected drops and flows per backend.

Cases:

- ``{mode}_{tcp,udp}``, ``{mode}_{tcp,udp}6``: a conversation of two flows (round robin puts
  flow 0 on backend 0 and flow 1 on backend 1), IPv4 and IPv6, dnat, fullnat and local.
- ``{mode}_udp{,6}_frag{,_ooo}``: UDP datagrams of 3000 and 8000 bytes (flow 0 and flow 1),
  each way, fragmented by scapy at MTU 1500 (IPv4) or 1280 (IPv6); in order, or (``_ooo``)
  with the later fragments first, in reverse order. ``nfqlb replay`` writes held fragments
  right after the first fragment that releases them, in the order they were held, with its
  timestamp: the expected capture has that order.
- ``{mode}_udp6_zero_checksum``: IPv6 UDP with checksum 0 both ways: the output carries the
  checksum (IPv6 UDP must have one, RFC 8200 8.1).
- ``dnat_tcp{,6}_unknown_{reset,drop,hash}``: TCP packets to the VIP that match no flow.
  ``reset``: an ACK is answered by a RST from the VIP (RFC 9293 3.10.7.1: ACK on, so
  seq = SEG.ACK and only RST), a FIN without ACK by RST+ACK with ack = SEG.SEQ + SEG.LEN,
  a RST by nothing; then a new connection works. ``drop``: the packet is absent from the
  output, then a new connection works. ``hash`` (policy ``flow_hash``): mid-flow packets are
  adopted on the backend a rendezvous hash of the flow picks, whether the client or the
  backend speaks first; a reply from the backend the hash does not pick passes unchanged.

Fields RFC 9293 leaves open in a RST are those nfqlb writes: IPv4 id 0, DF, TTL 64; IPv6
hop limit 64, flow label 0; window 0, no options.

    python tests/golden/make_golden.py      # rewrite the files in tests/golden/
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

HERE = Path(__file__).parent
CLIENT, VIP, SNAT = "198.18.0.2", "198.18.100.1", "198.18.1.1"
BACKENDS = ("198.18.1.2", "198.18.1.3")
CLIENT6, VIP6, SNAT6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::1"
BACKENDS6 = ("2001:db8:1::2", "2001:db8:1::3")
POOL_LO = 20000
T0 = 1_700_000_000
MTU = {4: 1500, 6: 1280}


@dataclass
class Case:
    name: str
    mode: str
    protocol: str
    link: str  # "raw" or "ether"
    backend_port: int = 8080
    family: int = 4
    kind: str = "conversation"  # conversation | frag | zero_checksum | unknown | bounded
    out_of_order: bool = False  # frag: later fragments before the first
    unknown_flow: str | None = None  # written to the config when set
    policy: str | None = None  # written to the config when set
    backend_names: tuple[str, ...] = field(default=())  # written to the config when set
    pool: int = 100  # fullnat: ports in snat_ports
    daemon: str = ""  # lines of a [daemon] table, when set


CASES = [
    Case("dnat_tcp", "dnat", "tcp", "raw"),
    Case("fullnat_tcp", "fullnat", "tcp", "ether"),
    Case("local_tcp", "local", "tcp", "raw"),
    Case("dnat_udp", "dnat", "udp", "ether"),
    Case("fullnat_udp", "fullnat", "udp", "raw"),
    Case("local_udp", "local", "udp", "ether"),
    # IPv6 conversations
    Case("dnat_tcp6", "dnat", "tcp", "ether", family=6),
    Case("fullnat_tcp6", "fullnat", "tcp", "raw", family=6),
    Case("local_tcp6", "local", "tcp", "ether", family=6),
    Case("dnat_udp6", "dnat", "udp", "raw", family=6),
    Case("fullnat_udp6", "fullnat", "udp", "ether", family=6),
    Case("local_udp6", "local", "udp", "raw", family=6),
    # fragmented UDP datagrams, in order and out of order
    *[Case(f"{mode}_udp{'6' if fam == 6 else ''}_frag{'_ooo' if ooo else ''}", mode, "udp",
           "ether" if (fam == 6) == ooo else "raw", family=fam, kind="frag", out_of_order=ooo)
      for fam in (4, 6) for mode in ("dnat", "fullnat") for ooo in (False, True)],
    # IPv6 UDP without a checksum
    Case("dnat_udp6_zero_checksum", "dnat", "udp", "raw", family=6, kind="zero_checksum"),
    Case("fullnat_udp6_zero_checksum", "fullnat", "udp", "ether", family=6,
         kind="zero_checksum"),
    # TCP packets of flows nobody knows
    *[Case(f"dnat_tcp{'6' if fam == 6 else ''}_unknown_{how}", "dnat", "tcp",
           "raw" if fam == 4 else "ether", family=fam, kind="unknown", unknown_flow=how,
           policy="flow_hash" if how == "hash" else None,
           backend_names=("b1", "b2") if how == "hash" else ())
      for how in ("reset", "drop", "hash") for fam in (4, 6)],
    # bounded state: a fullnat pool of one port (one flow per backend); a table of two flows
    Case("fullnat_udp_pool_exhausted", "fullnat", "udp", "raw", kind="bounded", pool=1),
    Case("dnat_tcp_max_flows", "dnat", "tcp", "ether", kind="bounded",
         daemon="max_flows = 2"),
]


def addresses(case: Case) -> tuple[str, str, str, tuple[str, str]]:
    """(client, vip, snat, backends) of the case's family."""
    if case.family == 6:
        return CLIENT6, VIP6, SNAT6, BACKENDS6
    return CLIENT, VIP, SNAT, BACKENDS


def config_text(case: Case) -> str:
    _, vip, snat, backends = addresses(case)
    lines = [
        "[[service]]", f'name = "{case.name}"', f'vip = "{vip}"', "port = 80",
        f'protocol = "{case.protocol}"', f'mode = "{case.mode}"',
    ]
    if case.policy is not None:
        lines += [f'policy = "{case.policy}"']
    if case.unknown_flow is not None:
        lines += [f'unknown_flow = "{case.unknown_flow}"']
    if case.mode == "fullnat":
        lines += [f'snat_address = "{snat}"',
                  f'snat_ports = "{POOL_LO}-{POOL_LO + case.pool - 1}"']
    for i, b in enumerate(backends):
        lines += ["  [[service.backend]]"]
        if case.backend_names:
            lines += [f'  name = "{case.backend_names[i]}"']
        if case.mode != "local":
            lines += [f'  address = "{b}"']
        port = case.backend_port if case.mode != "local" else 8080 + i
        lines += [f"  port = {port}"]
    if case.daemon:
        lines += ["[daemon]", case.daemon]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ building blocks

class Script:
    """Input packets, each with the packets expected out of it (none: dropped or held; a
    first fragment: itself, then the fragments it releases), and the expected totals."""

    def __init__(self) -> None:
        self.steps: list[tuple[Packet, list[Packet]]] = []
        self.dropped = 0
        self.flows = [0, 0]  # new flows per backend (index into BACKENDS)

    def step(self, before: Packet, *after: Packet) -> None:
        self.steps.append((before, list(after)))

    def drop(self, before: Packet) -> None:
        self.steps.append((before, []))
        self.dropped += 1


def _ip(case: Case, src: str, dst: str, ident: int) -> Packet:
    if case.family == 6:
        return IPv6(src=src, dst=dst)
    return IP(src=src, dst=dst, id=ident)


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


def _ends(case: Case, flow: int, backend: int | None = None) -> tuple[
        tuple[str, int], tuple[str, int], tuple[str, int], tuple[str, int]]:
    """((client, port), (vip, 80), (source, port) and (backend, port) as the backend sees
    them) of client flow ``flow`` on backend ``backend`` (default: round robin's choice)."""
    client, vip, snat, backends = addresses(case)
    b = flow if backend is None else backend
    cport = 40000 + flow
    if case.mode == "local":
        back = (vip, 8080 + b)
    else:
        back = (backends[b], case.backend_port)
    # fullnat ports are unique per backend (as in IPVS FNAT): round robin alternates the two
    # backends, so client flow k is the (k // 2)-th flow of its backend
    src = (snat, POOL_LO + flow // 2) if case.mode == "fullnat" else (client, cport)
    return (client, cport), (vip, 80), src, back


def _no_checksum(pkt: Packet) -> Packet:
    pkt[UDP].chksum = 0
    return pkt


def conversation(case: Case, script: Script) -> None:
    for d, flow, flags, payload in _conversation(case):
        (client, cport), (vip, vport), (saddr, sport), (baddr, bport) = _ends(case, flow)
        if d == "c":
            before = _ip(case, client, vip, 1) / _l4(case, cport, vport, flags, payload)
            after = _ip(case, saddr, baddr, 1) / _l4(case, sport, bport, flags, payload)
        else:
            before = _ip(case, baddr, saddr, 2) / _l4(case, bport, sport, flags, payload)
            after = _ip(case, vip, client, 2) / _l4(case, vport, cport, flags, payload)
        if case.kind == "zero_checksum":
            before = _no_checksum(before)  # the expected ``after`` gets scapy's checksum
        script.step(before, after)
    script.flows = [1, 1]


def _datagram(case: Case, src: str, dst: str, sport: int, dport: int, ident: int,
              payload: bytes) -> Packet:
    if case.family == 6:
        return IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / UDP(
            sport=sport, dport=dport) / Raw(payload)
    return IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / Raw(payload)


def _fragments(case: Case, dgram: Packet) -> list[Packet]:
    """scapy's fragments of ``dgram`` (checksums computed over the whole datagram first)."""
    whole = dgram.__class__(bytes(dgram))
    if case.family == 6:
        frags = fragment6(whole, MTU[6])
    else:
        frags = fragment(whole, fragsize=MTU[4] - 20)
    frags = [f.__class__(bytes(f)) for f in frags]
    assert len(frags) > 1 and all(len(f) <= MTU[case.family] for f in frags)
    return frags


def fragmented(case: Case, script: Script) -> None:
    """Flow 0: 3000 bytes each way; flow 1: 8000 bytes each way."""
    for flow, size in enumerate((3000, 8000)):
        (client, cport), (vip, vport), (saddr, sport), (baddr, bport) = _ends(case, flow)
        for way in ("c", "s"):
            payload = bytes((i * 7 + flow + (way == "s")) & 0xFF for i in range(size))
            ident = 0x1000 + 0x10 * flow + (way == "s")
            if way == "c":
                before = _datagram(case, client, vip, cport, vport, ident, payload)
                after = _datagram(case, saddr, baddr, sport, bport, ident, payload)
            else:
                before = _datagram(case, baddr, saddr, bport, sport, ident, payload)
                after = _datagram(case, vip, client, vport, cport, ident, payload)
            fin, fout = _fragments(case, before), _fragments(case, after)
            assert len(fin) == len(fout)
            if case.out_of_order:
                later = list(range(len(fin) - 1, 0, -1))
                for i in later:
                    script.step(fin[i])  # held
                script.step(fin[0], fout[0], *(fout[i] for i in later))
            else:
                for a, b in zip(fin, fout, strict=True):
                    script.step(a, b)
    script.flows = [1, 1]


def _rst(case: Case, seg: Packet) -> Packet:
    """RFC 9293 3.10.7.1: the reset answering ``seg`` (a TCP segment of no connection)."""
    ip = seg[IPv6] if case.family == 6 else seg[IP]
    t = seg[TCP]
    seglen = len(t.payload) + ("S" in t.flags) + ("F" in t.flags)
    if "A" in t.flags:
        seq, ack, flags = t.ack, 0, "R"
    else:
        seq, ack, flags = 0, (t.seq + seglen) & 0xFFFFFFFF, "RA"
    out: Packet
    if case.family == 6:
        out = IPv6(src=ip.dst, dst=ip.src, hlim=64, fl=0, tc=0)
    else:
        out = IP(src=ip.dst, dst=ip.src, id=0, flags="DF", ttl=64, tos=0)
    return out / TCP(sport=t.dport, dport=t.sport, seq=seq, ack=ack, flags=flags, window=0)


def _tcp(case: Case, src: tuple[str, int], dst: tuple[str, int], flags: str, seq: int,
         ack: int, payload: bytes = b"", ident: int = 1) -> Packet:
    return _ip(case, src[0], dst[0], ident) / TCP(sport=src[1], dport=dst[1], flags=flags,
                                                  seq=seq, ack=ack) / Raw(payload)


def _handshake(case: Case, script: Script, flow: int, backend: int) -> None:
    """A new connection of client flow ``flow`` (round robin puts it on ``backend``)."""
    c, v, s, b = _ends(case, flow, backend)
    for side, flags, payload in (("c", "S", b""), ("s", "SA", b""), ("c", "A", b""),
                                 ("c", "PA", b"GET / HTTP/1.1\r\n\r\n"),
                                 ("s", "PA", b"HTTP/1.1 200 OK\r\n\r\n")):
        if side == "c":
            script.step(_tcp(case, c, v, flags, 1000, 2000, payload),
                        _tcp(case, s, b, flags, 1000, 2000, payload))
        else:
            script.step(_tcp(case, b, s, flags, 2000, 1001, payload, ident=2),
                        _tcp(case, v, c, flags, 2000, 1001, payload, ident=2))
    script.flows[backend] += 1


def hash_backend(case: Case, client: str, cport: int) -> int:
    """Which backend (index) rendezvous hashing over the whole flow picks: the key is
    protocol | client address | client port | VIP | VIP port, each backend scored by its name
    (``nfqlb.policies.hashing.rendezvous``, a pure function of key and backend names)."""
    from nfqlb.policies.hashing import rendezvous
    from nfqlb.values import Backend

    _, vip, _, backends = addresses(case)
    key = (bytes((6,)) + ipaddress.ip_address(client).packed + cport.to_bytes(2, "big")
           + ipaddress.ip_address(vip).packed + (80).to_bytes(2, "big"))
    bs = [Backend(name, ipaddress.ip_address(addr), case.backend_port)
          for name, addr in zip(case.backend_names, backends, strict=True)]
    chosen = rendezvous(key, bs)
    assert chosen is not None
    return bs.index(chosen)


def unknown(case: Case, script: Script) -> None:
    how = case.unknown_flow
    if how == "reset":
        c, v, _, _ = _ends(case, 0)
        ack = _tcp(case, c, v, "PA", 1000, 2000, b"data after a restart")
        script.step(ack, _rst(case, ack))
        pure = _tcp(case, (c[0], c[1] + 1), v, "A", 77, 0xFFFFFFF0)
        script.step(pure, _rst(case, pure))
        fin = _tcp(case, (c[0], c[1] + 2), v, "F", 0xFFFFFFFE, 0, b"bye")  # seq wraps
        script.step(fin, _rst(case, fin))
        script.drop(_tcp(case, (c[0], c[1] + 3), v, "R", 5, 0))  # never a RST for a RST
        _handshake(case, script, 4, 0)  # the client reconnects: round robin, backend 0
    elif how == "drop":
        c, v, _, _ = _ends(case, 0)
        script.drop(_tcp(case, c, v, "PA", 1000, 2000, b"data after a restart"))
        script.drop(_tcp(case, (c[0], c[1] + 1), v, "FA", 1000, 2000))
        _handshake(case, script, 2, 0)
    else:
        assert how == "hash"
        picks = []
        for flow in range(6):
            c, v, s, _ = _ends(case, flow, 0)
            b = hash_backend(case, *c)
            picks.append(b)
            _, _, _, back = _ends(case, flow, b)
            if flow % 2 == 0:  # the client speaks first: adopted from its packet
                script.step(_tcp(case, c, v, "PA", 1000, 2000, b"more"),
                            _tcp(case, s, back, "PA", 1000, 2000, b"more"))
                script.step(_tcp(case, back, s, "A", 2000, 1004, ident=2),
                            _tcp(case, v, c, "A", 2000, 1004, ident=2))
            else:  # the backend speaks first: adopted from its reply
                script.step(_tcp(case, back, s, "PA", 2000, 1000, b"push", ident=2),
                            _tcp(case, v, c, "PA", 2000, 1000, b"push", ident=2))
                script.step(_tcp(case, c, v, "A", 1000, 2004),
                            _tcp(case, s, back, "A", 1000, 2004))
            script.flows[b] += 1
        assert set(picks) == {0, 1}, picks  # both backends are used
        # a reply from the backend the hash does not pick is not ours: passed unchanged
        c, v, s, _ = _ends(case, 9, 0)
        _, _, _, other = _ends(case, 9, 1 - hash_backend(case, *c))
        stray = _tcp(case, other, s, "PA", 2000, 1000, b"stray", ident=2)
        script.step(stray, stray)


def bounded(case: Case, script: Script) -> None:
    """At the limit: new flows refused (pool) or the oldest flow evicted (table); the flows
    that stay are rewritten as before."""
    if case.mode == "fullnat":  # one pool port for each of two backends, three clients
        for flow in range(2):
            c, v, s, b = _ends(case, flow)
            script.step(_ip(case, c[0], v[0], 1) / _l4(case, c[1], v[1], "", b"q"),
                        _ip(case, s[0], b[0], 1) / _l4(case, s[1], b[1], "", b"q"))
        c, v, _, _ = _ends(case, 2, 0)
        script.drop(_ip(case, c[0], v[0], 1) / _l4(case, c[1], v[1], "", b"refused"))
        for flow in range(2):  # the two flows that have ports carry on, both ways
            c, v, s, b = _ends(case, flow)
            script.step(_ip(case, b[0], s[0], 2) / _l4(case, b[1], s[1], "", b"answer"),
                        _ip(case, v[0], c[0], 2) / _l4(case, v[1], c[1], "", b"answer"))
        script.flows = [1, 1]
        return
    # max_flows = 2: the third SYN evicts the flow nearest its idle timeout (all three are
    # half-open, so the oldest); that flow's next packet is then unknown (a RST answers it)
    for flow in range(3):
        c, v, s, b = _ends(case, flow, flow % 2)
        script.step(_tcp(case, c, v, "S", 1000, 0), _tcp(case, s, b, "S", 1000, 0))
    c, v, _, _ = _ends(case, 0)
    late = _tcp(case, c, v, "A", 1001, 2001)
    script.step(late, _rst(case, late))
    c, v, s, b = _ends(case, 1, 1)
    script.step(_tcp(case, c, v, "A", 1001, 2001), _tcp(case, s, b, "A", 1001, 2001))
    script.flows = [2, 1]


def script_of(case: Case) -> Script:
    script = Script()
    if case.kind in ("conversation", "zero_checksum"):
        conversation(case, script)
    elif case.kind == "frag":
        fragmented(case, script)
    elif case.kind == "bounded":
        bounded(case, script)
    else:
        unknown(case, script)
    return script


def packets(case: Case) -> tuple[list[Packet], list[Packet]]:
    """(input, expected) packets, timestamped: the expected packets of an input packet carry
    its time. scapy fills in every checksum when the packets are turned to bytes."""
    inp: list[Packet] = []
    exp: list[Packet] = []
    for i, (before, after) in enumerate(script_of(case).steps):
        t = T0 + i * 0.01
        for pkt, into in [(before, inp)] + [(a, exp) for a in after]:
            if case.link == "ether":
                pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt
            pkt = pkt.__class__(bytes(pkt))
            pkt.time = t
            into.append(pkt)
    return inp, exp


def expectations(case: Case) -> tuple[int, list[int]]:
    """(packets dropped, flows per backend) of replaying the case."""
    script = script_of(case)
    return script.dropped, script.flows


def paths(case: Case) -> tuple[Path, Path, Path]:
    return (HERE / f"{case.name}.toml", HERE / f"{case.name}.in.pcap",
            HERE / f"{case.name}.expected.pcap")


def write(case: Case) -> None:
    cfg, inp_path, exp_path = paths(case)
    inp, exp = packets(case)
    cfg.write_text(config_text(case))
    # scapy warns that raw IPv6 "should" be link type 229; 101 (raw IP) is what we mean
    log = logging.getLogger("scapy.runtime")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        wrpcap(str(inp_path), inp, linktype=1 if case.link == "ether" else 101)
        wrpcap(str(exp_path), exp, linktype=1 if case.link == "ether" else 101)
    finally:
        log.setLevel(level)


if __name__ == "__main__":
    for c in CASES:
        write(c)
        print("wrote", *paths(c))
