"""The packets' coarse clock (nfqlb/io/clock.py): one float object per 10 ms tick, handed to
every wakeup of every queue in the tick, so flows touched in one tick share their last-use
time; the daemon's timer waits a tick for a deadline inside the current one; health checks
time their probes on a precise clock. Sources are fake (a list to set), never the wall."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from helpers import CLIENT, VIP, engine, service, tcp

from nfqlb import native
from nfqlb.config import parse_config
from nfqlb.engine import Engine
from nfqlb.io import daemon, netlink, nfqueue, offload
from nfqlb.io.clock import MONOTONIC, RESOLUTION_S, CoarseClock
from nfqlb.io.health import HealthChecker
from nfqlb.offload import OffloadDecider
from nfqlb.verdict import ACCEPT

LOG = logging.getLogger("test.clock")


class Source:
    """A settable source clock."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ the clock itself


def test_the_same_object_within_a_tick_and_a_new_one_after() -> None:
    src = Source(100.0)
    clock = CoarseClock(src)
    first = clock()
    src.t += RESOLUTION_S / 2
    assert clock() is first
    src.t = first + RESOLUTION_S * 0.999
    assert clock() is first  # the tick is measured from the object's own reading
    src.t = first + RESOLUTION_S
    second = clock()
    assert second is not first and second == src.t
    src.t += RESOLUTION_S / 3
    assert clock() is second


def test_a_source_that_goes_back_starts_a_new_tick() -> None:
    src = Source(100.0)
    clock = CoarseClock(src)
    clock()
    src.t = 50.0
    assert clock() == 50.0


def test_the_default_is_one_coarse_clock_over_time_monotonic() -> None:
    assert isinstance(MONOTONIC, CoarseClock)
    assert MONOTONIC.source is time.monotonic
    assert MONOTONIC.resolution == RESOLUTION_S == 0.01


# ------------------------------------------------------------------ the adapters


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> Source:
    """The process's coarse clock (the adapters' default) over a fake source."""
    src = Source(500.0)
    monkeypatch.setattr(MONOTONIC, "source", src)
    monkeypatch.setattr(MONOTONIC, "_now", src.t)
    return src


def test_every_adapter_defaults_to_the_process_coarse_clock() -> None:
    def handle(data: bytes, now: float) -> Any:
        return ACCEPT

    cfg = parse_config({"service": [service("dnat")]})
    decider = OffloadDecider(cfg, Engine(cfg).services, Engine(cfg).counters)
    for adapter in (nfqueue.QueueAdapter(handle, 1, LOG),
                    netlink.NetlinkQueueAdapter(handle, 1, LOG),
                    offload.OffloadQueueAdapter(decider, 1, LOG),
                    offload.OffloadNetlinkAdapter(decider, 1, LOG)):
        assert adapter.clock is MONOTONIC, type(adapter).__name__


class _Pkt:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.verdict = ""

    def get_payload(self) -> bytes:
        return self.data

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


class _Binding:
    """NetfilterQueue's ``run_socket``: one packet a wakeup to the adapter's callback."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def run_socket(self, s: Any) -> None:
        self.callback(_Pkt(b"x"))


def test_two_nfqueue_wakeups_within_a_tick_hand_the_same_now(frozen: Source) -> None:
    seen: list[float] = []
    adapter = nfqueue.QueueAdapter(lambda data, now: seen.append(now) or ACCEPT, 1, LOG)
    adapter._nfq = _Binding(adapter._make_callback())
    sock = socket.socket()  # (never read: the fake binding reads nothing)
    adapter._budget = nfqueue._BudgetSocket(sock, adapter._on_enobufs)
    try:
        adapter.on_readable()
        frozen.t += RESOLUTION_S / 2
        adapter.on_readable()
        frozen.t += RESOLUTION_S
        adapter.on_readable()
    finally:
        sock.close()
    assert len(seen) == 3 and adapter.wakeups == 3
    assert seen[0] is seen[1] and seen[2] is not seen[1]


def _packet_message(packet_id: int, data: bytes) -> bytes:
    attrs = netlink.build_attr(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x800, 0))
    attrs += netlink.build_attr(netlink.NFQA_PAYLOAD, data)
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 9, attrs)


def test_two_netlink_wakeups_within_a_tick_hand_the_same_now(frozen: Source) -> None:
    seen: list[float] = []
    adapter = netlink.NetlinkQueueAdapter(lambda data, now: seen.append(now) or ACCEPT, 1, LOG)
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        ours.setblocking(False)
        adapter._sock = ours
        for i in range(3):
            kernel.send(_packet_message(i + 1, tcp(CLIENT, VIP, 40000, 80)))
            adapter.on_readable()
            frozen.t += RESOLUTION_S * 0.6  # the second wakeup in the first's tick, not the third
        assert len(seen) == 3 and adapter.packets == 3
        assert seen[0] == seen[1] and seen[2] != seen[1]
        if not native.NATIVE:  # (compiled, the adapter holds `now` as a C double)
            assert seen[0] is seen[1]
        assert len(kernel.recv(4096)) > 0  # (the verdicts went out)
    finally:
        adapter._sock = None
        ours.close()
        kernel.close()


# ------------------------------------------------------------------ flows share `last`


def _syns(n: int) -> list[bytes]:
    """n SYNs from CLIENT to the VIP, one per source port (the engine checks no checksum)."""
    syn = tcp(CLIENT, VIP, 1024, 80, flags="S")
    return [syn[:20] + struct.pack("!H", 1024 + i) + syn[22:] for i in range(n)]


def test_flows_installed_within_a_tick_share_their_last_object() -> None:
    eng = engine(service("dnat"), daemon={"max_flows": 10_000})
    src = Source(10.0)
    clock = CoarseClock(src)
    for i, syn in enumerate(_syns(3000)):
        src.t = 10.0 + i * 1e-5  # one flow per 10 us: 1000 flows a tick, three ticks
        assert isinstance(eng.handle(syn, clock()), bytes)
    flows = eng.table.flows()
    assert len(flows) == 3000
    assert len({f.last for f in flows}) == 3
    if not native.NATIVE:  # (compiled, a flow holds its `last` as a C double: no object)
        assert len({id(f.last) for f in flows}) == 3


def _traced_bytes_per_flow(now_of: Any, n: int) -> float:
    eng = engine(service("dnat"), daemon={"max_flows": 2 * n})
    syns = _syns(n)
    eng.handle(syns[-1], now_of(-1))  # warm up: the first flow's one-off allocations
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n - 1):
            eng.handle(syns[i], now_of(i))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert eng.table.active == n
    return grown / (n - 1)


def test_flows_of_one_tick_allocate_no_float_each() -> None:
    """The same flows, once with a fresh float per flow (the old clock: one per wakeup) and
    once with the coarse clock's tick: the difference is one float a flow."""
    n = 4000
    src = Source(10.0)
    clock = CoarseClock(src, resolution=1.0)  # every flow in one tick

    def coarse(i: int) -> float:
        src.t = 10.0 + (i + 1) * 1e-6
        return clock()

    def fresh(i: int) -> float:
        return 10.0 + (i + 1) * 1e-6

    with_fresh = _traced_bytes_per_flow(fresh, n)
    with_coarse = _traced_bytes_per_flow(coarse, n)
    if native.NATIVE:  # a compiled flow holds `last` as a C double: no float object either way
        assert abs(with_fresh - with_coarse) < 0.5 * sys.getsizeof(0.0)
    else:
        assert with_fresh - with_coarse >= 0.9 * sys.getsizeof(0.0)


