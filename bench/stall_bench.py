"""The worker never stalls: the longest gap between two reads of the queue while a million
flows expire at once, and while the counters are printed.

The real event loop of ``nfqlb run`` (``nfqlb.io.daemon.Server`` on uvloop) serves a stand-in
queue: a socketpair that a writer process feeds every millisecond (a process, as the kernel
feeds a queue: a thread would wait for the worker's GIL), read by an adapter that records
when each read happens. The engine holds N UDP flows, all idle since time 0; the
adapter's clock starts past the UDP timeout, so every flow is due at the first timer. Then
SIGUSR1-style stats are printed (to /dev/null) a few times. Printed: the flows expired, the
timer slices, and the longest gap between two reads during the expiry and around the stats,
next to the median gap (the writer's own pace).

Before that, what Python's cyclic garbage collector costs with the table full: the longest
of its automatic full collections while the table filled (one comes each time the objects
that outlived the young collections have grown by a quarter, and stops the worker for its
whole walk) and the time of one full collection with the table full. Compiled, flows are
not tracked by the collector (``nfqlb.flows.Flow``); as plain Python (``NFQLB_PURE=1``) the
walk grows with the table.

    python bench/stall_bench.py [--flows 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from nfqlb import native
from nfqlb.config import parse_config
from nfqlb.engine import Engine
from nfqlb.io.daemon import HeldPackets, Server, _new_loop

VIP = "198.18.100.1"


def udp_packet(src: bytes, sport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 4, 1, 0x4000, 64, 17, 0, src,
                     bytes((198, 18, 100, 1)))
    return ip + struct.pack("!HHHH", sport, 53, 12, 0) + b"ping"


def build(flows: int) -> Engine:
    cfg = parse_config({"service": [{
        "name": "dns", "vip": VIP, "port": 53, "protocol": "udp", "mode": "dnat",
        "backend": [{"address": f"198.18.1.{i}", "port": 5353} for i in (2, 3, 4)]}],
        "daemon": {"max_flows": flows + 1}, "timeouts": {"udp": 300}})
    engine = Engine(cfg)
    for i in range(flows):
        src = bytes((198, 19, i >> 16 & 0xFF, i >> 8 & 0xFF))
        engine.handle(udp_packet(src, 1024 + (i & 0xFF) * 200 + (i >> 24)), 0.0)
    assert engine.table.active == flows, engine.table.active
    return engine


class StandInQueue:
    """The adapter shape the Server needs, over one end of a socketpair; records reads."""

    def __init__(self, sock: socket.socket, clock_offset: float) -> None:
        self.sock = sock
        self.offset = clock_offset
        self.reads: list[float] = []

    def clock(self) -> float:
        return time.monotonic() + self.offset

    def bind(self) -> None: ...
    def unbind(self) -> None: ...
    def drain(self) -> None: ...

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        self.reads.append(time.perf_counter())
        with contextlib.suppress(BlockingIOError):
            self.sock.recv(65536)

    def format_stats(self) -> str:
        return f"stand-in queue: {len(self.reads)} reads"


class _TimerCounted:
    """The engine as the Server sees it, with its timer calls going through ``on_timer``
    (a compiled engine's methods cannot be replaced on the instance)."""

    def __init__(self, engine: Engine, on_timer: Callable[[float], None]) -> None:
        self._engine = engine
        self.handle_timer = on_timer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def longest_gap(reads: list[float], start: float, end: float) -> float:
    """The longest time without a read between ``start`` and ``end`` (edges included)."""
    window = [start, *(t for t in reads if start < t < end), end]
    return max(b - a for a, b in zip(window, window[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1_000_000)
    ap.add_argument("--stats", type=int, default=5, help="stats printouts")
    a = ap.parse_args()
    full_pauses: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            full_pauses.append(time.perf_counter() - started[0])

    gc.collect()
    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    engine = build(a.flows)
    gc.callbacks.remove(on_gc)
    print(f"stall benchmark: {a.flows:,} UDP flows built in {time.perf_counter() - t0:.1f} s, "
          f"pid {os.getpid()}, engine: {native.STATE}")
    t1 = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - t1
    longest = f"{max(full_pauses) * 1e3:.2f} ms" if full_pauses else "none came"
    print(f"  automatic full garbage collections while the table filled: {len(full_pauses)}, "
          f"the longest {longest}")
    print(f"  one full garbage collection with the table full: {full * 1e3:9.2f} ms "
          f"({len(gc.get_objects()):,} objects tracked)")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    queue = StandInQueue(ours, clock_offset=10.0 - time.monotonic())  # nothing due yet
    loop = _new_loop()
    # a packet every millisecond, bounded in count (at most 120 s) and by the run
    feed = ("import socket, sys, time\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "for _ in range(120_000):\n"
            "    time.sleep(0.001)\n"
            "    try:\n"
            "        s.send(b'x')\n"
            "    except OSError:\n"
            "        break\n")

    marks: dict[str, float] = {}
    timer_calls = 0
    handle_timer = engine.handle_timer

    def counted(now: float) -> None:
        nonlocal timer_calls
        if "jump" in marks:
            timer_calls += 1
        handle_timer(now)
        if "jump" in marks and engine.table.active == 0 and "expired" not in marks:
            marks["expired"] = time.perf_counter()
            loop.call_later(0.2, loop.stop)

    server = Server(loop, _TimerCounted(engine, counted),  # type: ignore[arg-type]
                    [queue], HeldPackets(engine), logging.getLogger("bench"))

    def print_stats() -> None:
        marks["stats_start"] = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            for _ in range(a.stats):
                server.print_stats()
        marks["stats_end"] = time.perf_counter()
        loop.call_later(0.3, jump)

    def jump() -> None:  # every flow is due now
        queue.offset += 300.0
        marks["jump"] = time.perf_counter()

    writer = subprocess.Popen([sys.executable, "-c", feed, str(theirs.fileno())],
                              pass_fds=(theirs.fileno(),))
    time.sleep(0.2)  # the writer is running
    loop.call_later(0.5, print_stats)
    try:
        server.serve()
    finally:
        writer.kill()
        writer.wait()
        loop.close()
    reads = queue.reads
    gaps = [b - a for a, b in zip(reads, reads[1:], strict=False)]
    stats = longest_gap(reads, marks["stats_start"], marks["stats_end"])
    expiry = longest_gap(reads, marks["jump"], marks["expired"])
    print(f"  longest time unread during {a.stats} stats printouts (full table): "
          f"{stats * 1e3:9.2f} ms")
    print(f"  expired {a.flows:,} flows in {marks['expired'] - marks['jump']:.2f} s "
          f"(from the clock's jump), {timer_calls} timer calls")
    print(f"  longest time unread while they expired:                 {expiry * 1e3:9.2f} ms")
    print(f"  median gap between reads (the writer's pace, 1 ms):     "
          f"{statistics.median(gaps) * 1e3:9.2f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
