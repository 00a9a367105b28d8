"""What a policy is: the ``Policy`` protocol, the ``FlowKey`` it sees, and its options.

A policy is any object with two methods (the others are optional)::

    set_backends(backends)           # the service's backends; rebuild tables here
    choose(flow, now) -> Backend | None   # once per new flow; None refuses the flow
    on_flow_closed(flow, backend, now)    # optional: a flow this policy placed has ended
    choose_consistent(flow) -> Backend | None   # optional: this policy is consistent
    schedule(slots) -> Sequence[Backend]  # optional: its next choices, given in advance

It is built by a factory, ``factory(options, rng)``: ``options`` is the service's
``[service.policy_options]`` table (read-only) and ``rng`` a seeded ``random.Random`` that is
the policy's own (so replays are deterministic). A policy never sees packet bytes, sockets or
a clock other than ``now``.

The engine's connection table keeps a flow on the backend ``choose`` gave it for the flow's
whole life, whatever the policy does later. ``on_flow_closed`` is called exactly once for each
flow the policy placed (also when the engine could not install it after all, so counts of open
flows stay exact), and never for flows it did not place.

A policy is *consistent* when its choice is a pure function of the flow and the backends last
given to ``set_backends``: the same backend in every process, on every node, before and after
a restart, for the same backends in the same order (no RNG, no clock, no count of open flows,
no Python ``hash()`` of a ``str`` or ``bytes``, whose seed differs per process). It declares
so by having ``choose_consistent(flow)``, which returns what ``choose`` returns (or returned)
for that flow. ``unknown_flow = "hash"`` adopts a flow the node does not know (after a
restart, moved here by ECMP from another node, a backend's reply whose request crossed
another node) on that backend, so it lands where the node that opened it placed it; it may be
called for any flow, as often as needed, and places nothing (``on_flow_closed`` is never
called for adopted flows). Without it, adoption takes the rendezvous hash of the flow
(``flow_hash``'s choice), which is another backend for most flows, and ``nfqlb check`` says
so. maglev, source_hash and flow_hash are consistent; round robin, least connections and
random cannot be.

A policy whose choice depends on nothing of the flow (nor on the clock) may give its choices
in advance: ``schedule(slots)`` returns the backends of ``slots`` new flows in a row, as
``choose`` would give them right after ``set_backends`` (without moving its own turn), each one
of those last offered with weight above 0; [] when none may take flows. An offload service
with ``offload_scheduler = "kernel"`` needs it: nfqlb writes the schedule into the kernel
(nftables: the n-th new flow takes slot n modulo ``slots``) again after each change of the
backends, and the kernel plays it with no packet queued. round_robin and weighted_round_robin
have it; so does source_hash with ``hash = "jhash"``, whose schedule is its slot table, which
the kernel plays by the client's address (the slot its jhash gives, as the policy's own
choice computes it), not in turn.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol, runtime_checkable

from nfqlb.errors import PolicyError
from nfqlb.typed import TableReader
from nfqlb.values import Backend, IPAddress

#: The slots of a schedule the kernel plays (offload_scheduler = "kernel"): a multiple of 1
#: to 10, so round robin over up to ten backends is exact.
SCHEDULE_SLOTS = 2520

__all__ = [
    "SCHEDULE_SLOTS", "Backend", "FlowKey", "Options", "Policy", "PolicyFactory",
    "PolicyFallbackError",
    "PolicyOptionError", "ChoosesConsistently", "ClosesFlows", "FIELDS", "consistent_chooser",
    "live",
]


class FlowKey(tuple[int, bytes, int, IPAddress, int]):
    """What a policy knows of a new flow, as the client sent it: ``protocol`` (an IANA
    protocol number: nfqlb.values.Protocol.TCP or .UDP), ``src`` (the client's address),
    ``sport``, ``dst`` (the VIP) and ``dport``; read-only, hashable, equal when the five are.

    It is made for every new flow, so it is a tuple and holds the client's address packed:
    ``src`` builds the address object when a policy asks for it (each time it asks: keep it
    in a local), ``src_packed`` gives the bytes as they are."""

    __slots__ = ()

    def __new__(cls, protocol: int, src: IPAddress | bytes, sport: int, dst: IPAddress,
                dport: int) -> FlowKey:
        return tuple.__new__(cls, (protocol, src if src.__class__ is bytes
                                   else src.packed, sport, dst, dport))  # type: ignore[union-attr]

    @property
    def protocol(self) -> int:
        return self[0]

    @property
    def src(self) -> IPAddress:
        packed = self[1]
        return IPv4Address(packed) if len(packed) == 4 else IPv6Address(packed)

    @property
    def src_packed(self) -> bytes:
        """The client's address as 4 or 16 bytes (``src.packed``, without building ``src``)."""
        return self[1]

    @property
    def sport(self) -> int:
        return self[2]

    @property
    def dst(self) -> IPAddress:
        return self[3]

    @property
    def dport(self) -> int:
        return self[4]

    def __getnewargs__(self) -> tuple[int, bytes, int, IPAddress, int]:  # (pickle, copy)
        return tuple(self)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"FlowKey(protocol={self[0]}, src={self.src!r}, sport={self[2]}, "
                f"dst={self[3]!r}, dport={self[4]})")


