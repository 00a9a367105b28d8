"""Engine benchmark: packets/s per core on established flows, new flows/s, connections/s.

A connection is the eight packets of a short one (handshake, one request and response, both
FINs and the last ACK), so its figure is the engine's whole cost of a connection's life.

Offline, one core, no kernel: ``Engine.handle`` over prebuilt packets, timed with
``time.perf_counter``; the median of several rounds is printed. For scale, the same run times
two reference rewriters of the same packets: a dpkt parse/modify/serialise per packet (the
"straightforward Python rewriter") and scapy per packet (on a small sample). Last, the full
checksum of a 64 KiB GSO packet (what a local-mode upload pays per packet, see
``nfqlb.wire.rewrite.complete_checksum``) with numpy's sum and with the big-integer one, and
a forwarded 64 KiB GSO packet's whole way through the netlink client in user space (the
message parsed, the engine's rewrite, the partial checksum, the verdict queued), over 64
different packets so that they do not all sit in the cache.

    python bench/engine_bench.py [--flows 1000] [--packets 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import struct
import time
from collections.abc import Callable

from nfqlb import native
from nfqlb.config import parse_config
from nfqlb.engine import Engine
from nfqlb.io import netlink
from nfqlb.offload import OffloadDecider
from nfqlb.wire import checksum
from nfqlb.wire.rewrite import complete_checksum

CLIENT_NET = "198.18.{}.{}"
VIP = "198.18.100.1"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes,
               seq: int = 1) -> bytes:
    """A valid IPv4/TCP packet with correct checksums (built by hand: fast for big sets)."""
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + tcp


def config(mode: str) -> dict[str, object]:
    svc: dict[str, object] = {
        "name": "web", "vip": VIP, "port": 80, "mode": mode,
        "backend": [{"address": f"198.18.1.{i}", "port": 8080} for i in (2, 3, 4)],
    }
    if mode == "fullnat":
        svc.update(snat_address="198.18.1.1", snat_ports="1024-65535")
    return {"service": [svc]}


def client(i: int) -> tuple[str, int]:
    return CLIENT_NET.format(i // 250 % 250, i % 250 + 2), 10000 + i % 50000


def established(mode: str, flows: int, payload: int) -> tuple[Engine, list[bytes]]:
    """An engine holding ``flows`` established flows, and one data packet per direction each."""
    engine = Engine(parse_config(config(mode)))
    packets = []
    for i in range(flows):
        src, sport = client(i)
        syn = engine.handle(tcp_packet(src, VIP, sport, 80, 0x02, b""), 0.0)
        assert isinstance(syn, bytes), "SYN was not rewritten"
        bsrc, bdst = syn[16:20], syn[12:16]
        bsport, bdport = struct.unpack("!HH", syn[22:24] + syn[20:22])
        reply_src = ".".join(map(str, bsrc))
        reply_dst = ".".join(map(str, bdst))
        engine.handle(tcp_packet(reply_src, reply_dst, bsport, bdport, 0x12, b""), 0.0)
        engine.handle(tcp_packet(src, VIP, sport, 80, 0x10, b""), 0.0)
        packets.append(tcp_packet(src, VIP, sport, 80, 0x18, b"x" * payload))
        packets.append(tcp_packet(reply_src, reply_dst, bsport, bdport, 0x10, b"y" * payload))
    assert engine.table.active == flows
    return engine, packets


def rate(fn: Callable[[], int], rounds: int) -> float:
    """Median items/s over ``rounds`` runs of ``fn`` (which returns how many it did)."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_engine(mode: str, flows: int, total: int, payload: int, rounds: int) -> float:
    engine, packets = established(mode, flows, payload)
    reps = max(1, total // len(packets))
    handle = engine.handle
    before = engine.stats()["rewritten"]

    def run() -> int:
        for _ in range(reps):
            for p in packets:
                handle(p, 1.0)
        return reps * len(packets)

    pps = rate(run, rounds)
    missed = reps * len(packets) * rounds - (engine.stats()["rewritten"] - before)
    assert missed == 0, "fast path missed packets"
    return pps


def bench_new_flows(mode: str, count: int, rounds: int) -> float:
    syns = [tcp_packet(*_sv(i), 0x02, b"") for i in range(count)]

    def run() -> int:
        engine = Engine(parse_config(config(mode)))
        for p in syns:
            engine.handle(p, 0.0)
        assert engine.counters.flows_total == count
        return count

    return rate(run, rounds)


def bench_offload(count: int, rounds: int) -> float:
    """Mode "offload": ``OffloadDecider.handle`` over first packets (SYNs), each answered
    with a backend's mark; nothing is kept per flow."""
    syns = [tcp_packet(*_sv(i), 0x02, b"") for i in range(count)]
    cfg = parse_config(config("offload"))
    engine = Engine(cfg)
    decider = OffloadDecider(cfg, engine.services, engine.counters)
    handle = decider.handle

    def run() -> int:
        for p in syns:
            if handle(p, 0.0).__class__ is not int:
                raise AssertionError("a first packet was not given a mark")
        return count

    return rate(run, rounds)


def connections(mode: str, count: int) -> list[tuple[bytes, ...]]:
    """The eight packets of each of ``count`` short connections, as the engine sees them:
    SYN, SYN-ACK, ACK, request, response, FIN from the client, FIN from the backend, last
    ACK. Replies are addressed as a first engine rewrote the SYN (a fresh engine of the same
    configuration makes the same choices)."""
    engine = Engine(parse_config(config(mode)))
    out = []
    for i in range(count):
        src, sport = client(i)
        syn = tcp_packet(src, VIP, sport, 80, 0x02, b"")
        got = engine.handle(syn, 0.0)
        assert isinstance(got, bytes), "SYN was not rewritten"
        b_src = ".".join(map(str, got[16:20]))
        b_dst = ".".join(map(str, got[12:16]))
        b_sport, b_dport = struct.unpack("!HH", got[22:24] + got[20:22])

        def back(flags: int, payload: bytes = b"") -> bytes:
            return tcp_packet(b_src, b_dst, b_sport, b_dport, flags, payload)  # noqa: B023

        def fwd(flags: int, payload: bytes = b"") -> bytes:
            return tcp_packet(src, VIP, sport, 80, flags, payload)  # noqa: B023

        out.append((syn, back(0x12), fwd(0x10), fwd(0x18, b"GET / HTTP/1.1\r\n\r\n"),
                    back(0x18, b"HTTP/1.1 200 OK\r\n\r\n"), fwd(0x11), back(0x11),
                    fwd(0x10)))
    return out


def bench_connections(mode: str, count: int, rounds: int) -> float:
    """Connections/s: each one's eight packets (``connections``) through a fresh engine."""
    conns = connections(mode, count)

    def run() -> int:
        engine = Engine(parse_config(config(mode)))
        handle = engine.handle
        now = 0.0
        for packets in conns:
            now += 1e-5
            for p in packets:
                handle(p, now)
        assert engine.counters.flows_total == count
        assert engine.stats()["rewritten"] == 8 * count, "a packet was not rewritten"
        return count

    return rate(run, rounds)


#: The worn pool's ports (``bench_worn``): three backends, so each comes round every 1,000
#: connections to it, as the lab benchmark's 7,500-port pool does after about 1.5 s.
WORN_PORTS = "1024-2023"
WORN_STEP_S = 1e-4  # one connection every 100 us: closed flows (10 s linger) hold every port


def worn_config(mode: str) -> dict[str, object]:
    out = config(mode)
    if mode == "fullnat":
        out["service"][0]["snat_ports"] = WORN_PORTS  # type: ignore[index]
    return out


def worn_connections(mode: str, count: int) -> list[tuple[bytes, ...]]:
    """``count`` connections as an HTTP server with ``Connection: close`` makes them: the
    backend closes first (its TIME_WAIT), each client's initial sequence number random. In
    fullnat the pool runs out of never-used ports after 1,000 connections per backend: then
    each new flow judges the TIME_WAIT of closed flows' ports and takes one back
    (``reclaimed``). Replies are addressed as a first engine rewrote them, at the same times
    (a fresh engine makes the same choices)."""
    rng = random.Random(7)
    engine = Engine(parse_config(worn_config(mode)))
    out = []
    now = 0.0
    for i in range(count):
        now += WORN_STEP_S
        src, sport = client(i)
        isn = rng.getrandbits(32)
        syn = tcp_packet(src, VIP, sport, 80, 0x02, b"", isn)
        got = engine.handle(syn, now)
        assert isinstance(got, bytes), "SYN was not rewritten"
        b_src = ".".join(map(str, got[16:20]))
        b_dst = ".".join(map(str, got[12:16]))
        b_sport, b_dport = struct.unpack("!HH", got[22:24] + got[20:22])

        def back(flags: int, payload: bytes = b"") -> bytes:
            return tcp_packet(b_src, b_dst, b_sport, b_dport, flags, payload)  # noqa: B023

        def fwd(flags: int, payload: bytes = b"") -> bytes:
            return tcp_packet(src, VIP, sport, 80, flags, payload, (isn + 1) & 0xFFFFFFFF)  # noqa: B023

        rest = (back(0x12), fwd(0x10), fwd(0x18, b"GET / HTTP/1.1\r\n\r\n"),
                back(0x18, b"HTTP/1.1 200 OK\r\n\r\n"), back(0x11), fwd(0x11), back(0x10))
        for p in rest:
            engine.handle(p, now)
        out.append((syn, *rest))
    return out


def bench_worn(mode: str, count: int, rounds: int) -> tuple[float, dict[str, int]]:
    """Connections/s of ``worn_connections`` through a fresh engine, and its events."""
    conns = worn_connections(mode, count)
    events: dict[str, int] = {}

    def run() -> int:
        engine = Engine(parse_config(worn_config(mode)))
        handle = engine.handle
        now = 0.0
        for packets in conns:
            now += WORN_STEP_S
            for p in packets:
                handle(p, now)
        assert engine.stats()["rewritten"] == 8 * count, "a packet was not rewritten"
        events.update(engine.counters.events)
        return count

    return rate(run, rounds), events


def _sv(i: int) -> tuple[str, str, int, int]:
    src, sport = client(i)
    return src, VIP, sport, 80


def bench_dpkt(packets: list[bytes], rounds: int) -> float:
    """Reference: parse with dpkt, rewrite destination, let dpkt recompute checksums."""
    import dpkt

    new_dst = bytes([198, 18, 1, 2])

    def run() -> int:
        for p in packets:
            ip = dpkt.ip.IP(p)
            ip.dst = new_dst
            ip.sum = 0
            ip.data.sum = 0
            bytes(ip)
        return len(packets)

    return rate(run, rounds)


def bench_scapy(packets: list[bytes], rounds: int) -> float:
    """Reference: the scapy-per-packet rewriter."""
    from scapy.layers.inet import IP

    def run() -> int:
        for p in packets:
            ip = IP(p)
            ip.dst = "198.18.1.2"
            del ip.chksum
            del ip.payload.chksum
            bytes(ip)
        return len(packets)

    return rate(run, rounds)


def bench_complete_checksum(rounds: int) -> tuple[float, float]:
    """Microseconds per complete_checksum of a 64 KiB TCP packet: (numpy, big integers)."""
    packet = tcp_packet(VIP, "198.18.1.2", 5201, 40000, 0x10, os.urandom(65495))

    def run() -> int:
        for _ in range(200):
            complete_checksum(packet)
        return 200

    vector = rate(run, rounds) if checksum.numpy is not None else 0.0
    saved, checksum.numpy = checksum.numpy, None
    try:
        plain = rate(run, rounds)
    finally:
        checksum.numpy = saved
    return (1e6 / vector if vector else float("nan")), 1e6 / plain


def _packet_message(packet_id: int, data: bytes, info: int) -> bytes:
    attrs = (netlink.build_attr(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x800, 0))
             + netlink.build_attr(netlink.NFQA_SKB_INFO, struct.pack("!I", info))
             + netlink.build_attr(netlink.NFQA_PAYLOAD, data))
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 1, attrs)


