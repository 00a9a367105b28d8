"""The NFQUEUE adapter: bind one queue and give every packet the engine's verdict.

The event loop calls :meth:`QueueAdapter.on_readable` when the netlink socket is readable.
The binding's own ``run(block=False)`` would read until the socket is empty, which under
sustained load is never: timers and signals (SIGTERM!) would wait for the load to stop. So we
feed ``run_socket`` a socket wrapper that reports EAGAIN after ``BUDGET`` packets; the loop
then runs its timers and signal handlers and comes straight back, since the socket is still
readable. The clock is read once per wakeup, not per packet. The binding leaves a packet
without a verdict if the callback raises, so the callback catches everything, counts it and
drops the packet. A result of the handler that is no verdict (an int other than ACCEPT and
DROP) drops the packet too and is counted, as in :mod:`nfqlb.io.netlink`.

Limits of the binding to keep in mind: one verdict per packet under the GIL, no batching, and
packets over 4016 bytes (over 3960 with every attribute the kernel may add) never reach the
callback whole: the rules send those to a second queue, served by :mod:`nfqlb.io.netlink`.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from nfqlb.engine import ACCEPT, DROP, HOLD
from nfqlb.errors import SystemSetupError

Handle = Callable[[bytes, float], "bytes | int"]
#: Called with a function that gives a held packet (engine verdict HOLD) its final verdict.
OnHold = Callable[[Callable[["bytes | int"], None]], None]


def late_verdict(pkt: Any, verdict: bytes | int) -> None:
    """The verdict for a packet held past its callback (the binding allows it: the packet
    keeps its id; only its payload is gone, and a rewrite brings a new one)."""
    if verdict.__class__ is bytes:
        pkt.set_payload(verdict)
        pkt.accept()
    elif verdict == ACCEPT:
        pkt.accept()
    else:
        pkt.drop()

BUDGET = 256  # packets per wakeup before the event loop gets a turn
_RECV_SIZE = 4096  # the binding's own receive buffer: larger messages never fit anyway


class _BudgetSocket:
    """What ``run_socket`` reads from: the queue socket, but "empty" after ``budget`` reads."""

    __slots__ = ("_recv", "left")

    def __init__(self, sock: socket.socket) -> None:
        self._recv = sock.recv
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "budget used up")
        self.left -= 1
        return self._recv(size)  # non-blocking: raises BlockingIOError(EAGAIN) when empty


class QueueAdapter:
    """One bound queue feeding ``handle(payload, now)``."""

    def __init__(self, handle: Handle, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = time.monotonic,
                 on_hold: OnHold | None = None) -> None:
        self.queue = queue
        self.on_hold = on_hold  # told how to give a held packet its verdict later
        self.log = log
        self.clock = clock
        self.now = clock()
        self.errors = 0  # callback exceptions (each cost one dropped packet)
        self.bad_verdicts = 0  # handler results that are no verdict (each dropped)
        self.wakeups = 0
        self._handle = handle
        self._nfq: Any = None
        self._last_error_log = float("-inf")

    # ------------------------------------------------------------------ binding

    def bind(self, max_len: int = 1024) -> None:
        """Bind the queue; raises SystemSetupError (one line) when that is impossible."""
        from netfilterqueue import NetfilterQueue

        try:
            nfq = NetfilterQueue()
        except OSError as exc:
            raise SystemSetupError(f"cannot open the netfilter queue subsystem ({exc}); "
                                   "needs root (CAP_NET_ADMIN) and nfnetlink_queue") from None
        try:
            nfq.bind(self.queue, self._make_callback(), max_len=max_len)
        except OSError as exc:
            nfq.unbind()
            if "Failed to create queue" in str(exc):
                raise SystemSetupError(
                    f"queue {self.queue} is already bound by another process") from None
            raise SystemSetupError(f"cannot bind queue {self.queue}: {exc}") from None
        self._nfq = nfq
        self._sock = socket.socket(fileno=nfq.get_fd())  # a view of the binding's socket
        self._sock.setblocking(False)
        self._budget = _BudgetSocket(self._sock)

    def fileno(self) -> int:
        fd: int = self._nfq.get_fd()
        return fd

    def unbind(self) -> None:
        if self._nfq is not None:
            self._sock.detach()  # the fd belongs to the binding
            self._nfq.unbind()
            self._nfq = None

    # ------------------------------------------------------------------ packets

    def _make_callback(self) -> Callable[[Any], None]:
        handle = self._handle
        accept_verdict = ACCEPT
        drop_verdict = DROP
        hold_verdict = HOLD
        adapter = self

        def on_packet(pkt: Any) -> None:
            try:
                r = handle(pkt.get_payload(), adapter.now)
                if r.__class__ is bytes:
                    pkt.set_payload(r)
                    pkt.accept()
                elif r == accept_verdict and r.__class__ is int:
                    pkt.accept()
                elif r == hold_verdict and adapter.on_hold is not None:
                    adapter.on_hold(functools.partial(late_verdict, pkt))
                else:
                    pkt.drop()
                    if r != drop_verdict or r.__class__ is not int:
                        adapter.bad_verdicts += 1
            except BaseException as exc:  # noqa: B036 - every packet gets a verdict, always
                adapter._callback_failed(pkt, exc)

        return on_packet

    def _callback_failed(self, pkt: Any, exc: BaseException) -> None:
        self.errors += 1
        try:
            pkt.drop()
        except Exception:
            pass  # the verdict was given before the failure, or the queue is gone
        if self.now - self._last_error_log >= 10.0:
            self._last_error_log = self.now
            self.log.error("packet callback failed (%d so far, packet dropped; logged at most "
                           "every 10 s): %r", self.errors, exc)

    def on_readable(self) -> None:
        """Process up to BUDGET packets pending on the queue socket."""
        self.now = self.clock()
        self.wakeups += 1
        self._budget.left = BUDGET
        self._nfq.run_socket(self._budget)

    def drain(self) -> None:
        """Give a verdict to what is still queued (after the rules are gone)."""
        if self._nfq is not None:
            for _ in range(16):
                self.on_readable()
                if self._budget.left > 0:
                    break  # the socket ran dry before the budget did

    def format_stats(self) -> str:
        text = f"queue {self.queue}: {self.wakeups} wakeups, {self.errors} callback errors"
        return text + (f", {self.bad_verdicts} bad verdicts" if self.bad_verdicts else "")
