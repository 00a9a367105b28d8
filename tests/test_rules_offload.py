"""Mode "offload"'s rules: conntrack NEW packets queued in mangle, DNAT/SNAT by mark in nat.

Text in, text out, except the last test (root), which gives the rendered rules to the real
iptables-restore in a fresh network namespace, twice, and removes them, twice.
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

OFFLOAD = {
    "name": "web", "vip": "198.18.0.10", "port": 80, "mode": "offload",
    "backend": [{"address": "198.18.1.10", "port": 8080},
                {"address": "198.18.1.11", "port": 8081}],
}
DNAT = {
    "name": "dns", "vip": "198.18.0.10", "port": 53, "protocol": "udp", "mode": "dnat",
    "backend": [{"address": "198.18.1.20", "port": 53}],
}
V6 = {
    "name": "v6", "vip": "2001:db8::10", "port": 53, "protocol": "udp", "mode": "offload",
    "snat_address": "2001:db8:1::1",
    "backend": [{"address": "2001:db8:1::10", "port": 5353}],
}
FIRST = "-m conntrack --ctstate NEW ! --ctstatus CONFIRMED"  # a flow's first packet
MANGLE_JUMPS = [("mangle", f"-I PREROUTING {FIRST} -j NFQLB-NEW-1"),
                ("mangle", f"-I OUTPUT {FIRST} -j NFQLB-NEW-1")]
NAT_JUMPS = [("nat", "-I PREROUTING -j NFQLB-DNAT-1"), ("nat", "-I OUTPUT -j NFQLB-DNAT-1"),
             ("nat", "-I POSTROUTING -j NFQLB-SNAT-1")]


def make_config(*services: dict[str, Any], **daemon: Any) -> Config:
    return parse_config({"daemon": {"queue": 1, **daemon}, "service": list(services)}, "t.toml")


def body(rs: rules.RuleSet, table: str) -> list[str]:
    return [line for line in dict(rs.offload)[table] if not line.startswith("#")]


def test_offload_queues_new_packets_in_mangle_and_dnats_by_mark_in_nat() -> None:
    [rs] = rules.render(make_config(OFFLOAD))
    assert body(rs, "mangle") == [
        "-A NFQLB-NEW-1 -d 198.18.0.10/32 -p tcp --dport 80 -j NFQUEUE --queue-num 20001 "
        "--queue-bypass"]
    assert body(rs, "nat") == [
        "-A NFQLB-DNAT-1 -d 198.18.0.10/32 -p tcp --dport 80 -m mark --mark "
        "0x100000/0xff00000 -j DNAT --to-destination 198.18.1.10:8080",
        "-A NFQLB-DNAT-1 -d 198.18.0.10/32 -p tcp --dport 80 -m mark --mark "
        "0x200000/0xff00000 -j DNAT --to-destination 198.18.1.11:8081"]
    assert list(rs.offload_jumps) == MANGLE_JUMPS + NAT_JUMPS
    # nothing of it in raw: no NOTRACK, no queue rule, no jump
    assert (rs.body, rs.jumps) == ((), ())
    assert rules.format_restore(rs) == ""


def test_snat_address_and_ipv6_and_a_mask_and_queue_of_ones_own() -> None:
    cfg = make_config(V6, offload_mark_mask=0xF0, offload_queue=7, bypass=False)
    [rs] = rules.render(cfg)
    assert rs.family.version == 6
    assert body(rs, "mangle") == [
        "-A NFQLB-NEW-1 -d 2001:db8::10/128 -p udp --dport 53 -j NFQUEUE --queue-num 7"]
    assert body(rs, "nat") == [
        "-A NFQLB-DNAT-1 -d 2001:db8::10/128 -p udp --dport 53 -m mark --mark 0x10/0xf0 "
        "-j DNAT --to-destination [2001:db8:1::10]:5353",
        "-A NFQLB-SNAT-1 -d 2001:db8:1::10/128 -p udp --dport 5353 -m mark --mark 0x10/0xf0 "
        "-j SNAT --to-source 2001:db8:1::1"]


def test_queue_override_moves_the_offload_queue_and_chains() -> None:
    [rs] = rules.render(make_config(OFFLOAD), queue=5)
    assert body(rs, "mangle")[0].startswith("-A NFQLB-NEW-5 ")
    assert "--queue-num 20005" in body(rs, "mangle")[0]
    assert all("NFQLB-DNAT-5" in line for line in body(rs, "nat"))


def test_a_mixed_config_keeps_other_modes_in_raw_and_offload_out_of_it() -> None:
    [rs] = rules.render(make_config(OFFLOAD, {**DNAT, "health": {"kind": "tcp", "port": 53}},
                                    {**OFFLOAD, "name": "w2", "port": 81,
                                     "health": {"kind": "tcp"}}))
    raw = "\n".join(rs.rules)
    assert "--dport 53" in raw and "--dport 80" not in raw and "--dport 81" not in raw
    assert "198.18.1.10" not in raw  # neither reply nor health-check rules for offload
    assert len(body(rs, "nat")) == 4


def test_restore_text_adds_only_missing_jumps_and_removes_offload_chains_when_gone() -> None:
    [rs] = rules.render(make_config(OFFLOAD))
    dump = ("*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:NFQLB-NEW-1 - [0:0]\n"
            "-A PREROUTING -m conntrack --ctstate NEW ! --ctstatus CONFIRMED -j NFQLB-NEW-1\n"
            "-A OUTPUT -m conntrack --ctstate NEW ! --ctstatus CONFIRMED -j NFQLB-NEW-1\nCOMMIT\n"
            "*nat\n:PREROUTING ACCEPT [0:0]\n:NFQLB-DNAT-1 - [0:0]\n:NFQLB-SNAT-1 - [0:0]\n"
            "-A PREROUTING -j NFQLB-DNAT-1\nCOMMIT\n")
    text = rules.format_offload(rs, dump)
    assert "-I PREROUTING -m conntrack" not in text  # there already
    assert "-I OUTPUT -j NFQLB-DNAT-1" in text and "-I POSTROUTING -j NFQLB-SNAT-1" in text
    assert "-I PREROUTING -j NFQLB-DNAT-1" not in text
    assert text.count(":NFQLB-NEW-1 - [0:0]") == 1  # declared: flushed, refilled
    [plain] = rules.render(make_config(DNAT))
    removal = rules.format_offload(plain, dump)
    assert removal.splitlines() == [
        "*mangle", f"-D PREROUTING {FIRST} -j NFQLB-NEW-1",
        f"-D OUTPUT {FIRST} -j NFQLB-NEW-1", "-F NFQLB-NEW-1",
        "-X NFQLB-NEW-1", "COMMIT", "*nat", "-D PREROUTING -j NFQLB-DNAT-1", "-F NFQLB-DNAT-1",
        "-F NFQLB-SNAT-1", "-X NFQLB-DNAT-1", "-X NFQLB-SNAT-1", "COMMIT"]
    assert rules.plan_delete_offload(2, dump) is None  # another queue's: not ours


def test_print_shows_the_offload_tables_and_the_jump_commands() -> None:
    [rs] = rules.render(make_config(OFFLOAD), comments=True)
    text = rules.format_print(rs, "t.toml")
    assert "# --- rules/offload.rules ---" in text
    assert "-j DNAT --to-destination 198.18.1.11:8081" in text
    assert "#   iptables -w -t nat -C POSTROUTING -j NFQLB-SNAT-1 2>/dev/null || " \
           "iptables -w -t nat -I POSTROUTING -j NFQLB-SNAT-1" in text
    assert "\n-I " not in text  # jumps only as commands


# ------------------------------------------------------------------ the real iptables


def _ns(ns: str, *argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          input=stdin, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def _saves(ns: str) -> tuple[str, str]:
    return tuple("".join(line + "\n" for line in _ns(ns, tool).splitlines()  # type: ignore
                         if not line.startswith("#"))
                 for tool in ("iptables-save", "ip6tables-save"))


@pytest.mark.root
def test_apply_twice_then_delete_twice_in_a_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and iptables")
    ns = f"nfqlbt-{os.getpid()}-offload"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("`ip netns add` does not work here")
    try:
        config = tmp_path / "c.toml"
        config.write_text(
            '[daemon]\nqueue = 1\n'
            '[[service]]\nname = "web"\nvip = "198.18.0.10"\nport = 80\nmode = "offload"\n'
            'snat_address = "198.18.1.1"\n'
            '[[service.backend]]\naddress = "198.18.1.10"\nport = 8080\n'
            '[[service]]\nname = "dns"\nvip = "198.18.0.10"\nport = 53\nprotocol = "udp"\n'
            'mode = "dnat"\n[[service.backend]]\naddress = "198.18.1.20"\nport = 53\n'
            '[[service]]\nname = "v6"\nvip = "2001:db8::10"\nport = 80\nmode = "offload"\n'
            '[[service.backend]]\naddress = "2001:db8:1::10"\nport = 8080\n')
        cli = [sys.executable, "-m", "nfqlb", "rules", "--config", str(config)]
        before = _saves(ns)
        _ns(ns, *cli, "--apply")
        once = _saves(ns)
        _ns(ns, *cli, "--apply")
        assert _saves(ns) == once
        v4, v6 = once
        assert v4.count("-j NFQLB-NEW-1") == 2 and v4.count("-j NFQLB-DNAT-1") == 2
        assert "-A NFQLB-DNAT-1 -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m mark --mark " \
               "0x100000/0xff00000 -j DNAT --to-destination 198.18.1.10:8080" in v4
        assert "-j SNAT --to-source 198.18.1.1" in v4
        assert "--to-destination [2001:db8:1::10]:8080" in v6
        assert "NFQLB-PRE-1" in v4 and "*raw" not in v6  # the v6 family is offload only
        _ns(ns, *cli, "--delete")
        assert _saves(ns) == before
        _ns(ns, *cli, "--delete")
        assert _saves(ns) == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_several_workers_spread_new_flows_over_their_offload_queues() -> None:
    """Each worker serves offload queue + its index; a first packet needs no other packet's
    state, so the kernel may spread them (--queue-balance over the workers' queues)."""
    [rs] = rules.render(make_config(OFFLOAD, workers=3))
    assert body(rs, "mangle") == [
        "-A NFQLB-NEW-1 -d 198.18.0.10/32 -p tcp --dport 80 -j NFQUEUE --queue-balance "
        "20001:20003 --queue-bypass"]


def test_offload_queues_of_several_workers_must_not_overlap_the_others() -> None:
    with pytest.raises(ConfigError, match="daemon.offload_queue.*overlap"):
        make_config(OFFLOAD, workers=3, offload_queue=3)
    with pytest.raises(ConfigError, match="daemon.offload_queue"):
        make_config(OFFLOAD, workers=3, offload_queue=65534)
    make_config(OFFLOAD, workers=3, offload_queue=100)  # clear of 1-3 and 10001-10003


OTHER = {**OFFLOAD, "name": "other", "port": 81}


def test_bridging_marks_dnat_by_both_numberings_while_workers_reload() -> None:
    """A reload that renumbers the marks (another service first, the backends swapped): the
    bridge DNATs by the new marks and by every old one the new rules do not match the same
    way; mangle and the jumps stay the running ones."""
    [old] = rules.render(make_config(OFFLOAD, workers=2))
    swapped = {**OFFLOAD, "backend": OFFLOAD["backend"][::-1]}
    [new] = rules.render(make_config(OTHER, swapped, workers=2))
    bridge = rules.bridging_marks(old, new)
    assert body(bridge, "nat") == body(new, "nat") + body(old, "nat")
    assert body(bridge, "mangle") == body(old, "mangle")
    assert (bridge.body, bridge.offload_jumps) == (old.body, old.offload_jumps)
    # the same marks, the backends swapped: the new rules alone (one match, one backend)
    [same] = rules.render(make_config(swapped, workers=2))
    assert body(rules.bridging_marks(old, same), "nat") == body(same, "nat")
    # nothing to bridge without offload on both sides
    [plain] = rules.render(make_config(DNAT, workers=2))
    assert rules.bridging_marks(old, plain) == old
    assert rules.bridging_marks(plain, new) == plain



def test_the_start_log_names_the_chains_that_hold_rules() -> None:
    """Offload's rules are in mangle and nat; raw is named only when a service is queued
    there (an offload-only daemon's start log named raw's empty chains)."""
    assert rules.placed(rules.render(make_config(OFFLOAD))) == \
        "rules in mangle NFQLB-NEW-1, nat NFQLB-DNAT-1"
    assert rules.placed(rules.render(make_config(DNAT))) == \
        "rules in raw NFQLB-PRE-1/NFQLB-OUT-1"
    assert rules.placed(rules.render(make_config(DNAT, OFFLOAD, V6))) == \
        "rules in raw NFQLB-PRE-1/NFQLB-OUT-1, mangle NFQLB-NEW-1, nat NFQLB-DNAT-1/NFQLB-SNAT-1"
