"""nfqlb's own NFQUEUE client (``nfqlb/io/netlink.py``).

First the wire format, without a kernel: the config and verdict messages byte by byte, and the
packet parser on built messages (attribute flags, padding, a cut at every offset). Then, as
root in a fresh network namespace (this process enters it with setns for the sockets, the
rules go in with ``ip netns exec``): binding shows in the kernel's table with copy range 65531
and is undone by unbind; a second bind is one clear line; an 8000-byte UDP datagram from a
local process arrives whole (8028 bytes) and is delivered after ACCEPT; a rewritten one arrives
rewritten; DROP, a handler that raises or returns no verdict, a packet longer than the copy
range and a receive-buffer overrun each cost the packet and are counted; a burst larger than
the per-wakeup budget passes whole (verdicts are sent many per sendmsg).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from nfqlb.engine import ACCEPT, DROP
from nfqlb.errors import SystemSetupError
from nfqlb.io import netlink
from nfqlb.io.netlink import NetlinkQueueAdapter
from nfqlb.wire.checksum import full

LOG = logging.getLogger("test.netlink")
ADDR = "198.18.0.1"
QUEUE = 4242
_names = itertools.count(1)


# -- the wire format ----------------------------------------------------------------------------

def test_bind_message_layout() -> None:
    msg = netlink.build_bind(0x1234, 7, max_len=1024)
    attrs = (b"\x08\x00\x01\x00" b"\x01\x00\x00\x00"  # CFG_CMD: BIND, pad, pf 0
             b"\x09\x00\x02\x00" b"\x00\x00\xff\xff\x02" b"\x00\x00\x00"  # PARAMS 65535, PACKET
             b"\x08\x00\x03\x00" b"\x00\x00\x04\x00"  # QUEUE_MAXLEN 1024 (network order)
             b"\x08\x00\x04\x00" b"\x00\x00\x00\x05"  # MASK: FAIL_OPEN, GSO
             b"\x08\x00\x05\x00" b"\x00\x00\x00\x00")  # FLAGS: fail-open off
    header = struct.pack("=IHHII", 20 + len(attrs), 0x0302, 0x05, 7, 0)  # CONFIG, REQUEST|ACK
    assert msg == header + b"\x00\x00\x12\x34" + attrs  # nfgenmsg: AF_UNSPEC, v0, res_id
    on = netlink.build_bind(1, 1, max_len=1, fail_open=True)
    assert on.endswith(b"\x08\x00\x05\x00\x00\x00\x00\x01")


def test_verdict_messages_with_and_without_payload() -> None:
    [plain] = netlink.build_verdict(3, 0xDEADBEEF, netlink.NF_ACCEPT)
    assert plain == (struct.pack("=IHHII", 32, 0x0301, 0x01, 0, 0) + b"\x00\x00\x00\x03"
                     + struct.pack("=HH", 12, 2) + b"\x00\x00\x00\x01\xde\xad\xbe\xef")
    parts = netlink.build_verdict(3, 5, netlink.NF_ACCEPT, b"abcde")
    assert parts[1:] == [b"abcde", b"\0\0\0"]
    msg = b"".join(parts)
    assert struct.unpack_from("=I", msg)[0] == len(msg) == 32 + 4 + 8  # padded to 4
    assert msg[32:36] == struct.pack("=HH", 9, 10)  # NFQA_PAYLOAD, length without padding
    assert netlink._split_messages([plain, *parts, plain]) == [[plain], parts, [plain]]


def packet_message(packet_id: int, payload: bytes, *, cap_len: int | None = None,
                   extra: bytes = b"") -> bytes:
    """A packet message as the kernel builds it (other attributes in ``extra``)."""
    attrs = netlink.build_attr(netlink.NFQA_PACKET_HDR | 0x4000,  # NET_BYTEORDER flag set
                               struct.pack("!IHB", packet_id, 0x0800, 3))
    attrs += extra
    if cap_len is not None:
        attrs += netlink.build_attr(netlink.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    attrs += netlink.build_attr(netlink.NFQA_PAYLOAD, payload)
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 9, attrs)


def test_parse_packet_reads_id_payload_and_cap_len_and_skips_the_rest() -> None:
    extra = (netlink.build_attr(5, b"\0\0\0\2")  # IFINDEX_INDEV
             + netlink.build_attr(9, bytes(12)))  # HWADDR
    msg = packet_message(77, b"\x45" + bytes(22), extra=extra)  # odd length: padded
    assert netlink.parse_packet(msg, 0, len(msg)) == (b"\0\0\0\x4d", b"\x45" + bytes(22), None, 0)
    cut = packet_message(78, b"xyz", cap_len=70000)
    assert netlink.parse_packet(bytearray(cut), 0, len(cut)) == (b"\0\0\0\x4e", b"xyz", 70000, 0)
    # at an offset inside a larger buffer, as several messages in one datagram
    both = msg + cut
    assert netlink.parse_packet(memoryview(both), len(msg), len(both))[0] == b"\0\0\0\x4e"


def test_parse_packet_never_raises_on_a_cut_message() -> None:
    msg = packet_message(1, bytes(40), cap_len=41)
    for end in range(len(msg) + 1):
        packet_id, payload, _, _ = netlink.parse_packet(msg, 0, end)
        assert packet_id in (None, b"\0\0\0\1") and (payload is None or payload == bytes(40))


# -- the kernel ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``ns`` (sockets stay there)."""
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


