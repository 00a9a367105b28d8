"""The node toward a BGP speaker: ``nfqlb health``'s exit codes against a control socket
served by a real engine (and by a supervisor over such workers), ``nfqlb ctl drain-node`` /
``enable-node``, and the ``[daemon]`` keys ``ecmp`` and ``withdraw_wait``."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_fakes import FakeServer, open_flows, served
from helpers import service

from nfqlb import cli
from nfqlb.config import config_warnings, parse_config
from nfqlb.errors import ConfigError
from nfqlb.io import control, node
from nfqlb.io.node import NodeState
from nfqlb.io.workers import Supervisor, Worker

SERVICE = "dnat-tcp"  # helpers.service("dnat"): backends b1 and b2


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FakeServer, str]]:
    """A daemon whose rules are installed, serving a dnat service with two backends up."""
    srv = FakeServer()
    srv.node = NodeState(rules=True)  # type: ignore[attr-defined]
    open_flows(srv, 3)
    path = tmp_path / "nfqlb-1.sock"
    with served(srv, path):
        yield srv, str(path)


def health(capsys: pytest.CaptureFixture[str], path: str, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "health", "--socket", path, *extra)


# ------------------------------------------------------------------ exit codes


def test_serving_exits_0_with_one_line_on_stdout(daemon: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, path = daemon
    assert health(capsys, path) == (0, "nfqlb: serving 1 service (2 backends up)\n", "")
    assert health(capsys, path, "--service", SERVICE) == (
        0, f"nfqlb: serving service {SERVICE} (2 backends up)\n", "")


def test_no_backend_up_exits_5(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    srv.engine.set_health(SERVICE, "b1", False, srv.now, "timeout")
    assert health(capsys, path)[0] == 0  # b2 still up
    srv.engine.drain(SERVICE, "b2", srv.now)
    code, out, err = health(capsys, path, "--service", SERVICE)
    assert (code, out) == (node.NO_BACKEND, "")
    assert err == (f"nfqlb: not serving: service {SERVICE}: no backend up of 2 (down, drained "
                   "or weight 0)\n")
    srv.engine.enable(SERVICE, "b2", srv.now)
    srv.engine.set_weight(SERVICE, "b2", 0, srv.now)  # weight 0 takes no new flows either
    assert health(capsys, path)[0] == node.NO_BACKEND
    srv.engine.set_weight(SERVICE, "b2", 1, srv.now)
    assert health(capsys, path)[0] == 0


def test_drain_node_fails_health_and_enable_node_undoes_it(
        daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    assert run(capsys, "ctl", "drain-node", "--socket", path) == (
        0, "node drained (now draining; nfqlb health fails, packets are still served)\n", "")
    code, out, err = health(capsys, path, "--service", SERVICE)
    assert (code, out) == (node.NODE_OUT, "")
    assert "drained" in err and "enable-node" in err
    code, out, _ = run(capsys, "status", "--socket", path)
    assert code == 0 and "node drained" in out.splitlines()[0]
    assert srv.reloads == 0 and run(capsys, "ctl", "reload", "--socket", path)[0] == 0
    assert srv.reloads == 1 and health(capsys, path)[0] == node.NODE_OUT  # a reload keeps it
    assert run(capsys, "ctl", "enable-node", "--socket", path) == (
        0, "node enabled (now serving)\n", "")
    assert health(capsys, path)[0] == 0
    code, out, _ = run(capsys, "status", "--socket", path)
    assert code == 0 and "node" not in out.splitlines()[0]


def test_withdrawing_exits_3(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    srv.node.withdrawing = True
    code, _, err = health(capsys, path)
    assert code == node.NODE_OUT and "withdrawing" in err


def test_rules_missing_or_queue_unbound_exit_4(daemon: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    srv.node.rules = False
    code, _, err = health(capsys, path)
    assert (code, err) == (node.NOT_WHOLE,
                           "nfqlb: not serving: the daemon's rules are not installed\n")
    srv.node.rules = True
    srv.adapters[1].kernel.row = None  # the kernel no longer shows queue 10001 bound
    code, _, err = health(capsys, path)
    assert (code, err) == (node.NOT_WHOLE,
                           "nfqlb: not serving: queue 10001 not bound in the kernel\n")


def test_unknown_service_exits_2(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _, path = daemon
    code, out, err = health(capsys, path, "--service", "nope")
    assert (code, out) == (node.USAGE, "")
    assert err == f"nfqlb: no service 'nope' (the daemon serves: {SERVICE})\n"


def test_no_daemon_exits_1_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No socket; a stale one (SIGKILLed daemon: refused); one that never answers (a hung
    daemon: the timeout)."""
    code, out, err = health(capsys, str(tmp_path / "none.sock"))
    assert (code, out) == (node.NO_DAEMON, "") and "no such control socket" in err
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening: what a killed daemon leaves
    code, _, err = health(capsys, str(stale))
    assert code == node.NO_DAEMON and "nobody listens" in err
    hung = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(hung))
        s.listen(4)  # connects, never answers
        code, _, err = health(capsys, str(hung), "--timeout", "0.2")
    assert code == node.NO_DAEMON and "no answer within 0.2 s" in err


