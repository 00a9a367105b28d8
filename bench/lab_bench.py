"""Lab benchmark: nfqlb against the kernel, HAProxy and the binding's floor, in one run.

Builds the namespace lab of ``tests/lab`` (client, lb, two nginx backends, nginx in lb too for
local mode) and measures every path of PATHS the same way, in rounds; each round visits every
path, in the opposite order to the round before (drift and warm-up hit every path alike),
and measures, after a 1 s wrk warm-up, in this order:

  keep-alive     wrk -t2 -c32 --latency against the service: requests/s, latency p50 / p99
  iperf3         one TCP stream for a few seconds, client -> server and -R (server -> client)
  new conn/s     wrk with "Connection: close" (one TCP connection per request), last: what
                 it leaves behind (TIME_WAIT, a fullnat pool in its linger) weighs on nothing
  refusals       a note under the path's line when the backends answered SYNs from TIME_WAIT
                 (TcpExtPAWSTimewait) or the client sent SYNs again (TcpExtTCPSynRetrans)
                 during a wrk run: connections kept waiting, not the balancer's CPU
  CPU            user + system time of the balancer's processes during each wrk run (the queue
                 workers, or HAProxy), % of one core and per packet queued to them (the queue
                 counters of /proc/net/netfilter/nfnetlink_queue); per worker with several

A path is set up for its round and torn down after it; the conntrack tables of the client
and the balancer are flushed between paths, so no path inherits another's entries. The
client's connections leave from 16 addresses in turn (SNAT in its namespace, for every path),
so that workers that own flows by the client's address each get a share.

The paths (``--list``; pick with ``--paths a,b,...``):

  direct          the client talks to the backends' own addresses (wrk's two threads to one
                  backend each, iperf3 to backend-1); lb only routes (ip_forward, no NAT)
  kernel-dnat     iptables DNAT in lb (round robin with -m statistic --mode nth): the reference
  haproxy         Debian's HAProxy in lb, tcp mode, listening on the VIP (added to lb's lo)
  nfq-accept      kernel DNAT plus a minimal Python NetfilterQueue worker that accepts every
                  packet of the traffic, both directions: the binding's floor
  nfq-accept-w2   the same with two such workers (--queue-balance over two queues)
  nl-accept       the same floor on nfqlb's own netlink client (nfqlb.io.netlink), every
                  packet accepted: what that binding itself costs, beside NetfilterQueue's
  c-mark          offload's floor: a worker in C (libnetfilter_queue, compiled by the script)
                  given only conntrack NEW packets to the VIP, as nfqlb's offload queue is,
                  that accepts each with the next backend's mark (round robin, no other
                  work); kernel DNAT by mark (the "C balancer on NFQUEUE" of issue 10)
  c-mark-w2       the same with two such workers (--queue-balance over two queues)
  nfqlb-<mode>    ``nfqlb run`` in mode dnat, fullnat (the backends then lose their default
                  route), local (the VIP on lb's lo, lb's own nginx and iperf3 server) and
                  offload, with ``workers = 1`` and (``-w2``) ``[daemon] workers = 2``
  nfqlb-offload-kernel  offload with ``offload_scheduler = "kernel"``: nfqlb writes the
                  policy's (round_robin's) next choices into an nftables map, the kernel marks
                  each new flow by it, nothing is queued
  nfqlb-offload-kernel-mh  the same with ``policy = "maglev"`` and ``hash = "jhash"``: the
                  kernel hashes each connection's protocol, addresses and ports into the
                  Maglev table nfqlb wrote (2,521 slots)
  nfqlb-offload-kernel-sh  run only when named: the same with ``policy = "source_hash"``
                  and ``hash = "jhash"`` (the kernel hashes each client's address into the
                  policy's slot table; the clients' 16 addresses spread over the backends)
  nfqlb-dnat-nfq  dnat with ``[daemon] binding = "netfilterqueue"`` (the NetfilterQueue
                  binding on the main queue in place of nfqlb's own netlink client, the
                  default)
  nfqlb-dnat-whole  run only when named: dnat with ``[daemon] bulk = "whole"``, every large
                  packet through nfqlb whole (the default, "headers", queues a large TCP
                  packet's headers alone and nftables rewrites it by the mark nfqlb gives)

HTTP goes to VIP:80 (the backends' nginx on 8080, both backends). iperf3 needs its control
and data connections on the same server, so every path forwards VIP:5201 to backend-1's
iperf3 server alone (a second service, DNAT rule or listener; in local mode to lb's own
iperf3 server on 5202). Before the rounds, each nfqlb path's configuration goes through
``nfqlb check``: one that nfqlb refuses (a mode or key this tree does not have yet) prints
"n/a: <the error>" in its row. A path that breaks during the run prints "failed: ...".

    python bench/lab_bench.py [--paths kernel-dnat,nfqlb-dnat] [--rounds 3] [--seconds 3]
                              [--iperf-seconds 2] [--skip-iperf] [--warmup 1] [--list]
                              [--verbose]

A quick look (two paths, no iperf3) takes about a minute with ``--rounds 3 --skip-iperf``;
all seventeen paths with the defaults about ten minutes (about 11.5 s per path and round).

The report is a Markdown block (the machine, the date, two tables) to paste into the README;
the arithmetic is in ``bench/lab_results.py``. Needs root, iproute2, iptables, nginx and the
netfilterqueue binding in this interpreter; installs wrk, haproxy, iperf3 and conntrack with
apt-get when missing. Traffic stays inside the lab's namespaces (198.18.0.0/15).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_results as lr  # noqa: E402
from lab import (  # noqa: E402
    BACKEND_NET,
    HTTP_PORT,
    LB_BACKEND_ADDR,
    LB_CLIENT_ADDR,
    REPO_ROOT,
    VIP,
    VIP_NET,
    Host,
    Lab,
    LabError,
)

from nfqlb import native  # noqa: E402
from nfqlb.offload import COPY_RANGE  # noqa: E402

URL = f"http://{VIP}:80/"
IPERF_PORT = 5201  # the service port, and backend-1's iperf3 server
# The client's connections leave from several addresses (SNAT in the client's namespace, the
# next address for each new connection, -m statistic nth): workers that own flows by the
# client's address (nfqlb's workers: by its last byte, worker i takes i*256/N and up; the
# accept-only floor's --queue-balance: a hash) then each get a share, as with many clients.
# Last bytes 8, 24, ..., 248 give N = 2, 3, 4 workers shares within one address of equal.
# The direct path has its own set: this kernel derives the client's TCP timestamp offset
# from the connection's addresses and ports as the client sees them, so if a direct
# connection (to a backend's address) and a balanced one (to the VIP) met at a backend as
# the same four-tuple, the SYN of the later one would fail PAWS against the earlier one's
# TIME_WAIT about half the time (a RST and a 1 s retransmission: seen in the lab).
CLIENT_SOURCES = [f"198.18.0.{8 + 16 * i}" for i in range(16)]
DIRECT_SOURCES = [f"198.18.0.{12 + 16 * i}" for i in range(16)]
LOCAL_IPERF_PORT = 5202  # lb's own iperf3 server, the local mode's backend
ACCEPT_QUEUE = 2  # the accept-only workers' first queue (nfqlb uses the lab default, 1)
REFERENCE = "kernel-dnat"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIN_TICKS = 10  # CPU time under which a per-packet figure is noise (0.1 s at 100 Hz)
TOOLS = {"wrk": "wrk", "haproxy": "haproxy", "iperf3": "iperf3", "conntrack": "conntrack",
         "nft": "nftables"}

_ACCEPT_WORKER = r'''
import sys
from netfilterqueue import NetfilterQueue
nfq = NetfilterQueue()
nfq.bind(int(sys.argv[1]), lambda pkt: pkt.accept(), max_len=1024)
open(sys.argv[2], "w").close()
nfq.run()
'''

# The end of a worker script on nfqlb's netlink client: bind ``adapter`` to queue argv[1], say
# ready in the file argv[2], serve until killed.
_SERVE_ADAPTER = r'''
adapter.bind(max_len=1024)
sel = selectors.DefaultSelector()
sel.register(adapter.fileno(), selectors.EVENT_READ)
open(sys.argv[2], "w").close()
while True:
    sel.select()
    adapter.on_readable()
'''

# The same floor on nfqlb's own netlink client (nfqlb.io.netlink: the receive loop, the
# attribute walk, verdicts sent in one sendmsg when the socket runs dry), every packet accepted
_NETLINK_ACCEPT_WORKER = r'''
import logging, selectors, sys
from nfqlb.io.netlink import NetlinkQueueAdapter
from nfqlb.verdict import ACCEPT
adapter = NetlinkQueueAdapter(lambda payload, now: ACCEPT, int(sys.argv[1]),
                              logging.getLogger("accept"))
''' + _SERVE_ADAPTER

# offload's floor: conntrack NEW packets come to this C worker, which accepts each with the
# next of the marks given (round robin), one verdict per packet as libnetfilter_queue users
# write it; the headers only (COPY_RANGE, as nfqlb's offload queue) and GSO packets whole.
_C_MARK_WORKER = r'''
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

static unsigned int marks[16];
static unsigned int n_marks, next_mark;

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
                     void *data) {
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    unsigned int mark = marks[next_mark++ %% n_marks];
    return nfq_set_verdict2(qh, ntohl(ph->packet_id), NF_ACCEPT, mark, 0, NULL);
}

int main(int argc, char **argv) {
    static char buf[65536] __attribute__((aligned(8)));
    if (argc < 4 || argc > 19) return 2;
    for (int i = 3; i < argc; i++) marks[n_marks++] = strtoul(argv[i], NULL, 0);
    struct nfq_handle *h = nfq_open();
    if (!h) { perror("nfq_open"); return 1; }
    struct nfq_q_handle *qh = nfq_create_queue(h, atoi(argv[1]), &on_packet, NULL);
    if (!qh) { perror("nfq_create_queue"); return 1; }
    if (nfq_set_mode(qh, NFQNL_COPY_PACKET, %(copy_range)d) < 0 ||
        nfq_set_queue_maxlen(qh, 1024) < 0 ||
        nfq_set_queue_flags(qh, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO) < 0) {
        perror("queue setup"); return 1;
    }
    FILE *ready = fopen(argv[2], "w");
    if (ready) fclose(ready);
    int fd = nfq_fd(h);
    for (;;) {
        int n = recv(fd, buf, sizeof buf, 0);
        if (n >= 0) nfq_handle_packet(h, buf, n);
        else if (errno != ENOBUFS && errno != EINTR) { perror("recv"); return 1; }
    }
}
'''
C_MARK_QUEUE = 4  # the C workers' first queue (the accept-only workers use 2 and 3)
C_MARKS = (0x100, 0x200)  # one per backend, DNAT by mark in the nat table

# wrk against the backends themselves: thread i connects to backend i (wrk.lookup resolves
# the literal address), so the direct path loads both nginx servers as the balancers do.
_DIRECT_WRK = '''
local hosts = {%s}
local n = 0
function setup(thread)
  n = n + 1
  thread.addr = wrk.lookup(hosts[(n - 1) %% #hosts + 1], "%d")[1]
end
'''

_HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    maxconn 4000
listen http
    bind {vip}:80
    balance roundrobin
{http_servers}
listen iperf3
    bind {vip}:{iperf_port}
    server backend-1 {iperf_backend}:{iperf_port}
"""


