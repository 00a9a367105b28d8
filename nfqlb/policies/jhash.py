"""The kernel's Jenkins hash as nftables' ``jhash`` expression computes it, in Python.

``source_hash`` with ``hash = "jhash"`` places a client by ``slot_of(address)``: the same
slot the kernel's ``jhash ip saddr mod SLOTS seed SEED`` gives the client's packets, so that
nfqlb (a flow it decides through the offload queue, adopts, or replays) and the kernel
playing the policy's slot table (offload_scheduler = "kernel") send a client to the same
backend, on every node.

``jhash`` is ``include/linux/jhash.h`` (Bob Jenkins' lookup3, words read in the CPU's byte
order: little-endian, as on every machine nfqlb runs on), and ``nft_jhash_eval`` scales its
result into ``[0, modulus)`` with ``reciprocal_scale`` (a multiply and a shift, not a
remainder). The register holding ``ip saddr`` is the address's 4 bytes as on the wire (16 for
``ip6 saddr``).
"""

from __future__ import annotations

from typing import Final

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
