"""The control socket: ``nfqlb status`` and ``nfqlb ctl`` talking to a running worker.

Each worker listens on a Unix socket of its own, ``<run dir>/nfqlb-<queue>.sock`` (run dir
``/run/nfqlb``, or ``$NFQLB_RUN_DIR``; created 0700 when missing; the socket is 0600 and a peer
whose uid is neither root nor the daemon's is refused). A Unix socket is a file: it reaches the
daemon from any network namespace that sees the same filesystem.

The protocol is one JSON object per line each way::

    -> {"cmd": "status"}
    <- {"ok": true, "status": {...}}                 engine.status + "daemon" + "queues"
    -> {"cmd": "flows", "service": "web", "backend": null, "limit": 1000}
    <- {"ok": true, "flows": [...], "truncated": false}
    -> {"cmd": "drain", "service": "web", "backend": "b1", "timeout": 30}
    -> {"cmd": "enable", "service": "web", "backend": "b1"}
    -> {"cmd": "weight", "service": "web", "backend": "b1", "weight": 0}
    -> {"cmd": "reload"}
    -> {"cmd": "health"}
    <- {"ok": true, "health": {"node": "serving", "rules": true, "unbound": [], "services":
        {"web": {"backends": 2, "live": 2}}, "problems": []}}   (nfqlb.io.node)
    -> {"cmd": "drain_node"}  /  {"cmd": "enable_node"}
    -> {"cmd": "health_result", "service": "web", "backend": "b1", "up": false,
        "reason": "timeout", "latency": null}   (from the supervisor of several workers)
    -> {"cmd": "tables_anew"}   (from the supervisor: nfqlb's nftables table was made again)
    <- {"ok": true, "message": "one line"}  or  {"ok": false, "error": "one line"}

The server runs on the daemon's own event loop (``asyncio.start_unix_server``), so a request
is handled between two batches of packets and sees the engine as it is, with no lock. What a
request costs the packet path is bounded: ``status`` reads counters kept as they change (it
never walks the flow table), ``flows`` walks at most ``limit`` flows (MAX_FLOWS at most).
Anything else is refused with an error answer and changes nothing: a line that is not JSON, not
an object, an unknown command, a field of the wrong type, a line longer than MAX_LINE (the
connection is then closed: where the next line starts is unknown). A client that connects and
says nothing, or does not read its answer, is dropped after IDLE_TIMEOUT / WRITE_TIMEOUT, and at
most MAX_CLIENTS are served at once: none of it can hold the loop.

The client side (``request``) is plain blocking socket code for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

from nfqlb import __version__
from nfqlb.config import mark_numbers
from nfqlb.errors import NfqlbError, SystemSetupError
from nfqlb.io import node

RUN_DIR = Path("/run/nfqlb")
RUN_DIR_ENV = "NFQLB_RUN_DIR"  # tests and side-by-side setups point it elsewhere
MAX_LINE = 4096  # bytes of one request; a longer line is refused and the connection closed
MAX_ANSWER = 256 << 20  # what the client reads of one answer at most
IDLE_TIMEOUT = 10.0  # s a connection may wait between requests
WRITE_TIMEOUT = 10.0  # s an answer may take to be read by the client
MAX_CLIENTS = 16  # connections served at once; more are answered with an error and closed
MAX_FLOWS = 10_000  # the largest ``limit`` of a flows request (about 55 ms of the loop)
DEFAULT_FLOWS = 1000
COMMANDS = ("status", "flows", "drain", "enable", "weight", "reload", "health_result", "health",
            "drain_node", "enable_node", "tables_anew")


class ControlError(NfqlbError):
    """The daemon refused a request (unknown service or backend, a failed reload), or the
    control socket could not be reached: one line, exit 1."""


class Target(Protocol):
    """What the control socket needs of the daemon's ``Server``."""

    engine: Any
    adapters: tuple[Any, ...]
    clock: Callable[[], float]


# ------------------------------------------------------------------ paths


def run_dir() -> Path:
    """Where the control sockets live: $NFQLB_RUN_DIR, else /run/nfqlb."""
    return Path(os.environ.get(RUN_DIR_ENV) or RUN_DIR)


def socket_path(queue: int, directory: Path | None = None) -> Path:
    return (directory or run_dir()) / f"nfqlb-{queue}.sock"


