"""``random``: power of two random choices, weighted.

For each new flow, draw two backends at random in proportion to their weights (with
replacement), and take the one with fewer open flows for its weight (the first drawn on a
tie). This keeps loads nearly as even as least-connections without always piling onto the
single least loaded backend, and costs O(log n) (a bisect per draw). Draws come from the
seeded RNG the engine hands the factory, so replays repeat exactly.

Options: ``choices`` (1-8, default 2; 1 is plain weighted random).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FlowKey, Options, live
from nfqlb.policies.least_conn import OpenFlows
from nfqlb.values import Backend


class PowerOfTwoChoices:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        self._choices = Options(options, ("choices",)).integer("choices", 2, 1, 8)
        self._rng = rng
        self._open = OpenFlows()
        self._backends: tuple[Backend, ...] = ()
        self._cum: list[int] = []

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)
        self._cum = list(itertools.accumulate(b.weight for b in self._backends))

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        if not self._backends:
            return None
        drawn = self._rng.choices(self._backends, cum_weights=self._cum, k=self._choices)
        count = self._open.count
        best = min(drawn, key=lambda b: count.get(b.name, 0) / b.weight)
        self._open.opened(best)
        return best

    def on_flow_closed(self, flow: FlowKey, backend: Backend, now: float) -> None:
        self._open.closed(backend)
