"""Several workers in the namespace lab: requests/s and CPU per packet per worker, and total.

``nfqlb run`` with a dnat service over the lab's two nginx backends, with ``workers = 1`` and
``2`` in alternating rounds; ``wrk`` in the client namespace, keep-alive and
``Connection: close``. wrk has one source address, and the workers are chosen by the client
address: the client namespace NATs every second new connection to a second address
(198.18.0.200, the other worker's half of the last byte) with conntrack's nth statistic, so
the connections are spread over both workers. For each worker: its CPU (utime+stime of its
pid over the run, from /proc), its packets (``nfqlb status``) and CPU per packet; then the
total. Figures are indicative: client, balancer and backends share this machine's cores.

    python bench/workers_bench.py [--seconds 5] [--connections 32] [--rounds 2]

Needs root, nginx, wrk. Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import VIP, Lab  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SECOND_CLIENT = "198.18.0.200"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_once(lab: Lab, workers: int, seconds: int, connections: int,
             close: bool) -> dict[str, object]:
    svc = lab.service("dnat")
    d = lab.nfqlb(svc, daemon={"workers": workers})
    with d:
        st = json.loads(d.cli("status", "--json").stdout)
        pids = [w["pid"] for w in st.get("workers", [])] or [st["daemon"]["pid"]]
        before = [cpu_seconds(p) for p in pids]
        argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s"]
        if close:
            argv += ["-H", "Connection: close"]
        out = lab.exec(lab.client, [*argv, f"http://{VIP}/"], timeout=seconds + 30).stdout
        after = [cpu_seconds(p) for p in pids]
        st = json.loads(d.cli("status", "--json").stdout)
    m = re.search(rb"Requests/sec:\s+([\d.]+)", out)
    rps = float(m.group(1)) if m else 0.0
    packets = ([w["packets"] for w in st["workers"]] if "workers" in st else [st["packets"]])
    cpu = [a - b for a, b in zip(after, before, strict=True)]
    return {"rps": rps, "cpu": cpu, "packets": packets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with Lab(2, ipv6=False) as lab:
        lab.ip(lab.client, "addr", "add", f"{SECOND_CLIENT}/24", "dev", "eth0")
        subprocess.run(["ip", "netns", "exec", lab.client.ns, "iptables", "-t", "nat", "-A",
                        "POSTROUTING", "-d", VIP, "-p", "tcp", "-m", "statistic", "--mode",
                        "nth", "--every", "2", "--packet", "0", "-j", "SNAT", "--to-source",
                        SECOND_CLIENT], check=True)
        for close in (False, True):
            what = "new connections (Connection: close)" if close else "keep-alive"
            results: dict[int, list[dict[str, object]]] = {1: [], 2: []}
            for _ in range(args.rounds):
                for workers in (1, 2):
                    results[workers].append(run_once(lab, workers, args.seconds,
                                                     args.connections, close))
            print(f"== {what}, {args.connections} connections, {args.seconds} s x "
                  f"{args.rounds} rounds")
            for workers, runs in results.items():
                rps = statistics.median(float(r["rps"]) for r in runs)  # type: ignore[arg-type]
                last = runs[-1]
                cpu, packets = last["cpu"], last["packets"]
                assert isinstance(cpu, list) and isinstance(packets, list)
                per = ", ".join(
                    f"worker {i}: {c / args.seconds * 100:.0f}% CPU, {p} packets, "
                    f"{c / p * 1e6 if p else 0:.1f} us/packet"
                    for i, (c, p) in enumerate(zip(cpu, packets, strict=True)))
                total = sum(cpu) / max(sum(packets), 1) * 1e6
                print(f"workers={workers}: {rps:,.0f} req/s (median); {per}; total "
                      f"{sum(cpu) / args.seconds * 100:.0f}% CPU, {total:.1f} us/packet")


if __name__ == "__main__":
    main()
