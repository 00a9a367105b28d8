"""Configuration of health checks: ``[service.health]``, ``health_port`` and
``on_backend_down`` load into the right values, and every mistake is one line naming its
key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from nfqlb.config import HealthCheck, HealthKind, OnBackendDown, parse_config
from nfqlb.errors import ConfigError

BASE: dict[str, Any] = {"service": [{
    "name": "web", "vip": "198.18.100.1", "port": 80, "mode": "dnat",
    "backend": [{"name": "b1", "address": "198.18.1.2", "port": 8080},
                {"name": "b2", "address": "198.18.1.3", "port": 8080}],
    "health": {}}]}


def load(health: dict[str, Any] | None = None, source: str = "nfqlb.toml",
         **service: Any) -> Any:
    data = copy.deepcopy(BASE)
    if health is None:
        del data["service"][0]["health"]
    else:
        data["service"][0]["health"] = health
    data["service"][0].update(service)
    return parse_config(data, source).services[0]


def test_defaults() -> None:
    svc = load({})
    assert svc.health == HealthCheck(kind=HealthKind.TCP, interval=2.0, timeout=1.0, rise=2,
                                     fall=3, port=None, path="/", host=None,
                                     expect=((200, 399),), command=(),
                                     source_ports=(61000, 61999), backend_ports=())
    assert svc.on_backend_down is OnBackendDown.KEEP
    assert load(None).health is None


def test_every_key() -> None:
    svc = load({"kind": "HTTP", "interval": 5, "timeout": 0.5, "rise": 1, "fall": 10,
                "port": 9000, "path": "/health", "host": "web.example",
                "expect": "200-299, 302", "source_ports": "62000-62099"},
               on_backend_down="reset")
    h = svc.health
    assert (h.kind, h.interval, h.timeout, h.rise, h.fall, h.port, h.path, h.host, h.expect,
            h.source_ports) == (HealthKind.HTTP, 5.0, 0.5, 1, 10, 9000, "/health",
                                "web.example", ((200, 299), (302, 302)), (62000, 62099))
    assert svc.on_backend_down is OnBackendDown.RESET
    assert load({"kind": "http", "expect": 204}).health.expect == ((204, 204),)


def test_timeout_defaults_to_at_most_the_interval() -> None:
    assert load({"interval": 0.5}).health.timeout == 0.5


def test_health_port_per_backend() -> None:
    data = copy.deepcopy(BASE)
    data["service"][0]["backend"][1]["health_port"] = 9100
    svc = parse_config(data, "x").services[0]
    assert svc.health.backend_ports == (("b2", 9100),)
    assert [svc.health.port_for(b) for b in svc.backends] == [8080, 9100]


def test_command_is_resolved(tmp_path: Path) -> None:
    prog = tmp_path / "bin" / "check"
    prog.parent.mkdir()
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    source = str(tmp_path / "nfqlb.toml")
    svc = load({"kind": "command", "command": "bin/check --fast 'a b'"}, source)
    assert svc.health.command == (str(prog), "--fast", "a b")
    svc = load({"kind": "command", "command": [str(prog), "x"]}, source)
    assert svc.health.command == (str(prog), "x")
    svc = load({"kind": "command", "command": "true"}, source)
    assert svc.health.command[0].endswith("/true")


ERRORS: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"kynd": "tcp"}, {}, "service[0].health.kynd: unknown key (known: "),
    ({"kind": "icmp"}, {}, "service[0].health.kind: 'icmp' is not one of: tcp, http, command"),
    ({"interval": 0}, {}, "service[0].health.interval: must be a positive number of seconds"),
    ({"interval": "2s"}, {}, "service[0].health.interval: must be a positive number"),
    ({"interval": 7200}, {}, "service[0].health.interval: 7200 is more than 3600 seconds"),
    ({"timeout": 3}, {}, "service[0].health.timeout: 3 is more than interval (2)"),
    ({"timeout": -1}, {}, "service[0].health.timeout: must be a positive number of seconds"),
    ({"rise": 0}, {}, "service[0].health.rise: 0 is out of range 1-100"),
    ({"fall": 2.5}, {}, "service[0].health.fall: must be an integer, not 2.5"),
    ({"port": 70000}, {}, "service[0].health.port: 70000 is out of range 1-65535"),
    ({"path": "/x"}, {}, "service[0].health.path: only applies to kind = \"http\", this "
                         "check is tcp"),
    ({"kind": "http", "path": "health"}, {}, "service[0].health.path: 'health' is not a "
                                             "request path"),
    ({"kind": "http", "path": "/a b"}, {}, "service[0].health.path: '/a b' is not a request"),
    ({"kind": "http", "host": "a\r\nX: y"}, {}, "service[0].health.host: 'a\\r\\nX: y' is not"),
    ({"kind": "http", "expect": "2xx"}, {}, "service[0].health.expect: '2xx' is not a list"),
    ({"kind": "http", "expect": "99-200"}, {}, "service[0].health.expect: '99-200' is not a "
                                               "status range within 100-599"),
    ({"kind": "http", "expect": "300-200"}, {}, "service[0].health.expect: '300-200' is not"),
    ({"kind": "http", "expect": [200]}, {}, "service[0].health.expect: must be a string"),
    ({"kind": "command"}, {}, "service[0].health.command: is required with kind = "
                              "\"command\""),
    ({"kind": "command", "command": "no-such-program-here"}, {},
     "service[0].health.command: no program 'no-such-program-here' on PATH"),
    ({"kind": "command", "command": "./missing.sh"}, {},
     "service[0].health.command: ./missing.sh is not an executable file"),
    ({"kind": "command", "command": []}, {}, "service[0].health.command: must be a string or "
                                             "a non-empty list"),
    ({"kind": "command", "command": "'open"}, {}, "service[0].health.command: \"'open\": No "
                                                  "closing quotation"),
    ({"command": "true"}, {}, "service[0].health.command: only applies to kind = "
                              "\"command\", this check is tcp"),
    ({"source_ports": "61000"}, {}, None),  # one port is a range
    ({"source_ports": "9-1"}, {}, "service[0].health.source_ports: '9-1' is a reversed port range"),
    ({"source_ports": "25000-25099"},
     {"mode": "fullnat", "snat_address": "198.18.1.1", "snat_ports": "20000-29999"},
     "service[0].health.source_ports: 25000-25099 overlaps its snat_ports 20000-29999"),
    ({}, {"on_backend_down": "drain"},
     "service[0].on_backend_down: 'drain' is not one of: keep, reset"),
    ("tcp", {}, "service[0].health: must be a table, not str"),  # type: ignore[list-item]
    ({}, {"protocol": "udp"}, "service[0].health.port: the service is udp and a tcp check "
                              "connects over TCP"),
    ({"port": 80}, {"mode": "local", "backend": [{"port": 8080}]},
     "service[0].health.port: would check 198.18.100.1 port 80, the service itself"),
]


@pytest.mark.parametrize(("health", "service", "expected"), ERRORS)
def test_errors_name_the_key(tmp_path: Path, health: dict[str, Any], service: dict[str, Any],
                             expected: str | None) -> None:
    source = str(tmp_path / "nfqlb.toml")
    if expected is None:
        load(health, source, **service)
        return
    with pytest.raises(ConfigError) as err:
        load(health, source, **service)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{source}: ")
    if "./missing.sh" in expected:
        expected = expected.replace("./missing.sh", str(tmp_path / "missing.sh"))
    assert expected in text, text


def test_health_port_without_health_is_refused() -> None:
    data = copy.deepcopy(BASE)
    del data["service"][0]["health"]
    data["service"][0]["backend"][1]["health_port"] = 9100
    with pytest.raises(ConfigError, match=r"service\[0\]\.backend\[1\]\.health_port: only "
                                          r"applies with a \[service\.health\] table"):
        parse_config(data, "x")
    data["service"][0]["backend"][1]["health_port"] = 0
    data["service"][0]["health"] = {}
    with pytest.raises(ConfigError, match=r"backend\[1\]\.health_port: 0 is out of range"):
        parse_config(data, "x")


def test_a_udp_service_checks_tcp_with_a_port_or_by_command() -> None:
    assert load({"port": 53}, protocol="udp").health.port == 53
    assert load({"kind": "command", "command": "true"}, protocol="udp").health is not None


def test_source_ports_overlapping_another_services_pool() -> None:
    data = copy.deepcopy(BASE)
    data["service"].append({"name": "other", "vip": "198.18.100.2", "port": 80,
                            "mode": "fullnat", "snat_address": "198.18.1.1",
                            "snat_ports": "61900-62999",
                            "backend": [{"address": "198.18.1.4", "port": 80}]})
    with pytest.raises(ConfigError, match=r"service\[0\]\.health\.source_ports: 61000-61999 "
                                          r"overlaps service\[1\]'s snat_ports 61900-62999"):
        parse_config(data, "x")
    data["service"][0]["health"] = {"kind": "command", "command": "true"}  # no source ports
    parse_config(data, "x")
