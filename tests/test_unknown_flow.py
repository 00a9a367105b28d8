"""Engine: packets of flows it does not know (``unknown_flow`` = reset, drop or hash).

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

import ipaddress

import pytest
from dual_stack import B4, C4, VIP4, engine_for, rebuilt
from scapy.layers.inet import IP, TCP

from nfqlb.engine import ACCEPT, DROP
from nfqlb.flows import TcpState


def test_unknown_flow_reset_answers_the_client() -> None:
    eng = engine_for("dnat")  # default unknown_flow = "reset"
    ack = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="PA", seq=100, ack=5000) / b"hi"
    out = eng.handle(bytes(ack), 0.0)
    assert isinstance(out, bytes)
    rst = IP(out)
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport) == (VIP4, C4, 80, 4000)
    assert rst[TCP].flags == "R" and rst[TCP].seq == 5000
    assert out == rebuilt(rst)
    assert eng.counters.events["reset_sent"] == 1
    # a RST is never answered with a RST
    assert eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="R")),
                      0.0) == DROP


def test_unknown_flow_drop() -> None:
    eng = engine_for("dnat", unknown_flow="drop")
    ack = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="A")
    assert eng.handle(bytes(ack), 0.0) == DROP
    assert eng.counters.drops["no_flow"] == 1


def test_unknown_flow_hash_survives_a_restart() -> None:
    """Flows placed by flow_hash are adopted by a fresh engine on the same backend."""
    before = engine_for("dnat", policy="flow_hash", unknown_flow="hash")
    choices = {}
    for port in range(4000, 4040):
        out = before.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")), 0)
        assert isinstance(out, bytes)
        choices[port] = IP(out).dst
    assert set(choices.values()) == set(B4)  # both backends used
    after = engine_for("dnat", policy="flow_hash", unknown_flow="hash")  # "restarted"
    for port, dst in choices.items():
        if port % 2:  # client speaks first
            out = after.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80,
                                                                 flags="A")), 1)
            assert isinstance(out, bytes) and IP(out).dst == dst
        else:  # the backend speaks first (server push): adopted from the reply
            reply = IP(src=dst, dst=C4) / TCP(sport=8080, dport=port, flags="PA") / b"data"
            out = after.handle(bytes(reply), 1)
            assert out == rebuilt(IP(src=VIP4, dst=C4) / TCP(sport=80, dport=port, flags="PA")
                                  / b"data")
    assert after.counters.events["flow_adopted"] == len(choices)
    # a reply from the backend the hash would NOT pick is not ours: passed unchanged
    for port, dst in choices.items():
        other = B4[1] if dst == B4[0] else B4[0]
        stray = IP(src=other, dst=C4) / TCP(sport=8080, dport=port + 1000, flags="A")
        if engine_for("dnat", policy="flow_hash", unknown_flow="hash").handle(bytes(stray), 0) \
                == ACCEPT:
            break
    else:
        pytest.fail("every stray reply was adopted")


def test_hash_is_refused_in_fullnat() -> None:
    from nfqlb.errors import ConfigError

    with pytest.raises(ConfigError, match=r"service\[0\]\.unknown_flow"):
        engine_for("fullnat", unknown_flow="hash")



def test_reset_in_local_mode_goes_to_the_hosts_own_stack() -> None:
    """In local mode the VIP is the host's: the host's TCP answers the segment of no
    connection with a RST itself (a RST forged from the local VIP would need forwarding)."""
    eng = engine_for("local")
    ack = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="PA", seq=100, ack=5000) / b"hi"
    assert eng.handle(bytes(ack), 0.0) is ACCEPT
    assert eng.counters.events["reset_sent"] == 1
    assert eng.table.active == 0


def _hash_engine():  # type: ignore[no-untyped-def]
    return engine_for("dnat", policy="flow_hash", unknown_flow="hash",
                      timeouts={"syn": 5.0, "tcp": 900.0})


def test_spoofed_acks_adopt_only_short_lived_flows() -> None:
    """100 spoofed ACKs used to make 100 flows for 900 s each: now they wait on the syn
    timeout until the backend answers, which it never does."""
    eng = _hash_engine()
    for port in range(100):
        out = eng.handle(bytes(IP(src=f"198.19.0.{port + 1}", dst=VIP4)
                               / TCP(sport=5000 + port, dport=80, flags="A")), 0.0)
        assert isinstance(out, bytes)
    assert eng.table.active == 100
    assert {f.state for f in eng.table.flows()} == {TcpState.ADOPTED}
    eng.handle_timer(5.0)
    assert eng.table.active == 0


def test_an_adopted_flow_is_established_once_the_other_side_answers() -> None:
    eng = _hash_engine()
    out = eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="PA")
                           / b"GET"), 0.0)
    assert isinstance(out, bytes)
    backend = IP(out).dst
    (flow,) = eng.table.flows()
    assert flow.state is TcpState.ADOPTED
    eng.handle(bytes(IP(src=backend, dst=C4) / TCP(sport=8080, dport=4000, flags="A")), 1.0)
    assert flow.state is TcpState.ESTABLISHED
    eng.handle_timer(100.0)
    assert eng.table.active == 1  # now on the established timeout
    # adopted from the backend's side: established once the client answers
    eng2 = _hash_engine()
    reply = IP(src=backend, dst=C4) / TCP(sport=8080, dport=4000, flags="PA") / b"push"
    assert isinstance(eng2.handle(bytes(reply), 0.0), bytes)
    (flow2,) = eng2.table.flows()
    assert flow2.state is TcpState.ADOPTED_REPLY
    eng2.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="A")), 1.0)
    assert flow2.state is TcpState.ESTABLISHED


@pytest.mark.parametrize("flags", ["R", "FA", "RA"])
@pytest.mark.parametrize("side", ["client", "backend"])
def test_fin_and_rst_are_passed_by_the_hash_but_never_make_a_flow(flags: str,
                                                                  side: str) -> None:
    eng = _hash_engine()
    probe = eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags="S")), 0)
    backend = IP(probe).dst
    eng = _hash_engine()  # fresh: no flow
    if side == "client":
        pkt = IP(src=C4, dst=VIP4) / TCP(sport=4000, dport=80, flags=flags, seq=7)
        want = IP(src=C4, dst=backend) / TCP(sport=4000, dport=8080, flags=flags, seq=7)
    else:
        pkt = IP(src=backend, dst=C4) / TCP(sport=8080, dport=4000, flags=flags, seq=7)
        want = IP(src=VIP4, dst=C4) / TCP(sport=80, dport=4000, flags=flags, seq=7)
    out = eng.handle(bytes(pkt), 0.0)
    assert out == rebuilt(want)
    assert eng.table.active == 0
    assert eng.counters.events == {"hash_passed": 1}


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "maglev"])
def test_a_stray_packet_from_another_backend_never_takes_a_flow_over(policy: str) -> None:
    """A packet from a backend that is not the flow's own, to a client port with a live flow,
    is not adopted: the client's next packets still go to the flow's backend."""
    eng = engine_for("dnat", policy=policy, unknown_flow="hash")
    for port in range(4000, 4040):  # flows on both backends
        syn = IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="S")
        assert isinstance(eng.handle(bytes(syn), 0.0), bytes)
    taken = 0
    for f in list(eng.table.flows()):
        port = int.from_bytes(f.fwd_key[8:10], "big")
        other = B4[1] if f.backend.address == ipaddress.ip_address(B4[0]) else B4[0]
        stray = IP(src=other, dst=C4) / TCP(sport=8080, dport=port, flags="FA")
        assert eng.handle(bytes(stray), 1.0) == ACCEPT  # not ours: passes unchanged
        nxt = eng.handle(bytes(IP(src=C4, dst=VIP4) / TCP(sport=port, dport=80, flags="A")),
                         2.0)
        assert isinstance(nxt, bytes)
        taken += IP(nxt).dst != str(f.backend.address)
    assert taken == 0
    assert "flow_adopted" not in eng.counters.events
