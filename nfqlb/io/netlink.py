"""A pure-Python NFQUEUE client on a raw netlink socket, for packets the binding cannot carry.

NetfilterQueue 1.1.0 receives into a 4096-byte buffer and caps the copy range at 4016 bytes,
so a longer packet never reaches its callback whole. This module speaks the nfnetlink_queue
protocol itself, on ``socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)``, with a copy range of
65535 and a receive buffer that holds the largest message, and feeds the same
``handle(bytes, now) -> bytes | ACCEPT | DROP`` as :class:`nfqlb.io.nfqueue.QueueAdapter`, with
the same adapter shape (bind, fileno, on_readable, drain, unbind, format_stats).

The wire format (``linux/netlink.h``, ``linux/netfilter/nfnetlink.h``,
``linux/netfilter/nfnetlink_queue.h``); netlink headers are in host order, nfnetlink payloads
in network order::

    message   = nlmsghdr(len u32, type u16, flags u16, seq u32, portid u32)     host order
                nfgenmsg(family u8, version u8 = 0, res_id be16 = queue number)
                attributes, each at a 4-byte boundary
    attribute = nlattr(len u16 incl. this header, type u16) + data + pad to 4
                (the type's top two bits are the NESTED / NET_BYTEORDER flags)
    type      = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_{PACKET, VERDICT, CONFIG}

    config  -> NFQA_CFG_CMD      {command u8 (BIND/UNBIND), pad u8, pf be16}
               NFQA_CFG_PARAMS   {copy_range be32, copy_mode u8 = COPY_PACKET}   (packed: 5 B)
               NFQA_CFG_QUEUE_MAXLEN be32
               NFQA_CFG_MASK be32, NFQA_CFG_FLAGS be32  (FAIL_OPEN and GSO, each as asked)
               sent with NLM_F_REQUEST | NLM_F_ACK; the kernel answers NLMSG_ERROR(errno, 0=ok)
    packet  <- NFQA_PACKET_HDR   {packet_id be32, hw_protocol be16, hook u8}
               NFQA_PAYLOAD      the IP packet, NFQA_CAP_LEN be32 when it was cut short;
               NFQA_SKB_INFO be32 (CSUMNOTREADY, GSO, CSUM_NOTVERIFIED) when any is set;
               other attributes (interfaces, mark, timestamp, ...) are skipped
    verdict -> NFQA_VERDICT_HDR  {verdict be32 (NF_DROP=0, NF_ACCEPT=1), packet_id be32}
               NFQA_PAYLOAD      only when the packet was rewritten

GSO (NFQA_CFG_F_GSO, asked for with ``gso=True``). Without the flag the kernel segments every
GSO packet (a TCP sender's 64 KiB burst, a GRO-merged train) before queueing it, and each
~1500-byte segment makes its own trip through Python; with it the packet comes whole, once,
and the verdict applies to all of it. Such a packet, and any packet the local stack or a veth
peer sent with checksum offload, is ``CHECKSUM_PARTIAL`` (NFQA_SKB_CSUMNOTREADY): its TCP/UDP
checksum field holds only the pseudo-header sum, for the NIC or the segmentation to complete.
Accepted unchanged it stays so. Given back rewritten, the kernel marks it ``CHECKSUM_NONE``
(``nfqnl_mangle`` does so for every payload verdict) and completes nothing: where the packet is
delivered locally whole, or is not GSO, the field is then checked as a full checksum. A GSO
packet to another host is segmented on its way out: TCP segmentation then rebuilds the
pseudo-header sum itself, UDP segmentation derives each datagram's checksum from the field as
a pseudo-header sum. So the adapter (:meth:`NetlinkQueueAdapter._checksum_fix`) leaves the
field partial, the pseudo-header sum of the new addresses
(:func:`nfqlb.wire.rewrite.partial_checksum`), for a TCP or UDP GSO packet to an address that
is not this host's, and computes it in full (:func:`nfqlb.wire.rewrite.complete_checksum`) for
the rest. Checked on this kernel (6.18): left partial, local-mode TCP uploads stall (the local
socket counts InCsumErrors); computed in full, a forwarded UDP GSO packet's datagrams arrive
with bad checksums. One case no checksum mends: a rewritten UDP GSO packet delivered here to a
socket without UDP_GRO is dropped by the kernel (its receive path cannot segment it once the
checksum state is gone: the socket's InErrors count it); to a socket with UDP_GRO it arrives
whole, with the full checksum it needs. The GSO flag is
set on the large-packet queue: a GSO packet is long, so the length rule sends it there. On the
main queue (``[daemon] binding = "netlink"``) it stays off: there every packet from a veth
peer or the local stack would arrive partial, and the kernel completes checksums in C before
queueing for less than Python pays. NFQA_SKB_CSUM_NOTVERIFIED (the kernel has not checked the
checksum of a received packet) needs nothing: the rewrite updates the checksum incrementally
(RFC 1624), so a wrong one stays wrong and the receiver drops the packet as it would have.

The copy range is clamped by the kernel to 65531 (0xffff minus an attribute header), so an IP
packet of 65532-65535 bytes arrives cut short (NFQA_CAP_LEN): it can be neither judged nor
given back whole, and is dropped and counted as ``truncated``.

Verdicts given during one wakeup are sent together, several netlink messages in one
``sendmsg`` (the kernel walks them in order, as for any netlink request): one system call per
wakeup instead of one per packet. Errors for single verdicts (an id the kernel no longer knows)
come back as NLMSG_ERROR and are counted; NETLINK_CAP_ACK keeps them from echoing payloads.

Fail-open (NFQA_CFG_F_FAIL_OPEN) is off by default, as it is for the binding's queue: when the
queue is full the kernel would accept the packet *unchanged*, and for nfqlb an unchanged packet
is a wrong one (a backend's source address leaking to the client, a VIP nobody listens on,
untracked so no conntrack NAT fixes it up). Dropping under overload is what TCP and UDP
clients already cope with; the queue-full drops show in ``/proc/net/netfilter/nfnetlink_queue``,
which :mod:`nfqlb.io.kstats` reads for the adapter's stats. A receive buffer overrun (ENOBUFS:
the kernel dropped packets for us) is counted and logged.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import socket
import struct
import sys
import time
import typing
from collections.abc import Callable

from nfqlb.errors import SystemSetupError
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.kstats import KernelQueueStats
from nfqlb.io.verdicts import OnHold, Sink, give
from nfqlb.ratelog import RateLimitedLog
from nfqlb.verdict import ACCEPT, Final, Held, Verdict
from nfqlb.wire.checksum import U16
from nfqlb.wire.ip import TCP, UDP
from nfqlb.wire.rewrite import checksum_fix

Handle = Callable[[bytes, float], Verdict]

# --- constants from the kernel uapi ------------------------------------------------------------

NETLINK_NETFILTER: typing.Final = 12  # linux/netlink.h
SOL_NETLINK: typing.Final = 270  # linux/socket.h
#: error messages carry only the header of the request, not its payload
NETLINK_CAP_ACK: typing.Final = 10
NLM_F_REQUEST: typing.Final = 0x01
NLM_F_ACK: typing.Final = 0x04
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLA_TYPE_MASK: typing.Final = 0x3FFF  # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

NFNL_SUBSYS_QUEUE: typing.Final = 3  # linux/netfilter/nfnetlink.h
NFNETLINK_V0: typing.Final = 0

NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2  # nfnetlink_queue.h
NFQA_PACKET_HDR: typing.Final = 1
NFQA_VERDICT_HDR: typing.Final = 2
NFQA_PAYLOAD: typing.Final = 10
NFQA_CAP_LEN: typing.Final = 13
NFQA_SKB_INFO: typing.Final = 14
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED = 1 << 0, 1 << 1, 1 << 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND, NFQNL_CFG_CMD_PF_BIND = 1, 2, 3
NFQNL_COPY_PACKET: typing.Final = 2
NFQA_CFG_F_FAIL_OPEN: typing.Final = 1 << 0
NFQA_CFG_F_GSO: typing.Final = 1 << 2

NF_DROP, NF_ACCEPT = 0, 1  # linux/netfilter.h (the engine's ACCEPT/DROP are 0/1 the other way)

PACKET_TYPE: typing.Final = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
VERDICT_TYPE: typing.Final = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
CONFIG_TYPE: typing.Final = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG

COPY_RANGE: typing.Final = 0xFFFF  # asked for; the kernel clamps it to 0xFFFF - 4
#: the most a verdict's NFQA_PAYLOAD (u16 length with header) holds
MAX_PAYLOAD: typing.Final = 0xFFFF - 4

# --- sizes and budgets -------------------------------------------------------------------------

#: messages per wakeup before the event loop gets a turn (as in nfqueue.py)
BUDGET: typing.Final = 256
#: > the largest packet message (65531 B payload + ~150 B of attributes)
RECV_SIZE: typing.Final = 1 << 17
RCVBUF: typing.Final = 8 << 20  # socket receive buffer: about 128 queued 64 KiB packets
SNDBUF: typing.Final = 1 << 20
FLUSH_BYTES: typing.Final = 1 << 17  # send the pending verdicts once they hold this much
FLUSH_PARTS: typing.Final = 900  # ... or this many buffers (sendmsg takes at most 1024)
ACK_TIMEOUT_S: typing.Final = 5.0
LOCAL_CACHE_S: typing.Final = 10.0  # how long an answer of is_local_address is used
#: destinations remembered at most (then the cache starts again)
LOCAL_CACHE_MAX: typing.Final = 65536
LOG_EVERY_S: typing.Final = 10.0

# --- precompiled layouts -----------------------------------------------------------------------

NLMSGHDR: typing.Final = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
NFGENMSG: typing.Final = struct.Struct("!BBH")  # family, version, res_id (network order)
NLATTR: typing.Final = struct.Struct("=HH")  # len, type (host order)
BE32: typing.Final = struct.Struct("!I")
NLMSGERR: typing.Final = struct.Struct("=i")  # negative errno, 0 for an ack
VERDICT_HDR: typing.Final = struct.Struct("!II")  # verdict, packet id
CFG_CMD: typing.Final = struct.Struct("!BxH")  # command, pad, pf
CFG_PARAMS: typing.Final = struct.Struct("!IB")  # copy_range, copy_mode (packed: 5 bytes)
_HDR_LEN: typing.Final = NLMSGHDR.size + NFGENMSG.size  # 20: where the attributes start
#: A payload verdict up to its payload: nlmsghdr (host order), nfgenmsg + verdict header
#: attribute + verdict (12 bytes, fixed per queue), packet id (4 bytes, network order),
#: payload attribute header (host order).
REWRITE_HEAD: typing.Final = struct.Struct("=IHHII12s4sHH")
_REWRITE_LEN: typing.Final = REWRITE_HEAD.size  # 36
_PADS: typing.Final = (b"", b"\0", b"\0\0", b"\0\0\0")


def _align(n: int) -> int:
    return (n + 3) & ~3


def build_attr(atype: int, data: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = NLATTR.size + len(data)
    return NLATTR.pack(n, atype) + data + bytes(_align(n) - n)


def build_message(mtype: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    """A netlink message of the queue subsystem for ``queue``, attributes already built."""
    n = _HDR_LEN + len(attrs)
    return NLMSGHDR.pack(n, mtype, flags, seq, 0) + NFGENMSG.pack(socket.AF_UNSPEC,
                                                                  NFNETLINK_V0, queue) + attrs


def build_bind(queue: int, seq: int, *, max_len: int, fail_open: bool = False,
               gso: bool = False, copy_range: int = COPY_RANGE) -> bytes:
    """BIND, copy mode PACKET with ``copy_range`` (default: the full range), queue length,
    the fail-open and GSO flags."""
    flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
    attrs = (build_attr(NFQA_CFG_CMD, CFG_CMD.pack(NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC))
             + build_attr(NFQA_CFG_PARAMS, CFG_PARAMS.pack(copy_range, NFQNL_COPY_PACKET))
             + build_attr(NFQA_CFG_QUEUE_MAXLEN, BE32.pack(max_len))
             + build_attr(NFQA_CFG_MASK, BE32.pack(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO))
             + build_attr(NFQA_CFG_FLAGS, BE32.pack(flags)))
    return build_message(CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


def build_command(queue: int, seq: int, command: int) -> bytes:
    """A config message with only a command (UNBIND, or the obsolete PF_BIND probe)."""
    attrs = build_attr(NFQA_CFG_CMD, CFG_CMD.pack(command, socket.AF_UNSPEC))
    return build_message(CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attrs)


def verdict_prefix(queue: int, verdict: int) -> bytes:
    """Everything of a payload-less verdict message but the packet id (its last 4 bytes)."""
    n = _HDR_LEN + NLATTR.size + VERDICT_HDR.size
    return (NLMSGHDR.pack(n, VERDICT_TYPE, NLM_F_REQUEST, 0, 0)
            + NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
            + NLATTR.pack(NLATTR.size + VERDICT_HDR.size, NFQA_VERDICT_HDR) + BE32.pack(verdict))


def marked_verdict_prefix(queue: int, verdict: int) -> bytes:
    """:func:`verdict_prefix` of a verdict that carries a mark after the packet id (an
    NFQA_MARK attribute, 8 bytes, counted in the message's length)."""
    head = verdict_prefix(queue, verdict)
    n = NLMSGHDR.unpack_from(head)[0] + NLATTR.size + BE32.size
    return NLMSGHDR.pack(n, *NLMSGHDR.unpack_from(head)[1:]) + head[NLMSGHDR.size:]


def build_verdict(queue: int, packet_id: int, verdict: int,
                  payload: bytes | None = None) -> list[bytes]:
    """The verdict message as buffers for ``sendmsg``: header, then payload and padding."""
    if payload is None:
        return [verdict_prefix(queue, verdict) + BE32.pack(packet_id)]
    return _build_payload_verdict(queue, packet_id, verdict, payload)


def _build_payload_verdict(queue: int, packet_id: int, verdict: int,
                           payload: bytes) -> list[bytes]:
    plen = len(payload)
    pad = _align(plen) - plen
    n = _HDR_LEN + NLATTR.size + VERDICT_HDR.size + NLATTR.size + plen + pad
    head = (NLMSGHDR.pack(n, VERDICT_TYPE, NLM_F_REQUEST, 0, 0)
            + NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
            + NLATTR.pack(NLATTR.size + VERDICT_HDR.size, NFQA_VERDICT_HDR)
            + VERDICT_HDR.pack(verdict, packet_id)
            + NLATTR.pack(NLATTR.size + plen, NFQA_PAYLOAD))
    return [head, payload, bytes(pad)] if pad else [head, payload]


#: The first bytes of a packet message read by index for its attributes (they all come before
#: the payload, the last one, and fit in about 100 bytes); a longer walk copies the rest.
_HEAD_MAX: typing.Final = 256
_LITTLE: typing.Final = sys.byteorder == "little"  # (netlink's headers are in host order)


def parse_packet(buf: bytes | bytearray | memoryview, start: int,
                 end: int) -> tuple[bytes | None, bytes | None, int | None, int]:
    """(packet id, payload, cap_len, skb info) of the packet message in ``buf[start:end]``.

    The packet id is kept as its 4 bytes in network order, as a verdict carries it back. A
    field is None when its attribute is missing; ``cap_len`` is set only when the kernel cut
    the payload short; skb info is 0 when absent (NFQA_SKB_* flags). A malformed attribute
    ends the walk. The attributes are read by index from one small copy of the message's
    head; the payload is copied once from ``buf`` (a memoryview slice: once, 64 KiB for a GSO
    packet, where a bytearray slice would copy twice).
    """
    packet_id = payload = cap_len = None
    info = 0
    n = end - start
    head = bytes(buf[start:start + min(n, _HEAD_MAX)])
    a = _HDR_LEN
    while a + 4 <= n:
        if a + 8 > len(head):  # (attributes past the usual head: read the whole message)
            head = bytes(buf[start:end])
        if _LITTLE:
            alen = head[a] | head[a + 1] << 8
            atype = (head[a + 2] | head[a + 3] << 8) & NLA_TYPE_MASK
        else:
            alen = head[a] << 8 | head[a + 1]
            atype = (head[a + 2] << 8 | head[a + 3]) & NLA_TYPE_MASK
        if alen < 4 or a + alen > n:
            break
        if atype == NFQA_PAYLOAD:
            payload = bytes(buf[start + a + 4:start + a + alen])
        elif alen >= 8 and (atype == NFQA_PACKET_HDR or atype == NFQA_SKB_INFO
                            or atype == NFQA_CAP_LEN):
            if atype == NFQA_PACKET_HDR:
                packet_id = head[a + 4:a + 8]
            else:
                value = head[a + 4] << 24 | head[a + 5] << 16 | head[a + 6] << 8 | head[a + 7]
                if atype == NFQA_SKB_INFO:
                    info = value
                else:
                    cap_len = value
        a += (alen + 3) & ~3
    return packet_id, payload, cap_len, info


class NetlinkQueueAdapter:
    """One queue bound over a netlink socket of our own, feeding ``handle(payload, now)``."""

    def __init__(self, handle: Handle, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC, *, purpose: str = "",
                 fail_open: bool = False, gso: bool = False,
                 on_hold: OnHold | None = None, copy_range: int = COPY_RANGE) -> None:
        self.queue = queue
        self.on_hold = on_hold  # told how to give a held packet its verdict later
        self.log = log
        self.clock = clock
        self.now = clock()
        self.purpose = purpose  # "for packets over N bytes": said in errors and stats
        self.fail_open = fail_open
        self.gso = gso  # ask for GSO packets whole (NFQA_CFG_F_GSO)
        self._copy_range = copy_range  # bytes of each packet the kernel copies to us
        # counters
        self.packets = 0
        self.wakeups = 0
        self.errors = 0  # handle() raised (the packet was dropped)
        self.bad_verdicts = 0  # handle() returned something that is no verdict (dropped)
        self.truncated = 0  # cut short by the kernel's copy range (dropped)
        self.gso_packets = 0  # GSO packets received whole (NFQA_SKB_GSO)
        self.csum_completed = 0  # rewritten partial-checksum packets whose checksum we computed
        self.csum_partial = 0  # ... left partial (TCP GSO, forwarded: segmentation completes)
        self.malformed = 0  # packet messages without id or payload
        self.enobufs = 0  # receive buffer overruns: the kernel dropped packets for us
        self.verdict_errors = 0  # the kernel refused a verdict (NLMSG_ERROR)
        self.send_errors = 0  # verdicts that could not be sent
        self.kernel: KernelQueueStats | None = None  # the kernel's counters, once bound
        self._handle = handle
        self._sock: socket.socket | None = None
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._pending: list[bytes | memoryview] = []  # (views: see _give_rewritten)
        self._pending_bytes = 0
        self._seq = 0
        self._ack_seq = -1  # the seq of the config request waiting for its answer
        self._ack: int | None = None  # its answer: 0 or a negative errno
        self._ratelog = RateLimitedLog(log, LOG_EVERY_S)
        self._local: dict[bytes, bool] = {}  # destination -> is an address of this host
        self._local_until = 0.0
        self._accept = verdict_prefix(queue, NF_ACCEPT)
        # a payload verdict's fixed middle: nfgenmsg, verdict header attribute, NF_ACCEPT
        self._rewrite_mid = self._accept[16:28]
        self._drop = verdict_prefix(queue, NF_DROP)
        self._sink = Sink(self._give_rewritten, self._give_accept, self._give_drop, self._hold)
        self._late_sink = Sink(self._give_rewritten, self._give_accept, self._give_drop)

    @property
    def name(self) -> str:
        return f"queue {self.queue}" + (f" ({self.purpose})" if self.purpose else "")

    # ------------------------------------------------------------------ binding

    def bind(self, max_len: int = 1024) -> None:
        """Open the socket and bind the queue; raises SystemSetupError (one line) if impossible."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise SystemSetupError(f"cannot open a netfilter netlink socket ({exc.strerror}); "
                                   "nfqlb needs Linux with nfnetlink") from None
        try:
            sock.bind((0, 0))  # the kernel picks our port id
            _set_buffer(sock, socket.SO_RCVBUF, 33, RCVBUF)  # 33: SO_RCVBUFFORCE
            _set_buffer(sock, socket.SO_SNDBUF, 32, SNDBUF)  # 32: SO_SNDBUFFORCE
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise SystemSetupError(f"cannot set up the netlink socket for {self.name}: "
                                   f"{exc.strerror}") from None
        self._sock = sock
        try:
            err = self._request(build_bind(self.queue, self._next_seq(), max_len=max_len,
                                           fail_open=self.fail_open, gso=self.gso,
                                           copy_range=self._copy_range))
            if err == -errno.EPERM:
                # Either the queue belongs to another socket or we lack CAP_NET_ADMIN. The
                # obsolete PF_BIND command needs the capability and nothing else: it tells.
                probe = self._request(build_command(self.queue, self._next_seq(),
                                                    NFQNL_CFG_CMD_PF_BIND))
                if probe == 0:
                    err = -errno.EBUSY
        except OSError as exc:
            self._close()
            raise SystemSetupError(f"cannot bind {self.name}: {exc.strerror or exc}") from None
        if err:
            self._close()
            if err == -errno.EBUSY:
                raise SystemSetupError(f"{self.name} is already bound by another process")
            if err == -errno.EPERM:
                raise SystemSetupError(f"cannot bind {self.name}: permission denied "
                                       "(needs root or CAP_NET_ADMIN)")
            raise SystemSetupError(f"cannot bind {self.name}: {os.strerror(-err)} "
                                   "(is nfnetlink_queue available in this kernel?)")
        self.kernel = KernelQueueStats(self.queue)  # opened here: this namespace's file

    def fileno(self) -> int:
        assert self._sock is not None, "not bound"
        return self._sock.fileno()

    def unbind(self) -> None:
        """Send what is pending, unbind (the kernel drops what is still queued), close."""
        if self._sock is None:
            return
        if self.kernel is not None:
            self.kernel.close()  # with a last reading, while the queue is still bound
        try:
            self._flush()
            err = self._request(build_command(self.queue, self._next_seq(),
                                              NFQNL_CFG_CMD_UNBIND), timeout=1.0)
            if err:
                self.log.debug("unbinding %s: %s", self.name, os.strerror(-err))
        except OSError as exc:
            self.log.debug("unbinding %s: %r (closing the socket unbinds too)", self.name, exc)
        self._close()

    def _close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
        if self._sock is not None:
            self._sock.close()  # the kernel also unbinds every queue of a closed socket
            self._sock = None

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _request(self, message: bytes, timeout: float = ACK_TIMEOUT_S) -> int:
        """Send a config message and wait for its NLMSG_ERROR: 0 or a negative errno.

        Packets that arrive meanwhile get their verdicts as usual.
        """
        sock = self._sock
        assert sock is not None
        self._ack_seq = NLMSGHDR.unpack_from(message)[3]
        self._ack = None
        sock.send(message)
        deadline = time.monotonic() + timeout
        while (ack := self._answer()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, f"no answer from the kernel in {timeout} s")
            readable, _, _ = select.select([sock], [], [], left)
            if readable:
                self.on_readable()
        self._ack_seq = -1
        return ack

    def _answer(self) -> int | None:
        """The answer ``_on_error`` noted (read through a call: compiled, a read of the
        attribute right after setting it to None is taken to be None)."""
        return self._ack

    # ------------------------------------------------------------------ packets

    def on_readable(self) -> None:
        """Handle up to BUDGET messages pending on the socket, then send their verdicts."""
        sock = self._sock
        assert sock is not None, "not bound"
        self.now = self.clock()
        self.wakeups += 1
        recv_into = sock.recv_into
        buf = self._buf
        unpack_hdr = NLMSGHDR.unpack_from
        try:
            for _ in range(BUDGET):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.enobufs += 1
                    self._ratelog.warning("enobufs", self.now,
                                   "%s: receive buffer overrun, the kernel dropped packets "
                                   "(%d overruns so far)", self.name, self.enobufs)
                    continue
                off = 0
                while off + 16 <= n:  # a datagram may hold several messages
                    mlen, mtype, _flags, seq, _pid = unpack_hdr(buf, off)
                    if mlen < 16 or off + mlen > n:
                        self.malformed += 1
                        break
                    if mtype == PACKET_TYPE:
                        self._on_packet(off, off + mlen)
                    elif mtype == NLMSG_ERROR:
                        self._on_error(seq, NLMSGERR.unpack_from(buf, off + 16)[0]
                                       if mlen >= 20 else -errno.EPROTO)
                    off += (mlen + 3) & ~3
        finally:
            self._flush()

    def _on_packet(self, start: int, end: int) -> None:
        packet_id, payload, cap_len, info = parse_packet(self._view, start, end)
        if packet_id is None:
            self.malformed += 1  # nothing we could give a verdict to
            return
        self.packets += 1
        if payload is None or cap_len is not None:
            if payload is None:
                self.malformed += 1
            else:
                self.truncated += 1
                self._ratelog.warning("truncated", self.now, "%s: dropped a packet of %d "
                               "bytes, longer than the kernel copies (%d so far)", self.name,
                               cap_len, self.truncated)
            self._give_drop(packet_id)
            return
        fix = -1
        try:
            r = self._handle(payload, self.now)
            if info:
                if info & NFQA_SKB_GSO:
                    self.gso_packets += 1
                if info & NFQA_SKB_CSUMNOTREADY and r.__class__ is bytes:
                    fix = self._checksum_fix(r, info)
        except BaseException as exc:  # noqa: B036 - every packet gets a verdict, always
            self.errors += 1
            self._give_drop(packet_id)
            self._ratelog.error("errors", self.now, "%s: packet handler failed (%d so far, "
                                "packet dropped): %r", self.name, self.errors, exc)
            return
        # the three common verdicts here, the rest (held, no verdict) through give()
        if r.__class__ is bytes:
            self._give_rewritten(packet_id, r, fix)
        elif r is ACCEPT:
            self._give_accept(packet_id)
        elif not give(r, packet_id, self._sink):
            self._bad_verdict(r)

    def _checksum_fix(self, data: bytes, info: int) -> int:
        """The checksum of a rewritten packet the kernel queued with it partial, as
        :func:`nfqlb.wire.rewrite.checksum_fix` gives it (-1: nothing to change). Left partial
        (the pseudo-header sum of its new addresses) for a TCP or UDP GSO packet on its way to
        another host: the kernel segments it on the way out, TCP segmentation rebuilding the
        sum itself, UDP segmentation deriving each datagram's checksum from it. Computed in
        full for the rest (a GSO packet delivered here whole, a packet that is not GSO),
        which nothing completes once the packet was rewritten."""
        if info & NFQA_SKB_GSO and len(data) > 40:
            v6 = data[0] >> 4 == 6
            if data[6 if v6 else 9] in (TCP, UDP):
                dst = data[24:40] if v6 else data[16:20]
                local = self._local.get(dst)
                if local is None:
                    local = self._learn_local(dst)
                if not local:
                    self.csum_partial += 1
                    return checksum_fix(data, False)
        self.csum_completed += 1
        return checksum_fix(data, True)

    def _learn_local(self, dst: bytes) -> bool:
        """Whether ``dst`` is an address of this host (a packet to it is delivered whole, not
        segmented), as binding a socket to it tells; remembered for LOCAL_CACHE_S."""
        if self.now >= self._local_until or len(self._local) >= LOCAL_CACHE_MAX:
            self._local.clear()  # addresses come and go: ask again now and then
            self._local_until = self.now + LOCAL_CACHE_S
        local = is_local_address(dst)
        self._local[dst] = local
        return local

    def _bad_verdict(self, r: object) -> None:
        self.bad_verdicts += 1
        self._ratelog.error("bad_verdicts", self.now, "%s: the handler returned no verdict "
                            "(%.40r); packet dropped", self.name, r)

    # the Sink: how verdicts are carried out here (queued, sent at the end of the wakeup)

    def _give_rewritten(self, packet_id: bytes, data: bytes, fix: int = -1) -> None:
        """Accept the packet as ``data``; with ``fix`` (``offset << 16 | value``, from
        :meth:`_checksum_fix`), with that 16-bit field set: the packet is then sent as three
        pieces, before the field, the field and a view of the rest (a 64 KiB GSO packet is
        not copied again for two bytes)."""
        plen = len(data)
        if plen > MAX_PAYLOAD:  # cannot be carried back: no verdict
            self._give_drop(packet_id)
            self._bad_verdict(data)
            return
        pad = -plen & 3
        pending = self._pending
        pending.append(REWRITE_HEAD.pack(_REWRITE_LEN + plen + pad, VERDICT_TYPE, NLM_F_REQUEST,
                                         0, 0, self._rewrite_mid, packet_id, 4 + plen,
                                         NFQA_PAYLOAD))
        if fix < 0:
            pending.append(data)
        else:
            co = fix >> 16
            pending.append(data[:co])
            pending.append(U16[fix & 0xFFFF])
            pending.append(memoryview(data)[co + 2:])
        if pad:
            pending.append(_PADS[pad])
        self._pending_bytes += _REWRITE_LEN + plen
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_PARTS:
            self._flush()

    def _give_accept(self, packet_id: bytes) -> None:
        pending = self._pending
        pending.append(self._accept + packet_id)
        self._pending_bytes += 32
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_PARTS:
            self._flush()

    def _give_drop(self, packet_id: bytes) -> None:
        pending = self._pending
        pending.append(self._drop + packet_id)
        self._pending_bytes += 32
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_PARTS:
            self._flush()

    def _hold(self, packet_id: bytes, held: Held) -> None:
        if self.on_hold is None:  # nobody to give the verdict later: drop now
            self._give_drop(packet_id)
            self._bad_verdict(held)
            return
        self.on_hold(held.hold_id, functools.partial(self._late_verdict, packet_id))

    def _late_verdict(self, packet_id: bytes, r: Final) -> None:
        """The verdict for a packet held past its wakeup (a fragment before its first)."""
        if not give(r, packet_id, self._late_sink):
            self._bad_verdict(r)
        self._flush()

    def _on_error(self, seq: int, err: int) -> None:
        if seq == self._ack_seq:
            self._ack = err
        elif err:
            self.verdict_errors += 1
            self._ratelog.warning("verdict_errors", self.now, "%s: the kernel refused a "
                           "verdict: %s (%d so far)", self.name, os.strerror(-err),
                           self.verdict_errors)

    def _flush(self) -> None:
        """Send the pending verdicts in one sendmsg (one by one if that fails)."""
        if not self._pending or self._sock is None:
            return
        parts, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            self._sock.sendmsg(parts)
            return
        except OSError as exc:
            first = exc
        failed = 0
        for message in _split_messages(parts):
            try:
                self._sock.sendmsg(message)
            except OSError:
                failed += 1
        self.send_errors += failed
        if failed:
            self._ratelog.error("send_errors", self.now, "%s: %d verdicts could not be sent "
                           "(%r); those packets wait until the queue is unbound", self.name,
                           failed, first)

    def drain(self) -> None:
        """Give a verdict to what is still queued (after the rules are gone)."""
        if self._sock is None:
            return
        for _ in range(16):
            before = self.packets + self.malformed
            self.on_readable()
            if self.packets + self.malformed - before < BUDGET:
                break  # the socket ran dry before the budget did

    def format_stats(self) -> str:
        text = (f"{self.name}: {self.packets} packets, {self.wakeups} wakeups, "
                f"{self.errors} callback errors")
        extra = [(self.gso_packets, "gso packets"), (self.csum_completed, "checksums completed"),
                 (self.csum_partial, "checksums left partial"),
                 (self.bad_verdicts, "bad verdicts"), (self.truncated, "truncated"),
                 (self.malformed, "malformed"), (self.enobufs, "receive overruns"),
                 (self.verdict_errors, "verdict errors"), (self.send_errors, "send errors")]
        text += "".join(f", {n} {what}" for n, what in extra if n)
        return text + (f"\n  {self.kernel.describe()}" if self.kernel is not None else "")


def is_local_address(packed: bytes) -> bool:
    """Whether the IPv4 (4 bytes) or IPv6 (16 bytes) address is one of this host's: binding
    a socket to it succeeds (an address of an interface, or covered by a ``local`` route).
    Only EADDRNOTAVAIL says no; anything else, and any address under ``ip_nonlocal_bind``
    (where every bind succeeds), counts as local, the answer that costs time, not
    correctness."""
    family = socket.AF_INET6 if len(packed) == 16 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((socket.inet_ntop(family, packed), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


def _split_messages(parts: list[bytes | memoryview]) -> list[list[bytes | memoryview]]:
    """Group buffers back into messages: each message starts with its nlmsghdr length."""
    messages: list[list[bytes | memoryview]] = []
    want = 0
    for part in parts:
        if want <= 0:
            messages.append([])
            want = NLMSGHDR.unpack_from(part)[0]
        messages[-1].append(part)
        want -= len(part)
    return messages


def _set_buffer(sock: socket.socket, option: int, force_option: int, size: int) -> None:
    """Set a socket buffer size, beyond the sysctl limit when privileged (the *FORCE option)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_option, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
