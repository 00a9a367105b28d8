"""End to end over IPv6: real curl and a real UDP client through the IPv6 VIP, nfqlb in the
balancer namespace, nginx and UDP servers in the backends.

The lab (``tests/lab/``) is dual-stack: client 2001:db8::2 -> lb 2001:db8::1 | 2001:db8:1::1
-> backends 2001:db8:1::2, ::3 and the VIP 2001:db8:100::1, routed to the balancer. The lab
sets no IPv6 forwarding on the balancer: nfqlb sets ``net.ipv6.conf.all.forwarding`` itself,
which the first test checks too. Every test builds its own lab and tears it down.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import pytest
from lab import (
    CLIENT_ADDR6,
    LB_BACKEND_ADDR6,
    UDP_PORT,
    VIP6,
    Host,
    Lab,
    Nfqlb,
    blob_bytes,
    kernel_has_ipv6,
    sha256,
    url_host,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not kernel_has_ipv6(), reason="the kernel has no IPv6"),
]

BLOB_SHA256 = sha256(blob_bytes())
SNAT_LO, SNAT_HI = 20000, 29999
URL = f"http://{url_host(VIP6)}/"
FORWARDING = "net.ipv6.conf.all.forwarding"
BINDINGS = ["netfilterqueue", "netlink"]  # what serves the main queue: both tested


def assert_round_robin(labels: Sequence[str], backends: Sequence[Host]) -> None:
    counts = collections.Counter(labels)
    assert set(counts) == {b.label for b in backends}, f"served by: {labels}"
    assert max(counts.values()) - min(counts.values()) <= 1, f"not round robin: {labels}"


def assert_clean_exit(daemon: Nfqlb) -> None:
    code = daemon.stop()
    assert code == 0, f"nfqlb exit code {code}\n{daemon.report()}"


def expected_peer(mode: str) -> str:
    return CLIENT_ADDR6 if mode == "dnat" else LB_BACKEND_ADDR6


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_http_round_robin_over_ipv6(mode: str, binding: str) -> None:
    """curl -6 through the IPv6 VIP reaches every backend in turn; in fullnat the backends
    have no route to the client at all."""
    with Lab(2, backend_default_route=(mode == "dnat"), ipv6=True) as lab:
        if mode == "fullnat":
            for b in lab.backends:
                assert not lab.can_route(b, CLIENT_ADDR6), lab.routes(b, 6)
        assert lab.read_sysctl(lab.lb, FORWARDING) == "0"
        with lab.nfqlb(lab.service(mode, family=6), daemon={"binding": binding}) as daemon:
            assert lab.read_sysctl(lab.lb, FORWARDING) == "1"
            labels = [lab.curl(lab.client, URL, args=["-6"]).decode().strip()
                      for _ in range(4)]
            assert_round_robin(labels, lab.backends)
        assert_clean_exit(daemon)
        assert lab.read_sysctl(lab.lb, FORWARDING) == "0", "forwarding not restored on exit"
        for b in lab.backends:
            peers = [(peer, port) for peer, port, _ in lab.access_log(b)]
            assert peers, f"{b.label} served nothing"
            for peer, port in peers:
                assert peer == expected_peer(mode), (b.label, peer, port)
                if mode == "fullnat":
                    assert SNAT_LO <= port <= SNAT_HI, (b.label, peer, port)


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_udp_exchange_over_ipv6(mode: str, binding: str) -> None:
    """Datagrams through the IPv6 VIP are answered, from the VIP, by a backend."""
    with Lab(2, backend_default_route=(mode == "dnat"), ipv6=True) as lab:
        with lab.nfqlb(lab.service(mode, protocol="udp", family=6),
                       daemon={"binding": binding}) as daemon:
            payloads = [f"query6-{i}".encode() for i in range(4)]
            replies = lab.udp_exchange(lab.client, VIP6, UDP_PORT, payloads,
                                       new_socket_each=True)
            for payload, reply in zip(payloads, replies, strict=True):
                assert reply is not None, f"no answer to {payload!r}: {replies}"
                assert reply.payload == payload and reply.peer == (VIP6, UDP_PORT), reply
            assert_round_robin([r.label for r in replies if r], lab.backends)
        assert_clean_exit(daemon)
        for b in lab.backends:
            for peer, port in lab.udp_log(b):
                assert peer == expected_peer(mode), (b.label, peer, port)


def test_1mb_download_over_ipv6_fullnat_is_byte_identical() -> None:
    with Lab(2, backend_default_route=False, ipv6=True) as lab:
        out = lab.dir / "download"
        with lab.nfqlb(lab.service("fullnat", family=6)) as daemon:
            for _ in range(2):  # one from each backend
                lab.curl(lab.client, f"{URL}blob", output=out, max_time=20, args=["-6"])
                data = out.read_bytes()
                assert len(data) == len(blob_bytes()) and sha256(data) == BLOB_SHA256
        assert_clean_exit(daemon)
