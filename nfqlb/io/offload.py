"""The offload queue: conntrack NEW packets in, accepted with a backend's mark (or answered).

A queue adapter of its own shape (bind, fileno, on_readable, drain, unbind, format_stats, as
:class:`nfqlb.io.nfqueue.QueueAdapter`) with a callback cut down to what offload needs: one
call into :meth:`nfqlb.offload.OffloadDecider.handle`, then ``set_mark`` + ``accept`` for a
mark, or the usual verdicts. The kernel copies only the first
:data:`nfqlb.offload.COPY_RANGE` bytes of each packet (the headers the decision reads), so a
large first datagram costs no more than a SYN: with either binding (NetfilterQueue's
``range``, the netlink client's ``copy_range``); a packet cut short is decided as any other
(its ``NFQA_CAP_LEN`` is no reason to drop it here, unlike on the queues that rewrite). The
netlink client also sets the GSO flag on this queue, so the kernel neither completes a
partial checksum nor segments a GSO packet before queueing it (the verdict's mark applies to
the packet whole). A rewritten verdict (a RST answering an
unknown flow) is built from those headers alone.

Only the first packet of each flow comes here; every other one stays in the kernel.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any, Final, cast

from nfqlb.errors import SystemSetupError
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.kstats import KernelQueueStats
from nfqlb.io.netlink import (
    BE32,
    FLUSH_BYTES,
    FLUSH_PARTS,
    NF_ACCEPT,
    NLATTR,
    Handle,
    NetlinkQueueAdapter,
    marked_verdict_prefix,
    parse_packet,
)
from nfqlb.io.nfqueue import BUDGET, _BudgetSocket
from nfqlb.io.verdicts import give
from nfqlb.offload import COPY_RANGE, OffloadDecider
from nfqlb.ratelog import RateLimitedLog
from nfqlb.verdict import ACCEPT


class OffloadQueueAdapter:
    """The offload queue bound through NetfilterQueue, feeding an OffloadDecider."""

    purpose = "offload: new flows"
    lean = True  # the daemon's reader calls on_readable and nothing else (see Server)

    def __init__(self, decider: OffloadDecider, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC) -> None:
        self.decider = decider
        self.queue = queue
        self.log = log
        self.clock = clock
        self.now = clock()
        self.errors = 0
        self.wakeups = 0
        self.enobufs = 0
        self.kernel: KernelQueueStats | None = None
        self._nfq: Any = None
        self._ratelog = RateLimitedLog(log)

    @property
    def packets(self) -> int:
        return self.decider.packets

    def bind(self, max_len: int = 1024) -> None:
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        try:
            nfq = NetfilterQueue()
        except OSError as exc:
            raise SystemSetupError(f"cannot open the netfilter queue subsystem ({exc}); "
                                   "needs root (CAP_NET_ADMIN) and nfnetlink_queue") from None
        try:
            nfq.bind(self.queue, self._make_callback(), max_len=max_len, mode=COPY_PACKET,
                     range=COPY_RANGE)
        except OSError as exc:
            nfq.unbind()
            if "Failed to create queue" in str(exc):
                raise SystemSetupError(f"queue {self.queue} (offload) is already bound by "
                                       "another process") from None
            raise SystemSetupError(f"cannot bind queue {self.queue}: {exc}") from None
        self._nfq = nfq
        self._sock = socket.socket(fileno=nfq.get_fd())
        self._sock.setblocking(False)
        self._budget = _BudgetSocket(self._sock, self._on_enobufs)
        self.kernel = KernelQueueStats(self.queue)

    def fileno(self) -> int:
        fd: int = self._nfq.get_fd()
        return fd

    def unbind(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
        if self._nfq is not None:
            self._sock.detach()
            self._nfq.unbind()
            self._nfq = None

    def _make_callback(self) -> Callable[[Any], None]:
        decide = self.decider.handle
        adapter = self

        def on_packet(pkt: Any) -> None:
            try:
                r = decide(pkt.get_payload(), adapter.now)
                if r.__class__ is int:
                    pkt.set_mark(r)
                    pkt.accept()
                elif r is ACCEPT:
                    pkt.accept()
                elif r.__class__ is bytes:
                    pkt.set_payload(r)
                    pkt.accept()
                else:
                    pkt.drop()
            except BaseException as exc:  # noqa: B036 - every packet gets a verdict, always
                adapter._failed(pkt, exc)

        return on_packet

    def _failed(self, pkt: Any, exc: BaseException) -> None:
        self.errors += 1
        try:
            pkt.drop()
        except Exception:
            pass
        self._ratelog.error("callback", self.now, "offload callback failed (%d so far, packet "
                            "dropped): %r", self.errors, exc)

    def _on_enobufs(self) -> None:
        self.enobufs += 1
        self._ratelog.warning("enobufs", self.now, "queue %d: receive buffer overrun, the "
                              "kernel dropped packets (%d overruns so far)", self.queue,
                              self.enobufs)

    def on_readable(self) -> None:
        self.now = self.clock()
        self.wakeups += 1
        self._budget.left = BUDGET
        self._nfq.run_socket(self._budget)

    def drain(self) -> None:
        if self._nfq is not None:
            for _ in range(16):
                self.on_readable()
                if self._budget.left > 0:
                    break

    def format_stats(self) -> str:
        d = self.decider
        text = (f"queue {self.queue} ({self.purpose}): {d.packets} packets, {d.passed} not "
                f"offloaded, {self.wakeups} wakeups, {self.errors} callback errors")
        if self.enobufs:
            text += f", {self.enobufs} receive overruns"
        return text + (f"\n  {self.kernel.describe()}" if self.kernel is not None else "")


# --- the same queue on nfqlb's own netlink client, verdicts sent in batches --------------------

NFQA_MARK: Final = 3  # linux/netfilter/nfnetlink_queue.h: the packet mark, be32, in a verdict too


class OffloadNetlinkAdapter(NetlinkQueueAdapter):
    """The offload queue on :class:`nfqlb.io.netlink.NetlinkQueueAdapter`: every verdict of a
    wakeup goes to the kernel in one ``sendmsg``; a mark is an ``NFQA_MARK`` attribute after
    the verdict header."""

    def __init__(self, decider: OffloadDecider, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC) -> None:
        # the decider's int verdicts (marks) are read by this class's own _on_packet
        # the headers only (COPY_RANGE), and GSO packets whole: nothing here is given back
        # rewritten but a RST built afresh, so the kernel need not complete a partial
        # checksum (as it does for every such packet without the flag) nor segment a GSO
        # first packet before queueing it
        super().__init__(cast(Handle, decider.handle), queue, log, clock,
                         purpose="offload: new flows", gso=True, copy_range=COPY_RANGE)
        self.decider = decider
        self.lean = True  # the daemon's reader calls on_readable and nothing else
        self._mark_prefix = marked_verdict_prefix(queue, NF_ACCEPT)
        self._mark_attr = NLATTR.pack(NLATTR.size + BE32.size, NFQA_MARK)
        self._mark_tails: dict[int, bytes] = {}  # mark -> its NFQA_MARK attribute

    def _on_packet(self, start: int, end: int) -> None:
        packet_id, payload, _cap_len, _info = parse_packet(self._view, start, end)
        if packet_id is None:
            self.malformed += 1
            return
        self.packets += 1
        if payload is None:
            self.malformed += 1
            self._give_drop(packet_id)
            return
        r = self._handle(payload, self.now)  # OffloadDecider.handle never raises
        if r.__class__ is int:
            self._give_marked(packet_id, r)
        elif not give(r, packet_id, self._sink):
            self._bad_verdict(r)

    def _give_marked(self, packet_id: bytes, mark: int) -> None:
        """ACCEPT with ``mark``, queued with the wakeup's other verdicts (see _give_accept)."""
        tail = self._mark_tails.get(mark)
        if tail is None:
            tail = self._mark_tails[mark] = self._mark_attr + BE32.pack(mark)
        pending = self._pending
        pending.append(b"".join((self._mark_prefix, packet_id, tail)))
        self._pending_bytes += 40
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_PARTS:
            self._flush()

    def format_stats(self) -> str:
        return super().format_stats() + f"\n  {self.decider.passed} not offloaded"
