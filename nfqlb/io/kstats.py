"""The kernel's own counters of a bound queue, read from ``/proc/net/netfilter/nfnetlink_queue``.

What nfqlb cannot count itself is what never reached it: a packet the kernel dropped because
the queue already held ``queue_maxlen`` packets waiting for a verdict, or because the netlink
message could not be put on the worker's socket (receive buffer full; the socket then also
reports ENOBUFS once, which the adapters count as ``enobufs``). The kernel counts both per
queue and shows them in one line per bound queue of the network namespace
(``net/netfilter/nfnetlink_queue.c``, ``seq_show``; checked on 6.x)::

    "%5u %6u %5u %1u %5u %5u %5u %8u %2d\\n"
     queue peer   queue copy copy  queue  user  id       1
     num  portid  total mode range dropped dropped sequence

    " 4243   7056     8 2  4016    42     0        8  1"   (max_len 8, a burst of 50)

``queue_total`` is what waits for a verdict now (held fragments included), ``queue_dropped``
and ``user_dropped`` count since the queue was bound (a new binding starts again at 0).

The file shows the namespace of whoever *opened* it, so :class:`KernelQueueStats` opens it once,
when the queue is bound (the adapter binds in the namespace it serves), and reads it again
from the start for each report: the figures stay those of the right namespace even when the
reading thread has moved on. The adapters close it just *before* unbinding, so the counters
printed at exit are the queue's final ones. A read is one small ``read`` of a few lines, done
when counters are printed, never per packet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC_PATH = "/proc/net/netfilter/nfnetlink_queue"
_FIELDS = 9  # the last one is always 1
_READ_SIZE = 1 << 16  # 65536 queues are possible, a handful are bound


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One line of the file: a bound queue as the kernel sees it."""

    queue: int
    portid: int  # netlink port id of the bound socket
    queue_total: int  # packets waiting for a verdict now
    copy_mode: int  # 0 none, 1 meta, 2 packet
    copy_range: int
    queue_dropped: int  # dropped because queue_total had reached queue_maxlen
    user_dropped: int  # dropped because the message did not fit the socket's buffer
    id_sequence: int  # the last packet id handed out


def parse(text: str) -> dict[int, QueueRow]:
    """The rows of ``text`` by queue number; lines that are not nine integers are skipped."""
    rows: dict[int, QueueRow] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != _FIELDS:
            continue
        try:
            values = [int(f) for f in fields[:_FIELDS - 1]]
        except ValueError:
            continue
        row = QueueRow(*values)
        rows[row.queue] = row
    return rows


def describe(row: QueueRow | None) -> str:
    """The row as the adapters' stats print it, on a line of its own under the adapter's
    (registry names: see ``counters.QUEUE``)."""
    if row is None:
        return "kernel: no counters (queue not in " + PROC_PATH + ")"
    return (f"kernel: {row.queue_dropped} queue_dropped, {row.user_dropped} user_dropped, "
            f"{row.queue_total} queue_total")


class KernelQueueStats:
    """The kernel's counters for one queue, from the file opened in the binder's namespace."""

    def __init__(self, queue: int, path: str = PROC_PATH) -> None:
        self.queue = queue
        self.path = path
        self.error = ""  # why the file could not be opened or read, if it could not
        self.last: QueueRow | None = None  # the latest reading
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = f"cannot open {path}: {exc.strerror}"

    def read(self) -> QueueRow | None:
        """This queue's row now; None if it is not bound (or the file cannot be read).

        Once closed, the last reading (taken at close: the queue's final figures).
        """
        if self._fd is None:
            return self.last
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, _READ_SIZE):
                chunks.append(chunk)
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc.strerror}"
            return None
        self.last = parse(b"".join(chunks).decode("ascii", "replace")).get(self.queue)
        return self.last

    def describe(self) -> str:
        if self._fd is None and self.last is None:
            return f"kernel: no counters ({self.error or 'closed'})"
        return describe(self.read())

    def close(self) -> None:
        """Take a last reading (printed after the queue is unbound) and close the file."""
        if self._fd is not None:
            self.read()
            os.close(self._fd)
            self._fd = None
