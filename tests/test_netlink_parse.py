"""parse_packet's walk past the head it reads by index (attributes beyond its first bytes)."""

from __future__ import annotations

import struct

from nfqlb.io import netlink


def _message(attrs: bytes) -> bytes:
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 9, attrs)


def test_attributes_past_the_head_are_read_from_the_whole_message() -> None:
    # a long attribute first (300 bytes of an unknown type): the packet header, the skb info,
    # the cap_len and the payload all start past the first _HEAD_MAX bytes
    attrs = (netlink.build_attr(9, bytes(300))
             + netlink.build_attr(netlink.NFQA_PACKET_HDR,
                                  struct.pack("!IHB", 0x01020304, 0x800, 0))
             + netlink.build_attr(netlink.NFQA_SKB_INFO, struct.pack("!I", 5))
             + netlink.build_attr(netlink.NFQA_CAP_LEN, struct.pack("!I", 1500))
             + netlink.build_attr(netlink.NFQA_PAYLOAD, b"\x45" + bytes(99)))
    msg = _message(attrs)
    assert len(msg) > netlink._HEAD_MAX + 100
    want = (b"\x01\x02\x03\x04", b"\x45" + bytes(99), 1500, 5)
    for buf in (msg, bytearray(msg), memoryview(msg)):
        assert netlink.parse_packet(buf, 0, len(msg)) == want
    # and inside a larger buffer, after another message
    both = _message(netlink.build_attr(netlink.NFQA_PAYLOAD, b"x")) + msg
    assert netlink.parse_packet(memoryview(both), len(both) - len(msg), len(both)) == want


def test_a_cut_attribute_past_the_head_ends_the_walk() -> None:
    attrs = (netlink.build_attr(9, bytes(300))
             + netlink.build_attr(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", 7, 0x800, 0)))
    msg = _message(attrs)
    last = len(msg) - 1  # where the packet header's 11 bytes end (the message pads them)
    for end in range(last - 11, len(msg) + 1):
        packet_id, payload, cap_len, info = netlink.parse_packet(msg, 0, end)
        assert payload is None and cap_len is None and info == 0
        assert packet_id == (struct.pack("!I", 7) if end >= last else None), end
