"""Several workers (``daemon.workers``, ``nfqlb run --queue M-N``): the configuration checks,
each worker's share of the fullnat pools, the rules that send both directions of a flow to
its worker, and the supervisor's sum of the workers' figures. The processes themselves are
tested end to end (tests/test_e2e_workers_root.py, and the whole e2e suite with
NFQLB_LAB_WORKERS=2)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest

from nfqlb import cli, rules
from nfqlb.config import Config, for_worker, parse_config, with_workers, worker_ports
from nfqlb.errors import ConfigError
from nfqlb.io.workers import merge

FULLNAT = {"name": "web", "vip": "198.18.100.1", "port": 80, "mode": "fullnat",
           "snat_address": "198.18.1.1", "snat_ports": "20000-29999",
           "backend": [{"address": "198.18.1.2", "port": 8080}]}
DNAT6 = {"name": "v6", "vip": "2001:db8:100::1", "port": 80, "mode": "dnat",
         "backend": [{"address": "2001:db8:1::2", "port": 8080}]}


def config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": daemon, "service": list(services or [FULLNAT])}, "t.toml")


def test_worker_ports_split_the_pool_into_contiguous_shares() -> None:
    shares = [worker_ports((20000, 29999), i, 3) for i in range(3)]
    assert shares == [(20000, 23332), (23333, 26665), (26666, 29999)]
    assert [worker_ports((5, 5), 0, 1)] == [(5, 5)]
    c = config(workers=2)
    assert [s.snat_ports for s in for_worker(c, 1).services] == [(25000, 29999)]
    assert for_worker(config(), 0) == config()


@pytest.mark.parametrize(("daemon", "service", "key", "problem"), [
    ({"workers": 0}, {}, "daemon.workers", "out of range"),
    ({"workers": 65}, {}, "daemon.workers", "out of range"),
    ({"workers": 3}, {"snat_ports": "20000-20001"}, "service[0].snat_ports",
     "fewer ports than the 3 workers"),
    ({"workers": 4, "queue": 65533}, {}, "daemon.workers", "beyond 65535"),
    ({"workers": 4, "queue": 1, "large_queue": 3}, {}, "daemon.large_queue",
     "overlap the queues 1-4"),
])
def test_bad_worker_settings_name_the_key(daemon: dict[str, Any], service: dict[str, Any],
                                          key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config({**FULLNAT, **service}, **daemon)
    assert info.value.key == key and problem in str(info.value)


def test_queue_range_on_the_command_line() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--queue", "3-6"])
    assert args.queue == (3, 4)
    assert parser.parse_args(["run", "--queue", "3"]).queue == (3, 0)
    with pytest.raises(cli.UsageError, match="reversed"):
        parser.parse_args(["run", "--queue", "6-3"])
    c = with_workers(config(), 3, 4)
    assert (c.daemon.queue, c.daemon.workers) == (3, 4)
    with pytest.raises(ConfigError) as info:
        with_workers(config({**FULLNAT, "snat_ports": "20000-20002"}), 1, 4)
    assert info.value.key == "service[0].snat_ports" and "--queue" in str(info.value)


def _rules(c: Config, version: int = 4) -> list[str]:
    return [r for rs in rules.render(c) if rs.family.version == version for r in rs.rules]


def test_requests_by_source_and_replies_by_destination_reach_one_worker() -> None:
    dnat = {**FULLNAT, "mode": "dnat"}
    del dnat["snat_address"], dnat["snat_ports"]
    got = _rules(config(dnat, DNAT6, workers=2))
    assert got[:4] == [
        '-A NFQLB-Q-1 -m u32 --u32 "12&0xFF=0:127" -g NFQLB-Q-1-0',
        '-A NFQLB-R-1 -m u32 --u32 "16&0xFF=0:127" -g NFQLB-Q-1-0',
        "-A NFQLB-Q-1 -g NFQLB-Q-1-1",
        "-A NFQLB-R-1 -g NFQLB-Q-1-1"]
    for i, (q, large) in enumerate([(1, 10001), (2, 10002)]):
        chain = f"NFQLB-Q-1-{i}"
        assert [r for r in got if r.startswith(f"-A {chain} ")] == [
            f"-A {chain} -j CT --notrack",
            # the headers route (rules/bulk.rules): worker i's headers queue is 30001 + i
            f"-A {chain} -m mark --mark 0x10/0xff0 -j NFQUEUE --queue-num {large} "
            "--queue-bypass",
            f"-A {chain} -p tcp -m length --length 3961:65535 -j NFQUEUE --queue-num "
            f"{30000 + q} --queue-bypass",
            f"-A {chain} -m length --length 3961:65535 -j NFQUEUE --queue-num {large} "
            "--queue-bypass",
            f"-A {chain} -j NFQUEUE --queue-num {q} --queue-bypass"]
    assert "-A NFQLB-PRE-1 -d 198.18.100.1/32 -p tcp --dport 80 -g NFQLB-Q-1" in got
    assert "-A NFQLB-PRE-1 -s 198.18.1.2/32 -p tcp --sport 8080 -g NFQLB-R-1" in got
    v6 = _rules(config(dnat, DNAT6, workers=2), 6)
    assert '-A NFQLB-Q-1 -m u32 --u32 "20&0xFF=0:127" -g NFQLB-Q-1-0' in v6  # last src byte
    assert '-A NFQLB-R-1 -m u32 --u32 "36&0xFF=0:127" -g NFQLB-Q-1-0' in v6  # last dst byte


def _u32_byte(rule: str) -> tuple[int, int, int]:
    """(offset, lo, hi) of a steering rule's '<offset>&0xFF=<lo>:<hi>' test."""
    test = rule.split('"')[1]
    where, _, span = test.partition("&0xFF=")
    lo, _, hi = span.partition(":")
    return int(where), int(lo), int(hi)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_every_client_address_has_exactly_one_worker(workers: int) -> None:
    got = _rules(config(workers=workers))
    steer = [r for r in got if r.startswith("-A NFQLB-Q-1 ")]
    assert len(steer) == workers
    owners: dict[int, list[int]] = {b: [] for b in range(256)}
    for i, rule in enumerate(steer):
        if "u32" in rule:
            _, lo, hi = _u32_byte(rule)
            span = range(lo, hi + 1)
        else:  # the last worker takes what the others did not
            span = range(256)
        for b in span:
            if not owners[b]:
                owners[b].append(i)
    assert all(len(v) == 1 for v in owners.values())
    counts = [sum(1 for v in owners.values() if v == [i]) for i in range(workers)]
    assert max(counts) - min(counts) <= 1  # an even split of the last byte


