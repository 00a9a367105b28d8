"""Render nfqlb's iptables rules from a Config, and plan their removal; no I/O here.

The rule text comes from the templates in ``rules/`` (installed as ``nfqlb/rules.d``), one
file per concern, filled with :class:`string.Template`. Everything lives in the ``raw`` table,
in four chains nfqlb owns per queue (see :func:`chains_for`), reached by one jump each from
raw PREROUTING and raw OUTPUT (ICMP errors go through a chain of their own, which keeps only
those that quote one of the queue's packets). Every match goes (``-g``) to the queue chain,
which takes the packet out of conntrack (``CT --notrack``) and hands it to ``NFQUEUE``:
packets longer than :data:`BINDING_MAX_PACKET` to the large-packet queue
(:func:`large_queue_for`), the others to the queue itself. The large-packet rule lives in the
queue's own chain, so it comes and goes with it.

Only the answers to nfqlb's own health checks are let through before that (``RETURN``,
``rules/health.rules``): they come from a backend's port like a flow's replies, but to a
source port of the checks (``[service.health] source_ports``) of a local address.

Services with an IPv4 VIP render into an ``iptables`` rule set, IPv6 VIPs into an
``ip6tables`` one (:data:`FAMILIES`). Applying and deleting is done by ``nfqlb.io.iptables``
with ``iptables-restore --noflush``, from texts built here: :func:`format_restore` for apply
(idempotent: declaring an existing chain flushes it, jumps are added only when missing) and
:func:`plan_delete` for removal, both planned against a parsed ``iptables-save``
(:func:`parse_save`) so they touch exactly nfqlb's own rules. Before either, the rules of
other queues in that dump are checked for overlap (:func:`find_overlap`): two instances must
not match each other's packets.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from string import Template

from nfqlb import policies
from nfqlb.config import (
    Config,
    HealthKind,
    IcmpEcho,
    OffloadScheduler,
    Service,
    bulk_marks,
    bulk_whole,
    offload_marks,
    worker_ports,
)
from nfqlb.errors import ConfigError
from nfqlb.policies import jhash
from nfqlb.values import Backend, IPAddress, Mode

TEMPLATE_DIR = "rules.d"  # inside the nfqlb package; a link to the repository's rules/
TABLE = "raw"
BUILTIN_CHAINS = ("PREROUTING", "OUTPUT")  # the raw table's built-in chains
_ANY_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # of any table

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
    errors: str  # ICMP errors, jumped to from pre and out: queues those quoting our packets
    target: str  # CT --notrack, then NFQUEUE

    @property
    def all(self) -> tuple[str, str, str, str]:
        return (self.pre, self.out, self.errors, self.target)

    @property
    def names(self) -> dict[str, str]:
        """The template variables naming the chains."""
        return {"pre": self.pre, "out": self.out, "errors": self.errors, "target": self.target}


def chains_for(queue: int) -> Chains:
    return Chains(pre=f"NFQLB-PRE-{queue}", out=f"NFQLB-OUT-{queue}",
                  errors=f"NFQLB-ERR-{queue}", target=f"NFQLB-Q-{queue}")


# --- several workers (daemon.workers > 1): see rules/workers.rules ------------------------

#: Offset of the u32 word whose last byte is the last byte of the source and of the
#: destination address, per IP version.
_ADDRESS_WORD = {4: (12, 16), 6: (20, 36)}


def worker_chain(chains: Chains, worker: int) -> str:
    """The chain that queues packets to ``worker`` (several workers only)."""
    return f"{chains.target}-{worker}"


def reply_chain(chains: Chains) -> str:
    """The chain that steers replies by their destination, the client (several workers)."""
    return chains.target.replace("NFQLB-Q-", "NFQLB-R-", 1)


def is_worker_chain(queue: int, chain: str) -> bool:
    """One of the chains several workers add to ``queue``'s (for removal without config)."""
    return chain == f"NFQLB-R-{queue}" or chain.startswith(f"NFQLB-Q-{queue}-")


def client_bytes(worker: int, workers: int) -> tuple[int, int]:
    """The range of the client address's last byte that ``worker`` owns."""
    return worker * 256 // workers, (worker + 1) * 256 // workers - 1


def _worker_rules(chains: Chains, family: Family, queue: int, large: int, workers: int,
                  bypass: str, notes: _Notes, bulk: _Bulk | None) -> list[str]:
    """The steering chains (requests by source, replies by destination) and one queueing
    chain per worker."""
    lines = notes("workers.rules")
    src, dst = _ADDRESS_WORD[family.version]
    for i in range(workers):
        lo, hi = client_bytes(i, workers)
        last = i == workers - 1
        for steer, word in ((chains.target, src), (reply_chain(chains), dst)):
            match = "" if last else f'-m u32 --u32 "{word}&0xFF={lo}:{hi}"'
            lines += _fill("workers.rules", {"steer": steer, "match": match,
                                             "worker": worker_chain(chains, i)})
    for i in range(workers):
        lines += _queue_lines(worker_chain(chains, i), queue + i, large + i, bypass, notes, bulk,
                              i)
    return lines


@dataclass(frozen=True, slots=True)
class _Bulk:
    """The headers route of one queue (daemon.bulk = "headers"; see rules/bulk.rules)."""

    queue: int  # the headers queue (worker i of several: + i)
    whole: int  # the mark that sends a packet on whole
    mask: int


