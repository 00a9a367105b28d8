"""The control socket (nfqlb.io.control) against a real engine: status, flows, drain, enable,
weight, reload; garbage, huge lines and stalled clients; the socket file's place and mode."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from control_fakes import LOG, FakeServer, open_flows, served, served_control
from helpers import CLIENT, VIP, tcp

from nfqlb.engine import backend_of
from nfqlb.io import control


def ask(path: Path, **message: Any) -> dict[str, Any]:
    return control.request(path, message)


def test_status_carries_the_engines_figures_and_the_daemons(tmp_path: Path) -> None:
    srv = FakeServer()
    open_flows(srv, 4)
    path = tmp_path / "nfqlb-1.sock"
    with served(srv, path):
        answer = ask(path, cmd="status")
    assert answer["ok"] is True
    s = answer["status"]
    assert s["flows_total"] == 4 and s["flows_active"] == 4 and s["packets"] == 4
    svc = s["services"]["dnat-tcp"]
    assert (svc["vip"], svc["port"], svc["mode"], svc["policy"]) == (VIP, 80, "dnat",
                                                                      "round_robin")
    assert sum(b["flows"] for b in svc["backends"].values()) == 4
    assert {b["state"] for b in svc["backends"].values()} == {"up"}
    assert [q["queue"] for q in s["queues"]] == [1, 10001]
    assert s["queues"][0]["kernel"] == {"queue_total": 3, "queue_dropped": 7, "user_dropped": 5}
    d = s["daemon"]
    assert d["config"] == "/etc/nfqlb/nfqlb.toml" and d["loaded_at"] == 1_700_000_100.0
    assert d["pid"] == os.getpid() and d["queue"] == 1 and d["uptime_s"] > 0


def test_drain_enable_weight_change_where_new_flows_go(tmp_path: Path) -> None:
    srv = FakeServer()
    path = tmp_path / "c.sock"
    with served(srv, path):
        answer = ask(path, cmd="drain", service="dnat-tcp", backend="b1")
        assert answer == {"ok": True, "message": "dnat-tcp/b1: draining (now draining)"}
        for port in range(41000, 41006):
            syn = tcp(CLIENT, VIP, port, 80, "S")
            srv.engine.handle(syn, srv.now)
            b = backend_of(srv.engine, syn)
            assert b is not None and b.name == "b2"
        status = ask(path, cmd="status")["status"]["services"]["dnat-tcp"]["backends"]
        assert status["b1"]["state"] == "draining" and status["b2"]["flows"] == 6
        assert ask(path, cmd="enable", service="dnat-tcp", backend="b1")["ok"]
        assert ask(path, cmd="weight", service="dnat-tcp", backend="b2", weight=0) == {
            "ok": True, "message": "dnat-tcp/b2: weight 0 (now up)"}
        syn = tcp(CLIENT, VIP, 42000, 80, "S")
        srv.engine.handle(syn, srv.now)
        b = backend_of(srv.engine, syn)
        assert b is not None and b.name == "b1"
        status = ask(path, cmd="status")["status"]["services"]["dnat-tcp"]["backends"]
        assert (status["b1"]["state"], status["b2"]["weight"]) == ("up", 0)


def test_drain_with_a_timeout_resets_the_flows_when_it_runs_out(tmp_path: Path) -> None:
    srv = FakeServer()
    open_flows(srv, 2)
    path = tmp_path / "c.sock"
    with served(srv, path):
        answer = ask(path, cmd="drain", service="dnat-tcp", backend="b1", timeout=5)
    assert answer["message"] == "dnat-tcp/b1: draining (flows reset after 5 s) (now draining)"
    assert srv.engine.get_timer() == pytest.approx(srv.now + 5)
    assert srv.timer_checks == 1  # the server looks whether its timer must come sooner


@pytest.mark.parametrize("message, error", [
    ({"cmd": "drain", "service": "nope", "backend": "b1"}, "no service 'nope'"),
    ({"cmd": "enable", "service": "dnat-tcp", "backend": "b9"},
     "service 'dnat-tcp' has no backend 'b9'"),
    ({"cmd": "weight", "service": "dnat-tcp", "backend": "b1", "weight": -1},
     "weight must be an integer 0-1000000, not -1"),
    ({"cmd": "weight", "service": "dnat-tcp", "backend": "b1", "weight": "3"},
     "weight: 'weight' has the wrong type (str)"),
    ({"cmd": "weight", "service": "dnat-tcp", "backend": "b1", "weight": True},
     "weight: 'weight' has the wrong type (bool)"),
    ({"cmd": "weight", "service": "dnat-tcp", "backend": "b1"}, "weight: missing 'weight'"),
    ({"cmd": "drain", "service": "dnat-tcp", "backend": ["b1"]},
     "drain: 'backend' has the wrong type (list)"),
    ({"cmd": "drain", "service": "dnat-tcp", "backend": "b1", "timeout": -3},
     "drain: timeout must be 0-10000000 s, not -3"),
    ({"cmd": "flows", "limit": 0}, "flows: limit must be 1-10000, not 0"),
    ({"cmd": "flows", "service": "nope"}, "no service 'nope'"),
    ({"cmd": "flows", "backend": "b9"}, "no backend 'b9'"),
    ({"cmd": "shutdown"}, "unknown command 'shutdown' (known: status, flows, drain, enable, "
                          "weight, reload, health_result, health, drain_node, enable_node, "
                          "tables_anew)"),
    ({"command": "status"}, "unknown command None (known: status, flows, drain, enable, "
                            "weight, reload, health_result, health, drain_node, enable_node, "
                          "tables_anew)"),
])
def test_bad_requests_get_one_line_errors_and_change_nothing(
        tmp_path: Path, message: dict[str, Any], error: str) -> None:
    srv = FakeServer()
    open_flows(srv, 3)
    before = srv.engine.status(srv.now)
    path = tmp_path / "c.sock"
    with served(srv, path):
        assert control.request(path, message) == {"ok": False, "error": error}
    assert srv.engine.status(srv.now) == before


def test_reload_answers_what_the_daemon_says(tmp_path: Path) -> None:
    srv = FakeServer()
    path = tmp_path / "c.sock"
    with served(srv, path):
        assert ask(path, cmd="reload") == {"ok": True, "message": "reloaded: 1 service"}
        srv.reload_result = (False, "f.toml: service[0].port: 0 is out of range 1-65535")
        assert ask(path, cmd="reload") == {
            "ok": False, "error": "f.toml: service[0].port: 0 is out of range 1-65535"}
    assert srv.reloads == 2


def test_flows_lists_the_table_bounded_and_filtered(tmp_path: Path) -> None:
    srv = FakeServer()
    open_flows(srv, 5)
    path = tmp_path / "c.sock"
    with served(srv, path):
        all_ = ask(path, cmd="flows")
        two = ask(path, cmd="flows", limit=2)
        b1 = ask(path, cmd="flows", service="dnat-tcp", backend="b1")
    assert len(all_["flows"]) == 5 and all_["truncated"] is False
    assert len(two["flows"]) == 2 and two["truncated"] is True
    assert {f["backend"] for f in b1["flows"]} == {"b1"} and len(b1["flows"]) == 3
    f = all_["flows"][0]
    assert (f["protocol"], f["state"], f["client"], f["vip"], f["port"]) == (
        "tcp", f["state"], CLIENT, VIP, 80)
    assert f["backend_address"] in ("198.18.1.2", "198.18.1.3") and f["backend_port"] == 8080


def _raw(path: Path, data: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``data`` as it is, read answers until the daemon closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_garbage_gets_error_answers_and_the_daemon_serves_on(tmp_path: Path) -> None:
    srv = FakeServer()
    open_flows(srv, 2)
    before = srv.engine.status(srv.now)
    path = tmp_path / "c.sock"
    with served(srv, path):
        answers = _raw(path, b"hello\n\xff\xfe\n[1,2]\n\n42\n{\"cmd\": 7}\nnull\n"
                       b"{\"cmd\": \"status\"}\n")
        assert [a["ok"] for a in answers] == [False] * 6 + [True]
        assert answers[0]["error"] == "not a JSON request (one JSON object a line)"
        assert answers[1]["error"] == "not a JSON request (one JSON object a line)"
        assert answers[2]["error"].startswith("a request is a JSON object")
        huge = _raw(path, b"{\"cmd\": \"status\", \"x\": \"" + b"a" * 100_000 + b"\"}\n"
                    b"{\"cmd\": \"status\"}\n")
        assert huge == [{"ok": False, "error": f"request longer than {control.MAX_LINE} bytes"}]
        assert ask(path, cmd="status")["ok"]
    assert srv.engine.status(srv.now) == before


def test_a_stalled_client_is_dropped_and_does_not_hold_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.3)
    srv = FakeServer()
    path = tmp_path / "c.sock"
    with served(srv, path):
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(path))
        stalled.sendall(b"{\"cmd\": \"sta")  # half a request, then nothing
        assert ask(path, cmd="status")["ok"]  # served meanwhile
        stalled.settimeout(5)
        assert stalled.recv(100) == b""  # closed by the daemon after IDLE_TIMEOUT
        stalled.close()


def test_too_many_clients_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    srv = FakeServer()
    path = tmp_path / "c.sock"
    with served_control(srv, path) as ctl:
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for s in idle:
            s.connect(str(path))
        deadline = time.monotonic() + 30  # until the loop's thread has taken both
        while ctl.clients < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            assert ask(path, cmd="status") == {"ok": False, "error": "too many control clients"}
        finally:
            for s in idle:
                s.close()


def test_socket_mode_directory_and_clean_up(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nfqlb-7.sock"
    with served(FakeServer(), path):
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "nfqlb-1.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed daemon's
    with served(FakeServer(), path):
        assert ask(path, cmd="status")["ok"]
        second = control.ControlServer(FakeServer(), path, LOG)
        with pytest.raises(control.SystemSetupError, match="another nfqlb answers"):
            asyncio.run(second.start())
        assert ask(path, cmd="status")["ok"]


def test_paths_and_socket_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(control.RUN_DIR_ENV, raising=False)
    assert control.socket_path(3) == Path("/run/nfqlb/nfqlb-3.sock")
    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    assert control.socket_path(3) == tmp_path / "nfqlb-3.sock"
    assert control.find_socket(None, "/x.sock") == Path("/x.sock")
    with pytest.raises(control.ControlError, match="no control socket in"):
        control.find_socket()
    (tmp_path / "nfqlb-2.sock").touch()
    assert control.find_socket() == tmp_path / "nfqlb-2.sock"
    (tmp_path / "nfqlb-5.sock").touch()
    with pytest.raises(control.ControlError, match=r"several nfqlb workers run \(queues 2, 5\)"):
        control.find_socket()


def test_client_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(control.ControlError, match="no such control socket"):
        control.request(tmp_path / "none.sock", {"cmd": "status"})
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    with pytest.raises(control.ControlError, match="nobody listens"):
        control.request(dead, {"cmd": "status"})


def test_handle_never_raises_on_a_broken_engine() -> None:
    srv = FakeServer()

    class Broken:  # the engine, but its status raises (a compiled Engine takes no patches)
        def __init__(self, engine: object) -> None:
            self._engine = engine

        def __getattr__(self, name: str) -> object:
            return getattr(self._engine, name)

        def status(self, now: float) -> None:
            raise RuntimeError("boom")

    srv.engine = Broken(srv.engine)  # type: ignore[assignment]
    answer = control.handle(srv, {"cmd": "status"}, LOG)
    assert answer == {"ok": False, "error": "internal error: RuntimeError('boom')"}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_endpoints_close_even_when_a_stop_is_still_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop_kind: str) -> None:
    """The daemon's crash path stops the loop twice (uvloop queues each stop): closing the
    socket after it must still finish, and remove the socket file."""
    import uvloop

    monkeypatch.setenv(control.RUN_DIR_ENV, str(tmp_path))
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    srv = FakeServer()
    srv.loop = loop  # type: ignore[attr-defined]
    try:
        with control.operator_endpoints(srv, srv.engine.config, 3, LOG):
            assert (tmp_path / "nfqlb-3.sock").exists()
            loop.call_soon(lambda: (loop.stop(), loop.call_soon(loop.stop)))
            loop.run_forever()
        assert not (tmp_path / "nfqlb-3.sock").exists()
    finally:
        loop.close()


def test_an_answer_sent_before_the_request_was_read_is_still_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon with too many clients answers and closes without reading: the client's send
    then fails (EPIPE), and the answer waiting in its socket is still what it reports."""
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    closed = threading.Event()

    def answer_and_close() -> None:
        conn, _ = listener.accept()
        conn.send(b'{"ok": false, "error": "too many control clients"}\n')
        conn.close()
        closed.set()

    class LateSender(socket.socket):
        def sendall(self, data: Any, *args: Any) -> None:
            closed.wait(5)  # the daemon has answered and closed: this send fails
            super().sendall(data, *args)

    thread = threading.Thread(target=answer_and_close, daemon=True)
    thread.start()
    monkeypatch.setattr(control.socket, "socket", LateSender)
    try:
        assert control.request(path, {"cmd": "status"}) == {
            "ok": False, "error": "too many control clients"}
    finally:
        thread.join(5)
        listener.close()
