"""End to end: ``kill -HUP`` reloads the configuration while the flow table is kept.

A 1 MiB download (curl, rate-limited to last a few seconds) runs from backend-1 while the
file is edited to remove backend-1 and add backend-3 and nfqlb gets SIGHUP: the download
completes byte-exact (``on_backend_down = "keep"``), new requests reach backend-2 and the new
backend-3, none backend-1. Then a broken file on SIGHUP: one error line, nothing changes.
"""

from __future__ import annotations

import signal
import time

import pytest
from lab import VIP, Lab, blob_bytes, render_config, sha256

pytestmark = pytest.mark.root


def log_of(daemon) -> str:  # type: ignore[no-untyped-def]
    """What nfqlb logged so far (stderr)."""
    return daemon.stderr_path.read_text(errors="replace")


def _wait_for(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_sighup_reload_keeps_a_download_and_moves_new_flows() -> None:
    with Lab(3) as lab:
        b1, b2, b3 = lab.backends
        first = lab.service("dnat", backends=[b1, b2])
        daemon = lab.nfqlb(first).start()
        try:
            out = lab.dir / "download"
            log = lab.dir / "curl.log"
            curl = lab.spawn(lab.client, ["curl", "-sS", "--fail", "--limit-rate", "250k",
                                          "--max-time", "20", "-o", str(out),
                                          f"http://{VIP}/blob"], log=log)
            assert _wait_for(lambda: out.exists() and out.stat().st_size > 50_000), \
                log.read_text()
            second = lab.service("dnat", backends=[b2, b3])
            daemon.config_path.write_text(render_config([second], {"queue": 1,
                                                                   "bypass": True}))
            daemon.signal(signal.SIGHUP)
            assert _wait_for(lambda: "reloaded" in log_of(daemon)), daemon.report()
            labels = [lab.curl(lab.client, f"http://{VIP}/").decode().strip()
                      for _ in range(6)]
            assert set(labels) == {b2.label, b3.label}, labels
            assert curl.wait(25) == 0, log.read_text()
            data = out.read_bytes()
            assert len(data) == len(blob_bytes()) and sha256(data) == sha256(blob_bytes())
            blob_served = [p for _, p, path in lab.access_log(b1) if "blob" in path]
            assert len(blob_served) == 1  # the download was backend-1's, and it finished

            def b1_rules() -> bool:
                text = lab.exec(lab.lb, ["iptables", "-t", "raw", "-S"]).stdout.decode()
                return b1.address in text
            # its reply rules lasted as long as its flow (closed: 10 s linger), then went
            assert b1_rules()
            assert _wait_for(lambda: not b1_rules(), timeout=15.0), daemon.report()
            # a broken file on SIGHUP: one error line, the running configuration serves on
            daemon.config_path.write_text("[[service]]\nname = 7\n")
            daemon.signal(signal.SIGHUP)
            assert _wait_for(lambda: "reload refused" in log_of(daemon)), \
                daemon.report()
            refused = [line for line in log_of(daemon).splitlines()
                       if "reload refused" in line]
            assert len(refused) == 1 and "service[0].name" in refused[0], refused
            labels = [lab.curl(lab.client, f"http://{VIP}/").decode().strip()
                      for _ in range(4)]
            assert set(labels) == {b2.label, b3.label}, labels
        finally:
            daemon.stop()
        assert daemon.returncode == 0, daemon.report()


def test_a_drained_backend_keeps_its_download_and_gets_no_new_requests() -> None:
    """``nfqlb ctl drain``: the long download from the drained backend completes byte-exact,
    every new request goes to the other, and ``status`` shows it draining with the
    download's flow (established, or closing once the whole blob is in the client's socket
    buffer: curl's rate limit reads it out later)."""
    import json

    with Lab(2) as lab:
        b1, b2 = lab.backends
        svc = lab.service("dnat", backends=[b1, b2])
        daemon = lab.nfqlb(svc).start()
        try:
            out = lab.dir / "download"
            log = lab.dir / "curl.log"
            curl = lab.spawn(lab.client, ["curl", "-sS", "--fail", "--limit-rate", "300k",
                                          "--max-time", "20", "-o", str(out),
                                          f"http://{VIP}/blob"], log=log)
            assert _wait_for(lambda: out.exists() and out.stat().st_size > 50_000), \
                log.read_text()
            name = svc["name"]
            # the backend serving the download (round robin's first, unless something else
            # took a flow first): the lab's backends are named address:port
            before = json.loads(daemon.cli("status", "--json").stdout)
            # (established, or already closing: the whole blob may sit in the client's
            # socket buffer while curl's rate limit reads it out)
            active = {n for n, fig in before["services"][name]["backends"].items()
                      if fig["active"] + fig["inactive"] == 1}
            assert len(active) == 1, before["services"][name]["backends"]
            drained, other = (b1, b2) if active == {f"{b1.address}:8080"} else (b2, b1)
            drained_name = f"{drained.address}:8080"
            done = daemon.cli("ctl", "drain", str(name), drained_name)
            assert done.returncode == 0, done.stderr
            labels = [lab.curl(lab.client, f"http://{VIP}/").decode().strip()
                      for _ in range(6)]
            assert labels == [other.label] * 6, labels
            status = json.loads(daemon.cli("status", "--json").stdout)
            fig = status["services"][name]["backends"][drained_name]
            assert fig["state"] == "draining" and fig["active"] + fig["inactive"] == 1, fig
            assert curl.wait(25) == 0, log.read_text()
            data = out.read_bytes()
            assert len(data) == len(blob_bytes()) and sha256(data) == sha256(blob_bytes())
            assert [p for _, p, path in lab.access_log(drained) if "blob" in path]
        finally:
            daemon.stop()
        assert daemon.returncode == 0, daemon.report()
