"""End to end: UDP datagrams of 3 KB and 8 KB through the VIP over MTU 1500 links.

The client's datagrams arrive at the balancer in fragments (nothing reassembles them before
the raw table: CT --notrack does not turn on conntrack's defragmentation); the rules queue
every fragment to the VIP and from the backends, and the engine rewrites the later fragments
like the first one of their datagram. The backend's answers (as large as the request) come
back in fragments too. Local mode is covered in test_e2e_large_root.py.

With ``conntrack`` another rule on the balancer uses connection tracking, which turns on the
kernel's defragmentation before the raw table: nfqlb then sees whole datagrams of up to 8 KB,
which the rules send to the large-packet queue. Both ways must work.
"""

from __future__ import annotations

import re

import pytest
from lab import UDP_PORT, VIP, VIP6, Lab

pytestmark = pytest.mark.root

SIZES = [3000, 8000, 100]


def payload(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


@pytest.mark.parametrize("conntrack", [False, True], ids=["fragments", "defragmented"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_fragmented_udp_through_the_vip(mode: str, family: int, conntrack: bool) -> None:
    with Lab(2, backend_default_route=mode == "dnat") as lab:
        if family == 6 and not lab.ipv6:
            pytest.skip("this kernel has no IPv6")
        vip = VIP if family == 4 else VIP6
        if conntrack:  # any conntrack user turns defragmentation on in the namespace
            tool = "iptables" if family == 4 else "ip6tables"
            lab.exec(lab.lb, [tool, "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID",
                              "-j", "ACCEPT"])
        with lab.nfqlb(lab.service(mode, protocol="udp", family=family)) as daemon:
            sent = [payload(n, i) for i, n in enumerate(SIZES)]
            replies = lab.udp_exchange(lab.client, vip, UDP_PORT, sent, timeout=3.0)
            for data, reply in zip(sent, replies, strict=True):
                assert reply is not None, f"no answer to {len(data)} bytes\n{daemon.report()}"
                assert reply.peer[0] == vip and reply.peer[1] == UDP_PORT, reply
                assert reply.payload == data, (len(data), len(reply.payload))
                assert reply.label.startswith("backend-")
        code = daemon.stop()
        assert code == 0, daemon.report()
        # the fragments really went through nfqlb: more packets than datagrams, none dropped
        m = re.search(r"^packets (\d+)\s+rewritten (\d+)\s+passed \(not ours\) \d+\s+"
                      r"dropped (\d+)", daemon.stdout, re.M)
        assert m, daemon.report()
        packets, rewritten, dropped = map(int, m.groups())
        assert dropped == 0, daemon.report()
        large = re.search(r"^queue 10001 \(packets over 3960 bytes\): (\d+) packets",
                          daemon.stdout, re.M)
        assert large, daemon.report()
        if conntrack:  # whole datagrams: 3000 B through the binding, 8000 B the large queue
            assert int(large.group(1)) >= 2 and rewritten == packets, daemon.report()
        else:  # fragments: each one of them rewritten, none large
            assert int(large.group(1)) == 0 and rewritten >= 2 * (3 + 6) - 2, daemon.report()


def test_fragmented_udp_to_another_port_of_the_vip_passes() -> None:
    """Fragments to the VIP are all queued (the rules cannot see their port), but a datagram
    to a port nfqlb does not balance must reach the balancer's own server whole."""
    with Lab(1, backend_default_route=True, vip_on_lo=True, lb_servers=True) as lab:
        # the service is VIP:53 -> backend; the lb's own UDP server listens on VIP:5353
        with lab.nfqlb(lab.service("dnat", protocol="udp", port=53)) as daemon:
            sent = [payload(8000, 1), payload(3000, 2)]
            replies = lab.udp_exchange(lab.client, VIP, UDP_PORT, sent, timeout=3.0)
            for data, reply in zip(sent, replies, strict=True):
                assert reply is not None, f"no answer to {len(data)} bytes\n{daemon.report()}"
                assert reply.label == "lb-local" and reply.payload == data
        assert daemon.stop() == 0, daemon.report()
        assert "fragment_timeout" not in daemon.stdout, daemon.report()


_REVERSED_SENDER = r"""
import socket, sys
from scapy.layers.inet import IP, UDP, fragment
from scapy.sendrecv import send
src, dst, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind((src, 0))
rx.settimeout(3.0)
data = bytes((i * 13) & 0xFF for i in range(size))
dgram = IP(src=src, dst=dst, id=4242) / UDP(sport=rx.getsockname()[1], dport=port) / data
frags = fragment(IP(bytes(dgram)), fragsize=1480)
send(frags[::-1], verbose=False)  # the last fragment first, the first one last
reply, peer = rx.recvfrom(65535)
label, _, body = reply.partition(b":")
print(len(frags), peer[0], peer[1], label.decode(), body == data)
"""


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_fragments_in_reverse_order_are_held_and_released(mode: str) -> None:
    """The later fragments reach nfqlb before the first: the daemon holds them, and gives
    them their verdict when the first one comes (through both queue adapters' late path)."""
    import sys

    from lab import CLIENT_ADDR

    with Lab(2, backend_default_route=mode == "dnat") as lab:
        with lab.nfqlb(lab.service(mode, protocol="udp")) as daemon:
            proc = lab.exec(lab.client, [sys.executable, "-c", _REVERSED_SENDER, CLIENT_ADDR,
                                         VIP, str(UDP_PORT), "6000"], timeout=20)
            nfrags, peer, port, label, same = proc.stdout.decode().split()
            assert int(nfrags) == 5 and (peer, int(port)) == (VIP, UDP_PORT)
            assert label.startswith("backend-") and same == "True", proc.stdout
        assert daemon.stop() == 0, daemon.report()
        held = re.search(r"fragment_held (\d+)", daemon.stdout)
        assert held and int(held.group(1)) == 4, daemon.report()
        assert "fragment_timeout" not in daemon.stdout, daemon.report()