@dataclass
class Stage:
    """What a path's setup hands to the measurement."""

    pids: list[int] = field(default_factory=list)  # the balancer's processes (roots)
    url: str = URL
    wrk_script: Path | None = None
    labels: frozenset[str] = frozenset()  # the backends that must answer URL
    iperf_target: str = VIP  # the client connects to iperf_target:IPERF_PORT ...
    iperf_server: str = "backend"  # ... served by backend-1 (or "lb": lb's own, on 5202)
    notes: list[str] = field(default_factory=list)  # printed after the teardown
    details: list[str] = field(default_factory=list)  # printed with --verbose


@dataclass(frozen=True)
class BenchPath:
    """A row of the tables: how to set it up, and what it is compared with."""

    name: str
    title: str
    setup: Callable[[Lab, BenchPath, int], contextlib.AbstractContextManager[Stage]]
    mode: str | None = None  # nfqlb's service mode
    workers: int = 1
    floor: str | None = None  # the accept-only path for the "x floor" ratio
    binding: str | None = None  # nfqlb's [daemon] binding for the main queue, if not default
    probe: bool = False  # run only when named in --paths
    bulk: str | None = None  # nfqlb's [daemon] bulk, if not the default
    scheduler: str | None = None  # an offload service's offload_scheduler, if not the default
    hashed: str | None = None  # the services' policy: this hash policy with hash = "jhash"

    @property
    def is_nfqlb(self) -> bool:
        return self.mode is not None


