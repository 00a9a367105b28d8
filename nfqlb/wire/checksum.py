"""Internet checksum (RFC 1071) and incremental updates (RFC 1624, eqn. 3).

``full`` recomputes over a buffer; ``delta`` precomputes the one's-complement difference
between an old and a new run of 16-bit words (done once per flow direction);
``apply`` folds a precomputed delta into a checksum on the per-packet path.

Given a checksum that was fully computed, ``apply`` yields exactly what ``full`` would
(both land in 0..0xFFFE), so rewrites compare byte-exact with scapy's recomputation.

``sum_words`` is the sum over a whole 64 KiB GSO packet, the one place where nfqlb sums a
payload (a rewritten packet the kernel held with its checksum partial, delivered to a local
process: see :mod:`nfqlb.wire.rewrite`). There numpy's vector sum takes about 6 µs where the
best pure-Python sum (big integers) takes about 70, most of a local-mode upload's time per
packet; without numpy the big-integer sum is used, with the same result.
"""

from __future__ import annotations

import struct
from typing import Final

try:
    import numpy
except ImportError:  # a declared dependency; without it sums are exact, only slower
    numpy = None  # type: ignore[assignment]

#: 2-byte big-endian encodings of every 16-bit value: an index beats int.to_bytes per packet.
U16: Final[tuple[bytes, ...]] = tuple(struct.pack("!H", i) for i in range(65536))


def fold(s: int) -> int:
    """Fold a sum of 16-bit words to 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def sum16(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of ``data`` as big-endian 16-bit words (odd length zero-padded)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


_MASKS: dict[int, int] = {}  # 2**h - 1 for the few split points h = 16 * 2**k in use

#: Length from which :func:`sum_words` sums with numpy (below it, the call costs more than
#: the big-integer sum: about 1.2 against 1.9 µs at 400 bytes, 1.7 against 3.3 at 1000).
VECTOR_FROM: Final = 1024


def sum_words(data: bytes | bytearray | memoryview) -> int:
    """What :func:`sum16` gives (0 only for all-zero data, else 1..0xFFFF), fast on long
    data: :func:`sum_words_vector` from :data:`VECTOR_FROM` bytes when numpy is there,
    else :func:`sum_words_int`."""
    if len(data) >= VECTOR_FROM and numpy is not None:
        return sum_words_vector(data)
    return sum_words_int(data)


def sum_words_vector(data: bytes | bytearray | memoryview) -> int:
    """:func:`sum16` with numpy: the data's whole 32-bit words read little-endian and added
    in 64 bits (fewer than 2**32 words of at most 2**32 - 1 stay below 2**64: nothing is
    lost to overflow), then the last 0-3 bytes as big-endian words. A 32-bit word is congruent to
    the sum of its two 16-bit halves modulo 0xFFFF (2**16 = 1 mod 0xFFFF), and read
    little-endian each half is a word of the data with its bytes swapped; a one's-complement
    sum of byte-swapped words is the byte-swapped sum (RFC 1071, 2(B)), so the folded sum
    swapped back is the data's."""
    n = len(data)
    body = n & ~3
    s = int(numpy.add.reduce(numpy.frombuffer(data, "<u4", body >> 2), dtype=numpy.uint64))
    s = s % 0xFFFF or (0xFFFF if s else 0)
    s = (s & 0xFF) << 8 | s >> 8
    if body < n:
        s = fold(s + sum_words_int(memoryview(data)[body:]))
    return s


def sum_words_int(data: bytes | bytearray | memoryview) -> int:
    """What :func:`sum16` gives, in a few big-integer steps instead of one Python step per
    word: the bytes read as one big-endian number are congruent to
    the sum of their 16-bit words modulo 0xFFFF (2**16 = 1 mod 0xFFFF), so folding the
    number (high part + low part, split at h = 16 * 2**k bits, the largest below its length)
    keeps the sum, and a last ``% 0xFFFF`` finishes it. A sum that is a non-zero multiple of
    0xFFFF is 0xFFFF, as end-around carry leaves it. Split points are powers of two so that
    their masks, kept, are few."""
    x = int.from_bytes(data, "big")
    if len(data) & 1:
        x <<= 8  # the odd byte is the high half of a last word
    masks = _MASKS
    while x >> 64:
        h = 16 << (((x.bit_length() - 1) >> 4).bit_length() - 1)
        m = masks.get(h)
        if m is None:
            m = masks[h] = (1 << h) - 1
        x = (x >> h) + (x & m)
    return x % 0xFFFF or (0xFFFF if x else 0)


def full(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value for ``data`` (with its checksum field zeroed), plus ``initial``."""
    return ~fold(sum16(data) + initial) & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """Precomputed difference ~m + m' over equally long, 16-bit aligned runs of words."""
    if len(old) != len(new) or len(old) % 2:
        raise ValueError("delta needs two runs of whole 16-bit words of the same length")
    return fold(sum16(new) + (~sum16(old) & 0xFFFF))


def apply(csum: int, d: int) -> int:
    """HC' = ~(~HC + delta): update checksum ``csum`` by precomputed delta ``d``."""
    s = (~csum & 0xFFFF) + d
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def apply_sub(csum: int, d: int) -> int:
    """``apply(csum, d)`` in one step, for a delta ``d`` in 1..0xFFFF (``res_delta``'s): with
    ``~csum = 0xFFFF - csum``, the sum ``0xFFFF - csum + d`` folds to ``d - csum`` when
    ``d > csum`` (so HC' is ``csum - d + 0xFFFF``) and stays itself otherwise (HC' is
    ``csum - d``): ``(csum - d) mod 0xFFFF`` either way. The packet path inlines it."""
    return (csum - d) % 0xFFFF


def apply_neg(csum: int, d: int) -> int:
    """``apply(csum, D)`` for ``D`` the negation of ``d`` (``0xFFFF - d``, or 0xFFFF when
    ``d`` is 0xFFFF: the delta that undoes ``d``), in one step: ``(csum + d) mod 0xFFFF``,
    as ``apply_sub`` with ``-d``. The packet path inlines it for replies."""
    return (csum + d) % 0xFFFF


def update16(csum: int, old: int, new: int) -> int:
    """Update ``csum`` for one 16-bit word changing from ``old`` to ``new``."""
    return apply(csum, fold((~old & 0xFFFF) + new))


def update32(csum: int, old: int, new: int) -> int:
    """Update ``csum`` for one 32-bit word (e.g. an IPv4 address) changing."""
    return apply(csum, fold((~old >> 16 & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)))
