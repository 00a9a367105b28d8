"""Health checks: rise and fall, the probes against real servers on 127.0.0.1, the reasons
they give, command checks (exit codes, arguments, killed on timeout), and the checker's life
(reports to the engine, observe() fed and contained, reconfigure, stop), with a fake engine
that has the engine's two methods."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nfqlb.config import Config, parse_config
from nfqlb.health import BackendHealth, targets
from nfqlb.io.health import CheckResult, HealthChecker

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------ rise and fall


def test_a_backend_starts_up_and_goes_down_after_fall_consecutive_failures() -> None:
    h = BackendHealth()
    assert h.up
    for ok in (False, False, True, False, False):  # a success in between starts the count anew
        assert not h.record(ok, "x", rise=2, fall=3)
        assert h.up
    assert h.record(False, "status 503", rise=2, fall=3)
    assert not h.up and h.last == "status 503"


def test_a_down_backend_comes_up_after_rise_consecutive_successes() -> None:
    h = BackendHealth()
    assert h.record(False, "timeout", rise=2, fall=1)
    assert not h.up
    for ok in (True, False, True):
        assert not h.record(ok, "x", rise=2, fall=1)
        assert not h.up
    assert h.record(True, "status 200", rise=2, fall=1, latency=0.25)
    assert h.up and h.latency == 0.25
    assert h.checks == 5


def test_state_table_exhaustively_for_small_rise_and_fall() -> None:
    """Against a direct model: after any sequence, the state is what the last run of
    fall failures (while up) or rise successes (while down) made it."""
    import itertools
    for rise, fall in itertools.product((1, 2, 3), (1, 2, 3)):
        for seq in itertools.product((True, False), repeat=7):
            h = BackendHealth()
            up, run = True, 0
            for ok in seq:
                changed = h.record(ok, "", rise, fall)
                if up:
                    run = 0 if ok else run + 1
                    flip = run >= fall
                else:
                    run = run + 1 if ok else 0
                    flip = run >= rise
                if flip:
                    up, run = not up, 0
                assert (h.up, changed) == (up, flip), (rise, fall, seq)


# ------------------------------------------------------------------ targets


def config(health: dict[str, Any] | None, *, mode: str = "dnat", port: int = 8080,
           backends: list[dict[str, Any]] | None = None, **service: Any) -> Config:
    svc: dict[str, Any] = {"name": "web", "vip": "198.18.100.1", "port": 80, "mode": mode,
                           "backend": backends or [{"name": "b1", "address": LOOPBACK,
                                                    "port": port}], **service}
    if health is not None:
        svc["health"] = health
    return parse_config({"service": [svc]}, "test.toml")


def test_targets_take_health_port_then_port_then_the_backends_own() -> None:
    cfg = config({"port": 9000}, backends=[
        {"name": "a", "address": "198.18.1.2", "port": 8080},
        {"name": "b", "address": "198.18.1.3", "port": 8080, "health_port": 9100}])
    found = targets(cfg)
    assert [(t.backend, str(t.address), t.port) for t in found.values()] == [
        ("a", "198.18.1.2", 9000), ("b", "198.18.1.3", 9100)]
    assert targets(config(None)) == {}


def test_a_local_backend_without_address_is_checked_on_the_vip() -> None:
    cfg = config({}, mode="local", backends=[{"name": "l", "port": 8443}])
    [t] = targets(cfg).values()
    assert (str(t.address), t.port) == ("198.18.100.1", 8443)
    assert t.http_host == "198.18.100.1:8443"


def test_command_argv_ends_with_address_and_port(tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    cfg = parse_config({"service": [{
        "name": "web", "vip": "2001:db8:100::1", "port": 80, "mode": "dnat",
        "backend": [{"address": "2001:db8:1::2", "port": 8080}],
        "health": {"kind": "command", "command": "./check.sh --quiet"}}]},
        str(tmp_path / "nfqlb.toml"))
    [t] = targets(cfg).values()
    assert t.argv == (str(script), "--quiet", "2001:db8:1::2", "8080")
    assert t.endpoint == "[2001:db8:1::2]:8080"


# ------------------------------------------------------------------ servers for the probes


class Http:
    """An HTTP server on 127.0.0.1 answering every request with ``status`` (changeable), or
    with ``raw`` bytes, or never (``silent``); it keeps each request's head and peer port."""

    def __init__(self) -> None:
        self.status = 200
        self.raw: bytes | None = None
        self.silent = False
        self.requests: list[tuple[bytes, int]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append((head, writer.get_extra_info("peername")[1]))
            if self.silent:
                await asyncio.sleep(30)
            elif self.raw is not None:
                writer.write(self.raw)
            else:
                writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 2\r\n"
                             f"Connection: close\r\n\r\nok".encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Http:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then closed)."""
    import socket
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class FakeEngine:
    """The engine's health API: every set_health call kept; policy(name) -> ``policy``."""

    def __init__(self, policy: Any = None) -> None:
        self.calls: list[tuple[str, str, bool, str, float | None]] = []
        self._policy = policy

    def set_health(self, service: str, backend: str, up: bool, now: float, reason: str = "",
                   latency: float | None = None) -> None:
        self.calls.append((service, backend, up, reason, latency))

    def policy(self, service: str) -> Any:
        return self._policy


