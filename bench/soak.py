"""Soak benchmark: mixed load and floods through ``nfqlb run`` in the namespace lab, bounded.

Builds the lab of ``tests/lab`` (client, lb, two nginx backends with the UDP server), runs
``nfqlb run`` in the lb namespace with a fullnat TCP service (VIP:80 -> backends :8080, source
ports 20000-29999) and a dnat UDP service (VIP:5353 -> backends :5353), and from the client
namespace, for ``--seconds`` (default 600):

  keep-alive HTTP   threads each on one connection, GET / and check the backend's answer
  short HTTP        threads each opening a new connection per request (Connection: close)
  downloads         a thread fetching /blob (1 MiB) again and again, checking its sha256
  UDP               threads sending datagrams to the VIP and waiting for the echoed answer
                    (a new socket, i.e. a new flow, every 50 exchanges)
  SYN flood         every ``--flood-every`` s, ``--flood-seconds`` of spoofed SYNs to VIP:80
                    (sources in 198.18.0.10-250, correct checksums) at ``--syn-rate``/s
  fragment flood    half a period later, as long, non-first IPv4 fragments to the VIP
                    (spoofed sources, random ids and offsets) at ``--frag-rate``/s

Each legitimate request has a time limit (5 s, a download 30 s); one that fails or times out
is a failure, counted by kind and cause. Every ``--report-every`` s the benchmark prints the
requests and failures so far, the RSS of the nfqlb process, the flow table size (from the
counters nfqlb prints on SIGUSR1) and the kernel's queue drops (the ``kernel:`` line under
each queue); at the end a summary with the RSS over time. Exit status 1 if legitimate
traffic failed.

    python bench/soak.py [--seconds 600] [--report-every 15] [--no-floods]

Needs root, iproute2, iptables, nginx. Every loop is bounded in time and count; all traffic
stays in the lab's namespaces (198.18.0.0/15). The daemon runs with this interpreter from
this tree (cwd and PYTHONPATH of the checkout; the start line shows the file it imported).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests"))

VIP = "198.18.100.1"
HTTP_TIMEOUT = 5.0
BLOB_TIMEOUT = 30.0
UDP_TIMEOUT = 2.0
SLOW_S = 0.9  # a request slower than this waited for a retransmission (SYN: 1 s)


# ================================================================ inside the client namespace

class Tally:
    """Counts shared by the load threads; dumped as one JSON line a second."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: dict[str, int] = {}
        self.fail: dict[str, dict[str, int]] = {}
        self.slow: dict[str, int] = {}  # succeeded, but took over SLOW_S (a retransmission)

    def good(self, kind: str, started: float) -> None:
        with self.lock:
            self.ok[kind] = self.ok.get(kind, 0) + 1
            if time.monotonic() - started > SLOW_S and kind != "download":
                self.slow[kind] = self.slow.get(kind, 0) + 1

    def bad(self, kind: str, cause: str) -> None:
        with self.lock:
            causes = self.fail.setdefault(kind, {})
            causes[cause] = causes.get(cause, 0) + 1

    def dump(self) -> str:
        with self.lock:
            return json.dumps({"t": time.monotonic(), "ok": self.ok, "fail": self.fail,
                               "slow": self.slow})


def _cause(exc: BaseException) -> str:
    return type(exc).__name__ + (f"({exc.errno})" if isinstance(exc, OSError) and exc.errno
                                 else "")