def _queue_lines(target: str, queue: int, large: int, bypass: str, notes: _Notes,
                 bulk: _Bulk | None, worker: int = 0) -> list[str]:
    """The queueing chain ``target``: rules/queue.rules, with rules/bulk.rules after its
    first line (CT --notrack) when the headers route is on."""
    values = {"target": target, "queue": queue, "bypass": bypass, "large_queue": large,
              "large_from": BINDING_MAX_PACKET + 1}
    lines = notes("queue.rules")
    queued = _fill("queue.rules", values)
    if bulk is None:
        return lines + queued
    extra = notes("bulk.rules") + _fill("bulk.rules", {
        **values, "headers_queue": bulk.queue + worker, "whole": f"{bulk.whole:#x}",
        "mask": f"{bulk.mask:#x}"})
    return lines + queued[:1] + extra + queued[1:]


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
    #: mode "offload" (see "offload" below): (table, lines) for mangle and nat, and the jumps
    #: (table, "-I ..." line); empty without offload services of this family
    offload: tuple[tuple[str, tuple[str, ...]], ...] = ()
    offload_jumps: tuple[tuple[str, str], ...] = ()
    extra_chains: tuple[str, ...] = ()  # several workers: steering and per-worker chains
    #: daemon.bulk = "headers": the headers queue (of worker 0), None without it; nfqlb's
    #: nftables table (``nft -f`` input, :func:`nft_text`): the headers route's rewrites by
    #: mark (:func:`bulk_nft`) and offload's kernel schedules (:func:`_schedule_body`); ""
    #: without either
    headers_queue: int | None = None
    nft: str = ""

    @property
    def rules(self) -> tuple[str, ...]:
        """The rule lines of ``body``, without comments."""
        return tuple(line for line in self.body if not line.startswith("#"))


@functools.cache
def _template_text(name: str) -> str:
    return resources.files("nfqlb").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")


@functools.cache
def _template(name: str) -> tuple[str, ...]:
    """The non-comment lines of ``rules/<name>`` (the frame keeps blank-free lines only)."""
    return tuple(line for line in _template_text(name).splitlines()
                 if line.strip() and not line.startswith("#"))


@functools.cache
def template_comments(name: str) -> tuple[str, ...]:
    """The ``#`` comment lines of ``rules/<name>``, as written (``${...}`` are the template's
    placeholders), under a line naming the file; printed once per rule set by ``--print``."""
    lines = [line.rstrip() for line in _template_text(name).splitlines()
             if line.startswith("#")]
    return (f"# --- rules/{name} ---", *lines) if lines else ()


def _fill(name: str, values: Mapping[str, object]) -> list[str]:
    """Substitute ``values`` into template ``name``; empty values vanish with their space."""
    mapping = {k: str(v) for k, v in values.items()}
    return [" ".join(Template(line).substitute(mapping).split()) for line in _template(name)]


def _host(address: IPAddress, family: Family) -> str:
    return f"{address}/{family.host_prefix}"


