"""Least latency: new flows go to the backend that has lately answered fastest, for its load.

Each backend's latency is an exponentially weighted moving average of the samples given to
``observe(backend_name, seconds, now)``; a new flow goes to the backend with the lowest

    latency x (open flows + 1) / weight

so a fast backend gets more flows until its load evens the score out.

What feeds it: nfqlb's health checker (``[service.health]``), which runs in the daemon's
event loop (the same thread as ``Engine.handle``, so no locking) and after each passed check
calls::

    engine.policy("web").observe("backend-1", elapsed_seconds, now)

and so can a test or a replay script. Until a backend has a sample, or when its last sample
is older than ``max_age`` seconds (a checker that stopped must not pin old numbers), its
latency counts as the mean of the fresh ones; with no fresh sample at all the policy is plain
weighted least-connections.

    policy = "file:policies/least_latency.py"
    [service.policy_options]
    alpha = 0.3       # weight of a new sample in the average (0 < alpha <= 1)
    max_age = 30.0    # seconds a sample stays valid

Cost per new flow: O(backends), fine for the tens of backends a service has.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies import Backend, FlowKey, Options, live


class LeastLatency:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        opts = Options(options, {"alpha", "max_age"})
        self.alpha = opts.number("alpha", 0.3, 0.001, 1.0)
        self.max_age = opts.number("max_age", 30.0, 0.001, 86400.0)
        self.backends: tuple[Backend, ...] = ()
        self.latency: dict[str, float] = {}  # backend name -> EWMA seconds
        self.sampled_at: dict[str, float] = {}
        self.open: dict[str, int] = {}

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self.backends = live(backends)

    def observe(self, backend: str, seconds: float, now: float) -> None:
        """A latency sample for ``backend`` (by name), for example a health probe's time."""
        old = self.latency.get(backend)
        fresh = old is not None and now - self.sampled_at[backend] <= self.max_age
        self.latency[backend] = (self.alpha * seconds + (1 - self.alpha) * old
                                 if fresh and old is not None else seconds)
        self.sampled_at[backend] = now

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        if not self.backends:
            return None
        fresh = {b.name: self.latency[b.name] for b in self.backends
                 if b.name in self.latency and now - self.sampled_at[b.name] <= self.max_age}
        default = sum(fresh.values()) / len(fresh) if fresh else 1.0
        best = min(self.backends, key=lambda b: fresh.get(b.name, default)
                   * (self.open.get(b.name, 0) + 1) / b.weight)
        self.open[best.name] = self.open.get(best.name, 0) + 1
        return best

    def on_flow_closed(self, flow: FlowKey, backend: Backend, now: float) -> None:
        self.open[backend.name] = max(self.open.get(backend.name, 0) - 1, 0)


factory = LeastLatency
