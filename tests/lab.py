"""A network-namespace test lab: one client, one balancer and N backends, with real servers.

Used by the end-to-end tests (``tests/test_e2e_root.py``) and by the demo (``demo/run.py``);
this is the only implementation. Needs root, ``ip`` (iproute2), ``nginx`` and ``curl``.

Topology (every address in 198.18.0.0/15, the benchmarking range, and 2001:db8::/32, the
documentation range)::

    client ns                    lb ns                                   backend ns (x N)
    eth0 198.18.0.2/24 ──veth── eth0 198.18.0.1/24
         2001:db8::2/64              2001:db8::1/64
    198.18.100.0/24                br0 198.18.1.1/24 ─┬─ p1 ──veth── eth0 198.18.1.2/24
      via 198.18.0.1                   2001:db8:1::1/64│                  2001:db8:1::2/64
    2001:db8:100::/64                                 ├─ p2 ──veth── eth0 198.18.1.3/24
      via 2001:db8::1                                 │                   2001:db8:1::3/64
                                 lo 198.18.100.1/32   └─ ...         [default via 198.18.1.1
                                    2001:db8:100::1/128                   and 2001:db8:1::1]
                                  (vip_on_lo only)

The client reaches the VIP subnets 198.18.100.0/24 and 2001:db8:100::/64 through the balancer
and has no route to the backends. With ``backend_default_route`` the backends route everything
through the balancer (dnat needs that); without it they know only their own subnets and cannot
answer the client directly (the fullnat proof). The lab sets no forwarding or accept_local
sysctl on the balancer: nfqlb must set what it needs.

IPv6 (``ipv6=True``, the default when the kernel has it) adds the 2001:db8 addresses above,
with duplicate address detection off (``accept_dad=0`` and ``nodad``) so they are usable at
once; the servers listen on both families and ``service(..., family=6)`` builds a service for
the IPv6 VIP ``VIP6``.

Servers, each started as a process inside its namespace:
- nginx on port 8080 (and [::]:8080) in every backend (and in lb with ``lb_servers``): ``/``
  answers with the
  host's label ("backend-1", ..., "lb-local") and ``/blob`` is BLOB_SIZE deterministic bytes;
  the access log records the peer address and port the server saw.
- a UDP server on port 5353 (IPv4 and IPv6 sockets) that answers each datagram with
  ``b"<label>:" + payload`` from the address it was sent to (IP_PKTINFO / IPV6_PKTINFO, as DNS
  servers do) and logs the peer it saw.

``with Lab(...) as lab:`` builds everything and always tears it down: daemons, servers, any
process left in the namespaces, the namespaces and the work directory, also on errors and
KeyboardInterrupt. Namespace names carry the pid (``nfqlb-<pid>-<n>-<role>``), so parallel runs
do not collide, and namespaces left by a dead run are removed when the next lab starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

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
HTTP_PORT = 8080
UDP_PORT = 5353
SNAT_PORTS = "20000-29999"
BLOB_SIZE = 1 << 20
BLOB_SEED = 0x6E66716C  # "nfql"
NS_PREFIX = "nfqlb-"
MAX_BACKENDS = 50

REPO_ROOT = Path(__file__).resolve().parent.parent

_counter = itertools.count(1)


class LabError(RuntimeError):
    """The lab could not be built, a server did not start or a probe failed."""


def blob_bytes() -> bytes:
    """The /blob every server serves: BLOB_SIZE pseudo-random bytes from a fixed seed."""
    return random.Random(BLOB_SEED).randbytes(BLOB_SIZE)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean_env() -> dict[str, str]:
    """The environment for lab commands: no proxy may steer curl out of the namespace."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def host_cmd(argv: Sequence[str], *, timeout: float = 10.0, check: bool = True,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command in the root namespace (only ``ip`` management commands go here)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input,
                              env=_clean_env())
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


def _delete_netns(ns: str) -> None:
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
            _delete_netns(ns)
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