def _http_get(conn: Any, path: str, close: bool) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Connection": "close"} if close else {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def client_role(args: argparse.Namespace) -> None:
    """The legitimate load, until the deadline; a JSON line of counts every second."""
    import hashlib
    import http.client

    from lab.servers import blob_bytes

    blob_sha = hashlib.sha256(blob_bytes()).hexdigest()
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    pace = 1.0 / args.rate  # per thread

    def paced(loop_start: float) -> None:
        left = loop_start + pace - time.monotonic()
        if left > 0:
            time.sleep(left)

    def keepalive() -> None:
        conn = None
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(VIP, 80, timeout=HTTP_TIMEOUT)
                status, body = _http_get(conn, "/", False)
                if status == 200 and body.startswith(b"backend-"):
                    tally.good("http_keepalive", t)
                else:
                    tally.bad("http_keepalive", f"status {status}")
            except Exception as exc:
                tally.bad("http_keepalive", _cause(exc))
                if conn is not None:
                    conn.close()
                conn = None
            paced(t)

    def short() -> None:
        while time.monotonic() < deadline:
            t = time.monotonic()
            conn = http.client.HTTPConnection(VIP, 80, timeout=HTTP_TIMEOUT)
            try:
                status, body = _http_get(conn, "/", True)
                if status == 200 and body.startswith(b"backend-"):
                    tally.good("http_short", t)
                else:
                    tally.bad("http_short", f"status {status}")
            except Exception as exc:
                tally.bad("http_short", _cause(exc))
            finally:
                conn.close()
            paced(t)

    def download() -> None:
        while time.monotonic() < deadline - 5:
            t = time.monotonic()
            conn = http.client.HTTPConnection(VIP, 80, timeout=BLOB_TIMEOUT)
            try:
                status, body = _http_get(conn, "/blob", True)
                if status == 200 and hashlib.sha256(body).hexdigest() == blob_sha:
                    tally.good("download", t)
                else:
                    tally.bad("download", f"status {status}, {len(body)} bytes")
            except Exception as exc:
                tally.bad("download", _cause(exc))
            finally:
                conn.close()

    def udp(n: int) -> None:
        sock = None
        i = 0
        while time.monotonic() < deadline:
            t = time.monotonic()
            if sock is None or i % 50 == 0:
                if sock is not None:
                    sock.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.settimeout(UDP_TIMEOUT)
            i += 1
            payload = f"soak-{n}-{i}".encode()
            try:
                sock.sendto(payload, (VIP, 5353))
                while True:  # skip late answers to earlier datagrams
                    reply = sock.recv(2048)
                    if reply.endswith(b":" + payload):
                        tally.good("udp", t)
                        break
            except Exception as exc:
                tally.bad("udp", _cause(exc))
            paced(t)

    threads = ([threading.Thread(target=keepalive) for _ in range(args.keepalive)]
               + [threading.Thread(target=short) for _ in range(args.short)]
               + [threading.Thread(target=download) for _ in range(args.downloads)]
               + [threading.Thread(target=udp, args=(n,)) for n in range(args.udp)])
    for th in threads:
        th.daemon = True
        th.start()
    while time.monotonic() < deadline:
        print(tally.dump(), flush=True)
        time.sleep(1.0)
    for th in threads:
        th.join(timeout=BLOB_TIMEOUT + 5)
    print(tally.dump(), flush=True)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, ident: int, frag: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0,
                       src, dst)
    return head[:10] + struct.pack("!H", _csum(head)) + head[12:] + payload


