"""``source_hash`` (IPVS ``sh``): the same client always lands on the same backend.

Rendezvous hashing of the chosen flow fields (default: the source address only), weights
honoured; removing a backend moves only the clients that were on it. One hash per backend
per new flow: for hundreds of backends prefer ``maglev`` with the same ``fields``.

Options:
- ``fields``: which of "protocol", "src", "sport", "dst", "dport" to hash (default ["src"]);
- ``src_prefix`` (0-32, default 32) and ``src_prefix6`` (0-128, default 128): hash the
  client's network rather than its address (clients behind a NAT pool that changes addresses).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FIELDS, FlowKey, Options, live
from nfqlb.policies.hashing import key_function, rendezvous
from nfqlb.values import Backend


class SourceHash:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        opts = Options(options, ("fields", "src_prefix", "src_prefix6"))
        self._key = key_function(opts.subset("fields", ("src",), FIELDS),
                                 opts.integer("src_prefix", 32, 0, 32),
                                 opts.integer("src_prefix6", 128, 0, 128))
        self._backends: tuple[Backend, ...] = ()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        return rendezvous(self._key(flow), self._backends)

    def choose_consistent(self, flow: FlowKey) -> Backend | None:
        """Consistent: a blake2b rendezvous hash of the flow's fields and the backends."""
        return rendezvous(self._key(flow), self._backends)
