"""Engine: packets of flows it does not know (``unknown_flow`` = reset, drop or hash).

Expected packets are built by scapy; nothing expected comes from nfqlb.
"""

from __future__ import annotations

import pytest
from dual_stack import B4, C4, VIP4, engine_for, rebuilt
from scapy.layers.inet import IP, TCP

from nfqlb.engine import ACCEPT, DROP


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

