"""The services at run time: what health checks, draining and reload change.

A :class:`ServiceRuntime` is one configured service while the engine runs: its policy and
the fallback for when the policy fails (the failure contained: counted, logged at a rate
limit, never raised), its fullnat port pool, and its backends at run time
(:class:`BackendRuntime`): each one's state, weight and figures. :class:`Services` holds them
all, indexed the two ways the packet path asks:

- by VIP and port (``by_vip[protocol][vip packed + port]``), for a packet to a service;
- by backend address and port (``by_backend[protocol][...]``), the hash-adoption index: the
  services with ``unknown_flow = "hash"`` that a packet from that backend may belong to.

A backend is *up* (takes new flows), *down* (its health check failed), *draining* (an
operator's ``nfqlb ctl drain``: no new flows, its flows carry on) or *removed* (gone from the
configuration by a reload, kept while its flows last). The policies see only the backends
that may take new flows: on every change the runtime hands them the service's backends again,
in configuration order, those that may not with weight 0 (``set_backends``: tables are
rebuilt there, off the packet path). What a backend serves is counted as it happens (never a
walk of the table): flows placed, established and inactive flows now (ipvsadm's ActiveConn and
InActConn), packets and bytes in (toward the backend) and out, new flows per second.

The engine decides a flow's life cycle; the runtime answers its questions about a service
(which backend for this new flow, which port, what to do now that a flow ended).
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from nfqlb.config import Config, Service, UnknownFlow
from nfqlb.counters import Counters
from nfqlb.policies import (
    ALIASES,
    FlowKey,
    Policy,
    consistent_chooser,
    describe_failure,
    hash_choice,
    make_policy,
)
from nfqlb.policies import DROP as POLICY_DROP
from nfqlb.ratelog import RateLimitedLog
from nfqlb.snat import PortPool, TimeWait
from nfqlb.values import Backend, Mode
from nfqlb.wire.checksum import U16
from nfqlb.wire.ip import TCP, UDP

if TYPE_CHECKING:
    from collections import OrderedDict
    from collections.abc import Callable, Iterator

    from nfqlb.flows import Flow

#: A policy hook (choose, on_flow_closed) that takes this long or longer is counted
#: ``policy_slow`` and logged: it ran on the packet path while the queue waited.
SLOW_POLICY_S = 0.001

#: New flows per second are the mean over this many seconds.
RATE_WINDOW_S = 10


class Direction:
    """Packets and bytes one way (every packet adds to one of these)."""

    __slots__ = ("packets", "bytes")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0


class BackendRuntime:
    """One backend of a service at run time: its state, weight and figures."""

    __slots__ = ("backend", "name", "address", "port", "endpoint", "weight", "healthy",
                 "drained", "drain_deadline", "removed", "check", "latency", "inbound",
                 "outbound", "flows_total", "established", "inactive", "owner", "reclaim",
                 "_samples", "bulk_in", "bulk_out", "bulk_flow")

    def __init__(self, backend: Backend, vip: Any, service_port: int) -> None:
        self.backend = backend  # the configured value (name, address, port, weight)
        self.name = backend.name
        self.address = backend.address
        self.port = backend.port
        #: packed address + port of the packets sent to it (the VIP's address for a local
        #: backend without one)
        self.endpoint = endpoint((backend.address or vip).packed, backend.port)
        self.weight = backend.weight  # the configured one, or what `nfqlb ctl weight` set
        self.healthy = True  # up until a health check says otherwise
        self.drained = False
        self.drain_deadline: float | None = None  # its flows are reset then (drain_timeout)
        self.removed = False  # gone from the configuration; kept while its flows last
        self.check = ""  # the last health check's result, e.g. "ok", "timeout", "status 503"
        self.latency: float | None = None  # the last check's time, seconds
        #: the headers route's marks (daemon.bulk = "headers"; config.bulk_marks): toward the
        #: backend and of its replies; 0 for none (not a TCP service's, or
        #: removed from the configuration): its packets then go whole
        self.bulk_in = 0
        self.bulk_out = 0
        #: fullnat: the marks hold for a flow only once its map elements are in the kernel
        #: (the engine's ``bulk_ops``, sent by nfqlb.io.bulk)
        self.bulk_flow = False
        self.inbound = Direction()  # client -> backend
        self.outbound = Direction()  # backend -> client
        self.flows_total = 0
        self.established = 0  # TCP flows established now (ipvsadm ActiveConn)
        self.inactive = 0  # any other flow now: half-open, closing, UDP (InActConn)
        #: fullnat: its service's pool's lists of its flows that may give their port back,
        #: (half-open, closed) (see nfqlb.snat); None without a pool
        self.reclaim: tuple[OrderedDict[object, TimeWait | None],
                            OrderedDict[object, TimeWait | None]] | None = None
        #: (time, flows_total) about once a second (``sample``), the last RATE_WINDOW_S s:
        #: new flows per second come from these, at no cost per flow
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW_S + 1)

    @property
    def state(self) -> str:
        if self.removed:
            return "removed"
        if not self.healthy:
            return "down"
        if self.drained:
            return "draining"
        return "up"

    @property
    def live(self) -> bool:
        """May take new flows."""
        return self.healthy and not self.drained and not self.removed and self.weight > 0

    #: the service it belongs to (its flows' service; set by ``ServiceRuntime.apply``)
    owner: ServiceRuntime

    @property
    def open_flows(self) -> int:
        """Its flows now (the table holds them; ``FlowTable.of_backend`` finds them)."""
        return self.established + self.inactive

    def started(self, flow: Flow) -> None:
        self.flows_total += 1
        self.inactive += 1  # a new flow is never established yet

    def sample(self, now: float) -> None:
        """Note the flows placed so far (the engine's timer, about once a second)."""
        self._samples.append((now, self.flows_total))

    def new_per_second(self, now: float) -> float:
        """New flows per second since the oldest sample (up to RATE_WINDOW_S s ago)."""
        if not self._samples:
            return 0.0
        then, count = self._samples[0]
        return (self.flows_total - count) / (now - then) if now > then else 0.0

    def figures(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state, "weight": self.weight, "address": str(self.address or ""),
            "port": self.port, "active": self.established, "inactive": self.inactive,
            "flows": self.flows_total, "new_per_s": round(self.new_per_second(now), 2),
            "packets_in": self.inbound.packets, "packets_out": self.outbound.packets,
            "bytes_in": self.inbound.bytes, "bytes_out": self.outbound.bytes,
            "packets": self.inbound.packets + self.outbound.packets,
            "bytes": self.inbound.bytes + self.outbound.bytes,
            "check": self.check, "latency_ms": None if self.latency is None
            else round(self.latency * 1e3, 3),
        }


class ServiceRuntime:
    """One service while the engine runs: policy, fallback, pool, backends at run time."""

    __slots__ = ("service", "name", "local", "policy", "fallback", "pool", "snat_address",
                 "vip_endpoint", "backends", "offered", "backend_set", "offered_ids", "proto",
                 "adopters",
                 "any_live", "refused",
                 "no_backend_up",
                 "policy_errors", "address_type", "_counters", "_log", "_clock", "policy_slow",
                 "slowest", "_rng", "generation")

    def __init__(self, service: Service, pool: PortPool | None, counters: Counters,
                 log: RateLimitedLog, rng: random.Random,
                 clock: Callable[[], float] | None = None) -> None:
        self._counters = counters
        self._log = log
        self._clock = clock  # a real clock (seconds) to time the policy's hooks; None: untimed
        self._rng = rng
        self.refused = 0  # new flows refused, for any reason
        self.no_backend_up = 0  # of which: no backend could take it (all down or drained)
        self.policy_errors = 0  # choose/on_flow_closed raised, or choose returned a stranger
        self.policy_slow = 0  # hook calls of SLOW_POLICY_S or longer
        self.slowest = 0.0  # the longest hook call timed, in seconds
        self.backends: dict[str, BackendRuntime] = {}
        self.offered: tuple[Backend, ...] = ()
        self.backend_set: frozenset[Backend] = frozenset()
        self.offered_ids: frozenset[int] = frozenset()  # (identity: the quick check)
        self.any_live = True  # some backend may take new flows
        self.generation = 0  # counts the changes of what the policies were offered
        self.policy: Policy
        self.fallback: Policy | None
        self.adopters: tuple[Callable[[FlowKey], Backend | None], ...]
        self.apply(service, pool)

    def apply(self, service: Service, pool: PortPool | None) -> list[BackendRuntime]:
        """Take (or, on reload, take again) the configuration of the service: its backends
        (kept where they stay: their state, flows and figures; added; removed ones are
        returned and kept, marked removed, while their flows last), its policy (built anew
        when its spec, options or fallback changed) and its pool."""
        old = getattr(self, "service", None)
        self.service = service
        self.name = service.name
        self.local = service.mode is Mode.LOCAL
        self.proto = service.protocol.value
        self.pool = pool
        self.snat_address = service.snat_address.packed if service.snat_address else b""
        self.vip_endpoint = endpoint(service.vip.packed, service.port)
        self.address_type = type(service.vip)  # IPv4Address or IPv6Address: client addresses
        removed = []
        keep: dict[str, BackendRuntime] = {}
        for b in service.backends:
            rt = self.backends.get(b.name)
            if rt is None or rt.removed or (rt.address, rt.port) != (b.address, b.port):
                rt = BackendRuntime(b, service.vip, service.port)
                rt.owner = self
            else:
                weight_changed = rt.backend.weight != b.weight
                rt.backend = b
                if weight_changed:  # the file's weight wins over an earlier ctl weight
                    rt.weight = b.weight
            keep[b.name] = rt
        for name, rt in self.backends.items():
            if rt.removed:
                if rt.open_flows:
                    keep[name] = rt  # still draining out from an earlier reload
            elif keep.get(name) is not rt and rt.open_flows:
                rt.removed = True
                removed.append(rt)
                keep[f"{name} (removed)"] = rt
        self.backends = keep
        for rt in keep.values():
            rt.reclaim = None if pool is None else (pool.reclaim_list(rt.endpoint, False),
                                                    pool.reclaim_list(rt.endpoint, True))
        if old is None or (old.policy, old.policy_options, old.policy_fallback) != \
                (service.policy, service.policy_options, service.policy_fallback):
            # each policy gets its own RNG seeded from the engine's, so that a service's
            # choices do not depend on other services' traffic
            self.policy = make_policy(service.policy, service.backends, service.policy_options,
                                      random.Random(self._rng.getrandbits(64)))
            self.fallback = None
            if service.policy_fallback != POLICY_DROP:
                self.fallback = make_policy(service.policy_fallback, service.backends,
                                            rng=random.Random(self._rng.getrandbits(64)))
            # unknown_flow = "hash" (adopt_choice): a consistent policy's choice, then its
            # fallback's if that is consistent too; none: the rendezvous hash
            own = consistent_chooser(self.policy)
            other = consistent_chooser(self.fallback)
            self.adopters = () if own is None else (own,) if other is None else (own, other)
            self.offered = ()  # new policies: hand them the backends as they are now
        self.refresh(0.0)
        return removed

    def refresh(self, now: float) -> None:
        """Hand the policies the backends again, those that may not take new flows with
        weight 0 (after a health, drain, weight or configuration change)."""
        self.any_live = any(rt.live for rt in self.backends.values())
        offered = tuple(rt.backend if rt.live and rt.weight == rt.backend.weight
                        else dataclasses.replace(rt.backend, weight=rt.weight if rt.live else 0)
                        for rt in self.backends.values() if not rt.removed)
        if offered == self.offered:
            return
        self.offered = offered
        self.generation += 1
        self.backend_set = frozenset(offered)
        self.offered_ids = frozenset(map(id, offered))
        for policy in (self.policy, self.fallback):
            if policy is None:
                continue
            try:
                policy.set_backends(offered)
            except BaseException as exc:  # a plugin's: contained like choose
                self.policy_errors += 1
                self._counters.event("policy_failure")
                self._log.warning(f"policy:{self.name}", now, "service %s: policy %s raised "
                                  "%s in set_backends()", self.name, self.service.policy,
                                  describe_failure(exc))

    # ------------------------------------------------------------ operators and checks

    def set_health(self, rt: BackendRuntime, up: bool, reason: str, latency: float | None,
                   now: float) -> bool:
        """Record a health check's result; True when the backend just went down."""
        rt.check = reason or ("ok" if up else "failed")
        rt.latency = latency
        if up is rt.healthy:
            return False
        rt.healthy = up
        self.refresh(now)
        return not up

    def drain(self, rt: BackendRuntime, now: float, timeout: float | None) -> None:
        limit = self.service.drain_timeout if timeout is None else timeout
        rt.drained = True
        rt.drain_deadline = now + limit if limit > 0 else None
        self.refresh(now)

    def enable(self, rt: BackendRuntime, now: float) -> None:
        rt.drained = False
        rt.drain_deadline = None
        self.refresh(now)

    def set_weight(self, rt: BackendRuntime, weight: int, now: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise ValueError(f"weight must be an integer 0-1000000, not {weight!r}")
        rt.weight = weight
        self.refresh(now)

    # ------------------------------------------------------------ choosing

    def flow_key(self, key: bytes) -> FlowKey:
        """What a policy sees of the flow ``key`` (``client | VIP | client port | port``, as
        the client sends it): the VIP's address object is the service's own, the client's
        address stays packed (``FlowKey.src`` builds its object when a policy asks)."""
        alen = len(key) // 2 - 2
        s = self.service
        return _new_tuple(FlowKey, (self.proto, key[:alen], key[-4] << 8 | key[-3], s.vip,
                                    s.port))

    def flow_key_of(self, data: bytes, a: int, alen: int, off: int) -> FlowKey:
        """:meth:`flow_key` of a packet read in place: the client's address at ``data[a:a +
        alen]``, its port at ``data[off:off + 2]`` (the offload queue's first packets)."""
        s = self.service
        return _new_tuple(FlowKey, (self.proto, data[a:a + alen], data[off] << 8 | data[off + 1],
                                    s.vip, s.port))

    def choose(self, fkey: FlowKey, now: float
               ) -> tuple[BackendRuntime | None, Policy | None, Backend | None, str]:
        """(backend, the policy that chose it, the value it returned, drop reason if none). A
        failing policy is contained: counted, logged at a rate limit, and the fallback (if
        any) chooses. With a clock, the call is timed (see ``timed``)."""
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
            if self._offered(backend):
                return self._runtime(backend), self.policy, backend, "no_backend"
            problem = f"returned {backend!r:.80}, not one of the service's backends"
        else:
            problem = f"raised {describe_failure(failure)} in choose()"
            del failure
        s = self.service
        fallback = self.fallback
        self._policy_failed(problem, fkey, now, f"fallback {s.policy_fallback}" if fallback
                            else "dropped")
        if fallback is None:
            return None, None, None, "policy_error"
        self._counters.event("policy_fallback")
        backend = fallback.choose(fkey, now)
        return self._runtime(backend), fallback, backend, "no_backend"

    def kernel_schedule(self, slots: int, now: float) -> list[BackendRuntime] | None:
        """The policy's next ``slots`` choices given in advance (its ``schedule``: the kernel
        plays them, offload_scheduler = "kernel"), [] when no backend may take flows, None
        when the policy failed (raised, or named a backend it was not offered or one with
        weight 0: counted and logged as a failing ``choose``); the first packets then go
        to the offload queue, where the fallback decides."""
        try:
            chosen = list(self.policy.schedule(slots))  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: B036 - a plugin's: contained like choose
            self._schedule_failed(f"raised {describe_failure(exc)} in schedule()", now)
            return None
        if len(chosen) not in (0, slots):
            self._schedule_failed(f"gave {len(chosen)} choices in schedule({slots})", now)
            return None
        out = []
        for backend in chosen:
            rt = self._runtime(backend) if backend is not None and self._offered(backend) \
                else None
            if rt is None:
                self._schedule_failed(f"scheduled {backend!r:.80}, not one of the service's "
                                      "backends that may take flows", now)
                return None
            out.append(rt)
        return out

    def _schedule_failed(self, problem: str, now: float) -> None:
        self.policy_errors += 1
        self._counters.event("policy_failure")
        self._log.warning(f"policy:{self.name}", now, "service %s: policy %s %s; its first "
                          "packets go to the offload queue (%d failures so far)", self.name,
                          self.service.policy, problem, self.policy_errors)

    def _offered(self, backend: object) -> bool:
        """Whether a policy's answer is None or one of the backends offered to it."""
        try:
            return backend is None or id(backend) in self.offered_ids \
                or backend in self.backend_set
        except TypeError:  # unhashable
            return False

    def _policy_failed(self, problem: str, fkey: FlowKey, now: float, outcome: str) -> None:
        """Count and log (at a rate limit) a policy's failure for the flow ``fkey``."""
        self.policy_errors += 1
        self._counters.event("policy_failure")
        s = self.service
        self._log.warning(f"policy:{s.name}", now, "service %s: policy %s %s; flow %s:%d -> %s "
                          "(%d failures so far)", s.name, s.policy, problem, fkey.src,
                          fkey.sport, outcome, self.policy_errors)

    def _runtime(self, backend: Backend | None) -> BackendRuntime | None:
        if backend is None or backend.weight <= 0:
            return None  # (a weight-0 backend is offered to be seen, never to be chosen)
        return self.backends.get(backend.name)

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

    def adopt_choice(self, fkey: FlowKey, now: float) -> BackendRuntime | None:
        """The backend ``unknown_flow = "hash"`` adopts ``fkey`` on, the same on every node and
        after every restart while the backends that may take new flows are the same: the
        policy's ``choose_consistent`` (where any node's policy placed the flow), else the
        rendezvous hash of the flow (``flow_hash``'s choice, which for any other policy is
        where it placed the flow only by chance: ``nfqlb check`` warns of it).

        A failing ``choose_consistent`` is contained like ``choose``: counted, logged, and the
        fallback's consistent choice (the node that opened the flow placed it by the fallback
        too, when the policy is a pure function that fails), else the rendezvous hash."""
        adopters = self.adopters
        for i, chooser in enumerate(adopters):
            clock = self._clock
            started = clock() if clock is not None else 0.0
            try:
                backend = chooser(fkey)
            except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the plugin's
                problem = f"raised {describe_failure(exc)} in choose_consistent()"
            else:
                if self._offered(backend):
                    return self._runtime(backend)
                problem = f"returned {backend!r:.80} from choose_consistent(), not one of " \
                    "the service's backends"
            finally:
                if clock is not None:
                    self.timed("choose_consistent", clock() - started, now)
            self._policy_failed(problem, fkey, now, "adopted by the fallback's choice"
                                if i + 1 < len(adopters) else "adopted by the rendezvous hash")
        return self._runtime(hash_choice(fkey, self.offered))

    def refuse_no_port(self, now: float) -> None:
        """Count and log (at a rate limit) a flow refused for an empty port pool."""
        assert self.pool is not None
        self.refused += 1
        self._log.warning("snat_exhausted", now, "service %s: snat port pool %d-%d exhausted "
                          "for a backend (no closed or half-open flow to take a port from)",
                          self.name, self.pool.lo, self.pool.hi)

    # ------------------------------------------------------------ flows that end

    def flow_ended(self, flow: Flow, now: float, established: bool,
                   timewait: TimeWait | None = None, give_port: bool = True) -> None:
        """A flow left the table: give back its pool port (with the TIME_WAIT its backend
        holds for it, if any; not if ``give_port`` is false: a new flow takes it over),
        count it off its backend, tell its policy."""
        if give_port and self.pool is not None and flow.snat_port:
            self.pool.give(flow.snat_port, flow.backend.endpoint, timewait)
        rt = flow.backend
        if established:
            rt.established -= 1
        else:
            rt.inactive -= 1
        if rt.removed and not rt.open_flows:  # the last flow of a removed backend
            self.backends = {k: v for k, v in self.backends.items() if v is not rt}
        if flow.placed is not None:
            placer, fkey, chosen = flow.placed
            self.tell_closed(placer, fkey, chosen, now)

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

    def stats(self, now: float = 0.0) -> dict[str, Any]:
        return {"backends": {name: rt.figures(now) for name, rt in self.backends.items()},
                "refused": self.refused, "no_backend_up": self.no_backend_up,
                "policy_errors": self.policy_errors, "policy_slow": self.policy_slow,
                "policy_slowest_ms": round(self.slowest * 1e3, 3)}


#: Why a built-in policy cannot choose the same backend on every node.
_NOT_CONSISTENT = {
    "round_robin": "it takes the backends in turn",
    "weighted_round_robin": "it takes the backends in turn",
    "least_conn": "it counts each node's open flows",
    "random": "it draws at random and counts each node's open flows",
}


def adoption_warnings(config: Config) -> list[str]:
    """One line per service with ``unknown_flow = "hash"`` whose policy is not consistent (no
    ``choose_consistent``): a flow its node does not know is adopted on the rendezvous hash,
    which is not where another node's policy (or this node's, before a restart) placed most
    flows. A warning, not an error: one node that never restarts never adopts."""
    out = []
    for i, svc in enumerate(config.services):
        if svc.unknown_flow is not UnknownFlow.HASH:
            continue
        policy = make_policy(svc.policy, svc.backends, svc.policy_options, random.Random(0))
        if consistent_chooser(policy) is not None:
            continue
        name = ALIASES[svc.policy][0] if svc.policy in ALIASES else svc.policy
        why = _NOT_CONSISTENT.get(name, "it has no choose_consistent(), the declaration that "
                                  "its choice is a pure function of the flow and the backends")
        out.append(f"service[{i}] ({svc.name}): policy \"{svc.policy}\" is not consistent "
                   f"across nodes ({why}): unknown_flow = \"hash\" adopts a flow this node "
                   "does not know (after a restart, moved here by ECMP, or a backend's reply "
                   "whose request went through another node) on the rendezvous hash of the "
                   "flow (flow_hash's choice), not on the backend the policy chose for it, "
                   "and the connections it moves break; for several nodes use maglev, "
                   "source_hash or flow_hash")
    return out


_new_tuple = tuple.__new__  # (FlowKey's fields as they are: no conversion to check)


def endpoint(address: bytes, port: int) -> bytes:
    """The index key of an address and port: packed address + 2-byte port."""
    return address + U16[port]


def _pool_key(svc: Service) -> tuple[Any, ...] | None:
    if svc.mode is not Mode.FULLNAT:
        return None
    return (svc.protocol, svc.snat_address, svc.snat_ports)


def _service_key(svc: Service) -> tuple[Any, ...]:
    return (svc.protocol, svc.vip, svc.port)


class Services:
    """Every service of a configuration at run time, indexed for the packet path."""

    def __init__(self, config: Config, rng: random.Random, counters: Counters,
                 log: RateLimitedLog, clock: Callable[[], float] | None = None) -> None:
        self._rng = rng
        self._counters = counters
        self._log = log
        self._clock = clock
        self._all: list[ServiceRuntime] = []
        #: every flow of the table (the engine's ``FlowTable.flows``): no backend keeps a set
        #: of its flows, the few that need them walk the table
        self.table_flows: Callable[[], list[Flow]] = list
        self._pools: dict[tuple[Any, ...], PortPool] = {}
        self.by_vip: dict[int, dict[bytes, ServiceRuntime]] = {TCP: {}, UDP: {}}
        self.by_backend: dict[int, dict[bytes, list[ServiceRuntime]]] = {TCP: {}, UDP: {}}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> tuple[list[ServiceRuntime],
                                                   list[BackendRuntime]]:
        """Take ``config``: services that stay (same VIP, port and protocol) keep their
        runtime, flows and figures, the others are built; pools are kept where their address
        and range stay. Returns the services and the backends that are gone (kept, for their
        flows, outside the indexes)."""
        old = {_service_key(rt.service): rt for rt in self._all}
        pools: dict[tuple[Any, ...], PortPool] = {}
        services: list[ServiceRuntime] = []
        gone_backends: list[BackendRuntime] = []
        for svc in config.services:
            pool = None
            pkey = _pool_key(svc)
            if pkey is not None:
                assert svc.snat_ports is not None
                pool = pools.get(pkey) or self._pools.get(pkey)
                if pool is None:
                    pool = PortPool(*svc.snat_ports, in_use=self._ports_in_use(svc))
                pools[pkey] = pool
            rt = old.pop(_service_key(svc), None)
            if rt is None:
                rt = ServiceRuntime(svc, pool, self._counters, self._log,
                                    random.Random(self._rng.getrandbits(64)), self._clock)
            else:
                gone_backends += rt.apply(svc, pool)
            services.append(rt)
        self._all = services
        self._pools = pools
        self.by_vip = {TCP: {}, UDP: {}}
        self.by_backend = {TCP: {}, UDP: {}}
        for rt in services:
            svc = rt.service
            self.by_vip[svc.protocol][rt.vip_endpoint] = rt
            if svc.unknown_flow is UnknownFlow.HASH:
                for b in rt.backends.values():
                    if not b.removed:
                        self.by_backend[svc.protocol].setdefault(b.endpoint, []).append(rt)
        return list(old.values()), gone_backends

    def _ports_in_use(self, svc: Service) -> dict[bytes, set[int]]:
        """Per backend endpoint, ports of ``svc``'s snat address and protocol held by live
        flows of any pool (a new pool on the same address must not hand them out again)."""
        used: dict[bytes, set[int]] = {}
        held: dict[BackendRuntime, bytes] = {}
        for rt in self._all:
            if (rt.service.snat_address == svc.snat_address and rt.pool is not None
                    and rt.service.protocol == svc.protocol):
                for b in rt.backends.values():
                    if b.open_flows:
                        held[b] = b.endpoint
        if held:
            for f in self.table_flows():
                where = held.get(f.backend)
                if where is not None and f.snat_port:
                    used.setdefault(where, set()).add(f.snat_port)
        return used

    def __iter__(self) -> Iterator[ServiceRuntime]:
        return iter(self._all)

    def named(self, name: str) -> ServiceRuntime:
        for runtime in self._all:
            if runtime.name == name:
                return runtime
        raise KeyError(name)

    def sample(self, now: float) -> None:
        """Every backend notes its flows placed so far (for new flows per second)."""
        for rt in self._all:
            for b in rt.backends.values():
                b.sample(now)

    def stats(self, now: float = 0.0) -> dict[str, Any]:
        """Per service and backend: the figures kept as they change."""
        return {rt.name: rt.stats(now) for rt in self._all}

    def backend(self, service: str, backend: str) -> tuple[ServiceRuntime, BackendRuntime]:
        """The service and backend so named; KeyError (naming what is unknown) otherwise."""
        try:
            svc = self.named(service)
        except KeyError:
            raise KeyError(f"no service {service!r}") from None
        rt = svc.backends.get(backend)
        if rt is None or rt.removed:
            raise KeyError(f"service {service!r} has no backend {backend!r}")
        return svc, rt

    def owner(self, rt: BackendRuntime) -> ServiceRuntime:
        """The service ``rt`` belongs to (removed backends stay with theirs while they last)."""
        return next(svc for svc in self._all if rt in svc.backends.values())

    def lingering(self) -> dict[str, tuple[Backend, ...]]:
        """Per service, the backends a reload removed that still have flows."""
        out: dict[str, tuple[Backend, ...]] = {}
        for svc in self._all:
            gone = tuple(rt.backend for rt in svc.backends.values()
                         if rt.removed and rt.open_flows)
            if gone:
                out[svc.name] = gone
        return out

    def flow_list(self, now: float, deadline: Callable[[Flow], float],
                  service: str | None = None, backend: str | None = None,
                  limit: int = 10_000) -> list[dict[str, Any]]:
        """The flows of one service and backend if named, at most ``limit``, as ``ipvsadm
        -Lnc`` shows them (a walk of those flows: for operators, not per packet)."""
        out: list[dict[str, Any]] = []
        services = [self.named(service)] if service is not None else self._all
        of_backend: dict[BackendRuntime, list[Flow]] = {}
        for flow in self.table_flows():
            of_backend.setdefault(flow.backend, []).append(flow)
        for svc in services:
            for rt in svc.backends.values():
                if backend is not None and rt.name != backend:
                    continue
                for flow in of_backend.get(rt, ()):
                    if len(out) >= limit:
                        return out
                    key = flow.fwd_key
                    alen = len(key) // 2 - 2
                    out.append({
                        "service": svc.name, "protocol": "tcp" if flow.proto == TCP else "udp",
                        "state": flow.state.name, "client": str(svc.address_type(key[:alen])),
                        "client_port": key[-4] << 8 | key[-3], "vip": str(svc.service.vip),
                        "port": svc.service.port, "backend": rt.name,
                        "snat_port": flow.snat_port or None,
                        "idle_s": round(now - flow.last, 3),
                        "expires_s": round(deadline(flow) - now, 3),
                    })
        return out