class _Notes:
    """The templates' comments for a printout: each template's, once, before its first rules
    (nothing at all unless ``wanted``)."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.done: set[str] = set()

    def __call__(self, name: str) -> list[str]:
        if not self.wanted or name in self.done:
            return []
        self.done.add(name)
        return list(template_comments(name))


def _service_rules(svc: Service, family: Family, chains: Chains,
                   notes: _Notes | None = None, workers: int = 1) -> list[str]:
    notes = notes or _Notes(False)
    common = {**chains.names, "proto": svc.protocol.name.lower(), "frag": family.frag}
    lines = notes("forward.rules")
    lines += _fill("forward.rules", {**common, "vip": _host(svc.vip, family), "port": svc.port})
    reply = f"reply-{svc.mode.value}.rules"
    lines += notes(reply)
    for b in svc.backends:
        values = {**common, **_backend_values(svc, b, family)}
        if workers == 1:
            lines += _fill(reply, values)
        elif svc.mode is Mode.FULLNAT:  # the pool's port range tells the worker
            assert svc.snat_ports is not None
            for i in range(workers):
                lo, hi = worker_ports(svc.snat_ports, i, workers)
                mine = _fill(reply, {**values, "snat_ports": f"{lo}:{hi}",
                                     "target": worker_chain(chains, i)})
                # a later fragment carries no port: worker 0's (see rules/workers.rules)
                lines += mine if i == 0 else [line for line in mine if "--dport" in line]
        else:  # the client is the destination of a reply
            lines += _fill(reply, {**values, "target": reply_chain(chains)})
    lines += notes("icmp-quote.rules")
    for quoted, target in _quoted_targets(svc, chains, workers):
        lines += _fill("icmp-quote.rules", {**common, "quote": quoted.u32(family),
                                            "target": target})
    return lines


# --- ICMP errors: which quoted packets are ours -------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotedPacket:
    """What an ICMP error quotes, as far as a rule can tell a service's packets by it: the
    protocol and any of source address, source port (or range), destination, destination
    port."""

    protocol: int
    src: IPAddress | None = None
    sport: tuple[int, int] | None = None
    dst: IPAddress | None = None
    dport: int | None = None
    #: several workers: ("src" | "dst", lo, hi), the quoted client address's last byte range
    client: tuple[str, int, int] | None = None

    def u32(self, family: Family) -> str:
        """``-m u32 --u32 "..."`` matches (several when one would exceed u32's ten tests)."""
        tests = (_quote_tests_v4 if family.version == 4 else _quote_tests_v6)(self)
        return " ".join(f'-m u32 --u32 "{"&&".join(tests[i:i + U32_MAX_TESTS])}"'
                        for i in range(0, len(tests), U32_MAX_TESTS))


U32_MAX_TESTS = 10  # xt_u32 takes at most XT_U32_MAXSIZE + 1 = 11 tests per match

# IPv4: "0>>22&0x3C" is the outer header's length; "@" moves there, so "<that>@8" reads the
# quoted header's first word, "@8>>22&0x3C@8" the first word after the quoted header (ports).
_V4_QUOTE = "0>>22&0x3C@"
_V4_PORTS = "0>>22&0x3C@8>>22&0x3C@8"


def _ports(value: tuple[int, int] | int) -> str:
    if isinstance(value, int):
        return str(value)
    return str(value[0]) if value[0] == value[1] else f"{value[0]}:{value[1]}"


def _quote_tests_v4(q: QuotedPacket) -> list[str]:
    tests = [f"{_V4_QUOTE}16>>16&0xFF={q.protocol}"]
    if q.src is not None:
        tests.append(f"{_V4_QUOTE}20=0x{int(q.src):08x}")
    if q.dst is not None:
        tests.append(f"{_V4_QUOTE}24=0x{int(q.dst):08x}")
    if q.sport is not None or q.dport is not None:
        tests.append(f"{_V4_QUOTE}12&0x1FFF=0")  # the quote is a first fragment: it has ports
    if q.sport is not None:
        tests.append(f"{_V4_PORTS}>>16={_ports(q.sport)}")
    if q.dport is not None:
        tests.append(f"{_V4_PORTS}&0xFFFF={_ports(q.dport)}")
    if q.client is not None:
        where, lo, hi = q.client
        tests.append(f"{_V4_QUOTE}{20 if where == 'src' else 24}&0xFF={lo}:{hi}")
    return tests


def _v6_words(address: IPAddress, offset: int) -> list[str]:
    value = int(address)
    return [f"{offset + 4 * i}=0x{(value >> (96 - 32 * i)) & 0xFFFFFFFF:08x}" for i in range(4)]


def _quote_tests_v6(q: QuotedPacket) -> list[str]:
    # outer: next header ICMPv6 (no extension headers), quoted header at 48, ports at 88
    tests = ["4>>8&0xFF=58", f"52>>8&0xFF={q.protocol}"]
    if q.src is not None:
        tests += _v6_words(q.src, 56)
    if q.dst is not None:
        tests += _v6_words(q.dst, 72)
    if q.sport is not None:
        tests.append(f"88>>16={_ports(q.sport)}")
    if q.dport is not None:
        tests.append(f"88&0xFFFF={_ports(q.dport)}")
    if q.client is not None:
        where, lo, hi = q.client
        tests.append(f"{68 if where == 'src' else 84}&0xFF={lo}:{hi}")
    return tests


def _quoted_packets(svc: Service) -> list[QuotedPacket]:
    """The packets of ``svc`` nfqlb sends out, as an error about them would quote them."""
    proto = int(svc.protocol)
    out = [QuotedPacket(proto, src=svc.vip, sport=(svc.port, svc.port))]  # replies
    for b in svc.backends:
        if svc.mode is Mode.LOCAL:
            out.append(QuotedPacket(proto, dst=b.address or svc.vip, dport=b.port))
        elif svc.mode is Mode.DNAT:
            out.append(QuotedPacket(proto, dst=b.address, dport=b.port))
        else:
            out.append(QuotedPacket(proto, src=svc.snat_address, sport=svc.snat_ports,
                                    dst=b.address, dport=b.port))
    return out


def _quoted_targets(svc: Service, chains: Chains,
                    workers: int) -> list[tuple[QuotedPacket, str]]:
    """The quoted packets of ``svc`` and the chain an error quoting each goes to: with several
    workers, the owner's, told by the quoted client address (or fullnat pool port)."""
    out = []
    for quoted in _quoted_packets(svc):
        if workers == 1:
            out.append((quoted, chains.target))
            continue
        for i in range(workers):
            if quoted.src == svc.snat_address and quoted.sport is not None \
                    and svc.mode is Mode.FULLNAT and svc.snat_ports is not None:
                mine = replace(quoted, sport=worker_ports(svc.snat_ports, i, workers))
            else:  # a reply quotes the client as destination, a request as source
                lo, hi = client_bytes(i, workers)
                mine = replace(quoted, client=("dst" if quoted.src == svc.vip else "src",
                                               lo, hi))
            out.append((mine, worker_chain(chains, i)))
    return out


def _health_rules(services: list[Service], family: Family, chains: Chains) -> list[str]:
    """The answers to tcp and http health checks return before any rule queues them: they
    come from a backend's checked port to a check's source port of a local address."""
    lines = []
    for svc in services:
        check = svc.health
        if check is None or check.kind is HealthKind.COMMAND or svc.mode is Mode.OFFLOAD:
            continue
        local = svc.mode is Mode.LOCAL
        for b in svc.backends:
            lines += _fill("health.rules", {
                "chain": chains.out if local else chains.pre,
                "source": f"-s {_host(b.address, family)}" if b.address is not None else "",
                "check_port": check.port_for(b),
                "source_ports": f"{check.source_ports[0]}:{check.source_ports[1]}"})
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


def headers_queue_for(config: Config, queue: int | None = None) -> int:
    """The headers queue that goes with ``queue`` (default: daemon.queue): daemon.headers_queue
    when set, else ``queue + 30000`` (mod 65536), as :func:`large_queue_for`."""
    q = config.daemon.queue if queue is None else queue
    headers = replace(config.daemon, queue=q).headers_queue_number
    if headers in (q, large_queue_for(config, q)):
        raise ConfigError(config.source, "daemon.headers_queue",
                          f"must differ from the queues served ({q} and its large-packet "
                          "queue)")
    return headers


# --- the headers route's nftables table (daemon.bulk = "headers") --------------------------

NFT_FAMILY = {4: "ip", 6: "ip6"}
NFT_PRIORITY = -250  # after the raw table (-300) and its NFQUEUE, before conntrack (-200)


def nft_table(queue: int) -> str:
    """The name of ``queue``'s nftables table (one per family: ``ip`` and ``ip6``)."""
    return f"nfqlb-{queue}"


#: The maps of fullnat flows' own values (nfqlb.io.bulk adds an element per flow): their
#: key, as the nftables table reads it from the packet (``{ip}``: ip or ip6), and data type.
NFT_MAPS = {
    "fwd-port": ("{ip} saddr . tcp sport . {ip} daddr . tcp dport", "inet_service"),
    "rev-addr": ("{ip} saddr . tcp sport . tcp dport", "{addr}"),
    "rev-port": ("{ip} saddr . tcp sport . tcp dport", "inet_service"),
}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


def bulk_matches(config: Config, services: Iterable[Service]
                 ) -> dict[int, tuple[tuple[str, str], ...]]:
    """The packets each mark of ``services``' backends may rewrite, as (field, value) pairs
    (as :func:`bulk_rewrites`): toward the VIP and port; from the backend's address and
    port (in fullnat to the snat address). Another instance's table, at the same priority,
    numbers its marks the same way by default: these matches keep each table to its own
    services' packets (overlapping services are refused by :func:`find_overlap`)."""
    marks = bulk_marks(config.daemon, config.services, config.bulk_numbers)
    out: dict[int, tuple[tuple[str, str], ...]] = {}
    for svc in services:
        for b in svc.backends:
            pair = marks.get((svc.name, b.name))
            if pair is None:
                continue
            reply = [("saddr", str(b.address or svc.vip)), ("sport", str(b.port))]
            if svc.mode is Mode.FULLNAT:
                reply.append(("daddr", str(svc.snat_address)))
            out[pair[0]] = (("daddr", str(svc.vip)), ("dport", str(svc.port)))
            out[pair[1]] = tuple(reply)
    return out


def bulk_rewrites(config: Config, services: Iterable[Service]
                  ) -> dict[int, tuple[tuple[str, str], ...]]:
    """What the nftables table does to a packet of each mark of ``services``' backends:
    (field, value) pairs, the fields ``saddr``, ``daddr``, ``sport``, ``dport``, in the
    order the rule sets them; the same as the engine's rewrite of an established flow's
    packet (toward the backend: its address and port, in fullnat the snat address and the
    flow's pool port too; a reply: the VIP's, in fullnat the client's too). A value
    ``@name`` is the flow's own, looked up in map ``name`` (:data:`NFT_MAPS`), first."""
    marks = bulk_marks(config.daemon, config.services, config.bulk_numbers)
    out: dict[int, tuple[tuple[str, str], ...]] = {}
    for svc in services:
        fullnat = svc.mode is Mode.FULLNAT
        for b in svc.backends:
            pair = marks.get((svc.name, b.name))
            if pair is None:
                continue
            address = b.address or svc.vip
            fwd: list[tuple[str, str]] = []
            back: list[tuple[str, str]] = []
            if fullnat:
                fwd += [("sport", "@fwd-port"), ("saddr", str(svc.snat_address))]
                back += [("daddr", "@rev-addr"), ("dport", "@rev-port")]
            if address != svc.vip or fullnat:
                fwd.append(("daddr", str(address)))
                back.append(("saddr", str(svc.vip)))
            if b.port != svc.port or fullnat:
                fwd.append(("dport", str(b.port)))
                back.append(("sport", str(svc.port)))
            out[pair[0]], out[pair[1]] = tuple(fwd), tuple(back)
    return out


def bulk_nft(config: Config, services: list[Service], family: Family, queue: int) -> str:
    """``nft -f`` input (re)defining ``queue``'s table of ``family`` in one transaction: a
    chain at prerouting and one at output (type route: a new destination is routed again)
    that jump by the mark of daemon.bulk_mark_mask to a chain per mark, which rewrites as
    the engine would (:func:`bulk_rewrites`) a packet of its services (:func:`bulk_matches`)
    and clears the mark; with fullnat services, the
    maps of their flows. The table's rules are flushed first, its maps' elements kept (a
    reload leaves the flows' elements where they are). A mark whose flow has no element (it
    cannot happen: nfqlb marks a fullnat flow only once they are in) is dropped, not passed
    unrewritten. "" when none of ``services`` has a mark (daemon.bulk = "whole", no TCP
    service of this family)."""
    return nft_text(family, queue, _bulk_body(config, services, family))


def nft_text(family: Family, queue: int, *bodies: list[str]) -> str:
    """``nft -f`` input (re)defining ``queue``'s table of ``family`` with ``bodies`` (the
    headers route's, offload's schedules) in one transaction; "" when all are empty. Its
    rules are flushed first; its maps' elements and its named counters are kept."""
    lines = [line for body in bodies for line in body]
    if not lines:
        return ""
    table = f"{NFT_FAMILY[family.version]} {nft_table(queue)}"
    return "\n".join([f"table {table}", f"flush table {table}", f"table {table} {{", *lines,
                      "}"]) + "\n"


def _bulk_body(config: Config, services: list[Service], family: Family) -> list[str]:
    """The headers route's part of the table (see :func:`bulk_nft`)."""
    rewrites = bulk_rewrites(config, services)
    if not rewrites:
        return []
    matches = bulk_matches(config, services)
    ip = NFT_FAMILY[family.version]
    mask = config.daemon.bulk_mark_mask
    clear = f"meta mark set meta mark & {0xFFFFFFFF & ~mask:#010x}"
    whole = bulk_whole(config.daemon)
    chains = {whole: "whole", **{m: f"mark-{m:#x}" for m in rewrites}}
    vmap = ", ".join(f"{m:#010x} : jump {name}" for m, name in chains.items())
    lines = []
    if any(v.startswith("@") for fields in rewrites.values() for _, v in fields):
        addr = _ADDR_TYPE[family.version]
        for name, (key, data) in NFT_MAPS.items():
            types = key.format(ip=ip).replace(f"{ip} saddr", addr).replace(f"{ip} daddr", addr)
            types = types.replace("tcp sport", "inet_service").replace("tcp dport",
                                                                       "inet_service")
            lines.append(f"  map {name} {{ type {types} : {data.format(addr=addr)}; }}")
    for name, hook, kind in (("pre", "prerouting", "filter"), ("out", "output", "route")):
        lines += [f"  chain {name} {{",
                  f"    type {kind} hook {hook} priority {NFT_PRIORITY}; policy accept;",
                  f"    meta mark & {mask:#010x} vmap {{ {vmap} }}", "  }"]
    lines += ["  chain whole {", f"    {clear}", "  }"]
    for m, fields in rewrites.items():
        match = " ".join(f"{'tcp' if f.endswith('port') else ip} {f} {v}"
                         for f, v in matches[m])
        sets = []
        for f, v in fields:
            value = (f"{NFT_MAPS[v[1:]][0].format(ip=ip)} map @{v[1:]}" if v.startswith("@")
                     else v)
            sets.append(f"{'tcp' if f.endswith('port') else ip} {f} set {value}")
        lines += [f"  chain {chains[m]} {{", "    " + " ".join([match, *sets, clear])]
        if any(v.startswith("@") for _, v in fields):  # (a lookup that misses ends the rule)
            lines[-1] += " return"
            lines.append(f"    {match} {clear} counter drop")
        lines.append("  }")
    return lines


def render(config: Config, queue: int | None = None, *,
           comments: bool = False, marks_from: Config | None = None) -> tuple[RuleSet, ...]:
    """The rule sets for ``config`` on ``queue`` (default: daemon.queue), IPv4 first.

    A family appears only when some service's VIP is of it. A rule that two services share
    (a backend behind two dnat services) is rendered once, where it first appears. With
    ``comments``, each template's comments come before its first rules (for printing).
    ``marks_from`` is the configuration the engine numbers the headers route's marks from,
    when ``config`` differs from it (the daemon adds the backends a reload removed while
    their flows last, for their reply rules; their large packets go whole, unmarked).
    """
    marks_from = marks_from or config
    q = config.daemon.queue if queue is None else queue
    large = large_queue_for(config, q)
    chains = chains_for(q)
    bypass = "--queue-bypass" if config.daemon.bypass else ""
    sets = []
    for family in FAMILIES.values():
        services = [s for s in config.services if s.vip.version == family.version]
        if not services:
            continue
        offloaded = [s for s in services if s.mode is Mode.OFFLOAD]
        services = [s for s in services if s.mode is not Mode.OFFLOAD]
        notes = _Notes(comments)
        workers = config.daemon.workers
        extra: tuple[str, ...] = ()
        bulk_body = _bulk_body(marks_from, [s for s in marks_from.services
                                            if s.vip.version == family.version
                                            and s.mode is not Mode.OFFLOAD], family) \
            if services else []
        bulk = _Bulk(headers_queue_for(config, q), bulk_whole(config.daemon),
                     config.daemon.bulk_mark_mask) if bulk_body else None
        nft = nft_text(family, q, bulk_body, _schedule_body(config, offloaded, family))
        if workers == 1:
            body = _queue_lines(chains.target, q, large, bypass, notes, bulk)
        else:
            body = _worker_rules(chains, family, q, large, workers, bypass, notes, bulk)
            extra = (reply_chain(chains), *(worker_chain(chains, i) for i in range(workers)))
        where = chains.names
        body += notes("icmp.rules")
        body += dict.fromkeys(_fill("icmp.rules", {**where, **family.icmp}))
        if config.daemon.icmp_echo is IcmpEcho.DROP:
            body += notes("echo-drop.rules")
            for vip in dict.fromkeys(s.vip for s in services):
                body += _fill("echo-drop.rules",
                              {**where, **family.icmp, "vip": _host(vip, family)})
        checks = _health_rules(services, family, chains)
        if checks:
            body.append("# health checks' own packets (rules/health.rules)")
            body += dict.fromkeys(checks)
        seen = set(body)
        for svc in services:
            body.append(f"# {describe(svc)}")
            for line in _service_rules(svc, family, chains, notes, workers):
                if line.startswith("#"):
                    body.append(line)
                elif line not in seen:
                    seen.add(line)
                    body.append(line)
        jumps = _fill("jumps.rules", {"pre": chains.pre, "out": chains.out}) if services else []
        if not services:  # offload only: the raw chains stay empty, with no jump into them
            body = []
        tables, offload_jumps = _offload_rules(config, offloaded, family, q, bypass, comments)
        sets.append(RuleSet(family=family, queue=q, chains=chains, body=tuple(body),
                            jumps=tuple(jumps), services=len(services) + len(offloaded),
                            large_queue=large, offload=tables, offload_jumps=offload_jumps,
                            extra_chains=extra, headers_queue=bulk.queue if bulk else None,
                            nft=nft))
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
            name in _ANY_BUILTIN and policy == "ACCEPT" for name, policy in self.chains.items()
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
    if not ruleset.body and not ruleset.jumps:  # offload only: no raw chains (any left go)
        return plan_delete(ruleset.queue, saved) or ""
    jumps = ruleset.jumps if all_jumps else missing_jumps(ruleset, saved)
    chains = ruleset.chains.names
    lines = [f"# {h}" for h in header]
    for line in _template("table.rules"):
        if line.strip() == "${body}":
            lines.extend(f":{c} - [0:0]" for c in ruleset.extra_chains)
            lines.extend(ruleset.body)
            lines.extend(jumps)
        else:
            lines.append(Template(line).substitute(chains))
    return "\n".join(lines) + "\n"


def format_print(ruleset: RuleSet, source: str) -> str:
    """``nfqlb rules --print``: the rules with the templates' comments, as text that may be
    given to ``iptables-restore --noflush`` any number of times with the same result.

    Declaring a chain that exists flushes it, so the chains' contents are idempotent; an
    ``-I`` into a built-in chain is not (every restore adds one more jump), and
    iptables-restore has no "insert if absent". So the jumps come last as shell commands in
    comments (``-C`` checks whether the jump is there before ``-I`` inserts it), and the hint
    names ``nfqlb rules --apply``, which does all of it idempotently. ``ruleset`` comes from
    ``render(..., comments=True)``.
    """
    fam, q = ruleset.family, ruleset.queue
    tool = f"{fam.iptables} -w -t {TABLE}"
    checks = []
    for jump in ruleset.jumps:
        rule = jump.split(None, 1)[1]  # "PREROUTING -j NFQLB-PRE-1"
        chain, spec = rule.split(None, 1)
        checks.append(f"#   {tool} -C {chain} {spec} 2>/dev/null || {tool} -I {chain} {spec}")
    header = [
        f"# nfqlb rules for queue {q}, IPv{fam.version}, from {source}",
        f"# install with: nfqlb rules --apply --config {source} --queue {q}",
        "#   (idempotent: what nfqlb run installs; nfqlb rules --delete removes it)",
        f"# or by hand, also idempotent: {fam.restore} --noflush < this-file, then the two",
        "#   commands at the end, which add the jumps from the built-in chains only if absent",
        "#",
        *(line for line in template_comments("table.rules")),
    ]
    lines = list(header)
    for line in _template("table.rules"):
        if line.strip() == "${body}":
            lines.extend(f":{c} - [0:0]" for c in ruleset.extra_chains)
            lines.extend(ruleset.body)
        else:
            lines.append(Template(line).substitute(ruleset.chains.names))
    if ruleset.nft:
        lines += ["# nfqlb's nftables table (the headers route's rewrites, rules/bulk.rules;",
                  "# offload's kernel schedules, whose maps' elements nfqlb run writes),",
                  "# input to nft -f; nfqlb rules --apply installs it before the rules above:",
                  *(f"#   {line}" for line in ruleset.nft.splitlines())]
    lines += [*template_comments("jumps.rules"),
              "# They are not restore lines here: each restore would add them once more. Run:",
              *checks]
    if ruleset.offload:
        lines += [*template_comments("offload-table.rules"),
                  *format_offload(ruleset, None, jumps=False).splitlines(),
                  *template_comments("offload-jumps.rules"), "# Run:"]
        for table, jump in ruleset.offload_jumps:
            chain, spec = jump.split(None, 2)[1:]
            t = f"{fam.iptables} -w -t {table}"
            lines.append(f"#   {t} -C {chain} {spec} 2>/dev/null || {t} -I {chain} {spec}")
    return "\n".join(lines) + "\n"


def plan_delete(queue: int, saved: SavedTable | None) -> str | None:
    """The iptables-restore --noflush input removing queue's chains, or None if none exist.

    Every rule of another chain that jumps into one of nfqlb's chains is deleted (normally just
    the two jumps from the built-in chains), then nfqlb's chains are flushed and removed.
    """
    if saved is None:
        return None
    ours = (*chains_for(queue).all,
            *(c for c in saved.chains if is_worker_chain(queue, c)))
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


# --- another instance's rules that would take this one's packets ----------------------------


@dataclass(frozen=True, slots=True)
class PortRule:
    """A rule of an nfqlb chain that matches by port: a forward rule (``--dport`` only, to a
    VIP) or a reply rule (``--sport``: from a backend). Fragment and ICMP rules are not."""

    queue: int
    chain: str  # "PRE" | "OUT"
    protocol: str
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    sport: tuple[int, int] | None
    dport: tuple[int, int] | None
    text: str

    @property
    def is_reply(self) -> bool:
        return self.sport is not None

    def overlaps(self, other: PortRule) -> bool:
        """Some packet matches both (same direction and chain, every field intersecting)."""
        if (self.chain, self.protocol, self.is_reply) != (other.chain, other.protocol,
                                                          other.is_reply):
            return False
        for a, b in ((self.src, other.src), (self.dst, other.dst)):
            if a is not None and b is not None and (a.version != b.version
                                                    or not a.overlaps(b)):
                return False
        for p, q in ((self.sport, other.sport), (self.dport, other.dport)):
            if p is not None and q is not None and (p[1] < q[0] or q[1] < p[0]):
                return False
        return True


_CHAIN = re.compile(r"^-A NFQLB-(PRE|OUT)-(\d+) ")


def _port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def parse_port_rule(rule: str) -> PortRule | None:
    """The :class:`PortRule` of an ``-A NFQLB-PRE|OUT-<q> ...`` line (rendered or as
    iptables-save shows it), None for any other rule."""
    m = _CHAIN.match(rule)
    if m is None:
        return None
    words = rule.split()
    if "!" in words or "u32" in words or _rule_chain_and_target(rule)[1] == "RETURN":
        return None  # a RETURN (health.rules) takes no packet from another instance
    opts: dict[str, str] = {}
    for flag, value in zip(words, words[1:], strict=False):
        if flag in ("-s", "-d", "-p", "--sport", "--dport"):
            opts[flag] = value
    if "--sport" not in opts and "--dport" not in opts:
        return None
    try:
        return PortRule(
            queue=int(m.group(2)), chain=m.group(1), protocol=opts.get("-p", "all"),
            src=ipaddress.ip_network(opts["-s"], strict=False) if "-s" in opts else None,
            dst=ipaddress.ip_network(opts["-d"], strict=False) if "-d" in opts else None,
            sport=_port_range(opts["--sport"]) if "--sport" in opts else None,
            dport=_port_range(opts["--dport"]) if "--dport" in opts else None,
            text=rule)
    except ValueError:
        return None


def find_overlap(ruleset: RuleSet, saved: SavedTable | None) -> str | None:
    """Why ``ruleset`` cannot be installed next to another queue's rules in ``saved``, or None.

    Two instances (two queues) whose port rules overlap would each take the other's packets,
    whichever jump comes first: the same VIP and port, or replies from the same backend
    address and port that nothing tells apart. In dnat and local mode a reply carries
    neither the VIP nor anything of the instance; in fullnat it comes back to the instance's
    snat address and pool, so two fullnat instances sharing a backend need disjoint pools.
    """
    if saved is None:
        return None
    theirs = [r for rule in saved.rules
              if (r := parse_port_rule(rule)) is not None and r.queue != ruleset.queue]
    for rule in ruleset.rules:
        mine = parse_port_rule(rule)
        if mine is None:
            continue
        for other in theirs:
            if mine.overlaps(other):
                what = (f"replies from {_describe_reply(mine)}" if mine.is_reply
                        else f"packets to {_endpoint(mine.dst, mine.dport, mine.protocol)}")
                if not mine.is_reply:
                    advice = "two instances cannot serve the same VIP and port"
                elif mine.dport is not None and other.dport is not None:
                    advice = ("two fullnat instances sharing a backend need disjoint "
                              "snat_ports or snat_addresses of their own")
                else:
                    advice = ("replies in dnat and local mode carry nothing of the instance: "
                              "two instances cannot share a backend there; use fullnat with "
                              "disjoint snat_ports")
                return (f"queue {ruleset.queue}: {what} are already taken by queue "
                        f"{other.queue}'s rule \"{other.text}\" ({advice}; `nfqlb rules "
                        f"--delete --queue {other.queue}` removes rules a dead instance left)")
    return None


def _endpoint(net: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
              ports: tuple[int, int] | None, protocol: str) -> str:
    host = "*" if net is None else (str(net.network_address) if net.version == 4
                                    else f"[{net.network_address}]")
    port = "*" if ports is None else _ports(ports).replace(":", "-")
    return f"{host}:{port}/{protocol}"


def _describe_reply(rule: PortRule) -> str:
    text = _endpoint(rule.src, rule.sport, rule.protocol)
    if rule.dst is not None or rule.dport is not None:
        text += f" to {_endpoint(rule.dst, rule.dport, rule.protocol)}"
    return text


DROP_EMPTY_TABLE = f"*{TABLE}\nCOMMIT\n"
"""iptables-restore input (without --noflush) that empties the raw table; with iptables-nft
it removes the table, so a table nfqlb's apply created does not outlive its delete."""



# --- mode "offload": conntrack NEW packets queued, DNAT/SNAT by mark -------------------------

OFFLOAD_TABLES = ("mangle", "nat")


@dataclass(frozen=True, slots=True)
class OffloadChains:
    """nfqlb's offload chains for one queue: ``new`` in mangle, ``dnat`` and ``snat`` in nat."""

    new: str
    dnat: str
    snat: str

    def of(self, table: str) -> tuple[str, ...]:
        return (self.new,) if table == "mangle" else (self.dnat, self.snat)


def offload_queue_for(config: Config, queue: int | None = None) -> int:
    """The offload queue that goes with ``queue`` (default: daemon.queue)."""
    q = config.daemon.queue if queue is None else queue
    return replace(config.daemon, queue=q).offload_queue_number


def offload_chains_for(queue: int) -> OffloadChains:
    return OffloadChains(new=f"NFQLB-NEW-{queue}", dnat=f"NFQLB-DNAT-{queue}",
                         snat=f"NFQLB-SNAT-{queue}")


def placed(rulesets: Sequence[RuleSet]) -> str:
    """Where ``rulesets``' rules are, for the start log: raw's chains when a service's packets
    are queued there, offload's chains in mangle and nat when it has offload services."""
    rs = rulesets[0]
    where = []
    if any(r.rules for r in rulesets):
        where.append(f"{TABLE} {rs.chains.pre}/{rs.chains.out}")
    if any(r.offload for r in rulesets):
        ch = offload_chains_for(rs.queue)
        snat = any(line.startswith(f"-A {ch.snat} ") for r in rulesets
                   for table, lines in r.offload for line in lines)
        where.append(f"mangle {ch.new}, nat {ch.dnat}" + (f"/{ch.snat}" if snat else ""))
    return "rules in " + (", ".join(where) or f"{TABLE} {rs.chains.pre}/{rs.chains.out}")


def _offload_rules(config: Config, services: list[Service], family: Family, queue: int,
                   bypass: str, comments: bool
                   ) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, str], ...]]:
    """The mangle and nat lines of ``services`` (offload, of ``family``) and the jumps."""
    if not services:
        return (), ()
    ch = offload_chains_for(queue)
    marks = offload_marks(config.daemon, config.services, config.offload_numbers)
    mask = config.daemon.offload_mark_mask
    notes = _Notes(comments)
    mangle = notes("offload.rules")
    nat = notes("offload-nat.rules")
    snat = notes("offload-snat.rules") if any(s.snat_address for s in services) else []
    first, n = offload_queue_for(config, queue), config.daemon.workers
    target = f"--queue-num {first}" if n == 1 else f"--queue-balance {first}:{first + n - 1}"
    for svc in services:
        kernel = svc.offload_scheduler is OffloadScheduler.KERNEL
        values = {"new": ch.new, "dnat": ch.dnat, "snat": ch.snat,
                  "proto": svc.protocol.name.lower(), "vip": _host(svc.vip, family),
                  "port": svc.port, "offload_target": target, "bypass": bypass,
                  "unmarked": f"-m mark --mark 0x0/{mask:#x}" if kernel else ""}
        mangle += [f"# {describe(svc)}", *_fill("offload.rules", values)]
        for b in svc.backends:
            assert b.address is not None
            mark = f"{marks[(svc.name, b.name)]:#x}/{mask:#x}"
            to = f"[{b.address}]:{b.port}" if family.version == 6 else f"{b.address}:{b.port}"
            nat += _fill("offload-nat.rules", {**values, "mark": mark, "backend": to})
            if svc.snat_address is not None:
                snat += _fill("offload-snat.rules", {
                    **values, "mark": mark, "backend_address": _host(b.address, family),
                    "backend_port": b.port, "snat_address": svc.snat_address})
    jumps = tuple(("mangle" if ch.new in line else "nat", line)
                  for line in _fill("offload-jumps.rules", {"new": ch.new, "dnat": ch.dnat,
                                                            "snat": ch.snat}))
    return (("mangle", tuple(mangle)), ("nat", tuple(nat + snat))), jumps


