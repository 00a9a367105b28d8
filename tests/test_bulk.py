"""The headers route (daemon.bulk = "headers"): the mark ``Engine.handle_headers`` gives a
large TCP packet from its headers alone, what nfqlb's nftables table does for that mark
(``rules.bulk_rewrites``, which ``rules.bulk_nft`` renders), and the adapter's verdicts.

The rewrite by mark must be the engine's own: each test drives two engines through the same
handshake and compares the packet one rewrites whole with the packet the other's mark leads
to (the same fields set, every checksum recomputed by scapy)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from helpers import B1, B2, CLIENT, VIP, checksums_ok, engine, reverse_of, rewritten, service, tcp
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from nfqlb import rules
from nfqlb.config import BULK_MARK_MASK, bulk_marks, bulk_whole, parse_config
from nfqlb.engine import BULK_AFTER, Engine
from nfqlb.errors import ConfigError
from nfqlb.io import netlink
from nfqlb.io.bulk import NF_REPEAT, HeadersNetlinkAdapter, NftMaps, flow_elements

BIG = 9000  # payload bytes: more than rules.BINDING_MAX_PACKET, as the rules route them
HEAD = 256  # what the headers queue copies (nfqlb.offload.COPY_RANGE)
WHOLE = bulk_whole(parse_config({"service": [service("dnat")]}, "t").daemon)


def by_mark(eng: Engine, data: bytes, mark: int) -> bytes:
    """``data`` as the nftables table rewrites a packet of ``mark``."""
    names = {"saddr": "src", "daddr": "dst", "sport": "sport", "dport": "dport"}
    todo = rules.bulk_rewrites(eng.config, eng.config.services)[mark]
    kw: dict[str, Any] = {names[f]: (int(v) if f.endswith("port") else v) for f, v in todo}
    return rewritten(data, **kw)


def opened(mode: str, **extra: Any) -> tuple[Engine, Engine, tuple[str, str, int, int]]:
    """Two engines with the same flow established (client port 40000); the reply's 4-tuple."""
    pair = (engine(service(mode, **extra)), engine(service(mode, **extra)))
    for eng in pair:
        out = eng.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
        assert isinstance(out, bytes)
        back = reverse_of(out)
        eng.handle(tcp(*back, flags="SA", seq=5000, ack=1001), 0.0)
        eng.handle(tcp(CLIENT, VIP, 40000, 80, "A", seq=1001, ack=5001), 0.0)
    return pair[0], pair[1], back


@pytest.mark.parametrize("mode", ["dnat", "local"])
def test_a_large_segment_gets_the_mark_whose_rewrite_is_the_engines(mode: str) -> None:
    whole, marked, back = opened(mode)
    for data in (tcp(CLIENT, VIP, 40000, 80, "A", b"u" * BIG, seq=1001, ack=5001),
                 tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001),
                 tcp(*back, flags="PA", payload=b"d" * BIG, seq=5001, ack=1001)):
        want = whole.handle(data, 1.0)
        assert isinstance(want, bytes) and checksums_ok(want)
        mark = marked.handle_headers(data[:HEAD], len(data), 1.0)
        assert mark != WHOLE and mark & ~BULK_MARK_MASK == 0
        assert by_mark(marked, data, mark) == want
    # the flow was touched and counted as the fast path would: packets and true lengths
    assert marked.stats()["services"] == whole.stats()["services"]
    assert marked.table.flows()[0].last == 1.0


def test_marks_differ_per_backend_and_direction() -> None:
    eng = engine(service("dnat", policy="round_robin"))
    marks = set()
    for port in (40000, 40001):
        out = eng.handle(tcp(CLIENT, VIP, port, 80, "S"), 0.0)
        assert isinstance(out, bytes)
        back = reverse_of(out)
        eng.handle(tcp(*back, flags="SA", seq=5000, ack=1001), 0.0)
        eng.handle(tcp(CLIENT, VIP, port, 80, "A", seq=1001, ack=5001), 0.0)
        up = tcp(CLIENT, VIP, port, 80, "A", b"u" * BIG, seq=1001, ack=5001)
        down = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
        marks |= {eng.handle_headers(up[:HEAD], len(up), 1.0),
                  eng.handle_headers(down[:HEAD], len(down), 1.0)}
    assert len(marks) == 4 and WHOLE not in marks
    daddrs = {dict(rules.bulk_rewrites(eng.config, eng.config.services)[m]).get("daddr")
              for m in marks}
    assert daddrs == {B1, B2, None}  # replies set the source (the VIP), not the destination


