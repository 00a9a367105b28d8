#!/usr/bin/env python3
"""nfqlb demo: a client, a balancer and three backends in network namespaces.

Builds the lab of tests/lab.py (the same code the end-to-end tests use), writes an nfqlb
config for the VIP 198.18.100.1, runs ``python -m nfqlb run`` in the balancer namespace, sends
HTTP requests with curl and UDP datagrams from the client namespace, shows which backend
served each one and what source address the backend saw, then stops nfqlb with SIGTERM and
prints its stats summary. Everything is torn down at the end, also on Ctrl-C.

Run as root:  make demo            (or: .venv/bin/python demo/run.py --mode dnat)

``--mode offload`` runs mode "offload" with ``offload_scheduler = "kernel"``: nfqlb writes the
round robin's choices into an nftables map and the kernel carries every packet, the first
ones included; the demo shows those rules and nfqlb's status (the flows the kernel counted).
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import (  # noqa: E402
    BACKEND_NET,
    CLIENT_ADDR,
    HTTP_PORT,
    LB_BACKEND_ADDR,
    LB_CLIENT_ADDR,
    UDP_PORT,
    VIP,
    VIP_NET,
    Host,
    Lab,
    LabError,
    can_use_netns,
)

LOCAL_UDP_VIP_PORT = 53


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.rstrip().splitlines())


def last_seen(read: Callable[[Host], Sequence[tuple[Any, ...]]], host: Host, before: int,
              wait: float = 1.0) -> str:
    """The source the server on ``host`` logged for its newest request ("?" if none)."""
    deadline = time.monotonic() + wait
    while True:
        rows = read(host)
        if len(rows) > before or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return f"{rows[-1][0]}:{rows[-1][1]}" if len(rows) > before else "?"


def udp_port(mode: str) -> int:
    """The VIP's UDP port: the servers' own port, except in local mode, where the server on
    this host listens on it and a VIP port equal to the backend's would loop (the config
    refuses it): there the VIP answers on 53 and nfqlb forwards to the local server's port."""
    return LOCAL_UDP_VIP_PORT if mode == "local" else UDP_PORT


def topology(lab: Lab, mode: str) -> str:
    route = (f"default via {LB_BACKEND_ADDR}" if lab.backend_default_route
             else f"only {BACKEND_NET}, no route to the client")
    lines = [
        f"  client     {CLIENT_ADDR:<13} route {VIP_NET} via {LB_CLIENT_ADDR}"
        f"   [netns {lab.client.ns}]",
        f"  balancer   {LB_CLIENT_ADDR:<13} (client side), {LB_BACKEND_ADDR} (bridge to backends)"
        f"   [netns {lab.lb.ns}]",
        f"  VIP        {VIP}:80/tcp and {VIP}:{udp_port(mode)}/udp"
        + ("  (on the balancer's lo)" if lab.vip_on_lo else "  (routed to the balancer)"),
    ]
    if mode == "local":
        lines.append(f"  local      nginx :{HTTP_PORT} and UDP :{UDP_PORT} on the balancer itself")
    else:
        for b in lab.backends:
            lines.append(f"  {b.label:<10} {b.address:<13} nginx :{HTTP_PORT}, UDP :{UDP_PORT};"
                         f" {route}   [netns {b.ns}]")
    return "\n".join(lines)


def show_rules(lab: Lab, mode: str, when: str) -> None:
    """The balancer's rules nfqlb owns: the raw table, or for offload the nat table and
    nfqlb's nftables table (its schedules' chains, not the 2,520 slots of each map)."""
    if mode != "offload":
        text = lab.exec(lab.lb, ["iptables", "-t", "raw", "-S"]).stdout.decode()
        say(f"  {when} (iptables -t raw -S):")
        say(indent(text))
        return
    nat = lab.exec(lab.lb, ["iptables", "-t", "nat", "-S"]).stdout.decode()
    say(f"  {when} (iptables -t nat -S):")
    say(indent(nat))
    tables = lab.exec(lab.lb, ["nft", "list", "tables"]).stdout.decode()
    if "nfqlb-1" not in tables:
        say(f"  nftables tables: {tables.strip() or 'none'}")
        return
    chain = lab.exec(lab.lb, ["nft", "list", "chain", "ip", "nfqlb-1", "new-pre"],
                     check=False).stdout.decode()
    say("  nfqlb's nftables table, the chain that gives each new flow its slot (nft list "
        "chain ip nfqlb-1 new-pre):")
    say(indent(chain))


