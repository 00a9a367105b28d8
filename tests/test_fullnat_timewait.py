"""fullnat and the backend's TIME_WAIT: a pool port given again to a backend that still holds
the port's last connection in TIME_WAIT must carry a SYN that the backend takes as a new
connection, or the client loses a second or more (the backend answers with the old
connection's ACK, the client resets it and tries again).

A Linux backend (``tcp_timewait_state_process``) takes such a SYN when its TSval is newer
than the last one the old connection's client sent (both with timestamps), or, without
timestamps, when its sequence number is past the old connection's last one; and since Linux
6.15 each client connection's TSval starts at an offset of its own (ports included), so two
clients' connections on one 4-tuple compare at random. ``_Backend`` below is that rule,
written from the kernel's source for these tests, not taken from nfqlb.

Expected ports come from the scenario (which connection closed how, with which TSval);
packets are built by struct (thousands of connections) or scapy.
"""

from __future__ import annotations

import random
import struct

from dual_stack import B6, C6, SNAT6, VIP6
from helpers import B1, SNAT, VIP, engine, service
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from nfqlb.wire.tcp import tcp_tsval

SYN, SYNACK, ACK, FINACK, RST = 0x02, 0x12, 0x10, 0x11, 0x04


def _seg(src: str, sport: int, dst: str, dport: int, flags: int, seq: int = 1, ack: int = 1,
         tsval: int | None = None, payload: bytes = b"") -> bytes:
    """An IPv4/TCP segment with the options Linux sends: on a SYN MSS, SACK permitted,
    timestamps, window scale; on others NOP, NOP, timestamps; none when ``tsval`` is None
    (checksums zero: the engine updates them incrementally)."""
    if tsval is None:
        opts = b""
    elif flags & 0x02:
        opts = (b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", tsval, 0)
                + b"\x01\x03\x03\x07")
    else:
        opts = b"\x01\x01\x08\x0a" + struct.pack("!II", tsval, 7)
    thl = 20 + len(opts)
    s, d = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + len(payload), 1, 0x4000, 64, 6,
                        0, s, d)
            + struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, 65535,
                          0, 0) + opts + payload)


def _port(out: bytes | object) -> int:
    assert isinstance(out, bytes)
    return out[20] << 8 | out[21]


def _fullnat(ports: str, **top: object):  # type: ignore[no-untyped-def]
    return engine(service("fullnat", snat_ports=ports, backend=[
        {"name": "b1", "address": B1, "port": 8080}]), **top)


class _Backend:
    """The TIME_WAIT of one Linux backend, per source port of the balancer: what
    ``tcp_timewait_state_process`` keeps (ts_recent, rcv_nxt; 60 s) and how it judges a SYN."""

    def __init__(self) -> None:
        self.tw: dict[int, tuple[float, int | None, int]] = {}

    def closed(self, port: int, now: float, client_tsval: int | None, rcv_nxt: int) -> None:
        self.tw[port] = (now, client_tsval, rcv_nxt)

    def takes(self, port: int, now: float, tsval: int | None, seq: int) -> bool:
        if port not in self.tw or now - self.tw[port][0] >= 60:
            return True
        _, ts_recent, rcv_nxt = self.tw[port]
        seq_after = 0 < (seq - rcv_nxt) % 2**32 < 2**31
        if ts_recent is None or tsval is None:  # no PAWS: the sequence number decides
            return seq_after
        older = 0 < (ts_recent - tsval) % 2**32 < 2**31  # the SYN's TSval is older
        if older:
            return False  # PAWS
        newer = 0 < (tsval - ts_recent) % 2**32 < 2**31
        return newer or seq_after


