"""Health checks on the daemon's own event loop: probes, their schedule, and what they report.

One task per checked backend (:func:`nfqlb.health.targets`) runs forever: a probe, its result
counted by :class:`nfqlb.health.BackendHealth` (rise and fall), the result reported to the
engine (``engine.set_health``), then a sleep until ``interval`` after the probe started. A
probe never blocks the loop: sockets are non-blocking and awaited (``loop.sock_*``), HTTP is
parsed by h11 (sans-IO, like the engine), a command is awaited through its pidfd. Every probe
is bounded by ``timeout``, which is at most ``interval``, so a backend has at most one
check in flight. Packets keep their turn between any two steps of a probe.

The probes (``[service.health] kind``):

- ``tcp``: connect, then close with a RST (``SO_LINGER`` 0, as HAProxy closes its checks: no
  TIME_WAIT is left behind, so the source port is free again at once);
- ``http``: connect, send ``GET path`` with ``Host`` and ``Connection: close``, read up to
  the response's status line and headers; up when the status is in ``expect``. Redirects are
  not followed: a 302 is a 302, up if ``expect`` says so;
- ``command``: run the program with the backend's address and port added, in a session of
  its own; exit 0 is up. One that overruns ``timeout`` is killed with its process group. It
  is started with ``subprocess.Popen`` (vfork: as cheap for a daemon holding a million flows
  as for an empty one) and awaited through its pidfd, which turns readable when it ends.

Their own packets must not reach the queue: a reply from a backend's service port is what the
reply rules queue. tcp and http connections therefore leave from a port of ``source_ports``
(default 61000-61999: above Linux's default ephemeral range, so no other socket of the host
gets one unless it asks for it), and ``rules/health.rules`` lets packets from a backend's
checked port to such a port of a local address through untouched (see nfqlb/rules.py).

Measured latency (connect for tcp; until the response's headers for http; the program's run
time for a command) goes to the engine with each result and, after a success, to the
service's policy when it has ``observe(backend, seconds, now)``
(``examples/policies/least_latency.py``); a policy that raises there is contained and logged
at a rate limit. ``now`` comes from ``clock``, the packets' clock; the latency from
``time.perf_counter``, since the packets' clock is coarse (10 ms ticks: :mod:`nfqlb.io.clock`)
and a check on a LAN takes well under a tick.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h11

from nfqlb.config import Config, HealthKind
from nfqlb.health import BackendHealth, Target, targets
from nfqlb.policies import describe_failure
from nfqlb.ratelog import RateLimitedLog

__all__ = ["CheckResult", "HealthChecker", "HealthEngine", "SourcePorts"]

USER_AGENT = "nfqlb-health-check"
RECV_SIZE = 4096
PROCESS_POLL_S = 0.05  # how often a command is polled where the kernel has no pidfds
BIND_TRIES = 32  # source ports tried before a check fails with "no free source port"
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class HealthEngine(Protocol):
    """What the checker needs of the engine."""

    def set_health(self, service: str, backend: str, up: bool, now: float, reason: str = "",
                   latency: float | None = None) -> None: ...

    def policy(self, service: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str  # "status 200", "connected", "exit 0"; "timeout", "connection refused", ...
    latency: float | None = None  # seconds, for a success


class CheckFailed(Exception):
    """A probe failed for a reason worded for the log ("status 503", "exit 1")."""


class SourcePorts:
    """Hands out the checks' source ports: each bind takes the next port of the range (so a
    port just used rests while the others are used) and skips ports in use."""

    def __init__(self) -> None:
        self._next: dict[tuple[int, int], int] = {}

    def bind(self, sock: socket.socket, ports: tuple[int, int]) -> int:
        lo, hi = ports
        size = hi - lo + 1
        start = self._next.get(ports, 0)
        for i in range(min(size, BIND_TRIES)):
            port = lo + (start + i) % size
            try:
                sock.bind(("", port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            self._next[ports] = (start + i + 1) % size
            return port
        self._next[ports] = (start + BIND_TRIES) % size
        raise CheckFailed(f"no free source port in {lo}-{hi}")


def reason_of(exc: BaseException) -> str:
    """A failed probe's reason, as the log and ``status`` show it."""
    if isinstance(exc, CheckFailed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, h11.RemoteProtocolError):
        return f"bad response: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return f"{type(exc).__name__}: {exc}"


def _status_ok(status: int, expect: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= status <= hi for lo, hi in expect)


