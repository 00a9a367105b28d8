"""The connection table: TCP states, per-state timeouts, lazy expiry, removal of both keys."""

from __future__ import annotations

import gc
import itertools
import sys

import pytest
from helpers import CLIENT, VIP, Conversation, engine, service, tcp

from nfqlb import native
from nfqlb.config import Timeouts, parse_config
from nfqlb.engine import ACCEPT, DROP
from nfqlb.flows import (
    REUSABLE,
    TRANSITIONS,
    Flow,
    FlowTable,
    TcpEvent,
    TcpState,
    tcp_event,
    timeouts_by_state,
)
from nfqlb.services import BackendRuntime
from nfqlb.wire.checksum import delta

S, E = TcpState, TcpEvent
OPEN = {S.SYN_SENT, S.SYN_RECV, S.ESTABLISHED, S.ADOPTED, S.ADOPTED_REPLY}
# distinct values, so a state mapped to the wrong timeout shows
T = {"syn": 6.0, "tcp": 90.0, "tcp_fin": 12.0, "tcp_close": 1.0, "udp": 30.0}
TIMEOUTS = {"timeouts": T}


def expected_next(state: TcpState, event: TcpEvent) -> TcpState:
    """The transition rules of the flows module docstring, written out independently."""
    if state is S.UDP:
        return state
    if event is E.RST:
        return S.CLOSED
    if state is S.SYN_SENT and event is E.SYNACK:
        return S.SYN_RECV
    if state is S.SYN_RECV and event in (E.ACK, E.REPLY):
        return S.ESTABLISHED
    if (state, event) in ((S.ADOPTED, E.REPLY), (S.ADOPTED_REPLY, E.ACK)):
        return S.ESTABLISHED  # an adopted flow is established once the other side answers
    if state in OPEN and event is E.FIN_CLIENT:
        return S.FIN_CLIENT
    if state in OPEN and event is E.FIN_SERVER:
        return S.FIN_SERVER
    if (state, event) in ((S.FIN_CLIENT, E.FIN_SERVER), (S.FIN_SERVER, E.FIN_CLIENT)):
        return S.CLOSING
    return state


@pytest.mark.parametrize("state, event", list(itertools.product(TcpState, TcpEvent)))
def test_transition_table(state: TcpState, event: TcpEvent) -> None:
    assert TRANSITIONS.get((state, event), state) is expected_next(state, event)


def test_reusable_states() -> None:
    """A client SYN starts a new flow on a flow closing in any way (one FIN, both, RST)."""
    assert REUSABLE == {S.FIN_CLIENT, S.FIN_SERVER, S.CLOSING, S.CLOSED}


@pytest.mark.parametrize("flags", range(256))
@pytest.mark.parametrize("is_reply", [False, True])
def test_tcp_event_classification(flags: int, is_reply: bool) -> None:
    fin, syn, rst, ack = flags & 1, flags & 2, flags & 4, flags & 0x10
    if rst:
        want = E.RST
    elif syn:
        want = E.SYNACK if ack else E.SYN
    elif fin:
        want = E.FIN_SERVER if is_reply else E.FIN_CLIENT
    else:
        want = E.REPLY if is_reply else E.ACK
    assert tcp_event(flags, is_reply) is want


def test_timeouts_by_state() -> None:
    by = timeouts_by_state(Timeouts(**T))
    assert by[S.SYN_SENT] == by[S.SYN_RECV] == 6.0
    assert by[S.ESTABLISHED] == 90.0
    assert by[S.FIN_CLIENT] == by[S.FIN_SERVER] == 12.0
    assert by[S.CLOSING] == by[S.CLOSED] == 1.0
    assert by[S.UDP] == 30.0
    assert by[S.ADOPTED] == by[S.ADOPTED_REPLY] == 6.0  # until the other side answers
    assert timeouts_by_state(Timeouts())[S.ESTABLISHED] == 900.0