def _connection(eng, backend: _Backend, rng: random.Random, i: int, now: float,  # type: ignore[no-untyped-def]
                client_first: bool = False) -> bool:
    """One short connection from a client of its own, with a TSval offset of its own (as
    Linux 6.15+ gives each connection); True if the backend took its SYN at once."""
    src, sport = f"198.19.{i // 250 % 250}.{i % 250 + 1}", 1024 + i % 60000
    ts0, isn, sisn = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32)
    out = eng.handle(_seg(src, sport, VIP, 80, SYN, isn, 0, ts0), now)
    port = _port(out)
    taken = backend.takes(port, now, ts0, isn)
    c, s = isn + 1, sisn + 1
    eng.handle(_seg(B1, 8080, SNAT, port, SYNACK, sisn, c, 99), now)
    eng.handle(_seg(src, sport, VIP, 80, ACK, c, s, ts0 + 1), now)
    if client_first:  # the client closes first: the backend holds no TIME_WAIT
        eng.handle(_seg(src, sport, VIP, 80, FINACK, c, s, ts0 + 2), now)
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, s, c + 1, 99), now)
        eng.handle(_seg(src, sport, VIP, 80, ACK, c + 1, s + 1, ts0 + 3), now)
        backend.tw.pop(port, None)
    else:  # the server closes first (HTTP "Connection: close"): TIME_WAIT at the backend
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, s, c, 99), now)
        eng.handle(_seg(src, sport, VIP, 80, FINACK, c, s + 1, ts0 + 2), now)
        eng.handle(_seg(B1, 8080, SNAT, port, ACK, s + 1, c + 1, 99), now)
        backend.closed(port, now, ts0 + 2, c + 1)
    return taken


def test_close_heavy_load_reuses_ports_the_backend_takes() -> None:
    """2,000 short connections a second to one backend, each client with its own TSval
    offset, through a 1,000-port pool: every port comes round every half second, well
    within the backend's 60 s TIME_WAIT. The old pool handed out the least recently used
    closed flow's port whatever the backend would say: about half of those SYNs met PAWS
    (a RST and the client's retry). Now each takes a port whose TIME_WAIT lets it in."""
    eng, backend, rng = _fullnat("20000-20999"), _Backend(), random.Random(5)
    refused = 0
    for i in range(6000):
        now = i / 2000
        if i % 100 == 0:
            eng.handle_timer(now)
        refused += not _connection(eng, backend, rng, i, now)
    assert eng.counters.events["reclaimed"] == 5000  # the 1,000 fresh ports went first
    assert refused == 0
    assert eng.counters.events.get("timewait_reused", 0) == 0


def test_ports_given_back_are_judged_as_closed_flows_are() -> None:
    """Closed flows lingering past tcp_close give their ports back to the pool with what the
    backend's TIME_WAIT holds (the backend keeps it 60 s; nfqlb's linger, tcp_close, is 1 s here):
    a port taken from the pool must pass the same test."""
    eng = _fullnat("20000-20099", timeouts={"tcp_close": 1.0})
    backend, rng = _Backend(), random.Random(11)
    refused = 0
    for i in range(1500):  # 100 ports, 50 connections a second: each comes round in 2 s
        now = i / 50
        eng.handle_timer(now)
        refused += not _connection(eng, backend, rng, i, now)
    assert eng.counters.events.get("reclaimed", 0) == 0  # ports came from the pool
    assert refused == 0


def test_a_port_the_backend_holds_no_time_wait_for_goes_first() -> None:
    """Of two closed flows, the least recently used one's backend TIME_WAIT would refuse the
    new SYN (its client's last TSval is newer), the other's would take it: the new flow gets
    the other's port. Old code: the least recently used one's."""
    eng = _fullnat("20000-20001")
    ports = []
    for sport, tsval in ((41000, 5000), (41001, 100)):
        out = eng.handle(_seg("198.18.0.2", sport, VIP, 80, SYN, 10, 0, tsval - 2), 0.0)
        port = _port(out)
        ports.append(port)
        eng.handle(_seg(B1, 8080, SNAT, port, SYNACK, 500, 11, 1), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, ACK, 11, 501, tsval - 1), 0.0)
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, 501, 11, 1), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, FINACK, 11, 502, tsval), 0.0)
    assert ports == [20000, 20001]
    out = eng.handle(_seg("198.18.0.3", 42000, VIP, 80, SYN, 10, 0, 1000), 1.0)
    assert _port(out) == 20001  # 100 < 1000 <= 5000
    assert eng.counters.events["reclaimed"] == 1


def test_without_timestamps_the_sequence_number_decides() -> None:
    eng = _fullnat("20000-20001")
    for sport, fin_seq in ((41000, 900_000), (41001, 100)):
        out = eng.handle(_seg("198.18.0.2", sport, VIP, 80, SYN, fin_seq - 1, 0), 0.0)
        port = _port(out)
        eng.handle(_seg(B1, 8080, SNAT, port, SYNACK, 500, fin_seq, None), 0.0)
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, 501, fin_seq), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, FINACK, fin_seq, 502, None, b"abc"), 0.0)
    # the backends' rcv_nxt: 900,004 and 104; a SYN at 5,000 is past the second only
    out = eng.handle(_seg("198.18.0.3", 42000, VIP, 80, SYN, 5000, 0), 1.0)
    assert _port(out) == 20001


