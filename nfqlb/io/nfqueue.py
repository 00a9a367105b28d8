"""The NFQUEUE adapter: bind one queue and give every packet the engine's verdict.

The event loop calls :meth:`QueueAdapter.on_readable` when the netlink socket is readable.
The binding's own ``run(block=False)`` would read until the socket is empty, which under
sustained load is never: timers and signals (SIGTERM!) would wait for the load to stop. So we
feed ``run_socket`` a socket wrapper that reports EAGAIN after ``BUDGET`` packets; the loop
then runs its timers and signal handlers and comes straight back, since the socket is still
readable. The clock is read once per wakeup, not per packet (by default the coarse one of
:mod:`nfqlb.io.clock`: the wakeups of one 10 ms tick get the same ``now`` object). The
binding leaves a packet without a verdict if the callback raises, so the callback catches
everything, counts it and drops the packet. A receive buffer overrun (ENOBUFS, which the
binding's ``run_socket`` would swallow) is counted as ``enobufs`` and reading goes on; the
kernel's own drop counters for the queue (:mod:`nfqlb.io.kstats`) are printed with the
adapter's. Verdicts are carried out by :func:`nfqlb.io.verdicts.give`, as in
:mod:`nfqlb.io.netlink`: a handler result that is no verdict drops the packet and is counted.

Limits of the binding to keep in mind: one verdict per packet under the GIL, no batching, and
packets over 4016 bytes (over 3960 with every attribute the kernel may add) never reach the
callback whole: the rules send those to a second queue, served by :mod:`nfqlb.io.netlink`.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

from nfqlb.errors import SystemSetupError
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.kstats import KernelQueueStats
from nfqlb.io.verdicts import OnHold, Sink, give
from nfqlb.ratelog import RateLimitedLog
from nfqlb.verdict import Final, Held, Verdict

Handle = Callable[[bytes, float], Verdict]


def _rewrite(pkt: Any, data: bytes) -> None:
    pkt.set_payload(data)
    pkt.accept()


def _accept(pkt: Any) -> None:
    pkt.accept()


def _drop(pkt: Any) -> None:
    pkt.drop()


#: Verdicts for a packet held past its callback (the binding allows it: the packet keeps its
#: id; only its payload is gone, and a rewrite brings a new one).
LATE = Sink(_rewrite, _accept, _drop)


def late_verdict(pkt: Any, verdict: Final) -> None:
    give(verdict, pkt, LATE)


BUDGET = 256  # packets per wakeup before the event loop gets a turn
_RECV_SIZE = 4096  # the binding's own receive buffer: larger messages never fit anyway


class _BudgetSocket:
    """What ``run_socket`` reads from: the queue socket, but "empty" after ``budget`` reads.

    ENOBUFS (the kernel dropped packets because the receive buffer was full; it says so once
    per overrun) is reported to ``on_enobufs`` and reading goes on: the binding's own
    ``run_socket`` would swallow it without a trace.
    """

    __slots__ = ("_recv", "_on_enobufs", "left")

    def __init__(self, sock: socket.socket, on_enobufs: Callable[[], None]) -> None:
        self._recv = sock.recv
        self._on_enobufs = on_enobufs
        self.left = 0

    def recv(self, size: int) -> bytes:
        while True:
            if self.left <= 0:
                raise BlockingIOError(errno.EAGAIN, "budget used up")
            self.left -= 1
            try:
                return self._recv(size)  # non-blocking: BlockingIOError(EAGAIN) when empty
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._on_enobufs()


class QueueAdapter:
    """One bound queue feeding ``handle(payload, now)``."""

    def __init__(self, handle: Handle, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC,
                 on_hold: OnHold | None = None) -> None:
        self.queue = queue
        self.on_hold = on_hold  # told how to give a held packet its verdict later
        self.log = log
        self.clock = clock
        self.now = clock()
        self.errors = 0  # callback exceptions (each cost one dropped packet)
        self.bad_verdicts = 0  # handler results that are no verdict (each dropped)
        self.wakeups = 0
        self.enobufs = 0  # receive buffer overruns: the kernel dropped packets for us
        self.kernel: KernelQueueStats | None = None  # the kernel's counters, once bound
        self._handle = handle
        self._nfq: Any = None
        self._ratelog = RateLimitedLog(log)
        self._sink = Sink(_rewrite, _accept, _drop, self._hold)

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
        self._budget = _BudgetSocket(self._sock, self._on_enobufs)
        self.kernel = KernelQueueStats(self.queue)  # opened here: this namespace's file

    def fileno(self) -> int:
        fd: int = self._nfq.get_fd()
        return fd

    def unbind(self) -> None:
        if self.kernel is not None:
            self.kernel.close()  # with a last reading, while the queue is still bound
        if self._nfq is not None:
            self._sock.detach()  # the fd belongs to the binding
            self._nfq.unbind()
            self._nfq = None

    # ------------------------------------------------------------------ packets

    def _make_callback(self) -> Callable[[Any], None]:
        handle = self._handle
        sink = self._sink
        adapter = self

        def on_packet(pkt: Any) -> None:
            try:
                if not give(handle(pkt.get_payload(), adapter.now), pkt, sink):
                    adapter.bad_verdicts += 1
            except BaseException as exc:  # noqa: B036 - every packet gets a verdict, always
                adapter._callback_failed(pkt, exc)

        return on_packet

    def _hold(self, pkt: Any, held: Held) -> None:
        if self.on_hold is None:  # nobody to give the verdict later: drop now
            self.bad_verdicts += 1
            pkt.drop()
            return
        self.on_hold(held.hold_id, functools.partial(late_verdict, pkt))

    def _callback_failed(self, pkt: Any, exc: BaseException) -> None:
        self.errors += 1
        try:
            pkt.drop()
        except Exception:
            pass  # the verdict was given before the failure, or the queue is gone
        self._ratelog.error("callback", self.now, "packet callback failed (%d so far, packet "
                            "dropped): %r", self.errors, exc)

    def _on_enobufs(self) -> None:
        self.enobufs += 1
        self._ratelog.warning("enobufs", self.now, "queue %d: receive buffer overrun, the "
                              "kernel dropped packets (%d overruns so far)", self.queue,
                              self.enobufs)

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
        extra = [(self.bad_verdicts, "bad verdicts"), (self.enobufs, "receive overruns")]
        text += "".join(f", {n} {what}" for n, what in extra if n)
        return text + (f"\n  {self.kernel.describe()}" if self.kernel is not None else "")
