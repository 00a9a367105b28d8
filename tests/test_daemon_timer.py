"""The server's loop timer: re-armed after a read only when the engine's deadline moved
earlier than the armed one, never after every read (a fake loop counts the ``call_at``s)."""

from __future__ import annotations

import logging

from nfqlb.io import daemon


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.calls: list[float] = []  # loop times of call_at
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: object) -> FakeHandle:
        self.calls.append(when)
        self.handles.append(FakeHandle())
        return self.handles[-1]

    def stop(self) -> None:
        raise AssertionError("the loop was stopped: a read failed")


class FakeEngine:
    def __init__(self) -> None:
        self.deadline: float | None = None

    def get_timer(self) -> float | None:
        return self.deadline

    def released_verdicts(self) -> list[tuple[int, object]]:
        return []

    def packets_to_send(self) -> list[bytes]:
        return []

    def kernel_flows_to_reset(self) -> list[tuple[object, object, str]]:
        return []


class FakeAdapter:
    queue = 1

    def __init__(self, clock: list[float]) -> None:
        self._clock = clock
        self.reads = 0

    def clock(self) -> float:
        return self._clock[0]

    def on_readable(self) -> None:
        self.reads += 1


def make_server() -> tuple[daemon.Server, FakeLoop, FakeEngine, FakeAdapter, list[float]]:
    loop, engine, clock = FakeLoop(), FakeEngine(), [10.0]
    adapter = FakeAdapter(clock)
    log = logging.getLogger("test")
    server = daemon.Server(loop, engine, [adapter], daemon.HeldPackets(engine),  # type: ignore[arg-type]
                           log)
    return server, loop, engine, adapter, clock


def test_reads_leave_the_timer_alone_while_the_deadline_is_not_earlier() -> None:
    server, loop, engine, adapter, clock = make_server()
    engine.deadline = clock[0] + 0.5
    server._arm_timer()
    assert len(loop.calls) == 1
    assert loop.calls[0] == loop.now + 0.5
    for deadline in (None, clock[0] + 0.5, clock[0] + 0.7, clock[0] + 30.0):
        engine.deadline = deadline
        server._on_readable(adapter)  # type: ignore[arg-type]
    assert adapter.reads == 4
    assert len(loop.calls) == 1
    assert not loop.handles[0].cancelled


def test_a_read_that_brings_the_deadline_earlier_re_arms_once() -> None:
    server, loop, engine, adapter, clock = make_server()
    server._arm_timer()  # no deadline: at most TIMER_MAX_S away
    assert loop.calls == [loop.now + daemon.TIMER_MAX_S]
    engine.deadline = clock[0] + 0.25
    server._on_readable(adapter)  # type: ignore[arg-type]
    assert len(loop.calls) == 2
    assert loop.calls[1] == loop.now + 0.25
    assert loop.handles[0].cancelled and not loop.handles[1].cancelled
    server._on_readable(adapter)  # type: ignore[arg-type]  (the same deadline: armed already)
    assert len(loop.calls) == 2


def test_the_timer_rearms_itself_after_it_fires() -> None:
    server, loop, engine, adapter, clock = make_server()
    engine.deadline = clock[0] + 0.5
    server._arm_timer()
    clock[0] += 0.5
    loop.now += 0.5
    engine.deadline = clock[0] + 2.0  # beyond TIMER_MAX_S: capped

    fired: list[float] = []
    engine.handle_timer = fired.append  # type: ignore[attr-defined]
    server._on_timer()
    assert fired == [clock[0]]
    assert loop.calls[-1] == loop.now + daemon.TIMER_MAX_S
    assert len(loop.calls) == 2
