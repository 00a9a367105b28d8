"""End to end: mode "offload", where nfqlb decides a flow's first packet and the kernel's
conntrack NAT carries the flow (real nginx, curl and UDP clients in the lab's namespaces).

- New flows spread over both backends (round_robin), IPv4 and IPv6, TCP and UDP; every later
  packet stays in the kernel: nfqlb's offload queue sees one packet per flow.
- With a snat_address the backends see the balancer as the client, and reply through it
  without a route to the clients.
- A backend whose health check fails gets no new flow; with ``on_backend_down = "reset"`` its
  conntrack entries are removed and an open connection to it is broken (its next segment is
  an unknown flow: the client gets a RST).
- ``nfqlb ctl drain`` sends new flows elsewhere while an open connection goes on.
- A reload that renumbers the marks keeps an open connection on its backend.
- Status counts each backend's flows from conntrack; the rules are gone after exit.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lab import (
    LB_BACKEND_ADDR,
    LB_BACKEND_ADDR6,
    UDP_PORT,
    VIP,
    VIP6,
    Lab,
    Nfqlb,
    render_config,
    url_host,
)

from nfqlb.offload import COPY_RANGE

pytestmark = pytest.mark.root

REQUESTS = 8


def wait_for(cond: Any, seconds: float, what: str, daemon: Nfqlb) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds}s\n{daemon.report()}")
        time.sleep(0.05)


def labels(lab: Lab, family: int = 4, n: int = REQUESTS) -> list[str]:
    vip = VIP if family == 4 else VIP6
    return [lab.curl(lab.client, f"http://{url_host(vip)}/").decode().strip() for _ in range(n)]


def status(d: Nfqlb) -> dict[str, Any]:
    done = d.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def offload_packets(d: Nfqlb) -> int:
    """Packets of the offload queues: one per worker (20000 + queue + its index), the kernel
    spreading new flows over them (with NFQLB_LAB_WORKERS=2, the file runs with two)."""
    queues = [q for q in status(d)["queues"] if q["purpose"].startswith("offload")]
    first = 20000 + d.queue
    assert [q["queue"] for q in queues] == list(range(first, first + len(queues))), queues
    return sum(int(q["packets"]) for q in queues)


def offload_copy_ranges(lab: Lab, d: Nfqlb) -> set[int]:
    """The copy range the kernel holds for each offload queue (its nfnetlink_queue file in
    the balancer's namespace): the headers the decider reads, not the whole packet."""
    from nfqlb.io import kstats

    text = lab.exec(lab.lb, ["cat", kstats.PROC_PATH]).stdout.decode()
    first = 20000 + d.queue
    return {row.copy_range for q, row in kstats.parse(text).items() if q >= first}


def named(lab: Lab, svc: dict[str, Any]) -> dict[str, Any]:
    for entry, host in zip(svc["backend"], lab.backends, strict=True):
        entry["name"] = host.label
    return svc


# A client that holds one HTTP/1.1 connection open: one request, then, once FLAG exists, a
# second on the same connection; prints what became of each, one JSON line each.
HOLDER = r"""
import json, os, socket, sys, time
host, flag = sys.argv[1], sys.argv[2]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
s.connect((host, 80))
def ask():
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"backend-1") and \
            not data.rstrip().endswith(b"backend-2"):
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data.rstrip().rsplit(b"\n", 1)[-1].decode().strip()
print(json.dumps({"first": ask()}), flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(flag) and time.monotonic() < deadline:
    time.sleep(0.02)
try:
    print(json.dumps({"second": ask()}), flush=True)
except Exception as exc:
    print(json.dumps({"second_error": type(exc).__name__}), flush=True)
"""


class Holder:
    """The HOLDER client running in the client namespace."""

    def __init__(self, lab: Lab, vip: str) -> None:
        self.log = lab.dir / f"holder-{time.monotonic_ns()}.log"
        self.flag = lab.dir / f"flag-{time.monotonic_ns()}"
        self.proc = lab.spawn(lab.client, [sys.executable, "-c", HOLDER, vip, str(self.flag)],
                              log=self.log)

    def lines(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                if line.startswith("{"):
                    out.update(json.loads(line))
        return out

    def first(self, d: Nfqlb) -> str:
        wait_for(lambda: "first" in self.lines(), 10, f"the first answer ({self.log})", d)
        return self.lines()["first"]

    def second(self, d: Nfqlb) -> dict[str, str]:
        self.flag.touch()
        self.proc.wait(timeout=25)
        return self.lines()


def conntrack_entries(lab: Lab, vip: str, backend_addr: str) -> int:
    """conntrack entries of the lb namespace to ``vip`` whose reply comes from
    ``backend_addr`` (read with pyroute2, as nfqlb does)."""
    script = (
        "import socket, sys\n"
        "from pyroute2 import Conntrack\n"
        "from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple\n"
        "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
        "ct = Conntrack(nfgen_family=fam)\n"
        "n = sum(1 for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=fam, "
        "daddr=sys.argv[1])) if e.tuple_reply.saddr == sys.argv[2])\n"
        "print(n)\n")
    out = lab.exec(lab.lb, [sys.executable, "-c", script, vip, backend_addr]).stdout
    return int(out.decode().strip().splitlines()[-1])


# ------------------------------------------------------------------ balancing


@pytest.mark.parametrize(("family", "binding"), [(4, "netlink"), (6, "netlink"),
                                                 (4, "netfilterqueue"), (6, "netfilterqueue")])
def test_tcp_flows_spread_over_both_backends_and_only_first_packets_reach_nfqlb(
        family: int, binding: str) -> None:
    with Lab(2, ipv6=family == 6) as lab:
        before = lab.iptables_save(lab.lb)
        d = lab.nfqlb(named(lab, lab.service("offload", family=family)),
                      daemon={"offload_binding": binding})
        with d:
            seen = labels(lab, family)
            queued = offload_packets(d)
            copy_ranges = offload_copy_ranges(lab, d)
        assert collections.Counter(seen) == {"backend-1": REQUESTS // 2,
                                             "backend-2": REQUESTS // 2}, d.report()
        # one packet per connection (its SYN) went through nfqlb: the kernel carried the rest
        assert queued == REQUESTS, d.report()
        assert copy_ranges == {COPY_RANGE}, copy_ranges  # with either binding
        assert d.returncode == 0, d.report()
        assert lab.iptables_save(lab.lb) == before  # every rule gone, tables too


def test_a_retransmitted_syn_is_not_decided_again() -> None:
    """A SYN sent again (no answer came back through the balancer) is still NEW to
    conntrack, but its flow is placed already (the entry confirmed, its DNAT done): it takes
    that translation without going to nfqlb, so the policy is asked once per connection and
    the counters count one flow (were it queued again, round robin would move on, and the
    mark given would change nothing)."""
    with Lab(2) as lab:
        # each backend loses the first SYN it is sent: the client sends it again after 1 s
        drop = ["-p", "tcp", "--syn", "-m", "statistic", "--mode", "nth", "--every",
                "1000000", "--packet", "0", "-j", "DROP"]
        for b in lab.backends:
            lab.exec(b, ["iptables", "-A", "INPUT", *drop])
        d = lab.nfqlb(named(lab, lab.service("offload", name="web")))
        with d:
            t0 = time.monotonic()
            first = lab.curl(lab.client, f"http://{VIP}/").decode().strip()
            took = time.monotonic() - t0
            queued = offload_packets(d)
            backends = status(d)["services"]["web"]["backends"]
        assert took >= 0.9, f"no SYN was sent again ({took:.2f} s): the test proves nothing"
        assert first in {"backend-1", "backend-2"}
        assert queued == 1, d.report()
        assert {name: b["flows"] for name, b in backends.items()} == {
            "backend-1": int(first == "backend-1"), "backend-2": int(first == "backend-2")}


@pytest.mark.parametrize("family", [4, 6])
def test_udp_flows_spread_over_both_backends(family: int) -> None:
    with Lab(2, ipv6=family == 6) as lab:
        d = lab.nfqlb(lab.service("offload", protocol="udp", family=family))
        vip = VIP if family == 4 else VIP6
        with d:
            replies = lab.udp_exchange(lab.client, vip, UDP_PORT,
                                       [b"a%d" % i for i in range(REQUESTS)],
                                       new_socket_each=True)
            one_flow = lab.udp_exchange(lab.client, vip, UDP_PORT, [b"x", b"y", b"z"])
            # a first datagram longer than the kernel copies to nfqlb: decided on its
            # headers, carried whole
            [large] = lab.udp_exchange(lab.client, vip, UDP_PORT, [b"L" * 1200])
            queued = offload_packets(d)
        assert all(r is not None for r in replies), d.report()
        # eight flows: eight source ports (a port used again would be the earlier flow's,
        # its conntrack entry still there, and take no decision)
        assert len({r.client_port for r in replies if r is not None}) == REQUESTS
        got = collections.Counter(r.label for r in replies if r is not None)
        assert got == {"backend-1": REQUESTS // 2, "backend-2": REQUESTS // 2}
        # the reply comes from the VIP's port (conntrack undid the DNAT)
        assert {r.peer[1] for r in replies if r is not None} == {UDP_PORT}
        # one socket is one flow: one backend, one packet queued
        assert len({r.label for r in one_flow if r is not None}) == 1, one_flow
        assert large is not None and large.payload == b"L" * 1200, d.report()
        # one packet queued per flow. The three exchanges are three client processes: a
        # later one's socket can get the port of an earlier one's closed socket (the kernel
        # picks ports at random: 17 chances in 28,232 per run), and its datagram then belongs to
        # that flow, whose conntrack entry is still there: no new flow, nothing queued
        flows = {r.client_port for r in [*replies, *one_flow, large] if r is not None}
        assert REQUESTS + 1 <= len(flows) <= REQUESTS + 2
        assert queued == len(flows), (flows, d.report())


@pytest.mark.parametrize("family", [4, 6])
def test_snat_address_brings_replies_back_through_the_balancer(family: int) -> None:
    with Lab(2, ipv6=family == 6, backend_default_route=False) as lab:
        source = LB_BACKEND_ADDR if family == 4 else LB_BACKEND_ADDR6
        d = lab.nfqlb(named(lab, lab.service("offload", family=family,
                                             snat_address=source)))
        with d:
            seen = labels(lab, family, 4)
        assert sorted(set(seen)) == ["backend-1", "backend-2"], d.report()
        peers = {addr for h in lab.backends for addr, _port, _what in lab.access_log(h)}
        assert peers == {source}, peers


# ------------------------------------------------------------------ health, reset, drain


def test_down_backend_gets_no_new_flows_and_reset_removes_its_conntrack_flows() -> None:
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", on_backend_down="reset", health={
            "kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2, "fall": 1,
            "rise": 1}))
        d = lab.nfqlb(svc)
        with d:
            holder = Holder(lab, VIP)
            first = holder.first(d)
            host = lab.backend(first)
            assert conntrack_entries(lab, VIP, host.addr(4)) == 1
            lab.set_unhealthy(host, True)
            wait_for(lambda: status(d)["services"][svc["name"]]["backends"][first]["state"]
                     == "down", 10, "the backend down", d)
            wait_for(lambda: conntrack_entries(lab, VIP, host.addr(4)) == 0, 10,
                     "its conntrack entries removed", d)
            after = holder.second(d)
            seen = labels(lab)
        assert "second_error" in after, after  # the connection is broken
        assert first not in seen and len(seen) == REQUESTS, seen
        assert "conntrack flows removed" in d.stderr, d.report()


def test_drain_moves_new_flows_and_keeps_an_open_connection() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="web")))
        with d:
            holder = Holder(lab, VIP)
            first = holder.first(d)
            done = d.cli("ctl", "drain", "web", first)
            assert done.returncode == 0, done.stderr
            seen = labels(lab)
            after = holder.second(d)
            s = status(d)
        assert first not in seen, seen
        assert after.get("second") == first, after
        backends = s["services"]["web"]["backends"]
        assert backends[first]["state"] == "draining"
        assert backends[first]["flows"] == 1
        assert sum(b["flows"] for b in backends.values()) == REQUESTS + 1


