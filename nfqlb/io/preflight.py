"""``nfqlb run``'s checks of the configuration against this host, before anything is touched.

``check`` validates a configuration without the host; some of it can only be true of the
host that runs it. Each address below must be one of this host's own (in its network
namespace), or traffic silently dies:

- a fullnat ``snat_address``: the backends answer it, and its replies must come back here
  (nfqlb's rules match them by that destination);
- a local-mode VIP: the packets are delivered to a process on this host;
- a local-mode backend's ``address``: the same, when one is named.

"Local" is what the kernel says: binding a socket to the address succeeds for an address
assigned to an interface or covered by a ``local`` route (AnyIP), and fails with
EADDRNOTAVAIL otherwise. With ``ip_nonlocal_bind`` (or an IPv6 address still in duplicate
address detection) that test is not enough, so the route lookup ``ip route get`` decides:
its first word is ``local`` for an address of this host.
"""

from __future__ import annotations

import errno
import ipaddress
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from nfqlb.config import Config
from nfqlb.errors import SystemSetupError
from nfqlb.values import IPAddress, Mode

PROC_SYS = Path("/proc/sys")


def required_local(config: Config) -> Iterator[tuple[str, IPAddress, str]]:
    """(key, address, why) for each address ``config`` needs to be this host's own."""
    for i, s in enumerate(config.services):
        if s.mode in (Mode.FULLNAT, Mode.OFFLOAD) and s.snat_address is not None:
            yield (f"service[{i}].snat_address", s.snat_address,
                   "the backends answer it, so it must be an address of this host that they "
                   "reach")
        if s.mode is Mode.LOCAL:
            yield (f"service[{i}].vip", s.vip, "local mode delivers to this host, so the VIP "
                   "must be one of its addresses (add it, e.g. on lo)")
            for j, b in enumerate(s.backends):
                if b.address is not None:
                    yield (f"service[{i}].backend[{j}].address", b.address,
                           "a local backend is a process on this host")


def _nonlocal_bind(version: int) -> bool:
    name = "ipv4/ip_nonlocal_bind" if version == 4 else "ipv6/ip_nonlocal_bind"
    try:
        return (PROC_SYS / "net" / name).read_text().strip() not in ("", "0")
    except OSError:
        return False


def _bind_says_local(address: IPAddress) -> bool | None:
    """True/False when binding a socket to ``address`` tells; None when it cannot."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return False
        return None
    return True


def _route_says_local(address: IPAddress) -> bool | None:
    """Whether ``ip route get`` names ``address`` a local one; None without ``ip``."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        proc = subprocess.run([ip, f"-{address.version}", "-o", "route", "get", str(address)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return False  # no route at all: certainly not one of ours
    words = proc.stdout.split()
    return bool(words) and words[0] == "local"


def is_local(address: IPAddress) -> bool | None:
    """Whether ``address`` is one of this host's (None: it could not be told)."""
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        return None  # needs a scope (interface) that the configuration does not give
    answer = _bind_says_local(address)
    if answer is False or (answer is True and _nonlocal_bind(address.version)):
        # a failed bind may be an IPv6 address not yet past DAD; a bind that succeeds
        # proves nothing under ip_nonlocal_bind: ask the routing table
        route = _route_says_local(address)
        return answer if route is None else route
    return answer


def check_addresses(config: Config) -> None:
    """Raise SystemSetupError (one line) for the first address ``config`` needs to be local
    that is not an address of this host."""
    for key, address, why in required_local(config):
        if is_local(address) is False:
            raise SystemSetupError(f"{config.source}: {key}: {address} is not an address of "
                                   f"this host: {why}")