def sh(ns: str, *argv: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces, iptables and NFQUEUE")
    name = f"nfqlbt-{os.getpid()}-nl{next(_names)}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"`ip netns` is unavailable here: {proc.stderr.strip()}")
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        sh(name, "ip", "addr", "add", f"{ADDR}/32", "dev", "lo")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def queue_to(ns: str, dport: int, queue: int = QUEUE) -> None:
    """Locally sent UDP to ``dport`` goes to ``queue`` (raw OUTPUT, as nfqlb's rules do)."""
    sh(ns, "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", str(dport),
       "-j", "NFQUEUE", "--queue-num", str(queue))


def bound_queues(ns: str) -> dict[int, list[str]]:
    text = sh(ns, "cat", "/proc/net/netfilter/nfnetlink_queue")
    return {int(line.split()[0]): line.split() for line in text.splitlines() if line.strip()}


@contextlib.contextmanager
def bound(ns: str, handle: Callable[[bytes, float], bytes | int],
          queue: int = QUEUE) -> Iterator[NetlinkQueueAdapter]:
    with inside(ns):
        adapter = NetlinkQueueAdapter(handle, queue, LOG)
        adapter.bind()
    try:
        yield adapter
    finally:
        adapter.unbind()


def udp_socket(ns: str, port: int = 0) -> socket.socket:
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ADDR, port))
    s.settimeout(2.0)
    return s