# ------------------------------------------------------------------ reload, status


def test_reload_renumbering_marks_keeps_open_connections_on_their_backends() -> None:
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", name="web"))
        d = lab.nfqlb(svc)
        with d:
            holders = [Holder(lab, VIP) for _ in range(2)]
            firsts = [h.first(d) for h in holders]
            assert sorted(firsts) == ["backend-1", "backend-2"]
            # another service first and the backends swapped: every mark changes
            other = named(lab, lab.service("offload", name="other", port=81))
            svc["backend"].reverse()
            d.config_path.write_text(render_config([other, svc],
                                                   {"queue": d.queue, "bypass": True}))
            done = d.cli("ctl", "reload")
            assert done.returncode == 0, done.stdout + done.stderr
            afters = [h.second(d) for h in holders]
            seen = labels(lab)
            # the offload queue is bound at start: a reload may not move it
            d.config_path.write_text(render_config([other, svc], {
                "queue": d.queue, "bypass": True, "offload_queue": 25001}))
            refused = d.cli("ctl", "reload")
            still = labels(lab, n=2)
        assert refused.returncode != 0 and "daemon.offload_queue" in refused.stdout + \
            refused.stderr, refused
        assert len(still) == 2
        assert [a.get("second") for a in afters] == firsts, afters
        assert sorted(set(seen)) == ["backend-1", "backend-2"], seen


