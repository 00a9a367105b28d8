"""End to end: what ``nfqlb health`` tells a BGP speaker about a real daemon in the lab.

A dnat service over two nginx backends with http health checks, ``[daemon] ecmp = true``
(the node is one of several behind a router's multipath). ``nfqlb health`` exits

- 0 while the node serves;
- 5 once every backend is down;
- 3 after ``ctl drain-node`` (requests are still served, a reload keeps it), and during
  ``withdraw_wait`` after SIGTERM, while a download that started before the signal goes on to
  its last byte and new requests are served (a second SIGTERM stops at once);
- 4 once another program deleted its jump in raw PREROUTING;
- 1 once the daemon is SIGKILLed (its socket refuses); the rules it leaves then drop the
  VIP's packets instead of passing them unrewritten (no --queue-bypass behind ECMP).

With ``NFQLB_LAB_WORKERS=2`` the supervisor answers for both workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from lab import VIP, Lab, LabError, Nfqlb, blob_bytes, sha256

from nfqlb.io import node

pytestmark = pytest.mark.root

HEALTH = {"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2, "rise": 1,
          "fall": 1}


def health(d: Nfqlb, *args: str) -> subprocess.CompletedProcess[str]:
    return d.cli("health", *args, timeout=10.0)


def wait_health(d: Nfqlb, code: int, seconds: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Until ``nfqlb health --service web`` exits with ``code`` (bounded in time)."""
    deadline = time.monotonic() + seconds
    while True:
        done = health(d, "--service", "web")
        if done.returncode == code:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"health exit {done.returncode}, not {code}, within {seconds}s:"
                                 f" {done.stdout}{done.stderr}\n{d.report()}")
        time.sleep(0.1)


def labels(lab: Lab, n: int) -> list[str]:
    return [lab.curl(lab.client, f"http://{VIP}/").decode().strip() for _ in range(n)]


def node_state(d: Nfqlb) -> Any:
    done = d.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["daemon"]["node"]


def web(lab: Lab) -> dict[str, Any]:
    svc = lab.service("dnat", name="web", health=dict(HEALTH))
    for entry, host in zip(svc["backend"], lab.backends, strict=True):
        entry["name"] = host.label
    return svc


def test_health_follows_backends_and_drain_node() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(web(lab), daemon={"ecmp": True})
        with d:
            done = wait_health(d, node.OK)
            assert done.stdout == "nfqlb: serving service web (2 backends up)\n", done.stdout
            assert health(d).returncode == node.OK  # every service
            assert health(d, "--service", "nope").returncode == node.USAGE

            for b in lab.backends:
                lab.set_unhealthy(b, True)
            done = wait_health(d, node.NO_BACKEND)
            assert "no backend up of 2" in done.stderr
            for b in lab.backends:
                lab.set_unhealthy(b, False)
            wait_health(d, node.OK)

            done = d.cli("ctl", "drain-node")
            assert done.returncode == 0 and "now draining" in done.stdout, done.stderr
            done = health(d, "--service", "web")
            assert done.returncode == node.NODE_OUT and "drained" in done.stderr
            assert sorted(set(labels(lab, 4))) == ["backend-1", "backend-2"]  # still served
            assert node_state(d) == "draining"
            assert "node drained" in d.cli("status").stdout
            assert d.cli("ctl", "reload").returncode == 0
            assert health(d).returncode == node.NODE_OUT  # a reload keeps the node drained
            assert d.cli("ctl", "enable-node").returncode == 0
            assert health(d, "--service", "web").returncode == node.OK
            assert node_state(d) == "serving"

            # another program deletes the headers route's nftables table: the node no longer
            # serves whole (large TCP packets would pass unrewritten); `nfqlb rules --apply`
            # puts it back
            lab.exec(lab.lb, ["nft", "delete", "table", "ip", "nfqlb-1"])
            done = wait_health(d, node.NOT_WHOLE)
            assert "no nftables ip nfqlb-1" in done.stderr, done.stderr
            lab.exec(lab.lb, [sys.executable, "-m", "nfqlb", "rules", "--apply", "--config",
                              str(d.config_path), "--queue", "1"], timeout=30)
            wait_health(d, node.OK)

            # another program deletes nfqlb's jump: the node no longer serves
            lab.exec(lab.lb, ["iptables", "-t", "raw", "-D", "PREROUTING", "-j",
                              "NFQLB-PRE-1"])
            done = wait_health(d, node.NOT_WHOLE)
            assert "no jump from PREROUTING to NFQLB-PRE-1" in done.stderr, done.stderr
        assert d.returncode == 0, d.report()
        assert health(d).returncode == node.NO_DAEMON  # stopped: no socket


