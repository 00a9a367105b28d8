"""Several workers: ``daemon.workers = N`` (or ``nfqlb run --queue 1-4``) serves N queues with
N processes, each with its own engine and flow table (processes, not threads: one engine per
GIL).

What the operator sees is one daemon: this supervisor process, which

- forks the workers first (worker i serves queue ``queue + i``, large-packet queue
  ``large_queue + i``, headers queue ``headers_queue + i`` (daemon.bulk = "headers", its
  fullnat flows' elements in the one nftables table of the queue), with mode "offload"
  offload queue ``offload_queue + i`` (worker 0
  alone counts and removes conntrack's flows, the host's), and holds its share of every
  fullnat port pool, see
  :func:`nfqlb.config.for_worker`), and waits until each has bound its queues (one that
  fails stops the others: nothing else is touched);
- then sets the sysctls and installs the rules, once, for all of them: the rules send both
  directions of a flow to the worker that owns it (by the client address's last byte,
  fullnat replies by the pool port range: ``rules/workers.rules``);
- serves the control socket (``nfqlb-<queue>.sock``: ``nfqlb status`` shows the totals of
  all workers and a line per worker; ``drain``/``enable``/``weight``/``reload`` reach every
  worker) and the metrics endpoint (the totals, the per-queue figures of every worker's
  queues, and ``nfqlb_worker_*`` per worker). Each worker answers the supervisor on a socket
  of its own, ``nfqlb-<queue>.workers/<i>.sock``. ``health`` asks every worker and adds the
  node's state, which the supervisor holds (``ctl drain-node``, ``withdraw_wait``:
  :mod:`nfqlb.io.node`);
- on SIGTERM/SIGINT removes the rules, stops the workers (SIGTERM, then SIGKILL after
  STOP_TIMEOUT) and prints one block of counters, the sum of all workers' (each worker's
  queue lines under it); SIGHUP (or ``nfqlb ctl reload``) checks the file, reloads every
  worker and changes the rules; SIGUSR1 prints the summed counters.
- when a worker dies, stops everything and exits 1, as HAProxy's master does in
  master-worker mode: the service manager restarts the whole daemon (``Restart=on-failure``
  in the systemd unit). A lone restarted worker would start with an empty table while its
  queue passes packets untouched in between (``--queue-bypass``), and its share of the flows
  would break anyway; a restart of the whole is what keepalived and HAProxy users expect from
  their supervisor.

Health checks run once, in the supervisor (:class:`~nfqlb.io.health.HealthChecker` on its
loop, as in a single daemon): every result goes to every worker's engine (the control
command ``health_result``), the latency of a success to its policy's ``observe``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import select
import signal
import time
from typing import Any, cast

from nfqlb import __version__, rules
from nfqlb.config import Config, carry_marks, load_config, mark_numbers, with_workers
from nfqlb.counters import format_stats
from nfqlb.errors import NfqlbError, SystemSetupError
from nfqlb.io import control, iptables, node, sysctl
from nfqlb.io.health import HealthChecker
from nfqlb.io.signals import LoopSignals
from nfqlb.values import Backend, Mode

STOP_TIMEOUT = 10.0  # s the workers have to stop after SIGTERM before SIGKILL
READY_TIMEOUT = 30.0  # s a worker has to bind its queues
ASK_TIMEOUT = 5.0  # s a worker has to answer a control request
HEALTH_ASK_TIMEOUT = 0.4  # s a worker has to answer a health request (nfqlb health waits 1.5)

#: Per-backend and per-service figures that are the same in every worker: the first is kept,
#: the others (counters, flows) are summed.
_SAME = frozenset({"state", "weight", "address", "port", "check", "latency_ms", "vip", "mode",
                   "policy", "protocol", "purpose", "queue", "drain_deadline"})
_MAX = frozenset({"policy_slowest_ms"})


def merge(values: list[Any], key: str = "") -> Any:
    """The workers' status (or stats) dicts as one: numbers summed (except those the same
    everywhere, and maxima), dicts merged key by key, lists joined."""
    if key in _SAME:
        return values[0]
    if key in _MAX:
        return max(values)
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: merge([v[k] for v in values if k in v], k) for k in keys}
    if all(isinstance(v, list) for v in values):
        return [item for v in values for item in v]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    return values[0]


@dataclasses.dataclass
class Worker:
    index: int
    pid: int
    channel: int  # read end of its pipe
    buffer: bytes = b""
    ready: bool = False
    final: dict[str, Any] | None = None
    status: int | None = None  # os.waitpid status once it exited

    def read(self) -> bool:
        """Read what the pipe holds (without blocking); False at end of file."""
        try:
            data = os.read(self.channel, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "ready" in message:
                self.ready = True
            if "final" in message:
                self.final = message
        return True


def supervise(config: Config, log: logging.Logger, stats_interval: float | None = None,
              config_path: str = "") -> int:
    """Run ``config.daemon.workers`` workers until SIGINT/SIGTERM (see the module's
    docstring). 0 after a clean stop; 1 when a worker failed or the clean-up did."""
    q = config.daemon.queue
    rulesets = rules.render(config, q)
    tools = iptables.tools_for(rs.family.version for rs in rulesets)
    iptables.check_overlap(rulesets, tools)  # another instance's packets: refuse, touch nothing
    return Supervisor(config, log, rulesets, tools, stats_interval,
                      config_path or config.source).run()


class Supervisor:
    def __init__(self, config: Config, log: logging.Logger,
                 rulesets: tuple[rules.RuleSet, ...], tools: dict[int, iptables.Iptables],
                 stats_interval: float | None, config_path: str) -> None:
        self.config = config
        self.log = log
        self.rulesets = rulesets
        self.tools = tools
        self.stats_interval = stats_interval
        self.config_path = config_path
        self.queue = config.daemon.queue
        self.n = config.daemon.workers
        self.large = rules.large_queue_for(config, self.queue)
        # mode "offload": worker i serves offload queue + i, bound at start like the others
        self.offload_queue = (rules.offload_queue_for(config, self.queue) if any(
            s.mode is Mode.OFFLOAD for s in config.services) else None)
        self.workers: list[Worker] = []
        self.stopping = False
        self.failed = False
        self.started_at = time.time()
        self.loaded_at = self.started_at
        self.lingering: dict[str, tuple[Backend, ...]] = {}
        self.loop: Any = None
        self.sysctls: sysctl.Sysctls | None = None  # set while serving (restored at the end)
        self.health: HealthChecker | None = None  # the one checker, while serving
        self.node = node.NodeState()  # what nfqlb health answers: drained, withdrawing, rules

    # ------------------------------------------------------------ start and stop

    def run(self) -> int:
        # a stop signal before the loop's handlers are there is noted, not lost: kept until
        # _serve replaces these handlers, and looked at once it has
        stop_early: list[int] = []
        previous = {sig: signal.signal(sig, lambda s, _f: stop_early.append(s))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(self.n):
                self._fork(i)
            ready = self._wait_ready(stop_early)
        except BaseException:
            ready = False
            raise
        finally:
            if not ready:
                self._stop_workers()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if not ready:
            return 0 if stop_early else 1  # a stop signal while starting is a clean stop
        try:
            return self._serve(stop_early)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fork(self, index: int) -> None:
        from nfqlb.io import daemon

        read_end, write_end = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_end)
                for w in self.workers:
                    os.close(w.channel)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                # Ctrl-C in a terminal reaches the whole process group: the supervisor stops
                # the workers itself (a worker that stopped on its own would look dead)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _die_with_parent(parent)
                role = daemon.WorkerRole(index, self.n, self.queue, self.queue + index,
                                         self.large + index, write_end)
                wlog = self.log.getChild(f"worker{index}")
                code = daemon.run(self.config, None, wlog, config_path=self.config_path,
                                  role=role)
            except NfqlbError as exc:
                logging.getLogger("nfqlb").error("worker %d: %s", index, exc)
            except BaseException as exc:  # noqa: B036 - a worker never returns into the parent
                logging.getLogger("nfqlb").error("worker %d crashed: %r", index, exc,
                                                 exc_info=True)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.workers.append(Worker(index, pid, read_end))

    def _wait_ready(self, stop_early: list[int]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers):
            if stop_early:
                self.log.info("%s before the workers were ready: stopping",
                              signal.Signals(stop_early[0]).name)
                return False
            waiting = [w for w in self.workers if not w.ready]
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                self.log.error("workers %s did not bind their queues within %.0f s",
                               ", ".join(str(w.index) for w in waiting), READY_TIMEOUT)
                return False
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([w.channel for w in waiting], [], [],
                                               min(timeout, 0.5))
                for w in waiting:
                    if w.channel in readable and not w.read():
                        self.log.error("worker %d exited before serving its queue %d: "
                                       "stopping the others", w.index, self.queue + w.index)
                        return False
        return True

    def _stop_workers(self) -> None:
        """SIGTERM every worker still running, wait (collecting their final counters),
        SIGKILL those that outlive STOP_TIMEOUT."""
        for w in self.workers:
            if w.status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        killed = False
        while any(w.status is None for w in self.workers):
            self._reap()
            open_channels = [w.channel for w in self.workers if w.status is None]
            if not open_channels:
                break
            if time.monotonic() > deadline and not killed:
                for w in self.workers:
                    if w.status is None:
                        self.log.error("worker %d ignored SIGTERM for %.0f s: killed", w.index,
                                       STOP_TIMEOUT)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
                killed = True
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select(open_channels, [], [], 0.1)
                for w in self.workers:
                    if w.channel in readable:
                        w.read()
        for w in self.workers:  # what each wrote before it ended (its final counters)
            for _ in range(1000):
                try:
                    if not w.read():
                        break
                except (OSError, ValueError):
                    break
            os.close(w.channel)

    def _reap(self) -> list[Worker]:
        """Workers that exited since the last look (their status recorded)."""
        gone = []
        for w in self.workers:
            if w.status is None:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
                if pid:
                    w.status = status
                    gone.append(w)
        return gone

    def _serve(self, stop_early: list[int]) -> int:
        from nfqlb.io import daemon

        self.loop = loop = daemon._new_loop()
        self.sysctls = sysctls = sysctl.Sysctls(self.log)
        clean = True
        watch = node.RulesWatch(self.node, lambda: node.missing_jump(self.rulesets, self.tools),
                                tables=lambda: node.table_handles(self.rulesets, self.tools),
                                on_anew=lambda _names: loop.call_soon_threadsafe(
                                    self._tables_anew))
        # from here the loop's actions, those of signals before it runs as soon as it does
        # (nfqlb.io.signals: uvloop's add_signal_handler lost a SIGTERM in that time)
        signals = LoopSignals(loop, {signal.SIGINT: functools.partial(self._on_stop,
                                                                      signal.SIGINT),
                                     signal.SIGTERM: functools.partial(self._on_stop,
                                                                       signal.SIGTERM),
                                     signal.SIGHUP: self.reload,
                                     signal.SIGUSR1: self.print_stats})
        try:
            signals.install()
            pidfds = []
            for w in self.workers:
                loop.add_reader(w.channel, w.read)
                with contextlib.suppress(OSError, AttributeError):  # (SIGCHLD is uvloop's)
                    pidfds.append(os.pidfd_open(w.pid))  # readable when the worker ends
                    loop.add_reader(pidfds[-1], self._on_child)
            self._on_child()  # one may have died before the handler was there
            if stop_early:  # a stop signal came while the workers were starting
                self.log.info("%s while starting: removing rules and stopping %d workers",
                              signal.Signals(stop_early[0]).name, self.n)
                self.stopping = True
            with self._endpoints():
                try:
                    sysctl.setup(self.config, sysctls)
                    for rs in self.rulesets:
                        iptables.apply(rs, self.tools[rs.family.version])
                    self.node.rules = True
                    n = len(self.config.services)
                    self.log.info(
                        "serving queues %d-%d with %d workers, packets over %d bytes on queues "
                        "%d-%d (%d service%s, %s)", self.queue,
                        self.queue + self.n - 1, self.n, rules.BINDING_MAX_PACKET, self.large,
                        self.large + self.n - 1, n, "" if n == 1 else "s",
                        rules.placed(self.rulesets))
                    self.health = HealthChecker(self.config, _ForwardHealth(self), loop,
                                                self.log.getChild("health"), time.perf_counter)
                    self.health.start()
                    if self.stats_interval:
                        loop.call_later(self.stats_interval, self._periodic_stats)
                    loop.call_later(LINGER_CHECK_S, self._check_lingering)
                    loop.call_later(1.0, self._poll_children)
                    watch.start()
                    if not self.stopping:
                        loop.call_soon(signals.serving)
                        try:
                            loop.run_forever()
                        finally:
                            signals.stopped()
                finally:
                    watch.stop()
                    if self.health is not None:
                        self.health.stop()
                    self.node.rules = False
                    if self.failed and self.config.daemon.ecmp:
                        self.log.error("daemon.ecmp: the rules stay, without --queue-bypass: "
                                       "the VIP's packets are dropped, not passed unrewritten, "
                                       "until the next start (or nfqlb rules --delete)")
                    else:
                        clean = self._remove_rules() and clean
                    for w in self.workers:
                        loop.remove_reader(w.channel)
                    for fd in pidfds:
                        loop.remove_reader(fd)
                        os.close(fd)
                    self._stop_workers()
        finally:
            clean = sysctls.restore() and clean
            loop.close()
        self._print_final()
        bad = [w for w in self.workers if w.status is None or not os.WIFEXITED(w.status)
               or os.WEXITSTATUS(w.status) != 0]
        return 1 if self.failed or bad or not clean else 0

    def _remove_rules(self) -> bool:
        clean = True
        for t in self.tools.values():
            try:
                if iptables.delete(self.queue, t):
                    self.log.info("rules for queue %d removed (%s)", self.queue,
                                  t.family.iptables)
            except SystemSetupError as exc:
                self.log.error("could not remove the rules of queue %d: %s", self.queue, exc)
                clean = False
        return clean

    @contextlib.contextmanager
    def _endpoints(self) -> Any:
        loop = self.loop
        server = control.ControlServer(cast(Any, self), control.socket_path(self.queue),
                                       self.log.getChild("control"), handler=self.handle)
        loop.run_until_complete(server.start())
        metrics_server = None
        try:
            if self.config.metrics is not None:
                from nfqlb.io import metrics

                metrics_server = metrics.MetricsServer(self.status, self.config.metrics,
                                                       self.log.getChild("metrics"))
                loop.run_until_complete(metrics_server.start())
            self.log.info("control socket %s%s", server.path,
                          f", metrics on http://{metrics_server.where}/metrics"
                          if metrics_server else "")
            yield
        finally:
            if metrics_server is not None:
                control._finish(loop, metrics_server.close())
            control._finish(loop, server.close())

    def _on_stop(self, sig: signal.Signals) -> None:
        wait = self.config.daemon.withdraw_wait
        if wait > 0 and self.node.rules and not self.node.withdrawing and not self.stopping:
            self.node.withdrawing = True
            self.log.info("%s: withdrawing: nfqlb health fails from now on, packets are served "
                          "for %g s more (withdraw_wait) while the router moves traffic, then "
                          "the rules go (a second SIGTERM or SIGINT stops at once)", sig.name,
                          wait)
            self.loop.call_later(wait, self._withdrawn, wait)
            return
        self.log.info("%s: removing rules and stopping %d workers", sig.name, self.n)
        self.stopping = True
        self.loop.stop()

    def _withdrawn(self, wait: float) -> None:
        if not self.stopping:
            self.log.info("withdraw_wait (%g s) over: removing rules and stopping %d workers",
                          wait, self.n)
            self.stopping = True
            self.loop.stop()

    def _on_child(self) -> None:
        for w in self._reap():
            if self.stopping:
                continue
            status = w.status or 0  # (set by _reap)
            how = (f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status)
                   else f"signal {os.WTERMSIG(status)}")
            self.log.error("worker %d (pid %d, queue %d) ended with %s: removing the rules and "
                           "stopping the other workers (the service manager restarts nfqlb)",
                           w.index, w.pid, self.queue + w.index, how)
            self.failed = self.stopping = True
            self.loop.stop()

    def _poll_children(self) -> None:
        """The pidfds' backstop: look once a second."""
        self._on_child()
        if not self.stopping:
            self.loop.call_later(1.0, self._poll_children)

    def _tables_anew(self) -> None:
        """nfqlb's nftables table made again (the rules watch): each worker adds its
        fullnat flows' map elements again (worker 0 writes the kernel's schedules)."""
        for answer in self.ask({"cmd": "tables_anew"}):
            if not answer.get("ok"):
                self.log.error("nftables table made anew: %s", answer.get("error"))

    # ------------------------------------------------------------ asking the workers

    def ask(self, request: dict[str, Any],
            timeout: float = ASK_TIMEOUT) -> list[dict[str, Any]]:
        """Every running worker's answer to a control request (an error answer for one that
        does not answer within ``timeout``)."""
        answers = []
        for w in self.workers:
            if w.status is not None:
                answers.append({"ok": False, "error": f"worker {w.index} is not running"})
                continue
            try:
                answers.append(control.request(
                    control.worker_socket_path(self.queue, w.index), request, timeout))
            except NfqlbError as exc:
                answers.append({"ok": False, "error": f"worker {w.index}: {exc}"})
        return answers

    def status(self) -> dict[str, Any]:
        """The workers' status answers summed, with the supervisor's ``daemon`` block and a
        ``workers`` list (each worker's own totals)."""
        answers = self.ask({"cmd": "status"})
        parts = [a["status"] for a in answers if a.get("ok")]
        if not parts:
            raise SystemSetupError("no worker answered")
        out: dict[str, Any] = merge(parts)
        now = time.time()
        out["daemon"] = {"pid": os.getpid(), "version": __version__, "queue": self.queue,
                         "workers": self.n, "started_at": self.started_at,
                         "uptime_s": round(now - self.started_at, 3),
                         "config": self.config_path, "loaded_at": self.loaded_at,
                         "node": self.node.state, "mark_numbers": mark_numbers(self.config)}
        out["workers"] = [
            {"worker": w.index, "pid": w.pid, "queue": self.queue + w.index,
             **({k: a["status"].get(k) for k in ("packets", "rewritten", "flows_total",
                                                   "flows_active")} if a.get("ok")
                else {"error": a.get("error")})}
            for w, a in zip(self.workers, answers, strict=True)]
        return out

    def handle(self, req: Any) -> dict[str, Any]:
        """A control request to the whole daemon."""
        if not isinstance(req, dict) or req.get("cmd") not in control.COMMANDS:
            # the usual error answer, which reads nothing of a Server
            return control.handle(self, req, self.log)  # type: ignore[arg-type]
        cmd = req["cmd"]
        try:
            if cmd == "status":
                return {"ok": True, "status": self.status()}
            if cmd == "health":  # the node's state and rules are the supervisor's
                return {"ok": True, "health": node.merge_facts(
                    self.node, self.node.rules, self.ask(req, HEALTH_ASK_TIMEOUT))}
            if cmd in ("drain_node", "enable_node"):
                return control.node_command(self, cmd, self.log)
            if cmd == "reload":
                ok, message = self.reload()
                return {"ok": True, "message": message} if ok else {"ok": False,
                                                                    "error": message}
        except NfqlbError as exc:
            return {"ok": False, "error": str(exc)}
        answers = self.ask(req)
        bad = [a for a in answers if not a.get("ok")]
        if bad:
            return bad[0]
        if cmd == "flows":
            limit = req.get("limit") or control.DEFAULT_FLOWS
            listed = [f for a in answers for f in a["flows"]]
            return {"ok": True, "flows": listed[:limit],
                    "truncated": len(listed) > limit or any(a["truncated"] for a in answers)}
        return answers[0]

    # ------------------------------------------------------------ reload, rules

    def reload(self) -> tuple[bool, str]:
        """Check the file as a single daemon does; then every worker takes it, and the rules
        change (one iptables-restore per family)."""
        from nfqlb.io import daemon

        try:
            loaded = load_config(self.config_path)
            if loaded.daemon.workers not in (1, self.n):  # (1: the default, or --queue M-N)
                self.log.warning("daemon.workers is %d, %d run: the number of workers "
                                 "changes at the next start", loaded.daemon.workers, self.n)
            config = carry_marks(self.config, with_workers(loaded, self.queue, self.n,
                                                           "daemon.workers"))
            daemon.check_reloadable(config, self.queue, self.large, self.offload_queue,
                                    self.config.daemon.binding,
                                    daemon._headers_queue(self.config, self.queue))
            rulesets = rules.render(config, self.queue)
            for rs in rulesets:
                if rs.family.version not in self.tools:
                    self.tools.update(iptables.tools_for([rs.family.version]))
            iptables.check_overlap(rulesets, self.tools)
        except NfqlbError as exc:
            self.log.error("reload refused, the running configuration keeps serving: %s", exc)
            return False, str(exc)
        try:
            self._bridge_marks(rulesets)
        except NfqlbError as exc:
            self.log.error("reload: the rules could not be changed: %s", exc)
            return False, f"rules not changed: {exc}"
        bad = [a for a in self.ask({"cmd": "reload"}) if not a.get("ok")]
        self.config = config
        if self.health is not None:
            self.health.reconfigure(config)
        try:
            assert self.sysctls is not None
            sysctl.setup(config, self.sysctls)
            self._apply_rules()
        except NfqlbError as exc:
            self.log.error("reload: the rules could not be changed: %s", exc)
            return False, f"rules not changed: {exc}"
        if bad:
            return False, str(bad[0].get("error"))
        self.loaded_at = time.time()
        n = len(config.services)
        self.log.info("reloaded %s: %d service%s, %d workers", self.config_path, n,
                      "" if n == 1 else "s", self.n)
        return True, f"reloaded {self.config_path}"

    def _bridge_marks(self, rulesets: tuple[rules.RuleSet, ...]) -> None:
        """Before the workers take a reload: the offload rules know the marks of both
        numberings (:func:`nfqlb.rules.bridging_marks`); ``_apply_rules`` then installs the
        new rules alone."""
        new = {rs.family.version: rs for rs in rulesets}
        bridged = []
        for rs in self.rulesets:
            b = rules.bridging_marks(rs, new[rs.family.version]) \
                if rs.family.version in new else rs
            if b != rs:
                iptables.apply(b, self.tools[rs.family.version])
            bridged.append(b)
        self.rulesets = tuple(bridged)

    def _lingering_now(self) -> dict[str, tuple[Backend, ...]]:
        """Backends a reload removed that some worker still has flows of."""
        import ipaddress

        out: dict[str, tuple[Backend, ...]] = {}
        try:
            services = self.status()["services"]
        except NfqlbError:
            return self.lingering
        for name, svc in services.items():
            gone = tuple(Backend(bname.removesuffix(" (removed)"),
                                 ipaddress.ip_address(b["address"]) if b.get("address") else None,
                                 int(b["port"]))
                         for bname, b in svc["backends"].items() if b.get("state") == "removed")
            if gone:
                out[name] = gone
        return out

    def _apply_rules(self) -> None:
        lingering = self._lingering_now()
        config = self.config
        if lingering:
            config = dataclasses.replace(config, services=tuple(
                dataclasses.replace(svc, backends=svc.backends + lingering.get(svc.name, ()))
                for svc in config.services))
        rulesets = rules.render(config, self.queue, marks_from=self.config)
        old = {rs.family.version: rs for rs in self.rulesets}
        new = {rs.family.version: rs for rs in rulesets}
        for version, rs in new.items():
            if old.get(version) != rs:
                iptables.apply(rs, self.tools[version])
        for version in old.keys() - new.keys():
            iptables.delete(self.queue, self.tools[version])
        self.rulesets = rulesets
        self.lingering = lingering

    def _check_lingering(self) -> None:
        """Once the flows of removed backends are gone, so go their rules."""
        if self.lingering and self._lingering_now() != self.lingering:
            try:
                self._apply_rules()
            except NfqlbError as exc:
                self.log.error("could not update the rules: %s", exc)
        self.loop.call_later(LINGER_CHECK_S, self._check_lingering)

    # ------------------------------------------------------------ counters

    def format_stats(self) -> str:
        try:
            s = self.status()
        except NfqlbError as exc:
            return f"no counters: {exc}"
        lines = [format_stats(s)]
        for row in s["queues"]:
            lines.append(f"queue {row['queue']}: {row.get('packets', 0)} packets, "
                         f"{row.get('wakeups', 0)} wakeups")
        lines += [f"worker {w['worker']} (pid {w['pid']}, queue {w['queue']}): "
                  f"{w.get('packets')} packets, {w.get('flows_active')} active flows"
                  for w in s["workers"]]
        return "\n".join(lines)

    def print_stats(self) -> None:
        from nfqlb.io.logs import block_header

        print(f"{block_header('nfqlb counters')}\n{self.format_stats()}\n", flush=True)

    def _periodic_stats(self) -> None:
        self.print_stats()
        assert self.stats_interval
        self.loop.call_later(self.stats_interval, self._periodic_stats)

    def _print_final(self) -> None:
        """The workers' last counters, summed, as one block; each worker's queue lines."""
        from nfqlb.io.logs import block_header

        finals = [w.final for w in self.workers if w.final is not None]
        if not finals:
            return
        lines = [format_stats(merge([f["final"] for f in finals]))]
        for w in self.workers:
            if w.final is None:
                lines.append(f"worker {w.index}: no counters (it did not stop cleanly)")
                continue
            lines.append(f"worker {w.index} (pid {w.pid}): "
                         f"{w.final['final']['packets']} packets, "
                         f"{w.final['final']['flows_total']} flows")
            lines.append(str(w.final["queues"]))
        print(f"{block_header('nfqlb counters')}\n" + "\n".join(lines) + "\n", flush=True)


class _ForwardHealth:
    """The engine the supervisor's health checker reports to: every worker's, through its
    control socket. A result a worker refuses (a backend it does not know) raises, which the
    checker logs at a rate limit."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def set_health(self, service: str, backend: str, up: bool, now: float, reason: str = "",
                   latency: float | None = None) -> None:
        request = {"cmd": "health_result", "service": service, "backend": backend, "up": up,
                   "reason": reason, "latency": latency}
        bad = [a for a in self.supervisor.ask(request) if not a.get("ok")]
        if bad:
            raise KeyError(bad[0].get("error"))

    def policy(self, service: str) -> None:
        return None  # the workers give the latency to their policies (health_result)


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when the supervisor dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG), so no orphan keeps a queue of a daemon that is gone."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


LINGER_CHECK_S = 5.0  # how often the supervisor looks whether removed backends' flows ended
