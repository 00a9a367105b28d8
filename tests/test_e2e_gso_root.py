"""End to end: bulk TCP through nfqlb in GSO packets, both directions, every rewrite mode.

A TCP sender on a veth hands the kernel 64 KB GSO packets with their checksum left partial
(CHECKSUM_PARTIAL). The rules send them, being long, to the large-packet queue, which asks
for GSO packets whole (NFQA_CFG_F_GSO): each crosses nfqlb once instead of once per ~1500-byte
segment, and its checksum is handled as the kernel reported it (left partial for a packet the
kernel segments on the way out, computed in full for one delivered here whole).

Each case moves BULK_SIZE bytes down (curl fetches a file from nginx) and BULK_SIZE bytes up
(a client sends to a server that answers with the SHA-256 of what it read), checks both
hashes, and reads in nfqlb's exit stats that the large queue received GSO packets, dropped
none as truncated, and handled their checksums the way the path needs. A checksum handled
wrong shows as a hash mismatch or a stalled transfer (the receiver drops every segment).

And UDP: a client sends 20 datagrams in one UDP GSO packet (UDP_SEGMENT); each must reach the
server and be answered (the kernel's UDP segmentation derives the datagrams' checksums from
the partial one nfqlb leaves; a full one there makes every datagram arrive corrupt).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import sys
import time
from typing import Any

import pytest
from lab import (
    HTTP_PORT,
    UDP_PORT,
    VIP,
    VIP6,
    Lab,
    Nfqlb,
    kernel_has_ipv6,
    render_config,
    url_host,
)

pytestmark = pytest.mark.root

BULK_SIZE = 8 << 20
LARGE_QUEUE = 10001  # queue 1 + 10000
HEADERS_QUEUE = 30001  # queue 1 + 30000
SINK_PORT = 9000  # the upload server's port on the backends (or the balancer, local mode)
UP_PORT = 90  # the service port of uploads (local mode: must differ from the server's)

SINK = r'''
import hashlib, socket, sys
port, ready = int(sys.argv[1]), sys.argv[2]
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(8)
open(ready, "w").close()
while True:
    conn, _ = srv.accept()
    conn.settimeout(30)
    h, n = hashlib.sha256(), 0
    try:
        while chunk := conn.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
        conn.sendall(f"{n} {h.hexdigest()}\n".encode())
    except OSError:
        pass
    conn.close()
'''

UPLOAD = r'''
import random, socket, sys
host, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = random.Random(seed).randbytes(size)
s = socket.create_connection((host, port), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
answer = b""
while chunk := s.recv(4096):
    answer += chunk
print(answer.decode().strip())
'''


def bulk(seed: int) -> bytes:
    return random.Random(seed).randbytes(BULK_SIZE)


def large_queue_line(daemon: Nfqlb) -> str:
    m = re.search(rf"^queue {LARGE_QUEUE} \(packets over 3960 bytes\): .*$", daemon.stdout,
                  re.M)
    assert m, f"no stats line for queue {LARGE_QUEUE}\n{daemon.report()}"
    return m.group(0)


def counter(line: str, name: str) -> int:
    m = re.search(rf"(\d+) {name}(,|$)", line)
    return int(m.group(1)) if m else 0


MODES = ("dnat", "fullnat", "local")


def headers_queue_line(daemon: Nfqlb) -> str:
    m = re.search(rf"^queue {HEADERS_QUEUE} \(TCP headers of large packets\): .*$",
                  daemon.stdout, re.M)
    assert m, f"no stats line for queue {HEADERS_QUEUE}\n{daemon.report()}"
    return m.group(0)


# (mode, family, daemon.bulk): the headers route is the default; "whole" sends large packets
# through nfqlb as every other one
CASES = [(mode, 4, route) for route in ("headers", "whole") for mode in MODES]
if kernel_has_ipv6():
    CASES += [(mode, 6, route) for route in ("headers", "whole") for mode in MODES]


@pytest.mark.parametrize("mode, family, route", CASES)
def test_bulk_tcp_both_ways_in_gso_packets_arrives_intact(mode: str, family: int,
                                                          route: str) -> None:
    local = mode == "local"
    headers = route == "headers"
    with Lab(1, backend_default_route=(mode == "dnat"), vip_on_lo=local, lb_servers=local,
             ipv6=family == 6 or None) as lab:
        server = lab.lb if local else lab.backends[0]
        down = bulk(1)
        (server.dir / "www" / "bulk").write_bytes(down)
        (server.dir / "www" / "bulk").chmod(0o644)
        script = lab.dir / "sink.py"
        script.write_text(SINK)
        ready = server.dir / "sink.ready"
        lab.spawn(server, [sys.executable, str(script), str(SINK_PORT), str(ready)],
                  log=server.dir / "sink.out")
        vip = VIP if family == 4 else VIP6
        web = lab.service(mode, family=family)
        up = lab.service(mode, family=family, port=UP_PORT, name=f"up-{mode}")
        for b in up["backend"]:
            b["port"] = SINK_PORT
        if mode == "fullnat":
            up["snat_ports"] = "30000-30999"  # its own pool: pools may not overlap
        with lab.nfqlb(web, up, daemon={"bulk": route}) as daemon:
            for _ in range(100):
                if ready.exists():
                    break
                lab.exec(lab.client, ["sleep", "0.05"])
            out = lab.dir / "download"
            lab.curl(lab.client, f"http://{url_host(vip)}/bulk", output=out, max_time=60)
            assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(down).digest()
            proc = lab.exec(lab.client, [sys.executable, "-c", UPLOAD, vip, str(UP_PORT),
                                         str(BULK_SIZE), "2"], timeout=90)
            size, digest = proc.stdout.decode().split()
            assert (int(size), digest) == (BULK_SIZE, hashlib.sha256(bulk(2)).hexdigest())
            tables = lab.exec(lab.lb, ["nft", "list", "tables"]).stdout.decode()
            assert ("nfqlb-1" in tables) == headers, tables
        code = daemon.stop()
        assert code == 0, daemon.report()
        # the daemon's nftables table goes with its rules
        assert "nfqlb" not in lab.exec(lab.lb, ["nft", "list", "tables"]).stdout.decode()
        if headers:  # 2 x 8 MB in 64 KB GSO packets: hundreds of headers, no payload
            line = headers_queue_line(daemon)
            assert counter(line, "gso packets") > 100, line
            assert counter(line, "packets") > counter(line, "sent on whole") * 10, line
            assert counter(line, "callback errors") == 0, line
            if mode == "fullnat":  # the two flows' own elements went in (and are removed
                # when the flows end, after their close linger: past this test)
                assert "fullnat flows' elements 2 added, 0 removed" in line, line
            # what went whole (NF_REPEAT with the mark) reached the large-packet queue
            large = large_queue_line(daemon)
            assert counter(large, "packets") == counter(line, "sent on whole"), (line, large)
            return
        line = large_queue_line(daemon)
        assert counter(line, "gso packets") > 0, line
        assert counter(line, "truncated") == 0 and counter(line, "callback errors") == 0, line
        if local:  # uploads are delivered here whole: their checksums computed in full
            assert counter(line, "checksums completed") > 0, line
        # downloads (and, forwarded, uploads) leave the balancer and are segmented there
        assert counter(line, "checksums left partial") > 0, line


UDP_GSO_CLIENT = r'''
import json, socket, sys
vip, port, family, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_UDP, 103, size)  # UDP_SEGMENT: one send, datagrams of size bytes
s.settimeout(3)
s.connect((vip, port))
s.send(bytes((i * 7 + i // size) & 0xFF for i in range(size * count)))  # one GSO packet
got = []
try:
    while len(got) < count:
        got.append(s.recv(65536).hex())
except OSError:
    pass
print(json.dumps(got))
'''

# not local mode: a rewritten UDP GSO packet delivered to a local socket without UDP_GRO is
# dropped by the kernel whatever its checksum (see nfqlb.io.netlink; a limit in the README)
UDP_CASES = [("dnat", 4), ("fullnat", 4)]
if kernel_has_ipv6():
    UDP_CASES += [("dnat", 6), ("fullnat", 6)]


@pytest.mark.parametrize("mode, family", UDP_CASES)
def test_a_udp_gso_send_arrives_as_datagrams_with_good_checksums(mode: str, family: int) -> None:
    """A client sends 20 datagrams of 1200 bytes in one UDP GSO packet (UDP_SEGMENT): nfqlb
    takes it whole and leaves its checksum partial, from which the kernel's UDP segmentation
    derives each datagram's; every datagram reaches the server (which answers each)."""
    size, count = 1200, 20
    with Lab(1, backend_default_route=(mode == "dnat"), ipv6=family == 6 or None) as lab:
        port = UDP_PORT
        with lab.nfqlb(lab.service(mode, protocol="udp", family=family)) as daemon:
            vip = VIP if family == 4 else VIP6
            proc = lab.exec(lab.client, [sys.executable, "-c", UDP_GSO_CLIENT, vip, str(port),
                                         str(family), str(size), str(count)], timeout=30)
            replies = [bytes.fromhex(r) for r in json.loads(proc.stdout)]
        code = daemon.stop()
        assert code == 0, daemon.report()
        sent = bytes((i * 7 + i // size) & 0xFF for i in range(size * count))
        chunks = {sent[i:i + size] for i in range(0, len(sent), size)}
        assert len(replies) == count, (len(replies), daemon.report())
        assert {r.partition(b":")[2] for r in replies} == chunks
        line = large_queue_line(daemon)
        assert counter(line, "gso packets") == 1 and counter(line, "checksums left partial") \
            == 1, line


class Download:
    """A rate-limited curl download of 32 MiB from ``host``'s nginx through the VIP (about
    4 s), started by the constructor, which returns once 4 MiB are in."""

    def __init__(self, lab: Lab, host: Any, seed: int) -> None:
        self.data = random.Random(seed).randbytes(32 << 20)
        (host.dir / "www" / "big").write_bytes(self.data)
        (host.dir / "www" / "big").chmod(0o644)
        self.out, self.log = lab.dir / "download", lab.dir / "curl.log"
        self.curl = lab.spawn(lab.client, ["curl", "-sS", "--fail", "--limit-rate", "8M",
                                           "--max-time", "40", "-o", str(self.out),
                                           f"http://{VIP}/big"], log=self.log)
        deadline = time.monotonic() + 10
        while not (self.out.exists() and self.out.stat().st_size > 4 << 20):
            assert time.monotonic() < deadline and self.curl.poll() is None, \
                self.log.read_text()
            time.sleep(0.05)

    def finished_intact(self) -> None:
        assert self.curl.wait(45) == 0, self.log.read_text()
        assert hashlib.sha256(self.out.read_bytes()).digest() == \
            hashlib.sha256(self.data).digest()


def mark_chains(lab: Lab) -> dict[str, str]:
    """The headers route's chains of nfqlb's table (``mark-0x20``, ...), by name: their
    rules."""
    table = lab.exec(lab.lb, ["nft", "list", "table", "ip", "nfqlb-1"]).stdout.decode()
    return dict(re.findall(r"chain (mark-0x[0-9a-f]+) \{\n(.*?)\n\s*\}", table, re.S))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_keeps_a_fullnat_bulk_transfer_on_the_headers_route(workers: int) -> None:
    """A reload replaces the nftables table's rules in one transaction and keeps its maps'
    elements: a rate-limited fullnat download (large packets marked from its map elements)
    goes on across a reload that puts a backend before its own, byte-exact, and no packet
    meets the drop rule of a lookup that missed. Its backend keeps its marks (the new one
    gets the next ones): with two workers, which take the reload one after the other while
    the table changes once, no chain changes meaning under a worker's feet."""
    with Lab(2, backend_default_route=False) as lab:
        b1, b2 = lab.backends
        settings = {"queue": 1, "bypass": True, "workers": workers}
        daemon = lab.nfqlb(lab.service("fullnat", backends=[b1]), daemon=settings).start()
        try:
            download = Download(lab, b1, 3)
            table = lab.exec(lab.lb, ["nft", "list", "table", "ip", "nfqlb-1"]).stdout.decode()
            assert re.search(r"elements = \{ 198\.18\.", table), table  # the flow's, in
            before = mark_chains(lab)
            daemon.config_path.write_text(render_config(
                [lab.service("fullnat", backends=[b2, b1])], settings))
            daemon.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reloaded" not in daemon.stderr_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, daemon.report()
                time.sleep(0.05)
            assert download.curl.poll() is None, "the download ended before the reload"
            after = mark_chains(lab)
            numbers = daemon.cli("status", "--json")
            download.finished_intact()
            table = lab.exec(lab.lb, ["nft", "list", "table", "ip", "nfqlb-1"]).stdout.decode()
            drops = re.findall(r"counter packets (\d+) bytes \d+ drop", table)
            assert drops and all(n == "0" for n in drops), table
        finally:
            code = daemon.stop()
        assert code == 0, daemon.report()
        # b1's chains as they were; b2's are new ones
        assert sorted(before) == ["mark-0x20", "mark-0x30"], before
        assert {k: after[k] for k in before} == before, (before, after)
        assert sorted(after) == ["mark-0x20", "mark-0x30", "mark-0x40", "mark-0x50"], after
        assert b2.addr(4) in after["mark-0x40"] + after["mark-0x50"], after
        said = json.loads(numbers.stdout)["daemon"]["mark_numbers"]["bulk"]
        assert sorted(said) == [["tcp-fullnat", f"{b1.addr(4)}:{HTTP_PORT}", 1],
                                ["tcp-fullnat", f"{b2.addr(4)}:{HTTP_PORT}", 2]], said
        if workers == 1:  # (with two, the flow's worker has the line of its own queue)
            line = headers_queue_line(daemon)
            assert "fullnat flows' elements 1 added" in line, line
            assert counter(line, "packets") > counter(line, "sent on whole") * 10, line


def test_a_table_made_anew_gets_its_fullnat_flows_elements_back() -> None:
    """nfqlb's nftables table deleted and made again (here in one transaction, as
    ``nfqlb rules --apply`` would make it, with no elements): the rules watch sees its new
    handle and nfqlb adds the fullnat flows' elements again, so a download whose large
    packets met the drop rule of a lookup that missed meanwhile goes on, byte-exact."""
    from nfqlb import rules
    from nfqlb.config import load_config

    with Lab(2, backend_default_route=False) as lab:
        b1 = lab.backends[0]
        daemon = lab.nfqlb(lab.service("fullnat", backends=[b1])).start()
        try:
            download = Download(lab, b1, 4)
            [rs] = rules.render(load_config(str(daemon.config_path)), 1)
            lab.exec(lab.lb, ["nft", "-f", "-"],
                     input=("delete table ip nfqlb-1\n" + rs.nft).encode())
            table = lab.exec(lab.lb, ["nft", "list", "table", "ip", "nfqlb-1"]).stdout.decode()
            assert "elements" not in table, table  # made anew: no flow's elements
            deadline = time.monotonic() + 10
            while "nftables table made anew" not in daemon.stderr_path.read_text(
                    errors="replace"):
                assert time.monotonic() < deadline, daemon.report()
                time.sleep(0.05)
            download.finished_intact()
        finally:
            code = daemon.stop()
        assert code == 0, daemon.report()
        assert "1 fullnat flows' map elements added again" in daemon.stderr, daemon.report()
        line = headers_queue_line(daemon)
        assert "fullnat flows' elements 2 added" in line, line
