"""The services at run time: what health checks, draining and reload will change.

A :class:`ServiceRuntime` is one configured service while the engine runs: its policy and
the fallback for when the policy fails (the failure contained: counted, logged at a rate
limit, never raised), its fullnat port pool, and per backend the figures (flows placed and
open, packets, bytes) kept as they change: a flow holds its backend's ``BackendTotals`` and
every packet adds to it, so status never walks the table. :class:`Services` holds them all,
indexed the two ways the packet path asks:

- by VIP and port (``by_vip[protocol][vip packed + port]``), for a packet to a service;
- by backend address and port (``by_backend[protocol][...]``), the hash-adoption index: the
  services with ``unknown_flow = "hash"`` that a packet from that backend may belong to.

The engine decides a flow's life cycle; the runtime answers its questions about a service
(which backend for this new flow, which port, what to do now that a flow ended). Nothing
here sees packet bytes beyond the keys.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from nfqlb.config import Config, Service, UnknownFlow
from nfqlb.counters import Counters
from nfqlb.policies import DROP as POLICY_DROP
from nfqlb.policies import FlowKey, Policy, describe_failure, hash_choice, make_policy
from nfqlb.ratelog import RateLimitedLog
from nfqlb.snat import PortPool
from nfqlb.values import Backend, Mode
from nfqlb.wire.checksum import U16
from nfqlb.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from nfqlb.flows import Flow

#: A policy hook (choose, on_flow_closed) that takes this long or longer is counted
#: ``policy_slow`` and logged: it ran on the packet path while the queue waited.
SLOW_POLICY_S = 0.001


class BackendTotals:
    """A backend's figures since start, kept as they change (never a walk of the table):
    flows placed, flows open now, packets and bytes of its flows (both directions)."""

    __slots__ = ("flows", "active", "packets", "bytes")

    def __init__(self) -> None:
        self.flows = 0
        self.active = 0
        self.packets = 0
        self.bytes = 0

    def as_dict(self) -> dict[str, int]:
        return {"flows": self.flows, "active": self.active, "packets": self.packets,
                "bytes": self.bytes}


class ServiceRuntime:
    """One service while the engine runs: policy, fallback, pool, per-backend figures."""

    __slots__ = ("service", "name", "local", "policy", "fallback", "pool", "snat_address",
                 "vip_endpoint", "endpoints", "backend_set", "totals", "refused", "policy_errors",
                 "_address", "_counters", "_log", "_clock", "policy_slow", "slowest")

    def __init__(self, service: Service, policy: Policy, fallback: Policy | None,
                 pool: PortPool | None, counters: Counters, log: RateLimitedLog,
                 clock: Callable[[], float] | None = None) -> None:
        self.service = service
        self.name = service.name
        self.local = service.mode is Mode.LOCAL
        self.policy = policy
        self.fallback = fallback  # None: a flow the policy fails on is dropped
        self.pool = pool
        self.snat_address = service.snat_address.packed if service.snat_address else b""
        self.vip_endpoint = endpoint(service.vip.packed, service.port)
        self._address = type(service.vip)  # IPv4Address or IPv6Address, for client addresses
        #: backend name -> packed address + port of the packets sent to it (the VIP's address for
        #: a local backend without one)
        self.endpoints = {b.name: endpoint((b.address or service.vip).packed, b.port)
                          for b in service.backends}
        self.backend_set = frozenset(service.backends)  # what choose may return
        self.totals = {b.name: BackendTotals() for b in service.backends}
        self.refused = 0  # new flows refused, for any reason
        self.policy_errors = 0  # choose/on_flow_closed raised, or choose returned a stranger
        self._counters = counters
        self._log = log
        self._clock = clock  # a real clock (seconds) to time the policy's hooks; None: untimed
        self.policy_slow = 0  # hook calls of SLOW_POLICY_S or longer
        self.slowest = 0.0  # the longest hook call timed, in seconds

    # ------------------------------------------------------------ choosing

    def flow_key(self, key: bytes) -> FlowKey:
        """What a policy sees of the flow ``key`` (``client | VIP | client port | port``, as
        the client sends it): the VIP's address object is the service's own, only the
        client's is built."""
        alen = len(key) // 2 - 2
        return FlowKey(self.service.protocol.value, self._address(key[:alen]),
                       key[-4] << 8 | key[-3], self.service.vip, self.service.port)

    def choose(self, fkey: FlowKey, now: float) -> tuple[Backend | None, Policy | None, str]:
        """(backend, the policy that chose it, drop reason if none). A failing policy is
        contained: counted, logged at a rate limit, and the fallback (if any) chooses. With a
        clock, the call is timed (see ``timed``)."""
        clock = self._clock
        started = clock() if clock is not None else 0.0
        failure: BaseException | None = None
        try:
            backend = self.policy.choose(fkey, now)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the plugin's
            backend, failure = None, exc
        if clock is not None:
            self.timed("choose", clock() - started, now)
        if failure is None:
            try:
                valid = backend is None or backend in self.backend_set
            except TypeError:  # unhashable
                valid = False
            if valid:
                return backend, self.policy, "no_backend"
            problem = f"returned {backend!r:.80}, not one of the service's backends"
        else:
            problem = f"raised {describe_failure(failure)} in choose()"
            del failure
        self.policy_errors += 1
        self._counters.event("policy_failure")
        s = self.service
        fallback = self.fallback
        self._log.warning(f"policy:{s.name}", now, "service %s: policy %s %s; flow %s:%d -> %s "
                          "(%d failures so far)", s.name, s.policy, problem, fkey.src,
                          fkey.sport, f"fallback {s.policy_fallback}" if fallback else "dropped",
                          self.policy_errors)
        if fallback is None:
            return None, None, "policy_error"
        self._counters.event("policy_fallback")
        return fallback.choose(fkey, now), fallback, "no_backend"

    def timed(self, hook: str, took: float, now: float) -> None:
        """Record that the policy's ``hook`` took ``took`` seconds: keep the longest; at
        SLOW_POLICY_S or over, count it ``policy_slow`` and log it at a rate limit."""
        if took > self.slowest:
            self.slowest = took
        if took < SLOW_POLICY_S:
            return
        self.policy_slow += 1
        self._counters.event("policy_slow")
        self._log.warning(f"policy_slow:{self.name}", now, "service %s: policy %s took %.1f ms "
                          "in %s() (%d calls of %g ms or more so far, the longest %.1f ms)",
                          self.name, self.service.policy, took * 1e3, hook, self.policy_slow,
                          SLOW_POLICY_S * 1e3, self.slowest * 1e3)

    def hash_choice(self, fkey: FlowKey) -> Backend | None:
        """The backend ``unknown_flow = "hash"`` adopts ``fkey`` on (the same on every node and
        after every restart, while the backend set is the same)."""
        return hash_choice(fkey, self.service.backends)

    def take_port(self) -> int | None:
        """A source port for a new fullnat flow (0 when the service does not rewrite the
        source); None when the pool is empty."""
        return 0 if self.pool is None else self.pool.take()

    def refuse_no_port(self, now: float) -> None:
        """Count and log (at a rate limit) a flow refused for an empty port pool."""
        assert self.pool is not None
        self.refused += 1
        self._log.warning("snat_exhausted", now, "service %s: snat port pool %d-%d exhausted "
                          "(no half-open flow to take a port from)", self.name, self.pool.lo,
                          self.pool.hi)

    # ------------------------------------------------------------ flows that start and end

    def flow_started(self, backend: Backend) -> BackendTotals:
        """Count a new flow on ``backend``; its figures, which the flow's packets add to."""
        totals = self.totals[backend.name]
        totals.flows += 1
        totals.active += 1
        return totals

    def flow_ended(self, flow: Flow, now: float) -> None:
        """A flow left the table: give back its pool port, tell its policy."""
        if flow.snat_port and self.pool is not None:
            self.pool.give(flow.snat_port)
        flow.totals.active -= 1
        if flow.placed is not None:
            placer, fkey = flow.placed
            self.tell_closed(placer, fkey, flow.backend, now)

    def tell_closed(self, policy: Policy, fkey: FlowKey, backend: Backend, now: float) -> None:
        """Tell the policy that placed a flow that it ended (contained like ``choose``)."""
        hook = getattr(policy, "on_flow_closed", None)
        if hook is None:
            return
        clock = self._clock
        started = clock() if clock is not None else 0.0
        try:
            hook(fkey, backend, now)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the plugin's
            self.policy_errors += 1
            self._counters.event("policy_failure")
            self._log.warning(f"policy:{self.name}", now, "service %s: policy %s raised %s "
                              "in on_flow_closed()", self.name, self.service.policy,
                              describe_failure(exc))
        if clock is not None:
            self.timed("on_flow_closed", clock() - started, now)

    def stats(self) -> dict[str, Any]:
        return {"backends": {name: t.as_dict() for name, t in self.totals.items()},
                "refused": self.refused, "policy_errors": self.policy_errors,
                "policy_slow": self.policy_slow,
                "policy_slowest_ms": round(self.slowest * 1e3, 3)}