# ------------------------------------------------------------------ the daemon's timer


class _Loop:
    def __init__(self) -> None:
        self.now = 100.0
        self.calls: list[float] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: object) -> Any:
        self.calls.append(when)
        return type("Handle", (), {"cancel": lambda self: None})()


class _Engine:
    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline
        self.fired: list[float] = []
        self.shortest_timeout = 0.001  # under TIMER_MAX_S: a read asks for the deadline

    def output_pending(self) -> bool:
        return False

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        if self.deadline is not None and self.deadline <= now:
            self.deadline = None  # done (what the table's expire does for a due flow)

    def released_verdicts(self) -> list[tuple[int, object]]:
        return []

    def packets_to_send(self) -> list[bytes]:
        return []

    def kernel_flows_to_reset(self) -> list[tuple[object, object, str]]:
        return []


@pytest.mark.parametrize("ahead", [1e-6, 0.001, RESOLUTION_S * 0.9])
def test_a_deadline_within_the_tick_is_met_by_one_firing_a_tick_later(ahead: float) -> None:
    """The timer armed for a deadline just past the tick's now waits a whole tick: firing
    sooner would read the same now, find the deadline ahead and re-arm, again and again until
    the tick ends (a busy loop of up to 10 ms)."""
    src = Source(10.0)
    clock = CoarseClock(src)
    eng = _Engine(clock() + ahead)
    adapter: Any = type("Adapter", (), {"clock": clock, "queue": 1})()
    loop = _Loop()
    server = daemon.Server(loop, eng, [adapter], daemon.HeldPackets(eng), LOG)  # type: ignore[arg-type]
    server._arm_timer()
    for _ in range(100):  # the loop: run the timer when it is due, the clock running with it
        if eng.deadline is None:
            break
        src.t += loop.calls[-1] - loop.now
        loop.now = loop.calls[-1]
        server._on_timer()
    assert eng.deadline is None  # met ...
    assert len(eng.fired) == 1  # ... by the first firing
    assert loop.calls[0] == 100.0 + RESOLUTION_S


def test_a_read_within_the_tick_leaves_the_padded_timer_alone() -> None:
    src = Source(10.0)
    clock = CoarseClock(src)
    eng = _Engine(clock() + 0.001)
    adapter: Any = type("Adapter", (), {"clock": clock, "queue": 1,
                                        "on_readable": lambda self: None})()
    loop = _Loop()
    server = daemon.Server(loop, eng, [adapter], daemon.HeldPackets(eng), LOG)  # type: ignore[arg-type]
    server._arm_timer()
    server._on_readable(adapter)  # the same deadline: armed already
    assert len(loop.calls) == 1


# ------------------------------------------------------------------ health checks


def test_a_health_check_is_timed_on_a_precise_clock(tmp_path: Path) -> None:
    """With the packets' clock frozen in one tick, a check that takes time still has a
    latency (the old checker measured it on the packets' clock: 0)."""
    (tmp_path / "check.sh").write_text("#!/bin/sh\nsleep 0.02\n")
    (tmp_path / "check.sh").chmod(0o755)
    cfg = parse_config({"service": [{
        "name": "web", "vip": "198.18.100.1", "port": 80, "mode": "dnat",
        "backend": [{"name": "b1", "address": "198.18.1.2", "port": 8080}],
        "health": {"kind": "command", "command": "./check.sh", "timeout": 5, "interval": 10}}]},
        str(tmp_path / "nfqlb.toml"))

    async def main() -> Any:
        frozen = CoarseClock(Source(7.0))
        c = HealthChecker(cfg, object(), asyncio.get_running_loop(), LOG, frozen)  # type: ignore[arg-type]
        [target] = c.targets.values()
        try:
            return await c.check(target)
        finally:
            c.stop()

    result = asyncio.run(asyncio.wait_for(main(), 20))
    assert result.ok and result.latency is not None and result.latency > 0