def test_what_the_headers_cannot_answer_goes_whole() -> None:
    eng, _, back = opened("dnat")
    cases = {
        "FIN": tcp(CLIENT, VIP, 40000, 80, "FA", b"u" * BIG, seq=1001, ack=5001),
        "RST": tcp(*back, flags="R", payload=b"d" * BIG, seq=5001),
        "SYN": tcp(CLIENT, VIP, 40001, 80, "S", b"u" * BIG),
        "no flow": tcp(CLIENT, VIP, 40002, 80, "A", b"u" * BIG),
        "not a VIP's": tcp(CLIENT, "198.18.50.9", 40000, 80, "A", b"u" * BIG),
        "IP options": tcp(CLIENT, VIP, 40000, 80, "A", b"u" * BIG, seq=1001, ack=5001,
                          ip_options=[b"\x01\x01\x01\x00"]),
    }
    for what, data in cases.items():
        assert eng.handle_headers(data[:HEAD], len(data), 1.0) == WHOLE, what
    data = tcp(CLIENT, VIP, 40000, 80, "A", b"u" * BIG, seq=1001, ack=5001)
    assert eng.handle_headers(data[:30], len(data), 1.0) == WHOLE  # TCP header cut short
    assert eng.handle_headers(b"", 0, 1.0) == WHOLE
    assert eng.handle_headers(data[:HEAD], len(data), 1.0) != WHOLE  # the flow itself: marked
    # nothing above was counted as the flow's
    assert eng.stats()["services"]["dnat-tcp"]["backends"]["b1"]["bytes"] + \
        eng.stats()["services"]["dnat-tcp"]["backends"]["b2"]["bytes"] > len(data)


def test_udp_and_offload_have_no_marks() -> None:
    cfg = parse_config({"service": [service("dnat", "udp"), service("offload", name="o"),
                                    service("dnat", name="web", port=81)]}, "t")
    assert set(bulk_marks(cfg.daemon, cfg.services)) == {("web", "b1"), ("web", "b2")}
    assert rules.bulk_nft(cfg, [cfg.services[0]], rules.FAMILIES[4], 1) == ""


def emulate(eng: Engine, data: bytes, mark: int,
            elements: dict[tuple[str, bytes], bytes]) -> bytes:
    """The nftables table's rule for ``mark`` run on ``data``: its statements in order, a map
    lookup keyed by the fields as they are at that point (as the kernel evaluates them)."""
    pkt = IP(data)
    cur = {"saddr": pkt.src, "daddr": pkt.dst, "sport": pkt[TCP].sport, "dport": pkt[TCP].dport}

    def packed(field: str) -> bytes:
        v = cur[field]
        return socket.inet_aton(v) if field.endswith("addr") else struct.pack("!H", v) + bytes(2)

    for field, value in rules.bulk_rewrites(eng.config, eng.config.services)[mark]:
        if value.startswith("@"):
            name = value[1:]
            names = rules.NFT_MAPS[name][0].replace("{ip} ", "").replace("tcp ", "").split(" . ")
            got = elements[(name, b"".join(packed(n) for n in names))]
            cur[field] = socket.inet_ntoa(got) if field.endswith("addr") else \
                struct.unpack("!H", got)[0]
        else:
            cur[field] = int(value) if field.endswith("port") else value
    return rewritten(data, src=cur["saddr"], dst=cur["daddr"], sport=cur["sport"],
                     dport=cur["dport"])


def test_a_fullnat_flow_is_marked_once_its_map_elements_are_in() -> None:
    whole, marked, back = opened("fullnat")
    up = tcp(CLIENT, VIP, 40000, 80, "A", b"u" * BIG, seq=1001, ack=5001)
    down = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
    (flow,) = marked.table.flows()
    for _ in range(BULK_AFTER):  # short flows never cost a transaction
        assert marked.bulk_ops == []
        assert marked.handle_headers(down[:HEAD], len(down), 1.0) == WHOLE
    assert marked.bulk_ops == [(True, flow)]
    assert marked.handle_headers(down[:HEAD], len(down), 1.0) == WHOLE  # not in yet
    family, elements = flow_elements(flow)
    assert family == 2 and [e[0] for e in elements] == ["fwd-port", "rev-addr", "rev-port"]
    table = {(name, key): value for name, key, value in elements}
    marked.bulk_done([flow], True)
    for data in (up, down):
        want = whole.handle(data, 1.0)
        assert isinstance(want, bytes)
        mark = marked.handle_headers(data[:HEAD], len(data), 1.0)
        assert mark != WHOLE
        assert emulate(marked, data, mark, table) == want
    assert len(marked.bulk_ops) == 1  # nothing more asked
    # the flow ends: its elements are removed
    marked.handle_timer(1e6)
    assert marked.table.flows() == [] and marked.bulk_ops[-1] == (False, flow)