def pump(adapter: NetlinkQueueAdapter, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Serve the adapter until ``done()`` or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        if select.select([adapter], [], [], 0.05)[0]:
            adapter.on_readable()


def recv_all(sock: socket.socket, n: int, timeout: float = 3.0) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(sock.recv(65535))
        except TimeoutError:
            pass
    return out


def pattern(n: int) -> bytes:
    return bytes(i * 7 & 0xFF for i in range(n))


@pytest.mark.root
def test_bind_sets_copy_range_and_unbind_releases_the_queue(ns: str) -> None:
    with bound(ns, lambda data, now: ACCEPT) as adapter:
        row = bound_queues(ns)[QUEUE]
        assert (row[3], row[4]) == ("2", "65531")  # copy mode PACKET, the kernel's maximum
        assert adapter.fileno() >= 0
    assert QUEUE not in bound_queues(ns)
    adapter.unbind()  # twice is harmless


@pytest.mark.root
def test_a_second_bind_is_one_clear_line(ns: str) -> None:
    with bound(ns, lambda data, now: ACCEPT):
        with inside(ns):
            second = NetlinkQueueAdapter(lambda data, now: ACCEPT, QUEUE, LOG,
                                         purpose="packets over 3960 bytes")
        with pytest.raises(SystemSetupError) as exc_info:
            with inside(ns):
                second.bind()
        assert str(exc_info.value) == (f"queue {QUEUE} (packets over 3960 bytes) is already "
                                       "bound by another process")
        # its failed socket is closed; the first binding is untouched
        assert second._sock is None and QUEUE in bound_queues(ns)


NO_CAP = """\
import logging
from nfqlb.errors import SystemSetupError
from nfqlb.io.netlink import NetlinkQueueAdapter
try:
    NetlinkQueueAdapter(lambda d, n: 0, 4242, logging.getLogger()).bind()
except SystemSetupError as exc:
    print(exc)
"""


@pytest.mark.root
def test_without_cap_net_admin_the_error_says_so(ns: str) -> None:
    """EPERM means a busy queue or a missing capability; the PF_BIND probe tells them apart."""
    out = sh(ns, "setpriv", "--inh-caps=-all", "--bounding-set=-net_admin",
             sys.executable, "-c", NO_CAP)
    assert out == "cannot bind queue 4242: permission denied (needs root or CAP_NET_ADMIN)\n"


@pytest.mark.root
def test_an_8000_byte_datagram_arrives_whole_and_is_delivered_after_accept(ns: str) -> None:
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9999)
    sender = udp_socket(ns)
    seen: list[bytes] = []

    def handle(data: bytes, now: float) -> int:
        seen.append(data)
        return ACCEPT

    data = pattern(8000)
    with bound(ns, handle) as adapter:
        sender.sendto(data, (ADDR, 9999))
        pump(adapter, lambda: bool(seen))
        assert [len(p) for p in seen] == [8028]  # one IP packet, not yet fragmented
        assert seen[0][28:] == data and seen[0][9] == 17
        assert receiver.recv(65535) == data
        assert adapter.packets == 1 and adapter.errors == adapter.truncated == 0


def with_dport(packet: bytes, dport: int) -> bytes:
    """``packet`` (IPv4/UDP) sent to ``dport`` instead, its UDP checksum fully recomputed."""
    ihl = (packet[0] & 0x0F) * 4
    udp = bytearray(packet[ihl:])
    udp[2:4] = dport.to_bytes(2, "big")
    udp[6:8] = b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    csum = full(pseudo + bytes(udp)) or 0xFFFF
    udp[6:8] = csum.to_bytes(2, "big")
    return packet[:ihl] + bytes(udp)


@pytest.mark.root
def test_a_rewritten_payload_arrives_rewritten(ns: str) -> None:
    """To :9999, rewritten to :9998 (the receiver checks the checksum: it must be right)."""
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9998)
    sender = udp_socket(ns)
    data = pattern(8000)
    with bound(ns, lambda packet, now: with_dport(packet, 9998)) as adapter:
        sender.sendto(data, (ADDR, 9999))
        sender.sendto(b"small", (ADDR, 9999))
        pump(adapter, lambda: adapter.packets == 2)
        assert recv_all(receiver, 2) == [data, b"small"]


@pytest.mark.root
def test_drop_errors_and_non_verdicts_cost_the_packet_and_are_counted(ns: str) -> None:
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9999)
    sender = udp_socket(ns)
    answers: dict[bytes, Callable[[], bytes | int]] = {
        b"drop": lambda: DROP,
        b"raise": lambda: 1 // 0,
        b"seven": lambda: 7,
        b"text": lambda: "accept",  # type: ignore[return-value, dict-item]
        b"pass": lambda: ACCEPT,
    }
    with bound(ns, lambda packet, now: answers[packet[28:]]()) as adapter:
        for payload in answers:
            sender.sendto(payload, (ADDR, 9999))
        pump(adapter, lambda: adapter.packets == len(answers))
        assert recv_all(receiver, 1, timeout=1.0) == [b"pass"]
        assert (adapter.errors, adapter.bad_verdicts) == (1, 2)
        stats = adapter.format_stats()
        assert stats.startswith(f"queue {QUEUE}: 5 packets, ") and "2 bad verdicts" in stats


