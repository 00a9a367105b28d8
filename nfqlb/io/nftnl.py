"""nf_tables over netlink, without running ``nft``: the tables of a family with their
handles, a table's named counters (reads), and a verdict map's elements replaced in one
transaction (offload's kernel schedules).

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

    a map's elements, replaced: one batch (NFNL_MSG_BATCH_BEGIN ... END, res_id =
    NFNL_SUBSYS_NFTABLES), which the kernel applies whole or not at all:
    DELSETELEM   NFTA_SET_ELEM_LIST_TABLE, _SET and no _ELEMENTS: the map flushed
    NEWSETELEM   ... _ELEMENTS (nested) = NFTA_LIST_ELEM (nested) each:
                 NFTA_SET_ELEM_KEY {NFTA_DATA_VALUE: the slot, u32 in host order, as numgen
                 and jhash leave it in their register}, NFTA_SET_ELEM_DATA {NFTA_DATA_VERDICT
                 {NFTA_VERDICT_CODE be32 NFT_GOTO, NFTA_VERDICT_CHAIN}}; a few hundred
                 elements a message
    errors come back as NLMSG_ERROR, queued before ``send`` returns (the batch is processed
    in the sending call): none is success
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Final

from nfqlb.io.netlink import (
    NETLINK_NETFILTER,
    NLATTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    _set_buffer,
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
NFGEN: Final = struct.Struct("!BBH")  # family, version, res_id (a batch's: the subsystem)
BE32: Final = struct.Struct("!I")
BE64: Final = struct.Struct("!Q")
U32: Final = struct.Struct("=I")
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_CREATE: Final = 0x400
NLA_F_NESTED: Final = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM: Final = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFT_GOTO: Final = 0xFFFFFFFC  # -4 as be32
ELEMENTS_PER_MESSAGE: Final = 400  # (some 30 KB a message)
SNDBUF: Final = 4 << 20
SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h: beyond wmem_max (CAP_NET_ADMIN)
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


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = NFGEN.pack(family, 0, res_id) + attrs
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def map_batch(version: int, table: str, name: str, elements: Sequence[tuple[int, str]]) -> bytes:
    """The transaction that makes the verdict map ``name`` of ``table`` hold ``elements``
    (slot, chain to go to) and nothing else."""
    family = NFPROTO[version]
    where = (build_attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
             + build_attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
    seq = next(_seq)
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b""),
             _message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM, NLM_F_REQUEST, seq, family,
                      0, where)]
    goto = {chain: build_attr(NFTA_SET_ELEM_DATA | NLA_F_NESTED, build_attr(
        NFTA_DATA_VERDICT | NLA_F_NESTED, build_attr(NFTA_VERDICT_CODE, BE32.pack(NFT_GOTO))
        + build_attr(NFTA_VERDICT_CHAIN, chain.encode() + b"\0")))
        for chain in {chain for _slot, chain in elements}}
    for i in range(0, len(elements), ELEMENTS_PER_MESSAGE):
        listed = b"".join(build_attr(NFTA_LIST_ELEM | NLA_F_NESTED, build_attr(
            NFTA_SET_ELEM_KEY | NLA_F_NESTED, build_attr(NFTA_DATA_VALUE, U32.pack(slot)))
            + goto[chain]) for slot, chain in elements[i:i + ELEMENTS_PER_MESSAGE])
        parts.append(_message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM,
                              NLM_F_REQUEST | NLM_F_CREATE, seq, family, 0,
                              where + build_attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                                                 listed)))
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(parts)


def write_map(version: int, table: str, name: str, elements: Sequence[tuple[int, str]]) -> None:
    """Replace the elements of a verdict map in one transaction; NftError when the kernel
    refused it (no such table or map, a chain that is not there, ...): the map as it was."""
    batch = map_batch(version, table, name, elements)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise NftError(exc.errno or errno.EIO, f"netlink: {exc.strerror or exc}") from None
    with sock:
        # (the whole batch goes in one sendmsg, which netlink refuses beyond the send
        # buffer: net.core.wmem_max is 208 KiB on many hosts, about 2,600 elements)
        _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, max(SNDBUF, 2 * len(batch)))
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT_S)
        sock.send(batch)
        sock.setblocking(False)
        first = 0
        while True:
            try:
                answer = sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            at = 0
            while at + NLMSGHDR.size + 4 <= len(answer):
                n, mtype = NLMSGHDR.unpack_from(answer, at)[:2]
                if mtype == NLMSG_ERROR:
                    first = first or -NLMSGERR.unpack_from(answer, at + NLMSGHDR.size)[0]
                at += max((n + 3) & ~3, NLMSGHDR.size)
        if first:
            raise NftError(first, f"{name}: {os.strerror(first)}")
