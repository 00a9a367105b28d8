"""Rules that keep instances apart and leave the host's own traffic to the kernel (no root).

- ICMP errors: only those quoting a packet of one of the queue's services go to nfqlb. The
  u32 matches the rules carry are evaluated here by an interpreter of the kernel's u32
  semantics (``net/netfilter/xt_u32.c``) against errors built by scapy, so what is expected
  comes from scapy's packets and the kernel's rules, not from nfqlb's rendering.
- Overlap: a second instance (another queue) whose forward or reply rules would take the
  first one's packets is refused, by a one-line reason built from the installed rules.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt

from nfqlb import rules
from nfqlb.config import Config, parse_config


def make_config(*services: dict[str, Any], queue: int = 1) -> Config:
    return parse_config({"daemon": {"queue": queue}, "service": list(services)}, "t.toml")


VIP, VIP6 = "198.18.100.1", "2001:db8:100::1"
CLIENT, CLIENT6 = "198.18.0.2", "2001:db8::2"
LB, LB6 = "198.18.1.1", "2001:db8:1::1"
B1, B2 = "198.18.1.2", "198.18.1.3"
B1_6 = "2001:db8:1::2"


def dnat(backend: str = B1, vip: str = VIP, **extra: Any) -> dict[str, Any]:
    return {"name": f"d-{vip}-{backend}", "vip": vip, "port": 80, "mode": "dnat",
            "backend": [{"address": backend, "port": 8080}], **extra}


def fullnat(backend: str = B1, ports: str = "20000-29999", vip: str = VIP,
            snat: str = LB) -> dict[str, Any]:
    return {"name": f"f-{vip}-{ports}", "vip": vip, "port": 80, "mode": "fullnat",
            "snat_address": snat, "snat_ports": ports,
            "backend": [{"address": backend, "port": 8080}]}


# -- a u32 interpreter, after xt_u32.c ---------------------------------------------------------

def _num(text: str) -> int:
    return int(text, 0)


def u32_test(expr: str, pkt: bytes) -> bool:
    """One ``--u32`` argument (tests joined by ``&&``) against a packet from its IP header."""
    def word(at: int) -> int:
        return int.from_bytes(pkt[at:at + 4], "big")

    for test in expr.split("&&"):
        location, _, values = test.partition("=")
        tokens = re.findall(r"0x[0-9a-fA-F]+|\d+|<<|>>|[&@]", location)
        pos = _num(tokens[0])
        if len(pkt) < 4 or pos > len(pkt) - 4:
            return False
        val, at = word(pos), 0
        for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
            n = _num(number)
            if op == "&":
                val &= n
            elif op == "<<":
                val = (val << n) & 0xFFFFFFFF
            elif op == ">>":
                val >>= n
            else:  # "@": move by the value, read at the number past it
                at += val
                if len(pkt) < at + 4 or n > len(pkt) - at - 4:
                    return False
                val = word(at + n)
        ranges = [v.split(":") for v in values.split(",")]
        if not any(_num(r[0]) <= val <= _num(r[-1]) for r in ranges):
            return False
    return True


def queued_by_errors_chain(rs: rules.RuleSet, pkt: bytes) -> bool:
    """Some rule of NFQLB-ERR-<q> (all of its u32 matches) sends ``pkt`` to the queue."""
    for rule in rs.rules:
        if not rule.startswith(f"-A {rs.chains.errors} "):
            continue
        exprs = re.findall(r'--u32 "([^"]+)"', rule)
        assert exprs and rule.endswith(f"-g {rs.chains.target}"), rule
        if all(u32_test(e, pkt) for e in exprs):
            return True
    return False


def error4(quote: IP, *, options: bool = False) -> bytes:
    outer = IP(src=LB, dst=str(quote.src), options=[IPOption_NOP()] * 4 if options else [])
    return bytes(outer / ICMP(type=3, code=4, nexthopmtu=1280) / bytes(quote)[:28])


def error6(quote: IPv6) -> bytes:
    return bytes(IPv6(src=LB6, dst=quote.src) / ICMPv6PacketTooBig(mtu=1280) / bytes(quote))


# -- which errors are nfqlb's ------------------------------------------------------------------

def test_errors_quoting_the_vip_replies_or_the_backend_requests_are_queued_others_not() -> None:
    rs = rules.render(make_config(dnat()))[0]
    ours = [
        IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000),  # a reply, as nfqlb wrote it
        IP(src=CLIENT, dst=B1) / TCP(sport=40000, dport=8080),  # a request to the backend
    ]
    not_ours = [
        IP(src=B2, dst=CLIENT) / TCP(sport=8080, dport=40000),  # masqueraded, de-NATed
        IP(src=LB, dst=B1) / TCP(sport=40000, dport=22),  # the host's own ssh to the backend
        IP(src=VIP, dst=CLIENT) / UDP(sport=80, dport=40000),  # another protocol
        IP(src=VIP, dst=CLIENT) / TCP(sport=81, dport=40000),  # another port of the VIP
        IP(src=CLIENT, dst=B1, frag=100) / TCP(sport=40000, dport=8080),  # later fragment:
    ]                                                                    # no ports there
    for quote in ours:
        assert queued_by_errors_chain(rs, error4(quote)), quote.summary()
        assert queued_by_errors_chain(rs, error4(quote, options=True)), quote.summary()
    for quote in not_ours:
        assert not queued_by_errors_chain(rs, error4(quote)), quote.summary()


def test_fullnat_errors_are_told_apart_by_the_snat_pool() -> None:
    first = rules.render(make_config(fullnat(ports="20000-24999")))[0]
    second = rules.render(make_config(fullnat(ports="25000-29999", vip="198.18.100.2"),
                                      queue=2))[0]
    to_backend = [IP(src=LB, dst=B1) / TCP(sport=p, dport=8080) for p in (20000, 24999)]
    for quote in to_backend:
        assert queued_by_errors_chain(first, error4(quote))
        assert not queued_by_errors_chain(second, error4(quote))
    reply2 = IP(src="198.18.100.2", dst=CLIENT) / TCP(sport=80, dport=40000)
    assert queued_by_errors_chain(second, error4(reply2))
    assert not queued_by_errors_chain(first, error4(reply2))


def test_ipv6_errors_match_at_fixed_offsets_and_extension_headers_stay_the_kernels() -> None:
    rs = rules.render(make_config(dnat(backend=B1_6, vip=VIP6)))[0]
    assert rs.family.version == 6
    reply = IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000)
    request = IPv6(src=CLIENT6, dst=B1_6) / TCP(sport=40000, dport=8080)
    other = IPv6(src="2001:db8:1::3", dst=CLIENT6) / TCP(sport=8080, dport=40000)
    assert queued_by_errors_chain(rs, error6(reply))
    assert queued_by_errors_chain(rs, error6(request))
    assert not queued_by_errors_chain(rs, error6(other))
    unreachable = bytes(IPv6(src=LB6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / bytes(reply))
    assert queued_by_errors_chain(rs, unreachable)
    with_ext = bytes(IPv6(src=LB6, dst=VIP6) / IPv6ExtHdrDestOpt() / ICMPv6PacketTooBig()
                     / bytes(reply))
    assert not queued_by_errors_chain(rs, with_ext)


def test_icmp_types_jump_to_the_errors_chain_and_nothing_else_queues_every_error() -> None:
    rs = rules.render(make_config(dnat()))[0]
    icmp = [r for r in rs.rules if "-p icmp" in r]
    assert icmp and all(r.endswith(f"-j {rs.chains.errors}") for r in icmp), icmp
    assert all("-m u32" in r for r in rs.rules if r.startswith(f"-A {rs.chains.errors} "))
    text = rules.format_restore(rs)
    assert f":{rs.chains.errors} - [0:0]" in text.splitlines()
    plan = rules.plan_delete(1, rules.parse_save(text))
    assert plan is not None and f"-X {rs.chains.errors}" in plan.splitlines()


def test_a_long_quote_is_split_into_several_u32_matches() -> None:
    six = {**fullnat(backend=B1_6, vip=VIP6, snat=LB6)}
    rs = rules.render(make_config(six))[0]
    longest = max((r for r in rs.rules if r.startswith("-A NFQLB-ERR-1")),
                  key=lambda r: r.count("&&"))
    for expr in re.findall(r'--u32 "([^"]+)"', longest):
        assert expr.count("&&") + 1 <= rules.U32_MAX_TESTS
    assert longest.count("-m u32") == 2
    quote = IPv6(src=LB6, dst=B1_6) / TCP(sport=21000, dport=8080)
    assert queued_by_errors_chain(rs, error6(quote))
    assert not queued_by_errors_chain(
        rs, error6(IPv6(src=LB6, dst=B1_6) / TCP(sport=31000, dport=8080)))


# -- two instances ----------------------------------------------------------------------------

def installed(config: Config, queue: int) -> rules.SavedTable:
    """The raw table as iptables-save shows ``config`` installed on ``queue`` ("-m tcp")."""
    text = rules.format_restore(rules.render(config, queue)[0])
    text = text.replace("-p tcp --", "-p tcp -m tcp --").replace("-p udp --", "-p udp -m udp --")
    saved = rules.parse_save(text)
    assert saved is not None
    return saved


@pytest.mark.parametrize(("first", "second", "problem"), [
    (dnat(), dnat(vip="198.18.100.2"), "replies from 198.18.1.2:8080/tcp"),
    (fullnat(), fullnat(vip="198.18.100.2"), "replies from 198.18.1.2:8080/tcp to "
                                             "198.18.1.1:20000-29999/tcp"),
    (fullnat(ports="20000-25000"), fullnat(ports="25000-29999", vip="198.18.100.2"),
     "replies from"),
    (dnat(), fullnat(vip="198.18.100.2"), "replies from"),  # dnat's match takes everything
    (dnat(), dnat(backend=B2), "packets to 198.18.100.1:80/tcp"),  # the same VIP and port
    ({"name": "l", "vip": VIP, "port": 80, "mode": "local", "backend": [{"port": 8080}]},
     {"name": "l", "vip": "198.18.100.2", "port": 80, "mode": "local",
      "backend": [{"port": 8080}]}, "replies from *:8080/tcp"),
])
def test_a_second_instance_that_would_take_the_firsts_packets_is_refused(
        first: dict[str, Any], second: dict[str, Any], problem: str) -> None:
    saved = installed(make_config(first), 1)
    rs = rules.render(make_config(second), 2)[0]
    reason = rules.find_overlap(rs, saved)
    assert reason is not None and problem in reason, reason
    assert "queue 1's rule" in reason and "\n" not in reason


@pytest.mark.parametrize(("first", "second"), [
    (fullnat(ports="20000-24999"), fullnat(ports="25000-29999", vip="198.18.100.2")),
    (fullnat(), fullnat(vip="198.18.100.2", snat="198.18.1.254")),
    (dnat(), dnat(backend=B2, vip="198.18.100.2")),
    (dnat(), {**dnat(), "protocol": "udp"}),
])
def test_instances_whose_packets_can_be_told_apart_may_run_side_by_side(
        first: dict[str, Any], second: dict[str, Any]) -> None:
    saved = installed(make_config(first), 1)
    assert rules.find_overlap(rules.render(make_config(second), 2)[0], saved) is None


def test_the_same_queue_again_is_a_restart_not_an_overlap() -> None:
    config = make_config(dnat())
    assert rules.find_overlap(rules.render(config, 1)[0], installed(config, 1)) is None
    assert rules.find_overlap(rules.render(config, 1)[0], None) is None


def test_port_rules_are_read_from_what_iptables_save_prints() -> None:
    r = rules.parse_port_rule("-A NFQLB-PRE-3 -s 198.18.1.2/32 -d 198.18.1.1/32 -p tcp -m tcp "
                              "--sport 8080 --dport 20000:29999 -g NFQLB-Q-3")
    assert r is not None and r.queue == 3 and r.chain == "PRE" and r.is_reply
    assert (r.sport, r.dport) == ((8080, 8080), (20000, 29999))
    assert rules.parse_port_rule("-A NFQLB-PRE-3 -d 198.18.100.1/32 -p tcp -m u32 --u32 "
                                 '"0x4&0x3fff=0x1:0x3fff" -g NFQLB-Q-3') is None
    assert rules.parse_port_rule("-A MINE -p tcp --sport 80 -j ACCEPT") is None
