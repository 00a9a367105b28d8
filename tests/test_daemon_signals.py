"""Signals reach the daemon's loop: one that comes while nfqlb starts (before its loop runs)
is acted on as soon as the loop runs. uvloop's own handlers (``add_signal_handler``) only
noted such a signal, where nothing read the note before a later signal: a SIGTERM sent right
after "serving queue" was logged was lost, and the daemon served on (seen in CI:
tests/test_preflight.py waited 30 s for it to stop)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from nfqlb.config import parse_config
from nfqlb.engine import Engine
from nfqlb.io import daemon
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.signals import LoopSignals

GUARD_S = 5.0  # the loop is stopped by the test after this long, if no signal stopped it


class StandInQueue:
    """The adapter shape the Server needs, over one end of a socketpair nobody writes to."""

    clock = MONOTONIC
    queue = 1

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.sock.recv(1024)

    def drain(self) -> None: ...

    def format_stats(self) -> str:
        return "stand-in queue"


@pytest.fixture
def server() -> Iterator[daemon.Server]:
    engine = Engine(parse_config({"service": [{
        "name": "web", "vip": "198.18.100.1", "port": 80, "mode": "dnat",
        "backend": [{"address": "198.18.1.2", "port": 8080}]}]}))
    queue = StandInQueue()
    srv = daemon.Server(daemon._new_loop(), engine, [queue],  # type: ignore[list-item]
                        daemon.HeldPackets(engine), logging.getLogger("test-signals"))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT,
                                               signal.SIGUSR1, signal.SIGHUP)}
    try:
        yield srv
    finally:
        srv.restore_signal_handlers()
        srv.loop.close()
        queue.sock.close()
        queue.peer.close()
        assert {s: signal.getsignal(s) for s in before} == before


def _serve(srv: daemon.Server) -> tuple[float, bool]:
    """serve() until a signal stops it (or the guard does): (seconds, whether the guard
    stopped it)."""
    guard: list[bool] = []
    srv.loop.call_later(GUARD_S, lambda: (guard.append(True), srv.loop.stop()))
    t0 = time.monotonic()
    srv.serve()
    return time.monotonic() - t0, bool(guard)


def test_a_sigterm_while_nfqlb_starts_stops_the_loop_once_it_runs(
        server: daemon.Server, caplog: pytest.LogCaptureFixture) -> None:
    server.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)  # before serve(): the daemon is still starting
    with caplog.at_level(logging.INFO, logger="test-signals"):
        took, guarded = _serve(server)
    assert not guarded, "the SIGTERM sent before the loop ran was lost"
    assert took < GUARD_S / 2
    assert "SIGTERM: removing rules and stopping" in caplog.text


def test_signals_while_serving_act_in_order(server: daemon.Server) -> None:
    """SIGUSR1 prints the counters, then SIGTERM stops: each once, in the loop."""
    server.install_signal_handlers()
    pid = os.getpid()
    server.loop.call_later(0.05, os.kill, pid, signal.SIGUSR1)
    server.loop.call_later(0.10, os.kill, pid, signal.SIGTERM)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        took, guarded = _serve(server)
    assert not guarded and took < GUARD_S / 2
    assert out.getvalue().count("stand-in queue") == 1, out.getvalue()


def test_a_signal_after_the_loop_stopped_is_only_noted(server: daemon.Server) -> None:
    """During the clean-up (the loop has stopped) a SIGTERM neither kills nfqlb half-way
    nor is acted on later."""
    server.install_signal_handlers()
    server.loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
    took, guarded = _serve(server)
    assert not guarded
    os.kill(os.getpid(), signal.SIGTERM)  # the clean-up would run now: still alive
    time.sleep(0.01)
    assert server.signals is not None and server.signals.noted == [signal.SIGTERM]


def test_loop_signals_act_in_order_once_the_loop_runs() -> None:
    """nfqlb.io.signals alone (the supervisor of several workers uses it too): signals
    caught before the loop runs wait for it, then run in the order they came; the handlers
    from before come back with restore()."""
    loop = daemon._new_loop()
    done: list[str] = []
    signals = LoopSignals(loop, {signal.SIGUSR1: lambda: done.append("usr1"),
                                 signal.SIGHUP: lambda: done.append("hup"),
                                 signal.SIGTERM: lambda: (done.append("term"), loop.stop())})
    before = {s: signal.getsignal(s) for s in signals.actions}
    signals.install()
    try:
        for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        assert done == [] and signals.noted == [signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM]
        loop.call_soon(signals.serving)
        loop.call_later(GUARD_S, loop.stop)
        t0 = time.monotonic()
        loop.run_forever()
        assert done == ["usr1", "hup", "term"]
        assert time.monotonic() - t0 < GUARD_S / 2
    finally:
        signals.restore()
        loop.close()
    assert {s: signal.getsignal(s) for s in before} == before
