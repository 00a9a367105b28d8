"""Rendering nfqlb's iptables rules, and planning their removal from an iptables-save dump.

Everything here is text in, text out (no root), except the last tests (marked ``root``), which
feed the rendered rules to the real iptables-restore in a fresh network namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nfqlb import rules
from nfqlb.config import Config, parse_config
from nfqlb.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def make_config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": {"queue": 1, **daemon}, "service": list(services)}, "t.toml")


FULLNAT = {
    "name": "web", "vip": "198.18.0.10", "port": 80, "mode": "fullnat",
    "snat_address": "198.18.1.1", "snat_ports": "20000-29999",
    "backend": [{"address": "198.18.1.10", "port": 8080},
                {"address": "198.18.1.11", "port": 8081}],
}
DNAT = {
    "name": "dns", "vip": "198.18.0.10", "port": 53, "protocol": "udp", "mode": "dnat",
    "backend": [{"address": "198.18.1.20", "port": 53}, {"address": "198.18.1.21", "port": 5353}],
}
LOCAL = {
    "name": "admin", "vip": "198.18.0.10", "port": 443, "mode": "local",
    "backend": [{"port": 8443}, {"address": "198.18.0.10", "port": 9443}],
}
QUEUE_CHAIN = ["-A NFQLB-Q-1 -j CT --notrack",
               "-A NFQLB-Q-1 -m length --length 3961:65535 -j NFQUEUE --queue-num 10001 "
               "--queue-bypass",
               "-A NFQLB-Q-1 -j NFQUEUE --queue-num 1 --queue-bypass"]
FRAG4 = '-m u32 --u32 "0x4&0x3fff=0x1:0x3fff"'
ICMP4 = [f"-A NFQLB-{chain}-1 -p icmp --icmp-type {t} -j NFQLB-ERR-1"
         for chain in ("PRE", "OUT") for t in (3, 11, 12)]
QUEUE_CHAIN += ICMP4
JUMPS = ("-I PREROUTING -j NFQLB-PRE-1", "-I OUTPUT -j NFQLB-OUT-1")
#: QUEUE_CHAIN with the headers route (daemon.bulk = "headers", any TCP service)
HEADERS_CHAIN = QUEUE_CHAIN[:1] + [
    "-A NFQLB-Q-1 -m mark --mark 0x10/0xff0 -j NFQUEUE --queue-num 10001 --queue-bypass",
    "-A NFQLB-Q-1 -p tcp -m length --length 3961:65535 -j NFQUEUE --queue-num 30001 "
    "--queue-bypass"] + QUEUE_CHAIN[1:]


def without_quotes(rs: rules.RuleSet) -> list[str]:
    """The rules, without the ICMP-quote rules of NFQLB-ERR-<q> (tested on their own)."""
    return [r for r in rs.rules if not r.startswith("-A NFQLB-ERR-")]


def only(config: Config, queue: int | None = None) -> rules.RuleSet:
    sets = rules.render(config, queue)
    assert len(sets) == 1
    return sets[0]


def test_fullnat_forward_in_both_chains_and_replies_from_each_backend_to_the_pool() -> None:
    rs = only(make_config(FULLNAT))
    assert rs.family.iptables == "iptables"
    assert without_quotes(rs) == HEADERS_CHAIN + [
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p tcp --dport 80 -g NFQLB-Q-1",
        "-A NFQLB-OUT-1 -d 198.18.0.10/32 -p tcp --dport 80 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p tcp " + FRAG4 + " -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.10/32 -d 198.18.1.1/32 -p tcp --sport 8080 "
        "--dport 20000:29999 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.10/32 -d 198.18.1.1/32 -p tcp " + FRAG4 + " -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.11/32 -d 198.18.1.1/32 -p tcp --sport 8081 "
        "--dport 20000:29999 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.11/32 -d 198.18.1.1/32 -p tcp " + FRAG4 + " -g NFQLB-Q-1",
    ]
    assert rs.jumps == JUMPS
    assert "# service web: 198.18.0.10:80/tcp fullnat, 2 backends" in rs.body


def test_dnat_replies_match_each_backend_address_and_port_in_prerouting() -> None:
    rs = only(make_config(DNAT))
    assert without_quotes(rs) == QUEUE_CHAIN + [
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p udp --dport 53 -g NFQLB-Q-1",
        "-A NFQLB-OUT-1 -d 198.18.0.10/32 -p udp --dport 53 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p udp " + FRAG4 + " -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.20/32 -p udp --sport 53 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.20/32 -p udp " + FRAG4 + " -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.21/32 -p udp --sport 5353 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -s 198.18.1.21/32 -p udp " + FRAG4 + " -g NFQLB-Q-1",
    ]


def test_local_replies_leave_through_output_with_source_only_when_given() -> None:
    rs = only(make_config(LOCAL))
    assert without_quotes(rs) == HEADERS_CHAIN + [
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p tcp --dport 443 -g NFQLB-Q-1",
        "-A NFQLB-OUT-1 -d 198.18.0.10/32 -p tcp --dport 443 -g NFQLB-Q-1",
        "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p tcp " + FRAG4 + " -g NFQLB-Q-1",
        "-A NFQLB-OUT-1 -p tcp --sport 8443 -g NFQLB-Q-1",
        "-A NFQLB-OUT-1 -s 198.18.0.10/32 -p tcp --sport 9443 -g NFQLB-Q-1",
    ]


def test_echo_drop_adds_one_drop_per_vip_and_family() -> None:
    v6 = {"name": "v6", "vip": "2001:db8::10", "port": 80, "mode": "dnat",
          "backend": [{"address": "2001:db8:1::10", "port": 8080}]}
    sets = rules.render(make_config(FULLNAT, DNAT, v6, icmp_echo="drop"))
    v4, six = sets
    drops4 = [r for r in v4.rules if r.endswith("-j DROP")]
    assert drops4 == ["-A NFQLB-PRE-1 -d 198.18.0.10/32 -p icmp --icmp-type 8 -j DROP",
                      "-A NFQLB-OUT-1 -d 198.18.0.10/32 -p icmp --icmp-type 8 -j DROP"]
    assert [r for r in six.rules if r.endswith("-j DROP")] == [
        "-A NFQLB-PRE-1 -d 2001:db8::10/128 -p ipv6-icmp --icmpv6-type 128 -j DROP",
        "-A NFQLB-OUT-1 -d 2001:db8::10/128 -p ipv6-icmp --icmpv6-type 128 -j DROP"]
    assert "-A NFQLB-PRE-1 -d 2001:db8::10/128 -p tcp -m frag -g NFQLB-Q-1" in six.rules
    assert "-A NFQLB-PRE-1 -p ipv6-icmp --icmpv6-type 2 -j NFQLB-ERR-1" in six.rules
    assert not any(r.endswith("-j DROP") for r in only(make_config(FULLNAT)).rules)


def test_no_bypass_and_queue_override_name_the_chains() -> None:
    rs = only(make_config(DNAT, bypass=False), queue=7)
    assert rs.chains == rules.Chains("NFQLB-PRE-7", "NFQLB-OUT-7", "NFQLB-ERR-7",
                                        "NFQLB-Q-7")
    assert rs.rules[:3] == ("-A NFQLB-Q-7 -j CT --notrack",
                            "-A NFQLB-Q-7 -m length --length 3961:65535 -j NFQUEUE "
                            "--queue-num 10007",
                            "-A NFQLB-Q-7 -j NFQUEUE --queue-num 7")
    assert all("--queue-bypass" not in r and "NFQLB-PRE-1" not in r for r in rs.rules)
    assert only(make_config(DNAT, queue=9)).chains.pre == "NFQLB-PRE-9"


def test_packets_the_binding_cannot_carry_go_to_the_large_queue_first() -> None:
    """After CT --notrack, before the normal queue; its number follows the queue served."""
    assert rules.BINDING_MAX_PACKET + 1 == 3961 <= 4016  # what NetfilterQueue carries whole
    rs = only(make_config(DNAT, queue=5, large_queue=700))
    assert rs.large_queue == 700
    assert rs.rules[:3] == ("-A NFQLB-Q-5 -j CT --notrack",
                            "-A NFQLB-Q-5 -m length --length 3961:65535 -j NFQUEUE "
                            "--queue-num 700 --queue-bypass",
                            "-A NFQLB-Q-5 -j NFQUEUE --queue-num 5 --queue-bypass")
    # default: queue + 10000 of the queue served, also when --queue overrides daemon.queue
    assert only(make_config(DNAT, queue=5)).large_queue == 10005
    assert only(make_config(DNAT, queue=5), queue=8).large_queue == 10008
    assert only(make_config(DNAT, queue=60000)).large_queue == (60000 + 10000) % 65536
    assert only(make_config(DNAT, large_queue=700), queue=8).large_queue == 700
    assert rules.large_queue_for(make_config(DNAT, queue=5)) == 10005
    with pytest.raises(ConfigError, match="daemon.large_queue: must differ from the queue "
                                          "served \\(700\\)"):
        rules.render(make_config(DNAT, large_queue=700), 700)


def test_ipv6_services_render_into_a_separate_ip6tables_set() -> None:
    v6 = {"name": "v6", "vip": "2001:db8::10", "port": 80, "mode": "dnat",
          "backend": [{"address": "2001:db8:1::10", "port": 8080}]}
    v4, six = rules.render(make_config(DNAT, v6))
    assert (v4.family.version, six.family.version) == (4, 6)
    assert six.family.restore == "ip6tables-restore"
    assert not any("2001:db8" in r for r in v4.rules)
    assert "-A NFQLB-PRE-1 -d 2001:db8::10/128 -p tcp --dport 80 -g NFQLB-Q-1" in six.rules
    assert "-A NFQLB-PRE-1 -s 2001:db8:1::10/128 -p tcp --sport 8080 -g NFQLB-Q-1" in six.rules
    assert "# service v6: [2001:db8::10]:80/tcp dnat, 1 backend" in six.body
    assert [rs.family.version for rs in rules.render(make_config(v6))] == [6]


def test_a_backend_shared_by_two_services_gets_its_reply_rule_once() -> None:
    other = {**DNAT, "name": "dns2", "port": 54}
    rs = only(make_config(DNAT, other))
    reply = "-A NFQLB-PRE-1 -s 198.18.1.20/32 -p udp --sport 53 -g NFQLB-Q-1"
    assert rs.rules.count(reply) == 1
    assert "-A NFQLB-PRE-1 -d 198.18.0.10/32 -p udp --dport 54 -g NFQLB-Q-1" in rs.rules


def test_restore_text_declares_chains_then_rules_then_missing_jumps() -> None:
    rs = only(make_config(FULLNAT))
    text = rules.format_restore(rs, None, header=["hello"])
    lines = text.splitlines()
    assert lines[:6] == ["# hello", "*raw", ":NFQLB-PRE-1 - [0:0]", ":NFQLB-OUT-1 - [0:0]",
                         ":NFQLB-ERR-1 - [0:0]", ":NFQLB-Q-1 - [0:0]"]
    assert lines[-3:] == [*JUMPS, "COMMIT"]
    assert text.endswith("COMMIT\n")
    saved = rules.parse_save(SAVED_WITH_NFQLB)
    again = rules.format_restore(rs, saved).splitlines()
    assert not any(line.startswith("-I ") for line in again)  # the jumps are there already
    assert rules.format_restore(rs, saved, all_jumps=True).splitlines()[-3:-1] == list(JUMPS)


SAVED_WITH_NFQLB = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 07:10:46 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j NFQLB-Q-1
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFQLB-OUT-1 - [0:0]
:NFQLB-PRE-1 - [0:0]
:NFQLB-Q-1 - [0:0]
:NFQLB-PRE-2 - [0:0]
:MINE - [0:0]
-A PREROUTING -j NFQLB-PRE-1
-A PREROUTING -p udp -m udp --dport 9 -j MINE
-A PREROUTING -j NFQLB-PRE-2
-A OUTPUT -j NFQLB-OUT-1
-A MINE -g NFQLB-Q-1
-A NFQLB-PRE-1 -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -g NFQLB-Q-1
-A NFQLB-Q-1 -j CT --notrack
-A NFQLB-Q-1 -m length --length 3961:65535 -j NFQUEUE --queue-num 10001 --queue-bypass
-A NFQLB-Q-1 -j NFQUEUE --queue-num 1 --queue-bypass
COMMIT
# Completed on Thu Nov 26 07:10:46 2026
"""


