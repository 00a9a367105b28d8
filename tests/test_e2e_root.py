"""End to end through the kernel: real curl and a real UDP client in a client namespace, nginx
and UDP servers in backend namespaces, ``python -m nfqlb run`` in the balancer namespace.

The lab (``tests/lab/``) builds client 198.18.0.2 -> lb 198.18.0.1 | 198.18.1.1 -> backends
198.18.1.2, .3, .4 and the VIP 198.18.100.1. Every test builds its own lab and tears it down.
The first tests check the lab itself with the kernel's own NAT, so a failure further down is
about nfqlb, not about the lab.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

import pytest
from lab import (
    CLIENT_ADDR,
    HTTP_PORT,
    LB_BACKEND_ADDR,
    UDP_PORT,
    VIP,
    Host,
    Lab,
    LabError,
    Nfqlb,
    blob_bytes,
    sha256,
)

pytestmark = pytest.mark.root

BLOB_SHA256 = sha256(blob_bytes())
#: What serves the main queue ([daemon] binding): both are tested end to end here.
BINDINGS = ["netfilterqueue", "netlink"]
SNAT_LO, SNAT_HI = 20000, 29999


def get_labels(lab: Lab, host: Host, n: int, url: str = f"http://{VIP}/") -> list[str]:
    """``n`` sequential curl requests (new connection each); the label each answer names."""
    return [lab.curl(host, url).decode().strip() for _ in range(n)]


def assert_round_robin(labels: Sequence[str], backends: Sequence[Host]) -> None:
    counts = collections.Counter(labels)
    assert set(counts) == {b.label for b in backends}, f"served by: {labels}"
    assert max(counts.values()) - min(counts.values()) <= 1, f"not round robin: {labels}"


def assert_clean_exit(daemon: Nfqlb, backends: Sequence[Host] = ()) -> None:
    """SIGTERM -> exit 0, and the stats summary on stdout names every backend."""
    code = daemon.stop()
    assert code == 0, f"nfqlb exit code {code}\n{daemon.report()}"
    assert daemon.stdout.strip(), f"no stats summary on stdout\n{daemon.report()}"
    for b in backends:
        assert b.address in daemon.stdout, f"{b.address} not in the summary\n{daemon.report()}"


# -- the lab itself, with the kernel's NAT instead of nfqlb -----------------------------------

def test_lab_servers_answer_and_client_has_no_direct_path() -> None:
    with Lab(3, lb_servers=True, vip_on_lo=True) as lab:
        for b in [*lab.backends, lab.lb]:
            addr = VIP if b is lab.lb else b.address
            assert lab.curl(lab.lb, f"http://{addr}:{HTTP_PORT}/") == f"{b.label}\n".encode()
            blob = lab.curl(lab.lb, f"http://{addr}:{HTTP_PORT}/blob")
            assert sha256(blob) == BLOB_SHA256
            [reply] = lab.udp_exchange(lab.lb, addr, UDP_PORT, [b"ping"])
            assert reply is not None and (reply.label, reply.payload) == (b.label, b"ping")
        assert not lab.can_route(lab.client, lab.backends[0].address)
        assert lab.can_route(lab.backends[0], CLIENT_ADDR)
    with Lab(1, backend_default_route=False) as lab:
        assert not lab.can_route(lab.backends[0], CLIENT_ADDR)


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_lab_carries_kernel_nat(mode: str) -> None:
    """The paths nfqlb must build, built with iptables' nat table: the lab is sound."""
    with Lab(1, backend_default_route=(mode == "dnat")) as lab:
        b = lab.backends[0]
        lab.exec(lab.lb, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        lab.exec(lab.lb, ["iptables", "-t", "nat", "-A", "PREROUTING", "-d", VIP, "-p", "tcp",
                          "--dport", "80", "-j", "DNAT", "--to-destination",
                          f"{b.address}:{HTTP_PORT}"])
        if mode == "fullnat":
            lab.exec(lab.lb, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "br0",
                              "-j", "SNAT", "--to-source", LB_BACKEND_ADDR])
        assert lab.curl(lab.client, f"http://{VIP}/") == b"backend-1\n"
        [(peer, _port, _uri)] = lab.access_log(b)
        assert peer == (CLIENT_ADDR if mode == "dnat" else LB_BACKEND_ADDR)


# -- nfqlb ------------------------------------------------------------------------------------

@pytest.mark.parametrize("binding", BINDINGS)
def test_dnat_http_round_robin_keeps_client_address(binding: str) -> None:
    with Lab(2) as lab:
        with lab.nfqlb(lab.service("dnat"), daemon={"binding": binding}) as daemon:
            labels = get_labels(lab, lab.client, 6)
            assert_round_robin(labels, lab.backends)
        assert_clean_exit(daemon, lab.backends)
        for b in lab.backends:
            assert {peer for peer, _, _ in lab.access_log(b)} == {CLIENT_ADDR}
        # the main queue's stats line says who served it: nfqlb's netlink client counts
        # packets, the NetfilterQueue adapter (whose binding counts none) starts with wakeups
        served = re.search(r"^queue 1: (\d+) packets, \d+ wakeups", daemon.stdout, re.M)
        if binding == "netlink":
            assert served and int(served.group(1)) > 0, daemon.report()
        else:
            assert not served and re.search(r"^queue 1: \d+ wakeups", daemon.stdout, re.M)


