"""The fullnat port pool on its own: ports unique per backend endpoint, handed out lazily in
the order of one FIFO (the ports never used first, lowest first, then the ones given back,
oldest first), ports of an earlier pool skipped until their flows give them."""

from __future__ import annotations

from nfqlb.snat import PortPool

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
