"""fullnat port capacity: which rate of short connections a 10,000-port pool sustains.

Offline, no kernel: ``Engine.handle`` over crafted IPv4/TCP packets on a simulated clock
(the timer runs as the daemon runs it). Each connection is a handshake, then after
``--duration`` seconds the server's FIN, the client's FIN and the last ACK: the flow then
lingers ``tcp_close`` (10 s) in CLOSING for retransmissions, holding its port. Before ports
were unique per backend and closed flows gave theirs back, a pool sustained
``ports / tcp_close`` = 1,000 such connections a second per snat address, whatever the number
of backends.

For each rate and number of backends it prints the connections refused (``snat_exhausted``),
the closed flows that gave their port to a new one (``reclaimed``), the shortest and median
time between a port's release and its next use toward the same backend (the backend may still
hold the old connection in TIME_WAIT, 60 s on Linux: a reuse within that is accepted when the
new SYN's sequence number or timestamp is newer, else the client retries), and the engine's
CPU per connection on this machine (indicative).

    python bench/snat_bench.py [--seconds 20] [--rates 1000,3000,6000] [--backends 1,2]
                               [--no-closed-reclaim]
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import struct
import time

from nfqlb.config import parse_config
from nfqlb.engine import Engine

VIP, SNAT = "198.18.100.1", "198.18.1.1"


def _addr(text: str) -> bytes:
    return bytes(map(int, text.split(".")))


def _tcp(src: bytes, sport: int, dst: bytes, dport: int, flags: int) -> bytes:
    """An IPv4/TCP segment without options (zero checksums: the engine updates them
    incrementally, which is all that is measured here)."""
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, src, dst)
            + struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0))


def engine(backends: int, ports: str) -> Engine:
    svc = {"name": "web", "vip": VIP, "port": 80, "mode": "fullnat", "snat_address": SNAT,
           "snat_ports": ports,
           "backend": [{"address": f"198.18.1.{2 + i}", "port": 8080} for i in range(backends)]}
    return Engine(parse_config({"service": [svc], "daemon": {"max_flows": 1_000_000}},
                               "bench"))


def run(rate: float, seconds: float, backends: int, duration: float,
        ports: str) -> dict[str, float]:
    eng = engine(backends, ports)
    vip, snat = _addr(VIP), _addr(SNAT)
    n = int(rate * seconds)
    closes: list[tuple[float, int, bytes, int, bytes, int]] = []
    released: dict[tuple[bytes, int], float] = {}  # (backend, port) -> when its flow closed
    gaps: list[float] = []
    refused = 0
    cpu = time.process_time()
    for i in range(n):
        now = i / rate
        while closes and closes[0][0] <= now:
            t, _, src, sport, backend, port = heapq.heappop(closes)
            eng.handle(_tcp(backend, 8080, snat, port, 0x11), t)  # the server closes first
            eng.handle(_tcp(src, sport, vip, 80, 0x11), t)
            eng.handle(_tcp(backend, 8080, snat, port, 0x10), t)
            released[(backend, port)] = t
        if i % 100 == 0:
            eng.handle_timer(now)
        src, sport = bytes((198, 19, i // 250 % 250, i % 250 + 1)), 1024 + i % 60000
        out = eng.handle(_tcp(src, sport, vip, 80, 0x02), now)
        if not isinstance(out, bytes):
            refused += 1
            continue
        backend, port = out[16:20], out[20] << 8 | out[21]
        last = released.pop((backend, port), None)
        if last is not None:
            gaps.append(now - last)
        eng.handle(_tcp(backend, 8080, snat, port, 0x12), now)
        eng.handle(_tcp(src, sport, vip, 80, 0x10), now)
        heapq.heappush(closes, (now + duration, i, src, sport, backend, port))
    cpu = time.process_time() - cpu
    return {"connections": n, "refused": refused,
            "reclaimed": eng.counters.events.get("reclaimed", 0),
            "gap_min": min(gaps) if gaps else float("nan"),
            "gap_median": statistics.median(gaps) if gaps else float("nan"),
            "us_per_conn": cpu / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per run")
    ap.add_argument("--rates", default="1000,3000,6000", help="new connections per second")
    ap.add_argument("--backends", default="1,2")
    ap.add_argument("--duration", type=float, default=0.05,
                    help="seconds from handshake to the server's FIN")
    ap.add_argument("--ports", default="20000-29999")
    ap.add_argument("--no-closed-reclaim", action="store_true",
                    help="for comparison: closed flows keep their ports until they expire")
    args = ap.parse_args()
    if args.no_closed_reclaim:
        import nfqlb.engine

        nfqlb.engine.CLOSED_STATES = frozenset()  # _track_port then never lists closed flows
    print(f"fullnat pool {args.ports}, tcp_close 10 s, connections of {args.duration * 1e3:.0f}"
          f" ms, {args.seconds:.0f} simulated s per run")
    print(f"{'backends':>8} {'conn/s':>7} {'connections':>11} {'refused':>8} {'reclaimed':>9} "
          f"{'reuse min s':>11} {'reuse med s':>11} {'us/conn':>8}")
    for backends in (int(b) for b in args.backends.split(",")):
        for rate in (float(r) for r in args.rates.split(",")):
            r = run(rate, args.seconds, backends, args.duration, args.ports)
            print(f"{backends:>8} {rate:>7.0f} {r['connections']:>11.0f} {r['refused']:>8.0f} "
                  f"{r['reclaimed']:>9.0f} {r['gap_min']:>11.2f} {r['gap_median']:>11.2f} "
                  f"{r['us_per_conn']:>8.1f}")


if __name__ == "__main__":
    main()
