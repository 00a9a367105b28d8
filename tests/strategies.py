"""Hypothesis strategies and settings shared by the engine's property tests.

``PROPS`` is derandomized (every run draws the same examples, seeded by the test's source), so
a failure found once is found again. The mutation strategy draws edits that ``apply_mutations``
performs; each test then decides how to make lengths and checksums agree again.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROPS = settings(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ports = st.integers(1, 65535)
clients6 = st.integers(1, 2**64 - 1).map(
    lambda i: str(ipaddress.IPv6Address("2001:db8::") + i))
clients4 = st.integers(2, 2**16 - 1).map(
    lambda i: str(ipaddress.IPv4Address("198.18.0.0") + i))

# ---------------------------------------------------------------- TCP flags and options

TCP_FLAGS = ["A", "PA", "FA", "R", "RA", "S", "SA", "UA", "PAU", "AE", "AC", "FPA", ""]

tcp_option = st.one_of(
    st.tuples(st.just("NOP"), st.none()),
    st.tuples(st.just("WScale"), st.integers(0, 14)),
    st.tuples(st.just("SAckOK"), st.just(b"")),
    st.tuples(st.just("Timestamp"), st.tuples(st.integers(0, 2**32 - 1),
                                               st.integers(0, 2**32 - 1))),
    st.tuples(st.just("SAck"), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
)
_OPT_LEN = {"NOP": 1, "WScale": 3, "SAckOK": 2, "Timestamp": 10, "SAck": 10, "MSS": 4}


@st.composite
def tcp_options(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Up to five options, sometimes an MSS among them, at most the 40 bytes TCP has room for."""
    opts = draw(st.lists(tcp_option, max_size=5))
    if draw(st.booleans()):
        opts.insert(draw(st.integers(0, len(opts))), ("MSS", draw(st.integers(0, 65535))))
    while sum(_OPT_LEN[o[0]] for o in opts) > 40:
        opts.pop()
    return opts


# ---------------------------------------------------------------- mutations of good packets

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
)
#: Rounds of (mutations, make the length field agree, make the checksums agree).
mutations = st.lists(st.tuples(st.lists(mutation, min_size=1, max_size=3), st.booleans(),
                               st.booleans()), max_size=6)


def apply_mutations(data: bytes, muts: list[tuple[str, int, int]]) -> bytearray:
    """``data`` with each drawn ``mutation`` applied in turn: flip a byte, cut, extend."""
    b = bytearray(data)
    for kind, a, v in muts:
        if kind == "flip" and b:
            b[a % len(b)] ^= v
        elif kind == "cut":
            del b[a % (len(b) + 1):]
        elif kind == "extend":
            b += bytes([v]) * a
    return b
