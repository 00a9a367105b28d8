"""``least_conn`` (IPVS ``wlc``; ``lc`` is the unweighted form): the backend with the fewest
open flows for its weight.

The policy counts the flows it placed (``choose``) and the ones that ended
(``on_flow_closed``, which the engine calls once for each flow the policy placed, when it
leaves the table), so "open" means open in nfqlb's connection table. The backend with the
lowest ``open / weight`` wins, ties to the one listed first. A heap with lazy deletion keeps
``choose`` O(log n): every change pushes the backend's new load, and stale entries are dropped
when they surface.

Options: ``weighted`` (default true; false compares raw counts, which is IPVS ``lc``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FlowKey, Options, live
from nfqlb.values import Backend


class OpenFlows:
    """Open flows per backend name, for the policies that balance by load."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}  # survives set_backends: those flows are still open

    def opened(self, backend: Backend) -> int:
        n = self.count.get(backend.name, 0) + 1
        self.count[backend.name] = n
        return n

    def closed(self, backend: Backend) -> int:
        n = max(self.count.get(backend.name, 0) - 1, 0)
        self.count[backend.name] = n
        return n


class LeastConn:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        self._weighted = Options(options, ("weighted",)).flag("weighted", True)
        self._open = OpenFlows()
        self._backends: tuple[Backend, ...] = ()
        self._weight: list[int] = []
        self._index: dict[str, int] = {}
        self._heap: list[tuple[float, int]] = []  # (load, index); stale entries allowed

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)
        self._weight = [b.weight if self._weighted else 1 for b in self._backends]
        self._index = {b.name: i for i, b in enumerate(self._backends)}
        self._rebuild()

    def _load(self, i: int) -> float:
        return self._open.count.get(self._backends[i].name, 0) / self._weight[i]

    def _rebuild(self) -> None:
        self._heap = [(self._load(i), i) for i in range(len(self._backends))]
        heapq.heapify(self._heap)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        heap = self._heap
        while heap:
            load, i = heap[0]
            if load == self._load(i):
                break
            heapq.heappop(heap)  # stale: the backend's load changed since
        else:
            return None
        b = self._backends[i]
        heapq.heapreplace(heap, (self._open.opened(b) / self._weight[i], i))
        return b

    def on_flow_closed(self, flow: FlowKey, backend: Backend, now: float) -> None:
        n = self._open.closed(backend)
        i = self._index.get(backend.name)
        if i is not None:
            heapq.heappush(self._heap, (n / self._weight[i], i))
            if len(self._heap) > 2 * len(self._backends) + 16:
                self._rebuild()