@runtime_checkable
class Policy(Protocol):
    """A balancing policy. Only ``choose`` is on the per-flow path; keep it O(1) or O(log n)."""

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """The service's backends, in configuration order (weight 0: drained, take no new
        flows). Called before the first ``choose`` and again whenever they change: build any
        table here, never in ``choose``."""

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        """The backend for a new flow (one of those given to ``set_backends``), or None to
        refuse it (the engine drops its first packet, counted ``no_backend``). An exception
        is contained: counted, logged at a rate limit, and the service's ``policy_fallback``
        handles the flow."""


@runtime_checkable
class ClosesFlows(Protocol):
    """A policy that wants to hear when the flows it placed end (least-connections does)."""

    def on_flow_closed(self, flow: FlowKey, backend: Backend, now: float) -> None: ...


@runtime_checkable
class ChoosesConsistently(Protocol):
    """A consistent policy (see the module's docstring): ``choose_consistent(flow)`` is the
    backend ``choose`` gives ``flow``, a pure function of the flow and the backends."""

    def choose_consistent(self, flow: FlowKey) -> Backend | None: ...


def consistent_chooser(policy: object) -> Callable[[FlowKey], Backend | None] | None:
    """The policy's ``choose_consistent``, or None when it declares none."""
    method = getattr(policy, "choose_consistent", None)
    return method if callable(method) else None


PolicyFactory = Callable[[Mapping[str, Any], random.Random], Policy]

FIELDS = ("protocol", "src", "sport", "dst", "dport")  # what a hash may be taken over


def live(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    """The backends that may take new flows (weight above zero)."""
    return tuple(b for b in backends if b.weight > 0)


class PolicyOptionError(PolicyError):
    """One policy option is wrong; the configuration reports it under its key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"policy_options.{key}: {problem}")


class PolicyFallbackError(PolicyError):
    """A service's ``policy_fallback`` names neither a built-in policy nor ``"drop"``."""


class Options(TableReader):
    """Typed reads of ``[service.policy_options]``; every error names the option.

    ``Options(options, known={"table_size"})`` rejects keys outside ``known`` (a typo should
    not silently keep a default). Plugins may use it too: ``get`` (unchecked), ``text``,
    ``integer``, ``number``, ``flag``, ``subset`` and the other getters of
    :class:`nfqlb.typed.TableReader` raise ``PolicyOptionError`` naming the option.
    """

    def __init__(self, options: Mapping[str, Any], known: Collection[str]) -> None:
        super().__init__(options)
        for key in options:
            if key not in known:
                hint = f"known: {', '.join(sorted(known))}" if known else "it takes no options"
                raise PolicyOptionError(key, f"unknown option ({hint})")

    @property
    def options(self) -> Mapping[str, Any]:
        return self.table

    def fail(self, name: str, problem: str) -> PolicyOptionError:
        return PolicyOptionError(name, problem)
