"""Balancing policies: the Policy protocol, the flow key policies see, and the registry.

A policy never sees packet bytes. It is told the backends with ``set_backends`` (rebuild any
tables there, off the hot path) and asked ``choose(flow, now)`` once per new flow; the
connection table then keeps the flow on that backend for its life.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nfqlb.config import Backend, IPAddress
from nfqlb.errors import PolicyError


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What a policy knows of a new flow, as the client sent it."""

    protocol: int  # 6 TCP, 17 UDP
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int


@runtime_checkable
class Policy(Protocol):
    def set_backends(self, backends: Sequence[Backend]) -> None: ...

    def choose(self, flow: FlowKey, now: float) -> Backend | None: ...


PolicyFactory = Callable[[Mapping[str, Any], random.Random], Policy]


def _builtins() -> dict[str, PolicyFactory]:
    from nfqlb.policies.hashing import FlowHash
    from nfqlb.policies.round_robin import RoundRobin

    return {"round_robin": RoundRobin, "rr": RoundRobin, "flow_hash": FlowHash}


def make_policy(name: str, backends: Sequence[Backend], options: Mapping[str, Any] | None = None,
                rng: random.Random | None = None) -> Policy:
    """Build the policy called ``name`` and give it its backends."""
    registry = _builtins()
    factory = registry.get(name)
    if factory is None:
        raise PolicyError(f"unknown policy {name!r} (built-in: {', '.join(sorted(registry))})")
    policy = factory(options or {}, rng or random.Random())
    policy.set_backends(backends)
    return policy


def policy_names() -> list[str]:
    return sorted(_builtins())
