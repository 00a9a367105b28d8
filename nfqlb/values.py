"""Value types that cross module lines: addresses, backends, protocols, modes.

The configuration builds them, the policies choose among them and the core carries them; all
of those import this module, and it imports nothing of theirs (only the protocol numbers of
``wire.ip``, the lowest layer), so imports point one way.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from nfqlb.wire import ip

__all__ = ["Backend", "IPAddress", "Mode", "Protocol"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Protocol(enum.IntEnum):
    """The transport protocols a service balances (IANA numbers, as in the IP header)."""

    TCP = ip.TCP
    UDP = ip.UDP


class Mode(enum.Enum):
    """How a service reaches its backends (see DESIGN.md, "Modes")."""

    LOCAL = "local"
    DNAT = "dnat"
    FULLNAT = "fullnat"
    OFFLOAD = "offload"  # Python decides the first packet, the kernel's conntrack NAT the rest


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    address: IPAddress | None  # None only in local mode: keep the destination address
    port: int
    weight: int = 1