def test_a_table_made_anew_asks_for_the_elements_of_the_flows_that_had_them() -> None:
    """``bulk_readd`` (the rules watch saw the table deleted and made again): each flow
    whose elements were in is asked for again, its large packets whole until they are."""
    _whole, marked, back = opened("fullnat")
    down = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
    (flow,) = marked.table.flows()
    for _ in range(BULK_AFTER):
        marked.handle_headers(down[:HEAD], len(down), 1.0)
    assert marked.bulk_readd() == 0  # asked for, not in yet: nothing to add again
    marked.bulk_ops = []
    marked.bulk_done([flow], True)
    assert marked.handle_headers(down[:HEAD], len(down), 1.0) != WHOLE
    assert marked.bulk_readd() == 1
    assert marked.bulk_ops == [(True, flow)]
    assert marked.handle_headers(down[:HEAD], len(down), 1.0) == WHOLE  # until they are in
    marked.bulk_done([flow], True)
    assert marked.handle_headers(down[:HEAD], len(down), 1.0) != WHOLE


def test_a_fullnat_flow_whose_elements_were_refused_goes_whole() -> None:
    eng, _, back = opened("fullnat")
    down = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
    for _ in range(BULK_AFTER):
        eng.handle_headers(down[:HEAD], len(down), 1.0)
    (add, flow), = eng.bulk_ops
    eng.bulk_ops = []
    eng.bulk_done([flow], False)
    for _ in range(3 * BULK_AFTER):
        assert eng.handle_headers(down[:HEAD], len(down), 1.0) == WHOLE
    assert eng.bulk_ops == []  # never asked again


def test_the_transaction_destroys_then_adds_each_element() -> None:
    import logging

    eng, _, _ = opened("fullnat")
    (flow,) = eng.table.flows()
    maps = NftMaps("nfqlb-1", logging.getLogger("t"))
    msg = maps.batch([(True, flow), (False, flow)])
    kinds, i = [], 0
    while i < len(msg):
        n, kind, flags = struct.unpack_from("=IHH", msg, i)
        family, _, res = struct.unpack_from("!BBH", msg, i + 16)
        kinds.append((kind, family, res, flags))
        if kind >> 8 == 10:  # nf_tables: the table and the map named first
            assert msg[i + 20:i + 32] == struct.pack("=HH", 12, 1) + b"nfqlb-1\0"
        i += (n + 3) & ~3
    assert i == len(msg)
    begin, end = (0x10, 0, 10, 1), (0x11, 0, 10, 1)
    destroy, add = (10 << 8 | 30, 2, 0, 1), (10 << 8 | 12, 2, 0, 0x401)
    assert kinds == [begin, *[destroy, add] * 3, *[destroy] * 3, end]


def test_bulk_whole_turns_the_route_off() -> None:
    cfg = parse_config({"daemon": {"bulk": "whole"}, "service": [service("dnat")]}, "t")
    assert bulk_marks(cfg.daemon, cfg.services) == {}
    (rs,) = rules.render(cfg)
    assert rs.nft == "" and rs.headers_queue is None
    assert not any("mark" in r or "30001" in r for r in rs.rules)


def test_ipv6_segments_get_marks_too() -> None:
    svc = service("dnat", vip="2001:db8::10",
                  backend=[{"name": "b1", "address": "2001:db8:1::2", "port": 8080}])
    pair = (engine(svc), engine(svc))
    c = "2001:db8::99"

    def seg(src: str, dst: str, sport: int, dport: int, flags: str, payload: bytes = b"",
            seq: int = 1000, ack: int = 0) -> bytes:
        return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags,
                                                  seq=seq, ack=ack, window=8192) / payload)

    for eng in pair:
        eng.handle(seg(c, "2001:db8::10", 40000, 80, "S"), 0.0)
        eng.handle(seg("2001:db8:1::2", c, 8080, 40000, "SA", seq=5000, ack=1001), 0.0)
        eng.handle(seg(c, "2001:db8::10", 40000, 80, "A", seq=1001, ack=5001), 0.0)
    for data in (seg(c, "2001:db8::10", 40000, 80, "A", b"u" * BIG, 1001, 5001),
                 seg("2001:db8:1::2", c, 8080, 40000, "A", b"d" * BIG, 5001, 1001)):
        want = pair[0].handle(data, 1.0)
        mark = pair[1].handle_headers(data[:HEAD], len(data), 1.0)
        assert mark != WHOLE
        todo = dict(rules.bulk_rewrites(pair[1].config, pair[1].config.services)[mark])
        pkt = IPv6(data)
        pkt.src, pkt.dst = todo.get("saddr", pkt.src), todo.get("daddr", pkt.dst)
        pkt[TCP].sport = int(todo.get("sport", pkt[TCP].sport))
        pkt[TCP].dport = int(todo.get("dport", pkt[TCP].dport))
        del pkt[TCP].chksum
        assert bytes(pkt) == want