@asynccontextmanager
async def checker(cfg: Config, engine: FakeEngine | None = None,
                  log: logging.Logger | None = None) -> AsyncIterator[HealthChecker]:
    c = HealthChecker(cfg, engine or FakeEngine(), asyncio.get_running_loop(),
                      log or logging.getLogger("test.health"), time.monotonic)
    try:
        yield c
    finally:
        c.stop()
        await asyncio.gather(*c.tasks.values(), return_exceptions=True)


async def check_once(cfg: Config) -> CheckResult:
    async with checker(cfg) as c:
        [target] = c.targets.values()
        return await c.check(target)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


# ------------------------------------------------------------------ tcp


def test_tcp_check_connects_from_a_source_port_of_the_range() -> None:
    async def main() -> tuple[CheckResult, list[int]]:
        peers: list[int] = []

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peers.append(w.get_extra_info("peername")[1])
            w.close()

        server = await asyncio.start_server(accept, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        result = await check_once(config({"source_ports": "61500-61509"}, port=port))
        for _ in range(100):
            if peers:
                break
            await asyncio.sleep(0.01)
        server.close()
        return result, peers

    result, peers = run(main())
    assert result.ok and result.reason == "connected"
    assert result.latency is not None and 0 <= result.latency < 1
    assert len(peers) == 1 and 61500 <= peers[0] <= 61509


def test_tcp_check_of_a_closed_port_fails_refused() -> None:
    result = run(check_once(config({}, port=closed_port())))
    assert result == CheckResult(False, "connection refused")


def test_consecutive_checks_take_successive_source_ports() -> None:
    async def main() -> list[int]:
        async with Http() as http:
            cfg = config({"kind": "http", "source_ports": "61600-61602"}, port=http.port)
            async with checker(cfg) as c:
                [t] = c.targets.values()
                for _ in range(4):
                    assert (await c.check(t)).ok
            return [port for _, port in http.requests]

    assert run(main()) == [61600, 61601, 61602, 61600]


# ------------------------------------------------------------------ http


def http_check(setup: Callable[[Http], None], **health: Any) -> tuple[CheckResult, Http]:
    async def main() -> tuple[CheckResult, Http]:
        async with Http() as http:
            setup(http)
            result = await check_once(config({"kind": "http", **health}, port=http.port))
            return result, http

    result, http = run(main())
    return result, http


def test_http_check_up_on_200_with_path_and_host() -> None:
    result, http = http_check(lambda h: None, path="/health?x=1", host="web.example")
    assert result.ok and result.reason == "status 200"
    [(head, _)] = http.requests
    assert head.startswith(b"GET /health?x=1 HTTP/1.1\r\n")
    assert b"\r\nhost: web.example\r\n" in head.lower()


def test_http_default_host_is_the_address_and_port() -> None:
    result, http = http_check(lambda h: None)
    [(head, _)] = http.requests
    assert f"\r\nhost: 127.0.0.1:{http.port}\r\n".encode() in head.lower()


def test_http_check_fails_on_503_with_the_status_as_reason() -> None:
    def s503(h: Http) -> None:
        h.status = 503
    result, _ = http_check(s503)
    assert result == CheckResult(False, "status 503")


def test_http_expect_lists_and_redirects_are_not_followed() -> None:
    def s(code: int) -> Callable[[Http], None]:
        def setup(h: Http) -> None:
            h.status = code
        return setup

    assert http_check(s(204), expect="200,204")[0].ok
    result = http_check(s(302))[0]
    assert (result.ok, result.reason) == (True, "status 302")
    result, http = http_check(s(302), expect="200")
    assert result == CheckResult(False, "status 302")
    assert len(http.requests) == 1  # not followed


def test_http_check_times_out_on_a_silent_server() -> None:
    def silent(h: Http) -> None:
        h.silent = True
    started = time.monotonic()
    result, _ = http_check(silent, timeout=0.3, interval=1)
    assert result == CheckResult(False, "timeout")
    assert time.monotonic() - started < 3


def test_http_check_reports_a_garbage_answer_and_an_early_close() -> None:
    def garbage(h: Http) -> None:
        h.raw = b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
    result, _ = http_check(garbage)
    assert not result.ok and result.reason.startswith("bad response: ")

    def nothing(h: Http) -> None:
        h.raw = b""
    result, _ = http_check(nothing)
    assert result == CheckResult(False, "connection closed before a response")


def test_http_check_of_a_closed_port_fails_refused() -> None:
    result = run(check_once(config({"kind": "http"}, port=closed_port())))
    assert result == CheckResult(False, "connection refused")


# ------------------------------------------------------------------ command


def script(tmp_path: Path, body: str, name: str = "check.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def command_config(tmp_path: Path, command: str, **health: Any) -> Config:
    return parse_config({"service": [{
        "name": "web", "vip": "198.18.100.1", "port": 80, "mode": "dnat",
        "backend": [{"name": "b1", "address": "198.18.1.2", "port": 8080}],
        "health": {"kind": "command", "command": command, **health}}]},
        str(tmp_path / "nfqlb.toml"))


def test_command_exit_0_is_up_and_gets_address_and_port(tmp_path: Path) -> None:
    script(tmp_path, f'echo "$@" > {tmp_path}/args\nexit 0\n')
    result = run(check_once(command_config(tmp_path, "./check.sh -v")))
    assert result.ok and result.reason == "exit 0"
    assert (tmp_path / "args").read_text() == "-v 198.18.1.2 8080\n"


def test_command_exit_1_is_down(tmp_path: Path) -> None:
    script(tmp_path, "exit 1\n")
    assert run(check_once(command_config(tmp_path, "./check.sh"))) == \
        CheckResult(False, "exit 1")


def test_command_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    script(tmp_path, "kill -TERM $$\n")
    assert run(check_once(command_config(tmp_path, "./check.sh"))) == \
        CheckResult(False, "killed by SIGTERM")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for this purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_command_that_overruns_is_killed_with_its_children(tmp_path: Path) -> None:
    # the script starts a child that would outlive it, and never ends on its own
    script(tmp_path, f"sleep 30 &\necho $! > {tmp_path}/child\necho $$ > {tmp_path}/self\n"
                     "wait\n")
    started = time.monotonic()
    result = run(check_once(command_config(tmp_path, "./check.sh", timeout=0.5,
                                           interval=1)))
    assert result == CheckResult(False, "timeout")
    assert time.monotonic() - started < 3
    for name in ("self", "child"):
        pid = int((tmp_path / name).read_text())
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.02)
        assert not alive(pid), name


def test_stop_kills_a_running_command(tmp_path: Path) -> None:
    script(tmp_path, f"echo $$ > {tmp_path}/self\nexec sleep 30\n")

    async def main() -> None:
        cfg = command_config(tmp_path, "./check.sh", timeout=5, interval=10)
        async with checker(cfg) as c:
            c.start()
            for _ in range(200):
                if (tmp_path / "self").exists() and (tmp_path / "self").read_text():
                    break
                await asyncio.sleep(0.01)
        # checker() stopped it on the way out

    run(main())
    pid = int((tmp_path / "self").read_text())
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.02)
    assert not alive(pid)


