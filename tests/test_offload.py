"""Mode "offload": its configuration and the decision for a flow's first packet (no root).

Packets are crafted with scapy; the decider's answer is a mark (the backend's, as the rules
number them), ACCEPT, DROP or a RST, checked against scapy's own reading.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from helpers import B2, CLIENT, OTHER, VIP, checksums_ok, service, tcp, udp
from scapy.layers.inet import IP, TCP, IPOption_NOP
from scapy.layers.inet6 import TCP as TCP6
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from nfqlb.config import Config, offload_marks, parse_config
from nfqlb.engine import Engine
from nfqlb.errors import ConfigError
from nfqlb.offload import OffloadDecider
from nfqlb.verdict import ACCEPT, DROP

M1, M2 = 0x00100000, 0x00200000  # the default mask's first two marks


def offload(**extra: Any) -> dict[str, Any]:
    return service("offload", **extra)


def config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": daemon, "service": list(services)}, "t.toml")


def decider(*services: dict[str, Any], **daemon: Any) -> tuple[Engine, OffloadDecider]:
    cfg = config(*(services or (offload(),)), **daemon)
    eng = Engine(cfg)
    return eng, OffloadDecider(cfg, eng.services, eng.counters)


def syn(sport: int = 40000, dst: str = VIP, dport: int = 80) -> bytes:
    return tcp(CLIENT, dst, sport, dport, flags="S")


# ------------------------------------------------------------------ configuration


def test_marks_number_offload_backends_in_order_within_the_mask() -> None:
    cfg = config(offload(name="a"), service("dnat", name="d", port=81),
                 offload(name="b", port=82), offload_mark_mask=0xF0)
    assert offload_marks(cfg.daemon, cfg.services) == {
        ("a", "b1"): 0x10, ("a", "b2"): 0x20, ("b", "b1"): 0x30, ("b", "b2"): 0x40}


@pytest.mark.parametrize(("table", "key", "problem"), [
    ({"daemon": {"offload_mark_mask": 0x0F0F}}, "daemon.offload_mark_mask", "one run of bits"),
    ({"daemon": {"offload_mark_mask": 0x1}}, "daemon.offload_mark_mask",
     "at most 1 offload backends, the services have 2"),
    ({"daemon": {"offload_queue": 1}}, "daemon.offload_queue", "must differ from queue"),
    ({"daemon": {"offload_queue": 10001}}, "daemon.offload_queue", "large_queue"),
    ({"daemon": {"offload_binding": "nfq"}}, "daemon.offload_binding", "is not one of"),
    ({"svc": {"policy": "least_conn"}}, "service[0].policy", "on_flow_closed()"),
    ({"svc": {"policy": "random"}}, "service[0].policy", "on_flow_closed()"),
    ({"svc": {"policy_fallback": "least_conn"}}, "service[0].policy_fallback",
     "on_flow_closed()"),
    ({"svc": {"snat_ports": "20000-29999"}}, "service[0].snat_ports", "the kernel picks ports"),
    ({"svc": {"snat_address": "2001:db8::1"}}, "service[0].snat_address", "VIP's family"),
])
def test_bad_offload_configuration_names_the_key(table: dict[str, Any], key: str,
                                                 problem: str) -> None:
    svc = {**offload(), **table.get("svc", {})}
    with pytest.raises(ConfigError) as info:
        parse_config({"daemon": {"queue": 1, **table.get("daemon", {})}, "service": [svc]},
                     "t.toml")
    assert info.value.key == key
    assert problem in str(info.value)


def test_offload_takes_an_optional_snat_address_and_hashing_policies() -> None:
    cfg = config(offload(snat_address="198.18.1.1", policy="maglev"))
    assert str(cfg.services[0].snat_address) == "198.18.1.1"
    assert cfg.daemon.offload_queue_number == 20001
    assert cfg.daemon.offload_binding == "netlink"


# ------------------------------------------------------------------ the first packet


def test_new_flows_get_the_marks_of_the_backends_round_robin() -> None:
    eng, d = decider()
    assert [d.handle(syn(40000 + i), 0.0) for i in range(4)] == [M1, M2, M1, M2]
    figures = eng.status(0.0)["services"]["offload-tcp"]["backends"]
    assert (figures["b1"]["flows"], figures["b2"]["flows"]) == (2, 2)
    assert eng.table.active == 0  # nothing kept per flow: the kernel holds it


def test_udp_and_ipv6_with_an_extension_header() -> None:
    v6 = {**offload(), "name": "v6", "vip": "2001:db8:100::1",
          "backend": [{"name": "b1", "address": "2001:db8:1::2", "port": 8080}]}
    _, d = decider(offload(proto="udp"), v6)
    assert d.handle(udp(CLIENT, VIP, 5000, 53), 0.0) == M1
    packet = bytes(IPv6(src="2001:db8::2", dst="2001:db8:100::1") / IPv6ExtHdrDestOpt()
                   / TCP6(sport=4000, dport=80, flags="S"))
    assert d.handle(packet, 0.0) == 0x00300000


def test_the_service_is_the_packets_protocol_vip_and_port_even_after_ip_options() -> None:
    udp_svc = {**offload(proto="udp", port=80), "name": "u",
               "backend": [{"name": "u1", "address": "198.18.1.9", "port": 53}]}
    _, d = decider(offload(), offload(name="p", port=8443), udp_svc)
    m_tcp, m_8443, m_udp = 0x00100000, 0x00300000, 0x00500000  # (two backends each, one)
    assert d.handle(syn(dport=80), 0.0) == m_tcp
    assert d.handle(syn(dport=8443), 0.0) == m_8443
    assert d.handle(udp(CLIENT, VIP, 5000, 80), 0.0) == m_udp  # same VIP and port, UDP
    with_options = bytes(IP(src=CLIENT, dst=VIP, options=[IPOption_NOP()] * 4)
                         / TCP(sport=40001, dport=8443, flags="S"))
    assert with_options[0] == 0x46  # a 24-byte IP header
    assert d.handle(with_options, 0.0) == m_8443 + 0x00100000  # round robin: its second
    assert d.handle(syn(dport=8444), 0.0) is ACCEPT
    assert d.handle(syn(dst="198.18.100.2"), 0.0) is ACCEPT


def test_the_policy_sees_the_same_flow_as_in_the_other_modes() -> None:
    eng, d = decider(offload(policy="source_hash"))
    packet = syn(sport=40123)
    svc = d.offload_services()[0]
    key = svc.flow_key_of(packet, 12, 4, 20)
    assert key == svc.flow_key(packet[12:20] + packet[20:24])
    assert (key.src, key[2]) == (ip_address(CLIENT), 40123)
    v6 = bytes(IPv6(src="2001:db8::2", dst="2001:db8:100::1") / TCP6(sport=4000, dport=80))
    assert svc.flow_key_of(v6, 8, 16, 40) == svc.flow_key(v6[8:40] + v6[40:44])


def test_a_packet_of_no_offload_service_passes_unmarked() -> None:
    _, d = decider(offload(), service("dnat", name="d", port=81))
    assert d.handle(syn(dst=OTHER), 0.0) is ACCEPT
    assert d.handle(syn(dport=81), 0.0) is ACCEPT  # a dnat service: not this queue's
    assert d.passed == 2


def test_a_non_syn_is_an_unknown_flow_answered_with_a_rst_as_in_the_other_modes() -> None:
    eng, d = decider(offload(unknown_flow="reset"))
    out = d.handle(tcp(CLIENT, VIP, 40000, 80, flags="A", seq=5, ack=77, payload=b"x" * 9),
                   0.0)
    assert isinstance(out, bytes) and checksums_ok(out)
    rst = IP(out)
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert (rst[TCP].flags, rst[TCP].seq) == ("R", 77)
    assert d.handle(tcp(CLIENT, VIP, 40000, 80, flags="R"), 0.0) is DROP  # never RST a RST
    assert eng.counters.events["reset_sent"] == 1


def test_unknown_flow_hash_adopts_on_the_hashed_backend() -> None:
    eng, d = decider(offload(unknown_flow="hash"))
    marks = {d.handle(tcp(CLIENT, VIP, 40000 + i, 80, flags="A"), 0.0) for i in range(40)}
    assert marks == {M1, M2}
    assert eng.counters.events["flow_adopted"] == 40
    again = d.handle(tcp(CLIENT, VIP, 40007, 80, flags="PA"), 1.0)
    assert again == d.handle(tcp(CLIENT, VIP, 40007, 80, flags="A"), 2.0)


def test_down_and_drained_backends_get_no_new_flows() -> None:
    eng, d = decider()
    eng.set_health("offload-tcp", "b1", False, 0.0, "status 503")
    assert {d.handle(syn(40000 + i), 0.0) for i in range(6)} == {M2}
    eng.drain("offload-tcp", "b2", 0.0)
    out = d.handle(syn(41000), 0.0)  # no backend may take it: a RST (unknown_flow drop: DROP)
    assert out is DROP
    assert eng.counters.events["no_backend_up"] == 1
    eng.set_health("offload-tcp", "b1", True, 0.0)
    assert d.handle(syn(41001), 0.0) == M1


def test_a_backend_down_with_reset_asks_the_daemon_to_end_its_kernel_flows() -> None:
    eng, _ = decider(offload(on_backend_down="reset"))
    eng.set_health("offload-tcp", "b1", False, 0.0)
    [(svc, rt, why)] = eng.kernel_flows_to_reset()
    assert (svc.name, rt.name, why) == ("offload-tcp", "b1", "down")
    assert eng.kernel_flows_to_reset() == []
    keep, _ = decider(offload(on_backend_down="keep"))
    keep.set_health("offload-tcp", "b1", False, 0.0)
    assert keep.kernel_flows_to_reset() == []


def test_reload_renumbers_the_marks_and_returns_removed_backends_to_reset() -> None:
    eng, d = decider(offload(on_backend_down="reset"))
    first = eng.services.named("offload-tcp").backends["b2"]
    new = config(offload(name="other", port=81),
                 offload(on_backend_down="reset",
                         backend=[{"name": "b2", "address": B2, "port": 8080}]))
    eng.reconfigure(new, 1.0)
    gone = d.reconfigure(new)
    assert [(s.name, rt.name) for s, rt in gone] == [("offload-tcp", "b1")]
    assert eng.services.named("offload-tcp").backends["b2"] is first  # kept, figures too
    assert d.handle(syn(), 1.0) == 0x00300000  # b2's mark is now the third
    assert d.handle(syn(dport=81), 1.0) == M1  # other's b1


def test_removing_a_service_with_reset_ends_its_flows_once() -> None:
    """A reload that removes a whole service with on_backend_down = "reset": the engine hands
    its backends over (it raised StopIteration looking for their owner before), and the
    decider does not hand them over a second time."""
    eng, d = decider(offload(on_backend_down="reset"), offload(name="x", port=81))
    new = config(offload(name="x", port=81))
    eng.reconfigure(new, 1.0)
    assert d.reconfigure(new) == []
    assert sorted((s.name, rt.name, why) for s, rt, why in eng.kernel_flows_to_reset()) == [
        ("offload-tcp", "b1", "removed with its service"),
        ("offload-tcp", "b2", "removed with its service")]


def test_removing_a_dnat_service_with_reset_resets_its_flows() -> None:
    dnat = service("dnat", on_backend_down="reset")
    eng = Engine(config(dnat, service("dnat", name="x", port=81)))
    eng.handle(syn(), 0.0)
    assert eng.table.active == 1
    eng.reconfigure(config(service("dnat", name="x", port=81)), 1.0)
    assert eng.table.active == 0
    assert eng.counters.events["flows_reset"] == 1
