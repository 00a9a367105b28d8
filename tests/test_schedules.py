"""offload_scheduler = "kernel": the policies' schedules, their checks, the nftables table
that plays them and the writer that keeps its maps (nfqlb.io.schedules), without root (``nft``
replaced by a recorder). The kernel's side is tests/test_e2e_offload_kernel_root.py."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import struct
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from helpers import VIP, service

from nfqlb import rules
from nfqlb.config import Config, parse_config
from nfqlb.engine import Engine
from nfqlb.errors import ConfigError
from nfqlb.io import schedules
from nfqlb.offload import OffloadDecider
from nfqlb.policies import FlowKey, make_policy
from nfqlb.values import Backend

SLOTS = rules.SCHEDULE_SLOTS
KERNEL = {"offload_scheduler": "kernel"}


def config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": daemon, "service": list(services)}, "t.toml")


def kernel_service(**extra: Any) -> dict[str, Any]:
    return service("offload", **{**KERNEL, **extra})


# ------------------------------------------------------------------ the policies' schedules


def backends(*weights: int) -> tuple[Backend, ...]:
    return tuple(Backend(name=f"b{i}", address=None, port=8080 + i, weight=w)
                 for i, w in enumerate(weights))


FLOW = FlowKey(6, bytes(4), 40000, ip_address(VIP), 80)


def test_round_robin_schedule_is_its_choices_and_leaves_its_turn() -> None:
    p = make_policy("round_robin", backends(1, 0, 1), {})
    first = p.choose(FLOW, 0.0)
    plan = p.schedule(6)  # type: ignore[attr-defined]
    assert [b.name for b in plan] == ["b0", "b2", "b0", "b2", "b0", "b2"]  # b1 drained
    assert p.choose(FLOW, 0.0) is not first  # (its own turn moved on from the first only)
    assert make_policy("round_robin", backends(0, 0, 1), {}).schedule(3)[0].name == "b2"  # type: ignore[attr-defined]


def test_weighted_round_robin_schedule_is_smooth_and_exact() -> None:
    p = make_policy("weighted_round_robin", backends(5, 1), {})
    plan = [b.name for b in p.schedule(SLOTS)]  # type: ignore[attr-defined]
    assert collections.Counter(plan) == {"b0": SLOTS * 5 // 6, "b1": SLOTS // 6}
    assert "b0" * 6 not in "".join(plan)  # interleaved, not five in a row then one
    fresh = make_policy("weighted_round_robin", backends(5, 1), {})
    assert [fresh.choose(FLOW, 0.0).name for _ in range(12)] == plan[:12]  # type: ignore[union-attr]


def test_a_schedule_of_no_backend_that_may_take_flows_is_empty() -> None:
    p = make_policy("weighted_round_robin", backends(1, 1), {})
    p.set_backends(backends(0, 0))
    assert p.schedule(SLOTS) == []  # type: ignore[attr-defined]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(("svc", "key", "words"), [
    (service("dnat", **KERNEL), "offload_scheduler", "only applies in mode \"offload\""),
    (kernel_service(policy="maglev"), "policy", "has no schedule()"),
    (kernel_service(policy="source_hash"), "policy", "has no schedule()"),
    (kernel_service(offload_scheduler="ipvs"), "offload_scheduler", "ipvs"),
])
def test_bad_scheduler_configuration_names_the_key(svc: dict[str, Any], key: str,
                                                   words: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(svc)
    assert err.value.key == f"service[0].{key}", err.value
    assert words in str(err.value)


def test_a_plugin_with_a_schedule_may_be_played_by_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "every_other.py").write_text(
        "class P:\n"
        "    def __init__(self, options, rng): self.b = ()\n"
        "    def set_backends(self, backends): self.b = [x for x in backends if x.weight]\n"
        "    def choose(self, flow, now): return self.b[0] if self.b else None\n"
        "    def schedule(self, slots): return [self.b[i % len(self.b)] for i in range(slots)]\n"
        "def make(options, rng): return P(options, rng)\n")
    cfg = config(kernel_service(policy=f"file:{tmp_path / 'every_other.py'}:make"))
    assert cfg.services[0].offload_scheduler.value == "kernel"


# ------------------------------------------------------------------ the rules


def test_the_table_has_a_map_per_service_a_chain_per_backend_and_the_queue_skips_marked(
        ) -> None:
    cfg = config(kernel_service(name="k"), service("offload", name="q", port=81))
    [rs] = rules.render(cfg)
    text = rs.nft
    name = rules.schedule_map(cfg.services[0])
    assert f"map {name} {{ typeof numgen inc mod {SLOTS} : verdict; }}" in text
    marks = rules.offload_marks(cfg.daemon, cfg.services)
    for b in cfg.services[0].backends:
        chain = rules.schedule_chain(cfg.services[0], b)
        assert f"counter {chain} {{ }}" in text
        assert re.search(rf"chain {chain} {{\n    counter name \"{chain}\" meta mark set meta "
                         rf"mark & 0xf00fffff \| {marks[('k', b.name)]:#010x}\n", text), text
    # only the kernel service's bare SYNs, NEW and unconfirmed, at prerouting and output
    look = (f"ct state new ct status & confirmed == 0 ip daddr {VIP} tcp dport 80 tcp flags & "
            f"(fin | syn | rst | ack) == syn numgen inc mod {SLOTS} vmap @{name}")
    assert text.count(look) == 2 and "dport 81" not in text
    assert "type filter hook prerouting priority -160" in text
    assert "type route hook output priority -160" in text
    mangle = dict(rs.offload)["mangle"]
    [k] = [line for line in mangle if "--dport 80 " in line]
    [q] = [line for line in mangle if "--dport 81 " in line]
    assert "-m mark --mark 0x0/0xff00000 -j NFQUEUE" in k
    assert "-m mark" not in q  # nfqlb decides: every NEW packet queued, as before


def test_without_a_kernel_scheduled_service_an_offload_config_has_no_table() -> None:
    [rs] = rules.render(config(service("offload")))
    assert rs.nft == ""
    [six] = rules.render(config(kernel_service(vip="2001:db8::100", backend=[
        {"name": "b1", "address": "2001:db8::2:1", "port": 80}])))
    assert six.nft.startswith("table ip6 nfqlb-1\nflush table ip6 nfqlb-1\n")
    assert "ip6 daddr 2001:db8::100 tcp dport 80" in six.nft


def test_udp_first_datagrams_are_scheduled_without_a_flags_match() -> None:
    [rs] = rules.render(config(kernel_service(proto="udp")))
    assert "udp dport 53 numgen inc" in rs.nft and "tcp flags" not in rs.nft.split(
        "chain new-pre")[1]


# ------------------------------------------------------------------ ServiceRuntime


def runtime(svc: dict[str, Any]) -> tuple[Engine, Any]:
    cfg = config(svc)
    eng = Engine(cfg)
    return eng, eng.services.named(svc["name"])


def test_kernel_schedule_leaves_out_drained_and_down_backends() -> None:
    eng, svc = runtime(kernel_service())
    plan = svc.kernel_schedule(SLOTS, 0.0)
    assert collections.Counter(rt.name for rt in plan) == {"b1": SLOTS // 2, "b2": SLOTS // 2}
    g = svc.generation
    eng.drain(svc.name, "b1", 0.0, None)
    assert svc.generation > g
    assert {rt.name for rt in svc.kernel_schedule(SLOTS, 0.0)} == {"b2"}
    eng.set_health(svc.name, "b2", False, 0.0)
    assert svc.kernel_schedule(SLOTS, 0.0) == []


class _Bad:
    def __init__(self, how: str) -> None:
        self.how = how
        self.b: list[Backend] = []

    def set_backends(self, backends: Any) -> None:
        self.b = list(backends)

    def choose(self, flow: Any, now: float) -> Any:
        return self.b[0]

    def schedule(self, slots: int) -> list[Any]:
        if self.how == "raise":
            raise RuntimeError("boom")
        if self.how == "short":
            return self.b[:1]
        return [Backend(name="stranger", address=None, port=1)] * slots


@pytest.mark.parametrize("how", ["raise", "short", "stranger"])
def test_a_failing_schedule_is_contained_counted_and_leaves_the_queue_to_decide(
        how: str, caplog: Any) -> None:
    _eng, svc = runtime(kernel_service())
    svc.policy = _Bad(how)
    svc.policy.set_backends(svc.offered)
    with caplog.at_level(logging.WARNING):
        assert svc.kernel_schedule(SLOTS, 0.0) is None
    assert svc.policy_errors == 1
    assert "offload queue" in caplog.text


# ------------------------------------------------------------------ the writer


def test_a_schedule_write_flushes_and_fills_the_map() -> None:
    _eng, svc = runtime(kernel_service())
    write = schedules.schedule_write(svc, 7, svc.kernel_schedule(4, 0.0))
    name = rules.schedule_map(svc.service)
    c1, c2 = (rules.schedule_chain(svc.service, b) for b in svc.service.backends)
    assert (write.version, write.table, write.name) == (4, "nfqlb-7", name)
    assert write.elements == ((0, c1), (1, c2), (2, c1), (3, c2))
    assert write.text() == (f"flush map ip nfqlb-7 {name}\nadd element ip nfqlb-7 {name} {{ "
                            f"0 : goto {c1}, 1 : goto {c2}, 2 : goto {c1}, 3 : goto {c2} }}\n")
    assert schedules.schedule_write(svc, 7, []).text() == f"flush map ip nfqlb-7 {name}\n"


def test_a_map_batch_is_one_transaction_flush_then_elements() -> None:
    from nfqlb.io import nftnl

    elements = [(i, "c1" if i % 2 else "c2") for i in range(2 * nftnl.ELEMENTS_PER_MESSAGE + 1)]
    batch = nftnl.map_batch(4, "nfqlb-7", "s-x", elements)
    kinds, at = [], 0
    while at < len(batch):
        n, kind, flags = struct.unpack_from("=IHH", batch, at)
        family, _v, res_id = struct.unpack_from("!BBH", batch, at + 16)
        kinds.append((kind, family, res_id))
        at += n
    assert at == len(batch)
    nft = 10 << 8
    assert kinds == [(0x10, 0, 10), (nft | 14, 2, 0), (nft | 12, 2, 0), (nft | 12, 2, 0),
                     (nft | 12, 2, 0), (0x11, 0, 10)]  # begin, flush, 3 x elements, end
    assert batch.count(b"c1\0") == 400 and batch.count(b"c2\0") == 401  # a goto per element
    assert struct.pack("=I", 800) in batch  # a slot as the kernel's register holds it


class Recorder:
    """The kernel's side of the writer: the writes it got (as ``nft -f`` text, one entry per
    batch of writes); the counters that the netlink read (nfqlb.io.nftnl.counters) answers."""

    def __init__(self, monkeypatch: Any) -> None:
        self.inputs: list[str] = []
        self.counters: dict[str, int] = {}
        self.fail = False
        self.reads: list[tuple[int, str]] = []
        monkeypatch.setattr(schedules, "write_maps", self)
        monkeypatch.setattr(schedules.nftnl, "counters", self.read)

    def __call__(self, writes: list[schedules.MapWrite]) -> None:
        if self.fail:
            raise schedules.nftnl.NftError(2, "s-x: No such file or directory")
        self.inputs.append("".join(w.text() for w in writes))

    def read(self, version: int, table: str) -> dict[str, int]:
        if self.fail:
            raise schedules.nftnl.NftError(2, "No such file or directory")
        self.reads.append((version, table))
        return dict(self.counters)


def settle(loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(50):
        loop.run_until_complete(asyncio.sleep(0.01))


def test_the_writer_writes_on_change_only_retries_failures_and_counts(monkeypatch: Any) -> None:
    nft = Recorder(monkeypatch)
    cfg = config(kernel_service(name="k"), service("offload", name="q", port=81))
    eng = Engine(cfg)
    decider = OffloadDecider(cfg, eng.services, eng.counters)
    loop = asyncio.new_event_loop()
    w = schedules.KernelSchedules(loop, decider, 1, logging.getLogger("t"), lambda: 0.0)
    try:
        nft.fail = True  # a worker's first tries may come before its supervisor made the table
        for _ in range(schedules.QUIET_FAILURES):
            w.tick()
            settle(loop)
            assert w.failed == ""  # (quiet, retried at each tick)
        nft.fail = False
        w.tick()
        settle(loop)
        assert len(nft.inputs) == 1 and "goto" in nft.inputs[0]  # the kernel service's only
        assert rules.schedule_map(cfg.services[1]) not in nft.inputs[0]
        w.tick()
        settle(loop)
        assert len(nft.inputs) == 1  # nothing changed: nothing written
        nft.fail = True
        eng.drain("k", "b1", 0.0, None)
        w.tick()  # (said at once: a write succeeded before)
        settle(loop)
        assert "No such file" in w.failed
        nft.fail = False
        w.tick()  # (retried at the next tick)
        settle(loop)
        assert w.failed == "" and len(nft.inputs) == 2
        assert rules.schedule_chain(cfg.services[0], cfg.services[0].backends[0]) \
            not in nft.inputs[1]  # b1 drained: out of the schedule
        # the counters: added to the backends' flows, once; a table made anew counts again
        c1, c2 = (rules.schedule_chain(cfg.services[0], b) for b in cfg.services[0].backends)
        nft.counters = {c1: 3, c2: 5}
        w.request_count(0.0)
        settle(loop)
        nft.counters = {c1: 4, c2: 1}
        w.request_count(0.0)
        settle(loop)
        flows = {n: b["flows"] for n, b in eng.status(0.0)["services"]["k"]["backends"].items()}
        assert flows == {"b1": 4, "b2": 6}
        assert w.flows == 10
        status = {"services": {"k": {}, "q": {}}}
        w.annotate(status)
        assert status["services"]["k"]["offload"]["schedule"]["written"] is True
        assert "offload" not in status["services"]["q"]
    finally:
        w.close()
        loop.close()


def test_schedules_of_two_families_go_to_their_own_tables(monkeypatch: Any) -> None:
    nft = Recorder(monkeypatch)
    cfg = config(kernel_service(name="k4"), kernel_service(
        name="k6", vip="2001:db8::100",
        backend=[{"name": "b1", "address": "2001:db8::2:1", "port": 80}]))
    eng = Engine(cfg)
    loop = asyncio.new_event_loop()
    w = schedules.KernelSchedules(loop, OffloadDecider(cfg, eng.services, eng.counters), 3,
                                  logging.getLogger("t"), lambda: 0.0)
    try:
        w.tick()
        settle(loop)
    finally:
        w.close()
        loop.close()
    [text] = nft.inputs
    assert "flush map ip nfqlb-3 " in text and "flush map ip6 nfqlb-3 " in text


def test_the_status_text_says_the_kernel_places_new_flows() -> None:
    from nfqlb.io.control import _offload_note

    note = _offload_note({"schedule": {"slots": SLOTS, "written": False, "error": "nft: x"}})
    assert f"new flows placed by the kernel's schedule ({SLOTS} slots, being written" in note
    assert note.endswith("; nft: x")
    assert "kernel's schedule" not in _offload_note({"counted_s_ago": 1, "count_took_s": 0})
    hashed = _offload_note({"schedule": {"slots": 2521, "written": True,
                                         "slot": "jhash ip saddr mod 2521 seed 0x6e66716c"}})
    assert "(2521 slots by jhash ip saddr, written; flows: its counters)" in hashed


class _Control:
    """``nfqlb.io.control`` as ``nfqlb ctl`` uses it: status answers in turn."""

    def __init__(self, written: list[bool]) -> None:
        self.written = written
        self.asked = 0

    def request(self, path: Any, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert message == {"cmd": "status"}
        done = self.written[min(self.asked, len(self.written) - 1)]
        self.asked += 1
        note = {"schedule": {"written": done, **({} if done else {"error": "nft: busy"})}}
        return {"ok": True, "status": {"services": {"k": {"offload": note}, "q": {}}}}


def test_ctl_returns_once_the_kernels_schedule_holds_the_change(monkeypatch: Any) -> None:
    from nfqlb import cli

    ctl = _Control([False, False, True])
    assert cli._wait_for_schedules(ctl, "sock", "k") == ""
    assert ctl.asked == 3  # asked until written
    assert cli._wait_for_schedules(_Control([False]), "sock", "q") == ""  # no schedule
    monkeypatch.setattr(cli, "SCHEDULE_WAIT_S", 0.05)
    late = cli._wait_for_schedules(_Control([False]), "sock", None)
    assert late == "service k: the kernel's schedule is not written yet (nft: busy)"


# ------------------------------------------------------------------ source_hash by jhash

# slots the kernel's ``jhash ip[6] saddr mod 2520 seed 0x6e66716c`` gave these addresses
# (read off nftables on this project's lab machine: a rule setting the mark to it, one
# counter per address and expected mark); test_e2e_offload_kernel_root checks it live
KERNEL_SLOTS = {"198.18.0.2": 0x24A, "198.18.0.3": 0x194, "198.18.0.4": 0xC6,
                "198.18.0.5": 0x75D, "198.18.0.6": 0x84A, "198.18.0.7": 0x86E,
                "2001:db8::7": 0x4E3, "2001:db8::1234": 0x449}


def test_jhash_is_the_kernels() -> None:
    from nfqlb.policies import jhash

    for address, slot in KERNEL_SLOTS.items():
        assert jhash.slot_of(ip_address(address).packed, SLOTS) == slot, address
    # lengths of every remainder, through the 12-byte rounds (lookup3's own check value)
    assert jhash.jhash(b"", 0) == 0xDEADBEEF
    assert len({jhash.jhash(bytes(range(n)), 0) for n in range(40)}) == 40


def hashed(*weights: int) -> Any:
    return make_policy("source_hash", tuple(
        Backend(name=f"b{i}", address=ip_address(f"198.18.1.{i + 2}"), port=80, weight=w)
        for i, w in enumerate(weights)), {"hash": "jhash"})


def test_jhash_source_hash_places_a_client_by_its_kernel_slot() -> None:
    from nfqlb.policies import jhash

    p = hashed(1, 1, 1)
    table = p.schedule(SLOTS)
    assert len(table) == SLOTS and {b.name for b in table} == {"b0", "b1", "b2"}
    for address in KERNEL_SLOTS:
        flow = FlowKey(6, ip_address(address).packed, 40000, ip_address(VIP), 80)
        want = table[jhash.slot_of(ip_address(address).packed, SLOTS)]
        assert p.choose(flow, 0.0) is want and p.choose_consistent(flow) is want
    assert all(abs(n - SLOTS / 3) < SLOTS * 0.05 for n in collections.Counter(
        b.name for b in table).values())


def test_jhash_source_hash_moves_only_the_slots_of_a_backend_taken_out() -> None:
    before = hashed(1, 1, 1).schedule(SLOTS)
    after_policy = hashed(1, 1, 1)
    live = [b for b in dict.fromkeys(before) if b.name != "b1"]
    after_policy.set_backends(live)
    after = after_policy.schedule(SLOTS)
    moved = [i for i in range(SLOTS) if before[i].name != after[i].name]
    assert moved and all(before[i].name == "b1" for i in moved)
    assert all(b.name != "b1" for b in after)
    weighted = collections.Counter(b.name for b in hashed(3, 1).schedule(SLOTS))
    assert 0.7 < weighted["b0"] / SLOTS < 0.8


@pytest.mark.parametrize(("options", "key"), [
    ({"hash": "jhash", "fields": []}, "fields"),
    ({"hash": "jhash", "src_prefix": 24}, "src_prefix"),
    ({"hash": "md5"}, "hash"),
])
def test_jhash_source_hash_options_name_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(kernel_service(policy="source_hash", policy_options=options))
    assert err.value.key == f"service[0].policy_options.{key}", err.value


def test_a_hashing_schedule_is_played_by_the_clients_address() -> None:
    cfg = config(kernel_service(policy="sh", policy_options={"hash": "jhash"}))
    [rs] = rules.render(cfg)
    assert (f"tcp dport 80 tcp flags & (fin | syn | rst | ack) == syn jhash ip saddr mod "
            f"{SLOTS} seed 0x6e66716c vmap @") in rs.nft
    assert "numgen inc mod" not in rs.nft.split("vmap")[0].split("verdict;")[-1]  # (a hash)
    with pytest.raises(ConfigError) as err:  # the blake2b rendezvous has no schedule
        config(kernel_service(policy="source_hash"))
    assert err.value.key == "service[0].policy"


# ------------------------------------------------------------------ flow fields by jhash

# The slots the kernel's ``jhash <fields> mod 65537 seed 0x6e66716c`` gave the datagrams of
# 198.18.5.1, source ports 40000, 40001, 51234 and 1025, to 198.18.100.1:5353 (UDP), read off
# nftables 1.0.6 on this project's lab machine (a rule setting the mark to the hash, and
# ``add @seen { meta mark }``). One field alone is hashed as its bytes; in a concatenation
# each field fills a 32-bit register, zeros after it.
PORTS = (40000, 40001, 51234, 1025)
SEEN = {
    ("src", "sport"): {26605, 28618, 45402, 63530},
    ("protocol", "src", "sport", "dst", "dport"): {9170, 14307, 57276, 60393},
    ("sport",): {191, 11612, 50897, 57920},
    ("protocol",): {33500},
    ("src", "dst"): {63948},
}


@pytest.mark.parametrize("fields", list(SEEN))
def test_the_kernel_key_of_flow_fields_is_what_nftables_hashes(fields: tuple[str, ...]) -> None:
    from nfqlb.policies import jhash

    key = jhash.kernel_key(fields)
    got = {jhash.slot_of(key(FlowKey(17, ip_address("198.18.5.1").packed, port,
                                     ip_address("198.18.100.1"), 5353)), 65537)
           for port in PORTS}
    assert got == SEEN[fields]


def table_policy(name: str, *weights: int, **options: Any) -> Any:
    return make_policy(name, tuple(
        Backend(name=f"b{i}", address=ip_address(f"198.18.1.{i + 2}"), port=80, weight=w)
        for i, w in enumerate(weights)), {"hash": "jhash", **options})


def flows(n: int) -> list[FlowKey]:
    return [FlowKey(6, ip_address(f"198.18.{i % 200}.{i // 200 + 1}").packed, 1024 + i * 7,
                    ip_address(VIP), 80) for i in range(n)]


@pytest.mark.parametrize(("name", "fields", "slots"), [
    ("maglev", ("protocol", "src", "sport", "dst", "dport"), 2521),
    ("mh", ("src",), 2521),
    ("flow_hash", ("protocol", "src", "sport", "dst", "dport"), SLOTS),
    ("source_hash", ("src",), SLOTS),
])
def test_hash_policies_by_jhash_place_a_flow_in_its_kernel_slot(
        name: str, fields: tuple[str, ...], slots: int) -> None:
    from nfqlb.policies import jhash, kernel_hash

    p = table_policy(name, 1, 1, 1)
    table = p.schedule(slots)
    assert len(table) == slots and {b.name for b in table} == {"b0", "b1", "b2"}
    key = jhash.kernel_key(fields)
    for flow in flows(50):
        want = table[jhash.slot_of(key(flow), slots)]
        assert p.choose(flow, 0.0) is want and p.choose_consistent(flow) is want
    assert kernel_hash(name, {"hash": "jhash"}, 3) == (fields, slots)
    assert kernel_hash(name, {}, 3) is None  # (the blake2b hash: the kernel cannot play it)


def test_maglev_by_jhash_is_maglevs_table_and_moves_little() -> None:
    from nfqlb.policies.maglev import build_table

    p = table_policy("maglev", 1, 1, 1, 1)
    before = p.schedule(2521)
    ordered = sorted(dict.fromkeys(before), key=lambda b: b.name)
    assert [b.name for b in before] == [ordered[i].name for i in build_table(ordered, 2521)]
    p.set_backends([b for b in ordered if b.name != "b2"])
    after = p.schedule(2521)
    moved = [i for i in range(2521) if before[i].name != after[i].name]
    others = [i for i in moved if before[i].name != "b2"]
    assert len(moved) >= 2521 // 4 - 5 and len(others) < 2521 * 0.03, len(others)
    # the table's size: the configured one, or a prime over 100 slots per configured backend
    from nfqlb.policies import kernel_hash

    assert kernel_hash("maglev", {"hash": "jhash", "table_size": 4099}, 3)[1] == 4099  # type: ignore[index]
    assert kernel_hash("maglev", {"hash": "jhash"}, 30)[1] == 3001  # type: ignore[index]


@pytest.mark.parametrize(("policy", "options", "key"), [
    ("maglev", {"hash": "jhash", "table_size": 101}, "policy_options.table_size"),
    ("maglev", {"hash": "sha1"}, "policy_options.hash"),
    ("flow_hash", {"hash": "jhash", "fields": ["src"]}, "policy_options.fields"),
    ("maglev", {}, "policy"),  # (blake2b: no schedule)
])
def test_bad_jhash_policy_options_name_the_key(policy: str, options: dict[str, Any],
                                               key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(kernel_service(policy=policy, policy_options=options))
    assert err.value.key == f"service[0].{key}", err.value


def test_the_kernel_hashes_the_policys_fields_into_its_table() -> None:
    from nfqlb.policies import jhash

    assert jhash.nft_expression(("src", "sport", "dst"), "ip6") == \
        "jhash ip6 saddr . th sport . ip6 daddr"
    cfg = config(kernel_service(name="m", policy="maglev", policy_options={"hash": "jhash"}),
                 kernel_service(name="f", port=81, policy="flow_hash", protocol="udp",
                                policy_options={"hash": "jhash"}),
                 kernel_service(name="s", port=82, policy="sh",
                                policy_options={"hash": "jhash", "fields": ["src", "sport"]}))
    [rs] = rules.render(cfg)
    five = "jhash meta l4proto . ip saddr . th sport . ip daddr . th dport"
    assert f"tcp dport 80 tcp flags & (fin | syn | rst | ack) == syn {five} mod 2521 " \
           f"seed 0x6e66716c vmap @" in rs.nft
    assert f"udp dport 81 {five} mod {SLOTS} seed 0x6e66716c vmap @" in rs.nft
    assert f"jhash ip saddr . th sport mod {SLOTS} seed 0x6e66716c vmap @" in rs.nft
    assert rs.nft.count("typeof numgen inc mod 2521 : verdict") == 1
    assert rs.nft.count(f"typeof numgen inc mod {SLOTS} : verdict") == 2


def test_the_writer_writes_a_table_of_the_policys_size(monkeypatch: Any) -> None:
    nft = Recorder(monkeypatch)
    cfg = config(kernel_service(name="m", policy="maglev", policy_options={"hash": "jhash"}))
    eng = Engine(cfg)
    loop = asyncio.new_event_loop()
    w = schedules.KernelSchedules(loop, OffloadDecider(cfg, eng.services, eng.counters), 1,
                                  logging.getLogger("t"), lambda: 0.0)
    try:
        w.tick()
        settle(loop)
        [text] = nft.inputs
        assert "2520 : goto" in text and "2521 : goto" not in text  # slots 0-2520
        status: dict[str, Any] = {"services": {"m": {}}}
        w.annotate(status)
        note = status["services"]["m"]["offload"]["schedule"]
        assert note["slots"] == 2521 and note["written"] is True
        assert note["slot"].startswith("jhash meta l4proto . ip saddr")
    finally:
        w.close()
        loop.close()