def test_a_client_that_closed_first_leaves_no_time_wait_at_the_backend() -> None:
    """The client's FIN came first: the backend went through LAST_ACK, not TIME_WAIT, so
    the least recently used closed flow gives its port whatever its TSval."""
    eng = _fullnat("20000-20001")
    for sport, tsval in ((41000, 5000), (41001, 100)):
        out = eng.handle(_seg("198.18.0.2", sport, VIP, 80, SYN, 10, 0, tsval - 2), 0.0)
        port = _port(out)
        eng.handle(_seg(B1, 8080, SNAT, port, SYNACK, 500, 11, 1), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, FINACK, 11, 501, tsval), 0.0)
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, 501, 12, 1), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, ACK, 12, 502, tsval + 1), 0.0)
    out = eng.handle(_seg("198.18.0.3", 42000, VIP, 80, SYN, 10, 0, 1000), 1.0)
    assert _port(out) == 20000
    assert "timewait_reused" not in eng.counters.events


def test_when_every_time_wait_refuses_the_oldest_goes_and_is_counted() -> None:
    eng = _fullnat("20000-20001")
    for sport in (41000, 41001):
        out = eng.handle(_seg("198.18.0.2", sport, VIP, 80, SYN, 10, 0, 4998), 0.0)
        port = _port(out)
        eng.handle(_seg(B1, 8080, SNAT, port, SYNACK, 500, 11, 1), 0.0)
        eng.handle(_seg(B1, 8080, SNAT, port, FINACK, 501, 11, 1), 0.0)
        eng.handle(_seg("198.18.0.2", sport, VIP, 80, FINACK, 11, 502, 5000), 0.0)
    out = eng.handle(_seg("198.18.0.3", 42000, VIP, 80, SYN, 10, 0, 1000), 1.0)
    assert _port(out) == 20000  # both refuse: the least recently used, as before
    assert eng.counters.events["timewait_reused"] == 1
    # 60 s after the backend closed, its TIME_WAIT is gone: no clash counted
    out = eng.handle(_seg("198.18.0.4", 42001, VIP, 80, SYN, 10, 0, 1000), 61.0)
    assert _port(out) == 20001
    assert eng.counters.events["timewait_reused"] == 1


def test_tcp_tsval_reads_the_timestamp_option() -> None:
    for options, want in (
        ([("NOP", None), ("NOP", None), ("Timestamp", (123456789, 5))], 123456789),
        ([("MSS", 1460), ("SAckOK", b""), ("Timestamp", (0xFFFFFFFE, 0)), ("NOP", None),
          ("WScale", 7)], 0xFFFFFFFE),
        ([("MSS", 1460), ("WScale", 7)], -1),
        ([], -1),
    ):
        data = bytes(IP(src="198.18.0.2", dst=VIP) / TCP(options=options))
        assert tcp_tsval(data, 20) == want, options


def test_ipv6_the_same() -> None:
    """IPv6 (40-byte header): the client's FIN is read at its own offset, and so is the SYN."""
    eng = engine({"name": "v6", "vip": VIP6, "port": 80, "protocol": "tcp", "mode": "fullnat",
                  "snat_address": SNAT6, "snat_ports": "20000-20001",
                  "backend": [{"name": "b1", "address": B6[0], "port": 8080}]})

    def seg(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int,
            tsval: int) -> bytes:
        return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags,
                                                  seq=seq, ack=ack,
                                                  options=[("Timestamp", (tsval, 0))]))

    for sport, tsval in ((41000, 5000), (41001, 100)):
        out = eng.handle(seg(C6, VIP6, sport, 80, "S", 10, 0, tsval - 2), 0.0)
        assert isinstance(out, bytes)
        port = IPv6(out)[TCP].sport
        eng.handle(seg(B6[0], SNAT6, 8080, port, "SA", 500, 11, 1), 0.0)
        eng.handle(seg(B6[0], SNAT6, 8080, port, "FA", 501, 11, 1), 0.0)
        eng.handle(seg(C6, VIP6, sport, 80, "FA", 11, 502, tsval), 0.0)
    out = eng.handle(seg("2001:db8::3", VIP6, 42000, 80, "S", 10, 0, 1000), 1.0)
    assert isinstance(out, bytes) and IPv6(out)[TCP].sport == 20001  # 100 < 1000 <= 5000
