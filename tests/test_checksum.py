"""Internet checksum: full recomputation vs. RFC 1624 incremental updates, against scapy."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scapy.utils import checksum as scapy_checksum

from nfqlb.wire.checksum import (
    U16,
    apply,
    apply_neg,
    apply_sub,
    delta,
    full,
    update16,
    update32,
)

FAST = settings(max_examples=300, deadline=None, derandomize=True)

words = st.binary(min_size=0, max_size=64).map(lambda b: b[: len(b) // 2 * 2])


@pytest.mark.parametrize("data, expected", [
    # RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
    (bytes.fromhex("0001f203f4f5f6f7"), 0x220D),
    # A classic IPv4 header (checksum field zeroed); its checksum is b861.
    (bytes.fromhex("450000730000400040110000c0a80001c0a800c7"), 0xB861),
    (b"\xff\xff", 0x0000),
    (b"\x01", 0xFEFF),  # odd length: padded with a zero byte
])
def test_full_known_values(data: bytes, expected: int) -> None:
    assert full(data) == expected


@FAST
@given(st.binary(max_size=1500))
def test_full_agrees_with_scapy(data: bytes) -> None:
    assert full(data) == scapy_checksum(data)


@FAST
@given(st.binary(max_size=200), st.integers(0, 0xFFFF))
def test_full_initial_is_a_prefix_sum(data: bytes, initial: int) -> None:
    # ``initial`` is a partial sum (e.g. a pseudo-header) added before complementing.
    data = data[: len(data) // 2 * 2]
    assert full(data, initial) == scapy_checksum(U16[initial] + data)


@FAST
@given(st.data(), st.binary(min_size=2, max_size=200))
def test_apply_delta_equals_full_recompute(data: st.DataObject, buf: bytes) -> None:
    buf = buf[: len(buf) // 2 * 2]
    start = data.draw(st.integers(0, len(buf) // 2 - 1), "start word") * 2
    end = data.draw(st.integers(start // 2 + 1, len(buf) // 2), "end word") * 2
    new_run = data.draw(st.binary(min_size=end - start, max_size=end - start), "new run")
    new = buf[:start] + new_run + buf[end:]
    # A buffer of all zero words has two encodings of its checksum (0xFFFF from ``full``,
    # 0x0000 from an update): one's-complement zero. A pseudo-header is never all zero.
    assume(any(new))
    assert apply(full(buf), delta(buf[start:end], new_run)) == full(new)
    assert apply(full(buf), delta(buf[start:end], new_run)) == scapy_checksum(new)


@FAST
@given(st.binary(min_size=4, max_size=100), st.integers(0, 0xFFFF))
def test_update16(buf: bytes, new_word: int) -> None:
    buf = buf[: len(buf) // 2 * 2]
    i = len(buf) // 4 * 2
    old_word = struct.unpack_from("!H", buf, i)[0]
    new = buf[:i] + U16[new_word] + buf[i + 2:]
    assume(any(new))
    assert update16(full(buf), old_word, new_word) == scapy_checksum(new)


@FAST
@given(st.binary(min_size=4, max_size=100), st.integers(0, 0xFFFFFFFF))
def test_update32(buf: bytes, new_word: int) -> None:
    buf = buf[: len(buf) // 2 * 2]
    i = (len(buf) - 4) // 4 * 2
    old_word = struct.unpack_from("!I", buf, i)[0]
    new = buf[:i] + struct.pack("!I", new_word) + buf[i + 4:]
    assume(any(new))
    assert update32(full(buf), old_word, new_word) == scapy_checksum(new)


def test_update32_on_an_ip_header() -> None:
    hdr = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    csum = full(hdr)
    new_dst = bytes([198, 18, 1, 2])
    got = update32(csum, struct.unpack_from("!I", hdr, 16)[0], struct.unpack("!I", new_dst)[0])
    hdr[16:20] = new_dst
    assert got == scapy_checksum(bytes(hdr))
    hdr[10:12] = U16[got]
    assert scapy_checksum(bytes(hdr)) == 0  # the header verifies


@FAST
@given(words, words)
def test_delta_is_reversible(a: bytes, b: bytes) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    assume(n and any(a) and any(b))
    c = full(a)
    assert apply(apply(c, delta(a, b)), delta(b, a)) == c


def test_delta_rejects_uneven_runs() -> None:
    with pytest.raises(ValueError):
        delta(b"\0\0", b"\0\0\0\0")
    with pytest.raises(ValueError):
        delta(b"\0\0\0", b"\0\0\0")


def test_u16_table() -> None:
    assert len(U16) == 65536
    assert U16[0] == b"\0\0" and U16[0x1234] == b"\x12\x34" and U16[0xFFFF] == b"\xff\xff"


@FAST
@given(st.integers(min_value=1, max_value=18).flatmap(
    lambda n: st.tuples(st.binary(min_size=2 * n, max_size=2 * n),
                        st.binary(min_size=2 * n, max_size=2 * n))))
def test_flow_deltas_by_integer_arithmetic_equal_delta(pair: tuple[bytes, bytes]) -> None:
    """The flow table computes a rewrite's delta as the difference of the runs read as
    big-endian integers, mod 0xFFFF (nfqlb.flows.res_delta): the same as ``delta`` whenever
    the new run is not all zeros (it always holds an address there)."""
    from nfqlb.flows import res_delta

    old, new = pair
    assume(any(new))
    w = int.from_bytes
    assert res_delta(w(new, "big") - w(old, "big")) == delta(old, new)
    assert res_delta(w(old, "big") - w(new, "big")) == delta(new, old)


def test_one_step_updates_equal_apply() -> None:
    """``apply_sub`` and ``apply_neg`` (what the packet path computes, inline) give what
    ``apply`` gives with the delta and with its negation (``nfqlb.flows.rev_delta``): every
    checksum value against the edge deltas and some others, every delta against the edge
    checksum values (0 and 0xFFFF, both representations of zero, among them)."""
    from nfqlb.flows import rev_delta

    rng = random.Random(10)
    deltas = [1, 2, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF] + rng.sample(range(1, 0x10000), 6)
    pairs = [(c, d) for d in deltas for c in range(0x10000)]
    pairs += [(c, d) for c in (0, 1, 0x8000, 0xFFFE, 0xFFFF) for d in range(1, 0x10000)]
    assert [(c, d) for c, d in pairs if apply_sub(c, d) != apply(c, d)] == []
    assert [(c, d) for c, d in pairs if apply_neg(c, d) != apply(c, rev_delta(d))] == []
