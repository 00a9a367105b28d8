"""What-if replay: ``nfqlb replay --config F --policy P [--policy Q] capture.pcap`` reports
per backend the flows, packets and bytes each policy would have produced."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import dpkt
import pytest
from helpers import CLIENT, VIP, tcp

from nfqlb import cli
from nfqlb.config import load_config
from nfqlb.errors import PolicyError
from nfqlb.replay import replay, with_policy

REPO = Path(__file__).resolve().parent.parent
FLOWS = 30
BACKENDS = {"b1": "198.18.1.2", "b2": "198.18.1.3", "b3": "198.18.1.4"}


def capture(path: Path, reply_from: str | None = None) -> int:
    """FLOWS TCP connections as seen on the client's side (replies from the VIP), or, with
    ``reply_from``, on a dnat backend's side with every reply from that backend. Returns the
    total bytes."""
    packets: list[bytes] = []
    for i in range(FLOWS):
        sport = 30000 + i
        body = b"x" * (10 * i)  # flows of different sizes

        def reply(flags: str, payload: bytes = b"", sport: int = sport) -> bytes:
            if reply_from is None:
                return tcp(VIP, CLIENT, 80, sport, flags, payload)
            return tcp(reply_from, CLIENT, 8080, sport, flags, payload)

        packets += [tcp(CLIENT, VIP, sport, 80, "S"), reply("SA"),
                    tcp(CLIENT, VIP, sport, 80, "A"), tcp(CLIENT, VIP, sport, 80, "PA", body),
                    reply("PA", body + body), tcp(CLIENT, VIP, sport, 80, "FA"), reply("FA"),
                    tcp(CLIENT, VIP, sport, 80, "A")]
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, linktype=101)
        for n, p in enumerate(packets):
            w.writepkt(p, 1_700_000_000 + n * 0.001)
    return sum(len(p) for p in packets)


def config(tmp_path: Path, policy: str = "round_robin", options: str = "") -> Path:
    cfg = tmp_path / "nfqlb.toml"
    text = (f'[[service]]\nname = "web"\nvip = "{VIP}"\nport = 80\nmode = "dnat"\n'
            f'policy = "{policy}"\n')
    if options:
        text += f"  [service.policy_options]\n  {options}\n"
    for name, addr in BACKENDS.items():
        text += f'  [[service.backend]]\n  name = "{name}"\n  address = "{addr}"\n  port = 8080\n'
    cfg.write_text(text)
    (tmp_path / "policies").mkdir(exist_ok=True)
    shutil.copy(REPO / "examples" / "policies" / "pin.py", tmp_path / "policies" / "pin.py")
    return cfg


def table(out: str) -> dict[str, list[int]]:
    """backend -> the numbers of its row (flows, packets, bytes for each policy)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(b\d)\s+([\d\s]+)$", line)
        if m:
            rows[m[1]] = [int(x) for x in m[2].split()]
    return rows


def test_two_policies_side_by_side(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    cfg = config(tmp_path, "file:policies/pin.py", 'backend = "b2"')
    total = capture(tmp_path / "in.pcap")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["replay", "--config", str(cfg), "--policy", "round_robin",
                     "--policy", "file:policies/pin.py", "in.pcap"]) == 0
    out = capsys.readouterr().out
    assert "== policy round_robin: 240 packets in, 240 out, 0 dropped" in out
    header = next(line for line in out.splitlines() if "round_robin" in line and "pin" in line)
    assert header.index("round_robin") < header.index("pin.py")
    rows = table(out)
    rr, pin = {b: r[:3] for b, r in rows.items()}, {b: r[3:] for b, r in rows.items()}
    assert [rr[b][0] for b in BACKENDS] == [10, 10, 10]
    assert sum(rr[b][1] for b in BACKENDS) == 8 * FLOWS  # every packet, both directions
    assert sum(rr[b][2] for b in BACKENDS) == total
    assert pin == {"b1": [0, 0, 0], "b2": [FLOWS, 8 * FLOWS, total], "b3": [0, 0, 0]}


