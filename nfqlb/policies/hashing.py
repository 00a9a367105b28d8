"""Consistent choice by rendezvous (highest random weight) hashing, weights honoured.

The same key and the same backend set give the same backend in every process and after
every restart (blake2b, not Python's randomised ``hash``); removing a backend moves only the
keys that were on it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.config import Backend
from nfqlb.policies import FlowKey


def flow_bytes(flow: FlowKey) -> bytes:
    return (bytes((flow.protocol,)) + flow.src.packed + flow.sport.to_bytes(2, "big")
            + flow.dst.packed + flow.dport.to_bytes(2, "big"))


def rendezvous(key: bytes, backends: Sequence[Backend]) -> Backend | None:
    best: Backend | None = None
    best_score = -math.inf
    for b in backends:
        if b.weight <= 0:
            continue
        h = int.from_bytes(hashlib.blake2b(key + b.name.encode(), digest_size=8).digest(), "big")
        u = (h + 1) / 2.0**64  # in (0, 1]
        score = -b.weight / math.log(u) if u < 1.0 else math.inf
        if score > best_score:
            best, best_score = b, score
    return best


class FlowHash:
    """Policy ``flow_hash``: rendezvous hash of the whole flow (protocol, addresses, ports).

    With ``unknown_flow = "hash"`` the same hash adopts mid-flow packets after a restart, so
    established connections survive it while the backend set is unchanged.
    """

    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        self._backends: tuple[Backend, ...] = ()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = tuple(backends)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        return rendezvous(flow_bytes(flow), self._backends)
