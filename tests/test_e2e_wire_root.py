"""End to end at the edges of the wire: a SYN flood against a small flow table, path MTU
discovery through the balancer, ICMP echo to the VIP, and TCP connections that outlive an
nfqlb restart.

Same lab as ``test_e2e_root.py`` (``tests/lab/``): client 198.18.0.2 / 2001:db8::2 -> lb
-> backends 198.18.1.x / 2001:db8:1::x, VIPs 198.18.100.1 and 2001:db8:100::1. Every test
builds its own lab and tears it down; every traffic loop is bounded in count and time.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time

import pytest
from lab import (
    CLIENT_ADDR,
    CLIENT_ADDR6,
    LB_BACKEND_ADDR,
    LB_BACKEND_ADDR6,
    VIP,
    VIP6,
    Host,
    Lab,
    LabError,
    Nfqlb,
    blob_bytes,
    kernel_has_ipv6,
    sha256,
    url_host,
)

pytestmark = pytest.mark.root

BLOB_SHA256 = sha256(blob_bytes())
needs_ipv6 = pytest.mark.skipif(not kernel_has_ipv6(), reason="the kernel has no IPv6")


def vip(family: int) -> str:
    return VIP if family == 4 else VIP6


def stopped_cleanly(daemon: Nfqlb) -> dict[str, int]:
    """SIGTERM; exit 0; the counters printed on the way out."""
    code = daemon.stop()
    assert code == 0, f"nfqlb exit code {code}\n{daemon.report()}"
    blocks = daemon.stats()
    assert blocks, f"no counters on stdout\n{daemon.report()}"
    return blocks[-1]


# -- SYN flood against max_flows -------------------------------------------------------------

MAX_FLOWS = 200
FLOOD_SYNS = 5000
FLOOD_SECONDS = 2.0
FLOOD_PORTS = (40000, 59999)  # the flood's source ports; curl uses 10000-19999 meanwhile

# Raw IPv4 SYNs from the client's own address, distinct random source ports, paced over
# "seconds" and never longer than "budget" (the kernel fills in the IP checksum and length).
_SYN_FLOOD = r'''
import json, random, socket, struct, sys, time
a = json.loads(sys.argv[1])
src, dst = socket.inet_aton(a["src"]), socket.inet_aton(a["dst"])

def checksum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rng = random.Random(a["seed"])
ports = rng.sample(range(a["ports"][0], a["ports"][1] + 1), a["count"])
start = time.monotonic()
sent = 0
for i, sport in enumerate(ports):
    now = time.monotonic()
    if now - start > a["budget"]:
        break
    tcp = struct.pack("!HHIIBBHHH", sport, a["dport"], rng.getrandbits(32), 0, 5 << 4, 0x02,
                      64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", checksum(src + dst + struct.pack("!xBH", 6, 20) + tcp)) \
        + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)
    sock.sendto(ip + tcp, (a["dst"], 0))
    sent += 1
    ahead = start + (i + 1) * a["seconds"] / a["count"] - time.monotonic()
    if ahead > 0.002:
        time.sleep(ahead)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}))
'''


def test_syn_flood_is_bounded_by_max_flows_and_service_goes_on() -> None:
    with Lab(2) as lab:
        c = lab.client
        # curl's ports stay out of the flood's range, and the client keeps quiet about the
        # SYN-ACKs to the flood (as a spoofing flooder would): the half-open flows stay
        lab.sysctl(c, "net.ipv4.ip_local_port_range", "10000 19999")
        lab.exec(c, ["iptables", "-A", "INPUT", "-p", "tcp", "-s", VIP, "--sport", "80",
                     "--dport", f"{FLOOD_PORTS[0]}:{FLOOD_PORTS[1]}", "-j", "DROP"])
        daemon = lab.nfqlb(lab.service("dnat"), daemon={"max_flows": MAX_FLOWS},
                           args=["--stats-interval", "0.25"])
        with daemon:
            assert lab.curl(c, f"http://{VIP}/").strip().startswith(b"backend-")
            args = {"src": CLIENT_ADDR, "dst": VIP, "dport": 80, "count": FLOOD_SYNS,
                    "seconds": FLOOD_SECONDS, "budget": FLOOD_SECONDS + 3, "seed": 7,
                    "ports": FLOOD_PORTS}
            out = lab.dir / "flood.out"
            flood = lab.spawn(c, [sys.executable, "-c", _SYN_FLOOD, json.dumps(args)], log=out)
            during: list[bool] = []
            deadline = time.monotonic() + FLOOD_SECONDS + 8
            while flood.poll() is None and len(during) < 40 and time.monotonic() < deadline:
                try:
                    during.append(lab.curl(c, f"http://{VIP}/", max_time=2).startswith(
                        b"backend-"))
                except LabError:
                    during.append(False)
            flood.wait(max(1.0, deadline - time.monotonic()))
            sent = json.loads(out.read_text().splitlines()[-1])["sent"]
            after = [lab.curl(c, f"http://{VIP}/", max_time=2).startswith(b"backend-")
                     for _ in range(3)]
        final = stopped_cleanly(daemon)
        snapshots = daemon.stats()
        assert sent == FLOOD_SYNS, out.read_text()
        assert len(during) >= 3 and all(during), f"curl during the flood: {during}"
        assert all(after), f"curl after the flood: {after}"
        assert max(s["active"] for s in snapshots) <= MAX_FLOWS, daemon.report()
        assert final.get("evicted", 0) > 0, daemon.report()
        assert final["flows"] >= sent, daemon.report()


# -- path MTU discovery ------------------------------------------------------------------------
#
# The balancer's own end of the client link has MTU 1280; everything else 1500, the client's
# end too. So the client advertises MSS 1460 (nfqlb's default clamp leaves it), the backend
# sends full 1500-byte segments with DF, and the balancer, forwarding them to the client,
# answers "fragmentation needed" / "packet too big" (mtu 1280). The balancer addresses that
# error to the source of the packet it could not forward: the VIP, which nfqlb had already put
# there (on lo here, so the error is routed at all: through raw OUTPUT to the local host). Only
# if nfqlb translates it, to the backend and quoting the packet as the backend sent it, does
# the backend's TCP learn the path MTU; otherwise the download stalls.

SMALL_MTU = 1280


@pytest.mark.parametrize("family", [4, pytest.param(6, marks=needs_ipv6)])
@pytest.mark.parametrize("mode", ["dnat", "fullnat"])
def test_path_mtu_discovery_through_the_balancer(mode: str, family: int) -> None:
    with Lab(1, backend_default_route=(mode == "dnat"), vip_on_lo=True) as lab:
        b = lab.backends[0]
        lab.ip(lab.lb, "link", "set", "eth0", "mtu", str(SMALL_MTU))
        peer = {("dnat", 4): CLIENT_ADDR, ("dnat", 6): CLIENT_ADDR6,
                ("fullnat", 4): LB_BACKEND_ADDR, ("fullnat", 6): LB_BACKEND_ADDR6}[mode, family]
        url = f"http://{url_host(vip(family))}/blob"
        out = lab.dir / "download"
        with lab.nfqlb(lab.service(mode, family=family)) as daemon:
            if (mode, family) == ("dnat", 4):
                # control: with the balancer's errors kept from nfqlb, the download stalls
                # (so MSS clamping or anything else does not make the test pass on its own)
                block = ["-t", "raw", "-I", "OUTPUT", "-p", "icmp", "--icmp-type",
                         "fragmentation-needed", "-j", "ACCEPT"]
                lab.exec(lab.lb, ["iptables", *block])
                with pytest.raises(LabError, match="curl"):
                    lab.curl(lab.client, url, output=out, max_time=3)
                assert f"mtu {SMALL_MTU}" not in route_to(lab, b, peer)
                lab.exec(lab.lb, ["iptables", "-t", "raw", "-D", *block[3:]])
            lab.curl(lab.client, url, output=out, max_time=6)
            data = out.read_bytes()
            assert len(data) == len(blob_bytes()) and sha256(data) == BLOB_SHA256
        final = stopped_cleanly(daemon)
        assert final.get("icmp_error_translated", 0) > 0, daemon.report()
        lb, backend = lab.snmp(lab.lb), lab.snmp(b)
        if family == 4:
            assert lb["Icmp.OutDestUnreachs"] > 0 and backend["Icmp.InDestUnreachs"] > 0
        else:
            assert lb["Icmp6OutPktTooBigs"] > 0 and backend["Icmp6InPktTooBigs"] > 0
        assert f"mtu {SMALL_MTU}" in route_to(lab, b, peer), "the backend learnt no path MTU"


def route_to(lab: Lab, host: Host, dst: str) -> str:
    """``ip route get dst`` in ``host``: shows "mtu N" once a path MTU is cached."""
    return lab.exec(host, ["ip", "route", "get", dst]).stdout.decode()


# -- ICMP echo to the VIP -----------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, pytest.param(6, marks=needs_ipv6)])
@pytest.mark.parametrize("echo", [
    "accept",
    "drop",
])
def test_icmp_echo_to_the_vip(echo: str, family: int) -> None:
    with Lab(1, vip_on_lo=True) as lab:
        svc = lab.service("dnat", family=family)
        with lab.nfqlb(svc, daemon={"icmp_echo": echo}) as daemon:
            answered = lab.ping(lab.client, vip(family), count=3, timeout=0.5)
            assert answered == (3 if echo == "accept" else 0), daemon.report()
        stopped_cleanly(daemon)


# -- a TCP connection across an nfqlb restart -------------------------------------------------

# One TCP connection, HTTP/1.1 keep-alive requests every "interval" seconds; per request the
# time and the body; on the first error its type and time, then stop. One JSON line per event.
_KEEPALIVE = r'''
import json, os, re, socket, sys, time
a = json.loads(sys.argv[1])
def emit(**kw):
    print(json.dumps(kw), flush=True)
sock = socket.create_connection((a["dst"], a["port"]), timeout=a["timeout"],
                                source_address=("", a["sport"]) if a.get("sport") else None)
emit(event="connected", port=sock.getsockname()[1], t=time.monotonic())
buf = b""
def read_some():
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionAbortedError("closed by the peer")
    return chunk
for i in range(a["count"]):
    while a.get("hold") and os.path.exists(a["hold"]):  # the test holds the client meanwhile
        time.sleep(0.01)
    t0 = time.monotonic()
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
        while b"\r\n\r\n" not in buf:
            buf += read_some()
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        while len(buf) < length:
            buf += read_some()
        body, buf = buf[:length], buf[length:]
        emit(event="answer", i=i, t=t0, done=time.monotonic(), body=body.decode().strip())
    except OSError as exc:
        emit(event="error", i=i, t=t0, at=time.monotonic(), type=type(exc).__name__,
             text=str(exc))
        break
    time.sleep(max(0.0, t0 + a["interval"] - time.monotonic()))
emit(event="end", t=time.monotonic())
'''

REQUESTS = 20
INTERVAL = 0.2
RESTART_AFTER = 1.2  # seconds into the conversation


def run_across_restart(lab: Lab, svc: dict[str, object], host: Host | None = None,
                       quiet_restart: bool = False, sport: int | None = None
                       ) -> tuple[list[dict[str, object]], float, Nfqlb]:
    """Start nfqlb, run the keep-alive client, restart nfqlb after RESTART_AFTER seconds.

    With ``quiet_restart`` the client sends nothing while no nfqlb runs (with the rules gone,
    a packet to a local VIP would be answered by the kernel itself, not by nfqlb). ``sport``:
    the client's source port (default: the kernel's choice).
    Returns the client's events, the time (monotonic, shared by all namespaces) at which
    the second nfqlb had its rules in place, and that second daemon (stopped).
    """
    first = lab.nfqlb(svc).start()
    out = lab.dir / "keepalive.out"
    hold = lab.dir / "hold"
    args = {"dst": VIP, "port": 80, "count": REQUESTS, "interval": INTERVAL, "timeout": 8,
            "hold": str(hold) if quiet_restart else None, "sport": sport}
    client = lab.spawn(host or lab.client,
                       [sys.executable, "-c", _KEEPALIVE, json.dumps(args)], log=out)
    time.sleep(RESTART_AFTER)
    if quiet_restart:
        hold.touch()
        time.sleep(INTERVAL * 2)  # the request under way is answered
    assert first.stop() == 0, first.report()
    second = lab.nfqlb(svc).start()
    up = time.monotonic()
    hold.unlink(missing_ok=True)
    try:
        client.wait(REQUESTS * INTERVAL + 15)
    except Exception:
        client.kill()
        client.wait(5)
        raise
    finally:
        second.stop()
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert events and events[0]["event"] == "connected", out.read_text()
    return events, up, second


def sport_where_adoption_by_hash_would_move(svc: dict[str, object]) -> int:
    """A client port whose flow ``svc``'s policy places on another backend than the rendezvous
    hash of the flow (flow_hash's choice), so that adopting it by that hash would move it: the
    test then fails for a restart that does not adopt on the policy's own choice. For
    flow_hash itself, any port."""
    from nfqlb.config import parse_config
    from nfqlb.policies import FlowKey, hash_choice, make_policy

    service = parse_config({"service": [svc]}).services[0]
    policy = make_policy(service.policy, service.backends, service.policy_options)
    for sport in range(40000, 41000):
        flow = FlowKey(6, ipaddress.ip_address(CLIENT_ADDR), sport, service.vip, service.port)
        if service.policy == "flow_hash" or \
                policy.choose(flow, 0.0) != hash_choice(flow, service.backends):
            return sport
    raise AssertionError("no such port")


@pytest.mark.parametrize("policy", ["flow_hash", "maglev", "source_hash"])
def test_connection_survives_restart_with_unknown_flow_hash(policy: str) -> None:
    with Lab(2) as lab:
        svc = lab.service("dnat", policy=policy, unknown_flow="hash")
        events, up, second = run_across_restart(
            lab, svc, sport=sport_where_adoption_by_hash_would_move(svc))
        answers = [e for e in events if e["event"] == "answer"]
        errors = [e for e in events if e["event"] == "error"]
        assert not errors and len(answers) == REQUESTS, events
        assert len({e["body"] for e in answers}) == 1, f"moved between backends: {answers}"
        assert any(float(e["t"]) < up for e in answers), "no request before the restart"
        assert any(float(e["t"]) > up for e in answers), "no request after the restart"
        port = events[0]["port"]
        served = [(b.label, p) for b in lab.backends for _, p, _ in lab.access_log(b)]
        assert served == [(answers[0]["body"], port)] * REQUESTS, served
        assert second.stats()[-1].get("flow_adopted", 0) >= 1, second.report()


@pytest.mark.parametrize("mode, where", [(m, w) for m in ("local", "dnat", "fullnat")
                                         for w in ("client", "lb")])
def test_connection_is_reset_promptly_after_restart_with_unknown_flow_reset(
        mode: str, where: str) -> None:
    """The RST for a packet of no flow reaches the client in every mode, remote or on the
    balancer host itself (VIP on lo)."""
    local_vip = mode == "local" or where == "lb"
    with Lab(2, backend_default_route=mode == "dnat", vip_on_lo=local_vip,
             lb_servers=mode == "local") as lab:
        svc = lab.service(mode, policy="flow_hash", unknown_flow="reset")
        host = lab.client if where == "client" else lab.lb
        events, up, second = run_across_restart(lab, svc, host, quiet_restart=True)
        answers = [e for e in events if e["event"] == "answer"]
        errors = [e for e in events if e["event"] == "error"]
        assert answers and all(float(e["done"]) < up for e in answers), events
        assert len(errors) == 1 and errors[0]["type"] == "ConnectionResetError", events
        # at the first packet after the restart (a retransmission at most a few RTOs later),
        # far from the client's own 8 s timeout
        assert float(errors[0]["at"]) - up < 3.0, (events, up)
        assert second.stats()[-1].get("reset_sent", 0) >= 1, second.report()