#: The slots of the schedule of an offload service with offload_scheduler = "kernel": the
#: kernel gives its n-th new flow slot n modulo SCHEDULE_SLOTS (a hashing policy's: the slot
#: of the client's address). A multiple of 1 to 10: round robin over up to ten backends is
#: exact, and any schedule is within a flow of its shares.
SCHEDULE_SLOTS = policies.SCHEDULE_SLOTS
#: The schedules' chains: after conntrack (-200: a packet's state is known), before mangle
#: (-150), whose offload rule queues only what they did not mark.
SCHEDULE_PRIORITY = -160


def schedule_map(svc: Service) -> str:
    """The nftables map of ``svc``'s schedule (slot -> the chain of a backend): named by the
    VIP and port, so that a reload keeps it where it belongs."""
    return f"s-{svc.protocol.name.lower()}-{svc.vip.packed.hex()}-{svc.port}"


def schedule_chain(svc: Service, backend: Backend) -> str:
    """The chain (and its named counter) that marks a new flow of ``svc`` for ``backend``:
    named by the backend's address and port, so that an element of the schedule written
    before a reload that renumbered the marks sets the backend's new mark."""
    assert backend.address is not None
    return f"{schedule_map(svc)}-{backend.address.packed.hex()}-{backend.port}"


def schedule_slot(svc: Service) -> tuple[str, int]:
    """The expression that gives a new flow of ``svc`` its slot, and the number of slots:
    numgen (the n-th new flow, slot n of SCHEDULE_SLOTS), or for a hash policy with hash =
    "jhash" the kernel's jhash of the policy's fields into its table, which nfqlb computes
    alike (nfqlb.policies.jhash)."""
    hashed = policies.kernel_hash(svc.policy, svc.policy_options, len(svc.backends))
    if hashed is None:
        return f"numgen inc mod {SCHEDULE_SLOTS}", SCHEDULE_SLOTS
    fields, slots = hashed
    expr = jhash.nft_expression(fields, NFT_FAMILY[svc.vip.version])
    return f"{expr} mod {slots} seed {jhash.SEED:#x}", slots