def test_fullnat_replies_go_to_the_owner_of_their_pool_share() -> None:
    got = _rules(config(workers=2))
    assert ("-A NFQLB-PRE-1 -s 198.18.1.2/32 -d 198.18.1.1/32 -p tcp --sport 8080 "
            "--dport 20000:24999 -g NFQLB-Q-1-0") in got
    assert ("-A NFQLB-PRE-1 -s 198.18.1.2/32 -d 198.18.1.1/32 -p tcp --sport 8080 "
            "--dport 25000:29999 -g NFQLB-Q-1-1") in got
    frag = [r for r in got if r.startswith("-A NFQLB-PRE-1 -s 198.18.1.2/32") and "0x3fff" in r]
    assert frag == ["-A NFQLB-PRE-1 -s 198.18.1.2/32 -d 198.18.1.1/32 -p tcp "
                    '-m u32 --u32 "0x4&0x3fff=0x1:0x3fff" -g NFQLB-Q-1-0']
    errors = [r for r in got if r.startswith("-A NFQLB-ERR-1")]
    assert len(errors) == 4  # replies' errors by the quoted client, requests' by pool port
    assert any("@8>>16=20000:24999" in r and r.endswith("-g NFQLB-Q-1-0") for r in errors)
    assert any("@8>>16=25000:29999" in r and r.endswith("-g NFQLB-Q-1-1") for r in errors)
    assert any("@24&0xFF=0:127" in r and r.endswith("-g NFQLB-Q-1-0") for r in errors)