@pytest.mark.parametrize("binding", BINDINGS)
def test_fullnat_http_round_robin_to_backends_without_route_to_client(binding: str) -> None:
    with Lab(3, backend_default_route=False) as lab:
        for b in lab.backends:
            assert not lab.can_route(b, CLIENT_ADDR), lab.routes(b)
        with lab.nfqlb(lab.service("fullnat"), daemon={"binding": binding}) as daemon:
            labels = get_labels(lab, lab.client, 6)
            assert_round_robin(labels, lab.backends)
        assert_clean_exit(daemon, lab.backends)
        for b in lab.backends:
            for peer, port, _ in lab.access_log(b):
                assert peer == LB_BACKEND_ADDR and SNAT_LO <= port <= SNAT_HI, (peer, port)


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_udp_round_robin_per_flow_and_sticky_within_a_flow(mode: str, binding: str) -> None:
    with Lab(3, backend_default_route=(mode == "dnat")) as lab:
        with lab.nfqlb(lab.service(mode, protocol="udp"), daemon={"binding": binding}) as daemon:
            payloads = [f"query-{i}".encode() for i in range(6)]
            replies = lab.udp_exchange(lab.client, VIP, UDP_PORT, payloads, new_socket_each=True)
            for payload, reply in zip(payloads, replies, strict=True):
                assert reply is not None, f"no answer to {payload!r}: {replies}"
                assert reply.payload == payload and reply.peer == (VIP, UDP_PORT), reply
            assert_round_robin([r.label for r in replies if r], lab.backends)

            one_flow = lab.udp_exchange(lab.client, VIP, UDP_PORT,
                                        [f"same-{i}".encode() for i in range(4)])
            assert all(one_flow), one_flow
            assert len({r.label for r in one_flow if r}) == 1, f"flow not sticky: {one_flow}"
        assert_clean_exit(daemon, lab.backends)
        expected_peer = CLIENT_ADDR if mode == "dnat" else LB_BACKEND_ADDR
        for b in lab.backends:
            for peer, port in lab.udp_log(b):
                assert peer == expected_peer, (b.label, peer, port)
                if mode == "fullnat":
                    assert SNAT_LO <= port <= SNAT_HI, (b.label, peer, port)


@pytest.mark.parametrize("binding", BINDINGS)
def test_local_mode_from_remote_client_and_from_balancer_host(binding: str) -> None:
    with Lab(1, vip_on_lo=True, lb_servers=True) as lab:
        # nothing listens on VIP:80 itself: only the rewrite to :8080 can answer
        with pytest.raises(LabError, match="curl"):
            lab.curl(lab.client, f"http://{VIP}/", max_time=2)
        tcp = lab.service("local")
        udp = lab.service("local", protocol="udp", port=53)
        with lab.nfqlb(tcp, udp, daemon={"binding": binding}) as daemon:
            assert get_labels(lab, lab.client, 2) == ["lb-local"] * 2
            assert get_labels(lab, lab.lb, 2) == ["lb-local"] * 2
            [reply] = lab.udp_exchange(lab.client, VIP, 53, [b"local-udp"])
            assert reply is not None and reply.label == "lb-local" and reply.peer == (VIP, 53)
        assert_clean_exit(daemon)


@pytest.mark.parametrize("mode, where", [("local", "client"), ("local", "lb"),
                                         ("dnat", "client"), ("fullnat", "client")])
def test_1mb_download_is_byte_identical(mode: str, where: str) -> None:
    """1 MB over the VIP; ``local`` from the lb host itself crosses lo (MTU 65536)."""
    local = mode == "local"
    with Lab(2, backend_default_route=(mode == "dnat"), vip_on_lo=local,
             lb_servers=local) as lab:
        host = lab.client if where == "client" else lab.lb
        out = lab.dir / "download"
        with lab.nfqlb(lab.service(mode)) as daemon:
            for _ in range(2):
                lab.curl(host, f"http://{VIP}/blob", output=out, max_time=20)
                data = out.read_bytes()
                assert len(data) == len(blob_bytes()) and sha256(data) == BLOB_SHA256
        assert_clean_exit(daemon)


def test_sigterm_removes_exactly_its_rules_and_a_restart_works() -> None:
    with Lab(2) as lab:
        # rules that belong to someone else, which nfqlb must leave alone
        for table, chain in [("raw", "PREROUTING"), ("raw", "OUTPUT"), ("filter", "FORWARD")]:
            lab.exec(lab.lb, ["iptables", "-t", table, "-A", chain, "-m", "comment",
                              "--comment", "not-nfqlb"])
        before = lab.iptables_save(lab.lb)
        for _attempt in range(2):
            with lab.nfqlb(lab.service("dnat"), queue=7) as daemon:
                rules = lab.exec(lab.lb, ["iptables", "-t", "raw", "-S"]).stdout.decode()
                assert "NFQLB-PRE-7" in rules and "NFQLB-OUT-7" in rules, rules
                assert "not-nfqlb" in rules, rules
            assert_clean_exit(daemon)
            assert lab.iptables_save(lab.lb) == before, daemon.report()