def _schedule_body(config: Config, services: list[Service], family: Family) -> list[str]:
    """Offload's part of the table for its services with offload_scheduler = "kernel": a map
    per service (its elements written by nfqlb.io.schedules), a chain and a named counter per
    backend, and the chains at prerouting and output that look up a bare SYN (or a first
    datagram) that conntrack calls NEW, in its service's map, by its ``schedule_slot``."""
    kernel = [s for s in services if s.mode is Mode.OFFLOAD
              and s.offload_scheduler is OffloadScheduler.KERNEL]
    if not kernel:
        return []
    ip = NFT_FAMILY[family.version]
    marks = offload_marks(config.daemon, config.services, config.offload_numbers)
    keep = 0xFFFFFFFF & ~config.daemon.offload_mark_mask
    lines, looks = [], []
    for svc in kernel:
        name = schedule_map(svc)
        slot, slots = schedule_slot(svc)
        # (typeof numgen: the key is the same 32-bit integer, and nft 1.0.6 cannot list a
        # map typed by a jhash of a concatenation)
        lines.append(f"  map {name} {{ typeof numgen inc mod {slots} : verdict; }}")
        for b in svc.backends:
            chain = schedule_chain(svc, b)
            lines += [f"  counter {chain} {{ }}", f"  chain {chain} {{",
                      f"    counter name \"{chain}\" meta mark set meta mark & {keep:#010x} "
                      f"| {marks[(svc.name, b.name)]:#010x}", "  }"]
        l4 = svc.protocol.name.lower()
        first = " tcp flags & (fin | syn | rst | ack) == syn" if l4 == "tcp" else ""
        looks.append(f"    ct state new ct status & confirmed == 0 {ip} daddr {svc.vip} "
                     f"{l4} dport {svc.port}{first} {slot} vmap @{name}")
    for chain, hook, kind in (("new-pre", "prerouting", "filter"), ("new-out", "output",
                                                                    "route")):
        lines += [f"  chain {chain} {{",
                  f"    type {kind} hook {hook} priority {SCHEDULE_PRIORITY}; policy accept;",
                  *looks, "  }"]
    return lines