def test_one_worker_renders_as_before() -> None:
    one = rules.render(config())[0]
    assert one.extra_chains == () and not any("NFQLB-R-" in r for r in one.rules)
    assert "-A NFQLB-Q-1 -j NFQUEUE --queue-num 1 --queue-bypass" in one.rules


def test_restore_declares_and_delete_removes_the_worker_chains() -> None:
    rs = rules.render(config(workers=2))[0]
    text = rules.format_restore(rs)
    for chain in ("NFQLB-R-1", "NFQLB-Q-1-0", "NFQLB-Q-1-1"):
        assert f":{chain} - [0:0]" in text
        assert text.index(f":{chain} ") < text.index("-A ")
    saved = rules.parse_save("*raw\n:PREROUTING ACCEPT [0:0]\n:NFQLB-PRE-1 - [0:0]\n"
                             ":NFQLB-Q-1 - [0:0]\n:NFQLB-R-1 - [0:0]\n:NFQLB-Q-1-0 - [0:0]\n"
                             ":NFQLB-Q-11 - [0:0]\n:NFQLB-Q-11-0 - [0:0]\n"
                             "-A PREROUTING -j NFQLB-PRE-1\nCOMMIT\n")
    plan = rules.plan_delete(1, saved)
    assert plan is not None
    assert {line for line in plan.splitlines() if line.startswith("-X")} == {
        "-X NFQLB-PRE-1", "-X NFQLB-Q-1", "-X NFQLB-R-1", "-X NFQLB-Q-1-0"}


def test_merge_sums_counters_and_keeps_what_every_worker_shares() -> None:
    a = {"packets": 10, "dropped": {"malformed": 1}, "flows_active": 2,
         "services": {"web": {"refused": 1, "policy_slowest_ms": 0.5, "backends": {
             "b1": {"state": "up", "weight": 3, "port": 8080, "address": "198.18.1.2",
                    "flows": 4, "packets": 40}}}},
         "queues": [{"queue": 1, "packets": 10}]}
    b = {"packets": 5, "dropped": {"no_flow": 2}, "flows_active": 1,
         "services": {"web": {"refused": 0, "policy_slowest_ms": 2.0, "backends": {
             "b1": {"state": "up", "weight": 3, "port": 8080, "address": "198.18.1.2",
                    "flows": 1, "packets": 9}}}},
         "queues": [{"queue": 2, "packets": 5}]}
    m = merge([a, b])
    assert m["packets"] == 15 and m["flows_active"] == 3
    assert m["dropped"] == {"malformed": 1, "no_flow": 2}
    web = m["services"]["web"]
    assert web["refused"] == 1 and web["policy_slowest_ms"] == 2.0
    assert web["backends"]["b1"] == {"state": "up", "weight": 3, "port": 8080,
                                     "address": "198.18.1.2", "flows": 5, "packets": 49}
    assert [q["queue"] for q in m["queues"]] == [1, 2]
    assert ipaddress.ip_address(web["backends"]["b1"]["address"])


def _supervisor_over(*servers: Any) -> Any:
    """A Supervisor whose workers are FakeServers answering in-process."""
    import logging

    from nfqlb.io import control
    from nfqlb.io.workers import Supervisor, Worker

    dnat = {**FULLNAT, "mode": "dnat"}
    del dnat["snat_address"], dnat["snat_ports"]
    sup = Supervisor(config(dnat, workers=len(servers)), logging.getLogger("t"), (), {}, None,
                     "/etc/nfqlb/nfqlb.toml")
    sup.workers = [Worker(i, 1000 + i, -1) for i in range(len(servers))]
    sup.ask = lambda req: [control.handle(srv, req, logging.getLogger("t"))  # type: ignore
                           for srv in servers]
    return sup