# ------------------------------------------------------------------ the checker's life


async def wait_until(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_checker_reports_every_check_and_logs_transitions_with_the_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()

    async def main() -> None:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.05, "timeout": 0.05, "rise": 2,
                          "fall": 3}, port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                await wait_until(lambda: len(engine.calls) >= 2)
                http.status = 503
                await wait_until(lambda: any(not up for *_, up, _r, _l in
                                             [(s, b, u, r, la) for s, b, u, r, la
                                              in engine.calls]))
                n_down = len(engine.calls)
                http.status = 200
                await wait_until(lambda: engine.calls[-1][2] and len(engine.calls) > n_down)

    with caplog.at_level(logging.INFO, logger="test.health"):
        run(main())
    ups = [up for _s, _b, up, _r, _l in engine.calls]
    reasons = [r for *_, r, _l in engine.calls]
    first_down = ups.index(False)
    # three failures: two still up, the third down
    assert reasons[first_down - 2:first_down + 1] == ["status 503"] * 3
    assert ups[first_down - 2:first_down] == [True, True]
    # two successes: one still down, the second up
    assert ups[-2:] == [False, True] and reasons[-2:] == ["status 200"] * 2
    assert all(la is None for *_, r, la in engine.calls if r != "status 200")
    assert all(la is not None and la >= 0 for *_, r, la in engine.calls if r == "status 200")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and "backend b1" in r.getMessage()]
    assert lines == ["service web: backend b1 down (3 checks failed: status 503)",
                     "service web: backend b1 up (2 checks passed: status 200)"]


