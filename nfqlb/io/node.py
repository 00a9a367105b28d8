"""The node's life toward a BGP speaker: whether this node says it serves (``nfqlb health``).

Behind a router's equal-cost multipath, a node announces the VIP while it can serve and
withdraws it when it cannot; the router then moves the flows to the other nodes. nfqlb does
not speak BGP: a speaker (ExaBGP's healthcheck, BIRD or FRR through a script, keepalived's
``track_script``) runs ``nfqlb health`` and announces while it exits 0. This module holds
what the daemon answers (``health_facts``) and what the command makes of it (``judge``).

The node is in one of three states, the daemon's (the supervisor's, with several workers),
never the engine's, so a reload keeps it:

    serving      the usual
    draining     ``nfqlb ctl drain-node``: health fails, every packet and flow is still
                 served, until ``nfqlb ctl enable-node``
    withdrawing  SIGTERM with ``daemon.withdraw_wait``: health fails, packets are served for
                 that long while the router moves traffic away, then the daemon stops

A node serves a service when all of these hold, each failure with an exit code of its own
(any code but 0 withdraws):

    0  serving
    1  no daemon answers on the control socket (none, a stale socket, no answer in time)
    2  the command line is wrong, or the daemon has no such service
    3  the node is draining or withdrawing
    4  the daemon is not whole: its rules are not installed (or their jumps are gone from
       the kernel's tables: RulesWatch), a queue is not bound in the kernel, a worker does
       not answer
    5  no backend of the service may take new flows (all down, drained or weight 0)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nfqlb import rules

RULES_CHECK_S = 2.0  # how often the daemon looks for its jumps in the kernel's tables

SERVING, DRAINING, WITHDRAWING = "serving", "draining", "withdrawing"

OK, NO_DAEMON, USAGE, NODE_OUT, NOT_WHOLE, NO_BACKEND = 0, 1, 2, 3, 4, 5


@dataclass
class NodeState:
    """What the daemon tells a speaker, besides its engine's backends."""

    drained: bool = False  # nfqlb ctl drain-node
    withdrawing: bool = False  # stopping: withdraw_wait runs
    rules: bool = False  # the daemon's rules are installed (set once applied, cleared first)
    rules_gone: str = ""  # what RulesWatch last found missing in the kernel's tables

    @property
    def state(self) -> str:
        if self.withdrawing:
            return WITHDRAWING
        return DRAINING if self.drained else SERVING


