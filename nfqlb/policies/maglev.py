"""``maglev`` (IPVS ``mh``): Maglev consistent hashing (Eisenbud et al., NSDI 2016).

``set_backends`` fills a lookup table of ``table_size`` slots (a prime) with backend indexes:
each backend walks its own permutation of the slots (offset and skip from a hash of its name)
and takes the next free slot when its turn comes. Turns come in proportion to weight (stride
scheduling, as in weighted_round_robin), so each backend's share of the table is its share of
the weights to within one slot. ``choose`` is then one hash of the flow and one list index:
O(1), and no table work ever happens per packet. Nothing in the table's build depends on the
process (blake2b, no RNG): every node with the same backends in the same order builds the same
table, so the policy is consistent (``choose_consistent``) and ``unknown_flow = "hash"`` adopts
a flow on the backend any node placed it on.

Removing one of N backends moves its own flows and very few others (with a table at least 100
times the number of backends the extra is well under 1% of flows); the tests measure it.

Options:
- ``table_size``: a prime at least 100 x the backends with weight above zero (default 65537,
  or the smallest prime above 100 x backends if that is larger), at most 16777259;
- ``fields``: which flow fields to hash (default all five: "protocol", "src", "sport", "dst",
  "dport"; ``mh`` defaults to ["src"], as IPVS mh does);
- ``hash``: ``"blake2b"`` (the default) or ``"jhash"``: a flow's slot is the kernel's nftables
  ``jhash`` of its fields (:mod:`nfqlb.policies.jhash`), so the kernel can play the table
  (offload_scheduler = "kernel": the map holds one element per slot). The default
  ``table_size`` is then 2521 (or the smallest prime above 100 x the configured backends),
  small enough to write into nftables in about 0.1 s.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FIELDS, FlowKey, Options, PolicyOptionError, live
from nfqlb.policies.hashing import hash64, key_function
from nfqlb.policies.jhash import JhashTable
from nfqlb.policies.source_hash import by_jhash
from nfqlb.values import Backend

DEFAULT_TABLE_SIZE = 65537
JHASH_TABLE_SIZE = 2521  # hash = "jhash": a prime, each slot an element of the kernel's map
MAX_TABLE_SIZE = 16777259  # the first prime above 2**24
SLOTS_PER_BACKEND = 100


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(n: int) -> int:
    while not is_prime(n):
        n += 1
    return n


def build_table(backends: Sequence[Backend], size: int) -> list[int]:
    """The Maglev lookup table: ``size`` slots, each an index into ``backends`` (weight > 0)."""
    n = len(backends)
    pos: list[int] = []
    skip: list[int] = []
    for b in backends:
        h = hashlib.blake2b(b.name.encode(), digest_size=16).digest()
        pos.append(int.from_bytes(h[:8], "big") % size)
        skip.append(int.from_bytes(h[8:], "big") % (size - 1) + 1)
    table = [-1] * size
    turns = [(0.5 / b.weight, i) for i, b in enumerate(backends)]  # (when, backend index)
    heapq.heapify(turns)
    taken = [0] * n
    for _ in range(size):
        _, i = turns[0]
        c, s = pos[i], skip[i]
        while table[c] >= 0:
            c += s
            if c >= size:
                c -= size
        table[c] = i
        pos[i] = c + s - size if c + s >= size else c + s
        taken[i] += 1
        heapq.heapreplace(turns, ((taken[i] + 0.5) / backends[i].weight, i))
    return table


_OPTIONS = ("table_size", "fields", "hash")


def _table_size(opts: Options) -> int | None:
    if not opts.has("table_size"):
        return None
    size = opts.integer("table_size", DEFAULT_TABLE_SIZE, 101, MAX_TABLE_SIZE)
    if not is_prime(size):
        raise PolicyOptionError("table_size", f"{size} is not a prime (the next prime is "
                                f"{next_prime(size)})")
    return size


def _too_small(size: int, alive: int) -> PolicyOptionError:
    return PolicyOptionError("table_size", f"{size} is too small for {alive} backends (at "
                             f"least {SLOTS_PER_BACKEND} slots each: "
                             f"{next_prime(SLOTS_PER_BACKEND * alive)} or more)")


def maglev(options: Mapping[str, Any], rng: random.Random) -> Maglev | JhashTable:
    """The factory of ``maglev``: by its ``hash`` option."""
    opts = Options(options, _OPTIONS)
    if not by_jhash(opts):
        return Maglev(options, rng)
    configured = _table_size(opts)

    def size(backends: int) -> int:
        return configured or max(JHASH_TABLE_SIZE, next_prime(SLOTS_PER_BACKEND * backends))

    def build(alive: Sequence[Backend], slots: int) -> list[Backend]:
        if slots < SLOTS_PER_BACKEND * len(alive):
            raise _too_small(slots, len(alive))
        return [alive[i] for i in build_table(alive, slots)]

    return JhashTable(opts.subset("fields", FIELDS, FIELDS), size, build)


class Maglev:
    def __init__(self, options: Mapping[str, Any], rng: random.Random,
                 default_fields: Sequence[str] = FIELDS) -> None:
        opts = Options(options, _OPTIONS)
        self._size = _table_size(opts)
        self._key = key_function(opts.subset("fields", tuple(default_fields), FIELDS))
        self._backends: tuple[Backend, ...] = ()
        self._table: list[Backend] = []

    @property
    def table_size(self) -> int:
        return len(self._table)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        alive = live(backends)
        need = SLOTS_PER_BACKEND * len(alive)
        size = self._size
        if size is None:
            size = max(DEFAULT_TABLE_SIZE, next_prime(need))
        elif size < need:
            raise _too_small(size, len(alive))
        self._backends = alive
        self._table = [alive[i] for i in build_table(alive, size)] if alive else []

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        table = self._table
        if not table:
            return None
        return table[hash64(self._key(flow)) % len(table)]

    def choose_consistent(self, flow: FlowKey) -> Backend | None:
        """Consistent: the table is built from the backends' names, weights and order only."""
        table = self._table
        return table[hash64(self._key(flow)) % len(table)] if table else None
