"""End to end with packets the NetfilterQueue binding cannot carry (over 3960 bytes).

The rules send them to the large-packet queue (queue + 10000 here: 10001), which nfqlb serves
with its own netlink client. Each case checks the answers byte for byte and, from the stats
nfqlb prints at exit, that the large queue really carried packets:

- local mode, a client on the balancer itself: request and answer are single large packets
  in raw OUTPUT (lo has MTU 65536), so both go through the large queue;
- local mode, a remote client (MTU 1500): the request arrives in fragments, the answer leaves
  the balancer's UDP server as one large packet in raw OUTPUT (fragmented only afterwards);
- (local mode listens on VIP:53, not VIP:5353: the lab's own server on 5353 is the backend,
  and a local backend on the service's own port would loop;)
- jumbo frames (MTU 9000 on every link), dnat: the request and the backend's answer cross raw
  PREROUTING as single large packets.
"""

from __future__ import annotations

import re

import pytest
from lab import LB_BACKEND_ADDR, UDP_PORT, VIP, Host, Lab, Nfqlb

pytestmark = pytest.mark.root

LARGE_QUEUE = 10001  # queue 1 + 10000
SIZES = [100, 3000, 8000]


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(size))


def large_queue_packets(daemon: Nfqlb) -> int:
    """Packets the large queue handled, from the stats line printed at exit."""
    m = re.search(rf"^queue {LARGE_QUEUE} \(packets over 3960 bytes\): (\d+) packets, "
                  r"\d+ wakeups, (\d+) callback errors", daemon.stdout, re.M)
    assert m, f"no stats line for queue {LARGE_QUEUE}\n{daemon.report()}"
    assert m.group(2) == "0", daemon.report()
    return int(m.group(1))


def exchange_and_check(lab: Lab, host: Host, port: int, label: str) -> None:
    """Send each of SIZES (one flow), expect ``label:`` + the same bytes back from VIP:port."""
    sent = [payload(n, seed) for seed, n in enumerate(SIZES)]
    replies = lab.udp_exchange(host, VIP, port, sent, timeout=3.0)
    for data, reply in zip(sent, replies, strict=True):
        assert reply is not None, f"no answer to {len(data)} bytes from {host.label}: {replies}"
        assert (reply.label, reply.peer) == (label, (VIP, port)), reply
        assert reply.payload == data, f"{len(data)} bytes sent, {len(reply.payload)} came back"


def stop_cleanly(daemon: Nfqlb) -> None:
    code = daemon.stop()
    assert code == 0, f"nfqlb exit code {code}\n{daemon.report()}"


def test_local_udp_from_the_balancer_host_large_both_ways() -> None:
    """Request and answer are single packets of up to 8037 bytes in raw OUTPUT."""
    with Lab(1, vip_on_lo=True, lb_servers=True) as lab:
        with lab.nfqlb(lab.service("local", protocol="udp", port=53)) as daemon:
            exchange_and_check(lab, lab.lb, 53, "lb-local")
        stop_cleanly(daemon)
        # 8000 bytes both ways; 3000 bytes fits the binding
        assert large_queue_packets(daemon) == 2, daemon.report()


def test_local_udp_from_a_remote_client_large_answer_leaves_through_output() -> None:
    """The 8037-byte answer is one packet in raw OUTPUT; the request comes in fragments.

    Nothing reassembles before the raw table here (CT --notrack does not enable conntrack's
    defragmentation), so only the first fragment, the one with the ports, matches the rules;
    in local mode only the port changes, so the engine's rewrite of that fragment (with the
    UDP checksum of the whole datagram) is all the request needs. The answer is fragmented
    only after nfqlb rewrote it.
    """
    with Lab(1, vip_on_lo=True, lb_servers=True) as lab:
        with lab.nfqlb(lab.service("local", protocol="udp", port=53)) as daemon:
            exchange_and_check(lab, lab.client, 53, "lb-local")
        stop_cleanly(daemon)
        assert large_queue_packets(daemon) >= 1, daemon.report()  # at least the answer


def set_mtu(lab: Lab, mtu: int) -> None:
    """Every link of the lab: client and lb eth0, the bridge and its ports, backend eth0."""
    lab.ip(lab.client, "link", "set", "eth0", "mtu", str(mtu))
    lab.ip(lab.lb, "link", "set", "eth0", "mtu", str(mtu))
    for i, b in enumerate(lab.backends, start=1):
        lab.ip(lab.lb, "link", "set", f"p{i}", "mtu", str(mtu))
        lab.ip(b, "link", "set", "eth0", "mtu", str(mtu))
    lab.ip(lab.lb, "link", "set", "br0", "mtu", str(mtu))


@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_jumbo_frames_through_prerouting(mode: str) -> None:
    """MTU 9000: the 8028-byte request and the backend's answer are single frames."""
    with Lab(2, backend_default_route=(mode == "dnat")) as lab:
        set_mtu(lab, 9000)
        with lab.nfqlb(lab.service(mode, protocol="udp")) as daemon:
            sent = [payload(n, seed) for seed, n in enumerate(SIZES)]
            replies = lab.udp_exchange(lab.client, VIP, UDP_PORT, sent, timeout=3.0)
            labels = {b.label for b in lab.backends}
            for data, reply in zip(sent, replies, strict=True):
                assert reply is not None, f"no answer to {len(data)} bytes: {replies}"
                assert reply.label in labels and reply.peer == (VIP, UDP_PORT), reply
                assert reply.payload == data
            assert len({r.label for r in replies if r}) == 1  # one flow, one backend
        stop_cleanly(daemon)
        assert large_queue_packets(daemon) == 2, daemon.report()  # 8000 there and back
        if mode == "fullnat":
            for b in lab.backends:
                assert {peer for peer, _ in lab.udp_log(b)} <= {LB_BACKEND_ADDR}