def test_a_daemon_without_health_exits_1(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    srv = FakeServer()  # (no node state: an older daemon answers with an error)
    path = tmp_path / "nfqlb-1.sock"
    with served(srv, path):
        code, _, err = health(capsys, str(path))
    assert code == node.NO_DAEMON and err.startswith("nfqlb: not serving: ")


def test_judge_every_service_without_service() -> None:
    facts = {"node": "serving", "rules": True, "unbound": [], "problems": [],
             "services": {"a": {"backends": 2, "live": 1}, "b": {"backends": 1, "live": 0}}}
    assert node.judge(facts, "a")[0] == node.OK
    code, line = node.judge(facts, None)
    assert code == node.NO_BACKEND and "service b" in line


# ------------------------------------------------------------------ several workers


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A supervisor of two workers, each a control socket served by a real engine."""
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    config = parse_config({"daemon": {"workers": 2}, "service": [service("dnat")]}, "t.toml")
    sup = Supervisor(config, logging.getLogger("test.node"), (), {}, None, "t.toml")
    sup.workers = [Worker(i, os.getpid(), -1) for i in range(2)]
    sup.node.rules = True
    srvs = [FakeServer(), FakeServer()]
    for srv in srvs:
        srv.node = NodeState()  # type: ignore[attr-defined]
        srv.role = object()  # type: ignore[attr-defined]  # a worker: rules are not its own
    path = control.worker_socket_path(1, 0)
    path.parent.mkdir()
    with served(srvs[0], path), served(srvs[1], control.worker_socket_path(1, 1)):
        yield sup, srvs


def test_supervisor_health_needs_every_worker(supervisor: Any) -> None:
    sup, srvs = supervisor
    answer = sup.handle({"cmd": "health"})
    assert node.judge(answer["health"], SERVICE)[0] == node.OK
    assert answer["health"]["rules"] is True
    srvs[1].engine.set_health(SERVICE, "b1", False, 0.0)  # one worker's engine only
    srvs[1].engine.set_health(SERVICE, "b2", False, 0.0)
    assert node.judge(sup.handle({"cmd": "health"})["health"], SERVICE)[0] == node.NO_BACKEND
    srvs[1].engine.set_health(SERVICE, "b2", True, 0.0)
    assert node.judge(sup.handle({"cmd": "health"})["health"], None)[0] == node.OK
    os.unlink(control.worker_socket_path(1, 1))  # worker 1 gone
    code, line = node.judge(sup.handle({"cmd": "health"})["health"], None)
    assert code == node.NOT_WHOLE and "worker 1" in line


def test_supervisor_answers_drain_node_itself(supervisor: Any) -> None:
    sup, srvs = supervisor
    assert sup.handle({"cmd": "drain_node"})["ok"]
    assert sup.node.state == node.DRAINING
    assert all(srv.node.state == node.SERVING for srv in srvs)
    assert node.judge(sup.handle({"cmd": "health"})["health"], None)[0] == node.NODE_OUT
    assert sup.handle({"cmd": "status"})["status"]["daemon"]["node"] == node.DRAINING
    sup.handle({"cmd": "enable_node"})
    assert node.judge(sup.handle({"cmd": "health"})["health"], None)[0] == node.OK
    sup.node.rules = False  # stopping: the rules went first
    assert node.judge(sup.handle({"cmd": "health"})["health"], None)[0] == node.NOT_WHOLE


# ------------------------------------------------------------------ configuration


def daemon_config(**daemon: Any) -> Any:
    return parse_config({"daemon": daemon, "service": [service("dnat")]}, "n.toml")


def test_ecmp_makes_bypass_default_false() -> None:
    assert daemon_config().daemon.bypass is True  # today's default, kept without ecmp
    assert daemon_config().daemon.ecmp is False
    ecmp = daemon_config(ecmp=True)
    assert (ecmp.daemon.ecmp, ecmp.daemon.bypass) == (True, False)
    assert config_warnings(ecmp) == []
    assert config_warnings(daemon_config(bypass=True)) == []
    [line] = config_warnings(daemon_config(ecmp=True, bypass=True))
    assert line.startswith("n.toml: daemon.bypass: true behind ECMP (daemon.ecmp)")


def test_withdraw_wait() -> None:
    assert daemon_config().daemon.withdraw_wait == 0.0
    assert daemon_config(withdraw_wait=5).daemon.withdraw_wait == 5.0
    for bad in (-1, "5s", True):
        with pytest.raises(ConfigError, match="daemon.withdraw_wait"):
            daemon_config(withdraw_wait=bad)
    with pytest.raises(ConfigError, match="daemon.ecmp"):
        daemon_config(ecmp="yes")


def test_check_warns_about_bypass_behind_ecmp(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nfqlb.toml"
    body = ('\n[[service]]\nname = "web"\nvip = "198.18.100.1"\nport = 80\nmode = "dnat"\n'
            '[[service.backend]]\naddress = "198.18.1.2"\nport = 8080\n')
    path.write_text("[daemon]\necmp = true\nbypass = true\n" + body)
    code, out, err = run(capsys, "check", "--config", str(path))
    assert code == 0 and out.endswith("ok (1 service)\n")
    assert f"nfqlb: warning: {path}: daemon.bypass: true behind ECMP" in err
    path.write_text("[daemon]\necmp = true\n" + body)
    assert run(capsys, "check", "--config", str(path))[2] == ""


def test_ecmp_rules_drop_when_no_worker_is_bound() -> None:
    """Without --queue-bypass the kernel drops a queue's packets while nothing is bound."""
    from nfqlb import rules

    def text(config: Any) -> str:
        return "\n".join(line for rs in rules.render(config, 1) for line in rs.body)

    assert "--queue-bypass" in text(daemon_config())
    assert "NFQUEUE" in text(daemon_config(ecmp=True))
    assert "--queue-bypass" not in text(daemon_config(ecmp=True))


class SavedText:
    """An ``Iptables`` whose ``save_text`` (and ``nft_tables``) is what a test says."""

    def __init__(self, text: str, nft: dict[str, int] | None = None) -> None:
        self.text = text
        self.nft = {"nfqlb-1": 5} if nft is None else nft

    def save_text(self) -> str:
        return self.text

    def nft_tables(self) -> dict[str, int]:
        return self.nft


def test_missing_jump_names_the_jump_gone_from_the_kernel() -> None:
    from nfqlb import rules

    [rs] = rules.render(daemon_config(), 1)
    installed = "*raw\n" + "".join(line.replace("-I ", "-A ", 1) + "\n" for line in rs.jumps)
    assert node.missing_jump([rs], {4: SavedText(installed + "COMMIT\n")}) == ""
    flushed = installed.replace(f"-A PREROUTING -j {rs.chains.pre}\n", "")
    line = node.missing_jump([rs], {4: SavedText(flushed)})
    assert line == (f"the rules are gone from the kernel: no jump from PREROUTING to "
                    f"{rs.chains.pre} in iptables-save (flushed by another program?)")
    # the headers route's nftables table (its TCP service), deleted by another program
    assert rs.nft
    line = node.missing_jump([rs], {4: SavedText(installed + "COMMIT\n", nft={})})
    assert line == ("the rules are gone from the kernel: no nftables ip nfqlb-1 in nft list "
                    "tables (deleted by another program?)")


def test_rules_watch_fails_health_until_the_jump_is_back(
        daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    srv, path = daemon
    found = ["no jump from PREROUTING to NFQLB-PRE-1"]
    watch = node.RulesWatch(srv.node, lambda: found[0], interval=0.01)
    watch.start()
    try:
        for _ in range(500):  # (bounded: the thread looks every 10 ms)
            if srv.node.rules_gone:
                break
            threading.Event().wait(0.01)
        code, _, err = health(capsys, path)
        assert (code, err) == (node.NOT_WHOLE, f"nfqlb: not serving: {found[0]}\n")
        found[0] = ""
        for _ in range(500):
            if not srv.node.rules_gone:
                break
            threading.Event().wait(0.01)
        assert health(capsys, path)[0] == node.OK
    finally:
        watch.stop()


def test_rules_watch_tells_of_a_table_made_anew_once(daemon: Any) -> None:
    srv, _path = daemon
    handles = [{"ip nfqlb-1": 5}]
    told: list[list[str]] = []
    watch = node.RulesWatch(srv.node, lambda: "", interval=0.01, tables=lambda: handles[0],
                            on_anew=told.append)
    watch.start()
    try:
        for step in ({}, {"ip nfqlb-1": 9}, {"ip nfqlb-1": 9, "ip6 nfqlb-1": 3}):
            time.sleep(0.05)  # (the thread looks every 10 ms)
            handles[0] = step
        for _ in range(500):
            if told:
                break
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        watch.stop()
    # gone, then back with another handle: said once; a table seen for the first time is not
    assert told == [["ip nfqlb-1"]], told