def test_checks_run_every_interval_and_not_faster() -> None:
    engine = FakeEngine()

    async def main() -> float:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.1, "timeout": 0.1}, port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                started = time.monotonic()
                await asyncio.sleep(0.55)
                return time.monotonic() - started

    elapsed = run(main())
    # the first at once, then one per 0.1 s
    assert int(elapsed / 0.1) - 1 <= len(engine.calls) <= int(elapsed / 0.1) + 1


class Observer:
    def __init__(self, fail: bool = False) -> None:
        self.samples: list[tuple[str, float, float]] = []
        self.fail = fail

    def observe(self, backend: str, seconds: float, now: float) -> None:
        self.samples.append((backend, seconds, now))
        if self.fail:
            raise ValueError("observe is broken")


def test_observe_gets_each_successful_checks_latency() -> None:
    policy = Observer()
    engine = FakeEngine(policy)

    async def main() -> None:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.05, "timeout": 0.05},
                         port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                await wait_until(lambda: len(policy.samples) >= 3)
                http.status = 500
                n = len(policy.samples)
                await wait_until(lambda: engine.calls[-1][3] == "status 500")
                await wait_until(lambda: len(engine.calls) >= len(policy.samples) + 2)
                assert len(policy.samples) <= n + 1  # failures give no sample

    run(main())
    assert all(b == "b1" and 0 <= s < 1 for b, s, _ in policy.samples)
    latencies = [la for *_, la in engine.calls if la is not None]
    assert [s for _, s, _ in policy.samples] == latencies[:len(policy.samples)]


def test_an_observe_that_raises_is_contained_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    policy = Observer(fail=True)
    engine = FakeEngine(policy)

    async def main() -> None:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.05, "timeout": 0.05},
                         port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                await wait_until(lambda: len(policy.samples) >= 4)

    with caplog.at_level(logging.WARNING, logger="test.health"):
        run(main())
    assert len(engine.calls) >= 4  # the checks went on
    lines = [r.getMessage() for r in caplog.records if "observe" in r.getMessage()]
    assert len(lines) == 1 and "ValueError: observe is broken" in lines[0]


def test_an_engine_that_raises_does_not_stop_the_checks() -> None:
    class Broken(FakeEngine):
        def set_health(self, *args: Any, **kw: Any) -> None:
            super().set_health(*args, **kw)
            raise RuntimeError("not yet")

    engine = Broken()

    async def main() -> None:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.05, "timeout": 0.05},
                         port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                await wait_until(lambda: len(engine.calls) >= 3)

    run(main())


def test_reconfigure_keeps_staying_backends_and_starts_and_stops_others() -> None:
    engine = FakeEngine()

    async def main() -> None:
        async with Http() as a, Http() as b:
            a.status = 503

            def cfg(*names: str, health: bool = True) -> Config:
                ports = {"a": a.port, "b": b.port}
                return config({"kind": "http", "interval": 0.05, "timeout": 0.05, "fall": 1,
                               "rise": 5} if health else None,
                              backends=[{"name": n, "address": LOOPBACK, "port": ports[n]}
                                        for n in names])

            async with checker(cfg("a"), engine) as c:
                c.start()
                await wait_until(lambda: not c.states[("web", "a")].up)
                task_a = c.tasks[("web", "a")]
                c.reconfigure(cfg("a", "b"))
                assert c.tasks[("web", "a")] is task_a  # unchanged: not restarted
                assert not c.states[("web", "a")].up
                await wait_until(lambda: ("web", "b") in c.states
                                 and c.states[("web", "b")].checks >= 2)
                # new settings for "a" (rise): restarted, but still down
                c.reconfigure(config({"kind": "http", "interval": 0.05, "timeout": 0.05,
                                      "fall": 1, "rise": 4},
                                     backends=[{"name": "a", "address": LOOPBACK,
                                                "port": a.port}]))
                assert ("web", "b") not in c.tasks and ("web", "b") not in c.states
                assert c.tasks[("web", "a")] is not task_a
                assert not c.states[("web", "a")].up
                await asyncio.sleep(0)
                assert task_a.cancelled() or task_a.done()
                before = len(engine.calls)
                # health checks removed while "a" is down: it is reported up once, then
                # nothing checks it
                c.reconfigure(cfg("a", health=False))
                assert c.tasks == {} and c.states == {}
                assert engine.calls[before:] == [("web", "a", True, "not checked any more",
                                                  None)]
                await asyncio.sleep(0.2)
                assert len(engine.calls) == before + 1

    run(main())


