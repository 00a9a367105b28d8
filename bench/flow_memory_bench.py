"""Flow memory benchmark: bytes per established IPv4 TCP flow, by tracemalloc and by RSS.

Installs N flows through the real engine (``Engine.handle`` on crafted packets: SYN,
SYN-ACK, ACK, then one data segment each way, so both directions' sequence state is held),
in ``dnat`` and ``fullnat``, a new flow every 10 us of simulated time, its ``now`` read as the
daemon reads it: from a :class:`nfqlb.io.clock.CoarseClock`, here over the simulated time.
The daemon's adapters hand the engine that coarse clock's ``now``, one float object per 10 ms
tick, so the flows touched in one tick share their last-use time and hold no float of their
own; with a fresh float per flow the bench would count 24 bytes a flow that the daemon does
not keep. Here 1,000 flows share a tick; under a light load a tick holds a flow or two, but
the floats alive are still at most one per tick, over the longest idle timeout (900 s:
90,000 floats, about 2 bytes a flow at 1,000,000 flows), not one per flow.

Each measurement runs in a child process of its own: one traces allocations with tracemalloc
(what the table holds per flow, once the packets are gone), the other, untraced, reads the
process's resident set before and after (what the flows cost the machine, allocator slack
included).

    python bench/flow_memory_bench.py [--flows 1000000] [--modes dnat,fullnat]

fullnat needs a port per flow: its service gets one snat address per 60,000 flows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from typing import Any

VIP = "198.18.100.1"
PORTS_PER_SNAT = 60_000


def config(mode: str, flows: int) -> dict[str, Any]:
    backends = [{"address": f"198.18.1.{i}", "port": 8080} for i in (2, 3, 4)]
    services: list[dict[str, Any]] = []
    if mode == "fullnat":  # one service per snat address: ports are per snat address
        for k in range((flows + PORTS_PER_SNAT - 1) // PORTS_PER_SNAT):
            services.append({"name": f"web{k}", "vip": VIP, "port": 80 + k, "mode": mode,
                             "backend": backends,
                             "snat_address": f"198.19.{k // 250}.{k % 250 + 1}",
                             "snat_ports": f"1024-{1023 + PORTS_PER_SNAT}"})
    else:
        services.append({"name": "web", "vip": VIP, "port": 80, "mode": mode,
                         "backend": backends})
    return {"service": services, "daemon": {"max_flows": flows + 1}}


def packet(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int,
           payload: bytes = b"") -> bytes:
    """An IPv4/TCP segment without options (zero checksums: the engine updates them
    incrementally, it never checks them)."""
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0,
                        src, dst)
            + struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
            + payload)


class SimulatedTime:
    """The coarse clock's source: the simulated time, set by the caller."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def install(engine: Any, mode: str, n: int) -> None:
    from nfqlb.io.clock import CoarseClock

    vip = bytes(map(int, VIP.split(".")))
    simulated = SimulatedTime()
    clock = CoarseClock(simulated)  # the daemon's clock (nfqlb.io.clock.MONOTONIC) over it
    for i in range(n):
        src = struct.pack("!I", (198 << 24 | 18 << 16 | 10 << 8) + i // 50_000)
        sport = 1024 + i % 50_000
        dport = 80 + (i // PORTS_PER_SNAT if mode == "fullnat" else 0)
        simulated.t = i * 1e-5  # a new flow every 10 us
        now = clock()
        out = engine.handle(packet(src, vip, sport, dport, 0x02, 1000, 0), now)
        assert isinstance(out, bytes), "SYN not rewritten"
        bsrc, bdst = out[16:20], out[12:16]
        bsport, bdport = struct.unpack("!HH", out[22:24] + out[20:22])
        engine.handle(packet(bsrc, bdst, bsport, bdport, 0x12, 5000, 1001), now)
        engine.handle(packet(src, vip, sport, dport, 0x10, 1001, 5001), now)
        engine.handle(packet(src, vip, sport, dport, 0x18, 1001, 5001, b"GET /"), now)
        out = engine.handle(packet(bsrc, bdst, bsport, bdport, 0x18, 5001, 1006, b"200"), now)
        assert isinstance(out, bytes), "reply not rewritten"
    assert engine.table.active == n, engine.table.active


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, n: int, how: str) -> dict[str, Any]:
    from nfqlb.config import parse_config
    from nfqlb.engine import Engine

    engine = Engine(parse_config(config(mode, n)))
    engine.handle(b"", 0.0)  # warm up (a dropped runt)
    gc.collect()
    t0 = time.perf_counter()
    if how == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        install(engine, mode, n)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    else:
        before = rss()
        install(engine, mode, n)
        gc.collect()
        grown = rss() - before
    assert engine.stats()["flows_active"] == n
    return {"mode": mode, "flows": n, "how": how, "bytes_per_flow": grown / n,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--modes", default="dnat,fullnat")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "HOW"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.flows, a.child[1])))
        return
    from nfqlb import native

    print(f"flow memory benchmark: {a.flows:,} established IPv4 TCP flows per run, "
          f"python {sys.version.split()[0]}, engine: {native.STATE}")
    for mode in a.modes.split(","):
        got = {}
        for how in ("tracemalloc", "rss"):
            out = subprocess.run([sys.executable, __file__, "--flows", str(a.flows), "--child",
                                  mode, how], check=True, capture_output=True, text=True)
            got[how] = json.loads(out.stdout)
        print(f"  {mode:<8} tracemalloc {got['tracemalloc']['bytes_per_flow']:7.0f} B/flow   "
              f"RSS growth {got['rss']['bytes_per_flow']:7.0f} B/flow   "
              f"(installed in {got['rss']['seconds']:.1f} s untraced)")


if __name__ == "__main__":
    main()
