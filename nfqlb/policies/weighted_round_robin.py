"""``weighted_round_robin`` (IPVS ``wrr``): backends take new flows in proportion to weight.

Stride scheduling: backend *i*'s *k*-th flow is due at virtual time ``(k + 1/2) / weight``,
and ``choose`` takes the earliest due (a heap, O(log n)). The order is smooth (weights 5:1
give ``a a b a a a a ...`` interleaved, not five in a row) and exact: after any number of
flows each backend is within one flow of its share. No options.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FlowKey, Options, live
from nfqlb.values import Backend


class WeightedRoundRobin:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        Options(options, ())
        self._backends: tuple[Backend, ...] = ()
        self._heap: list[tuple[float, int, int]] = []  # (due, index, flows given so far)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)
        self._heap = [(0.5 / b.weight, i, 0) for i, b in enumerate(self._backends)]
        heapq.heapify(self._heap)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        if not self._heap:
            return None
        _, i, given = self._heap[0]
        b = self._backends[i]
        heapq.heapreplace(self._heap, ((given + 1.5) / b.weight, i, given + 1))
        return b