# ---------------------------------------------------------------- driven by packets


def _flow(eng, conv: Conversation):  # type: ignore[no-untyped-def]
    return eng.table.by_proto[6].get(_key(*conv.fwd))


def _key(src: str, dst: str, sport: int, dport: int) -> bytes:
    data = tcp(src, dst, sport, dport)
    return data[12:24]


@pytest.mark.parametrize("mode", ["local", "dnat", "fullnat"])
def test_handshake_and_close_by_packets(mode: str) -> None:
    eng = engine(service(mode), **TIMEOUTS)
    c = Conversation(eng)
    c.client("S")
    flow = _flow(eng, c)
    assert flow.state is S.SYN_SENT
    c.client("S")  # retransmission
    assert flow.state is S.SYN_SENT
    c.server("SA")
    assert flow.state is S.SYN_RECV
    c.client("A")
    assert flow.state is S.ESTABLISHED
    c.client("PA", b"GET /")
    c.server("PA", b"200 OK")
    assert flow.state is S.ESTABLISHED
    c.client("FA")
    assert flow.state is S.FIN_CLIENT
    c.server("A")
    assert flow.state is S.FIN_CLIENT
    c.server("FA")
    assert flow.state is S.CLOSING
    c.client("A")
    assert flow.state is S.CLOSING


@pytest.mark.parametrize("who", ["client", "server"])
def test_server_fin_first_then_rst(who: str) -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake()
    flow = _flow(eng, c)
    c.server("FA")
    assert flow.state is S.FIN_SERVER
    c.client("FA")
    assert flow.state is S.CLOSING
    getattr(c, who)("R")
    assert flow.state is S.CLOSED


@pytest.mark.parametrize("who", ["client", "server"])
@pytest.mark.parametrize("after", ["S", "SA", "A"])
def test_rst_in_any_open_state(who: str, after: str) -> None:
    eng = engine(service("fullnat"), **TIMEOUTS)
    c = Conversation(eng)
    for side, flags in (("client", "S"), ("server", "SA"), ("client", "A")):
        getattr(c, side)(flags)
        if flags == after:
            break
    getattr(c, who)("RA")
    assert _flow(eng, c).state is S.CLOSED


# ---------------------------------------------------------------- timeouts and expiry

def _advance(eng, now: float) -> None:  # type: ignore[no-untyped-def]
    """What the event loop does: run every timer due up to ``now``, as the engine asks."""
    while (t := eng.get_timer()) is not None and t <= now:
        eng.handle_timer(t)
    eng.handle_timer(now)


def _reach(c: Conversation, state: TcpState, now: float) -> None:
    steps = {
        S.SYN_SENT: [("client", "S")],
        S.SYN_RECV: [("client", "S"), ("server", "SA")],
        S.ESTABLISHED: [("client", "S"), ("server", "SA"), ("client", "A")],
        S.FIN_CLIENT: [("client", "S"), ("server", "SA"), ("client", "A"), ("client", "FA")],
        S.FIN_SERVER: [("client", "S"), ("server", "SA"), ("client", "A"), ("server", "FA")],
        S.CLOSING: [("client", "S"), ("server", "SA"), ("client", "A"), ("client", "FA"),
                    ("server", "FA")],
        S.CLOSED: [("client", "S"), ("server", "SA"), ("client", "A"), ("client", "R")],
    }[state]
    for side, flags in steps:
        assert isinstance(getattr(c, side)(flags, now=now), bytes)


STATE_TIMEOUT = [
    (S.SYN_SENT, 6.0), (S.SYN_RECV, 6.0), (S.ESTABLISHED, 90.0), (S.FIN_CLIENT, 12.0),
    (S.FIN_SERVER, 12.0), (S.CLOSING, 1.0), (S.CLOSED, 1.0),
]