def test_parse_save_reads_one_table_and_tells_absent_from_empty() -> None:
    raw = rules.parse_save(SAVED_WITH_NFQLB)
    assert raw is not None
    assert raw.chains["PREROUTING"] == "ACCEPT" and raw.chains["NFQLB-Q-1"] == "-"
    assert "-A INPUT -j NFQLB-Q-1" not in raw.rules  # that one is in *filter
    assert raw.rules[0] == "-A PREROUTING -j NFQLB-PRE-1"
    assert not raw.is_empty
    assert rules.parse_save("") is None
    assert rules.parse_save("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n") is None
    empty = rules.parse_save("*raw\n:PREROUTING ACCEPT [5:300]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    assert empty is not None and empty.is_empty
    dropping = rules.parse_save("*raw\n:PREROUTING DROP [0:0]\nCOMMIT\n")
    assert dropping is not None and not dropping.is_empty


def test_plan_delete_removes_jumps_into_the_queue_chains_and_the_chains_only() -> None:
    plan = rules.plan_delete(1, rules.parse_save(SAVED_WITH_NFQLB))
    assert plan is not None
    assert plan.splitlines() == [
        "*raw",
        "-D PREROUTING -j NFQLB-PRE-1",
        "-D OUTPUT -j NFQLB-OUT-1",
        "-D MINE -g NFQLB-Q-1",  # someone else's jump into our chain would block -X
        "-F NFQLB-PRE-1", "-F NFQLB-OUT-1", "-F NFQLB-Q-1",
        "-X NFQLB-PRE-1", "-X NFQLB-OUT-1", "-X NFQLB-Q-1",
        "COMMIT",
    ]
    # queue 2 has a chain and a jump only; queue 3 nothing at all
    plan2 = rules.plan_delete(2, rules.parse_save(SAVED_WITH_NFQLB))
    assert plan2 == "*raw\n-D PREROUTING -j NFQLB-PRE-2\n-F NFQLB-PRE-2\n-X NFQLB-PRE-2\nCOMMIT\n"
    assert rules.plan_delete(3, rules.parse_save(SAVED_WITH_NFQLB)) is None
    assert rules.plan_delete(1, None) is None


def test_templates_are_installed_with_the_package_and_are_the_repository_files() -> None:
    names = sorted(p.name for p in (REPO / "rules").glob("*.rules"))
    assert names == ["bulk.rules", "echo-drop.rules", "forward.rules", "health.rules",
                     "icmp-quote.rules",
                     "icmp.rules",
                     "jumps.rules", "offload-jumps.rules", "offload-nat.rules",
                     "offload-snat.rules", "offload-table.rules", "offload.rules",
                     "queue.rules", "reply-dnat.rules", "reply-fullnat.rules",
                     "reply-local.rules", "table.rules", "workers.rules"]
    from importlib import resources
    pkg = resources.files("nfqlb").joinpath(rules.TEMPLATE_DIR)
    for name in names:
        assert pkg.joinpath(name).read_text() == (REPO / "rules" / name).read_text()


# -- the real iptables-restore, in a namespace of our own --------------------------------------


def _ns_run(ns: str, *argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def _save(ns: str, tool: str = "iptables-save") -> str:
    return "".join(line + "\n" for line in _ns_run(ns, tool).splitlines()
                   if not line.startswith("#"))


@pytest.fixture
def netns() -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and iptables")
    name = f"nfqlbt-{os.getpid()}-rules"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {proc.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.root
def test_apply_twice_then_delete_twice_in_a_namespace(netns: str, tmp_path: Path) -> None:
    """The real kernel accepts every rule kind; apply is idempotent, delete restores exactly."""
    v6 = {"name": "v6", "vip": "2001:db8::10", "port": 80, "mode": "fullnat",
          "snat_address": "2001:db8:1::1", "snat_ports": "20000-29999",
          "backend": [{"address": "2001:db8:1::10", "port": 8080}]}
    config_path = tmp_path / "all.toml"
    config_path.write_text(_toml(make_config(FULLNAT, DNAT, LOCAL, v6, icmp_echo="drop")))
    nfqlb_rules = [sys.executable, "-m", "nfqlb", "rules", "--config", str(config_path)]
    before = (_save(netns), _save(netns, "ip6tables-save"))

    _ns_run(netns, *nfqlb_rules, "--apply")
    once = _save(netns)
    _ns_run(netns, *nfqlb_rules, "--apply")
    assert _save(netns) == once
    assert once.count("-j NFQLB-PRE-1") == 1 and once.count("-j NFQLB-OUT-1") == 1
    v6_rules = [r for r in _save(netns, "ip6tables-save").splitlines() if "NFQLB" in r]
    assert "-A NFQLB-PRE-1 -d 2001:db8::10/128 -p tcp -m frag -g NFQLB-Q-1" in v6_rules
    assert sum("-j DROP" in r for r in v6_rules) == 2
    rendered = rules.render(make_config(FULLNAT, DNAT, LOCAL, icmp_echo="drop"))[0]
    # iptables-save writes u32 numbers in hex: the quote rules are counted, not compared
    quotes = [r for r in once.splitlines() if r.startswith("-A NFQLB-ERR-1 -m u32")]
    assert len(quotes) == len(rendered.rules) - len(without_quotes(rendered))
    for rule in without_quotes(rendered):
        # iptables-save adds the implicit "-m tcp"/"-m udp"/"-m icmp" after "-p" when a
        # match of that protocol's own is used
        shown = rule if "port" not in rule and "icmp-type" not in rule else (
            rule.replace("-p tcp", "-p tcp -m tcp").replace("-p udp", "-p udp -m udp")
            .replace("-p icmp", "-p icmp -m icmp"))
        assert shown in once.splitlines()

    _ns_run(netns, *nfqlb_rules, "--delete")
    assert (_save(netns), _save(netns, "ip6tables-save")) == before
    _ns_run(netns, *nfqlb_rules, "--delete")  # nothing left to delete: still success
    assert (_save(netns), _save(netns, "ip6tables-save")) == before


def _toml(config: Config) -> str:
    """Enough TOML to write ``config`` back (for the CLI in the namespace)."""
    out = [f"[daemon]\nqueue = {config.daemon.queue}\n"
           f'icmp_echo = "{config.daemon.icmp_echo.value}"\n']
    for s in config.services:
        out.append(f'[[service]]\nname = "{s.name}"\nvip = "{s.vip}"\nport = {s.port}\n'
                   f'protocol = "{s.protocol.name.lower()}"\nmode = "{s.mode.value}"\n')
        if s.snat_address is not None and s.snat_ports is not None:
            out.append(f'snat_address = "{s.snat_address}"\n'
                       f'snat_ports = "{s.snat_ports[0]}-{s.snat_ports[1]}"\n')
        for b in s.backends:
            out.append("[[service.backend]]\n" + (f'address = "{b.address}"\n' if b.address else "")
                       + f"port = {b.port}\n")
    return "".join(out)


@pytest.mark.root
def test_following_the_print_hint_twice_installs_what_apply_does(netns: str,
                                                                tmp_path: Path) -> None:
    """issue 9: ``rules --print`` text restored twice with --noflush, and its jump commands
    run twice, give each rule once: exactly what ``rules --apply`` installs."""
    config_path = tmp_path / "all.toml"
    config_path.write_text(_toml(make_config(FULLNAT, DNAT, LOCAL, icmp_echo="drop")))
    nfqlb_rules = [sys.executable, "-m", "nfqlb", "rules", "--config", str(config_path)]
    printed = _ns_run(netns, *nfqlb_rules, "--print")
    assert "# --- rules/forward.rules ---" in printed  # the templates' comments are kept
    commands = [line[4:] for line in printed.splitlines() if line.startswith("#   iptables ")]
    assert len(commands) == 2
    before = _save(netns)
    for _ in range(2):
        _ns_run(netns, "iptables-restore", "-w", "--noflush", stdin=printed)
        for command in commands:
            _ns_run(netns, "sh", "-c", command)
    by_hand = _save(netns)
    rules_lines = [line for line in by_hand.splitlines() if line.startswith("-A ")]
    assert len(rules_lines) == len(set(rules_lines)), by_hand
    assert by_hand.count("-A PREROUTING -j NFQLB-PRE-1") == 1
    assert by_hand.count("-A OUTPUT -j NFQLB-OUT-1") == 1
    _ns_run(netns, *nfqlb_rules, "--delete")
    assert _save(netns) == before
    _ns_run(netns, *nfqlb_rules, "--apply")
    assert _save(netns) == by_hand
    _ns_run(netns, *nfqlb_rules, "--delete")