def test_withdraw_wait_fails_health_and_serves_until_it_ends() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(web(lab), daemon={"ecmp": True, "withdraw_wait": 8})
        with d:
            wait_health(d, node.OK)
            # a download of about 2.5 s that spans the signal
            out = lab.dir / "blob.out"
            failed: list[BaseException] = []

            def download() -> None:
                try:
                    lab.curl(lab.client, f"http://{VIP}/blob", output=out, max_time=20,
                             args=["--limit-rate", "400k"])
                except BaseException as exc:  # noqa: B036 - reported by the test
                    failed.append(exc)

            t = threading.Thread(target=download)
            t.start()
            time.sleep(0.5)
            d.signal(signal.SIGTERM)
            done = wait_health(d, node.NODE_OUT, 5.0)
            assert "withdrawing" in done.stderr
            assert node_state(d) == "withdrawing"
            assert d.chain_installed() and d.running
            assert sorted(set(labels(lab, 4))) == ["backend-1", "backend-2"]
            t.join(25)
            assert not t.is_alive() and not failed, failed
            assert sha256(out.read_bytes()) == sha256(blob_bytes())
            assert d.running, "stopped before withdraw_wait ended\n" + d.report()
            d.proc.wait(20)  # type: ignore[union-attr]  # it stops by itself
            d.stop()
        assert d.returncode == 0, d.report()
        assert "SIGTERM: withdrawing" in d.stderr and "withdraw_wait (8 s) over" in d.stderr
        assert not d.chain_installed()


def test_second_stop_signal_stops_at_once() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(web(lab), daemon={"withdraw_wait": 600})
        with d:
            wait_health(d, node.OK)
            d.signal(signal.SIGTERM)
            wait_health(d, node.NODE_OUT, 5.0)
            d.signal(signal.SIGTERM)
            assert d.stop(timeout=10) == 0, d.report()  # (SIGKILLed after 10 s: -9)
        assert "withdraw_wait (600 s) over" not in d.stderr
        assert not d.chain_installed()


def test_sigkill_fails_health_and_leftover_rules_drop() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(web(lab), daemon={"ecmp": True})
        with d:
            wait_health(d, node.OK)
            assert labels(lab, 2)
            rules = lab.iptables_save(lab.lb)
            assert "NFQUEUE" in rules and "--queue-bypass" not in rules, rules
            d.signal(signal.SIGKILL)
            d.proc.wait(10)  # type: ignore[union-attr]
            done = health(d)
            assert done.returncode == node.NO_DAEMON, done.stderr
            assert "nobody listens" in done.stderr
            assert d.chain_installed()  # a SIGKILLed daemon cannot remove its rules
            with pytest.raises(LabError):  # dropped, not passed unrewritten
                lab.curl(lab.client, f"http://{VIP}/", max_time=2)


def test_a_dead_worker_behind_ecmp_leaves_rules_that_drop() -> None:
    """Without ``ecmp`` the supervisor removes the rules when a worker dies
    (test_e2e_workers_root); behind ECMP they stay and drop, as after a SIGKILL."""
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(web(lab), daemon={"ecmp": True, "workers": 2})
        with d:
            wait_health(d, node.OK)
            done = d.cli("status", "--json")
            assert done.returncode == 0, done.stderr
            victim = json.loads(done.stdout)["workers"][1]["pid"]
            os.kill(victim, signal.SIGKILL)
            d.proc.wait(15)  # type: ignore[union-attr]
            d.stop()
        assert d.returncode == 1, d.report()
        assert "the rules stay" in d.stderr, d.report()
        assert health(d).returncode == node.NO_DAEMON
        assert d.chain_installed()
        with pytest.raises(LabError):  # dropped, not passed unrewritten
            lab.curl(lab.client, f"http://{VIP}/", max_time=2)
