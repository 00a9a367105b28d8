"""The fullnat port pool on its own: ports unique per backend endpoint, handed out lazily in
the order of one FIFO (the ports never used first, lowest first, then the ones given back,
oldest first), ports of an earlier pool skipped until their flows give them."""

from __future__ import annotations

from nfqlb.snat import PortPool, timewait_allows

A, B = b"\xc6\x12\x01\x02\x1f\x90", b"\xc6\x12\x01\x03\x1f\x90"  # 198.18.1.2/.3 port 8080


def test_ports_are_per_endpoint_in_fifo_order() -> None:
    pool = PortPool(100, 103)
    assert [pool.take(A) for _ in range(3)] == [100, 101, 102]
    assert [pool.take(B) for _ in range(2)] == [100, 101]  # the same ports, another backend
    pool.give(101, A)
    pool.give(100, A)
    assert [pool.take(A) for _ in range(4)] == [103, 101, 100, None]  # fresh first, then FIFO
    assert pool.exhausted == 1
    assert pool.available(A) == 0 and pool.available(B) == 2
    assert pool.take(B) == 102


def test_an_endpoint_costs_what_it_took_not_the_range() -> None:
    pool = PortPool(1, 65535)
    for _ in range(10):
        pool.take(A)
    ports = pool._endpoints[A]
    assert ports.next == 11 and len(ports.free) == 0
    assert B not in pool._endpoints and pool.available(B) == 65535


def test_ports_of_an_earlier_pool_wait_for_their_flows() -> None:
    pool = PortPool(10, 14, in_use={A: {10, 12, 14}})
    assert pool.available(A) == 2 and pool.available(B) == 5
    pool.give(12, A)  # its flow ended before the cursor got there: the cursor hands it out
    assert [pool.take(A) for _ in range(3)] == [11, 12, 13]
    pool.give(10, A)  # behind the cursor: it joins the FIFO
    assert pool.take(A) == 10 and pool.take(A) is None  # 14 is still held
    pool.give(14, A)
    assert pool.take(A) == 14


def test_a_port_outside_the_range_is_not_taken_in() -> None:
    pool = PortPool(10, 11)
    pool.take(A)
    pool.take(A)
    pool.give(9, A)
    assert pool.take(A) is None


def test_victim_order_closed_before_half_open() -> None:
    pool = PortPool(10, 11)
    assert pool.victim(A) is None
    half = pool.reclaim_list(A, closed=False)
    closed = pool.reclaim_list(A, closed=True)
    half["h1"] = None
    half["h2"] = None
    assert pool.victim(A) == "h1"
    closed["c1"] = None
    assert pool.victim(A) == "c1" and pool.victim(B) is None
    del closed["c1"]
    half.move_to_end("h1")
    assert pool.victim(A) == "h2"


# ---------------------------------------------------------------- TIME_WAIT at the backend

def _syn(tsval: int | None, seq: int = 1) -> tuple[bytes, int]:
    """A SYN's TCP header as the pool reads it (at offset 0): sequence number, timestamps."""
    opts = b"" if tsval is None else b"\x01\x01\x08\x0a" + tsval.to_bytes(4, "big") + bytes(4)
    doff = (20 + len(opts)) // 4
    return (bytes(4) + seq.to_bytes(4, "big") + bytes(4) + bytes([doff << 4, 0x02])
            + bytes(6) + opts, 0)


def test_timewait_allows_as_tcp_timewait_state_process() -> None:
    """(ts_recent, rcv_nxt) of the old connection, (TSval, seq) of the SYN -> taken? Each
    row worked out by hand from the kernel's rule: PAWS refuses an older TSval, a newer one
    is taken, an equal one (or no timestamps on either side) leaves it to the sequence
    number, which must be past rcv_nxt (all mod 2**32)."""
    rows = [
        ((1000, 50), (2000, 10), True),  # newer TSval, whatever the sequence number
        ((1000, 50), (999, 10**6), False),  # older TSval: PAWS, whatever the sequence number
        ((1000, 50), (1000, 51), True),  # equal TSval: sequence number past rcv_nxt
        ((1000, 50), (1000, 50), False),  # ... and not past it
        ((0xFFFFFFF0, 50), (5, 10), True),  # newer across the wrap
        ((5, 50), (0xFFFFFFF0, 10**6), False),  # older across the wrap
        ((-1, 50), (2000, 51), True),  # the old connection had no timestamps: seq decides
        ((-1, 50), (2000, 49), False),
        ((1000, 50), (-1, 51), True),  # the SYN has none: seq decides
        ((1000, 50), (-1, 0xFFFFFFF0), False),  # seq before rcv_nxt across the wrap
        ((0, 50), (0x90000000, 10), False),  # ts_recent 0 never rejects; then seq decides
        ((0, 50), (0x90000000, 60), True),
    ]
    for (ts_recent, rcv_nxt), (tsval, seq), want in rows:
        assert timewait_allows((0.0, ts_recent, rcv_nxt), tsval, seq) is want, \
            (ts_recent, rcv_nxt, tsval, seq)


def test_choose_skips_ports_whose_timewait_refuses_the_syn() -> None:
    pool = PortPool(10, 13)
    assert [pool.take(A) for _ in range(4)] == [10, 11, 12, 13]
    pool.give(10, A, (0.0, 5000, 1))  # refuses TSvals up to 5000
    pool.give(11, A, (0.0, 100, 1))
    pool.give(12, A)  # no TIME_WAIT (a RST, or the client closed first)
    assert pool.choose(A, 1.0, _syn(1000)) == (11, None, False)
    assert pool.choose(A, 1.0, _syn(1000)) == (12, None, False)
    assert pool.choose(A, 60.0, _syn(1000)) == (10, None, False)  # its TIME_WAIT is over
    pool.give(10, A, (0.0, 5000, 1))
    assert pool.choose(A, 1.0, None) == (10, None, False)  # not a SYN: the oldest, as before
    pool.give(10, A, (0.0, 5000, 1))
    assert pool.take(A) == 10


def test_choose_prefers_what_the_backend_takes_then_the_oldest() -> None:
    pool = PortPool(10, 11)
    pool.take(A)
    pool.take(A)
    closed = pool.reclaim_list(A, closed=True)
    closed["old"] = (0.0, 5000, 1)  # the least recently used: refuses
    closed["new"] = (0.0, 100, 1)
    assert pool.choose(A, 1.0, _syn(1000)) == (0, "new", False)
    assert pool.choose(A, 1.0, _syn(10)) == (0, "old", True)  # both refuse: the oldest
    assert pool.choose(A, 1.0, None) == (0, "old", False)  # not a SYN: nothing to judge
    del closed["old"], closed["new"]
    pool.give(11, A, (0.0, 5000, 1))  # a free port the backend refuses ...
    closed["c"] = (0.0, 100, 1)  # ... and a closed flow it takes: the flow
    assert pool.choose(A, 1.0, _syn(1000)) == (0, "c", False)
    del closed["c"]
    assert pool.choose(A, 1.0, _syn(1000)) == (11, None, True)  # refused, but free
    exhausted = pool.exhausted
    assert pool.choose(A, 1.0, _syn(1000)) == (0, None, False)  # nothing left at all
    assert pool.exhausted == exhausted + 1
