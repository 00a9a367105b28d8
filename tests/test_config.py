"""Configuration: a valid file loads into the right values; every mistake names its key."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from nfqlb.config import load_config, parse_config
from nfqlb.errors import ConfigError
from nfqlb.values import Mode, Protocol

EXAMPLE = """\
[daemon]
queue = 3
mss_clamp = 1400

[timeouts]
tcp = 600
udp = 30.5

[[service]]
name = "web"
vip = "198.18.100.1"
port = 80
mode = "fullnat"
snat_address = "198.18.1.1"
snat_ports = "20000-29999"
[[service.backend]]
address = "198.18.1.2"
port = 8080
[[service.backend]]
name = "big"
address = "198.18.1.3"
port = 8080
weight = 2

[[service]]
name = "dns"
vip = "198.18.100.1"
port = 53
protocol = "udp"
mode = "dnat"
[[service.backend]]
address = "198.18.1.20"
port = 53

[[service]]
name = "local"
vip = "198.18.100.1"
port = 443
mode = "LOCAL"
[[service.backend]]
port = 8443

[[service]]
name = "v6"
vip = "2001:db8::10"
port = 80
mode = "dnat"
[[service.backend]]
address = "2001:db8::20"
port = 8080
"""


def test_valid_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "nfqlb.toml"
    path.write_text(EXAMPLE)
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.daemon.queue == 3 and cfg.daemon.mss_clamp == 1400
    assert cfg.daemon.bypass is True and cfg.daemon.sysctls is True
    assert cfg.timeouts.tcp == 600.0 and cfg.timeouts.udp == 30.5
    assert (cfg.timeouts.syn, cfg.timeouts.tcp_fin, cfg.timeouts.tcp_close) == (60, 120, 10)
    web, dns, local, v6 = cfg.services
    assert web.mode is Mode.FULLNAT and web.protocol is Protocol.TCP
    assert web.vip == ipaddress.ip_address("198.18.100.1") and web.port == 80
    assert web.snat_address == ipaddress.ip_address("198.18.1.1")
    assert web.snat_ports == (20000, 29999)
    assert web.policy == "round_robin"
    assert [(b.name, str(b.address), b.port, b.weight) for b in web.backends] == [
        ("198.18.1.2:8080", "198.18.1.2", 8080, 1), ("big", "198.18.1.3", 8080, 2)]
    assert dns.protocol is Protocol.UDP and dns.mode is Mode.DNAT and dns.snat_ports is None
    assert local.mode is Mode.LOCAL
    assert local.backends[0].address is None and local.backends[0].name == "local:8443"
    assert v6.backends[0].name == "[2001:db8::20]:8080"


def test_defaults() -> None:
    cfg = parse_config({"service": {"name": "s", "vip": "198.18.100.1", "port": 80,
                                    "mode": "dnat", "backend": {"address": "198.18.1.2",
                                                                "port": 80}}}, "x")
    t = cfg.timeouts
    assert (t.syn, t.tcp, t.tcp_fin, t.tcp_close, t.udp) == (60, 900, 120, 10, 300)
    assert cfg.daemon.mss_clamp == 1460
    assert cfg.services[0].protocol is Protocol.TCP


def base() -> dict[str, Any]:
    return {
        "service": [
            {"name": "web", "vip": "198.18.100.1", "port": 80, "mode": "fullnat",
             "snat_address": "198.18.1.1", "snat_ports": "20000-20999",
             "backend": [{"address": "198.18.1.2", "port": 8080},
                         {"address": "198.18.1.3", "port": 8080}]},
            {"name": "dns", "vip": "198.18.100.1", "port": 53, "protocol": "udp",
             "mode": "dnat", "backend": [{"address": "198.18.1.4", "port": 53}]},
        ],
    }


def test_base_is_valid() -> None:
    assert len(parse_config(base(), "cfg").services) == 2


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    if value is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


_DELETE = object()
S0, S1 = ("service", 0), ("service", 1)


def _add_service(**fields: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        svc = copy.deepcopy(doc["service"][0])
        svc.update(fields)
        doc["service"].append(svc)
    return edit


BAD: list[tuple[str, Any, str, str]] = [
    # description, edit (path, value) or callable, expected key, a word of the problem
    ("unknown top key", (("servce",), []), "servce", "unknown key"),
    ("unknown service key", ((*S0, "vips"), "1.2.3.4"), "service[0].vips", "unknown key"),
    ("unknown backend key", ((*S0, "backend", 1, "prot"), 1), "service[0].backend[1].prot",
     "unknown key"),
    ("unknown daemon key", (("daemon",), {"queue": 1, "queues": 2}), "daemon.queues",
     "unknown key"),
    ("unknown timeouts key", (("timeouts",), {"tcp_syn": 5}), "timeouts.tcp_syn",
     "unknown key"),
    ("bad vip", ((*S0, "vip"), "198.18.100.256"), "service[0].vip", "not an IP address"),
    ("vip not a string", ((*S0, "vip"), 42), "service[0].vip", "IP address"),
    ("unspecified vip", ((*S0, "vip"), "0.0.0.0"), "service[0].vip", "cannot be used"),
    ("bad backend address", ((*S0, "backend", 1, "address"), "backend.example"),
     "service[0].backend[1].address", "not an IP address"),
    ("bad snat address", ((*S0, "snat_address"), "1.2.3"), "service[0].snat_address",
     "not an IP address"),
    ("service port 0", ((*S0, "port"), 0), "service[0].port", "out of range"),
    ("service port 70000", ((*S0, "port"), 70000), "service[0].port", "out of range"),
    ("service port a string", ((*S0, "port"), "80"), "service[0].port", "integer"),
    ("service port missing", ((*S0, "port"), _DELETE), "service[0].port", "required"),
    ("service port 65536", ((*S0, "port"), 65536), "service[0].port", "out of range"),
    ("backend port 0", ((*S0, "backend", 1, "port"), 0), "service[0].backend[1].port",
     "out of range"),
    ("backend port 70000", ((*S0, "backend", 1, "port"), 70000),
     "service[0].backend[1].port", "out of range"),
    ("backend port true", ((*S0, "backend", 0, "port"), True), "service[0].backend[0].port",
     "integer"),
    ("negative weight", ((*S0, "backend", 0, "weight"), -1), "service[0].backend[0].weight",
     "out of range"),
    ("no backends", ((*S0, "backend"), []), "service[0].backend", "no backends"),
    ("backends missing", ((*S0, "backend"), _DELETE), "service[0].backend", "no backends"),
    ("all weights zero", ((*S0, "backend"), [{"address": "198.18.1.2", "port": 1,
                                              "weight": 0}]), "service[0].backend", "weight"),
    ("duplicate backend", ((*S0, "backend", 1, "address"), "198.18.1.2"),
     "service[0].backend[1]", "duplicate"),
    ("no services", (("service",), []), "service", "no services"),
    ("duplicate service", _add_service(name="web2"), "service[2]", "duplicate service"),
    ("duplicate name", _add_service(port=81), "service[2].name", "duplicate service name"),
    ("fullnat without snat_address", ((*S0, "snat_address"), _DELETE),
     "service[0].snat_address", "fullnat"),
    ("fullnat without snat_ports", ((*S0, "snat_ports"), _DELETE), "service[0].snat_ports",
     "fullnat"),
    ("snat_address in dnat", ((*S1, "snat_address"), "198.18.1.1"),
     "service[1].snat_address", "only applies in fullnat"),
    ("snat_ports in dnat", ((*S1, "snat_ports"), "1000-2000"), "service[1].snat_ports",
     "only applies in fullnat"),
    ("snat_ports reversed", ((*S0, "snat_ports"), "3000-2000"), "service[0].snat_ports",
     "'3000-2000' is a reversed port range: write \"2000-3000\""),
    ("snat_ports not a range", ((*S0, "snat_ports"), "lots"), "service[0].snat_ports",
     "port range"),
    ("snat_ports a number", ((*S0, "snat_ports"), 20000), "service[0].snat_ports", "string"),
    ("snat_ports above 65535", ((*S0, "snat_ports"), "60000-70000"),
     "service[0].snat_ports", "port range"),
    ("snat_ports ending at 65536", ((*S0, "snat_ports"), "60000-65536"),
     "service[0].snat_ports", "port range"),
    ("snat_ports starting at 0", ((*S0, "snat_ports"), "0-100"), "service[0].snat_ports",
     "port range"),
    ("bad protocol", ((*S1, "protocol"), "sctp"), "service[1].protocol", "not one of"),
    ("bad mode", ((*S1, "mode"), "tunnel"), "service[1].mode", "not one of"),
    ("mode missing", ((*S1, "mode"), _DELETE), "service[1].mode", "required"),
    ("name missing", ((*S1, "name"), _DELETE), "service[1].name", "required"),
    ("backend family mismatch", ((*S0, "backend", 1, "address"), "2001:db8::2"),
     "service[0].backend[1].address", "IPv6"),
    ("snat family mismatch", ((*S0, "snat_address"), "2001:db8::1"),
     "service[0].snat_address", "family"),
    ("overlapping pools", _add_service(name="web2", port=81, snat_ports="20500-21500"),
     "service[2].snat_ports", "overlaps"),
    ("overlapping pools inside", _add_service(name="web2", port=81, snat_ports="20100-20200"),
     "service[2].snat_ports", "overlaps"),
    ("pools sharing one port", _add_service(name="web2", port=81, snat_ports="20999-21999"),
     "service[2].snat_ports", "overlaps"),
    ("service not a table", (("service",), [1]), "service[0]", "table"),
    ("daemon queue too big", (("daemon",), {"queue": 65536}), "daemon.queue", "out of range"),
    ("mss clamp too small", (("daemon",), {"mss_clamp": 100}), "daemon.mss_clamp",
     "out of range"),
    ("bypass not a bool", (("daemon",), {"bypass": "yes"}), "daemon.bypass", "true or false"),
    ("negative timeout", (("timeouts",), {"udp": -1}), "timeouts.udp", "positive"),
    ("zero timeout", (("timeouts",), {"tcp_close": 0}), "timeouts.tcp_close", "positive"),
    ("local backend loops to itself", lambda doc: doc["service"][1].update(
        mode="local", backend=[{"port": 53}]), "service[1].backend[0]", "loop"),
    # issue 9: what check can tell without the host
    ("fullnat backend is the VIP and port", ((*S0, "backend", 1), {
        "address": "198.18.100.1", "port": 80}), "service[0].backend[1]",
     "a backend on the VIP's own address and port would loop"),
    ("dnat backend is the VIP and port", ((*S1, "backend", 0), {
        "address": "198.18.100.1", "port": 53}), "service[1].backend[0]", "would loop"),
    ("snat_address is a backend", ((*S0, "snat_address"), "198.18.1.3"),
     "service[0].snat_address", "198.18.1.3 is backend[1]'s address"),
]


@pytest.mark.parametrize("desc, edit, key, problem", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(desc: str, edit: Any, key: str, problem: str) -> None:
    doc = base()
    if callable(edit):
        edit(doc)
    else:
        _set(doc, *edit)
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "my.toml")
    err = info.value
    assert err.source == "my.toml"
    assert err.key == key
    assert str(err).startswith(f"my.toml: {key}: ")
    assert problem in err.problem


def test_duplicate_backend_name_is_rejected() -> None:
    """Per-backend stats are keyed by name: two backends of one name would be merged."""
    doc = base()
    for b in doc["service"][0]["backend"]:
        b["name"] = "web-1"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "my.toml")
    assert info.value.key == "service[0].backend[1].name"


def test_pools_may_be_shared_exactly_or_disjoint() -> None:
    doc = base()
    _add_service(name="web2", port=81)(doc)  # same range: a shared pool
    _add_service(name="web3", port=82, snat_ports="21000-21999")(doc)  # disjoint
    _add_service(name="web4", port=83, snat_address="198.18.1.9",
                 snat_ports="20500-20600")(doc)  # overlapping range, another address
    assert len(parse_config(doc).services) == 5


def test_port_boundaries_are_valid() -> None:
    doc = base()
    doc["service"][0].update(port=65535, snat_ports="1-65535")
    doc["service"][0]["backend"][0]["port"] = 1
    svc = parse_config(doc).services[0]
    assert svc.port == 65535 and svc.snat_ports == (1, 65535) and svc.backends[0].port == 1


def test_same_vip_port_other_protocol_is_not_a_duplicate() -> None:
    doc = base()
    _add_service(name="web-udp", protocol="udp")(doc)
    assert len(parse_config(doc).services) == 3


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: (file): no such file"


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[service]]\nname = "web\nport = 80\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: (syntax): ")
    assert "line 2" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "(file)"


def test_error_from_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(EXAMPLE.replace("weight = 2", "weight = 2\nport_typo = 1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: service[0].backend[1].port_typo: unknown key")