def test_stop_cancels_every_check() -> None:
    async def main() -> None:
        async with Http() as http:
            http.silent = True
            cfg = config({"kind": "http", "interval": 5, "timeout": 5}, port=http.port)
            async with checker(cfg) as c:
                c.start()
                await wait_until(lambda: len(http.requests) == 1)
                tasks = list(c.tasks.values())
                c.stop()
                await asyncio.gather(*tasks, return_exceptions=True)
                assert all(t.cancelled() for t in tasks)

    run(main())


def test_the_checker_runs_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    engine = FakeEngine()

    async def main() -> None:
        async with Http() as http:
            cfg = config({"kind": "http", "interval": 0.05, "timeout": 0.05}, port=http.port)
            async with checker(cfg, engine) as c:
                c.start()
                await wait_until(lambda: len(engine.calls) >= 2)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()
    assert engine.calls[0][:4] == ("web", "b1", True, "status 200")


def test_stop_outside_the_loop_lets_the_checks_close(tmp_path: Path) -> None:
    """As the daemon calls it: after run_forever returned."""
    script(tmp_path, "exec sleep 30\n")
    loop = asyncio.new_event_loop()
    try:
        c = HealthChecker(command_config(tmp_path, "./check.sh", timeout=5, interval=10),
                          FakeEngine(), loop, logging.getLogger("test.health"), time.monotonic)
        c.start()
        loop.call_later(0.3, loop.stop)
        loop.run_forever()
        tasks = list(c.tasks.values())
        c.stop()
        assert all(t.done() for t in tasks)
    finally:
        loop.close()
    assert signal.SIGKILL  # the program was killed by stop (test_stop_kills_a_running_command)


def test_command_checks_on_uvloop_exit_codes_and_timeout(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    script(tmp_path, 'exit "$1"\n', "code.sh")
    script(tmp_path, f"echo $$ > {tmp_path}/self\nsleep 30 &\necho $! > {tmp_path}/child\n"
                     "wait\n", "hang.sh")

    async def main() -> list[CheckResult]:
        results = []
        for command in ("./code.sh 0", "./code.sh 3", "./hang.sh"):
            results.append(await check_once(command_config(tmp_path, command, timeout=0.5,
                                                           interval=1)))
        return results

    loop = uvloop.new_event_loop()
    try:
        results = loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()
    assert [(r.ok, r.reason) for r in results] == [
        (True, "exit 0"), (False, "exit 3"), (False, "timeout")]
    for name in ("self", "child"):
        pid = int((tmp_path / name).read_text())
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.02)
        assert not alive(pid), name


def test_commands_are_not_spawned_by_the_loop(tmp_path: Path) -> None:
    """The loop's subprocess_exec forks under uvloop (libuv): the page tables of the whole
    daemon are copied while packets wait (30 ms for 512 MB here, 0.7 s for 2 GB). Commands
    are started with subprocess.Popen (vfork, about 0.1 ms whatever the size) and awaited
    through their pidfd: a loop without subprocess support runs them all the same."""
    script(tmp_path, "exit 0\n")

    class NoSpawnLoop(asyncio.SelectorEventLoop):
        async def subprocess_exec(self, *args: Any, **kw: Any) -> Any:
            raise AssertionError("the loop's subprocess_exec forks the daemon")

        async def subprocess_shell(self, *args: Any, **kw: Any) -> Any:
            raise AssertionError("the loop's subprocess_shell forks the daemon")

    loop = NoSpawnLoop()
    try:
        result = loop.run_until_complete(asyncio.wait_for(
            check_once(command_config(tmp_path, "./check.sh")), 20))
    finally:
        loop.close()
    assert (result.ok, result.reason) == (True, "exit 0")


def test_a_source_range_inside_the_ephemeral_ports_is_warned_about(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import nfqlb.io.health as io_health
    ranges = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(io_health, "EPHEMERAL_RANGE", ranges)

    def warnings(text: str) -> list[str]:
        ranges.write_text(text)
        caplog.clear()
        loop = asyncio.new_event_loop()
        try:
            c = HealthChecker(config({"source_ports": "40000-40099"}, port=closed_port()),
                              FakeEngine(), loop, logging.getLogger("test.health"),
                              time.monotonic)
            with caplog.at_level(logging.WARNING, logger="test.health"):
                c.start()
            c.stop()
        finally:
            loop.close()
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    [line] = warnings("32768\t60999\n")
    assert line.startswith("health checks' source_ports 40000-40099 overlap the host's "
                           "ephemeral ports 32768-60999")
    assert warnings("50000\t60999\n") == []
