"""The server's loop timer: re-armed after a read only when the engine's deadline moved
earlier than the armed one, never after every read (a fake loop counts the ``call_at``s);
with no timeout under TIMER_MAX_S a read does not even ask; the engine's output is fetched
only when it has some."""

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
        self.shortest_timeout = 0.1  # under TIMER_MAX_S: reads ask get_timer
        self.asked = 0
        self.pending = False
        self.fetched = 0

    def get_timer(self) -> float | None:
        self.asked += 1
        return self.deadline

    def output_pending(self) -> bool:
        return self.pending

    def released_verdicts(self) -> list[tuple[int, object]]:
        self.fetched += 1
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


def test_with_no_timeout_under_timer_max_reads_do_not_ask_for_the_deadline() -> None:
    server, loop, engine, adapter, clock = make_server()
    engine.shortest_timeout = daemon.TIMER_MAX_S
    server._arm_timer()
    asked = engine.asked
    for _ in range(5):
        server._on_readable(adapter)  # type: ignore[arg-type]
    assert adapter.reads == 5
    assert engine.asked == asked and len(loop.calls) == 1


def test_the_engines_output_is_fetched_only_when_it_has_some() -> None:
    server, loop, engine, adapter, clock = make_server()
    server._arm_timer()
    server._on_readable(adapter)  # type: ignore[arg-type]
    assert engine.fetched == 0
    engine.pending = True
    server._on_readable(adapter)  # type: ignore[arg-type]
    assert engine.fetched == 1


def test_no_packet_sets_a_deadline_sooner_than_the_shortest_timeout() -> None:
    """What lets reads skip ``get_timer``: whatever a packet at ``now`` does to a flow (opens
    it, moves it to its shortest state), the engine's next deadline is not before ``now``
    plus ``shortest_timeout``."""
    from helpers import B1, VIP, engine, service, tcp

    eng = engine(service("dnat"), timeouts={"tcp_close": 2.0, "syn": 3.0})
    assert eng.shortest_timeout == 2.0
    now = 50.0
    for flags in ("S",):
        assert isinstance(eng.handle(tcp("198.18.0.2", VIP, 40000, 80, flags), now), bytes)
    due = eng.get_timer()
    assert due is not None and due >= now + eng.shortest_timeout
    now += 0.5
    eng.handle(tcp(B1, "198.18.0.2", 8080, 40000, "R"), now)  # to CLOSED: tcp_close, 2 s
    due = eng.get_timer()
    assert due is not None and due == now + 2.0 >= now + eng.shortest_timeout
