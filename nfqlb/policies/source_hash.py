"""``source_hash`` (IPVS ``sh``): the same client always lands on the same backend.

Rendezvous hashing of the chosen flow fields (default: the source address only), weights
honoured; removing a backend moves only the clients that were on it. One hash per backend
per new flow: for hundreds of backends prefer ``maglev`` with the same ``fields``.

Options:
- ``fields``: which of "protocol", "src", "sport", "dst", "dport" to hash (default ["src"]);
- ``src_prefix`` (0-32, default 32) and ``src_prefix6`` (0-128, default 128): hash the
  client's network rather than its address (clients behind a NAT pool that changes addresses).
- ``hash``: ``"blake2b"`` (the default: the rendezvous above) or ``"jhash"``: the client's
  address hashed as the kernel's nftables ``jhash`` hashes it (:mod:`nfqlb.policies.jhash`)
  into one of SCHEDULE_SLOTS slots, each slot's backend by weighted rendezvous of the slot
  (a backend removed moves only its slots' clients). The same client lands on the same
  backend in nfqlb and in the kernel, so an offload service may let the kernel play it
  (``offload_scheduler = "kernel"``: the policy's ``schedule`` is its slot table). Only
  ``fields = ["src"]`` with the whole address.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FIELDS, SCHEDULE_SLOTS, FlowKey, Options, PolicyOptionError, live
from nfqlb.policies.hashing import key_function, rendezvous
from nfqlb.policies.jhash import slot_of
from nfqlb.values import Backend

_OPTIONS = ("fields", "src_prefix", "src_prefix6", "hash")
HASHES = ("blake2b", "jhash")


def source_hash(options: Mapping[str, Any], rng: random.Random
                ) -> SourceHash | JhashSourceHash:
    """The factory of ``source_hash``: by its ``hash`` option."""
    how = Options(options, _OPTIONS).text("hash", "blake2b")
    if how not in HASHES:
        raise PolicyOptionError("hash", f"{how!r} is not one of {', '.join(HASHES)}")
    return JhashSourceHash(options, rng) if how == "jhash" else SourceHash(options, rng)


class SourceHash:
    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        opts = Options(options, _OPTIONS)
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


class JhashSourceHash:
    """``source_hash`` with ``hash = "jhash"``: a table of SCHEDULE_SLOTS slots, the client's
    slot as the kernel's ``jhash ip saddr mod SCHEDULE_SLOTS seed SEED`` computes it."""

    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        opts = Options(options, _OPTIONS)
        if opts.subset("fields", ("src",), FIELDS) != ("src",):
            raise PolicyOptionError("fields", 'with hash = "jhash" only ["src"]: the kernel '
                                    "hashes the client's address")
        for name in ("src_prefix", "src_prefix6"):
            if opts.has(name):
                raise PolicyOptionError(name, 'not with hash = "jhash": the kernel hashes the '
                                        "client's whole address")
        self._table: list[Backend] = []

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._table = self._slots(live(backends), SCHEDULE_SLOTS)

    @staticmethod
    def _slots(backends: Sequence[Backend], slots: int) -> list[Backend]:
        if not backends:
            return []
        out = []
        for i in range(slots):
            b = rendezvous(i.to_bytes(4, "big"), backends)
            assert b is not None
            out.append(b)
        return out

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        table = self._table
        return table[slot_of(flow.src_packed, len(table))] if table else None

    def choose_consistent(self, flow: FlowKey) -> Backend | None:
        """Consistent: the kernel's jhash of the client's address, a rendezvous table."""
        table = self._table
        return table[slot_of(flow.src_packed, len(table))] if table else None

    def schedule(self, slots: int) -> list[Backend]:
        """The slot table (slot i: the backend of the clients the kernel hashes to i)."""
        return list(self._table) if slots == len(self._table) or not self._table \
            else self._slots(tuple(dict.fromkeys(self._table)), slots)
