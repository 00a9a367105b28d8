"""Hashing shared by the hash policies, and ``flow_hash`` (rendezvous over the whole flow).

Every hash here is blake2b, never Python's randomised ``hash``: the same key and the same
backend set give the same backend in every process and after every restart. Rendezvous
(highest random weight) hashing honours weights and moves, when a backend is removed, only
the keys that were on it; it costs one hash per backend per new flow (see ``maglev`` for O(1)).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nfqlb.policies.base import FIELDS, FlowKey, Options, live
from nfqlb.values import Backend


def flow_bytes(flow: FlowKey) -> bytes:
    return (bytes((flow.protocol,)) + flow.src_packed + flow.sport.to_bytes(2, "big")
            + flow.dst.packed + flow.dport.to_bytes(2, "big"))


def hash64(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def key_function(fields: Sequence[str], src_prefix: int = 32,
                 src_prefix6: int = 128) -> Callable[[FlowKey], bytes]:
    """What to hash of a flow: the named ``fields`` (out of FIELDS), the source address cut
    to ``src_prefix`` (IPv4) or ``src_prefix6`` (IPv6) bits."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown flow fields {sorted(unknown)}")
    if tuple(fields) == FIELDS and src_prefix == 32 and src_prefix6 == 128:
        return flow_bytes

    def src(flow: FlowKey) -> bytes:
        a = flow.src
        bits, plen = (32, src_prefix) if a.version == 4 else (128, src_prefix6)
        if plen == bits:
            return a.packed
        cut = bits - plen
        return ((int(a) >> cut) << cut).to_bytes(bits // 8, "big") + bytes((plen,))

    parts: list[Callable[[FlowKey], bytes]] = []
    for name in fields:
        if name == "protocol":
            parts.append(lambda f: bytes((f.protocol,)))
        elif name == "src":
            parts.append(src)
        elif name == "sport":
            parts.append(lambda f: f.sport.to_bytes(2, "big"))
        elif name == "dst":
            parts.append(lambda f: f.dst.packed)
        else:
            parts.append(lambda f: f.dport.to_bytes(2, "big"))
    if len(parts) == 1:
        return parts[0]
    return lambda f: b"".join(p(f) for p in parts)


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


def hash_choice(flow: FlowKey, backends: Sequence[Backend]) -> Backend | None:
    """The backend ``flow_hash`` gives ``flow`` among ``backends`` (weight 0 never chosen).

    The core adopts a mid-flow packet of a flow it has no entry for on it when the service's
    policy is not consistent (has no ``choose_consistent``): with the same backends it lands
    where ``flow_hash`` would have placed the flow, on any node.
    """
    return rendezvous(flow_bytes(flow), backends)


class FlowHash:
    """Policy ``flow_hash``: rendezvous hash of the whole flow (protocol, addresses, ports).

    Consistent (``choose_consistent``): with ``unknown_flow = "hash"`` the same hash adopts
    mid-flow packets after a restart or on another node, so established connections survive
    while the backend set is unchanged. One option, ``hash``: ``"blake2b"`` (the default)
    or ``"jhash"`` (the five fields hashed as the kernel's nftables does, into a slot table:
    source_hash with ``hash = "jhash"`` and every field, which the kernel can play).
    """

    def __init__(self, options: Mapping[str, Any], rng: random.Random) -> None:
        Options(options, ("hash",))
        self._backends: tuple[Backend, ...] = ()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._backends = live(backends)

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        return hash_choice(flow, self._backends)

    def choose_consistent(self, flow: FlowKey) -> Backend | None:
        return hash_choice(flow, self._backends)
