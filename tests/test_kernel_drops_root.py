"""Kernel drops are visible, on a real kernel (root, a fresh network namespace).

Both adapters (the NetfilterQueue binding's and nfqlb's own netlink client) are bound to a
queue of 8 in the namespace; a burst of 50 datagrams is sent while the worker is not reading,
so the kernel drops 42 of them for a full queue. The adapter's stats then show the kernel's
``queue_dropped``; the 8 that were queued get their verdicts and arrive, and the next
datagram passes as usual. A receive buffer made too small for a burst costs packets the
kernel counts as ``user_dropped`` and the binding's socket reports as ENOBUFS: counted, and
serving goes on.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_netlink_root import ADDR, inside, pump, queue_to, recv_all, udp_socket
from test_netlink_root import ns as ns  # noqa: F401 - the namespace fixture

from nfqlb.engine import ACCEPT
from nfqlb.io.netlink import NetlinkQueueAdapter
from nfqlb.io.nfqueue import QueueAdapter

LOG = logging.getLogger("test.kernel_drops")
QUEUE = 4243
PORT = 9999
BURST = 50
MAX_LEN = 8

Factory = Callable[[], Any]
ADAPTERS: dict[str, Factory] = {
    "binding": lambda: QueueAdapter(lambda data, now: ACCEPT, QUEUE, LOG),
    "netlink": lambda: NetlinkQueueAdapter(lambda data, now: ACCEPT, QUEUE, LOG),
}


@pytest.fixture(params=sorted(ADAPTERS))
def adapter_factory(request: pytest.FixtureRequest) -> Factory:
    return ADAPTERS[request.param]


def bind(ns: str, factory: Factory, max_len: int) -> Any:
    with inside(ns):
        adapter = factory()
        adapter.bind(max_len=max_len)
    return adapter


def kernel_line(adapter: Any) -> str:
    """The kernel's counters: the line under the adapter's own in its stats."""
    own, kernel = adapter.format_stats().split("\n  ")
    assert own.startswith(f"queue {QUEUE}: ")
    return str(kernel)


def burst(sender: socket.socket, n: int, size: int = 10) -> None:
    for i in range(n):
        sender.sendto(i.to_bytes(2, "big") * (size // 2), (ADDR, PORT))


@pytest.fixture
def sockets(ns: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    queue_to(ns, PORT, QUEUE)
    receiver = udp_socket(ns, PORT)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sender = udp_socket(ns)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


@pytest.mark.root
def test_a_burst_larger_than_the_queue_is_counted_and_serving_goes_on(
        ns: str, adapter_factory: Factory,
        sockets: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = sockets
    adapter = bind(ns, adapter_factory, MAX_LEN)
    try:
        assert kernel_line(adapter) == "kernel: 0 queue_dropped, 0 user_dropped, 0 queue_total"
        burst(sender, BURST)  # nobody reads: 8 wait in the queue, the rest are dropped
        row = adapter.kernel.read()
        assert (row.queue_total, row.queue_dropped) == (MAX_LEN, BURST - MAX_LEN)
        assert kernel_line(adapter) == (f"kernel: {BURST - MAX_LEN} queue_dropped, "
                                        f"0 user_dropped, {MAX_LEN} queue_total")
        # the queued ones get their verdicts and arrive
        pump(adapter, lambda: adapter.kernel.read().queue_total == 0, timeout=3.0)
        assert len(recv_all(receiver, MAX_LEN, timeout=2.0)) == MAX_LEN
        # and the next datagram passes as usual
        sender.sendto(b"after", (ADDR, PORT))
        got: list[bytes] = []
        receiver.settimeout(0.05)
        for _ in range(60):
            pump(adapter, lambda: False, timeout=0.05)
            try:
                got.append(receiver.recv(100))
                break
            except TimeoutError:
                pass
        assert got == [b"after"]
        final = f"kernel: {BURST - MAX_LEN} queue_dropped, 0 user_dropped, 0 queue_total"
        assert kernel_line(adapter) == final
    finally:
        adapter.unbind()
    assert kernel_line(adapter) == final  # as printed at exit, after the queue is unbound


@pytest.mark.root
def test_a_socket_overrun_is_counted_by_the_kernel_and_the_binding(
        ns: str, sockets: tuple[socket.socket, socket.socket]) -> None:
    """The binding's socket with a tiny receive buffer: the kernel drops what does not fit
    (``user_dropped``), the next read reports ENOBUFS (``enobufs``), and reading goes on."""
    sender, receiver = sockets
    adapter = bind(ns, ADAPTERS["binding"], 1024)
    try:
        adapter._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a packet or two
        burst(sender, BURST, size=1000)
        row = adapter.kernel.read()
        assert row.user_dropped > 0 and row.queue_dropped == 0
        pump(adapter, lambda: adapter.enobufs > 0, timeout=2.0)
        pump(adapter, lambda: False, timeout=0.3)
        assert adapter.enobufs >= 1
        stats = adapter.format_stats()
        assert "receive overruns" in stats and f"{row.user_dropped} user_dropped" in stats
        got = recv_all(receiver, BURST, timeout=1.0)
        assert 1 <= len(got) <= BURST - row.user_dropped
        sender.sendto(b"after", (ADDR, PORT))
        pump(adapter, lambda: False, timeout=0.3)
        assert recv_all(receiver, 1) == [b"after"]
    finally:
        adapter.unbind()