def schedule_written(daemon: Any, services: Sequence[str], wait: float = 10.0) -> bool:
    """Whether nfqlb's status says the kernel's schedule of each service is written."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        done = daemon.cli("status", "--json")
        if done.returncode == 0:
            status = json.loads(done.stdout)["services"]
            if all(status[s].get("offload", {}).get("schedule", {}).get("written")
                   for s in services):
                return True
        time.sleep(0.1)
    return False


def demo(mode: str, requests: int, datagrams: int) -> int:
    failures = 0
    with Lab(3, backend_default_route=(mode in ("dnat", "offload")), vip_on_lo=(mode == "local"),
             lb_servers=(mode == "local")) as lab:
        servers = {h.address: h for h in lab.backends}
        servers[VIP] = lab.lb
        say(f"== nfqlb demo: {mode} load balancing, round robin ==")
        say(topology(lab, mode))
        extra = {"offload_scheduler": "kernel"} if mode == "offload" else {}
        tcp = lab.service(mode, name="web", **extra)
        udp = lab.service(mode, protocol="udp", name="dns-like", port=udp_port(mode), **extra)
        daemon = lab.nfqlb(tcp, udp)
        say("\n== config ==")
        say(indent(daemon.config_path.read_text()))
        say(f"\n== starting nfqlb in the balancer namespace ==\n    {' '.join(daemon.argv)}")
        try:
            daemon.start()
        except LabError as exc:
            say(f"\nnfqlb did not start: {str(exc).splitlines()[0]}")
            say(indent(f"stdout:\n{daemon.stdout}stderr:\n{daemon.stderr}"))
            return 1
        if mode == "offload" and not schedule_written(daemon, ["web", "dns-like"]):
            failures += 1
            say("  the kernel's schedules were not written within 10 s")
        show_rules(lab, mode, "its rules")

        served: collections.Counter[str] = collections.Counter()
        say(f"\n== HTTP: {requests} requests with curl from the client to http://{VIP}/ ==")
        for i in range(1, requests + 1):
            before = {h.label: len(lab.access_log(h)) for h in servers.values()}
            try:
                label = lab.curl(lab.client, f"http://{VIP}/", max_time=5).decode().strip()
            except LabError as exc:
                failures += 1
                say(f"  #{i:<2} FAILED: {exc}")
                continue
            host = lab.lb if label == "lb-local" else lab.backend(label)
            seen = last_seen(lab.access_log, host, before[host.label])
            addr = "local" if host is lab.lb else host.address
            served[label] += 1
            say(f"  #{i:<2} {CLIENT_ADDR} -> {VIP}:80  served by {label:<9} ({addr}:{HTTP_PORT})"
                f"  the server saw the client as {seen}")

        say(f"\n== UDP: {datagrams} datagrams from the client to {VIP}:{udp_port(mode)},"
            " a new socket (flow) each ==")
        payloads = [f"hello-{i}".encode() for i in range(1, datagrams + 1)]
        replies = lab.udp_exchange(lab.client, VIP, udp_port(mode), payloads, new_socket_each=True)
        for i, (payload, reply) in enumerate(zip(payloads, replies, strict=True), start=1):
            if reply is None:
                failures += 1
                say(f"  #{i:<2} {payload.decode()!r}: no answer within 2 s")
                continue
            say(f"  #{i:<2} {payload.decode()!r} from port {reply.client_port}:"
                f" answer {reply.label + ':' + reply.payload.decode()!r}"
                f" from {reply.peer[0]}:{reply.peer[1]}")
        udp_seen = {h.label: lab.udp_log(h) for h in servers.values()}
        for label, rows in udp_seen.items():
            for addr, port in rows:
                say(f"       {label} saw a datagram from {addr}:{port}")

        if mode == "offload":
            time.sleep(1.1)  # (the status reads the kernel's counters at most once a second)
            daemon.cli("status")
            time.sleep(0.3)
            say("\n== nfqlb status (the flows per backend: the kernel's counters) ==")
            say(indent(daemon.cli("status").stdout))

        say("\n== stopping nfqlb (SIGTERM) ==")
        code = daemon.stop()
        say(f"  exit code {code}")
        show_rules(lab, mode, "afterwards")
        say("  nfqlb's stats summary:")
        say(indent(daemon.stdout or "(nothing on stdout)"))
        if daemon.stderr.strip():
            say("  nfqlb's log (stderr, last 20 lines):")
            say(indent("\n".join(daemon.stderr.splitlines()[-20:])))
        if code != 0:
            failures += 1

        say("\n== result ==")
        for label in sorted(h.label for h in servers.values()
                            if (h is lab.lb) == (mode == "local")):
            say(f"  {label:<10} {served[label]} HTTP requests, {len(udp_seen[label])} datagrams")
        say(f"  {failures} failures; tearing the lab down")
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fullnat", "dnat", "local", "offload"],
                        default="fullnat")
    parser.add_argument("--requests", type=int, default=9, help="HTTP requests (max 50)")
    parser.add_argument("--datagrams", type=int, default=3, help="UDP datagrams (max 50)")
    args = parser.parse_args(argv)
    reason = can_use_netns()
    if reason:
        print(f"demo cannot run: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return demo(args.mode, min(args.requests, 50), min(args.datagrams, 50))


if __name__ == "__main__":
    sys.exit(main())
