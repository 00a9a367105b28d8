"""Lab benchmark: keep-alive HTTP requests/s through the balancer, as a ratio to kernel DNAT.

Builds the namespace lab of ``tests/lab.py`` (client, lb, two nginx backends), runs ``wrk`` in
the client namespace against http://198.18.100.1:80/ (a few bytes of body) and compares, in
one run:

  kernel-dnat    iptables nat PREROUTING DNAT (round robin with -m statistic --mode nth) in the
                 lb namespace, ip_forward=1, backends route via lb: the reference, 1.0x
  nfq-accept     the same kernel DNAT, plus every packet of the traffic (both directions) queued
                 from raw PREROUTING to a minimal Python NetfilterQueue worker that only accepts
  nfqlb-dnat     ``nfqlb run`` with a dnat service (round_robin, both backends), no kernel NAT
  nfqlb-fullnat  ``nfqlb run`` with a fullnat service (snat 198.18.1.1, ports 20000-29999); the
                 backends lose their default route, so they cannot answer the client directly
  kernel-dnat    again at the end, to show drift; the ratios are to the median of the
                 rounds of both kernel-dnat runs

Each: a 1 s warm-up, then ``--rounds`` runs of ``--seconds``; the median requests/s is shown,
with the worker's CPU (utime+stime of its pid over the runs, % of one core), that CPU time
per queued packet (id_sequence of /proc/net/netfilter/nfnetlink_queue) and the whole machine's
busy CPU (from /proc/stat, % of all cores). A new-connection rate (wrk with
"Connection: close") is measured for kernel-dnat and nfqlb-dnat.

    python bench/lab_bench.py [--seconds 5] [--connections 20] [--rounds 3]

Needs root, iproute2, iptables, nginx, wrk (apt-get installed when missing) and the
netfilterqueue binding in this interpreter. Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lab import HTTP_PORT, LB_BACKEND_ADDR, VIP, Lab, LabError  # noqa: E402

URL = f"http://{VIP}:80/"
ACCEPT_QUEUE = 2  # the minimal worker's queue (nfqlb uses the lab default, 1)
CLK_TCK = os.sysconf("SC_CLK_TCK")

_ACCEPT_WORKER = r'''
import sys
from netfilterqueue import NetfilterQueue
nfq = NetfilterQueue()
nfq.bind(int(sys.argv[1]), lambda pkt: pkt.accept(), max_len=1024)
open(sys.argv[2], "w").close()
nfq.run()
'''


@dataclass
class Stage:
    """What a configuration's setup hands to the measurement: the worker's pid, and notes
    (queue counters, nfqlb's stats) gathered before and at teardown."""

    pid: int | None = None
    queue: int | None = None  # the NFQUEUE the worker reads
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    name: str
    rates: list[float]
    errors: dict[str, int]
    cpu: float | None  # worker CPU, % of one core
    host_cpu: float  # all cores busy, %
    us_per_packet: float | None  # worker CPU time per queued packet

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


# -- helpers ------------------------------------------------------------------------------------

def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("wrk is missing: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"]
    if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(argv, env=env, check=True, capture_output=True)


def proc_ticks(pid: int | None) -> int:
    if pid is None:
        return 0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def wrk(lab: Lab, seconds: int, connections: int, threads: int,
        close: bool = False) -> tuple[float, dict[str, int]]:
    """One wrk run from the client namespace: requests/s and its error counters."""
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = lab.exec(lab.client, [*argv, URL], timeout=seconds + 15).stdout.decode()
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise LabError(f"cannot parse wrk output:\n{out}")
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0}
    if s := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        for key, value in zip(("connect", "read", "write", "timeout"), s.groups(), strict=True):
            errors[key] = int(value)
    if s := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors["non2xx"] = int(s.group(1))
    return float(m.group(1)), errors