def test_status_ctl_and_metrics_of_several_workers() -> None:
    from control_fakes import FakeServer, open_flows
    from prometheus_client.parser import text_string_to_metric_families

    from nfqlb.io import metrics

    a, b = FakeServer(), FakeServer()
    open_flows(a, 4)
    open_flows(b, 2, port0=41000)
    sup = _supervisor_over(a, b)
    s = sup.status()
    assert s["flows_total"] == 6 and s["packets"] == 6
    backends = s["services"]["dnat-tcp"]["backends"]
    assert {n: f["flows"] for n, f in backends.items()} == {"b1": 3, "b2": 3}
    assert [(w["worker"], w["flows_total"]) for w in s["workers"]] == [(0, 4), (1, 2)]
    assert s["daemon"]["workers"] == 2 and s["daemon"]["pid"] == os.getpid()
    fams = {f.name: f for f in text_string_to_metric_families(
        metrics.exposition(sup.status).decode())}
    assert {smp.labels["worker"]: smp.value for smp in fams["nfqlb_worker_flows"].samples
            if smp.name.endswith("_total")} == {"0": 4.0, "1": 2.0}
    assert [smp.value for smp in fams["nfqlb_flows"].samples
            if smp.name.endswith("_total")] == [6.0]
    # ctl reaches every worker; flows are listed from all of them
    done = sup.handle({"cmd": "drain", "service": "dnat-tcp", "backend": "b1"})
    assert done["ok"], done
    assert all(srv.engine.status(srv.now)["services"]["dnat-tcp"]["backends"]["b1"]["state"]
               == "draining" for srv in (a, b))
    listed = sup.handle({"cmd": "flows", "limit": 5})
    assert listed["ok"] and len(listed["flows"]) == 5 and listed["truncated"]
    assert sup.handle({"cmd": "nope"})["ok"] is False


def test_status_text_has_a_line_per_worker() -> None:
    from control_fakes import FakeServer, open_flows

    from nfqlb.io import control

    a, b = FakeServer(), FakeServer()
    open_flows(a, 3)
    text = control.format_status(_supervisor_over(a, b).status())
    assert "flows 3 total" in text
    assert text.splitlines()[-2:] == [
        "worker 0 (pid 1000, queue 1): packets 3, flows 3 total, 3 in the table",
        "worker 1 (pid 1001, queue 2): packets 0, flows 0 total, 0 in the table"]


def test_one_health_checker_reports_to_every_worker() -> None:
    from control_fakes import FakeServer

    from nfqlb.io.workers import _ForwardHealth

    a, b = FakeServer(), FakeServer()
    forward = _ForwardHealth(_supervisor_over(a, b))
    forward.set_health("dnat-tcp", "b1", False, 100.0, "timeout")
    for srv in (a, b):
        fig = srv.engine.status(srv.now)["services"]["dnat-tcp"]["backends"]["b1"]
        assert (fig["state"], fig["check"]) == ("down", "timeout")
    forward.set_health("dnat-tcp", "b1", True, 101.0, "status 200", 0.002)
    assert all(srv.engine.status(srv.now)["services"]["dnat-tcp"]["backends"]["b1"]["state"]
               == "up" for srv in (a, b))
    with pytest.raises(KeyError, match="no backend"):
        forward.set_health("dnat-tcp", "b9", True, 102.0)


OFFLOAD = {"name": "web", "vip": "198.18.100.1", "port": 80, "mode": "offload",
           "backend": [{"address": "198.18.1.2", "port": 8080}]}


