"""End to end: mode "offload" with ``offload_scheduler = "kernel"``: nfqlb writes the policy's
choices into nftables in advance and the kernel plays them, so no packet of a new flow is
queued (real nginx, curl and UDP clients in the lab's namespaces).

- New flows spread as round_robin (weighted_round_robin: by weight) would, IPv4 and IPv6,
  TCP and UDP, with nothing queued; the per-backend flows come from the kernel's counters.
- A health check that fails, ``nfqlb ctl drain`` and ``weight`` rewrite the schedule at once:
  the next new flows avoid the backend, an open connection to a drained one goes on.
- With no backend up the schedule is empty and the offload queue answers (a RST), and a
  segment that is not a bare SYN is an unknown flow as with nfqlb deciding.
- A reload that turns the scheduler on takes new flows off the queue; the table and every
  rule are gone after exit.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from ipaddress import ip_address
from typing import Any

import pytest
from lab import (
    CLIENT_ADDR,
    HTTP_PORT,
    UDP_PORT,
    VIP,
    VIP6,
    Lab,
    LabError,
    Nfqlb,
    render_config,
)
from test_e2e_offload_root import (
    Holder,
    conntrack_entries,
    named,
    offload_packets,
    status,
    wait_for,
)
from test_e2e_offload_root import labels as plain_labels

pytestmark = pytest.mark.root

REQUESTS = 8  # (as labels' default)
KERNEL = {"offload_scheduler": "kernel"}


def labels(lab: Lab, family: int = 4, n: int = REQUESTS) -> list[str]:
    """``labels`` of test_e2e_offload_root; a failed request comes with what the balancer's
    kernel held then (conntrack, the schedule's table with its counters, the nat rules)."""
    try:
        return plain_labels(lab, family, n)
    except LabError as exc:
        state = []
        for argv in (["cat", "/proc/net/nf_conntrack"], ["nft", "list", "ruleset"],
                     ["iptables-save", "-c", "-t", "nat"], ["iptables-save", "-c", "-t", "mangle"]):
            out = lab.exec(lab.lb, argv, check=False)
            state.append(f"--- {' '.join(argv)}\n{out.stdout.decode(errors='replace')}"
                         f"{out.stderr.decode(errors='replace')}")
        raise LabError(f"{exc}\n" + "\n".join(state)) from None


def written(d: Nfqlb, name: str) -> bool:
    note = status(d)["services"][name].get("offload", {}).get("schedule", {})
    return note.get("written") is True


def flows(d: Nfqlb, name: str) -> dict[str, int]:
    return {b: f["flows"] for b, f in status(d)["services"][name]["backends"].items()}


def nft_tables(lab: Lab) -> str:
    return lab.exec(lab.lb, ["nft", "list", "tables"]).stdout.decode()


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_flows_spread_by_the_kernel_with_nothing_queued(family: int) -> None:
    with Lab(2, ipv6=family == 6) as lab:
        before = lab.iptables_save(lab.lb)
        tables = nft_tables(lab)
        d = lab.nfqlb(named(lab, lab.service("offload", name="web", family=family, **KERNEL)))
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            seen = labels(lab, family)
            queued = offload_packets(d)
            expected = collections.Counter(seen)
            wait_for(lambda: flows(d, "web") == dict(expected), 10,
                     f"the kernel's counts {dict(expected)} in the status", d)
            text = d.cli("status").stdout
        assert expected == {"backend-1": REQUESTS // 2, "backend-2": REQUESTS // 2}, d.report()
        assert queued == 0, d.report()  # no packet of these flows reached nfqlb
        assert "new flows placed by the kernel's schedule (2520 slots, written" in text, text
        assert d.returncode == 0, d.report()
        assert lab.iptables_save(lab.lb) == before  # every rule gone, tables too
        assert nft_tables(lab) == tables  # and nfqlb's nftables table


def test_udp_flows_spread_by_the_kernel() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(lab.service("offload", name="dns", protocol="udp", **KERNEL))
        with d:
            wait_for(lambda: written(d, "dns"), 10, "the schedule written", d)
            replies = lab.udp_exchange(lab.client, VIP, UDP_PORT,
                                       [b"a%d" % i for i in range(REQUESTS)],
                                       new_socket_each=True)
            queued = offload_packets(d)
        assert all(r is not None for r in replies), d.report()
        got = collections.Counter(r.label for r in replies if r is not None)
        assert got == {"backend-1": REQUESTS // 2, "backend-2": REQUESTS // 2}
        assert queued == 0, d.report()


def test_weighted_round_robin_schedule_follows_the_weights() -> None:
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", name="web", policy="weighted_round_robin",
                                     **KERNEL))
        svc["backend"][0]["weight"] = 3
        d = lab.nfqlb(svc)
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            seen = labels(lab)
            done = d.cli("ctl", "weight", "web", "backend-1", "1")
            assert done.returncode == 0, done.stderr
            after = labels(lab, n=4)  # equal shares from now on (ctl waited for the schedule)
            queued = offload_packets(d)
        assert collections.Counter(seen) == {"backend-1": 6, "backend-2": 2}, d.report()
        assert collections.Counter(after) == {"backend-1": 2, "backend-2": 2}, d.report()
        assert queued == 0


def test_drain_rewrites_the_schedule_and_keeps_an_open_connection() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="web", **KERNEL)))
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            holder = Holder(lab, VIP)
            first = holder.first(d)
            done = d.cli("ctl", "drain", "web", first)
            assert done.returncode == 0, done.stderr
            assert "not written yet" not in done.stderr, done.stderr
            assert written(d, "web")  # ctl returned once the kernel's schedule held the drain
            seen = labels(lab)
            after = holder.second(d)
            d.cli("ctl", "enable", "web", first)
            wait_for(lambda: written(d, "web"), 10, "the schedule written again", d)
            again = labels(lab, n=4)
            queued = offload_packets(d)
        assert first not in seen and len(seen) == REQUESTS, seen
        assert after.get("second") == first, after
        assert sorted(set(again)) == ["backend-1", "backend-2"], again
        assert queued == 0


