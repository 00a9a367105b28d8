"""``source_hash`` (IPVS ``sh``): the same client always lands on the same backend.

Rendezvous hashing of the chosen flow fields (default: the source address only), weights
honoured; removing a backend moves only the clients that were on it. One hash per backend
per new flow: for hundreds of backends prefer ``maglev`` with the same ``fields``.

Options:
- ``fields``: which of "protocol", "src", "sport", "dst", "dport" to hash (default ["src"]);
- ``src_prefix`` (0-32, default 32) and ``src_prefix6`` (0-128, default 128): hash the
  client's network rather than its address (clients behind a NAT pool that changes addresses).
- ``hash``: ``"blake2b"`` (the default: the rendezvous above) or ``"jhash"``: the ``fields``
  hashed as the kernel's nftables ``jhash`` hashes them (:mod:`nfqlb.policies.jhash`) into
  one of SCHEDULE_SLOTS slots, each slot's backend by weighted rendezvous of the slot (a
  backend removed moves only its slots' flows). A flow lands on the same backend in nfqlb
  and in the kernel, so an offload service may let the kernel play the policy
  (``offload_scheduler = "kernel"``: its ``schedule`` is the slot table). The whole
  address only (no prefixes: the kernel hashes what the packet holds).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FIELDS, SCHEDULE_SLOTS, FlowKey, Options, PolicyOptionError, live
from nfqlb.policies.hashing import key_function, rendezvous
from nfqlb.policies.jhash import JhashTable
from nfqlb.values import Backend

_OPTIONS = ("fields", "src_prefix", "src_prefix6", "hash")
HASHES = ("blake2b", "jhash")


def by_jhash(opts: Options) -> bool:
    """Whether the ``hash`` option asks for the kernel's jhash."""
    how = opts.text("hash", "blake2b")
    if how not in HASHES:
        raise PolicyOptionError("hash", f"{how!r} is not one of {', '.join(HASHES)}")
    return how == "jhash"


def rendezvous_slots(backends: Sequence[Backend], slots: int) -> list[Backend]:
    """A slot table: each slot's backend by weighted rendezvous of the slot's number."""
    out = []
    for i in range(slots):
        b = rendezvous(i.to_bytes(4, "big"), backends)
        assert b is not None
        out.append(b)
    return out


def jhash_slots(fields: Sequence[str]) -> JhashTable:
    """``fields`` hashed by the kernel's jhash into SCHEDULE_SLOTS rendezvous slots."""
    return JhashTable(fields, lambda n: SCHEDULE_SLOTS, rendezvous_slots)


def source_hash(options: Mapping[str, Any], rng: random.Random) -> SourceHash | JhashTable:
    """The factory of ``source_hash``: by its ``hash`` option."""
    opts = Options(options, _OPTIONS)
    if not by_jhash(opts):
        return SourceHash(options, rng)
    for name in ("src_prefix", "src_prefix6"):
        if opts.has(name):
            raise PolicyOptionError(name, 'not with hash = "jhash": the kernel hashes the '
                                    "client's whole address")
    return jhash_slots(opts.subset("fields", ("src",), FIELDS))


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
