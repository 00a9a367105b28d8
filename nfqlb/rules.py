"""Render nfqlb's iptables rules from a Config, and plan their removal; no I/O here.

The rule text comes from the templates in ``rules/`` (installed as ``nfqlb/rules.d``), one
file per concern, filled with :class:`string.Template`. Everything lives in the ``raw`` table,
in three chains nfqlb owns per queue (see :func:`chains_for`), reached by one jump each from
raw PREROUTING and raw OUTPUT. Every match goes (``-g``) to the queue chain, which takes the
packet out of conntrack (``CT --notrack``) and hands it to ``NFQUEUE``: packets longer than
:data:`BINDING_MAX_PACKET` to the large-packet queue (:func:`large_queue_for`), the others to
the queue itself. The large-packet rule lives in the queue's own chain, so it comes and goes
with it.

Services with an IPv4 VIP render into an ``iptables`` rule set, IPv6 VIPs into an
``ip6tables`` one (:data:`FAMILIES`). Applying and deleting is done by ``nfqlb.io.iptables``
with ``iptables-restore --noflush``, from texts built here: :func:`format_restore` for apply
(idempotent: declaring an existing chain flushes it, jumps are added only when missing) and
:func:`plan_delete` for removal, both planned against a parsed ``iptables-save``
(:func:`parse_save`) so they touch exactly nfqlb's own rules.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from string import Template

from nfqlb.config import Config, IcmpEcho, Service
from nfqlb.errors import ConfigError
from nfqlb.values import Backend, IPAddress, Mode

TEMPLATE_DIR = "rules.d"  # inside the nfqlb package; a link to the repository's rules/
TABLE = "raw"
BUILTIN_CHAINS = ("PREROUTING", "OUTPUT")  # the raw table's built-in chains

BINDING_MAX_PACKET = 3960
"""The longest IP packet the NetfilterQueue binding receives whole in every case; longer ones
go to the large-packet queue. The binding asks for at most 4016 bytes and receives into 4096:
its 80 bytes of room for the message around the payload are enough for a packet arriving from
a veth (checked: 4016 bytes pass whole), but not for every attribute the kernel may put before
the payload. Without the optional-by-flag ones (uid/gid, conntrack, secctx, bridge-only vlan
and l2 header) the most is 136 bytes: nlmsghdr+nfgenmsg 20, packet header 12, in/out interface
8+8, physical in/out interface (br_netfilter) 8+8, mark 8, priority 8, hardware address 16,
skb info 8, capture length 8, timestamp 20 (set once any socket asks for timestamps), payload
attribute header 4. 4096 - 136 = 3960."""


@dataclass(frozen=True, slots=True)
class Family:
    """The tools and the match spellings of one address family."""

    version: int
    iptables: str
    restore: str
    save: str
    host_prefix: int
    frag: str  # matches fragments (the first included; it also matches the port rules)
    icmp: Mapping[str, str]  # the values of rules/icmp.rules and rules/echo-drop.rules


_ICMP4 = {"icmp": "icmp", "icmp_type": "--icmp-type", "unreachable": "3",
          "too_big": "3",  # "fragmentation needed" is 3/4, within 3
          "time_exceeded": "11", "parameter_problem": "12", "echo": "8"}
_ICMP6 = {"icmp": "ipv6-icmp", "icmp_type": "--icmpv6-type", "unreachable": "1",
          "too_big": "2", "time_exceeded": "3", "parameter_problem": "4", "echo": "128"}

FAMILIES: Mapping[int, Family] = {
    # IPv4: "-f" would match only the later fragments; this matches the first one too (MF set
    # or an offset), so nfqlb also learns of datagrams to a VIP that are not balanced
    4: Family(4, "iptables", "iptables-restore", "iptables-save", 32,
              '-m u32 --u32 "0x4&0x3fff=0x1:0x3fff"', _ICMP4),
    6: Family(6, "ip6tables", "ip6tables-restore", "ip6tables-save", 128, "-m frag", _ICMP6),
}


@dataclass(frozen=True, slots=True)
class Chains:
    """nfqlb's chains for one queue, in the raw table."""

    pre: str  # jumped to from PREROUTING
    out: str  # jumped to from OUTPUT
    target: str  # CT --notrack, then NFQUEUE

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.pre, self.out, self.target)


