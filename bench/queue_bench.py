"""Queue transport benchmark: packets/s through NetfilterQueue vs nfqlb's netlink client.

Is the pure-Python netlink client (``nfqlb/io/netlink.py``) fast enough to carry all traffic,
or only the packets the binding cannot? Both are measured on the same traffic, in a network
namespace of their own, with the adapters nfqlb runs (same event-loop shape: wait for the
socket, ``on_readable`` handles up to BUDGET packets) and a handler that only counts:

  nfq-accept      nfqlb.io.nfqueue.QueueAdapter (NetfilterQueue 1.1.0), handler -> ACCEPT
  netlink-accept  nfqlb.io.netlink.NetlinkQueueAdapter, handler -> ACCEPT
  nfq-rewrite     QueueAdapter, handler returns the packet as new bytes (a payload verdict)
  netlink-rewrite NetlinkQueueAdapter, the same
  nfq-run         reference: the binding's own C loop (``nfq.run()``), callback pkt.accept()

Traffic: a sender process sends UDP datagrams over lo to a socket nobody reads (the kernel
drops them there once it is full, silently); a rule in raw OUTPUT queues them. A queued packet
holds the sender's socket buffer until its verdict, so the sender is paced by the worker
(blocking sendto, no queue overflow): the rate is the worker's. Sender and worker are pinned
to different CPUs when there are two. Each run is bounded by a packet count and a time limit;
the rate is packets handled / time from the first to the last, the median of ``--rounds``
(run interleaved, after a warm-up run).
The worker's CPU time per packet is shown too, with how busy the worker was: below ~95 % the
sender (whose system calls also do the kernel's queueing work) set the pace, and "1 core
pkt/s" (1 / CPU time per packet) is the better measure of what the worker could carry. Sizes:
datagram payloads (the IP packet is 28 bytes more); 8000 bytes only through netlink (the
binding never gets it whole). ``--senders N`` runs N senders at once (each its own socket):
with one, a packet is rarely queued behind another and each wakeup handles about one; with
several, packets wait in the queue and the netlink client's batching (all verdicts of a
wakeup in one sendmsg) comes into play.

    python bench/queue_bench.py [--packets 100000] [--seconds 10] [--rounds 3] [--senders 1]

Needs root, iproute2, iptables and the netfilterqueue binding. Traffic stays in a namespace of
its own, on 198.18.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADDR = "198.18.0.1"
PORT = 9999
QUEUE = 3

_WORKER = r'''
import json, logging, os, resource, select, sys, time
kind, queue, count, seconds, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
log = logging.getLogger("bench")
n = 0
first = last = 0.0
rewrite = kind.endswith("rewrite")

def handle(data, now):
    global n
    n += 1
    return bytes(data) if rewrite else 0

if kind == "nfq-run":
    from netfilterqueue import NetfilterQueue
    import signal
    nfq = NetfilterQueue()
    def cb(pkt):
        global n, first, last
        n += 1
        last = time.perf_counter()
        if n == 1:
            first = last
        pkt.accept()
        if n >= count:
            raise KeyboardInterrupt
    nfq.bind(queue, cb, max_len=4096)
    def stop(*_args):
        raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(seconds) + 1)
    print("ready", flush=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        nfq.run()
    except KeyboardInterrupt:
        pass
    r1 = resource.getrusage(resource.RUSAGE_SELF)
else:
    if kind.startswith("nfq"):
        from nfqlb.io.nfqueue import QueueAdapter as Adapter
    else:
        from nfqlb.io.netlink import NetlinkQueueAdapter as Adapter
    adapter = Adapter(handle, queue, log)
    adapter.bind(4096)
    ep = select.epoll()
    ep.register(adapter.fileno(), select.EPOLLIN)
    print("ready", flush=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + seconds + 5
    while n < count and time.monotonic() < deadline:
        if ep.poll(0.2):
            before = n
            adapter.on_readable()
            if n:
                last = time.perf_counter()
                if before == 0:
                    first = last
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    adapter.drain()
    adapter.unbind()
cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"packets": n, "elapsed": last - first, "cpu": cpu_s}), flush=True)
'''

_SENDER = r'''
import os, socket, sys, time
size, count, seconds, cpu = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # nobody reads: no ICMP, cheap drops
sink.bind((sys.argv[5], int(sys.argv[6])))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)  # paced by the worker's verdicts; a stuck worker ends the run
data = bytes(size)
dst = (sys.argv[5], int(sys.argv[6]))
deadline = time.monotonic() + seconds
sent = 0
try:
    while sent < count:
        s.sendto(data, dst)
        sent += 1
        if not sent & 1023 and time.monotonic() > deadline:
            break
except (TimeoutError, OSError):
    pass
print(sent, flush=True)
'''


def sh(ns: str, *argv: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def run_once(ns: str, kind: str, size: int, packets: int, seconds: float,
             senders: int = 1) -> dict[str, float]:
    cpus = sorted(os.sched_getaffinity(0))
    worker_cpu, sender_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _WORKER, kind, str(QUEUE),
         str(packets), str(seconds), str(worker_cpu)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if line != "ready\n":
            raise SystemExit(f"{kind} worker did not start: {line}{worker.stderr.read()}")
        procs = [subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _SENDER, str(size),
             str(-(-packets // senders)), str(seconds), str(sender_cpu), ADDR, str(PORT + i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(senders)]
        sent = 0
        for proc in procs:
            sout, _ = proc.communicate(timeout=seconds + 30)
            sent += int(sout.strip() or 0)
        out, err = worker.communicate(timeout=seconds + 30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    if worker.returncode != 0 or not out.strip():
        raise SystemExit(f"{kind} worker failed ({worker.returncode}): {err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["sent"] = sent
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=100_000, help="per run (default 100000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="64,1400,8000", help="UDP payload sizes")
    parser.add_argument("--senders", type=int, default=1, help="sender processes at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace, iptables, NFQUEUE)")
    ns = f"nfqlb-qbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        sh(ns, "ip", "link", "set", "lo", "up")
        sh(ns, "ip", "addr", "add", f"{ADDR}/32", "dev", "lo")
        sh(ns, "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport",
           f"{PORT}:{PORT + args.senders - 1}", "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        print(f"{len(os.sched_getaffinity(0))} CPUs; {args.packets} packets or "
              f"{args.seconds:g} s per run, {args.senders} sender(s), median of {args.rounds} "
              "rounds\n")
        print(f"{'size':>6}  {'worker':<16} {'packets/s':>10}  {'us/packet':>9}  "
              f"{'cpu us/pkt':>10}  {'busy':>5}  {'1 core pkt/s':>12}  {'handled':>8}")
        summary = []
        for size in (int(s) for s in args.sizes.split(",")):
            kinds = ["nfq-run", "nfq-accept", "netlink-accept", "nfq-rewrite", "netlink-rewrite"]
            if size + 28 > 3960:
                kinds = ["netlink-accept", "netlink-rewrite"]
            rates: dict[str, float] = {}
            capacity: dict[str, float] = {}
            run_once(ns, kinds[-1], size, args.packets // 10, args.seconds,
                     args.senders)  # warm-up
            results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
            for _ in range(args.rounds):  # interleaved: load from elsewhere hits all alike
                for kind in kinds:
                    results[kind].append(run_once(ns, kind, size, args.packets, args.seconds,
                                                  args.senders))
            for kind in kinds:
                rounds = results[kind]
                per = [r["packets"] / r["elapsed"] for r in rounds if r["elapsed"] > 0]
                rate = statistics.median(per) if per else 0.0
                cpu = statistics.median(r["cpu"] / max(r["packets"], 1) for r in rounds)
                busy = statistics.median(r["cpu"] / r["elapsed"] for r in rounds
                                         if r["elapsed"] > 0) if per else 0.0
                handled = int(statistics.median(r["packets"] for r in rounds))
                rates[kind] = rate
                capacity[kind] = 1 / cpu if cpu else 0.0
                print(f"{size:>6}  {kind:<16} {rate:>10,.0f}  {1e6 / rate if rate else 0:>9.2f}"
                      f"  {cpu * 1e6:>10.2f}  {busy:>5.0%}  {capacity[kind]:>12,.0f}"
                      f"  {handled:>8}", flush=True)
            for what in ("accept", "rewrite"):
                nfq, nl = rates.get(f"nfq-{what}"), rates.get(f"netlink-{what}")
                if nfq and nl:
                    cap = capacity[f"netlink-{what}"] / capacity[f"nfq-{what}"]
                    summary.append(f"{size:>6} B {what:<8} packets/s {nl / nfq:.2f}   "
                                   f"per core of worker CPU {cap:.2f}")
            print()
        print("netlink client / NetfilterQueue adapter:")
        print("\n".join(summary))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
