"""TOML configuration -> frozen dataclasses, with every validation in one place.

A bad configuration raises :class:`ConfigError` naming the file, the key (for example
``service[0].backend[1].port``) and the problem; nothing else in nfqlb validates user input.
A service's policy is checked by the policies package (``policies.check``); its errors are
reported here under the key they concern. The value types the dataclasses hold (``Backend``,
``Mode``, ``Protocol``, ``IPAddress``) live in :mod:`nfqlb.values` and are re-exported.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import shlex
import shutil
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nfqlb import policies
from nfqlb.errors import ConfigError, PolicyError
from nfqlb.typed import TableReader
from nfqlb.values import Backend, IPAddress, Mode, Protocol

__all__ = [
    "DEFAULT_PATHS", "Config", "DaemonConfig", "HealthCheck", "HealthKind", "IcmpEcho",
    "OnBackendDown", "Service", "Timeouts", "UnknownFlow", "find_config", "load_config",
    "parse_config",
]

DEFAULT_PATHS = (Path("nfqlb.toml"), Path("/etc/nfqlb/nfqlb.toml"))


class OnBackendDown(enum.Enum):
    """What becomes of a backend's flows when it goes down or is removed by a reload."""

    KEEP = "keep"  # they carry on (as IPVS does); the backend gets no new flows
    RESET = "reset"  # both ends get a RST (TCP) and the flows leave the table


class OffloadScheduler(enum.Enum):
    """Who decides a new flow of an offload service (see ``offload_scheduler``)."""

    NFQLB = "nfqlb"  # its first packet goes to the offload queue; nfqlb's policy decides
    KERNEL = "kernel"  # the kernel plays the schedule nfqlb writes from its policy (nftables)


class UnknownFlow(enum.Enum):
    """What to do with a TCP packet to a VIP that is not a SYN and matches no flow."""

    DROP = "drop"  # silently: the client retries until it gives up
    RESET = "reset"  # answer the client with a RST: it learns at once (what IPVS hosts do)
    HASH = "hash"  # adopt the flow on a backend chosen by a consistent hash of the flow


class IcmpEcho(enum.Enum):
    ACCEPT = "accept"  # echo requests to a VIP go on to the kernel (it answers if it owns the VIP)
    DROP = "drop"


class Binding(enum.Enum):
    """What serves the main queue (the large-packet queue is always nfqlb's netlink client)."""

    NETFILTERQUEUE = "netfilterqueue"  # the NetfilterQueue binding (libnetfilter_queue)
    NETLINK = "netlink"  # nfqlb's own client (nfqlb.io.netlink): verdicts batched per wakeup


