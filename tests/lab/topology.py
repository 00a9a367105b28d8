"""``Lab``: builds the topology drawn in the package docstring, starts the servers, runs
commands and probes (curl, UDP, ping, counters, logs) in the namespaces, and builds nfqlb
services and daemons for it. ``with Lab(...)`` always tears everything down.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .daemon import Nfqlb, render_config
from .netns import (
    CLIENT_ADDR,
    CLIENT_ADDR6,
    LB_BACKEND_ADDR,
    LB_BACKEND_ADDR6,
    LB_CLIENT_ADDR,
    LB_CLIENT_ADDR6,
    MAX_BACKENDS,
    NS_PREFIX,
    VIP,
    VIP6,
    VIP6_NET,
    VIP_NET,
    Host,
    LabError,
    clean_env,
    cleanup_stale_namespaces,
    delete_netns,
    host_cmd,
    kernel_has_ipv6,
    terminate,
)
from .servers import (
    HTTP_PORT,
    NGINX_CONF,
    PING,
    UDP_CLIENT,
    UDP_PORT,
    UDP_SERVER,
    Reply,
    blob_bytes,
)

SNAT_PORTS = "20000-29999"
WORKERS_ENV = "NFQLB_LAB_WORKERS"

_counter = itertools.count(1)


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
            terminate(proc)
        for ns in reversed(self._namespaces):
            delete_netns(ns)
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
            conf.write_text(NGINX_CONF.format(dir=h.dir, port=HTTP_PORT, listen6=listen6))
            self.spawn(h, ["nginx", "-q", "-e", str(h.dir / "nginx-error.log"),
                           "-p", str(h.dir), "-c", str(conf)], log=h.dir / "nginx.out")
            waits.append((h, h.dir / "nginx.pid", "nginx"))
            script = self.dir / "udp_server.py"
            if not script.exists():
                script.write_text(UDP_SERVER)
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
                                    env=clean_env(), cwd=cwd)
        self._procs.append((host.ns, proc))
        return proc

    # -- probes -------------------------------------------------------------------------------

    def curl(self, host: Host, url: str, *, max_time: float = 5.0,
             output: Path | None = None, args: Sequence[str] = ()) -> bytes:
        """GET ``url`` with the real curl from ``host``; the body, or LabError on any failure.

        ``args`` go before the URL (``["-6"]``, ...); IPv6 literals in brackets need nothing
        (globbing is off).
        """
        # (-v: curl 7.88 says only "Couldn't connect to server" unless verbose; the reason
        # the kernel gave, refused or unreachable, is in its "* " lines)
        argv = ["curl", "-sSv", "--fail", "--globoff", "--noproxy", "*", "--connect-timeout",
                str(min(3.0, max_time)), "--max-time", str(max_time), *args]
        if output is not None:
            argv += ["-o", str(output)]
        proc = self.exec(host, [*argv, url], timeout=max_time + 5, check=False)
        if proc.returncode != 0:
            said = [line for line in proc.stderr.decode(errors="replace").splitlines()
                    if line.startswith("curl: ") or line.startswith("* ")
                    and ("failed" in line or "Failed" in line or "Connection" in line)]
            raise LabError(f"curl {url} from {host.label} failed (exit {proc.returncode}): "
                           + " / ".join(dict.fromkeys(said)))
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
        proc = self.exec(host, [sys.executable, "-c", UDP_CLIENT, json.dumps(args)],
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
        proc = self.exec(host, [sys.executable, "-c", PING, json.dumps(args)],
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

    def set_unhealthy(self, host: Host, unhealthy: bool) -> None:
        """Make ``host``'s nginx answer ``/health`` with 503 (or 200 again); ``/`` is
        unchanged."""
        flag = host.dir / "www" / "unhealthy"
        if unhealthy:
            flag.write_text("")
            flag.chmod(0o644)
        else:
            flag.unlink(missing_ok=True)

    def refuse_http(self, host: Host, refuse: bool) -> None:
        """Make ``host`` answer every TCP packet to the HTTP port with a RST, as a host whose
        server stopped does (or stop doing so): a dead server, for health checks."""
        op = "-I" if refuse else "-D"
        for tool in ("iptables", "ip6tables") if self.ipv6 else ("iptables",):
            self.exec(host, [tool, op, "INPUT", "-p", "tcp", "--dport", str(HTTP_PORT), "-j",
                             "REJECT", "--reject-with", "tcp-reset"])

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
        ``$NFQLB_LAB_WORKERS`` (e.g. 2) sets ``workers`` where the test does not: the whole
        suite then runs with several workers (CI does this for a representative set).
        """
        ecmp = (daemon or {}).get("ecmp", False)  # behind ECMP: nfqlb's own default (false)
        settings = {"queue": queue, **({} if ecmp else {"bypass": True}), **(daemon or {})}
        workers = os.environ.get(WORKERS_ENV)
        if workers and "workers" not in settings:
            settings["workers"] = int(workers)
        text = render_config(list(services), settings)
        d = Nfqlb(self, text, queue=queue, args=args)
        self._daemons.append(d)
        return d
