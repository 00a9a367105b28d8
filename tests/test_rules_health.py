"""The rules that let health checks' answers through (rules/health.rules), no root needed:
one RETURN per checked backend, in the chain its answers cross, before any rule that could
queue them; none for command checks; never taken for another instance's packets."""

from __future__ import annotations

from typing import Any

from nfqlb import rules
from nfqlb.config import Config, parse_config

VIP, LB = "198.18.100.1", "198.18.1.1"


def make(*services: dict[str, Any], queue: int = 1) -> Config:
    return parse_config({"daemon": {"queue": queue}, "service": list(services)}, "t.toml")


def svc(mode: str, health: dict[str, Any] | None = None, vip: str = VIP,
        backends: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"name": f"{mode}-{vip}", "vip": vip, "port": 80, "mode": mode,
                         "backend": backends or [{"address": "198.18.1.2", "port": 8080}],
                         **extra}
    if mode == "fullnat":
        s.update(snat_address=LB if ":" not in vip else "2001:db8:1::1",
                 snat_ports="20000-29999")
    if health is not None:
        s["health"] = health
    return s


def body(config: Config, family: int = 4) -> list[str]:
    [rs] = [r for r in rules.render(config) if r.family.version == family]
    return list(rs.rules)


def returns(config: Config, family: int = 4) -> list[str]:
    return [line for line in body(config, family) if line.endswith("-j RETURN")]


def test_dnat_answers_to_checks_return_in_prerouting_before_the_reply_rule() -> None:
    lines = body(make(svc("dnat", {}, backends=[
        {"address": "198.18.1.2", "port": 8080},
        {"address": "198.18.1.3", "port": 8080, "health_port": 9000}])))
    ret = ("-A NFQLB-PRE-1 -s 198.18.1.2/32 -p tcp --sport 8080 --dport 61000:61999 "
           "-m addrtype --dst-type LOCAL -j RETURN")
    assert [ln for ln in lines if ln.endswith("RETURN")] == [
        ret, ret.replace("1.2/32", "1.3/32").replace("8080", "9000")]
    reply = "-A NFQLB-PRE-1 -s 198.18.1.2/32 -p tcp --sport 8080 -g NFQLB-Q-1"
    assert lines.index(ret) < lines.index(reply)


def test_local_answers_return_in_output_with_or_without_a_backend_address() -> None:
    config = make(svc("local", {"source_ports": "62000-62010"},
                      backends=[{"port": 8080}, {"address": "127.0.0.1", "port": 8081}]))
    lines = body(config)
    assert returns(config) == [
        "-A NFQLB-OUT-1 -p tcp --sport 8080 --dport 62000:62010 -m addrtype --dst-type LOCAL "
        "-j RETURN",
        "-A NFQLB-OUT-1 -s 127.0.0.1/32 -p tcp --sport 8081 --dport 62000:62010 "
        "-m addrtype --dst-type LOCAL -j RETURN"]
    assert lines.index(returns(config)[0]) < lines.index(
        "-A NFQLB-OUT-1 -p tcp --sport 8080 -g NFQLB-Q-1")


def test_fullnat_ipv6_and_the_check_port() -> None:
    config = make(svc("fullnat", {"kind": "http", "port": 8081}, vip="2001:db8:100::1",
                      backends=[{"address": "2001:db8:1::2", "port": 8080}]))
    assert returns(config, 6) == [
        "-A NFQLB-PRE-1 -s 2001:db8:1::2/128 -p tcp --sport 8081 --dport 61000:61999 "
        "-m addrtype --dst-type LOCAL -j RETURN"]


def test_no_return_without_checks_or_for_command_checks() -> None:
    assert returns(make(svc("dnat"))) == []
    assert returns(make(svc("dnat", {"kind": "command", "command": "true"}))) == []


def test_a_backend_of_two_services_gets_one_rule() -> None:
    config = make(svc("dnat", {}), svc("dnat", {}, vip="198.18.100.2"))
    assert len(returns(config)) == 1


def test_return_rules_are_not_an_overlap_between_instances() -> None:
    """Two fullnat instances with disjoint pools share a backend, both checking it: their
    RETURNs match the same answers, but a RETURN takes nothing from the other instance (its
    chain is still walked after this one returns)."""
    first = make(svc("fullnat", {}), queue=1)
    text = rules.format_restore(rules.render(first, 1)[0]).replace("-p tcp --", "-p tcp -m tcp --")
    saved = rules.parse_save(text)
    second = svc("fullnat", {}, vip="198.18.100.2")
    second["snat_ports"] = "30000-39999"
    assert rules.find_overlap(rules.render(make(second, queue=2), 2)[0], saved) is None
    assert rules.parse_port_rule(
        "-A NFQLB-PRE-1 -s 198.18.1.2/32 -p tcp -m tcp --sport 8080 --dport 61000:61999 "
        "-m addrtype --dst-type LOCAL -j RETURN") is None