class HealthKind(enum.Enum):
    TCP = "tcp"  # connect, then close (with a RST: no TIME_WAIT left on the balancer)
    HTTP = "http"  # GET path; up when the status is in expect
    COMMAND = "command"  # run a program with the backend's address and port; exit 0 is up


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """``[service.health]``: how and how often each backend of the service is checked."""

    kind: HealthKind = HealthKind.TCP
    interval: float = 2.0  # seconds from the start of one check to the start of the next
    timeout: float = 1.0  # a check that takes longer fails ("timeout"); at most interval
    rise: int = 2  # consecutive successes that bring a down backend up
    fall: int = 3  # consecutive failures that take an up backend down
    port: int | None = None  # check this port on every backend instead of its own port
    path: str = "/"  # http: the request target
    host: str | None = None  # http: the Host header (default: the backend's address:port)
    expect: tuple[tuple[int, int], ...] = ((200, 399),)  # http: statuses that mean up
    command: tuple[str, ...] = ()  # command: the program (resolved) and its first arguments
    source_ports: tuple[int, int] = (61000, 61999)  # tcp/http: the checks' own source ports
    backend_ports: tuple[tuple[str, int], ...] = ()  # backend name -> its health_port

    def port_for(self, backend: Backend) -> int:
        """The port ``backend`` is checked on: its health_port, else port, else its own."""
        for name, port in self.backend_ports:
            if name == backend.name:
                return port
        return self.port if self.port is not None else backend.port


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    vip: IPAddress
    port: int
    protocol: Protocol
    mode: Mode
    backends: tuple[Backend, ...]
    policy: str = "round_robin"  # a built-in name, "file:/abs/path.py", "module:..." or plugin
    snat_address: IPAddress | None = None
    snat_ports: tuple[int, int] | None = None
    unknown_flow: UnknownFlow = UnknownFlow.RESET
    # [service.policy_options], read-only, validated by building the policy once
    policy_options: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), hash=False)
    policy_fallback: str = "flow_hash"  # when the policy raises: a built-in policy, or "drop"
    health: HealthCheck | None = None  # [service.health]; None: no checks, backends stay up
    on_backend_down: OnBackendDown = OnBackendDown.KEEP  # its flows, once down or removed
    drain_timeout: float = 0.0  # a drained backend's flows are reset after this; 0: never
    offload_scheduler: OffloadScheduler = OffloadScheduler.NFQLB  # mode "offload" only


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds, close to IPVS defaults."""

    tcp: float = 900.0  # established
    tcp_fin: float = 120.0  # after the first FIN
    tcp_close: float = 10.0  # after both FINs or a RST (lingers for retransmissions)
    udp: float = 300.0
    syn: float = 60.0  # handshake not yet complete
    frag: float = 5.0  # how long an out-of-order fragment waits for its first fragment


OFFLOAD_MARK_MASK = 0x0FF00000
"""The default of daemon.offload_mark_mask: the packet mark bits mode "offload" numbers its
backends in (255 of them), away from the bits kube-proxy (0x4000, 0x8000) and most hosts use."""


BULK_MARK_MASK = 0x00000FF0
"""The default of daemon.bulk_mark_mask: the packet mark bits of the headers route
(daemon.bulk = "headers"), away from offload's (OFFLOAD_MARK_MASK) and kube-proxy's (0x4000,
0x8000). A mark lives only from the headers queue's verdict to nfqlb's nftables chain at
priority -250 of the same hook, which clears these bits again."""

BULK_ROUTES = ("headers", "whole")
"""daemon.bulk: how TCP packets over 3960 bytes (GSO packets, jumbo frames) of established
flows are rewritten. "headers": the kernel copies only their headers to nfqlb, which answers
with a mark, and an nftables chain rewrites by that mark (nothing of the payload is copied);
"whole": the packet goes to user space and back (the large-packet queue), as every other
packet."""


OFFLOAD_BINDINGS = ("netlink", "netfilterqueue")
"""How the offload queue is served: nfqlb's own netlink client (verdicts of a wakeup in one
sendmsg; the default, a little less CPU per new flow in the lab) or the NetfilterQueue
binding."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    queue: int = 1
    bypass: bool = True
    mss_clamp: int = 1460  # TCP MSS on SYN and SYN/ACK is lowered to this (small segments on lo)
    sysctls: bool = True  # set ip_forward/accept_local as the modes need, restore on exit
    max_flows: int = 1_000_000  # per worker; at the cap the flow nearest its idle timeout goes
    max_fragments: int = 1024  # out-of-order fragments held at once
    max_fragments_per_source: int = 64  # of those, at most this many from one source address
    queue_maxlen: int = 8192  # kernel queue length (default_queue_maxlen); held fragments
    # occupy slots of it
    large_queue: int | None = None  # queue for packets over 3960 B (default: queue + 10000)
    icmp_echo: IcmpEcho = IcmpEcho.ACCEPT
    offload_queue: int | None = None  # queue of offload's new flows (default: queue + 20000)
    offload_mark_mask: int = OFFLOAD_MARK_MASK  # the packet mark bits offload may use
    offload_binding: str = "netlink"  # the offload queue's: "netlink" | "netfilterqueue"
    workers: int = 1  # worker processes; worker i serves queue + i, large_queue + i, ...
    binding: Binding = Binding.NETLINK  # what serves the main queue
    ecmp: bool = False  # one of several nodes behind a router's ECMP: bypass defaults to false
    withdraw_wait: float = 0.0  # s served after SIGTERM while nfqlb health fails (0: stop now)
    bulk: str = "headers"  # BULK_ROUTES: how large TCP packets of established flows go
    headers_queue: int | None = None  # the headers route's queue (default: queue + 30000)
    bulk_mark_mask: int = BULK_MARK_MASK  # the packet mark bits the headers route may use

    @property
    def large_queue_number(self) -> int:
        return self.large_queue if self.large_queue is not None else (self.queue + 10000) % 65536

    @property
    def offload_queue_number(self) -> int:
        return (self.offload_queue if self.offload_queue is not None
                else (self.queue + 20000) % 65536)

    @property
    def headers_queue_number(self) -> int:
        return (self.headers_queue if self.headers_queue is not None
                else (self.queue + 30000) % 65536)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: where the Prometheus endpoint listens (the table absent: no endpoint)."""

    address: IPAddress = ipaddress.ip_address("127.0.0.1")
    port: int = 9108

    @property
    def listen(self) -> str:
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else \
            f"{self.address}:{self.port}"


def _metrics(source: str, table: Any) -> MetricsConfig | None:
    """``listen = "host:port"`` (IPv6 as ``[addr]:port``), an address literal, no name."""
    if table is None:
        return None
    chk = _Checker(source, "metrics", table, {"listen"})
    text = chk.text("listen", MetricsConfig().listen)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: the port cannot be told apart
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if sep and port.isdigit() else 0
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise chk.fail("listen", f"{text!r} is not an address:port like \"127.0.0.1:9108\" "
                       "(IPv6 as \"[::1]:9108\")")
    if address.is_multicast:
        raise chk.fail("listen", f"{address} is a multicast address")
    return MetricsConfig(address, number)


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    services: tuple[Service, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    metrics: MetricsConfig | None = None  # [metrics]: the Prometheus endpoint, off when absent
    #: the numbers behind the packet marks of the configuration this one replaced by a reload
    #: (:func:`carry_marks`), by (service, backend): offload's and the headers route's, each
    #: backend keeping its own across reloads; empty (a start): configuration order
    offload_numbers: tuple[tuple[tuple[str, str], int], ...] = ()
    bulk_numbers: tuple[tuple[tuple[str, str], int], ...] = ()


_TOP_KEYS = {"daemon", "service", "timeouts", "metrics"}
_DAEMON_KEYS = {
    "queue", "bypass", "mss_clamp", "sysctls", "max_flows", "max_fragments", "large_queue",
    "icmp_echo", "max_fragments_per_source", "queue_maxlen", "offload_queue",
    "offload_mark_mask", "offload_binding", "workers", "binding", "ecmp", "withdraw_wait",
    "bulk", "headers_queue", "bulk_mark_mask",
}
_SERVICE_KEYS = {
    "name", "vip", "port", "protocol", "mode", "snat_address", "snat_ports", "policy", "backend",
    "unknown_flow", "policy_options", "policy_fallback", "health", "on_backend_down",
    "drain_timeout", "offload_scheduler",
}
_BACKEND_KEYS = {"name", "address", "port", "weight", "health_port"}
_HEALTH_KEYS = {
    "kind", "interval", "timeout", "rise", "fall", "port", "path", "host", "expect", "command",
    "source_ports",
}


class _Checker(TableReader):
    """Reads one table with typed getters; every error names ``source`` and the full key."""

    def __init__(self, source: str, prefix: str, table: Any, allowed: set[str]) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(table, Mapping):
            raise ConfigError(source, prefix, f"must be a table, not {type(table).__name__}")
        super().__init__(table)
        for key in table:
            if key not in allowed:
                raise ConfigError(
                    source, self.key(key), f"unknown key (known: {', '.join(sorted(allowed))})"
                )

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def tables(self, name: str) -> list[Any]:
        value = self.table.get(name, [])
        if isinstance(value, Mapping):
            return [value]
        if not isinstance(value, list):
            raise self.fail(name, "must be an array of tables ([[...]])")
        return value


def _port_range(chk: _Checker, name: str) -> tuple[int, int] | None:
    if not chk.has(name):
        return None
    value = chk.table[name]
    if not isinstance(value, str):
        raise chk.fail(name, f"must be a string like \"20000-29999\", not {value!r}")
    parts = value.split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        raise chk.fail(name, f"{value!r} is not a port range like \"20000-29999\"") from None
    if 1 <= hi < lo <= 65535:
        raise chk.fail(name, f"{value!r} is a reversed port range: write \"{hi}-{lo}\"")
    if not (1 <= lo <= hi <= 65535):
        raise chk.fail(name, f"{value!r} is not a port range within 1-65535")
    return lo, hi


def _backend(chk: _Checker, mode: Mode, family: int) -> Backend:
    address = chk.address("address", required=mode is not Mode.LOCAL)
    if address is not None and address.version != family:
        raise chk.fail("address", f"{address} is IPv{address.version}, the VIP is IPv{family}")
    port = chk.integer("port", None, 1, 65535)
    weight = chk.integer("weight", 1, 0, 1_000_000)
    default_name = f"{address}:{port}" if address is not None else f"local:{port}"
    if address is not None and address.version == 6:
        default_name = f"[{address}]:{port}"
    return Backend(name=chk.text("name", default_name), address=address, port=port, weight=weight)


def _service(chk: _Checker) -> Service:
    name = chk.text("name")
    vip = chk.address("vip")
    assert vip is not None
    port = chk.integer("port", None, 1, 65535)
    protocol = chk.choice("protocol", Protocol, "tcp")
    mode = chk.choice("mode", Mode, None)
    snat_address = chk.address("snat_address", required=False)
    snat_ports = _port_range(chk, "snat_ports")
    if mode is Mode.FULLNAT:
        if snat_address is None:
            raise chk.fail("snat_address", "is required in fullnat mode")
        if snat_ports is None:
            raise chk.fail("snat_ports",
                           "is required in fullnat mode (a range like \"20000-29999\")")
        if snat_address.version != vip.version:
            raise chk.fail("snat_address", f"{snat_address} is not of the VIP's family")
    elif mode is Mode.OFFLOAD and snat_ports is None:
        if snat_address is not None and snat_address.version != vip.version:
            raise chk.fail("snat_address", f"{snat_address} is not of the VIP's family")
    elif snat_address is not None or snat_ports is not None:
        bad = "snat_address" if snat_address is not None else "snat_ports"
        where = "fullnat mode (offload takes snat_address only: the kernel picks ports)" \
            if mode is Mode.OFFLOAD else "fullnat mode"
        raise chk.fail(bad, f"only applies in {where}, this service is {mode.value}")
    tables = chk.tables("backend")
    if not tables:
        raise chk.fail("backend", "no backends: add at least one [[service.backend]]")
    backends = tuple(
        _backend(_Checker(chk.source, f"{chk.prefix}.backend[{i}]", t, _BACKEND_KEYS), mode,
                 vip.version)
        for i, t in enumerate(tables)
    )
    seen: set[tuple[IPAddress | None, int]] = set()
    names: set[str] = set()
    for i, b in enumerate(backends):
        if (b.address, b.port) in seen:
            raise chk.fail(f"backend[{i}]", f"duplicate backend {b.name}")
        if b.name in names:
            raise chk.fail(f"backend[{i}].name", f"duplicate backend name {b.name!r}")
        seen.add((b.address, b.port))
        names.add(b.name)
    if not any(b.weight > 0 for b in backends):
        raise chk.fail("backend", "every backend has weight 0: nothing could be chosen")
    _check_loops(chk, mode, vip, port, snat_address, backends)
    unknown_flow = chk.choice("unknown_flow", UnknownFlow, "reset")
    if unknown_flow is UnknownFlow.HASH and mode is Mode.FULLNAT:
        raise chk.fail("unknown_flow", "\"hash\" cannot work in fullnat mode: the source port "
                       "the backend knows the connection by is lost with the table")
    policy, options, fallback = _policy(chk, backends)
    scheduler = chk.choice("offload_scheduler", OffloadScheduler, "nfqlb")
    if mode is Mode.OFFLOAD:
        _check_offload_policy(chk, policy, options, fallback, backends, scheduler)
    elif scheduler is not OffloadScheduler.NFQLB:
        raise chk.fail("offload_scheduler", f"only applies in mode \"offload\", this service "
                       f"is {mode.value}")
    health = _health(chk, tables, backends, protocol, vip, port)
    on_backend_down = chk.choice("on_backend_down", OnBackendDown, "keep")
    drain_timeout = chk.number("drain_timeout", 0.0, 0.0, 1e7)
    return Service(name=name, vip=vip, port=port, protocol=protocol, mode=mode,
                   backends=backends, policy=policy, snat_address=snat_address,
                   snat_ports=snat_ports, unknown_flow=unknown_flow, policy_options=options,
                   policy_fallback=fallback, health=health, on_backend_down=on_backend_down,
                   drain_timeout=drain_timeout, offload_scheduler=scheduler)


def _check_loops(chk: _Checker, mode: Mode, vip: IPAddress, port: int,
                 snat_address: IPAddress | None, backends: tuple[Backend, ...]) -> None:
    """What the host need not be asked about: a backend that is the service itself (its
    packets would come back to nfqlb as new flows), or a fullnat source address that is a
    backend's (the backend would answer itself)."""
    for i, b in enumerate(backends):
        if b.port == port and b.address in (None, vip):
            where = "local backend" if mode is Mode.LOCAL else "backend"
            raise chk.fail(f"backend[{i}]", f"a {where} on the VIP's own address and port "
                           "would loop")
        if snat_address is not None and b.address == snat_address:
            raise chk.fail("snat_address", f"{snat_address} is backend[{i}]'s address: it must "
                           "be an address of this host that the backends reach")