def test_health_down_empties_the_backend_from_the_schedule_and_no_backend_goes_to_the_queue(
        ) -> None:
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", name="web", on_backend_down="reset", health={
            "kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2, "fall": 1,
            "rise": 1}, **KERNEL))
        d = lab.nfqlb(svc)
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            holder = Holder(lab, VIP)
            first = holder.first(d)
            host = lab.backend(first)
            other = next(h for h in lab.backends if h is not host)
            lab.set_unhealthy(host, True)
            wait_for(lambda: status(d)["services"]["web"]["backends"][first]["state"]
                     == "down", 10, "the backend down", d)
            wait_for(lambda: conntrack_entries(lab, VIP, host.addr(4)) == 0, 10,
                     "its conntrack entries removed", d)
            seen = labels(lab)
            broken = holder.second(d)
            queued_up = offload_packets(d)
            # every backend down: nothing to schedule; the queue answers each SYN with a RST
            lab.set_unhealthy(other, True)
            wait_for(lambda: status(d)["services"]["web"]["backends"][other.label]["state"]
                     == "down", 10, "the other backend down", d)
            t0 = time.monotonic()
            with pytest.raises(LabError):
                lab.curl(lab.client, f"http://{VIP}/", max_time=3)
            refused_in = time.monotonic() - t0
            queued_down = offload_packets(d)
            refused = status(d)["services"]["web"]
            lab.set_unhealthy(host, False)
            lab.set_unhealthy(other, False)
            wait_for(lambda: all(b["state"] == "up" for b in
                                 status(d)["services"]["web"]["backends"].values())
                     and written(d, "web"), 10, "both backends up again, in the schedule", d)
            back = labels(lab, n=4)
        assert first not in seen and len(seen) == REQUESTS, seen
        assert "second_error" in broken, broken
        # one packet queued: the broken connection's next segment (its conntrack entry gone,
        # an unknown flow, answered with a RST); none of the new flows
        assert queued_up == 1, d.report()
        assert queued_down >= 1 and refused_in < 2, (queued_down, refused_in, d.report())
        assert refused["no_backend_up"] >= 1, refused
        assert sorted(set(back)) == ["backend-1", "backend-2"], back


