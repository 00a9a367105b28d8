"""``nfqlb run``: bind the queues, set sysctls, install the rules, serve, and undo it all.

nfqlb serves two queues with one engine: the queue itself through the NetfilterQueue binding
(:class:`~nfqlb.io.nfqueue.QueueAdapter`), or through nfqlb's own netlink client with
``[daemon] binding = "netlink"``, and the large-packet queue, where the rules send packets the
binding cannot carry whole, always through the netlink client
(:class:`~nfqlb.io.netlink.NetlinkQueueAdapter`), which asks for GSO packets whole there.

Order of start-up, each step only once the previous one worked, so that a failure leaves the
host as it was: resolve the iptables tools; refuse rules that overlap another instance's
(another queue matching the same VIP and port, or replies it could not tell from ours); build
the engine; bind both queues (a second
instance on the same queue stops here, having touched nothing); set the sysctls the modes need;
install the rules; serve on a uvloop event loop. Everything done is undone in ``finally``
blocks, in reverse: the rules go first (with --queue-bypass, new packets then pass the kernel
untouched), then what is still queued gets its verdict, the sysctls get their old values, the
queues are unbound and the counters are printed to stdout.

The loop has three kinds of sources: the two queue sockets (``add_reader`` -> the adapter's
``on_readable``, which handles a bounded number of packets per wakeup), the engine's timer
(re-armed with ``call_at`` from ``engine.get_timer()``, at least once a second, aioquic style)
and signals (SIGINT/SIGTERM stop, SIGUSR1 prints the counters, SIGHUP reloads). Signal
handlers are installed before anything is changed, so a SIGTERM at any point after that leads
through the clean-up: one that comes while nfqlb starts is acted on as soon as the loop runs
(:mod:`nfqlb.io.signals`: uvloop's own handlers lost it). With ``daemon.withdraw_wait`` a
stop signal first makes ``nfqlb health`` fail (the node is withdrawing,
:mod:`nfqlb.io.node`) and the loop serves that long before it stops, so that a BGP speaker
withdraws the VIP while flows are still served; a second signal stops at once.

A reload (SIGHUP, ``nfqlb ctl reload``) reads the configuration file again; one that fails
``check`` is refused (one line, logged) and the running one keeps serving. Otherwise the
engine takes it with its flow table kept (``Engine.reconfigure``), the sysctls a new mode
needs are set, and the rules of each family whose rule set changed are replaced in one
``iptables-restore`` (atomic: no moment with half the rules). The packets the engine makes of
its own accord (RSTs of flows it ends) go out on raw sockets (:mod:`nfqlb.io.rawsend`) after
each wakeup, timer and reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nfqlb import native, rules
from nfqlb.config import (
    Binding,
    Config,
    carry_marks,
    for_worker,
    load_config,
    with_workers,
)
from nfqlb.engine import Engine
from nfqlb.errors import ConfigError, NfqlbError, SystemSetupError
from nfqlb.io import control, iptables, sysctl
from nfqlb.io.bulk import HeadersNetlinkAdapter
from nfqlb.io.clock import RESOLUTION_S
from nfqlb.io.conntrack import KernelFlows
from nfqlb.io.health import HealthChecker
from nfqlb.io.netlink import NetlinkQueueAdapter
from nfqlb.io.nfqueue import QueueAdapter
from nfqlb.io.node import NodeState, RulesWatch, missing_jump, table_handles
from nfqlb.io.offload import OffloadNetlinkAdapter, OffloadQueueAdapter
from nfqlb.io.rawsend import RawSender
from nfqlb.io.schedules import KernelSchedules, kernel_services
from nfqlb.io.signals import LoopSignals
from nfqlb.offload import OffloadDecider
from nfqlb.values import Backend, Mode
from nfqlb.verdict import DROP, Final

TIMER_MAX_S = 1.0  # handle_timer runs at least this often


class Adapter(Protocol):
    """What the server needs of a bound queue (QueueAdapter, NetlinkQueueAdapter)."""

    clock: Callable[[], float]
    queue: int

    def bind(self, max_len: int = ...) -> None: ...
    def fileno(self) -> int: ...
    def on_readable(self) -> None: ...
    def drain(self) -> None: ...
    def unbind(self) -> None: ...
    def format_stats(self) -> str: ...


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``index`` of ``workers`` under a supervisor
    (:mod:`nfqlb.io.workers`): it serves its own queues with its own engine and its share of
    the fullnat pools; the supervisor owns the rules, the sysctls and the metrics endpoint."""

    index: int
    workers: int
    base_queue: int  # the supervisor's queue (daemon.queue, or --queue's first)
    queue: int
    large: int
    channel: int  # write end of a pipe to the supervisor: one JSON object a line

    def tell(self, message: dict[str, object]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[os.write(self.channel, data):]

    def config(self, config: Config) -> Config:
        """What this worker serves of ``config`` (a reloaded file too)."""
        return for_worker(with_workers(config, self.base_queue, self.workers,
                                       "daemon.workers"), self.index)


class HeldPackets:
    """Packets the engine holds (fragments before their first), whichever queue they came
    from: hold id -> how to give that packet its verdict later."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._give: dict[int, Callable[[Final], None]] = {}

    def on_hold(self, hold_id: int, give_verdict: Callable[[Final], None]) -> None:
        """An adapter's packet got ``Held(hold_id)``: how to give it its verdict later."""
        self._give[hold_id] = give_verdict

    def release(self) -> None:
        """Give the verdicts the engine decided for held packets."""
        for hold_id, verdict in self.engine.released_verdicts():
            give = self._give.pop(hold_id, None)
            if give is not None:
                give(verdict)

    def drop_all(self, log: logging.Logger) -> None:
        """At the end: the fragments whose first never came are dropped."""
        for give in self._give.values():
            try:
                give(DROP)
            except Exception as exc:
                log.debug("dropping a held packet failed: %r", exc)
        self._give.clear()


class Server:
    """The event loop around one engine and its bound queues (the first one's clock rules)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine,
                 adapters: Sequence[Adapter], held: HeldPackets, log: logging.Logger,
                 stats_interval: float | None = None) -> None:
        self.loop = loop
        self.engine = engine
        self.adapters = tuple(adapters)
        self.held = held
        self.clock = adapters[0].clock
        self.log = log
        self.stats_interval = stats_interval
        self.crash: BaseException | None = None
        self.timer_errors = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = float("inf")  # engine clock (self.clock)
        self.sender = RawSender(log)
        self.started_at = time.time()
        self.loaded_at = self.started_at
        self.config_path = ""
        self.reload_hooks: list[Callable[[Config], None]] = []  # told of a new configuration
        self._live: _Live | None = None  # what a reload changes (set by run())
        self.health: HealthChecker | None = None  # started and stopped with the loop
        self.offload: OffloadDecider | None = None  # mode "offload": its queue's decider
        self.kernel_flows: KernelFlows | None = None  # ... and conntrack, for it
        self.schedules: KernelSchedules | None = None  # offload_scheduler = "kernel"
        self.role: WorkerRole | None = None  # set when a supervisor runs this worker
        self.node = NodeState()  # what nfqlb health answers: drained, withdrawing, rules
        self.signals: LoopSignals | None = None  # install_signal_handlers

    def install_signal_handlers(self) -> None:
        """Catch the stop, stats and reload signals from now on; they are acted on from the
        loop, those that come before it runs as soon as it does (nfqlb.io.signals)."""
        actions: dict[int, Callable[[], object]] = {}
        # a supervisor's worker stops on SIGTERM only (the supervisor sends it)
        for sig in (signal.SIGINT, signal.SIGTERM) if self.role is None else (signal.SIGTERM,):
            actions[sig] = functools.partial(self._on_stop_signal, sig)
        actions[signal.SIGUSR1] = self.print_stats
        actions[signal.SIGHUP] = self.reload
        self.signals = LoopSignals(self.loop, actions)
        self.signals.install()

    def restore_signal_handlers(self) -> None:
        """The handlers from before ``install_signal_handlers`` (after the clean-up)."""
        if self.signals is not None:
            self.signals.restore()

    def flush_outbound(self) -> None:
        """Send the packets the engine made of its own accord (RSTs of flows it ended)."""
        for packet in self.engine.packets_to_send():
            self.sender.send(packet)
        for svc, rt, why in self.engine.kernel_flows_to_reset():
            if self.kernel_flows is not None:
                self.kernel_flows.reset(svc, rt, why)
        if self.schedules is not None:
            self.schedules.tick()

    def tables_anew(self) -> str:
        """nfqlb's nftables table was deleted and made again (the rules watch saw a new
        handle): the fullnat flows' map elements added again, the kernel's schedules written
        again. Said in one line (logged, and the answer to a supervisor's request)."""
        readded = self.engine.bulk_readd()
        for adapter in self.adapters:
            if isinstance(adapter, HeadersNetlinkAdapter):
                adapter.maps.sync(self.engine, self.clock())
        if self.schedules is not None:
            self.schedules.invalidate()
            self.schedules.tick()
        message = (f"nftables table made anew: {readded} fullnat flows' map elements added "
                   "again" + (", the kernel's schedules written again"
                              if self.schedules is not None else ""))
        self.log.warning("%s", message)
        return message

    def backends_changed(self) -> None:
        """A health result, a drain, enable or weight (nfqlb.io.control, the health checker):
        the kernel's schedules are written at once, not at the next timer."""
        if self.schedules is not None:
            self.schedules.tick()

    def reload(self) -> tuple[bool, str]:
        """Read the configuration file again and apply it while the flow table is kept
        (SIGHUP, ``nfqlb ctl reload``). A file that fails ``check`` changes nothing: the error
        is logged in one line and returned."""
        live = self._live
        if live is None:
            return False, "not serving yet"
        if self.role is not None:
            return self._reload_worker(live)
        try:
            config = carry_marks(live.config, load_config(self.config_path))
            served = [a.queue for a in self.adapters if getattr(a, "lean", False)
                      and not isinstance(a, HeadersNetlinkAdapter)]
            check_reloadable(config, live.queue, live.large, served[0] if served else None,
                             live.config.daemon.binding, _headers_queue(live.config, live.queue))
            rulesets = rules.render(config, live.queue)
            for rs in rulesets:
                if rs.family.version not in live.tools:
                    live.tools.update(iptables.tools_for([rs.family.version]))
            iptables.check_overlap(rulesets, live.tools)
        except NfqlbError as exc:
            self.log.error("reload refused, the running configuration keeps serving: %s", exc)
            return False, str(exc)
        now = self.clock()
        self.engine.reconfigure(config, now)
        self._reconfigure_offload(config)
        live.config = config
        try:
            sysctl.setup(config, live.sysctls)
            self._apply_rules()
        except NfqlbError as exc:
            self.log.error("reload: the rules could not be changed: %s", exc)
            return False, f"rules not changed: {exc}"
        for hook in self.reload_hooks:
            try:
                hook(config)
            except Exception as exc:
                self.log.error("reload: %r", exc)
        self.loaded_at = time.time()
        self.flush_outbound()
        n = len(config.services)
        self.log.info("reloaded %s: %d service%s", self.config_path, n, "" if n == 1 else "s")
        return True, f"reloaded {self.config_path}"

    def _reconfigure_offload(self, config: Config) -> None:
        """The offload decider after the engine (a reload): the flows of backends it lost
        removed from conntrack, and the kernel's schedules written by this process if it is
        the one that writes them (no worker, or worker 0) and now has such a service."""
        if self.offload is None:
            return
        for svc, rt in self.offload.reconfigure(config):
            if self.kernel_flows is not None:
                self.kernel_flows.reset(svc, rt, "removed")
        if self.schedules is not None:  # (every map written again after a reload)
            self.schedules.invalidate()
        elif self.kernel_flows is not None and kernel_services(self.offload):
            base = self.role.base_queue if self.role is not None else self.adapters[0].queue
            self.schedules = KernelSchedules(self.loop, self.offload, base,
                                             self.log.getChild("schedules"), self.clock)

    def _reload_worker(self, live: _Live) -> tuple[bool, str]:
        """A worker's reload: the engine and health checks only (the supervisor checked the
        file and changes the rules and sysctls)."""
        assert self.role is not None
        try:
            config = carry_marks(live.config, self.role.config(load_config(self.config_path)))
        except NfqlbError as exc:
            self.log.error("reload refused, the running configuration keeps serving: %s", exc)
            return False, str(exc)
        self.engine.reconfigure(config, self.clock())
        self._reconfigure_offload(config)
        live.config = config
        for hook in self.reload_hooks:
            try:
                hook(config)
            except Exception as exc:
                self.log.error("reload: %r", exc)
        self.loaded_at = time.time()
        self.flush_outbound()
        return True, f"reloaded {self.config_path}"

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        wait = self._live.config.daemon.withdraw_wait if self._live is not None else 0.0
        if self.role is None and wait > 0 and self.node.rules and not self.node.withdrawing:
            self.node.withdrawing = True
            self.log.info("%s: withdrawing: nfqlb health fails from now on, packets are served "
                          "for %g s more (withdraw_wait) while the router moves traffic, then "
                          "the rules go (a second SIGTERM or SIGINT stops at once)", sig.name,
                          wait)
            self.loop.call_later(wait, self._withdrawn, wait)
            return
        self.log.info("%s: removing rules and stopping", sig.name)
        self.loop.stop()

    def _withdrawn(self, wait: float) -> None:
        self.log.info("withdraw_wait (%g s) over: removing rules and stopping", wait)
        self.loop.stop()

    def serve(self) -> None:
        """Run until a stop signal; re-raise what crashed the loop, if anything did."""
        fds = [a.fileno() for a in self.adapters]
        for fd, adapter in zip(fds, self.adapters, strict=True):
            lean = getattr(adapter, "lean", False)  # the offload queue: nothing held or sent
            self.loop.add_reader(fd, self._on_readable_lean if lean else self._on_readable,
                                 adapter)
        self._arm_timer()
        stats: asyncio.TimerHandle | None = None
        if self.stats_interval:
            stats = self.loop.call_later(self.stats_interval, self._periodic_stats)
        if self.health is not None:
            self.health.start()
        if self.signals is not None:
            self.loop.call_soon(self.signals.serving)
        try:
            self.loop.run_forever()
        finally:
            if self.signals is not None:
                self.signals.stopped()
            if self.health is not None:
                self.health.stop()
            for fd in fds:
                self.loop.remove_reader(fd)
            for handle in (self._timer, stats):
                if handle is not None:
                    handle.cancel()
        if self.crash is not None:
            raise self.crash

    def _apply_rules(self) -> None:
        """Make the installed rules those of the configuration, plus the reply rules of
        backends a reload removed while they still have flows; each family whose rule set
        changed in one ``iptables-restore`` (atomic)."""
        live = self._live
        assert live is not None
        lingering = self.engine.lingering()
        config = live.config
        if lingering:
            config = dataclasses.replace(config, services=tuple(
                dataclasses.replace(svc, backends=svc.backends + lingering.get(svc.name, ()))
                for svc in config.services))
        rulesets = rules.render(config, live.queue, marks_from=live.config)
        old = {rs.family.version: rs for rs in live.rulesets}
        new = {rs.family.version: rs for rs in rulesets}
        for version, rs in new.items():
            if old.get(version) != rs:
                iptables.apply(rs, live.tools[version])
        for version in old.keys() - new.keys():
            iptables.delete(live.queue, live.tools[version])
        live.rulesets = rulesets
        live.lingering = lingering
        if self.schedules is not None:  # (the table made again: its maps written again)
            self.schedules.invalidate()

    def _check_lingering(self) -> None:
        """Once the flows of removed backends are gone, so go their rules."""
        live = self._live
        if self.role is not None:
            return  # the supervisor keeps the rules
        if live is not None and live.lingering and self.engine.lingering() != live.lingering:
            try:
                self._apply_rules()
            except NfqlbError as exc:
                self.log.error("could not update the rules: %s", exc)

    def _on_readable(self, adapter: Adapter) -> None:
        engine = self.engine
        try:
            adapter.on_readable()
            if engine.output_pending():
                self.held.release()
                self.flush_outbound()
        except BaseException as exc:  # noqa: B036 - recv failed: stop, and let finally clean up
            self.crash = exc
            self.loop.stop()
            return
        # The timer is never more than TIMER_MAX_S away, and a packet at ``now`` sets no
        # deadline before ``now + shortest_timeout``: only shorter timeouts need a look.
        if engine.shortest_timeout < TIMER_MAX_S:
            self.timer_changed()

    def timer_changed(self) -> None:
        """Arm the timer sooner if the engine's next deadline now comes before it (after
        packets, with a timeout under TIMER_MAX_S; after a drain with a timeout)."""
        deadline = self.engine.get_timer()
        if deadline is not None and deadline < self._timer_deadline:
            self._arm_timer()

    def _on_readable_lean(self, adapter: Adapter) -> None:
        """A queue whose packets the engine never holds, answers nor times (the offload
        queue): only the adapter's own work per wakeup."""
        try:
            adapter.on_readable()
        except BaseException as exc:  # noqa: B036 - as _on_readable
            self.crash = exc
            self.loop.stop()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        now = self.clock()
        deadline = self.engine.get_timer()
        delay = TIMER_MAX_S if deadline is None else min(max(deadline - now, 0.0), TIMER_MAX_S)
        self._timer_deadline = now + delay
        if 0.0 < delay < RESOLUTION_S:
            # not due yet: within this tick of the coarse clock (nfqlb.io.clock) a sooner
            # firing reads the same now and finds the deadline still ahead; a tick later,
            # now has moved on by a tick at least
            delay = RESOLUTION_S
        self._timer = self.loop.call_at(self.loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock()
        try:
            self.engine.handle_timer(now)
            self.held.release()
            self.flush_outbound()
            self._check_lingering()
        except Exception as exc:
            self.timer_errors += 1
            if self.timer_errors == 1 or self.timer_errors % 100 == 0:
                self.log.error("engine timer failed (%d so far): %r", self.timer_errors, exc)
        self._arm_timer()

    def _periodic_stats(self) -> None:
        self.print_stats()
        assert self.stats_interval
        self.loop.call_later(self.stats_interval, self._periodic_stats)

    def format_stats(self) -> str:
        text = self.engine.format_stats()
        tail = "\n".join(a.format_stats() for a in self.adapters)
        if self.timer_errors:
            tail += f", {self.timer_errors} timer errors"
        return f"{text}\n{tail}" if text else tail

    def print_stats(self) -> None:
        """One block on stdout: a line with the time it was taken, the counters, a blank
        line (``--stats-interval`` prints many; they must read apart)."""
        from nfqlb.io.logs import block_header

        print(f"{block_header('nfqlb counters')}\n{self.format_stats()}\n", flush=True)


def check_reloadable(config: Config, queue: int, large: int, offload_queue: int | None,
                     binding: Binding, headers_queue: int | None = None) -> None:
    """Refuse (ConfigError naming the key) a reloaded ``config`` that changes what only a
    restart changes: the queues bound at start (``large``, ``offload_queue`` and
    ``headers_queue``, None when none is bound) and the binding. A supervisor checks the same
    for all its workers, with the first of their queues (each worker serves the first + its
    index)."""
    new_headers = (rules.headers_queue_for(config, queue) if config.daemon.bulk == "headers"
                   else None)
    if new_headers != headers_queue:
        key = "daemon.headers_queue" if None not in (new_headers, headers_queue) else \
            "daemon.bulk"
        raise ConfigError(config.source, key, f"is {config.daemon.bulk!r} on queue "
                          f"{new_headers}, the running daemon serves the headers route on "
                          f"{headers_queue}: restart to change it")
    new_large = rules.large_queue_for(config, queue)
    if new_large != large:
        raise ConfigError(config.source, "daemon.large_queue", f"is {new_large}, the "
                          f"running daemon serves {large}: restart to change it")
    if _has_offload(config):
        if offload_queue is None:
            raise ConfigError(config.source, "service", "adds mode \"offload\" to a "
                              "daemon started without it: restart to bind its queue")
        new_offload = rules.offload_queue_for(config, queue)
        if new_offload != offload_queue:
            raise ConfigError(config.source, "daemon.offload_queue", f"is {new_offload}, "
                              f"the running daemon serves {offload_queue}: restart to change "
                              "it")
    if config.daemon.binding is not binding:
        raise ConfigError(config.source, "daemon.binding", f"is {config.daemon.binding.value!r}"
                          f", the running daemon uses {binding.value!r}: restart to change it")


def _headers_queue(config: Config, queue: int) -> int | None:
    """The headers queue of ``queue`` (worker 0's of several), None with daemon.bulk =
    "whole"."""
    return rules.headers_queue_for(config, queue) if config.daemon.bulk == "headers" else None


def _has_offload(config: Config) -> bool:
    return any(s.mode is Mode.OFFLOAD for s in config.services)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # the dependency is declared; this only keeps a broken install usable
        logging.getLogger("nfqlb").warning("uvloop is not installed: using asyncio's loop")
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@dataclass
class _Live:
    """What a reload changes (and what stopping undoes)."""

    config: Config
    queue: int
    large: int
    rulesets: tuple[rules.RuleSet, ...]
    tools: dict[int, iptables.Iptables]
    sysctls: sysctl.Sysctls
    lingering: dict[str, tuple[Backend, ...]] = field(default_factory=dict)


def run(config: Config, queue: int | None, log: logging.Logger,
        stats_interval: float | None = None, config_path: str = "",
        role: WorkerRole | None = None) -> int:
    """Serve ``config`` on ``queue`` (default daemon.queue) until SIGINT/SIGTERM; with
    ``daemon.workers > 1``, start that many workers under a supervisor
    (:func:`nfqlb.io.workers.supervise`); as one of them (``role``), serve its queues only.

    Returns 0 after a clean stop, 1 when the clean-up itself failed; raises NfqlbError (or
    what crashed the loop) after cleaning up.
    """
    if role is None and config.daemon.workers > 1:
        from nfqlb.io import workers

        if queue is not None:
            config = with_workers(config, queue, config.daemon.workers)
        return workers.supervise(config, log, stats_interval=stats_interval,
                                 config_path=config_path)
    rulesets: tuple[rules.RuleSet, ...] = ()
    tools: dict[int, iptables.Iptables] = {}
    if role is not None:
        q, large = role.queue, role.large
        config = role.config(config)
    else:
        q = config.daemon.queue if queue is None else queue
        large = rules.large_queue_for(config, q)
        rulesets = rules.render(config, q)
        tools = iptables.tools_for(rs.family.version for rs in rulesets)
        iptables.check_overlap(rulesets, tools)  # another instance's: refuse, touch nothing
    engine = Engine(config, log=log.getChild("engine"), clock=time.perf_counter)
    held = HeldPackets(engine)
    main: Adapter = (
        NetlinkQueueAdapter(engine.handle, q, log, on_hold=held.on_hold)
        if config.daemon.binding is Binding.NETLINK
        else QueueAdapter(engine.handle, q, log, on_hold=held.on_hold))
    adapters: list[Adapter] = [
        main,
        NetlinkQueueAdapter(engine.handle, large, log, on_hold=held.on_hold, gso=True,
                            purpose=f"packets over {rules.BINDING_MAX_PACKET} bytes"),
    ]
    if config.daemon.bulk == "headers":  # large TCP packets' headers (rules/bulk.rules)
        base = role.base_queue if role is not None else q
        hq = rules.headers_queue_for(config, base) + (role.index if role is not None else 0)
        adapters.append(HeadersNetlinkAdapter(engine, hq, log, table=rules.nft_table(base)))
    decider = None
    if _has_offload(config):  # a third queue: conntrack NEW packets of offload services
        decider = OffloadDecider(config, engine.services, engine.counters)
        offload_adapter = (OffloadNetlinkAdapter if config.daemon.offload_binding == "netlink"
                           else OffloadQueueAdapter)
        # worker i of several serves the i-th of the offload queues (rules: --queue-balance)
        oq = (rules.offload_queue_for(config, role.base_queue) + role.index if role is not None
              else rules.offload_queue_for(config, q))
        adapters.append(offload_adapter(decider, oq, log))
    loop = _new_loop()
    server = Server(loop, engine, adapters, held, log, stats_interval)
    if decider is not None:
        server.offload = decider
        # conntrack is the host's, not a worker's: of several workers, worker 0 alone counts
        # the offload flows (the supervisor sums the status) and removes them
        if role is None or role.index == 0:
            server.kernel_flows = KernelFlows(loop, decider, log.getChild("conntrack"))
            if kernel_services(decider):  # (and writes the kernel's schedules)
                server.schedules = KernelSchedules(
                    loop, decider, role.base_queue if role is not None else q,
                    log.getChild("schedules"), server.clock)
    server.role = role
    server.config_path = config_path or config.source
    if role is None:  # (a supervisor checks for all its workers)
        server.health = HealthChecker(config, engine, loop, log.getChild("health"),
                                      server.clock)
        server.reload_hooks.append(server.health.reconfigure)
        server.health.on_result = server.backends_changed
    clean = True
    bound: list[Adapter] = []
    try:
        server.install_signal_handlers()
        try:
            for adapter in adapters:  # either one failing: nothing else is touched
                adapter.bind(max_len=config.daemon.queue_maxlen)
                bound.append(adapter)
            with control.operator_endpoints(server, config, q, log, role):
                clean = _serve_bound(config, q, large, rulesets, tools, server, log)
        finally:
            for adapter in reversed(bound):
                adapter.unbind()
            if len(bound) == len(adapters):
                if role is None:
                    server.print_stats()
                else:  # the supervisor prints every worker's counters as one block
                    role.tell({"final": server.engine.stats(), "queues": "\n".join(
                        a.format_stats() for a in server.adapters),
                        "timer_errors": server.timer_errors})
    finally:
        if server.kernel_flows is not None:
            server.kernel_flows.close()
        if server.schedules is not None:
            server.schedules.close()
        loop.close()
        server.restore_signal_handlers()
    return 0 if clean else 1


def _serve_bound(config: Config, queue: int, large: int,
                 rulesets: tuple[rules.RuleSet, ...], tools: dict[int, iptables.Iptables],
                 server: Server, log: logging.Logger) -> bool:
    """Sysctls, rules, serve; undo both. False if undoing failed (already logged)."""
    sysctls = sysctl.Sysctls(log)
    clean = True
    server._live = _Live(config, queue, large, rulesets, tools, sysctls)
    if server.role is not None:  # a supervisor's worker: the supervisor does the rest
        server.role.tell({"ready": queue})
        log.info("worker %d serving queue %d and queue %d for packets over %d bytes",
                 server.role.index, queue, large, rules.BINDING_MAX_PACKET)
        try:
            server.serve()
        finally:
            for adapter in server.adapters:
                try:
                    adapter.drain()
                except Exception as exc:
                    log.debug("draining the queue failed: %r", exc)
            server.held.drop_all(log)
            server.sender.close()
        return True
    live = server._live
    watch = RulesWatch(server.node, lambda: missing_jump(live.rulesets, live.tools),
                       tables=lambda: table_handles(live.rulesets, live.tools),
                       on_anew=lambda _names: server.loop.call_soon_threadsafe(
                           server.tables_anew))
    try:
        sysctl.setup(config, sysctls)
        try:
            for rs in rulesets:
                iptables.apply(rs, tools[rs.family.version])
            server.node.rules = True
            server.backends_changed()  # (the kernel's schedules, at once)
            n = len(config.services)
            log.info("engine: %s", native.STATE)
            headers = _headers_queue(config, queue)
            log.info("serving queue %d and queue %d for packets over %d bytes%s (%d service%s, "
                     "%s)", queue, large, rules.BINDING_MAX_PACKET,
                     "" if headers is None else f", queue {headers} for their TCP headers "
                     f"(nftables table {rules.nft_table(queue)})", n,
                     "" if n == 1 else "s", rules.placed(rulesets))
            watch.start()
            server.serve()
        finally:
            watch.stop()
            server.node.rules = False
            kept = server.crash is not None and server._live.config.daemon.ecmp
            if kept:
                log.error("daemon.ecmp: the rules stay, without --queue-bypass: the VIP's "
                          "packets are dropped, not passed unrewritten, until the next start "
                          "(or nfqlb rules --delete)")
            for t in () if kept else server._live.tools.values():
                try:
                    if iptables.delete(queue, t):
                        log.info("rules for queue %d removed (%s)", queue, t.family.iptables)
                except SystemSetupError as exc:
                    log.error("could not remove the rules of queue %d: %s", queue, exc)
                    clean = False
            for adapter in server.adapters:
                try:
                    adapter.drain()
                except Exception as exc:
                    log.debug("draining the queue failed: %r", exc)
            server.held.drop_all(log)
            server.sender.close()
    finally:
        clean = sysctls.restore() and clean
    return clean