def _policy(chk: _Checker, backends: tuple[Backend, ...]
            ) -> tuple[str, Mapping[str, Any], str]:
    """``policy``, ``policy_options`` and ``policy_fallback``, checked by the policies package
    (which builds the policy and its fallback once): a plugin that cannot be imported or built,
    or an option the policy refuses, is a configuration error naming the key."""
    spec = chk.text("policy", "round_robin")
    options = chk.table.get("policy_options", {})
    if not isinstance(options, Mapping):
        raise chk.fail("policy_options", "must be a table ([service.policy_options])")
    fallback = chk.text("policy_fallback", "flow_hash")
    try:
        return policies.check(spec, options, fallback, backends, Path(chk.source).parent)
    except policies.PolicyOptionError as exc:
        raise chk.fail(f"policy_options.{exc.key}", exc.problem) from None
    except policies.PolicyFallbackError as exc:
        raise chk.fail("policy_fallback", str(exc)) from None
    except PolicyError as exc:
        raise chk.fail("policy", str(exc)) from None


def _check_offload_policy(chk: _Checker, spec: str, options: Mapping[str, Any],
                          fallback: str, backends: tuple[Backend, ...],
                          scheduler: OffloadScheduler) -> None:
    """In offload mode the kernel ends flows and nfqlb never hears of it: a policy that counts
    flows through ``on_flow_closed`` (least_conn, random's power of two choices, such plugins)
    would count every flow open forever, so it is refused here rather than misbalance. With
    ``offload_scheduler = "kernel"`` the policy must also give its choices in advance
    (``schedule``: round_robin, weighted_round_robin, the hash policies with hash = "jhash",
    such plugins)."""
    for key, name, opts in (("policy", spec, options), ("policy_fallback", fallback, {})):
        if name == policies.DROP:
            continue
        built = policies.make_policy(name, backends, opts)
        if key == "policy" and scheduler is OffloadScheduler.KERNEL \
                and not callable(getattr(built, "schedule", None)):
            raise chk.fail(key, f"{name!r} has no schedule(): with offload_scheduler = "
                           "\"kernel\" the kernel plays the choices nfqlb writes in advance: "
                           "in turn (round_robin, weighted_round_robin, a plugin with "
                           "schedule()) or by the kernel's hash of the flow (source_hash, "
                           "flow_hash, maglev with policy_options.hash = \"jhash\"); or keep "
                           "offload_scheduler = \"nfqlb\"")
        if getattr(built, "on_flow_closed", None) is not None:
            raise chk.fail(key, f"{name!r} counts open flows through on_flow_closed(), which "
                           "mode \"offload\" cannot call (the kernel's conntrack ends its "
                           "flows, nfqlb never sees them end): choose a policy without it "
                           "(round_robin, weighted_round_robin, source_hash, maglev, "
                           "flow_hash) or another mode")