@pytest.mark.root
def test_a_packet_longer_than_the_copy_range_is_dropped_and_counted(ns: str) -> None:
    """65507 bytes of UDP make a 65535-byte packet; the kernel copies at most 65531."""
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9999)
    sender = udp_socket(ns)
    seen: list[int] = []
    with bound(ns, lambda packet, now: seen.append(len(packet)) or ACCEPT) as adapter:
        sender.sendto(bytes(65507), (ADDR, 9999))
        sender.sendto(bytes(65503), (ADDR, 9999))  # 65531: the longest that fits
        pump(adapter, lambda: adapter.packets == 2)
        assert adapter.truncated == 1 and seen == [65531]
        assert [len(d) for d in recv_all(receiver, 2, timeout=1.0)] == [65503]


@pytest.mark.root
def test_a_receive_buffer_overrun_is_counted_and_serving_goes_on(ns: str) -> None:
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9999)
    sender = udp_socket(ns)
    with bound(ns, lambda packet, now: ACCEPT) as adapter:
        assert adapter._sock is not None
        adapter._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # about one packet
        for _ in range(20):
            sender.sendto(pattern(8000), (ADDR, 9999))
        pump(adapter, lambda: adapter.enobufs > 0, timeout=2.0)
        assert adapter.enobufs >= 1
        pump(adapter, lambda: False, timeout=0.3)  # what did fit still gets its verdict
        got = recv_all(receiver, 20, timeout=1.0)
        assert 1 <= len(got) < 20 and adapter.packets == len(got)
        assert "receive overruns" in adapter.format_stats()
        # and the next packet passes as usual
        sender.sendto(b"after", (ADDR, 9999))
        pump(adapter, lambda: adapter.packets == len(got) + 1)
        assert recv_all(receiver, 1) == [b"after"]


@pytest.mark.root
def test_a_burst_larger_than_the_budget_passes_whole(ns: str) -> None:
    """Verdicts go many per sendmsg; 600 packets (> BUDGET), some rewritten, all arrive."""
    queue_to(ns, 9999)
    receiver = udp_socket(ns, 9998)
    sender = udp_socket(ns)
    receiver.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
    sender.setsockopt(socket.SOL_SOCKET, 32, 32 << 20)  # SO_SNDBUFFORCE: queued packets
    # hold the sender's buffer until their verdict
    n = 600
    payloads = [i.to_bytes(2, "big") * (1 + (i % 3) * 2500) for i in range(n)]
    with bound(ns, lambda packet, now: with_dport(packet, 9998)) as adapter:
        for p in payloads:
            sender.sendto(p, (ADDR, 9999))
        pump(adapter, lambda: adapter.packets == n, timeout=10.0)
        got = recv_all(receiver, n, timeout=5.0)
        assert sorted(got) == sorted(payloads)
        assert bound_queues(ns)[QUEUE][2] == "0"  # nothing left waiting for a verdict
        assert adapter.wakeups >= n // netlink.BUDGET and adapter.send_errors == 0
        assert adapter.verdict_errors == 0


@pytest.mark.root
def test_a_verdict_for_an_unknown_packet_is_counted_not_fatal(ns: str) -> None:
    with bound(ns, lambda packet, now: ACCEPT) as adapter:
        adapter._give_accept(netlink.BE32.pack(123456))
        adapter._flush()
        pump(adapter, lambda: adapter.verdict_errors > 0, timeout=2.0)
        assert adapter.verdict_errors == 1
        assert "1 verdict errors" in adapter.format_stats()