def test_a_reload_renumbers_and_a_removed_backends_flows_go_whole() -> None:
    eng = engine(service("dnat", policy="round_robin"))
    backs = []
    for port in (40000, 40001):  # one flow on b1, one on b2
        out = eng.handle(tcp(CLIENT, VIP, port, 80, "S"), 0.0)
        assert isinstance(out, bytes)
        backs.append(reverse_of(out))
        eng.handle(tcp(*backs[-1], flags="SA", seq=5000, ack=1001), 0.0)
        eng.handle(tcp(CLIENT, VIP, port, 80, "A", seq=1001, ack=5001), 0.0)
    assert {b[0] for b in backs} == {B1, B2}
    kept = service("dnat", policy="round_robin",
                   backend=[{"name": "b2", "address": B2, "port": 8080}])
    new = parse_config({"service": [kept]}, "t")
    eng.reconfigure(new, 1.0)
    for back in backs:
        data = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
        mark = eng.handle_headers(data[:HEAD], len(data), 2.0)
        if back[0] == B1:
            assert mark == WHOLE  # its rewrite is no longer in the table
        else:
            assert mark == bulk_marks(new.daemon, new.services)[("dnat-tcp", "b2")][1]


def test_the_nftables_table_rewrites_each_mark_and_clears_it() -> None:
    cfg = parse_config({"service": [service("dnat"), service("local", name="l", port=81)]},
                       "t")
    (rs,) = rules.render(cfg)
    text = rs.nft
    # one transaction: the rules replaced, a fullnat flow's map elements kept (a reload)
    assert text.startswith("table ip nfqlb-1\nflush table ip nfqlb-1\n")
    assert "type filter hook prerouting priority -250;" in text
    assert "type route hook output priority -250;" in text  # a new destination re-routed
    marks = bulk_marks(cfg.daemon, cfg.services)
    fwd, rev = marks[("dnat-tcp", "b1")]
    # each chain rewrites only its own service's packets (another instance's table numbers
    # its marks the same way)
    assert f"chain mark-{fwd:#x} {{\n    ip daddr {VIP} tcp dport 80 ip daddr set {B1} tcp " \
           "dport set 8080 meta mark set meta mark & 0xfffff00f\n  }" in text
    assert f"chain mark-{rev:#x} {{\n    ip saddr {B1} tcp sport 8080 ip saddr set {VIP} tcp " \
           "sport set 80 meta mark" in text
    lfwd, lrev = marks[("l", "b1")]  # local: the address kept, the port changed
    assert f"chain mark-{lfwd:#x} {{\n    ip daddr {VIP} tcp dport 81 tcp dport set 8080 " \
           "meta mark" in text
    assert f"chain mark-{lrev:#x} {{\n    ip saddr {VIP} tcp sport 8080 tcp sport set 81 " \
           "meta mark" in text
    assert f"{WHOLE:#010x} : jump whole" in text
    assert rs.headers_queue == 30001


@pytest.mark.parametrize("table, key", [
    ({"bulk": "partial"}, "daemon.bulk"),
    ({"bulk_mark_mask": 0x101}, "daemon.bulk_mark_mask"),
    ({"bulk_mark_mask": 0x3}, "daemon.bulk_mark_mask"),  # 3 numbers: 5 marks needed
    ({"headers_queue": 10001}, "daemon.headers_queue"),
    ({"headers_queue": 1}, "daemon.headers_queue"),
])
def test_bad_bulk_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"daemon": table, "service": [service("dnat")]}, "t")
    assert err.value.key == key


def _packet_message(packet_id: int, payload: bytes, cap_len: int) -> bytes:
    attrs = (netlink.build_attr(netlink.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id,
                                                                      0x800, 0))
             + netlink.build_attr(netlink.NFQA_CAP_LEN, struct.pack("!I", cap_len))
             + netlink.build_attr(netlink.NFQA_PAYLOAD, payload))
    return netlink.build_message(netlink.PACKET_TYPE, 0, 0, 30001, attrs)