# --- health checks: [service.health], [[service.backend]] health_port -----------------------

HEALTH_MAX_INTERVAL_S = 3600.0
HEALTH_MAX_COUNT = 100  # rise and fall
_HEALTH = HealthCheck()  # the defaults (a slotted class holds descriptors, not values)


def _health(chk: _Checker, tables: list[Any], backends: tuple[Backend, ...],
            protocol: Protocol, vip: IPAddress, service_port: int) -> HealthCheck | None:
    """``[service.health]`` and each backend's ``health_port``; None without the table."""
    ports = tuple(
        (b.name, _Checker(chk.source, f"{chk.prefix}.backend[{i}]", t, _BACKEND_KEYS)
         .integer("health_port", None, 1, 65535))
        for i, (t, b) in enumerate(zip(tables, backends, strict=True)) if "health_port" in t)
    if not chk.has("health"):
        if ports:
            i = next(i for i, t in enumerate(tables) if "health_port" in t)
            raise chk.fail(f"backend[{i}].health_port",
                           "only applies with a [service.health] table")
        return None
    h = _Checker(chk.source, chk.key("health"), chk.table["health"], _HEALTH_KEYS)
    kind = h.choice("kind", HealthKind, "tcp")
    interval = h.seconds("interval", _HEALTH.interval)
    if interval > HEALTH_MAX_INTERVAL_S:
        raise h.fail("interval", f"{interval:g} is more than {HEALTH_MAX_INTERVAL_S:g} seconds")
    timeout = h.seconds("timeout", min(_HEALTH.timeout, interval))
    if timeout > interval:
        raise h.fail("timeout", f"{timeout:g} is more than interval ({interval:g}): a check "
                     "must end before the next one starts")
    for name in ("path", "host", "expect"):
        if h.has(name) and kind is not HealthKind.HTTP:
            raise h.fail(name, f"only applies to kind = \"http\", this check is {kind.value}")
    if h.has("command") and kind is not HealthKind.COMMAND:
        raise h.fail("command", f"only applies to kind = \"command\", this check is "
                     f"{kind.value}")
    port = h.integer("port", None, 1, 65535) if h.has("port") else None
    if protocol is Protocol.UDP and kind is not HealthKind.COMMAND and port is None \
            and len(ports) < len(backends):
        raise h.fail("port", f"the service is udp and a {kind.value} check connects over TCP: "
                     "give the backends' TCP port to check (port, or each backend's "
                     "health_port), or use kind = \"command\"")
    source_ports = _port_range(h, "source_ports") or _HEALTH.source_ports
    check = HealthCheck(
        kind=kind, interval=interval, timeout=timeout,
        rise=h.integer("rise", _HEALTH.rise, 1, HEALTH_MAX_COUNT),
        fall=h.integer("fall", _HEALTH.fall, 1, HEALTH_MAX_COUNT),
        port=port, path=_health_path(h), host=_health_host(h), expect=_health_expect(h),
        command=_health_command(h) if kind is HealthKind.COMMAND else (),
        source_ports=source_ports, backend_ports=ports)
    if kind is not HealthKind.COMMAND:
        for i, b in enumerate(backends):
            if b.address in (None, vip) and check.port_for(b) == service_port:
                key = f"backend[{i}].health_port" if b.name in dict(ports) else "port"
                raise chk.fail(key if key != "port" else "health.port",
                               f"would check {vip} port {service_port}, the service itself, "
                               "through nfqlb: check the backend's own port")
    return check