# -- processes, queues, CPU ---------------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their descendants that are alive."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and _proc_stat(pid) is not None:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def proc_ticks(pid: int) -> int:
    stat = _proc_stat(pid)
    return 0 if stat is None else int(stat[11]) + int(stat[12])  # utime, stime


QUEUE_COLUMNS = ("queue_num", "peer_portid", "queue_total", "copy_mode", "copy_range",
                 "queue_dropped", "user_dropped", "id_sequence")


def queue_rows(lab: Lab) -> dict[int, dict[str, int]]:
    """Queue number -> its row of /proc/net/netfilter/nfnetlink_queue in lb."""
    text = lab.exec(lab.lb, ["cat", "/proc/net/netfilter/nfnetlink_queue"],
                    check=False).stdout.decode()
    rows = {}
    for line in text.splitlines():
        row = dict(zip(QUEUE_COLUMNS, map(int, line.split()), strict=False))
        if "queue_num" in row:
            rows[row["queue_num"]] = row
    return rows


def netlink_owners(lab: Lab, pids: Sequence[int]) -> dict[int, int]:
    """Netlink port id -> the pid (of ``pids``) whose socket has it: a process's second
    netlink socket (a worker's large-packet or offload queue) gets a port id that is not its
    pid. From lb's /proc/net/netlink (port id and inode) and each process's fds."""
    text = lab.exec(lab.lb, ["cat", "/proc/net/netlink"], check=False).stdout.decode()
    by_inode = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 10 and cols[2].isdigit() and cols[9].isdigit():
            by_inode[int(cols[9])] = int(cols[2])
    owners = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        portid = by_inode.get(int(target[8:-1]))
                        if portid is not None:
                            owners[portid] = pid
    return owners


@dataclass
class Snapshot:
    when: float
    ticks: dict[int, int]
    queues: dict[int, dict[str, int]]
    owners: dict[int, int] = field(default_factory=dict)  # netlink port id -> pid


def snapshot(lab: Lab, stage: Stage) -> Snapshot:
    pids = process_tree(stage.pids)
    return Snapshot(time.monotonic(), {pid: proc_ticks(pid) for pid in pids}, queue_rows(lab),
                    netlink_owners(lab, pids))


def cpu_use(before: Snapshot, after: Snapshot) -> lr.CpuUse:
    """CPU of the balancer's processes between two snapshots, per packet queued meanwhile.

    A queue belongs to the process holding the netlink socket with the queue's port id
    (``after.owners``; else the process whose pid is that port id: a process's first netlink
    socket gets its pid); packets of queues nobody owns that way still count in the total.
    Under MIN_TICKS of CPU time there is no per-packet figure: the clock's ticks are too
    coarse (offload's worker, which sees only new flows, under keep-alive)."""
    ticks = {pid: t - before.ticks.get(pid, 0) for pid, t in after.ticks.items()}
    packets = {q: row["id_sequence"] - before.queues.get(q, {}).get("id_sequence", 0)
               for q, row in after.queues.items()}
    packets = {q: (n if n >= 0 else after.queues[q]["id_sequence"]) for q, n in packets.items()}
    total_s = sum(ticks.values()) / CLK_TCK
    wall = max(after.when - before.when, 1e-9)
    total_packets = sum(packets.values())
    owners: dict[int, list[int]] = {}
    for q, row in after.queues.items():
        pid = after.owners.get(row["peer_portid"], row["peer_portid"])
        if pid in ticks:
            owners.setdefault(pid, []).append(q)
    per_worker: dict[int, float | None] = {}
    if len(owners) > 1:
        for pid, queues in owners.items():
            n = sum(packets[q] for q in queues)
            per_worker[min(queues)] = (1e6 * ticks[pid] / CLK_TCK / n
                                       if n > 0 and ticks[pid] >= MIN_TICKS else None)
    enough = total_packets > 0 and sum(ticks.values()) >= MIN_TICKS
    return lr.CpuUse(100.0 * total_s / wall, 1e6 * total_s / total_packets if enough else None,
                     per_worker)


# -- tools ----------------------------------------------------------------------------------------