def test_a_segment_that_is_not_a_syn_goes_to_the_queue_as_an_unknown_flow() -> None:
    """The schedule marks only a bare SYN: an ACK of no connection (conntrack picks it up as
    NEW) reaches nfqlb, which answers it with a RST (unknown_flow = "reset")."""
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="web", **KERNEL)))
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            script = (
                "from scapy.all import IP, TCP, sr1, conf\n"
                "conf.verb = 0\n"
                f"r = sr1(IP(dst='{VIP}')/TCP(sport=40001, dport=80, flags='A', seq=1, ack=1),"
                " timeout=2)\n"
                "print('RST' if r is not None and r[TCP].flags & 4 else 'none')\n")
            out = lab.exec(lab.client, [sys.executable, "-c", script], check=False)
            queued = offload_packets(d)
        assert out.stdout.decode().strip() == "RST", out
        assert queued == 1, d.report()


def test_reload_turns_the_kernel_scheduler_on_and_off() -> None:
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", name="web"))
        d = lab.nfqlb(svc)
        with d:
            labels(lab, n=2)
            assert offload_packets(d) == 2
            d.config_path.write_text(render_config([{**svc, **KERNEL}],
                                                   {"queue": d.queue, "bypass": True}))
            done = d.cli("ctl", "reload")
            assert done.returncode == 0, done.stdout + done.stderr
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            on = labels(lab)
            queued_on = offload_packets(d)
            d.config_path.write_text(render_config([svc], {"queue": d.queue, "bypass": True}))
            done = d.cli("ctl", "reload")
            assert done.returncode == 0, done.stdout + done.stderr
            off = labels(lab, n=2)
            queued_off = offload_packets(d)
        assert sorted(set(on)) == ["backend-1", "backend-2"], on
        assert queued_on == 2, d.report()
        assert queued_off == 4, d.report()
        assert len(off) == 2


def test_reload_renumbering_marks_keeps_the_schedule_on_the_right_backends() -> None:
    """The schedule's elements name each backend's chain by its address and port, and the
    chain sets the backend's mark as the rules number it now: right after a reload that
    renumbers every mark (before the map is written again) a new flow still reaches the
    backend its slot names, and open connections stay where they are."""
    with Lab(2, ipv6=False) as lab:
        svc = named(lab, lab.service("offload", name="web", **KERNEL))
        d = lab.nfqlb(svc)
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            holders = [Holder(lab, VIP) for _ in range(2)]
            firsts = [h.first(d) for h in holders]
            other = named(lab, lab.service("offload", name="other", port=81, **KERNEL))
            svc["backend"].reverse()
            d.config_path.write_text(render_config([other, svc],
                                                   {"queue": d.queue, "bypass": True}))
            done = d.cli("ctl", "reload")
            assert done.returncode == 0, done.stdout + done.stderr
            seen = labels(lab)
            afters = [h.second(d) for h in holders]
            wait_for(lambda: written(d, "web") and written(d, "other"), 10,
                     "both schedules written", d)
            port81 = [lab.curl(lab.client, f"http://{VIP}:81/").decode().strip()
                      for _ in range(4)]
            queued = offload_packets(d)
        assert sorted(firsts) == ["backend-1", "backend-2"]
        assert [a.get("second") for a in afters] == firsts, afters
        assert collections.Counter(seen) == {"backend-1": REQUESTS // 2,
                                             "backend-2": REQUESTS // 2}, d.report()
        assert sorted(set(port81)) == ["backend-1", "backend-2"], port81
        assert queued == 0, d.report()


def test_a_table_made_anew_gets_its_schedule_back() -> None:
    """``nft delete table`` then ``nfqlb rules --apply`` (the table comes back with empty
    maps): new flows go to the offload queue meanwhile, and the map is written again once
    the rules watch sees the table's new handle (every RULES_CHECK_S), long before the
    slow rewrite every REWRITE_EVERY_S."""
    from nfqlb.io.node import RULES_CHECK_S
    from nfqlb.io.schedules import REWRITE_EVERY_S

    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="web", **KERNEL)))
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            lab.exec(lab.lb, ["nft", "delete", "table", "ip", f"nfqlb-{d.queue}"])
            applied = lab.exec(lab.lb, [sys.executable, "-m", "nfqlb", "rules", "--apply",
                                        "--config", str(d.config_path)], check=False)
            assert applied.returncode == 0, applied
            t0 = time.monotonic()
            meanwhile = labels(lab, n=2)  # through the queue (unless the watch was quicker)
            queued = offload_packets(d)

            def scheduled() -> bool:
                text = lab.exec(lab.lb, ["nft", "list", "table", "ip",
                                         f"nfqlb-{d.queue}"]).stdout.decode()
                return "elements = {" in text

            wait_for(scheduled, 2 * RULES_CHECK_S + 3, "the map written again", d)
            took = time.monotonic() - t0
            after = labels(lab, n=4)
            queued_after = offload_packets(d)
        assert len(meanwhile) == 2 and queued <= 2, d.report()
        assert took < REWRITE_EVERY_S / 2
        assert sorted(set(after)) == ["backend-1", "backend-2"] and queued_after == queued, \
            d.report()


