"""What a policy is: the ``Policy`` protocol, the ``FlowKey`` it sees, and its options.

A policy is any object with two methods (a third is optional)::

    set_backends(backends)           # the service's backends; rebuild tables here
    choose(flow, now) -> Backend | None   # once per new flow; None refuses the flow
    on_flow_closed(flow, backend, now)    # optional: a flow this policy placed has ended

It is built by a factory, ``factory(options, rng)``: ``options`` is the service's
``[service.policy_options]`` table (read-only) and ``rng`` a seeded ``random.Random`` that is
the policy's own (so replays are deterministic). A policy never sees packet bytes, sockets or
a clock other than ``now``.

The engine's connection table keeps a flow on the backend ``choose`` gave it for the flow's
whole life, whatever the policy does later. ``on_flow_closed`` is called exactly once for each
flow the policy placed (also when the engine could not install it after all, so counts of open
flows stay exact), and never for flows it did not place.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nfqlb.errors import PolicyError
from nfqlb.typed import TableReader
from nfqlb.values import Backend, IPAddress

__all__ = [
    "Backend", "FlowKey", "Options", "Policy", "PolicyFactory", "PolicyFallbackError",
    "PolicyOptionError", "ClosesFlows", "FIELDS", "live",
]


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What a policy knows of a new flow, as the client sent it."""

    protocol: int  # an IANA protocol number: nfqlb.values.Protocol.TCP or .UDP
    src: IPAddress
    sport: int
    dst: IPAddress  # the VIP
    dport: int


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