def bridging_marks(old: RuleSet, new: RuleSet) -> RuleSet:
    """``old``, whose nat chains DNAT (and SNAT) by ``new``'s offload marks too: ``new``'s
    nat rules, then each of ``old``'s whose match (VIP, port, mark; backend for SNAT) ``new``
    has no rule for. A supervisor installs it while its workers take a reload, one worker
    after the other (each marks new flows by the new configuration from its reload on, the
    others by the old until theirs), and ``new`` once all have: no first packet meets a mark
    the rules do not know. A reload keeps each backend's mark and gives a new one a number
    no backend had (:func:`nfqlb.config.carry_marks`), so what the bridge adds is the marks
    of the backends the reload removed; a named backend whose address changed keeps its
    mark, and the new address's rule wins for that moment. A single daemon needs no bridge:
    its reload, the rules' included, runs between two of its packets."""
    if not old.offload or not new.offload:
        return old
    new_nat = dict(new.offload).get("nat", ())
    have = {line.split(" -j ", 1)[0] for line in new_nat if line.startswith("-A ")}
    kept = tuple(line for line in dict(old.offload).get("nat", ())
                 if line.startswith("-A ") and line.split(" -j ", 1)[0] not in have)
    return replace(old, offload=tuple((t, new_nat + kept if t == "nat" else lines)
                                      for t, lines in old.offload))


