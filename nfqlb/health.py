"""What the health checker checks, and when a backend counts as up: no I/O here.

:func:`targets` turns a configuration into one :class:`Target` per backend of every service
with a ``[service.health]`` table: the address to check (the backend's own, or the VIP for a
local-mode backend without one: it listens on this host, where the VIP is an address), the
port (``health_port``, else ``port``, else the backend's) and the check itself. Targets are
keyed by (service, backend) names, which is how a reload tells a backend that stays from one
that comes or goes.

:class:`BackendHealth` is a backend's up/down state with HAProxy's and keepalived's
hysteresis, as a table keyed by (state, result)::

    state  result   counters                          next state
    up     success  failures = 0                      up
    up     failure  failures += 1                     down when failures == fall
    down   success  successes += 1                    up when successes == rise
    down   failure  successes = 0                     down

A backend starts up, so that a start or a reload does not refuse traffic while the first
checks run (IPVS with keepalived behaves the same way; HAProxy's ``init-state up``); a dead
one is down after ``fall`` checks, ``fall x interval`` seconds at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from nfqlb.config import Config, HealthCheck, HealthKind, Service
from nfqlb.values import Backend, IPAddress

__all__ = ["BackendHealth", "Target", "describe_address", "targets"]


@dataclass(frozen=True, slots=True)
class Target:
    """One backend of one service, as the checker sees it."""

    service: str
    backend: str
    address: IPAddress
    port: int
    check: HealthCheck

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.backend)

    @property
    def endpoint(self) -> str:
        """``198.18.1.2:8080`` / ``[2001:db8::2]:8080``."""
        return f"{describe_address(self.address)}:{self.port}"

    @property
    def http_host(self) -> str:
        """The Host header of an http check: ``host``, else the address and port checked."""
        if self.check.host is not None:
            return self.check.host
        return describe_address(self.address) if self.port == 80 else self.endpoint

    @property
    def argv(self) -> tuple[str, ...]:
        """A command check's program and arguments, the address and port added last (as
        keepalived's MISC_CHECK scripts are usually written)."""
        return (*self.check.command, str(self.address), str(self.port))

    @property
    def uses_source_ports(self) -> bool:
        """The check's connections leave from ``source_ports`` (tcp and http: nfqlb opens
        them; a command's sockets are its own)."""
        return self.check.kind is not HealthKind.COMMAND


def describe_address(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def target_of(service: Service, backend: Backend) -> Target | None:
    if service.health is None:
        return None
    address = backend.address if backend.address is not None else service.vip
    return Target(service.name, backend.name, address, service.health.port_for(backend),
                  service.health)


def targets(config: Config) -> dict[tuple[str, str], Target]:
    """Every backend to check, by (service name, backend name), in configuration order."""
    found: dict[tuple[str, str], Target] = {}
    for svc in config.services:
        for b in svc.backends:
            t = target_of(svc, b)
            if t is not None:
                found[t.key] = t
    return found


class BackendHealth:
    """One backend's state: up or down, the consecutive results that count toward a change,
    and the last result."""

    __slots__ = ("up", "successes", "failures", "last", "latency", "checks")

    def __init__(self) -> None:
        self.up = True
        self.successes = 0  # consecutive, while down
        self.failures = 0  # consecutive, while up
        self.last = ""  # the last result: "status 200", "timeout", ...
        self.latency: float | None = None  # of the last successful check, seconds
        self.checks = 0

    def record(self, ok: bool, result: str, rise: int, fall: int,
               latency: float | None = None) -> bool:
        """Count one check's result; True when the backend changed state."""
        self.checks += 1
        self.last = result
        if ok:
            self.latency = latency
        if self.up:
            self.failures = 0 if ok else self.failures + 1
            if self.failures >= fall:
                self.up, self.failures, self.successes = False, 0, 0
                return True
        else:
            self.successes = self.successes + 1 if ok else 0
            if self.successes >= rise:
                self.up, self.failures, self.successes = True, 0, 0
                return True
        return False