def ensure_tools(names: Sequence[str]) -> None:
    """apt-get install the Debian packages of the missing commands (no service is started:
    a temporary policy-rc.d, as scripts/install-deps.sh does)."""
    missing = [TOOLS[n] for n in names
               if not shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if not missing:
        return
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
            subprocess.run(argv, env=env, check=True, capture_output=True)
    finally:
        if created:
            policy.unlink(missing_ok=True)


def tool_version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_heading(args: argparse.Namespace) -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "?"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = [tool_version(["haproxy", "-v"]), tool_version(["iperf3", "--version"]),
                tool_version(["wrk", "-v"]), tool_version(["nginx", "-v"])]
    iperf = ("" if args.skip_iperf else
             f"; iperf3 one TCP stream, {args.iperf_seconds} s each way")
    return [
        f"Lab benchmark (`make bench`, bench/lab_bench.py), {now}, nfqlb {commit}.",
        f"Machine: {model}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} before the "
        "run. Client, balancer and two nginx backends are network namespaces on these cores.",
        f"nfqlb's engine: {native.STATE}.",
        f"Load: wrk -t{args.threads} -c{args.connections} -d{args.seconds}s --latency "
        f"(new connections: \"Connection: close\"){iperf}; rounds: {args.rounds}, each path "
        "once per round, in alternating order; medians.",
        "Tools: " + "; ".join(v for v in versions if v != "?") + ".",
    ]


# -- measurements ---------------------------------------------------------------------------------

def wrk(lab: Lab, stage: Stage, args: argparse.Namespace, seconds: int,
        close: bool = False) -> lr.WrkRun:
    argv = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
            "--timeout", "2s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if stage.wrk_script is not None:
        argv += ["-s", str(stage.wrk_script)]
    proc = lab.exec(lab.client, [*argv, stage.url], timeout=seconds + 20, check=False)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise LabError(f"wrk exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
                       f"{out}")
    return lr.parse_wrk(out)


def iperf3(lab: Lab, stage: Stage, seconds: int, reverse: bool) -> float:
    """One single-stream iperf3 run against a fresh one-off server; bits/s received."""
    host = lab.backends[0] if stage.iperf_server == "backend" else lab.lb
    port = IPERF_PORT if stage.iperf_server == "backend" else LOCAL_IPERF_PORT
    proc = lab.spawn(host, ["iperf3", "-s", "-1", "-p", str(port)],
                     log=lab.dir / "iperf3-server.out")
    deadline = time.monotonic() + 5
    while not listening(lab, host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError("iperf3 server did not start:\n"
                           + (lab.dir / "iperf3-server.out").read_text(errors="replace"))
        time.sleep(0.02)
    argv = ["iperf3", "-c", stage.iperf_target, "-p", str(IPERF_PORT), "-t", str(seconds),
            "--json", "--connect-timeout", "3000", *(["-R"] if reverse else [])]
    try:
        out = lab.exec(lab.client, argv, timeout=seconds + 20, check=False).stdout.decode()
        return lr.parse_iperf3(out)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)
        if proc.poll() is None:
            proc.terminate()


def listening(lab: Lab, host: Host, port: int) -> bool:
    out = lab.exec(host, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def measured(lab: Lab, stage: Stage, run: Callable[[], lr.WrkRun]
             ) -> tuple[lr.WrkRun, lr.CpuUse | None]:
    before = snapshot(lab, stage)
    result = run()
    after = snapshot(lab, stage)
    return result, cpu_use(before, after) if stage.pids else None


#: Kernel counters that show connections kept waiting: a backend answering a SYN on a 4-tuple
#: it holds in TIME_WAIT with the old connection's ACK (the SYN's TSval older: PAWS), and the
#: client sending a SYN again.
REFUSALS = {"backends": "TcpExtPAWSTimewait", "client": "TcpExtTCPSynRetrans"}


def tcp_refusals(lab: Lab) -> dict[str, int]:
    """"<host> <counter>" -> its value now, for REFUSALS (nstat, absolute)."""
    out: dict[str, int] = {}
    for where, name in REFUSALS.items():
        hosts = lab.backends if where == "backends" else [lab.client]
        total = 0
        for host in hosts:
            text = lab.exec(host, ["nstat", "-asz", name], check=False).stdout.decode()
            total += sum(int(p[1]) for p in (line.split() for line in text.splitlines())
                         if len(p) >= 2 and p[0] == name and p[1].isdigit())
        out[f"{where} {name}"] = total
    return out


def check_answers(lab: Lab, stage: Stage, tries: int = 4) -> None:
    """The service answers, from the expected backends (retried for up to 5 s: a proxy may
    still be starting)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            if stage.wrk_script is not None:  # direct: each backend at its own address
                labels = {lab.curl(lab.client, f"http://{b.address}:{HTTP_PORT}/",
                                   max_time=2).decode().strip() for b in lab.backends}
            else:
                labels = {lab.curl(lab.client, stage.url, max_time=2).decode().strip()
                          for _ in range(tries)}
            if labels == stage.labels:
                return
            raise LabError(f"answers came from {sorted(labels)}, not {sorted(stage.labels)}")
        except LabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure_round(lab: Lab, path: BenchPath, round_no: int, args: argparse.Namespace,
                  problems: list[str]) -> lr.Sample:
    """One round of one path: set up, check, measure, tear down. A measurement that fails is
    left out of the sample and described in ``problems``; a setup that fails raises."""
    sample, started = lr.Sample(), time.monotonic()
    with path.setup(lab, path, round_no) as stage:
        check_answers(lab, stage)
        if args.warmup:
            wrk(lab, stage, args, args.warmup)
        # the short connections last: what they leave (TIME_WAIT, a fullnat pool in its
        # close linger) must not weigh on the other measurements
        steps = ["keepalive", *([] if args.skip_iperf else ["upload", "download"]), "close"]
        for step in steps:
            try:
                if step in ("upload", "download"):
                    setattr(sample, step,
                            iperf3(lab, stage, args.iperf_seconds, step == "download"))
                    continue
                before = tcp_refusals(lab)
                run, cpu = measured(lab, stage, functools.partial(
                    wrk, lab, stage, args, args.seconds, step == "close"))
                refused = {k: v - before.get(k, 0) for k, v in tcp_refusals(lab).items()}
                if any(refused.values()):
                    stage.notes.append(f"wrk {step}: " + ", ".join(
                        f"{k} {v}" for k, v in refused.items() if v))
            except (LabError, lr.ParseError) as exc:
                problems.append(f"{'iperf3' if step in ('upload', 'download') else 'wrk'} "
                                f"{step}: {exc}")
                continue
            setattr(sample, step, run)
            setattr(sample, f"cpu_{step}", cpu)
        drops = {q: (row["queue_dropped"], row["user_dropped"])
                 for q, row in queue_rows(lab).items() if row["queue_dropped"]
                 or row["user_dropped"]}
        if drops:
            stage.notes.append("queue drops (queue_dropped, user_dropped): " + ", ".join(
                f"queue {q}: {a}, {b}" for q, (a, b) in sorted(drops.items())))
    print(f"  {path.name:<18} {describe(sample)}  ({time.monotonic() - started:.1f} s)",
          flush=True)
    for line in problems + stage.notes + (stage.details if args.verbose else []):
        print("    " + line.replace("\n", "\n    "), flush=True)
    problems[:] = [first_line(p) for p in problems]
    return sample


def describe(s: lr.Sample) -> str:
    def rate(run: lr.WrkRun | None) -> str:
        if run is None:
            return "-"
        errors = sum(run.errors.values())
        return f"{run.rate:.0f}" + (f" ({errors} errors)" if errors else "")

    def us(cpu: lr.CpuUse | None) -> str:
        return "" if cpu is None else (
            f" [cpu {cpu.percent:.0f}%, {lr.fmt_us(cpu.us_per_packet)} us/pkt]")

    return (f"keep-alive {rate(s.keepalive)}{us(s.cpu_keepalive)}  close {rate(s.close)}"
            f"{us(s.cpu_close)}  iperf3 {lr.fmt_gbits(s.upload)} / "
            f"{lr.fmt_gbits(s.download)} Gb/s")


# -- the paths ------------------------------------------------------------------------------------

def iptables(lab: Lab, *args: str) -> None:
    lab.exec(lab.lb, ["iptables", *args])


@contextlib.contextmanager
def sysctl(lab: Lab, name: str, value: str) -> Iterator[None]:
    old = lab.read_sysctl(lab.lb, name)
    lab.sysctl(lab.lb, name, value)
    try:
        yield
    finally:
        lab.sysctl(lab.lb, name, old)


@contextlib.contextmanager
def rules(lab: Lab, table: str, chain: str, specs: Sequence[Sequence[str]]) -> Iterator[None]:
    done: list[Sequence[str]] = []
    try:
        for spec in specs:
            iptables(lab, "-t", table, "-A", chain, *spec)
            done.append(spec)
        yield
    finally:
        for spec in reversed(done):
            iptables(lab, "-t", table, "-D", chain, *spec)


@contextlib.contextmanager
def vip_on_lo(lab: Lab) -> Iterator[None]:
    lab.ip(lab.lb, "addr", "add", f"{VIP}/32", "dev", "lo")
    try:
        yield
    finally:
        lab.ip(lab.lb, "addr", "del", f"{VIP}/32", "dev", "lo")


@contextlib.contextmanager
def backends_without_route(lab: Lab) -> Iterator[None]:
    for b in lab.backends:
        lab.ip(b, "route", "del", "default")
    try:
        if any(lab.can_route(b, lab.client.address) for b in lab.backends):
            raise LabError("a backend can still route to the client")
        yield
    finally:
        for b in lab.backends:
            lab.ip(b, "route", "add", "default", "via", LB_BACKEND_ADDR)


def backend_labels(lab: Lab) -> frozenset[str]:
    return frozenset(b.label for b in lab.backends)


@contextlib.contextmanager
def direct(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    script = lab.dir / "direct.lua"
    hosts = ", ".join(f'"{b.address}"' for b in lab.backends)
    script.write_text(_DIRECT_WRK % (hosts, HTTP_PORT))
    route = [BACKEND_NET, "via", LB_CLIENT_ADDR]
    with sysctl(lab, "net.ipv4.ip_forward", "1"):
        lab.ip(lab.client, "route", "add", *route)
        try:
            yield Stage(url=f"http://{lab.backends[0].address}:{HTTP_PORT}/",
                        wrk_script=script, labels=backend_labels(lab),
                        iperf_target=lab.backends[0].address)
        finally:
            lab.ip(lab.client, "route", "del", *route)


@contextlib.contextmanager
def kernel_dnat(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    b1, b2 = (f"{b.address}:{HTTP_PORT}" for b in lab.backends[:2])
    http = ["-d", VIP, "-p", "tcp", "--dport", "80"]
    specs = [[*http, "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
              "-j", "DNAT", "--to-destination", b1],
             [*http, "-j", "DNAT", "--to-destination", b2],
             ["-d", VIP, "-p", "tcp", "--dport", str(IPERF_PORT), "-j", "DNAT",
              "--to-destination", f"{lab.backends[0].address}:{IPERF_PORT}"]]
    with sysctl(lab, "net.ipv4.ip_forward", "1"), rules(lab, "nat", "PREROUTING", specs):
        yield Stage(labels=backend_labels(lab))


@contextlib.contextmanager
def haproxy(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    servers = "\n".join(f"    server {b.label} {b.address}:{HTTP_PORT}" for b in lab.backends)
    cfg = lab.dir / "haproxy.cfg"
    cfg.write_text(_HAPROXY_CFG.format(vip=VIP, http_servers=servers, iperf_port=IPERF_PORT,
                                       iperf_backend=lab.backends[0].address))
    log = lab.dir / "haproxy.out"
    with vip_on_lo(lab):
        proc = lab.spawn(lab.lb, ["haproxy", "-db", "-f", str(cfg)], log=log)
        try:
            stage = Stage(pids=[proc.pid], labels=backend_labels(lab))
            try:
                check_answers(lab, stage)
            except LabError as exc:
                raise LabError(f"{exc}\nhaproxy: {log.read_text(errors='replace')}") from exc
            yield stage
        finally:
            proc.terminate()
            proc.wait(5)


@contextlib.contextmanager
def nfq_accept(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    script = lab.dir / f"accept_worker_{path.binding or 'netfilterqueue'}.py"
    script.write_text(_NETLINK_ACCEPT_WORKER if path.binding == "netlink" else _ACCEPT_WORKER)
    queues = list(range(ACCEPT_QUEUE, ACCEPT_QUEUE + path.workers))
    procs = []
    with kernel_dnat(lab, path, round_no) as stage:
        try:
            for q in queues:
                ready = lab.dir / f"accept-{q}.ready"
                ready.unlink(missing_ok=True)
                log = lab.dir / f"accept-{q}.out"
                procs.append(lab.spawn(lab.lb, [sys.executable, str(script), str(q),
                                                str(ready)], log=log))
                deadline = time.monotonic() + 10
                while not ready.exists():
                    if procs[-1].poll() is not None or time.monotonic() > deadline:
                        raise LabError(f"accept worker did not start:\n{log.read_text()}")
                    time.sleep(0.02)
            target = (["--queue-num", str(queues[0])] if len(queues) == 1 else
                      ["--queue-balance", f"{queues[0]}:{queues[-1]}"])
            queue = ["-j", "NFQUEUE", *target, "--queue-bypass"]
            specs = [["-d", VIP, "-p", "tcp", "-m", "multiport", "--dports",
                      f"80,{IPERF_PORT}", *queue]]
            specs += [["-s", b.address, "-p", "tcp", "-m", "multiport", "--sports",
                       f"{HTTP_PORT},{IPERF_PORT}", *queue] for b in lab.backends]
            with rules(lab, "raw", "PREROUTING", specs):
                stage.pids = [p.pid for p in procs]
                yield stage
        finally:
            for p in procs:
                p.terminate()
                p.wait(5)


def c_mark_binary(lab: Lab) -> Path:
    """The C worker of ``c-mark``, compiled into the lab's directory (once per run)."""
    binary = lab.dir / "c_mark_worker"
    if binary.exists():
        return binary
    source = lab.dir / "c_mark_worker.c"
    source.write_text(_C_MARK_WORKER % {"copy_range": COPY_RANGE})
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source),
                           "-lnetfilter_queue"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LabError(f"cannot compile the C worker (gcc and libnetfilter-queue-dev, as "
                       f"scripts/install-deps.sh installs them):\n{proc.stderr}")
    return binary


@contextlib.contextmanager
def c_mark(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    binary = c_mark_binary(lab)
    queues = list(range(C_MARK_QUEUE, C_MARK_QUEUE + path.workers))
    target = (["--queue-num", str(queues[0])] if len(queues) == 1 else
              ["--queue-balance", f"{queues[0]}:{queues[-1]}"])
    new = ["-d", VIP, "-p", "tcp", "-m", "multiport", "--dports", f"80,{IPERF_PORT}",
           "-m", "conntrack", "--ctstate", "NEW", "!", "--ctstatus", "CONFIRMED",
           "-j", "NFQUEUE", *target, "--queue-bypass"]  # (as nfqlb's offload-jumps.rules)
    http = ["-d", VIP, "-p", "tcp", "--dport", "80"]
    marks = C_MARKS[:len(lab.backends)]
    nat = [[*http, "-m", "mark", "--mark", hex(mark), "-j", "DNAT", "--to-destination",
            f"{b.address}:{HTTP_PORT}"] for mark, b in zip(marks, lab.backends, strict=True)]
    nat.append(["-d", VIP, "-p", "tcp", "--dport", str(IPERF_PORT), "-j", "DNAT",
                "--to-destination", f"{lab.backends[0].address}:{IPERF_PORT}"])
    procs = []
    with sysctl(lab, "net.ipv4.ip_forward", "1"), rules(lab, "nat", "PREROUTING", nat):
        try:
            for q in queues:
                ready = lab.dir / f"c-mark-{q}.ready"
                ready.unlink(missing_ok=True)
                log = lab.dir / f"c-mark-{q}.out"
                procs.append(lab.spawn(lab.lb, [str(binary), str(q), str(ready),
                                                *(hex(m) for m in marks)], log=log))
                deadline = time.monotonic() + 10
                while not ready.exists():
                    if procs[-1].poll() is not None or time.monotonic() > deadline:
                        raise LabError(f"the C worker did not start:\n{log.read_text()}")
                    time.sleep(0.02)
            with rules(lab, "mangle", "PREROUTING", [new]):
                yield Stage(pids=[p.pid for p in procs], labels=backend_labels(lab))
        finally:
            for p in procs:
                p.terminate()
                p.wait(5)


#: How long a backend keeps a connection in TIME_WAIT (Linux's TCP_TIMEWAIT_LEN), and a margin.
TIME_WAIT_S = 62.0


def snat_ports(use: int) -> str:
    """The fullnat pool of a use (``pool_use``): 7,500 ports, another range each use (four in
    turn: fullnat with one worker and with two in one round, then the next round's two),
    all below the ephemeral range (32768-60999) from which HAProxy connects from the same
    address. The backends keep a connection's TIME_WAIT for 60 s, and this kernel derives the
    client's TCP timestamp offset from the connection's addresses and ports as the client
    sees them: a SYN from a pool port the previous run of nfqlb used, for another client
    port, fails PAWS at the backend about half the time (a RST and a 1 s retransmission; a
    restarted nfqlb hands out its pool from the start, so nearly every new connection of
    the next round would meet one). Measured in the lab: 5,100 connections/s,
    then 82/s after a restart with the same pool (TcpExtPAWSTimewait on the backends)."""
    low = 2000 + (use % 4) * 7500
    return f"{low}-{low + 7499}"


def pool_use(round_no: int, workers: int) -> int:
    """Which pool a fullnat run takes: the one-worker and two-worker runs of a round come
    within a minute of each other, so each has its own (a shared one collapsed the second
    run's new connections from about 6,400/s to 75/s, the same PAWS rejects)."""
    return 2 * round_no + (workers - 1)


#: When each fullnat pool (``snat_ports``' four) was last given up (time.monotonic()).
_POOL_USED: dict[int, float] = {}


def pool_rested(pool: int) -> None:
    """Wait until the backends' TIME_WAIT of a pool's last run (60 s) is over: with few paths
    a round is shorter than a minute, and the third round's pool is the first's."""
    left = _POOL_USED.get(pool, -1e9) + TIME_WAIT_S - time.monotonic()
    if left > 0:
        print(f"    (waiting {left:.0f} s: the backends still hold this fullnat pool's "
              "TIME_WAIT from its last run)", flush=True)
        time.sleep(left)


def nfqlb_services(lab: Lab, mode: str, round_no: int, scheduler: str | None = None,
                   hashed: str | None = None) -> list[dict[str, object]]:
    """The HTTP service over both backends and the iperf3 service to one server."""
    extra: dict[str, object] = {} if scheduler is None else {"offload_scheduler": scheduler}
    if hashed:
        extra.update(policy=hashed, policy_options={"hash": "jhash"})
    http = lab.service(mode, **extra)
    iperf = lab.service(mode, name=f"iperf3-{mode}", port=IPERF_PORT,
                        backends=lab.backends[:1], **extra)
    iperf["backend"] = ([{"port": LOCAL_IPERF_PORT}] if mode == "local" else
                        [{"address": lab.backends[0].address, "port": IPERF_PORT}])
    if mode == "fullnat":
        http["snat_ports"] = iperf["snat_ports"] = snat_ports(round_no)
    return [http, iperf]


def nfqlb_daemon_keys(path: BenchPath) -> dict[str, object]:
    """The [daemon] keys a path sets beyond the lab's (none for the defaults, so that a tree
    without these keys still runs the plain paths)."""
    keys: dict[str, object] = {"workers": path.workers} if path.workers > 1 else {}
    if path.binding is not None:
        keys["binding"] = path.binding
    if path.bulk is not None:
        keys["bulk"] = path.bulk
    return keys


def nfqlb_refusal(lab: Lab, path: BenchPath) -> str | None:
    """``nfqlb check`` of the path's configuration: None, or the error it prints."""
    daemon = lab.nfqlb(*nfqlb_services(lab, path.mode or "", 0, path.scheduler, path.hashed),
                       daemon=nfqlb_daemon_keys(path))
    argv = daemon.argv
    command = argv[:argv.index("run")]
    proc = subprocess.run([*command, "check", "--config", str(daemon.config_path)],
                          capture_output=True, text=True, timeout=30, env=daemon.env,
                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return None
    return lr.nfqlb_error(proc.stderr or proc.stdout, str(daemon.config_path))


@contextlib.contextmanager
def nfqlb(lab: Lab, path: BenchPath, round_no: int) -> Iterator[Stage]:
    mode = path.mode or ""
    with contextlib.ExitStack() as stack:
        labels = backend_labels(lab)
        stage = Stage(labels=labels)
        if mode == "fullnat":
            stack.enter_context(backends_without_route(lab))
        elif mode == "local":
            stack.enter_context(vip_on_lo(lab))
            stage = Stage(labels=frozenset({lab.lb.label}), iperf_server="lb")
        use = pool_use(round_no, path.workers)
        if mode == "fullnat":
            pool_rested(use % 4)
        daemon = lab.nfqlb(*nfqlb_services(lab, mode, use, path.scheduler, path.hashed),
                           daemon=nfqlb_daemon_keys(path)).start()
        assert daemon.proc is not None
        stage.pids = [daemon.proc.pid]  # `ip netns exec` execs: the same pid
        try:
            yield stage
        finally:
            rc = daemon.stop()
            if mode == "fullnat":
                _POOL_USED[use % 4] = time.monotonic()
            if rc != 0 or "Traceback" in daemon.stderr:
                stage.notes.append(f"nfqlb exit {rc}\n{daemon.report()}")
            else:
                stage.details.append("nfqlb's counters at stop:\n" + daemon.stdout)


def _nfqlb_paths() -> list[BenchPath]:
    paths = []
    for workers, suffix, floor in ((1, "", "nfq-accept"), (2, "-w2", "nfq-accept-w2")):
        c_floor = "c-mark" + suffix
        label = "" if workers == 1 else f", {workers} workers"
        for mode in ("dnat", "fullnat", "local", "offload"):
            paths.append(BenchPath(f"nfqlb-{mode}{suffix}", f"nfqlb {mode}{label}", nfqlb,
                                   mode=mode, workers=workers,
                                   floor=c_floor if mode == "offload" else floor))
    # offload with the kernel playing the policy's schedule: no packet queued per new flow
    at = next(i for i, p in enumerate(paths) if p.name == "nfqlb-offload") + 1
    paths.insert(at, BenchPath("nfqlb-offload-kernel", "nfqlb offload, offload_scheduler = "
                               "\"kernel\"", nfqlb, mode="offload", scheduler="kernel"))
    paths.insert(at + 1, BenchPath("nfqlb-offload-kernel-mh", "nfqlb offload, kernel scheduler, "
                                   "maglev by jhash", nfqlb, mode="offload", scheduler="kernel",
                                   hashed="maglev"))
    # the NetfilterQueue binding on the main queue (the default is nfqlb's netlink client)
    paths.insert(1, BenchPath("nfqlb-dnat-nfq", "nfqlb dnat, NetfilterQueue binding", nfqlb,
                              mode="dnat", floor="nfq-accept", binding="netfilterqueue"))
    return paths


PATHS: list[BenchPath] = [
    BenchPath("direct", "direct to the backends (routed, no balancer)", direct),
    BenchPath(REFERENCE, "kernel iptables DNAT", kernel_dnat),
    BenchPath("haproxy", "HAProxy (tcp mode)", haproxy),
    BenchPath("nfq-accept", "accept-only Python worker (floor)", nfq_accept),
    BenchPath("nfq-accept-w2", "accept-only Python workers, 2 (floor)", nfq_accept,
              workers=2),
    BenchPath("nl-accept", "accept-only Python worker, nfqlb's netlink binding", nfq_accept,
              binding="netlink"),
    BenchPath("c-mark", "C worker marking new flows, kernel DNAT by mark (offload's floor)",
              c_mark),
    BenchPath("c-mark-w2", "C workers marking new flows, 2 (offload's floor)", c_mark,
              workers=2),
    *_nfqlb_paths(),
    BenchPath("nfqlb-dnat-whole", "nfqlb dnat, bulk = \"whole\" (large packets through nfqlb)",
              nfqlb, mode="dnat", floor="nfq-accept", bulk="whole", probe=True),
    BenchPath("nfqlb-offload-kernel-sh", "nfqlb offload, kernel scheduler, source_hash by "
              "jhash", nfqlb, mode="offload", scheduler="kernel", hashed="source_hash",
              probe=True),
]


# -- main -----------------------------------------------------------------------------------------

def pick_paths(spec: str | None) -> list[BenchPath]:
    """The paths named in ``spec`` (comma-separated; all when None), in PATHS' order, with the
    reference added when missing."""
    if not spec:
        return [p for p in PATHS if not p.probe]
    names = {n.strip() for n in spec.split(",") if n.strip()}
    known = {p.name for p in PATHS}
    if unknown := sorted(names - known):
        raise SystemExit(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if REFERENCE not in names:
        print(f"--paths: adding {REFERENCE}, the reference of every ratio")
        names.add(REFERENCE)
    return [p for p in PATHS if p.name in names]


def flush_conntrack(lab: Lab) -> None:
    if shutil.which("conntrack"):
        for host in (lab.client, lab.lb):
            lab.exec(host, ["conntrack", "-F"], check=False)


def snat_rules(sources: Sequence[str]) -> list[list[str]]:
    """Rules of a nat chain that give each new connection the next of ``sources``: rule i
    takes one in N - i of the connections the rules before it left."""
    n = len(sources)
    return [[*(["-m", "statistic", "--mode", "nth", "--every", str(n - i), "--packet", "0"]
               if i < n - 1 else []), "-j", "SNAT", "--to-source", address]
            for i, address in enumerate(sources)]


def spread_client(lab: Lab) -> None:
    """The client's connections to the VIPs leave from CLIENT_SOURCES in turn, those to the
    backends (the direct path) from DIRECT_SOURCES."""
    for address in [*CLIENT_SOURCES, *DIRECT_SOURCES]:
        lab.ip(lab.client, "addr", "add", f"{address}/24", "dev", "eth0")
    for chain, dst, sources in (("SPREAD-VIP", VIP_NET, CLIENT_SOURCES),
                                ("SPREAD-DIRECT", BACKEND_NET, DIRECT_SOURCES)):
        lab.exec(lab.client, ["iptables", "-t", "nat", "-N", chain])
        for rule in snat_rules(sources):
            lab.exec(lab.client, ["iptables", "-t", "nat", "-A", chain, *rule])
        lab.exec(lab.client, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-d", dst,
                              "-j", chain])


def first_line(what: BaseException | str) -> str:
    text = str(what).strip()
    return text.splitlines()[0] if text else type(what).__name__


def run(args: argparse.Namespace, paths: list[BenchPath]) -> list[lr.PathResult]:
    results = {p.name: lr.PathResult(p.name, p.title, p.floor) for p in paths}
    with Lab(2, backend_default_route=True, lb_servers=True, ipv6=False) as lab:
        spread_client(lab)
        for p in paths:
            if p.is_nfqlb and (error := nfqlb_refusal(lab, p)):
                results[p.name].status = f"n/a: {error}"
                print(f"{p.name}: n/a: {error}")
        active = [p for p in paths if results[p.name].status is None]
        # measured per path and round: about 1 s besides the runs (nfqlb's start, checks)
        estimate = len(active) * args.rounds * (
            args.warmup + 2 * args.seconds + 1.5 + (0 if args.skip_iperf
                                                    else 2 * (args.iperf_seconds + 0.3)))
        print(f"{len(active)} paths x {args.rounds} rounds, about {estimate / 60:.1f} min",
              flush=True)
        try:
            for rnd in range(args.rounds):
                order = active if rnd % 2 == 0 else active[::-1]
                print(f"round {rnd + 1} of {args.rounds}", flush=True)
                for p in order:
                    result = results[p.name]
                    flush_conntrack(lab)
                    problems: list[str] = []
                    try:
                        result.samples.append(measure_round(lab, p, rnd, args, problems))
                    except (LabError, lr.ParseError, subprocess.SubprocessError) as exc:
                        problems = [f"failed: {first_line(exc)}"]
                        print(f"  {p.name:<18} failed:\n    "
                              + str(exc).replace("\n", "\n    "), flush=True)
                    result.problems += [f"round {rnd + 1}: {x}" for x in problems]
        except KeyboardInterrupt:
            print("interrupted: the tables show the rounds done so far")
    for result in results.values():
        if result.status is None and not result.samples and result.problems:
            # it never ran: its first failure stands in for its figures
            result.status = result.problems[0].split(": ", 1)[1]
    return [results[p.name] for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", help="comma-separated path names (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="list the paths and exit")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each path once per round)")
    ap.add_argument("--seconds", type=int, default=3, help="length of each wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured wrk run before, s")
    ap.add_argument("--iperf-seconds", type=int, default=2, help="each iperf3 run")
    ap.add_argument("--skip-iperf", action="store_true", help="no iperf3 runs")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t")
    ap.add_argument("--verbose", action="store_true",
                    help="print nfqlb's counters after each of its rounds")
    args = ap.parse_args(argv)
    if args.list:
        for p in PATHS:
            print(f"{p.name:<20} {p.title}")
        return 0
    if min(args.rounds, args.seconds, args.iperf_seconds, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("--rounds, --seconds, --iperf-seconds and --threads must be >= 1")
    paths = pick_paths(args.paths)
    needed = ["wrk", "conntrack"]
    needed += ["haproxy"] if any(p.name == "haproxy" for p in paths) else []
    needed += [] if args.skip_iperf else ["iperf3"]
    needed += ["nft"] if any(p.is_nfqlb for p in paths) else []  # (daemon.bulk = "headers")
    ensure_tools(needed)
    heading = machine_heading(args)
    print("\n".join(heading), flush=True)
    results = run(args, paths)
    print()
    print(lr.report(results, REFERENCE, heading))
    return 0


if __name__ == "__main__":
    sys.exit(main())
