"""A stand-in for the daemon's ``Server`` around a real engine, for the control socket and
metrics tests: the engine, two adapters with kernel counters, a settable clock, a reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import CLIENT, VIP, engine, service, tcp

from nfqlb.engine import Engine
from nfqlb.io import control
from nfqlb.io.kstats import QueueRow

LOG = logging.getLogger("test.control")


class FakeKernel:
    def __init__(self, queue: int) -> None:
        self.row = QueueRow(queue, 4242, 3, 2, 4016, 7, 5, 99)

    def read(self) -> QueueRow:
        return self.row


class FakeAdapter:
    def __init__(self, queue: int, purpose: str = "") -> None:
        self.queue = queue
        self.purpose = purpose
        self.kernel = FakeKernel(queue)
        self.wakeups = 11
        self.errors = 0
        if purpose:
            self.packets = 2


class FakeServer:
    """What ``control.status`` and ``handle`` use of the daemon's Server."""

    def __init__(self, eng: Engine | None = None) -> None:
        self.engine = eng or engine(service("dnat"))
        self.adapters = (FakeAdapter(1), FakeAdapter(10001, "packets over 3960 bytes"))
        self.now = 100.0
        self.config_path = "/etc/nfqlb/nfqlb.toml"
        self.started_at = 1_700_000_000.0
        self.loaded_at = 1_700_000_100.0
        self.reload_result: tuple[bool, str] = (True, "reloaded: 1 service")
        self.reloads = 0
        self.timer_checks = 0

    def timer_changed(self) -> None:
        self.timer_checks += 1

    def clock(self) -> float:
        return self.now

    def reload(self) -> tuple[bool, str]:
        self.reloads += 1
        return self.reload_result


def open_flows(srv: FakeServer, n: int, port0: int = 40000) -> None:
    """``n`` new TCP flows (a SYN each) from the client to the VIP."""
    for i in range(n):
        out = srv.engine.handle(tcp(CLIENT, VIP, port0 + i, 80, "S"), srv.now)
        assert isinstance(out, bytes)


@contextlib.contextmanager
def served(srv: Any, path: Path) -> Iterator[asyncio.AbstractEventLoop]:
    """``srv``'s control socket at ``path`` on an event loop in a thread of its own (so the
    blocking client and the CLI can be called from the test)."""
    with served_control(srv, path) as ctl:
        yield ctl.loop


@contextlib.contextmanager
def served_control(srv: Any, path: Path) -> Iterator[Any]:
    """As ``served``, giving the ControlServer (its ``clients`` count) with its ``loop``."""
    loop = asyncio.new_event_loop()
    ctl = control.ControlServer(srv, path, LOG)
    ctl.loop = loop  # type: ignore[attr-defined]
    loop.run_until_complete(ctl.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield ctl
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(ctl.close())
        loop.close()