def test_one_policy_and_replies_from_another_backend(tmp_path: Path, capsys: Any) -> None:
    """A backend-side capture where b1 answered everything: what round robin would have done
    counts each reply on the backend round robin chose."""
    cfg = config(tmp_path)
    total = capture(tmp_path / "in.pcap", reply_from=BACKENDS["b1"])
    assert cli.main(["replay", "--config", str(cfg), "--policy", "rr",
                     str(tmp_path / "in.pcap")]) == 0
    rows = table(capsys.readouterr().out)
    assert {b: r[0] for b, r in rows.items()} == {"b1": 10, "b2": 10, "b3": 10}
    assert sum(r[1] for r in rows.values()) == 8 * FLOWS
    assert sum(r[2] for r in rows.values()) == total


def test_what_if_counts_refusals(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "none.py").write_text(
        "class P:\n    def __init__(self, o, r): pass\n    def set_backends(self, b): pass\n"
        "    def choose(self, f, n): return None\nfactory = P\n")
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    assert cli.main(["replay", "--config", str(cfg), "--policy",
                     str("file:" + str(tmp_path / "policies" / "none.py")),
                     str(tmp_path / "in.pcap")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\(refused flows\)\s+30\b", out), out
    assert re.search(r"\(packets, no flow\)\s+240\b", out), out


def test_two_policies_with_one_output_file_is_a_usage_error(tmp_path: Path,
                                                            capsys: Any) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    assert cli.main(["replay", "--config", str(cfg), "--policy", "rr", "--policy", "maglev",
                     "-o", str(tmp_path / "out.pcap"), str(tmp_path / "in.pcap")]) == 2


def test_a_broken_policy_is_one_line_exit_2(tmp_path: Path, capsys: Any) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    (tmp_path / "bad.py").write_text("def factory(options, rng):\n    raise OSError('no')\n")
    assert cli.main(["replay", "--config", str(cfg), "--policy", f"file:{tmp_path}/bad.py",
                     str(tmp_path / "in.pcap")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.py: building the policy failed: line 2: OSError" in err
    assert cli.main(["replay", "--config", str(cfg), "--policy", "maglevv",
                     str(tmp_path / "in.pcap")]) == 2
    assert "unknown policy 'maglevv'" in capsys.readouterr().err


def test_policy_options_kept_only_for_the_same_policy(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, "maglev", "table_size = 1009"))
    same = with_policy(cfg, "maglev").services[0]
    assert dict(same.policy_options) == {"table_size": 1009}
    other = with_policy(cfg, "source_hash").services[0]
    assert (other.policy, dict(other.policy_options)) == ("source_hash", {})
    pin = load_config(config(tmp_path, "file:policies/pin.py", 'backend = "b3"'))
    with pytest.raises(PolicyError, match="policy_options.backend: is required"):
        with_policy(pin, f"file:{REPO}/examples/policies/pin.py")  # another file: no options


def test_replay_without_policy_is_unchanged(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path))
    capture(tmp_path / "in.pcap")
    with (tmp_path / "in.pcap").open("rb") as src:
        result = replay(cfg, src, None)
    assert result.packets_in == result.packets_out == 8 * FLOWS


# -- issue 9: plain replay and what-if count alike; --policy-option ------------------------


def plain_rows(out: str) -> dict[str, list[int]]:
    """backend -> [flows, packets, bytes] from the counters plain replay prints."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\S+)\s+flows\s+(\d+)\s+active\s+\d+\s+packets\s+(\d+)"
                     r"\s+bytes\s+(\d+)$", line)
        if m:
            rows[m[1]] = [int(m[2]), int(m[3]), int(m[4])]
    return rows


def whatif_rows(out: str) -> dict[str, list[int]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\S+:\d+|b\d)\s+(\d+)\s+(\d+)\s+(\d+)$", line)
        if m:
            rows[m[1]] = [int(m[2]), int(m[3]), int(m[4])]
    return rows


GOLDEN = REPO / "tests" / "golden"


@pytest.mark.parametrize("case", ["dnat_tcp", "fullnat_tcp", "fullnat_udp_frag",
                                  "dnat_udp6_frag", "fullnat_udp6_frag_ooo"])
def test_plain_replay_and_what_if_of_the_same_policy_count_alike(case: str,
                                                                  capsys: Any) -> None:
    """Fullnat replies and later fragments are the flow's packets for both (what-if used to
    leave them out and print them as packets of no flow)."""
    cfg, capture_path = str(GOLDEN / f"{case}.toml"), str(GOLDEN / f"{case}.in.pcap")
    policy = load_config(cfg).services[0].policy
    assert cli.main(["replay", "--config", cfg, capture_path]) == 0
    plain = plain_rows(capsys.readouterr().out)
    assert cli.main(["replay", "--config", cfg, "--policy", policy, capture_path]) == 0
    out = capsys.readouterr().out
    assert "no flow" not in out
    assert whatif_rows(out) == plain and plain


def test_client_side_capture_counts_replies_in_plain_replay_too(tmp_path: Path,
                                                                capsys: Any) -> None:
    """Replies from the VIP (a capture on the client's side) are the flow's packets in both."""
    cfg = config(tmp_path)
    total = capture(tmp_path / "in.pcap")
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "in.pcap")]) == 0
    plain = plain_rows(capsys.readouterr().out)
    assert cli.main(["replay", "--config", str(cfg), "--policy", "round_robin",
                     str(tmp_path / "in.pcap")]) == 0
    assert whatif_rows(capsys.readouterr().out) == plain
    assert sum(r[1] for r in plain.values()) == 8 * FLOWS
    assert sum(r[2] for r in plain.values()) == total


def test_policy_option_lets_a_plugin_that_needs_one_be_tried(tmp_path: Path, capsys: Any,
                                                            monkeypatch: Any) -> None:
    cfg = config(tmp_path)  # round_robin: pin.py's required "backend" is nowhere in it
    capture(tmp_path / "in.pcap")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["replay", "--config", str(cfg), "--policy", "file:policies/pin.py",
                     "--policy-option", "backend=b3", "in.pcap"]) == 0  # a bare string
    rows = table(capsys.readouterr().out)
    assert [rows[b][0] for b in BACKENDS] == [0, 0, FLOWS]
    assert cli.main(["replay", "--config", str(cfg), "--policy", "file:policies/pin.py",
                     "--policy-option", 'backend="b1"', "in.pcap"]) == 0  # a TOML string
    rows = table(capsys.readouterr().out)
    assert [rows[b][0] for b in BACKENDS] == [FLOWS, 0, 0]


def test_policy_option_values_are_toml(tmp_path: Path, capsys: Any) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    argv = ["replay", "--config", str(cfg), str(tmp_path / "in.pcap")]
    assert cli.main([*argv, "--policy", "maglev", "--policy-option", "table_size=1009",
                     "--policy-option", 'fields=["src"]']) == 0
    rows = table(capsys.readouterr().out)
    assert sorted(r[0] for r in rows.values()) == [0, 0, FLOWS]  # one client: one backend
    assert cli.main([*argv, "--policy", "source_hash", "--policy-option",
                     "src_prefix=24"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("options, message", [
    (["table_size=1000"], "--policy-option table_size: 1000 is not a prime"),
    (["table_size=abc"], "--policy-option table_size:"),
    (["bogus=1"], "--policy-option bogus: unknown option"),
    (["table_size=1009", "table_size=1013"], "--policy-option table_size is given twice"),
    (["table_size"], "is not KEY=VALUE"),
])
def test_a_wrong_policy_option_is_one_line_exit_2(tmp_path: Path, capsys: Any,
                                                  options: list[str], message: str) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    argv = ["replay", "--config", str(cfg), "--policy", "maglev", str(tmp_path / "in.pcap")]
    for o in options:
        argv += ["--policy-option", o]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_policy_option_without_policy_is_a_usage_error(tmp_path: Path, capsys: Any) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    assert cli.main(["replay", "--config", str(cfg), "--policy-option", "table_size=1009",
                     str(tmp_path / "in.pcap")]) == 2
    assert "--policy-option needs --policy" in capsys.readouterr().err


def test_output_into_a_missing_directory_names_the_output(tmp_path: Path,
                                                          capsys: Any) -> None:
    cfg = config(tmp_path)
    capture(tmp_path / "in.pcap")
    out = tmp_path / "missing" / "out.pcap"
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "in.pcap"),
                     "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"nfqlb: error: -o {out}: no such directory: {out.parent}\n"
    assert cli.main(["replay", "--config", str(cfg), str(tmp_path / "nope.pcap"),
                     "-o", str(tmp_path / "out.pcap")]) == 1
    assert capsys.readouterr().err == f"nfqlb: error: {tmp_path / 'nope.pcap'}: no such file\n"