class HealthChecker:
    """Checks the backends of ``config``'s services that have ``[service.health]``; reports
    to ``engine``. ``start()`` schedules the checks on ``loop``, ``reconfigure(config)``
    applies a reloaded configuration (backends that stay keep their state), ``stop()`` ends
    every check and kills any command still running."""

    def __init__(self, config: Config, engine: HealthEngine, loop: asyncio.AbstractEventLoop,
                 log: logging.Logger, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.loop = loop
        self.on_result: Callable[[], None] | None = None  # after each result given the engine
        self.log = log
        self.clock = clock
        self.targets = targets(config)
        self.states: dict[tuple[str, str], BackendHealth] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.ports = SourcePorts()
        self._procs: set[subprocess.Popen[bytes]] = set()  # commands running
        self._errors = RateLimitedLog(log)
        self._started = False

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._started = True
        self._warn_ephemeral_overlap()
        for key in self.targets:
            self.states[key] = BackendHealth()
            self._spawn(key)
        if self.targets:
            self.log.info("health checks: %d backend%s", len(self.targets),
                          "" if len(self.targets) == 1 else "s")

    def reconfigure(self, config: Config) -> None:
        """Apply ``config``: checks of removed backends stop, new ones start, changed ones
        restart; a backend checked before and after, at the same address and port, keeps its
        state (up/down and its counts). A backend still configured whose checks were removed
        is reported up (nothing checks it any more)."""
        new = targets(config)
        configured = {(s.name, b.name) for s in config.services for b in s.backends}
        for key, old in self.targets.items():
            target = new.get(key)
            if target == old:
                continue  # unchanged: its checks go on
            self._cancel(key)
            if target is None:
                state = self.states.pop(key, None)
                if key in configured and state is not None and not state.up:
                    self._set_health(old, True, "not checked any more", None)
            elif (target.address, target.port) != (old.address, old.port):
                self.states[key] = BackendHealth()  # another endpoint: it starts afresh
        self.targets = new
        for key in new:
            self.states.setdefault(key, BackendHealth())
            if self._started and key not in self.tasks:
                self._spawn(key)

    def stop(self) -> None:
        """Cancel every check and kill the commands still running; when the loop is not
        running, run it until the cancelled checks have closed their sockets."""
        self._started = False
        tasks = list(self.tasks.values())
        for key in list(self.tasks):
            self._cancel(key)
        for proc in list(self._procs):
            _kill_group(proc)
        if tasks and not self.loop.is_running() and not self.loop.is_closed():
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
        for proc in list(self._procs):  # killed: reap what is left
            try:
                proc.wait(timeout=1.0)
                self._procs.discard(proc)
            except subprocess.TimeoutExpired:
                self.log.warning("health check command %d did not end after SIGKILL", proc.pid)

    def _spawn(self, key: tuple[str, str]) -> None:
        target = self.targets[key]
        self.tasks[key] = self.loop.create_task(self._run(target),
                                                name=f"health {target.service}/{target.backend}")

    def _cancel(self, key: tuple[str, str]) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()

    def _warn_ephemeral_overlap(self) -> None:
        try:
            lo, hi = (int(v) for v in EPHEMERAL_RANGE.read_text().split())
        except (OSError, ValueError):
            return
        for ports in sorted({t.check.source_ports for t in self.targets.values()
                             if t.uses_source_ports}):
            if ports[0] <= hi and lo <= ports[1]:
                self.log.warning("health checks' source_ports %d-%d overlap the host's "
                                 "ephemeral ports %d-%d (net.ipv4.ip_local_port_range): a "
                                 "local client given such a port would see its replies "
                                 "bypass nfqlb", ports[0], ports[1], lo, hi)

    # ------------------------------------------------------------ one backend's checks

    async def _run(self, target: Target) -> None:
        """Check ``target`` every ``interval`` seconds (from the start of one check to the
        start of the next), forever; the first check at once."""
        next_at = self.loop.time()
        while True:
            delay = next_at - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started = self.loop.time()
            result = await self.check(target)
            self._report(target, result)
            next_at = max(started + target.check.interval, self.loop.time())

    async def check(self, target: Target) -> CheckResult:
        """One probe of ``target``, bounded by its timeout; never raises (but CancelledError)."""
        began = time.perf_counter()
        try:
            async with asyncio.timeout(target.check.timeout):
                reason = await self._probe(target)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return CheckResult(False, reason_of(exc))
        return CheckResult(True, reason, time.perf_counter() - began)

    async def _probe(self, target: Target) -> str:
        kind = target.check.kind
        if kind is HealthKind.COMMAND:
            return await self._command(target)
        sock = await self._connect(target)
        try:
            if kind is HealthKind.TCP:
                return "connected"
            return await self._http(target, sock)
        finally:
            sock.close()

    async def _connect(self, target: Target) -> socket.socket:
        family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # close with a RST: no TIME_WAIT, the source port is free again at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.ports.bind(sock, target.check.source_ports)
            await self.loop.sock_connect(sock, (str(target.address), target.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _http(self, target: Target, sock: socket.socket) -> str:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target.check.path, headers=[
            ("Host", target.http_host), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
            ("Connection", "close")])
        await self.loop.sock_sendall(sock, conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.loop.sock_recv(sock, RECV_SIZE)
                if not data:
                    raise CheckFailed("connection closed before a response")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = f"status {event.status_code}"
                if not _status_ok(event.status_code, target.check.expect):
                    raise CheckFailed(status)
                return status
            # an InformationalResponse (1xx): the final response follows

    async def _command(self, target: Target) -> str:
        # subprocess.Popen, not the loop's subprocess_exec: Popen uses vfork, which costs the
        # same for a daemon holding a million flows as for a small one; uvloop (libuv) forks,
        # which copies the page tables and stalls the loop (0.7 s for a 2 GB process here)
        proc = subprocess.Popen(target.argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self._procs.add(proc)
        try:
            code = await self._exited(proc)
        except BaseException:  # timeout or stop: the program and its children go
            _kill_group(proc)
            try:
                await asyncio.shield(asyncio.wait_for(self._exited(proc), 1.0))
            except BaseException:  # noqa: B036 - stop() reaps what is left
                pass
            raise
        finally:
            if proc.returncode is not None:
                self._procs.discard(proc)
        if code == 0:
            return "exit 0"
        if code < 0:
            try:
                raise CheckFailed(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                raise CheckFailed(f"killed by signal {-code}") from None
        raise CheckFailed(f"exit {code}")

    async def _exited(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for ``proc`` to end without blocking the loop: its pidfd becomes readable
        when it exits (Linux 5.3), then it is reaped at once; without pidfds, poll."""
        if proc.poll() is not None:
            return proc.returncode
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # no pidfd here: poll every PROCESS_POLL_S
            while proc.poll() is None:
                await asyncio.sleep(PROCESS_POLL_S)
            return proc.returncode
        try:
            exited: asyncio.Future[None] = self.loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            self.loop.add_reader(fd, on_exit)
            try:
                if proc.poll() is None:
                    await exited
            finally:
                self.loop.remove_reader(fd)
        finally:
            os.close(fd)
        return proc.wait()  # it has ended: no wait

    # ------------------------------------------------------------ results

    def _report(self, target: Target, result: CheckResult) -> None:
        check = target.check
        state = self.states.setdefault(target.key, BackendHealth())
        changed = state.record(result.ok, result.reason, check.rise, check.fall,
                               result.latency)
        now = self.clock()
        self._set_health(target, state.up, result.reason, result.latency)
        if result.ok and result.latency is not None:
            self._observe(target, result.latency, now)
        if changed:
            n = check.rise if state.up else check.fall
            self.log.info("service %s: backend %s %s (%d check%s %s: %s)", target.service,
                          target.backend, "up" if state.up else "down", n, "" if n == 1 else "s",
                          "passed" if state.up else "failed", result.reason)
        elif not result.ok:
            self.log.debug("service %s: backend %s check failed: %s", target.service,
                           target.backend, result.reason)

    def _set_health(self, target: Target, up: bool, reason: str,
                    latency: float | None) -> None:
        now = self.clock()
        try:
            self.engine.set_health(target.service, target.backend, up, now, reason, latency)
            if self.on_result is not None:
                self.on_result()
        except Exception as exc:
            self._errors.error(f"set_health:{target.service}", now,
                               "service %s: the engine refused a health result for %s: %r",
                               target.service, target.backend, exc)

    def _observe(self, target: Target, latency: float, now: float) -> None:
        """Give the latency to the policy's ``observe``, if it has one; contained."""
        try:
            observe = getattr(self.engine.policy(target.service), "observe", None)
            if observe is not None:
                observe(target.backend, latency, now)
        except Exception as exc:
            self._errors.warning(f"observe:{target.service}", now,
                                 "service %s: policy observe() failed: %s", target.service,
                                 describe_failure(exc))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the program's
    except (ProcessLookupError, PermissionError):
        pass