def bench_gso_verdict(rounds: int) -> float:
    """Microseconds per forwarded 64 KiB TCP GSO packet (checksum partial, as the kernel
    queues one) through ``NetlinkQueueAdapter._on_packet``: parse, engine, checksum field,
    verdict queued (the socket's send is the kernel's and is not timed)."""
    engine, _ = established("dnat", 1, 0)
    adapter = netlink.NetlinkQueueAdapter(engine.handle, 1, logging.getLogger("bench"))
    src, sport = client(0)
    info = netlink.NFQA_SKB_GSO | netlink.NFQA_SKB_CSUMNOTREADY
    messages = [_packet_message(i, tcp_packet(src, VIP, sport, 80, 0x10, os.urandom(65_000)),
                                info) for i in range(64)]
    buf = adapter._buf

    def run() -> int:
        for m in messages * 4:
            buf[:len(m)] = m
            adapter._on_packet(0, len(m))
            adapter._pending.clear()
        return len(messages) * 4

    us = 1e6 / rate(run, rounds)
    assert adapter.csum_partial == adapter.gso_packets > 0, "not the forwarded GSO path"
    return us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--payload", type=int, default=100, help="TCP payload bytes per packet")
    a = ap.parse_args()
    print(f"engine benchmark: {a.flows} established flows, {a.packets} packets/round, "
          f"payload {a.payload} B, median of {a.rounds} rounds, pid {os.getpid()}; "
          f"engine: {native.STATE}")
    results = {}
    for mode in ("local", "dnat", "fullnat"):
        results[mode] = bench_engine(mode, a.flows, a.packets, a.payload, a.rounds)
        print(f"  established {mode:<8} {results[mode]:>12,.0f} packets/s per core")
    big = bench_engine("fullnat", a.flows, a.packets // 2, 1400, a.rounds)
    print(f"  established fullnat, 1400 B payload {big:>12,.0f} packets/s per core")
    for mode in ("dnat", "fullnat"):
        nf = bench_new_flows(mode, min(20_000, a.packets // 10), a.rounds)
        print(f"  new flows  {mode:<8}  {nf:>12,.0f} flows/s per core (SYN in, rewritten)")
    off = bench_offload(min(20_000, a.packets // 10), a.rounds)
    print(f"  new flows  offload   {off:>12,.0f} flows/s per core (first packet in, a mark "
          "out)")
    for mode in ("dnat", "fullnat"):
        cps = bench_connections(mode, min(10_000, a.packets // 20), a.rounds)
        print(f"  connections {mode:<8} {cps:>11,.0f} /s per core, {1e6 / cps:6.1f} us each "
              "(8 packets: handshake, request, response, both FINs, last ACK)")
    for mode in ("dnat", "fullnat"):
        cps, events = bench_worn(mode, min(30_000, a.packets // 7), a.rounds)
        seen = ", ".join(f"{k} {v:,}" for k, v in sorted(events.items())) or "no events"
        print(f"  connections {mode:<8} {cps:>11,.0f} /s per core, {1e6 / cps:6.1f} us each, "
              f"backend closing first, fullnat's pool worn ({seen})")
    _, sample = established("dnat", min(a.flows, 500), a.payload)
    ref_dpkt = bench_dpkt(sample * 20, a.rounds)
    ref_scapy = bench_scapy(sample[:200], max(1, a.rounds // 2))
    print("references, same packets, same run:")
    print(f"  dpkt parse+rewrite+serialise  {ref_dpkt:>12,.0f} packets/s  "
          f"(nfqlb fullnat is {results['fullnat'] / ref_dpkt:.1f}x)")
    print(f"  scapy per packet              {ref_scapy:>12,.0f} packets/s  "
          f"(nfqlb fullnat is {results['fullnat'] / ref_scapy:.0f}x)")
    vector_us, plain_us = bench_complete_checksum(a.rounds)
    print(f"checksum of a 64 KiB GSO packet delivered locally: {vector_us:.1f} us with numpy, "
          f"{plain_us:.1f} us with big integers")
    print(f"a forwarded 64 KiB GSO packet through the netlink client (parse, rewrite, checksum, "
          f"verdict queued): {bench_gso_verdict(a.rounds):.1f} us")


if __name__ == "__main__":
    main()