def worker_socket_path(queue: int, worker: int, directory: Path | None = None) -> Path:
    """The control socket of worker ``worker`` of the daemon serving from ``queue``
    (``workers > 1``: the supervisor, on ``socket_path(queue)``, talks to its workers here)."""
    return (directory or run_dir()) / f"nfqlb-{queue}.workers" / f"{worker}.sock"


def find_socket(queue: int | None = None, explicit: str | None = None) -> Path:
    """The socket the CLI talks to: ``--socket``, else ``--queue``'s, else the only one there
    is (several: the operator must pick one)."""
    if explicit:
        return Path(explicit)
    if queue is not None:
        return socket_path(queue)
    found = sorted(run_dir().glob("nfqlb-*.sock"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError(f"no control socket in {run_dir()} (is nfqlb running? "
                           "pick one with --queue N or --socket PATH)")
    queues = ", ".join(p.stem.removeprefix("nfqlb-") for p in found)
    raise ControlError(f"several nfqlb workers run (queues {queues}): pick one with --queue N")


# ------------------------------------------------------------------ what the daemon answers


def status(server: Target) -> dict[str, Any]:
    """The status answer: ``engine.status`` (registry names), with each service's VIP, mode and
    policy, then ``daemon`` (pid, uptime, configuration) and ``queues`` (the adapters' and the
    kernel's counters). Reads counters only; the same data feeds the metrics endpoint."""
    engine = server.engine
    out: dict[str, Any] = engine.status(server.clock())
    configured = {s.name: s for s in engine.config.services}
    for name, svc in out["services"].items():
        conf = configured.get(name)
        if conf is not None:
            svc.update(vip=str(conf.vip), port=conf.port, protocol=conf.protocol.name.lower(),
                       mode=conf.mode.value, policy=conf.policy)
    now = time.time()
    started = float(getattr(server, "started_at", None) or _STARTED)
    out["daemon"] = {
        "pid": os.getpid(), "version": __version__,
        "queue": server.adapters[0].queue if server.adapters else None,
        "started_at": started, "uptime_s": round(now - started, 3),
        "config": str(getattr(server, "config_path", None) or engine.config.source),
        "loaded_at": float(getattr(server, "loaded_at", None) or started),
        "mark_numbers": mark_numbers(engine.config),
    }
    state = getattr(server, "node", None)
    if state is not None:
        out["daemon"]["node"] = state.state
    out["queues"] = [_queue_status(a) for a in server.adapters]
    kernel = getattr(server, "kernel_flows", None)
    if kernel is not None:  # mode "offload": open flows are conntrack's (nfqlb.io.conntrack)
        kernel.annotate(out)
    schedules = getattr(server, "schedules", None)
    if schedules is not None:  # offload_scheduler = "kernel" (nfqlb.io.schedules)
        schedules.annotate(out)
    return out


_STARTED = time.time()  # until the daemon says when it started (Server.started_at)

_ADAPTER_COUNTERS = ("packets", "wakeups", "errors", "bad_verdicts", "truncated", "malformed",
                     "enobufs", "verdict_errors", "send_errors", "gso_packets",
                     "csum_completed", "csum_partial")


def _queue_status(adapter: Any) -> dict[str, Any]:
    row = {"queue": adapter.queue, "purpose": getattr(adapter, "purpose", "") or ""}
    for name in _ADAPTER_COUNTERS:
        value = getattr(adapter, name, None)
        if isinstance(value, int):
            row[name] = value
    kernel = getattr(adapter, "kernel", None)
    k = kernel.read() if kernel is not None else None
    row["kernel"] = None if k is None else {
        "queue_total": k.queue_total, "queue_dropped": k.queue_dropped,
        "user_dropped": k.user_dropped}
    return row


def flows(server: Target, service: str | None, backend: str | None,
          limit: int) -> dict[str, Any]:
    """At most ``limit`` flows (one more is looked at, to say whether there were more), each
    with its backend's address."""
    engine = server.engine
    now = server.clock()
    where = {(s, b): (f["address"], f["port"])
             for s, svc in engine.services.stats().items()
             for b, f in svc["backends"].items()}
    if service is not None and not any(s == service for s, _ in where):
        raise KeyError(f"no service {service!r}")
    if backend is not None and not any(b == backend and service in (None, s) for s, b in where):
        raise KeyError(f"service {service!r} has no backend {backend!r}" if service
                       else f"no backend {backend!r}")
    listed = engine.flow_list(now, service=service, backend=backend, limit=limit + 1)
    for f in listed:
        address, port = where.get((f["service"], f["backend"]), ("", 0))
        f["backend_address"], f["backend_port"] = address, port
    return {"flows": listed[:limit], "truncated": len(listed) > limit}


class BadRequest(Exception):
    """The request is malformed: answered with an error, nothing done."""


def _field(req: dict[str, Any], name: str, kind: type | tuple[type, ...],
           required: bool = True) -> Any:
    value = req.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise BadRequest(f"{req['cmd']}: missing {name!r}")
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise BadRequest(f"{req['cmd']}: {name!r} has the wrong type ({type(value).__name__})")
    return value


def handle(server: Target, req: Any, log: logging.Logger) -> dict[str, Any]:
    """One request (parsed JSON) -> its answer; never raises."""
    try:
        return _dispatch(server, req, log)
    except BadRequest as exc:
        return {"ok": False, "error": str(exc)}
    except KeyError as exc:  # the engine's "no service 'x'" / "... has no backend 'y'"
        return {"ok": False, "error": str(exc.args[0]) if exc.args else "not found"}
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug: answered, logged, the daemon goes on
        log.error("control request %r failed: %r", req, exc, exc_info=True)
        return {"ok": False, "error": f"internal error: {exc!r}"}


def _dispatch(server: Target, req: Any, log: logging.Logger) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object like {\"cmd\": \"status\"}")
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise BadRequest(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    engine = server.engine
    if cmd == "status":
        return {"ok": True, "status": status(server)}
    if cmd == "flows":
        limit = _field(req, "limit", int, required=False)
        limit = DEFAULT_FLOWS if limit is None else limit
        if not 0 < limit <= MAX_FLOWS:
            raise BadRequest(f"flows: limit must be 1-{MAX_FLOWS}, not {limit}")
        return {"ok": True, **flows(server, _field(req, "service", str, required=False),
                                    _field(req, "backend", str, required=False), limit)}
    if cmd == "reload":
        reload = getattr(server, "reload", None)
        if reload is None:
            raise BadRequest("reload: this daemon cannot reload (send SIGHUP)")
        ok, message = reload()
        log.info("control: reload %s%s", "done" if ok else "refused: ", "" if ok else message)
        return {"ok": True, "message": message} if ok else {"ok": False, "error": message}
    if cmd in ("health", "drain_node", "enable_node"):
        return node_command(server, cmd, log)
    if cmd == "tables_anew":  # a supervisor's rules watch: nfqlb's nftables table made again
        anew = getattr(server, "tables_anew", None)
        if anew is None:
            raise BadRequest("tables_anew: this daemon has no nftables table")
        return {"ok": True, "message": anew()}
    service = _field(req, "service", str)
    backend = _field(req, "backend", str)
    now = server.clock()
    if cmd == "health_result":  # a supervisor's health check, for its workers' engines
        try:
            return _health_result(engine, req, service, backend, now)
        finally:
            _changed(server)
    if cmd == "drain":
        timeout = _field(req, "timeout", (int, float), required=False)
        if timeout is not None and not 0 <= timeout <= 1e7:
            raise BadRequest(f"drain: timeout must be 0-10000000 s, not {timeout}")
        engine.drain(service, backend, now, None if timeout is None else float(timeout))
        timer_changed = getattr(server, "timer_changed", None)
        if timer_changed is not None:  # the drain's deadline may come before the timer
            timer_changed()
        limit = f" (flows reset after {timeout:g} s)" if timeout else ""
        message = f"{service}/{backend}: draining{limit}"
    elif cmd == "enable":
        engine.enable(service, backend, now)
        message = f"{service}/{backend}: enabled"
    else:
        weight = _field(req, "weight", int)
        engine.set_weight(service, backend, weight, now)
        message = f"{service}/{backend}: weight {weight}"
    _changed(server)
    state = engine.status(now)["services"][service]["backends"][backend]["state"]
    log.info("control: %s (now %s)", message, state)
    return {"ok": True, "message": f"{message} (now {state})"}


def _changed(server: Any) -> None:
    """Tell the daemon that a backend's state may have changed (the kernel's schedules)."""
    changed = getattr(server, "backends_changed", None)
    if changed is not None:
        changed()


def node_command(server: Any, cmd: str, log: logging.Logger) -> dict[str, Any]:
    """``health`` (what ``nfqlb health`` judges), ``drain_node`` and ``enable_node``: the node
    toward a BGP speaker (:mod:`nfqlb.io.node`). A worker under a supervisor answers health
    for its own engine and queues (the supervisor has the rules and the node's state)."""
    state: node.NodeState | None = getattr(server, "node", None)
    if state is None:
        raise BadRequest(f"{cmd}: this daemon has no node state")
    if cmd == "health":
        rules = None if getattr(server, "role", None) is not None else state.rules
        return {"ok": True, "health": node.health_facts(
            state, server.engine.status(server.clock()), server.adapters, rules)}
    before = state.state
    state.drained = cmd == "drain_node"
    message = (f"node {'drained' if state.drained else 'enabled'} (now {state.state}"
               + ("; nfqlb health fails, packets are still served)" if state.drained else ")"))
    if before != state.state:
        log.info("control: %s", message)
    return {"ok": True, "message": message}


def _health_result(engine: Any, req: dict[str, Any], service: str, backend: str,
                   now: float) -> dict[str, Any]:
    """``{"cmd": "health_result", "service", "backend", "up", "reason", "latency"}``: what the
    supervisor of several workers (``nfqlb.io.workers``) found checking a backend, as the
    daemon's own checker reports it: to the engine, and the latency of a success to the
    policy's ``observe`` (contained: a failing one is logged by the checker's rules)."""
    up = _field(req, "up", bool)
    reason = _field(req, "reason", str, required=False) or ""
    latency = _field(req, "latency", (int, float), required=False)
    engine.set_health(service, backend, up, now, reason, latency)
    if up and latency is not None:
        with contextlib.suppress(Exception):
            observe = getattr(engine.policy(service), "observe", None)
            if observe is not None:
                observe(backend, float(latency), now)
    return {"ok": True}


# ------------------------------------------------------------------ the server


class ControlServer:
    """The Unix socket of one worker, served on ``loop`` (the daemon's)."""

    def __init__(self, target: Target, path: Path, log: logging.Logger,
                 handler: Callable[[Any], dict[str, Any]] | None = None) -> None:
        self.target = target
        self.path = path
        self.log = log
        #: request -> answer (default: ``handle`` on ``target``; the supervisor of several
        #: workers answers for all of them)
        self.handler = handler or (lambda req: handle(self.target, req, self.log))
        self.clients = 0
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        """Create the directory (0700) if needed, take over a stale socket, listen (0600).

        A socket some process still answers on is left alone (another worker of the same
        queue number in another network namespace: set $NFQLB_RUN_DIR for one of them)."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemSetupError(f"cannot create {directory}: {exc.strerror}") from None
        if _is_live(self.path):
            raise SystemSetupError(f"{self.path}: another nfqlb answers on this control socket "
                                   f"(set {RUN_DIR_ENV} to use another directory)")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_LINE)
        except OSError as exc:
            raise SystemSetupError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):  # only our own socket, not a successor's
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            if self.clients > MAX_CLIENTS:
                await self._answer(writer, {"ok": False, "error": "too many control clients"})
            elif not _peer_allowed(writer):
                await self._answer(writer, {"ok": False, "error": "permission denied"})
            else:
                await self._serve(reader, writer)
        except (TimeoutError, OSError):
            pass  # the client went away or stalled: nothing to tell
        finally:
            self.clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                await self._answer(writer, {"ok": False,
                                            "error": f"request longer than {MAX_LINE} bytes"})
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                answer = {"ok": False, "error": "not a JSON request (one JSON object a line)"}
            else:
                answer = self.handler(req)
            await self._answer(writer, answer)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """The peer runs as root or as the daemon's own user (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def _is_live(path: Path) -> bool:
    """Something accepts connections on the socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


@contextlib.contextmanager
def operator_endpoints(server: Any, config: Any, queue: int,
                       log: logging.Logger, role: Any = None) -> Iterator[None]:
    """The daemon's control socket, and its metrics endpoint when ``[metrics]`` is set, open
    on ``server.loop`` (not yet running) for the ``with`` block, closed after it (the loop
    stopped; it is run again briefly to close them). A supervisor's worker (``role``) has its
    socket in the supervisor's directory and no metrics endpoint (the supervisor's has it)."""
    loop: asyncio.AbstractEventLoop = server.loop
    path = (socket_path(queue) if role is None
            else worker_socket_path(role.base_queue, role.index))
    control = ControlServer(server, path, log.getChild("control"))
    loop.run_until_complete(control.start())
    metrics_server = None
    try:
        if getattr(config, "metrics", None) is not None and role is None:
            from nfqlb.io import metrics

            metrics_server = metrics.MetricsServer(lambda: status(server), config.metrics,
                                                   log.getChild("metrics"))
            loop.run_until_complete(metrics_server.start())
        running = getattr(config, "metrics", None)

        def on_reload(new: Any) -> None:
            if getattr(new, "metrics", None) != running:
                log.warning("metrics.listen changed: it takes effect at the next start")

        hooks = getattr(server, "reload_hooks", None)
        if hooks is not None:
            hooks.append(on_reload)
        log.info("control socket %s%s", control.path,
                 f", metrics on http://{metrics_server.where}/metrics" if metrics_server else "")
        yield
    finally:
        if metrics_server is not None:
            _finish(loop, metrics_server.close())
        _finish(loop, control.close())


def _finish(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end on the stopped ``loop``. A stop still queued (a crash path can
    call ``loop.stop()`` once more after the loop decided to stop) ends ``run_until_complete``
    early: run it again, a bounded number of times."""
    task = loop.create_task(coro)
    for _ in range(5):
        try:
            loop.run_until_complete(task)
            return
        except RuntimeError:
            if task.done():
                raise
    task.cancel()


# ------------------------------------------------------------------ the client


def format_status(s: dict[str, Any]) -> str:
    """The status answer as ``nfqlb status`` prints it: a table per service, then drops,
    events, the queues and the daemon."""
    d = s.get("daemon", {})
    dropped = sum(s["dropped"].values())
    lines = [
        f"nfqlb {d.get('version', '?')}, pid {d.get('pid', '?')}, queue {d.get('queue', '?')}: "
        f"up {_duration(d.get('uptime_s', 0.0))}" + _node_note(d.get("node")),
        f"config {d.get('config', '?')}, loaded {_when(d.get('loaded_at'))}",
        f"packets {s['packets']}, rewritten {s['rewritten']}, passed (not ours) "
        f"{s['passed_unknown']}, dropped {dropped}; flows {s['flows_total']} total, "
        f"{s['flows_active']} in the table; {s['fragments_held']} fragments held",
    ]
    for name, svc in s["services"].items():
        where = (f" {svc['vip']}:{svc['port']}/{svc['protocol']} {svc['mode']}, policy "
                 f"{svc['policy']};" if "vip" in svc else "")
        lines += ["", f"service {name}:{where} {svc['refused']} refused, "
                  f"{svc['no_backend_up']} with no backend up, {svc['policy_errors']} policy "
                  "errors"]
        rows = [_BACKEND_HEAD] + [_backend_row(b, f) for b, f in svc["backends"].items()]
        lines += ["  " + line for line in _table(rows)]
        if "offload" in svc:
            lines.append("  " + _offload_note(svc["offload"]))
    lines.append("")
    lines.append("drops: " + (", ".join(f"{k} {v}" for k, v in s["dropped"].items())
                              or "none"))
    lines.append("events: " + (", ".join(f"{k} {v}" for k, v in s["events"].items())
                               or "none"))
    for q in s.get("queues", []):
        purpose = f" ({q['purpose']})" if q.get("purpose") else ""
        k = q.get("kernel")
        kernel = ("kernel: no counters" if k is None else
                  f"kernel: queued {k['queue_total']}, queue_dropped {k['queue_dropped']}, "
                  f"user_dropped {k['user_dropped']}")
        own = ", ".join(f"{n} {q[n]}" for n in _ADAPTER_COUNTERS
                        if n in q and (q[n] or n in ("packets", "wakeups")))
        lines.append(f"queue {q['queue']}{purpose}: {kernel}; {own}")
    for w in s.get("workers", []):  # several workers: the figures above are their sums
        own = ("no answer: " + str(w["error"]) if "error" in w else
               f"packets {w['packets']}, flows {w['flows_total']} total, "
               f"{w['flows_active']} in the table")
        lines.append(f"worker {w['worker']} (pid {w['pid']}, queue {w['queue']}): {own}")
    return "\n".join(lines)


def _node_note(state: str | None) -> str:
    """The node's state when it is not serving (``nfqlb health`` fails, packets still go)."""
    if state == node.DRAINING:
        return "; node drained: nfqlb health fails, every packet still served (ctl enable-node)"
    if state == node.WITHDRAWING:
        return "; node withdrawing: nfqlb health fails, serving until withdraw_wait ends"
    return ""


def _offload_note(o: dict[str, Any]) -> str:
    """Mode "offload": where active/inact come from, and what nfqlb does not see."""
    if "counted_s_ago" not in o:
        text = "active/inact: from conntrack, not counted yet (asked now)"
    else:
        text = (f"active/inact: from conntrack, counted {o['counted_s_ago']:g}s ago (took "
                f"{o['count_took_s']:g}s); pkts/bytes: ")
        text += ("the open flows' sums per backend in --json (conntrack accounting)"
                 if o.get("accounting") else
                 "not seen (the kernel carries the flows; net.netfilter.nf_conntrack_acct=1 "
                 "makes conntrack count them)")
    sched = o.get("schedule")
    if isinstance(sched, dict):  # offload_scheduler = "kernel" (nfqlb.io.schedules)
        slot = str(sched.get("slot", ""))
        how = "" if not slot.startswith("jhash ") else f" by {slot.split(' mod ')[0]}"
        text += (f"; new flows placed by the kernel's schedule ({sched.get('slots')} slots"
                 f"{how}, " + ("written" if sched.get("written") else "being written")
                 + "; flows: its counters)")
        if sched.get("error"):
            text += f"; {sched['error']}"
    return text + (f"; {o['error']}" if o.get("error") else "")


_BACKEND_HEAD = ("backend", "address", "state", "weight", "active", "inact", "flows", "new/s",
                 "pkts in", "pkts out", "bytes in", "bytes out", "check", "latency")


def _backend_row(name: str, f: dict[str, Any]) -> tuple[str, ...]:
    address = f"[{f['address']}]" if ":" in str(f["address"]) else str(f["address"] or "local")
    latency = "-" if f.get("latency_ms") is None else f"{f['latency_ms']:g}ms"
    return (name, f"{address}:{f['port']}", f["state"], str(f["weight"]), str(f["active"]),
            str(f["inactive"]), str(f["flows"]), f"{f['new_per_s']:g}",
            _human(f["packets_in"]), _human(f["packets_out"]), _human(f["bytes_in"]),
            _human(f["bytes_out"]), str(f.get("check") or "-"), latency)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell: text to the left, figures to the right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {0, 1, 2, 12}
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _human(n: int) -> str:
    """Exact below 100000, else 3 significant figures with K, M, G, T (powers of 1000)."""
    if n < 100_000:
        return str(n)
    value = float(n)
    for unit in "KMGTP":
        value /= 1000
        if value < 1000 or unit == "P":
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours}h{minutes:02d}m{s:02d}s" if hours or days else f"{minutes}m{s:02d}s"
    return f"{days}d{text}" if days else text


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "?"
    ago = max(time.time() - stamp, 0.0)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) + f" ({_duration(ago)} ago)"