@pytest.mark.parametrize("state, timeout", STATE_TIMEOUT, ids=[s.name for s, _ in STATE_TIMEOUT])
def test_timeout_per_state(state: TcpState, timeout: float) -> None:
    eng = engine(service("fullnat"), **TIMEOUTS)
    c = Conversation(eng)
    _reach(c, state, now=100.0)
    assert _flow(eng, c).state is state
    _advance(eng, 100.0 + timeout - 0.01)
    assert eng.stats()["flows_active"] == 1
    _advance(eng, 100.0 + timeout)
    assert eng.stats()["flows_active"] == 0


def test_udp_timeout() -> None:
    eng = engine(service("dnat", "udp"), **TIMEOUTS)
    c = Conversation(eng, proto="udp")
    assert isinstance(c.client(now=5.0), bytes)
    _advance(eng, 34.99)
    assert eng.table.active == 1
    _advance(eng, 35.0)
    assert eng.table.active == 0


def test_default_timeouts() -> None:
    eng = engine(service("dnat"), service("dnat", "udp"))
    tcp_conv, udp_conv = Conversation(eng), Conversation(eng, proto="udp", sport=5)
    tcp_conv.client("S")
    udp_conv.client()
    assert sorted(eng.table.deadline(f) for f in eng.table.flows()) == [60.0, 300.0]
    tcp_conv.server("SA")
    tcp_conv.client("A")
    assert _flow(eng, tcp_conv).state is S.ESTABLISHED
    assert eng.table.deadline(_flow(eng, tcp_conv)) == 900.0
    tcp_conv.client("FA", now=1.0)
    assert eng.table.deadline(_flow(eng, tcp_conv)) == 121.0
    tcp_conv.server("FA", now=2.0)
    assert eng.table.deadline(_flow(eng, tcp_conv)) == 12.0


def test_used_flow_lives_until_last_use_plus_timeout() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake(now=0.0)
    for t in (50.0, 100.0, 170.0):
        assert isinstance(c.client("PA", b"x", now=t), bytes)  # the fast path: only .last
        _advance(eng, t + 89.9)
        assert eng.table.active == 1, t
    _advance(eng, 260.0)
    assert eng.table.active == 0


def test_timer_never_later_than_a_deadline() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake(now=0.0)
    assert eng.get_timer() == 90.0  # exact: the established flow's own deadline
    c.client("A", now=3.0)
    assert eng.get_timer() == 93.0
    eng.handle_timer(6.0)
    assert eng.table.active == 1
    assert eng.get_timer() == 93.0
    eng.handle_timer(93.0)
    assert eng.table.active == 0
    assert eng.get_timer() is None


def test_shorter_timeout_after_state_change() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake(now=0.0)
    c.client("A", now=20.0)
    c.client("R", now=30.0)
    assert eng.get_timer() == 31.0  # exact at once: the closed flow's deadline
    _advance(eng, 30.99)
    assert eng.table.active == 1
    assert eng.get_timer() == 31.0
    _advance(eng, 31.0)
    assert eng.table.active == 0


def test_fin_shortens_then_close_shortens_again() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake(now=0.0)
    c.client("FA", now=10.0)  # FIN_CLIENT: 12 s
    _advance(eng, 21.9)
    assert eng.table.active == 1
    c.server("FA", now=21.9)  # CLOSING: 1 s
    _advance(eng, 22.89)
    assert eng.table.active == 1
    _advance(eng, 22.9)
    assert eng.table.active == 0


