"""``nfqlb run`` refuses, before touching anything, addresses that must be this host's and
are not (issue 9): a fullnat ``snat_address``, a local-mode VIP or backend address.

The unit tests ask the kernel of the test's own network namespace about addresses it cannot
have (198.18.255.254 and 2001:db8:ffff::fe are assigned nowhere by the tests); the root test
runs ``nfqlb run`` in a fresh namespace and checks that its rules and sysctls are untouched.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfqlb.config import parse_config
from nfqlb.errors import SystemSetupError
from nfqlb.io import preflight

NOT_HERE, NOT_HERE6 = "198.18.255.254", "2001:db8:ffff::fe"
_names = itertools.count(1)


def fullnat(snat: str, vip: str = "198.18.100.1", backend: str = "198.18.1.2") -> dict[str, Any]:
    return {"name": f"f-{snat}", "vip": vip, "port": 80, "mode": "fullnat",
            "snat_address": snat, "snat_ports": "20000-29999",
            "backend": [{"address": backend, "port": 8080}]}


def local(vip: str, backend: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"port": 8080}
    if backend is not None:
        b["address"] = backend
    return {"name": f"l-{vip}", "vip": vip, "port": 80, "mode": "local", "backend": [b]}


def test_loopback_is_local_and_an_unassigned_address_is_not() -> None:
    assert preflight.is_local(ipaddress.ip_address("127.0.0.1")) is True
    assert preflight.is_local(ipaddress.ip_address(NOT_HERE)) is False
    if os.path.exists("/proc/sys/net/ipv6") and preflight.is_local(
            ipaddress.ip_address("::1")):
        assert preflight.is_local(ipaddress.ip_address(NOT_HERE6)) is False


@pytest.mark.parametrize("service, key", [
    (fullnat(NOT_HERE), "service[0].snat_address"),
    (local(NOT_HERE), "service[0].vip"),
    (local("127.0.0.1", backend=NOT_HERE), "service[0].backend[0].address"),
])
def test_an_address_that_is_not_this_hosts_is_one_line(service: dict[str, Any],
                                                       key: str) -> None:
    config = parse_config({"service": [service]}, "my.toml")
    with pytest.raises(SystemSetupError) as info:
        preflight.check_addresses(config)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"my.toml: {key}: ") and "is not an address of this host" in text


def test_local_addresses_pass() -> None:
    preflight.check_addresses(parse_config(
        {"service": [fullnat("127.0.0.1"), local("127.0.0.1", backend="127.0.0.2")]}))


def test_dnat_needs_no_local_address() -> None:
    preflight.check_addresses(parse_config({"service": [
        {"name": "d", "vip": NOT_HERE, "port": 80, "mode": "dnat",
         "backend": [{"address": "198.18.1.2", "port": 8080}]}]}))


def test_under_ip_nonlocal_bind_the_routing_table_decides(monkeypatch: Any) -> None:
    """A bind succeeds for any address when ip_nonlocal_bind is set: then `ip route get`
    (its first word "local") is asked instead."""
    monkeypatch.setattr(preflight, "_nonlocal_bind", lambda version: True)
    monkeypatch.setattr(preflight, "_bind_says_local", lambda address: True)
    monkeypatch.setattr(preflight, "_route_says_local", lambda address: False)
    assert preflight.is_local(ipaddress.ip_address(NOT_HERE)) is False
    monkeypatch.setattr(preflight, "_route_says_local", lambda address: None)  # no `ip`
    assert preflight.is_local(ipaddress.ip_address(NOT_HERE)) is True


# -- nfqlb run in a namespace of its own -----------------------------------------------------


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exit {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and iptables")
    name = f"nfqlbt-{os.getpid()}-pre{next(_names)}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {proc.stderr.strip()}")
    try:
        sh(name, "ip", "link", "set", "lo", "up")
        sh(name, "ip", "addr", "add", "198.18.1.1/32", "dev", "lo")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _state(ns: str) -> str:
    rules = "".join(line + "\n" for tool in ("iptables-save", "ip6tables-save")
                    for line in sh(ns, tool).stdout.splitlines() if not line.startswith("#"))
    sysctls = sh(ns, "cat", "/proc/sys/net/ipv4/ip_forward",
                 "/proc/sys/net/ipv4/conf/all/accept_local").stdout
    return rules + sysctls


@pytest.mark.root
@pytest.mark.parametrize("service, key", [
    (fullnat(NOT_HERE), "service[0].snat_address"),
    (local("198.18.100.1"), "service[0].vip"),
    (fullnat(NOT_HERE6, vip="2001:db8:100::1", backend="2001:db8:1::2"),
     "service[0].snat_address"),
])
def test_run_refuses_before_touching_anything(ns: str, tmp_path: Path,
                                              service: dict[str, Any], key: str) -> None:
    config = tmp_path / "nfqlb.toml"
    lines = ["[daemon]", "queue = 61", "[[service]]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in service.items() if k != "backend"]
    for b in service["backend"]:
        lines += ["[[service.backend]]", *(f"{k} = {v!r}".replace("'", '"')
                                           for k, v in b.items())]
    config.write_text("\n".join(lines) + "\n")
    before = _state(ns)
    proc = sh(ns, sys.executable, "-m", "nfqlb", "run", "--config", str(config), check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"nfqlb: error: {config}: {key}: ")
    assert "is not an address of this host" in proc.stderr
    assert _state(ns) == before
    # with the address assigned, the same configuration gets past the check (and serves)
    address = service.get("snat_address", service["vip"])
    if ":" in address:
        sh(ns, "ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
    else:
        sh(ns, "ip", "addr", "add", f"{address}/32", "dev", "lo")
    log = tmp_path / "run.err"
    with log.open("w") as err_file:
        served = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nfqlb",
                                   "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                  stderr=err_file)
    try:
        # serving (its log says so) means the check passed; on a loaded machine the start
        # may take seconds, and a stop signal before the handlers are in kills it unclean
        deadline = time.monotonic() + 60
        while "serving queue" not in log.read_text() and served.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served.poll() is None, f"nfqlb run exited {served.returncode}: {log.read_text()}"
        assert "serving queue" in log.read_text(), log.read_text()
        served.terminate()
        served.wait(timeout=30)
        assert served.returncode == 0, log.read_text()
    finally:
        if served.poll() is None:
            served.kill()
            served.wait()
    err = log.read_text()
    assert "is not an address of this host" not in err
    assert _state(ns) == before
