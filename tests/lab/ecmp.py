"""``EcmpLab``: several nfqlb nodes behind a router that spreads flows over them by ECMP, the
VIP announced over BGP (issue 11's proof).

::

    client 198.18.10.2
       |  198.18.10.0/24
    router 198.18.10.1 / 198.18.11.1 / 198.18.12.1     BIRD 2, AS 65000, merge paths (ECMP)
       |  198.18.11.0/24 (bridge)          |  198.18.12.0/24 (bridge)
    node-1 .11, node-2 .12, ...           backend-1 .11, backend-2 .12, ... (TCP echo servers)
    (nfqlb dnat + ExaBGP, AS 65001)

Each node runs nfqlb (dnat, the VIP's service) and ExaBGP, whose ``healthcheck`` process runs
``nfqlb health --service echo`` every second and announces two prefixes with next hop self
while it passes, withdraws them when it fails:

- the VIP (/32): the router's route to the VIP is the multipath route of the nodes that
  announce it, so the client's flows are spread over them by their addresses and ports
  (``fib_multipath_hash_policy = 1``);
- the client network: a backend's reply goes to its default gateway, the router, which sends
  it to a node by the same kind of multipath route (in production: a default route in the
  backends' routing domain). Packets from the nodes' side use a table of their own (an
  ``ip rule`` on the node bridge) where the client network is directly connected, so that
  the rewritten replies leave for the client.

A flow's two directions are hashed independently, so about half of the flows cross: the
reply reaches a node that did not see the SYN, which adopts it (``unknown_flow = "hash"``)
on the backend that the service's policy gives the flow on every node.

The client (``HOLD_CLIENT``) holds many long-lived connections and sends one line on each
every ``interval`` seconds; it writes what it saw to a JSON file once a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .daemon import REPO_ROOT, render_config
from .netns import (
    NS_PREFIX,
    LabError,
    clean_env,
    cleanup_stale_namespaces,
    delete_netns,
    host_cmd,
    terminate,
)
from .topology import WORKERS_ENV

VIP = "198.18.200.1"
PORT = 7000
CLIENT_ADDR = "198.18.10.2"
CLIENT_NET = "198.18.10.0/24"
ROUTER_CLIENT = "198.18.10.1"
ROUTER_NODES = "198.18.11.1"
ROUTER_BACKENDS = "198.18.12.1"
ROUTER_AS = 65000
NODE_AS = 65001
SERVICE = "echo"
HEALTH = os.environ.get("NFQLB_ECMP_HEALTH", f"health --service {SERVICE}").split()
REPLY_TABLE = 100  # the router's table for packets from the nodes: the client network direct


def node_addr(i: int) -> str:
    return f"198.18.11.{10 + i}"


def backend_addr(i: int) -> str:
    return f"198.18.12.{10 + i}"


ECHO_SERVER = r'''
import asyncio, sys
label = sys.argv[1].encode()
async def serve(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(label + b" " + line)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, sys.argv[2], int(sys.argv[3]), backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
'''

HOLD_CLIENT = r'''
import asyncio, json, os, sys, time
args = json.loads(sys.argv[1])
state = {"opened": 0, "failed_open": 0, "alive": 0, "dead": 0, "errors": {},
         "backends": {}, "moved": 0, "rounds": 0, "done": False}
async def hold(i, stop):
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args["vip"], args["port"]), args["timeout"])
    except (OSError, asyncio.TimeoutError) as exc:
        state["failed_open"] += 1
        state["errors"][type(exc).__name__] = state["errors"].get(type(exc).__name__, 0) + 1
        return
    state["opened"] += 1
    state["alive"] += 1
    backend = None
    n = 0
    try:
        while not stop.is_set():
            n += 1
            writer.write(b"%d %d\n" % (i, n))
            line = await asyncio.wait_for(reader.readline(), args["timeout"])
            if not line.endswith(b" %d %d\n" % (i, n)):
                raise ConnectionError("closed" if not line else "wrong answer")
            label = line.split(b" ", 1)[0].decode()
            if backend is None:
                backend = label
                state["backends"][label] = state["backends"].get(label, 0) + 1
            elif label != backend:
                state["moved"] += 1  # cannot happen over TCP: a new backend has no socket
            try:
                await asyncio.wait_for(stop.wait(), args["interval"])
            except asyncio.TimeoutError:
                pass
    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
        state["alive"] -= 1
        state["dead"] += 1
        name = type(exc).__name__
        state["errors"][name] = state["errors"].get(name, 0) + 1
        return
    writer.close()
async def report(stop):
    while True:
        tmp = args["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, args["out"])
        if state["done"]:
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
async def main():
    stop = asyncio.Event()
    reporter = asyncio.create_task(report(stop))
    tasks = []
    for i in range(args["connections"]):
        tasks.append(asyncio.create_task(hold(i, stop)))
        await asyncio.sleep(args["ramp"])
    deadline = time.monotonic() + args["budget"]
    while time.monotonic() < deadline and not os.path.exists(args["stop"]):
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    state["done"] = True
    await reporter
asyncio.run(main())
'''

CONNECT_CLIENT = r'''
import json, socket, sys, time
args = json.loads(sys.argv[1])
ok, failed, errors = 0, 0, {}
for i in range(args["count"]):
    try:
        with socket.create_connection((args["vip"], args["port"]), timeout=args["timeout"]) as s:
            s.sendall(b"new %d\n" % i)
            line = s.makefile("rb").readline()
            if not line.endswith(b" new %d\n" % i):
                raise ConnectionError("wrong answer")
        ok += 1
    except (OSError, ConnectionError) as exc:
        failed += 1
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
'''

BIRD_CONF = """\
router id {router_nodes};
log "{dir}/bird.log" all;
protocol device {{ scan time 1; }}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on limit 16;   # equal routes from several nodes: one multipath route (ECMP)
}}
template bgp node {{
    local {router_nodes} as {router_as};
    hold time 9;
    connect retry time 1;
    error wait time 1, 2;
    ipv4 {{ import all; export none; }};
}}
{neighbors}
"""

EXABGP_CONF = """\
process watch {{
    run {healthcheck};
    encoder text;
}}
neighbor {router_nodes} {{
    router-id {address};
    local-address {address};
    local-as {node_as};
    peer-as {router_as};
    hold-time 9;
    api {{ processes [ watch ]; }}
}}
"""


class EcmpNode:
    """One balancer node: its namespace, its nfqlb daemon and its BGP speaker."""

    def __init__(self, lab: EcmpLab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.name = f"node-{index}"
        self.ns = lab.ns(self.name)
        self.address = node_addr(index)
        self.dir = lab.dir / self.name
        self.dir.mkdir()
        self.config_path = self.dir / "nfqlb.toml"
        self.nfqlb: subprocess.Popen[bytes] | None = None
        self.speaker: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def env(self) -> dict[str, str]:
        env = clean_env()
        env["NFQLB_RUN_DIR"] = str(self.dir)
        return env

    @property
    def control_socket(self) -> Path:
        return self.dir / "nfqlb-1.sock"

    def health_argv(self) -> list[str]:
        return [sys.executable, "-m", "nfqlb", *HEALTH,
                "--socket", str(self.control_socket)]

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nfqlb", *args, "--socket",
                               str(self.control_socket)], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        if out.returncode != 0:
            raise LabError(f"{self.name}: nfqlb status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def start_nfqlb(self, timeout: float = 15.0) -> None:
        self.starts += 1
        self.config_path.write_text(self.lab.node_config(self))
        out = open(self.dir / f"nfqlb-{self.starts}.log", "wb")
        self.nfqlb = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "nfqlb", "run", "--config",
             str(self.config_path)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.env, cwd=REPO_ROOT)
        out.close()
        deadline = time.monotonic() + timeout
        while self.lab.exec(self.ns, self.health_argv(), check=False).returncode != 0:
            if self.nfqlb.poll() is not None:
                raise LabError(f"{self.name}: nfqlb exited {self.nfqlb.returncode}:\n"
                               f"{self.log()}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: nfqlb not serving within {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def start_speaker(self) -> None:
        healthcheck = " ".join([
            sys.executable, "-m", "exabgp", "healthcheck", "--cmd",
            '"' + " ".join(self.health_argv()) + '"',
            "--interval", "1", "--fast-interval", "1", "--rise", "1", "--fall", "1",
            "--timeout", "2", "--withdraw-on-down", "--no-ip-setup", "--no-syslog",
            "--ip", f"{VIP}/32", "--ip", CLIENT_NET])
        conf = self.dir / "exabgp.conf"
        conf.write_text(EXABGP_CONF.format(healthcheck=healthcheck, address=self.address,
                                           router_nodes=ROUTER_NODES, node_as=NODE_AS,
                                           router_as=ROUTER_AS))
        env = self.env
        env.update({"exabgp.daemon.user": "root", "exabgp.daemon.daemonize": "false",
                    "exabgp.api.cli": "false", "exabgp.log.destination": "stdout",
                    "exabgp.daemon.drop": "false"})
        out = open(self.dir / "exabgp.log", "ab")
        self.speaker = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "exabgp", str(conf)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.dir)
        out.close()

    def stop_nfqlb(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful stop: withdraw, wait, stop); the exit code."""
        if self.nfqlb is None:
            return None
        self.nfqlb.send_signal(signal.SIGTERM)
        try:
            return self.nfqlb.wait(timeout)
        except subprocess.TimeoutExpired:
            self.nfqlb.kill()
            return self.nfqlb.wait(5)

    def kill_nfqlb(self) -> None:
        """SIGKILL: the daemon is gone, its rules stay."""
        assert self.nfqlb is not None
        self.nfqlb.kill()
        self.nfqlb.wait(5)

    def log(self) -> str:
        return (self.dir / f"nfqlb-{self.starts}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        for proc in (self.speaker, self.nfqlb):
            if proc is not None:
                terminate(proc, timeout=10.0)


class EcmpLab:
    """The topology of the module docstring; ``with EcmpLab(...)`` tears it all down."""

    def __init__(self, *, nodes: int = 2, backends: int = 2, policy: str = "flow_hash",
                 daemon: dict[str, Any] | None = None) -> None:
        self.n_nodes = nodes
        self.n_backends = backends
        self.policy = policy
        self.daemon = daemon or {}
        self.tag = f"{NS_PREFIX}{os.getpid()}-e{int(time.monotonic() * 1000) % 100000}"
        self.dir = Path(tempfile.mkdtemp(prefix="nfqlb-ecmp-"))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backends: dict[int, subprocess.Popen[bytes]] = {}
        self.nodes: list[EcmpNode] = []
        self.router = self.ns("router")
        self.client = self.ns("client")

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    # ------------------------------------------------------------------ commands

    def exec(self, ns: str, argv: Sequence[str], *, check: bool = True,
             timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                              timeout=timeout, env=clean_env(), cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise LabError(f"{ns}: exit {proc.returncode}: {' '.join(argv)}\n"
                           f"{proc.stderr.decode(errors='replace').strip()}")
        return proc

    def sh(self, ns: str, script: str) -> None:
        self.exec(ns, ["sh", "-ec", script])

    def spawn(self, ns: str, argv: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.dir / log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=clean_env(), cwd=self.dir)
        self.procs.append(proc)
        return proc

    # ------------------------------------------------------------------ building

    def __enter__(self) -> EcmpLab:
        cleanup_stale_namespaces()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _netns(self, role: str) -> str:
        ns = self.ns(role)
        host_cmd(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.sh(ns, "ip link set lo up; sysctl -qw net.ipv4.conf.all.rp_filter=0 "
                    "net.ipv4.conf.default.rp_filter=0")
        return ns

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        host_cmd(["ip", "link", "add", "tmp-a", "netns", a, "type", "veth", "peer", "name",
                  "tmp-b", "netns", b])
        self.exec(a, ["ip", "link", "set", "tmp-a", "name", a_if])
        self.exec(b, ["ip", "link", "set", "tmp-b", "name", b_if])

    def _build(self) -> None:
        r = self._netns("router")
        self.sh(r, "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 "
                   "net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0\n"
                   "ip link add brn type bridge; ip link add brb type bridge\n"
                   f"ip addr add {ROUTER_NODES}/24 dev brn; ip addr add {ROUTER_BACKENDS}/24 "
                   "dev brb; ip link set brn up; ip link set brb up")
        c = self._netns("client")
        self._veth(c, "eth0", r, "rc")
        self.sh(c, f"ip addr add {CLIENT_ADDR}/24 dev eth0; ip link set eth0 up\n"
                   f"ip route add default via {ROUTER_CLIENT}")
        # The client network is reached directly only from the nodes' side (table
        # REPLY_TABLE); from anywhere else, by the nodes' multipath route that BGP installs.
        self.sh(r, f"ip addr add {ROUTER_CLIENT}/24 dev rc noprefixroute; ip link set rc up\n"
                   f"ip route add {CLIENT_NET} dev rc table {REPLY_TABLE}\n"
                   f"ip rule add iif brn lookup {REPLY_TABLE} priority 100")
        for i in range(1, self.n_backends + 1):
            b = self._netns(f"backend-{i}")
            self._veth(b, "eth0", r, f"rb{i}")
            self.sh(r, f"ip link set rb{i} master brb; ip link set rb{i} up")
            self.sh(b, f"ip addr add {backend_addr(i)}/24 dev eth0; ip link set eth0 up\n"
                       f"ip route add default via {ROUTER_BACKENDS}")
            self._start_backend(i)
        for i in range(1, self.n_nodes + 1):
            n = self._netns(f"node-{i}")
            self._veth(n, "eth0", r, f"rn{i}")
            self.sh(r, f"ip link set rn{i} master brn; ip link set rn{i} up")
            self.sh(n, f"ip addr add {node_addr(i)}/24 dev eth0; ip link set eth0 up\n"
                       f"ip route add default via {ROUTER_NODES}\n"
                       "sysctl -qw net.ipv4.conf.all.send_redirects=0 "
                       "net.ipv4.conf.eth0.send_redirects=0")
            self.nodes.append(EcmpNode(self, i))
        neighbors = "\n".join(f"protocol bgp {n.name.replace('-', '')} from node {{ neighbor "
                              f"{n.address} as {NODE_AS}; }}" for n in self.nodes)
        (self.dir / "bird.conf").write_text(BIRD_CONF.format(
            router_nodes=ROUTER_NODES, router_as=ROUTER_AS, dir=self.dir, neighbors=neighbors))
        self.bird = self.spawn(r, ["bird", "-f", "-c", str(self.dir / "bird.conf"), "-s",
                                   str(self.dir / "bird.ctl"), "-P", str(self.dir / "bird.pid")],
                               "bird.stdout")
        self._wait_backends()
        for node in self.nodes:
            node.start_nfqlb()
            node.start_speaker()

    def _start_backend(self, i: int) -> None:
        server = self.dir / "echo_server.py"
        if not server.exists():
            server.write_text(ECHO_SERVER)
        self.backends[i] = self.spawn(self.ns(f"backend-{i}"), [
            sys.executable, str(server), f"backend-{i}", backend_addr(i), str(PORT)],
            f"backend-{i}.log")

    def _wait_backends(self, timeout: float = 30.0, restarts: int = 2) -> None:
        """Wait for every echo server's "ready"; one that exited before it is started again
        (at most ``restarts`` times: ``ip netns exec`` can fail transiently on a loaded
        host) and the error, if it comes to one, carries the server's own output."""
        deadline = time.monotonic() + timeout
        for i in range(1, self.n_backends + 1):
            log = self.dir / f"backend-{i}.log"
            while b"ready" not in log.read_bytes():
                status = self.backends[i].poll()
                if status is not None and restarts > 0:
                    restarts -= 1
                    with open(log, "ab") as out:
                        out.write(f"[lab] exited with status {status}; started again\n".encode())
                    self._start_backend(i)
                elif status is not None or time.monotonic() > deadline:
                    why = (f"exited with status {status}" if status is not None
                           else f"not ready after {timeout:.0f} s")
                    output = log.read_bytes().decode(errors="replace")[-2000:]
                    raise LabError(f"backend-{i}'s echo server did not start ({why}); "
                                   f"its output:\n{output}")
                time.sleep(0.05)

    def node_config(self, node: EcmpNode) -> str:
        daemon = {"queue": 1, "sysctls": True, "workers": int(os.environ.get(WORKERS_ENV) or 1),
                  **self.daemon}
        service = {
            "name": SERVICE, "vip": VIP, "port": PORT, "protocol": "tcp", "mode": "dnat",
            "policy": self.policy, "unknown_flow": "hash",
            "backend": [{"name": f"backend-{i}", "address": backend_addr(i), "port": PORT}
                        for i in range(1, self.n_backends + 1)],
        }
        return render_config([service], daemon)

    # ------------------------------------------------------------------ observing

    def nexthops(self, prefix: str = VIP) -> set[str]:
        """The next hops of the router's route to ``prefix`` (the nodes announcing it)."""
        out = self.exec(self.router, ["ip", "-j", "route", "show", prefix]).stdout
        hops: set[str] = set()
        for route in json.loads(out or b"[]"):
            if "gateway" in route:
                hops.add(route["gateway"])
            for hop in route.get("nexthops", []):
                hops.add(hop["gateway"])
        return hops

    def wait_nexthops(self, expected: set[str], timeout: float = 30.0) -> float:
        """Wait until both announced prefixes have exactly ``expected`` next hops; the
        seconds it took."""
        start = time.monotonic()
        while True:
            if self.nexthops(VIP) == expected and self.nexthops(CLIENT_NET) == expected:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise LabError(f"next hops {self.nexthops(VIP)} / {self.nexthops(CLIENT_NET)}, "
                               f"expected {expected} after {timeout}s\n{self.bird_state()}")
            time.sleep(0.1)

    def bird_state(self) -> str:
        out = self.exec(self.router, ["birdc", "-s", str(self.dir / "bird.ctl"), "show",
                                      "protocols"], check=False)
        return out.stdout.decode(errors="replace")

    def hold(self, connections: int, *, interval: float = 0.5, timeout: float = 10.0,
             budget: float = 240.0, ramp: float = 0.005) -> Holder:
        return Holder(self, connections, interval=interval, timeout=timeout, budget=budget,
                      ramp=ramp)

    def connect(self, count: int, timeout: float = 5.0) -> dict[str, Any]:
        """``count`` short connections in a row from the client: {"ok", "failed", "errors"}."""
        args = {"vip": VIP, "port": PORT, "count": count, "timeout": timeout}
        out = self.exec(self.client, [sys.executable, "-c", CONNECT_CLIENT, json.dumps(args)],
                        timeout=count * timeout + 10)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for proc in self.procs:
            terminate(proc)
        for ns in reversed(self.namespaces):
            delete_netns(ns)
        if os.environ.get("NFQLB_KEEP_LAB"):
            print(f"lab files kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class Holder:
    """The client holding ``connections`` long-lived connections (``HOLD_CLIENT``)."""

    def __init__(self, lab: EcmpLab, connections: int, *, interval: float, timeout: float,
                 budget: float, ramp: float) -> None:
        self.lab = lab
        self.out = lab.dir / f"hold-{len(lab.procs)}.json"
        self.stop_file = lab.dir / f"hold-{len(lab.procs)}.stop"
        args = {"vip": VIP, "port": PORT, "connections": connections, "interval": interval,
                "timeout": timeout, "budget": budget, "ramp": ramp, "out": str(self.out),
                "stop": str(self.stop_file)}
        self.connections = connections
        self.proc = lab.spawn(lab.client, [sys.executable, "-c", HOLD_CLIENT,
                                           json.dumps(args)], "hold.log")

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.out.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_open(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if st and st["opened"] + st["failed_open"] >= self.connections:
                return st
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise LabError(f"the client opened {st} of {self.connections} connections")
            time.sleep(0.2)

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        self.stop_file.touch()
        self.proc.wait(timeout)
        return self.state()
