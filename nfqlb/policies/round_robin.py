"""Round robin over the backends with a weight above zero (IPVS ``rr``)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.config import Backend
from nfqlb.policies import FlowKey


class RoundRobin:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        self._backends: tuple[Backend, ...] = ()
        self._next = 0

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = tuple(b for b in backends if b.weight > 0)
        self._next = 0

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        if not self._backends:
            return None
        i = self._next
        self._next = (i + 1) % len(self._backends)
        return self._backends[i]