def flood_role(args: argparse.Namespace) -> None:
    """Bursts of spoofed SYNs and of non-first fragments, on a schedule, bounded."""
    rng = random.Random(args.seed)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst = socket.inet_aton(VIP)
    start = time.monotonic()
    deadline = start + args.seconds
    sent = {"syn": 0, "fragment": 0}

    def spoofed() -> bytes:
        return bytes((198, 18, 0, rng.randint(10, 250)))

    def syn() -> bytes:
        src = spoofed()
        tcp = struct.pack("!HHIIBBHHH", rng.randint(1024, 65535), 80, rng.getrandbits(32), 0,
                          5 << 4, 0x02, 65535, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
        return _ipv4(src, dst, 6, rng.getrandbits(16), 0x4000, tcp)

    def fragment() -> bytes:
        frag = rng.randint(1, 1000) | (0x2000 if rng.random() < 0.7 else 0)  # offset, MF
        return _ipv4(spoofed(), dst, rng.choice((6, 17)), rng.getrandbits(16), frag,
                     rng.randbytes(64))

    period, burst = args.flood_every, args.flood_seconds
    schedule = [(start + k * period + period / 3, "syn", args.syn_rate, syn)
                for k in range(int(args.seconds // period) + 1)]
    schedule += [(start + k * period + period * 5 / 6 - burst, "fragment", args.frag_rate,
                  fragment) for k in range(int(args.seconds // period) + 1)]
    schedule.sort(key=lambda s: s[0])
    for at, kind, rate, build in schedule:
        if at + burst > deadline - 5:
            continue
        time.sleep(max(0.0, at - time.monotonic()))
        print(json.dumps({"burst": kind, "at": round(at - start, 1), "rate": rate}), flush=True)
        end = at + burst
        n = 0
        while (now := time.monotonic()) < end and n < rate * burst:
            due = int((now - at) * rate) - n  # packets behind schedule, sent in one go
            for _ in range(min(due, 200)):
                try:
                    raw.sendto(build(), (VIP, 0))
                except OSError:
                    pass  # a full socket buffer: that packet is lost, the burst goes on
                n += 1
            time.sleep(0.005)
        sent[kind] += n
        print(json.dumps({"burst_done": kind, "sent": n}), flush=True)
    print(json.dumps({"sent": sent}), flush=True)


# ================================================================ the orchestration (host)

def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def daemon_pid(popen_pid: int) -> int:
    """The nfqlb python process: ``ip netns exec`` execs it in place (or is its parent)."""
    cmd = Path(f"/proc/{popen_pid}/cmdline").read_bytes()
    if b"nfqlb" in cmd and not cmd.startswith(b"ip\0"):
        return popen_pid
    children = Path(f"/proc/{popen_pid}/task/{popen_pid}/children").read_text().split()
    return int(children[0]) if children else popen_pid


KERNEL = re.compile(r"^queue (\d+)[^\n]*\n  kernel: (\d+) queue_dropped, (\d+) user_dropped",
                    re.M)


def kernel_drops(text: str) -> dict[int, tuple[int, int]]:
    """The last ``kernel:`` figures printed for each queue: (queue_dropped, user_dropped)."""
    return {int(q): (int(a), int(b)) for q, a, b in KERNEL.findall(text)}


def last_json(path: Path) -> dict[str, Any]:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("{")]
    for line in reversed(lines):
        try:
            value: dict[str, Any] = json.loads(line)
            if "ok" in value:
                return value
        except json.JSONDecodeError:
            continue
    return {"ok": {}, "fail": {}}


def fails_of(tally: dict[str, Any]) -> int:
    return sum(sum(c.values()) for c in tally["fail"].values())


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True,
                              text=True).stdout.strip()
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "nfqlb") else ""
    head, branch = git("rev-parse", "--short", "HEAD"), git("rev-parse", "--abbrev-ref", "HEAD")
    return f"{head} on {branch}{dirty}"


def orchestrate(args: argparse.Namespace) -> int:
    from lab import Lab, LabError

    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, iptables, NFQUEUE)")
        return 2
    print(f"soak: {args.seconds:.0f} s, nfqlb at {commit()}", flush=True)
    with Lab(backends=2, backend_default_route=True, ipv6=False) as lab:
        tcp = lab.service("fullnat", name="web")
        udp = lab.service("dnat", protocol="udp", name="dns")
        d = lab.nfqlb(tcp, udp)
        d.start()
        pid = daemon_pid(d.proc.pid)  # type: ignore[union-attr]
        where = lab.exec(lab.lb, [sys.executable, "-c", "import nfqlb; print(nfqlb.__file__)"],
                         check=False).stdout.decode().strip()
        print(f"nfqlb pid {pid}; `import nfqlb` in the lab: {where} (cwd {REPO})", flush=True)
        role_args = [f"--seconds={args.seconds}", f"--rate={args.rate}",
                     f"--keepalive={args.keepalive}", f"--short={args.short}",
                     f"--downloads={args.downloads}", f"--udp={args.udp}"]
        client_log = lab.dir / "soak-client.log"
        flood_log = lab.dir / "soak-flood.log"
        client = lab.spawn(lab.client, [sys.executable, str(HERE), "--role=client", *role_args],
                           log=client_log, cwd=REPO)
        flood = None
        if not args.no_floods:
            flood = lab.spawn(lab.client, [
                sys.executable, str(HERE), "--role=flood", f"--seconds={args.seconds}",
                f"--flood-every={args.flood_every}", f"--flood-seconds={args.flood_seconds}",
                f"--syn-rate={args.syn_rate}", f"--frag-rate={args.frag_rate}"],
                log=flood_log, cwd=REPO)
        start = time.monotonic()
        samples: list[tuple[float, int, int, int]] = []  # t, rss kB, flows active, held frags
        prev_ok: dict[str, int] = {}
        printed_bursts = 0
        try:
            while (elapsed := time.monotonic() - start) < args.seconds + BLOB_TIMEOUT:
                if elapsed >= args.seconds:  # the load threads finish their last requests
                    if client.poll() is None or (flood is not None and flood.poll() is None):
                        time.sleep(0.5)
                        continue
                else:
                    time.sleep(min(args.report_every, max(0.5, args.seconds - elapsed)))
                if not d.running:
                    raise LabError(f"nfqlb stopped\n{d.report()}")
                d.signal(signal.SIGUSR1)
                time.sleep(0.3)
                out = d.output_so_far()
                stats = d.stats()[-1] if d.stats() else {}
                kd = kernel_drops(out)
                rss = rss_kb(pid) or 0
                t = time.monotonic() - start
                samples.append((t, rss, stats.get("active", -1), stats.get("fragment_held", 0)))
                tally = last_json(client_log)
                ok = tally["ok"]
                per = "  ".join(f"{k} {v} (+{v - prev_ok.get(k, 0)})"
                                for k, v in sorted(ok.items()))
                prev_ok = dict(ok)
                qd = ", ".join(f"q{q} {a}/{b}" for q, (a, b) in sorted(kd.items()))
                bursts = []
                if flood is not None:
                    lines = flood_log.read_text(errors="replace").splitlines()
                    bursts = [json.loads(x) for x in lines[printed_bursts:] if x.startswith(
                        '{"burst_done"')]
                    printed_bursts = len(lines)
                burst_text = "".join(f"  [{b['burst_done']} burst: {b['sent']} sent]"
                                     for b in bursts)
                slow = sum(tally.get("slow", {}).values())
                print(f"t={t:5.0f}s  {per}  failures {fails_of(tally)}  slow {slow}"
                      f"  rss {rss / 1024:.1f} MB"
                      f"  flows {stats.get('active', '?')} active / {stats.get('flows', '?')} total"
                      f"  kernel drops (queue/user) {qd}{burst_text}", flush=True)
                if elapsed >= args.seconds:
                    break
        finally:
            for proc in (client, flood):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)
            d.stop()
        tally = last_json(client_log)
        final = d.stats()[-1] if d.stats() else {}
        kd = kernel_drops(d.stdout)
        flood_sent = {}
        if flood is not None:
            for line in flood_log.read_text(errors="replace").splitlines():
                if line.startswith('{"sent"'):
                    flood_sent = json.loads(line)["sent"]
        print("\n== summary")
        print(f"nfqlb at {commit()}, {args.seconds:.0f} s, floods "
              + ("off" if flood is None else f"every {args.flood_every:.0f} s for "
                 f"{args.flood_seconds:.0f} s ({args.syn_rate} SYN/s, {args.frag_rate} "
                 f"fragments/s): sent {flood_sent}"))
        total = sum(tally["ok"].values())
        print(f"requests ok: {total} (" + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(tally["ok"].items())) + ")")
        fails = fails_of(tally)
        print(f"failures of legitimate traffic: {fails}"
              + (f" {json.dumps(tally['fail'])}" if fails else ""))
        slow = tally.get("slow", {})
        print(f"slow but successful (over {SLOW_S} s: waited for a retransmission): "
              f"{sum(slow.values())}" + (f" {json.dumps(slow)}" if slow else ""))
        warm = [s for s in samples if s[0] >= min(60.0, args.seconds / 3)] or samples
        if warm:
            lo, hi = min(s[1] for s in warm), max(s[1] for s in warm)
            print(f"nfqlb RSS after warm-up: {lo / 1024:.1f}-{hi / 1024:.1f} MB (first sample "
                  f"{samples[0][1] / 1024:.1f} MB, last {samples[-1][1] / 1024:.1f} MB)")
        print("RSS MB over time: " + " ".join(f"{s[0]:.0f}s:{s[1] / 1024:.1f}" for s in samples))
        print("flows active over time: " + " ".join(f"{s[0]:.0f}s:{s[2]}" for s in samples))
        print(f"flows at exit: {final.get('flows', '?')} installed, {final.get('active', '?')} "
              f"active; drops and events "
              + ", ".join(f"{k} {v}" for k, v in sorted(final.items())
                          if k not in ("packets", "rewritten", "flows", "active")))
        print("kernel queue drops at exit (queue_dropped/user_dropped): "
              + ", ".join(f"queue {q}: {a}/{b}" for q, (a, b) in sorted(kd.items())))
        print("nfqlb's last counters:\n" + "\n".join(
            "  " + ln for ln in d.stdout.strip().splitlines()[-12:]))
        return 1 if fails else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--report-every", type=float, default=15.0)
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s per load thread")
    ap.add_argument("--keepalive", type=int, default=4, help="keep-alive HTTP threads")
    ap.add_argument("--short", type=int, default=2, help="short-connection HTTP threads")
    ap.add_argument("--downloads", type=int, default=1, help="/blob download threads")
    ap.add_argument("--udp", type=int, default=2, help="UDP request/response threads")
    ap.add_argument("--no-floods", action="store_true")
    ap.add_argument("--flood-every", type=float, default=60.0)
    ap.add_argument("--flood-seconds", type=float, default=5.0)
    ap.add_argument("--syn-rate", type=int, default=2000)
    ap.add_argument("--frag-rate", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--role", choices=("client", "flood"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "client":
        client_role(args)
        return 0
    if args.role == "flood":
        flood_role(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
