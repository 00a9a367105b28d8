"""``nfqlb status`` and ``nfqlb ctl`` against a control socket served by a real engine: the
table, --json, --flows, the one-line results and the exit codes (0, 1 refused, 2 usage)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from control_fakes import FakeServer, open_flows, served

from nfqlb import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    srv = FakeServer()
    open_flows(srv, 5)
    path = tmp_path / "nfqlb-1.sock"
    with served(srv, path):
        yield srv, str(path)


def test_status_table(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    srv.engine.drain("dnat-tcp", "b2", srv.now)
    code, out, err = run(capsys, "status", "--socket", path)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert re.match(r"nfqlb \S+, pid \d+, queue 1: up \d+", lines[0])
    assert lines[1].startswith("config /etc/nfqlb/nfqlb.toml, loaded 2023-11-1")
    assert "flows 5 total, 5 in the table" in lines[2]
    assert ("service dnat-tcp: 198.18.100.1:80/tcp dnat, policy round_robin; 0 refused, "
            "0 with no backend up, 0 policy errors") in lines
    head = next(line for line in lines if line.strip().startswith("backend"))
    assert head.split() == ["backend", "address", "state", "weight", "active", "inact",
                            "flows", "new/s", "pkts", "in", "pkts", "out", "bytes", "in",
                            "bytes", "out", "check", "latency"]
    b1 = next(line for line in lines if line.strip().startswith("b1 "))
    b2 = next(line for line in lines if line.strip().startswith("b2 "))
    assert b1.split()[:7] == ["b1", "198.18.1.2:8080", "up", "1", "0", "3", "3"]
    assert b2.split()[:7] == ["b2", "198.18.1.3:8080", "draining", "1", "0", "2", "2"]
    assert "drops: none" in lines and "events: none" in lines
    assert "queue 1: kernel: queued 3, queue_dropped 7, user_dropped 5; wakeups 11" in lines
    assert any(line.startswith("queue 10001 (packets over 3960 bytes): kernel: queued 3")
               for line in lines)


def test_status_json_is_the_same_data(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    code, out, _ = run(capsys, "status", "--socket", path, "--json")
    assert code == 0
    s = json.loads(out)
    backends = s["services"]["dnat-tcp"]["backends"]
    assert sum(b["flows"] for b in backends.values()) == 5 == s["flows_total"]
    assert s["queues"][0]["kernel"]["queue_dropped"] == 7
    assert s["daemon"]["config"] == "/etc/nfqlb/nfqlb.toml"


def test_status_flows(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _, path = daemon
    code, out, _ = run(capsys, "status", "--socket", path, "--flows", "--backend", "b1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["pro", "expire", "state", "source", "virtual", "destination",
                                "snat", "service"]
    assert len(lines) == 1 + 3 + 1 and lines[-1] == "3 flows"
    assert re.match(r"TCP\s+01:00\s+SYN_SENT\s+198\.18\.0\.2:400\d\d\s+198\.18\.100\.1:80\s+"
                    r"198\.18\.1\.2:8080 \(b1\)\s+-\s+dnat-tcp$", lines[1]), lines[1]
    code, out, _ = run(capsys, "status", "--socket", path, "--flows", "--limit", "2")
    assert out.splitlines()[-1] == "2 flows (more not shown: raise --limit)"
    code, out, _ = run(capsys, "status", "--socket", path, "--flows", "--json")
    assert len(json.loads(out)["flows"]) == 5


def test_ctl_commands(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    assert run(capsys, "ctl", "drain", "dnat-tcp", "b1", "--socket", path) == (
        0, "dnat-tcp/b1: draining (now draining)\n", "")
    assert run(capsys, "ctl", "enable", "dnat-tcp", "b1", "--socket", path) == (
        0, "dnat-tcp/b1: enabled (now up)\n", "")
    assert run(capsys, "ctl", "weight", "dnat-tcp", "b1", "0", "--socket", path) == (
        0, "dnat-tcp/b1: weight 0 (now up)\n", "")
    assert run(capsys, "ctl", "drain", "dnat-tcp", "b2", "--timeout", "30",
               "--socket", path)[0] == 0
    assert srv.engine.get_timer() <= srv.now + 30
    assert run(capsys, "ctl", "reload", "--socket", path) == (0, "reloaded: 1 service\n", "")
    srv.reload_result = (False, "f.toml: service[0].port: is required")
    assert run(capsys, "ctl", "reload", "--socket", path) == (
        1, "", "nfqlb: error: f.toml: service[0].port: is required\n")


@pytest.mark.parametrize("argv, code, error", [
    (["ctl", "drain", "web", "b1"], 1, "nfqlb: error: no service 'web'\n"),
    (["ctl", "enable", "dnat-tcp", "b7"], 1,
     "nfqlb: error: service 'dnat-tcp' has no backend 'b7'\n"),
    (["status", "--flows", "--service", "web"], 1, "nfqlb: error: no service 'web'\n"),
])
def test_ctl_refusals_exit_1(daemon: Any, capsys: pytest.CaptureFixture[str], argv: list[str],
                             code: int, error: str) -> None:
    _, path = daemon
    assert run(capsys, *argv, "--socket", path) == (code, "", error)


@pytest.mark.parametrize("argv, fragment", [
    (["ctl", "weight", "s", "b", "-1"], "argument weight: '-1' is not a weight"),
    (["ctl", "weight", "s", "b", "x"], "argument weight: 'x' is not a weight"),
    (["ctl", "drain", "s"], "the following arguments are required: backend"),
    (["ctl", "drain", "s", "b", "--timeout", "-2"], "'-2' is not a number of seconds"),
    (["ctl", "fly"], "invalid choice: 'fly'"),
    (["status", "--limit", "0"], "'0' is not a limit within 1-10000"),
    (["status", "--service", "s"], "--service and --backend go with --flows"),
    (["status", "--queue", "1", "--socket", "/x"], "not allowed with argument"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                             fragment: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("nfqlb: error: ") and err.count("\n") == 1 and fragment in err


def test_no_daemon_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NFQLB_RUN_DIR", str(tmp_path))
    code, out, err = run(capsys, "status")
    assert (code, out) == (1, "")
    assert err == (f"nfqlb: error: no control socket in {tmp_path} (is nfqlb running? pick "
                   "one with --queue N or --socket PATH)\n")
    code, _, err = run(capsys, "ctl", "reload", "--queue", "4")
    assert code == 1 and "nfqlb-4.sock: no such control socket" in err