def test_the_adapter_accepts_with_the_mark_or_repeats_with_whole() -> None:
    import logging

    eng, _, back = opened("dnat")
    adapter = HeadersNetlinkAdapter(eng, 30001, logging.getLogger("t"))
    good = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
    fin = tcp(*back, flags="FA", payload=b"d" * BIG, seq=5001, ack=1001)
    verdicts = []
    for packet_id, data in ((7, good), (8, fin)):
        msg = _packet_message(packet_id, data[:HEAD], len(data))
        adapter._view = memoryview(msg)
        adapter._on_packet(0, len(msg))
        sent = bytes(adapter._pending[-1])
        assert struct.unpack_from("=I", sent)[0] == len(sent) == 40  # nlmsghdr's length
        verdict, pid = struct.unpack_from("!II", sent, 24)
        alen, atype, mark = struct.unpack_from("=HH", sent, 32) + struct.unpack_from("!I",
                                                                                    sent, 36)
        assert (pid, alen, atype) == (packet_id, 8, 3)  # NFQA_MARK
        verdicts.append((verdict, mark))
    mark = verdicts[0][1]
    assert verdicts == [(netlink.NF_ACCEPT, mark), (NF_REPEAT, WHOLE)] and mark != WHOLE
    # the flow's bytes count the packet's true length (NFQA_CAP_LEN), not the copied head
    assert eng.stats()["services"]["dnat-tcp"]["backends"][
        "b1" if back[0] == B1 else "b2"]["bytes"] >= len(good)
    assert adapter.whole == 1 and adapter.packets == 2
    assert "2 packets" in adapter.format_stats() and "1 sent on whole" in adapter.format_stats()


class _FakeNftSocket:
    """What the kernel answers a transaction: nothing (success) or one NLMSG_ERROR."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.sent: list[bytes] = []
        self._answers: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        if self.error:
            self._answers.append(struct.pack("=IHHII", 36, 2, 0, 1, 0)
                                 + struct.pack("=i", self.error) + bytes(16))
        return len(data)

    def recv(self, n: int) -> bytes:
        if not self._answers:
            raise BlockingIOError
        return self._answers.pop(0)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("error", [0, -2])  # -ENOENT: the table is not there
def test_sync_tells_the_engine_which_flows_elements_went_in(error: int) -> None:
    import logging

    eng, _, back = opened("fullnat")
    down = tcp(*back, flags="A", payload=b"d" * BIG, seq=5001, ack=1001)
    for _ in range(BULK_AFTER):
        eng.handle_headers(down[:HEAD], len(down), 1.0)
    maps = NftMaps("nfqlb-1", logging.getLogger("t"))
    maps._sock = _FakeNftSocket(error)  # type: ignore[assignment]
    maps.sync(eng, 1.0)
    assert eng.bulk_ops == [] and len(maps._sock.sent) == 1  # type: ignore[union-attr]
    mark = eng.handle_headers(down[:HEAD], len(down), 1.0)
    assert (mark == WHOLE) == bool(error)
    assert (maps.added, maps.failed) == ((0, 1) if error else (1, 0))
    eng.handle_timer(1e6)  # the flow ends: its removal is sent, an error there costs nothing
    maps.sync(eng, 2.0)
    assert (maps.added, maps.failed, maps.removed) == ((0, 1, 0) if error else (1, 0, 1))


def test_a_removed_backend_lingering_for_its_flows_shifts_no_mark() -> None:
    """The daemon keeps the reply rules of a backend a reload removed while its flows last
    (its config plus those backends); the nftables table must still number the marks as the
    engine does, from the configuration itself, or the next service's would point elsewhere."""
    from dataclasses import replace

    web = service("dnat", name="web")
    other = service("dnat", name="other", port=81,
                    backend=[{"name": "c1", "address": "198.18.1.9", "port": 9090}])
    old = parse_config({"service": [web, other]}, "t")
    new = parse_config({"service": [{**web, "backend": web["backend"][1:]}, other]}, "t")
    removed = old.services[0].backends[0]
    kept = replace(new, services=(replace(new.services[0], backends=(
        *new.services[0].backends, removed)), new.services[1]))
    eng = Engine(old)
    eng.reconfigure(new, 1.0)
    c1 = eng.services.named("other").backends["c1"]
    for lingering, ok in ((rules.render(kept, marks_from=new)[0], True),
                          (rules.render(kept)[0], False)):  # (numbered with b1: shifted)
        chain = lingering.nft.split(f"chain mark-{c1.bulk_in:#x} {{\n")[1].split("\n")[0]
        assert ("daddr set 198.18.1.9 tcp dport set 9090" in chain) == ok, chain
    assert f"ip daddr set {B1} " not in rules.render(kept, marks_from=new)[0].nft
