"""The kernel's Jenkins hash as nftables' ``jhash`` expression computes it, in Python, and
the slot tables the hash policies build on it.

A hash policy with ``hash = "jhash"`` (source_hash, flow_hash, maglev, their aliases) places a
flow by ``slot_of(kernel_key(flow))``: the same slot the kernel's ``jhash <fields> mod SLOTS
seed SEED`` gives the flow's first packet, so that nfqlb (a flow it decides through the
offload queue, adopts, or replays) and the kernel playing the policy's slot table
(offload_scheduler = "kernel") send a flow to the same backend, on every node.

``jhash`` is ``include/linux/jhash.h`` (Bob Jenkins' lookup3, words read in the CPU's byte
order: little-endian, as on every machine nfqlb runs on), and ``nft_jhash_eval`` scales its
result into ``[0, modulus)`` with ``reciprocal_scale`` (a multiply and a shift, not a
remainder). What it hashes is the registers the fields were loaded into: one field alone is
its bytes as on the wire (``ip saddr`` 4, ``ip6 saddr`` 16, ``th sport`` 2, ``meta l4proto``
1); in a concatenation each field starts a 32-bit register, its bytes followed by zeros up
to the register's end (checked against nftables 1.0.6 on these machines: tests/test_schedules.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from nfqlb.policies.base import FIELDS, FlowKey, PolicyOptionError, live
from nfqlb.values import Backend

INITVAL: Final = 0xDEADBEEF
SEED: Final = 0x6E66716C  # "nfql": fixed, so that every node hashes alike
_M: Final = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def jhash(key: bytes, initval: int) -> int:
    """``jhash(key, len(key), initval)`` of the kernel."""
    length = len(key)
    a = b = c = (INITVAL + length + initval) & _M
    k = 0
    while length > 12:  # __jhash_mix over each 12 bytes but the last
        a = (a + int.from_bytes(key[k:k + 4], "little")) & _M
        b = (b + int.from_bytes(key[k + 4:k + 8], "little")) & _M
        c = (c + int.from_bytes(key[k + 8:k + 12], "little")) & _M
        for r1, r2, r3 in ((4, 6, 8), (16, 19, 4)):
            a = ((a - c) & _M) ^ _rol(c, r1)
            c = (c + b) & _M
            b = ((b - a) & _M) ^ _rol(a, r2)
            a = (a + c) & _M
            c = ((c - b) & _M) ^ _rol(b, r3)
            b = (b + a) & _M
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = key[k:] + bytes(12 - length)  # (the switch's fall-through adds each byte present)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    for r1, r2, r3 in ((14, 11, 25), (16, 4, 14)):  # __jhash_final
        c = ((c ^ b) - _rol(b, r1)) & _M
        a = ((a ^ c) - _rol(c, r2)) & _M
        b = ((b ^ a) - _rol(a, r3)) & _M
    return ((c ^ b) - _rol(b, 24)) & _M


def slot_of(key: bytes, slots: int, seed: int = SEED) -> int:
    """``jhash <key> mod <slots> seed <seed>``: the slot nftables gives ``key``."""
    return (jhash(key, seed) * slots) >> 32


#: The nftables expression that loads each flow field ({ip}: "ip" or "ip6").
NFT_FIELDS: Final = {"protocol": "meta l4proto", "src": "{ip} saddr", "sport": "th sport",
                     "dst": "{ip} daddr", "dport": "th dport"}


def _field(name: str, padded: bool) -> Callable[[FlowKey], bytes]:
    pad = bytes(3) if padded else b""
    port_pad = bytes(2) if padded else b""
    if name == "protocol":
        return lambda f: bytes((f.protocol,)) + pad
    if name == "src":
        return lambda f: f.src_packed
    if name == "sport":
        return lambda f: f.sport.to_bytes(2, "big") + port_pad
    if name == "dst":
        return lambda f: f.dst.packed
    return lambda f: f.dport.to_bytes(2, "big") + port_pad


def kernel_key(fields: Sequence[str]) -> Callable[[FlowKey], bytes]:
    """The bytes the kernel's ``jhash`` of ``nft_expression(fields)`` hashes for a flow."""
    if not fields or set(fields) - set(FIELDS):
        raise ValueError(f"flow fields {list(fields)}: not a non-empty subset of {FIELDS}")
    parts = [_field(name, len(fields) > 1) for name in fields]
    if len(parts) == 1:
        return parts[0]
    return lambda f: b"".join([p(f) for p in parts])


def nft_expression(fields: Sequence[str], ip: str) -> str:
    """``jhash <fields>`` without its modulus: the fields as nftables loads them."""
    return "jhash " + " . ".join(NFT_FIELDS[name].format(ip=ip) for name in fields)


Build = Callable[[Sequence[Backend], int], list[Backend]]


class JhashTable:
    """A hash policy the kernel can play: a table of slots, each a backend (``build`` fills
    it from the backends that may take flows), a flow's slot the kernel's jhash of its
    ``fields``. ``size(n)`` is the number of slots for ``n`` configured backends, as the
    rules that look the table up compute it (nfqlb.policies.kernel_hash)."""

    def __init__(self, fields: Sequence[str], size: Callable[[int], int], build: Build) -> None:
        try:
            self._key = kernel_key(fields)
        except ValueError as exc:
            raise PolicyOptionError("fields", str(exc)) from None
        self.fields = tuple(fields)
        self._size = size
        self._build = build
        self._alive: tuple[Backend, ...] = ()
        self._table: list[Backend] = []

    @property
    def table_size(self) -> int:
        return len(self._table)

    def slots(self, backends: int) -> int:
        """The table's slots with ``backends`` configured (those that may not take flows
        counted too: the rules know the configuration, not the health)."""
        return self._size(backends)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self._alive = alive = live(backends)
        self._table = self._build(alive, self._size(len(backends))) if alive else []

    def choose(self, flow: FlowKey, now: float) -> Backend | None:
        table = self._table
        return table[slot_of(self._key(flow), len(table))] if table else None

    def choose_consistent(self, flow: FlowKey) -> Backend | None:
        """Consistent: the kernel's jhash of the flow's fields, a table built from the
        backends alone."""
        table = self._table
        return table[slot_of(self._key(flow), len(table))] if table else None

    def schedule(self, slots: int) -> list[Backend]:
        """The slot table (slot i: the backend of the flows the kernel hashes to i)."""
        if slots == len(self._table) or not self._table:
            return list(self._table)
        return self._build(self._alive, slots)
