"""The headers queue (daemon.bulk = "headers"): large TCP packets, their headers alone.

The rules (``rules/bulk.rules``) send a dnat or local service's TCP packets of more than
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
handshake or teardown segment, an unknown flow, a fullnat flow).

The packet's length comes from ``NFQA_CAP_LEN`` (the kernel's own, also for a GSO packet
beyond the IP header's 16 bits); the verdicts of a wakeup go in one ``sendmsg`` as on every
netlink queue. A packet message without payload is dropped and counted as malformed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, cast

from nfqlb.engine import Engine
from nfqlb.io.clock import MONOTONIC
from nfqlb.io.netlink import (
    BE32,
    FLUSH_BYTES,
    FLUSH_PARTS,
    NF_ACCEPT,
    NFQA_SKB_GSO,
    NLATTR,
    NLMSGHDR,
    Handle,
    NetlinkQueueAdapter,
    parse_packet,
    verdict_prefix,
)
from nfqlb.offload import COPY_RANGE

NF_REPEAT: Final = 4  # linux/netfilter.h: run the hook (the raw table) again
NFQA_MARK: Final = 3  # linux/netfilter/nfnetlink_queue.h: the packet mark, be32


def _marked_prefix(queue: int, verdict: int) -> bytes:
    """A verdict message's bytes before the packet id, its length counting a mark after."""
    head = verdict_prefix(queue, verdict)
    n = NLMSGHDR.unpack_from(head)[0] + NLATTR.size + BE32.size
    return NLMSGHDR.pack(n, *NLMSGHDR.unpack_from(head)[1:]) + head[NLMSGHDR.size:]


class HeadersNetlinkAdapter(NetlinkQueueAdapter):
    """The headers queue on nfqlb's netlink client: a mark per packet, no payload back."""

    def __init__(self, engine: Engine, queue: int, log: logging.Logger,
                 clock: Callable[[], float] = MONOTONIC) -> None:
        super().__init__(cast(Handle, engine.handle), queue, log, clock,
                         purpose="TCP headers of large packets", gso=True,
                         copy_range=COPY_RANGE)
        self.engine = engine
        self.lean = True  # nothing held, sent or timed here: the reader calls on_readable only
        self.whole = 0  # packets sent on whole (NF_REPEAT to the large-packet queue)
        self._heads = (_marked_prefix(queue, NF_ACCEPT), _marked_prefix(queue, NF_REPEAT))
        self._mark_attr = NLATTR.pack(NLATTR.size + BE32.size, NFQA_MARK)
        self._tails: dict[int, bytes] = {}  # mark -> its NFQA_MARK attribute

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
        return f"{first}, {self.whole} sent on whole{sep}{rest}"