def measure(lab: Lab, name: str, stage: Stage, args: argparse.Namespace,
            close: bool = False) -> Result:
    wrk(lab, 1, args.connections, args.threads, close)  # warm-up
    rates, errors = [], dict.fromkeys(("connect", "read", "write", "timeout", "non2xx"), 0)
    t0, p0, h0 = time.monotonic(), proc_ticks(stage.pid), host_ticks()
    q0 = queue_counters(lab, stage.queue)
    for _ in range(args.rounds):
        rate, errs = wrk(lab, args.seconds, args.connections, args.threads, close)
        rates.append(rate)
        for key, value in errs.items():
            errors[key] += value
    wall, p1, h1 = time.monotonic() - t0, proc_ticks(stage.pid), host_ticks()
    packets = queue_counters(lab, stage.queue).get("id_sequence", 0) - q0.get("id_sequence", 0)
    cpu = 100.0 * (p1 - p0) / CLK_TCK / wall if stage.pid else None
    us = 1e6 * (p1 - p0) / CLK_TCK / packets if packets > 0 else None
    host_cpu = 100.0 * (h1[0] - h0[0]) / max(1, h1[1] - h0[1])
    result = Result(name, rates, errors, cpu, host_cpu, us)
    kind = "close" if close else "keep-alive"
    summary = ", ".join(f"{k} {v}" for k, v in errors.items() if v) or "none"
    print(f"  {name:<14} {kind:<10} req/s per round: "
          f"{' '.join(f'{r:.0f}' for r in rates)}  errors: {summary}", flush=True)
    return result


QUEUE_COLUMNS = ("queue_num", "peer_portid", "queue_total", "copy_mode", "copy_range",
                 "queue_dropped", "user_dropped", "id_sequence")


def queue_counters(lab: Lab, queue: int | None) -> dict[str, int]:
    """The queue's row of /proc/net/netfilter/nfnetlink_queue in lb ({} if not bound)."""
    if queue is None:
        return {}
    text = lab.exec(lab.lb, ["cat", "/proc/net/netfilter/nfnetlink_queue"],
                    check=False).stdout.decode()
    for line in text.splitlines():
        row = dict(zip(QUEUE_COLUMNS, map(int, line.split()), strict=False))
        if row.get("queue_num") == queue:
            return row
    return {}


def format_queue(queue: int, row: dict[str, int]) -> str:
    if not row:
        return f"queue {queue}: not bound"
    return f"queue {queue}: " + " ".join(
        f"{k} {row[k]}" for k in ("queue_total", "queue_dropped", "user_dropped", "id_sequence"))


def iptables(lab: Lab, *args: str) -> None:
    lab.exec(lab.lb, ["iptables", *args])


# -- configurations: each a context manager yielding a Stage ------------------------------------

