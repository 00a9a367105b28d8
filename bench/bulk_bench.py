"""Bulk throughput: one TCP stream (iperf3) through nfqlb in each rewrite mode vs kernel DNAT.

One lab (``tests/lab``: client, balancer, one backend) and nfqlb serving, side by side, a
dnat, a fullnat and a local service for the IPv4 VIP and the IPv6 one; a kernel DNAT rule
(nat table, conntrack) for another port of the same VIP is the reference. In each round, for
each main-queue binding in turn (an nfqlb started for it), every path runs once in each
direction (``-R``: the backend sends), interleaved, so that load from elsewhere hits all
alike; the table shows medians in Gb/s, the ratio to kernel DNAT in the same direction,
iperf3's retransmitted segments (median) and the balancer worker's CPU (user and system, % of
one core, median) during the nfqlb runs. At the end, each nfqlb's counters of its queues
(the large-packet queue's: GSO packets seen whole, checksums left partial or computed in
full).

    python bench/bulk_bench.py [--seconds 3] [--rounds 3] [--bindings netfilterqueue,netlink]

Needs root, iproute2, iptables, nginx (the lab's servers) and iperf3 (apt-get install
iperf3). Traffic stays in the lab's namespaces (198.18.0.0/15, 2001:db8::/32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import VIP, VIP6, Lab  # noqa: E402

SERVER_PORT = 5201  # iperf3 on the backend
KERNEL_SERVER_PORT = 5301  # another iperf3 on the backend, for kernel DNAT: the replies from
# SERVER_PORT are nfqlb's (its rules take them out of conntrack), so they would not be un-NATed
LOCAL_SERVER_PORT = 5203  # iperf3 on the balancer (local mode's backend)
PORTS = {"kernel": 5301, "dnat": 5201, "fullnat": 5204, "local": 5202}


def services(lab: Lab, family: int) -> list[dict[str, Any]]:
    out = []
    for mode in ("dnat", "fullnat", "local"):
        svc = lab.service(mode, family=family, port=PORTS[mode], name=f"{mode}-{family}")
        for b in svc["backend"]:
            b["port"] = LOCAL_SERVER_PORT if mode == "local" else SERVER_PORT
        if mode == "fullnat":
            svc["snat_ports"] = "20000-29999" if family == 4 else "30000-39999"
        out.append(svc)
    return out


def kernel_dnat(lab: Lab, family: int) -> None:
    tool, vip = ("iptables", VIP) if family == 4 else ("ip6tables", VIP6)
    b = lab.backends[0]
    port = KERNEL_SERVER_PORT
    to = f"{b.address}:{port}" if family == 4 else f"[{b.address6}]:{port}"
    lab.exec(lab.lb, [tool, "-t", "nat", "-A", "PREROUTING", "-d", vip, "-p", "tcp", "--dport",
                      str(PORTS["kernel"]), "-j", "DNAT", "--to-destination", to])


def iperf(lab: Lab, vip: str, port: int, seconds: float, reverse: bool) -> tuple[float, int]:
    argv = ["iperf3", "-c", vip, "-p", str(port), "-t", str(seconds), "-J"]
    proc = lab.exec(lab.client, argv + (["-R"] if reverse else []), timeout=seconds + 30,
                    check=False)
    try:
        end = json.loads(proc.stdout)["end"]
        return end["sum_received"]["bits_per_second"] / 1e9, end["sum_sent"]["retransmits"]
    except (ValueError, KeyError):
        return 0.0, -1


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bindings", default="netfilterqueue,netlink",
                        help="[daemon] binding of the main queue: each in turn")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, iptables, NFQUEUE)")
    tick = os.sysconf("SC_CLK_TCK")
    bindings = args.bindings.split(",")
    results: dict[tuple[str, str, int, bool], list[tuple[float, int, float, float]]] = {}
    stats: dict[str, list[str]] = {}
    with Lab(1, vip_on_lo=True, lb_servers=True, ipv6=True) as lab:
        lab.spawn(lab.backends[0], ["iperf3", "-s", "-p", str(SERVER_PORT)],
                  log=lab.dir / "iperf-backend.log")
        lab.spawn(lab.backends[0], ["iperf3", "-s", "-p", str(KERNEL_SERVER_PORT)],
                  log=lab.dir / "iperf-backend-kernel.log")
        lab.spawn(lab.lb, ["iperf3", "-s", "-p", str(LOCAL_SERVER_PORT)],
                  log=lab.dir / "iperf-lb.log")
        for family in (4, 6):
            kernel_dnat(lab, family)
        all_services = services(lab, 4) + services(lab, 6)
        for _ in range(args.rounds):
            for binding in bindings:
                daemon = lab.nfqlb(*all_services, daemon={"binding": binding})
                with daemon:
                    time.sleep(0.5)
                    assert daemon.proc is not None
                    pid = daemon.proc.pid
                    for family in (4, 6):
                        vip = VIP if family == 4 else VIP6
                        for path in ("kernel", "dnat", "fullnat", "local"):
                            if path == "kernel" and binding != bindings[0]:
                                continue  # once a round is enough
                            for reverse in (False, True):
                                u0, s0 = cpu_ticks(pid)
                                t0 = time.monotonic()
                                gbps, retr = iperf(lab, vip, PORTS[path], args.seconds, reverse)
                                u1, s1 = cpu_ticks(pid)
                                wall = time.monotonic() - t0
                                key = (path, "" if path == "kernel" else binding, family,
                                       reverse)
                                results.setdefault(key, []).append(
                                    (gbps, retr, (u1 - u0) / tick / wall,
                                     (s1 - s0) / tick / wall))
                daemon.stop()
                stats[binding] = [line for line in daemon.stdout.splitlines()
                                  if line.startswith("queue ")]
    print(f"one TCP stream, iperf3 -t {args.seconds:g}, median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'path':<8} {'binding':<15} {'IP':<3} {'direction':<16} {'Gb/s':>6} "
          f"{'x kernel':>8} {'retr':>6} {'worker usr':>10} {'sys':>5}")
    for family in (4, 6):
        for reverse in (False, True):
            base = statistics.median(r[0] for r in results[("kernel", "", family, reverse)])
            for path, binding in [("kernel", "")] + [(p, b) for p in ("dnat", "fullnat", "local")
                                                      for b in bindings]:
                rows = results[(path, binding, family, reverse)]
                gbps = statistics.median(r[0] for r in rows)
                retr = statistics.median(r[1] for r in rows)
                usr = statistics.median(r[2] for r in rows)
                sys_ = statistics.median(r[3] for r in rows)
                cpu = "" if path == "kernel" else f"{usr:>10.0%} {sys_:>5.0%}"
                way = "backend->client" if reverse else "client->backend"
                print(f"{path:<8} {binding:<15} v{family:<2} {way:<16} {gbps:>6.2f} "
                      f"{gbps / base if base else 0:>8.2f} {retr:>6.0f} {cpu}")
        print()
    for binding, lines in stats.items():
        print(f"binding {binding}, last round:\n  " + "\n  ".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