def _is_visible_ascii(text: str) -> bool:
    return all(0x21 <= ord(c) <= 0x7E for c in text)


def _health_path(h: _Checker) -> str:
    path = h.text("path", _HEALTH.path)
    if not path.startswith("/") or not _is_visible_ascii(path):
        raise h.fail("path", f"{path!r} is not a request path like \"/health\" (it starts "
                     "with / and has no spaces or control characters)")
    return path


def _health_host(h: _Checker) -> str | None:
    if not h.has("host"):
        return None
    host = h.text("host")
    if not _is_visible_ascii(host):
        raise h.fail("host", f"{host!r} is not a host name (no spaces or control characters)")
    return host


def _health_expect(h: _Checker) -> tuple[tuple[int, int], ...]:
    """``expect``: statuses like "200-399", "200,204", "200-299,302", or one integer."""
    value = h.get("expect", "200-399")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise h.fail("expect", f"must be a string like \"200-399\" or \"200,204\", "
                     f"not {value!r}")
    ranges = []
    for part in value.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise h.fail("expect", f"{value!r} is not a list of statuses or ranges like "
                         "\"200-399\" or \"200,204\"") from None
        if not 100 <= first <= last <= 599:
            raise h.fail("expect", f"{part.strip()!r} is not a status range within 100-599")
        ranges.append((first, last))
    return tuple(ranges)