def format_offload(ruleset: RuleSet, dump: str | None, *, jumps: bool = True) -> str:
    """The mangle and nat part of the iptables-restore --noflush input for ``ruleset``, to
    follow :func:`format_restore`'s (one restore, one transaction). ``dump`` is the whole
    ``iptables-save`` output (None: no table yet); ``jumps=False`` leaves the jumps out (for
    printing). Without offload services the
    chains a previous configuration left are removed instead."""
    if not ruleset.offload:
        return plan_delete_offload(ruleset.queue, dump) or ""
    ch = offload_chains_for(ruleset.queue)
    values = {"new": ch.new, "dnat": ch.dnat, "snat": ch.snat}
    present = {t: set(saved.rules) if (saved := parse_save(dump, t)) is not None else set()
               for t in OFFLOAD_TABLES} if dump else None
    bodies = dict(ruleset.offload)
    lines: list[str] = []
    table = ""
    for line in _template("offload-table.rules"):
        if line.startswith("*"):
            table = line[1:]
        key = line.strip()[2:-1] if line.strip().startswith("${") else None
        if key in bodies:
            lines.extend(bodies[key])
        elif line == "COMMIT":
            lines.extend(j for t, j in ruleset.offload_jumps if jumps and t == table and (
                present is None or "-A" + j[2:] not in present[t]))
            lines.append(line)
        else:
            lines.append(Template(line).substitute(values))
    return "\n".join(lines) + "\n"


def plan_delete_offload(queue: int, dump: str | None) -> str | None:
    """The iptables-restore --noflush input removing ``queue``'s offload chains (and the jumps
    into them) from mangle and nat, or None when there are none."""
    if not dump:
        return None
    ch = offload_chains_for(queue)
    out = []
    for table in OFFLOAD_TABLES:
        saved = parse_save(dump, table)
        if saved is None:
            continue
        ours = ch.of(table)
        lines = ["-D" + rule[2:] for rule in saved.rules
                 if (ct := _rule_chain_and_target(rule))[1] in ours and ct[0] not in ours]
        present = [c for c in ours if c in saved.chains]
        lines += [f"-F {c}" for c in present] + [f"-X {c}" for c in present]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else None


def empty_tables(dump: str) -> list[str]:
    """The tables of ``dump`` nfqlb may touch that are empty (to remove after a delete)."""
    return [t for t in (TABLE, *OFFLOAD_TABLES)
            if (saved := parse_save(dump, t)) is not None and saved.is_empty]