@pytest.mark.parametrize(("started", "reloaded", "key"), [
    (OFFLOAD, {"daemon": {"offload_queue": 25001}, "service": OFFLOAD}, "daemon.offload_queue"),
    ({**OFFLOAD, "mode": "dnat"}, {"service": OFFLOAD}, "service"),
    (OFFLOAD, {"daemon": {"binding": "netfilterqueue"}, "service": OFFLOAD}, "daemon.binding"),
    (OFFLOAD, {"daemon": {"large_queue": 25001}, "service": OFFLOAD}, "daemon.large_queue"),
])
def test_supervisor_refuses_a_reload_a_single_daemon_refuses(
        tmp_path: Any, started: dict[str, Any], reloaded: dict[str, Any], key: str) -> None:
    """The workers' queues (the offload queue + i too) are bound at start: a reload that
    moves one (or adds the offload queue, or changes the binding) is refused, as a single
    daemon refuses it, and no worker is asked to take it."""
    import logging

    from lab import render_config

    from nfqlb.io.workers import Supervisor

    path = tmp_path / "nfqlb.toml"
    sup = Supervisor(config(started, workers=2), logging.getLogger("t"), (), {}, None, str(path))
    asked: list[Any] = []
    sup.ask = asked.append  # type: ignore[method-assign, assignment]
    path.write_text(render_config([reloaded["service"]],
                                  {"queue": 1, "workers": 2, **reloaded.get("daemon", {})}))
    ok, message = sup.reload()
    assert not ok and key in message, message
    assert asked == []


OTHER = {**OFFLOAD, "name": "other", "port": 81}


def _nat(rs: rules.RuleSet) -> list[str]:
    return [line for line in dict(rs.offload)["nat"] if not line.startswith("#")]


def test_supervisor_keeps_the_marks_and_bridges_a_removed_backends_before_its_workers_reload(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload that puts another service first, removes a backend and adds one: every
    backend it keeps keeps its mark (configuration order would have renumbered them all), the
    new ones get marks no backend had; the order of a supervisor's reload: the bridge (the new
    rules and the removed backend's, for a worker that has not reloaded yet), then the workers
    asked, then the new rules alone."""
    import logging

    from lab import render_config

    from nfqlb.io import iptables, sysctl
    from nfqlb.io.workers import Supervisor

    two = {**OFFLOAD, "backend": [{"address": "198.18.1.2", "port": 8080},
                                  {"address": "198.18.1.3", "port": 8080}]}
    started = config(two, workers=2)
    path = tmp_path / "nfqlb.toml"
    sup = Supervisor(started, logging.getLogger("t"), rules.render(started),
                     {4: object()}, None, str(path))  # type: ignore[dict-item]
    sup.sysctls = object()  # type: ignore[assignment]
    events: list[tuple[str, Any]] = []
    monkeypatch.setattr(iptables, "apply",
                        lambda rs, _tool: events.append(("apply", _nat(rs))))
    monkeypatch.setattr(iptables, "check_overlap", lambda *_: None)
    monkeypatch.setattr(sysctl, "setup", lambda *_: None)
    sup.ask = lambda req: events.append(("ask", req["cmd"])) or [{"ok": True}]  # type: ignore
    sup._lingering_now = dict  # type: ignore[method-assign]
    changed = {**OFFLOAD, "backend": [{"address": "198.18.1.4", "port": 8080},
                                      {"address": "198.18.1.3", "port": 8080}]}
    path.write_text(render_config([OTHER, changed], {"queue": 1, "workers": 2}))
    ok, message = sup.reload()
    assert ok, message
    [old] = rules.render(started)
    [new] = rules.render(sup.config)
    mark = {line.split("--to-destination ")[1] + ("@81" if "--dport 81" in line else ""):
            line.split("--mark ")[1].split()[0] for line in _nat(new)}
    # web's 198.18.1.3 keeps mark 2; 198.18.1.2's 1 goes unused; the new ones get 3 and 4
    assert mark == {"198.18.1.3:8080": "0x200000/0xff00000",
                    "198.18.1.2:8080@81": "0x300000/0xff00000",
                    "198.18.1.4:8080": "0x400000/0xff00000"}, mark
    assert _nat(old)[1] in _nat(new)
    assert events == [("apply", _nat(new) + _nat(old)[:1]), ("ask", "reload"),
                      ("apply", _nat(new))]
