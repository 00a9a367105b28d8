"""``weighted_round_robin`` (IPVS ``wrr``): backends take new flows in proportion to weight.

Stride scheduling: backend *i*'s *k*-th flow is due at virtual time ``(k + 1/2) / weight``,
and ``choose`` takes the earliest due (a heap, O(log n)). The order is smooth (weights 5:1
give ``a a b a a a a ...`` interleaved, not five in a row) and exact: after any number of
flows each backend is within one flow of its share. No options. Its choices depend on nothing
of the flow, so it gives them in advance too (``schedule``: offload_scheduler = "kernel").
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
        self._heap = self._start()

    def _start(self) -> list[tuple[float, int, int]]:
        heap = [(0.5 / b.weight, i, 0) for i, b in enumerate(self._backends)]
        heapq.heapify(heap)
        return heap

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        return self._next(self._heap)

    def _next(self, heap: list[tuple[float, int, int]]) -> Backend | None:
        if not heap:
            return None
        _, i, given = heap[0]
        b = self._backends[i]
        heapq.heapreplace(heap, ((given + 1.5) / b.weight, i, given + 1))
        return b

    def schedule(self, slots: int) -> list[Backend]:
        """The backends of ``slots`` new flows in a row, from the first (as ``choose`` gives
        them after ``set_backends``; its own turn is left where it is): each backend within
        one flow of its share."""
        heap = self._start()
        if not heap:
            return []
        out = []
        for _ in range(slots):
            b = self._next(heap)
            assert b is not None
            out.append(b)
        return out
