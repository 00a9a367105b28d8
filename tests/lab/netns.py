"""Namespaces and processes of the lab: the topology's addresses, commands run from the root
namespace (``ip`` only), namespace clean-up (also of runs killed before teardown), ``Host``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLIENT_ADDR = "198.18.0.2"
LB_CLIENT_ADDR = "198.18.0.1"  # the balancer on the client side
LB_BACKEND_ADDR = "198.18.1.1"  # the balancer on the backend bridge (the fullnat source)
VIP = "198.18.100.1"
VIP_NET = "198.18.100.0/24"
CLIENT_NET = "198.18.0.0/24"
BACKEND_NET = "198.18.1.0/24"
CLIENT_ADDR6 = "2001:db8::2"
LB_CLIENT_ADDR6 = "2001:db8::1"
LB_BACKEND_ADDR6 = "2001:db8:1::1"  # the fullnat source for IPv6 services
VIP6 = "2001:db8:100::1"
VIP6_NET = "2001:db8:100::/64"
CLIENT_NET6 = "2001:db8::/64"
BACKEND_NET6 = "2001:db8:1::/64"
NS_PREFIX = "nfqlb-"
MAX_BACKENDS = 50


class LabError(RuntimeError):
    """The lab could not be built, a server did not start or a probe failed."""


def clean_env() -> dict[str, str]:
    """The environment for lab commands: no proxy may steer curl out of the namespace."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def host_cmd(argv: Sequence[str], *, timeout: float = 10.0, check: bool = True,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command in the root namespace (only ``ip`` management commands go here)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input,
                              env=clean_env())
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"exit {proc.returncode}: {' '.join(argv)}\n"
                       f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


def can_use_netns() -> str | None:
    """None when the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, iptables)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        host_cmd(["ip", "netns", "add", probe], timeout=5)
    except LabError as exc:
        return f"`ip netns add` does not work here: {exc}"
    host_cmd(["ip", "netns", "del", probe], timeout=5, check=False)
    return None


def kernel_has_ipv6() -> bool:
    return Path("/proc/sys/net/ipv6").is_dir()


def url_host(address: str) -> str:
    """``address`` as the host part of a URL: IPv6 literals in brackets."""
    return f"[{address}]" if ":" in address else address


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_netns() -> list[str]:
    out = host_cmd(["ip", "netns", "list"], check=False).stdout.decode()
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(ns: str) -> None:
    """Kill whatever still runs inside ``ns`` (processes the lab started there), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = host_cmd(["ip", "netns", "pids", ns], check=False).stdout.decode()
        pids = [int(p) for p in out.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
    host_cmd(["ip", "netns", "del", ns], check=False)


def cleanup_stale_namespaces() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run killed before teardown)."""
    removed = []
    for ns in _list_netns():
        m = re.match(rf"^{re.escape(NS_PREFIX)}(\d+)-", ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            delete_netns(ns)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class Host:
    role: str  # "client" | "lb" | "backend"
    label: str  # "client", "lb", "backend-1", ...; what the host's servers answer with
    ns: str
    address: str  # the host's address facing the lab (lb: the backend side)
    dir: Path  # the host's server files: configs, logs, pid files, web root
    address6: str | None = None  # its IPv6 address facing the lab (None: lab without IPv6)

    def addr(self, family: int = 4) -> str:
        """The host's address of ``family`` (4 or 6)."""
        if family == 4:
            return self.address
        if self.address6 is None:
            raise LabError(f"{self.label} has no IPv6 address (Lab(ipv6=False))")
        return self.address6


def terminate(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
