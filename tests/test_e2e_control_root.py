"""End to end: ``nfqlb status``, ``nfqlb ctl`` and the metrics endpoint of a real daemon.

``python -m nfqlb run`` serves the lab's VIP in the lb namespace with ``[metrics]`` on
127.0.0.1 there; its control socket is in the lab's directory (NFQLB_RUN_DIR), which the test
reaches from its own namespace (a Unix socket goes by the filesystem, not the network). After
N curl requests, ``status --json`` and a scrape (parsed by prometheus-client's parser) both
count N flows across the backends; ``ctl drain`` sends every new request to the other backend
and ``status`` shows the drained one draining; garbage on the socket is answered with an error
and the daemon serves on.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from lab import VIP, Lab, Nfqlb
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.root

N = 10
METRICS = "127.0.0.1:9108"


def labels(lab: Lab, n: int) -> list[str]:
    return [lab.curl(lab.client, f"http://{VIP}/").decode().strip() for _ in range(n)]


def status(d: Nfqlb) -> dict[str, Any]:
    done = d.cli("status", "--json")
    assert done.returncode == 0, f"{done.stderr}\n{d.report()}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def scrape(lab: Lab) -> dict[str, Any]:
    text = lab.curl(lab.lb, f"http://{METRICS}/metrics").decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def flows_by_backend(family: Any) -> dict[str, float]:
    return {s.labels["backend"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_status_metrics_drain_and_garbage_on_a_real_daemon() -> None:
    with Lab(2, ipv6=False) as lab:
        svc = lab.service("dnat", name="web")
        for entry, host in zip(svc["backend"], lab.backends, strict=True):
            entry["name"] = host.label
        d = lab.nfqlb(svc)
        d.config_path.write_text(d.config_path.read_text()
                                 + f'\n[metrics]\nlisten = "{METRICS}"\n')
        with d:
            assert d.control_socket.exists(), d.report()
            served = labels(lab, N)
            assert sorted(set(served)) == ["backend-1", "backend-2"], served

            s = status(d)
            backends = s["services"]["web"]["backends"]
            assert sum(b["flows"] for b in backends.values()) == N == s["flows_total"]
            assert {n: b["flows"] for n, b in backends.items()} == {
                "backend-1": N // 2, "backend-2": N // 2}
            assert all(b["packets_in"] > 0 and b["packets_out"] > 0 for b in backends.values())
            assert s["daemon"]["config"] == str(d.config_path)
            workers = s["daemon"].get("workers", 1)  # (NFQLB_LAB_WORKERS: the queues of each)
            assert [q["queue"] for q in s["queues"]] == [
                q for i in range(workers) for q in (1 + i, 10001 + i, 30001 + i)]
            assert s["queues"][0]["kernel"] is not None, s["queues"]

            fams = scrape(lab)
            assert flows_by_backend(fams["nfqlb_backend_flows"]) == {
                "backend-1": N // 2, "backend-2": N // 2}
            assert sum(s.value for s in fams["nfqlb_packets"].samples) >= 4 * N
            assert {s.labels["backend"]: s.value for s in fams["nfqlb_backend_up"].samples} == {
                "backend-1": 1.0, "backend-2": 1.0}

            listed = d.cli("status", "--flows", "--backend", "backend-1")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.splitlines()[-1] == f"{N // 2} flows", listed.stdout

            done = d.cli("ctl", "drain", "web", "backend-1")
            assert (done.returncode, done.stdout, done.stderr) == (
                0, "web/backend-1: draining (now draining)\n", "")
            assert labels(lab, 6) == ["backend-2"] * 6
            s = status(d)
            assert s["services"]["web"]["backends"]["backend-1"]["state"] == "draining"
            assert s["services"]["web"]["backends"]["backend-2"]["flows"] == N // 2 + 6
            text = d.cli("status")
            assert text.returncode == 0 and "draining" in text.stdout, text.stdout
            assert {s.labels["backend"]: s.value
                    for s in scrape(lab)["nfqlb_backend_up"].samples} == {
                "backend-1": 0.0, "backend-2": 1.0}

            refused = d.cli("ctl", "drain", "web", "backend-9")
            assert (refused.returncode, refused.stderr) == (
                1, "nfqlb: error: service 'web' has no backend 'backend-9'\n")

            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(5)
                raw.connect(str(d.control_socket))
                raw.sendall(b"\x00garbage\n{\"cmd\": \"drain\", \"service\": 5}\n")
                raw.shutdown(socket.SHUT_WR)
                answers = b""
                while chunk := raw.recv(4096):
                    answers += chunk
            assert [json.loads(a)["ok"] for a in answers.splitlines()] == [False, False]

            assert d.cli("ctl", "enable", "web", "backend-1").returncode == 0
            assert sorted(set(labels(lab, 4))) == ["backend-1", "backend-2"]
            assert status(d)["flows_total"] == N + 10

            loaded = status(d)["daemon"]["loaded_at"]
            done = d.cli("ctl", "reload")
            assert (done.returncode, done.stdout) == (0, f"reloaded {d.config_path}\n"), (
                done.stderr)
            s = status(d)
            assert s["daemon"]["loaded_at"] > loaded and s["flows_total"] == N + 10
        assert d.returncode == 0, d.report()
        assert not d.control_socket.exists()
        assert "control socket" in d.stderr and "metrics on http://127.0.0.1:9108" in d.stderr
