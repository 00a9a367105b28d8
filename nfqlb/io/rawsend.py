"""Sending nfqlb's own packets: the RSTs the engine builds to end flows it gives up.

``Engine.packets_to_send()`` hands out whole IP packets (headers and checksums done); they go
out on raw sockets (``SOCK_RAW``, ``IPPROTO_RAW``: the header is ours, IPv4 and IPv6 alike
since Linux 4.5), routed by their destination. A RST carries the address of the side it
stands for (the VIP toward the client, the client or the snat address toward the backend);
raw sockets may send from an address that is not local. Locally sent packets cross raw
OUTPUT, where nfqlb's rules match only packets to a VIP and replies of local backends, so
these are not queued again. A failure costs that packet only: counted and logged at a rate
limit.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time

from nfqlb.ratelog import RateLimitedLog


class RawSender:
    def __init__(self, log: logging.Logger) -> None:
        self._sockets: dict[int, socket.socket] = {}
        self._ratelog = RateLimitedLog(log)
        self.sent = 0
        self.errors = 0

    def send(self, packet: bytes) -> bool:
        version = packet[0] >> 4 if packet else 0
        try:
            sock = self._sockets.get(version)
            if sock is None:
                family = socket.AF_INET6 if version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                self._sockets[version] = sock
            if version == 6:
                sock.sendto(packet, (str(ipaddress.IPv6Address(packet[24:40])), 0, 0, 0))
            else:
                sock.sendto(packet, (str(ipaddress.IPv4Address(packet[16:20])), 0))
        except (OSError, ValueError) as exc:
            self.errors += 1
            self._ratelog.error("rawsend", time.monotonic(), "could not send a packet of "
                                "nfqlb's own (%d so far): %s", self.errors, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
