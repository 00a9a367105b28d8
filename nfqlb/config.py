"""TOML configuration -> frozen dataclasses, with every validation in one place.

A bad configuration raises :class:`ConfigError` naming the file, the key (for example
``service[0].backend[1].port``) and the problem; nothing else in nfqlb validates user input.
A service's policy is checked by the policies package (``policies.check``); its errors are
reported here under the key they concern. The value types the dataclasses hold (``Backend``,
``Mode``, ``Protocol``, ``IPAddress``) live in :mod:`nfqlb.values` and are re-exported.
"""

from __future__ import annotations

import enum
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfqlb import policies
from nfqlb.errors import ConfigError, PolicyError
from nfqlb.typed import TableReader
from nfqlb.values import Backend, IPAddress, Mode, Protocol

__all__ = [
    "DEFAULT_PATHS", "Config", "DaemonConfig", "IcmpEcho", "OnBackendDown", "Service", "Timeouts",
    "UnknownFlow", "find_config", "load_config", "parse_config",
]

DEFAULT_PATHS = (Path("nfqlb.toml"), Path("/etc/nfqlb/nfqlb.toml"))


class OnBackendDown(enum.Enum):
    """What becomes of a backend's flows when it goes down or is removed by a reload."""

    KEEP = "keep"  # they carry on (as IPVS does); the backend gets no new flows
    RESET = "reset"  # both ends get a RST (TCP) and the flows leave the table


class UnknownFlow(enum.Enum):
    """What to do with a TCP packet to a VIP that is not a SYN and matches no flow."""

    DROP = "drop"  # silently: the client retries until it gives up
    RESET = "reset"  # answer the client with a RST: it learns at once (what IPVS hosts do)
    HASH = "hash"  # adopt the flow on a backend chosen by a consistent hash of the flow


class IcmpEcho(enum.Enum):
    ACCEPT = "accept"  # echo requests to a VIP go on to the kernel (it answers if it owns the VIP)
    DROP = "drop"


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
    on_backend_down: OnBackendDown = OnBackendDown.KEEP
    drain_timeout: float = 0.0  # a drained backend's flows are reset after this; 0: never


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds, close to IPVS defaults."""

    tcp: float = 900.0  # established
    tcp_fin: float = 120.0  # after the first FIN
    tcp_close: float = 10.0  # after both FINs or a RST (lingers for retransmissions)
    udp: float = 300.0
    syn: float = 60.0  # handshake not yet complete
    frag: float = 5.0  # how long an out-of-order fragment waits for its first fragment


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

    @property
    def large_queue_number(self) -> int:
        return self.large_queue if self.large_queue is not None else (self.queue + 10000) % 65536


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    services: tuple[Service, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)


_TOP_KEYS = {"daemon", "service", "timeouts"}
_DAEMON_KEYS = {
    "queue", "bypass", "mss_clamp", "sysctls", "max_flows", "max_fragments", "large_queue",
    "icmp_echo", "max_fragments_per_source", "queue_maxlen",
}
_SERVICE_KEYS = {
    "name", "vip", "port", "protocol", "mode", "snat_address", "snat_ports", "policy", "backend",
    "unknown_flow", "policy_options", "policy_fallback", "on_backend_down", "drain_timeout",
}
_BACKEND_KEYS = {"name", "address", "port", "weight"}


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
    elif snat_address is not None or snat_ports is not None:
        bad = "snat_address" if snat_address is not None else "snat_ports"
        raise chk.fail(bad, f"only applies in fullnat mode, this service is {mode.value}")
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
    on_backend_down = chk.choice("on_backend_down", OnBackendDown, "keep")
    drain_timeout = chk.number("drain_timeout", 0.0, 0.0, 1e7)
    return Service(name=name, vip=vip, port=port, protocol=protocol, mode=mode,
                   backends=backends, policy=policy, snat_address=snat_address,
                   snat_ports=snat_ports, unknown_flow=unknown_flow, policy_options=options,
                   policy_fallback=fallback, on_backend_down=on_backend_down,
                   drain_timeout=drain_timeout)


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


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    top = _Checker(source, "", data, _TOP_KEYS)
    d = _Checker(source, "daemon", data.get("daemon", {}), _DAEMON_KEYS)
    max_fragments = d.integer("max_fragments", 1024, 0, 1_000_000)
    daemon = DaemonConfig(
        queue=d.integer("queue", 1, 0, 65535),
        bypass=d.flag("bypass", True),
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
    )
    if daemon.large_queue_number == daemon.queue:
        raise d.fail("large_queue", f"must differ from queue ({daemon.queue})")
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
    return Config(source=source, daemon=daemon, services=tuple(services), timeouts=timeouts)


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