@contextlib.contextmanager
def kernel_dnat(lab: Lab) -> Iterator[Stage]:
    lab.exec(lab.lb, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    b1, b2 = (f"{b.address}:{HTTP_PORT}" for b in lab.backends)
    match = ["-d", VIP, "-p", "tcp", "--dport", "80"]
    rules = [[*match, "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
              "-j", "DNAT", "--to-destination", b1],
             [*match, "-j", "DNAT", "--to-destination", b2]]
    for rule in rules:
        iptables(lab, "-t", "nat", "-A", "PREROUTING", *rule)
    try:
        yield Stage()
    finally:
        for rule in rules:
            iptables(lab, "-t", "nat", "-D", "PREROUTING", *rule)


@contextlib.contextmanager
def nfq_accept(lab: Lab) -> Iterator[Stage]:
    ready = lab.dir / "accept.ready"
    script = lab.dir / "accept_worker.py"
    script.write_text(_ACCEPT_WORKER)
    with kernel_dnat(lab) as stage:
        proc = lab.spawn(lab.lb, [sys.executable, str(script), str(ACCEPT_QUEUE), str(ready)],
                         log=lab.dir / "accept.out")
        deadline = time.monotonic() + 10
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError("accept worker did not start:\n"
                               + (lab.dir / "accept.out").read_text())
            time.sleep(0.02)
        queue = ["-j", "NFQUEUE", "--queue-num", str(ACCEPT_QUEUE), "--queue-bypass"]
        rules = [["-d", VIP, "-p", "tcp", "--dport", "80", *queue]]
        rules += [["-s", b.address, "-p", "tcp", "--sport", str(HTTP_PORT), *queue]
                  for b in lab.backends]
        for rule in rules:
            iptables(lab, "-t", "raw", "-A", "PREROUTING", *rule)
        stage.pid, stage.queue = proc.pid, ACCEPT_QUEUE
        try:
            yield stage
        finally:
            for rule in rules:
                iptables(lab, "-t", "raw", "-D", "PREROUTING", *rule)
            proc.terminate()
            proc.wait(5)


@contextlib.contextmanager
def nfqlb(lab: Lab, mode: str) -> Iterator[Stage]:
    daemon = lab.nfqlb(lab.service(mode)).start()
    assert daemon.proc is not None
    stage = Stage(pid=daemon.proc.pid, queue=daemon.queue)  # `ip netns exec` execs: same pid
    try:
        yield stage
    finally:
        rc = daemon.stop()
        stage.notes.append(f"nfqlb exit {rc}; its stats at stop:\n"
                           + "\n".join("    " + line for line in daemon.stdout.splitlines()))
        if rc != 0 or "Traceback" in daemon.stderr:
            stage.notes.append("nfqlb stderr:\n" + daemon.stderr)


@contextlib.contextmanager
def backends_without_route(lab: Lab) -> Iterator[None]:
    for b in lab.backends:
        lab.ip(b, "route", "del", "default")
    try:
        yield
    finally:
        for b in lab.backends:
            lab.ip(b, "route", "add", "default", "via", LB_BACKEND_ADDR)


# -- main ---------------------------------------------------------------------------------------

def check_answers(lab: Lab, name: str) -> None:
    """Four requests, all answered, by the two backends between them."""
    labels = {lab.curl(lab.client, URL).decode().strip() for _ in range(4)}
    if labels != {b.label for b in lab.backends}:
        raise LabError(f"{name}: answers came from {sorted(labels)}")


def run_config(lab: Lab, name: str, setup: contextlib.AbstractContextManager[Stage],
               args: argparse.Namespace, close: list[Result]) -> Result:
    with setup as stage:
        check_answers(lab, name)
        result = measure(lab, name, stage, args)
        if name in ("kernel-dnat", "nfqlb-dnat") and not any(r.name == name for r in close):
            close.append(measure(lab, name, stage, args, close=True))
        if stage.queue is not None:
            stage.notes.insert(0, format_queue(stage.queue, queue_counters(lab, stage.queue)))
    for note in stage.notes:
        print("    " + note.replace("\n", "\n    "))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    ap.add_argument("--connections", type=int, default=20, help="wrk -c")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--rounds", type=int, default=3, help="measured runs per configuration")
    args = ap.parse_args()
    ensure_wrk()

    results: list[Result] = []
    close: list[Result] = []
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s {URL}, "
          f"{args.rounds} rounds after a 1 s warm-up; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} before the lab (other work skews the numbers)")
    with Lab(2, backend_default_route=True) as lab:
        results.append(run_config(lab, "kernel-dnat", kernel_dnat(lab), args, close))
        results.append(run_config(lab, "nfq-accept", nfq_accept(lab), args, close))
        results.append(run_config(lab, "nfqlb-dnat", nfqlb(lab, "dnat"), args, close))
        with backends_without_route(lab):
            if any(lab.can_route(b, lab.client.address) for b in lab.backends):
                raise LabError("a backend can still route to the client")
            results.append(run_config(lab, "nfqlb-fullnat", nfqlb(lab, "fullnat"), args, close))
        results.append(run_config(lab, "kernel-dnat", kernel_dnat(lab), args, close))

    # the reference: the median of every kernel-dnat round, first and last (drift and noise)
    ref = statistics.median(x for r in results if r.name == "kernel-dnat" for x in r.rates)
    print()
    print(f"reference: median of all kernel-dnat rounds = {ref:.0f} req/s")
    print(f"{'config':<15} {'median req/s':>12} {'vs kernel':>9} {'worker CPU':>10} "
          f"{'us/packet':>9} {'host CPU':>8}  errors")
    for r in results:
        cpu = f"{r.cpu:.0f}%" if r.cpu is not None else "-"
        us = f"{r.us_per_packet:.1f}" if r.us_per_packet is not None else "-"
        errs = sum(r.errors.values())
        print(f"{r.name:<15} {r.median:>12.0f} {r.median / ref:>8.2f}x {cpu:>10} {us:>9} "
              f"{r.host_cpu:>7.0f}%  {errs}")
    print("(worker CPU: utime+stime, % of one core; us/packet: that CPU time per queued packet;"
          "\n host CPU: busy % of all cores, wrk, nginx and softirq included)")
    if len(close) == 2:
        k, n = close
        print(f"new connections (Connection: close): kernel-dnat {k.median:.0f} req/s, "
              f"nfqlb-dnat {n.median:.0f} req/s = {n.median / k.median:.2f}x"
              f" (nfqlb CPU {n.cpu:.0f}%, {n.us_per_packet or 0:.1f} us/packet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
