"""The headers queue (daemon.bulk = "headers"): large TCP packets, their headers alone.

The rules (``rules/bulk.rules``) send a service's TCP packets of more than
:data:`nfqlb.rules.BINDING_MAX_PACKET` bytes (GSO packets above all: a bulk transfer is
mostly 64 KB of them) to this queue, which asks the kernel for the first
:data:`nfqlb.offload.COPY_RANGE` bytes of each and for GSO packets whole (NFQA_CFG_F_GSO).
:meth:`nfqlb.engine.Engine.handle_headers` answers with a mark: its backend's for an
established flow's segment, and the verdict ACCEPTs the packet with it; nfqlb's nftables
table (:func:`nfqlb.rules.bulk_nft`) rewrites the addresses and ports by that mark at
priority -250 of the same hook and clears it. Nothing of the payload crosses to user space
or back: that copying, the verdict's relinearising of the 64 KB packet and the checksum work
it brings are what bounded a stream through the large-packet queue.

Anything else comes back with the mark :func:`nfqlb.config.bulk_whole` and ``NF_REPEAT``:
the kernel runs the raw table's hook again, whose first rule for that mark sends the packet
to the large-packet queue, whole, where the engine's ``handle`` does what it always did (a
handshake or teardown segment, an unknown flow, a fullnat flow whose elements are not in).

A fullnat flow's rewrite is its own (its pool port; the client's address and port in
replies): :class:`NftMaps` adds its elements to the table's maps (``rules.NFT_MAPS``) once
the engine asks (``Engine.bulk_ops``, after a few large packets), in one nf_tables
transaction per wakeup over a netlink socket of its own, and removes them when the flow
ends. The engine marks the flow's packets only once the kernel took them.

The packet's length comes from ``NFQA_CAP_LEN`` (the kernel's own, also for a GSO packet
beyond the IP header's 16 bits); the verdicts of a wakeup go in one ``sendmsg`` as on every
netlink queue. A packet message without payload is dropped and counted as malformed.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final, cast

from nfqlb.engine import Engine
from nfqlb.errors import SystemSetupError
from nfqlb.flows import Flow
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.netlink import (
    BE32,
    FLUSH_BYTES,
    FLUSH_PARTS,
    NETLINK_NETFILTER,
    NF_ACCEPT,
    NFQA_SKB_GSO,
    NLATTR,
    NLMSG_ERROR,
    Handle,
    NetlinkQueueAdapter,
    marked_verdict_prefix,
    parse_packet,
)
from nfqlb.io.nftnl import NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFPROTO_IPV6
from nfqlb.offload import COPY_RANGE
from nfqlb.ratelog import RateLimitedLog

NF_REPEAT: Final = 4  # linux/netfilter.h: run the hook (the raw table) again
NFQA_MARK: Final = 3  # linux/netfilter/nfnetlink_queue.h: the packet mark, be32


# --- nf_tables map elements (linux/netfilter/nf_tables.h, nfnetlink.h) -----------------------

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DESTROYSETELEM = 12, 30  # destroy: no error if it is not there
NLM_F_REQUEST, NLM_F_CREATE = 0x1, 0x400
NLA_F_NESTED: Final = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM: Final = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE: Final = 1
BATCH_OPS: Final = 128  # flows per transaction (a sendmsg of at most some 60 KB)
_PAD2: Final = b"\0\0"  # a port fills a 4-byte register of a concatenated key


def _attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + bytes(-n % 4)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("!BBH", family, 0, res_id) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def flow_elements(flow: Flow) -> tuple[int, list[tuple[str, bytes, bytes]]]:
    """(nfproto, [(map, key, data)]) of a fullnat flow, as ``rules.NFT_MAPS`` key them: its
    pool port by (client, client port, VIP, service port); the client's address and port by
    (backend, backend port, pool port), the key of its replies as they arrive."""
    fwd, rev = flow.fwd_key, flow.rev_key
    a = len(fwd) // 2 - 2  # address length
    client, vip, cport, vport = fwd[:a], fwd[a:2 * a], fwd[2 * a:2 * a + 2], fwd[2 * a + 2:]
    backend, bport, pool = rev[:a], rev[2 * a:2 * a + 2], rev[2 * a + 2:]
    back = backend + bport + _PAD2 + pool + _PAD2
    return (NFPROTO_IPV6 if a == 16 else NFPROTO_IPV4, [
        ("fwd-port", client + cport + _PAD2 + vip + vport + _PAD2, pool),
        ("rev-addr", back, client),
        ("rev-port", back, cport),
    ])


class NftMaps:
    """The fullnat flows' elements in the headers route's table, kept as the engine asks
    (``bulk_ops``): every change of a wakeup in one nf_tables transaction (an element is
    destroyed before it is added, so a key a retired flow left behind never fails the
    transaction). The kernel answers before ``send`` returns; no answer is success."""

    def __init__(self, table: str, log: logging.Logger) -> None:
        self.table = table
        self.log = log
        self.added = 0  # flows whose elements went in
        self.removed = 0
        self.failed = 0  # flows whose elements the kernel refused (their packets go whole)
        self._sock: socket.socket | None = None
        self._seq = 0
        self._ratelog = RateLimitedLog(log)
        self._attrs = {name: _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                       + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
                       for name in ("fwd-port", "rev-addr", "rev-port")}

    def open(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.setblocking(False)
        except OSError as exc:
            raise SystemSetupError(f"cannot open a netlink socket for nftables ({exc})") \
                from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _elem_message(self, kind: int, family: int, name: str, key: bytes,
                      data: bytes | None) -> bytes:
        inner = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key))
        if data is not None:
            inner += _attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, data))
        attrs = self._attrs[name] + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                          _attr(NFTA_LIST_ELEM | NLA_F_NESTED, inner))
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        flags = NLM_F_REQUEST | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        return _message(NFNL_SUBSYS_NFTABLES << 8 | kind, flags, self._seq, family, 0, attrs)

    def batch(self, ops: list[tuple[bool, Flow]]) -> bytes:
        """The transaction of ``ops`` (``Engine.bulk_ops``): begin, per flow per map a
        destroy and (adding) an add, end."""
        parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES, b"")]
        for add, flow in ops:
            family, elements = flow_elements(flow)
            for name, key, data in elements:
                parts.append(self._elem_message(NFT_MSG_DESTROYSETELEM, family, name, key,
                                                None))
                if add:
                    parts.append(self._elem_message(NFT_MSG_NEWSETELEM, family, name, key,
                                                    data))
        parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES,
                              b""))
        return b"".join(parts)

    def sync(self, engine: Engine, now: float) -> None:
        """Send the engine's pending element changes; tell it which adds went in."""
        ops = engine.bulk_ops
        if not ops or self._sock is None:
            return
        engine.bulk_ops = []
        for i in range(0, len(ops), BATCH_OPS):
            part = ops[i:i + BATCH_OPS]
            error = self._send(self.batch(part))
            adds = [flow for add, flow in part if add]
            engine.bulk_done(adds, not error)
            if error and adds:
                self.failed += len(adds)
                self._ratelog.error("nft", now, "nftables refused the map elements of %d "
                                    "fullnat flows (%s): their large packets go whole",
                                    len(adds), os_error(error))
            elif error:  # removals only: the table went first (a reload without fullnat)
                self.log.debug("removing %d fullnat flows' map elements: %s", len(part),
                               os_error(error))
            else:
                self.added += len(adds)
                self.removed += len(part) - len(adds)

    def _send(self, message: bytes) -> int:
        """Send one transaction; 0, or the first error the kernel answered with."""
        sock = self._sock
        assert sock is not None
        try:
            sock.send(message)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        first = 0
        while True:
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                return first
            except OSError as exc:
                return first or -(exc.errno or errno.EIO)
            off = 0
            while off + 20 <= len(answer):
                mlen, kind = struct.unpack_from("=IH", answer, off)
                if kind == NLMSG_ERROR:
                    code = struct.unpack_from("=i", answer, off + 16)[0]
                    first = first or code
                off += max((mlen + 3) & ~3, 16)


