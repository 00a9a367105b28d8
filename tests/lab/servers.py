"""What the lab runs inside its namespaces: the nginx configuration, the UDP echo server, and the
small UDP and ping clients (each a script run with this interpreter), and the blob they serve.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

HTTP_PORT = 8080
UDP_PORT = 5353
BLOB_SIZE = 1 << 20
BLOB_SEED = 0x6E66716C  # "nfql"


def blob_bytes() -> bytes:
    """The /blob every server serves: BLOB_SIZE pseudo-random bytes from a fixed seed."""
    return random.Random(BLOB_SEED).randbytes(BLOB_SIZE)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


UDP_SERVER = r'''
import selectors, socket, struct, sys
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
label, port, ready, log, ipv6 = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                 sys.argv[5] == "1")
sel = selectors.DefaultSelector()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
sock.bind(("0.0.0.0", port))
sel.register(sock, selectors.EVENT_READ, 4)
if ipv6:
    sock6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    sock6.bind(("::", port))
    sel.register(sock6, selectors.EVENT_READ, 6)
open(ready, "w").close()
prefix = label.encode() + b":"
with open(log, "a", buffering=1) as out:
    while True:
        for key, _ in sel.select():
            s, family = key.fileobj, key.data
            data, anc, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(20))
            # answer from the address the datagram was sent to, as DNS servers do
            # (IP_PKTINFO: ifindex, spec_dst, addr; IPV6_PKTINFO: addr, ifindex)
            if family == 4:
                cmsg = [(lvl, typ, struct.pack("@i4s4s", 0, d[8:12], bytes(4)))
                        for lvl, typ, d in anc if lvl == socket.IPPROTO_IP and typ == IP_PKTINFO]
            else:
                cmsg = [(lvl, typ, d[:16] + struct.pack("@i", 0))
                        for lvl, typ, d in anc
                        if lvl == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO]
            s.sendmsg([prefix + data], cmsg, 0, peer)
            out.write(f"{peer[0]} {peer[1]} {len(data)}\n")
'''

UDP_CLIENT = r'''
import json, socket, sys, time
args = json.loads(sys.argv[1])
results = []
sock = None
# new_socket_each: every socket stays open to the end, so that no two of them get the same
# ephemeral port (a closed socket's port can come again, and its datagram then belongs to
# the earlier flow, whose conntrack entry is still there: no new flow)
opened = []
deadline = time.monotonic() + args["budget"]
for i, payload in enumerate(args["payloads"]):
    if sock is None or args["new_socket_each"]:
        family = socket.AF_INET6 if ":" in args["dst"] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(args["timeout"])
        opened.append(sock)
    data = bytes.fromhex(payload)
    sock.sendto(data, (args["dst"], args["port"]))
    answer = None
    while time.monotonic() < deadline:
        try:
            reply, peer = sock.recvfrom(65535)
        except socket.timeout:
            break
        if reply.endswith(b":" + data):
            answer = {"reply": reply.hex(), "peer": list(peer), "port": sock.getsockname()[1]}
            break
    results.append(answer)
for s in opened:
    s.close()
print(json.dumps(results))
'''

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
daemon off;
master_process on;
events {{ worker_connections 256; }}
http {{
    log_format lab '$remote_addr $remote_port $request_uri $status $body_bytes_sent';
    access_log {dir}/access.log lab;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 5;
    server {{
        listen {port};{listen6}
        root {dir}/www;
        location = / {{ default_type text/plain; try_files /index.txt =404; }}
        location = /health {{
            default_type text/plain;
            if (-f {dir}/www/unhealthy) {{ return 503 "unhealthy\n"; }}
            return 200 "ok\n";
        }}
    }}
}}
"""


PING = r'''
import json, os, socket, struct, sys, time
args = json.loads(sys.argv[1])
v6 = ":" in args["dst"]
if v6:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    request, reply = 128, 129  # the kernel computes ICMPv6 checksums of raw sockets
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    request, reply = 8, 0

def checksum(b):
    b += bytes(len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

ident = os.getpid() & 0xFFFF
answered = 0
for seq in range(1, args["count"] + 1):
    payload = b"nfqlb-lab-ping" + bytes([seq])
    msg = struct.pack("!BBHHH", request, 0, 0, ident, seq) + payload
    if not v6:
        msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    sock.sendto(msg, (args["dst"], 0))
    deadline = time.monotonic() + args["timeout"]
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            break
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        if len(icmp) >= 8 and icmp[0] == reply and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            answered += 1
            break
print(answered)
'''


@dataclass(frozen=True)
class Reply:
    """One UDP answer: the text before the colon names the server that answered."""

    label: str
    payload: bytes
    peer: tuple[str, int]  # the address and port it came from
    client_port: int  # the client socket it came back to
