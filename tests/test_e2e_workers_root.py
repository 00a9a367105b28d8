"""End to end: several workers (``daemon.workers = 2``) in the namespace lab.

Clients from many addresses (last bytes below and above 128: both workers' shares) make real
curl requests through dnat and fullnat, IPv4 and IPv6. Every connection must succeed: a reply
that reached the worker that does not own its flow would pass unrewritten (dnat: from the
backend's address, which the client's socket ignores; fullnat: to the snat address, where
nothing listens), so each answer is also the proof that its replies reached the owner. Then
``nfqlb status`` shows both workers with packets and flows, their sum is the total, no packet
passed as "not ours", and in fullnat the backends saw source ports of both workers' pool
shares. A worker killed with SIGKILL takes the whole daemon down with exit 1 and its rules
with it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from lab import VIP, VIP6, Lab, Nfqlb, url_host

pytestmark = pytest.mark.root

CLIENTS4 = [f"198.18.0.{b}" for b in (10, 11, 60, 127, 128, 150, 200, 254)]
CLIENTS6 = [f"2001:db8::{b:x}" for b in (10, 11, 60, 127, 128, 150, 200, 254)]


def status(d: Nfqlb) -> dict[str, Any]:
    done = d.cli("status", "--json")
    assert done.returncode == 0, f"{done.stderr}\n{d.report()}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def add_clients(lab: Lab, family: int) -> list[str]:
    clients = CLIENTS4 if family == 4 else CLIENTS6
    for addr in clients:
        if family == 4:
            lab.ip(lab.client, "addr", "add", f"{addr}/24", "dev", "eth0")
        else:
            lab.ip(lab.client, "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
    return clients


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_flows_spread_over_both_workers_and_replies_reach_their_owner(mode: str,
                                                                       family: int) -> None:
    with Lab(2, ipv6=family == 6) as lab:
        clients = add_clients(lab, family)
        vip = VIP if family == 4 else VIP6
        svc = lab.service(mode, family=family)
        with lab.nfqlb(svc, daemon={"workers": 2}) as d:
            served = []
            for _ in range(2):
                for addr in clients:
                    served.append(lab.curl(lab.client, f"http://{url_host(vip)}/",
                                           args=["--interface", addr]).decode().strip())
            assert sorted(set(served)) == ["backend-1", "backend-2"], served
            s = status(d)
        n = 2 * len(clients)
        workers = s["workers"]
        assert [w["worker"] for w in workers] == [0, 1]
        assert all(w["packets"] > 0 and w["flows_total"] > 0 for w in workers), workers
        assert sum(w["flows_total"] for w in workers) == s["flows_total"] == n
        assert sum(w["packets"] for w in workers) == s["packets"]
        assert s["passed_unknown"] == 0 and "no_flow" not in s["dropped"], s
        assert {q["queue"] for q in s["queues"]} == {1, 2, 10001, 10002, 30001, 30002}
        assert d.returncode == 0, d.report()
        assert f"flows {n} total" in d.stdout, d.report()
        if mode == "fullnat":  # the backends saw ports of both workers' pool shares
            ports = [port for b in lab.backends for _, port, _ in lab.access_log(b)]
            assert any(20000 <= p <= 24999 for p in ports), ports
            assert any(25000 <= p <= 29999 for p in ports), ports


def test_a_dead_worker_stops_the_daemon_and_its_rules_go() -> None:
    """Started with ``--queue 1-2`` (two workers, the file says one)."""
    with Lab(2, ipv6=False) as lab:
        before = lab.iptables_save(lab.lb)
        d = lab.nfqlb(lab.service("dnat"), daemon={"workers": 1}, args=["--queue", "1-2"])
        d.start()
        assert lab.curl(lab.client, f"http://{VIP}/")
        workers = status(d)["workers"]
        assert [w["queue"] for w in workers] == [1, 2]
        victim = workers[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(15)
        d.stop()
        assert d.returncode == 1, d.report()
        assert "worker 1" in d.stderr and "signal 9" in d.stderr, d.report()
        assert lab.iptables_save(lab.lb) == before
        time.sleep(0.1)
        assert not d.control_socket.exists()