def format_flows(listed: list[dict[str, Any]], truncated: bool = False) -> str:
    """The flows as ``ipvsadm -Lnc`` lists connections, with the service and the fullnat
    source port."""
    rows = [("pro", "expire", "state", "source", "virtual", "destination", "snat", "service")]
    for f in listed:
        rows.append((f["protocol"].upper(), _mmss(f["expires_s"]), f["state"],
                     _endpoint(f["client"], f["client_port"]), _endpoint(f["vip"], f["port"]),
                     _endpoint(f.get("backend_address") or f["vip"],
                               f.get("backend_port") or f["port"]) + f" ({f['backend']})",
                     str(f["snat_port"] or "-"), f["service"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append(f"{len(listed)} flow{'' if len(listed) == 1 else 's'}"
                 + (" (more not shown: raise --limit)" if truncated else ""))
    return "\n".join(lines)


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _mmss(seconds: float) -> str:
    s = max(int(seconds), 0)
    return f"{s // 60:02d}:{s % 60:02d}"



def request(path: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at ``path``; its answer (``ok`` true or false).

    Raises ControlError when the socket cannot be reached or the answer is not one."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no such control socket (is nfqlb running on "
                               "that queue?)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the control socket is "
                               "root's)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nobody listens (a stale socket: nfqlb is "
                               "not running)") from None
        try:
            s.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading (too many clients): read the answer
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n") or size > MAX_ANSWER:
                break
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not chunks:
        raise ControlError(f"{path}: the daemon closed the connection without an answer")
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"{path}: the daemon's answer is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"{path}: the daemon's answer is not one")
    return answer
