"""End to end: several instances on one host, the host's own traffic, the kernel queue.

- ICMP errors that are not nfqlb's stay the kernel's: a connection the balancer masquerades
  (not through any VIP) still gets its "fragmentation needed" and completes a large transfer
  over a narrow link; two instances on two queues each translate their own errors.
- Two instances that share a backend: fullnat, disjoint pools, both serve; dnat, refused with
  one line and exit 1, the first one's rules untouched.
- Several instances and a crash leave the host right: the sysctls stay while one instance
  needs them and come back to what they were before the first start, even after a SIGKILL.
- The queue length is a setting that reaches the kernel, and a flood of spoofed non-first
  fragments does not starve the queue.

Same lab as ``test_e2e_root.py`` (``tests/lab/``). Every daemon keeps its sysctl state in the
lab's own directory (NFQLB_STATE_DIR), never in the host's /run/nfqlb. Every traffic loop is
bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import (
    LB_CLIENT_ADDR,
    VIP,
    Lab,
    LabError,
    Nfqlb,
    blob_bytes,
    host_cmd,
    sha256,
)

pytestmark = pytest.mark.root

#: The second instance's queue: 3, so that the first one's may have two workers (queues 1 and
#: 2, with NFQLB_LAB_WORKERS=2) beside it.
QUEUE2 = 3

VIP2 = "198.18.100.2"
SMALL_MTU = 1280
BLOB_SHA256 = sha256(blob_bytes())
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv4.conf.all.accept_local")


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The daemons (which inherit the environment) keep their sysctl state here."""
    monkeypatch.setenv("NFQLB_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"


def stopped_cleanly(daemon: Nfqlb) -> dict[str, int]:
    code = daemon.stop()
    assert code == 0, f"nfqlb exit code {code}\n{daemon.report()}"
    blocks = daemon.stats()
    assert blocks, daemon.report()
    return blocks[-1]


def download(lab: Lab, url: str, name: str, max_time: float = 8) -> None:
    out = lab.dir / name
    lab.curl(lab.client, url, output=out, max_time=max_time)
    data = out.read_bytes()
    assert len(data) == len(blob_bytes()) and sha256(data) == BLOB_SHA256, url


def serving(daemon: Nfqlb, timeout: float = 10.0) -> Nfqlb:
    """Wait until ``daemon`` says it serves (start() returns as soon as its chain exists,
    which after a SIGKILL is at once: the dead instance's chains are still there)."""
    deadline = time.monotonic() + timeout
    while "serving queue" not in daemon.stderr_path.read_text(errors="replace"):
        if time.monotonic() > deadline or not daemon.running:
            raise LabError(f"nfqlb is not serving\n{daemon.report()}")
        time.sleep(0.05)
    return daemon


def sysctls(lab: Lab) -> dict[str, str]:
    return {name: lab.read_sysctl(lab.lb, name) for name in SYSCTLS}


def queue_stats(lab: Lab) -> dict[int, dict[str, int]]:
    """/proc/net/netfilter/nfnetlink_queue of the lb: queue -> total, dropped, user_dropped."""
    text = lab.exec(lab.lb, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.decode()
    out = {}
    for line in text.splitlines():
        f = [int(x) for x in line.split()]
        out[f[0]] = {"total": f[2], "dropped": f[5], "user_dropped": f[6]}
    return out


# -- ICMP errors that are not nfqlb's ----------------------------------------------------------


FAR_NET = "198.18.2.0/24"
FAR_ROUTER, FAR_SERVER = "198.18.2.1", "198.18.2.2"
UPLOAD = 1 << 20

# A TCP sink in the far namespace: reads until EOF, answers with the byte count (bounded).
_SINK = r'''
import socket, sys
srv = socket.create_server(("0.0.0.0", 9000))
open(sys.argv[1], "w").close()
srv.settimeout(30)
conn, _ = srv.accept()
conn.settimeout(15)
n = 0
while chunk := conn.recv(65536):
    n += len(chunk)
conn.sendall(str(n).encode())
conn.close()
'''
# The client's upload: "size" bytes, then the sink's count; one JSON line (bounded).
_UPLOAD = r'''
import json, socket, sys, time
a = json.loads(sys.argv[1])
t0 = time.monotonic()
try:
    s = socket.create_connection((a["dst"], 9000), timeout=a["timeout"])
    s.sendall(bytes(a["size"]))
    s.shutdown(socket.SHUT_WR)
    print(json.dumps({"received": int(s.recv(64) or b"-1"), "s": time.monotonic() - t0}))
except OSError as exc:
    print(json.dumps({"error": repr(exc), "s": time.monotonic() - t0}))
'''


def test_a_masqueraded_connection_of_the_host_keeps_path_mtu_discovery() -> None:
    """The lb masquerades the client's upload to a server beyond backend-2, which routes to it
    over a 1280-byte link and answers the client's 1500-byte segments with "fragmentation
    needed", addressed to the masquerading address (the lb's). Only conntrack, relating the
    error to the masqueraded connection, sends it on to the client with the quote put back:
    queued and NOTRACKed in raw PREROUTING (every ICMP error was, before), it is delivered to
    the lb itself, which has no such connection, and the upload stalls."""
    with Lab(2, backend_default_route=False, vip_on_lo=True) as lab:
        b1, router = lab.backends
        far = f"{lab.id}-far"
        host_cmd(["ip", "netns", "add", far])
        lab._namespaces.append(far)  # torn down with the lab
        host_cmd(["ip", "-n", router.ns, "link", "add", "eth1", "mtu", str(SMALL_MTU), "type",
                  "veth", "peer", "name", "eth0", "netns", far])
        host_cmd(["ip", "-n", router.ns, "addr", "add", f"{FAR_ROUTER}/24", "dev", "eth1"])
        host_cmd(["ip", "-n", router.ns, "link", "set", "eth1", "up"])
        for args in (["link", "set", "lo", "up"], ["addr", "add", f"{FAR_SERVER}/24", "dev",
                     "eth0"], ["link", "set", "eth0", "up"],
                     ["route", "add", "default", "via", FAR_ROUTER]):
            host_cmd(["ip", "-n", far, *args])
        lab.sysctl(router, "net.ipv4.ip_forward", "1")
        lab.ip(lab.lb, "route", "add", FAR_NET, "via", router.address)
        lab.ip(lab.client, "route", "add", FAR_NET, "via", LB_CLIENT_ADDR)
        lab.exec(lab.lb, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "br0",
                          "-j", "MASQUERADE"])
        ready = lab.dir / "sink.ready"
        sink = subprocess.Popen(["ip", "netns", "exec", far, sys.executable, "-c", _SINK,
                                 str(ready)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 5
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with lab.nfqlb(lab.service("fullnat", backends=[b1])) as daemon:
                args = {"dst": FAR_SERVER, "size": UPLOAD, "timeout": 8}
                out = lab.exec(lab.client, [sys.executable, "-c", _UPLOAD, json.dumps(args)],
                               timeout=20).stdout.decode()
                assert json.loads(out).get("received") == UPLOAD, out
                route = lab.exec(lab.client, ["ip", "route", "get", FAR_SERVER]).stdout
                assert f"mtu {SMALL_MTU}".encode() in route, route
                download(lab, f"http://{VIP}/blob", "balanced")  # nfqlb's own still works
            stopped_cleanly(daemon)
        finally:
            sink.kill()
            sink.wait(5)


def test_two_instances_on_two_queues_each_translate_their_own_errors() -> None:
    """As the PMTU test of test_e2e_wire_root.py, with two instances (two VIPs, two queues):
    each download needs its own instance to translate the lb's "fragmentation needed"."""
    with Lab(2, vip_on_lo=True) as lab:
        b1, b2 = lab.backends
        lab.ip(lab.lb, "addr", "add", f"{VIP2}/32", "dev", "lo")
        lab.ip(lab.lb, "link", "set", "eth0", "mtu", str(SMALL_MTU))
        one = lab.nfqlb(lab.service("dnat", backends=[b1]), queue=1).start()
        two = lab.nfqlb(lab.service("dnat", backends=[b2], vip=VIP2), queue=QUEUE2).start()
        download(lab, f"http://{VIP}/blob", "one")
        download(lab, f"http://{VIP2}/blob", "two")
        counts = [stopped_cleanly(d).get("icmp_error_translated", 0) for d in (two, one)]
        assert all(n > 0 for n in counts), counts


# -- two instances that share a backend --------------------------------------------------------


def test_two_fullnat_instances_share_a_backend_with_disjoint_pools() -> None:
    with Lab(1, backend_default_route=False) as lab:
        b = lab.backends[0]
        one = lab.nfqlb(lab.service("fullnat", snat_ports="20000-24999"), queue=1).start()
        two = lab.nfqlb(lab.service("fullnat", vip=VIP2, snat_ports="25000-29999"),
                        queue=QUEUE2).start()
        for i in range(6):
            for vip in (VIP, VIP2):
                body = lab.curl(lab.client, f"http://{vip}/", max_time=3)
                assert body.strip() == b"backend-1", (i, vip, body)
        ports = sorted(p for _, p, _ in lab.access_log(b))
        assert sum(20000 <= p <= 24999 for p in ports) == 6, ports
        assert sum(25000 <= p <= 29999 for p in ports) == 6, ports
        for d in (two, one):
            assert stopped_cleanly(d)["flows"] == 6, d.report()


def test_a_second_dnat_instance_on_the_same_backend_is_refused_and_touches_nothing() -> None:
    with Lab(1) as lab:
        first = lab.nfqlb(lab.service("dnat"), queue=1).start()
        before = lab.iptables_save(lab.lb)
        second = lab.nfqlb(lab.service("dnat", vip=VIP2), queue=2)
        with pytest.raises(LabError, match="exited with 1"):
            second.start(timeout=10)
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "198.18.1.2:8080/tcp" in lines[0], second.stderr
        assert "queue 1" in lines[0], lines
        assert lab.iptables_save(lab.lb) == before
        assert lab.curl(lab.client, f"http://{VIP}/").strip() == b"backend-1"
        stopped_cleanly(first)


# -- sysctls across instances and a crash ------------------------------------------------------


def test_sysctls_stay_while_needed_and_come_back_after_a_sigkill(private_state: Path) -> None:
    with Lab(2) as lab:
        b1, b2 = lab.backends
        original = sysctls(lab)
        assert original == {name: "0" for name in SYSCTLS}, original
        saved = lab.iptables_save(lab.lb)
        svc1 = lab.service("dnat", backends=[b1])
        svc2 = lab.service("dnat", backends=[b2], vip=VIP2)
        one = lab.nfqlb(svc1, queue=1).start()
        two = lab.nfqlb(svc2, queue=QUEUE2).start()
        assert sysctls(lab) == {name: "1" for name in SYSCTLS}
        stopped_cleanly(one)
        # the other instance still forwards
        assert sysctls(lab)["net.ipv4.ip_forward"] == "1"
        assert lab.curl(lab.client, f"http://{VIP2}/", max_time=3).strip() == b"backend-2"
        # SIGKILL: nothing restored, rules left behind
        assert two.proc is not None
        two.proc.send_signal(signal.SIGKILL)
        two.stop()
        assert sysctls(lab)["net.ipv4.ip_forward"] == "1"
        again = serving(lab.nfqlb(svc2, queue=QUEUE2).start())  # its chains are there already
        assert lab.curl(lab.client, f"http://{VIP2}/", max_time=3).strip() == b"backend-2"
        stopped_cleanly(again)
        assert sysctls(lab) == original, again.report()
        assert lab.iptables_save(lab.lb) == saved
        assert not list(private_state.glob("sysctl-*.json"))


# -- the kernel queue ----------------------------------------------------------------------------

# Non-first IPv4 fragments (offset 1480, no MF) of datagrams ("proto") that never come whole, each
# with its own id, from "sources" spoofed addresses of the client's subnet, paced over
# "seconds" and never longer than "budget".
_FRAGMENTS = r'''
import json, random, socket, struct, sys, time
a = json.loads(sys.argv[1])
dst = socket.inet_aton(a["dst"])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rng = random.Random(a["seed"])
sources = [socket.inet_aton(f"198.18.0.{10 + i % 200}") for i in range(a["sources"])]
start = time.monotonic()
sent = 0
for i in range(a["count"]):
    if time.monotonic() - start > a["budget"]:
        break
    payload = rng.randbytes(64)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), rng.getrandbits(16),
                     1480 // 8, 64, a["proto"], 0, sources[i % len(sources)], dst)
    sock.sendto(ip + payload, (a["dst"], 0))
    sent += 1
    ahead = start + (i + 1) * a["seconds"] / a["count"] - time.monotonic()
    if ahead > 0.002:
        time.sleep(ahead)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}))
'''


def send_fragments(lab: Lab, count: int, seconds: float, sources: int, name: str,
                   proto: int = 6) -> tuple[subprocess.Popen[bytes], Path]:
    args = {"dst": VIP, "count": count, "seconds": seconds, "budget": seconds + 3,
            "sources": sources, "seed": 8, "proto": proto}
    out = lab.dir / f"{name}.out"
    return lab.spawn(lab.client, [sys.executable, "-c", _FRAGMENTS, json.dumps(args)],
                     log=out), out


def test_queue_maxlen_reaches_the_kernel() -> None:
    """More fragments held than the old fixed 1024 slots: all sit in the queue, none dropped."""
    with Lab(1) as lab:
        lab.sysctl(lab.lb, "net.ipv4.conf.all.rp_filter", "0")
        daemon = lab.nfqlb(lab.service("dnat", protocol="udp"),
                           daemon={"queue_maxlen": 16384, "max_fragments": 3000,
                                   "max_fragments_per_source": 3000})
        with daemon:
            proc, out = send_fragments(lab, 2000, 1.0, 20, "held", proto=17)
            proc.wait(10)
            time.sleep(0.5)
            stats = queue_stats(lab)[1]
            assert stats["total"] >= 1500 and stats["dropped"] == 0, (stats, out.read_text())
        stopped_cleanly(daemon)


FLOOD = 6000
FLOOD_SECONDS = 3.0


@pytest.mark.skipif(os.environ.get("NFQLB_SKIP_FRAG_FLOOD") == "1", reason="asked to skip")
def test_a_fragment_flood_does_not_starve_the_queue() -> None:
    """Issue 8, "Fragments cannot starve the queue": 2000 spoofed non-first fragments a
    second for 3 s (more than max_fragments, from 200 sources) while curl goes on through
    the VIP. The queue never overflows and every request is answered."""
    with Lab(1) as lab:
        lab.sysctl(lab.lb, "net.ipv4.conf.all.rp_filter", "0")
        with lab.nfqlb(lab.service("dnat"), args=["--stats-interval", "0.5"]) as daemon:
            assert lab.curl(lab.client, f"http://{VIP}/").strip() == b"backend-1"
            flood, out = send_fragments(lab, FLOOD, FLOOD_SECONDS, 200, "flood")
            answers: list[bool] = []
            deadline = time.monotonic() + FLOOD_SECONDS + 8
            while flood.poll() is None and len(answers) < 60 and time.monotonic() < deadline:
                try:
                    answers.append(lab.curl(lab.client, f"http://{VIP}/", max_time=2)
                                   .strip() == b"backend-1")
                except LabError:
                    answers.append(False)
            flood.wait(max(1.0, deadline - time.monotonic()))
            sent = json.loads(out.read_text().splitlines()[-1])["sent"]
            after = lab.curl(lab.client, f"http://{VIP}/", max_time=2).strip()
            stats = queue_stats(lab)[1]
        final = stopped_cleanly(daemon)
        assert sent == FLOOD, out.read_text()
        assert len(answers) >= 3 and all(answers), answers
        assert after == b"backend-1"
        assert stats["dropped"] == 0 and stats["user_dropped"] == 0, stats
        assert final.get("packets", 0) >= FLOOD, daemon.report()