def test_status_counts_open_flows_from_conntrack() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="web")))
        with d:
            holders = [Holder(lab, VIP) for _ in range(2)]
            firsts = [h.first(d) for h in holders]
            status(d)  # asks for a count

            def counted() -> bool:
                web = status(d)["services"]["web"]
                return "counted_s_ago" in web["offload"] and all(
                    web["backends"][f]["active"] == 1 for f in firsts)

            wait_for(counted, 10, "a count of the two open connections", d)
            web = status(d)["services"]["web"]
            text = d.cli("status").stdout
            for h in holders:
                h.second(d)
        assert web["offload"]["flows_from"] == "conntrack"
        assert web["offload"]["accounting"] is False
        assert "nf_conntrack_acct" in web["offload"]["unseen"]
        assert "conntrack" in text, text


def test_status_sums_the_open_flows_bytes_with_conntrack_accounting() -> None:
    with Lab(2, ipv6=False) as lab:
        lab.sysctl(lab.lb, "net.netfilter.nf_conntrack_acct", "1")
        d = lab.nfqlb(named(lab, lab.service("offload", name="web")))
        with d:
            holders = [Holder(lab, VIP) for _ in range(2)]
            firsts = [h.first(d) for h in holders]
            status(d)

            def summed() -> bool:
                note = status(d)["services"]["web"]["offload"]
                return note.get("accounting") is True and all(
                    note["open_flows"][f]["bytes"] > 0 for f in firsts)

            wait_for(summed, 10, "conntrack's byte counts of the open connections", d)
            note = status(d)["services"]["web"]["offload"]
            for h in holders:
                h.second(d)
        assert "unseen" not in note
        assert all(note["open_flows"][f]["packets"] >= 4 for f in firsts), note


def test_check_refuses_least_conn_for_offload(tmp_path: Path) -> None:
    config = tmp_path / "nfqlb.toml"
    config.write_text(render_config([{
        "name": "web", "vip": VIP, "port": 80, "mode": "offload", "policy": "least_conn",
        "backend": [{"address": "198.18.1.2", "port": 8080}]}], {"queue": 1}))
    import subprocess
    done = subprocess.run([sys.executable, "-m", "nfqlb", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "service[0].policy" in done.stderr and "on_flow_closed" in done.stderr
