"""Mode "offload" against the kernel's own iptables DNAT, in alternating rounds (the lab).

The lab of ``tests/lab`` (client, lb, two nginx backends). Each round runs, in this order,
``wrk`` keep-alive and then ``wrk -H "Connection: close"`` (one new connection per request)
against http://198.18.100.1:80/ through

  kernel-dnat   nat PREROUTING DNAT, round robin with ``-m statistic --mode nth``;
  offload-B     ``nfqlb run`` with a ``mode = "offload"`` service (round_robin, both
                backends): conntrack NEW packets queued, DNAT by mark, the queue served by
                ``offload_binding = B`` (``--bindings netlink,netfilterqueue``: one stage
                each);

alternating the two (ABBA) so that drift hits both alike, each from an empty conntrack
table. Prints each round's requests/s, the
medians, the ratios offload/kernel, and the worker's CPU per queued packet (utime+stime of
its pid / packets of the offload queue).

    python bench/offload_bench.py [--seconds 3] [--rounds 5] [--connections 32]
                                  [--bindings netlink,netfilterqueue]

Needs root, iproute2, iptables, nginx and wrk. Traffic stays in the lab's namespaces. Run it
under ``flock /tmp/nfqlb-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import HTTP_PORT, VIP, Lab, LabError  # noqa: E402

URL = f"http://{VIP}:80/"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wrk(lab: Lab, seconds: float, connections: int, threads: int, close: bool) -> float:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", "2s", *(["-H", "Connection: close"] if close else []), URL]
    out = lab.exec(lab.client, argv, timeout=seconds + 15).stdout.decode()
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise LabError(f"cannot parse wrk output:\n{out}")
    return float(m.group(1))


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def queued(lab: Lab, queue: int) -> int:
    text = lab.exec(lab.lb, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.decode()
    for line in text.split("\n"):
        cols = line.split()
        if cols and int(cols[0]) == queue:
            return int(cols[7])  # id_sequence: packets queued so far
    return 0


FLUSH = ("from pyroute2 import NFCTSocket\n"
         "s = NFCTSocket()\n"
         "s.flush()\n"
         "s.close()\n")


def flush_conntrack(lab: Lab) -> None:
    """Empty the lb namespace's conntrack table (the close runs leave many TIME_WAIT
    entries, which would burden whichever stage comes later)."""
    lab.exec(lab.lb, [sys.executable, "-c", FLUSH])


@contextlib.contextmanager
def kernel_dnat(lab: Lab) -> Iterator[None]:
    lab.exec(lab.lb, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    b1, b2 = (f"{b.address}:{HTTP_PORT}" for b in lab.backends)
    match = ["-d", VIP, "-p", "tcp", "--dport", "80"]
    rules = [[*match, "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
              "-j", "DNAT", "--to-destination", b1],
             [*match, "-j", "DNAT", "--to-destination", b2]]
    for rule in rules:
        lab.exec(lab.lb, ["iptables", "-t", "nat", "-A", "PREROUTING", *rule])
    try:
        yield
    finally:
        for rule in rules:
            lab.exec(lab.lb, ["iptables", "-t", "nat", "-D", "PREROUTING", *rule])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bindings", default="netlink",
                    help="offload_binding values to measure, comma-separated (each a stage)")
    args = ap.parse_args()
    bindings = args.bindings.split(",")
    stages = ["kernel-dnat"] + [f"offload-{b}" for b in bindings]
    rates: dict[tuple[str, bool], list[float]] = {}
    cpu: dict[str, list[tuple[int, int]]] = {}  # per stage: (ticks, packets) per round
    with Lab(2, ipv6=False) as lab:
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s {URL}, "
              f"{args.rounds} alternating rounds", flush=True)
        for r in range(args.rounds):
            order = stages if r % 2 == 0 else stages[::-1]
            for name in order:
                flush_conntrack(lab)  # each stage starts from an empty connection table
                if name == "kernel-dnat":
                    stage: contextlib.AbstractContextManager[object] = kernel_dnat(lab)
                    pid, queue = None, None
                else:
                    d = lab.nfqlb(lab.service("offload"),
                                  daemon={"offload_binding": name.removeprefix("offload-")})
                    stage = d
                with stage:
                    if name != "kernel-dnat":
                        assert d.proc is not None
                        pid, queue = d.proc.pid, 20000 + d.queue
                    wrk(lab, 1, args.connections, args.threads, False)  # warm-up
                    t0 = ticks(pid) if pid else 0
                    q0 = queued(lab, queue) if queue else 0
                    for close in (False, True):
                        rate = wrk(lab, args.seconds, args.connections, args.threads, close)
                        rates.setdefault((name, close), []).append(rate)
                    if pid and queue:
                        cpu.setdefault(name, []).append((ticks(pid) - t0,
                                                         queued(lab, queue) - q0))
                print(f"  round {r + 1} {name:<22} keep-alive "
                      f"{rates[(name, False)][-1]:8.0f} req/s  close "
                      f"{rates[(name, True)][-1]:7.0f} conn/s", flush=True)
    print("\nmedians (ratio to kernel-dnat):")
    for close, what in ((False, "keep-alive req/s"), (True, "new connections/s")):
        ref = statistics.median(rates[("kernel-dnat", close)])
        line = f"  {what:<18} kernel-dnat {ref:8.0f}"
        for name in stages[1:]:
            off = statistics.median(rates[(name, close)])
            line += f"  {name} {off:8.0f} ({off / ref:.3f}x)"
        print(line)
    for name, rows in cpu.items():
        t, p = sum(c[0] for c in rows), sum(c[1] for c in rows)
        if p:
            print(f"  {name} worker: {1e6 * t / CLK_TCK / p:.1f} us CPU per queued packet "
                  f"({p} packets queued over the measured runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
