"""``round_robin`` (IPVS ``rr``): each new flow to the next backend, weights ignored.

Backends with weight 0 are drained (skipped). No options. Its choices depend on nothing of
the flow, so it gives them in advance too (``schedule``: offload_scheduler = "kernel").
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FlowKey, Options, live
from nfqlb.values import Backend


class RoundRobin:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        Options(options, ())
        self._backends: tuple[Backend, ...] = ()
        self._next = 0

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)
        self._next = 0

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        if not self._backends:
            return None
        i = self._next
        self._next = (i + 1) % len(self._backends)
        return self._backends[i]

    def schedule(self, slots: int) -> list[Backend]:
        """The backends of ``slots`` new flows in a row, from the first (as ``choose`` gives
        them after ``set_backends``; its own turn is left where it is)."""
        b = self._backends
        return [b[i % len(b)] for i in range(slots)] if b else []