def os_error(code: int) -> str:
    import os

    return os.strerror(-code) if code < 0 else f"error {code}"


class HeadersNetlinkAdapter(NetlinkQueueAdapter):
    """The headers queue on nfqlb's netlink client: a mark per packet, no payload back."""

    def __init__(self, engine: Engine, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC, table: str = "") -> None:
        super().__init__(cast(Handle, engine.handle), queue, log, clock,
                         purpose="TCP headers of large packets", gso=True,
                         copy_range=COPY_RANGE)
        self.engine = engine
        self.lean = True  # nothing held, sent or timed here: the reader calls on_readable only
        self.whole = 0  # packets sent on whole (NF_REPEAT to the large-packet queue)
        self._heads = (marked_verdict_prefix(queue, NF_ACCEPT),
                       marked_verdict_prefix(queue, NF_REPEAT))
        self._mark_attr = NLATTR.pack(NLATTR.size + BE32.size, NFQA_MARK)
        self._tails: dict[int, bytes] = {}  # mark -> its NFQA_MARK attribute
        #: the fullnat flows' elements of the nftables table ``table`` (rules.nft_table)
        self.maps = NftMaps(table, log)

    def bind(self, max_len: int = 1024) -> None:
        super().bind(max_len)
        try:
            self.maps.open()
        except SystemSetupError:
            self.unbind()
            raise

    def unbind(self) -> None:
        super().unbind()
        self.maps.close()

    def on_readable(self) -> None:
        """The packets' marks, then the map elements their flows asked for (fullnat)."""
        try:
            super().on_readable()
        finally:
            if self.engine.bulk_ops:
                self.maps.sync(self.engine, self.now)

    def _on_packet(self, start: int, end: int) -> None:
        packet_id, payload, cap_len, info = parse_packet(self._view, start, end)
        if packet_id is None:
            self.malformed += 1
            return
        self.packets += 1
        if info & NFQA_SKB_GSO:
            self.gso_packets += 1
        if payload is None:
            self.malformed += 1
            self._give_drop(packet_id)
            return
        mark = self.engine.handle_headers(payload, cap_len or len(payload), self.now)
        whole = mark == self.engine.bulk_whole
        if whole:
            self.whole += 1
        tail = self._tails.get(mark)
        if tail is None:
            tail = self._tails[mark] = self._mark_attr + BE32.pack(mark)
        pending = self._pending
        pending.append(b"".join((self._heads[whole], packet_id, tail)))
        self._pending_bytes += 40
        if self._pending_bytes >= FLUSH_BYTES or len(pending) >= FLUSH_PARTS:
            self._flush()

    def format_stats(self) -> str:
        first, sep, rest = super().format_stats().partition("\n")
        m = self.maps
        fullnat = (f", fullnat flows' elements {m.added} added, {m.removed} removed"
                   + (f", {m.failed} refused" if m.failed else "")) if m.added or m.failed else ""
        return f"{first}, {self.whole} sent on whole{fullnat}{sep}{rest}"