def endpoint(address: bytes, port: int) -> bytes:
    """The index key of an address and port: packed address + 2-byte port."""
    return address + U16[port]


class Services:
    """Every service of a configuration at run time, indexed for the packet path."""

    def __init__(self, config: Config, rng: random.Random, counters: Counters,
                 log: RateLimitedLog, clock: Callable[[], float] | None = None) -> None:
        self.by_vip: dict[int, dict[bytes, ServiceRuntime]] = {TCP: {}, UDP: {}}
        self.by_backend: dict[int, dict[bytes, list[ServiceRuntime]]] = {TCP: {}, UDP: {}}
        self._all: list[ServiceRuntime] = []
        pools: dict[tuple[Any, ...], PortPool] = {}
        for svc in config.services:
            pool = None
            if svc.mode is Mode.FULLNAT:
                assert svc.snat_address is not None and svc.snat_ports is not None
                pkey = (svc.protocol, svc.snat_address, svc.snat_ports)
                pool = pools.get(pkey) or pools.setdefault(pkey, PortPool(*svc.snat_ports))
            # each policy gets its own RNG seeded from the engine's, so that a service's
            # choices do not depend on other services' traffic
            policy = make_policy(svc.policy, svc.backends, svc.policy_options,
                                 random.Random(rng.getrandbits(64)))
            fallback = None
            if svc.policy_fallback != POLICY_DROP:
                fallback = make_policy(svc.policy_fallback, svc.backends,
                                       rng=random.Random(rng.getrandbits(64)))
            runtime = ServiceRuntime(svc, policy, fallback, pool, counters, log, clock)
            self._all.append(runtime)
            self.by_vip[svc.protocol][endpoint(svc.vip.packed, svc.port)] = runtime
            if svc.unknown_flow is UnknownFlow.HASH:
                for key in runtime.endpoints.values():
                    self.by_backend[svc.protocol].setdefault(key, []).append(runtime)

    def __iter__(self) -> Iterator[ServiceRuntime]:
        return iter(self._all)

    def named(self, name: str) -> ServiceRuntime:
        for runtime in self._all:
            if runtime.name == name:
                return runtime
        raise KeyError(name)

    def stats(self) -> dict[str, Any]:
        """Per service and backend: the figures kept as they change."""
        return {rt.name: rt.stats() for rt in self._all}