def test_expired_flow_leaves_both_keys() -> None:
    eng = engine(service("fullnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake(now=0.0)
    fwd_key, rev_key = _key(*c.fwd), _key(*c.back)  # type: ignore[misc]
    table = eng.table.by_proto[6]
    assert table[fwd_key] is table[rev_key]
    _advance(eng, 90.0)
    assert fwd_key not in table and rev_key not in table
    assert eng.table.flows() == [] and len(eng.table) == 0
    # with the flow gone, its packets are no longer rewritten in either direction
    assert c.client("A", now=91.0) == DROP
    assert eng.counters.drops["no_flow"] == 1
    assert c.server("A", now=91.0) == ACCEPT  # to the snat address: not a VIP


# ---------------------------------------------------------------- the table on its own

def _table_with(n: int, timeouts: Timeouts):  # type: ignore[no-untyped-def]
    cfg = parse_config({"service": [service("dnat")]})
    svc = cfg.services[0]
    table = FlowTable(timeouts)
    flows = []
    for i in range(n):
        fwd, rev = b"f%011d" % i, b"r%011d" % i
        backend = BackendRuntime(svc.backends[0], svc.vip, svc.port)
        flow = Flow(backend, 6, S.ESTABLISHED, float(i), fwd, rev)
        table.add(flow)
        flows.append(flow)
    return table, flows


def test_table_remove_and_expire_order() -> None:
    table, flows = _table_with(5, Timeouts(tcp=10.0))
    assert len(table) == 5 and len(table.by_proto[6]) == 10
    table.remove(flows[2])
    assert len(table) == 4
    assert b"f%011d" % 2 not in table.by_proto[6] and b"r%011d" % 2 not in table.by_proto[6]
    table.touch(flows[0], 7.0)  # used later: lives to 17
    gone = table.expire(13.0)
    assert [f.fwd_key for f in gone] == [b"f%011d" % i for i in (1, 3)]
    assert table.next_deadline() == 14.0
    assert [f.fwd_key for f in table.expire(100.0)] == [b"f%011d" % i for i in (4, 0)]
    assert len(table) == 0 and table.by_proto[6] == {} and table.next_deadline() is None


def test_remove_leaves_a_newer_flow_on_the_same_key() -> None:
    table, (old,) = _table_with(1, Timeouts())
    svc = parse_config({"service": [service("dnat")]}).services[0]
    new = Flow(BackendRuntime(svc.backends[1], svc.vip, svc.port), 6, S.SYN_SENT, 5.0,
               b"other-key-00", old.rev_key)
    table.add(new)
    table.remove(old)
    assert table.by_proto[6][old.rev_key] is new
    assert old.fwd_key not in table.by_proto[6]


def test_port_reuse_after_close_is_a_new_flow_in_the_table() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake()
    first = _flow(eng, c)
    c.client("FA")
    c.server("FA")
    c.client("S", now=0.5)
    second = _flow(eng, c)
    assert second is not first and second.state is S.SYN_SENT
    assert eng.table.active == 1 and not first.in_table  # gone from the table
    assert eng.stats()["flows_total"] == 2


def test_client_and_vip_are_the_keys() -> None:
    # sanity for the helpers above: the key of a packet is its address/port quadruple
    assert _key(CLIENT, VIP, 1, 2) == bytes([198, 18, 0, 2, 198, 18, 100, 1, 0, 1, 0, 2])


# ---------------------------------------------------------------- RSTs and reused ports

def _established(mode: str = "dnat"):  # type: ignore[no-untyped-def]
    """A flow past its handshake, sequence numbers as a real one: client ISN 1000, server
    ISN 5000, windows 8192 (no scaling)."""
    eng = engine(service(mode), **TIMEOUTS)
    c = Conversation(eng)
    c.client("S", seq=1000)
    c.server("SA", seq=5000, ack=1001)
    c.client("A", seq=1001, ack=5001)
    c.client("PA", b"GET /", seq=1001, ack=5001)
    c.server("PA", b"200 OK", seq=5001, ack=1006)
    return eng, c


@pytest.mark.parametrize("who, seq", [("client", 1006 + 100_000), ("client", 1006 - 9000),
                                      ("server", 5007 + 100_000), ("server", 0)])
def test_rst_outside_the_window_leaves_the_flow(who: str, seq: int) -> None:
    """The endpoints ignore it (RFC 5961), so the flow stays as it was (conntrack does the
    same); the RST itself is passed on, rewritten, for the endpoint to judge."""
    eng, c = _established()
    flow = _flow(eng, c)
    assert isinstance(getattr(c, who)("R", seq=seq % 2**32), bytes)
    assert flow.state is S.ESTABLISHED
    assert eng.counters.events["rst_out_of_window"] == 1
    _advance(eng, 60.0)  # far past the closed timeout (1 s): still there
    assert isinstance(c.client("PA", b"more", seq=1006, ack=5007, now=60.0), bytes)


@pytest.mark.parametrize("who, seq", [("client", 1006), ("client", 1006 + 4000),
                                      ("server", 5007), ("server", 5007 + 8000)])
def test_rst_in_the_window_closes_the_flow(who: str, seq: int) -> None:
    eng, c = _established()
    getattr(c, who)("R", seq=seq)
    assert _flow(eng, c).state is S.CLOSED
    assert "rst_out_of_window" not in eng.counters.events


def test_window_scale_widens_the_window_a_rst_may_fall_in() -> None:
    eng = engine(service("dnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.client("S", seq=1000, options=[("WScale", 7)])
    c.server("SA", seq=5000, ack=1001, options=[("WScale", 7)])
    c.client("A", seq=1001, ack=5001)  # window 8192 << 7 = 1 MiB from here on
    c.server("A", seq=5001, ack=1001)
    c.client("R", seq=1001 + 500_000)  # in the backend's scaled window
    assert _flow(eng, c).state is S.CLOSED


@pytest.mark.parametrize("closing", ["client FIN", "server FIN", "both FINs", "RST"])
def test_a_syn_on_a_closing_flow_starts_a_new_flow_and_choice(closing: str) -> None:
    """A client port reused while the old connection is closing (any way) gets a new flow on
    a new choice (round robin: the other backend), not the old FIN state's 120 s."""
    eng, c = _established()
    first = _flow(eng, c)
    if closing in ("client FIN", "both FINs"):
        c.client("FA", seq=1006, ack=5007)
    if closing in ("server FIN", "both FINs"):
        c.server("FA", seq=5007, ack=1007)
    if closing == "RST":
        c.client("R", seq=1006)
    assert first.state in REUSABLE
    out = c.client("S", seq=90_000, now=1.0)
    assert isinstance(out, bytes)
    second = _flow(eng, c)
    assert second is not first and second.state is S.SYN_SENT
    assert second.backend is not first.backend
    assert not first.in_table and eng.table.active == 1


# ---------------------------------------------------------------- the compact flow


@pytest.mark.parametrize("mode", ["local", "dnat", "fullnat"])
def test_a_connections_life_is_not_parsed_after_its_syn(mode: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The handshake, the teardown and the data of a known flow are rewritten from the
    offsets the fast path checks; nothing of a plain IPv4 connection goes through the full
    parse (the first SYN neither), and the outcome is the state table's."""
    import nfqlb.engine

    parsed = []
    real = nfqlb.engine.parse_ip
    monkeypatch.setattr(nfqlb.engine, "parse_ip", lambda data: parsed.append(data) or real(data))
    eng = engine(service(mode), **TIMEOUTS)
    c = Conversation(eng)
    for side, flags in (("client", "S"), ("server", "SA"), ("client", "A"),
                        ("client", "PA"), ("server", "PA"), ("client", "FA"), ("server", "FA"),
                        ("client", "A")):
        assert isinstance(getattr(c, side)(flags, b"x" if flags == "PA" else b""), bytes)
    assert _flow(eng, c).state is S.CLOSING
    assert eng.stats()["rewritten"] == 8 and parsed == []


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_a_udp_flow_is_not_parsed(mode: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import nfqlb.engine

    parsed = []
    real = nfqlb.engine.parse_ip
    monkeypatch.setattr(nfqlb.engine, "parse_ip", lambda data: parsed.append(data) or real(data))
    eng = engine(service(mode, "udp"), **TIMEOUTS)
    c = Conversation(eng, proto="udp")
    for side in ("client", "server", "client"):
        assert isinstance(getattr(c, side)(), bytes)
    assert eng.stats()["rewritten"] == 3 and eng.table.active == 1 and parsed == []


def test_both_keys_hold_the_flow_itself() -> None:
    eng = engine(service("fullnat"), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake()
    table = eng.table.by_proto[6]
    flow = table[_key(*c.fwd)]
    assert type(flow) is Flow and table[_key(*c.back)] is flow  # type: ignore[misc]
    assert flow.fwd_key == _key(*c.fwd) and flow.rev_key == _key(*c.back)  # type: ignore[misc]


@pytest.mark.parametrize("mode", ["local", "dnat", "fullnat"])
def test_what_a_flow_does_not_store_is_worked_out_exactly(mode: str) -> None:
    """A flow stores one header object for both directions and its client's deltas; its
    reply key and header, the replies' deltas, its fullnat port and its service are worked
    out from those, and agree with the packets and with the checksum module's own
    ``delta`` of the old and new bytes."""
    eng = engine(service(mode), **TIMEOUTS)
    c = Conversation(eng)
    c.handshake()
    flow = _flow(eng, c)
    assert c.back is not None
    out = c.server("A", b"x")
    assert isinstance(out, bytes)
    rev_key, key = _key(*c.back), _key(*c.fwd)
    assert flow.rev_key == rev_key and flow.rev_hdr == out[12:24]
    assert flow.fwd_hdr == rev_key[4:8] + rev_key[:4] + rev_key[10:] + rev_key[8:10]
    assert (flow.fwd_ipd, flow.fwd_l4d) == (delta(key[:8], flow.fwd_hdr[:8]),
                                            delta(key, flow.fwd_hdr))
    assert (flow.rev_ipd, flow.rev_l4d) == (delta(rev_key[:8], flow.rev_hdr[:8]),
                                            delta(rev_key, flow.rev_hdr))
    assert flow.side(True) == (flow.rev_hdr, flow.rev_ipd, flow.rev_l4d)
    assert flow.snat_port == (c.back[3] if mode == "fullnat" else 0)
    assert flow.service is eng.services.named(f"{mode}-tcp")


def test_a_flow_is_held_by_the_table_alone() -> None:
    """Nothing per backend holds a flow (its backend's flows are found by a walk of the
    table): an established flow is referred to by the table's dict (its two keys) and its
    two neighbours in its least-recently-used list, nothing else. (Counted by references:
    compiled, flows and the dict of flows are not tracked by the garbage collector, so
    ``gc.get_referrers`` does not see them.)"""
    eng = engine(service("fullnat"), **TIMEOUTS)
    convs = [Conversation(eng, sport=1000 + i) for i in range(3)]
    for c in convs:
        c.handshake()
    flow = _flow(eng, convs[1])
    assert flow.state is S.ESTABLISHED
    by_key = eng.table.by_proto[6]
    assert by_key[flow.fwd_key] is flow and by_key[flow.rev_key] is flow
    assert flow.prev is not None and flow.prev.next is flow and flow.next.prev is flow
    # those four, the name ``flow`` here and getrefcount's argument
    assert sys.getrefcount(flow) == 4 + 2
    backend = flow.backend
    assert eng.table.of_backend(backend) == [f for f in eng.table.flows()
                                             if f.backend is backend]
    assert backend.open_flows == len(eng.table.of_backend(backend))


def test_deltas_are_shared_objects() -> None:
    """Two flows through the same VIP to the same backend (dnat: the deltas depend on those
    alone) hold the very same int objects: a flow's deltas cost it no memory. (Compiled, a
    flow holds them as C integers: equal, and no objects at all.)"""
    eng = engine(service("dnat", policy="source_hash"), **TIMEOUTS)
    a, b = Conversation(eng, sport=1000), Conversation(eng, sport=2000)
    a.client("S")
    b.client("S")
    fa, fb = _flow(eng, a), _flow(eng, b)
    assert fa.backend is fb.backend and fa.fwd_ipd > 256
    for name in ("fwd_ipd", "fwd_l4d", "rev_ipd", "rev_l4d"):
        assert getattr(fa, name) == getattr(fb, name), name
        if not native.NATIVE:
            assert getattr(fa, name) is getattr(fb, name), name


@pytest.mark.parametrize("policy, keeps", [("round_robin", False), ("least_conn", True)])
def test_a_flow_keeps_its_placement_only_for_a_policy_that_asks(policy: str, keeps: bool) -> None:
    """What ``on_flow_closed`` needs (the policy, the flow key, the backend value) is kept with
    the flow only when the policy has that hook."""
    eng = engine(service("dnat", policy=policy), **TIMEOUTS)
    c = Conversation(eng)
    c.client("S")
    flow = _flow(eng, c)
    assert (flow.placed is not None) is keeps
    if keeps:
        assert flow.placed[0] is eng.policy("dnat-tcp") and flow.placed[2] is flow.backend.backend


def test_peer_of_packs_ack_flags_and_window_in_56_bits() -> None:
    """What a flow keeps of a side's last segment: ack, flags and window, no data offset, in
    an integer below 2**56 (a C integer when compiled, whatever the ack)."""
    import random
    import struct

    from nfqlb.flows import peer_of

    rng = random.Random(7)
    for _ in range(2000):
        ack, off, flags, window = (rng.getrandbits(32), rng.getrandbits(8), rng.getrandbits(8),
                                   rng.getrandbits(16))
        data = bytes(rng.getrandbits(8) for _ in range(28)) + struct.pack("!IBBH", ack, off,
                                                                           flags, window)
        v = peer_of(data, 28)
        assert 0 <= v < 1 << 56
        assert (v >> 24, v >> 16 & 0xFF, v & 0xFFFF) == (ack, flags, window)


def test_a_full_table_adds_nothing_to_a_full_garbage_collection() -> None:
    """Compiled, flows are not tracked by the cyclic garbage collector, nor are the dicts
    that hold only them: a full collection (one comes each time the long-lived objects have
    grown by a quarter) walks none of a million flows. As plain Python, every flow is
    tracked (the pause grows with the table: bench/stall_bench.py)."""
    eng = engine(service("dnat"), **TIMEOUTS)
    gc.collect()
    before = len(gc.get_objects())
    convs = [Conversation(eng, sport=1000 + i) for i in range(2000)]
    for c in convs:
        c.handshake()
    del convs
    gc.collect()
    grown = len(gc.get_objects()) - before
    flows = eng.table.flows()
    assert len(flows) == 2000
    if native.NATIVE:
        assert grown < 100, grown
        assert not any(gc.is_tracked(f) for f in flows)
        assert not gc.is_tracked(eng.table.by_proto[6])
    else:
        assert grown >= 2000, grown
        assert all(gc.is_tracked(f) for f in flows)


def test_a_dropped_engine_lets_its_flows_go() -> None:
    """The rings' links are the only cycles among flows: a table that is dropped undoes them
    (compiled, the garbage collector would not), so its flows are freed with it."""
    eng = engine(service("dnat"), **TIMEOUTS)
    convs = [Conversation(eng, sport=1000 + i) for i in range(3)]
    for c in convs:
        c.handshake()
    flow = _flow(eng, convs[1])
    assert flow.prev is not None
    del convs, c, eng  # c: the loop's last conversation, which holds the engine too
    gc.collect()
    assert flow.prev is None
    assert sys.getrefcount(flow) == 2  # the name ``flow`` here and getrefcount's argument