def service_facts(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per service of an engine's status: its backends, and how many may take new flows
    (up, not drained, weight above 0)."""
    return {name: {"backends": len(svc["backends"]),
                   "live": sum(1 for b in svc["backends"].values()
                               if b["state"] == "up" and b["weight"] > 0)}
            for name, svc in status["services"].items()}


def unbound_queues(adapters: tuple[Any, ...]) -> list[int]:
    """The adapters' queues the kernel does not show as bound (``/proc/net/netfilter/
    nfnetlink_queue``); a queue whose kernel counters cannot be read at all is not judged."""
    out = []
    for adapter in adapters:
        kernel = getattr(adapter, "kernel", None)
        if kernel is None or getattr(kernel, "error", None):
            continue
        if kernel.read() is None:
            out.append(adapter.queue)
    return out


def health_facts(node: NodeState, status: dict[str, Any], adapters: tuple[Any, ...],
                 rules: bool | None) -> dict[str, Any]:
    """The ``health`` answer of one daemon or worker: the node's state, whether its rules
    are installed (None: not its business, a supervisor's worker), its queues the kernel does
    not show bound, and per service the backends that may take new flows."""
    return {"node": node.state, "rules": rules, "unbound": unbound_queues(adapters),
            "services": service_facts(status),
            "problems": [node.rules_gone] if rules and node.rules_gone else []}


def judge(facts: dict[str, Any], service: str | None) -> tuple[int, str]:
    """``nfqlb health``'s exit code and its one line, from the daemon's answer."""
    services: dict[str, dict[str, int]] = facts.get("services", {})
    if service is not None and service not in services:
        known = ", ".join(services) or "none"
        return USAGE, f"no service {service!r} (the daemon serves: {known})"
    node = facts.get("node", SERVING)
    if node == DRAINING:
        return NODE_OUT, "not serving: the node is drained (nfqlb ctl enable-node undoes it)"
    if node == WITHDRAWING:
        return NODE_OUT, "not serving: the node is withdrawing (stopping after withdraw_wait)"
    if facts.get("rules") is False:
        return NOT_WHOLE, "not serving: the daemon's rules are not installed"
    if facts.get("unbound"):
        queues = ", ".join(map(str, facts["unbound"]))
        return NOT_WHOLE, f"not serving: queue {queues} not bound in the kernel"
    if facts.get("problems"):
        return NOT_WHOLE, f"not serving: {facts['problems'][0]}"
    names = [service] if service is not None else list(services)
    for name in names:
        s = services[name]
        if not s["live"]:
            return NO_BACKEND, (f"not serving: service {name}: no backend up of {s['backends']} "
                                "(down, drained or weight 0)")
    what = f"service {service}" if service is not None else (
        f"{len(names)} service{'' if len(names) == 1 else 's'}")
    live = sum(services[n]["live"] for n in names)
    return OK, f"serving {what} ({live} backend{'' if live == 1 else 's'} up)"


def merge_facts(own: NodeState, rules: bool, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """A supervisor's answer from its workers' (each ``{"ok", "health"}`` or an error): the
    supervisor's node state and rules; a backend counts as live only if every worker has it
    live; a worker that does not answer is a problem."""
    problems: list[str] = []
    unbound: list[int] = []
    services: dict[str, dict[str, int]] = {}
    for answer in answers:
        if not answer.get("ok"):
            problems.append(str(answer.get("error")))
            continue
        h = answer["health"]
        unbound += h["unbound"]
        problems += h["problems"]
        for name, s in h["services"].items():
            have = services.setdefault(name, dict(s))
            have["live"] = min(have["live"], s["live"])
    if rules and own.rules_gone:
        problems.insert(0, own.rules_gone)
    return {"node": own.state, "rules": rules, "unbound": unbound, "services": services,
            "problems": problems}


def missing_jump(rulesets: Any, tools: Any) -> str:
    """The first jump from a built-in chain into nfqlb's chains that the kernel's tables no
    longer hold (another program flushed them, say), or the headers route's nftables table
    gone, as one line; "" when all are there. One ``iptables-save`` (and ``nft list
    tables``) per family."""
    for rs in rulesets:
        present = {_jump(line) for line in tools[rs.family.version].save_text().splitlines()}
        for line in (*rs.jumps, *(line for _table, line in rs.offload_jumps)):
            jump = _jump(line)
            if jump is not None and jump not in present:
                return (f"the rules are gone from the kernel: no jump from {jump[0]} to "
                        f"{jump[1]} in {rs.family.iptables}-save (flushed by another program?)")
        if rs.nft:  # nfqlb's table (the headers route, offload's kernel schedules)
            name = rules.nft_table(rs.queue)
            if name not in tools[rs.family.version].nft_tables():
                return (f"the rules are gone from the kernel: no nftables "
                        f"{rules.NFT_FAMILY[rs.family.version]} {name} in nft list tables "
                        "(deleted by another program?)")
    return ""


def table_handles(rulesets: Any, tools: Any) -> dict[str, int]:
    """The kernel's handle of each nftables table of ``rulesets`` that is there (``ip
    nfqlb-1``: 12): a table deleted and made again (``nfqlb rules --apply`` after another
    program deleted it) has a new one, and none of the elements nfqlb wrote into it."""
    out = {}
    for rs in rulesets:
        if rs.nft:
            ip, name = rules.NFT_FAMILY[rs.family.version], rules.nft_table(rs.queue)
            handle = tools[rs.family.version].nft_tables().get(name)
            if handle is not None:
                out[f"{ip} {name}"] = handle
    return out


def _jump(line: str) -> tuple[str, str] | None:
    """``-A CHAIN ... -j TARGET`` (or ``-I``): (CHAIN, TARGET)."""
    words = line.split()
    if len(words) < 4 or words[0] not in ("-A", "-I") or "-j" not in words[:-1]:
        return None
    return words[1], words[words.index("-j") + 1]


class RulesWatch:
    """Every RULES_CHECK_S, on a thread of its own (``iptables-save`` takes milliseconds,
    which the event loop must not wait for), whether the daemon's jumps are still in the
    kernel's tables: what is missing goes to ``node.rules_gone`` (health then fails, exit 4).
    ``look`` returns that line, "" when all is there; it raising counts as nothing missing."""

    def __init__(self, node: NodeState, look: Callable[[], str],
                 interval: float = RULES_CHECK_S,
                 tables: Callable[[], dict[str, int]] | None = None,
                 on_anew: Callable[[list[str]], object] | None = None) -> None:
        self.node = node
        self.look = look
        self.interval = interval
        self.tables = tables  # nfqlb's nftables tables' handles (table_handles)
        self.on_anew = on_anew  # told (on the watch's thread) of tables made anew
        self._handles: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nfqlb-rules-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.node.rules_gone = ""

    def _run(self) -> None:
        self._look_at_tables()  # (the handles the daemon made its table with)
        while not self._stop.wait(self.interval):
            try:
                # missing: look again, with the rule sets as they are now (a reload replacing
                # a family's rules may have been between its rule sets and the kernel's)
                gone = self.look() and self.look()
            except Exception:
                gone = ""
            if not self._stop.is_set():
                self.node.rules_gone = gone
                self._look_at_tables()

    def _look_at_tables(self) -> None:
        """Tell ``on_anew`` of the tables whose handle changed since the last look (deleted
        and made again in between; one that is gone keeps its last handle here)."""
        if self.tables is None or self.on_anew is None:
            return
        try:
            now = self.tables()
        except Exception:
            return
        anew = [name for name, handle in now.items()
                if self._handles.get(name, handle) != handle]
        self._handles.update(now)
        if anew:
            self.on_anew(anew)