def chains_for(queue: int) -> Chains:
    return Chains(pre=f"NFQLB-PRE-{queue}", out=f"NFQLB-OUT-{queue}", target=f"NFQLB-Q-{queue}")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules of one queue for one address family.

    ``body`` holds the chain contents in iptables-restore syntax (``-A`` lines and ``#``
    comments naming the service each block belongs to); ``jumps`` the ``-I`` lines for the
    built-in chains.
    """

    family: Family
    queue: int
    chains: Chains
    body: tuple[str, ...]
    jumps: tuple[str, ...]
    services: int
    large_queue: int  # where packets over BINDING_MAX_PACKET bytes go

    @property
    def rules(self) -> tuple[str, ...]:
        """The rule lines of ``body``, without comments."""
        return tuple(line for line in self.body if not line.startswith("#"))


@functools.cache
def _template(name: str) -> tuple[str, ...]:
    """The non-comment lines of ``rules/<name>`` (the frame keeps blank-free lines only)."""
    text = resources.files("nfqlb").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _fill(name: str, values: Mapping[str, object]) -> list[str]:
    """Substitute ``values`` into template ``name``; empty values vanish with their space."""
    mapping = {k: str(v) for k, v in values.items()}
    return [" ".join(Template(line).substitute(mapping).split()) for line in _template(name)]


def _host(address: IPAddress, family: Family) -> str:
    return f"{address}/{family.host_prefix}"


def _service_rules(svc: Service, family: Family, chains: Chains) -> list[str]:
    common = {"pre": chains.pre, "out": chains.out, "target": chains.target,
              "proto": svc.protocol.name.lower(), "frag": family.frag}
    lines = _fill("forward.rules", {**common, "vip": _host(svc.vip, family), "port": svc.port})
    for b in svc.backends:
        values = {**common, **_backend_values(svc, b, family)}
        lines += _fill(f"reply-{svc.mode.value}.rules", values)
    return lines


def _backend_values(svc: Service, b: Backend, family: Family) -> dict[str, object]:
    values: dict[str, object] = {"backend_port": b.port}
    if svc.mode is Mode.LOCAL:
        values["source"] = f"-s {_host(b.address, family)}" if b.address is not None else ""
        return values
    assert b.address is not None  # config guarantees it outside local mode
    values["backend"] = _host(b.address, family)
    if svc.mode is Mode.FULLNAT:
        assert svc.snat_address is not None and svc.snat_ports is not None
        values["snat_address"] = _host(svc.snat_address, family)
        values["snat_ports"] = f"{svc.snat_ports[0]}:{svc.snat_ports[1]}"
    return values


def describe(svc: Service) -> str:
    vip = f"[{svc.vip}]" if svc.vip.version == 6 else str(svc.vip)
    n = len(svc.backends)
    return (f"service {svc.name}: {vip}:{svc.port}/{svc.protocol.name.lower()} "
            f"{svc.mode.value}, {n} backend{'s' if n != 1 else ''}")


def large_queue_for(config: Config, queue: int | None = None) -> int:
    """The large-packet queue that goes with ``queue`` (default: daemon.queue).

    daemon.large_queue when set, else ``queue + 10000`` (mod 65536), computed by the config
    itself for the queue actually served (``--queue`` may override daemon.queue).
    """
    q = config.daemon.queue if queue is None else queue
    large = replace(config.daemon, queue=q).large_queue_number
    if large == q:
        raise ConfigError(config.source, "daemon.large_queue",
                          f"must differ from the queue served ({q})")
    return large


def render(config: Config, queue: int | None = None) -> tuple[RuleSet, ...]:
    """The rule sets for ``config`` on ``queue`` (default: daemon.queue), IPv4 first.

    A family appears only when some service's VIP is of it. A rule that two services share
    (a backend behind two dnat services) is rendered once, where it first appears.
    """
    q = config.daemon.queue if queue is None else queue
    large = large_queue_for(config, q)
    chains = chains_for(q)
    bypass = "--queue-bypass" if config.daemon.bypass else ""
    sets = []
    for family in FAMILIES.values():
        services = [s for s in config.services if s.vip.version == family.version]
        if not services:
            continue
        body = _fill("queue.rules", {"target": chains.target, "queue": q, "bypass": bypass,
                                     "large_queue": large,
                                     "large_from": BINDING_MAX_PACKET + 1})
        where = {"pre": chains.pre, "out": chains.out, "target": chains.target}
        body += dict.fromkeys(_fill("icmp.rules", {**where, **family.icmp}))
        if config.daemon.icmp_echo is IcmpEcho.DROP:
            for vip in dict.fromkeys(s.vip for s in services):
                body += _fill("echo-drop.rules",
                              {**where, **family.icmp, "vip": _host(vip, family)})
        seen = set(body)
        for svc in services:
            body.append(f"# {describe(svc)}")
            for line in _service_rules(svc, family, chains):
                if line not in seen:
                    seen.add(line)
                    body.append(line)
        jumps = _fill("jumps.rules", {"pre": chains.pre, "out": chains.out})
        sets.append(RuleSet(family=family, queue=q, chains=chains, body=tuple(body),
                            jumps=tuple(jumps), services=len(services), large_queue=large))
    return tuple(sets)


# --- the current state, as iptables-save shows it -------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedTable:
    """One table of an ``iptables-save`` dump: chain -> policy ('-' for user chains), rules."""

    chains: Mapping[str, str]
    rules: tuple[str, ...]  # the "-A CHAIN ..." lines, in order

    @property
    def is_empty(self) -> bool:
        """Only built-in chains, all with policy ACCEPT, and no rules: as if it did not exist."""
        return not self.rules and all(
            name in BUILTIN_CHAINS and policy == "ACCEPT" for name, policy in self.chains.items()
        )


def parse_save(text: str, table: str = TABLE) -> SavedTable | None:
    """The ``table`` section of an ``iptables-save`` dump, or None when the table is absent."""
    chains: dict[str, str] = {}
    rules: list[str] = []
    inside = found = False
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            inside = line[1:] == table
            found = found or inside
        elif not inside:
            continue
        elif line == "COMMIT":
            inside = False
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            chains[name] = rest.split(" ", 1)[0] if rest else "-"
        elif line.startswith("-A "):
            rules.append(line)
    return SavedTable(chains=chains, rules=tuple(rules)) if found else None


def _rule_chain_and_target(rule: str) -> tuple[str, str | None]:
    """('PREROUTING', 'NFQLB-PRE-1') for '-A PREROUTING -j NFQLB-PRE-1'."""
    words = rule.split()
    target = None
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            target = words[i + 1]
    return words[1], target


def missing_jumps(ruleset: RuleSet, saved: SavedTable | None) -> tuple[str, ...]:
    """The ``-I`` jump lines of ``ruleset`` that ``saved`` does not hold yet."""
    present = set(saved.rules) if saved is not None else set()
    return tuple(j for j in ruleset.jumps if "-A" + j[2:] not in present)


def format_restore(ruleset: RuleSet, saved: SavedTable | None = None, *,
                   all_jumps: bool = False, header: Iterable[str] = ()) -> str:
    """The iptables-restore --noflush input that installs ``ruleset``.

    Jumps already in ``saved`` are left out, so applying twice gives the rules once;
    ``all_jumps`` puts all of them in (for printing).
    """
    jumps = ruleset.jumps if all_jumps else missing_jumps(ruleset, saved)
    chains = {"pre": ruleset.chains.pre, "out": ruleset.chains.out,
              "target": ruleset.chains.target}
    lines = [f"# {h}" for h in header]
    for line in _template("table.rules"):
        if line.strip() == "${body}":
            lines.extend(ruleset.body)
            lines.extend(jumps)
        else:
            lines.append(Template(line).substitute(chains))
    return "\n".join(lines) + "\n"


def plan_delete(queue: int, saved: SavedTable | None) -> str | None:
    """The iptables-restore --noflush input removing queue's chains, or None if none exist.

    Every rule of another chain that jumps into one of nfqlb's chains is deleted (normally just
    the two jumps from the built-in chains), then nfqlb's chains are flushed and removed.
    """
    if saved is None:
        return None
    ours = chains_for(queue).all
    lines = []
    for rule in saved.rules:
        chain, target = _rule_chain_and_target(rule)
        if target in ours and chain not in ours:
            lines.append("-D" + rule[2:])
    present = [c for c in ours if c in saved.chains]
    lines += [f"-F {c}" for c in present]
    lines += [f"-X {c}" for c in present]
    if not lines:
        return None
    return "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n"


DROP_EMPTY_TABLE = f"*{TABLE}\nCOMMIT\n"
"""iptables-restore input (without --noflush) that empties the raw table; with iptables-nft
it removes the table, so a table nfqlb's apply created does not outlive its delete."""

