"""End to end: health checks from the balancer namespace to the lab's nginx servers.

- The checks' own packets never reach nfqlb, in every mode: with only checks running, the
  daemon's ``packets`` counter stays at 0 while the servers log the checks, from the checks'
  source ports. (Without rules/health.rules the answers from a backend's port are queued as
  replies; in dnat with ``unknown_flow = "hash"`` they would even be adopted and rewritten,
  and every check would fail.)
- A backend whose server stops (its port answers with a RST) or whose ``/health`` answers 503
  gets no new request from ``interval x fall`` plus one interval after, and none fails after
  that; once well again it is back after ``rise`` checks. This part needs the engine's
  ``set_health``; it is skipped on an engine without it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from lab import LB_BACKEND_ADDR, LB_BACKEND_ADDR6, VIP, Host, Lab, LabError, Nfqlb, url_host

from nfqlb.engine import Engine

pytestmark = pytest.mark.root

SOURCE_LO, SOURCE_HI = 61000, 61999


def health_log(lab: Lab, host: Host) -> list[tuple[str, int, int]]:
    """(peer address, peer port, status) of each /health request ``host``'s nginx served."""
    path = host.dir / "access.log"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            addr, port, uri, status, *_ = line.split()
            if uri == "/health":
                rows.append((addr, int(port), int(status)))
    return rows


def wait_for(cond: Any, seconds: float, what: str, daemon: Nfqlb) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds}s\n{daemon.report()}")
        time.sleep(0.05)


@pytest.mark.parametrize(("mode", "family"), [("dnat", 4), ("fullnat", 4), ("local", 4),
                                              ("dnat", 6)])
def test_health_checks_do_not_go_through_nfqlb(mode: str, family: int) -> None:
    local = mode == "local"
    with Lab(2, ipv6=family == 6, lb_servers=local, vip_on_lo=local) as lab:
        # unknown_flow = "hash": an answer to a check that reached nfqlb would be adopted
        extra: dict[str, Any] = {} if mode == "fullnat" else {"unknown_flow": "hash"}
        svc = lab.service(mode, family=family, health={
            "kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2, "fall": 1},
            **extra)
        servers = [lab.lb] if local else lab.backends
        d = lab.nfqlb(svc)
        with d:
            wait_for(lambda: all(len(health_log(lab, h)) >= 5 for h in servers), 10,
                     "five checks of every server", d)
        [stats] = d.stats()
        assert stats["packets"] == 0, d.report()
        for h in servers:
            rows = health_log(lab, h)
            assert all(status == 200 for *_, status in rows), rows
            assert all(SOURCE_LO <= port <= SOURCE_HI for _, port, _ in rows), rows
            if not local:
                expected = LB_BACKEND_ADDR if family == 4 else LB_BACKEND_ADDR6
                assert {addr for addr, *_ in rows} == {expected}
        assert " down (" not in d.stderr, d.report()  # every check passed


# ------------------------------------------------------------------ the engine acts on them

needs_engine = pytest.mark.skipif(not hasattr(Engine, "set_health"),
                                  reason="the engine has no set_health yet (lead's branch)")

INTERVAL, FALL, RISE = 0.5, 2, 2
SETTLE = INTERVAL * (FALL + 1)  # from the change until the checker must have acted


def traffic(lab: Lab, seconds: float, url: str) -> list[tuple[float, str | None]]:
    """Sequential curls (a new connection each) for ``seconds``: (start time, label of the
    backend that answered, or None for a failure). Bounded in time and count."""
    out: list[tuple[float, str | None]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(out) < 2000:
        started = time.monotonic()
        try:
            out.append((started, lab.curl(lab.client, url, max_time=2).decode().strip()))
        except LabError:
            out.append((started, None))
    return out


def after(results: list[tuple[float, str | None]], t: float) -> list[str | None]:
    return [label for started, label in results if started >= t]


@needs_engine
@pytest.mark.parametrize("failure", ["stopped", "503"])
def test_a_failed_backend_gets_no_new_flows_then_comes_back(failure: str) -> None:
    with Lab(2, ipv6=False) as lab:
        b1, b2 = lab.backends
        svc = lab.service("dnat", health={"kind": "http", "path": "/health",
                                          "interval": INTERVAL, "timeout": 0.4,
                                          "fall": FALL, "rise": RISE})
        for entry, host in zip(svc["backend"], lab.backends, strict=True):
            entry["name"] = host.label
        url = f"http://{url_host(VIP)}/"
        d = lab.nfqlb(svc)
        with d:
            before = traffic(lab, 1.0, url)
            assert set(after(before, 0)) == {b1.label, b2.label}, d.report()

            changed = time.monotonic()
            if failure == "stopped":
                lab.refuse_http(b1, True)
            else:
                lab.set_unhealthy(b1, True)
            sick = traffic(lab, SETTLE + 2.0, url)
            late = after(sick, changed + SETTLE)
            assert len(late) >= 10, sick
            assert late == [b2.label] * len(late), (sick, d.report())
            if failure == "503":  # the server itself still answers: nothing fails
                assert None not in after(sick, changed), sick

            healed = time.monotonic()
            if failure == "stopped":
                lab.refuse_http(b1, False)
            else:
                lab.set_unhealthy(b1, False)
            well = traffic(lab, INTERVAL * (RISE + 1) + 2.0, url)
            assert None not in after(well, healed), well
            assert b1.label in after(well, healed + INTERVAL * (RISE + 1)), (well, d.report())
        reason = "connection refused" if failure == "stopped" else "status 503"
        assert f"service tcp-dnat: backend {b1.label} down ({FALL} checks failed: {reason})" \
            in d.stderr, d.report()
        assert f"service tcp-dnat: backend {b1.label} up ({RISE} checks passed: status 200)" \
            in d.stderr, d.report()
        assert b2.label + " down" not in d.stderr


def test_lab_health_page_flips_to_503() -> None:
    """The lab's /health itself, with no nfqlb: 200, 503 while flagged, 200 again."""
    with Lab(1, ipv6=False) as lab:
        [b] = lab.backends
        url = f"http://{b.address}:8080/health"
        assert lab.exec(lab.lb, ["curl", "-sS", "--fail", url]).stdout == b"ok\n"
        lab.set_unhealthy(b, True)
        proc = lab.exec(lab.lb, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url])
        assert proc.stdout == b"503"
        lab.refuse_http(b, True)
        assert lab.exec(lab.lb, ["curl", "-sS", url], check=False).returncode == 7  # refused
        lab.refuse_http(b, False)
        lab.set_unhealthy(b, False)
        assert lab.exec(lab.lb, ["curl", "-sS", "--fail", url]).stdout == b"ok\n"

