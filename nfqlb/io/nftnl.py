"""Two reads of nf_tables over netlink, without running ``nft``: the tables of a family with
their handles, and a table's named counters.

``nft`` fetches its whole cache before it answers, the elements of every map included: with
offload's schedules (2,520 elements a service) or the headers route's per-flow map elements
(one per open fullnat flow), ``nft -j list tables`` costs tens of milliseconds of CPU, and
the daemon asks every 2 s (the rules watch) and every 5 s (the schedules' counters). These
dump requests ask the kernel for the tables, or the counter objects, alone: a fraction of a
millisecond, whatever the maps hold.

The wire format (``linux/netfilter/nf_tables.h``; the message layout as in
:mod:`nfqlb.io.netlink`)::

    request  = nlmsghdr(type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GET..., flags =
               REQUEST | DUMP) + nfgenmsg(family = NFPROTO_IPV4 / _IPV6, version 0, res_id 0)
    GETTABLE -> one message per table: NFTA_TABLE_NAME (string), NFTA_TABLE_HANDLE (be64)
    GETOBJ   <- NFTA_OBJ_TABLE (string), NFTA_OBJ_TYPE (be32 NFT_OBJECT_COUNTER): the filter
             -> one message per object: NFTA_OBJ_NAME, NFTA_OBJ_DATA (nested:
                NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS, be64 each)
    the dump ends with NLMSG_DONE; NLMSG_ERROR carries a negative errno
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from typing import Final

from nfqlb.io.netlink import (
    NETLINK_NETFILTER,
    NLATTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    build_attr,
)

NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NFNL_SUBSYS_NFTABLES: Final = 10
NFT_MSG_GETTABLE: Final = 1
NFT_MSG_GETOBJ: Final = 19
NFTA_TABLE_NAME: Final = 1
NFTA_TABLE_HANDLE: Final = 4
NFTA_OBJ_TABLE: Final = 1
NFTA_OBJ_NAME: Final = 2
NFTA_OBJ_TYPE: Final = 3
NFTA_OBJ_DATA: Final = 4
NFT_OBJECT_COUNTER: Final = 1
NFTA_COUNTER_PACKETS: Final = 2
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10  # nft's families ip and ip6
NFPROTO: Final = {4: NFPROTO_IPV4, 6: NFPROTO_IPV6}
NFGEN: Final = struct.Struct("=BBH")  # family, version, res_id (0: no byte order to mind)
BE32: Final = struct.Struct("!I")
BE64: Final = struct.Struct("!Q")
RECV_SIZE: Final = 1 << 16
TIMEOUT_S: Final = 5.0
_seq = itertools.count(1)


class NftError(OSError):
    """The kernel refused a dump (an errno), or no nf_tables netlink socket could be had."""


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    while start + NLATTR.size <= end:
        n, atype = NLATTR.unpack_from(buf, start)
        if n < NLATTR.size:
            return
        yield atype & 0x3FFF, buf[start + NLATTR.size:start + n]
        start += (n + 3) & ~3


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


def _dump(version: int, msg: int, attrs: bytes = b"") -> Iterator[bytes]:
    """The attributes of each message of a GET dump of ``msg`` in IP ``version``'s family."""
    seq = next(_seq)
    body = NFGEN.pack(NFPROTO[version], 0, 0) + attrs
    request = NLMSGHDR.pack(NLMSGHDR.size + len(body), NFNL_SUBSYS_NFTABLES << 8 | msg,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise NftError(exc.errno or errno.EIO, f"netlink: {exc.strerror or exc}") from None
    with sock:
        sock.settimeout(TIMEOUT_S)
        sock.bind((0, 0))
        sock.sendto(request, (0, 0))
        while True:
            buf = sock.recv(RECV_SIZE)
            at = 0
            while at + NLMSGHDR.size <= len(buf):
                n, mtype, _flags, mseq, _port = NLMSGHDR.unpack_from(buf, at)
                if n < NLMSGHDR.size:
                    break
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return
                    if mtype == NLMSG_ERROR:
                        code = -NLMSGERR.unpack_from(buf, at + NLMSGHDR.size)[0]
                        if code:
                            raise NftError(code, os.strerror(code))
                        return
                    yield buf[at + NLMSGHDR.size + NFGEN.size:at + n]
                at += (n + 3) & ~3


def tables(version: int) -> dict[str, int]:
    """The nftables tables of IP ``version``'s family (``ip``, ``ip6``) by name, with their
    handles (a table deleted and made again has a new one)."""
    out = {}
    for msg in _dump(version, NFT_MSG_GETTABLE):
        found = dict(_attrs(msg, 0, len(msg)))
        if NFTA_TABLE_NAME in found and len(found.get(NFTA_TABLE_HANDLE, b"")) == 8:
            out[_text(found[NFTA_TABLE_NAME])] = BE64.unpack(found[NFTA_TABLE_HANDLE])[0]
    return out


def counters(version: int, table: str) -> dict[str, int]:
    """Packets of each named counter of the table ``table`` of IP ``version``'s family
    ({} when there is no such table)."""
    attrs = (build_attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
             + build_attr(NFTA_OBJ_TYPE, BE32.pack(NFT_OBJECT_COUNTER)))
    out = {}
    try:
        for msg in _dump(version, NFT_MSG_GETOBJ, attrs):
            found = dict(_attrs(msg, 0, len(msg)))
            if NFTA_OBJ_NAME not in found or NFTA_OBJ_DATA not in found:
                continue
            if _text(found.get(NFTA_OBJ_TABLE, b"")) != table:
                continue  # (a kernel that ignored the filter)
            data = found[NFTA_OBJ_DATA]
            packets = dict(_attrs(data, 0, len(data))).get(NFTA_COUNTER_PACKETS, b"")
            if len(packets) == 8:
                out[_text(found[NFTA_OBJ_NAME])] = BE64.unpack(packets)[0]
    except NftError as exc:
        if exc.errno == errno.ENOENT:
            return {}
        raise
    return out