def client_addresses(lab: Lab, n: int) -> list[str]:
    """``n`` more addresses on the client's interface (its /24, which the balancer routes)."""
    shown = lab.exec(lab.client, ["ip", "-o", "-4", "addr", "show"]).stdout.decode()
    dev = next(line.split()[1] for line in shown.splitlines() if f" {CLIENT_ADDR}/" in line)
    out = [f"198.18.0.{i}" for i in range(10, 10 + n)]
    for address in out:
        lab.exec(lab.client, ["ip", "addr", "add", f"{address}/24", "dev", dev])
    return out


def test_source_hash_by_jhash_sends_each_client_where_nfqlb_would() -> None:
    """``source_hash`` with ``hash = "jhash"``: the kernel hashes each client's address into
    the policy's slot table as nfqlb's own choice does (its jhash is the kernel's), so every
    client lands on the backend nfqlb predicts, always the same, with nothing queued; and a
    connection whose conntrack entry is gone (as after a move between ECMP nodes) is
    adopted (unknown_flow = "hash") on that same backend and goes on."""
    from nfqlb.policies import FlowKey, make_policy
    from nfqlb.values import Backend

    with Lab(2, ipv6=False) as lab:  # (two: the Holder knows backend-1 and backend-2)
        svc = named(lab, lab.service("offload", name="web", policy="source_hash",
                                     policy_options={"hash": "jhash"}, unknown_flow="hash",
                                     **KERNEL))
        clients = client_addresses(lab, 12)
        policy = make_policy("source_hash", tuple(
            Backend(name=h.label, address=ip_address(h.address), port=HTTP_PORT)
            for h in lab.backends), {"hash": "jhash"})
        want = {a: policy.choose(FlowKey(6, ip_address(a).packed, 0, ip_address(VIP), 80),
                                 0.0).name for a in clients}  # type: ignore[union-attr]
        d = lab.nfqlb(svc)
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            got = {a: {lab.curl(lab.client, f"http://{VIP}/", args=["--interface", a])
                       .decode().strip() for _ in range(2)} for a in clients}
            queued = offload_packets(d)
            holder = Holder(lab, VIP)
            first = holder.first(d)
            lab.exec(lab.lb, [sys.executable, "-c", "from pyroute2 import Conntrack\n"
                              "Conntrack().flush()"])
            after = holder.second(d)
            adopted = status(d)["events"].get("flow_adopted", 0)
        assert got == {a: {b} for a, b in want.items()}, (got, want)
        assert len(set(want.values())) > 1  # (the clients do spread)
        assert queued == 0, d.report()
        assert after.get("second") == first, (after, d.report())
        assert adopted >= 1, d.report()