_UDP_SERVER = r'''
import selectors, socket, struct, sys
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
label, port, ready, log, ipv6 = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                 sys.argv[5] == "1")
sel = selectors.DefaultSelector()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
sock.bind(("0.0.0.0", port))
sel.register(sock, selectors.EVENT_READ, 4)
if ipv6:
    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    sock6.bind(("::", port))
    sel.register(sock6, selectors.EVENT_READ, 6)
open(ready, "w").close()
prefix = label.encode() + b":"
with open(log, "a", buffering=1) as out:
    while True:
        for key, _ in sel.select():
            s, family = key.fileobj, key.data
            data, anc, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(20))
            # answer from the address the datagram was sent to, as DNS servers do
            # (IP_PKTINFO: ifindex, spec_dst, addr; IPV6_PKTINFO: addr, ifindex)
            if family == 4:
                cmsg = [(lvl, typ, struct.pack("@i4s4s", 0, d[8:12], bytes(4)))
                        for lvl, typ, d in anc if lvl == socket.IPPROTO_IP and typ == IP_PKTINFO]
            else:
                cmsg = [(lvl, typ, d[:16] + struct.pack("@i", 0))
                        for lvl, typ, d in anc
                        if lvl == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO]
            s.sendmsg([prefix + data], cmsg, 0, peer)
            out.write(f"{peer[0]} {peer[1]} {len(data)}\n")
'''

_UDP_CLIENT = r'''
import json, socket, sys, time
args = json.loads(sys.argv[1])
results = []
sock = None
deadline = time.monotonic() + args["budget"]
for i, payload in enumerate(args["payloads"]):
    if sock is None or args["new_socket_each"]:
        if sock is not None:
            sock.close()
        family = socket.AF_INET6 if ":" in args["dst"] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(args["timeout"])
    data = bytes.fromhex(payload)
    sock.sendto(data, (args["dst"], args["port"]))
    answer = None
    while time.monotonic() < deadline:
        try:
            reply, peer = sock.recvfrom(65535)
        except socket.timeout:
            break
        if reply.endswith(b":" + data):
            answer = {"reply": reply.hex(), "peer": list(peer), "port": sock.getsockname()[1]}
            break
    results.append(answer)
print(json.dumps(results))
'''

_NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
daemon off;
master_process on;
events {{ worker_connections 256; }}
http {{
    log_format lab '$remote_addr $remote_port $request_uri $status $body_bytes_sent';
    access_log {dir}/access.log lab;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 5;
    server {{
        listen {port};{listen6}
        root {dir}/www;
        location = / {{ default_type text/plain; try_files /index.txt =404; }}
    }}
}}
"""


@dataclass(frozen=True)
class Reply:
    """One UDP answer: the text before the colon names the server that answered."""

    label: str
    payload: bytes
    peer: tuple[str, int]  # the address and port it came from
    client_port: int  # the client socket it came back to


class Lab:
    """A client, a balancer and ``backends`` backend namespaces, with servers running."""

    def __init__(self, backends: int = 2, *, backend_default_route: bool = True,
                 vip_on_lo: bool = False, lb_servers: bool = False, servers: bool = True,
                 bridge_nf_call_iptables: bool = False, keep_dir: bool = False,
                 ipv6: bool | None = None) -> None:
        if not 1 <= backends <= MAX_BACKENDS:
            raise ValueError(f"backends must be 1..{MAX_BACKENDS}")
        if ipv6 is None:
            ipv6 = kernel_has_ipv6()
        elif ipv6 and not kernel_has_ipv6():
            raise LabError("Lab(ipv6=True): this kernel has no IPv6 (/proc/sys/net/ipv6)")
        self.ipv6 = ipv6
        self.n_backends = backends
        self.backend_default_route = backend_default_route
        self.vip_on_lo = vip_on_lo
        self.lb_servers = lb_servers
        self.servers = servers
        self.bridge_nf_call_iptables = bridge_nf_call_iptables
        self.keep_dir = keep_dir
        self.id = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
        self.dir.chmod(0o755)  # nginx workers run as nobody and read the web roots
        self.client = self._host("client", "client", CLIENT_ADDR, CLIENT_ADDR6)
        self.lb = self._host("lb", "lb-local", LB_BACKEND_ADDR, LB_BACKEND_ADDR6)
        self.backends = [self._host("backend", f"backend-{i}", f"198.18.1.{i + 1}",
                                    f"2001:db8:1::{i + 1:x}")
                         for i in range(1, backends + 1)]
        self._namespaces: list[str] = []
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._daemons: list[Nfqlb] = []
        self._closed = False

    def _host(self, role: str, label: str, address: str, address6: str) -> Host:
        name = "lb" if role == "lb" else label
        d = self.dir / name
        d.mkdir()
        d.chmod(0o755)
        return Host(role, label, f"{self.id}-{name}", address, d,
                    address6 if self.ipv6 else None)

    @property
    def hosts(self) -> list[Host]:
        return [self.client, self.lb, *self.backends]

    def backend(self, label: str) -> Host:
        for b in self.backends:
            if b.label == label:
                return b
        raise KeyError(label)

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            cleanup_stale_namespaces()
            self._build()
            if self.servers:
                self._start_servers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.print_server_errors()
        self.close()

    def close(self) -> None:
        """Stop daemons and servers, delete the namespaces and the work directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for daemon in reversed(self._daemons):
            daemon.stop(timeout=5.0, quiet=True)
        for _ns, proc in reversed(self._procs):
            _terminate(proc)
        for ns in reversed(self._namespaces):
            _delete_netns(ns)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _build(self) -> None:
        for h in self.hosts:
            host_cmd(["ip", "netns", "add", h.ns])
            self._namespaces.append(h.ns)
            self.ip(h, "link", "set", "lo", "up")
            if self.ipv6:
                # no duplicate address detection: addresses are usable at once (interfaces
                # created from now on take "default")
                for conf in ("all", "default"):
                    self.sysctl(h, f"net.ipv6.conf.{conf}.accept_dad", "0")
        c, lb = self.client, self.lb
        # client <-> lb
        self.ip(c, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", lb.ns)
        self.ip(c, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
        self.ip(lb, "addr", "add", f"{LB_CLIENT_ADDR}/24", "dev", "eth0")
        self.ip(c, "link", "set", "eth0", "up")
        self.ip(lb, "link", "set", "eth0", "up")
        self.ip(c, "route", "add", VIP_NET, "via", LB_CLIENT_ADDR)
        # lb bridge <-> backends
        self.ip(lb, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self.ip(lb, "addr", "add", f"{LB_BACKEND_ADDR}/24", "dev", "br0")
        self.ip(lb, "link", "set", "br0", "up")
        for i, b in enumerate(self.backends, start=1):
            port = f"p{i}"
            self.ip(lb, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", b.ns)
            self.ip(lb, "link", "set", port, "master", "br0")
            self.ip(lb, "link", "set", port, "up")
            self.ip(b, "addr", "add", f"{b.address}/24", "dev", "eth0")
            self.ip(b, "link", "set", "eth0", "up")
            if self.backend_default_route:
                self.ip(b, "route", "add", "default", "via", LB_BACKEND_ADDR)
        if self.vip_on_lo:
            self.ip(lb, "addr", "add", f"{VIP}/32", "dev", "lo")
        if self.ipv6:
            self._build_ipv6()
        # This kernel has br_netfilter built in: bridged frames would cross iptables in the lb
        # namespace. By default the bridge is a plain switch, as on a host without br_netfilter.
        value = "1" if self.bridge_nf_call_iptables else "0"
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables",
                    "bridge-nf-call-arptables"):
            self.exec(lb, ["sh", "-c", f"f=/proc/sys/net/bridge/{key}; "
                                       f"[ ! -e $f ] || echo {value} > $f"])

    def _build_ipv6(self) -> None:
        c, lb = self.client, self.lb
        self.ip(c, "-6", "addr", "add", f"{CLIENT_ADDR6}/64", "dev", "eth0", "nodad")
        self.ip(lb, "-6", "addr", "add", f"{LB_CLIENT_ADDR6}/64", "dev", "eth0", "nodad")
        self.ip(c, "-6", "route", "add", VIP6_NET, "via", LB_CLIENT_ADDR6)
        self.ip(lb, "-6", "addr", "add", f"{LB_BACKEND_ADDR6}/64", "dev", "br0", "nodad")
        for b in self.backends:
            self.ip(b, "-6", "addr", "add", f"{b.address6}/64", "dev", "eth0", "nodad")
            if self.backend_default_route:
                self.ip(b, "-6", "route", "add", "default", "via", LB_BACKEND_ADDR6)
        if self.vip_on_lo:
            self.ip(lb, "-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")

    def _start_servers(self) -> None:
        if shutil.which("nginx") is None:
            raise LabError("nginx is not installed (apt-get install nginx-light)")
        hosts = list(self.backends) + ([self.lb] if self.lb_servers else [])
        blob = blob_bytes()
        waits = []
        for h in hosts:
            www = h.dir / "www"
            (h.dir / "tmp").mkdir()
            www.mkdir()
            www.chmod(0o755)
            (www / "index.txt").write_text(f"{h.label}\n")
            (www / "blob").write_bytes(blob)
            for f in www.iterdir():
                f.chmod(0o644)
            conf = h.dir / "nginx.conf"
            listen6 = f"\n        listen [::]:{HTTP_PORT};" if self.ipv6 else ""
            conf.write_text(_NGINX_CONF.format(dir=h.dir, port=HTTP_PORT, listen6=listen6))
            self.spawn(h, ["nginx", "-q", "-e", str(h.dir / "nginx-error.log"),
                           "-p", str(h.dir), "-c", str(conf)], log=h.dir / "nginx.out")
            waits.append((h, h.dir / "nginx.pid", "nginx"))
            script = self.dir / "udp_server.py"
            if not script.exists():
                script.write_text(_UDP_SERVER)
            self.spawn(h, [sys.executable, str(script), h.label, str(UDP_PORT),
                           str(h.dir / "udp.ready"), str(h.dir / "udp.log"),
                           "1" if self.ipv6 else "0"],
                       log=h.dir / "udp.out")
            waits.append((h, h.dir / "udp.ready", "udp server"))
        deadline = time.monotonic() + 10.0
        for h, path, what in waits:
            while not path.exists():
                if time.monotonic() > deadline:
                    raise LabError(f"{what} in {h.label} did not start:\n"
                                   f"{self.server_errors(h)}")
                time.sleep(0.02)

    # -- commands in namespaces -------------------------------------------------------------

    def ip(self, host: Host, *args: str) -> None:
        host_cmd(["ip", "-n", host.ns, *args])

    def sysctl(self, host: Host, name: str, value: str) -> None:
        """Write sysctl ``name`` (dotted) in ``host``'s namespace."""
        path = "/proc/sys/" + name.replace(".", "/")
        self.exec(host, ["sh", "-c", f"echo {shlex.quote(value)} > {shlex.quote(path)}"])

    def read_sysctl(self, host: Host, name: str) -> str:
        path = "/proc/sys/" + name.replace(".", "/")
        return self.exec(host, ["cat", path]).stdout.decode().strip()

    def exec(self, host: Host, argv: Sequence[str], *, timeout: float = 10.0,
             check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside ``host``'s namespace and wait (at most ``timeout`` seconds)."""
        return host_cmd(["ip", "netns", "exec", host.ns, *argv], timeout=timeout, check=check,
                        input=input)

    def spawn(self, host: Host, argv: Sequence[str], *, log: Path,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``host``'s namespace; the lab stops it on close."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_clean_env(), cwd=cwd)
        self._procs.append((host.ns, proc))
        return proc

    # -- probes -------------------------------------------------------------------------------

    def curl(self, host: Host, url: str, *, max_time: float = 5.0,
             output: Path | None = None, args: Sequence[str] = ()) -> bytes:
        """GET ``url`` with the real curl from ``host``; the body, or LabError on any failure.

        ``args`` go before the URL (``["-6"]``, ...); IPv6 literals in brackets need nothing
        (globbing is off).
        """
        argv = ["curl", "-sS", "--fail", "--globoff", "--noproxy", "*", "--connect-timeout",
                str(min(3.0, max_time)), "--max-time", str(max_time), *args]
        if output is not None:
            argv += ["-o", str(output)]
        proc = self.exec(host, [*argv, url], timeout=max_time + 5, check=False)
        if proc.returncode != 0:
            raise LabError(f"curl {url} from {host.label} failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def udp_exchange(self, host: Host, dst: str, port: int, payloads: Iterable[bytes], *,
                     new_socket_each: bool = False, timeout: float = 2.0) -> list[Reply | None]:
        """Send each payload from ``host`` with a real UDP socket; the reply to each, or None.

        With ``new_socket_each`` every datagram leaves from a fresh socket (a new flow);
        otherwise all come from one socket (one flow). Bounded by ``timeout`` per datagram.
        """
        payloads = list(payloads)
        args = {"dst": dst, "port": port, "payloads": [p.hex() for p in payloads],
                "new_socket_each": new_socket_each, "timeout": timeout,
                "budget": timeout * len(payloads) + 1}
        proc = self.exec(host, [sys.executable, "-c", _UDP_CLIENT, json.dumps(args)],
                         timeout=timeout * len(payloads) + 10)
        replies: list[Reply | None] = []
        for answer in json.loads(proc.stdout):
            if answer is None:
                replies.append(None)
                continue
            label, _, payload = bytes.fromhex(answer["reply"]).partition(b":")
            replies.append(Reply(label.decode(errors="replace"), payload,
                                 (answer["peer"][0], answer["peer"][1]), answer["port"]))
        return replies

    def iptables_save(self, host: Host) -> str:
        """iptables-save and ip6tables-save of ``host``, without comments and counters."""
        text = []
        for tool in ("iptables-save", "ip6tables-save"):
            out = self.exec(host, [tool], check=False).stdout.decode()
            for line in out.splitlines():
                if line.startswith("#"):
                    continue
                text.append(re.sub(r"\[\d+:\d+\]", "[-:-]", line))
        return "\n".join(text)

    def routes(self, host: Host, family: int = 4) -> str:
        return self.exec(host, ["ip", f"-{family}", "route", "show", "table", "all"]
                         ).stdout.decode()

    def ping(self, host: Host, dst: str, *, count: int = 3, timeout: float = 1.0) -> int:
        """Send ``count`` ICMP(v6) echo requests from ``host`` to ``dst`` (raw socket, no ping
        binary needed); the number answered, each waited for at most ``timeout`` seconds."""
        args = {"dst": dst, "count": count, "timeout": timeout}
        proc = self.exec(host, [sys.executable, "-c", _PING, json.dumps(args)],
                         timeout=count * timeout + 10)
        return int(proc.stdout)

    def snmp(self, host: Host) -> dict[str, int]:
        """The kernel's protocol counters in ``host``: ``/proc/net/snmp`` as "Icmp.InDestUnreachs"
        and ``/proc/net/snmp6`` as "Icmp6InPktTooBigs"; a snapshot."""
        out = self.exec(host, ["cat", "/proc/net/snmp", "/proc/net/snmp6"], check=False)
        counters: dict[str, int] = {}
        lines = out.stdout.decode().splitlines()
        for head, values in zip(lines, lines[1:], strict=False):
            h, v = head.split(), values.split()
            if h and v and h[0] == v[0] and h[0].endswith(":") and not h[1].isdigit():
                for name, value in zip(h[1:], v[1:], strict=False):
                    counters[f"{h[0][:-1]}.{name}"] = int(value)
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and not parts[0].endswith(":"):
                counters[parts[0]] = int(parts[1])
        return counters

    def can_route(self, host: Host, dst: str) -> bool:
        return self.exec(host, ["ip", "route", "get", dst], check=False).returncode == 0

    def access_log(self, host: Host) -> list[tuple[str, int, str]]:
        """(peer address, peer port, uri) for each HTTP request ``host``'s nginx served."""
        path = host.dir / "access.log"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                addr, port, uri, *_ = line.split()
                rows.append((addr, int(port), uri))
        return rows

    def udp_log(self, host: Host) -> list[tuple[str, int]]:
        """(peer address, peer port) for each datagram ``host``'s UDP server answered."""
        path = host.dir / "udp.log"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                addr, port, _ = line.split()
                rows.append((addr, int(port)))
        return rows

    def server_errors(self, host: Host) -> str:
        parts = []
        for name in ("nginx-error.log", "nginx.out", "udp.out"):
            p = host.dir / name
            if p.exists() and p.stat().st_size:
                parts.append(f"--- {host.label}: {name}\n{p.read_text(errors='replace')}")
        return "\n".join(parts)

    def print_server_errors(self) -> None:
        text = "\n".join(filter(None, (self.server_errors(h) for h in self.hosts)))
        if text:
            print(text)

    # -- nfqlb ---------------------------------------------------------------------------------

    def service(self, mode: str, *, protocol: str = "tcp", name: str | None = None,
                port: int | None = None, backends: Sequence[Host] | None = None,
                policy: str = "round_robin", family: int = 4, **extra: Any) -> dict[str, Any]:
        """A [[service]] table for the VIP that sends to this lab's servers.

        tcp goes from VIP:80 to port 8080 (nginx), udp from VIP:5353 to port 5353. In local
        mode the one backend is this host's port 8080 (the lb's own servers). ``family=6``
        uses VIP6, the backends' IPv6 addresses and LB_BACKEND_ADDR6 as the fullnat source.
        ``extra`` is copied in (for example ``snat_ports``).
        """
        if family not in (4, 6):
            raise ValueError("family must be 4 or 6")
        if family == 6 and not self.ipv6:
            raise LabError("an IPv6 service needs Lab(ipv6=True)")
        backend_port = HTTP_PORT if protocol == "tcp" else UDP_PORT
        svc: dict[str, Any] = {
            "name": name or f"{protocol}-{mode}" + ("-v6" if family == 6 else ""),
            "vip": VIP if family == 4 else VIP6,
            "port": port or (80 if protocol == "tcp" else UDP_PORT),
            "protocol": protocol,
            "mode": mode,
            "policy": policy,
        }
        if mode == "fullnat":
            svc["snat_address"] = LB_BACKEND_ADDR if family == 4 else LB_BACKEND_ADDR6
            svc["snat_ports"] = SNAT_PORTS
        svc.update(extra)
        if mode == "local":
            svc["backend"] = [{"port": backend_port}]
        else:
            chosen = self.backends if backends is None else backends
            svc["backend"] = [{"address": b.addr(family), "port": backend_port}
                              for b in chosen]
        return svc

    def nfqlb(self, *services: dict[str, Any], queue: int = 1,
              daemon: dict[str, Any] | None = None, args: Sequence[str] = ()) -> Nfqlb:
        """An nfqlb daemon for the lb namespace (not started: use ``with`` or ``start()``).

        ``args`` are added to ``nfqlb run`` (for example ``["--stats-interval", "0.5"]``).
        """
        text = render_config(list(services), {"queue": queue, "bypass": True, **(daemon or {})})
        d = Nfqlb(self, text, queue=queue, args=args)
        self._daemons.append(d)
        return d


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything a lab config holds
    raise TypeError(f"cannot render {value!r} as TOML")


def render_config(services: list[dict[str, Any]], daemon: dict[str, Any]) -> str:
    """The nfqlb TOML for ``daemon`` keys and ``services`` (each with a "backend" list)."""
    lines = ["[daemon]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in daemon.items()]
    for svc in services:
        lines += ["", "[[service]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in svc.items() if k != "backend"]
        for b in svc.get("backend", []):
            lines += ["  [[service.backend]]"]
            lines += [f"  {k} = {_toml_value(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


class Nfqlb:
    """``python -m nfqlb run --config F`` inside the lab's lb namespace.

    ``start()`` returns once nfqlb's chain shows in ``iptables -t raw -S`` (or raises with the
    daemon's output); ``stop()`` sends SIGTERM and waits, then SIGKILL. Output goes to files in
    the lab directory; ``output`` holds it after the stop.
    """

    def __init__(self, lab: Lab, config_text: str, *, queue: int = 1,
                 args: Sequence[str] = ()) -> None:
        self.lab = lab
        self.queue = queue
        self.args = list(args)
        n = len(lab._daemons) + 1
        self.config_path = lab.dir / f"nfqlb-{n}.toml"
        self.config_path.write_text(config_text)
        self.stdout_path = lab.dir / f"nfqlb-{n}.stdout"
        self.stderr_path = lab.dir / f"nfqlb-{n}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.stdout = ""
        self.stderr = ""

    @property
    def argv(self) -> list[str]:
        """``python -m nfqlb run --config F``; NFQLB_COMMAND (e.g. "nfqlb") replaces the
        ``python -m nfqlb`` part, to test an installed build."""
        command = shlex.split(os.environ.get("NFQLB_COMMAND", "")) or [
            sys.executable, "-m", "nfqlb"]
        return [*command, "run", "--config", str(self.config_path), *self.args]

    def chain_installed(self) -> bool:
        """nfqlb's chain is in the raw table of iptables or (IPv6-only configs) ip6tables."""
        chain = f"NFQLB-PRE-{self.queue}".encode()
        for tool in ("iptables", "ip6tables"):
            out = self.lab.exec(self.lab.lb, [tool, "-t", "raw", "-S"], check=False).stdout
            if chain in out:
                return True
        return False

    def start(self, timeout: float = 10.0) -> Nfqlb:
        if self.proc is not None:
            raise LabError("nfqlb already started")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd = the repository, so `-m nfqlb` finds the package even when not installed
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.lb.ns, *self.argv], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=_clean_env(), cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while not self.chain_installed():
            if self.proc.poll() is not None:
                self._collect()
                raise LabError(f"nfqlb exited with {self.returncode} before installing its "
                               f"rules\n{self.report()}")
            if time.monotonic() > deadline:
                self.stop(quiet=True)
                raise LabError(f"nfqlb did not install NFQLB-PRE-{self.queue} within "
                               f"{timeout}s\n{self.report()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0, *, quiet: bool = False) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL if needed; the exit code (-9 if killed)."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                if not quiet:
                    print(f"nfqlb ignored SIGTERM for {timeout}s and was killed")
        self._collect()
        return self.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the running daemon (SIGUSR1: print the counters to stdout)."""
        if not self.running:
            raise LabError(f"nfqlb is not running\n{self.report()}")
        assert self.proc is not None
        self.proc.send_signal(sig)

    def output_so_far(self) -> str:
        """stdout as written up to now (the counters printed on SIGUSR1 / --stats-interval)."""
        if self.proc is not None and self.returncode is None:
            return self.stdout_path.read_text(errors="replace")
        return self.stdout

    def stats(self) -> list[dict[str, int]]:
        """Every counters block printed so far, parsed: "flows" / "active" from
        ``flows N total, M active`` and each ``events:`` and ``drops:`` counter by name."""
        return parse_stats(self.output_so_far())

    def _collect(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.wait()
        self.stdout = self.stdout_path.read_text(errors="replace")
        self.stderr = self.stderr_path.read_text(errors="replace")

    def report(self) -> str:
        """Config, exit code and output, for failure messages."""
        if self.proc is not None and self.returncode is None:
            out = self.stdout_path.read_text(errors="replace")
            err = self.stderr_path.read_text(errors="replace")
        else:
            out, err = self.stdout, self.stderr
        return (f"--- nfqlb config {self.config_path.name}\n{self.config_path.read_text()}"
                f"--- nfqlb exit code: {self.returncode}\n"
                f"--- nfqlb stdout\n{out}--- nfqlb stderr\n{err}")

    def __enter__(self) -> Nfqlb:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(quiet=True)
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            print(self.report())


def parse_stats(text: str) -> list[dict[str, int]]:
    """The counter blocks nfqlb printed (each opens with its ``packets ...`` line), parsed.

    Each block maps "packets", "rewritten", "flows" (total), "active", and every name of the
    ``events:`` and ``drops:`` lines (``evicted``, ``icmp_error_translated``, ...) to its
    count.
    """
    blocks: list[dict[str, int]] = []
    for line in text.splitlines():
        m = re.match(r"packets (\d+)\s+rewritten (\d+)", line)
        if m:
            blocks.append({"packets": int(m.group(1)), "rewritten": int(m.group(2))})
            continue
        if not blocks:
            continue
        m = re.match(r"flows (\d+) total, (\d+) active", line)
        if m:
            blocks[-1]["flows"] = int(m.group(1))
            blocks[-1]["active"] = int(m.group(2))
        elif line.startswith(("events: ", "drops: ")):
            for item in line.split(": ", 1)[1].split(", "):
                name, _, count = item.rpartition(" ")
                if count.isdigit():
                    blocks[-1][name] = int(count)
    return blocks


_PING = r'''
import json, os, socket, struct, sys, time
args = json.loads(sys.argv[1])
v6 = ":" in args["dst"]
if v6:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    request, reply = 128, 129  # the kernel computes ICMPv6 checksums of raw sockets
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    request, reply = 8, 0

def checksum(b):
    b += bytes(len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

ident = os.getpid() & 0xFFFF
answered = 0
for seq in range(1, args["count"] + 1):
    payload = b"nfqlb-lab-ping" + bytes([seq])
    msg = struct.pack("!BBHHH", request, 0, 0, ident, seq) + payload
    if not v6:
        msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    sock.sendto(msg, (args["dst"], 0))
    deadline = time.monotonic() + args["timeout"]
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            break
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        if len(icmp) >= 8 and icmp[0] == reply and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            answered += 1
            break
print(answered)
'''


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
