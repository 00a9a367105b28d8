"""The kernel's queue counters (``nfqlb/io/kstats.py``) and the ENOBUFS count of the binding's
adapter, without a kernel: the /proc parser on sample text (a line captured on this kernel
after a burst of 50 datagrams into a queue of 8), the file read again for each report, and a
socket that reports ENOBUFS in the middle of a wakeup.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from nfqlb.engine import ACCEPT
from nfqlb.io import kstats, nfqueue
from nfqlb.io.kstats import KernelQueueStats, QueueRow

# /proc/net/netfilter/nfnetlink_queue of a namespace with two bound queues (6.x): queue 4243
# bound with max_len 8 by the binding (copy range 4016) after a burst of 50, queue 14243 by
# nfqlb's netlink client (copy range 65531)
SAMPLE = (" 4243   7056     8 2  4016    42     0        8  1\n"
          "14243 2841155328     0 2 65531     0     3   123456  1\n")


def test_parse_reads_every_column_of_each_bound_queue() -> None:
    rows = kstats.parse(SAMPLE)
    assert rows == {
        4243: QueueRow(queue=4243, portid=7056, queue_total=8, copy_mode=2, copy_range=4016,
                       queue_dropped=42, user_dropped=0, id_sequence=8),
        14243: QueueRow(queue=14243, portid=2841155328, queue_total=0, copy_mode=2,
                        copy_range=65531, queue_dropped=0, user_dropped=3,
                        id_sequence=123456),
    }


@pytest.mark.parametrize("text", ["", "\n", "garbage\n", " 1 2 3 4 5 6 7 8\n",
                                  " 1 2 3 4 5 6 7 8 1 9\n", " 1 2 x 4 5 6 7 8 1\n"])
def test_parse_skips_what_is_not_a_row(text: str) -> None:
    assert kstats.parse(text + SAMPLE).keys() == {4243, 14243}
    assert kstats.parse(text) == {}


def test_describe_names_the_registry_counters() -> None:
    row = kstats.parse(SAMPLE)[4243]
    assert kstats.describe(row) == "kernel: 42 queue_dropped, 0 user_dropped, 8 queue_total"
    assert kstats.describe(None).startswith("kernel: no counters (queue not in /proc/")


def test_the_file_is_read_again_for_each_report(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(SAMPLE)
    stats = KernelQueueStats(4243, str(proc))
    try:
        assert stats.read() == kstats.parse(SAMPLE)[4243]
        with open(proc, "r+") as f:  # the same file, new figures (as the kernel's seq_file)
            f.write(SAMPLE.replace("    42     0", "    99     7"))
        row = stats.read()
        assert row is not None and (row.queue_dropped, row.user_dropped) == (99, 7)
        assert KernelQueueStats(7, str(proc)).read() is None  # not bound: no row
        proc.write_text(SAMPLE.replace("    42     0", "   100     8"))
    finally:
        stats.close()  # takes a last reading: what the daemon prints at exit, after unbind
    proc.write_text("")
    row = stats.read()
    assert row is not None and (row.queue_dropped, row.user_dropped) == (100, 8)
    assert stats.describe() == "kernel: 100 queue_dropped, 8 user_dropped, 8 queue_total"
    stats.close()  # twice is harmless


def test_a_missing_file_says_so_once_and_never_raises(tmp_path: Path) -> None:
    stats = KernelQueueStats(1, str(tmp_path / "absent"))
    assert stats.read() is None
    assert stats.describe() == (f"kernel: no counters (cannot open {tmp_path / 'absent'}: "
                                "No such file or directory)")


class _OverrunSocket:
    """recv: two packets, an ENOBUFS, one packet, then empty."""

    def __init__(self) -> None:
        self.script: list[bytes | OSError] = [
            b"p1", b"p2", OSError(errno.ENOBUFS, "No buffer space available"), b"p3",
            BlockingIOError(errno.EAGAIN, "empty")]

    def recv(self, size: int) -> bytes:
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, OSError):
            raise item
        return item


class _FakeBinding:
    """``run_socket`` as NetfilterQueue 1.1.0 has it, minus the packet handling."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def run_socket(self, s: nfqueue._BudgetSocket) -> None:
        while True:
            try:
                buf = s.recv(4096)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue
                if e.errno == errno.EAGAIN:
                    break
                raise
            self.seen.append(buf)


def test_enobufs_in_the_binding_is_counted_and_reading_goes_on() -> None:
    adapter = nfqueue.QueueAdapter(lambda data, now: ACCEPT, 3, logging.getLogger("test"))
    binding = _FakeBinding()
    adapter._nfq = binding
    adapter._budget = nfqueue._BudgetSocket(_OverrunSocket(), adapter._on_enobufs)  # type: ignore[arg-type]
    adapter.on_readable()
    assert binding.seen == [b"p1", b"p2", b"p3"]
    assert adapter.enobufs == 1
    assert adapter.format_stats() == "queue 3: 1 wakeups, 0 callback errors, 1 receive overruns"


def test_the_budget_counts_an_overrun_as_a_read() -> None:
    overruns: list[int] = []
    sock = nfqueue._BudgetSocket(_OverrunSocket(), lambda: overruns.append(1))  # type: ignore[arg-type]
    sock.left = 3
    assert [sock.recv(1), sock.recv(1)] == [b"p1", b"p2"]
    with pytest.raises(BlockingIOError):
        sock.recv(1)  # the ENOBUFS used the last read of the budget
    assert overruns == [1]