def predicted(lab: Lab, policy: str, protocol: int, vip: str, port: int,
              peers: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The backend nfqlb's own ``policy`` (hash = "jhash") gives each client (address, port)
    of the service ``vip``:``port``."""
    from nfqlb.policies import FlowKey, make_policy
    from nfqlb.values import Backend

    family = 6 if ":" in vip else 4
    p = make_policy(policy, tuple(Backend(name=h.label, address=ip_address(h.addr(family)),
                                          port=0) for h in lab.backends), {"hash": "jhash"})
    out = {}
    for addr, sport in peers:
        chosen = p.choose(FlowKey(protocol, ip_address(addr).packed, sport, ip_address(vip),
                                  port), 0.0)
        assert chosen is not None
        out[(addr, sport)] = chosen.name
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_maglev_by_jhash_places_each_connection_where_nfqlb_would(family: int) -> None:
    """``maglev`` with ``hash = "jhash"`` (all five fields): the kernel hashes each
    connection's protocol, addresses and ports into the Maglev table nfqlb wrote, as
    nfqlb's own choice does: every connection reaches the backend nfqlb predicts from its
    client port, with nothing queued."""
    with Lab(2, ipv6=family == 6) as lab:
        vip = VIP if family == 4 else VIP6
        d = lab.nfqlb(named(lab, lab.service("offload", name="web", family=family,
                                             policy="maglev", policy_options={"hash": "jhash"},
                                             **KERNEL)))
        with d:
            wait_for(lambda: written(d, "web"), 10, "the schedule written", d)
            labels(lab, family, n=16)
            queued = offload_packets(d)
            note = status(d)["services"]["web"]["offload"]["schedule"]
        client = lab.client.addr(family)
        served = {(a, p): h.label for h in lab.backends for a, p, _ in lab.access_log(h)
                  if a == client}
        assert len(served) == 16, served
        assert served == predicted(lab, "maglev", 6, vip, 80, list(served))
        assert len(set(served.values())) == 2  # (16 connections do spread)
        assert queued == 0, d.report()
        assert note["slots"] == 2521 and note["slot"].startswith("jhash meta l4proto . ip")


def test_flow_hash_by_jhash_places_each_udp_flow_where_nfqlb_would() -> None:
    with Lab(2, ipv6=False) as lab:
        d = lab.nfqlb(named(lab, lab.service("offload", name="dns", protocol="udp",
                                             policy="flow_hash",
                                             policy_options={"hash": "jhash"}, **KERNEL)))
        with d:
            wait_for(lambda: written(d, "dns"), 10, "the schedule written", d)
            replies = lab.udp_exchange(lab.client, VIP, UDP_PORT,
                                       [b"a%d" % i for i in range(12)], new_socket_each=True)
            queued = offload_packets(d)
        assert all(r is not None for r in replies), d.report()
        got = {(CLIENT_ADDR, r.client_port): r.label for r in replies if r is not None}
        assert got == predicted(lab, "flow_hash", 17, VIP, UDP_PORT, list(got))
        assert queued == 0, d.report()


def test_nfqlb_check_refuses_a_policy_without_a_schedule(tmp_path: Any) -> None:
    config = tmp_path / "nfqlb.toml"
    config.write_text(render_config([{
        "name": "web", "vip": VIP, "port": 80, "mode": "offload", "policy": "maglev",
        "offload_scheduler": "kernel",
        "backend": [{"address": "198.18.2.1", "port": 80}]}], {}))
    done = subprocess.run([sys.executable, "-m", "nfqlb", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "service[0].policy" in done.stderr and "schedule()" in done.stderr, done