def _health_command(h: _Checker) -> tuple[str, ...]:
    """``command``: a string (split like a shell, without one) or a list of strings; the
    program is found now (relative to the configuration file's folder when it holds a /,
    else on PATH) and must be executable. The backend's address and port are added last."""
    value = h.get("command")
    if value is None:
        raise h.fail("command", "is required with kind = \"command\" (a program and its "
                     "arguments; the backend's address and port are added)")
    try:
        argv = shlex.split(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise h.fail("command", f"{value!r}: {exc}") from None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise h.fail("command", f"must be a string or a non-empty list of strings, "
                     f"not {value!r}")
    program = argv[0]
    if "/" in program:
        path = Path(h.source).parent / program  # an absolute program stays as it is
        if not path.is_file() or not os.access(path, os.X_OK):
            raise h.fail("command", f"{path} is not an executable file")
        found = str(path.absolute())
    else:
        which = shutil.which(program)
        if which is None:
            raise h.fail("command", f"no program {program!r} on PATH")
        found = which
    return (found, *argv[1:])


def _check_health_ports(source: str, services: list[Service]) -> None:
    """The checks' source ports must be nobody's pool port: a fullnat reply to such a port
    would be taken for a check's and passed by the rules (rules/health.rules)."""
    for i, svc in enumerate(services):
        if svc.health is None or svc.health.kind is HealthKind.COMMAND:
            continue
        a, b = svc.health.source_ports
        for j, other in enumerate(services):
            if other.snat_ports is None:
                continue
            c, d = other.snat_ports
            if a <= d and c <= b:
                where = "its" if i == j else f"service[{j}]'s"
                raise ConfigError(source, f"service[{i}].health.source_ports",
                                  f"{a}-{b} overlaps {where} snat_ports {c}-{d}: the checks' "
                                  "source ports must be disjoint from every port pool")


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    top = _Checker(source, "", data, _TOP_KEYS)
    d = _Checker(source, "daemon", data.get("daemon", {}), _DAEMON_KEYS)
    max_fragments = d.integer("max_fragments", 1024, 0, 1_000_000)
    ecmp = d.flag("ecmp", False)
    daemon = DaemonConfig(
        queue=d.integer("queue", 1, 0, 65535),
        bypass=d.flag("bypass", not ecmp),  # behind ECMP a dead node drops packets
        mss_clamp=d.integer("mss_clamp", 1460, 536, 3900),
        sysctls=d.flag("sysctls", True),
        max_flows=d.integer("max_flows", 1_000_000, 1, 100_000_000),
        max_fragments=max_fragments,
        max_fragments_per_source=d.integer("max_fragments_per_source",
                                           min(64, max(max_fragments, 1)), 1, 1_000_000),
        queue_maxlen=d.integer("queue_maxlen", default_queue_maxlen(max_fragments), 1,
                               10_000_000),
        large_queue=d.integer("large_queue", None, 0, 65535) if d.has("large_queue") else None,
        icmp_echo=d.choice("icmp_echo", IcmpEcho, "accept"),
        offload_queue=d.integer("offload_queue", None, 0, 65535) if d.has("offload_queue")
        else None,
        offload_mark_mask=d.integer("offload_mark_mask", OFFLOAD_MARK_MASK, 1, 0xFFFFFFFF),
        offload_binding=d.text("offload_binding", "netlink"),
        workers=d.integer("workers", 1, 1, MAX_WORKERS),
        binding=d.choice("binding", Binding, "netlink"),
        ecmp=ecmp,
        withdraw_wait=d.number("withdraw_wait", 0.0, 0.0, 3600.0),
        bulk=d.text("bulk", "headers"),
        headers_queue=d.integer("headers_queue", None, 0, 65535) if d.has("headers_queue")
        else None,
        bulk_mark_mask=d.integer("bulk_mark_mask", BULK_MARK_MASK, 1, 0xFFFFFFFF),
    )
    if daemon.bulk not in BULK_ROUTES:
        raise d.fail("bulk", f"{daemon.bulk!r} is not one of "
                     f"{', '.join(map(repr, BULK_ROUTES))}")
    if daemon.offload_binding not in OFFLOAD_BINDINGS:
        raise d.fail("offload_binding", f"{daemon.offload_binding!r} is not one of "
                     f"{', '.join(map(repr, OFFLOAD_BINDINGS))}")
    if daemon.large_queue_number == daemon.queue:
        raise d.fail("large_queue", f"must differ from queue ({daemon.queue})")
    if daemon.offload_queue_number in (daemon.queue, daemon.large_queue_number):
        raise d.fail("offload_queue", f"{daemon.offload_queue_number} must differ from queue "
                     f"({daemon.queue}) and large_queue ({daemon.large_queue_number})")
    if daemon.headers_queue_number in (daemon.queue, daemon.large_queue_number,
                                       daemon.offload_queue_number):
        raise d.fail("headers_queue", f"{daemon.headers_queue_number} must differ from queue "
                     f"({daemon.queue}), large_queue ({daemon.large_queue_number}) and "
                     f"offload_queue ({daemon.offload_queue_number})")
    for key, mask, example, what in (
            ("offload_mark_mask", daemon.offload_mark_mask, OFFLOAD_MARK_MASK,
             "offload numbers its backends within it"),
            ("bulk_mark_mask", daemon.bulk_mark_mask, BULK_MARK_MASK,
             "the headers route numbers its backends within it")):
        low = mask & -mask
        if (mask + low) & mask:
            raise d.fail(key, f"{mask:#x} is not one run of bits (like {example:#010x}): "
                         f"{what}")
    _check_queue_room(d, daemon)
    t = _Checker(source, "timeouts", data.get("timeouts", {}), set(Timeouts.__slots__))
    base = Timeouts()
    timeouts = Timeouts(**{k: t.seconds(k, getattr(base, k)) for k in Timeouts.__slots__})
    services: list[Service] = []
    for i, table in enumerate(top.tables("service")):
        svc = _service(_Checker(source, f"service[{i}]", table, _SERVICE_KEYS))
        for j, other in enumerate(services):
            if other.name == svc.name:
                raise ConfigError(source, f"service[{i}].name",
                                  f"duplicate service name {svc.name!r} (also service[{j}])")
            if (other.vip, other.port, other.protocol) == (svc.vip, svc.port, svc.protocol):
                raise ConfigError(
                    source, f"service[{i}]",
                    f"duplicate service {svc.vip}:{svc.port}/{svc.protocol.name.lower()} "
                    f"(also service[{j}] {other.name!r})")
            _check_pools(source, i, svc, j, other)
        services.append(svc)
    if not services:
        raise ConfigError(source, "service", "no services: add at least one [[service]]")
    _check_health_ports(source, services)
    config = Config(source=source, daemon=daemon, services=tuple(services), timeouts=timeouts,
                    metrics=_metrics(source, data.get("metrics")))
    check_workers(config, "daemon.workers")
    _check_offload_marks(source, daemon, services)
    _check_bulk_marks(source, daemon, services)
    return config


def config_warnings(config: Config) -> list[str]:
    """What ``check`` and ``run`` warn about in a configuration they accept, one line each."""
    out = []
    if config.daemon.ecmp and config.daemon.bypass:
        out.append(f"{config.source}: daemon.bypass: true behind ECMP (daemon.ecmp): a node "
                   "that dies leaves rules that pass packets unrewritten while the router "
                   "still sends it traffic (backend replies leave with the backend's address "
                   "and clients reset them); without it they are dropped and retransmitted "
                   "once the speaker withdraws the route")
    return out


# --- several workers ------------------------------------------------------------------------

MAX_WORKERS = 64


def check_workers(config: Config, key: str) -> None:
    """The queues of ``config.daemon.workers`` workers fit (``queue`` .. ``queue + workers -
    1`` and the same number of large-packet queues, disjoint), and every fullnat pool has a
    port for each worker. ``key`` names what set the number (``daemon.workers``, ``--queue``)."""
    d = config.daemon
    n = d.workers
    if n == 1:
        return
    q, large = d.queue, d.large_queue_number
    if q + n - 1 > 65535 or large + n - 1 > 65535:
        raise ConfigError(config.source, key, f"{n} workers need queues {q}-{q + n - 1} and "
                          f"large-packet queues {large}-{large + n - 1}: beyond 65535")
    if q <= large + n - 1 and large <= q + n - 1:
        raise ConfigError(config.source, "daemon.large_queue",
                          f"the large-packet queues {large}-{large + n - 1} overlap the "
                          f"queues {q}-{q + n - 1} of {n} workers")
    if any(s.mode is Mode.OFFLOAD for s in config.services):
        o = d.offload_queue_number
        if o + n - 1 > 65535 or any(o <= x + n - 1 and x <= o + n - 1 for x in (q, large)):
            raise ConfigError(config.source, "daemon.offload_queue",
                              f"the offload queues {o}-{o + n - 1} of {n} workers overlap the "
                              f"queues {q}-{q + n - 1} or {large}-{large + n - 1}, or pass "
                              f"65535")
    if d.bulk == "headers":
        h = d.headers_queue_number
        others = (q, large, d.offload_queue_number)
        if h + n - 1 > 65535 or any(h <= x + n - 1 and x <= h + n - 1 for x in others):
            raise ConfigError(config.source, "daemon.headers_queue",
                              f"the headers queues {h}-{h + n - 1} of {n} workers overlap the "
                              f"queues {q}-{q + n - 1}, {large}-{large + n - 1} or the offload "
                              f"queues, or pass 65535")
    for i, svc in enumerate(config.services):
        if svc.snat_ports is not None and svc.snat_ports[1] - svc.snat_ports[0] + 1 < n:
            raise ConfigError(config.source, f"service[{i}].snat_ports",
                              f"{svc.snat_ports[0]}-{svc.snat_ports[1]} has fewer ports than "
                              f"the {n} workers it is shared by ({key})")


def worker_ports(ports: tuple[int, int], worker: int, workers: int) -> tuple[int, int]:
    """Worker ``worker``'s share of a fullnat pool: ``workers`` contiguous ranges, the last
    one taking the remainder. Replies come back to a port of the pool, so the port range
    tells which worker owns a reply (rules.py steers by it)."""
    lo, hi = ports
    size = (hi - lo + 1) // workers
    first = lo + worker * size
    return first, (hi if worker == workers - 1 else first + size - 1)


def with_workers(config: Config, queue: int, workers: int, key: str = "--queue") -> Config:
    """``config`` served on queues ``queue`` .. ``queue + workers - 1`` (``--queue 1-4``);
    checked as the file's own setting is."""
    daemon = replace(config.daemon, queue=queue, workers=workers)
    if daemon.large_queue_number == queue:
        raise ConfigError(config.source, "daemon.large_queue", f"must differ from the queue "
                          f"served ({queue})")
    out = replace(config, daemon=daemon)
    check_workers(out, key)
    return out


def for_worker(config: Config, worker: int) -> Config:
    """What worker ``worker`` of ``config.daemon.workers`` serves: its own share of every
    fullnat pool (a flow's port tells its worker), the rest as configured."""
    n = config.daemon.workers
    if n == 1:
        return config
    services = tuple(replace(s, snat_ports=worker_ports(s.snat_ports, worker, n))
                     if s.snat_ports is not None else s for s in config.services)
    return replace(config, services=services)


Numbers = tuple[tuple[tuple[str, str], int], ...]


def _numbered(keys: list[tuple[str, str]], running: Numbers, room: int
              ) -> dict[tuple[str, str], int]:
    """A number from 1 for each key: the one it has in ``running`` (the configuration a
    reload replaces) if any; for a new key, the lowest that no key of ``running`` holds (a
    number freed by this very reload stays unused until the next, while a backend it removed
    may have packets in flight under it), then the lowest free one up to ``room``."""
    was = dict(running)
    out = {k: was[k] for k in keys if k in was and was[k] <= room}  # (a narrower mask)
    taken = set(out.values())
    held = taken | set(was.values())
    for k in keys:
        if k in out:
            continue
        n = next((i for i in range(1, room + 1) if i not in held), None)
        if n is None:
            n = next((i for i in range(1, room + 1) if i not in taken), len(taken) + 1)
        out[k] = n
        taken.add(n)
        held.add(n)
    return out


def _mark_room(mask: int) -> int:
    return mask >> ((mask & -mask).bit_length() - 1)


def offload_numbers(daemon: DaemonConfig, services: tuple[Service, ...] | list[Service],
                    running: Numbers = ()) -> dict[tuple[str, str], int]:
    """:func:`offload_marks` before the shift: 1, 2, 3... in configuration order, or as
    :func:`carry_marks` keeps them."""
    keys = [(svc.name, b.name) for svc in services if svc.mode is Mode.OFFLOAD
            for b in svc.backends]
    return _numbered(keys, running, _mark_room(daemon.offload_mark_mask))


def offload_marks(daemon: DaemonConfig, services: tuple[Service, ...] | list[Service],
                  running: Numbers = ()) -> dict[tuple[str, str], int]:
    """The packet mark of each offload backend, by (service name, backend name): 1, 2, 3...
    shifted into daemon.offload_mark_mask, in configuration order, except that a reload keeps
    each backend's number (``running``: ``Config.offload_numbers``, see :func:`carry_marks`).
    The rules DNAT by it and the offload decider sets it."""
    mask = daemon.offload_mark_mask
    shift = (mask & -mask).bit_length() - 1
    return {k: n << shift for k, n in offload_numbers(daemon, services, running).items()}


def _check_offload_marks(source: str, daemon: DaemonConfig, services: list[Service]) -> None:
    mask = daemon.offload_mark_mask
    room = mask >> ((mask & -mask).bit_length() - 1)
    n = len(offload_marks(daemon, services))
    if n > room:
        raise ConfigError(source, "daemon.offload_mark_mask",
                          f"{mask:#x} numbers at most {room} offload backends, the services "
                          f"have {n}: use a wider mask")


def bulk_numbers(daemon: DaemonConfig, services: tuple[Service, ...] | list[Service],
                 running: Numbers = ()) -> dict[tuple[str, str], int]:
    """:func:`bulk_marks`' pairs by number k (marks 2k and 2k + 1): 1, 2, 3... in
    configuration order, or as :func:`carry_marks` keeps them."""
    if daemon.bulk != "headers":
        return {}
    keys = [(svc.name, b.name) for svc in services
            if svc.protocol is Protocol.TCP and svc.mode is not Mode.OFFLOAD
            for b in svc.backends]
    return _numbered(keys, running, (_mark_room(daemon.bulk_mark_mask) - 1) // 2)


def bulk_marks(daemon: DaemonConfig, services: tuple[Service, ...] | list[Service],
               running: Numbers = ()) -> dict[tuple[str, str], tuple[int, int]]:
    """The headers route's marks (daemon.bulk = "headers") of each backend of a TCP service
    (not offload), by (service name, backend name): (toward the backend, its replies), 2 and
    3, 4 and 5... shifted into daemon.bulk_mark_mask, in configuration order except that a
    reload keeps each backend's pair (``running``: ``Config.bulk_numbers``); 1 is
    :func:`bulk_whole`. Empty with daemon.bulk = "whole". The nftables chain rewrites a
    packet of each mark as the engine would (rules.py renders it from these numbers; a
    fullnat flow's own addresses and ports come from map elements nfqlb adds per flow)."""
    mask = daemon.bulk_mark_mask
    shift = (mask & -mask).bit_length() - 1
    return {k: ((2 * n) << shift, (2 * n + 1) << shift)
            for k, n in bulk_numbers(daemon, services, running).items()}


def mark_numbers(config: Config) -> dict[str, list[list[str | int]]]:
    """The numbers behind ``config``'s marks, as ``nfqlb status --json`` says them under
    ``daemon.mark_numbers``: ``{"offload": [[service, backend, n], ...], "bulk": [...]}``."""
    d = config.daemon
    return {"offload": [[s, b, n] for (s, b), n in offload_numbers(
                d, config.services, config.offload_numbers).items()],
            "bulk": [[s, b, n] for (s, b), n in bulk_numbers(
                d, config.services, config.bulk_numbers).items()]}


def with_mark_numbers(config: Config, said: Any) -> Config:
    """``config`` numbered as a running daemon whose status said ``said`` (its
    ``daemon.mark_numbers``): as that daemon would number it on a reload. Anything else said
    (an older daemon's status without them): ``config`` as it is."""
    out = {}
    for kind in ("offload", "bulk"):
        rows = said.get(kind) if isinstance(said, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
                and isinstance(r[1], str) and type(r[2]) is int and r[2] > 0 for r in rows):
            return config
        out[kind] = tuple(((r[0], r[1]), r[2]) for r in rows)
    return replace(config, offload_numbers=out["offload"], bulk_numbers=out["bulk"])


def carry_marks(running: Config, new: Config) -> Config:
    """``new`` (a reload of ``running``) keeping the numbers of ``running``'s marks: a backend
    keeps its offload mark and its headers-route marks, a new one gets a number no backend of
    ``running`` had. So a reload that adds a backend before others renumbers nothing: with
    several workers, which take a reload one after the other while the rules (and nfqlb's
    nftables table) change once, every mark means the same backend throughout. Each process
    (the supervisor, each worker) carries its own from the same running configuration, so
    they agree. ``nfqlb rules`` numbers a file in configuration order; ``--apply`` takes a
    running daemon's numbers from its status (``daemon.mark_numbers``)."""
    d = running.daemon
    return replace(new, offload_numbers=tuple(offload_numbers(
                       d, running.services, running.offload_numbers).items()),
                   bulk_numbers=tuple(bulk_numbers(
                       d, running.services, running.bulk_numbers).items()))


def bulk_whole(daemon: DaemonConfig) -> int:
    """The mark of a packet the headers route sends on whole (``NF_REPEAT``: the rules then
    queue it to the large-packet queue): the lowest of daemon.bulk_mark_mask's numbers."""
    mask = daemon.bulk_mark_mask
    return mask & -mask


def _check_bulk_marks(source: str, daemon: DaemonConfig, services: list[Service]) -> None:
    mask = daemon.bulk_mark_mask
    room = mask >> ((mask & -mask).bit_length() - 1)
    n = 2 * len(bulk_marks(daemon, services)) + 1
    if n > room:
        raise ConfigError(source, "daemon.bulk_mark_mask",
                          f"{mask:#x} numbers at most {room} marks, the headers route needs "
                          f"{n} (two per backend of a TCP service, and one): "
                          "use a wider mask, or daemon.bulk = \"whole\"")


QUEUE_ROOM = 4
"""daemon.queue_maxlen must be at least this many times daemon.max_fragments (and that plus
QUEUE_MIN_FREE): a held fragment has no verdict yet and keeps its slot of the kernel queue, so
a queue only as long as the fragments it may hold is full, and drops everything else, as soon
as the fragment buffer is."""
QUEUE_MIN_FREE = 256


def default_queue_maxlen(max_fragments: int) -> int:
    """8192, or eight times max_fragments when that is more."""
    return max(8192, 8 * max_fragments)


def _check_queue_room(d: _Checker, daemon: DaemonConfig) -> None:
    """queue_maxlen comfortably above max_fragments; max_fragments_per_source within it."""
    if daemon.max_fragments_per_source > max(daemon.max_fragments, 1):
        raise d.fail("max_fragments_per_source",
                     f"{daemon.max_fragments_per_source} is more than max_fragments "
                     f"({daemon.max_fragments})")
    least = max(QUEUE_ROOM * daemon.max_fragments, daemon.max_fragments + QUEUE_MIN_FREE)
    if daemon.queue_maxlen < least:
        raise d.fail("queue_maxlen",
                     f"{daemon.queue_maxlen} leaves too little room above max_fragments "
                     f"({daemon.max_fragments}): held fragments keep their queue slots; "
                     f"use at least {least}")


def _check_pools(source: str, i: int, svc: Service, j: int, other: Service) -> None:
    """Two fullnat services may share a port pool exactly, but not overlap partly."""
    if svc.snat_ports is None or other.snat_ports is None:
        return
    if (svc.snat_address, svc.protocol) != (other.snat_address, other.protocol):
        return
    if svc.snat_ports == other.snat_ports:
        return
    (a, b), (c, d) = svc.snat_ports, other.snat_ports
    if a <= d and c <= b:
        raise ConfigError(source, f"service[{i}].snat_ports",
                          f"{a}-{b} overlaps service[{j}]'s {c}-{d} on {svc.snat_address}; "
                          "use the same range (shared pool) or disjoint ranges")


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file."""
    p = Path(path)
    source = str(p)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "no such file") from None
    except OSError as exc:
        raise ConfigError(source, "(file)", exc.strerror or str(exc)) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "(file)", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", str(exc)) from None
    return parse_config(data, source)


def find_config(explicit: str | None) -> Path:
    """The config path: the one given, else ./nfqlb.toml, else /etc/nfqlb/nfqlb.toml."""
    if explicit:
        return Path(explicit)
    for p in DEFAULT_PATHS:
        if p.exists():
            return p
    raise ConfigError(str(DEFAULT_PATHS[0]), "(file)",
                      "no such file (nor /etc/nfqlb/nfqlb.toml); pass --config")
