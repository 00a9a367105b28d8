"""Signals for an event loop that may come before the loop runs.

uvloop's ``add_signal_handler`` notes a signal in a set that the loop reads only when its
self-pipe says a signal came, and that self-pipe exists only while the loop runs
(``run_forever``). A signal that comes between ``add_signal_handler`` and ``run_forever`` is
noted where nothing reads it before another signal: nfqlb installs its handlers before it
changes anything, then binds the queues, sets sysctls, installs its rules and says it serves,
and a SIGTERM in that time was lost (the daemon served on; seen in CI).

:class:`LoopSignals` catches the signals with Python's own handler from the start. Python
runs that handler in the main thread between two bytecodes; in the loop that is at once (the
loop wakes on the signal through its self-pipe and lets Python run pending handlers), and
the action comes in a callback of its own. Signals caught before the loop runs are acted on,
in order, as soon as it runs (:meth:`LoopSignals.serving`, called from the loop); one caught
after it stopped (during the clean-up) is only noted.
"""

from __future__ import annotations

import asyncio
import signal
import types
from collections.abc import Callable, Mapping

__all__ = ["LoopSignals"]

#: What ``signal.signal`` takes and returns.
_Handler = Callable[[int, types.FrameType | None], object] | int | signal.Handlers | None


class LoopSignals:
    """``actions``: signal number -> what to do, called from ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 actions: Mapping[int, Callable[[], object]]) -> None:
        self.loop = loop
        self.actions = dict(actions)
        self.noted: list[int] = []  # caught, not acted on yet
        self._serving = False
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        """Catch the signals of ``actions`` from now on (system calls restart after one)."""
        for signum in self.actions:
            previous = signal.signal(signum, self._caught)
            self._previous.setdefault(signum, previous)
            signal.siginterrupt(signum, False)

    def serving(self) -> None:
        """The loop runs (call it from the loop, e.g. ``loop.call_soon``): act on what was
        caught before, and on every signal from now on."""
        self._serving = True
        self._act()

    def stopped(self) -> None:
        """The loop has stopped: signals are only noted from now on."""
        self._serving = False

    def restore(self) -> None:
        """The handlers from before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _caught(self, signum: int, _frame: types.FrameType | None) -> None:
        self.noted.append(signum)
        if self._serving:
            self.loop.call_soon_threadsafe(self._act)

    def _act(self) -> None:
        noted, self.noted = self.noted, []
        for signum in noted:
            self.actions[signum]()
